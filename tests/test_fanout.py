"""Parallel training: one workspace per model, DVC's run-cache between them, one dvc.lock.

Fast tests check the plan, devices, workspaces and the Dagster job's shape. The slow ones run
`make repro-parallel WORKERS=2` (the Dagster job `train_all_parallel` on the multiprocess
executor) in a fresh copy of the repository, compare it with a serial `dvc repro`, and kill a
worker mid-epoch.
"""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from liverseg.fanout import devices
from liverseg.fanout import engine as fanout
from liverseg.fanout.dvc_graph import load_stages
from pipeline.assets import POOL
from pipeline.parallel import GPU_POOL, train_all_parallel
from tests.helpers import (
    E2E_MODELS,
    GIT,
    REPO,
    UP_TO_DATE,
    copy_repository,
    dvc_status,
    e2e_raw_params,
    repo_env,
    sh,
    stages_run,
)


def _say(_: str) -> None:
    pass


# --------------------------------------------------------------------------- fast

def test_plan_runs_the_shared_stages_first_and_each_models_stages_in_order():
    stages = load_stages(REPO)
    models = fanout.models(REPO)
    plan = fanout.plan(stages, models)
    assert plan.upstream == ("source", "ingest", "validate", "split")
    assert plan.per_model == {m: (f"train@{m}", f"evaluate@{m}") for m in models}
    assert stages[f"train@{models[0]}"].uncached == (f"reports/training/{models[0]}.csv",)
    with pytest.raises(fanout.FanoutError, match=r"no stage item ends in @nope"):
        fanout.plan(stages, ["nope"])


