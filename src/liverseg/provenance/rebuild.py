"""The audit's scratch workspace: the recorded commit, its data and params, trained again.

- A shared clone of this repository at the recorded commit (the primary's .git is only read).
- The recorded data (data/raw, data/splits) checked out by their DVC hashes from this
  repository's cache or, failing that, its remotes.
- The commit's params.yaml, parsed by the commit's own code, must agree with the params in the
  registered config.json (the sections that shape training and evaluation).
- `liverseg train MODEL` and `liverseg evaluate MODEL` of the commit's code, tracking off (the
  registry gains no runs), on the device the model was trained on where there is one.

Git and DVC only as commands, through `liverseg.runner`. `AuditError` lives here, the first
step that can refuse; the comparison and the orchestration (`audit`) raise the same one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from liverseg import artifacts, runner, tracking
from liverseg.params_dict import param_changes

# Params sections that cannot change the rebuilt weights or metrics: which models are
# compared, how they are ranked and registered, when the schedule runs.
PARAMS_NOT_REBUILT = {"models", "compare", "register", "schedule"}
DATA = {"data_raw_md5": artifacts.RAW, "data_splits_md5": artifacts.SPLITS}  # train reads


class AuditError(ValueError):
    """The model cannot be rebuilt; the message names what is missing or inconsistent."""


def _tail(proc: subprocess.CompletedProcess, lines: int = 15) -> str:
    return "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-lines:])


# ----------------------------------------------------------------------------- workspace


def clone_at(root: Path, commit: str, dest: Path) -> Path:
    """A shared clone of `root` checked out at `commit` (the primary's .git is only read)."""
    if not commit or commit == "unknown":
        raise AuditError("the trail records no git commit (tag git_commit): nothing to rebuild")
    if runner.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], root, timeout=60).returncode:
        raise AuditError(f"commit {commit} (tag git_commit) is not in the repository at {root}: "
                         "fetch it (git fetch --all) or audit from a clone that has it")
    for args, cwd in ((["git", "clone", "-q", "--shared", "--no-checkout", str(root), str(dest)],
                       root), (["git", "checkout", "-q", "--detach", commit], dest)):
        proc = runner.run(args, cwd)
        if proc.returncode != 0:
            raise AuditError(f"`{' '.join(args)}` failed: {_tail(proc)}")
    return dest


def _remotes(root: Path) -> dict[str, dict[str, str]]:
    """The primary's DVC remotes: name -> {option: value} (url resolved by DVC; options
    such as endpointurl or profile kept). `dvc config --list`: `dvc remote list` wraps."""
    remotes: dict[str, dict[str, str]] = {}
    for key, value in runner.dvc_config(root).items():
        if match := re.fullmatch(r"remote\.(.+)\.([^.=]+)", key):
            remotes.setdefault(match[1], {})[match[2]] = value
    return {name: options for name, options in remotes.items() if "url" in options}


def _write_remotes(scratch: Path, remotes: dict[str, dict[str, str]]) -> None:
    """The remotes into the scratch project's config.local: a file, not command lines, since
    options may hold credentials (never on a process list)."""
    lines = []
    for name, options in remotes.items():
        lines += [f"['remote \"{name}\"']"] + [f"    {k} = {v}" for k, v in options.items()]
    config = scratch / ".dvc" / "config.local"
    config.touch(mode=0o600)
    config.write_text("\n".join(lines) + "\n")


