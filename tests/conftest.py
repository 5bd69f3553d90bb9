"""Shared fixtures: tiny params, a tiny ingested dataset, the real data in ../shared/data."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from liverseg.offline import disable_telemetry

disable_telemetry()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never want downloaded weights

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
E2E_MODELS = ["enhanced_pan", "unet_cbam"]


@pytest.fixture
def shared_data() -> Path:
    """../shared/data: skipped when absent, a failure when CI demands it."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("LIVERSEG_REQUIRE_SHARED_DATA"):
            pytest.fail(f"{SHARED_DATA} is missing but LIVERSEG_REQUIRE_SHARED_DATA is set")
        pytest.skip(f"{SHARED_DATA} not present (a user's clone has no ../shared)")
    return SHARED_DATA


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        both_dicts = isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = _merge(base[key], value) if both_dicts else value
    return out


def tiny_raw_params(**overrides) -> dict:
    """The repository's params.yaml shrunk to a tiny, fast pipeline (64 px, 6 patients).

    Every section stays present: DVC refuses a stage whose params section is missing.
    """
    tiny = {
        "seed": 7,
        "data": {"phantom": {"patients": 6, "slices_per_patient": 4, "size": 64}},
        "split": {"val_fraction": 0.34},
        "models": ["enhanced_pan"],
        "train": {"epochs": 1, "batch_size": 2, "image_size": 64},
        "evaluate": {"batch_size": 4},
        "register": {"min_fg_iou": 0.0},
    }
    repo_params = yaml.safe_load((REPO / "params.yaml").read_text())
    return _merge(_merge(repo_params, tiny), overrides)


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


@contextlib.contextmanager
def inside(root: Path):
    """Run stages in `root` with its own MLflow store (as `workdir` does), then come back."""
    cwd, uri = Path.cwd(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(root)
    try:
        yield root
    finally:
        os.chdir(cwd)
        if uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = uri


@pytest.fixture(scope="session")
def split_template(tmp_path_factory) -> Path:
    """The tiny phantom dataset ingested, validated and split once per session; tests get a
    copy (`split_data`), so great-expectations runs once, not once per test."""
    from liverseg.config import parse_params
    from liverseg.stages import ingest, split, validate

    params = parse_params(tiny_raw_params())
    with inside(tmp_path_factory.mktemp("split-template")) as root:
        for stage in (ingest, validate, split):
            stage.run(params)
    return root


@pytest.fixture
def split_data(workdir, split_template):
    """A tiny phantom dataset, ingested, validated and split in `workdir` (a copy)."""
    shutil.copytree(split_template, workdir, dirs_exist_ok=True, symlinks=True)
    return workdir


def sh(cmd: list[str], cwd: Path, env: dict, timeout: int = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-5000:]}"
    return output


def wait_for_http(url: str, proc: subprocess.Popen, seconds: float) -> None:
    """Until `url` answers; fails if `proc` (the server) exits or `seconds` pass first."""
    import time
    import urllib.request

    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert proc.poll() is None, f"{proc.args[0]} exited before {url} answered"
            assert time.time() < deadline, f"{url} did not answer within {seconds:g} s"
            time.sleep(0.3)


def stop_process_group(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM a process started with `start_new_session=True` and its children; SIGKILL
    them if they have not exited within `timeout` seconds."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def repo_copy(tmp_path_factory):
    """Tracked files of the repository in a new git repo, tiny params, after `dvc repro`.

    Session-scoped: the end-to-end, browser and other whole-pipeline tests share one run.
    """
    root = tmp_path_factory.mktemp("repo")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file() and not rel.startswith(("dvc.lock", "reports/", "data/")):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
    # Liver, not tumour: at this tiny budget (64 px, one epoch) tumours are never found
    # (fg IoU 0), and the registry tests need models that differ in quality.
    raw = tiny_raw_params(models=E2E_MODELS, data={"target": "liver"})
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DAGSTER_HOME": str(root / ".dagster_home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlruns' / 'mlflow.db'}",
    }
    (root / ".dagster_home").mkdir()
    shutil.copy(root / "pipeline/dagster.yaml", root / ".dagster_home/dagster.yaml")
    git = ["git", "-c", "user.email=ci@liverseg", "-c", "user.name=ci"]
    for cmd in (git + ["init", "-q"], git + ["add", "-A"], git + ["commit", "-qm", "copy"]):
        sh(cmd, root, env)
    sh(["dvc", "repro"], root, env)
    return root, env
