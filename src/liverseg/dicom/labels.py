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
        return _read_seg(label, datasets, fractional_threshold)
    return _read_rtstruct(label, datasets)


# --- SEG ----------------------------------------------------------------------------------

def _geometry(ds):
    iop = np.asarray(ds.ImageOrientationPatient, float)
    return (np.asarray(ds.ImagePositionPatient, float), iop[:3], iop[3:],
            np.asarray(ds.PixelSpacing, float))


def _frame_items(seg, index: int):
    """(the frame's per-frame item, the shared item) of the functional groups."""
    shared = seg.get("SharedFunctionalGroupsSequence", [None])[0]
    per_frame = seg.get("PerFrameFunctionalGroupsSequence", [])
    return (per_frame[index] if index < len(per_frame) else None), shared


def _group(items, keyword: str):
    for item in items:
        if item is not None and keyword in item and len(item[keyword].value):
            return item[keyword][0]
    return None


def _grid_map(seg_geometry, seg_shape, ds, what: str) -> tuple:
    """How a SEG frame's pixel grid sits on its source frame's: (A, b) with source (row,
    column) = A @ (SEG row, column) + b, A a signed permutation (rows and columns at most
    flipped or swapped, as dcmqi writes a SEG from a NIfTI in other axes) and the grids
    covering each other exactly; anything else is a LabelError."""
    position, orientation, spacing = seg_geometry
    origin, row, col, src_spacing = _geometry(ds)
    rows, cols = int(ds.Rows), int(ds.Columns)
    rule = "(rule: a SEG frame lies on its source frame's pixel grid; rows and columns at " \
        "most flipped or swapped)"
    if sorted(seg_shape) != sorted((rows, cols)):
        raise LabelError(f"{what}: the SEG's frames are {seg_shape[0]}x{seg_shape[1]}, the "
                         f"series' {rows}x{cols} (rule: a label on its series' pixel grid, "
                         "Rows x Columns equal)")
    normal = np.cross(row, col)
    tol = PLANE_TOLERANCE_PX * float(src_spacing.min())
    if position is None:
        position = origin  # no plane position: trust the reference
    off = abs(float((position - origin) @ normal))
    if off > tol:
        raise LabelError(f"{what}: lies {off:.2f} mm off the plane of instance "
                         f"{ds.SOPInstanceUID}, the frame it references {rule}")
    u, v = (orientation[:3], orientation[3:]) if orientation is not None else (row, col)
    spacing = spacing if spacing is not None else src_spacing
    # source (row, col) of SEG pixel (r', c'): ((W - origin) . col / sr, (W - origin) . row / sc)
    # with W = position + c' * spacing[1] * u + r' * spacing[0] * v
    a = np.array([[spacing[0] * (v @ col), spacing[1] * (u @ col)],
                  [spacing[0] * (v @ row), spacing[1] * (u @ row)]]) / src_spacing[:, None]
    b = np.array([(position - origin) @ col, (position - origin) @ row]) / src_spacing
    a_int, b_int = np.rint(a), np.rint(b)
    if np.abs(a - a_int).max() > 1e-3 or sorted(np.abs(a_int).sum(axis=0)) != [1, 1] or \
            sorted(np.abs(a_int).sum(axis=1)) != [1, 1]:
        raise LabelError(f"{what}: orientation {np.round(orientation, 4).tolist()} and "
                         f"spacing {np.round(spacing, 4).tolist()} do not fall on instance "
                         f"{ds.SOPInstanceUID}'s pixel grid {rule}")
    shifted = float(np.abs(b - b_int).max() * src_spacing.min())
    corners = [a_int @ [r, c] + b_int for r in (0, seg_shape[0] - 1) for c in (0, seg_shape[1] - 1)]
    lo, hi = np.min(corners, axis=0), np.max(corners, axis=0)
    if shifted > tol or lo.tolist() != [0, 0] or hi.tolist() != [rows - 1, cols - 1]:
        far = float(np.linalg.norm(position - (origin + b_int[1] * src_spacing[1] * row
                                              + b_int[0] * src_spacing[0] * col)))
        moved = shifted if shifted > tol else far + float(np.abs(lo).max()) * src_spacing.min()
        raise LabelError(f"{what}: its pixels sit {moved:.2f} mm off instance "
                         f"{ds.SOPInstanceUID}'s pixel grid {rule}")
    return tuple(a_int.astype(int).ravel()) + tuple(b_int.astype(int))


