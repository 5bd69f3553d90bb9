"""Label objects on a CT series, written by three independent writers, for the label reader's
tests and the `dicom` source's: DICOM SEG by highdicom (BINARY, FRACTIONAL, LABELMAP) and by
dcmqi's `itkimage2segimage` (3D Slicer's SEG writer), RTSTRUCT by rt-utils; plus the label
volume's voxels on the series' frames, derived from DICOM geometry alone (each pixel's
patient position through the label NIfTI's affine), so no writer's convention is assumed.

Segments follow clinical practice: the liver segment/ROI is the whole organ, tumour included
(the reader's overlap rule, tumour over liver, gives the LiTS labels back).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.uid import generate_uid

LIVER_CODE = ("SCT", "10200004", "Liver")
NEOPLASM_CODE = ("SCT", "108369006", "Neoplasm")
BONE_CODE = ("SCT", "272673000", "Bone")
_CATEGORY = {"10200004": ("SCT", "91723000", "Anatomical Structure"),
             "272673000": ("SCT", "91723000", "Anatomical Structure")}
_ABNORMAL = ("SCT", "49755003", "Morphologically Abnormal Structure")


def label_on_frames(label_nifti: Path, datasets: list) -> np.ndarray:
    """uint8 [len(datasets), rows, columns]: the label volume's voxel at each pixel's centre
    (nearest voxel), from the pixel's patient position (LPS) through the NIfTI affine (RAS)."""
    img = nib.load(str(label_nifti))
    data = np.asarray(img.dataobj)
    inverse = np.linalg.inv(img.affine)
    out = []
    for ds in datasets:
        rows, cols = int(ds.Rows), int(ds.Columns)
        origin = np.asarray(ds.ImagePositionPatient, float)
        iop = np.asarray(ds.ImageOrientationPatient, float)
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        r, c = np.mgrid[:rows, :cols]
        lps = (origin + c[..., None] * col_spacing * iop[:3]
               + r[..., None] * row_spacing * iop[3:])
        ras = lps * [-1, -1, 1]
        ijk = np.rint(ras @ inverse[:3, :3].T + inverse[:3, 3]).astype(int)
        out.append(data[ijk[..., 0], ijk[..., 1], ijk[..., 2]])
    return np.asarray(out, np.uint8)


def _code(code):
    import highdicom as hd

    return hd.sr.CodedConcept(value=code[1], scheme_designator=code[0], meaning=code[2])


def default_segments(labels: np.ndarray) -> list[tuple[str, tuple, np.ndarray]]:
    """(name, SNOMED CT code, mask): the whole liver (tumour inside it) and the tumour."""
    return [("Liver", LIVER_CODE, labels >= 1), ("Tumour", NEOPLASM_CODE, labels == 2)]


def write_seg_highdicom(datasets: list, labels: np.ndarray, path: Path, kind: str = "BINARY",
                        algorithm: str = "MANUAL", manufacturer: str = "Acme Viewer",
                        model_name: str = "Contour 3", content_creator: str = "Doe^Jane",
                        content_time: tuple[str, str] = ("20260102", "101500"),
                        segments: list | None = None, description: str = "Liver (manual)",
                        seed: int = 0) -> Path:
    """A SEG of `labels` [len(datasets), rows, columns] (LiTS values, frame i on
    datasets[i]) as highdicom writes it. BINARY: one binary segment per entry of `segments`
    (default: liver incl. tumour, tumour; overlapping). FRACTIONAL (probability): each
    segment's pixels get a fraction >= 0.5, the others < 0.5 (random, so a reader that
    ignores its threshold fails). LABELMAP: one label-map frame per instance (no overlap:
    liver is LiTS 1 there, tumour 2)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    segments = segments if segments is not None else default_segments(labels)
    descriptions = []
    for number, (name, code, _) in enumerate(segments, start=1):
        extra = {}
        if algorithm == "AUTOMATIC":
            extra["algorithm_identification"] = hd.AlgorithmIdentificationSequence(
                name=f"{manufacturer} {model_name}", version="1.0",
                family=codes.cid7162.ArtificialIntelligence)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name,
            segmented_property_category=_code(_CATEGORY.get(code[1], _ABNORMAL)),
            segmented_property_type=_code(code),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues[algorithm], **extra))
    masks = np.stack([m for *_, m in segments], axis=-1)
    if kind == "LABELMAP":
        pixels = np.zeros(labels.shape, np.uint8)
        for number in range(masks.shape[-1]):
            pixels[masks[..., number]] = number + 1  # later segments over earlier ones
    elif kind == "FRACTIONAL":
        rng = np.random.default_rng(seed)
        u = rng.random(masks.shape)
        pixels = np.where(masks, 0.5 + 0.5 * u, 0.49 * u).astype(np.float32)
    else:
        pixels = masks.astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=pixels, segmentation_type=kind,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(),
        series_number=300, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer=manufacturer, manufacturer_model_name=model_name,
        software_versions="1.0", device_serial_number="42",
        content_creator_name=content_creator, series_description=description)
    seg.ContentDate, seg.ContentTime = content_time
    seg.save_as(path)
    return path


def write_seg_dcmqi(series_dir: Path, label_nifti: Path, path: Path,
                    algorithm: str = "MANUAL") -> Path:
    """A SEG of the label NIfTI (LiTS values 1 liver, 2 tumour) on the series in
    `series_dir`, written by dcmqi's itkimage2segimage (one segment per label value)."""
    keys = ("CodingSchemeDesignator", "CodeValue", "CodeMeaning")

    def attributes(label_id, name, code, category, rgb):
        return {"labelID": label_id, "SegmentDescription": name, "SegmentLabel": name,
                "SegmentAlgorithmType": algorithm, "recommendedDisplayRGBValue": rgb,
                "SegmentedPropertyCategoryCodeSequence": dict(zip(keys, category, strict=True)),
                "SegmentedPropertyTypeCodeSequence": dict(zip(keys, code, strict=True))}

    meta = {"ContentCreatorName": "Roe^Rick", "ClinicalTrialSeriesID": "1",
            "ClinicalTrialTimePointID": "1", "ClinicalTrialCoordinatingCenterName": "liverseg",
            "SeriesDescription": "Liver (Slicer)", "SeriesNumber": "301",
            "InstanceNumber": "1", "BodyPartExamined": "LIVER",
            "segmentAttributes": [[
                attributes(1, "Liver", LIVER_CODE, _CATEGORY[LIVER_CODE[1]], [221, 130, 101]),
                attributes(2, "Tumour", NEOPLASM_CODE, _ABNORMAL, [144, 238, 144])]],
            "ContentLabel": "SEGMENTATION", "ContentDescription": "dcmqi test SEG"}
    meta_path = path.with_suffix(".json")
    meta_path.write_text(json.dumps(meta))
    # the venv's bin/ holds dcmqi's tools: found there also when it is not on PATH
    tool = shutil.which("itkimage2segimage") or str(Path(sys.executable).parent /
                                                    "itkimage2segimage")
    subprocess.run([tool, "--inputImageList", str(label_nifti),
                    "--inputDICOMDirectory", str(series_dir), "--outputDICOM", str(path),
                    "--inputMetadata", str(meta_path)], check=True, capture_output=True)
    return path


