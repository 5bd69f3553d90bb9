"""`nifti`: CT volumes and label volumes, sliced along the last axis.

Naming: LiTS (`volume-N.nii[.gz]` + `segmentation-N.nii[.gz]`, patient `N`) or the Medical
Segmentation Decathlon (`imagesTr/X.nii.gz` + `labelsTr/X.nii.gz`, patient `X`). Labels:
0 background, 1 liver, 2 tumour. Intensities are windowed in HU (`data.nifti.window`).
A volume whose label volume has another shape, or that cannot be read, becomes one index
row naming both files (quarantined by validate), not a crash.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from liverseg import labels as label_schema
from liverseg.config import DataParams
from liverseg.data import imageio
from liverseg.data.layout import SliceWriter, slice_id
from liverseg.data.sources.folder import SourceError

ORGAN_LABELS = {"organ": [1, 2], "tumour": [2]}
NII = re.compile(r"^(?P<stem>.+)\.nii(\.gz)?$", re.IGNORECASE)


def find_pairs(root: Path) -> list[tuple[str, Path, Path | None]]:
    """(patient id, volume, label volume or None) for LiTS and MSD naming."""
    pairs = []
    for vol in sorted(root.rglob("volume-*.nii*")):
        pid = NII.match(vol.name)["stem"].removeprefix("volume-")
        labels = [p for p in vol.parent.glob(f"segmentation-{pid}.nii*") if NII.match(p.name)]
        pairs.append((pid, vol, labels[0] if labels else None))
    for images in sorted(p for p in root.rglob("imagesTr") if p.is_dir()):
        for vol in sorted(images.glob("*.nii*")):
            if vol.name.startswith("._") or not NII.match(vol.name):  # macOS resource forks
                continue
            stem = NII.match(vol.name)["stem"]
            label = images.parent / "labelsTr" / vol.name
            pairs.append((stem, vol, label if label.is_file() else None))
    return pairs


def _load(path: Path) -> np.ndarray:
    import nibabel as nib  # lazy: only this source needs it

    try:
        return np.asanyarray(nib.load(path).dataobj)
    except Exception as exc:  # nibabel raises many types for a bad file
        raise imageio.DecodeError(f"{path}: not a readable NIfTI volume: {exc}") from None


def select_slices(labels: np.ndarray, mode: str, empty_fraction: float,
                  rng: np.random.Generator) -> list[int]:
    """Slice indices: all, or those containing the organ/tumour plus some of the rest."""
    n = labels.shape[-1]
    if mode == "all":
        return list(range(n))
    hit = np.isin(labels, ORGAN_LABELS[mode]).any(axis=(0, 1))
    others = np.flatnonzero(~hit)
    keep = rng.choice(others, size=round(empty_fraction * len(others)), replace=False)
    return sorted(set(np.flatnonzero(hit).tolist()) | set(keep.tolist()))


def _reject(writer: SliceWriter, pid: str, vol: Path, label: Path | None, **facts) -> None:
    writer.add(slice_id(pid, 0), pid, -1, None, None, source_image=str(vol),
               source_mask=str(label or ""), **facts)


def ingest(data: DataParams, seed: int, writer: SliceWriter) -> dict:
    root, cfg = Path(data.path).expanduser(), data.nifti
    if not root.is_dir():
        raise SourceError(f"{root}: data.path is not a folder (data.source=nifti)")
    pairs = find_pairs(root)
    if not pairs:
        raise SourceError(f"{root}: empty source, no LiTS volume-N.nii[.gz] or MSD "
                          "imagesTr/*.nii[.gz] volumes")
    rng = np.random.default_rng(seed)
    volumes = 0
    for pid, vol, label in pairs:
        if label is None:
            _reject(writer, pid, vol, None, paired=False,
                    ingest_detail=f"pairing complete: {vol} has no label volume")
            continue
        try:
            image, labels = _load(vol), _load(label)
        except imageio.DecodeError as exc:
            _reject(writer, pid, vol, label, image_decodable=False,
                    ingest_detail=f"image decodable: {exc}")
            continue
        if image.shape != labels.shape or image.ndim != 3:
            _reject(writer, pid, vol, label, paired=False, ingest_detail=(
                f"image and mask sizes match: {vol} is {image.shape} but {label} is "
                f"{labels.shape}"))
            continue
        volumes += 1
        for k in select_slices(labels, cfg.slices, cfg.empty_fraction, rng):
            # Transposed so rows run along the volume's second axis (the usual display).
            sl, lab = image[:, :, k].T, labels[:, :, k].T
            writer.add(slice_id(pid, k), pid, k, imageio.rescale(sl, cfg.window),
                       label_schema.from_volume_labels(lab, data.target), source_image=f"{vol}#{k}",
                       source_mask=f"{label}#{k}", channels=1, dtype=str(image.dtype),
                       source_mask_values=imageio.compact_values(lab))
    return {"volumes": volumes}
