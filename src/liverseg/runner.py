"""The one runner for git and dvc commands: which dvc, and how a command is run.

Stage logic never imports DVC (DESIGN rule 2); provenance (lineage, audit) and the fan-out
engine call its command line through here, so there is one answer to "which dvc" and one
way to run a command and read its output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def dvc_executable() -> str:
    """LIVERSEG_DVC, else the dvc beside this interpreter (the Makefile links it: dvc lives
    in its own environment), else the one on PATH."""
    beside = Path(sys.executable).parent / "dvc"
    return os.environ.get("LIVERSEG_DVC") or (str(beside) if beside.exists() else "dvc")


def run(args: list[str], cwd: str | Path | None = None, env: dict | None = None,
        timeout: float | None = 3600) -> subprocess.CompletedProcess:
    """Run a command, capturing its text output; the caller judges the return code."""
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def git(*args: str, cwd: str | Path | None = None, timeout: float = 10) -> str | None:
    """`git ARGS` output (trailing whitespace removed), or None if git fails or is absent."""
    try:
        out = run(["git", *args], cwd=cwd, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    # rstrip only: porcelain status lines start with a significant space
    return out.stdout.rstrip() if out.returncode == 0 else None


def dvc_config(root: str | Path, dvc: str | None = None, env: dict | None = None
               ) -> dict[str, str]:
    """`dvc config --list` as {key: value} (merged levels; local remote urls absolute);
    empty when dvc fails."""
    proc = run([dvc or dvc_executable(), "config", "--list"], cwd=root, env=env, timeout=120)
    lines = proc.stdout.splitlines() if proc.returncode == 0 else []
    return dict(line.strip().split("=", 1) for line in lines if "=" in line)
