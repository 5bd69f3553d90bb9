"""`liverseg audit REF`: rebuild a registered model from its trail and show it is the same model.

`lineage` compares the trail with the workspace (a promise); the audit re-executes it (a proof):

1. The version and its trail (`lineage.trail`). A trail recorded from a dirty tree is refused:
   the commit does not hold the code that trained the model.
2. What the registry holds: the version's `model.safetensors` + `config.json` and its run's
   training curve (`<model>.csv`).
3. A scratch workspace: a shared clone of this repository at the recorded commit, and the
   recorded data (data/raw, data/splits) checked out by their DVC hashes from this
   repository's cache or, failing that, its remotes.
4. The commit's params.yaml, parsed by the commit's own code, must agree with the params in the
   registered config.json (the sections that shape training and evaluation).
5. `liverseg train MODEL` and `liverseg evaluate MODEL` of the commit's code, tracking off (the
   registry gains no runs), on the device the model was trained on where there is one.
6. Weights (sha256 of the tensors; the largest absolute difference when not identical), the
   metrics recorded at registration and the training curve are compared: bitwise when trained
   and rebuilt on CPU (deterministic there), within `tolerance` when a GPU was involved
   (cuDNN and bf16 autocast are not bitwise reproducible).
7. The outcome is written back as `audit_*` tags on the version (`lineage` shows them).

Plain functions: no Dagster; git and DVC only as commands.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

from liverseg import runner, tracking
from liverseg.provenance import lineage

DEFAULT_TOLERANCE = 0.01  # absolute, on metrics and curve values, when a GPU was involved
TIMING_KEYS = {"images_per_second"}  # measured speed, not a property of the model
# Params sections that cannot change the rebuilt weights or metrics: which models are
# compared, how they are ranked and registered, when the schedule runs.
PARAMS_NOT_REBUILT = {"models", "compare", "register", "schedule"}
DATA = {"data_raw_md5": "data/raw", "data_splits_md5": "data/splits"}  # what train reads
PASSING = ("identical", "within tolerance")


class AuditError(ValueError):
    """The model cannot be rebuilt; the message names what is missing or inconsistent."""


# ----------------------------------------------------------------------------- commands


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
    old, new = lineage.flat(trained), lineage.flat(committed)
    return [f"{key}: trained with {old.get(key, '<absent>')!r}, params.yaml has "
            f"{new.get(key, '<absent>')!r}" for key in sorted(old.keys() | new.keys())
            if key.split(".")[0] not in PARAMS_NOT_REBUILT and old.get(key) != new.get(key)]


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


# ----------------------------------------------------------------------------- comparing


def _close(a, b, tol: float) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b or abs(a - b) <= tol
    return a == b


def _digest(path: Path, whose: str) -> str:
    from safetensors import SafetensorError

    try:
        return lineage.tensor_digest(path)
    except (SafetensorError, OSError) as exc:
        raise AuditError(f"{whose} weights {path.name} are not a readable safetensors file "
                         f"({exc}): the file was damaged or replaced") from None


def compare_weights(registry: Path, rebuilt: Path, recorded_sha: str | None,
                    tol: float | None) -> dict:
    """Tensor digests of the registry's and the rebuilt weights (and the digest recorded at
    registration); the largest absolute difference when they are not identical. `tol` None:
    weights are compared bitwise; else their difference is reported, not judged."""
    from liverseg.checkpoint import load_weights

    out = {"registry_sha256": _digest(registry, "the registry's"),
           "rebuilt_sha256": _digest(rebuilt, "the rebuilt"), "recorded_sha256": recorded_sha}
    out["identical"] = out["registry_sha256"] == out["rebuilt_sha256"]
    diffs = []
    if recorded_sha and recorded_sha != out["registry_sha256"]:
        diffs.append(f"weights: the registry's model.safetensors (sha256 {out['registry_sha256']})"
                     f" is not what was registered (tag weights_sha256 {recorded_sha}): the "
                     "registry artifact was altered after registration")
    if not out["identical"]:
        a, b = load_weights(registry), load_weights(rebuilt)
        shared = sorted(a.keys() & b.keys())
        odd = sorted(a.keys() ^ b.keys()) + [k for k in shared if a[k].shape != b[k].shape]
        deltas = {k: float((a[k].double() - b[k].double()).abs().max())
                  for k in shared if a[k].shape == b[k].shape and a[k].numel()}
        worst = max(deltas, key=deltas.get) if deltas else None
        out |= {"max_abs_diff": deltas.get(worst), "max_abs_diff_tensor": worst,
                "differing_tensors": sum(v > 0 for v in deltas.values()) + len(odd),
                "tensors": len(a.keys() | b.keys())}
        line = (f"weights: rebuilt sha256 {out['rebuilt_sha256'][:16]} != registry "
                f"{out['registry_sha256'][:16]}; largest |difference| {out['max_abs_diff']:.3g} "
                f"in {worst!r} ({out['differing_tensors']} of {out['tensors']} tensors differ)"
                + (f"; names or shapes differ: {odd[:5]}" if odd else ""))
        if tol is None or odd:
            diffs.append(line)
        else:
            out["note"] = line + " (reported, not judged: weights drift on GPU)"
    out["differences"] = diffs
    return out


def compare_metrics(recorded: dict, rebuilt: dict, tol: float) -> dict:
    """The metrics recorded at registration (tag `metrics`) against the rebuilt evaluate's."""
    keys = sorted((recorded.keys() & rebuilt.keys()) - TIMING_KEYS - {"model"})
    diffs = [f"metrics {k}: recorded {recorded[k]!r}, rebuilt {rebuilt[k]!r}"
             for k in keys if not _close(recorded[k], rebuilt[k], tol)]
    return {"compared": keys, "identical": not diffs, "differences": diffs}


