"""Resources: how Dagster reaches DVC and MLflow (configuration, not code, per deployment).

Every field can come from an environment variable (`ENV` below), so the same definitions run
on a laptop (defaults: this checkout, the SQLite store in mlruns/) and on a cluster (a
tracking server, an object-store DVC remote) without editing code.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from liverseg import runner
from liverseg.redact import redact

REPO_ROOT = Path(__file__).resolve().parents[1]

# resource key -> field -> environment variable that sets it (when the variable is set).
ENV = {
    "dvc": {"repo_root": "LIVERSEG_REPO_ROOT", "executable": "LIVERSEG_DVC",
            "remote": "LIVERSEG_DVC_REMOTE"},
    "mlflow": {"tracking_uri": "MLFLOW_TRACKING_URI", "ui_url": "LIVERSEG_MLFLOW_UI_URL"},
    "pacs": {"url": "LIVERSEG_DICOMWEB_URL", "out_dir": "LIVERSEG_PACS_OUT"},
    "monitoring": {"directory": "LIVERSEG_MONITORING_DIR"},
}


class DvcResource(dg.ConfigurableResource):
    """Runs DVC stages in the repository, so dvc.lock and the cache stay the record."""

    repo_root: str = str(REPO_ROOT)
    executable: str = runner.dvc_executable()
    # A DVC remote name (e.g. an S3 remote in .dvc/config): each stage pulls its outputs
    # from it first (an unchanged stage then costs nothing on a fresh machine) and pushes
    # them after, so the next run, wherever it is launched, finds them.
    remote: str | None = None

    @property
    def root(self) -> Path:
        return Path(self.repo_root)

    def _run(self, args: list[str], env: dict[str, str], log) -> None:
        cmd = [self.executable, *args]
        log.info(f"running: {' '.join(cmd)}")
        # The stage commands (`liverseg ...`) live beside this interpreter; no time limit:
        # a stage trains for as long as it takes.
        proc = runner.run(cmd, cwd=self.repo_root, timeout=None,
                          env=os.environ | env | {"PATH": runner.tools_path()})
        # Redacted: a stage's output or a failure may quote the tracking URI's credentials.
        for line in redact(proc.stdout + proc.stderr).splitlines()[-40:]:
            log.info(line)
        if proc.returncode != 0:
            raise dg.Failure(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}",
                             metadata={"output": dg.MetadataValue.text(
                                 redact(proc.stderr[-4000:]))})

    def repro(self, stage: str, env: dict[str, str], log) -> None:
        if self.remote:
            self._run(["pull", "--allow-missing", "-r", self.remote, stage], env, log)
        # --single-item: Dagster owns the ordering; each asset runs exactly its stage.
        self._run(["repro", "--single-item", stage], env, log)
        if self.remote:
            self._run(["push", "-r", self.remote, stage], env, log)


class MlflowResource(dg.ConfigurableResource):
    """Where runs and the registry live; empty means the embedded SQLite store."""

    tracking_uri: str = ""
    # Where a browser sees the runs: the tracking server itself when tracking_uri is
    # http(s); for the SQLite store, what `mlflow ui` serves by default.
    ui_url: str = "http://127.0.0.1:5000"

    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.tracking_uri} if self.tracking_uri else {}

    def browser_url(self) -> str:
        http = self.tracking_uri.startswith(("http://", "https://"))
        return redact(self.tracking_uri) if http else self.ui_url  # a link, not a password


class PacsResource(dg.ConfigurableResource):
    """The archive (a DICOMweb root, e.g. Orthanc's http://host:8042/dicom-web) and where
    the job keeps each study's predictions.csv and SEG. Credentials come from
    LIVERSEG_DICOMWEB_USER / _PASSWORD or netrc, never from here."""

    url: str = ""
    out_dir: str = str(REPO_ROOT / "predictions" / "pacs")
    model: str = "models:/liverseg@champion"  # resolved when each run starts


class MonitoringResource(dg.ConfigurableResource):
    """The served-case store every predict, PACS and REST process appends to (the same
    directory must be their LIVERSEG_MONITORING_DIR), the window the drift checks read and
    the model whose reference they compare with."""

    directory: str = str(REPO_ROOT / "monitoring")
    last_cases: int = 200  # the drift window: the most recent served cases
    model: str = "models:/liverseg@champion"

    def env(self) -> dict[str, str]:
        return {"LIVERSEG_MONITORING_DIR": self.directory}


def resources_from_env(environ: dict[str, str] | None = None) -> dict[str, dg.ConfigurableResource]:
    """The resources, with dg.EnvVar for each variable that is set (the UI shows its name).

    EnvVar is resolved when a run starts, so a deployment changes the value without a
    code change; unset variables keep the defaults above (an unset EnvVar would be an error).
    """
    environ = os.environ if environ is None else environ
    fields = {key: {f: dg.EnvVar(var) for f, var in spec.items() if environ.get(var)}
              for key, spec in ENV.items()}
    return {"dvc": DvcResource(**fields["dvc"]), "mlflow": MlflowResource(**fields["mlflow"]),
            "pacs": PacsResource(**fields["pacs"]),
            "monitoring": MonitoringResource(**fields["monitoring"])}
