"""`liverseg <stage>`: one thin command per DVC stage, plus `models`.

Each command parses params.yaml once (typed, strict), calls the stage's `run` and prints
its summary as JSON. Expected failures (bad params, bad data) print one clear message and
exit 1 instead of a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

# Nothing phones home or waits on the network (set before the libraries are imported).
for _var, _value in {"MLFLOW_DISABLE_TELEMETRY": "true", "GX_ANALYTICS_ENABLED": "False",
                     "NO_ALBUMENTATIONS_UPDATE": "1", "DAGSTER_DISABLE_TELEMETRY": "1",
                     "DVC_NO_ANALYTICS": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
    os.environ.setdefault(_var, _value)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Liver-tumour segmentation pipeline: one command per DVC stage.")
PARAMS = typer.Option(Path("params.yaml"), "--params", "-p", help="Parameters file.")


def _run(stage: str, *args) -> None:
    """Import the stage lazily (torch/GX/MLflow are slow to import) and run it."""
    from importlib import import_module

    from liverseg.config import ConfigError, load_params

    try:
        params = load_params(args[0])
        summary = import_module(f"liverseg.stages.{stage}").run(params, *args[1:])
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        typer.secho(f"liverseg {stage}: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(summary, indent=2, default=str))


@app.command()
def ingest(params: Path = PARAMS) -> None:
    """Bring the configured data source into data/raw."""
    _run("ingest", params)


@app.command()
def validate(params: Path = PARAMS) -> None:
    """Build data/manifest.parquet and check it with great-expectations."""
    _run("validate", params)


@app.command()
def split(params: Path = PARAMS) -> None:
    """Patient-grouped train/validation split with normalisation stats."""
    _run("split", params)


@app.command()
def train(model: str, params: Path = PARAMS) -> None:
    """Train MODEL; best weights to models/MODEL, curves to reports/training."""
    _run("train", params, model)


@app.command()
def evaluate(model: str, params: Path = PARAMS) -> None:
    """Evaluate MODEL on the validation split; metrics to reports/metrics/MODEL.json."""
    _run("evaluate", params, model)


@app.command()
def compare(params: Path = PARAMS) -> None:
    """One table over every model: reports/comparison.{csv,md,json}."""
    _run("compare", params)


@app.command()
def register(params: Path = PARAMS) -> None:
    """Register the best model in MLflow; alias it if it passes the quality gate."""
    _run("register", params)


@app.command()
def report(params: Path = PARAMS) -> None:
    """Write reports/report.html and reports/report.md."""
    _run("report", params)


@app.command()
def models() -> None:
    """List the model names the registry can build."""
    from liverseg.models import MODEL_NAMES

    typer.echo("\n".join(MODEL_NAMES))


def main() -> None:  # pragma: no cover - `python -m liverseg.cli`
    sys.exit(app())


if __name__ == "__main__":
    main()
