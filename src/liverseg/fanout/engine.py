"""Every model at once: one workspace per model, DVC's run-cache between them, one dvc.lock.

DVC runs the stages of one workspace one at a time, so parallel training fans out to
workspaces of their own and meets again through the DVC remote (docs/SCALING.md):

1. primary: `dvc repro --pull` of the stages the models share (ingest, validate, split),
   then `dvc push` of their outputs, so no worker recomputes them;
2. a worker per model, in a git worktree at the primary's commit with the primary's files
   copied over it: `dvc repro --pull --single-item` of each of the model's stages
   (train@M, evaluate@M), then `dvc push --run-cache`;
3. primary: `dvc repro --pull`: every model stage is restored from the run-cache ("is
   cached - skipping run"), compare/register/report run, dvc.lock is written once.

Nothing here schedules: Dagster's executor runs the workers (pipeline/parallel.py); which
GPU each one gets is `devices`. DVC and git are only called as commands, through
liverseg.runner. Imports no Dagster, so it also runs in a bare worker.
"""

from __future__ import annotations

import fcntl
import filecmp
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from liverseg import runner
from liverseg.artifacts import RUN, Artifacts
from liverseg.config import load_params
from liverseg.fanout.dvc_graph import Stage, overlaps
from liverseg.fanout.errors import FanoutError, WorkerFailed

WORKSPACES_ENV = "LIVERSEG_WORKSPACES"  # where worker workspaces live (default: in .git)
CARRY = ".fanout-carry"  # scratch folder in a worker for the `cache: false` outputs
OUTCOME = re.compile(r"Stage '(?P<restored>[^']+)' is cached - skipping run"
                     r"|Running stage '(?P<ran>[^']+)'"
                     r"|Stage '(?P<unchanged>[^']+)' didn't change")

Log = Callable[[str], None]


@dataclass(frozen=True)
class Plan:
    upstream: tuple[str, ...]  # run once in the primary, before the workers
    per_model: dict[str, tuple[str, ...]]  # model -> its stage items, in order


# --------------------------------------------------------------------------- the plan

def models(root: Path) -> list[str]:
    """params.yaml `models`, through config (a misspelt name is refused there, by name)."""
    return list(load_params(root / "params.yaml").models)