def write_rtstruct(series_dir: Path, datasets: list, labels: np.ndarray, path: Path,
                   generation_algorithm: str = "MANUAL",
                   names: tuple[str, str] = ("Liver", "Tumour")) -> Path:
    """An RTSTRUCT of `labels` (frame i on datasets[i]) on the series in `series_dir`, as
    rt-utils writes it: ROI `names[0]` the whole liver (tumour inside), `names[1]` the
    tumour, each slice's mask traced by OpenCV into CLOSED_PLANAR contours that reference
    their frame. `generation_algorithm` "" leaves ROIGenerationAlgorithm empty."""
    from rt_utils import RTStructBuilder

    with contextlib.redirect_stdout(io.StringIO()):  # rt-utils prints as it goes
        rt = RTStructBuilder.create_new(dicom_series_path=str(series_dir))
        index = {str(d.SOPInstanceUID): i for i, d in enumerate(datasets)}
        order = [index[str(d.SOPInstanceUID)] for d in rt.series_data]
        ordered = labels[order].transpose(1, 2, 0)  # rt-utils: [rows, columns, its slices]
        for name, mask in zip(names, (ordered >= 1, ordered == 2), strict=True):
            rt.add_roi(mask=mask, name=name, roi_generation_algorithm=generation_algorithm)
        rt.ds.SeriesDescription = "RT structures"
        rt.save(str(path))
    return path


def edit_rtstruct(src: Path, dst: Path, roi: str, contours: str = "keep",
                  shift_mm: float = 0.0, drop_references: bool = False) -> Path:
    """A copy of an RTSTRUCT with one ROI's contours changed: `contours` "keep", "point"
    (one POINT contour instead) or "none" (no ContourSequence); `shift_mm` moves every
    contour of it along the slice normal (z); `drop_references` removes the contours'
    ContourImageSequence, so a reader must place them by their plane."""
    ds = pydicom.dcmread(src)
    number = next(int(r.ROINumber) for r in ds.StructureSetROISequence if r.ROIName == roi)
    item = next(c for c in ds.ROIContourSequence if int(c.ReferencedROINumber) == number)
    if contours == "none":
        del item.ContourSequence
    elif contours == "point":
        first = item.ContourSequence[0]
        first.ContourGeometricType, first.NumberOfContourPoints = "POINT", 1
        first.ContourData = list(first.ContourData[:3])
        item.ContourSequence = [first]
    for contour in item.get("ContourSequence", []):
        if shift_mm:
            data = np.asarray(contour.ContourData, float).reshape(-1, 3)
            data[:, 2] += shift_mm
            contour.ContourData = [round(float(v), 4) for v in data.ravel()]
        if drop_references and "ContourImageSequence" in contour:
            del contour.ContourImageSequence
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(dst)
    return dst


def downsampled(datasets: list, factor: int = 2) -> list:
    """Copies of the series' datasets resampled to 1/factor the rows and columns (same SOP
    instance UIDs, positions at the new first pixel centre): a label drawn on a resampled
    copy of the series, whose grid is not the series'."""
    out = []
    for ds in datasets:
        ds = copy.deepcopy(ds)
        iop = np.asarray(ds.ImageOrientationPatient, float)
        spacing = np.asarray(ds.PixelSpacing, float)
        shift = (factor - 1) / 2 * (spacing[1] * iop[:3] + spacing[0] * iop[3:])
        ds.ImagePositionPatient = [round(float(v), 4)
                                   for v in np.asarray(ds.ImagePositionPatient, float) + shift]
        pixels = ds.pixel_array[::factor, ::factor].copy()
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelSpacing = [float(v) * factor for v in spacing]
        ds.PixelData = pixels.tobytes()
        out.append(ds)
    return out
