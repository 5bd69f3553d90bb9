"""The whole pipeline, as a user runs it: `dvc repro` in a fresh copy of the repository.

Also proves the two tools that need different antlr versions both work from one set-up:
`dvc exp run -S ...` (hydra, antlr 4.9, in DVC's own environment) and
`dagster asset materialize --select '*'` (antlr 4.13, in the project environment).
"""

import json
import os
import subprocess

import pytest
import yaml

from tests.helpers import E2E_MODELS as MODELS
from tests.helpers import UP_TO_DATE, dvc_status, sh, stages_run

pytestmark = pytest.mark.slow


def test_repro_leaves_every_output(repo_copy):
    root, env = repo_copy
    assert (root / "dvc.lock").is_file()
    for model in MODELS:
        assert (root / f"models/{model}/model.safetensors").is_file()
        metrics = json.loads((root / f"reports/metrics/{model}.json").read_text())
        for key in ("fg_iou", "miou", "dice", "pixel_accuracy"):
            assert metrics[key] is None or 0 <= metrics[key] <= 1
        assert metrics["pixel_accuracy"] > 0.5
    comparison = (root / "reports/comparison.csv").read_text().splitlines()
    assert len(comparison) == 1 + len(MODELS)
    html = (root / "reports/report.html").read_text()
    assert all(f'id="{s}"' in html for s in ("data", "training", "comparison", "lineage"))


def test_model_is_registered_with_alias_and_lineage(repo_copy):
    root, env = repo_copy
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    try:
        from liverseg import tracking

        client = tracking.mlflow().MlflowClient()
        version = client.get_model_version_by_alias("liverseg", "champion")
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    raw_md5 = next(o["md5"] for o in lock["stages"]["ingest"]["outs"] if o["path"] == "data/raw")
    assert version.tags["data_raw_md5"] == raw_md5
    assert "missing" not in (version.tags["data_splits_md5"], version.tags["model_md5"])
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                            text=True).stdout.strip()
    assert version.tags["git_commit"] == commit


def test_second_repro_is_a_no_op_and_dvc_reads_metrics_and_plots(repo_copy):
    root, env = repo_copy
    assert stages_run(sh(["dvc", "repro"], root, env)) == ["source"]  # only the listing
    assert "fg_iou" in sh(["dvc", "metrics", "show"], root, env)
    sh(["dvc", "plots", "show", "-o", str(root / "dvc_plots")], root, env)
    assert (root / "dvc_plots/index.html").is_file()


def test_dagster_materialize_all_runs_the_dvc_stages(repo_clone):
    """On a private copy whose `evaluate.threshold` changed (so evaluate, compare, register
    and report are out of date and train is not): materialising every asset runs the
    changed stages through `dvc repro`, so dvc.lock records the new value and DVC finds
    nothing left to run."""
    root, env = repo_clone
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"]["threshold"] = 0.4
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    stale = set(dvc_status(root, env))
    assert {f"evaluate@{m}" for m in MODELS} <= stale and not any(
        name.startswith("train@") for name in stale)
    out = sh(["dagster", "asset", "materialize", "-m", "pipeline.definitions", "--select", "*"],
             root, env | {"DAGSTER_HOME": str(root / ".dagster_home")})
    assert "RUN_SUCCESS" in out
    assert dvc_status(root, env) == UP_TO_DATE
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    for model in MODELS:
        assert lock[f"evaluate@{model}"]["params"]["params.yaml"]["evaluate"]["threshold"] \
            == 0.4


def test_dvc_exp_run_with_a_param_override(repo_copy):
    root, env = repo_copy
    sh(["dvc", "exp", "run", "-S", "evaluate.threshold=0.4"], root, env)
    assert yaml.safe_load((root / "params.yaml").read_text())["evaluate"]["threshold"] == 0.4
    assert "0.4" in sh(["dvc", "exp", "show", "--no-pager", "--csv"], root, env)
