"""Data sources behind one interface: `ingest(data_params, seed, writer) -> facts`.

Each source writes its slices through a `layout.SliceWriter`, so every source ends in the
same on-disk layout. Modules are imported lazily: nibabel and kagglehub are only needed
by the sources that use them.
"""

from __future__ import annotations

from importlib import import_module

from liverseg.config import SOURCES as NAMES
from liverseg.data.sources.folder import SourceError

__all__ = ["NAMES", "SourceError", "get"]


def get(name: str):
    """The `ingest` function of source `name`."""
    if name not in NAMES:
        raise SourceError(f"unknown data.source {name!r}; known: {list(NAMES)}")
    return import_module(f"liverseg.data.sources.{name}").ingest
