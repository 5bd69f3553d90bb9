"""The LiTS challenge's per-case metrics for volume sources (Bilic et al., LiTS, 2023):
computed in 3D on whole cases, with each case's voxel spacing in mm.

Per case and foreground class (A the prediction, B the reference, |.| voxel counts):
- `dice` = 2|A n B| / (|A| + |B|); `voe` (volume overlap error) = 1 - |A n B| / |A u B|;
  `rvd` (relative volume difference) = (|A| - |B|) / |B|;
- `assd` (average symmetric surface distance), `mssd` (maximum symmetric surface distance,
  the Hausdorff distance) and `hd95` (the larger of the two directed 95th percentiles of
  the surface distances, MONAI's definition),
  in mm, with MONAI's implementations (`monai.metrics`, Euclidean distance transform over
  the voxel spacing; the maintained successor of the medpy metrics LiTS's own evaluation
  used).
Empty-mask rule: A and B both empty: dice 1, voe 0, rvd 0, distances 0; exactly one empty:
dice 0, voe 1, rvd -1 (A empty) or undefined (B empty: None), distances undefined (None).
`global_dice` (LiTS's "Dice global") pools every case's voxels: 2 sum|A n B| / sum(|A| + |B|).
Lesions (the tumour class): connected components (26-connected, scipy.ndimage) of the
reference; a reference lesion is detected when some predicted voxel overlaps it, and a
predicted component is a false positive when it overlaps no reference lesion. Recall =
detected / reference lesions, precision = (predicted - false positive) / predicted
components.
"""

from __future__ import annotations

import numpy as np
import torch

# Imported with the module, never inside a call: MONAI's modules keep, for good, the
# traceback of an optional import that fails while they load (GPU libraries absent here),
# and with it every frame above the import: inside evaluate, a whole case's prediction and
# truth (235 MB at LiTS size).
from monai.metrics.utils import get_edge_surface_distance
from scipy import ndimage

from liverseg.postprocess import foreground_box

FULL = np.ones((3, 3, 3), bool)  # 26-connectivity


def overlap(pred: np.ndarray, truth: np.ndarray) -> dict:
    """dice, voe and rvd of two boolean volumes (the empty-mask rule above)."""
    a, b = int(pred.sum()), int(truth.sum())
    both = int((pred & truth).sum())
    union = a + b - both
    if union == 0:
        return {"dice": 1.0, "voe": 0.0, "rvd": 0.0}
    return {"dice": 2 * both / (a + b), "voe": 1 - both / union,
            "rvd": (a - b) / b if b else None}


def surface_distances(pred: np.ndarray, truth: np.ndarray, spacing) -> dict:
    """assd, mssd and hd95 in mm (MONAI); None when exactly one of the two is empty."""
    if not pred.any() and not truth.any():
        return {"assd": 0.0, "mssd": 0.0, "hd95": 0.0}
    if not pred.any() or not truth.any():
        return {"assd": None, "mssd": None, "hd95": None}
    # MONAI's compute_average_surface_distance and compute_hausdorff_distance each find the
    # edges and their distance transforms again, after float copies of the whole volume:
    # here once, in the foreground's box (MONAI crops to it too), aggregated as they do.
    box = foreground_box(pred, truth)
    _, (to_truth, to_pred), _ = get_edge_surface_distance(
        torch.from_numpy(np.ascontiguousarray(pred[box])),
        torch.from_numpy(np.ascontiguousarray(truth[box])),
        spacing=[float(s) for s in spacing], symmetric=True)
    return {"assd": float(torch.cat([to_truth, to_pred]).mean()),
            "mssd": float(max(to_truth.max(), to_pred.max())),
            "hd95": float(max(torch.quantile(d, 0.95) for d in (to_truth, to_pred)))}


def lesions(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Reference lesions, detected ones, predicted components and false positives."""
    box = foreground_box(pred, truth)
    if box is None:
        return {"lesions": 0, "lesions_detected": 0, "predicted_lesions": 0,
                "false_positive_lesions": 0}
    pred, truth = pred[box], truth[box]
    truth_labels, n_truth = ndimage.label(truth, structure=FULL)
    pred_labels, n_pred = ndimage.label(pred, structure=FULL)
    detected = len(set(np.unique(truth_labels[pred])) - {0})
    matched = len(set(np.unique(pred_labels[truth])) - {0})
    return {"lesions": n_truth, "lesions_detected": detected, "predicted_lesions": n_pred,
            "false_positive_lesions": n_pred - matched}


def case_row(pred: np.ndarray, truth: np.ndarray, classes: tuple[str, ...], spacing) -> dict:
    """Every metric of one case, per foreground class (`<class>_dice`, ...), from class-index
    volumes [Z, Y, X]; a binary model's one class is its target's name. Voxel counts too,
    for `global_dice`."""
    # Every count and distance is over foreground voxels: the box around them is enough.
    box = foreground_box(pred, truth)
    if box is not None:
        pred, truth = pred[box], truth[box]
    row = {}
    for k, name in enumerate(classes[1:], start=1):
        # Three classes as LiTS scores them: the liver includes its tumours.
        a, b = ((pred >= 1, truth >= 1) if name == "liver" and len(classes) == 3
                else (pred == k, truth == k))
        row |= {f"{name}_{key}": value
                for key, value in (overlap(a, b) | surface_distances(a, b, spacing)).items()}
        row |= {f"{name}_pred_voxels": int(a.sum()), f"{name}_truth_voxels": int(b.sum()),
                f"{name}_both_voxels": int((a & b).sum())}
        if name == "tumour":
            row |= lesions(a, b)
    return row


def summary(rows: list[dict], classes: tuple[str, ...]) -> dict:
    """Means over cases (None ignored), global Dice per class, and lesion recall and
    precision over every case."""
    out = {"cases": len(rows)}
    for name in classes[1:]:
        for key in ("dice", "voe", "rvd", "assd", "mssd", "hd95"):
            values = [r[f"{name}_{key}"] for r in rows if r.get(f"{name}_{key}") is not None]
            out[f"{name}_{key}_per_case"] = float(np.mean(values)) if values else None
        both = sum(r[f"{name}_both_voxels"] for r in rows)
        total = sum(r[f"{name}_pred_voxels"] + r[f"{name}_truth_voxels"] for r in rows)
        out[f"{name}_global_dice"] = 2 * both / total if total else None
    if "tumour" in classes:
        found = sum(r["lesions"] for r in rows)
        predicted = sum(r["predicted_lesions"] for r in rows)
        out["lesion_recall"] = sum(r["lesions_detected"] for r in rows) / found if found else None
        out["lesion_precision"] = ((predicted - sum(r["false_positive_lesions"] for r in rows))
                                   / predicted if predicted else None)
    return out
