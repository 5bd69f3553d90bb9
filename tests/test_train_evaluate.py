"""train@MODEL and evaluate@MODEL on a tiny phantom split, with the MLflow store in tmp."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from liverseg import checkpoint, tracking
from liverseg.stages import compare, evaluate, register, train
from tests.helpers import copy_workspace, inside, tiny_raw_params


@pytest.fixture(scope="session")
def trained_template(split_template, tmp_path_factory):
    """One tiny model trained once (MLflow store included); each test gets a copy."""
    from liverseg.config import parse_params

    root = tmp_path_factory.mktemp("trained-template")
    shutil.copytree(split_template, root, dirs_exist_ok=True, symlinks=True)
    with inside(root):
        summary = train.run(parse_params(tiny_raw_params()), "enhanced_pan")
    return root, summary


@pytest.fixture
def trained(workdir, trained_template):
    template, summary = trained_template
    copy_workspace(template, workdir)
    return workdir, summary


def test_train_writes_model_config_curves_and_mlflow_run(trained, tiny_params):
    workdir, summary = trained
    model_dir = workdir / "models/enhanced_pan"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model"] == "enhanced_pan" and config["params"] == tiny_params.dump()
    assert config["best_epoch"] == 1 and "mean" in config["preprocessing"]
    # Each preprocessing fact once: in the block, not also at the top level.
    assert not {"image_size", "normalisation", "threshold", "classes"} & set(config)
    history = pd.read_csv(workdir / "reports/training/enhanced_pan.csv")
    assert list(history.epoch) == [1]
    assert {"train_loss", "val_loss", "val_miou", "val_pixel_accuracy"} <= set(history.columns)
    model, _ = checkpoint.load_model(model_dir)  # safetensors round trip
    assert sum(p.numel() for p in model.parameters()) > 0

    mlf = tracking.mlflow()
    run = mlf.get_run(summary["run_id"])
    assert run.data.params["train.epochs"] == "1"
    assert "val_loss" in run.data.metrics


def test_training_is_reproducible_for_a_seed(split_data, tiny_params, monkeypatch):
    """Two plain runs of two epochs, in one process one after the other (the second starts
    from whatever random state the first left): curves equal exactly, weights byte-equal."""
    monkeypatch.setenv("LIVERSEG_TRACKING", "off")
    params = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(
        update={"epochs": 2, "image_size": 32})})
    for root in ("first", "second"):
        (split_data / root).mkdir()
        (split_data / root / "data").symlink_to(split_data / "data")
        train.run(params, "enhanced_pan", root=root)
    first, second = (pd.read_csv(split_data / root / "reports/training/enhanced_pan.csv")
                     for root in ("first", "second"))
    assert list(first.epoch) == [1, 2]
    pd.testing.assert_frame_equal(first, second, check_exact=True)
    weights = [(split_data / root / "models/enhanced_pan/model.safetensors").read_bytes()
               for root in ("first", "second")]
    assert weights[0] == weights[1]


def test_a_config_from_before_the_preprocessing_block_still_loads(trained):
    """The old layout (size, normalisation, threshold, classes at the top level, no
    `preprocessing`) reads back with the block today's training writes."""
    workdir, _ = trained
    model_dir = workdir / "models/enhanced_pan"
    new = json.loads((model_dir / "config.json").read_text())
    prep = new["preprocessing"]
    old = {k: v for k, v in new.items() if k != "preprocessing"} | {
        "classes": prep["classes"], "image_size": prep["image_size"],
        "threshold": prep["threshold"],
        "normalisation": {"mean": prep["mean"], "std": prep["std"], "scale": 255.0}}
    (model_dir / "config.json").write_text(json.dumps(old))
    assert checkpoint.read_config(model_dir)["preprocessing"] == prep
    model, config = checkpoint.load_model(model_dir)
    assert config["preprocessing"] == prep and sum(p.numel() for p in model.parameters()) > 0


def test_unlisted_model_is_refused(split_data, tiny_params):
    with pytest.raises(ValueError, match="pspnet"):
        train.run(tiny_params, "pspnet")


