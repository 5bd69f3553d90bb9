"""Where a model came from, and whether the workspace still reproduces it.

Recorded at registration (as MLflow model-version tags): git commit and dirty flag, the
dvc.lock hashes of the raw data, manifest, split and model, the params hash and the params
themselves, the validation result and the metrics. `trail` reads them back for a version;
`check` compares them with the current workspace (git HEAD, dvc.lock, params.yaml and,
when the `dvc` command is on PATH, `dvc status` for data edited since the last repro).

`dvc.lock` is read as plain YAML and DVC is only ever run as a command (both through
liverseg.runner), so this works without DVC installed in the same environment (DVC lives in
its own tool environment).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import socket
import subprocess
from pathlib import Path

from liverseg import artifacts, runner
from liverseg.params_dict import param_changes

# The data outputs whose hashes identify what a model was trained and validated on.
DATA_OUTPUTS = {"raw": ("ingest", artifacts.RAW), "manifest": ("validate", artifacts.MANIFEST),
                "splits": ("split", artifacts.SPLITS)}
# DVC's own bookkeeping, rewritten (and auto-staged) by every repro: dvc.lock (its content is
# recorded as the data hashes) and the .gitignore files listing its outputs. They do not make
# the tree "dirty" for lineage purposes; any other tracked change does.
def _is_bookkeeping(path: str) -> bool:
    return path == "dvc.lock" or path == ".gitignore" or path.endswith("/.gitignore")


TAG_LIMIT = 5000  # MLflow's limit on a tag value (SQL stores)


def git_state(cwd: str | Path | None = None) -> dict:
    """The commit and whether tracked files differ from it (untracked files and dvc.lock
    ignored); the differing files are listed so a dirty flag is never a mystery."""
    commit = runner.git("rev-parse", "HEAD", cwd=cwd)
    status = runner.git("status", "--porcelain", "--untracked-files=no", cwd=cwd)
    if status is None:
        return {"git_commit": commit or "unknown", "git_dirty": "unknown"}
    files = [line[3:] for line in status.splitlines() if not _is_bookkeeping(line[3:])]
    state = {"git_commit": commit or "unknown", "git_dirty": str(bool(files)).lower()}
    if files:
        state["git_dirty_files"] = truncate(" ".join(sorted(files)))
    return state


def locked_out_hashes(lock_path: str | Path = "dvc.lock") -> dict[str, str]:
    """md5 of each data output as recorded in dvc.lock ('missing' if not locked yet)."""
    lock = runner.dvc_lock(lock_path)
    return {f"data_{key}_md5": runner.locked_outs(lock, stage).get(path, "missing")
            for key, (stage, path) in DATA_OUTPUTS.items()}


def locked_model_hash(model: str, lock_path: str | Path = "dvc.lock") -> str:
    outs = runner.locked_outs(runner.dvc_lock(lock_path), f"train@{model}")
    return outs.get(artifacts.Artifacts().model_dir(model).as_posix(), "missing")


def params_hash(resolved_params: dict) -> str:
    blob = json.dumps(resolved_params, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def tensor_digest(path: str | Path) -> str:
    """sha256 over a safetensors file's tensors (name, dtype, shape, bytes; sorted by name):
    the weights' identity, independent of the file's header layout and metadata."""
    import torch
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), framework="pt") as fh:
        for name in sorted(fh.keys()):
            tensor = fh.get_tensor(name).contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def who() -> str:
    """user@host, for the registry's records (alias moves, audits)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = os.environ.get("USER", "unknown")
    return f"{user}@{socket.gethostname()}"


def truncate(text: str, limit: int = TAG_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 15] + "...[truncated]"


# ----------------------------------------------------------------------------- resolving


