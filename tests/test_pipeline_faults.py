"""Fault tests around the stages: `dvc repro` killed mid-stage, two runs in one workspace, a
DVC remote that is down, secrets in Dagster's storage, the UI on 127.0.0.1 only.

Everything runs in a private copy of the repository (ingest -> validate -> split only), with
real `dvc`, `liverseg` and `dagster` processes. Promises and their tests: docs/RELIABILITY.md.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import pandas as pd
import pytest
import yaml

from liverseg import casestore
from tests import helpers
from tests.helpers import (
    REPO,
    free_port,
    sh,
    stop_process_group,
    tiny_raw_params,
    wait_for_http,
)

pytestmark = pytest.mark.fault

STAGES = ("ingest", "validate", "split")
# Stands in for `liverseg` on PATH: runs the real stage but holds it just before it publishes
# LIVERSEG_HOLD_AT (liverseg.io.atomic_dir's final os.replace), writes the temporary's path to
# LIVERSEG_HELD, and goes on once LIVERSEG_HELD.release exists. No hook in the product code.
HOLDER = r"""
import os, sys, time
from pathlib import Path

hold, held = Path(os.environ["LIVERSEG_HOLD_AT"]), Path(os.environ["LIVERSEG_HELD"])
real_replace = os.replace

def held_replace(src, dst, *args, **kwargs):
    if Path(dst).resolve() == hold:
        held.write_text(str(Path(src).resolve()))
        deadline = time.monotonic() + 600
        while not Path(f"{held}.release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return real_replace(src, dst, *args, **kwargs)

os.replace = held_replace
from liverseg.cli import app
sys.exit(app())
"""


def write_params(root: Path, **overrides) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_raw_params(**overrides)))


def repo_env() -> dict[str, str]:
    return helpers.repo_env(OMP_NUM_THREADS="1", DVC_NO_ANALYTICS="1")


@pytest.fixture(scope="module")
def base_repo(tmp_path_factory) -> Path:
    """The repository in a new git repo, after one clean `dvc repro split`."""
    root = tmp_path_factory.mktemp("faults") / "repo"
    root.mkdir()
    helpers.copy_repository(root, tiny_raw_params())
    env = repo_env()
    sh(["dvc", "repro", "split"], root, env, timeout=300)
    return root


@pytest.fixture
def repo(base_repo, tmp_path) -> tuple[Path, dict[str, str]]:
    """A private copy of the reproduced repository (git, dvc.lock and DVC cache included)."""
    root = tmp_path / "repo"
    shutil.copytree(base_repo, root, symlinks=True)
    return root, repo_env()


def dvc(root: Path, env: dict, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)


def dvc_status(root: Path, env: dict) -> dict:
    proc = dvc(root, env, "status", "--json", *STAGES)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def start_held(root: Path, env: dict, hold_at: str, *args: str) -> tuple[subprocess.Popen, Path]:
    """Start `dvc <args>` in its own process group; return once a stage is held at `hold_at`."""
    shim = root.parent / "holder-bin"
    shim.mkdir(exist_ok=True)
    (shim / "liverseg").write_text(f"#!{sys.executable}\n{HOLDER}")
    (shim / "liverseg").chmod(0o755)
    held = root.parent / "held"
    env = env | {"PATH": f"{shim}{os.pathsep}{env['PATH']}",
                 "LIVERSEG_HOLD_AT": str(root / hold_at), "LIVERSEG_HELD": str(held)}
    proc = subprocess.Popen(["dvc", *args], cwd=root, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not held.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"never held at {hold_at}:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.05)
    return proc, held


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_data_complete(root: Path) -> None:
    """Raw slices, manifest, validation report and splits are whole and reconcile."""
    raw = pd.read_csv(root / "data/raw/slices.csv")
    manifest = pd.read_parquet(root / "data/manifest.parquet")
    report = json.loads((root / "reports/validation.json").read_text())
    assert len(raw) == len(manifest) == report["ingested"] > 0
    assert report["ingested"] == report["accepted"] + report["quarantined"]
    accepted = set(manifest.loc[manifest["accepted"], "slice_id"])
    assert len(accepted) == report["accepted"]
    splits = {name: pd.read_csv(root / f"data/splits/{name}.csv")
              for name in ("train", "val", "test")}
    stats = json.loads((root / "data/splits/stats.json").read_text())
    assert sum(len(frame) for frame in splits.values()) == len(accepted)
    assert set().union(*(set(frame["slice_id"]) for frame in splits.values())) == accepted
    for name, frame in splits.items():
        assert stats[name]["slices"] == len(frame)
        for row in frame.itertuples():
            image = casestore.read(root / "data/raw", row.image)  # raises when missing
            casestore.read(root / "data/raw", row.mask, "mask")
            if "image_sha256" in frame:  # the split's record of the pixels it was made from
                assert casestore.slice_digest(image) == row.image_sha256


# -- dvc repro killed mid-stage ------------------------------------------------------------


@pytest.mark.parametrize(("stage", "out", "change"), [
    ("ingest", "data/raw", {"data": {"phantom": {"patients": 5}}}),
    ("split", "data/splits", {"split": {"val_fraction": 0.2}}),
], ids=["ingest", "split"])
def test_repro_killed_mid_stage_reruns_to_a_clean_status(repo, stage, out, change):
    """SIGKILL to `dvc repro`'s process group with the stage's new output fully written but
    not yet published; the plain rerun completes, `dvc status` is clean, outputs are whole
    and equal to what the killed run was about to publish."""
    root, env = repo
    write_params(root, **change)  # a real change: the stage has to run again
    proc, held = start_held(root, env, out, "repro", "split")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    unpublished = Path(held.read_text())
    assert unpublished.is_dir() and not (root / out).exists()  # old output gone
    assert stage in dvc_status(root, env)  # ... and knows the stage is not done
    expected = tree_digest(unpublished)

    rerun = sh(["dvc", "repro", "split"], root, env, timeout=300)  # nothing cleaned by hand
    assert f"Running stage '{stage}'" in rerun
    assert "had been killed. Auto removed it from the lock file" in rerun  # stale rwlock
    assert dvc_status(root, env) == {}
    assert_data_complete(root)
    assert tree_digest(root / out) == expected
    assert not unpublished.exists()  # the killed run's temporary went with the rerun
    assert list((root / out).parent.glob(f".{Path(out).name}.*")) == []


# -- two runs in one workspace ------------------------------------------------------------

BUSY = re.compile(r"Unable to acquire lock|is busy, it is being blocked by")


def test_second_repro_in_the_same_workspace_is_refused_while_one_runs(repo):
    """The first `dvc repro split` is held inside its split stage; a second one (and a
    `dvc status`) fail at once naming the first's PID, run nothing, and the first completes."""
    root, env = repo
    write_params(root, split={"val_fraction": 0.2})
    first, held = start_held(root, env, "data/splits", "repro", "split")
    try:
        started = time.monotonic()
        second = dvc(root, env, "repro", "split", timeout=120)
        elapsed = time.monotonic() - started
        status = dvc(root, env, "status", *STAGES, timeout=120)
    finally:
        Path(f"{held}.release").write_text("")
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out[-3000:]

    refused = second.stdout + second.stderr
    assert second.returncode != 0 and BUSY.search(refused), refused
    # Only the listing of the source (`always_changed`, outside the held lock) runs.
    assert f"PID {first.pid}" in refused and not re.search(r"Running stage '(?!source')",
                                                              refused)
    assert elapsed < 30  # fails, does not wait
    assert status.returncode != 0 and BUSY.search(status.stdout + status.stderr)
    assert dvc_status(root, env) == {}
    assert_data_complete(root)


# -- a remote that is down ------------------------------------------------------------------


def test_push_to_a_remote_that_is_down_fails_fast_and_keeps_the_cache(repo):
    root, env = repo
    port = free_port()  # closed again: nothing listens there
    sh(["dvc", "remote", "add", "down", f"http://127.0.0.1:{port}/store"], root, env)
    cache = root / ".dvc/cache"
    before = tree_digest(cache)
    assert before

    started = time.monotonic()
    push = dvc(root, env, "push", "-r", "down", timeout=120)
    elapsed = time.monotonic() - started
    message = push.stdout + push.stderr
    assert push.returncode != 0
    assert f"Cannot connect to host 127.0.0.1:{port}" in message, message[-3000:]
    assert "failed to push data to the cloud" in message
    assert elapsed < 30

    assert tree_digest(cache) == before
    assert dvc_status(root, env) == {}
    shutil.rmtree(root / "data/raw")
    shutil.rmtree(root / "data/splits")
    (root / "data/manifest.parquet").unlink()
    sh(["dvc", "checkout", *STAGES], root, env)  # everything comes back from the cache
    assert dvc_status(root, env) == {}
    assert_data_complete(root)


# -- secrets in Dagster's storage ---------------------------------------------------------

PASSWORD, KAGGLE_KEY, TOKEN = "Hunter2-tracking-pw", "kaggle0fake0key0123456789", "tok_9f8e7d6c5b"


def sqlite_values(path: Path) -> dict[str, str]:
    """Every value of every table, zlib blobs (Dagster's job snapshots) decompressed."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {table: "\n".join(map(text_of, (v for row in con.execute(
            f'SELECT * FROM "{table}"') for v in row))) for table in tables}
    finally:
        con.close()


def text_of(value) -> str:
    if isinstance(value, bytes):
        try:
            value = zlib.decompress(value)
        except zlib.error:
            pass
        return value.decode("latin-1")
    return str(value)


def stored_texts(home: Path) -> dict[str, str]:
    """Every file under `home` as text, plus every SQLite value: a grep of the raw .db
    files would miss compressed snapshots and text split across overflow pages."""
    texts = {}
    for path in sorted(p for p in home.rglob("*") if p.is_file()):
        name, raw = str(path.relative_to(home)), path.read_bytes()
        texts[name] = raw.decode("latin-1")
        if raw.startswith(b"SQLite format 3"):
            texts |= {f"{name}:{t}": v for t, v in sqlite_values(path).items()}
    return texts


def test_dagster_run_storage_event_and_compute_logs_hold_no_secret(repo, tmp_path, monkeypatch):
    """Materialise the `ingest` asset in-process with a Kaggle key, an MLflow token and a
    tracking URI with a password in the environment; then read all of DAGSTER_HOME."""
    import dagster as dg

    from pipeline.assets import asset_key, build_assets
    from pipeline.resources import resources_from_env

    root, env = repo
    write_params(root, data={"phantom": {"patients": 5}})  # so the stage really runs
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "pipeline/dagster.yaml", home / "dagster.yaml")
    for key, value in (env | {
            "DAGSTER_HOME": str(home), "LIVERSEG_REPO_ROOT": str(root),
            "KAGGLE_USERNAME": "alice", "KAGGLE_KEY": KAGGLE_KEY, "MLFLOW_TRACKING_TOKEN": TOKEN,
            "MLFLOW_TRACKING_URI": f"https://alice:{PASSWORD}@tracking.invalid"}).items():
        monkeypatch.setenv(key, value)

    with dg.DagsterInstance.get() as instance:
        result = dg.materialize(build_assets(root), selection=[asset_key("ingest")],
                                resources=resources_from_env(), instance=instance)
    assert result.success

    texts = stored_texts(home)
    everything = "\n".join(texts.values())
    assert "Running stage 'ingest'" in everything  # the stage ran; its output was stored
    assert any("compute_logs" in name for name in texts)
    assert "MLFLOW_TRACKING_URI" in everything  # the snapshot names the variable, decompressed
    leaks = [(name, secret) for name, text in texts.items()
             for secret in (PASSWORD, KAGGLE_KEY, TOKEN) if secret in text]
    assert leaks == []


# -- services bind to 127.0.0.1 -----------------------------------------------------------

SERVER = re.compile(r"(dagster dev|dagster-webserver|mlflow (?:ui|server))\b[^`\n]*")


def recipe(makefile: str, target: str) -> list[str]:
    match = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert match, f"no `{target}` target"
    return [line.strip() for line in match.group(1).splitlines()]


def listening(pgid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket a process of the group listens on (Linux /proc)."""
    inodes = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) == pgid:
                fds = Path(f"/proc/{pid}/fd")
                links = [os.readlink(fd) for fd in fds.iterdir()]
                inodes |= {link[8:-1] for link in links if link.startswith("socket:[")}
        except OSError:  # gone, or not ours to read
            continue
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                host, port = fields[1].split(":")
                words = bytes.fromhex(host)  # 32-bit words in host (little-endian) order
                packed = b"".join(words[i:i + 4][::-1] for i in range(0, len(words), 4))
                found.add((socket.inet_ntop(family, packed), int(port, 16)))
    return found


