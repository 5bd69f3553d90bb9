"""A pass over every stored slice, one case file at a time: memory flat in the number of cases.

`casestore.read` keeps up to `casestore.MAX_OPEN` (32) case files open per process, which
the loader's random access needs. Every open file keeps what HDF5 allocated for each dataset
read from it (its chunk cache, the decompression buffers): about 8 MiB per dataset of
512x512 slices. A stage that reads every slice of every case through it (validate: image
and mask; split: the train images) so held min(cases, 32) files open, and its memory grew
with the number of cases: validate 390 -> 830 MiB, split 222 -> 431 MiB from 8 to 32 LiTS
sized cases (docs/SCALING.md, section 0).

A `CaseReader` keeps one case file open (`max_open`), closes it when the reads move on to
another file and closes the rest on exit. Reads in `case_order` (positions sorted by case
file, stable) open each file once, whatever the order of the rows; the caller keeps per-row
scalars and puts them back in row order, so results do not depend on the reading order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from liverseg.casestore import SliceRef, open_case


def case_file_of(ref: object) -> str:
    """The case file part of a slice reference ("" for an empty or missing one)."""
    return ref.partition("#")[0] if isinstance(ref, str) else ""


def case_order(refs: Sequence[object]) -> list[int]:
    """Positions of `refs` sorted by case file (stable): reading in this order opens each
    case file once."""
    return sorted(range(len(refs)), key=lambda i: case_file_of(refs[i]))


class CaseReader:
    """Stored slices read like `casestore.read`, with at most `max_open` case files open."""

    def __init__(self, raw_dir: str | Path, max_open: int = 1):
        self.raw_dir, self.max_open = Path(raw_dir), max(1, max_open)
        self._open: OrderedDict[str, tuple[object, dict]] = OrderedDict()
        self.opened = 0  # files opened so far (a reopened file counts again)

    def _dataset(self, case_file: str, name: str):
        if case_file in self._open:
            self._open.move_to_end(case_file)
        else:
            path = self.raw_dir / case_file
            try:
                handle = open_case(path)
            except FileNotFoundError:
                raise FileNotFoundError(f"{path}: case file missing; rerun `liverseg "
                                        "ingest`") from None
            self.opened += 1
            self._open[case_file] = (handle, {})
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)[1][0].close()
        handle, datasets = self._open[case_file]
        if name not in datasets:
            datasets[name] = handle[name]
        return datasets[name]

    def read(self, ref: str | SliceRef, what: str = "image") -> np.ndarray:
        """One stored slice [H, W] (`what`: image or mask); the errors `casestore.read`
        raises (OSError, KeyError, IndexError, ValueError)."""
        ref = SliceRef.parse(ref) if isinstance(ref, str) else ref
        return self._dataset(ref.case_file, f"{ref.group}/{what}")[ref.index]

    def read_input(self, row: dict) -> np.ndarray:
        """`casestore.read_input`: the grey slice, or with 2.5D context the stack."""
        context = row.get("context")
        if isinstance(context, str) and context:
            return np.stack([self.read(ref) for ref in context.split("|")])
        return self.read(row["image"])

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1][0].close()

    def __enter__(self) -> CaseReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
