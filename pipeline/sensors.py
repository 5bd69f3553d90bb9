"""Sensors: retrain when the configured data source changes and enough labelled cases
arrived (`retrain.min_new_labels`, `liverseg.arrivals`); record every failed run.

Both are STOPPED by default, like the schedule: a team turns them on in the UI
(Automation tab) for the deployment that should retrain on its own.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import dagster as dg

from liverseg.arrivals import arrived, labelled_cases
from liverseg.config import load_params
from liverseg.data.listing import fingerprint
from liverseg.redact import redact
from pipeline.resources import REPO_ROOT, DvcResource
from pipeline.schedules import retrain_job


def source_fingerprint(root: Path) -> str:
    """What ingest reads, hashed (`liverseg.data.listing`, the `source` stage's own listing):
    params `seed` + `data` and the names, sizes and SHA-256s of the files under data.path,
    each file read once (then known by its stat), so the sensor can tick every minute."""
    return fingerprint(load_params(root / "params.yaml"), root)


@dg.sensor(name="data_source_changed", job=retrain_job, minimum_interval_seconds=60,
           default_status=dg.DefaultSensorStatus.STOPPED,
           description="Runs the pipeline when the configured data source changes (params "
                       "`data`, or the files under data.path) and at least "
                       "`retrain.min_new_labels` labelled cases arrived since its last run.")
def data_source_sensor(context: dg.SensorEvaluationContext, dvc: DvcResource):
    params = load_params(dvc.root / "params.yaml")
    current = fingerprint(params, dvc.root)  # params read once per tick
    cursor = json.loads(context.cursor) if context.cursor else None
    if cursor is None:  # first tick: remember the source; what is there now is no change
        context.update_cursor(json.dumps({"fingerprint": current, "changes": 0,
                                          "cases": labelled_cases(params, dvc.root)}))
        return dg.SkipReason(f"recorded the data source fingerprint {current}")
    if cursor["fingerprint"] == current:
        return dg.SkipReason(f"data source unchanged ({current})")
    # Counted only when the source changed (planning reads headers); None: not countable
    # (Kaggle, a source ingest would refuse), so any change counts, as before.
    cases, need = labelled_cases(params, dvc.root), params.retrain.min_new_labels
    new = None if cases is None or cursor.get("cases") is None else \
        arrived(cursor["cases"], cases)
    if new is not None and len(new) < need:
        context.update_cursor(json.dumps(cursor | {"fingerprint": current}))
        return dg.SkipReason(f"{len(new)} labelled case(s) new or relabelled since the last "
                             f"run ({', '.join(new[:5]) or 'none'}); retrain.min_new_labels "
                             f"is {need}")
    changes = cursor["changes"] + 1
    context.update_cursor(json.dumps({"fingerprint": current, "changes": changes,
                                      "cases": cases}))
    evidence = (f"{len(new)} labelled case(s) new or relabelled (retrain.min_new_labels "
                f"{need})" if new is not None else "source changed (labelled cases not countable)")
    # The run key makes a retried tick launch one run, not two; the counter lets a source
    # that changes back to an earlier state still trigger.
    return dg.RunRequest(run_key=f"data-change-{changes}-{current}",
                         tags={"liverseg/trigger": "data_source_changed",
                               "liverseg/evidence": evidence,
                               "liverseg/data_fingerprint": current})


def failures_log(instance_root: str | None = None) -> Path:
    home = os.environ.get("DAGSTER_HOME") or instance_root or str(REPO_ROOT / ".dagster_home")
    return Path(home) / "failures.jsonl"


def _messages(error) -> str:
    """The error and its causes, outermost first (Dagster wraps the op's own exception)."""
    chain = []
    while error is not None:
        chain.append(error.message.strip())
        error = error.cause
    return " <- ".join(chain)


@dg.run_failure_sensor(name="record_run_failure", default_status=dg.DefaultSensorStatus.STOPPED,
                       description="Appends every failed run to $DAGSTER_HOME/failures.jsonl.")
def record_run_failure(context: dg.RunFailureSensorContext):
    run = context.dagster_run
    steps = {e.step_key: _messages(e.event_specific_data.error)
             for e in context.get_step_failure_events()
             if e.step_key and e.event_specific_data and e.event_specific_data.error}
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_id": run.run_id,
              "job": run.job_name, "tags": dict(run.tags),
              "message": context.failure_event.message, "failed_steps": steps}
    path = failures_log(getattr(context.instance, "root_directory", None))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:  # one JSON line per failure: append-only, greppable
        f.write(redact(json.dumps(record, default=str)) + "\n")
    context.log.error(redact(f"run {run.run_id} of {run.job_name} failed: {record['message']}"))
