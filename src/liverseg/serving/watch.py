"""A monitoring row for every served case (DESIGN rule 12), the serving side of
`liverseg.monitoring`: what one input showed the model and what the model answered.

`Watch` collects, while an input is served: the input facts (DICOM header facts; the grey
values the model sees inside the body, and for HU inputs how much of the body lies below and
above the training window, which the windowed slices no longer show), the output facts
(class volumes in mL where spacing is known, else pixels; the tumour's connected
components) and the confidence (the probabilities, batch by batch: memory stays flat).
`record` appends the row to the served-case store named by `LIVERSEG_MONITORING_DIR`
(`liverseg.monitoring.store`); unset, nothing is recorded. Monitoring never fails an answer:
an error while collecting a fact is kept on the watch, and `record` warns instead of
appending a partial row. Rows carry the model's identity
and hashed study/series UIDs, never a patient's name or id.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from liverseg.monitoring import facts as mfacts
from liverseg.monitoring.store import ServedCaseStore


@dataclass
class Watch:
    """The facts of one served case."""

    confidence: mfacts.Confidence = field(default_factory=mfacts.Confidence)
    inputs: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    study_uid: str = ""
    series_uid: str = ""
    error: str = ""  # why a fact could not be collected: the row is not recorded

    def guard(self, collect, *args) -> None:
        """collect(*args), an error kept (the first) rather than raised."""
        try:
            collect(*args)
        except Exception as exc:  # a monitoring bug must not refuse the clinician's answer
            self.error = self.error or f"{type(exc).__name__}: {exc}"

    def saw(self, grey: np.ndarray, hu: np.ndarray | None = None,
            window: tuple[float, float] | None = None) -> None:
        """The input as the model saw it (grey [N, H, W]) and, for volumes, its HU voxels.
        The grey percentiles always use the grey body rule, as evaluate's reference does
        (it has the windowed slices only); the HU voxels add the fractions of the body below
        and above the window."""
        def collect():
            self.inputs |= mfacts.intensity_facts(grey)
            if hu is not None:
                with_hu = mfacts.intensity_facts(grey, hu, window)
                self.inputs |= {k: with_hu[k] for k in ("hu_below_window", "hu_above_window")}
        self.guard(collect)

    def scanned(self, header, slices: int) -> None:
        """A DICOM series' scanner facts (its first instance's header)."""
        self.guard(lambda: self.inputs.update(mfacts.header_facts(header, slices)))

    def answered(self, mask: np.ndarray, classes: tuple[str, ...], voxel_mm3: float | None,
                 volume: bool) -> None:
        def collect():
            self.outputs |= mfacts.output_facts(mask, classes, voxel_mm3, volume)
            if voxel_mm3:  # pixel counts too: evaluate's reference knows no spacing
                self.outputs |= {f"{name}_pixels": int((mask == k).sum())
                                 for k, name in enumerate(classes) if k}
        self.guard(collect)

    def row(self, identity: dict, kind: str) -> dict:
        return mfacts.served_row(identity, kind, self.inputs,
                                 self.outputs | self.confidence.facts(), self.study_uid,
                                 self.series_uid)


def record(store: ServedCaseStore | None, identity: dict, kind: str, watch: Watch | None
           ) -> None:
    """Append the case's row; monitoring never fails the answer (a full disk is warned of)."""
    if store is None or watch is None:
        return
    import warnings

    try:
        if watch.error:
            raise ValueError(watch.error)
        store.append(watch.row(identity, kind))
    except Exception as exc:  # a full disk, a fact that failed: the answer stands
        warnings.warn(f"monitoring row not recorded in {store.directory}: {exc}",
                      stacklevel=2)


class CaseWatches:
    """Evaluate's side: the same rows for each validation case, against which served cases
    are compared (the model's reference, saved with its registered version). Slices arrive
    one at a time; the slices of a case are consecutive in a split, so one case is held at
    a time (memory follows the largest case, not the number of cases)."""

    def __init__(self, classes: tuple[str, ...], identity: dict):
        self.classes, self.identity, self.rows = classes, identity, []
        self.case, self.grey, self.masks, self.watch = None, [], [], None

    def add(self, case: str, grey: np.ndarray, confidence: mfacts.Confidence,
            mask: np.ndarray) -> None:
        """One slice [H, W] with the confidence of its probabilities and its served classes."""
        if case != self.case:
            self._close()
            self.case, self.watch = case, Watch()
        self.grey.append(grey)
        self.masks.append(mask)
        self.watch.confidence.merge(confidence)

    def add_case(self, grey: np.ndarray, confidence: list[mfacts.Confidence],
                 masks: np.ndarray) -> None:
        """A whole case at once: grey and served classes [N, H, W], a confidence per slice."""
        self._close()
        watch = Watch()
        for c in confidence:
            watch.confidence.merge(c)
        self._row(watch, grey, masks, volume=len(grey) > 1)

    def _close(self) -> None:
        if self.watch is None:
            return
        volume = len(self.grey) > 1 and len({g.shape for g in self.grey}) == 1
        grey = np.stack(self.grey) if volume else self.grey[0][None]
        masks = np.stack(self.masks) if volume else self.masks[0][None]
        self.grey, self.masks, watch, self.watch, self.case = [], [], self.watch, None, None
        self._row(watch, grey, masks, volume)

    def _row(self, watch: Watch, grey: np.ndarray, masks: np.ndarray, volume: bool) -> None:
        watch.saw(grey)
        watch.answered(masks, self.classes, None, volume=volume)
        self.rows.append(watch.row(self.identity, "volume" if volume else "image"))

    def finish(self) -> list[dict]:
        self._close()
        return self.rows
