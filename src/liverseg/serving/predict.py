"""Predictions from a trained or registered model on new slices and volumes.

Inputs: PNG/JPG slices, folders of them, NIfTI volumes (`.nii`, `.nii.gz`, values in
Hounsfield units) and DICOM CT series (`liverseg.serving.dicom`: files recognised by content,
grouped by series, each series a volume). All go through `liverseg.preprocess` with the
parameters the model recorded (grey conversion, canonical orientation, the training HU
window, the resize to the trained size and back), so a mask has the input's geometry and
is what evaluate measured; volume masks are written in the input's own axes, with its
affine and header.

Outputs in DIR: `<name>_mask.png|.nii.gz` (class indices for NIfTI: 0/1, or 0/1/2 =
background/liver/tumour as LiTS labels them; PNG values as `liverseg.labels` stores masks:
0/255 or 0/128/255), `<name>_overlay.png` (for a volume: the slice with the largest predicted
foreground), for a DICOM series also `<folder>_series-<N>_seg.dcm` (a DICOM SEG on the
source images, one segment per class), and `predictions.csv`, one row per input with each
class's size in pixels and, for a volume, in ml (from the voxel spacing); a DICOM row also
has the series UID and the files skipped (scouts, non-images).
"""

from __future__ import annotations

import gzip
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from liverseg import checkpoint, labels
from liverseg.serving import dicom
from liverseg.io import atomic_path
from liverseg.preprocess import (
    Preprocessing,
    Served,
    context_stack,
    read_image,
    to_input_orientation,
    volume_slices,
)

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
    number or a run id), loaded through the project's pyfunc (liverseg.serving.mlflow_pyfunc)."""
    if Path(ref).is_dir():
        return checkpoint.load_model(ref)
    from liverseg import tracking

    served = tracking.mlflow().pyfunc.load_model(model_uri(ref))
    python_model = served.unwrap_python_model()
    return python_model.model.eval(), python_model.config


@dataclass
class Predictor:
    """A model behind the one preprocessing (`liverseg.preprocess.Served`), in batches."""

    model: torch.nn.Module
    config: dict
    batch_size: int = 32  # CPU inference: larger batches amortise per-call overhead

    def __post_init__(self):
        self.prep = Preprocessing.from_config(self.config)
        self.net = Served(self.model, self.prep).eval()

    def masks(self, slices: np.ndarray) -> np.ndarray:
        """uint8 grey slices [N, H, W] -> class indices [N, H, W] (uint8), one batch at a
        time (a volume's probabilities never all sit in memory). A 2.5D model gets each
        slice with its neighbours among `slices` (a volume's, in order) as channels."""
        k, out = self.prep.context_slices, []
        for i in range(0, len(slices), self.batch_size):
            batch = np.arange(i, min(i + self.batch_size, len(slices)))
            x = context_stack(slices, k, batch) if k else slices[batch]
            out.append(self.net.classes_of(x).numpy())
        return np.concatenate(out).astype(np.uint8)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.prep.classes


