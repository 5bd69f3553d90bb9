"""ingest: bring a data source into the one on-disk layout (`liverseg.data.layout`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from liverseg.config import Params
from liverseg.data import layout, phantom
from liverseg.io import atomic_dir, save_png

TARGET_LABELS = {"tumour": [phantom.TUMOUR], "liver": [phantom.LIVER, phantom.TUMOUR]}


def ingest_phantom(params: Params, out_dir: Path) -> pd.DataFrame:
    cfg, target = params.data.phantom, TARGET_LABELS[params.data.target]
    (out_dir / "images").mkdir(parents=True)
    (out_dir / "masks").mkdir()
    rows = []
    for sl in phantom.generate(
        cfg.patients, cfg.slices_per_patient, cfg.size, cfg.max_tumours, cfg.noise_hu, params.seed
    ):
        sid = layout.slice_id(sl.patient_id, sl.slice_index)
        image, mask = f"images/{sid}.png", f"masks/{sid}.png"
        save_png(out_dir / image, sl.image)
        save_png(out_dir / mask, np.isin(sl.labels, target).astype(np.uint8) * 255)
        rows.append([sid, sl.patient_id, "phantom", sl.slice_index, image, mask])
    return pd.DataFrame(rows, columns=layout.INDEX_COLUMNS)


SOURCES = {"phantom": ingest_phantom}


def run(params: Params, out_dir: str | Path = "data/raw") -> dict:
    """Write the source's slices under `out_dir` (replaced as a whole, atomically)."""
    with atomic_dir(out_dir) as tmp:
        index = SOURCES[params.data.source](params, tmp)
        index.to_csv(tmp / layout.INDEX_NAME, index=False)
    return {
        "source": params.data.source,
        "slices": len(index),
        "patients": int(index["patient_id"].nunique()),
    }
