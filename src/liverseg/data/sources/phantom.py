"""`phantom`: the embedded, generated CT-like dataset (see liverseg.data.phantom); one case
per patient, each generated from (seed, patient) alone."""

from __future__ import annotations

import numpy as np

from liverseg import labels
from liverseg.config import DataParams
from liverseg.data import phantom
from liverseg.data.layout import CaseTask, CaseWriter, Plan, slice_id


def plan(data: DataParams, seed: int, workdir) -> Plan:
    """One case per patient; nothing on disk, so params alone say when a case changed."""
    return Plan([CaseTask(phantom.patient_id(p), (), p) for p in range(data.phantom.patients)])


def ingest_case(task: CaseTask, data: DataParams, seed: int, writer: CaseWriter) -> dict:
    cfg = data.phantom
    for sl in phantom.generate_patient(task.spec, cfg.slices_per_patient, cfg.size,
                                       cfg.max_tumours, cfg.noise_hu, seed):
        writer.add(slice_id(sl.patient_id, sl.slice_index), sl.patient_id, sl.slice_index,
                   sl.image, labels.from_volume_labels(sl.labels, data.target), channels=1,
                   dtype="uint8",
                   source_mask_values=",".join(str(v) for v in np.unique(sl.labels)))
    if data.context_slices:  # every slice of a patient is a row
        writer.link_context(data.context_slices)
    return {}
