"""Where a model came from: git commit, the DVC-locked data hashes and the params hash.

`dvc.lock` is read as plain YAML, so this works without DVC installed in the same
environment (DVC lives in its own tool environment; see the Makefile).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import yaml

# The data outputs whose hashes identify what a model was trained and validated on.
DATA_OUTPUTS = {"raw": ("ingest", "data/raw"), "manifest": ("validate", "data/manifest.parquet"),
                "splits": ("split", "data/splits")}


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> dict:
    """The commit and whether tracked files differ from it (untracked files ignored)."""
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit or "unknown",
            "git_dirty": "unknown" if dirty is None else str(bool(dirty)).lower()}


def locked_out_hashes(lock_path: str | Path = "dvc.lock") -> dict[str, str]:
    """md5 of each data output as recorded in dvc.lock ('missing' if not locked yet)."""
    lock_path = Path(lock_path)
    stages = (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {}) \
        if lock_path.is_file() else {}
    hashes = {}
    for key, (stage, path) in DATA_OUTPUTS.items():
        outs = stages.get(stage, {}).get("outs", [])
        hashes[f"data_{key}_md5"] = next(
            (o.get("md5", "missing") for o in outs if o.get("path") == path), "missing")
    return hashes


def params_hash(resolved_params: dict) -> str:
    blob = json.dumps(resolved_params, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
