"""split: patient-grouped, seeded train/validation split of the accepted slices.

No patient has slices on both sides (asserted, not assumed). The train split's pixel
mean and standard deviation are saved so every later stage normalises the same way.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from liverseg.config import Params
from liverseg.io import atomic_dir, load_gray, write_json


class LeakageError(AssertionError):
    """A patient appears in more than one split."""


def assign_patients(patients: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Shuffle patients with the seed; the first ceil(fraction * n) go to validation."""
    if len(patients) < 2:
        raise ValueError(f"need at least 2 patients to split, got {len(patients)}: {patients}")
    order = np.random.default_rng(seed).permutation(sorted(patients))
    n_val = min(max(1, math.ceil(val_fraction * len(order))), len(order) - 1)
    return {p: ("val" if i < n_val else "train") for i, p in enumerate(order)}


def check_no_leakage(splits: dict[str, pd.DataFrame]) -> None:
    seen: dict[str, str] = {}
    for name, frame in splits.items():
        for patient in frame["patient_id"].unique():
            if patient in seen:
                raise LeakageError(f"patient {patient} is in both {seen[patient]} and {name}")
            seen[patient] = name


def pixel_stats(raw_dir: Path, images: pd.Series) -> tuple[float, float]:
    """Mean and std of the [0, 1]-scaled pixels, pooled over every train image."""
    total = total_sq = count = 0.0
    for rel in images:
        x = load_gray(raw_dir / rel).astype(np.float64) / 255.0
        total, total_sq, count = total + x.sum(), total_sq + (x**2).sum(), count + x.size
    mean = total / count
    return float(mean), float(math.sqrt(max(total_sq / count - mean**2, 1e-12)))


def run(
    params: Params,
    manifest_path: str | Path = "data/manifest.parquet",
    raw_dir: str | Path = "data/raw",
    out_dir: str | Path = "data/splits",
) -> dict:
    manifest = pd.read_parquet(manifest_path)
    accepted = manifest[manifest["accepted"]]
    side = assign_patients(list(accepted["patient_id"].unique()), params.split.val_fraction,
                           params.seed)
    columns = ["slice_id", "patient_id", "slice_index", "image", "mask", "fg_fraction"]
    splits = {name: accepted[accepted["patient_id"].map(side) == name][columns]
              for name in ("train", "val")}
    check_no_leakage(splits)
    assert sum(len(f) for f in splits.values()) == len(accepted), "split lost slices"

    mean, std = pixel_stats(Path(raw_dir), splits["train"]["image"])
    stats = {"mean": mean, "std": std, "seed": params.seed, "leakage_checked": True}
    for name, frame in splits.items():
        stats[name] = {"slices": len(frame), "patients": sorted(frame["patient_id"].unique()),
                       "foreground_slices": int((frame["fg_fraction"] > 0).sum())}
    with atomic_dir(out_dir) as tmp:
        for name, frame in splits.items():
            frame.to_csv(tmp / f"{name}.csv", index=False)
        write_json(tmp / "stats.json", stats)
    return {name: stats[name]["slices"] for name in splits} | {"mean": mean, "std": std}
