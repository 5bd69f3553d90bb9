"""`dicom`: CT series labelled by DICOM SEG or RTSTRUCT, from a folder tree (data.path) or a
DICOMweb archive (data.dicom.url, mirrored by the source stage into .liverseg/dicomweb).

Every CT series that at least one label object (SEG or RTSTRUCT, `liverseg.dicom.labels`)
references becomes one case: its slices windowed exactly as `liverseg predict` windows
that series (`liverseg.dicom.series.load_series`, then the NIfTI path: canonical axes,
`data.nifti.window`; a tilted or irregularly spaced series slice by slice, each in its own
geometry), its label voxels on the series' own frames. `data.nifti.slices` and
`empty_fraction` choose the slices training samples, as for NIfTI volumes.

Every label object is one outcome, so counts reconcile (validate: ingested = accepted +
quarantined + superseded):
- its `origin`: `model` (written by liverseg, or every mapped segment/ROI AUTOMATIC),
  `corrected` (a human label, SEMIAUTOMATIC/MANUAL, on a series that also holds an earlier
  model label), `human` (SEMIAUTOMATIC/MANUAL otherwise), `unknown` (nothing says). Only
  the origins in `data.dicom.train_on` (default human, corrected) are training targets;
  any other is a row that validate quarantines by the rule "label origin allowed for
  training", so a model's own output never becomes ground truth by accident;
- of the usable labels of one series the latest (`LabelObject.time`: ContentDate/Time, else
  InstanceCreationDate/Time, else SeriesDate/Time) wins; if it cannot be read on the series
  (frames not there, geometry, contours off every frame) it is a quarantined row and the
  next latest is tried; the older readable ones are rows with `label_status` superseded;
- a label whose segments map to no class, or whose header cannot be read, is a row.
The slices of a case record the study, series and label instance UIDs, the label's kind,
origin and creator. Cases are grouped into patients by PatientID for the split.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from liverseg import labels as label_schema
from liverseg import preprocess
from liverseg.artifacts import DICOMWEB_MIRROR
from liverseg.config import DataParams
from liverseg.data.layout import (
    CaseTask,
    CaseWriter,
    Plan,
    file_facts,
    problem_row,
    safe_stem,
    unique,
)
from liverseg.data.sources.folder import SourceError
from liverseg.data.sources.nifti import case_rng, select_slices
from liverseg.dicom import labels
from liverseg.dicom import series as dicom

SOURCE = "dicom"


@dataclass(frozen=True)
class Label:
    """A label object as the plan resolved it (picklable for a worker)."""

    path: str
    sop_uid: str
    kind: str
    origin: str
    time: str
    creator: str  # JSON of its creator facts
    mapped: bool  # at least one segment/ROI maps to a class

    def facts(self) -> dict:
        return {"label_uid": self.sop_uid, "label_kind": self.kind, "origin": self.origin,
                "label_creator": self.creator, "source_mask": self.path}


@dataclass(frozen=True)
class SeriesSpec:
    patient: str
    study_uid: str
    series_uid: str
    files: tuple[str, ...]
    candidates: tuple[Label, ...]  # training targets, latest first
    others: tuple[Label, ...]  # no class mapped, or an origin not admitted for training


def _root(data: DataParams) -> Path:
    root = Path(data.path).expanduser() if data.path else Path(DICOMWEB_MIRROR)
    if not root.is_dir():
        raise SourceError(f"{root}: not a folder (data.source=dicom"
                          + (", the DICOMweb mirror: has the source stage run?)"
                             if not data.path else ")"))
    return root


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if dicom.is_dicom(p))


def mapping(data: DataParams) -> labels.ClassMapping:
    return labels.ClassMapping.from_dict({k: list(v) for k, v in data.dicom.names.items()})


def origins(objects: list[labels.LabelObject]) -> dict[str, str]:
    """SOPInstanceUID -> origin for the label objects of one series: a human label after a
    model label on the same series is a correction of it."""
    model_times = [o.time for o in objects if o.algorithm == "model" and o.time]
    out = {}
    for o in objects:
        if o.algorithm == "human":
            out[o.sop_uid] = ("corrected" if any(t <= o.time for t in model_times)
                              else "human")
        else:
            out[o.sop_uid] = o.algorithm
    return out


def _label(o: labels.LabelObject, origin: str) -> Label:
    return Label(str(o.path), o.sop_uid, o.kind, origin, o.time,
                 json.dumps(o.facts | {"time": o.time}, sort_keys=True, default=str),
                 any(seg.target for seg in o.segments))


def _not_used(label: Label, data: DataParams) -> str:
    """Why a label that is no candidate is not used: the rule and the detail."""
    if not label.mapped:
        return (f"label classes mapped: no segment/ROI of {label.path} maps to liver or "
                "tumour (by SNOMED CT code or name; data.dicom.names adds names)")
    return (f"label origin allowed for training: {label.origin} (data.dicom.train_on: "
            f"{', '.join(data.dicom.train_on)})")


def _read_header(path: Path):
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # the series reader names an unreadable header
        return None


def _label_row(sid: str, patient: str, series: dicom.Series | None, label: Label,
               **facts) -> dict:
    """The row of a label object that stored no slice; facts say why."""
    return problem_row(sid, patient, -1, SOURCE, source_image=str(series.files[0])
                       if series else "", study_uid=series.study_uid if series else "",
                       series_uid=series.uid if series else "", **label.facts() | facts)


def case_id(patient: str, series_uid: str) -> str:
    return f"{safe_stem(patient)}-{hashlib.sha1(series_uid.encode()).hexdigest()[:10]}"


def plan(data: DataParams, seed: int, workdir) -> Plan:
    """One case per CT series with a label object; every other label object is a row."""
    root = _root(data)
    files = _files(root)
    if not files:
        raise SourceError(f"{root}: no DICOM files under it (data.source=dicom)")
    objects, images, out, taken = [], [], Plan(), set()
    class_mapping = mapping(data)
    for path in files:
        ds = _read_header(path)
        if ds is None or not labels.is_label(ds):
            images.append(path)
            continue
        try:
            objects.append(labels.describe(path, class_mapping))
        except labels.LabelError as exc:
            out.rows.append(problem_row(unique(f"label-{safe_stem(path.name)}", taken), "", -1,
                                        SOURCE,
                                        source_mask=str(path), label_readable=False,
                                        ingest_detail=f"label readable on its series: {exc}"))
    found = dicom.find_series(images)
    by_uid = {s.uid: s for s in found.series}
    patients = {s.uid: _patient(s) for s in found.series}
    referencing: dict[str, list[labels.LabelObject]] = {}
    for o in objects:
        if o.referenced_series_uid in by_uid:
            referencing.setdefault(o.referenced_series_uid, []).append(o)
            continue
        label = _label(o, origins([o])[o.sop_uid])
        out.rows.append(_label_row(f"label-{safe_stem(o.sop_uid)}", o.patient_id, None, label,
                                   label_readable=False, ingest_detail=(
                                       f"label readable on its series: {o.path} references "
                                       f"series {o.referenced_series_uid}, which is not among "
                                       "the CT series read (rule: a label's series is there)")))
    for uid, objs in sorted(referencing.items()):
        s, origin = by_uid[uid], origins(objs)
        ordered = sorted(objs, key=lambda o: (o.time, o.sop_uid), reverse=True)
        spec = SeriesSpec(patients[uid], s.study_uid, uid, tuple(map(str, s.files)),
                          *_candidates([_label(o, origin[o.sop_uid]) for o in ordered], data))
        paths = [Path(f) for f in s.files] + [o.path for o in objs]
        out.tasks.append(CaseTask(case_id(spec.patient, uid), file_facts(*paths), spec,
                                  _memory(s)))
    out.rows += [problem_row(unique(f"dicom-{safe_stem(p.name)}", taken), "", -1, SOURCE,
                             source_image=str(p), image_decodable=False,
                             ingest_detail=f"image decodable: {why}")
                 for p, why in found.refused]
    out.facts = {"series": len(found.series), "labelled_series": len(referencing),
                 "unlabelled_series": len(found.series) - len(referencing),
                 "label_objects": len(objects), "skipped_files": len(found.skipped)}
    return out


def _candidates(ordered: list[Label], data: DataParams) -> tuple[tuple, tuple]:
    """(training targets, the others), each latest first."""
    use = [lab.mapped and lab.origin in data.dicom.train_on for lab in ordered]
    return (tuple(lab for lab, u in zip(ordered, use, strict=True) if u),
            tuple(lab for lab, u in zip(ordered, use, strict=True) if not u))


def _patient(s: dicom.Series) -> str:
    import pydicom

    ds = pydicom.dcmread(s.files[0], stop_before_pixels=True, specific_tags=["PatientID"])
    return str(ds.get("PatientID", "") or "") or f"study-{s.study_uid}"


def _memory(s: dicom.Series) -> int:
    """Bytes a worker holds for one series: 512 x 512 slices, float HU, labels, copies."""
    return len(s.files) * 512 * 512 * 16


def ingest_case(task: CaseTask, data: DataParams, seed: int, writer: CaseWriter) -> dict:
    """The series' slices and the winning label's voxels; a row for every other label."""
    spec: SeriesSpec = task.spec
    s = dicom.Series(spec.series_uid, [Path(f) for f in spec.files], study_uid=spec.study_uid)
    first = f"{task.case_id}_label"
    unused = [_label_row(f"{first}-{k}", spec.patient, s, label, label_mapped=label.mapped,
                         ingest_detail=_not_used(label, data))
              for k, label in enumerate(spec.others)]
    writer.rows += unused
    try:
        images, datasets = dicom.load_series(s)
    except dicom.DicomError as exc:
        writer.rows.append(problem_row(f"{task.case_id}_series", spec.patient, -1, SOURCE,
                                       source_image=str(s.files[0]), image_decodable=False,
                                       study_uid=s.study_uid, series_uid=s.uid,
                                       ingest_detail=f"image decodable: {exc}"))
        for k, label in enumerate(spec.candidates):  # each label still one outcome
            writer.rows.append(_label_row(
                f"{first}-q{k}", spec.patient, s, label, label_readable=False,
                ingest_detail=f"label readable on its series: its series cannot be read ({exc})"))
        return {"refused": 1}
    winner, voxels = None, None
    for k, label in enumerate(spec.candidates):
        if winner is not None:
            writer.rows.append(_label_row(
                f"{first}-s{k}", spec.patient, s, label, label_status="superseded",
                ingest_detail=f"superseded by {winner.sop_uid} ({winner.kind}, {winner.origin}, "
                              f"time {winner.time} later than {label.time})"))
            continue
        try:
            voxels = labels.read_labels(labels.describe(Path(label.path), mapping(data)),
                                        datasets, data.dicom.fractional_threshold)
            winner = label
        except labels.LabelError as exc:
            writer.rows.append(_label_row(f"{first}-q{k}", spec.patient, s, label,
                                          label_readable=False,
                                          ingest_detail=f"label readable on its series: {exc}"))
    if winner is None:
        return {"unusable_series": 1}
    for row, label in zip(unused, spec.others, strict=True):  # what the clinician changed
        if (label.origin == "model" and label.mapped and winner.origin == "corrected"
                and label.time and label.time <= winner.time):
            row.update(correction(label, winner, voxels, datasets, images, data))
    if data.context_slices and s.irregular is not None:
        writer.rows.append(problem_row(
            f"{task.case_id}_series", spec.patient, -1, SOURCE, source_image=str(s.files[0]),
            image_decodable=False, study_uid=s.study_uid, series_uid=s.uid,
            ingest_detail=f"image decodable: data.context_slices needs regularly spaced "
                          f"slices; series {s.uid} is not ({s.irregular})", **winner.facts()))
        return {"refused": 1}
    _slices(task, data, seed, writer, s, images, voxels, winner, spec.patient)
    return {"series_with_slices": 1}


def correction(model: Label, human: Label, voxels: np.ndarray, datasets: list, images,
               data: DataParams) -> dict:
    """How much the human label changed the model's on this series: the foreground Dice
    between them and the volume difference (human - model, mL), on the model label's row
    (its creator names the model version), for the monitoring's correction check."""
    try:
        predicted = labels.read_labels(labels.describe(Path(model.path), mapping(data)),
                                       datasets, data.dicom.fractional_threshold)
    except labels.LabelError as exc:
        return {"ingest_detail": f"label origin allowed for training: model (its correction "
                                 f"not measured: {exc})"}
    a, b = predicted > 0, voxels > 0
    total = int(a.sum() + b.sum())
    dice = 2.0 * int((a & b).sum()) / total if total else 1.0
    affine = (images if _is_volume(images) else images[0]).affine
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    return {"correction_dice": round(dice, 6),
            "correction_ml": round((int(b.sum()) - int(a.sum())) * voxel_ml, 3),
            "corrected_by": human.sop_uid, "corrected_at": human.time}


