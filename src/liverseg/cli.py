"""`liverseg <stage>`: one thin command per DVC stage, plus `predict`, `export`, `lineage`,
`audit` and `models`.

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
from liverseg.provenance import DEFAULT_TOLERANCE
from liverseg.redact import redact, redacted_errors

disable_telemetry()  # before the stage's libraries are imported
# pandas keeps text columns in Arrow memory, whose default allocator (mimalloc) holds on to
# what a parquet write or a table's copy freed: validate's and split's peaks grew with their
# rows (8 -> 32 LiTS-sized cases, in-process: up to +14% and +29%; +8% and +11% with the
# system allocator; docs/SCALING.md).
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

# `liverseg --help` lists the stages in the order of the flow, then the tools around them. A
# command not named here is still listed: after these, in the order it was defined.
FLOW_ORDER = ("source", "ingest", "validate", "split", "train", "evaluate", "compare", "register",
              "report", "predict", "export", "lineage", "audit", "models")


class FlowOrder(typer.core.TyperGroup):
    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        return ([n for n in FLOW_ORDER if n in names]
                + [n for n in names if n not in FLOW_ORDER])


# No local variables in a traceback: they can hold a tracking URI's password.
app = typer.Typer(cls=FlowOrder, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_show_locals=False,
                  help="Liver-tumour segmentation pipeline: the stages in the order of the "
                  "flow (one command per DVC stage), then the tools around them.")
PARAMS = typer.Option(Path("params.yaml"), "--params", "-p", help="Parameters file.")
MODEL_REF = typer.Option("models:/liverseg@champion", "--model", "-m",
                         help="MLflow model URI, version number, run id or models/<name>.")
INPUTS = typer.Argument(None, help="PNG/JPG slices, NIfTI volumes, DICOM series, folders.")
STUDIES = typer.Option(None, "--study",
                       help="With --dicomweb: a StudyInstanceUID (repeatable).")
PREDICT_OUT = typer.Option(Path("predictions"), "--out", "-o", help="Output folder.")
EXPORT_OUT = typer.Option(..., "--out", "-o", help="File to write, e.g. model.onnx.")


def _run(stage: str, *args) -> None:
    """Import the stage lazily (torch/GX/MLflow are slow to import) and run it."""
    from importlib import import_module

    from liverseg.config import ConfigError, load_params
    from liverseg.tracking import TrackingUnavailable

    try:
        with redacted_errors():  # no credential of a tracking URI reaches the terminal
            params = load_params(args[0])
            summary = import_module(f"liverseg.stages.{stage}").run(params, *args[1:])
    except (ConfigError, FileNotFoundError, ValueError, TrackingUnavailable) as exc:
        _fail(stage, exc)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary
        typer.echo(json.dumps(summary, indent=2, default=str))


@app.command()
def source(params: Path = PARAMS) -> None:
    """List the data source's files into data/source.json (ingest's dep).

    Example: liverseg source (DVC runs it on every repro; it changes only with the source)
    """
    _run("source", params)


@app.command()
def ingest(params: Path = PARAMS) -> None:
    """Bring the configured data source into data/raw.

    Example: liverseg ingest (data.source and data.path come from params.yaml)
    """
    _run("ingest", params)


@app.command()
def validate(params: Path = PARAMS) -> None:
    """Build data/manifest.parquet and check it with great-expectations.

    Example: liverseg validate (bad slices go to data/quarantine.csv)
    """
    _run("validate", params)


@app.command()
def split(params: Path = PARAMS) -> None:
    """Patient-grouped train/validation split with normalisation stats.

    Example: liverseg split
    """
    _run("split", params)


@app.command()
def train(model: str, params: Path = PARAMS) -> None:
    """Train MODEL: weights to models/MODEL, curves to reports/training.

    Example: liverseg train enhanced_pan (`liverseg models` lists the names)
    """
    _run("train", params, model)


@app.command()
def evaluate(model: str, params: Path = PARAMS) -> None:
    """Score MODEL on the validation split: reports/metrics/MODEL.json.

    Example: liverseg evaluate enhanced_pan
    """
    _run("evaluate", params, model)


@app.command()
def compare(params: Path = PARAMS) -> None:
    """One table over every model: reports/comparison.{csv,md,json}.

    Example: liverseg compare
    """
    _run("compare", params)


@app.command()
def register(params: Path = PARAMS) -> None:
    """Register the best model; the quality gate picks its MLflow alias.

    Passing the gate moves `champion` to it, failing moves `challenger`.

    Example: liverseg register
    """
    _run("register", params)


@app.command()
def report(params: Path = PARAMS) -> None:
    """Write reports/report.html and reports/report.md.

    Example: liverseg report, then open reports/report.html
    """
    _run("report", params)


def _fail(command: str, exc: Exception, code: int = 1) -> None:
    typer.secho(f"liverseg {command}: {redact(str(exc))}", fg="red", err=True)
    raise typer.Exit(code) from None


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
    """Where a registered model came from; does it still reproduce?

    The trail of a registered model (code, data, params, validation, metrics), checked
    against the workspace: does it still reproduce, and if not, what differs.

    Example: liverseg lineage models:/liverseg@champion
    """
    from mlflow.exceptions import MlflowException

    from liverseg.config import ConfigError
    from liverseg.provenance import lineage as lin
    from liverseg.tracking import TrackingUnavailable

    if (model_uri is None) == (data_hash is None):
        _fail("lineage", ValueError("give either MODEL_URI or --data-hash HASH"))
    try:
        with redacted_errors():
            info = (lin.find_data_hash(data_hash, params) if data_hash
                    else lin.describe(model_uri, params, run_dvc=dvc_status))
    except (ConfigError, ValueError, MlflowException, TrackingUnavailable) as exc:
        _fail("lineage", exc)
    if as_json or data_hash:
        typer.echo(json.dumps(info, indent=2, default=str))
    else:
        _print_trail(info)


@app.command()
def audit(
    model_uri: str = typer.Argument(..., help="models:/liverseg@champion, models:/liverseg/3, "
                                    "a version number or an MLflow run id."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object, for machines."),
    tolerance: float = typer.Option(DEFAULT_TOLERANCE, help="Absolute tolerance on metrics and "
                                    "curve when a "
                                    "GPU trained or rebuilt the model (CPU: bitwise)."),
    record: bool = typer.Option(True, "--record/--no-record",
                                help="Write the outcome as audit_* tags on the version."),
    keep: bool = typer.Option(False, "--keep", help="Keep the scratch workspace."),
    params: Path = PARAMS,
) -> None:
    """Rebuild a registered model from its trail and compare.

    Exit 0: identical (CPU) or within tolerance (GPU); 1: it differs; 2: it cannot be
    rebuilt. The outcome is written back as audit_* tags on the version.

    Example: liverseg audit models:/liverseg@champion --json
    """
    from mlflow.exceptions import MlflowException

    from liverseg.provenance import audit as aud
    from liverseg.tracking import TrackingUnavailable

    try:
        with redacted_errors():
            report = aud.audit(model_uri, Path(params).resolve().parent, tolerance, record,
                               keep)
    except (ValueError, MlflowException, TrackingUnavailable) as exc:
        _fail("audit", exc, code=2)
    typer.echo(json.dumps(report, indent=2, default=str) if as_json
               else "\n".join(aud.summary(report)))
    if report.get("error"):
        typer.secho(f"liverseg audit: {redact(report['error'])}", fg="red", err=True)
    raise typer.Exit(0 if report["passed"] else 1 if report["result"] == "differs" else 2)


@app.command()
def predict(
    inputs: list[Path] = INPUTS,
    model: str = MODEL_REF,
    out: Path = PREDICT_OUT,
    allow_nonfinite: bool = typer.Option(
        False, "--allow-nonfinite", help="Count NaN/inf voxels and mask them as background "
        "instead of refusing the volume."),
    hu_check: bool = typer.Option(
        True, "--hu-check/--no-hu-check", help="Refuse volumes whose values cannot be CT in "
        "Hounsfield units (within 0..1, almost constant, none below 0)."),
    dicomweb: str = typer.Option(None, "--dicomweb", help="Instead of INPUTS: a DICOMweb "
                                 "archive (QIDO/WADO/STOW-RS); each SEG is stored back."),
    study: list[str] = STUDIES,
    since: str = typer.Option(None, "--since", help="With --dicomweb: every CT study from "
                              "this StudyDate on (YYYYMMDD)."),
) -> None:
    """Segment scans: masks at input geometry, overlays, predictions.csv.

    Inputs: PNG/JPG slices, NIfTI volumes, folders, DICOM CT series (found by content;
    a series also gets a DICOM SEG). Volume masks keep the input's axes, affine and header.
    Every input gets a row in predictions.csv (done, refused with the rule, or skipped);
    size limits come from LIVERSEG_MAX_VOXELS, _MAX_SLICES, _MAX_SIDE, _MAX_BYTES.
    Exit 0: nothing refused; 2: some input refused (the others are done); 1: no model, no
    inputs, or the archive unreachable. Archive credentials: LIVERSEG_DICOMWEB_USER and
    _PASSWORD, or netrc.

    Example: liverseg predict --model models:/liverseg@champion volume-117.nii.gz --out pred
    """
    from liverseg.serving import predict as pred

    try:  # every exception is caught and redacted by _fail: no redacted_errors needed
        if bool(inputs) == bool(dicomweb) or (dicomweb and not (study or since)):
            raise ValueError("give INPUTS, or --dicomweb URL with --study UID or --since "
                             "YYYYMMDD")
        policy = pred.Policy(allow_nonfinite=allow_nonfinite, hu_check=hu_check)
        if dicomweb:
            from liverseg.serving import dicomweb as web

            summary = web.run(model, dicomweb, study or [], out, since, policy)
        else:
            summary = pred.run(model, inputs, out, policy)
    except Exception as exc:  # no model, no inputs, a tracking server down: one line
        _fail("predict", exc)
    typer.echo(json.dumps(summary, indent=2, default=str))
    if summary["refused"]:
        for reason in summary["refusals"]:
            typer.secho(f"liverseg predict: refused: {reason}", fg="red", err=True)
        typer.secho(f"liverseg predict: {summary['refused']} input(s) refused, the others "
                    f"done; {summary['summary']} has a row for each", fg="red", err=True)
        raise typer.Exit(2)


@app.command()
def export(
    fmt: str = typer.Option("onnx", "--format", "-f", help="Export format (onnx)."),
    out: Path = EXPORT_OUT,
    model: str = MODEL_REF,
) -> None:
    """Export to ONNX, checked against torch (max abs difference).

    Example: liverseg export --format onnx --out model.onnx
    """
    from liverseg.serving import export as exp

    try:
        with redacted_errors():
            summary = exp.run(model, fmt, out)
    except (FileNotFoundError, ValueError) as exc:
        _fail("export", exc)
    typer.echo(f"max abs diff vs torch: {summary['max_abs_diff']:.3g}", err=True)
    typer.echo(json.dumps(summary, indent=2, default=str))


@app.command()
def models(params: Path = PARAMS) -> None:
    """List the models the registry builds, with their parameter counts.

    Example: liverseg models
    """
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
