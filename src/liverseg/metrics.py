"""Segmentation metrics, with their aggregation and empty-mask rule stated.

Counts are per image and per class, [N, C, 4] = (TP, FP, FN, TN) of each class against the
rest, background first (`confusion`, from `segmentation_models_pytorch.metrics`). A binary
model (one sigmoid logit, foreground = probability > threshold) has C = 2; the three-class
model (background, liver, tumour; argmax of the softmax) has C = 3. For C = 2 every headline
number below is the usual binary one.

Global (the headline numbers, pixels pooled over the whole split):
  IoU_c           TP_c / (TP_c + FP_c + FN_c)            (per class; Dice_c likewise)
  fg_iou          mean of IoU_c over the foreground classes (binary: TP / (TP + FP + FN))
  bg_iou          IoU of the background
  miou            mean of IoU_c over all classes, background included (the paper's mIoU)
  dice            mean of Dice_c = 2TP_c / (2TP_c + FP_c + FN_c) over the foreground classes
  precision       TP / (TP + FP);  recall  TP / (TP + FN)   (foreground classes, mean)
  pixel_accuracy  correctly classified pixels / all pixels
  iou_<class>, dice_<class>   each foreground class's own, when there are 3 classes
Pooling means slices with an empty truth mask still count: every false-positive pixel on
them lowers fg_iou. A ratio whose denominator is 0 over the whole split is NaN (reported
as null), never silently 0 or 1, and a mean over classes with a NaN is NaN.

Per image (the CSV; `per_image_<metric>_mean` in the JSON): fg_iou, dice, precision, recall
and hd95 of one slice. Empty-mask rule (as nnU-Net and MONAI): a ratio that is 0/0 on a
slice is NaN and excluded from the mean -- fg_iou/dice when truth and prediction are both
empty (counted in `n_empty_both`), precision when nothing is predicted, recall when the
truth is empty. With several foreground classes a slice's value is the mean over the
classes defined on it (a class absent from both masks of that slice is left out). HD95
(pixels) of the foreground (any class) only where both masks have some (`n_hd95` slices).

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

from liverseg import labels


def class_confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int
                    ) -> torch.Tensor:
    """Per-image, per-class counts [N, C, 4] (TP, FP, FN, TN), background first, of
    predicted class indices `pred` [N, H, W] against `target` [N, 1, H, W] or [N, H, W]."""
    target = target.long().reshape(pred.shape)
    return torch.stack(smp.metrics.get_stats(pred.long(), target, mode="multiclass",
                                             num_classes=num_classes), dim=-1)


def slice_confusion(pred: np.ndarray, target: np.ndarray, num_classes: int, chunk: int = 32
                    ) -> torch.Tensor:
    """`class_confusion` of class-index arrays [N, H, W], a chunk of slices at a time (smp
    counts on int64 copies: eight bytes a voxel of a whole CT case at once)."""
    return torch.cat([class_confusion(torch.from_numpy(pred[i:i + chunk].astype(np.int64)),
                                      torch.from_numpy(target[i:i + chunk]), num_classes)
                      for i in range(0, len(pred), chunk)])


def pooled_confusion(pred: np.ndarray, target: np.ndarray, num_classes: int, chunk: int = 32
                     ) -> np.ndarray:
    """`class_confusion` summed over the images, [C, 4], of class-index arrays of any shape:
    in numpy on the arrays' own dtype, `chunk` slices of the first axis at a time (a whole
    CT case is 10^8 voxels; the per-image counts would make int64 copies of it, eight bytes a
    voxel, and each class's masks one byte a voxel)."""
    out = np.zeros((num_classes, 4))
    pred, target = np.atleast_1d(pred), np.atleast_1d(target)
    for i in range(0, len(pred), chunk):
        for k in range(num_classes):
            p, t = pred[i:i + chunk] == k, target[i:i + chunk] == k
            tp = np.count_nonzero(p & t)
            fp, fn = np.count_nonzero(p) - tp, np.count_nonzero(t) - tp
            out[k] += tp, fp, fn, p.size - tp - fp - fn
    return out


def confusion(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5
              ) -> torch.Tensor:
    """`class_confusion` of a head's logits [N, K, H, W]: K = 1 is a binary (sigmoid) head,
    foreground = probability > threshold, giving C = 2; otherwise the argmax over K = C."""
    pred = labels.to_classes(labels.probabilities(logits), threshold)
    return class_confusion(pred, target, max(2, logits.shape[1]))


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def global_metrics(tp: float, fp: float, fn: float, tn: float) -> dict[str, float]:
    """One class against the rest (the binary case: the foreground)."""
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


