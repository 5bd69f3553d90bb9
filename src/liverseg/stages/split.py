"""split: patient-grouped train/val/test split of accepted slices (or fold k of a k-fold
cross-validation: `split.folds`, `split.fold`) that stays put as cases arrive.

A patient's side is a function of its id and the seed alone: a hash of both places it in
[0, 1); test is the band below `split.test_fraction` (a frozen test set: no patient added
later changes it), validation the next `split.val_fraction`, train the rest. So adding or
removing a case never moves another between train, validation and test. Cross-validation
folds are balanced blocks of a seeded, foreground-stratified order instead: a benchmark on
a fixed dataset. No patient and no identical image content is in two
splits (checked, not assumed: the stage fails otherwise). Training gets the slices ingest
marked `sampled`; validation and test get every slice of their cases (evaluation sees
whole cases), with `sampled` saying which training's own validation uses. The train
split's pixel mean and standard deviation are saved so every later stage normalises the
same way.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from liverseg import labels
from liverseg.artifacts import SPLIT_STATS, Artifacts
from liverseg.casescan import CaseReader, case_order
from liverseg.config import Params
from liverseg.io import atomic_dir, write_json

SPLITS = ("train", "val", "test")
# Each slice with where its label came from (the dicom source's archive objects).
COLUMNS = ["slice_id", "patient_id", "slice_index", "image", "mask", "fg_fraction", "id",
           "image_sha256", "height", "width", "context", "case", "sampled", "spacing",
           "study_uid", "series_uid", "label_uid", "origin"]


class LeakageError(AssertionError, ValueError):  # ValueError: the CLI prints it cleanly
    """A patient, or identical image content, appears in more than one split."""


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Patients for val and test: ceil(fraction * n), at least 1 each, train keeps >= 1."""
    n_val = max(1, math.ceil(val_fraction * n))
    n_test = max(1, math.ceil(test_fraction * n)) if test_fraction > 0 else 0
    if n_val + n_test > n - 1:
        raise ValueError(f"{n} patients cannot fill train, val ({val_fraction}) and test "
                         f"({test_fraction}); need at least {n_val + n_test + 1}")
    return n_val, n_test


def patient_position(patient: str, seed: int) -> float:
    """A patient's place in [0, 1): a hash of (seed, patient id), whoever else is there."""
    digest = hashlib.sha256(f"{seed}:{patient}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_patients(patients: list[str], val_fraction: float, seed: int,
                    test_fraction: float = 0.0) -> dict[str, str]:
    """Patient -> split by its position: test below `test_fraction`, val the next
    `val_fraction`, train the rest. A tiny set whose val or train band comes out empty gets
    the nearest patient moved in (the only case where a side depends on the others)."""
    if len(patients) < 2:
        raise ValueError(f"need at least 2 patients to split, got {len(patients)}: {patients}; "
                         "for a single volume use split.group_by=slab")
    position = {p: patient_position(p, seed) for p in patients}
    side = {p: "test" if u < test_fraction else "val" if u < test_fraction + val_fraction
            else "train" for p, u in position.items()}
    for empty, donor in (("val", "train"), ("train", "val")):
        if empty not in side.values():
            candidates = [p for p in patients if side[p] == donor] or \
                [p for p in patients if side[p] == "test"]
            side[min(candidates, key=lambda p: abs(position[p] - test_fraction
                                                   - val_fraction))] = empty
    return side


def patient_order(patients: list[str], seed: int, strata: dict[str, bool] | None = None
                  ) -> list[str]:
    """Patients shuffled with the seed within each stratum and spread evenly over one
    ordering, so any contiguous block of it holds its share of each stratum."""
    rng = np.random.default_rng(seed)
    strata = strata or {}
    position = {}
    for stratum in sorted({strata.get(p, False) for p in patients}):
        members = rng.permutation(sorted(p for p in patients if strata.get(p, False) == stratum))
        offset = rng.uniform()
        position |= {p: (i + offset) / len(members) for i, p in enumerate(members)}
    return sorted(patients, key=lambda p: (position[p], p))


def assign_patient_folds(patients: list[str], folds: int, fold: int, seed: int,
                         strata: dict[str, bool] | None = None) -> dict[str, str]:
    """Patient -> split for k-fold CV: validation is block `fold` of the seeded order,
    stratified by foreground. Balanced folds of a fixed dataset (a benchmark), not stable
    as cases arrive: a growing dataset uses the fractions."""
    if len(patients) < folds:
        raise ValueError(f"split.folds={folds} needs at least {folds} patients, got "
                         f"{len(patients)}")
    order = patient_order(patients, seed, strata)
    val = set(np.array_split(np.arange(len(order)), folds)[fold])
    return {p: "val" if i in val else "train" for i, p in enumerate(order)}