def _check_seg_frames(label: LabelObject, seg, datasets: list):
    """Every frame references instances of the series and lies on their pixel grid (module
    docstring); returns the one grid map of all frames (`_grid_map`)."""
    mapped = label.mapped
    by_uid = {str(d.SOPInstanceUID): d for d in datasets}
    names = {s.number: s for s in label.segments}
    seg_shape = (int(seg.Rows), int(seg.Columns))
    maps = set()
    for index in range(int(seg.get("NumberOfFrames", 1) or 1)):
        items = _frame_items(seg, index)
        ident = _group(items, "SegmentIdentificationSequence")
        segment = names.get(int(ident.ReferencedSegmentNumber)) if ident else None
        what = (f"{label.path}: {segment}" if segment else label._what(mapped)) + \
            f", frame {index + 1}"
        derivation = _group(items, "DerivationImageSequence")
        sources = list(derivation.get("SourceImageSequence", [])) if derivation else []
        uids = [str(s.ReferencedSOPInstanceUID) for s in sources]
        if not uids:
            raise LabelError(f"{what}: references no source instance (rule: each SEG frame "
                             "names the CT instance it lies on)")
        missing = [uid for uid in uids if uid not in by_uid]
        if missing:
            raise LabelError(f"{what}: references instance {missing[0]}, which is not in "
                             f"series {label.referenced_series_uid} ({len(datasets)} frames) "
                             "(rule: a label's frames are frames of its series)")
        if any(_s(s, "SpatialLocationsPreserved") == "NO" for s in sources):
            raise LabelError(f"{what}: SpatialLocationsPreserved NO: its pixels do not lie on "
                             "its source frame's (rule: a label on its series' pixel grid)")
        position = _group(items, "PlanePositionSequence")
        orientation = _group(items, "PlaneOrientationSequence")
        measures = _group(items, "PixelMeasuresSequence")
        geometry = (
            np.asarray(position.ImagePositionPatient, float)
            if position is not None and "ImagePositionPatient" in position else None,
            np.asarray(orientation.ImageOrientationPatient, float)
            if orientation is not None and "ImageOrientationPatient" in orientation else None,
            np.asarray(measures.PixelSpacing, float)
            if measures is not None and "PixelSpacing" in measures else None)
        for uid in uids:
            maps.add(_grid_map(geometry, seg_shape, by_uid[uid], what))
    if len(maps) > 1:
        raise LabelError(f"{label._what(mapped)}: its frames sit on their source frames in "
                         f"{len(maps)} different ways (rule: one pixel grid per label)")
    return maps.pop() if maps else (1, 0, 0, 1, 0, 0)


def _read_seg(label: LabelObject, datasets: list, threshold: float) -> np.ndarray:
    import highdicom as hd

    try:
        seg = hd.seg.segread(label.path)
    except Exception as exc:  # highdicom/pydicom raise many types for a malformed SEG
        raise LabelError(f"{label._what(label.mapped)}: highdicom cannot read the SEG "
                         f"({type(exc).__name__}: {exc}) (rule: a readable DICOM SEG)") from None
    a00, a01, a10, a11, b0, b1 = _check_seg_frames(label, seg, datasets)
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    # SEG (row, column) of each source pixel: the inverse of the signed permutation
    inverse = np.linalg.inv(np.array([[a00, a01], [a10, a11]], float))
    r, c = np.mgrid[:rows, :cols]
    seg_r = np.rint(inverse[0, 0] * (r - b0) + inverse[0, 1] * (c - b1)).astype(int)
    seg_c = np.rint(inverse[1, 0] * (r - b0) + inverse[1, 1] * (c - b1)).astype(int)
    fractional = seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
    numbers = [s.number for s in label.mapped]
    targets = np.array([s.target for s in label.mapped])
    uids = [str(d.SOPInstanceUID) for d in datasets]
    out = np.zeros((len(datasets), rows, cols), np.uint8)
    for start in range(0, len(uids), _CHUNK):
        try:
            stack = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=uids[start:start + _CHUNK], segment_numbers=numbers,
                combine_segments=False, ignore_spatial_locations=True,  # checked above
                assert_missing_frames_are_empty=True, rescale_fractional=True)
        except Exception as exc:
            raise LabelError(f"{label._what(label.mapped)}: highdicom cannot place its frames "
                             f"on the series ({type(exc).__name__}: {exc}) (rule: a label's "
                             "frames are frames of its series)") from None
        inside = (stack >= threshold if fractional else stack > 0)[:, seg_r, seg_c]
        block = out[start:start + _CHUNK]
        for cls in (LIVER, TUMOUR):  # tumour over liver: written last
            if (targets == cls).any():
                block[inside[..., targets == cls].any(axis=-1)] = cls
    return out


