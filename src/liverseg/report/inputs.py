"""What the report reads: every output the earlier stages wrote, and the CT slices themselves.

`load_inputs` reads the validation result, the split statistics and CSVs, each model's
training history, metrics, per-image scores and predicted masks, the comparison and the
registry record into one `Inputs`; a missing file raises FileNotFoundError naming it, a CSV
without a needed column (the `*_COLUMNS` lists) or a comparison of other models ValueError.
`load_slice` reads one slice and its truth from `data/raw`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from liverseg import casestore, labels
from liverseg.artifacts import Artifacts
from liverseg.io import read_json

SPLIT_COLUMNS = ["slice_id", "patient_id", "slice_index", "image", "mask", "fg_fraction"]
TRAINING_COLUMNS = ["epoch", "train_loss", "train_miou", "train_pixel_accuracy", "val_loss",
                    "val_fg_iou", "val_miou", "val_pixel_accuracy"]
PER_IMAGE_COLUMNS = ["slice_id", "fg_iou", "tp", "fp", "fn", "truth_pixels"]


def read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected file is missing (did the upstream stage run?)")
    frame = pd.read_csv(path, dtype={"slice_id": str, "patient_id": str})
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {columns}")
    return frame


@dataclass
class Inputs:
    validation: dict
    stats: dict
    splits: dict[str, pd.DataFrame]
    histories: dict[str, pd.DataFrame]
    metrics: dict[str, dict]
    comparison: dict
    per_image: dict[str, pd.DataFrame]
    predictions: dict[str, dict[str, np.ndarray]]
    registry: dict


def load_inputs(models: list[str], art: Artifacts) -> Inputs:
    """Read every upstream output; a missing file raises FileNotFoundError naming it."""
    inputs = Inputs(
        validation=read_json(art.validation),
        stats=read_json(art.split_stats),
        splits={s: read_csv(art.splits / f"{s}.csv", SPLIT_COLUMNS) for s in ("train", "val")},
        histories={m: read_csv(art.curve(m), TRAINING_COLUMNS) for m in models},
        metrics={m: art.read_metrics(m) for m in models},
        comparison=art.read_comparison(),
        per_image={m: read_csv(art.per_image(m), PER_IMAGE_COLUMNS) for m in models},
        predictions={m: art.read_predictions(m) for m in models},
        registry=art.read_registry(),
    )
    compared = {row["model"] for row in inputs.comparison["models"]}
    if compared != set(models):
        # A stale comparison would put numbers of other models next to these figures.
        raise ValueError(f"{art.comparison()}: compares {sorted(compared)} but "
                         f"params `models` is {sorted(models)}; rerun `compare`")
    return inputs


def load_slice(raw_dir: Path, row: pd.Series, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The CT slice and its truth as class indices."""
    return (casestore.read(raw_dir, row["image"]),
            labels.decode(casestore.read(raw_dir, row["mask"], "mask"), num_classes))
