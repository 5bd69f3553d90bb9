"""The Dagster code location: `dagster dev -m pipeline.definitions`."""

from __future__ import annotations

from liverseg.offline import disable_telemetry

disable_telemetry()  # before dagster is imported

import dagster as dg  # noqa: E402

from liverseg.fanout.dvc_graph import load_stages  # noqa: E402
from pipeline.assets import build_assets  # noqa: E402
from pipeline.checks import build_audit_check, build_checks  # noqa: E402
from pipeline.monitoring import (  # noqa: E402
    monitor_job,
    monitor_schedule,
    retrain_on_evidence,
    served_cases,
)
from pipeline.pacs import new_ct_studies, segment_study_job  # noqa: E402
from pipeline.parallel import train_all_parallel  # noqa: E402
from pipeline.resources import REPO_ROOT, resources_from_env  # noqa: E402
from pipeline.schedules import retrain_job, retrain_schedule  # noqa: E402
from pipeline.sensors import data_source_sensor, record_run_failure  # noqa: E402

stages = load_stages(REPO_ROOT)

defs = dg.Definitions(
    # The DVC stages, and the one asset that reads live data (not a stage: DESIGN rule 12).
    assets=[*build_assets(REPO_ROOT), served_cases],
    # The audit retrains: kept out of build_checks, which tests materialise wholesale.
    asset_checks=build_checks(stages) + build_audit_check(stages),
    # train_all_parallel: multiprocess, one step per model; segment_study: one per CT study
    jobs=[retrain_job, train_all_parallel, segment_study_job, monitor_job],
    schedules=[retrain_schedule(), monitor_schedule],
    sensors=[data_source_sensor, record_run_failure, new_ct_studies, retrain_on_evidence],
    resources=resources_from_env(),
    # In-process: one run = one process in one DVC workspace. The stages must run one at a
    # time anyway (DVC's repo lock; the pool enforces it across runs too), so a process per
    # step would only add start-up time. Runs spread over machines through the run
    # launcher instead (docs/SCALING.md).
    executor=dg.in_process_executor,
)
