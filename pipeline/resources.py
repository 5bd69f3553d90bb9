"""Resources: how Dagster reaches DVC and MLflow (configuration, not code, per deployment)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg

REPO_ROOT = Path(__file__).resolve().parents[1]


def _default_dvc() -> str:
    """The dvc next to this interpreter (the Makefile links it there), else the one on PATH."""
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.exists() else (shutil.which("dvc") or "dvc")


class DvcResource(dg.ConfigurableResource):
    """Runs DVC stages in the repository, so dvc.lock and the cache stay the record."""

    repo_root: str = str(REPO_ROOT)
    executable: str = _default_dvc()
    remote: str | None = None  # e.g. an S3 remote name for `dvc push` after a run

    def repro(self, stage: str, env: dict[str, str], log) -> None:
        # --single-item: Dagster owns the ordering; each asset runs exactly its stage.
        cmd = [self.executable, "repro", "--single-item", stage]
        log.info(f"running: {' '.join(cmd)}")
        # The stage commands (`liverseg ...`) live beside this interpreter.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        proc = subprocess.run(cmd, cwd=self.repo_root, env=os.environ | env | {"PATH": path},
                              capture_output=True, text=True)
        for line in (proc.stdout + proc.stderr).splitlines()[-40:]:
            log.info(line)
        if proc.returncode != 0:
            raise dg.Failure(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}",
                             metadata={"output": dg.MetadataValue.text(proc.stderr[-4000:])})


class MlflowResource(dg.ConfigurableResource):
    """Where runs and the registry live; empty means the embedded SQLite store."""

    tracking_uri: str = ""

    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.tracking_uri} if self.tracking_uri else {}