# --- RTSTRUCT -----------------------------------------------------------------------------

def _half_spacings(datasets: list, normal: np.ndarray) -> np.ndarray:
    heights = np.array([np.asarray(d.ImagePositionPatient, float) @ normal for d in datasets])
    if len(datasets) == 1:
        return np.array([float(datasets[0].get("SliceThickness") or 1.0) / 2])
    order = np.argsort(heights)
    gaps = np.diff(heights[order])
    nearest = np.minimum(np.r_[np.inf, gaps], np.r_[gaps, np.inf])
    half = np.empty(len(datasets))
    half[order] = nearest / 2
    return half


def _rasterise(polygons: list[np.ndarray], rows: int, cols: int) -> np.ndarray:
    """Pixels whose centre is inside the polygons (even-odd over all of them) or on a line
    of one (within ON_LINE_PX); polygon vertices in (column, row) pixel coordinates."""
    mask = np.zeros((rows, cols), bool)
    x0 = np.concatenate([p[:, 0] for p in polygons])
    y0 = np.concatenate([p[:, 1] for p in polygons])
    x1 = np.concatenate([np.roll(p[:, 0], -1) for p in polygons])
    y1 = np.concatenate([np.roll(p[:, 1], -1) for p in polygons])
    # inside: scanlines through pixel-centre rows, crossings half-open in y (a vertex on a
    # row counts once where the outline passes it, 0 or 2 times at a peak)
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    first = np.clip(np.ceil(lo), 0, rows).astype(int)
    last = np.clip(np.ceil(hi), 0, rows).astype(int)  # exclusive
    counts = np.where(y0 != y1, np.maximum(last - first, 0), 0)
    if counts.sum():
        edge = np.repeat(np.arange(len(x0)), counts)
        r = np.repeat(first, counts) + (np.arange(counts.sum()) -
                                        np.repeat(np.cumsum(counts) - counts, counts))
        x = x0[edge] + (r - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
        order = np.lexsort((x, r))
        r, x = r[order], x[order]
        # rows whose crossings do not pair up can only come from crossings clipped away
        # above; each row's crossings are complete here, so pairs are (0,1), (2,3), ...
        start = np.ceil(x[0::2]).astype(int).clip(0, cols)
        stop = (np.floor(x[1::2]).astype(int) + 1).clip(0, cols)
        keep = stop > start
        diff = np.zeros((rows, cols + 1), np.int32)
        np.add.at(diff, (r[0::2][keep], start[keep]), 1)
        np.add.at(diff, (r[0::2][keep], stop[keep]), -1)
        mask |= np.cumsum(diff[:, :cols], axis=1) > 0
    # on a line: sample each edge every 0.25 pixel, keep the pixel centres within ON_LINE_PX
    length = np.hypot(x1 - x0, y1 - y0)
    steps = np.ceil(length / 0.25).astype(int) + 1
    edge = np.repeat(np.arange(len(x0)), steps)
    t = (np.arange(steps.sum()) - np.repeat(np.cumsum(steps) - steps, steps)) / \
        np.repeat(np.maximum(steps - 1, 1), steps)
    cx = np.rint(x0[edge] + t * (x1[edge] - x0[edge]))
    cy = np.rint(y0[edge] + t * (y1[edge] - y0[edge]))
    dx, dy = x1[edge] - x0[edge], y1[edge] - y0[edge]
    seg_len2 = np.maximum(dx * dx + dy * dy, 1e-12)
    u = np.clip(((cx - x0[edge]) * dx + (cy - y0[edge]) * dy) / seg_len2, 0, 1)
    dist = np.hypot(x0[edge] + u * dx - cx, y0[edge] + u * dy - cy)
    ok = (dist <= ON_LINE_PX) & (cx >= 0) & (cx < cols) & (cy >= 0) & (cy < rows)
    mask[cy[ok].astype(int), cx[ok].astype(int)] = True
    return mask


def _read_rtstruct(label: LabelObject, datasets: list) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(label.path)
    except Exception as exc:
        raise LabelError(f"{label.path}: unreadable RTSTRUCT ({type(exc).__name__}: {exc}) "
                         "(rule: a readable DICOM file)") from None
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    geometry = [_geometry(d) for d in datasets]
    normal = np.cross(geometry[0][1], geometry[0][2])
    heights = np.array([g[0] @ normal for g in geometry])
    half = _half_spacings(datasets, normal)
    by_uid = {str(d.SOPInstanceUID): i for i, d in enumerate(datasets)}
    contours = {int(c.ReferencedROINumber): c.get("ContourSequence", [])
                for c in ds.get("ROIContourSequence", []) if "ReferencedROINumber" in c}
    out = np.zeros((len(datasets), rows, cols), np.uint8)
    for cls in (LIVER, TUMOUR):  # tumour over liver: written last
        for roi in [s for s in label.mapped if s.target == cls]:
            per_frame: dict[int, list[np.ndarray]] = {}
            closed = [c for c in contours.get(roi.number, [])
                      if _s(c, "ContourGeometricType") in ("CLOSED_PLANAR", "CLOSEDPLANAR_XOR")
                      and len(c.get("ContourData", [])) >= 3]
            if not closed:
                kinds = sorted({_s(c, "ContourGeometricType") or "?"
                                for c in contours.get(roi.number, [])})
                said = f"only {'/'.join(kinds)} contours" if kinds else "no contour data"
                raise LabelError(f"{label.path}: {roi}: {said} (rule: a mapped ROI has at "
                                 "least one CLOSED_PLANAR contour)")
            for number, contour in enumerate(closed, start=1):
                points = np.asarray(contour.ContourData, float).reshape(-1, 3)
                what = f"{label.path}: {roi}, contour {number}"
                refs = [str(r.ReferencedSOPInstanceUID)
                        for r in contour.get("ContourImageSequence", [])
                        if "ReferencedSOPInstanceUID" in r]
                distance = points @ normal
                if refs:
                    if refs[0] not in by_uid:
                        raise LabelError(f"{what}: references instance {refs[0]}, which is "
                                         f"not in series {label.referenced_series_uid} (rule: "
                                         "a label's frames are frames of its series)")
                    i = by_uid[refs[0]]
                    off = float(np.abs(distance - heights[i]).max())
                    if off >= half[i]:
                        raise LabelError(f"{what}: lies {off:.2f} mm off the plane of instance "
                                         f"{refs[0]}, the frame it references (rule: a contour "
                                         "lies on a frame, within half the slice spacing)")
                else:
                    offs = np.abs(distance[:, None] - heights[None, :]).max(axis=0)
                    i = int(offs.argmin())
                    if offs[i] >= half[i]:
                        raise LabelError(f"{what}: lies off every frame of series "
                                         f"{label.referenced_series_uid} ({offs[i]:.2f} mm from "
                                         f"the nearest) (rule: a contour lies on a frame, "
                                         "within half the slice spacing)")
                origin, row, col, spacing = geometry[i]
                pixel = np.stack([(points - origin) @ row / spacing[1],
                                  (points - origin) @ col / spacing[0]], axis=1)
                if ((pixel[:, 0] < -0.5) | (pixel[:, 0] > cols - 0.5) | (pixel[:, 1] < -0.5)
                        | (pixel[:, 1] > rows - 0.5)).all():
                    raise LabelError(f"{what}: lies outside the {rows}x{cols} pixels of "
                                     f"instance {datasets[i].SOPInstanceUID} (rule: a contour "
                                     "lies on a frame)")
                per_frame.setdefault(i, []).append(pixel)
            for i, polygons in per_frame.items():
                out[i][_rasterise(polygons, rows, cols)] = cls
    return out
