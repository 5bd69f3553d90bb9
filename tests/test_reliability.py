"""Fault tests: killed training resumes exactly, unsafe files are refused, secrets never leak,
an unreachable tracking server fails fast. Promises and their tests: docs/RELIABILITY.md."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from liverseg import artifacts, checkpoint, redact, tracking
from liverseg.stages import train
from tests.helpers import REPO, free_port, stop_process_group, wait_for_http

pytestmark = pytest.mark.fault

# A child that trains and, on request, stops at a fault point until the parent SIGKILLs it.
# The pause is patched in here, by the test: the product code has no fault hooks.
CHILD = r"""
import io, os, sys, time
from pathlib import Path
import torch, yaml
from liverseg.config import parse_params
from liverseg.stages import train

def pause():
    Path("paused").write_text(str(os.getpid()))
    time.sleep(600)  # the parent kills us here

fault = os.environ.get("FAULT", "")
if fault.startswith("step="):  # stop inside an epoch, before optimiser step N
    target, count, step = int(fault[5:]), [0], torch.optim.AdamW.step
    def counting_step(self, *args, **kwargs):
        count[0] += 1
        if count[0] == target:
            pause()
        return step(self, *args, **kwargs)
    torch.optim.AdamW.step = counting_step
elif fault == "save":  # stop with half of the next checkpoint written
    save = torch.save
    def half_save(obj, path, *args, **kwargs):
        buffer = io.BytesIO()
        save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        Path(path).write_bytes(data[: len(data) // 2])
        pause()
    torch.save = half_save
params = parse_params(yaml.safe_load(Path("params.yaml").read_text()))
train.run(params, "enhanced_pan")
"""


def with_epochs(params, epochs: int):
    return params.model_copy(update={"train": params.train.model_copy(update={"epochs": epochs})})


def run_child(workdir: Path, fault: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    """Run CHILD; with a fault, SIGKILL it once it reports the fault point."""
    paused = workdir / "paused"
    paused.unlink(missing_ok=True)
    env = os.environ | {"FAULT": fault}
    proc = subprocess.Popen([sys.executable, "-c", CHILD], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not fault:
        out, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, out[-3000:]
        return subprocess.CompletedProcess(proc.args, 0, out)
    deadline = time.monotonic() + timeout
    while not paused.exists():
        assert proc.poll() is None, f"child ended before fault {fault}:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, f"fault {fault} never reached"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


def saved_epoch(ckpt_dir: Path) -> tuple[int, str]:
    (path,) = ckpt_dir.glob("*.pt")
    state = checkpoint.load_state(path)
    return state["epoch"], state["run_id"]


def test_killed_training_resumes_to_the_uninterrupted_result(split_data, tiny_params, capfd):
    """SIGKILL mid-epoch, then during the checkpoint write; the third run ends bitwise equal
    to an uninterrupted run (CPU, fixed seed) and continues the first run's MLflow record."""
    # 32 px, 2 epochs: small enough for 2 shared cores, still a restored optimiser/schedule.
    params = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(
        update={"epochs": 2, "image_size": 32})})
    workdir = split_data
    (workdir / "params.yaml").write_text(yaml.safe_dump(params.dump()))
    (workdir / "ref").mkdir()  # the uninterrupted run: its own outputs, the same data
    (workdir / "ref/data").symlink_to(workdir / "data")
    reference = train.run(params, "enhanced_pan", root="ref")
    steps = len(pd.read_csv(workdir / "data/splits/train.csv")) // params.train.batch_size
    ckpt_dir = workdir / artifacts.CHECKPOINTS / "enhanced_pan"

    run_child(workdir, fault=f"step={steps + steps // 2 + 1}")  # in the middle of epoch 2
    epoch, run_id = saved_epoch(ckpt_dir)
    assert epoch == 1
    assert not (workdir / "models/enhanced_pan/model.safetensors").exists()

    run_child(workdir, fault="save")  # epoch 2 trained again, killed while saving it
    assert [p.name for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")], "no partial write"
    assert saved_epoch(ckpt_dir) == (1, run_id)  # the half-written file never replaced it

    train.run(params, "enhanced_pan")  # the rerun, in-process (one torch import less)
    assert "resuming after epoch 1" in capfd.readouterr().out
    assert not ckpt_dir.exists()  # removed after success, half-written temporary included
    resumed = pd.read_csv(workdir / "reports/training/enhanced_pan.csv")
    expected = pd.read_csv(workdir / "ref/reports/training/enhanced_pan.csv")
    pd.testing.assert_frame_equal(resumed, expected, check_exact=True)
    weights = (workdir / "models/enhanced_pan/model.safetensors").read_bytes()
    assert weights == (workdir / "ref/models/enhanced_pan/model.safetensors").read_bytes()
    config = json.loads((workdir / "models/enhanced_pan/config.json").read_text())
    assert config["best_val_fg_iou"] == reference["val_fg_iou"]

    run_json = json.loads((workdir / "models/enhanced_pan/run.json").read_text())
    assert run_json["run_id"] == run_id  # the killed run was continued, not replaced
    client = tracking.mlflow().MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_after_epoch"] == "1"
    steps_logged = {m.step for m in client.get_metric_history(run_id, "val_loss")}
    assert steps_logged == {1, 2}


REAL_RUN_EPOCH = train.run_epoch


class Interrupted(Exception):
    """Stands in for a kill: raised by the patched run_epoch at a chosen call."""


def interrupted_training(params, monkeypatch, stop_at_epoch: int | None) -> list[int]:
    """Run train.run through the real path; `stop_at_epoch`: raise as that epoch starts
    (after the previous epoch's checkpoint). Returns the epochs train.run started."""
    real, started = REAL_RUN_EPOCH, []

    def counting(model, loader, loss_fn, rt, optimizer=None, scheduler=None, desc="",
                 **kwargs):
        if optimizer is not None:  # a training pass: desc is "<model> epoch N/M"
            started.append(int(desc.split("epoch ")[1].split("/")[0]))
            if started[-1] == stop_at_epoch:
                raise Interrupted(desc)
        return real(model, loader, loss_fn, rt, optimizer, scheduler, desc, **kwargs)

    monkeypatch.setattr(train, "run_epoch", counting)
    if stop_at_epoch is None:
        train.run(params, "enhanced_pan")
    else:
        with pytest.raises(Interrupted):
            train.run(params, "enhanced_pan")
    return started


@pytest.mark.slow  # four train.run calls
def test_changed_config_or_data_never_resumes_a_stale_checkpoint(split_data, tiny_params,
                                                                 monkeypatch):
    """Through train.run: a run stopped after epoch 1 leaves a checkpoint; a changed config,
    then changed data, each start at epoch 1 and delete the stale checkpoint; the same
    config and data resume at epoch 2 (the control: resuming does happen)."""
    monkeypatch.setenv("LIVERSEG_TRACKING", "off")  # the key holds no tracking state
    params = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(
        update={"epochs": 2, "image_size": 32})})
    ckpt_dir = split_data / artifacts.CHECKPOINTS / "enhanced_pan"

    def checkpoints() -> list[str]:
        return sorted(p.name for p in ckpt_dir.iterdir())

    assert interrupted_training(params, monkeypatch, stop_at_epoch=2) == [1, 2]
    (first,) = checkpoints()
    changed = params.model_copy(update={"train": params.train.model_copy(update={"lr": 1e-4})})
    assert interrupted_training(changed, monkeypatch, stop_at_epoch=2) == [1, 2]  # afresh
    (second,) = checkpoints()  # the stale one is gone
    assert second != first

    train_csv = split_data / "data/splits/train.csv"
    rows = train_csv.read_text().splitlines()
    train_csv.write_text("\n".join(rows[:-1]) + "\n")  # one training slice less
    assert interrupted_training(changed, monkeypatch, stop_at_epoch=2) == [1, 2]  # afresh
    (third,) = checkpoints()
    assert third not in (first, second)

    assert interrupted_training(changed, monkeypatch, stop_at_epoch=None) == [2]  # resumed
    assert not ckpt_dir.exists()


