"""The one on-disk layout every source is ingested into.

    data/raw/images/<slice_id>.png   8-bit grayscale CT slice (windowed)
    data/raw/masks/<slice_id>.png    8-bit mask: 0 background / 255 foreground, or for three
                                     classes 0/128/255 (`liverseg.labels`)
    data/raw/context/<slice_id>.png  2.5D (data.context_slices): a neighbour that is not a
                                     row itself (e.g. outside data.nifti.slices: organ)
    data/raw/classes.json            the target and its class names
    data/raw/slices.csv              one row per source item: INDEX_COLUMNS + FACT_COLUMNS

`slice_id` is unique and file-name safe: `<patient_id>_<slice_index:04d>` for volumes and
the phantom, the (sanitised) file stem for 2D sources. Items that could not become a slice
(an image without a mask, an undecodable file, a mask whose values are not allowed) are
rows too, with empty `image`/`mask` where nothing was written and the facts saying why:
the validate stage turns them into quarantine entries, so nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd

from liverseg import labels
from liverseg.artifacts import RAW_INDEX
from liverseg.io import save_png

INDEX_NAME = RAW_INDEX  # the index of data/raw (liverseg.artifacts owns the name)
INDEX_COLUMNS = ["slice_id", "patient_id", "source", "slice_index", "image", "mask"]
# Facts about the source item, recorded at ingest (the only stage that sees the source).
FACT_COLUMNS = ["source_image", "source_mask", "channels", "dtype", "source_mask_values",
                "paired", "image_decodable", "mask_decodable", "mask_values_allowed",
                "ingest_detail", "context"]


def slice_id(patient_id: str, slice_index: int) -> str:
    return f"{patient_id}_{slice_index:04d}"


def safe_stem(name: str) -> str:
    """A file-name-safe id for `name`; a short hash keeps non-ASCII names distinct."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "slice"
    if safe != name:
        safe += "-" + hashlib.sha1(name.encode()).hexdigest()[:6]
    return safe


def _unique(sid: str, taken: set[str]) -> str:
    base, n = sid, 1
    while sid in taken:  # e.g. two train/ and test/ folders with the same names
        n += 1
        sid = f"{base}-{n}"
    taken.add(sid)
    return sid


class SliceWriter:
    """Writes slices into a layout directory and collects the index rows."""

    def __init__(self, out_dir: Path, source: str, num_classes: int = 2):
        self.out_dir, self.source, self.num_classes = Path(out_dir), source, num_classes
        (self.out_dir / "images").mkdir(parents=True, exist_ok=True)
        (self.out_dir / "masks").mkdir(exist_ok=True)
        self.rows: list[dict] = []
        self.ids: set[str] = set()
        self.context_ids: set[str] = set()

    def _unique(self, sid: str) -> str:
        return _unique(sid, self.ids)

    def add(self, sid: str, patient_id: str | None, slice_index: int,
            image: np.ndarray | None, mask: np.ndarray | None, **facts) -> str:
        """One item; `image`/`mask` None when they could not be produced (facts say why).
        `mask` is bool (binary) or class indices."""
        sid = self._unique(sid)
        row = {"slice_id": sid, "patient_id": patient_id or "", "source": self.source,
               "slice_index": slice_index, "image": "", "mask": ""}
        if image is not None:
            row["image"] = f"images/{sid}.png"
            save_png(self.out_dir / row["image"], image)
        if mask is not None:
            row["mask"] = f"masks/{sid}.png"
            save_png(self.out_dir / row["mask"], labels.encode(mask, self.num_classes))
        defaults = {"paired": True, "image_decodable": True, "mask_decodable": True,
                    "mask_values_allowed": True, "ingest_detail": "", "context": ""}
        self.rows.append(row | defaults | facts)
        return sid

    def link_context(self, rows: dict[int, str], n: int, k: int, image_of) -> None:
        """2.5D: give each of one volume's rows (slice index -> slice id, of `n` slices)
        its context, "|"-joined image paths of slices z-k .. z+k (`preprocess.context_indices`:
        edges repeat the edge). A neighbour that is a row is its image; any other is written
        once as `context/<slice_id>.png` from `image_of(index)`."""
        from liverseg.preprocess import context_indices  # torch: only 2.5D ingest needs it

        wanted = set(rows.values())
        by_id = {row["slice_id"]: row for row in self.rows if row["slice_id"] in wanted}
        extra: dict[int, str] = {}
        for z, sid in rows.items():
            paths = []
            for j in context_indices([z], n, k)[0].tolist():
                if j in rows:
                    paths.append(by_id[rows[j]]["image"])
                    continue
                if j not in extra:
                    cid = _unique(slice_id(by_id[sid]["patient_id"], j), self.context_ids)
                    extra[j] = f"context/{cid}.png"
                    (self.out_dir / "context").mkdir(exist_ok=True)
                    save_png(self.out_dir / extra[j], image_of(j))
                paths.append(extra[j])
            by_id[sid]["context"] = "|".join(paths)

    def index(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=INDEX_COLUMNS + FACT_COLUMNS)


def read_index(raw_dir: str | Path) -> pd.DataFrame:
    path = Path(raw_dir) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: slice index missing; run `liverseg ingest` first")
    index = pd.read_csv(path, dtype={"patient_id": str, "slice_id": str, "image": str,
                                     "mask": str}, keep_default_na=False,
                        na_values={"patient_id": [""]})
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {INDEX_COLUMNS}")
    for col in FACT_COLUMNS:  # an index written by an older ingest has no facts: all fine
        if col not in index:
            index[col] = True if col in ("paired", "image_decodable", "mask_decodable",
                                         "mask_values_allowed") else ""
    return index
