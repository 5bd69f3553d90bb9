"""`phantom`: the embedded, generated CT-like dataset (see liverseg.data.phantom)."""

from __future__ import annotations

import numpy as np

from liverseg import labels
from liverseg.config import DataParams
from liverseg.data import phantom
from liverseg.data.layout import SliceWriter, slice_id


def ingest(data: DataParams, seed: int, writer: SliceWriter) -> dict:
    cfg = data.phantom
    volumes: dict[str, dict[int, str]] = {}
    for sl in phantom.generate(cfg.patients, cfg.slices_per_patient, cfg.size, cfg.max_tumours,
                               cfg.noise_hu, seed):
        volumes.setdefault(sl.patient_id, {})[sl.slice_index] = writer.add(
            slice_id(sl.patient_id, sl.slice_index), sl.patient_id, sl.slice_index,
            sl.image, labels.from_volume_labels(sl.labels, data.target), channels=1,
            dtype="uint8", source_mask_values=",".join(str(v) for v in np.unique(sl.labels)))
    if data.context_slices:  # every slice of a patient is a row: no extra images
        for rows in volumes.values():
            writer.link_context(rows, cfg.slices_per_patient, data.context_slices, None)
    return {}
