"""What tests (and their fixtures) share: paths, tiny params, the repository copied into a
new git repo with its environment, running commands, waiting for servers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from liverseg import runner
from liverseg.params_dict import deep_merge

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
E2E_MODELS = ["enhanced_pan", "unet_cbam"]
GIT = ["git", "-c", "user.email=ci@liverseg", "-c", "user.name=ci"]


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
    return deep_merge(deep_merge(repo_params, tiny), overrides)


def e2e_raw_params(**overrides) -> dict:
    """The end-to-end tests' params: two models on the liver target.

    Liver, not tumour: at this tiny budget (64 px, one epoch) tumours are never found
    (fg IoU 0), and the registry tests need models that differ in quality.
    """
    return tiny_raw_params(**deep_merge({"models": E2E_MODELS, "data": {"target": "liver"}},
                                        overrides))


# Where MLflow's SQLite store records absolute artifact locations.
ARTIFACT_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                    ("logged_models", "artifact_location"), ("model_versions", "storage_location"))


def copy_workspace(src: Path, dst: Path) -> Path:
    """A copy of a template folder whose MLflow store (if any) records the copy's artifact
    folders, not the template's: what a test logs (a run, a model card) stays in its copy."""
    import sqlite3

    shutil.copytree(src, dst, dirs_exist_ok=True, symlinks=True)
    db = dst / "mlruns" / "mlflow.db"
    if db.is_file():
        with contextlib.closing(sqlite3.connect(db)) as con, con:
            for table, column in ARTIFACT_COLUMNS:
                con.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)",
                            (str(src.resolve()), str(dst.resolve())))
        if "mlflow" in sys.modules:  # MLflow caches each run's artifact folder, by run id
            from mlflow.tracking._tracking_service import utils

            utils._artifact_repos_cache.clear()
    return dst


def tracking_uri(root: Path) -> str:
    """The SQLite MLflow store of a folder, as the stages' default puts it."""
    return f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"


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


def sh(cmd: list[str], cwd: Path, env: dict, timeout: int = 900) -> str:
    """Run `cmd`; its output, or a failure that shows the output's end."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-5000:]}"
    return output


def repo_env(**extra: str) -> dict[str, str]:
    """This interpreter's bin (liverseg, dvc, dagster) first on PATH, no tracking server."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return env | {"PATH": runner.tools_path()} | extra


def copy_repository(root: Path, raw_params: dict) -> None:
    """The repository's tracked and unignored files but outputs in `root`, with `raw_params`
    as params.yaml and a Dagster home, committed to a new git repo."""
    listed = runner.git_checked("ls-files", "--cached", "--others", "--exclude-standard",
                                cwd=REPO)
    for rel in listed.split():
        if not rel.startswith(("dvc.lock", "reports/", "data/")) and (REPO / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
    (root / "params.yaml").write_text(yaml.safe_dump(raw_params))
    (root / ".dagster_home").mkdir(exist_ok=True)
    shutil.copy(REPO / "pipeline/dagster.yaml", root / ".dagster_home/dagster.yaml")
    commit_all(root)


def commit_all(root: Path, message: str = "copy") -> None:
    """`git add -A && git commit` in `root` (a new repo if it is none) as the CI identity."""
    if not (root / ".git").exists():
        sh(GIT + ["init", "-q"], root, os.environ)
    for cmd in (GIT + ["add", "-A"], GIT + ["commit", "-qm", message]):
        sh(cmd, root, os.environ)


def wait_for_http(url: str, proc: subprocess.Popen, seconds: float) -> None:
    """Until `url` answers; fails if `proc` (the server) exits or `seconds` pass first."""
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


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (for a server, or a closed one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record_failure(instance, result) -> None:
    """Run the failure sensor's handler on a failed in-process run, as Dagster would."""
    import dagster as dg

    from pipeline.sensors import record_run_failure

    context = dg.build_run_status_sensor_context(
        sensor_name="record_run_failure", dagster_instance=instance,
        dagster_run=result.dagster_run, dagster_event=result.get_run_failure_event(),
    ).for_run_failure()
    record_run_failure(context)


def rewrite_slot(raw: Path, ref: str, image=None, mask=None) -> None:
    """Replace one stored slot's grey image and/or stored mask in its case file: a new file
    in place of the old one (the store's file it was linked to stays intact), as a user who
    edits data/raw would leave it."""
    from liverseg import casestore

    at = casestore.SliceRef.parse(ref)
    path = raw / at.case_file
    casestore.close_all()
    groups, record = casestore.read_case(path)
    images, masks = groups[at.group]
    for array, new in ((images, image), (masks, mask)):
        if new is not None:
            array[at.index] = new
    casestore.write_case(path, groups, record)


def slice_pngs(raw: Path, dest: Path, count: int | None = None) -> list[Path]:
    """The first `count` stored slices of data/raw as PNG files in `dest` (what a user
    would hand `liverseg predict`), named by slice id."""
    import pandas as pd
    from PIL import Image

    from liverseg import casestore

    index = pd.read_csv(raw / "slices.csv", keep_default_na=False)
    rows = index[index["image"] != ""].head(count) if count else index[index["image"] != ""]
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for row in rows.itertuples():
        paths.append(dest / f"{row.slice_id}.png")
        Image.fromarray(casestore.read(raw, row.image)).save(paths[-1])
    return paths


def without_cases(summary: dict) -> dict:
    """An ingest summary without its `cases` counts (how many were made or reused, by how
    many workers: they depend on the store and the machine)."""
    return {k: v for k, v in summary.items() if k != "cases"}


# `dvc status` of a reproduced workspace: only the source listing, which DVC runs on every
# repro (`always_changed`), is named.
UP_TO_DATE = {"source": ["always changed"]}


def dvc_status(root: Path, env: dict) -> dict:
    return json.loads(sh(["dvc", "status", "--json"], root, env))


def stages_run(output: str) -> list[str]:
    """The stages a `dvc repro` output says it ran."""
    return re.findall(r"Running stage '([^']+)'", output)
