"""MLflow, imported lazily so training also runs where only torch/timm/smp exist.

`LIVERSEG_TRACKING=off` trains and evaluates without MLflow at all (a GPU box without it,
a quick experiment): nothing is logged, `run.json` says `"tracking": "off"`, and the
register stage refuses such a model, since there is no run to trace it to.

Embedded default: a SQLite store and an artifact folder under `mlruns/` in the working
directory (git-ignored). `MLFLOW_TRACKING_URI` points it at a server instead.

A tracking server is probed once, with a short timeout and no retries, before MLflow is
used: an unreachable server fails the stage in seconds, before any epoch runs, instead of
after MLflow's own retries (minutes) or hours of training. Everything recorded about the
server (run.json, logs, errors) carries the URI with its credentials masked.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from liverseg import params_dict
from liverseg.artifacts import CONFIG, WEIGHTS
from liverseg.redact import install_log_redaction, redact

EXPERIMENT = "liverseg"
PYFUNC_CODE = Path(__file__).parent / "serving" / "mlflow_pyfunc.py"
PROBE_TIMEOUT_ENV = "LIVERSEG_TRACKING_TIMEOUT"  # seconds for the reachability probe
TRACKING_ENV = "LIVERSEG_TRACKING"  # on (default) | off


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server cannot be reached; the message names it (credentials masked)."""


def enabled() -> bool:
    value = os.environ.get(TRACKING_ENV, "on").strip().lower()
    if value not in ("on", "off"):
        raise ValueError(f"{TRACKING_ENV}={value!r}: expected on or off")
    return value == "on"


def tracking_uri() -> str:
    default = f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}"
    return os.environ.get("MLFLOW_TRACKING_URI") or default


def public_tracking_uri() -> str:
    """The tracking URI as it may be written down: passwords and tokens masked."""
    return redact(tracking_uri())


def check_reachable(uri: str, timeout: float | None = None) -> None:
    """Fail fast unless an http(s) tracking server answers (any HTTP status counts)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return  # local stores (sqlite, file) need no network
    timeout = timeout or float(os.environ.get(PROBE_TIMEOUT_ENV, "10"))
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    request = urllib.request.Request(urllib.parse.urlunsplit(
        (parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", "")))
    if parts.username:  # urllib does not take credentials from the URL
        token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return  # it answered: reachable (auth and routing are MLflow's to report)
    except (OSError, ValueError) as exc:  # URLError, refused, timeout, bad host
        reason = getattr(exc, "reason", exc)
        raise TrackingUnavailable(
            f"MLflow tracking server {redact(uri)} is unreachable ({redact(str(reason))}, "
            f"timeout {timeout:g}s): start it, fix MLFLOW_TRACKING_URI, or unset it to use "
            f"the local store mlruns/") from None


def mlflow():
    """Import and configure mlflow: telemetry off, tracking URI set, experiment chosen."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    install_log_redaction()  # MLflow logs run URLs that embed the tracking URI
    uri = tracking_uri()
    if redact(uri) != uri:  # ... and writes them to stdout itself, past the log redaction
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    check_reachable(uri)
    try:
        import mlflow as _mlflow
    except ImportError as exc:
        raise TrackingUnavailable(f"MLflow is not installed ({exc}): install it, or set "
                                  f"{TRACKING_ENV}=off to run without tracking") from None

    _mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:") and _mlflow.get_experiment_by_name(EXPERIMENT) is None:
        artifacts = Path.cwd() / "mlruns" / "artifacts"
        _mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts.as_uri())
    _mlflow.set_experiment(EXPERIMENT)
    return _mlflow


@contextmanager
def start_run(mlf, run_name: str, run_id: str | None = None):
    """Continue run `run_id` when it still exists (a resumed training), else start one."""
    if run_id is not None:
        try:
            mlf.get_run(run_id)
        except Exception:  # deleted store or run: a new run is better than no record
            print(f"MLflow run {run_id} not found; starting a new run", flush=True)
            run_id = None
    with mlf.start_run(run_id=run_id, run_name=None if run_id else run_name) as active:
        yield active


def flatten(data: dict) -> dict[str, str]:
    """Nested params as MLflow's flat `a.b.c` keys, values as text."""
    return {key: str(value) for key, value in params_dict.flatten(data).items()}


def log_model(mlf, model_dir: Path, example=None, inference: Path | None = None,
              name: str = "model") -> str:
    """Log the safetensors weights + config behind a pyfunc defined from code (no pickle).

    The signature leaves batch, height and width free (-1): unlike the `pt2` export format,
    the served model accepts any slice size (it resizes inside, `served.Served`). The
    model's preprocessing block is the MLflow model's metadata. `inference`: evaluate's
    choice of mirroring and post-processing, served with it (register's package).
    """
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from liverseg.labels import out_channels
    from liverseg.postprocess import INFERENCE_KEY

    config = json.loads((model_dir / CONFIG).read_text())
    channels = example.shape[1] if example is not None else \
        config["preprocessing"]["in_channels"]
    classes = out_channels(config["num_classes"])
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, channels, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes, -1, -1))]),
    )
    artifacts = {"weights": str(model_dir / WEIGHTS), "config": str(model_dir / CONFIG)}
    if inference is not None:
        artifacts[INFERENCE_KEY] = str(inference)
    info = mlf.pyfunc.log_model(
        name=name,
        python_model=str(PYFUNC_CODE),
        artifacts=artifacts,
        code_paths=[str(Path(__file__).parent)],
        signature=signature,
        # The serving contract travels with the registered model, readable without loading it.
        metadata={"preprocessing": config["preprocessing"],
                  **({"inference": json.loads(inference.read_text())} if inference else {})},
        pip_requirements=["torch", "segmentation-models-pytorch", "safetensors", "numpy"],
    )
    return info.model_uri