def assign_slab_folds(frame: pd.DataFrame, folds: int, fold: int, gap: int) -> pd.Series:
    """Per volume, k contiguous slabs: slab `fold` is validation, the `gap` slices on each
    side of it are left out ("gap"), the rest is train."""
    side = pd.Series("train", index=frame.index)
    for patient, rows in frame.groupby("patient_id"):
        order = rows.sort_values(["slice_index", "slice_id"]).index
        if len(order) < folds:
            raise ValueError(f"volume {patient}: {len(order)} slices cannot make "
                             f"split.folds={folds} slabs")
        block = np.array_split(np.arange(len(order)), folds)[fold]
        lo, hi = int(block[0]), int(block[-1]) + 1
        side[order[max(0, lo - gap):lo]] = "gap"
        side[order[hi:hi + gap]] = "gap"
        side[order[lo:hi]] = "val"
    return side


def assign_slabs(frame: pd.DataFrame, val_fraction: float, test_fraction: float) -> pd.Series:
    """Per patient, contiguous slice ranges: train first, then val, then test (the
    reference split of a single volume). Neighbouring slices still correlate across a
    boundary: a weaker guarantee than patient grouping, stated in stats.json."""
    side = pd.Series("train", index=frame.index)
    for _, rows in frame.groupby("patient_id"):
        order = rows.sort_values(["slice_index", "slice_id"]).index
        n_val, n_test = split_sizes(len(order), val_fraction, test_fraction)
        n_train = len(order) - n_val - n_test
        side[order[n_train:n_train + n_val]] = "val"
        side[order[n_train + n_val:]] = "test"
    return side


def assign_by_modulo(patients: list[str], rule) -> dict[str, str]:
    """Patient -> split by ``int(patient_id) % rule.modulus`` (a published reference split)."""
    bad = [p for p in patients if not str(p).isdigit()]
    if bad:
        raise ValueError(f"split.patient_modulo needs numeric patient ids; got {bad[:5]}")
    residue = {p: int(p) % rule.modulus for p in patients}
    return {p: "val" if r in rule.val else "test" if r in rule.test else "train"
            for p, r in residue.items()}


def check_no_leakage(splits: dict[str, pd.DataFrame], group: str = "patient_id") -> None:
    """Raise if a group (patient, or slice in slab mode) or identical image content (when
    hashes are given) is in two splits."""
    what_group = {"patient_id": "patient"}.get(group, group)
    for key, what in ((group, what_group), ("image_sha256", "image content")):
        seen: dict[str, str] = {}
        for name, frame in splits.items():
            if key not in frame:
                continue
            for value in frame[key].dropna().unique():
                if value in seen and seen[value] != name:
                    raise LeakageError(f"{what} {value} is in both {seen[value]} and {name}")
                seen[value] = name


def image_sums(image: np.ndarray) -> tuple[float, float, int]:
    """One image's sum and sum of squares of its [0, 1]-scaled pixels, and its size."""
    x = image.astype(np.float64) / 255.0
    return x.sum(), (x**2).sum(), x.size


def pooled_stats(sums: Iterable[tuple[float, float, int]]) -> tuple[float, float]:
    """Mean and std pooled from per-image `image_sums`, added in the order given."""
    total = total_sq = count = 0.0
    for s, sq, size in sums:
        total, total_sq, count = total + s, total_sq + sq, count + size
    mean = total / count
    return float(mean), float(math.sqrt(max(total_sq / count - mean**2, 1e-12)))


def pixel_stats(images: Iterable[np.ndarray]) -> tuple[float, float]:
    """Mean and std of the [0, 1]-scaled pixels, pooled over every train image."""
    return pooled_stats(image_sums(image) for image in images)


def train_pixel_stats(raw_dir: Path, rows: list[dict]) -> tuple[float, float]:
    """`pixel_stats` of the rows' network inputs, read one case file at a time (in case
    order) keeping three numbers per slice, then pooled in row order: the same figures as
    reading them in row order, with memory flat in the number of cases."""
    sums: list[tuple[float, float, int]] = [(0.0, 0.0, 0)] * len(rows)
    with CaseReader(raw_dir) as reader:
        for at in case_order([row["image"] for row in rows]):
            sums[at] = image_sums(reader.read_input(rows[at]))
    return pooled_stats(sums)


