"""The one runner for git and dvc: which dvc, how a command is run, what dvc.lock records.

Stage logic never imports DVC (DESIGN rule 2); provenance (lineage, audit), the Dagster
resources and the fan-out engine call its command line and read its files through here, so
there is one answer to "which dvc", one way to run a command and read its output, and one
reader of dvc.lock.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

LOCK = "dvc.lock"
# tqdm redraws (split into lines by the pipe): kept in a log file, not in the caller's log
PROGRESS = re.compile(r"\|\s*\d+/\d+ \[")


class CommandFailed(RuntimeError):
    """A command exited non-zero; the message names it, where it ran and why."""

    def __init__(self, message: str, cmd: list[str], returncode: int):
        super().__init__(message)
        self.cmd, self.returncode = cmd, returncode


def dvc_executable() -> str:
    """LIVERSEG_DVC, else the dvc beside this interpreter (the Makefile links it: dvc lives
    in its own environment), else the one on PATH."""
    beside = Path(sys.executable).parent / "dvc"
    return os.environ.get("LIVERSEG_DVC") or (str(beside) if beside.exists() else "dvc")


def tools_path() -> str:
    """PATH with this interpreter's bin first: the stage commands (`liverseg`) and the linked
    dvc live there, whatever PATH the caller was started with."""
    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def run(args: list[str], cwd: str | Path | None = None, env: dict | None = None,
        timeout: float | None = 3600) -> subprocess.CompletedProcess:
    """Run a command, capturing its text output; the caller judges the return code."""
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def stream(cmd: list[str], cwd: Path, env: dict[str, str], log: Callable[[str], None],
           log_file: Path | None = None, pass_fds: tuple[int, ...] = ()) -> str:
    """Run a long command (a `dvc repro`), passing each line to `log` as it comes (and all
    of them to `log_file`); its output, or CommandFailed with the last 60 lines."""
    lines: list[str] = []
    sink = log_file.open("a") if log_file else None
    try:
        if sink:
            sink.write(f"$ {' '.join(cmd)}\n")
        with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, pass_fds=pass_fds) as proc:
            for line in proc.stdout:
                line = line.rstrip()
                lines.append(line)
                if sink:
                    sink.write(line + "\n")
                    sink.flush()
                if line.strip() and not PROGRESS.search(line):
                    log(line)
    finally:
        if sink:
            sink.close()
    if proc.returncode:
        tail = "\n".join(lines[-60:])
        raise CommandFailed(f"`{' '.join(cmd)}` failed with exit code {proc.returncode} in "
                            f"{cwd}:\n{tail}", cmd, proc.returncode)
    return "\n".join(lines)


def git(*args: str, cwd: str | Path | None = None, timeout: float = 10) -> str | None:
    """`git ARGS` output (trailing whitespace removed), or None if git fails or is absent:
    for records where "unknown" is an answer (lineage)."""
    try:
        out = run(["git", *args], cwd=cwd, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    # rstrip only: porcelain status lines start with a significant space
    return out.stdout.rstrip() if out.returncode == 0 else None


def git_checked(*args: str, cwd: str | Path) -> str:
    """`git ARGS` output as git wrote it (`-z` lists keep their NULs), or CommandFailed with
    git's error: for work that cannot go on without it (worktrees)."""
    proc = run(["git", *args], cwd=cwd, timeout=None)
    if proc.returncode:
        raise CommandFailed(f"`git {' '.join(args)}` failed in {cwd}: {proc.stderr.strip()}",
                            ["git", *args], proc.returncode)
    return proc.stdout


def dvc_config(root: str | Path, dvc: str | None = None, env: dict | None = None
               ) -> dict[str, str]:
    """`dvc config --list` as {key: value} (merged levels; local remote urls absolute);
    empty when dvc fails."""
    proc = run([dvc or dvc_executable(), "config", "--list"], cwd=root, env=env, timeout=120)
    lines = proc.stdout.splitlines() if proc.returncode == 0 else []
    return dict(line.strip().split("=", 1) for line in lines if "=" in line)


def lock_path(root_or_path: str | Path) -> Path:
    """dvc.lock of a repository folder, or the path itself when it names the file."""
    path = Path(root_or_path)
    return path / LOCK if path.is_dir() else path


def dvc_lock(root_or_path: str | Path = ".") -> dict:
    """dvc.lock parsed as plain YAML (no DVC import); {} before the first repro."""
    path = lock_path(root_or_path)
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def locked_outs(lock: dict, stage: str) -> dict[str, str]:
    """{path: md5} of a stage's outputs as dvc.lock records them (unhashed ones left out)."""
    outs = (lock.get("stages") or {}).get(stage, {}).get("outs") or []
    return {o["path"]: o["md5"] for o in outs if "path" in o and "md5" in o}