def test_evaluate_compare_register_and_serve(trained, tiny_params):
    workdir, _ = trained
    evaluate.run(tiny_params, "enhanced_pan")
    metrics = json.loads((workdir / "reports/metrics/enhanced_pan.json").read_text())
    for key in ("fg_iou", "miou", "dice", "pixel_accuracy"):
        assert metrics[key] is None or 0.0 <= metrics[key] <= 1.0, key
    per_image = pd.read_csv(workdir / "reports/per_image/enhanced_pan.csv")
    val = pd.read_csv(workdir / "data/splits/val.csv")
    assert per_image.slice_id.tolist() == val.slice_id.tolist()
    assert metrics["n_images"] == len(val)
    for key in ("fg_iou", "dice", "miou"):  # seeded 95% bootstrap CIs over images
        ci = metrics[f"{key}_ci"]
        assert ci is None or (len(ci) == 2 and ci[0] <= ci[1]), key
    assert {"dice", "precision", "recall", "hd95", "tn"} <= set(per_image.columns)
    assert metrics["flops"] > 0 and metrics["n_volumes"] >= 1
    assert metrics["n_hd95"] == int(per_image.hd95.notna().sum())

    assert compare.run(tiny_params)["best_model"] == "enhanced_pan"
    table = (workdir / "reports/comparison.md").read_text()
    assert "fg_iou [95% CI]" in table and "GFLOPs" in table
    assert "fg_iou_ci" in json.loads((workdir / "reports/comparison.json").read_text())["models"][0]
    record = register.run(tiny_params)  # min_fg_iou 0 in tiny params: the gate passes
    assert record["alias"] == "champion" and record["version"] == 1

    mlf = tracking.mlflow()
    version = mlf.MlflowClient().get_model_version_by_alias("liverseg", "champion")
    assert version.tags["model"] == "enhanced_pan" and "git_commit" in version.tags
    served = mlf.pyfunc.load_model("models:/liverseg@champion")
    probs = served.predict(np.random.default_rng(0).uniform(0, 255, (2, 1, 48, 80))
                           .astype(np.float32))
    assert probs.shape == (2, 1, 48, 80) and ((probs >= 0) & (probs <= 1)).all()


def test_gate_failure_registers_as_challenger_with_reason(trained, tiny_params):
    evaluate.run(tiny_params, "enhanced_pan")
    compare.run(tiny_params)
    strict = tiny_params.model_copy(update={"register_": tiny_params.register_.model_copy(
        update={"min_fg_iou": 1.0})})
    record = register.run(strict)
    assert record["alias"] == "challenger" and record["quality_gate"].startswith("failed")
    client = tracking.mlflow().MlflowClient()
    assert client.get_registered_model("liverseg").aliases == {"challenger": 1}
    assert "min_fg_iou 1.0" in client.get_model_version("liverseg", "1").tags["gate_reason"]


@pytest.mark.slow  # every name's forward and backward step is test_models' (fast) job
def test_every_registered_model_trains_and_evaluates_through_the_stages(split_data,
                                                                         tiny_params):
    """The train and evaluate stages, unchanged, for every registry name (one 64 px epoch;
    PAN's wrapper pads to its 128 px minimum). MLflow model logging included."""
    from liverseg.models import MODEL_NAMES

    params = tiny_params.model_copy(update={"models": list(MODEL_NAMES)})
    for name in MODEL_NAMES:
        summary = train.run(params, name)
        metrics = evaluate.run(params, name)
        assert summary["epochs"] == 1 and summary["model"] == name
        assert 0.0 <= metrics["miou"] <= 1.0, name
    compare.run(params)
    table = pd.read_csv(split_data / "reports/comparison.csv")
    assert sorted(table.model) == sorted(MODEL_NAMES) and (table.n_parameters > 0).all()
    # binary: no per-class columns (and the CIs only as their _lo/_hi columns)
    assert "dice_ci" not in table and not [c for c in table.columns if c.startswith("iou_")]
