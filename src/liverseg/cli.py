"""`liverseg <stage>`: one thin command per DVC stage, plus `models`, `lineage`, `predict`
and `export`.

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

from liverseg.offline import disable_telemetry

disable_telemetry()  # before the stage's libraries are imported

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Liver-tumour segmentation pipeline: one command per DVC stage.")
PARAMS = typer.Option(Path("params.yaml"), "--params", "-p", help="Parameters file.")
MODEL_REF = typer.Option("models:/liverseg@champion", "--model", "-m",
                         help="MLflow model URI, version number, run id or models/<name>.")
INPUTS = typer.Argument(..., help="PNG/JPG slices, folders of them, NIfTI volumes.")
PREDICT_OUT = typer.Option(Path("predictions"), "--out", "-o", help="Output folder.")
EXPORT_OUT = typer.Option(..., "--out", "-o", help="File to write, e.g. model.onnx.")


def _run(stage: str, *args) -> None:
    """Import the stage lazily (torch/GX/MLflow are slow to import) and run it."""
    from importlib import import_module

    from liverseg.config import ConfigError, load_params
    from liverseg.tracking import TrackingUnavailable

    try:
        params = load_params(args[0])
        summary = import_module(f"liverseg.stages.{stage}").run(params, *args[1:])
    except (ConfigError, FileNotFoundError, ValueError, TrackingUnavailable) as exc:
        typer.secho(f"liverseg {stage}: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary
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
    """Register the best model in MLflow: `champion` through the quality gate, else `challenger`."""
    _run("register", params)


@app.command()
def report(params: Path = PARAMS) -> None:
    """Write reports/report.html and reports/report.md."""
    _run("report", params)


def _fail(command: str, exc: Exception) -> None:
    typer.secho(f"liverseg {command}: {exc}", fg="red", err=True)
    raise typer.Exit(1) from None


def _print_trail(info: dict) -> None:
    """The lineage as `key: value` lines for people; --json prints it for machines."""
    for key, value in info.items():
        if key in ("differences", "reproducible"):
            continue
        if isinstance(value, dict | list):
            value = json.dumps(value, default=str)
        typer.echo(f"{key}: {value}")
    typer.echo(f"reproducible: {'yes' if info['reproducible'] else 'no'}")
    for line in info["differences"]:
        typer.echo(f"  differs: {line}")


@app.command()
def lineage(
    model_uri: str = typer.Argument(None, help="models:/liverseg@champion, models:/liverseg/3, "
                                    "a version number or an MLflow run id."),
    data_hash: str = typer.Option(None, "--data-hash",
                                  help="Instead: list the versions that used this data hash."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object, for machines."),
    dvc_status: bool = typer.Option(True, "--dvc-status/--no-dvc-status",
                                    help="Also ask `dvc status` for data edited since dvc.lock."),
    params: Path = PARAMS,
) -> None:
    """The trail of a registered model (code, data, params, validation, metrics), checked
    against the workspace: does it still reproduce, and if not, what differs."""
    from mlflow.exceptions import MlflowException

    from liverseg import lineage as lin
    from liverseg.config import ConfigError

    if (model_uri is None) == (data_hash is None):
        _fail("lineage", ValueError("give either MODEL_URI or --data-hash HASH"))
    try:
        info = (lin.find_data_hash(data_hash, params) if data_hash
                else lin.describe(model_uri, params, run_dvc=dvc_status))
    except (ConfigError, ValueError, MlflowException) as exc:
        _fail("lineage", exc)
    if as_json or data_hash:
        typer.echo(json.dumps(info, indent=2, default=str))
    else:
        _print_trail(info)


@app.command()
def predict(
    inputs: list[Path] = INPUTS,
    model: str = MODEL_REF,
    out: Path = PREDICT_OUT,
) -> None:
    """Masks (input geometry; NIfTI keeps its affine), overlays and predictions.csv."""
    from liverseg import predict as pred

    try:
        summary = pred.run(model, inputs, out)
    except (FileNotFoundError, ValueError) as exc:
        _fail("predict", exc)
    typer.echo(json.dumps(summary, indent=2, default=str))


@app.command()
def export(
    fmt: str = typer.Option("onnx", "--format", "-f", help="Export format (onnx)."),
    out: Path = EXPORT_OUT,
    model: str = MODEL_REF,
) -> None:
    """Export the model (ONNX) and check it against torch; prints the max abs difference."""
    from liverseg import export as exp

    try:
        summary = exp.run(model, fmt, out)
    except (FileNotFoundError, ValueError) as exc:
        _fail("export", exc)
    typer.echo(f"max abs diff vs torch: {summary['max_abs_diff']:.3g}", err=True)
    typer.echo(json.dumps(summary, indent=2, default=str))


@app.command()
def models(params: Path = PARAMS) -> None:
    """List the models the registry builds, with parameter counts at the configured encoder."""
    from liverseg.config import load_params
    from liverseg.labels import out_channels
    from liverseg.models import MODEL_NAMES, build_model

    cfg = load_params(params).model
    for name in MODEL_NAMES:
        net = build_model(name, encoder=cfg.encoder, in_channels=cfg.in_channels,
                          classes=out_channels(cfg.num_classes), options=cfg.options_for(name))
        typer.echo(f"{name:15s} {sum(p.numel() for p in net.parameters()):>12,d} parameters")


def main() -> None:  # pragma: no cover - `python -m liverseg.cli`
    sys.exit(app())


if __name__ == "__main__":
    main()
