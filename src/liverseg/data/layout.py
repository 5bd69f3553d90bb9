"""The one on-disk layout every source is ingested into.

    data/raw/images/<slice_id>.png   8-bit grayscale CT slice (windowed)
    data/raw/masks/<slice_id>.png    8-bit binary mask, 0 background / 255 foreground
    data/raw/slices.csv              one row per slice: slice_id, patient_id, source,
                                     slice_index, image, mask (paths relative to data/raw)

`slice_id` is `<patient_id>_<slice_index:04d>`, so the patient is recoverable from a file
name alone; the CSV states it explicitly so no stage has to parse names.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

INDEX_NAME = "slices.csv"
INDEX_COLUMNS = ["slice_id", "patient_id", "source", "slice_index", "image", "mask"]


def slice_id(patient_id: str, slice_index: int) -> str:
    return f"{patient_id}_{slice_index:04d}"


def read_index(raw_dir: str | Path) -> pd.DataFrame:
    path = Path(raw_dir) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: slice index missing; run `liverseg ingest` first")
    index = pd.read_csv(path, dtype={"patient_id": str, "slice_id": str})
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {INDEX_COLUMNS}")
    return index
