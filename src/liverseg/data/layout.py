"""The one on-disk layout every source is ingested into.

    data/raw/cases/<case_id>.h5      one file per case: every slice (8-bit grey, windowed)
                                     and its labels (0/255, or 0/128/255 for three
                                     classes: `liverseg.labels`), compressed, one chunk per
                                     slice (`liverseg.casestore`)
    data/raw/classes.json            the target and its class names
    data/raw/slices.csv              one row per source item: INDEX_COLUMNS + FACT_COLUMNS

A case is what one worker ingests: a volume, or a 2D source's patient (its slices grouped
by patient id; slices without one share a case per source folder). Each row's `image` and
`mask` are references into its case file (`cases/<case>.h5#<H>x<W>/<k>`); `sampled` says
whether training uses the slice (`data.nifti.slices`, `empty_fraction`): every slice is
stored, so evaluation sees whole cases. With 2.5D context (`data.context_slices`) `context`
holds the "|"-joined references of slices z-k .. z+k.

`slice_id` is unique and file-name safe: `<case_id>_<slice_index:04d>` for volumes and the
phantom, the (sanitised) file stem for 2D sources. Items that could not become a slice (an
image without a mask, an undecodable file, a mask whose values are not allowed) are rows
too, with empty `image`/`mask` where nothing was stored and the facts saying why: the
validate stage turns them into quarantine entries, so nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from liverseg import casestore, labels
from liverseg.artifacts import RAW_INDEX

INDEX_NAME = RAW_INDEX  # the index of data/raw (liverseg.artifacts owns the name)
INDEX_COLUMNS = ["slice_id", "patient_id", "source", "slice_index", "image", "mask"]
# Where a label came from (the dicom source; empty for file sources, whose label is the
# `source_mask` file): the archive objects, its kind, creator, origin (human, corrected,
# model, unknown) and status (superseded by a later label of the same series); on a model's
# label that a clinician corrected, how much they changed it (Dice, mL) and by which label.
LABEL_COLUMNS = ["study_uid", "series_uid", "label_uid", "label_kind", "origin",
                 "label_creator", "label_status", "label_readable", "label_mapped",
                 "correction_dice", "correction_ml", "corrected_by", "corrected_at"]
# Facts about the source item, recorded at ingest (the only stage that sees the source).
# `spacing`: a volume's voxel size in mm, "slice,row,column" in the stored slices' axes
# (`preprocess.slice_spacing`), for per-case 3D metrics; empty where slices form no grid.
FACT_COLUMNS = ["source_image", "source_mask", "channels", "dtype", "source_mask_values",
                "paired", "image_decodable", "mask_decodable", "mask_values_allowed",
                "ingest_detail", "context", "case", "sampled", "spacing", *LABEL_COLUMNS]
ROW_DEFAULTS = {"paired": True, "image_decodable": True, "mask_decodable": True,
                "mask_values_allowed": True, "ingest_detail": "", "context": "", "case": "",
                "sampled": True, "label_readable": True, "label_mapped": True}


@dataclass(frozen=True)
class CaseTask:
    """One case as a source plans it: picklable, so a worker process can ingest it.
    `files` (path, size, mtime) say when it changed; `spec` is the source's own."""

    case_id: str
    files: tuple[tuple[str, int, int], ...]
    spec: object
    memory: int = 0  # bytes a worker needs for it, from the headers (0: small)


@dataclass
class Plan:
    """A source's cases, the rows of items that are no case (files that do not pair), and
    facts about the source as a whole."""

    tasks: list[CaseTask] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    facts: dict = field(default_factory=dict)


def file_facts(*paths: Path) -> tuple[tuple[str, int, int], ...]:
    """(path, size, mtime in ns) of each file: what says a case's files changed, without
    reading them."""
    out = []
    for path in paths:
        st = os.stat(path)
        out.append((str(path), st.st_size, st.st_mtime_ns))
    return tuple(out)


def problem_row(sid: str, patient_id: str | None, slice_index: int, source: str,
                **facts) -> dict:
    """The row of an item that stored nothing; the facts say why."""
    return {"slice_id": sid, "patient_id": patient_id or "", "source": source,
            "slice_index": slice_index, "image": "", "mask": ""} | ROW_DEFAULTS | facts