def label_sources(frame: pd.DataFrame) -> dict:
    """The archive objects a split's labels came from (the dicom source; {} for file
    sources): its studies, label instances and their origins, which lineage records."""
    if "label_uid" not in frame:
        return {}
    archive = frame[frame["label_uid"].fillna("") != ""]
    if archive.empty:
        return {}
    labels_ = archive.drop_duplicates("label_uid")
    return {"studies": sorted(archive["study_uid"].unique()),
            "label_instances": sorted(labels_["label_uid"]),
            "label_origins": labels_["origin"].value_counts().sort_index().to_dict()}


def read_manifest(path: str | Path) -> pd.DataFrame:
    """The manifest's columns the split uses (COLUMNS and `accepted`, those it has): the
    others (paths, per-slice facts, rule results) would only cost memory per row."""
    import pyarrow.parquet as pq

    names = set(pq.read_schema(path).names)
    return pd.read_parquet(path, columns=[c for c in [*COLUMNS, "accepted"] if c in names])


def run(params: Params, root: str | Path = ".") -> dict:
    art = Artifacts(root)
    raw_dir = art.raw
    manifest = read_manifest(art.manifest)
    accepted = manifest[manifest["accepted"]]
    if "id" not in accepted:  # a manifest from before the contract named it
        accepted = accepted.assign(id=accepted["slice_id"])
    cfg = params.split
    positive = accepted.groupby("patient_id")["fg_fraction"].max().gt(0).to_dict()
    if cfg.folds and cfg.group_by == "slab":
        side = assign_slab_folds(accepted, cfg.folds, cfg.fold, cfg.fold_gap)
    elif cfg.folds:
        side = accepted["patient_id"].map(assign_patient_folds(
            list(accepted["patient_id"].unique()), cfg.folds, cfg.fold, params.seed, positive))
    elif cfg.group_by == "slab":
        side = assign_slabs(accepted, cfg.val_fraction, cfg.test_fraction)
    elif cfg.patient_modulo:
        side = accepted["patient_id"].map(
            assign_by_modulo(list(accepted["patient_id"].unique()), cfg.patient_modulo))
    else:
        by_patient = assign_patients(list(accepted["patient_id"].unique()), cfg.val_fraction,
                                     params.seed, cfg.test_fraction)
        side = accepted["patient_id"].map(by_patient)
    splits = {name: accepted[side == name][COLUMNS] for name in SPLITS}
    not_sampled = splits["train"][~splits["train"]["sampled"]]
    splits["train"] = splits["train"][splits["train"]["sampled"]]
    empty = [name for name in ("train", "val") if splits[name].empty]
    if empty:
        raise ValueError(f"split: the {' and '.join(empty)} split would be empty "
                         f"({len(accepted)} accepted slices); check the split section of params")
    check_no_leakage(splits, "patient_id" if cfg.group_by == "patient" else "slice_id")
    gap = accepted[side == "gap"]
    if sum(len(f) for f in splits.values()) + len(gap) + len(not_sampled) != len(accepted):
        raise AssertionError("split lost slices")

    classes = labels.read_classes(raw_dir)  # what ingest wrote; the loaders decode with it
    stats = {"seed": params.seed, "classes": list(classes), "leakage_checked": True,
             "grouped_by": cfg.group_by,
             "rule": cfg.patient_modulo.model_dump() if cfg.patient_modulo else
             "seeded stratified folds" if cfg.folds and cfg.group_by == "patient" else
             "hash of (seed, patient id) against the fractions" if cfg.group_by == "patient"
             else "contiguous slabs",
             "cv": {"folds": cfg.folds, "fold": cfg.fold} if cfg.folds else None,
             # Counts reconcile: train + val + test + excluded + not sampled = accepted.
             "excluded": {"slices": len(gap), "slice_ids": gap["slice_id"].tolist(),
                          "rule": f"within split.fold_gap={cfg.fold_gap} slices of the "
                                  "validation slab"} if len(gap) else None,
             "train_not_sampled": {"slices": len(not_sampled), "rule": (
                 "stored, not sampled for training (data.nifti.slices, empty_fraction)")}}
    for name, frame in splits.items():
        stats[name] = {"slices": len(frame), "patients": sorted(frame["patient_id"].unique()),
                       "foreground_slices": int((frame["fg_fraction"] > 0).sum())
                       } | label_sources(frame)
    del manifest, accepted, side  # only the splits' own rows while case files are read
    mean, std = train_pixel_stats(raw_dir, splits["train"][["image", "context"]]
                                  .to_dict("records"))
    with atomic_dir(art.splits) as tmp:
        for name, frame in splits.items():
            frame.to_csv(tmp / f"{name}.csv", index=False)
        write_json(tmp / SPLIT_STATS, {"mean": mean, "std": std} | stats)
    return {name: stats[name]["slices"] for name in SPLITS} | {"mean": mean, "std": std}
