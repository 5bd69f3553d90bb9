"""evaluate@MODEL: the saved best model on the validation split.

Writes `reports/metrics/<model>.json` (global metrics with 95% bootstrap CIs, per-image and
per-volume summaries, size, FLOPs and speed), `reports/per_image/<model>.csv` (one row per
slice) and `reports/predictions/<model>.npz` (the binary predictions, for the report's
visual comparison). Definitions and the empty-mask rule: `liverseg.metrics`.
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
from liverseg.metrics import (
    ConfusionMeter,
    bootstrap_ci,
    global_metrics,
    hd95,
    nan_to_none,
    per_image_metrics,
)

PER_IMAGE_KEYS = ("fg_iou", "dice", "precision", "recall", "hd95")


@torch.no_grad()
def predict_split(model, loader, threshold: float):
    """Run the model over a loader; returns pooled meter, per-image rows, masks, seconds."""
    meter, rows, masks, seconds = ConfusionMeter(), [], [], 0.0
    for x, y, ids in loader:
        start = time.perf_counter()
        logits = model(x)
        seconds += time.perf_counter() - start
        tp, fp, fn, tn = meter.update(logits, y, threshold)
        pred = (logits.sigmoid() > threshold).squeeze(1).numpy().astype(np.uint8)
        truth = y.squeeze(1).numpy() > 0.5
        for i, (sid, m) in enumerate(zip(ids, per_image_metrics(tp, fp, fn, tn), strict=True)):
            rows.append({"slice_id": sid, **m, "hd95": hd95(pred[i], truth[i]),
                         "tp": int(tp[i]), "fp": int(fp[i]), "fn": int(fn[i]), "tn": int(tn[i]),
                         "truth_pixels": int(truth[i].sum())})
        masks.append(pred)
    return meter, rows, np.concatenate(masks), seconds


def flops_per_image(model: torch.nn.Module, in_channels: int, image_size: int) -> int:
    """FLOPs of one forward pass, batch 1, at the trained image size (torch's counter:
    a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, in_channels, image_size, image_size))
    return int(counter.get_total_flops())


def per_image_summary(per_image: pd.DataFrame) -> dict:
    """Mean of each per-image metric over the slices where it is defined (NaN excluded)."""
    out = {}
    for key in PER_IMAGE_KEYS:
        defined = per_image[key].dropna()
        out[f"per_image_{key}_mean"] = float(defined.mean()) if len(defined) else math.nan
    out["n_hd95"] = int(per_image["hd95"].notna().sum())
    return out


def per_volume_summary(per_image: pd.DataFrame, patients: list[str]) -> dict:
    """Counts pooled within each patient (volume), then fg_iou/dice averaged over patients."""
    counts = per_image[["tp", "fp", "fn", "tn"]].groupby(np.asarray(patients)).sum()
    per_volume = [global_metrics(*row) for row in counts.itertuples(index=False)]
    out = {"n_volumes": len(per_volume)}
    for key in ("fg_iou", "dice"):
        values = [m[key] for m in per_volume if not math.isnan(m[key])]
        out[f"per_volume_{key}_mean"] = float(np.mean(values)) if values else math.nan
    return out


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
    counts = per_image[["tp", "fp", "fn", "tn"]].to_numpy()
    metrics = meter.compute() | bootstrap_ci(counts, params.evaluate.bootstrap, params.seed) | {
        "ci_level": 0.95,
        "bootstrap_resamples": params.evaluate.bootstrap,
        **per_image_summary(per_image),
        **per_volume_summary(per_image, [r["patient_id"] for r in dataset.rows]),
        "n_images": len(per_image),
        "n_empty_both": int(per_image["fg_iou"].isna().sum()),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "flops": flops_per_image(model, config["in_channels"], config["image_size"]),
        "image_size": config["image_size"],
        "images_per_second": len(per_image) / seconds if seconds > 0 else math.nan,
        "best_epoch": config.get("best_epoch"),
        "threshold": params.evaluate.threshold,
        # Stated in the file itself (full definitions: liverseg.metrics and the README).
        "aggregation": ("global=pooled pixels (CIs: bootstrap over images); per_image=mean, "
                        "0/0 excluded; per_volume=pooled per patient, then mean; hd95 in pixels"),
    }
    metrics = {"model": model_name} | nan_to_none(metrics)
    write_json(reports_dir / "metrics" / f"{model_name}.json", metrics)
    with atomic_path(reports_dir / "per_image" / f"{model_name}.csv") as tmp:
        per_image.to_csv(tmp, index=False)
    with atomic_path(reports_dir / "predictions" / f"{model_name}.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, slice_id=per_image["slice_id"].to_numpy(str), masks=masks)

    run_id = read_json(model_dir / "run.json")["run_id"]
    if run_id is None or not tracking.enabled():
        print(f"{model_name}: metrics written, not logged to MLflow "
              f"({'trained without tracking' if run_id is None else 'LIVERSEG_TRACKING=off'})")
    else:
        mlf = tracking.mlflow()
        with mlf.start_run(run_id=run_id):
            mlf.log_metrics({f"eval_{k}": v for k, v in metrics.items()
                             if isinstance(v, float | int) and not isinstance(v, bool)})
    return {k: metrics[k] for k in ("model", "fg_iou", "fg_iou_ci", "miou", "dice",
                                    "pixel_accuracy")}
