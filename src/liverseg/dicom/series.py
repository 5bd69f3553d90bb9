"""DICOM CT series in: what `liverseg predict` serves and the `dicom` data source trains on.

A folder is recognised as DICOM by content (the `DICM` preamble), not by extension; a
DICOMDIR tree is read as the folder of files it indexes. Files are grouped by series
(SeriesInstanceUID), headers only, and each series' declared size is checked against the
boundary's limits before any pixel is decoded.

A series whose slices are regularly spaced along their normal becomes a volume through
highdicom (HU from RescaleSlope/Intercept, the affine from ImageOrientationPatient,
PixelSpacing and the positions) and follows the NIfTI path exactly. A series that is not
such a grid (a gantry tilt, spacing that varies by design or a missing slice) is read slice
by slice, each slice with its own geometry: the model is 2D, and the SEG references each
source frame, so it needs no grid; such a series gets no NIfTI mask, and its
`Series.irregular` says what the series is ("gantry tilt 15.0 deg", "spacing varies
1.1-7.0 mm").

Per file, never for the whole batch: skipped (localisers, DICOMDIR and other files without
pixels, non-CT modalities) or refused (unreadable header, no SeriesInstanceUID, two images
at one position, orientation or pixel spacing changing within a series, an undecodable
transfer syntax, a size over the limits), each with the file and the rule. Missing Type 2
attributes (birth date, sex, study id, accession number, ...) are written empty in the SEG.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from liverseg.boundary import Limits, Refused

CT_MODALITY = "CT"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its multi-frame kinds, .7.1 - .7.4
# Type 2 attributes of the patient and study modules the SEG copies from its sources:
# anonymised exports often drop them; DICOM allows them empty.
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


class DicomError(Refused):
    """A DICOM input that cannot be served; the message names file and rule."""


@dataclass
class Series:
    uid: str
    files: list[Path]
    number: str | None = None
    study_uid: str = ""
    irregular: str | None = None  # set by `load_series`: why the slices are no grid


@dataclass
class Found:
    """What a set of DICOM files holds: series to predict, and one row per other file."""

    series: list[Series] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, why)
    refused: list[tuple[Path, str]] = field(default_factory=list)


def is_dicom(path: Path) -> bool:
    from pydicom.misc import is_dicom as has_preamble

    return path.is_file() and has_preamble(path)


def _skip_reason(ds) -> str | None:
    if "DirectoryRecordSequence" in ds:  # Media Storage Directory (1.2.840.10008.1.3.10)
        return "DICOMDIR (a media directory; the images it lists are read from the tree)"
    if "PixelData" not in ds and "Rows" not in ds:
        return f"no image (SOP class {ds.get('SOPClassUID', '?')})"
    if "LOCALIZER" in [str(v).upper() for v in ds.get("ImageType", [])]:
        return "localiser (scout) image"
    if ds.get("Modality") != CT_MODALITY:
        return (f"modality {ds.get('Modality')!r}, not CT; the model was trained on CT in "
                "Hounsfield units (rule: modality CT)")
    if str(ds.get("SOPClassUID", "")).startswith(SECONDARY_CAPTURE):
        kind = "/".join(str(v) for v in ds.get("ImageType", [])) or "no ImageType"
        return (f"secondary capture ({kind}; e.g. an export's exam summary page), not a CT "
                "slice (rule: CT Image Storage)")
    missing = [k for k in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing")
               if k not in ds]
    if missing:
        return (f"no {'/'.join(missing)}: not a slice of a volume (rule: a CT slice has "
                "its position, orientation and pixel spacing)")
    return None


def find_series(paths: list[Path], limits: Limits | None = None) -> Found:
    """DICOM files grouped by series, headers only; each other file skipped or refused."""
    import pydicom

    found, series, sizes = Found(), {}, {}
    for path in sorted(paths):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many types for a damaged header
            found.refused.append((path, f"unreadable DICOM header ({type(exc).__name__}: "
                                        f"{exc}) (rule: a readable DICOM file)"))
            continue
        if why := _skip_reason(ds):
            found.skipped.append((path, why))
            continue
        uid = ds.get("SeriesInstanceUID")
        if not uid:
            found.refused.append((path, "no SeriesInstanceUID; cannot tell which series it "
                                        "belongs to (rule: every image names its series)"))
            continue
        number = ds.get("SeriesNumber")
        s = series.setdefault(str(uid), Series(
            str(uid), [], None if number in (None, "") else str(number),
            str(ds.get("StudyInstanceUID", ""))))
        s.files.append(path)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        size = (int(ds.get("Rows", 0)), int(ds.get("Columns", 0)),
                frames, max(1, int(ds.get("BitsAllocated", 16)) // 8))
        sizes.setdefault(s.uid, []).append(size)
    limits = limits or Limits()
    for uid, s in series.items():
        rows = max(r for r, *_ in sizes[uid])
        cols = max(c for _, c, *_ in sizes[uid])
        frames = sum(f for *_, f, _ in sizes[uid])
        try:
            limits.check_volume(f"series {uid} ({s.files[0]})", (rows, cols, frames),
                                max(b for *_, b in sizes[uid]))
        except Refused as exc:
            found.refused += [(f, str(exc)) for f in s.files]
            continue
        found.series.append(s)
    return found


def grid(datasets: list, files: list[Path]) -> tuple[list[int], str | None]:
    """(the slices' order along their normal, None if they form a regular grid, else what
    the series is). Refuses two images at one position (a copy of the series) by name."""
    import highdicom as hd

    row, col = (np.asarray(datasets[0].ImageOrientationPatient[i:i + 3], float) for i in (0, 3))
    normal = np.cross(row, col)
    positions = np.array([np.asarray(d.ImagePositionPatient, float) for d in datasets])
    order = [int(i) for i in np.argsort(positions @ normal)]
    steps = np.diff((positions @ normal)[order])
    if len(steps) and steps.min() < 1e-3:
        i = int(steps.argmin())
        raise DicomError(f"{files[order[i]]} and {files[order[i + 1]]}: two images at one "
                         "position (a copy of the series?) (rule: one image per position)")
    if len(steps) == 0:
        return order, None
    _, volume_order = hd.spatial.get_series_volume_positions(datasets)
    if volume_order is not None:  # highdicom's own test of a regular grid, and its order
        return [volume_order.index(i) for i in range(len(datasets))], None
    stack = positions[order[-1]] - positions[order[0]]
    tilt = np.degrees(np.arccos(min(1.0, abs(stack @ normal) / np.linalg.norm(stack))))
    if tilt > 0.1:
        return order, f"gantry tilt {tilt:.1f} deg: slices stacked at an angle to their normal"
    i = int(steps.argmax())
    return order, (f"spacing varies {steps.min():.1f}-{steps.max():.1f} mm (largest step "
                   f"between {files[order[i]].name} and {files[order[i + 1]].name})")


def _read_pixels(datasets: list, files: list[Path]) -> None:
    """Decode each file's pixels now, so an unsupported compression names its syntax."""
    for ds, path in zip(datasets, files, strict=True):
        try:
            ds.pixel_array  # noqa: B018 -- decodes and caches
        except Exception as exc:  # pydicom raises several types for a missing decoder
            syntax = ds.file_meta.get("TransferSyntaxUID")
            name = getattr(syntax, "name", syntax)
            raise DicomError(f"{path}: pixel data in transfer syntax {name!r} ({syntax}) "
                             f"cannot be decoded here ({exc}); send it uncompressed, RLE, "
                             "JPEG, JPEG-LS or JPEG 2000") from None


