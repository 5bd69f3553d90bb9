"""The retraining job and its schedule (stopped by default; start it in the UI)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import yaml

from pipeline.resources import REPO_ROOT

retrain_job = dg.define_asset_job("retrain", selection=dg.AssetSelection.all(),
                                  description="The whole DVC pipeline, stage by stage.")


def retrain_schedule(root: Path = REPO_ROOT) -> dg.ScheduleDefinition:
    params = yaml.safe_load((root / "params.yaml").read_text()) or {}
    cron = params.get("schedule", {}).get("cron", "0 3 * * 1")
    return dg.ScheduleDefinition(name="weekly_retrain", job=retrain_job, cron_schedule=cron,
                                 default_status=dg.DefaultScheduleStatus.STOPPED)