def _curve(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return [{k: float(v) if v != "" else math.nan for k, v in row.items()}
                for row in csv.DictReader(fh)]


def compare_curves(recorded: Path | None, rebuilt: Path, tol: float) -> dict:
    """The training curve logged with the run against the rebuilt reports/training CSV."""
    if recorded is None:
        return {"compared": False, "identical": None,
                "differences": [], "note": "the run has no training curve artifact"}
    old, new = _curve(recorded), _curve(rebuilt)
    diffs = []
    if len(old) != len(new) or (old and old[0].keys() != new[0].keys()):
        diffs.append(f"curve: recorded {len(old)} epochs {list(old[0]) if old else []}, "
                     f"rebuilt {len(new)} epochs {list(new[0]) if new else []}")
    else:
        diffs = [f"curve epoch {int(o.get('epoch', i + 1))} {k}: recorded {o[k]!r}, "
                 f"rebuilt {n[k]!r}" for i, (o, n) in enumerate(zip(old, new, strict=True))
                 for k in o if not _close(o[k], n[k], tol)]
    return {"compared": True, "epochs": len(new), "identical": not diffs, "differences": diffs}


# ----------------------------------------------------------------------------- registry


def registered_files(client, version, dest: Path) -> dict[str, Path | None]:
    """The version's weights and config, and its run's training curve (None if absent)."""
    from mlflow.artifacts import download_artifacts

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # --json stays clean
    local = Path(download_artifacts(artifact_uri=f"models:/{version.name}/{version.version}",
                                    dst_path=str(dest / "registry")))
    files = {name: next(local.rglob(name), None) for name in ("model.safetensors", "config.json")}
    for name, path in files.items():
        if path is None:
            raise AuditError(f"version {version.version}: the registered model ({version.source}) "
                             f"has no {name}")
    model = version.tags.get("model")
    try:
        curve = Path(client.download_artifacts(version.run_id, f"{model}.csv",
                                               str(dest / "registry")))
    except Exception:  # MlflowException / OSError: an older run without the curve
        curve = None
    return {"weights": files["model.safetensors"], "config": files["config.json"],
            "curve": curve}


def record(client, version, report: dict) -> None:
    """The outcome as `audit_*` tags on the version (newest audit wins)."""
    tags = {"audit_at": report["audited_at"], "audit_by": report["audited_by"],
            "audit_result": report["result"], "audit_mode": report.get("mode") or "",
            "audit_seconds": str(report["seconds"]["total"]),
            "audit_differences": lineage.truncate(json.dumps(report["differences"]))}
    for key, value in tags.items():
        client.set_model_version_tag(version.name, version.version, key, value)


# ----------------------------------------------------------------------------- the audit


def judge_mode(recorded_device: str, rebuilt_device: str, tolerance: float) -> tuple[str, str]:
    if recorded_device.startswith("cpu") and rebuilt_device.startswith("cpu"):
        return "bitwise", ("trained and rebuilt on CPU, where training is bitwise deterministic "
                           "(fp32, every random stream seeded per epoch): any difference counts")
    return "tolerance", (f"trained on {recorded_device}, rebuilt on {rebuilt_device}: cuDNN "
                         f"kernels and bf16 autocast are not bitwise reproducible, so metrics and "
                         f"curve must agree within {tolerance:g} (absolute) and weight "
                         f"differences are reported, not judged")


def _prepare(client, version, trail: dict, root: Path, work: Path) -> dict:
    """Registry files, the clone at the commit with its data, and the params checked."""
    if trail["git_dirty"] != "false":
        raise AuditError(f"version {version.version} was registered from a dirty tree "
                         f"(git_dirty {trail['git_dirty']}: {trail['git_dirty_files'] or '?'}): "
                         f"commit {trail['git_commit']} does not hold the code that trained it, "
                         "so it cannot be rebuilt")
    start = time.perf_counter()
    files = registered_files(client, version, work)
    config = json.loads(files["config"].read_text())
    if "params" not in config:
        raise AuditError(f"version {version.version}: the registered config.json records no "
                         "params, so there is nothing to rebuild with")
    src = clone_at(root, trail["git_commit"], work / "repo")
    checkout = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    data = fetch_data(root, trail["data_hashes"], work, src)
    device = str(config.get("device", "cpu"))
    env = rebuild_env(src, cpu_only=device.startswith("cpu"))
    committed = commit_params(src, env)
    if diffs := params_differences(config["params"], committed):
        raise AuditError(f"params.yaml at commit {trail['git_commit'][:12]} differs from the "
                         f"params version {version.version} was trained with (its config.json): "
                         + "; ".join(diffs[:10]) + ": the trail is inconsistent")
    return {"files": files, "src": src, "env": env, "device": device, "data": data,
            "params": {"agree": True, "params_hash_recorded": trail["params_hash"],
                       "params_hash_commit": lineage.params_hash(committed)},
            "seconds": {"checkout": checkout, "data": round(time.perf_counter() - start, 1)}}


def _compare(ws: dict, trail: dict, tolerance: float) -> dict:
    """The rebuilt model (in the clone) against the registry's, the recorded metrics and
    the logged curve."""
    src, model, files = ws["src"], trail["model"], ws["files"]
    rebuilt_device = str(json.loads((src / "models" / model / "config.json").read_text())
                         .get("device", "?"))
    mode, why = judge_mode(ws["device"], rebuilt_device, tolerance)
    tol = 0.0 if mode == "bitwise" else tolerance
    weights = compare_weights(files["weights"], src / "models" / model / "model.safetensors",
                              trail.get("weights_sha256"), None if mode == "bitwise" else tol)
    metrics = compare_metrics(trail["metrics"], json.loads(
        (src / "reports" / "metrics" / f"{model}.json").read_text()), tol)
    curve = compare_curves(files["curve"], src / "reports" / "training" / f"{model}.csv", tol)
    differences = weights["differences"] + metrics["differences"] + curve["differences"]
    passed = "identical" if mode == "bitwise" else "within tolerance"
    return {"mode": mode, "tolerance": tol, "why": why,
            "device": {"recorded": ws["device"], "rebuilt": rebuilt_device},
            "weights": weights, "metrics": metrics, "curve": curve,
            "differences": differences, "result": "differs" if differences else passed}


def _rebuild_and_compare(client, version, trail: dict, root: Path, work: Path,
                         tolerance: float, log) -> dict:
    ws = _prepare(client, version, trail, root, work)
    seconds = ws["seconds"] | rebuild(ws["src"], trail["model"], ws["env"], log)
    start = time.perf_counter()
    outcome = _compare(ws, trail, tolerance)
    seconds["compare"] = round(time.perf_counter() - start, 1)
    return outcome | {"threads": os.environ.get("OMP_NUM_THREADS"), "params": ws["params"],
                      "data": ws["data"], "seconds": seconds}


def default_model_name(root: Path) -> str:
    try:
        from liverseg.config import load_params

        return load_params(root / "params.yaml").register_.model_name
    except (ValueError, OSError):  # ConfigError is a ValueError
        return "liverseg"


def audit(ref: str, root: str | Path = ".", tolerance: float = DEFAULT_TOLERANCE,
          write_tags: bool = True, keep: bool = False, log=None) -> dict:
    """Rebuild the version `ref` names and compare it with the registry. Raises for a ref or
    registry that cannot be read (nothing to record on); otherwise returns the report, whose
    `result` is identical, within tolerance, differs or not rebuilt (with `error`)."""
    root, log = Path(root).resolve(), log or (lambda text: print(text, file=sys.stderr))
    started = time.perf_counter()
    client = tracking.mlflow().MlflowClient()  # an unreachable server fails here, in seconds
    version = lineage.resolve_version(client, ref, default_model_name(root))
    trail = lineage.trail(client, version)
    report = {k: trail[k] for k in ("registered_model", "model_version", "model", "run_id",
                                    "git_commit")}
    work = Path(tempfile.mkdtemp(prefix="liverseg-audit-"))
    try:
        report |= _rebuild_and_compare(client, version, trail, root, work, tolerance, log)
    except AuditError as exc:
        report |= {"result": "not rebuilt", "error": str(exc), "differences": [str(exc)],
                   "seconds": {}}
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    report["seconds"]["total"] = round(time.perf_counter() - started, 1)
    report |= {"passed": report["result"] in PASSING, "workspace": str(work) if keep else None,
               "audited_at": datetime.now(UTC).isoformat(timespec="seconds"),
               "audited_by": lineage.who(), "recorded": write_tags}
    if write_tags:
        record(client, version, report)
    return report


def summary(report: dict) -> list[str]:
    """The report as lines for people (--json prints all of it)."""
    lines = [f"audit of {report['registered_model']} version {report['model_version']} "
             f"({report['model']}, run {report['run_id']}, commit {report['git_commit']})"]
    if report.get("mode"):
        lines.append(f"mode: {report['mode']}: {report['why']}")
        weights = report["weights"]
        lines.append(f"weights: {'identical' if weights['identical'] else 'differ'} "
                     f"(rebuilt sha256 {weights['rebuilt_sha256']})")
        lines.append(f"metrics: {len(report['metrics']['compared'])} compared")
        lines.append(f"curve: {report['curve'].get('epochs', 'not')} epochs compared")
    for line in report["differences"]:
        lines.append(f"  differs: {line}")
    lines.append(f"result: {report['result']} ({report['seconds']['total']} s; "
                 f"{'recorded on the version' if report['recorded'] else 'not recorded'})")
    return lines
