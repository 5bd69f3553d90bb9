"""evaluate@MODEL: the saved best model on the validation split, as `predict` serves it.

Each validation slice goes through `liverseg.preprocess.Served` at its stored size (resize
to the trained size, the network, probabilities resized back) and is scored against its
mask at that size: the numbers a user of `liverseg predict` gets on the source files (the
per-epoch validation figures of training, in reports/training/, are at the trained size).

Writes `reports/metrics/<model>.json` (global metrics with 95% bootstrap CIs, per-image and
per-volume summaries, size, FLOPs and speed), `reports/per_image/<model>.csv` (one row per
slice) and `reports/predictions/<model>.h5` (the predictions at each slice's stored size, for
the report's visual comparison: class indices, 0/1 for a binary model; `liverseg.io.MaskWriter`,
written slice by slice). Volume sources are scored on every slice of each validation case,
not only the slices training sampled. Definitions and the empty-mask
rule: `liverseg.metrics`; with three classes the JSON also has each class's IoU and Dice.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from liverseg import checkpoint, labels, tracking
from liverseg.artifacts import RUN, Artifacts
from liverseg.case_metrics import case_row, summary
from liverseg.config import VOLUME_SOURCES, Params
from liverseg.data.dataset import SliceDataset
from liverseg.io import MaskWriter, read_json
from liverseg.metrics import (
    ConfusionMeter,
    bootstrap_ci,
    class_confusion,
    class_metrics,
    foreground_counts,
    hd95,
    nan_to_none,
    per_image_metrics,
)
from liverseg.monitoring import drift
from liverseg.preprocess import Preprocessing, Served
from liverseg.serving.watch import CaseWatches

PER_IMAGE_KEYS = ("fg_iou", "dice", "precision", "recall", "hd95")


def stored_batches(dataset: SliceDataset, batch_size: int):
    """(grey uint8 [B, H, W], truth [B, H, W], slice ids) at the slices' stored size;
    consecutive slices of one size share a batch."""
    batch = []
    for i, row in enumerate(dataset.rows):
        image, mask = dataset.stored(i)
        if batch and (len(batch) == batch_size or batch[0][0].shape != image.shape):
            yield tuple(map(np.stack, zip(*batch, strict=True)))
            batch = []
        batch.append((image, mask, row["slice_id"]))
    if batch:
        yield tuple(map(np.stack, zip(*batch, strict=True)))


@torch.no_grad()
def predict_split(served: Served, dataset: SliceDataset, batch_size: int,
                  classes: tuple[str, ...], masks: MaskWriter,
                  watches: CaseWatches | None = None, case_of: dict | None = None,
                  volumes: CaseVolumes | None = None):
    """Serve every slice of `dataset`, each predicted class mask going to `masks` as it is
    made (memory stays at one batch); returns pooled meter, per-image rows, per-image class
    counts [N, C, 4] and seconds. With `watches`, each slice also feeds the monitoring row
    of its case (`case_of`: slice id -> case), the model's drift reference; with `volumes`,
    the case's 3D metrics.

    The CSV's tp/fp/fn/tn are foreground (any class) against background: the binary
    counts themselves for a binary model."""
    meter, rows, counts, seconds = ConfusionMeter(classes), [], [], 0.0
    for images, truth, ids in stored_batches(dataset, batch_size):
        start = time.perf_counter()
        probs, pred = served.answer(images)
        seconds += time.perf_counter() - start
        stats = meter.add(class_confusion(pred, torch.from_numpy(truth), len(classes)))
        pred, fg_truth = pred.numpy().astype(np.uint8), truth > 0  # any foreground class
        per_image = per_image_metrics(stats, classes)
        fg_counts = foreground_counts(stats).tolist()
        for i, (sid, m) in enumerate(zip(ids, per_image, strict=True)):
            tp, fp, fn, tn = fg_counts[i]
            rows.append({"slice_id": str(sid), **m, "hd95": hd95(pred[i] > 0, fg_truth[i]),
                         "tp": int(tp), "fp": int(fp), "fn": int(fn), "tn": int(tn),
                         "truth_pixels": int(fg_truth[i].sum())})
            masks.add(str(sid), pred[i])
            if watches is not None:  # a 2.5D stack's own slice is its centre channel
                grey = images[i][len(images[i]) // 2] if images.ndim == 4 else images[i]
                watches.add(case_of[str(sid)], grey, probs[i:i + 1], pred[i])
            if volumes is not None:
                volumes.add(str(sid), pred[i], truth[i])
        counts.append(stats.numpy())
    return meter, rows, np.concatenate(counts), seconds


class CaseVolumes:
    """Each validation case of a volume source put back together, slice by slice, for the
    LiTS challenge's 3D metrics (`liverseg.case_metrics`) at its spacing. Slices of a case
    are consecutive in a split: one case is held at a time. Cases without a grid (no
    `spacing`: 2D sources, the phantom, tilted or irregular series) keep per-slice figures."""

    def __init__(self, rows: list[dict], classes: tuple[str, ...]):
        self.classes, self.rows = classes, []
        self.where = {str(r["slice_id"]): (str(r["case"]), int(r["slice_index"]), str(r["spacing"]))
                      for r in rows if str(r.get("spacing") or "") not in ("", "nan")}
        self.case, self.slices = None, []

    def add(self, sid: str, pred: np.ndarray, truth: np.ndarray) -> None:
        if sid not in self.where:
            return
        case, index, spacing = self.where[sid]
        if case != self.case:
            self._close()
            self.case, self.spacing = case, spacing
        self.slices.append((index, pred, truth))

    def _close(self) -> None:
        self.slices.sort(key=lambda s: s[0])
        indices = [i for i, _, _ in self.slices]
        whole = indices == list(range(indices[0], indices[0] + len(indices))) if indices else False
        if self.case is None or not whole or len({p.shape for _, p, _ in self.slices}) != 1:
            # a slice quarantined inside the case (or slices of two sizes): no 3D grid
            self.case, self.slices = None, []
            return
        pred = np.stack([p for _, p, _ in self.slices])
        truth = np.stack([t for _, _, t in self.slices])
        spacing = [float(v) for v in self.spacing.split(",")]
        self.rows.append({"case": self.case, "slices": len(self.slices), "spacing_mm": spacing}
                         | case_row(pred, truth, self.classes, spacing))
        self.case, self.slices = None, []

    def finish(self) -> dict | None:
        self._close()
        if not self.rows:
            return None
        return {"summary": summary(self.rows, self.classes), "cases": self.rows}


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


def per_volume_summary(counts: np.ndarray, patients: list[str]) -> dict:
    """Counts [N, C, 4] pooled within each patient (volume), then fg_iou/dice averaged over
    patients. As per image, a class absent from a volume's truth and prediction is left out
    of that volume's mean over classes (a tumour-free liver still counts by its liver)."""
    patients = np.asarray(patients)
    per_volume = [class_metrics(counts[patients == p].sum(0), skip_nan=True)
                  for p in np.unique(patients)]
    out = {"n_volumes": len(per_volume)}
    for key in ("fg_iou", "dice"):
        values = [m[key] for m in per_volume if not math.isnan(m[key])]
        out[f"per_volume_{key}_mean"] = float(np.mean(values)) if values else math.nan
    return out


