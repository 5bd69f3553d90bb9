"""evaluate@MODEL: the saved best model on the validation split.

Writes `reports/metrics/<model>.json` (global metrics, per-image summary, size and speed),
`reports/per_image/<model>.csv` (one row per slice) and `reports/predictions/<model>.npz`
(the binary predictions, for the report's visual comparison). Definitions: `liverseg.metrics`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from liverseg import checkpoint, tracking
from liverseg.config import Params
from liverseg.data.dataset import SliceDataset, eval_transform
from liverseg.io import atomic_path, read_json, write_json
from liverseg.metrics import ConfusionMeter, nan_to_none, per_image_iou


@torch.no_grad()
def predict_split(model, loader, threshold: float):
    """Run the model over a loader; returns pooled meter, per-image rows, masks, seconds."""
    meter, rows, masks, seconds = ConfusionMeter(), [], [], 0.0
    for x, y, ids in loader:
        start = time.perf_counter()
        logits = model(x)
        seconds += time.perf_counter() - start
        tp, fp, fn, tn = meter.update(logits, y, threshold)
        for sid, iou, t, f_p, f_n, truth in zip(
            ids, per_image_iou(tp, fp, fn), tp.flatten(), fp.flatten(), fn.flatten(),
            y.flatten(1).sum(1), strict=True,
        ):
            rows.append({"slice_id": sid, "fg_iou": iou, "tp": int(t), "fp": int(f_p),
                         "fn": int(f_n), "truth_pixels": int(truth)})
        masks.append((logits.sigmoid() > threshold).squeeze(1).numpy().astype(np.uint8))
    return meter, rows, np.concatenate(masks), seconds


def run(
    params: Params,
    model_name: str,
    splits_dir: str | Path = "data/splits",
    raw_dir: str | Path = "data/raw",
    models_dir: str | Path = "models",
    reports_dir: str | Path = "reports",
) -> dict:
    splits_dir, reports_dir = Path(splits_dir), Path(reports_dir)
    model_dir = Path(models_dir) / model_name
    model, config = checkpoint.load_model(model_dir)
    stats = read_json(splits_dir / "stats.json")
    dataset = SliceDataset(splits_dir / "val.csv", raw_dir, stats["mean"], stats["std"],
                           eval_transform(config["image_size"]))
    loader = DataLoader(dataset, params.evaluate.batch_size, shuffle=False)
    meter, rows, masks, seconds = predict_split(model, loader, params.evaluate.threshold)

    per_image = pd.DataFrame(rows)
    defined = per_image["fg_iou"].dropna()
    metrics = meter.compute() | {
        "per_image_fg_iou_mean": float(defined.mean()) if len(defined) else math.nan,
        "n_images": len(per_image),
        "n_empty_both": int(per_image["fg_iou"].isna().sum()),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "images_per_second": len(per_image) / seconds if seconds > 0 else math.nan,
        "best_epoch": config.get("best_epoch"),
        "threshold": params.evaluate.threshold,
        # Stated in the file itself (full definitions: liverseg.metrics and the README).
        "aggregation": "global=pooled pixels; per_image=mean, empty-both excluded",
    }
    metrics = {"model": model_name} | nan_to_none(metrics)
    write_json(reports_dir / "metrics" / f"{model_name}.json", metrics)
    with atomic_path(reports_dir / "per_image" / f"{model_name}.csv") as tmp:
        per_image.to_csv(tmp, index=False)
    with atomic_path(reports_dir / "predictions" / f"{model_name}.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, slice_id=per_image["slice_id"].to_numpy(str), masks=masks)

    run_id = read_json(model_dir / "run.json")["run_id"]
    mlf = tracking.mlflow()
    with mlf.start_run(run_id=run_id):
        mlf.log_metrics({f"eval_{k}": v for k, v in metrics.items()
                         if isinstance(v, float | int) and not isinstance(v, bool)})
    return {k: metrics[k] for k in ("model", "fg_iou", "miou", "dice", "pixel_accuracy")}
