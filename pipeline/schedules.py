"""The retraining job and its schedule (stopped by default; start it in the UI)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from liverseg.config import load_params
from pipeline.resources import REPO_ROOT

# Every DVC stage; not the served-case monitoring, which reads live data (pipeline.monitoring).
# (By its kind, not its key: a selection of a missing key fails where it is not defined.)
retrain_job = dg.define_asset_job("retrain", selection=dg.AssetSelection.all()
                                  - dg.AssetSelection.tag("dagster/kind/monitoring", ""),
                                  description="The whole DVC pipeline, stage by stage.")


def retrain_schedule(root: Path = REPO_ROOT) -> dg.ScheduleDefinition:
    cron = load_params(root / "params.yaml").schedule.cron  # the default lives in config
    return dg.ScheduleDefinition(name="weekly_retrain", job=retrain_job, cron_schedule=cron,
                                 default_status=dg.DefaultScheduleStatus.STOPPED)
