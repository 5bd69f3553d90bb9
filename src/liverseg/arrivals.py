"""Labelled cases that arrived: what `retrain.min_new_labels` counts (the data sensor,
`pipeline.sensors`).

A labelled case is what ingest would make of the source: each case its source plans (an
image/mask pair's patient, a NIfTI volume with its segmentation, a DICOM series with a label
admitted for training by `data.dicom.train_on`), known by a digest of its label: for a DICOM
series the SOP UIDs of its training labels, so a clinician's correction makes the case new
again; for files their names, sizes and modification times. A DICOMweb archive is queried,
never fetched: its SEG and RTSTRUCT series that liverseg did not write.

Sources that cannot be counted without downloading (Kaggle), or whose planning fails (the
sensor's job is not ingest's checks), give None: then any change of the source counts.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from liverseg.config import Params
from liverseg.data.listing import source_path


def labelled_cases(params: Params, root: str | Path = ".") -> dict[str, str] | None:
    """case -> digest of its labels, as the source holds them now; None: not countable."""
    data = params.data
    if data.source == "kaggle":
        return None
    if data.source == "dicom" and data.dicom.url:
        from liverseg.dicom.web import archive_label_series

        cfg = data.dicom
        return {f"{study}/{series}": series for series, study in archive_label_series(
            cfg.url, cfg.study_date, cfg.study_description).items()}
    from liverseg.data import sources

    path = source_path(params, root)
    local = data.model_copy(update={"path": str(path)}) if path is not None else data
    try:
        with tempfile.TemporaryDirectory() as work:
            plan = sources.get(data.source).plan(local, params.seed, Path(work))
    except (sources.SourceError, OSError, ValueError):
        return None
    keys = {task.case_id: _label_key(task, data.source) for task in plan.tasks}
    return {case: hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()[:16]
            for case, key in keys.items() if key is not None}


def _label_key(task, source: str) -> list | None:
    """What identifies a planned case's labels; None: the case has none to train on."""
    if source == "dicom":  # the series' labels admitted for training (data.dicom.train_on)
        return [label.sop_uid for label in task.spec.candidates] or None
    if source in ("folder", "archive"):  # items of a patient; an image alone is no label
        items = task.spec[2] if source == "archive" else task.spec
        if not any(item.mask for item in items):
            return None
    # An archive's cases carry the archive's own (size, mtime) first: its members only.
    return list(task.files[1:] if source == "archive" else task.files)


def arrived(before: dict[str, str], now: dict[str, str]) -> list[str]:
    """The cases of `now` that are new or whose labels changed since `before`."""
    return sorted(case for case, digest in now.items() if before.get(case) != digest)