def run(params: Params, model_name: str, root: str | Path = ".") -> dict:
    """Score `model_name` on the validation split of the repository at `root`."""
    art = Artifacts(root)
    splits_dir, model_dir = art.splits, art.model_dir(model_name)
    model, config = checkpoint.load_model(model_dir)
    stats = read_json(art.split_stats)
    classes = labels.classes_of(stats)
    prep = Preprocessing.from_config(config)
    if prep.threshold != params.evaluate.threshold:  # evaluate.threshold is the one served
        prep = replace(prep, threshold=params.evaluate.threshold)
    dataset = SliceDataset(splits_dir / "val.csv", art.raw, prep.image_size, prep.mean,
                           prep.std, num_classes=len(classes))
    # The drift reference: a monitoring row per validation case (a volume source's case,
    # else each image, as predict and REST serve them), saved in the metrics file.
    watches = CaseWatches(classes, {"model_name": model_name})
    volumes = params.data.source in VOLUME_SOURCES
    case_of = {str(r["slice_id"]): str(r["case"] if volumes else r["slice_id"])
               for r in dataset.rows}
    volumes = CaseVolumes(dataset.rows, classes)
    with MaskWriter(art.predictions(model_name)) as masks:
        meter, rows, counts, seconds = predict_split(
            Served(model, prep).eval(), dataset, params.evaluate.batch_size, classes, masks,
            watches, case_of, volumes)

    per_image = pd.DataFrame(rows)
    metrics = meter.compute() | bootstrap_ci(counts, params.evaluate.bootstrap, params.seed) | {
        "classes": list(classes),
        "ci_level": 0.95,
        "bootstrap_resamples": params.evaluate.bootstrap,
        **per_image_summary(per_image),
        **per_volume_summary(counts, [r["patient_id"] for r in dataset.rows]),
        "n_images": len(per_image),
        "n_empty_both": int(per_image["fg_iou"].isna().sum()),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "flops": flops_per_image(model, prep.in_channels, prep.image_size),
        "image_size": prep.image_size,
        "images_per_second": len(per_image) / seconds if seconds > 0 else math.nan,
        "best_epoch": config.get("best_epoch"),
        "threshold": params.evaluate.threshold,
        # Stated in the file itself (full definitions: liverseg.metrics and the README).
        "aggregation": ("global=pooled pixels (CIs: bootstrap over images); per_image=mean, "
                        "0/0 excluded; per_volume=pooled per patient, then mean; hd95 in pixels"),
        "monitoring_reference": drift.reference(pd.DataFrame(watches.finish())),
        # The LiTS challenge's per-case 3D metrics (volume sources with a grid; else None).
        "per_case_3d": volumes.finish(),
    }
    metrics = {"model": model_name} | nan_to_none(metrics)
    art.write_metrics(model_name, metrics)
    art.write_per_image(model_name, per_image)

    run_id = read_json(model_dir / RUN)["run_id"]
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