def test_make_ui_listens_on_loopback_only(tmp_path):
    """Statically: no 0.0.0.0 in the Makefile; `make ui` and every UI command of the Makefile
    and README pass `-h 127.0.0.1`. Live: the `ui` recipe's command (another port) listens
    on 127.0.0.1 only, over all its processes (webserver, daemon, code servers)."""
    makefile = (REPO / "Makefile").read_text()
    assert "0.0.0.0" not in makefile
    commands = [m.group(0) for text in (makefile, (REPO / "README.md").read_text())
                for m in SERVER.finditer(text)]
    assert commands and all(re.search(r"(-h|--host)[ =]127\.0\.0\.1\b", c) for c in commands)
    (ui,) = [line for line in recipe(makefile, "ui") if line.startswith("dagster")]
    cmd = shlex.split(ui)
    assert cmd[:2] == ["dagster", "dev"] and cmd[cmd.index("-h") + 1] == "127.0.0.1"

    port = free_port()
    cmd[cmd.index("-p") + 1] = str(port)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "pipeline/dagster.yaml", home / "dagster.yaml")
    env = repo_env() | {"DAGSTER_HOME": str(home), "DAGSTER_DISABLE_TELEMETRY": "1"}
    with (tmp_path / "ui.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        info = f"http://127.0.0.1:{port}/server_info"
        wait_for_http(info, proc, 120)
        with urllib.request.urlopen(info, timeout=5) as response:
            assert b"dagster_webserver_version" in response.read()
        sockets = listening(proc.pid)
        assert ("127.0.0.1", port) in sockets
        assert all(ipaddress.ip_address(host).is_loopback for host, _ in sockets), sockets
    finally:
        stop_process_group(proc, timeout=30)
