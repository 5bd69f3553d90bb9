"""After deployment the pipeline keeps watching (DESIGN rule 12): the served cases as an
asset, with a drift check per group of facts.

`served_cases` reads the served-case store (`MonitoringResource.directory`, which every
predict, PACS and REST process appends to as its LIVERSEG_MONITORING_DIR), takes the most
recent `last_cases` rows of the model `MonitoringResource.model` resolves to (the
champion), and compares them with that version's reference (evaluate's rows of its
validation cases, logged by register as `monitoring/reference.json`): one asset check per
group (header, intensity, output, confidence; `liverseg.monitoring.drift`): WARN when a
feature of the group drifts, ERROR when at least half of them do; a group the reference
lacks (DICOM header facts of a model trained on NIfTI or PNG) passes as skipped, saying so.
A fifth check follows clinicians' corrections of the champion's SEGs (measured at ingest
by the dicom source). It writes a monitoring page (`<directory>/page/index.html`, a figure
per drifted feature) and `<directory>/status.json`, each check's status, which the
`retrain_on_evidence` sensor reads: an ERROR starts the `retrain` job, saying why in the
run's tags; promotion still goes only through register's gate.

This asset reads live data, not a versioned input: it is the one asset that is not a DVC
stage (DESIGN rule 1's only exception). It is not in the `retrain` job, takes no slot of
the DVC workspace pool, and `dvc repro` never sees it.
"""

# No `from __future__ import annotations`: Dagster inspects the `context` type hint at runtime.
import html
import json
import tempfile
import time
from pathlib import Path

import dagster as dg

from liverseg import tracking
from liverseg.artifacts import Artifacts
from liverseg.dicom.seg_writer import seg_description
from liverseg.io import atomic_dir, atomic_path
from liverseg.monitoring import drift
from liverseg.monitoring.store import ServedCaseStore
from liverseg.stages.register import MONITORING_REFERENCE
from pipeline.assets import GROUP
from pipeline.resources import DvcResource, MlflowResource, MonitoringResource

KEY = dg.AssetKey("served_cases")
STATUS = "status.json"  # in the store's directory: each check's last status
SEVERITY = {"WARN": dg.AssetCheckSeverity.WARN, "ERROR": dg.AssetCheckSeverity.ERROR}


def champion_reference(model_ref: str):
    """(the version `model_ref` names, the reference logged with it or None)."""
    from liverseg.provenance.lineage import resolve_version

    client = tracking.mlflow().MlflowClient()
    version = resolve_version(client, model_ref)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(version.run_id, MONITORING_REFERENCE, tmp)
        except Exception:  # MlflowException / OSError: registered before references existed
            return version, None
        return version, json.loads(Path(path).read_text())


def validation_dice(root: Path, model: str) -> list[float]:
    """The model's per-image validation Dice in the workspace `root` (evaluate's CSV)."""
    import pandas as pd

    path = Artifacts(root).per_image(model)
    return pd.read_csv(path)["dice"].dropna().tolist() if path.is_file() else []


def write_page(results: dict, reference: dict, current, model: str, out: Path) -> None:
    """index.html: each group's status and features; a figure per drifted feature."""
    with atomic_dir(out) as tmp:
        parts = [f"<h1>Served cases against {html.escape(model)}</h1>",
                 f"<p>{len(current)} most recent served cases.</p>"]
        for group, result in results.items():
            parts.append(f"<h2>{group}: {result.status}</h2><p>{html.escape(result.reason)}</p>"
                         "<table><tr><th>feature</th><th>test</th><th>statistic</th>"
                         "<th>drifted</th></tr>")
            for name, stats in result.features.items():
                parts.append(f"<tr><td>{html.escape(name)}</td><td>{stats.get('test', '')}</td>"
                             f"<td>{stats.get('statistic', '')}</td>"
                             f"<td>{stats.get('drifted', '')}</td></tr>")
            parts.append("</table>")
            for name in result.drifted:
                figure = drift.figure(reference, current, name, tmp / f"{name}.png")
                parts.append(f'<img src="{figure.name}" alt="{html.escape(name)}">')
        (tmp / "index.html").write_text("<!doctype html><meta charset=utf-8>"
                                        "<title>liverseg monitoring</title>" + "".join(parts))