def _is_volume(images) -> bool:
    """load_series gives one image for a regular series, a list of slices otherwise."""
    return not isinstance(images, list)


def _slices(task, data: DataParams, seed: int, writer: CaseWriter, s: dicom.Series, images,
            voxels: np.ndarray, winner: Label, patient: str) -> None:
    """Every slice of the series with its label, as predict slices it."""
    window = data.nifti.window
    if s.irregular is None:  # one volume, series axes [slice, row, column]
        hu, ornt = preprocess.canonical(images)
        grey = preprocess.window(preprocess.to_slices(hu), window)
        lab = preprocess.to_slices(preprocess.to_canonical(voxels, ornt))
        frames = _frame_of_slice(ornt, len(voxels))
        spacing = ",".join(f"{v:g}" for v in preprocess.slice_spacing(images.affine))
    else:  # each slice in its own geometry
        grey = np.concatenate([preprocess.window(preprocess.to_slices(
            preprocess.canonical(img)[0]), window) for img in images])
        lab = np.concatenate([preprocess.to_slices(preprocess.to_canonical(
            voxels[i:i + 1], preprocess.orientation(img.affine))) for i, img in enumerate(images)])
        frames, spacing = list(range(len(images))), ""  # no grid: per-slice figures only
    sampled = set(select_slices(lab, data.nifti.slices, data.nifti.empty_fraction,
                                case_rng(seed, task.case_id)))
    facts = winner.facts() | {"study_uid": s.study_uid, "series_uid": s.uid,
                              "spacing": spacing}
    for k in range(len(grey)):
        frame = frames[k] if frames else None
        writer.add(f"{task.case_id}_{k:04d}", patient, k, grey[k],
                   label_schema.from_volume_labels(lab[k], data.target), sampled=k in sampled,
                   **facts | {"source_image": str(s.files[frame]) if frame is not None
                              else f"{s.files[0].parent}#{k}",
                              "source_mask": f"{winner.path}#{frame if frame is not None else k}",
                              "channels": 1})
    if data.context_slices:
        writer.link_context(data.context_slices)


def _frame_of_slice(ornt: np.ndarray, n: int) -> list[int] | None:
    """Which source frame (series order) each canonical slice is, when the series' slice
    axis becomes the canonical slice axis (axial series); None otherwise."""
    axis, flip = ornt[0]
    if int(axis) != 2:
        return None
    return list(range(n)) if flip > 0 else list(range(n - 1, -1, -1))
