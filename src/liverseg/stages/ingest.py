"""ingest: bring a data source into the one on-disk layout (`liverseg.data.layout`)."""

from __future__ import annotations

from pathlib import Path

from liverseg import labels
from liverseg.artifacts import Artifacts
from liverseg.config import Params
from liverseg.data import layout, sources
from liverseg.io import atomic_dir


def run(params: Params, root: str | Path = ".") -> dict:
    """Write the source's slices under data/raw of `root` (replaced as a whole, atomically).

    A source that is unusable as a whole (missing, empty, unsafe archive, no Kaggle
    credentials) raises `SourceError` naming it; a bad item becomes an index row that
    validate quarantines.
    """
    ingest_source = sources.get(params.data.source)
    with atomic_dir(Artifacts(root).raw) as tmp:
        classes = labels.TARGETS[params.data.target]
        writer = layout.SliceWriter(tmp, params.data.source, len(classes))
        labels.write_classes(tmp, params.data.target)
        facts = ingest_source(params.data, params.seed, writer)
        index = writer.index()
        index.to_csv(tmp / layout.INDEX_NAME, index=False)
    written = index[index["image"] != ""]
    summary = {
        "source": params.data.source,
        "classes": list(classes),
        "slices": len(written),
        "patients": int(written["patient_id"].replace("", None).nunique()),
    }
    if len(written) < len(index):
        summary["items_not_ingested"] = len(index) - len(written)
    return summary | {k: v for k, v in facts.items() if k != "ignored"} | (
        {"ignored_files": facts["ignored"]} if facts.get("ignored") else {})
