"""A DICOM SEG's frames onto its CT series (`liverseg.dicom.labels.read_labels` for SEG):
highdicom decodes them, each frame is checked to lie on its referenced source frame (same
grid, plane and pixel positions; rows or columns may be flipped or swapped, as dcmqi writes
them), and the classes are written tumour over liver."""

from __future__ import annotations

import numpy as np

from liverseg.dicom.labels import (
    _CHUNK,
    LIVER,
    PLANE_TOLERANCE_PX,
    TUMOUR,
    LabelError,
    LabelObject,
    _geometry,
    _s,
)


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


def read_seg(label: LabelObject, datasets: list, threshold: float) -> np.ndarray:
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