def _mean(values: list[float], skip_nan: bool = False) -> float:
    if skip_nan:
        values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def class_metrics(counts, classes: tuple[str, ...] | None = None,
                  skip_nan: bool = False) -> dict[str, float]:
    """The headline metrics from one set of per-class counts [C, 4] (see the module doc).
    `skip_nan`: average over the defined classes only (the per-image rule)."""
    counts = np.asarray(counts, dtype=np.float64).tolist()  # python floats: they get pickled
    per_class = [global_metrics(*c) for c in counts]
    fg = per_class[1:]
    out = {"fg_iou": _mean([m["fg_iou"] for m in fg], skip_nan),
           "bg_iou": per_class[0]["fg_iou"],
           "miou": _mean([m["fg_iou"] for m in per_class], skip_nan)}
    out |= {key: _mean([m[key] for m in fg], skip_nan)
            for key in ("dice", "precision", "recall")}
    out["pixel_accuracy"] = _ratio(sum(c[0] for c in counts), sum(counts[0]))
    if classes and len(classes) > 2:
        for name, m in zip(classes[1:], fg, strict=True):
            out |= {f"iou_{name}": m["fg_iou"], f"dice_{name}": m["dice"]}
    return out


class ConfusionMeter:
    """Accumulates pooled per-class counts over batches (the 'global' aggregation).

    The counts live on the inputs' device: no host sync per batch on a GPU; `compute`
    syncs once.
    """

    def __init__(self, classes: tuple[str, ...] = ("background", "foreground")) -> None:
        self.classes = tuple(classes)
        self.counts = torch.zeros(len(classes), 4, dtype=torch.float64)

    def update(self, logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5
               ) -> torch.Tensor:
        return self.add(confusion(logits.detach(), target, threshold))

    def add(self, stats: torch.Tensor) -> torch.Tensor:
        """Pool per-image counts [N, C, 4]; returns them."""
        if stats.shape[1] != len(self.classes):
            raise ValueError(f"the model scores {stats.shape[1]} classes but the data has "
                             f"{len(self.classes)} {list(self.classes)}")
        self.counts = self.counts.to(stats.device) + stats.sum(0).double()
        return stats

    def compute(self) -> dict[str, float]:
        return class_metrics(self.counts.cpu().numpy(), self.classes)


def nan_to_none(metrics: dict) -> dict:
    """JSON has no NaN: undefined metrics are written as null."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


# ----------------------------------------------------------------------------- per image


def per_image_metrics(counts, classes: tuple[str, ...] | None = None
                      ) -> list[dict[str, float]]:
    """fg_iou, dice, precision and recall of each image from its counts [N, C, 4].

    Empty-mask rule, per ratio: a 0/0 is NaN (undefined), never 0 or 1. So fg_iou and dice
    are NaN only when truth and prediction are both empty; precision is NaN when nothing
    was predicted, recall when the truth is empty. NaNs are excluded from per-image means,
    and from a slice's mean over classes. With 3 classes each class's IoU is added.
    """
    keys = ("fg_iou", "dice", "precision", "recall")
    rows = []
    for image in np.asarray(torch.as_tensor(counts).cpu(), dtype=np.float64):
        m = class_metrics(image, classes, skip_nan=True)
        rows.append({k: m[k] for k in keys} | {k: v for k, v in m.items() if k[:4] == "iou_"})
    return rows


def foreground_counts(counts) -> np.ndarray:
    """[N, C, 4] -> [N, 4]: foreground (any class but background) against background; the
    binary counts themselves when C = 2."""
    counts = np.asarray(torch.as_tensor(counts).cpu())
    tn, fn, fp, tp = counts[:, 0].T  # background's counts, read from the foreground's side
    return np.stack([tp, fp, fn, tn], axis=1)


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

    `counts` is [N, C, 4] per-image, per-class TP, FP, FN, TN (or [N, 4], a binary model's
    foreground counts). Each resample draws N images with replacement and recomputes the
    pooled metric, so the interval reflects the spread between images, the unit that was
    sampled. Resamples where a metric is undefined are dropped; an interval with no defined
    resample (or resamples=0) is None.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim == 2:  # binary foreground counts: add the background's view of them
        counts = np.stack([counts[:, [3, 2, 1, 0]], counts], axis=1)
    if resamples <= 0 or len(counts) == 0:
        return {f"{k}_ci": None for k in keys}
    rng = np.random.default_rng(seed)
    pooled = counts[rng.integers(0, len(counts), (resamples, len(counts)))].sum(axis=1)
    tp, fp, fn = pooled[..., 0], pooled[..., 1], pooled[..., 2]  # [resamples, C]
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
        values = {"fg_iou": iou[:, 1:].mean(axis=1),
                  "dice": (2 * iou[:, 1:] / (1 + iou[:, 1:])).mean(axis=1),
                  "miou": iou.mean(axis=1)}
    alpha = (1 - level) / 2 * 100
    out = {}
    for key in keys:
        v = values[key][~np.isnan(values[key])]
        out[f"{key}_ci"] = ([float(np.percentile(v, alpha)), float(np.percentile(v, 100 - alpha))]
                            if len(v) else None)
    return out


def paired_difference(a, b, level: float = 0.95) -> dict:
    """Mean of `a - b` over the units both have (e.g. cross-validation folds, each model
    scored on the same ones), with its t-interval: the folds are the sampled unit."""
    from scipy import stats

    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    diff = diff[~np.isnan(diff)]
    half = stats.t.ppf((1 + level) / 2, len(diff) - 1) * diff.std(ddof=1) / math.sqrt(len(diff))
    low, high = diff.mean() - half, diff.mean() + half
    return {"folds": len(diff), "diff": float(diff.mean()), "ci_low": float(low),
            "ci_high": float(high), "excludes_0": bool(low > 0 or high < 0)}
