"""DICOM CT series in, DICOM SEG out, for `liverseg predict`.

A folder is recognised as DICOM by content (the `DICM` preamble), not by extension. Its
files are grouped by SeriesInstanceUID; each CT series becomes a volume through highdicom
(slices ordered along the normal by ImagePositionPatient, HU from RescaleSlope/Intercept,
the affine from ImageOrientationPatient, PixelSpacing and the slice positions, regular
spacing checked) and then follows the NIfTI path exactly (`liverseg.preprocess`: canonical
orientation, the model's HU window, back to the series' own geometry). The mask goes back
as a DICOM SEG (highdicom) referencing the source instances, one segment per class.

Refused, naming the file and the rule: a DICOM image without a SeriesInstanceUID, a
non-CT modality, a gap in the slice positions, inconsistent orientation or pixel spacing,
pixel data in a transfer syntax no installed decoder reads. Skipped and named in
`predictions.csv`: localiser (scout) images and DICOM files without pixel data (DICOMDIR,
reports). A single CT slice is a volume of one slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CT_MODALITY = "CT"


class DicomError(ValueError):
    """A DICOM input that cannot become a correct volume; the message names file and rule."""


@dataclass
class Series:
    uid: str
    files: list[Path]
    skipped: list[str] = field(default_factory=list)  # "file: why"
    number: int | None = None


def is_dicom(path: Path) -> bool:
    from pydicom.misc import is_dicom as has_preamble

    return path.is_file() and has_preamble(path)


def find_series(paths: list[Path]) -> list[Series]:
    """DICOM files grouped by series (headers only); scouts and non-images are skipped and
    named, anything else that cannot be one CT volume raises `DicomError`."""
    import pydicom

    series: dict[str, Series] = {}
    skipped = []
    for path in sorted(paths):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if "PixelData" not in ds and "Rows" not in ds:
            skipped.append(f"{path}: no image (SOP class {ds.get('SOPClassUID', '?')})")
            continue
        if "LOCALIZER" in [str(v).upper() for v in ds.get("ImageType", [])]:
            skipped.append(f"{path}: localiser (scout) image")
            continue
        uid = ds.get("SeriesInstanceUID")
        if not uid:
            raise DicomError(f"{path}: no SeriesInstanceUID; cannot tell which series it "
                             "belongs to (rule: every image names its series)")
        if ds.get("Modality") != CT_MODALITY:
            raise DicomError(f"{path}: modality {ds.get('Modality')!r}, not CT; the model "
                             "was trained on CT in Hounsfield units (rule: modality CT)")
        found = series.setdefault(str(uid), Series(str(uid), [], number=ds.get("SeriesNumber")))
        found.files.append(path)
    for s in series.values():
        s.skipped = skipped
    if not series:
        raise DicomError(f"no CT image among {len(paths)} DICOM file(s): " + "; ".join(skipped))
    return list(series.values())


def _check_gaps(datasets: list, files: list[Path]) -> None:
    """Name the two files around a missing or repeated slice (highdicom only says 'not
    regular')."""
    row, col = (np.asarray(datasets[0].ImageOrientationPatient[i:i + 3], float) for i in (0, 3))
    normal = np.cross(row, col)
    along = np.array([np.dot(normal, np.asarray(d.ImagePositionPatient, float)) for d in datasets])
    order = np.argsort(along)
    steps = np.diff(along[order])
    if len(steps) and steps.min() < 1e-3:
        i = int(steps.argmin())
        raise DicomError(f"{files[order[i]]} and {files[order[i + 1]]}: two images at one "
                         "position (a copy of the series?) (rule: one image per position)")
    if len(steps) > 1 and steps.max() > 1.5 * np.median(steps):
        i = int(steps.argmax())
        raise DicomError(f"{files[order[i]]} and {files[order[i + 1]]}: {steps[i]:.2f} mm "
                         f"apart where slices are {np.median(steps):.2f} mm apart; a slice "
                         "is missing (rule: regularly spaced slices)")


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


def load_series(series: Series):
    """(nibabel image in the series' own axes [slice, row, column] with its RAS affine,
    the datasets in that slice order)."""
    import highdicom as hd
    import nibabel as nib
    import pydicom

    datasets = [pydicom.dcmread(p) for p in series.files]
    if len(datasets) > 1:
        _check_gaps(datasets, series.files)
        try:
            _, positions = hd.spatial.get_series_volume_positions(datasets)
        except ValueError as exc:
            raise DicomError(f"series {series.uid} ({series.files[0].parent}): {exc}") from None
        if positions is None:
            raise DicomError(f"series {series.uid} ({series.files[0].parent}): slices do not "
                             "form one volume (positions not along one normal, or repeated)")
        datasets = [datasets[positions.index(i)] for i in range(len(datasets))]
        series.files = [series.files[positions.index(i)] for i in range(len(series.files))]
    _read_pixels(datasets, series.files)
    try:
        volume = hd.get_volume_from_series(datasets, dtype=np.float32)
    except ValueError as exc:  # orientation or spacing differ within the series
        raise DicomError(f"series {series.uid} ({series.files[0].parent}): {exc} "
                         "(rule: one orientation and pixel spacing per series)") from None
    return nib.Nifti1Image(volume.array, volume.get_affine("RAS")), datasets


def write_seg(path: Path, datasets: list, mask: np.ndarray, classes: tuple[str, ...],
              model_name: str) -> None:
    """A DICOM SEG of `mask` [slices, rows, columns] (class indices, slices in the order of
    `datasets`): one segment per foreground class, coded in SNOMED CT."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    import liverseg

    concepts = {"liver": (codes.SCT.AnatomicalStructure, codes.SCT.Liver),
                "tumour": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm)}
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"liverseg {model_name}", version=liverseg.__version__,
        family=codes.cid7162.ArtificialIntelligence)
    segments = [hd.seg.SegmentDescription(
        segment_number=k, segment_label=name, segmented_property_category=concepts[name][0],
        segmented_property_type=concepts[name][1], algorithm_identification=algorithm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC)
        for k, name in enumerate(classes[1:], start=1)]
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=999,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="liverseg",
        manufacturer_model_name=model_name, software_versions=liverseg.__version__,
        device_serial_number="none", series_description=f"liverseg {model_name}")
    seg.save_as(path)
