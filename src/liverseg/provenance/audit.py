"""`liverseg audit REF`: rebuild a registered model from its trail and show it is the same model.

`lineage` compares the trail with the workspace (a promise); the audit re-executes it (a proof):

1. The version and its trail (`lineage.trail`). A trail recorded from a dirty tree is refused:
   the commit does not hold the code that trained the model.
2. What the registry holds: the version's `model.safetensors` + `config.json` and its run's
   training curve (`<model>.csv`).
3. The rebuild (`rebuild`): a scratch clone at the recorded commit with the recorded data,
   its params.yaml checked against the registered config.json, then the commit's `train` and
   `evaluate`, tracking off.
4. The comparison (`comparison`): weights, recorded metrics and training curve, bitwise on
   CPU, within `tolerance` when a GPU was involved.
5. The outcome is written back as `audit_*` tags on the version (`lineage` shows them).

This module owns the order of those steps, the registry's side and the report. Plain
functions: no Dagster; git and DVC only as commands (`liverseg.runner`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from liverseg import tracking
from liverseg.artifacts import CONFIG, WEIGHTS, Artifacts
from liverseg.checkpoint import read_config
from liverseg.provenance import DEFAULT_TOLERANCE, lineage
from liverseg.provenance.comparison import (
    compare_curves,
    compare_metrics,
    compare_weights,
    judge_mode,
)
from liverseg.provenance.rebuild import (
    AuditError,
    clone_at,
    commit_params,
    fetch_data,
    params_differences,
    rebuild,
    rebuild_env,
)

PASSING = ("identical", "within tolerance")


# ----------------------------------------------------------------------------- registry


def registered_files(client, version, dest: Path) -> dict[str, Path | None]:
    """The version's weights and config, and its run's training curve (None if absent)."""
    from mlflow.artifacts import download_artifacts

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # --json stays clean
    local = Path(download_artifacts(artifact_uri=f"models:/{version.name}/{version.version}",
                                    dst_path=str(dest / "registry")))
    files = {name: next(local.rglob(name), None) for name in (WEIGHTS, CONFIG)}
    for name, path in files.items():
        if path is None:
            raise AuditError(f"version {version.version}: the registered model ({version.source}) "
                             f"has no {name}")
    model = version.tags.get("model")
    try:
        curve = Path(client.download_artifacts(version.run_id, f"{model}.csv",
                                               str(dest / "registry")))
    except Exception:  # MlflowException / OSError: an older run without the curve
        curve = None
    return {"weights": files[WEIGHTS], "config": files[CONFIG],
            "curve": curve}


def record(client, version, report: dict) -> None:
    """The outcome as `audit_*` tags on the version (newest audit wins)."""
    tags = {"audit_at": report["audited_at"], "audit_by": report["audited_by"],
            "audit_result": report["result"], "audit_mode": report.get("mode") or "",
            "audit_seconds": str(report["seconds"]["total"]),
            "audit_differences": lineage.truncate(json.dumps(report["differences"]))}
    for key, value in tags.items():
        client.set_model_version_tag(version.name, version.version, key, value)


# ----------------------------------------------------------------------------- the audit


def _prepare(client, version, trail: dict, root: Path, work: Path) -> dict:
    """Registry files, the clone at the commit with its data, and the params checked."""
    if trail["git_dirty"] != "false":
        raise AuditError(f"version {version.version} was registered from a dirty tree "
                         f"(git_dirty {trail['git_dirty']}: {trail['git_dirty_files'] or '?'}): "
                         f"commit {trail['git_commit']} does not hold the code that trained it, "
                         "so it cannot be rebuilt")
    start = time.perf_counter()
    files = registered_files(client, version, work)
    config = json.loads(files["config"].read_text())
    if "params" not in config:
        raise AuditError(f"version {version.version}: the registered config.json records no "
                         "params, so there is nothing to rebuild with")
    src = clone_at(root, trail["git_commit"], work / "repo")
    checkout = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    data = fetch_data(root, trail["data_hashes"], work, src)
    device = str(config.get("device", "cpu"))
    env = rebuild_env(src, cpu_only=device.startswith("cpu"))
    committed = commit_params(src, env)
    if diffs := params_differences(config["params"], committed):
        raise AuditError(f"params.yaml at commit {trail['git_commit'][:12]} differs from the "
                         f"params version {version.version} was trained with (its config.json): "
                         + "; ".join(diffs[:10]) + ": the trail is inconsistent")
    return {"files": files, "src": src, "env": env, "device": device, "data": data,
            "params": {"agree": True, "params_hash_recorded": trail["params_hash"],
                       "params_hash_commit": lineage.params_hash(committed)},
            "seconds": {"checkout": checkout, "data": round(time.perf_counter() - start, 1)}}


def _compare(ws: dict, trail: dict, tolerance: float) -> dict:
    """The rebuilt model (in the clone) against the registry's, the recorded metrics and
    the logged curve."""
    model, files, rebuilt = trail["model"], ws["files"], Artifacts(ws["src"])
    rebuilt_device = str(read_config(rebuilt.model_dir(model)).get("device", "?"))
    mode, why = judge_mode(ws["device"], rebuilt_device, tolerance)
    tol = 0.0 if mode == "bitwise" else tolerance
    weights = compare_weights(files["weights"], rebuilt.model_dir(model) / WEIGHTS,
                              trail.get("weights_sha256"), None if mode == "bitwise" else tol)
    metrics = compare_metrics(trail["metrics"], rebuilt.read_metrics(model), tol)
    curve = compare_curves(files["curve"], rebuilt.curve(model), tol)
    differences = weights["differences"] + metrics["differences"] + curve["differences"]
    passed = "identical" if mode == "bitwise" else "within tolerance"
    return {"mode": mode, "tolerance": tol, "why": why,
            "device": {"recorded": ws["device"], "rebuilt": rebuilt_device},
            "weights": weights, "metrics": metrics, "curve": curve,
            "differences": differences, "result": "differs" if differences else passed}


def _rebuild_and_compare(client, version, trail: dict, root: Path, work: Path,
                         tolerance: float, log) -> dict:
    ws = _prepare(client, version, trail, root, work)
    seconds = ws["seconds"] | rebuild(ws["src"], trail["model"], ws["env"], log)
    start = time.perf_counter()
    outcome = _compare(ws, trail, tolerance)
    seconds["compare"] = round(time.perf_counter() - start, 1)
    return outcome | {"threads": os.environ.get("OMP_NUM_THREADS"), "params": ws["params"],
                      "data": ws["data"], "seconds": seconds}


def default_model_name(root: Path) -> str:
    try:
        from liverseg.config import load_params

        return load_params(root / "params.yaml").register_.model_name
    except (ValueError, OSError):  # ConfigError is a ValueError
        return "liverseg"


def audit(ref: str, root: str | Path = ".", tolerance: float = DEFAULT_TOLERANCE,
          write_tags: bool = True, keep: bool = False, log=None) -> dict:
    """Rebuild the version `ref` names and compare it with the registry. Raises for a ref or
    registry that cannot be read (nothing to record on); otherwise returns the report, whose
    `result` is identical, within tolerance, differs or not rebuilt (with `error`)."""
    root, log = Path(root).resolve(), log or (lambda text: print(text, file=sys.stderr))
    started = time.perf_counter()
    client = tracking.mlflow().MlflowClient()  # an unreachable server fails here, in seconds
    version = lineage.resolve_version(client, ref, default_model_name(root))
    trail = lineage.trail(client, version)
    report = {k: trail[k] for k in ("registered_model", "model_version", "model", "run_id",
                                    "git_commit")}
    work = Path(tempfile.mkdtemp(prefix="liverseg-audit-"))
    try:
        report |= _rebuild_and_compare(client, version, trail, root, work, tolerance, log)
    except AuditError as exc:
        report |= {"result": "not rebuilt", "error": str(exc), "differences": [str(exc)],
                   "seconds": {}}
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    report["seconds"]["total"] = round(time.perf_counter() - started, 1)
    report |= {"passed": report["result"] in PASSING, "workspace": str(work) if keep else None,
               "audited_at": datetime.now(UTC).isoformat(timespec="seconds"),
               "audited_by": lineage.who(), "recorded": write_tags}
    if write_tags:
        record(client, version, report)
    return report


def summary(report: dict) -> list[str]:
    """The report as lines for people (--json prints all of it)."""
    lines = [f"audit of {report['registered_model']} version {report['model_version']} "
             f"({report['model']}, run {report['run_id']}, commit {report['git_commit']})"]
    if report.get("mode"):
        lines.append(f"mode: {report['mode']}: {report['why']}")
        weights = report["weights"]
        lines.append(f"weights: {'identical' if weights['identical'] else 'differ'} "
                     f"(rebuilt sha256 {weights['rebuilt_sha256']})")
        lines.append(f"metrics: {len(report['metrics']['compared'])} compared")
        lines.append(f"curve: {report['curve'].get('epochs', 'not')} epochs compared")
    for line in report["differences"]:
        lines.append(f"  differs: {line}")
    lines.append(f"result: {report['result']} ({report['seconds']['total']} s; "
                 f"{'recorded on the version' if report['recorded'] else 'not recorded'})")
    return lines
