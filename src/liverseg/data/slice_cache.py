"""The decoded-slice cache: each split's slices decoded once, as memory-mappable arrays.

The split stage writes `data/splits/<split>.images.npy` (uint8 [N, H, W], as decoded from
the PNGs; [N, 2k + 1, H, W] with `data.context_slices` k) and `<split>.masks.npy` (uint8
class indices, `liverseg.labels.decode`), rows in the order of `<split>.csv`, inside the
same DVC output as the CSVs, so the three never disagree. `SliceDataset` maps them
(`np.load(mmap_mode="r")`) instead of decoding PNGs every epoch; the pixels are the same
bytes, so training results do not change. A split whose slices differ in size has no cache
(the loader then decodes the files).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from liverseg import labels
from liverseg.io import load_gray

if TYPE_CHECKING:  # the loader imports this module; training needs no pandas
    import pandas as pd


def paths(split_csv: str | Path) -> tuple[Path, Path]:
    split_csv = Path(split_csv)
    stem = split_csv.with_suffix("")
    return stem.with_name(f"{stem.name}.images.npy"), stem.with_name(f"{stem.name}.masks.npy")


def write(frame: pd.DataFrame, raw_dir: Path, split_csv: Path, num_classes: int = 2) -> bool:
    """Decode every slice of `frame` into the cache beside `split_csv`; False if the sizes
    differ (no cache written)."""
    if frame.empty or frame["width"].nunique() > 1 or frame["height"].nunique() > 1:
        return False
    shape = (len(frame), int(frame["height"].iloc[0]), int(frame["width"].iloc[0]))
    rows = frame.to_dict("records")
    channels = load_input(raw_dir, rows[0]).shape[:-2]
    image_path, mask_path = paths(split_csv)
    # Filled slice by slice into the mapped files: memory stays at one slice, not the split.
    images = np.lib.format.open_memmap(image_path, mode="w+", dtype=np.uint8,
                                       shape=shape[:1] + channels + shape[1:])
    masks = np.lib.format.open_memmap(mask_path, mode="w+", dtype=np.uint8, shape=shape)
    for i, row in enumerate(rows):
        images[i] = load_input(raw_dir, row)  # a size other than the manifest's raises
        masks[i] = labels.decode(load_gray(raw_dir / row["mask"]), num_classes)
    images.flush()
    masks.flush()
    return True


def load_input(raw_dir: Path, row: dict) -> np.ndarray:
    """A split row's network input as stored: its grey slice [H, W], or with 2.5D context
    (the row's "|"-joined `context` paths) the stack [2k + 1, H, W]."""
    context = row.get("context")
    if isinstance(context, str) and context:
        return np.stack([load_gray(raw_dir / rel) for rel in context.split("|")])
    return load_gray(raw_dir / row["image"])


def open_cache(split_csv: str | Path, rows: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Memory-mapped (images, masks) for the split, or None when there is no cache."""
    image_path, mask_path = paths(split_csv)
    if not (image_path.is_file() and mask_path.is_file()):
        return None
    images, masks = np.load(image_path, mmap_mode="r"), np.load(mask_path, mmap_mode="r")
    if len(images) != rows or len(masks) != rows:
        raise ValueError(f"{image_path}: {len(images)} cached slices but {split_csv} has "
                         f"{rows} rows; rerun `liverseg split`")
    return images, masks
