"""Atomic file writes and the image format shared by every stage.

Outputs are written to a temporary sibling and renamed into place, so no stage (or DVC)
ever sees a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, fsync: bool = False, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to `path`; move it onto `path` only on success.

    A killed process leaves at most a `.<name>.*.tmp` sibling, never a partial `path`.
    `fsync=True` also makes the new file survive a power cut (data, then the rename).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    tmp.chmod(0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
        if fsync:
            _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory `.<name>.*.dirtmp` that replaces `path` on success.

    Readers never see a partial directory: `path` is the old one, briefly absent, then the
    new one (DVC deletes a stage's outputs before its command anyway). Temporaries left by
    a killed earlier run are removed first; two writers of one output in one workspace are
    excluded by DVC's output lock.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.dirtmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".dirtmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, data) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected file is missing (did the upstream stage run?)")
    return json.loads(path.read_text())


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_png(path: str | Path, array: np.ndarray) -> None:
    """Save a 2D uint8 array as an 8-bit grayscale PNG."""
    if array.dtype != np.uint8 or array.ndim != 2:
        raise ValueError(f"{path}: expected a 2D uint8 array, got {array.dtype} {array.shape}")
    Image.fromarray(array).save(path)  # 2D uint8 -> mode "L"


def load_gray(path: str | Path) -> np.ndarray:
    """Load an image as a 2D uint8 array (colour images are converted to luminance)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("L"))


# ----------------------------------------------------------------------------- masks archive
# evaluate writes each model's validation masks here and the report reads them: slices may
# differ in size, so one flat array, each mask's shape and its slice id.


def save_masks(path: str | Path, masks: dict[str, np.ndarray]) -> None:
    """{slice_id: 2D mask} as one compressed .npz, written atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, slice_id=np.array(list(masks), dtype=str),
                            shapes=np.array([m.shape for m in masks.values()],
                                            np.int64).reshape(-1, 2),
                            masks=np.concatenate([m.ravel() for m in masks.values()]))


def load_masks(path: str | Path) -> dict[str, np.ndarray]:
    """What `save_masks` wrote; a missing or inconsistent file is named."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected file is missing (did the upstream stage run?)")
    with np.load(path) as npz:
        ids, shapes, flat = npz["slice_id"].astype(str), npz["shapes"], npz["masks"]
    sizes = shapes.prod(axis=1)
    if len(ids) != len(shapes) or sizes.sum() != flat.size:
        raise ValueError(f"{path}: {len(ids)} slice ids, {len(shapes)} shapes and "
                         f"{flat.size} mask pixels do not add up")
    masks = np.split(flat, np.cumsum(sizes)[:-1])
    return {sid: m.reshape(shape) for sid, m, shape in zip(ids.tolist(), masks, shapes,
                                                           strict=True)}