def resolve_version(client, ref: str, default_name: str = "liverseg"):
    """A model version from `models:/NAME@ALIAS`, `models:/NAME/VERSION`, a version number
    or an MLflow run id (the newest version registered from that run)."""
    if match := re.fullmatch(r"models:/([^/@]+)@(.+)", ref):
        return client.get_model_version_by_alias(match[1], match[2])
    if match := re.fullmatch(r"models:/([^/@]+)/(\d+)", ref):
        return client.get_model_version(match[1], match[2])
    if ref.isdigit():
        return client.get_model_version(default_name, ref)
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        found = client.search_model_versions(f"run_id = '{ref}'")
        if found:
            return max(found, key=lambda v: int(v.version))
        raise ValueError(f"run {ref}: no registered model version was made from it")
    raise ValueError(f"{ref!r}: expected models:/NAME@ALIAS, models:/NAME/VERSION, "
                     "a version number or a 32-hex MLflow run id")


def _aliases(client, version) -> list[str]:
    return sorted(a for a, v in client.get_registered_model(version.name).aliases.items()
                  if str(v) == str(version.version))


def trail(client, version) -> dict:
    """The lineage recorded on a model version, as plain data."""
    tags = version.tags
    data_hashes = {k: v for k, v in tags.items() if k.startswith("data_") and k.endswith("_md5")}
    return {
        "registered_model": version.name,
        "model_version": int(version.version),
        "alias": _aliases(client, version),
        "model": tags.get("model"),
        "run_id": version.run_id,
        "source": version.source,
        "git_commit": tags.get("git_commit"),
        "git_dirty": tags.get("git_dirty"),
        "git_dirty_files": tags.get("git_dirty_files"),
        "data_hashes": data_hashes,
        "model_md5": tags.get("model_md5"),
        "params_hash": tags.get("params_hash"),
        "validation_success": tags.get("validation_success") == "true"
        if "validation_success" in tags else None,
        "validation_counts": tags.get("validation_counts"),
        # dicom source: how many studies and label instances (and their origins) it was
        # trained and validated on; the full list is the run's lineage/training_labels.json.
        "training_labels": json.loads(tags["training_labels"])
        if "training_labels" in tags else None,
        "metrics": json.loads(tags["metrics"]) if "metrics" in tags else
        {k.removeprefix("metric_"): float(v) for k, v in tags.items() if k.startswith("metric_")},
        "quality_gate": tags.get("quality_gate"),
        # what started the run, and the gate's evidence beyond its text (register's tags)
        "retrain_trigger": tags.get("retrain_trigger"),
        "gate_reason": tags.get("gate_reason"),
        "gate_champion_rescored": _json_tag(tags, "gate_champion_rescored"),
        "gate_test_fg_iou": _json_tag(tags, "gate_test_fg_iou"),
        "gate_new_cases": _json_tag(tags, "gate_new_cases"),
        # what serves beyond the network: evaluate's mirroring, post-processing, threshold
        "inference": _json_tag(tags, "inference"),
        "dagster_run_id": tags.get("dagster_run_id"),
        "weights_sha256": tags.get("weights_sha256"),
        "model_card": tags.get("model_card"),
        "audit": audit_record(tags),
    }


def _json_tag(tags: dict, key: str):
    """A tag register wrote as JSON, parsed (None when absent; the text if truncated)."""
    if key not in tags:
        return None
    try:
        return json.loads(tags[key])
    except json.JSONDecodeError:
        return tags[key]


AUDIT_TAGS = ("at", "by", "result", "mode", "seconds", "differences")


def audit_record(tags: dict) -> dict | None:
    """The last `liverseg audit` of a version, from its `audit_*` tags (None: never audited)."""
    if "audit_result" not in tags:
        return None
    record = {key: tags.get(f"audit_{key}") for key in AUDIT_TAGS}
    try:
        record["differences"] = json.loads(record["differences"] or "[]")
    except json.JSONDecodeError:  # truncated to the tag limit: keep the text
        pass
    return record


# ----------------------------------------------------------------------------- checking


def dvc_status(root: str | Path = ".") -> dict | None:
    """`dvc status --json` (stages whose deps/outs changed since dvc.lock), or None when the
    dvc command is unavailable or fails (then only the recorded hashes are compared)."""
    try:
        out = runner.run([runner.dvc_executable(), "status", "--json"], cwd=root, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    try:
        return json.loads(out.stdout) if out.returncode == 0 else None
    except json.JSONDecodeError:
        return None


def _data_changes(status: dict) -> list[str]:
    """'data/raw: modified' lines for the data outputs in a `dvc status` report."""
    data_paths = {path for _, path in DATA_OUTPUTS.values()}
    lines = []
    for entries in status.values():
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict):
                continue
            for kind in ("changed outs", "changed deps"):
                for path, change in entry.get(kind, {}).items():
                    if path in data_paths:
                        lines.append(f"{path}: {change} in the workspace since dvc.lock")
    return sorted(set(lines))


