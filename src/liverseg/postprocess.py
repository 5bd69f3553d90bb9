"""nnU-Net's two inference choices, made once by evaluate on validation and applied
wherever the model serves (evaluate, `liverseg predict`, the registered pyfunc).

- **Mirroring** (`Inference.mirror`): the probabilities averaged over the flips of the
  input (`served.Served(mirror=True)`). Kept only if it *raises* the validation score.
- **Post-processing** of the class mask, each step kept only if it does not *lower* the
  validation score the comparison ranks by (`compare.rank_by`), tried in this order:
  1. `largest_foreground`: keep the largest connected component of all foreground classes
     together (nnU-Net's first step: a liver is one organ; a removed liver component takes
     its tumours with it);
  2. `tumour_in_liver` (three-class models): drop tumour components touching no liver voxel;
  3. `min_tumour`: drop tumour components smaller than N voxels (pixels in 2D), the best N
     of `MIN_TUMOUR`.
  Removed voxels become background.

Components are 3D (26-connected) on a volume with a regular grid (a NIfTI volume, a regular
DICOM series, a validation case with all its slices) and 2D (8-connected) per slice
otherwise: 2D images, tilted or irregular series, REST batches (no case identity).
scipy.ndimage labels both with one call and is already a dependency; connected-components-3d
is faster on very large volumes but would add a compiled dependency for no change in result.
Every step runs in the box around the foreground (`foreground_box`): on a 448x512x512 CT
case that is what keeps evaluate's choice and serving's post-processing at seconds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from itertools import product

import numpy as np
from scipy import ndimage

INFERENCE_KEY = "inference"  # the registered pyfunc's artifact holding the decision
MIN_TUMOUR = (10, 50)  # candidate minimum tumour sizes, voxels (pixels in 2D)
FULL = np.ones((3, 3, 3), bool)  # 26-connectivity; on a one-slice volume, 8-connected 2D


@dataclass(frozen=True)
class Inference:
    """What serves beyond the network; the default is the raw thresholded output."""

    mirror: bool = False
    largest_foreground: bool = False
    tumour_in_liver: bool = False
    min_tumour: int = 0
    threshold: float | None = None  # evaluate.threshold, as scored (None: the model's own)

    @classmethod
    def from_dict(cls, data: dict | None) -> Inference:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """The choices beyond the threshold, e.g. `mirror+largest_foreground` or `none`."""
        parts = [name if value is True else f"{name}={value}"
                 for name, value in asdict(self).items() if value and name != "threshold"]
        return "+".join(parts) or "none"

    def preprocessing(self, prep):
        """The model's `Preprocessing` with the threshold evaluate scored it at."""
        return prep if self.threshold is None else replace(prep, threshold=self.threshold)

    def apply(self, mask: np.ndarray, classes: tuple[str, ...], grid: bool) -> np.ndarray:
        """Class indices [N, H, W] -> post-processed copy. `grid`: the N slices are one
        volume (3D components); else each slice alone."""
        if not grid:
            return np.concatenate([self.apply(m[None], classes, True) for m in mask]) \
                if len(mask) else mask.copy()
        out, box = mask.copy(), foreground_box(mask)
        if box is not None:  # every step acts on foreground components only
            inner = out[box]
            for name, value in self.steps():
                inner = STEPS[name](inner, value, classes)
            out[box] = inner
        return out

    def steps(self) -> list[tuple[str, object]]:
        """The post-processing steps in their order, with their values (off included)."""
        return [(name, getattr(self, name)) for name in STEPS]

    def apply_to_probabilities(self, probs, classes: tuple[str, ...], threshold: float):
        """REST's answer [N, K, H, W] (torch): where post-processing removed a pixel, its
        probabilities become background's, so the caller's threshold or argmax gives the
        post-processed mask. Each image is one 2D unit (no case identity)."""
        import torch

        from liverseg.labels import to_classes

        if self.describe() in ("none", "mirror"):
            return probs
        raw = to_classes(probs, threshold).numpy().astype(np.uint8)
        removed = torch.from_numpy(self.apply(raw, classes, grid=False) != raw)
        out = probs.clone()
        if out.shape[1] == 1:  # binary: the foreground probability
            out[:, 0][removed] = 0.0
        else:
            out.permute(0, 2, 3, 1)[removed] = torch.eye(out.shape[1], dtype=out.dtype)[0]
        return out


