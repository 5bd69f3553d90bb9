"""Every artifact the stages write: its path, as dvc.yaml names it, and how it is read and
written. The one owner of "where is X, in what format": stages, the report, the Dagster
metadata and checks, lineage and the audit ask an `Artifacts(root)`. dvc.yaml passes no
paths (a stage's command is `liverseg <stage> [model]`), so tests/test_artifacts.py checks
that dvc.yaml's data deps and outs are exactly `stage_io`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from liverseg.io import MaskArchive, atomic_path, load_masks, read_json, write_json

if TYPE_CHECKING:  # training runs where pandas is not installed: imported where used
    import pandas as pd

# The folders and files, relative to the repository root.
SOURCE_LISTING = "data/source.json"  # what the source holds: ingest's dependency
RAW, MANIFEST, QUARANTINE, SPLITS = (
    "data/raw", "data/manifest.parquet", "data/quarantine.csv", "data/splits")
VALIDATION, VALIDATION_DOCS = "reports/validation.json", "reports/validation"
MODELS = "models"
TRAINING, PER_IMAGE, PREDICTIONS, METRICS = (
    "reports/training", "reports/per_image", "reports/predictions", "reports/metrics")
COMPARISON = "reports/comparison"  # .csv, .md and .json
REGISTRY = "reports/registry.json"
MODEL_CARD = "reports/model_card"  # .md and .json
REPORT, FIGURES = "reports/report", "reports/figures"  # .html and .md; the PNGs
CONFIG, WEIGHTS, RUN = "config.json", "model.safetensors", "run.json"  # in a model folder
# Beside a model folder (models/<m> is train's output): evaluate's choice of mirroring and
# post-processing (`liverseg.postprocess`), which predict applies with the model.
INFERENCE = ".inference.json"
RAW_INDEX, SPLIT_STATS = "slices.csv", "stats.json"  # in data/raw; in data/splits
CHECKPOINTS = ".checkpoints"  # training state while a model trains: no DVC output
# Ingest's store of case files, keyed by what makes them (no DVC output: data/raw links to it)
INGEST_STORE = ".liverseg/ingest"
# The dicom source's copy of a DICOMweb archive (one file per instance; outside DVC: the
# listing in data/source.json names each instance and its digest).
DICOMWEB_MIRROR = ".liverseg/dicomweb"


def _at(rel: str) -> property:
    """A path under the root, as an attribute: `Artifacts(root).raw`."""
    return property(lambda self: self.root / rel, doc=rel)


@dataclass(frozen=True)
class Artifacts:
    """The artifacts of the repository at `root` (default: the working directory)."""

    root: Path = Path()

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def path(self, rel: str) -> Path:
        return self.root / rel

    raw, manifest, quarantine, splits = _at(RAW), _at(MANIFEST), _at(QUARANTINE), _at(SPLITS)
    validation, validation_docs = _at(VALIDATION), _at(VALIDATION_DOCS)
    raw_index, split_stats = _at(f"{RAW}/{RAW_INDEX}"), _at(f"{SPLITS}/{SPLIT_STATS}")
    registry, figures = _at(REGISTRY), _at(FIGURES)
    ingest_store, source_listing = _at(INGEST_STORE), _at(SOURCE_LISTING)
    dicomweb_mirror = _at(DICOMWEB_MIRROR)

    # ------------------------------------------------------------------ per model
    def model_dir(self, model: str) -> Path:
        return self.path(MODELS) / model

    def inference(self, model: str) -> Path:
        return inference_file(self.model_dir(model))

    def model_config(self, model: str) -> Path:
        """Written by train (checkpoint.save_config); read by checkpoint.read_config, which
        upgrades older layouts."""
        return self.model_dir(model) / CONFIG

    def curve(self, model: str) -> Path:
        """The training curve: one row per epoch (train's plot)."""
        return self.path(TRAINING) / f"{model}.csv"

    def per_image(self, model: str) -> Path:
        return self.path(PER_IMAGE) / f"{model}.csv"

    def predictions(self, model: str) -> Path:
        """Evaluate's masks of the validation slices (`liverseg.io.MaskWriter`)."""
        return self.path(PREDICTIONS) / f"{model}.h5"

    def metrics(self, model: str) -> Path:
        return self.path(METRICS) / f"{model}.json"

    # ------------------------------------------------------------------ pipeline-wide
    def comparison(self, suffix: str = ".json") -> Path:
        return self.path(COMPARISON + suffix)

    def model_card(self, suffix: str = ".md") -> Path:
        return self.path(MODEL_CARD + suffix)

    def report(self, suffix: str = ".html") -> Path:
        return self.path(REPORT + suffix)

    # ------------------------------------------------------------------ readers and writers
    def read_metrics(self, model: str) -> dict:
        return read_json(self.metrics(model))

    def write_metrics(self, model: str, metrics: dict) -> None:
        write_json(self.metrics(model), metrics)

    def write_curve(self, model: str, rows: list[dict]) -> None:
        """One row per epoch; NaN is written empty, as pandas writes it."""
        import csv
        import math

        with atomic_path(self.curve(model)) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: "" if isinstance(v, float) and math.isnan(v) else v
                              for k, v in row.items()} for row in rows)

    def write_per_image(self, model: str, rows: pd.DataFrame) -> None:
        with atomic_path(self.per_image(model)) as tmp:
            rows.to_csv(tmp, index=False)

    def read_predictions(self, model: str) -> MaskArchive:
        return load_masks(self.predictions(model))

    def read_comparison(self) -> dict:
        return read_json(self.comparison(".json"))

    def read_registry(self) -> dict:
        return read_json(self.registry)

    def write_registry(self, record: dict) -> None:
        write_json(self.registry, record)


def inference_file(model_dir: str | Path) -> Path:
    """Evaluate's decision for the model in `model_dir`: models/<m>.inference.json."""
    model_dir = Path(model_dir)
    return model_dir.with_name(model_dir.name + INFERENCE)


def stage_io(stage: str, model: str) -> tuple[set[str], set[str]]:
    """(data deps, outs) of a stage, relative to the root: what dvc.yaml must list beside
    its code deps (`model` stands in for `${item.model}` of a per-model stage)."""
    a = Artifacts()
    rel = {
        "source": ([], [a.source_listing]),
        "ingest": ([a.source_listing], [a.raw]),
        "validate": ([a.raw], [a.manifest, a.quarantine, a.validation_docs, a.validation]),
        "split": ([a.manifest, a.raw], [a.splits]),
        "train": ([a.raw, a.splits], [a.model_dir(model), a.curve(model)]),
        "evaluate": ([a.model_dir(model), a.raw, a.splits],
                     [a.per_image(model), a.predictions(model), a.metrics(model),
                      a.inference(model)]),
        "compare": ([a.path(METRICS)], [a.comparison(s) for s in (".csv", ".md", ".json")]),
        "register": ([a.comparison(), a.validation, a.path(METRICS), a.splits, a.raw,
                      a.path(MODELS)],
                     [a.registry, a.model_card(".md"), a.model_card(".json")]),
        "report": ([a.validation, a.comparison(), a.registry, a.path(TRAINING),
                    a.path(METRICS), a.path(PER_IMAGE), a.path(PREDICTIONS), a.splits, a.raw],
                   [a.report(".html"), a.report(".md"), a.figures]),
    }[stage]
    return tuple({p.as_posix() for p in paths} for paths in rel)
