"""The Dagster code location is derived from dvc.yaml: same stages, same edges."""

import re
import shutil
import subprocess

import pytest

from liverseg.fanout.dvc_graph import load_stages
from pipeline.assets import asset_key
from pipeline.monitoring import KEY as MONITORING_KEY
from tests.helpers import REPO


def dvc_edges(root) -> set[tuple[str, str]]:
    dvc = shutil.which("dvc")
    if dvc is None:
        pytest.fail("dvc is not on PATH: run the tests through `make test`")
    dot = subprocess.run([dvc, "dag", "--dot"], cwd=root, capture_output=True, text=True,
                         check=True, timeout=120).stdout
    return set(re.findall(r'"([^"]+)" -> "([^"]+)"', dot))


def test_stage_graph_matches_dvc_dag():
    stages = load_stages(REPO)
    ours = {(up, s.name) for s in stages.values() for up in s.upstream}
    assert ours == dvc_edges(REPO)
    assert {"train@enhanced_pan", "evaluate@enhanced_pan", "report"} <= set(stages)


def test_definitions_load_with_one_asset_per_stage_and_a_stopped_schedule():
    from dagster import DefaultScheduleStatus

    from pipeline.definitions import defs

    stages = load_stages(REPO)
    graph = defs.resolve_asset_graph()
    # every DVC stage, and the one live asset that is none (pipeline.monitoring)
    assert set(graph.get_all_asset_keys()) == {asset_key(n) for n in stages} | {MONITORING_KEY}
    for name, stage in stages.items():
        parents = graph.get(asset_key(name)).parent_keys
        assert parents == {asset_key(u) for u in stage.upstream}, name
    schedule = defs.resolve_schedule_def("weekly_retrain")
    assert schedule.default_status == DefaultScheduleStatus.STOPPED