def _fill_type2(datasets: list) -> None:
    for ds in datasets:
        for keyword in TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")


def _volume(series: Series, datasets: list):
    import highdicom as hd
    import nibabel as nib

    try:
        volume = hd.get_volume_from_series(datasets, dtype=np.float32)
    except ValueError as exc:  # orientation or spacing differ within the series
        raise DicomError(f"series {series.uid} ({series.files[0].parent}): {exc} "
                         "(rule: one orientation and pixel spacing per series)") from None
    return nib.Nifti1Image(volume.array, volume.get_affine("RAS"))


def load_series(series: Series):
    """(images, datasets in slice order): for a regular series one nibabel image in the
    series' own axes [slice, row, column] with its RAS affine; otherwise one single-slice
    image per dataset, each in its own geometry, and `series.irregular` says why."""
    import pydicom

    datasets = [pydicom.dcmread(p) for p in series.files]
    orientations = {tuple(np.round(np.asarray(d.ImageOrientationPatient, float), 4))
                    for d in datasets}
    if len(orientations) > 1:
        raise DicomError(f"series {series.uid} ({series.files[0].parent}): "
                         f"{len(orientations)} different ImageOrientationPatient values "
                         "(rule: one orientation per series)")
    order, series.irregular = grid(datasets, series.files)
    datasets = [datasets[i] for i in order]
    series.files = [series.files[i] for i in order]
    _read_pixels(datasets, series.files)
    _fill_type2(datasets)
    if series.irregular is None:
        return _volume(series, datasets), datasets
    return [_volume(series, [ds]) for ds in datasets], datasets