def fetch_data(root: Path, hashes: dict[str, str], work: Path, dest: Path) -> dict:
    """Check out the recorded data outputs by hash into `dest` (the clone): a scratch DVC
    project whose cache is the primary's and whose remotes are the primary's, holding one
    `.dvc` file per output. Returns where each came from."""
    dvc = runner.dvc_executable()
    missing = [key for key in DATA if hashes.get(key) in (None, "missing")]
    if missing:
        raise AuditError(f"the trail records no DVC hash for {missing}: cannot fetch the data")
    cache = runner.run([dvc, "cache", "dir"], root, timeout=120)
    if cache.returncode != 0:
        raise AuditError(f"`dvc cache dir` failed in {root}: {_tail(cache)}")
    scratch = work / "data"
    scratch.mkdir()
    for args in ([dvc, "init", "--no-scm", "-q"], [dvc, "config", "cache.dir",
                                                    cache.stdout.strip()]):
        if (proc := runner.run(args, scratch, timeout=120)).returncode != 0:
            raise AuditError(f"`{' '.join(args)}` failed: {_tail(proc)}")
    remotes = _remotes(root)
    _write_remotes(scratch, remotes)
    targets = []
    for key, path in DATA.items():
        name = Path(path).name
        (scratch / f"{name}.dvc").write_text(yaml.safe_dump(
            {"outs": [{"md5": hashes[key], "hash": "md5", "path": name}]}))
        targets.append(f"{name}.dvc")
    source = {"cache": cache.stdout.strip()}
    if runner.run([dvc, "checkout", *targets], scratch).returncode != 0:
        pulled = [name for name in remotes
                  if runner.run([dvc, "pull", "-r", name, *targets], scratch).returncode == 0]
        if not pulled:
            wanted = ", ".join(f"{DATA[k]} (md5 {hashes[k]}, tag {k})" for k in DATA)
            where = (" nor in " + ", ".join(f"remote '{n}' ({o['url']})"
                                            for n, o in remotes.items())
                     if remotes else ", and no DVC remote is configured")
            raise AuditError(f"the recorded data is not available: {wanted} is neither in the DVC "
                             f"cache {cache.stdout.strip()}{where}; `dvc push` it from a "
                             "workspace that has it, or restore the cache")
        source = {"remote": pulled[0]}
    for path in DATA.values():
        (dest / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(scratch / Path(path).name, dest / path)
    return source | {k: hashes[k] for k in DATA}


# ----------------------------------------------------------------------------- params


def _python(work: Path, code: str, env: dict) -> subprocess.CompletedProcess:
    return runner.run([sys.executable, "-c", code], work, env, timeout=600)


def commit_params(work: Path, env: dict) -> dict:
    """The commit's params.yaml as the commit's own code resolves it (its schema, defaults)."""
    code = ("import json; from liverseg.config import load_params; "
            "print(json.dumps(load_params('params.yaml').dump()))")
    proc = _python(work, code, env)
    if proc.returncode != 0:
        raise AuditError(f"params.yaml at the recorded commit does not load with that commit's "
                         f"code: {_tail(proc, 5)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def params_differences(trained: dict, committed: dict) -> list[str]:
    """`train.epochs: trained with 1, params.yaml has 2` for every rebuild-relevant key."""
    return [f"{key}: trained with {a!r}, params.yaml has {b!r}"
            for key, a, b in param_changes(trained, committed)
            if key.split(".")[0] not in PARAMS_NOT_REBUILT]


# ----------------------------------------------------------------------------- rebuild


def rebuild_env(work: Path, cpu_only: bool) -> dict:
    """The commit's code first on the path; no tracking (the registry gains no runs)."""
    env = os.environ | {
        "PYTHONPATH": str(work / "src"),
        tracking.TRACKING_ENV: "off",
        # Older commits know no LIVERSEG_TRACKING: their runs go to a scratch store.
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlruns' / 'mlflow.db'}",
    }
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""  # train.device auto must pick the CPU, as recorded
    return env


def rebuild(work: Path, model: str, env: dict, log) -> dict[str, float]:
    """Run the commit's train and evaluate stages for `model`; seconds per stage."""
    seconds = {}
    for stage in ("train", "evaluate"):
        log(f"audit: liverseg {stage} {model} at the recorded commit")
        start = time.perf_counter()
        proc = runner.run([sys.executable, "-m", "liverseg", stage, model], work, env)
        seconds[stage] = round(time.perf_counter() - start, 1)
        if proc.returncode != 0:
            raise AuditError(f"`liverseg {stage} {model}` at the recorded commit failed "
                             f"(exit {proc.returncode}): {_tail(proc)}")
    return seconds
