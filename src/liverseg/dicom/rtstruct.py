"""An RTSTRUCT's contours rasterised onto its CT series (`liverseg.dicom.labels.read_labels`
for RTSTRUCT): each contour on its own frame (by ContourImageSequence, else by the plane it
lies in), through that frame's geometry, so tilted and irregular series read as regular
ones; classes written tumour over liver."""

from __future__ import annotations

import numpy as np

from liverseg.dicom.labels import (
    LIVER,
    ON_LINE_PX,
    TUMOUR,
    LabelError,
    LabelObject,
    _geometry,
    _s,
)


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


def read_rtstruct(label: LabelObject, datasets: list) -> np.ndarray:
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
