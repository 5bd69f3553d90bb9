"""Shared fixtures: tiny params, templates built once per session and copied per test (a
split dataset, a registered model, a reproduced repository), the real data in ../shared/data.
Plain helpers live in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from liverseg.offline import disable_telemetry
from tests.helpers import (
    SHARED_DATA,
    copy_repository,
    copy_workspace,
    e2e_raw_params,
    inside,
    repo_env,
    sh,
    slice_pngs,
    tiny_raw_params,
    tracking_uri,
)

disable_telemetry()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never want downloaded weights


@pytest.fixture
def shared_data() -> Path:
    """../shared/data: skipped when absent, a failure when CI demands it."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("LIVERSEG_REQUIRE_SHARED_DATA"):
            pytest.fail(f"{SHARED_DATA} is missing but LIVERSEG_REQUIRE_SHARED_DATA is set")
        pytest.skip(f"{SHARED_DATA} not present (a user's clone has no ../shared)")
    return SHARED_DATA


@pytest.fixture
def tiny_params():
    from liverseg.config import parse_params

    return parse_params(tiny_raw_params())


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run in an empty directory: stages write data/, models/, reports/, mlruns/ there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture(scope="session")
def split_template(tmp_path_factory) -> Path:
    """The tiny phantom dataset ingested, validated and split once per session; tests get a
    copy (`split_data`), so great-expectations runs once, not once per test."""
    from liverseg.config import parse_params
    from liverseg.stages import run_data_stages

    with inside(tmp_path_factory.mktemp("split-template")) as root:
        run_data_stages(parse_params(tiny_raw_params()))
    return root


@pytest.fixture
def split_data(workdir, split_template):
    """A tiny phantom dataset, ingested, validated and split in `workdir` (a copy)."""
    return copy_workspace(split_template, workdir)


@pytest.fixture(scope="session")
def registered_template(tmp_path_factory) -> Path:
    """The pipeline's stages run in-process once, as `dvc repro` of repo_copy runs them (the
    same params): data, two models trained and evaluated, compared, the best registered as
    champion in an SQLite MLflow store in the folder. Without git or dvc.lock: tests of
    what needs DVC use repo_copy. `slices/` holds its stored slices as PNG files, the
    inputs a user would hand `liverseg predict`."""
    from liverseg.config import parse_params
    from liverseg.stages import compare, evaluate, register, run_data_stages, train

    params = parse_params(e2e_raw_params())
    root = tmp_path_factory.mktemp("registered-template")
    (root / "params.yaml").write_text(yaml.safe_dump(e2e_raw_params()))
    with inside(root):
        run_data_stages(params)
        for model in params.models:
            train.run(params, model)
            evaluate.run(params, model)
        compare.run(params)
        register.run(params)
        slice_pngs(root / "data/raw", root / "slices")
    return root


@pytest.fixture
def registry(registered_template, monkeypatch) -> Path:
    """Read-only use of the registered template: its MLflow store and its raw slices."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(registered_template))
    return registered_template


@pytest.fixture
def registered(tmp_path, monkeypatch, registered_template) -> Path:
    """A private copy of the registered template, the working directory and MLflow store."""
    root = tmp_path / "registered"
    copy_workspace(registered_template, root)
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(root))
    return root


@pytest.fixture(scope="session")
def repo_copy(tmp_path_factory):
    """Tracked files of the repository in a new git repo, tiny params, after `dvc repro`.

    Session-scoped: the end-to-end, browser and other whole-pipeline tests share one run.
    """
    root = tmp_path_factory.mktemp("repo")
    copy_repository(root, e2e_raw_params())
    env = repo_env(DAGSTER_HOME=str(root / ".dagster_home"), MLFLOW_TRACKING_URI=tracking_uri(root))
    sh(["dvc", "repro"], root, env)
    return root, env


@pytest.fixture
def repo_clone(repo_copy, tmp_path):
    """A private copy of the shared repro (the shared one must stay as other tests left it),
    reset to its commit: `dvc exp run` in another test may have edited params.yaml."""
    src, env = repo_copy
    root = tmp_path / "repo"
    copy_workspace(src, root)
    sh(["git", "checkout", "-q", "HEAD", "--", "."], root, env)
    return root, env