@dg.multi_asset(
    # The stages' group: the UI draws one group open (several start collapsed).
    specs=[dg.AssetSpec(KEY, group_name=GROUP, kinds={"monitoring"},
                        description="The most recent served cases (live, not a DVC stage)")],
    check_specs=[dg.AssetCheckSpec(f"{group}_drift", asset=KEY,
                                   description=f"{group} facts of served cases against the "
                                               "champion's validation cases")
                 for group in drift.GROUPS]
    + [dg.AssetCheckSpec("corrections", asset=KEY,
                         description="clinicians' corrections of the champion's SEGs against "
                                     "its control limit")],
)
def served_cases(context: dg.AssetExecutionContext, monitoring: MonitoringResource,
                 mlflow: MlflowResource, dvc: DvcResource):
    import os

    os.environ.update(mlflow.env())
    version, reference = champion_reference(monitoring.model)
    model = f"{version.name} v{version.version}"
    rows = ServedCaseStore(monitoring.directory).read()
    if "model_version" in rows:  # the champion's own cases, then the most recent of them
        rows = rows[rows["model_version"].astype(str) == str(version.version)]
    rows = rows.tail(monitoring.last_cases)
    page = Path(monitoring.directory) / "page"
    yield dg.MaterializeResult(asset_key=KEY, metadata={
        "cases": len(rows), "model": model, "store": monitoring.directory,
        "page": dg.MetadataValue.path(str(page / "index.html"))})
    name = version.tags.get("model", "")
    corrections = correction_result(Artifacts(dvc.root).raw,  # the DVC workspace's data
                                    seg_description(name, str(version.version)),
                                    validation_dice(dvc.root, name))
    status = {"model": model, "time": time.time(),
              "corrections": "OK" if corrections.passed else "ERROR"}
    yield corrections
    results = drift.check(reference, rows) if reference is not None else {}
    if reference is not None:
        write_page(results, reference, rows, model, page)
    status |= {group: r.status for group, r in results.items()}
    with atomic_path(Path(monitoring.directory) / STATUS) as tmp:
        tmp.write_text(json.dumps(status, indent=1))
    if reference is None:
        for group in drift.GROUPS:
            yield dg.AssetCheckResult(asset_key=KEY, check_name=f"{group}_drift", passed=True,
                                      description=f"skipped: {model} has no reference")
        return
    for group, result in results.items():
        yield dg.AssetCheckResult(
            asset_key=KEY, check_name=f"{group}_drift",
            passed=result.status in ("OK", "SKIPPED"),
            severity=SEVERITY.get(result.status, dg.AssetCheckSeverity.WARN),
            description=f"{result.status}: {result.reason}",
            metadata={"status": result.status, "drifted": dg.MetadataValue.json(result.drifted),
                      "features": dg.MetadataValue.json(result.features)})


# ----------------------------------------------------------------------------- corrections

BASELINE = 10  # a version's first corrected cases set its control limit
ROLLING = 10  # the rolling mean compared with it


def correction_result(raw_dir: Path, description: str, validation_dice: list[float]
                      ) -> dg.AssetCheckResult:
    """How much clinicians change the version's SEGs (`description`: its SeriesDescription,
    `liverseg <model> <version>`), from the corrections ingest measured (data/raw): passes
    while the rolling mean Dice of the last ROLLING corrections stays at or above the
    control limit, mean - 3 sd of its first BASELINE corrections, or until BASELINE exist,
    of its validation per-image Dice."""
    import numpy as np

    from liverseg.data.layout import read_index

    index = read_index(raw_dir) if (raw_dir / "slices.csv").is_file() else None
    rows = [] if index is None else [
        (str(r.corrected_at), json.loads(r.label_creator), float(r.correction_dice))
        for r in index.itertuples() if str(r.correction_dice) not in ("", "nan")]
    dice = [d for _, creator, d in sorted(rows, key=lambda row: row[0])  # as they came
            if creator.get("SeriesDescription") == description]
    if not dice:
        return dg.AssetCheckResult(asset_key=KEY, check_name="corrections", passed=True,
                                   description=f"no corrections of {description} yet")
    base, source = (dice[:BASELINE], f"its first {BASELINE} corrections") \
        if len(dice) >= BASELINE else (validation_dice, "its validation per-image Dice")
    limit = float(np.mean(base) - 3 * np.std(base)) if base else 0.0
    rolling = float(np.mean(dice[-ROLLING:]))
    meta = {"corrections": len(dice), "rolling_dice": rolling, "control_limit": limit,
            "limit_from": source}
    return dg.AssetCheckResult(
        asset_key=KEY, check_name="corrections", passed=rolling >= limit,
        severity=dg.AssetCheckSeverity.ERROR, metadata=meta,
        description=f"rolling correction Dice {rolling:.3f} "
                    f"{'>=' if rolling >= limit else '<'} control limit {limit:.3f} ({source})")


# ----------------------------------------------------------------------------- the trigger

monitor_job = dg.define_asset_job("monitor", selection=dg.AssetSelection.assets(KEY),
                                  description="The served cases and their checks.")
monitor_schedule = dg.ScheduleDefinition(name="hourly_monitoring", job=monitor_job,
                                         cron_schedule="0 * * * *",
                                         default_status=dg.DefaultScheduleStatus.STOPPED)


def evidence(status: dict) -> list[str]:
    """The checks whose ERROR is evidence enough to retrain."""
    return sorted(k for k, v in status.items() if v == "ERROR")


@dg.sensor(name="retrain_on_evidence", job_name="retrain", minimum_interval_seconds=60,
           default_status=dg.DefaultSensorStatus.STOPPED,
           description="Runs the pipeline when a drift or correction check of the served "
                       "cases is ERROR; the run's tags say which. The gate still decides.")
def retrain_on_evidence(context: dg.SensorEvaluationContext, monitoring: MonitoringResource):
    path = Path(monitoring.directory) / STATUS
    if not path.is_file():
        return dg.SkipReason(f"no monitoring status yet ({path})")
    status = json.loads(path.read_text())
    failed = evidence(status)
    if not failed:
        return dg.SkipReason(f"every check of {status.get('model')} passes")
    # Once per champion and set of failing checks: a drift that persists does not retrain
    # again every hour; a new champion, or another check failing, does.
    key = f"evidence-{status.get('model')}-{'+'.join(failed)}"
    if context.cursor == key:
        return dg.SkipReason(f"{', '.join(failed)} of {status.get('model')} already started a run")
    context.update_cursor(key)
    return dg.RunRequest(run_key=key, tags={"liverseg/trigger": "retrain_on_evidence",
                                            "liverseg/evidence": ", ".join(failed),
                                            "liverseg/champion": str(status.get("model"))})
