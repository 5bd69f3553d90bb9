"""The training path needs only torch, timm, smp, albumentations, numpy and safetensors
(issue 8: a bare GPU image has those, not the MLOps stack).

A fresh interpreter that cannot import pandas, MLflow or the orchestration and reporting
packages trains one epoch and evaluates it with LIVERSEG_TRACKING=off; the register stage
then refuses the untracked model by name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.helpers import tiny_raw_params

BLOCKED = ["pandas", "mlflow", "dagster", "dvc", "great_expectations", "pyarrow", "nibabel",
           "matplotlib", "jinja2", "onnx", "onnxruntime", "typer", "kagglehub"]

# Blocked packages are found (torch's dynamo probes find_spec for optional ones) but fail
# to load, as an `import` of a missing package would.
TRAIN_WITH_BLOCKED_IMPORTS = """
import importlib.abc, importlib.machinery, sys

class Blocked(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec):
        raise ImportError(f"blocked for this test: {spec.name}")

BLOCKED = set(sys.argv[1].split(","))
sys.meta_path.insert(0, Blocked())
from liverseg.config import load_params
from liverseg.stages import train

print(train.run(load_params(), "enhanced_pan"))
"""


def test_training_runs_without_pandas_mlflow_or_orchestration(split_data, tiny_params):
    (split_data / "params.yaml").write_text(yaml.safe_dump(tiny_raw_params()))
    env = os.environ | {"LIVERSEG_TRACKING": "off"}
    proc = subprocess.run([sys.executable, "-c", TRAIN_WITH_BLOCKED_IMPORTS, ",".join(BLOCKED)],
                          cwd=split_data, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    run = json.loads((split_data / "models/enhanced_pan/run.json").read_text())
    assert run == {"run_id": None, "model_uri": None, "tracking": "off"}
    assert (split_data / "models/enhanced_pan/model.safetensors").is_file()
    curve = (split_data / "reports/training/enhanced_pan.csv").read_text().splitlines()
    assert curve[0].startswith("epoch,train_loss") and len(curve) == 2
    assert not (split_data / "mlruns").exists()


def test_untracked_model_is_evaluated_but_never_registered(split_data, tiny_params,
                                                           monkeypatch):
    from liverseg.stages import compare, evaluate, register, train

    monkeypatch.setenv("LIVERSEG_TRACKING", "off")
    train.run(tiny_params, "enhanced_pan")
    assert evaluate.run(tiny_params, "enhanced_pan")["model"] == "enhanced_pan"
    compare.run(tiny_params)
    assert not (split_data / "mlruns").exists()
    with pytest.raises(ValueError, match=r"enhanced_pan was trained with LIVERSEG_TRACKING=off"):
        register.run(tiny_params)


def test_tracking_switch_rejects_unknown_values(monkeypatch):
    from liverseg import tracking

    monkeypatch.setenv("LIVERSEG_TRACKING", "maybe")
    with pytest.raises(ValueError, match="LIVERSEG_TRACKING='maybe'"):
        tracking.enabled()


def test_missing_mlflow_with_tracking_on_says_how_to_proceed(split_data, tiny_params,
                                                           monkeypatch):
    """train.run, with tracking on and `import mlflow` failing, stops before any work: no
    split read, no model built, no checkpoint, no output."""
    from liverseg import tracking
    from liverseg.stages import train

    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now fails
    monkeypatch.delenv("LIVERSEG_TRACKING", raising=False)
    for work in ("read_json", "make_loaders", "build_model"):
        monkeypatch.setattr(train, work, lambda *a, _w=work, **k: pytest.fail(f"{_w} ran"))
    before = sorted(split_data.rglob("*"))
    with pytest.raises(tracking.TrackingUnavailable, match="set LIVERSEG_TRACKING=off"):
        train.run(tiny_params, "enhanced_pan")
    assert sorted(split_data.rglob("*")) == before  # nothing written