def slice_id(patient_id: str, slice_index: int) -> str:
    return f"{patient_id}_{slice_index:04d}"


def safe_stem(name: str) -> str:
    """A file-name-safe id for `name`; a short hash keeps non-ASCII names distinct."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "slice"
    if safe != name:
        safe += "-" + hashlib.sha1(name.encode()).hexdigest()[:6]
    return safe


def unique(sid: str, taken: set[str]) -> str:
    """`sid`, or `sid-2`, `sid-3`... when taken (e.g. train/ and test/ folders with the
    same names)."""
    base, n = sid, 1
    while sid in taken:
        n += 1
        sid = f"{base}-{n}"
    taken.add(sid)
    return sid


class CaseWriter:
    """Collects one case's slices and rows; `stacked()` is what the case file holds."""

    def __init__(self, case_id: str, source: str, num_classes: int = 2):
        self.case_id, self.source, self.num_classes = case_id, source, num_classes
        self.rows: list[dict] = []
        self.groups: dict[str, tuple[list, list]] = {}

    def add(self, sid: str, patient_id: str | None, slice_index: int,
            image: np.ndarray | None, mask: np.ndarray | None, sampled: bool = True,
            **facts) -> dict:
        """One item; `image`/`mask` None when they could not be produced (facts say why).
        `mask` is bool (binary) or class indices. An image and a mask of different sizes
        (a bad pair) are stored apart, each beside an empty partner, so validate reads both
        and names the rule they break."""
        row = problem_row(sid, patient_id, slice_index, self.source, case=self.case_id,
                          sampled=sampled) | facts
        encoded = None if mask is None else labels.encode(mask, self.num_classes)
        if image is not None:
            same = encoded is not None and encoded.shape == image.shape
            row["image"] = self._store(image, encoded if same else np.zeros_like(image))
            row["mask"] = row["image"] if same else ""
        if encoded is not None and not row["mask"]:
            row["mask"] = self._store(np.zeros_like(encoded), encoded)
        self.rows.append(row)
        return row

    def _store(self, image: np.ndarray, encoded_mask: np.ndarray) -> str:
        """Append one slot to the group of its size; its reference."""
        name = casestore.group_name(image.shape)
        images, masks = self.groups.setdefault(name, ([], []))
        images.append(np.asarray(image, np.uint8))
        masks.append(np.asarray(encoded_mask, np.uint8))
        return str(casestore.SliceRef(casestore.case_file(self.case_id), name, len(images) - 1))

    def link_context(self, k: int) -> None:
        """2.5D: each stored slice's context, the references of slices z-k .. z+k of the
        case (`preprocess.context_indices`: edges repeat the edge). Every slice of a volume
        is stored, so every neighbour is a row."""
        from liverseg.preprocess import context_indices  # ingest's; validate reads layout too

        stored = {row["slice_index"]: row["image"] for row in self.rows if row["image"]}
        if not stored:
            return
        n = max(stored) + 1
        for row in self.rows:
            if row["image"]:
                neighbours = context_indices([row["slice_index"]], n, k)[0].tolist()
                row["context"] = "|".join(stored[j] for j in neighbours)

    def stacked(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The stored slots by group: (images, masks) [N, H, W] each."""
        return {name: (np.stack(images), np.stack(masks))
                for name, (images, masks) in self.groups.items()}


def read_index(raw_dir: str | Path) -> pd.DataFrame:
    path = Path(raw_dir) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: slice index missing; run `liverseg ingest` first")
    # Ids are text: LiTS's case "3" is not the number 3 (a split's rows, read as text, name it)
    index = pd.read_csv(path, dtype={"patient_id": str, "slice_id": str, "case": str,
                                     "image": str, "mask": str}, keep_default_na=False,
                        na_values={"patient_id": [""]})
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {INDEX_COLUMNS}")
    for col in FACT_COLUMNS:  # an index written by an older ingest has no facts: all fine
        if col not in index:
            index[col] = ROW_DEFAULTS.get(col, "")
    index["sampled"] = index["sampled"].astype(str).str.lower().isin(["true", "1"])
    return index
