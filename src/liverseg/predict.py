"""Predictions from a trained or registered model on new slices and volumes.

Inputs: PNG/JPG slices (grayscale or RGB, converted to luminance), folders of them, and
NIfTI volumes (`.nii`, `.nii.gz`; slices along the last axis, values in Hounsfield units,
windowed as in training: level 50, width 400). Each slice is resized to the model's trained
size, predicted, and the probabilities resized back, so masks have the input's geometry;
NIfTI masks keep the input's affine and header.

Outputs in DIR: `<name>_mask.png|.nii.gz` (class indices for NIfTI: 0/1, or 0/1/2 =
background/liver/tumour as LiTS labels them; PNG values as `liverseg.labels` stores masks:
0/255 or 0/128/255), `<name>_overlay.png` (for a volume: the slice with the largest predicted
foreground) and `predictions.csv`, one row per input with each class's size in pixels and,
for a volume, in ml (from the header's voxel spacing).
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from liverseg import checkpoint, labels
from liverseg.io import atomic_path, load_gray

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
CLASS_RGB = {"tumour": (255, 40, 40), "liver": (40, 200, 90)}


# ----------------------------------------------------------------------------- the model


def model_uri(ref: str, registered_model: str = "liverseg") -> str:
    """A bare version number or run id as an MLflow URI; URIs pass through."""
    if ref.isdigit():
        return f"models:/{registered_model}/{ref}"
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        return f"runs:/{ref}/model"
    return ref


def load(ref: str) -> tuple[torch.nn.Module, dict]:
    """(eval-mode torch model, its config) from a model directory (models/<name>) or an
    MLflow URI (models:/liverseg@champion, models:/liverseg/3, runs:/ID/model, a version
    number or a run id), loaded through the project's pyfunc (liverseg.mlflow_pyfunc)."""
    if Path(ref).is_dir():
        return checkpoint.load_model(ref)
    from liverseg import tracking

    served = tracking.mlflow().pyfunc.load_model(model_uri(ref))
    python_model = served.unwrap_python_model()
    return python_model.model.eval(), python_model.config


class Normalised(torch.nn.Module):
    """Raw pixel values 0..255 in, probabilities out (foreground [N, 1, H, W] for a binary
    model, each class [N, C, H, W] for a multi-class one): the pyfunc's contract."""

    def __init__(self, model: torch.nn.Module, config: dict):
        super().__init__()
        norm = config["normalisation"]
        self.model, self.scale = model, float(norm["scale"])
        self.mean, self.std = float(norm["mean"]), float(norm["std"])

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return labels.probabilities(self.model((raw / self.scale - self.mean) / self.std))


@dataclass
class Predictor:
    model: torch.nn.Module
    config: dict
    batch_size: int = 32  # CPU inference: larger batches amortise per-call overhead

    def __post_init__(self):
        self.net = Normalised(self.model, self.config).eval()

    @torch.no_grad()
    def _batches(self, slices: np.ndarray):
        """[N, H, W] raw 0..255 -> batches of [B, K, H, W] probabilities, in the input's
        geometry (one batch at a time: a volume's probabilities never all sit in memory)."""
        size, channels = self.config["image_size"], self.config["in_channels"]
        for start in range(0, len(slices), self.batch_size):
            x = torch.from_numpy(np.asarray(slices[start:start + self.batch_size], np.float32))
            h, w = x.shape[-2:]
            x = F.interpolate(x[:, None], (size, size), mode="bilinear", align_corners=False)
            probs = self.net(x.expand(-1, channels, -1, -1))
            yield F.interpolate(probs, (h, w), mode="bilinear", align_corners=False)

    def masks(self, slices: np.ndarray) -> np.ndarray:
        """[N, H, W] class indices (uint8)."""
        threshold = self.config["threshold"]
        return torch.cat([labels.to_classes(p, threshold).to(torch.uint8)
                          for p in self._batches(slices)]).numpy()

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.config.get("classes", labels.BINARY))  # older configs: binary


# ----------------------------------------------------------------------------- inputs


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", *NIFTI_SUFFIXES, *IMAGE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files as given, folders as their images and volumes (sorted); anything else fails."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file()
                           and (p.suffix.lower() in IMAGE_SUFFIXES or _is_nifti(p)))
            if not found:
                raise FileNotFoundError(f"{item}: no PNG/JPG/NIfTI files in this folder")
            files += found
        elif item.is_file():
            if not (item.suffix.lower() in IMAGE_SUFFIXES or _is_nifti(item)):
                raise ValueError(f"{item}: unsupported input (PNG, JPG or NIfTI expected)")
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return files