class RunsCode:
    """Unpickling this would run a shell command: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_and_weights_are_refused(tmp_path, tiny_params):
    marker = tmp_path / "pwned"
    ckpt = checkpoint.TrainingCheckpoint(tmp_path / "ckpt", "enhanced_pan", "k" * 64)
    ckpt.dir.mkdir(parents=True)
    import torch

    torch.save({"epoch": 1, "payload": RunsCode(marker)}, ckpt.path)
    with pytest.raises(checkpoint.UnsafeCheckpointError, match="refused, not a weights-only"):
        ckpt.load()
    ckpt.path.write_bytes(pickle.dumps(RunsCode(marker)))  # a bare pickle
    with pytest.raises(checkpoint.UnsafeCheckpointError, match=re.escape(str(ckpt.path))):
        ckpt.load()

    model_dir = tmp_path / "model"
    checkpoint.save_config(checkpoint.model_config(tiny_params, "enhanced_pan", 0.5, 0.2),
                           model_dir / artifacts.CONFIG)
    (model_dir / artifacts.WEIGHTS).write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(checkpoint.UnsafeCheckpointError, match="not a valid safetensors"):
        checkpoint.load_model(model_dir)
    assert not marker.exists()  # nothing was executed


UNSAFE_LOAD = re.compile(r"pickle\.loads?\(|joblib\.load\(|dill\.load|cloudpickle\.load|"
                         r"allow_pickle\s*=\s*True|torch\.load\((?![^)]*weights_only=True)")


def test_no_unsafe_deserialisation_in_the_code():
    """Every torch.load passes weights_only=True; no pickle/joblib/np allow_pickle loads."""
    offenders = [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
                 for folder in ("src", "pipeline") for path in (REPO / folder).rglob("*.py")
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if UNSAFE_LOAD.search(line) and not line.lstrip().startswith("#")]
    assert offenders == []


PASSWORD, KAGGLE_KEY, TOKEN = "Hunter2-tracking-pw", "kaggle0fake0key0123456789", "tok_9f8e7d6c5b"


@pytest.fixture
def planted_secrets(monkeypatch):
    """Credentials in the environment, as a user with Kaggle and a tracking server has them."""
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", KAGGLE_KEY)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    return (PASSWORD, KAGGLE_KEY, TOKEN)


def start_tracking_server(store: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1 with its own SQLite store and artifact folder."""
    store.mkdir(exist_ok=True)
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen(
        [str(mlflow_cli), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--artifacts-destination", str(store / "artifacts"), "-h", "127.0.0.1",
         "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_http(f"http://127.0.0.1:{port}/health", server, 180)
    return server


@pytest.mark.slow  # a real mlflow server, twice
def test_secrets_never_reach_outputs_logs_or_errors(split_data, tiny_params, planted_secrets,
                                                    monkeypatch, capfd):
    """Train against a real tracking server whose URI carries a password, with a Kaggle key
    and a token in the environment. The server goes away during epoch 2: train.run fails
    with MLflow's own error (which quotes the URL) masked, and the checkpoint of epoch 1
    remains; with the server back, the rerun resumes in the same MLflow run. Then every file
    written (models, reports, checkpoints, the server's store) and all output are grepped."""
    workdir = split_data
    port = free_port()
    uri = f"http://alice:{PASSWORD}@127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's retries: seconds
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    params = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(
        update={"epochs": 2, "image_size": 32})})
    servers = [start_tracking_server(workdir / "server", port)]

    def server_goes_away(model, loader, loss_fn, rt, optimizer=None, scheduler=None, desc="",
                         **kwargs):
        if optimizer is not None and desc.endswith("epoch 2/2") and servers:
            stop_process_group(servers.pop(), timeout=30)
        return REAL_RUN_EPOCH(model, loader, loss_fn, rt, optimizer, scheduler, desc, **kwargs)

    monkeypatch.setattr(train, "run_epoch", server_goes_away)
    try:
        with pytest.raises(Exception) as raised:
            train.run(params, "enhanced_pan")
        error = str(raised.value)
        assert not servers and f"alice:***@127.0.0.1:{port}" in error, error
        epoch, run_id = saved_epoch(workdir / artifacts.CHECKPOINTS / "enhanced_pan")
        assert epoch == 1 and not (workdir / "models/enhanced_pan/run.json").exists()

        servers.append(start_tracking_server(workdir / "server", port))
        monkeypatch.setattr(train, "run_epoch", REAL_RUN_EPOCH)
        train.run(params, "enhanced_pan")
        run_json = json.loads((workdir / "models/enhanced_pan/run.json").read_text())
        assert run_json["tracking_uri"] == f"http://alice:***@127.0.0.1:{port}"
        assert run_json["run_id"] == run_id  # resumed in the run the server lost mid-way
        client = tracking.mlflow().MlflowClient()
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["resumed_after_epoch"] == "1"
        assert {m.step for m in client.get_metric_history(run_id, "val_loss")} == {1, 2}
    finally:
        for server in servers:
            stop_process_group(server, timeout=30)
    out, err = capfd.readouterr()
    texts = {"stdout+stderr": out + err, "error": error}
    for path in workdir.rglob("*"):
        if path.is_file() and "data" not in path.relative_to(workdir).parts:
            texts[str(path.relative_to(workdir))] = path.read_bytes().decode("latin-1")
    assert any(p.startswith("server/artifacts") for p in texts) and "MLmodel" in " ".join(texts)
    leaks = [(where, secret) for where, text in texts.items() for secret in planted_secrets
             if secret in text]
    assert leaks == []


