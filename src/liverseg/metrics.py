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

Per image (`per_image_fg_iou`, the CSV): IoU of one slice. Empty-mask rule (as nnU-Net and
MONAI): a slice whose truth and prediction are both empty has no defined IoU; it is NaN,
excluded from the mean and counted in `n_empty_both`.
"""

from __future__ import annotations

import math

import segmentation_models_pytorch as smp
import torch


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
    """Accumulates pooled counts over batches (the 'global' aggregation)."""

    def __init__(self) -> None:
        self.counts = torch.zeros(4, dtype=torch.float64)

    def update(self, logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5):
        stats = confusion(logits.detach(), target, threshold)
        self.counts += torch.stack([s.sum() for s in stats]).double().cpu()
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
