"""Asset checks on the stage outputs: plain file reads, so a check can be re-run alone.

Blocking checks (validation, split leakage) fail with severity ERROR when the data must
not flow on: Dagster then skips every downstream asset of the run. The audit check on
`register` is the exception to "plain file reads": it rebuilds the registered model
(`liverseg audit`, minutes), so it is non-blocking, skipped in the scheduled `retrain` job and
registered apart from `build_checks` (see `build_audit_check`). The GX suite itself ran
in the validate stage (GX 1.x); its result is reports/validation.json, which is read here
rather than re-validated, so the check and the stage can never disagree.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import dagster as dg

from liverseg import artifacts, runner
from liverseg.artifacts import Artifacts
from liverseg.config import Params, load_params, parse_params
from liverseg.fanout.dvc_graph import Stage
from pipeline.assets import asset_key
from pipeline.metadata import csv_rows, read_json
from pipeline.resources import DvcResource, MlflowResource

WARN, ERROR = dg.AssetCheckSeverity.WARN, dg.AssetCheckSeverity.ERROR


def _params(root: Path) -> Params:
    """params.yaml through config (so its defaults are config's); the defaults if absent."""
    file = root / "params.yaml"
    return load_params(file) if file.is_file() else parse_params({})


def validation_result(root: Path) -> dg.AssetCheckResult:
    """Pass: the suite passed. WARN: rows failed but quarantine holds them within policy.
    ERROR (blocks downstream): no report, counts that do not reconcile, a failure that is
    not attributable to slices, or more quarantine than validate.* allows."""
    v = read_json(Artifacts(root).validation)
    if not v:
        return dg.AssetCheckResult(passed=False, severity=ERROR,
                                   description=f"{artifacts.VALIDATION} is missing")
    cfg = _params(root).validate_
    n, accepted, quarantined = v.get("ingested", 0), v.get("accepted", 0), v.get("quarantined", 0)
    failed = [r for r in v.get("rules", []) if not r.get("success")]
    meta = {"ingested": n, "accepted": accepted, "quarantined": quarantined,
            "failed_rules": ", ".join(r["rule"] for r in failed) or "none"}
    limit = cfg.max_quarantine_fraction
    problems = [msg for bad, msg in [
        (n == 0, "no slices ingested"),
        (n != accepted + quarantined,
         f"counts do not reconcile: {n} != {accepted} + {quarantined}"),
        (any(not r.get("failing_slices") for r in failed),
         "a rule failed without naming slices (nothing to quarantine)"),
        (v.get("policy", cfg.policy) == "fail" and quarantined > 0,
         "validate.policy=fail and slices failed"),
        (quarantined > limit * n,
         f"quarantined {quarantined}/{n} > max_quarantine_fraction {limit}"),
    ] if bad]
    if problems:
        return dg.AssetCheckResult(passed=False, severity=ERROR, metadata=meta,
                                   description="; ".join(problems))
    if not v.get("success"):
        return dg.AssetCheckResult(passed=False, severity=WARN, metadata=meta,
                                   description=f"{quarantined} slices quarantined (within policy)")
    return dg.AssetCheckResult(passed=True, metadata=meta, description="the suite passed")


def leakage_result(root: Path) -> dg.AssetCheckResult:
    """Recomputed from the split CSVs: no patient may appear in two splits."""
    splits = {p.stem: csv_rows(p) for p in sorted(Artifacts(root).splits.glob("*.csv"))}
    if not splits.get("train") or not splits.get("val"):
        return dg.AssetCheckResult(passed=False, severity=ERROR,
                                   description=f"{artifacts.SPLITS}/{{train,val}}.csv missing "
                                   "or empty")
    owners: dict[str, set[str]] = {}
    for name, rows in splits.items():
        for row in rows:
            owners.setdefault(row["patient_id"], set()).add(name)
    leaked = {p: sorted(s) for p, s in sorted(owners.items()) if len(s) > 1}
    meta = {f"{name}_patients": len({r["patient_id"] for r in rows})
            for name, rows in splits.items()}
    meta["leaked_patients"] = ", ".join(f"{p} ({'/'.join(s)})" for p, s in leaked.items()) or "none"
    return dg.AssetCheckResult(passed=not leaked, severity=ERROR, metadata=meta,
                               description=f"{len(leaked)} patients in more than one split"
                               if leaked else "every patient is in exactly one split")


def quality_gate_result(root: Path, model: str) -> dg.AssetCheckResult:
    """The register stage's gate, per model (WARN: a weak baseline is not an error)."""
    path = Artifacts(root).metrics(model)
    metrics = read_json(path)
    gate = _params(root).register_
    thresholds = {"fg_iou": gate.min_fg_iou, "dice": gate.min_dice}
    if not metrics:
        return dg.AssetCheckResult(passed=False, severity=WARN,
                                   description=f"{path.relative_to(root)} is missing")
    # null = undefined (no foreground anywhere): it cannot pass a gate.
    failing = [f"{k} {metrics.get(k)} < {t}" for k, t in thresholds.items()
               if metrics.get(k) is None or metrics[k] < t]
    meta = {k: metrics.get(k) for k in thresholds if metrics.get(k) is not None}
    meta |= {f"min_{k}": t for k, t in thresholds.items()}
    return dg.AssetCheckResult(passed=not failing, severity=WARN, metadata=meta,
                               description="; ".join(failing) or "passes the register gate")


def report_result(root: Path) -> dg.AssetCheckResult:
    html = Artifacts(root).report(".html")
    ok = html.is_file() and html.stat().st_size > 0 and "<html" in html.read_text()[:2000].lower()
    return dg.AssetCheckResult(
        passed=ok, severity=ERROR, description=None if ok else f"{artifacts.REPORT}.html missing",
        metadata={"report": dg.MetadataValue.path(str(html))} if ok else {})


def build_checks(stages: dict[str, Stage]) -> list[dg.AssetChecksDefinition]:
    """The checks for the stages that exist in dvc.yaml (matrix items included)."""
    checks = []

    def add(stage_name: str, name: str, fn, blocking: bool = False, description: str = ""):
        @dg.asset_check(asset=asset_key(stage_name), name=name, blocking=blocking,
                        description=description)
        def _check(dvc: DvcResource) -> dg.AssetCheckResult:
            return fn(dvc.root)

        checks.append(_check)

    if "validate" in stages:
        add("validate", "gx_validation", validation_result, blocking=True,
            description="Great Expectations suite result (reports/validation.json), blocking")
    if "split" in stages:
        add("split", "no_patient_leakage", leakage_result, blocking=True,
            description="No patient in two splits (recomputed from data/splits/*.csv), blocking")
    for name in stages:
        if name.startswith("evaluate@"):
            model = name.split("@", 1)[1]
            add(name, "quality_gate", lambda root, m=model: quality_gate_result(root, m),
                description="fg_iou >= register.min_fg_iou and dice >= register.min_dice")
    if "report" in stages:
        add("report", "report_present", report_result, description="reports/report.html exists")
    return checks


# ----------------------------------------------------------------------------- the audit

AUDIT_CHECK = "audit_rebuild"
# The job the weekly schedule and the data sensor launch: an audit retrains the model, which
# would double every scheduled run. Run the check from the UI (register -> Checks -> Execute).
UNAUDITED_JOBS = {"retrain"}


def run_audit(root: Path, ref: str, env: dict[str, str]) -> tuple[dict, str]:
    """`liverseg audit REF --json` in the repository (its own process: it trains); returns
    (the report, or {} when none came back; the end of stderr)."""
    proc = runner.run([sys.executable, "-m", "liverseg", "audit", ref, "--json"], cwd=root,
                      env=os.environ | env | {"PATH": runner.tools_path()}, timeout=None)
    try:
        return json.loads(proc.stdout), proc.stderr[-2000:]
    except json.JSONDecodeError:
        return {}, (proc.stderr or proc.stdout)[-2000:]


def audit_result(root: Path, env: dict[str, str]) -> dg.AssetCheckResult:
    """The version register wrote to reports/registry.json, rebuilt and compared (WARN)."""
    registry = read_json(Artifacts(root).registry)
    key = dg.AssetCheckKey(asset_key("register"), AUDIT_CHECK)
    if not registry:
        return dg.AssetCheckResult(asset_key=key.asset_key, check_name=key.name, passed=False,
                                   severity=WARN, description=f"{artifacts.REGISTRY} is "
                                   "missing: nothing registered to audit")
    ref = f"models:/{registry['registered_model']}/{registry['version']}"
    report, errors = run_audit(root, ref, env)
    if not report:
        return dg.AssetCheckResult(asset_key=key.asset_key, check_name=key.name, passed=False,
                                   severity=WARN, description=f"`liverseg audit {ref}` failed: "
                                   f"{errors.strip().splitlines()[-1] if errors.strip() else '?'}",
                                   metadata={"stderr": dg.MetadataValue.text(errors)})
    meta = {"version": ref, "result": report["result"], "mode": report.get("mode") or "n/a",
            "seconds": report["seconds"]["total"],
            "differences": dg.MetadataValue.text("\n".join(report["differences"]) or "none")}
    return dg.AssetCheckResult(asset_key=key.asset_key, check_name=key.name,
                               passed=report["passed"], severity=WARN, metadata=meta,
                               description=f"{ref}: {report['result']}"
                               + (f" ({report['mode']})" if report.get("mode") else ""))


def build_audit_check(stages: dict[str, Stage]) -> list[dg.AssetChecksDefinition]:
    """The audit of the registered version, on `register` (empty without that stage)."""
    if "register" not in stages:
        return []
    spec = dg.AssetCheckSpec(AUDIT_CHECK, asset=asset_key("register"), blocking=False,
                             description="Rebuild the registered version from its trail "
                             "(`liverseg audit`: retrains); not run by the retrain job")

    @dg.multi_asset_check(specs=[spec], can_subset=True, name=AUDIT_CHECK)
    # `context` unannotated: under postponed annotations Dagster would see a string, refuse it
    def _audit(context, dvc: DvcResource, mlflow: MlflowResource):
        if context.run.job_name in UNAUDITED_JOBS:  # no result: Dagster shows it skipped
            context.log.info(f"{AUDIT_CHECK} skipped in the {context.run.job_name} job")
            return
        yield audit_result(dvc.root, mlflow.env() | {"LIVERSEG_DVC": dvc.executable})

    return [_audit]