def foreground_box(*masks: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding every nonzero voxel of `masks` (all of one shape); None when
    all are empty. Post-processing and the surface metrics only touch foreground components,
    so they run in this box: a liver is a tenth of a CT volume, a tumour far less."""
    ndim, box = masks[0].ndim, []
    for axis in range(ndim):  # projections: no copy of a volume
        others = tuple(a for a in range(ndim) if a != axis)
        hit = np.flatnonzero(np.logical_or.reduce([m.any(axis=others) for m in masks]))
        if not hit.size:
            return None
        box.append(slice(hit[0], hit[-1] + 1))
    return tuple(box)


def _label(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(component labels, each label's size; background's size 0)."""
    lab, n = ndimage.label(mask, FULL)
    # Counted over the labelled voxels only: bincount makes an int64 copy of what it counts.
    return lab, np.bincount(lab[mask], minlength=n + 1)


def largest_foreground(mask, on: bool, classes):
    if not on or not mask.any():
        return mask
    lab, sizes = _label(mask > 0)
    return np.where(lab == sizes.argmax(), mask, 0).astype(mask.dtype, copy=False)


def tumour_in_liver(mask, on: bool, classes):
    if not on or "tumour" not in classes or "liver" not in classes:
        return mask
    tumour = classes.index("tumour")
    lab, _ = _label(mask == tumour)
    near_liver = ndimage.binary_dilation(mask == classes.index("liver"), FULL)
    touching = np.unique(lab[near_liver & (lab > 0)])
    return np.where((lab > 0) & ~np.isin(lab, touching), 0, mask).astype(mask.dtype, copy=False)


def min_tumour(mask, size: int, classes):
    if not size or "tumour" not in classes:
        return mask
    lab, sizes = _label(mask == classes.index("tumour"))
    small = sizes < size
    small[0] = False
    return np.where(small[lab], 0, mask).astype(mask.dtype, copy=False)


STEPS = {"largest_foreground": largest_foreground, "tumour_in_liver": tumour_in_liver,
         "min_tumour": min_tumour}


def candidates(classes: tuple[str, ...], mirror: tuple[bool, ...], postprocess: bool
               ) -> list[Inference]:
    """Every combination evaluate scores: the mirror settings given, and the steps that
    mean something for these classes (all off when `postprocess` is False)."""
    tumour, three = "tumour" in classes, len(classes) > 2
    options = [(False, True) if postprocess else (False,),
               (False, True) if postprocess and three else (False,),
               (0, *MIN_TUMOUR) if postprocess and tumour else (0,)]
    return [Inference(m, *steps) for m in mirror for steps in product(*options)]


class Choice:
    """Pooled confusion counts of every candidate over the validation units, then nnU-Net's
    rule. A unit is one case with a grid, or slices scored one by one."""

    def __init__(self, classes: tuple[str, ...], mirror: tuple[bool, ...], postprocess: bool):
        self.classes = classes
        self.variants = candidates(classes, mirror, postprocess)
        self.counts = {v: np.zeros((len(classes), 4)) for v in self.variants}

    def add(self, masks: dict[bool, np.ndarray], truth: np.ndarray, grid: bool) -> None:
        """masks: mirror setting -> the unit's raw class indices [N, H, W]; truth [N, H, W].
        A step's result is shared by the next variant when its earlier steps are the same;
        variants come in `product` order, so only the last variant's chain of results is
        kept (a whole CT case is 10^8 voxels a mask)."""
        from liverseg.metrics import pooled_confusion

        n = len(self.classes)
        box = foreground_box(*masks.values())
        raw = next(iter(masks.values()))
        if box is None:  # no candidate has anything to remove
            for v in self.variants:
                self.counts[v] += pooled_confusion(raw, truth, n)
            return
        # Outside the box every candidate answers background: those counts are the raw's.
        truth_in = truth[box]
        outside = pooled_confusion(raw, truth, n) - pooled_confusion(raw[box], truth_in, n)
        done: dict[tuple, np.ndarray] = {}
        for v in self.variants:
            key, out, chain = (v.mirror,), masks[v.mirror][box], {}
            for name, value in v.steps():
                key += (value,)
                if key not in done:
                    done[key] = Inference(**{name: value}).apply(out, self.classes, grid)
                out = chain[key] = done[key]
            done = chain
            self.counts[v] += outside + pooled_confusion(out, truth_in, n)

    def score(self, v: Inference, metric: str) -> float:
        from liverseg.metrics import class_metrics

        return class_metrics(self.counts[v], self.classes)[metric]

    def choose(self, metric: str, tta: str) -> tuple[Inference, dict]:
        """(the decision, its record: every variant's score and each step's gain)."""
        score = lambda v: self.score(v, metric)  # noqa: E731
        best = Inference(mirror=tta == "flip")
        mirrored = Inference(mirror=True)
        if tta == "auto" and mirrored in self.counts and _gt(score(mirrored), score(best)):
            best = mirrored
        after_mirror = best
        for name, _ in best.steps():  # each step in order, on top of those kept
            tried = [replace(best, **{name: value}) for value in _values(self.variants, name)]
            tried = [t for t in tried if t in self.counts and t != best]
            for t in sorted(tried, key=lambda t: _rank(score(t)), reverse=True)[:1]:  # best value
                if _ge(score(t), score(best)):
                    best = t
        plain = Inference()
        return best, {
            "decision": best.to_dict(), "describe": best.describe(), "rank_by": metric,
            "tta": tta, "scores": {v.describe(): _defined(score(v)) for v in self.variants},
            "score_plain": _defined(score(plain)),
            "gain_mirror": _gain(score(after_mirror), score(plain)),
            "gain_postprocessing": _gain(score(best), score(after_mirror)),
        }


def _values(variants: list[Inference], name: str) -> list:
    return sorted({getattr(v, name) for v in variants})


def _rank(x: float) -> float:
    return -math.inf if math.isnan(x) else x


def _defined(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def _gt(a: float, b: float) -> bool:
    return not math.isnan(a) and (math.isnan(b) or a > b)


def _ge(a: float, b: float) -> bool:
    """A step is kept when it does not lower a defined score (NaN: never kept)."""
    return not math.isnan(a) and (math.isnan(b) or a >= b)


def _gain(a: float, b: float) -> float | None:
    return None if math.isnan(a) or math.isnan(b) else float(a - b)