def test_devices_round_robin_and_gpu_pool_size():
    assert devices.gpu_ids({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert devices.gpu_ids({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert [devices.device_for(i, ["2", "3"]) for i in range(5)] == ["2", "3", "2", "3", "2"]
    assert devices.device_for(0, []) is None  # CPU: nothing set
    assert devices.gpu_slots(["0", "1"], 6, {}) == 2  # one training per GPU by default
    assert devices.gpu_slots(["0", "1"], 6, {devices.PER_GPU_ENV: "3"}) == 6
    assert devices.gpu_slots([], 6, {}) == 6  # CPU: the executor's max_concurrent bounds it
    with pytest.raises(fanout.FanoutError, match=devices.PER_GPU_ENV):
        devices.gpu_slots(["0"], 2, {devices.PER_GPU_ENV: "0"})


def test_dvc_outcomes_and_remote_rules():
    out = ("Stage 'split' didn't change, skipping\n"
           "Stage 'train@a' is cached - skipping run, checking out outputs\n"
           "Running stage 'compare':\n")
    assert fanout.outcomes(out) == {"split": "unchanged", "train@a": "restored",
                                    "compare": "ran"}
    assert fanout.check_remote({"core.remote": "local"}, None) == "local"
    with pytest.raises(fanout.FanoutError, match="no DVC default remote"):
        fanout.check_remote({}, None)
    with pytest.raises(fanout.FanoutError, match="DVC_REMOTE=s3 .* default remote is local"):
        fanout.check_remote({"core.remote": "local"}, "s3")


def _small_repo(root: Path) -> str:
    root.mkdir()
    (root / "params.yaml").write_text("lr: 1\n")
    (root / "old.txt").write_text("tracked, deleted later\n")
    (root / ".gitignore").write_text("__pycache__/\n")
    (root / "code").mkdir()
    (root / "code/a.py").write_text("A = 1\n")
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "one"]):
        subprocess.run(GIT + cmd, cwd=root, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_worker_workspace_mirrors_the_primary_and_is_locked(tmp_path, monkeypatch):
    monkeypatch.delenv(fanout.WORKSPACES_ENV, raising=False)
    root = tmp_path / "primary"
    commit = _small_repo(root)
    (root / "params.yaml").write_text("lr: 2\n")  # uncommitted edit
    (root / "new.txt").write_text("untracked, not ignored\n")
    (root / "old.txt").unlink()
    ws = fanout.workspace_dir(root, commit, "pan")
    assert ws == root / ".git" / "liverseg-workspaces" / commit[:12] / "pan"
    # DVC hashes every file of a dep folder, git-ignored bytecode included.
    (root / "code/__pycache__").mkdir()
    (root / "code/__pycache__/a.pyc").write_bytes(b"\x00pyc")
    inputs = ["code", "params.yaml"]
    expected = fanout.fingerprint(root, inputs)
    assert set(expected) == {"code/a.py", "code/__pycache__/a.pyc", "params.yaml"}
    with fanout.workspace_lock(ws, _say):
        fanout.ensure_worktree(root, ws, commit)
        (ws / "stale.txt").write_text("left by an earlier attempt\n")
        with pytest.raises(fanout.FanoutError, match=r"differ from the primary's: \['code/__p"):
            fanout.check_inputs(ws, inputs, expected)
        assert fanout.mirror(root, ws, inputs) == 3
        fanout.check_inputs(ws, inputs, expected)
        assert (ws / "params.yaml").read_text() == "lr: 2\n"
        assert (ws / "new.txt").is_file()
        assert not (ws / "old.txt").exists() and not (ws / "stale.txt").exists()
        assert fanout.mirror(root, ws, inputs) == 0  # nothing differs any more
        # A second fan-out of the same commit cannot take this workspace meanwhile.
        probe = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\n"
                 "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                 "except BlockingIOError:\n    sys.exit(3)\n")
        lock = ws.parent / "pan.lock"
        assert subprocess.run([sys.executable, "-c", probe, str(lock)]).returncode == 3
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with the context
    os.close(fd)
    assert subprocess.run(["git", "status", "--short"], cwd=root, capture_output=True,
                          text=True).stdout.split() == ["D", "old.txt", "M", "params.yaml",
                                                        "??", "new.txt"]
    fanout.ensure_worktree(root, ws, commit)  # an existing workspace is kept as it is
    assert (ws / "new.txt").is_file()
    fanout.remove_workspace(root, ws)
    assert not ws.exists()


def test_job_has_one_step_per_model_in_the_gpu_pool(monkeypatch):
    stages = load_stages(REPO)
    items = fanout.work_items(REPO, stages, fanout.plan(stages, fanout.models(REPO)))
    assert [i["index"] for i in items] == list(range(len(fanout.models(REPO))))
    assert "src/liverseg/stages/train.py" in items[0]["inputs"]  # what the run-cache hashes
    assert not any(k.startswith("data/") for k in items[0]["inputs"])  # pulled, by hash
    ops = train_all_parallel.graph.node_dict
    assert set(ops) == {"fan_out", "train_model", "restore"}
    assert ops["fan_out"].definition.pool == POOL == ops["restore"].definition.pool
    assert ops["train_model"].definition.pool == GPU_POOL
    assert train_all_parallel.executor_def.name == "multiprocess"
    fan = ops["fan_out"].definition.output_defs[0]
    assert fan.is_dynamic  # one mapped step train_model[<model>] per model at run time


# --------------------------------------------------------------------------- slow

def _fresh_copy(root: Path, **overrides) -> dict:
    """The working tree in a new git repo with tiny params, nothing run yet (as repo_copy).

    PYTHONPATH pins the copy's own src/: other engineers edit the live checkout meanwhile.
    """
    copy_repository(root, e2e_raw_params(**overrides))
    return repo_env(PYTHONPATH=str(root / "src"), DAGSTER_HOME=str(root / ".dagster_home"))


# -o install: the copy uses this interpreter's environment; it builds none of its own.
MAKE_PARALLEL = ["make", "-o", "install", "repro-parallel", "WORKERS=2"]


@pytest.fixture(scope="module")
def fanned(tmp_path_factory):
    """A fresh copy after `make repro-parallel WORKERS=2`, with its output and wall time."""
    root = tmp_path_factory.mktemp("fanout")
    env = _fresh_copy(root)
    started = time.perf_counter()
    out = sh(MAKE_PARALLEL, root, env, timeout=1800)
    return root, env, out, time.perf_counter() - started


def _run_steps(root: Path) -> dict[str, list[str]]:
    """Step key -> its events, for the latest run of the copy's Dagster instance."""
    with dg.DagsterInstance.from_config(str(root / ".dagster_home")) as instance:
        run = instance.get_runs(limit=1)[0]
        steps: dict[str, list[str]] = {}
        for entry in instance.all_logs(run.run_id):
            if entry.is_dagster_event and entry.step_key:
                steps.setdefault(entry.step_key, []).append(entry.dagster_event.event_type_value)
        return steps


@pytest.mark.slow
def test_parallel_run_restores_every_model_and_matches_a_serial_run(fanned, tmp_path):
    root, env, out, seconds = fanned
    stages = load_stages(root)
    # The Dagster job on the multiprocess executor: one step per model.
    steps = _run_steps(root)
    assert set(steps) == {"fan_out", "restore"} | {f"train_model[{m}]" for m in E2E_MODELS}
    assert all("STEP_SUCCESS" in events for events in steps.values())
    # The primary restored every model stage from the run-cache and trained nothing.
    for model in E2E_MODELS:
        for name in (f"train@{model}", f"evaluate@{model}"):
            assert f"Stage '{name}' is cached - skipping run" in out, name
    restore_log = out[out.index("Started execution of step \"restore\""):]
    assert "Running stage 'train@" not in restore_log
    assert dvc_status(root, env) == UP_TO_DATE
    assert stages_run(sh(["dvc", "repro"], root, env)) == ["source"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(stages)  # one dvc.lock, every stage, as a serial run writes it
    assert not list((root / ".git/liverseg-workspaces").glob("*/*/"))  # removed on success

    # A serial `dvc repro` of the same params in another copy: same deps, same weights.
    serial = tmp_path / "serial"
    serial.mkdir()
    serial_env = _fresh_copy(serial)
    sh(["dvc", "repro", *(f"train@{m}" for m in E2E_MODELS)], serial, serial_env)
    serial_lock = yaml.safe_load((serial / "dvc.lock").read_text())["stages"]
    for name, entry in serial_lock.items():
        assert (entry["deps"], entry.get("params")) == (lock[name]["deps"],
                                                        lock[name].get("params")), name
    for model in E2E_MODELS:
        weights = f"models/{model}/model.safetensors"
        assert (root / weights).read_bytes() == (serial / weights).read_bytes(), model

    # Every worker logged to the primary's store: lineage finds the registered model's run.
    for model in E2E_MODELS:
        run = json.loads((root / f"models/{model}/run.json").read_text())
        assert run["tracking_uri"] == f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    registry = json.loads((root / "reports/registry.json").read_text())
    lineage = subprocess.run(["liverseg", "lineage", f"models:/liverseg/{registry['version']}",
                              "--json", "--no-dvc-status"], cwd=root, env=env,
                             capture_output=True, text=True)
    assert lineage.returncode == 0, lineage.stderr[-3000:]
    trail = json.loads(lineage.stdout)
    assert trail["run_id"] == registry["run_id"]
    assert trail["metrics"]["fg_iou"] is not None  # evaluate, in a worker, logged to that run
    print(f"make repro-parallel WORKERS=2: {seconds:.0f} s")


def _train_pid(model: str, ws: Path) -> int | None:
    """The `liverseg train <model>` process working in `ws`."""
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            cwd = Path(os.readlink(proc / "cwd"))
        except (OSError, ValueError):
            continue
        if cwd == ws and b"train" in cmd and model.encode() in cmd and \
                any(part.endswith(b"liverseg") for part in cmd):
            return int(proc.name)
    return None


@pytest.mark.slow
def test_a_worker_killed_mid_epoch_resumes_and_only_it_retrains(fanned):
    root, env, _, _ = fanned
    victim, other = E2E_MODELS[1], E2E_MODELS[0]
    # New training params, uncommitted: the workers must see them (mirrored), and both
    # models are stale, so both workers train.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["epochs"] = 3
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    commit = sh(["git", "rev-parse", "HEAD"], root, env).strip()
    ws = fanout.workspace_dir(root, commit, victim)
    proc = subprocess.Popen(MAKE_PARALLEL, cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    killed = None
    deadline = time.monotonic() + 1200
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        if list((ws / ".checkpoints" / victim).glob("*.pt")):  # epoch 1 done, epoch 2 runs
            pid = _train_pid(victim, ws)
            if pid:
                os.kill(pid, signal.SIGKILL)
                killed = pid
        time.sleep(0.05)
    out = proc.communicate(timeout=1800)[0]
    assert killed, f"never saw {victim}'s first checkpoint:\n{out[-3000:]}"
    assert proc.returncode != 0
    steps = _run_steps(root)
    assert "STEP_FAILURE" in steps[f"train_model[{victim}]"]
    assert "STEP_SUCCESS" in steps[f"train_model[{other}]"]  # the other model finished
    assert "restore" not in steps  # the primary waits for every model
    assert list((ws / ".checkpoints" / victim).glob("*.pt"))  # kept for the next attempt

    rerun = sh(MAKE_PARALLEL, root, env, timeout=1800)
    assert f"{victim}: resuming after epoch" in rerun
    assert f"Running stage 'train@{victim}'" in rerun
    assert f"Running stage 'train@{other}'" not in rerun  # restored from the run-cache
    assert f"Stage 'train@{other}' is cached - skipping run" in rerun
    assert dvc_status(root, env) == UP_TO_DATE
    history = (root / f"reports/training/{victim}.csv").read_text().splitlines()
    assert len(history) == 1 + 3  # header + every epoch, none lost or doubled