def _ancestors(stages: dict[str, Stage], names: set[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(names)
    while todo:
        for up in stages[todo.pop()].upstream - seen:
            seen.add(up)
            todo.append(up)
    return seen


def plan(stages: dict[str, Stage], model_names: list[str]) -> Plan:
    """Each model's `<stage>@<model>` items and the stages they all need first."""
    per_model = {}
    for model in model_names:
        own = [n for n in stages if n.endswith(f"@{model}")]
        if not own:
            raise FanoutError(f"dvc.yaml: no stage item ends in @{model} (params.yaml `models`)")
        # dvc.yaml order is not a promise: upstream first within the model
        per_model[model] = tuple(sorted(own, key=lambda n: len(_ancestors(stages, {n}))))
    fanned = {n for names in per_model.values() for n in names}
    for model, names in per_model.items():
        foreign = _ancestors(stages, set(names)) & (fanned - set(names))
        if foreign:
            raise FanoutError(f"dvc.yaml: {names} of {model} depend on other models' stages "
                              f"{sorted(foreign)}; they cannot run in a workspace of their own")
    upstream = _ancestors(stages, fanned) - fanned
    return Plan(tuple(n for n in stages if n in upstream), per_model)


# --------------------------------------------------------------------------- commands

def run(cmd: list[str], cwd: Path, env: dict[str, str], log: Log,
        log_file: Path | None = None, pass_fds: tuple[int, ...] = ()) -> str:
    """runner.stream, its failure a FanoutError (what the Dagster ops catch)."""
    try:
        return runner.stream(cmd, cwd, env, log, log_file, pass_fds)
    except runner.CommandFailed as exc:
        raise FanoutError(str(exc)) from None


def _git(root: Path, *args: str) -> str:
    try:
        return runner.git_checked(*args, cwd=root)
    except runner.CommandFailed as exc:
        raise FanoutError(str(exc)) from None


def base_env(root: Path, tracking_uri: str = "") -> dict[str, str]:
    """This interpreter's bin first (liverseg, dvc) and one tracking store for everyone: the
    primary's SQLite file unless a server (or another store) is configured."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{root / uri.removeprefix('sqlite:///')}"  # relative: the primary's
    return os.environ | {"PATH": runner.tools_path(), "MLFLOW_TRACKING_URI": uri}


def outcomes(output: str) -> dict[str, str]:
    """What `dvc repro` did per stage: restored (run-cache), ran, or unchanged."""
    return {name: kind for m in OUTCOME.finditer(output)
            for kind, name in m.groupdict().items() if name}


# --------------------------------------------------------------------------- the primary

def check_remote(config: dict[str, str], remote: str | None) -> str:
    """The default remote: `dvc repro --pull` restores from it and from no other."""
    default = config.get("core.remote")
    if not default:
        raise FanoutError("no DVC default remote: workers exchange results through it "
                          "(`dvc remote add -d NAME URL`, e.g. S3 or a shared folder)")
    if remote and remote != default:
        raise FanoutError(f"LIVERSEG_DVC_REMOTE={remote} but the DVC default remote is "
                          f"{default}: `dvc repro --pull` uses the default remote only; "
                          f"make it the default (`dvc remote default {remote}`)")
    return default


def prepare(root: Path, the_plan: Plan, dvc: str, env: dict[str, str],
            log: Log) -> dict[str, str]:
    """Run and push the shared stages once; create the MLflow experiment in the primary
    (its artifact folder is then the primary's, and workers never race to create it)."""
    done = {}
    if the_plan.upstream:
        done = outcomes(run([dvc, "repro", "--pull", *the_plan.upstream], root, env, log))
        run([dvc, "push", *the_plan.upstream], root, env, log)
    run([sys.executable, "-c", "from liverseg import tracking\n"
         "if tracking.enabled(): tracking.mlflow()"], root, env, log)
    return done


def finish(root: Path, dvc: str, env: dict[str, str], log: Log) -> dict[str, str]:
    """The one `dvc repro` of the primary: model stages come from the run-cache."""
    return outcomes(run([dvc, "repro", "--pull"], root, env, log))


# --------------------------------------------------------------------------- workspaces

def workspace_dir(root: Path, commit: str, model: str) -> Path:
    """Stable per commit and model, so a rerun finds the checkpoint of a killed worker.
    Default: inside .git, where neither git status nor DVC looks."""
    base = os.environ.get(WORKSPACES_ENV)
    if not base:
        common = _git(root, "rev-parse", "--path-format=absolute", "--git-common-dir").strip()
        base = str(Path(common) / "liverseg-workspaces")
    return Path(base) / commit[:12] / model


@contextmanager
def workspace_lock(ws: Path, log: Log) -> Iterator[int]:
    """An exclusive lock per workspace: two fan-outs never share one. The fd is passed on to
    the worker's commands, so the lock lives as long as any of them does."""
    ws.parent.mkdir(parents=True, exist_ok=True)
    lock = ws.parent / f"{ws.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"{lock}: another fan-out works in {ws}; waiting for it to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def source_files(repo: Path) -> set[str]:
    """What git would see: tracked files plus untracked ones that are not ignored."""
    out = _git(repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    return {p for p in out.split("\0") if p and not p.endswith("/")}


def ensure_worktree(root: Path, ws: Path, commit: str) -> None:
    if (ws / ".git").is_file() and _git(ws, "rev-parse", "HEAD").strip() == commit:
        return  # a previous attempt's workspace (its checkpoints included)
    shutil.rmtree(ws, ignore_errors=True)
    _git(root, "worktree", "prune")
    _git(root, "worktree", "add", "--force", "--detach", str(ws), commit)


def stage_inputs(stages: dict[str, Stage], names: tuple[str, ...]) -> list[str]:
    """What the run-cache key of these stages hashes from the workspace: the deps no stage
    produces (the code), params.yaml and dvc.yaml. The other deps are pulled by hash."""
    produced = [out for st in stages.values() for out in st.outs]
    deps = {d for n in names for d in stages[n].deps
            if not any(overlaps(d, out) for out in produced)}
    return sorted(deps | {"params.yaml", "dvc.yaml"})


def _walk(repo: Path, paths: list[str]) -> set[str]:
    """Every file under `paths`, git-ignored ones included (__pycache__): DVC hashes them."""
    files = set()
    for rel in paths:
        path = repo / rel
        found = path.rglob("*") if path.is_dir() else [path]
        files |= {str(f.relative_to(repo)) for f in found if f.is_file()}
    return files


def fingerprint(repo: Path, paths: list[str]) -> dict[str, str]:
    return {rel: hashlib.sha256((repo / rel).read_bytes()).hexdigest()
            for rel in sorted(_walk(repo, paths))}


def check_inputs(ws: Path, paths: list[str], expected: dict[str, str]) -> None:
    """Refuse a workspace whose stage inputs differ from the primary's: its run-cache entry
    would never match, and the primary would train the model again."""
    found = fingerprint(ws, paths)
    differ = sorted(k for k in found.keys() | expected.keys() if found.get(k) != expected.get(k))
    if differ:
        raise FanoutError(f"{ws}: stage inputs differ from the primary's: {differ[:8]}; a "
                          "worker must see the primary's exact files (on another machine: "
                          "commit them)")


def mirror(root: Path, ws: Path, inputs: list[str]) -> int:
    """Make the worker's files exactly the primary's: what git sees (uncommitted edits and
    dvc.lock included) and every file of the stage inputs. Returns the number copied."""
    want = {p for p in source_files(root) | _walk(root, inputs) if (root / p).is_file()}
    for rel in (source_files(ws) | _walk(ws, inputs)) - want:
        (ws / rel).unlink(missing_ok=True)
    copied = 0
    for rel in sorted(want):
        src, dst = root / rel, ws / rel
        if dst.is_file() and filecmp.cmp(src, dst, shallow=False):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        copied += 1
    return copied


def use_primary_remotes(ws: Path, config: dict[str, str], dvc: str,
                        env: dict[str, str], log: Log) -> None:
    """A relative remote path (`../.dvc-storage`) would name a folder of the worktree: point
    the worker at the primary's, in its git-ignored .dvc/config.local."""
    for key, value in config.items():
        local_path = key.startswith("remote.") and key.endswith(".url") and "://" not in value
        if local_path or key == "core.remote":
            run([dvc, "config", "--local", key, value], ws, env, log)


def remove_workspace(root: Path, ws: Path) -> None:
    shutil.rmtree(ws, ignore_errors=True)
    _git(root, "worktree", "prune")


# --------------------------------------------------------------------------- the worker

def push_uncached(ws: Path, paths: list[str], dvc: str, env: dict[str, str], log: Log,
                  **kw) -> None:
    """DVC 3 pushes a run-cache entry but not the objects of its `cache: false` outputs
    (train's curve, evaluate's metrics), so the primary would rerun those stages. The same
    bytes added from a copy are the same objects (content-addressed): push those."""
    shutil.rmtree(ws / CARRY, ignore_errors=True)
    copies = []
    for i, rel in enumerate(p for p in paths if (ws / p).exists()):
        copy = ws / CARRY / str(i) / Path(rel).name
        copy.parent.mkdir(parents=True)
        (shutil.copytree if (ws / rel).is_dir() else shutil.copy2)(ws / rel, copy)
        copies.append(str(copy.relative_to(ws)))
    if copies:
        run([dvc, "add", *copies], ws, env, log, **kw)
        run([dvc, "push", *(c + ".dvc" for c in copies)], ws, env, log, **kw)
    shutil.rmtree(ws / CARRY, ignore_errors=True)


def worker_env(ws: Path, env: dict[str, str], device: str | None) -> dict[str, str]:
    """The worker imports the code it hashed (its own src/), and writes no bytecode into it:
    DVC hashes the deps again after the run, and a new .pyc would change the key."""
    path = os.pathsep.join(p for p in (str(ws / "src"), env.get("PYTHONPATH")) if p)
    return env | {"PYTHONPATH": path, "PYTHONDONTWRITEBYTECODE": "1"} | (
        {"CUDA_VISIBLE_DEVICES": device} if device else {})


def work_items(root: Path, stages: dict[str, Stage], the_plan: Plan) -> list[dict]:
    """One item per model, all a worker needs from the primary, also on another machine:
    its stages, the primary's dvc.lock (the shared stages' hashes) and input fingerprint."""
    lock = runner.lock_path(root)
    items = []
    for index, (model, names) in enumerate(the_plan.per_model.items()):
        inputs = stage_inputs(stages, names)
        items.append({"model": model, "index": index, "stages": list(names),
                      "inputs": fingerprint(root, inputs),
                      "lock": lock.read_text() if lock.is_file() else None})
    return items


def work(root: Path, item: dict, stages: dict[str, Stage], *, dvc: str, env: dict[str, str],
         device: str | None, log: Log) -> dict:
    """Run one model's stages (a `work_items` item) in its own workspace and push them with
    the run-cache.

    Success removes the workspace (its results are in the remote); a failure keeps it,
    checkpoint included, for the next attempt, and raises WorkerFailed with the log.
    """
    model, names = item["model"], tuple(item["stages"])
    commit = _git(root, "rev-parse", "HEAD").strip()
    ws = workspace_dir(root, commit, model)
    log_file = ws.parent / f"{model}.log"
    config = runner.dvc_config(root, dvc, env)  # the primary's: local remote paths absolute
    with workspace_lock(ws, log) as fd:
        log_file.write_text(f"# {model} at {commit} in {ws}, CUDA_VISIBLE_DEVICES={device}\n")
        wenv = worker_env(ws, env, device)
        kw = {"log_file": log_file, "pass_fds": (fd,)}
        done: dict[str, str] = {}
        try:
            ensure_worktree(root, ws, commit)
            inputs = stage_inputs(stages, names)
            copied = mirror(root, ws, inputs)
            if item["lock"] is not None:
                (ws / "dvc.lock").write_text(item["lock"])
            check_inputs(ws, inputs, item["inputs"])
            log(f"{model}: workspace {ws} ({copied} files copied from {root})")
            use_primary_remotes(ws, config, dvc, wenv, log)
            for name in names:
                out = run([dvc, "repro", "--pull", "--single-item", name], ws, wenv, log, **kw)
                done |= outcomes(out)
            run([dvc, "push", "--run-cache", *names], ws, wenv, log, **kw)
            push_uncached(ws, [p for n in names for p in stages[n].uncached], dvc, wenv, log,
                          **kw)
        except FanoutError as exc:
            tail = "\n".join(log_file.read_text().splitlines()[-60:])
            raise WorkerFailed(model, str(exc).splitlines()[0], log_file, tail) from None
        run_info = _read_run(Artifacts(ws).model_dir(model) / RUN)
        remove_workspace(root, ws)
    return {"model": model, "stages": done, "device": device or "cpu", "commit": commit,
            "log_file": str(log_file), "run": run_info}


def _read_run(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
