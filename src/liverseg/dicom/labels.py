"""Labels in: DICOM SEG and RTSTRUCT objects read onto the frames of the CT series they label,
as LiTS class values (0 background, 1 liver, 2 tumour), with the facts that say who made them.

Two steps, so a caller can sort and choose labels before any pixel is decoded:
- `describe(path)` reads one label object's header: its kind, its own UIDs and the series it
  labels, its segments (SEG) or ROIs (RTSTRUCT) with each one's coded concept, name,
  algorithm type and the liverseg class it maps to, its creator facts and its time.
- `read_labels(label, datasets)` rasterises it onto the series' datasets (in the order
  `liverseg.dicom.series.load_series` returns them): frame i of the result lies on
  `datasets[i]`.

**Class mapping** (`ClassMapping`): a segment's coded concept first (SegmentedPropertyType of a
SEG segment, RTROIIdentificationCode of an RTSTRUCT ROI where present: SNOMED CT Liver ->
liver; Neoplasm, Neoplasm of liver, Mass, Lesion, Hepatocellular carcinoma, metastatic or
secondary neoplasm -> tumour; also their legacy SNOMED RT codes), then its name (SegmentLabel,
ROIName) against configurable name lists, compared case-insensitively with `_`, `-` and runs
of blanks read as one blank. `liverseg predict`'s SEGs (seg_writer) carry SCT Liver and
Neoplasm, so they map by code.

**Rules** (each broken one is a `LabelError` naming the file, the segment or ROI, and the rule;
never an empty mask):
- segments that map to no class are ignored only when at least one segment maps;
- overlap: tumour over liver (a pixel in a liver and a tumour segment is tumour, 2);
- SEG: every frame references source instances of the series (a frame on an instance that is
  not among `datasets` is an error); its Rows x Columns are the series'; each frame's pixel
  grid is that of the frame it references (same plane and pixel positions within a tenth of
  a pixel; rows and columns may be flipped or swapped, as dcmqi writes a SEG from a NIfTI
  whose axes differ from the series', and are put back); a source instance that the SEG has
  no frame for is background (writers omit empty frames);
  BINARY and LABELMAP are read as stored; FRACTIONAL (probability or occupancy) counts a
  pixel in a segment when its fraction is >= `fractional_threshold` (default 0.5);
- RTSTRUCT: a mapped ROI has at least one CLOSED_PLANAR contour (an ROI with no contour data
  or only POINT/OPEN contours is an error); each contour lies on a frame: the one its
  ContourImageSequence references (that instance must be in the series), else the frame
  whose plane it lies in; "lies in" means its distance along the frame normal is under half
  the spacing to the neighbouring frame; a contour on no frame, or wholly outside its
  frame's rows and columns, is an error.

**RTSTRUCT rasterisation** is done here, from pydicom, not by rt-utils: rt-utils
(`RTStructBuilder.create_from(...).get_roi_mask_by_name`) builds one pixel<->patient matrix
from the first slice and the mean slice spacing, so it cannot read a gantry-tilted or
irregularly spaced series (which `load_series` hands over slice by slice), swaps row and
column spacing, needs ContourImageSequence and reads the whole folder itself; its wheel also
requires the GUI `opencv-python`, which clashes with this project's headless cv2. Each
contour here goes through its own frame's ImagePositionPatient, ImageOrientationPatient and
PixelSpacing to pixel coordinates (column along the first orientation vector over
PixelSpacing[1], row along the second over PixelSpacing[0]), and a pixel belongs to the ROI
when its centre lies inside the frame's contours of that ROI (even-odd: a contour inside
another is a hole, as DICOM's inner contours and CLOSEDPLANAR_XOR are) or on a contour line
(within 0.05 pixel: contours traced through boundary pixel centres, as rt-utils and OpenCV
trace a mask, give that mask back; a one- or two-point contour is the pixels it passes).
The tests write RTSTRUCTs with rt-utils, an independent writer.

**Origin**: `LabelObject.algorithm` is "model" for a SEG written by liverseg (Manufacturer
"liverseg", what seg_writer writes) or when every mapped segment/ROI says AUTOMATIC; "human"
when every mapped one says SEMIAUTOMATIC or MANUAL; "unknown" otherwise (a mix, or nothing
said, e.g. an empty ROIGenerationAlgorithm). **Time** (`LabelObject.time`, sortable
"YYYYMMDDHHMMSS.ffffff"): ContentDate/ContentTime, else (RTSTRUCT) StructureSetDate/Time, else
InstanceCreationDate/Time, else SeriesDate/Time; `time_from` names which, "" when none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SEG_CLASSES = {"1.2.840.10008.5.1.4.1.1.66.4": "SEG",   # Segmentation Storage
               "1.2.840.10008.5.1.4.1.1.66.7": "SEG",   # Label Map Segmentation Storage
               "1.2.840.10008.5.1.4.1.1.481.3": "RTSTRUCT"}  # RT Structure Set Storage
LIVER, TUMOUR = 1, 2
CLASS_NAMES = {LIVER: "liver", TUMOUR: "tumour"}
HUMAN_ALGORITHMS = ("SEMIAUTOMATIC", "MANUAL")
ON_LINE_PX = 0.05  # a pixel centre this close to a contour line is on it
PLANE_TOLERANCE_PX = 0.1  # SEG frame position against its source frame, in pixels
_CHUNK = 32  # source instances decoded per call to highdicom (memory flat in the series)

# (coding scheme, code value) -> class. SCT: SNOMED CT; SRT: its legacy SNOMED RT codes,
# which older SEGs (dcmqi's examples, early Slicer) still carry.
DEFAULT_CODES: dict[tuple[str, str], int] = {
    ("SCT", "10200004"): LIVER, ("SRT", "T-62000"): LIVER,            # Liver
    ("SCT", "108369006"): TUMOUR, ("SRT", "M-80003"): TUMOUR,         # Neoplasm
    ("SCT", "126851005"): TUMOUR,                                     # Neoplasm of liver
    ("SCT", "4147007"): TUMOUR, ("SRT", "M-03000"): TUMOUR,           # Mass
    ("SCT", "52988006"): TUMOUR,                                      # Lesion
    ("SCT", "25370001"): TUMOUR,                                      # Hepatocellular carcinoma
    ("SCT", "14799000"): TUMOUR,                                      # Neoplasm, metastatic
    ("SCT", "94381002"): TUMOUR,                          # Secondary malignant neoplasm of liver
}
DEFAULT_NAMES = {
    "liver": ("liver",),
    "tumour": ("tumour", "tumor", "lesion", "liver tumor", "liver tumour", "neoplasm", "mass",
               "hcc", "metastasis"),
}


class LabelError(ValueError):
    """A label object that cannot be read as liverseg classes; the message names the file,
    the segment or ROI, and the rule broken."""


def _norm(name: str) -> str:
    return " ".join(re.sub(r"[_\-]+", " ", str(name)).split()).casefold()


@dataclass(frozen=True)
class ClassMapping:
    """Segment/ROI -> liverseg class: coded concept first, then name (case-insensitive)."""

    liver: tuple[str, ...] = DEFAULT_NAMES["liver"]
    tumour: tuple[str, ...] = DEFAULT_NAMES["tumour"]
    codes: dict[tuple[str, str], int] = field(default_factory=lambda: dict(DEFAULT_CODES))

    @classmethod
    def from_dict(cls, names: dict | None = None, defaults: bool = True) -> ClassMapping:
        """From `{"liver": [...], "tumour": [...]}` (the config's form): names added to the
        default lists (or replacing them, `defaults=False`). Unknown keys are refused."""
        names = dict(names or {})
        unknown = sorted(set(names) - set(DEFAULT_NAMES))
        if unknown:
            raise ValueError(f"class mapping: unknown class {unknown[0]!r}; the classes are "
                             f"{sorted(DEFAULT_NAMES)}")
        out = {}
        for key, base in DEFAULT_NAMES.items():
            extra = names.get(key) or []
            if isinstance(extra, str) or not all(isinstance(n, str) for n in extra):
                raise ValueError(f"class mapping: {key} must be a list of names, got {extra!r}")
            out[key] = tuple(dict.fromkeys((base if defaults else ()) + tuple(extra)))
        return cls(**out)

    def target(self, name: str, code: tuple[str, str, str] | None) -> int | None:
        if code is not None and (code[0], code[1]) in self.codes:
            return self.codes[(code[0], code[1])]
        key = _norm(name)
        if key in {_norm(n) for n in self.tumour}:
            return TUMOUR
        if key in {_norm(n) for n in self.liver}:
            return LIVER
        return None


@dataclass
class Segment:
    number: int
    name: str
    code: tuple[str, str, str] | None  # (scheme, value, meaning)
    algorithm: str  # AUTOMATIC / SEMIAUTOMATIC / MANUAL / "" (not said)
    target: int | None  # 1 liver, 2 tumour, None unmapped
    word: str = "segment"  # "segment" (SEG) or "ROI" (RTSTRUCT), for messages

    def __str__(self) -> str:
        return f"{self.word} {self.number} {self.name!r}"


@dataclass
class LabelObject:
    """One SEG or RTSTRUCT instance, from its header only."""

    path: Path
    kind: str  # "SEG" | "RTSTRUCT"
    sop_uid: str
    study_uid: str
    series_uid: str
    patient_id: str
    referenced_series_uid: str
    segments: list[Segment]
    facts: dict
    time: str
    time_from: str
    by_liverseg: bool
    frame_of_reference_uid: str = ""

    @property
    def mapped(self) -> list[Segment]:
        return [s for s in self.segments if s.target is not None]

    @property
    def algorithm(self) -> str:
        """"model", "human" or "unknown" (module docstring)."""
        mapped = self.mapped
        if self.by_liverseg or (mapped and all(s.algorithm == "AUTOMATIC" for s in mapped)):
            return "model"
        if mapped and all(s.algorithm in HUMAN_ALGORITHMS for s in mapped):
            return "human"
        return "unknown"

    def _what(self, segments: list[Segment] | None = None) -> str:
        segments = self.segments if segments is None else segments
        word = "segment" if self.kind == "SEG" else "ROI"
        listed = ", ".join(f"{s.number} {s.name!r}" for s in segments) or "none"
        return f"{self.path}: {word}{'s' if len(segments) != 1 else ''} {listed}"


def is_label(ds) -> bool:
    """A SEG (binary/fractional or label map) or an RTSTRUCT, by SOP class (by Modality where
    the SOP class is missing). A surface segmentation (Modality SEG too) is not."""
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if sop_class:
        return sop_class in SEG_CLASSES
    return ds.get("Modality") in ("SEG", "RTSTRUCT")


def _s(ds, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _code(item, keyword: str) -> tuple[str, str, str] | None:
    seq = item.get(keyword)
    if not seq:
        return None
    c = seq[0]
    value = _s(c, "CodeValue") or _s(c, "LongCodeValue") or _s(c, "URNCodeValue")
    return (_s(c, "CodingSchemeDesignator"), value, _s(c, "CodeMeaning")) if value else None


def _stamp(date: str, time: str) -> str:
    digits = re.sub(r"[^0-9.]", "", time)
    whole, _, frac = digits.partition(".")
    return f"{date[:8]}{whole[:6].ljust(6, '0')}.{frac[:6].ljust(6, '0')}"


def _time(ds, kind: str) -> tuple[str, str]:
    pairs = [("ContentDate", "ContentTime")]
    if kind == "RTSTRUCT":
        pairs.append(("StructureSetDate", "StructureSetTime"))
    pairs += [("InstanceCreationDate", "InstanceCreationTime"), ("SeriesDate", "SeriesTime")]
    for date_key, time_key in pairs:
        date = _s(ds, date_key)
        if re.fullmatch(r"\d{8}", date):
            return _stamp(date, _s(ds, time_key)), f"{date_key}/{time_key}"
    return "", ""


def _seg_segments(ds, mapping: ClassMapping) -> list[Segment]:
    out = []
    for item in ds.get("SegmentSequence", []):
        name = _s(item, "SegmentLabel") or _s(item, "SegmentDescription")
        code = _code(item, "SegmentedPropertyTypeCodeSequence")
        out.append(Segment(int(item.SegmentNumber), name, code,
                           _s(item, "SegmentAlgorithmType").upper(),
                           mapping.target(name, code)))
    return out


def _rt_segments(ds, mapping: ClassMapping) -> list[Segment]:
    codes = {}
    for obs in ds.get("RTROIObservationsSequence", []):
        if "ReferencedROINumber" in obs:
            codes[int(obs.ReferencedROINumber)] = _code(obs, "RTROIIdentificationCodeSequence")
    out = []
    for item in ds.get("StructureSetROISequence", []):
        number, name = int(item.ROINumber), _s(item, "ROIName")
        code = codes.get(number)
        out.append(Segment(number, name, code, _s(item, "ROIGenerationAlgorithm").upper(),
                           mapping.target(name, code), "ROI"))
    return out


def _rt_referenced_series(ds) -> tuple[str, str]:
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                if _s(series, "SeriesInstanceUID"):
                    return _s(series, "SeriesInstanceUID"), _s(frame, "FrameOfReferenceUID")
    return "", ""


def describe(path: Path, mapping: ClassMapping | None = None) -> LabelObject:
    """The label object at `path`, from its header only (no pixel is decoded)."""
    import pydicom

    path = Path(path)
    mapping = mapping or ClassMapping()
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types for a damaged header
        raise LabelError(f"{path}: unreadable DICOM header ({type(exc).__name__}: {exc}) "
                         "(rule: a readable DICOM file)") from None
    if not is_label(ds):
        raise LabelError(f"{path}: SOP class {ds.get('SOPClassUID', '?')} (Modality "
                         f"{ds.get('Modality', '?')!r}) is not a DICOM SEG or RTSTRUCT "
                         "(rule: a label is a Segmentation or an RT Structure Set)")
    kind = SEG_CLASSES.get(str(ds.get("SOPClassUID", "")), ds.get("Modality"))
    if kind == "SEG":
        segments = _seg_segments(ds, mapping)
        refs = ds.get("ReferencedSeriesSequence", [])
        referenced = _s(refs[0], "SeriesInstanceUID") if refs else ""
        frame_uid = _s(ds, "FrameOfReferenceUID")
        algorithms = ",".join(dict.fromkeys(s.algorithm for s in segments if s.algorithm))
        facts = {"SegmentationType": _s(ds, "SegmentationType"),
                 "SegmentationFractionalType": _s(ds, "SegmentationFractionalType"),
                 "SegmentAlgorithmType": algorithms}
    else:
        segments = _rt_segments(ds, mapping)
        referenced, frame_uid = _rt_referenced_series(ds)
        algorithms = ",".join(dict.fromkeys(s.algorithm for s in segments if s.algorithm))
        facts = {"StructureSetLabel": _s(ds, "StructureSetLabel"),
                 "ROIGenerationAlgorithm": algorithms}
    if not referenced:
        where = ("ReferencedSeriesSequence" if kind == "SEG" else
                 "ReferencedFrameOfReferenceSequence/RTReferencedStudySequence/"
                 "RTReferencedSeriesSequence")
        raise LabelError(f"{path}: {kind} names no referenced series ({where} is missing or "
                         "empty) (rule: a label names the CT series it labels)")
    for keyword in ("Manufacturer", "ManufacturerModelName", "SoftwareVersions",
                    "ContentCreatorName", "ContentLabel", "ContentDescription",
                    "SeriesDescription", "InstitutionName", "OperatorsName"):
        facts[keyword] = _s(ds, keyword)
    time, time_from = _time(ds, kind)
    return LabelObject(
        path=path, kind=kind, sop_uid=_s(ds, "SOPInstanceUID"),
        study_uid=_s(ds, "StudyInstanceUID"), series_uid=_s(ds, "SeriesInstanceUID"),
        patient_id=_s(ds, "PatientID"), referenced_series_uid=referenced, segments=segments,
        facts=facts, time=time, time_from=time_from,
        by_liverseg=facts["Manufacturer"] == "liverseg", frame_of_reference_uid=frame_uid)


def read_labels(label: LabelObject, datasets: list,
                fractional_threshold: float = 0.5) -> np.ndarray:
    """uint8 [len(datasets), rows, columns]: 0 background, 1 liver, 2 tumour; frame i lies on
    `datasets[i]`. FRACTIONAL SEG pixels count when their fraction is >= the threshold."""
    if not datasets:
        raise LabelError(f"{label._what()}: no CT frames to read the label onto "
                         "(rule: a label is read onto its series)")
    if not 0.0 < fractional_threshold <= 1.0:
        raise ValueError(f"fractional_threshold {fractional_threshold} is not in (0, 1]")
    mapped = label.mapped
    if not mapped:
        raise LabelError(
            f"{label._what()}: none maps to liver or tumour by coded concept or name "
            "(rule: at least one segment maps to a class; add its name to the class mapping)")
    shapes = {(int(d.Rows), int(d.Columns)) for d in datasets}
    if len(shapes) > 1:
        raise LabelError(f"{label.path}: the series' frames differ in Rows x Columns "
                         f"{sorted(shapes)} (rule: one frame size per series)")
    frame_uids = {str(d.get("FrameOfReferenceUID", "") or "") for d in datasets} - {""}
    if label.frame_of_reference_uid and frame_uids and \
            label.frame_of_reference_uid not in frame_uids:
        raise LabelError(f"{label._what(mapped)}: FrameOfReferenceUID "
                         f"{label.frame_of_reference_uid} is not the series' "
                         f"{sorted(frame_uids)[0]} (rule: a label shares its series' frame of "
                         "reference)")
    if label.kind == "SEG":
        from liverseg.dicom.seg_reader import read_seg

        return read_seg(label, datasets, fractional_threshold)
    from liverseg.dicom.rtstruct import read_rtstruct

    return read_rtstruct(label, datasets)


def _geometry(ds):
    iop = np.asarray(ds.ImageOrientationPatient, float)
    return (np.asarray(ds.ImagePositionPatient, float), iop[:3], iop[3:],
            np.asarray(ds.PixelSpacing, float))