@pytest.mark.parametrize(("text", "expected"), [
    ("https://bob:pw123456@host:5000/x", "https://bob:***@host:5000/x"),
    ("https://ghp_abcdef@github.com/o/r", "https://***@github.com/o/r"),
    ("s3://bucket/key?X-Amz-Signature=abc&token=xyz", "s3://bucket/key?X-Amz-Signature=abc"
                                                       "&token=***"),
    ('{"password": "hunter2", "epochs": 3}', '{"password": "***", "epochs": 3}'),
    ("KAGGLE_KEY=abc MLFLOW_TRACKING_PASSWORD: xyz",
     "KAGGLE_KEY=*** MLFLOW_TRACKING_PASSWORD: ***"),
    ("sqlite:////tmp/m/mlflow.db KeyError: 'x'", "sqlite:////tmp/m/mlflow.db KeyError: 'x'"),
])
def test_redact_masks_credentials_and_keeps_the_rest(text, expected, monkeypatch):
    monkeypatch.setenv("SOME_API_SECRET", "s3cr3t-value")
    assert redact.redact(text) == expected
    assert redact.redact("token s3cr3t-value in text") == "token *** in text"
    mapping = redact.redact_mapping({"data": {"kaggle_key": "x"}, "uri": text, "epochs": 3})
    assert mapping["data"]["kaggle_key"] == "***" and mapping["uri"] == expected


