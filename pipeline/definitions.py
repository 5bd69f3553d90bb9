"""The Dagster code location: `dagster dev -m pipeline.definitions`."""

from __future__ import annotations

import os

for _var, _value in {"DAGSTER_DISABLE_TELEMETRY": "1", "DVC_NO_ANALYTICS": "1",
                     "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
    os.environ.setdefault(_var, _value)

import dagster as dg  # noqa: E402

from pipeline.assets import build_assets  # noqa: E402
from pipeline.resources import DvcResource, MlflowResource  # noqa: E402
from pipeline.schedules import retrain_job, retrain_schedule  # noqa: E402

defs = dg.Definitions(
    assets=build_assets(),
    jobs=[retrain_job],
    schedules=[retrain_schedule()],
    resources={"dvc": DvcResource(), "mlflow": MlflowResource()},
    # Stages share one DVC workspace and its lock: run them one at a time, in order.
    executor=dg.in_process_executor,
)
