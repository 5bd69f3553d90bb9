"""Segmentation metrics, with their aggregation and empty-mask rule stated.

Binary masks, foreground = 1. Counts come from `segmentation_models_pytorch.metrics`.

Global (the headline numbers, pixels pooled over the whole split):
  fg_iou          TP / (TP + FP + FN)
  bg_iou          TN / (TN + FN + FP)
  miou            (fg_iou + bg_iou) / 2   -- the paper's mIoU over background and foreground
  dice            2TP / (2TP + FP + FN)
  precision       TP / (TP + FP);  recall  TP / (TP + FN)
  pixel_accuracy  (TP + TN) / all pixels
Pooling means slices with an empty truth mask still count: every false-positive pixel on
them lowers fg_iou. A ratio whose denominator is 0 over the whole split is NaN (reported
as null), never silently 0 or 1.

Per image (the CSV; `per_image_<metric>_mean` in the JSON): fg_iou, dice, precision, recall
and hd95 of one slice. Empty-mask rule (as nnU-Net and MONAI): a ratio that is 0/0 on a
slice is NaN and excluded from the mean -- fg_iou/dice when truth and prediction are both
empty (counted in `n_empty_both`), precision when nothing is predicted, recall when the
truth is empty. HD95 (pixels) only where both masks are non-empty (`n_hd95` slices).

Per volume (patient): counts pooled over a patient's slices, then averaged over patients.

Confidence intervals (`<metric>_ci`): 95% percentile bootstrap over images of the global
(pooled) fg_iou, dice and miou; seeded, `evaluate.bootstrap` resamples.
"""

from __future__ import annotations

import math

import numpy as np
import segmentation_models_pytorch as smp
import torch
from scipy import ndimage


def confusion(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5):
    """Per-image TP, FP, FN, TN counts (each shaped [N, 1]) for sigmoid logits."""
    return smp.metrics.get_stats(logits.sigmoid(), target.long(), mode="binary",
                                 threshold=threshold)


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def global_metrics(tp: float, fp: float, fn: float, tn: float) -> dict[str, float]:
    fg_iou, bg_iou = _ratio(tp, tp + fp + fn), _ratio(tn, tn + fn + fp)
    return {
        "fg_iou": fg_iou,
        "bg_iou": bg_iou,
        "miou": (fg_iou + bg_iou) / 2,
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "pixel_accuracy": _ratio(tp + tn, tp + fp + fn + tn),
    }


class ConfusionMeter:
    """Accumulates pooled counts over batches (the 'global' aggregation).

    The counts live on the inputs' device: no host sync per batch on a GPU; `compute`
    syncs once.
    """

    def __init__(self) -> None:
        self.counts = torch.zeros(4, dtype=torch.float64)

    def update(self, logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5):
        stats = confusion(logits.detach(), target, threshold)
        counts = torch.stack([s.sum() for s in stats]).double()
        self.counts = self.counts.to(counts.device) + counts
        return stats

    def compute(self) -> dict[str, float]:
        return global_metrics(*self.counts.tolist())


def per_image_iou(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> list[float]:
    """Foreground IoU per image; NaN where truth and prediction are both empty."""
    den = (tp + fp + fn).flatten().double()
    iou = tp.flatten().double() / den
    return [float("nan") if d == 0 else float(v) for v, d in zip(iou, den, strict=True)]


def nan_to_none(metrics: dict) -> dict:
    """JSON has no NaN: undefined metrics are written as null."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


# ----------------------------------------------------------------------------- per image


def per_image_metrics(tp, fp, fn, tn) -> list[dict[str, float]]:
    """fg_iou, dice, precision and recall of each image from its confusion counts.

    Empty-mask rule, per ratio: a 0/0 is NaN (undefined), never 0 or 1. So fg_iou and dice
    are NaN only when truth and prediction are both empty; precision is NaN when nothing
    was predicted, recall when the truth is empty. NaNs are excluded from per-image means.
    """
    rows = []
    for t, f_p, f_n, t_n in zip(*(torch.as_tensor(c).flatten().tolist() for c in (tp, fp, fn, tn)),
                                strict=True):
        m = global_metrics(t, f_p, f_n, t_n)
        rows.append({k: m[k] for k in ("fg_iou", "dice", "precision", "recall")})
    return rows


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels: in the mask but not in its erosion (the image edge counts as outside)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance between two binary masks' surfaces.

    As MONAI's default: the larger of the two directed 95th percentiles of surface-to-surface
    Euclidean distances. In pixels, or in mm when `spacing` (per axis) is given. NaN when
    either mask is empty (no surface to measure from).
    """
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if not pred.any() or not truth.any():
        return math.nan
    sp, st = _surface(pred), _surface(truth)
    to_truth = ndimage.distance_transform_edt(~st, sampling=spacing)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)[st]
    return float(max(np.percentile(to_truth, 95), np.percentile(to_pred, 95)))


# ----------------------------------------------------------------------------- bootstrap

CI_METRICS = ("fg_iou", "dice", "miou")


def bootstrap_ci(counts: np.ndarray, resamples: int, seed: int, level: float = 0.95,
                 keys: tuple[str, ...] = CI_METRICS) -> dict[str, list[float] | None]:
    """Percentile bootstrap CIs of the pooled (global) metrics, resampling images.

    `counts` is [N, 4] per-image TP, FP, FN, TN. Each resample draws N images with
    replacement and recomputes the pooled metric, so the interval reflects the spread
    between images, the unit that was sampled. Resamples where a metric is undefined are
    dropped; an interval with no defined resample (or resamples=0) is None.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if resamples <= 0 or len(counts) == 0:
        return {f"{k}_ci": None for k in keys}
    rng = np.random.default_rng(seed)
    pooled = counts[rng.integers(0, len(counts), (resamples, len(counts)))].sum(axis=1)
    tp, fp, fn, tn = pooled.T
    with np.errstate(divide="ignore", invalid="ignore"):
        fg = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
        bg = np.where(tn + fp + fn > 0, tn / (tn + fp + fn), np.nan)
        values = {"fg_iou": fg, "dice": 2 * fg / (1 + fg), "miou": (fg + bg) / 2}
    alpha = (1 - level) / 2 * 100
    out = {}
    for key in keys:
        v = values[key][~np.isnan(values[key])]
        out[f"{key}_ci"] = ([float(np.percentile(v, alpha)), float(np.percentile(v, 100 - alpha))]
                            if len(v) else None)
    return out