def test_unreachable_tracking_server_fails_fast_before_any_epoch(split_data, tiny_params,
                                                                  monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{PASSWORD}@127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setattr(train, "run_epoch", lambda *a, **k: pytest.fail("an epoch ran"))
    started = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable) as raised:
        train.run(tiny_params, "enhanced_pan")
    assert time.monotonic() - started < 30
    message = str(raised.value)
    assert "http://alice:***@127.0.0.1:9" in message and "unreachable" in message
    assert PASSWORD not in message
    assert not (split_data / artifacts.CHECKPOINTS).exists()
    assert not (split_data / "models").exists()


ATOMIC_CHILD = r"""
import sys, time
from pathlib import Path
from liverseg.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("half of the new cont")
    Path(sys.argv[1] + ".paused").write_text("")
    time.sleep(600)  # the parent kills us here, mid-write
"""


def test_atomic_write_killed_midway_leaves_the_old_file_whole(tmp_path):
    """liverseg.io.atomic_path (every stage's outputs): SIGKILL mid-write never exposes a
    partial file; an exception discards the temporary."""
    from liverseg.io import atomic_path, read_json, write_json

    target = write_json(tmp_path / "metrics.json", {"fg_iou": 0.5})
    proc = subprocess.Popen([sys.executable, "-c", ATOMIC_CHILD, str(target)])
    deadline = time.monotonic() + 60
    while not Path(f"{target}.paused").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.kill()
    proc.wait(timeout=30)
    assert read_json(target) == {"fg_iou": 0.5}
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("crash while writing")
    assert read_json(target) == {"fg_iou": 0.5}
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers[-1] == "metrics.json.paused" and len(leftovers) == 3  # + the killed tmp
    write_json(target, {"fg_iou": 0.6})  # a rerun simply replaces it
    assert read_json(target) == {"fg_iou": 0.6}
