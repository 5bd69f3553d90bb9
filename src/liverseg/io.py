"""Atomic file writes, JSON, and the masks archive evaluate writes and the report reads.

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
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np


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


# ----------------------------------------------------------------------------- masks archive
# evaluate writes each model's validation masks here, one slice at a time, and the report
# reads the few it draws: an HDF5 file with a group per slice size ([N, H, W], one chunk per
# mask) and `index.json` mapping each slice id to its group and row. Neither side holds
# every mask in memory.


class MaskWriter:
    """Appends {slice id: 2D mask} to an archive, published atomically on `close()`."""

    def __init__(self, path: str | Path):
        import h5py

        self.path = Path(path)
        self._publish = ExitStack()  # atomic_path: renamed into place on a clean close
        self._file = h5py.File(self._publish.enter_context(atomic_path(self.path)), "w")
        self.index: dict[str, list] = {}

    def add(self, slice_id: str, mask: np.ndarray) -> None:
        if slice_id in self.index:
            raise ValueError(f"{self.path}: slice {slice_id} written twice")
        name = f"{mask.shape[0]}x{mask.shape[1]}"
        if name not in self._file:
            self._file.create_dataset(name, shape=(0, *mask.shape), maxshape=(None, *mask.shape),
                                      dtype=np.uint8, chunks=(1, *mask.shape),
                                      compression="gzip", track_times=False)
        data = self._file[name]
        data.resize(len(data) + 1, axis=0)
        data[-1] = mask
        self.index[slice_id] = [name, len(data) - 1]

    def close(self) -> None:
        blob = json.dumps(self.index).encode()
        self._file.create_dataset("index.json", data=np.frombuffer(blob, np.uint8))
        self._file.close()
        self._publish.close()

    def __enter__(self) -> MaskWriter:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is None:
            self.close()
        else:  # nothing is published
            self._file.close()
            self._publish.__exit__(kind, error, tb)


def save_masks(path: str | Path, masks: dict[str, np.ndarray]) -> None:
    """{slice_id: 2D mask} as one archive, written atomically."""
    with MaskWriter(path) as writer:
        for sid, mask in masks.items():
            writer.add(sid, mask)


class MaskArchive:
    """What `MaskWriter` wrote, read one mask at a time: `sid in archive`, `archive[sid]`."""

    def __init__(self, path: str | Path):
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: expected file is missing (did the upstream "
                                    "stage run?)")
        with h5py.File(self.path, "r") as f:
            self.index = json.loads(f["index.json"][()].tobytes())

    def __contains__(self, sid: str) -> bool:
        return sid in self.index

    def __len__(self) -> int:
        return len(self.index)

    def __iter__(self):
        return iter(self.index)

    def __getitem__(self, sid: str) -> np.ndarray:
        import h5py

        name, row = self.index[sid]
        with h5py.File(self.path, "r") as f:
            return f[name][row]


def load_masks(path: str | Path) -> MaskArchive:
    """What `save_masks` wrote (a missing file is named), read lazily."""
    return MaskArchive(path)