# ----------------------------------------------------------------------------- outputs


def overlay(gray: np.ndarray, mask: np.ndarray, classes: tuple[str, ...] = labels.BINARY
            ) -> np.ndarray:
    """RGB uint8: the slice in gray, each predicted class tinted (tumour red, liver green)."""
    rgb = np.repeat(gray.astype(np.float32)[..., None], 3, axis=2)
    for k, name in enumerate(classes[1:], start=1):
        sel = mask == k
        rgb[sel] = 0.5 * rgb[sel] + 0.5 * np.array(CLASS_RGB[name], np.float32)
    return rgb.clip(0, 255).astype(np.uint8)


def class_sizes(mask: np.ndarray, classes: tuple[str, ...],
                voxel_mm3: float | None = None) -> dict:
    """`<class>_pixels` per foreground class, and `<class>_volume_ml` for a volume."""
    out = {}
    for k, name in enumerate(classes[1:], start=1):
        n = int((mask == k).sum())
        out[f"{name}_pixels"] = n
        out[f"{name}_volume_ml"] = None if voxel_mm3 is None else n * voxel_mm3 / 1000.0
    return out


def _save_rgb(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")


def _save_gray(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def predict_image(predictor: Predictor, path: Path, out_dir: Path) -> dict:
    gray = load_gray(path)
    mask, classes = predictor.masks(gray[None])[0], predictor.classes
    stem = _stem(path)
    _save_gray(out_dir / f"{stem}_mask.png", labels.encode(mask, len(classes)))
    _save_rgb(out_dir / f"{stem}_overlay.png", overlay(gray, mask, classes))
    return {"input": str(path), "kind": "image", "shape": "x".join(map(str, gray.shape)),
            **class_sizes(mask, classes),
            "mask": f"{stem}_mask.png", "overlay": f"{stem}_overlay.png"}


def predict_volume(predictor: Predictor, path: Path, out_dir: Path) -> dict:
    import nibabel as nib

    from liverseg.data.phantom import window

    img = nib.load(str(path))
    hu = np.asarray(img.dataobj, dtype=np.float32)
    if hu.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {hu.shape}")
    slices = np.moveaxis(window(hu), -1, 0)  # [Z, X, Y]: slices along the last axis
    mask = np.moveaxis(predictor.masks(slices), 0, -1)
    header = img.header.copy()
    header.set_data_dtype(np.uint8)
    stem = _stem(path)
    with atomic_path(out_dir / f"{stem}_mask.nii.gz") as tmp:
        tmp.write_bytes(gzip.compress(nib.Nifti1Image(mask, img.affine, header).to_bytes()))
    areas = (mask > 0).sum(axis=(0, 1))
    best = int(areas.argmax()) if areas.any() else mask.shape[-1] // 2
    classes = predictor.classes
    _save_rgb(out_dir / f"{stem}_overlay.png", overlay(slices[best], mask[..., best], classes))
    voxel_mm3 = float(np.prod([float(z) for z in header.get_zooms()[:3]]))
    return {"input": str(path), "kind": "volume", "shape": "x".join(map(str, mask.shape)),
            **class_sizes(mask, classes, voxel_mm3),
            "mask": f"{stem}_mask.nii.gz", "overlay": f"{stem}_overlay.png",
            "overlay_slice": best}


def run(model_ref: str, inputs: list[str | Path], out_dir: str | Path) -> dict:
    files = expand_inputs(inputs)
    if not files:
        raise ValueError("no inputs given")
    model, config = load(model_ref)
    predictor = Predictor(model, config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stems = [_stem(f) for f in files]
    if len(set(stems)) != len(stems):  # two inputs would overwrite each other's mask
        dupes = sorted({s for s in stems if stems.count(s) > 1})
        raise ValueError(f"inputs share output names {dupes}; predict them into separate --out")
    rows = [(predict_volume if _is_nifti(f) else predict_image)(predictor, f, out_dir)
            for f in files]
    with atomic_path(out_dir / "predictions.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    return {"model": model_ref, "inputs": len(rows), "out": str(out_dir),
            "summary": str(out_dir / "predictions.csv"),
            **{k: sum(r[k] for r in rows) for k in rows[0] if k.endswith("_pixels")}}