def check(recorded: dict, tags: dict, params: dict, root: str | Path = ".",
          run_dvc: bool = True) -> dict:
    """Compare a recorded trail with the workspace at `root`; name every difference."""
    root = Path(root)
    differences = []
    git = git_state(root)
    if recorded["git_commit"] != git["git_commit"]:
        differences.append(f"git_commit: recorded {recorded['git_commit']}, "
                           f"workspace HEAD {git['git_commit']}")
    if recorded["git_dirty"] != "false":
        differences.append(f"recorded from a dirty tree ({recorded['git_dirty_files'] or '?'}):"
                           " uncommitted code cannot be reproduced")
    if git["git_dirty"] != "false":
        differences.append(f"workspace has uncommitted changes: {git.get('git_dirty_files')}")
    current = locked_out_hashes(root / "dvc.lock")
    for key, value in recorded["data_hashes"].items():
        if current.get(key) != value:
            differences.append(f"{key}: recorded {value}, dvc.lock {current.get(key)}")
    if recorded["model"] and recorded["model_md5"]:
        now = locked_model_hash(recorded["model"], root / "dvc.lock")
        if now != recorded["model_md5"]:
            differences.append(f"model_md5 (models/{recorded['model']}): recorded "
                               f"{recorded['model_md5']}, dvc.lock {now}")
    current_hash = params_hash(params)
    if recorded["params_hash"] != current_hash:
        differences.append(f"params_hash: recorded {recorded['params_hash']}, "
                           f"params.yaml {current_hash}")
        differences += _params_diff(tags.get("params"), params)
    status = dvc_status(root) if run_dvc else None
    if status:
        differences += _data_changes(status)
    return {"workspace": {**git, **current, "params_hash": current_hash,
                          "dvc_status_checked": status is not None},
            "reproducible": not differences, "differences": differences}


def _params_diff(recorded_json: str | None, params: dict) -> list[str]:
    """One line per changed parameter, e.g. `params train.epochs: 1 -> 2`."""
    if not recorded_json or recorded_json.endswith("[truncated]"):
        return []
    return [f"params {key}: {a!r} -> {b!r}"
            for key, a, b in param_changes(json.loads(recorded_json), params)]


def versions_using(client, name: str, data_hash: str) -> list[dict]:
    """Registered versions whose recorded data/model hashes include `data_hash` (prefix ok)."""
    hits = []
    for version in client.search_model_versions(f"name = '{name}'"):
        keys = [k for k, v in version.tags.items()
                if k.endswith("_md5") and data_hash and v.startswith(data_hash)]
        if keys:
            hits.append({"model_version": int(version.version), "model": version.tags.get("model"),
                         "alias": _aliases(client, version), "run_id": version.run_id,
                         "matched": sorted(keys)})
    return sorted(hits, key=lambda h: h["model_version"])


def describe(ref: str, params_path: str | Path = "params.yaml", run_dvc: bool = True) -> dict:
    """The recorded trail of a model version checked against the workspace around
    `params_path` (its folder is the repository root: git, dvc.lock)."""
    from liverseg import tracking
    from liverseg.config import load_params

    params = load_params(params_path)
    client = tracking.mlflow().MlflowClient()
    version = resolve_version(client, ref, params.register_.model_name)
    recorded = trail(client, version)
    root = Path(params_path).resolve().parent
    return recorded | check(recorded, version.tags, params.dump(), root, run_dvc)


def find_data_hash(data_hash: str, params_path: str | Path = "params.yaml") -> dict:
    from liverseg import tracking
    from liverseg.config import load_params

    name = load_params(params_path).register_.model_name
    client = tracking.mlflow().MlflowClient()
    return {"data_hash": data_hash, "registered_model": name,
            "versions": versions_using(client, name, data_hash)}
