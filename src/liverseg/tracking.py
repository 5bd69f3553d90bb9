"""MLflow, imported lazily so training also runs where only torch/timm/smp exist.

Embedded default: a SQLite store and an artifact folder under `mlruns/` in the working
directory (git-ignored). `MLFLOW_TRACKING_URI` points it at a server instead.
"""

from __future__ import annotations

import os
from pathlib import Path

EXPERIMENT = "liverseg"
PYFUNC_CODE = Path(__file__).with_name("mlflow_pyfunc.py")


def tracking_uri() -> str:
    default = f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}"
    return os.environ.get("MLFLOW_TRACKING_URI") or default


def mlflow():
    """Import and configure mlflow: telemetry off, tracking URI set, experiment chosen."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow as _mlflow

    uri = tracking_uri()
    _mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:") and _mlflow.get_experiment_by_name(EXPERIMENT) is None:
        artifacts = Path.cwd() / "mlruns" / "artifacts"
        _mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts.as_uri())
    _mlflow.set_experiment(EXPERIMENT)
    return _mlflow


def flatten(data: dict, prefix: str = "") -> dict[str, str]:
    """Nested params as MLflow's flat `a.b.c` keys."""
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = str(value)
    return flat


def log_model(mlf, model_dir: Path, example) -> str:
    """Log the safetensors weights + config behind a pyfunc defined from code (no pickle).

    The signature leaves batch, height and width free (-1): unlike the `pt2` export format,
    the served model accepts any slice size.
    """
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    channels = example.shape[1]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, channels, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, -1, -1))]),
    )
    info = mlf.pyfunc.log_model(
        name="model",
        python_model=str(PYFUNC_CODE),
        artifacts={"weights": str(model_dir / "model.safetensors"),
                   "config": str(model_dir / "config.json")},
        code_paths=[str(Path(__file__).parent)],
        signature=signature,
        pip_requirements=["torch", "segmentation-models-pytorch", "safetensors", "numpy"],
    )
    return info.model_uri
