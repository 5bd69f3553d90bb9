"""Asset metadata read from a stage's outputs and dvc.lock (never recomputed here).

The UI then shows what `dvc metrics show` and MLflow show: counts, split sizes, metrics, the
run link, the registered version and the data hashes DVC recorded for the outputs.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import dagster as dg

from liverseg import runner
from liverseg.artifacts import RUN, Artifacts
from liverseg.fanout.dvc_graph import Stage

MODEL_METRICS = ("fg_iou", "miou", "dice", "pixel_accuracy", "precision", "recall",
                 "best_epoch", "n_parameters", "images_per_second")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def csv_rows(path: Path) -> list[dict]:
    """A CSV's rows as text (a missing cell is empty); none when the file is absent."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{k: v or "" for k, v in row.items()} for row in csv.DictReader(f)]


def lock_hashes(root: Path, stage_name: str) -> dict[str, str]:
    """md5 of each output as dvc.lock records it: the data version this asset stands for."""
    return runner.locked_outs(runner.dvc_lock(root), stage_name)


def mlflow_run_url(run: dict, ui_url: str) -> str | None:
    """A link to the run: the tracking server itself when it is one, else `ui_url`."""
    if not run.get("run_id"):
        return None
    tracking = run.get("tracking_uri") or ""
    base = tracking if tracking.startswith(("http://", "https://")) else ui_url
    return f"{base.rstrip('/')}/#/experiments/{run.get('experiment_id', '0')}/runs/{run['run_id']}"


def _run_metadata(run: dict, ui_url: str) -> dict:
    url = mlflow_run_url(run, ui_url)
    return {"mlflow_run_id": run["run_id"], "mlflow_run": dg.MetadataValue.url(url)} if url else {}


def _ingest(stage: Stage, art: Artifacts, ui_url: str) -> dict:
    rows = csv_rows(art.raw_index)
    return {"slices": len(rows), "patients": len({r.get("patient_id") for r in rows})}


def _validate(stage: Stage, art: Artifacts, ui_url: str) -> dict:
    if not (v := read_json(art.validation)):
        return {}
    failed = [r["rule"] for r in v.get("rules", []) if not r.get("success")]
    quarantine = "\n".join(f"| {sid} | {', '.join(rules)} |"
                           for sid, rules in list(v.get("quarantine", {}).items())[:50])
    return {
        "gx_success": bool(v.get("success")), "ingested": v.get("ingested"),
        "accepted": v.get("accepted"), "quarantined": v.get("quarantined"),
        "rules": len(v.get("rules", [])), "failed_rules": ", ".join(failed) or "none",
        "warnings": "\n".join(v.get("warnings") or []) or "none",  # e.g. no patient ids
        "quarantine": dg.MetadataValue.md(
            f"| slice | rules broken |\n|---|---|\n{quarantine}" if quarantine else "none"),
    }


def _split(stage: Stage, art: Artifacts, ui_url: str) -> dict:
    stats = read_json(art.split_stats)
    meta = {k: stats[k] for k in ("mean", "std", "seed", "leakage_checked") if k in stats}
    for name in ("train", "val", "test"):
        part = stats.get(name)
        if isinstance(part, dict):
            meta |= {f"{name}_slices": part.get("slices"),
                     f"{name}_patients": len(part.get("patients", [])),
                     f"{name}_foreground_slices": part.get("foreground_slices")}
    return meta


def _model(stage: Stage) -> str:
    return stage.name.split("@", 1)[1]


def _train(stage: Stage, art: Artifacts, ui_url: str) -> dict:
    model = _model(stage)
    curve = csv_rows(art.curve(model))
    meta = {"model": model, "epochs": len(curve)}
    if curve:
        meta |= {f"last_{k}": float(curve[-1][k]) for k in ("val_loss", "val_fg_iou", "val_miou")
                 if curve[-1].get(k) not in (None, "")}
    return meta | _run_metadata(read_json(art.model_dir(model) / RUN), ui_url)


def _evaluate(stage: Stage, art: Artifacts, ui_url: str) -> dict:
    model = _model(stage)
    metrics = read_json(art.metrics(model))
    meta = {"model": model} | {k: metrics.get(k) for k in MODEL_METRICS if k in metrics}
    return meta | _run_metadata(read_json(art.model_dir(model) / RUN), ui_url)


def _compare(stage: Stage, art: Artifacts, ui_url: str) -> dict:
    c = read_json(art.comparison(".json"))
    table = art.comparison(".md")
    meta = {k: c.get(k) for k in ("rank_by", "best_model", "best_score", "runner_up",
                                  "margin_over_next") if k in c}
    meta["models"] = len(c.get("models", []))
    if table.is_file():
        meta["comparison"] = dg.MetadataValue.md(table.read_text())
    return meta


def _register(stage: Stage, art: Artifacts, ui_url: str) -> dict:
    if not (r := read_json(art.registry)):
        return {}
    meta = {k: r.get(k) for k in ("registered_model", "version", "alias", "passed",
                                  "quality_gate", "model") if k in r}
    # registry.json carries no tracking URI: take the run link from the model's run.json.
    run = read_json(art.model_dir(r["model"]) / RUN) if r.get("model") else {}
    return meta | _run_metadata(run | {"run_id": r.get("run_id")}, ui_url)


def _report(stage: Stage, art: Artifacts, ui_url: str) -> dict:
    html = art.report(".html")
    if not html.is_file():
        return {}
    return {"report": dg.MetadataValue.path(str(html)),
            "report_url": dg.MetadataValue.url(html.resolve().as_uri()),
            "report_kb": round(html.stat().st_size / 1024, 1)}


def _metrics_files(stage: Stage, art: Artifacts, ui_url: str) -> dict:
    """A stage added to dvc.yaml later: the scalar values of its JSON metrics files."""
    meta = {}
    for path in stage.metrics:
        data = read_json(art.path(path)) if path.endswith(".json") else {}
        meta |= {k: v for k, v in data.items()
                 if isinstance(v, int | float | str | bool) and len(str(v)) < 200}
    return meta


READERS: dict[str, Callable[[Stage, Artifacts, str], dict]] = {
    "ingest": _ingest, "validate": _validate, "split": _split, "train": _train,
    "evaluate": _evaluate, "compare": _compare, "register": _register, "report": _report,
}


def stage_metadata(stage: Stage, root: Path, ui_url: str = "http://127.0.0.1:5000") -> dict:
    """Everything the UI shows for one materialisation of `stage` (None values dropped)."""
    meta = {"dvc_stage": stage.name, "outputs": ", ".join(stage.outs)}
    meta |= {f"md5 {path}": md5 for path, md5 in lock_hashes(root, stage.name).items()}
    meta |= READERS.get(stage.group, _metrics_files)(stage, Artifacts(root), ui_url)
    return {k: v for k, v in meta.items() if v is not None}
