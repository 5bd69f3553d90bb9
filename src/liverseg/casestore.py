"""The case store: one compressed HDF5 file per case, read one slice at a time.

A case (a CT volume, a labelled series, a 2D source's patient) is one file:

    /<H>x<W>/image   uint8 [N, H, W]  the grey slices, windowed as ingest and serving do
    /<H>x<W>/mask    uint8 [N, H, W]  the labels as stored (`liverseg.labels.encode`)
    /case.json       the case's rows of data/raw/slices.csv (its per-slice facts) and what
                     its source said about it, as JSON

Slices of different sizes (2D sources) stay in separate groups. Each slice is one chunk,
Zstandard-compressed (HDF5's registered filter 32015, from the hdf5plugin package, which
h5py loads on import; other HDF5 tools find it through `HDF5_PLUGIN_PATH`, the folder
`hdf5plugin.PLUGIN_PATH` names), so reading slice k decodes that slice only. Loading a
case runs no code (no pickle). The file is written in one go into a temporary name and
renamed, so a killed writer never leaves a partial case; for the same input the bytes are
the same (no creation times), whichever worker wrote it.

A slice is addressed by a reference `cases/<case>.h5#<H>x<W>/<k>` relative to data/raw:
the `image` and `mask` columns of the index hold it (empty: nothing was stored).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CASES = "cases"  # the folder of data/raw holding the case files
SUFFIX = ".h5"
RECORD = "case.json"
# Chosen on a 64-slice 512x512 CT stack with 15 HU noise (docs/DATA.md): Zstandard level 5
# stores 0.39 bytes per voxel and decodes a slice in 0.13 ms (gzip-4: 0.41 bytes, 0.63 ms,
# which cost training about 7% of its images/s; lzf: 0.59 bytes).
ZSTD_LEVEL = 5


def _h5py():
    """h5py, with hdf5plugin imported first: it registers the Zstandard filter."""
    import h5py
    import hdf5plugin  # noqa: F401

    return h5py


def _compression() -> dict:
    import hdf5plugin

    return dict(hdf5plugin.Zstd(clevel=ZSTD_LEVEL))


@dataclass(frozen=True)
class SliceRef:
    """Where one slice lives: the case file (relative to data/raw), its group, its index."""

    case_file: str
    group: str
    index: int

    def __str__(self) -> str:
        return f"{self.case_file}#{self.group}/{self.index}"

    @classmethod
    def parse(cls, ref: str) -> SliceRef:
        case_file, _, rest = ref.partition("#")
        group, _, index = rest.rpartition("/")
        if not (case_file and group and index.isdigit()):
            raise ValueError(f"{ref!r} is not a slice reference (cases/<case>.h5#<H>x<W>/<k>)")
        return cls(case_file, group, int(index))


def group_name(shape: tuple[int, ...]) -> str:
    return f"{shape[-2]}x{shape[-1]}"


def case_file(case_id: str) -> str:
    """The case's file, relative to data/raw."""
    return f"{CASES}/{case_id}{SUFFIX}"


def write_case(path: str | Path, groups: dict[str, tuple[np.ndarray, np.ndarray]],
               record: dict) -> None:
    """Write one case atomically: `groups` maps a group name to (images, masks) [N, H, W];
    `record` (JSON: the rows and facts) is stored beside them."""
    h5py = _h5py()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w", libver="earliest", track_order=False) as f:
            for name, (images, masks) in sorted(groups.items()):
                group = f.create_group(name)
                for key, array in (("image", images), ("mask", masks)):
                    chunks = (1, *array.shape[1:])
                    group.create_dataset(key, data=np.ascontiguousarray(array, np.uint8),
                                         chunks=chunks, track_times=False, **_compression())
            blob = json.dumps(record, sort_keys=True, default=str).encode()
            f.create_dataset(RECORD, data=np.frombuffer(blob, np.uint8), track_times=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def open_case(path: str | Path):
    """A case file open for reading slices, without HDF5's chunk cache: a slice is one
    chunk, read once a visit, and the cache (8 MiB a dataset under HDF5 2.0) only held
    memory: with MAX_OPEN files open, training's peak grew with the number of cases."""
    return _h5py().File(path, "r", rdcc_nbytes=0)


MAX_OPEN = 32  # files kept open per process: a hospital's thousand cases stay in limits
_OPEN: OrderedDict[tuple[str, int], tuple[tuple, object, dict]] = OrderedDict()


def _dataset(path: Path, name: str):
    """An open dataset (`<group>/image`), its file kept open among the most recent MAX_OPEN
    of this process: a lookup by name costs more than reading a slice. A file replaced on
    disk (another inode or mtime) is opened anew; h5py handles do not survive a fork, so a
    DataLoader worker (another pid) opens its own."""
    key, st = (str(path), os.getpid()), os.stat(path)
    stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
    if key in _OPEN and _OPEN[key][0] == stamp:
        _OPEN.move_to_end(key)
    else:
        if key in _OPEN:
            _OPEN.pop(key)[1].close()
        _OPEN[key] = (stamp, open_case(path), {})
        while len(_OPEN) > MAX_OPEN:
            (_, pid), (_, handle, _) = _OPEN.popitem(last=False)
            if pid == os.getpid():
                handle.close()
    _, handle, datasets = _OPEN[key]
    if name not in datasets:
        datasets[name] = handle[name]
    return datasets[name]


def close_all() -> None:
    """Close this process's files (before its case files are replaced or deleted)."""
    for (_, pid), (_, handle, _) in list(_OPEN.items()):
        if pid == os.getpid():
            handle.close()
    _OPEN.clear()


def read(raw_dir: str | Path, ref: str | SliceRef, what: str = "image") -> np.ndarray:
    """One stored slice [H, W] (`what`: image or mask)."""
    ref = SliceRef.parse(ref) if isinstance(ref, str) else ref
    path = Path(raw_dir) / ref.case_file
    try:
        return _dataset(path, f"{ref.group}/{what}")[ref.index]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: case file missing (slice {ref}); rerun `liverseg "
                                "ingest`") from None


def read_input(raw_dir: str | Path, row: dict) -> np.ndarray:
    """A layout row's network input as stored: its grey slice [H, W], or with 2.5D context
    (the row's "|"-joined `context` references) the stack [2k + 1, H, W]."""
    context = row.get("context")
    if isinstance(context, str) and context:
        return np.stack([read(raw_dir, ref) for ref in context.split("|")])
    return read(raw_dir, row["image"])


def read_case(path: str | Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """A whole case: its groups {name: (images, masks)} and its record."""
    with _h5py().File(path, "r") as f:
        groups = {name: (f[name]["image"][()], f[name]["mask"][()])
                  for name in f if name != RECORD}
        return groups, json.loads(f[RECORD][()].tobytes())


def read_record(path: str | Path) -> dict:
    """The record stored with the case (its index rows and facts)."""
    with _h5py().File(path, "r") as f:
        return json.loads(f[RECORD][()].tobytes())


def list_cases(raw_dir: str | Path) -> list[Path]:
    """Every case file under data/raw, sorted by name."""
    return sorted((Path(raw_dir) / CASES).glob(f"*{SUFFIX}"))


def slice_digest(image: np.ndarray) -> str:
    """The content hash of one slice (shape and bytes): validate's duplicate check."""
    digest = hashlib.sha256(f"{image.shape}{image.dtype}".encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()
