"""source: list what the data source holds now (`liverseg.data.listing`) into
data/source.json. DVC runs it on every `dvc repro` (`always_changed`); its output changes
only when the source's files (or Kaggle handle) do, so ingest, which depends on it, reruns
exactly then: a case added to a folder is seen without hashing the whole source again."""

from __future__ import annotations

import json
from pathlib import Path

from liverseg.artifacts import Artifacts
from liverseg.config import Params
from liverseg.data.listing import list_source
from liverseg.io import atomic_path


def run(params: Params, root: str | Path = ".") -> dict:
    art = Artifacts(root)
    listing = list_source(params, root)
    with atomic_path(art.source_listing) as tmp:
        tmp.write_text(json.dumps(listing, indent=1, sort_keys=True) + "\n")
    files = listing.get("files")
    return {"source": params.data.source} | (
        {"files": len(files), "bytes": sum(size for _, size, _ in files)}
        if isinstance(files, list) else {"files": files} if files else {})
