"""Data sources behind one interface, in two steps so cases can run in parallel workers:

    plan(data_params, seed, workdir) -> layout.Plan        its cases (picklable tasks), the
                                                           rows of files that make no case
    ingest_case(task, data_params, seed, writer) -> facts  one case into a `CaseWriter`

so every source ends in the same on-disk layout (`liverseg.data.layout`). Modules are
imported lazily: nibabel and kagglehub are only needed by the sources that use them.
"""

from __future__ import annotations

from importlib import import_module

from liverseg.config import SOURCES as NAMES
from liverseg.data.sources.folder import SourceError

__all__ = ["NAMES", "SourceError", "get"]


def get(name: str):
    """The module of source `name` (its `plan` and `ingest_case`)."""
    if name not in NAMES:
        raise SourceError(f"unknown data.source {name!r}; known: {list(NAMES)}")
    return import_module(f"liverseg.data.sources.{name}")