# ----------------------------------------------------------------------------- inputs


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _stem(item: Path | dicom.Series) -> str:
    if isinstance(item, dicom.Series):  # named by folder and series
        tag = f"series-{item.number}" if item.number is not None else item.uid
        return f"{item.files[0].parent.name}_{tag}"
    name = item.name
    for suffix in (".nii.gz", *NIFTI_SUFFIXES, *IMAGE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return item.stem


def _is_image_or_nifti(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES or _is_nifti(path)


def expand_inputs(inputs: list[str | Path]) -> list[Path | dicom.Series]:
    """Files as given, folders as their images, volumes and DICOM series (DICOM recognised
    by content, grouped by series); anything else fails, naming it."""
    files, dicom_files = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file())
            dcm = [p for p in found if not _is_image_or_nifti(p) and dicom.is_dicom(p)]
            if not dcm and not any(map(_is_image_or_nifti, found)):
                raise FileNotFoundError(f"{item}: no PNG/JPG/NIfTI/DICOM files in this folder")
            files += [p for p in found if _is_image_or_nifti(p)]
            dicom_files += dcm
        elif item.is_file():
            if _is_image_or_nifti(item):
                files.append(item)
            elif dicom.is_dicom(item):
                dicom_files.append(item)
            else:
                raise ValueError(f"{item}: unsupported input (PNG, JPG, NIfTI or DICOM "
                                 "expected)")
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return files + (dicom.find_series(dicom_files) if dicom_files else [])


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
    if predictor.prep.context_slices:
        raise ValueError(f"{path}: the model reads each slice with its "
                         f"{predictor.prep.context_slices} neighbour(s) on each side "
                         "(data.context_slices); give it a volume (NIfTI or a DICOM series), "
                         "not a single 2D image")
    gray = read_image(path, predictor.prep)
    mask, classes = predictor.masks(gray[None])[0], predictor.classes
    stem = _stem(path)
    _save_gray(out_dir / f"{stem}_mask.png", labels.encode(mask, len(classes)))
    _save_rgb(out_dir / f"{stem}_overlay.png", overlay(gray, mask, classes))
    return {"input": str(path), "kind": "image", "shape": "x".join(map(str, gray.shape)),
            **class_sizes(mask, classes),
            "mask": f"{stem}_mask.png", "overlay": f"{stem}_overlay.png"}


def segment_volume(predictor: Predictor, img, stem: str, out_dir: Path) -> tuple[np.ndarray,
                                                                                 dict]:
    """The mask of a nibabel image in its own axes (slices in canonical orientation,
    windowed as in training), written as NIfTI with its affine and header, and the overlay."""
    import nibabel as nib

    prep = predictor.prep
    if not prep.trained_on_volumes:
        warnings.warn(f"{stem}: the model was trained on 2D images, so the HU window "
                      f"{list(prep.hu_window)} it applies is an assumption ({prep.hu_window_from})",
                      stacklevel=2)
    slices, ornt = volume_slices(img, prep)
    canonical_mask = predictor.masks(slices)  # [Z, H, W], canonical
    mask = to_input_orientation(canonical_mask, ornt, img.shape)
    header = img.header.copy()
    header.set_data_dtype(np.uint8)
    with atomic_path(out_dir / f"{stem}_mask.nii.gz") as tmp:
        tmp.write_bytes(gzip.compress(nib.Nifti1Image(mask, img.affine, header).to_bytes()))
    areas = (canonical_mask > 0).sum(axis=(1, 2))
    best = int(areas.argmax()) if areas.any() else len(slices) // 2
    classes = predictor.classes
    _save_rgb(out_dir / f"{stem}_overlay.png", overlay(slices[best], canonical_mask[best], classes))
    voxel_mm3 = float(np.prod([float(z) for z in header.get_zooms()[:3]]))
    return mask, {"kind": "volume", "shape": "x".join(map(str, mask.shape)),
                  **class_sizes(mask, classes, voxel_mm3),
                  "mask": f"{stem}_mask.nii.gz", "overlay": f"{stem}_overlay.png",
                  "overlay_slice": best}


def predict_volume(predictor: Predictor, path: Path, out_dir: Path) -> dict:
    """A NIfTI volume; the mask in the input's own axes, shape, affine and header."""
    import nibabel as nib

    _, row = segment_volume(predictor, nib.load(str(path)), _stem(path), out_dir)
    return {"input": str(path), **row}


def predict_series(predictor: Predictor, series: dicom.Series, out_dir: Path) -> dict:
    """A DICOM CT series, as a volume; the mask also as a DICOM SEG on the source images."""
    img, datasets = dicom.load_series(series)
    stem = _stem(series)
    mask, row = segment_volume(predictor, img, stem, out_dir)
    with atomic_path(out_dir / f"{stem}_seg.dcm") as tmp:
        dicom.write_seg(tmp, datasets, mask, predictor.classes, predictor.config["model"])
    return {"input": str(series.files[0].parent), **row, "kind": "dicom",
            "series_uid": series.uid, "slices": len(datasets), "seg": f"{stem}_seg.dcm",
            "skipped": "; ".join(series.skipped)}


def _predict_one(predictor: Predictor, item: Path | dicom.Series, out_dir: Path) -> dict:
    if isinstance(item, dicom.Series):
        return predict_series(predictor, item, out_dir)
    return (predict_volume if _is_nifti(item) else predict_image)(predictor, item, out_dir)


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
    rows = [_predict_one(predictor, item, out_dir) for item in files]
    with atomic_path(out_dir / "predictions.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    return {"model": model_ref, "inputs": len(rows), "out": str(out_dir),
            "summary": str(out_dir / "predictions.csv"),
            **{k: sum(r[k] for r in rows) for k in rows[0] if k.endswith("_pixels")}}
