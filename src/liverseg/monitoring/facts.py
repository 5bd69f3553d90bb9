"""The facts of one served case: what came in, what the model answered, how sure it was.

Every function here is pure and cheap (a 100-slice 512x512 series costs a few percent of a
forward pass: `bench/monitoring_overhead.py`), and none keeps patient data: the only
identifiers a row holds are `hash_uid` of the study and series UIDs.

Rules, stated once:
- **Body**: for HU inputs the voxels with HU > -500 (`BODY_HU`: air is -1000, lung about
  -850..-500 sits outside, fat -100 inside); for grey-only inputs (PNG/JPG, the REST batch)
  the pixels with grey > 8 (`BODY_GREY`: above JPEG noise on black air). The row records
  which rule it used (`body_rule`): percentiles under different rules are not comparable.
- **Percentiles** of the grey values (uint8, what the model sees before its resize) inside
  the body are exact, from the 256-bin histogram (numpy's `inverted_cdf`: the smallest
  value whose cumulative share reaches q), so they cost one pass and no sort.
- **Window fractions** (HU inputs): the share of body voxels below the window's low end
  (they all became grey 0) and above its high end (all 255); the windowed slices no longer
  hold that information.
- **Confidence**: per pixel the max-probability (max(p, 1-p) for a binary sigmoid head, the
  largest class probability for softmax) and the predictive entropy in **nats**
  (-sum p ln p, with 1-p the second class of a binary head). A pixel grid of at most
  `Confidence.max_side` per side is sampled (a stride, the same in every batch): served
  probabilities are a bilinear resize of the model's own output (128 px by default), so the
  sample sees what the model said while the cost stays flat in the input's size.
  `p5_max_prob` comes from a 1000-bin histogram (resolution 0.001); memory is flat in the
  number of slices.
- **Lesions**: connected components of the tumour class, `scipy.ndimage.label` with full
  connectivity (26-connected in 3D, 8-connected in 2D: voxels touching only at an edge or a
  corner are one lesion); a batch of 2D images is labelled per image. scipy is already a
  dependency (BSD), well kept, and labelling only the tumour's bounding box keeps it fast:
  about 20 ms for a liver-sized mask with lesions, 100x512x512. connected-components-3d is
  4-6x faster on a mask that is tumour nearly everywhere (0.15 s against 0.97 s: a model
  that has failed) but would add a compiled LGPL-3.0 dependency for that case only.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import numpy as np
from scipy import ndimage

from liverseg.postprocess import foreground_box

HEADER_KEYS = ("Manufacturer", "ManufacturerModelName", "KVP", "ConvolutionKernel",
               "SliceThickness", "PixelSpacing")
# the row's column for each DICOM keyword (PixelSpacing splits into row and column spacing)
HEADER_COLUMNS = {"Manufacturer": "manufacturer",
                  "ManufacturerModelName": "manufacturer_model_name",
                  "KVP": "kvp", "ConvolutionKernel": "convolution_kernel",
                  "SliceThickness": "slice_thickness"}
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
BODY_HU = -500.0
BODY_GREY = 8
HIST_BINS = 1000
CHUNK = 1 << 18  # voxels per pass: a 512x512 slice, cache-sized temporaries
SCHEMA = 1  # the row format; bump when a column changes meaning


def hash_uid(uid: str) -> str:
    """A DICOM UID as the first 16 hex digits of its SHA-256 ('' stays ''): enough to join a
    correction to the case it corrects, never the UID itself."""
    uid = str(uid or "").strip()
    return hashlib.sha256(uid.encode()).hexdigest()[:16] if uid else ""


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v).strip() for v in value)
    text = str(value).strip()
    return text or None


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def header_facts(ds: Any, n_slices: int) -> dict:
    """The scanner and protocol of a series from its first instance (a pydicom Dataset):
    `manufacturer`, `manufacturer_model_name`, `kvp`, `convolution_kernel` (multi-valued
    kernels joined with '\\'), `slice_thickness`, `pixel_spacing_row`, `pixel_spacing_col`
    (mm), `rows`, `columns`, `slices`. A missing attribute is None. Nothing else is read:
    no PatientName, PatientID, BirthDate or any other identity."""
    get = getattr(ds, "get", None) or (lambda key, default=None: getattr(ds, key, default))
    out: dict[str, Any] = {
        "manufacturer": _text(get("Manufacturer", None)),
        "manufacturer_model_name": _text(get("ManufacturerModelName", None)),
        "kvp": _number(get("KVP", None)),
        "convolution_kernel": _text(get("ConvolutionKernel", None)),
        "slice_thickness": _number(get("SliceThickness", None)),
    }
    spacing = get("PixelSpacing", None)
    try:
        row, col = (float(v) for v in spacing)
    except (TypeError, ValueError):
        row = col = None
    out["pixel_spacing_row"], out["pixel_spacing_col"] = row, col
    out["rows"] = _number(get("Rows", None))
    out["columns"] = _number(get("Columns", None))
    out["slices"] = int(n_slices)
    return out


def _percentiles(hist: np.ndarray) -> dict:
    """Exact inverted-CDF percentiles and the mean of uint8 values from their histogram."""
    total = int(hist.sum())
    names = [f"grey_p{q}" for q in PERCENTILES]
    if total == 0:
        return {**dict.fromkeys(names), "grey_mean": None}
    cum = np.cumsum(hist)
    out = {name: float(np.searchsorted(cum, q / 100 * total, side="left"))
           for name, q in zip(names, PERCENTILES, strict=True)}
    out["grey_mean"] = float(np.dot(hist, np.arange(hist.size)) / total)
    return out


def intensity_facts(grey: np.ndarray, hu: np.ndarray | None = None,
                    window: tuple[float, float] | None = None) -> dict:
    """Facts of the grey slices the model sees ([N, H, W] or [H, W], uint8 0..255) inside the
    body: `grey_p1` ... `grey_p99`, `grey_mean`, `body_fraction` (of all voxels) and
    `body_rule`; with `hu` (the same voxels in HU, any float dtype) and `window` (low, high):
    `hu_below_window`, `hu_above_window`, the shares of body voxels outside the window."""
    grey = np.asarray(grey)
    if grey.dtype != np.uint8:
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    flat = grey.reshape(-1)
    out: dict[str, Any] = {}
    if hu is not None:
        hu = np.asarray(hu)
        if hu.shape != grey.shape:
            raise ValueError(f"hu {hu.shape} and grey {grey.shape} must be the same voxels")
        h = hu.reshape(-1)
        out["body_rule"] = f"hu>{BODY_HU:g}"
        lo, hi = (float(window[0]), float(window[1])) if window is not None else (None, None)
        hist = np.zeros(512, np.int64)
        below = above = 0
        # in chunks that stay in cache; grey + 256 * body: both histograms in one bincount
        for i in range(0, flat.size, CHUNK):
            x = h[i:i + CHUNK]
            body = x > BODY_HU
            hist += np.bincount(flat[i:i + CHUNK] + body.view(np.uint8) * np.uint16(256),
                                minlength=512)
            if lo is not None:
                below += np.count_nonzero(body & (x < lo))
                above += np.count_nonzero(body & (x > hi))
        hist = hist[256:]
        n_body = int(hist.sum())
        fractions = lo is not None and n_body
        out["hu_below_window"] = below / n_body if fractions else None
        out["hu_above_window"] = above / n_body if fractions else None
    else:
        out["body_rule"] = f"grey>{BODY_GREY}"
        out["hu_below_window"] = out["hu_above_window"] = None
        hist = np.zeros(256, np.int64)
        for i in range(0, flat.size, CHUNK):
            hist += np.bincount(flat[i:i + CHUNK], minlength=256)
        hist[:BODY_GREY + 1] = 0
        n_body = int(hist.sum())
    out.update(_percentiles(hist))
    out["body_fraction"] = float(n_body / flat.size) if flat.size else None
    return out


def _to_numpy(probs: Any) -> np.ndarray:
    if hasattr(probs, "detach"):  # a torch tensor: stride on its device, copy only the sample
        return probs.detach().float().cpu().numpy()
    return np.asarray(probs, dtype=np.float32)


class Confidence:
    """How sure the model was, streamed over batches of probabilities [N, K, H, W] (K = 1: a
    binary sigmoid head; K > 1: softmax). Memory is flat in the number of slices: sums and a
    `HIST_BINS`-bin histogram of the per-pixel max-probability. Entropy in nats."""

    def __init__(self, max_side: int = 128):
        self.max_side = max(1, int(max_side))
        self.n = 0
        self.sum_max = 0.0
        self.sum_entropy = 0.0
        self.hist = np.zeros(HIST_BINS, dtype=np.int64)

    def update(self, probs: Any) -> None:
        if probs.ndim != 4:
            raise ValueError(f"probabilities must be [N, K, H, W], got shape {tuple(probs.shape)}")
        h, w = probs.shape[-2:]
        sh, sw = -(-h // self.max_side), -(-w // self.max_side)
        p = _to_numpy(probs[..., ::sh, ::sw])
        p = np.clip(p, 0.0, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            if p.shape[1] == 1:
                q = p[:, 0]
                top = np.maximum(q, 1.0 - q)
                ent = -(np.where(q > 0, q * np.log(q), 0.0)
                        + np.where(q < 1, (1.0 - q) * np.log1p(-q), 0.0))
            else:
                top = p.max(axis=1)
                ent = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
        self.n += top.size
        self.sum_max += float(top.sum(dtype=np.float64))
        self.sum_entropy += float(ent.sum(dtype=np.float64))
        idx = np.minimum((top.reshape(-1) * HIST_BINS).astype(np.int64), HIST_BINS - 1)
        self.hist += np.bincount(idx, minlength=HIST_BINS)

    def merge(self, other: Confidence) -> None:
        """Add another stream's counts (a slice's, held until its case is post-processed)."""
        self.n += other.n
        self.sum_max += other.sum_max
        self.sum_entropy += other.sum_entropy
        self.hist += other.hist

    def facts(self) -> dict:
        """`mean_max_prob`, `p5_max_prob` (the lower edge of the histogram bin holding the 5th
        percentile, resolution 1/HIST_BINS), `mean_entropy` (nats); None before any update."""
        if not self.n:
            return {"mean_max_prob": None, "p5_max_prob": None, "mean_entropy": None}
        k = int(np.searchsorted(np.cumsum(self.hist), 0.05 * self.n, side="left"))
        return {"mean_max_prob": self.sum_max / self.n, "p5_max_prob": k / HIST_BINS,
                "mean_entropy": self.sum_entropy / self.n}


def _class_indices(classes: tuple[str, ...]) -> dict[str, int]:
    """Foreground class -> mask value. `classes` as `liverseg.labels.TARGETS` gives them
    (index = mask value, 'background' first); without 'background' first, the classes are
    the foreground values 1, 2, ..."""
    classes = tuple(classes)
    if classes and classes[0] == "background":
        return {name: k for k, name in enumerate(classes) if k}
    return {name: k + 1 for k, name in enumerate(classes)}


def output_facts(mask: np.ndarray, classes: tuple[str, ...], voxel_mm3: float | None,
                 volume: bool) -> dict:
    """What the model answered: per foreground class `<class>_ml` (with `voxel_mm3`) or
    `<class>_pixels`, and `lesion_count` (connected components of the 'tumour' class, full
    connectivity; per image when `volume` is False) when the model has a tumour class.
    `mask` holds class indices ([N, H, W] or [H, W]), not the 0/255 PNG values."""
    mask = np.asarray(mask)
    index = _class_indices(classes)
    out: dict[str, Any] = {}
    for name, k in index.items():
        n = int(np.count_nonzero(mask == k))
        if voxel_mm3:
            out[f"{name}_ml"] = n * float(voxel_mm3) / 1000.0
        else:
            out[f"{name}_pixels"] = n
    if "tumour" in index:
        out["lesion_count"] = lesion_count(mask == index["tumour"], volume)
    return out


def lesion_count(tumour: np.ndarray, volume: bool) -> int:
    """Connected components of a boolean mask: 3D (26-connected) for a volume, else per 2D
    image (8-connected), only inside the mask's bounding box."""
    tumour = np.asarray(tumour, dtype=bool)
    if tumour.ndim == 2:
        tumour = tumour[None]
    box = foreground_box(tumour)
    if box is None:
        return 0
    structure = np.ones((3, 3, 3), dtype=bool)
    if not volume:
        structure[0] = structure[2] = False  # no connection between images
    return int(ndimage.label(tumour[box], structure=structure)[1])


def served_row(identity: dict, kind: str, input_facts: dict, output_facts: dict,
               study_uid: str = "", series_uid: str = "") -> dict:
    """One monitoring row: `schema`, `time` (UTC ISO 8601), `kind` (dicom, nifti, image,
    rest, ...), the model's identity (`model_name`, `model_version`, `model_run`, and the
    other keys `predict.model_identity` gives), hashed UIDs, then the facts."""
    row: dict[str, Any] = {"schema": SCHEMA,
                           "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                           "kind": str(kind)}
    for key in ("model_name", "model_version", "model_run"):
        row[key] = str(identity.get(key, "") or "")
    row.update({k: v for k, v in identity.items() if k not in row})
    row["study_uid_hash"] = hash_uid(study_uid)
    row["series_uid_hash"] = hash_uid(series_uid)
    for facts in (input_facts, output_facts):
        clash = set(facts) & set(row)
        if clash:
            raise ValueError(f"facts {sorted(clash)} would overwrite the row's own columns")
        row.update(facts)
    return row
