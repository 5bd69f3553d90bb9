"""The inference decision (mirroring and post-processing, liverseg.postprocess) is served
as evaluate scored it: evaluate's masks equal `liverseg predict`'s voxel for voxel on a whole
volume, where post-processing removes 3D islands, and the registered pyfunc's answers on 2D
images give evaluate's masks. The decision is forced here (the rule that picks it is
tests/test_postprocess.py's): what these tests prove is that every path applies it alike."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from scipy import ndimage

from liverseg import casestore, labels, tracking
from liverseg.artifacts import Artifacts
from liverseg.config import parse_params
from liverseg.io import load_masks
from liverseg.postprocess import Inference
from liverseg.serving import predict
from liverseg.stages import compare, evaluate, register, run_data_stages, train
from tests.helpers import REPO, tiny_raw_params

MODEL = "enhanced_pan"
FORCED = Inference(largest_foreground=True)


def _synthetic_lits():
    spec = importlib.util.spec_from_file_location("synthetic_lits",
                                                  REPO / "bench/synthetic_lits.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _force(monkeypatch, decision: Inference) -> None:
    """evaluate serves `decision` instead of choosing one."""
    monkeypatch.setattr(evaluate, "choose_inference",
                        lambda *a, **k: (decision, {"describe": decision.describe()}))


def _fitted_threshold(model_dir: Path, grey: np.ndarray, truth_fraction: float) -> float:
    """The threshold at which the model's predicted area equals the true one (a one-epoch
    model finds nothing at 0.5): its masks are the most likely pixels, in pieces."""
    net = predict.Predictor(*predict.load(str(model_dir))).net
    with torch.no_grad():
        probs = net(net.grey_batch(grey))[:, 0].numpy()
    return float(np.quantile(probs, 1 - truth_fraction))


@pytest.mark.slow
def test_evaluate_and_predict_post_process_a_volume_alike(workdir, tmp_path, monkeypatch):
    monkeypatch.setenv("LIVERSEG_TRACKING", "off")
    lits = _synthetic_lits()
    source = tmp_path / "cases"
    source.mkdir()
    for i in range(4):
        lits.write_case(source, i, 0, lits.Shape(size=64, slices=16))
    raw = tiny_raw_params(data={"source": "nifti", "path": str(source), "target": "liver"},
                          split={"val_fraction": 0.25})
    params = parse_params(raw)
    run_data_stages(params)
    train.run(params, MODEL)
    val = pd.read_csv("data/splits/val.csv", dtype={"slice_id": str, "case": str})
    assert val["case"].nunique() == 1 and len(val) == 16, "one whole validation case"
    # ... post-processed in 3D by evaluate, as predict post-processes the volume
    assert evaluate.grid_cases(val.to_dict("records"), Path("data/raw")) == {val["case"][0]}
    index = pd.read_csv("data/raw/slices.csv", dtype={"slice_id": str}).set_index("slice_id")
    volume = source / Path(index.loc[val.slice_id.iloc[0], "source_image"].split("#")[0]).name
    assert volume.is_file(), volume

    img = nib.as_closest_canonical(nib.load(str(volume)))
    truth = np.asarray(nib.load(str(volume).replace("volume-", "segmentation-")).dataobj) > 0
    grey = predict.volume_slices(img, predict.Predictor(*predict.load(f"models/{MODEL}")).prep)[0]
    threshold = _fitted_threshold(Path(f"models/{MODEL}"), grey, truth.mean())
    _force(monkeypatch, FORCED)
    evaluate.run(parse_params(raw | {"evaluate": raw["evaluate"] | {"threshold": threshold}}),
                 MODEL)
    # The decision carries the threshold evaluate scored at: predict needs nothing else.
    assert json.loads(Artifacts().inference(MODEL).read_text()) == \
        replace(FORCED, threshold=threshold).to_dict()

    predict.run(f"models/{MODEL}", [volume], tmp_path / "pred")
    served = nib.as_closest_canonical(nib.load(str(tmp_path / "pred" /
                                                   f"{volume.name[:-7]}_mask.nii.gz")))
    served = np.transpose(np.asarray(served.dataobj), (2, 1, 0))  # [Z, Y, X]: the slices
    masks = load_masks(Artifacts().predictions(MODEL))
    evaluated = np.stack([masks[sid] for sid in
                          val.sort_values("slice_index").slice_id])
    np.testing.assert_array_equal(served, evaluated)

    # The raw answer had islands the decision removed in 3D: the test is not of a no-op.
    Artifacts().inference(MODEL).write_text(json.dumps(
        Inference(threshold=threshold).to_dict()))  # the same threshold, no post-processing
    predict.run(f"models/{MODEL}", [volume], tmp_path / "raw")
    unprocessed = nib.as_closest_canonical(nib.load(str(tmp_path / "raw" /
                                                        f"{volume.name[:-7]}_mask.nii.gz")))
    unprocessed = np.transpose(np.asarray(unprocessed.dataobj), (2, 1, 0))
    assert ndimage.label(unprocessed > 0, np.ones((3, 3, 3)))[1] > 1
    assert ndimage.label(served > 0, np.ones((3, 3, 3)))[1] == 1
    assert (served > 0).sum() < (unprocessed > 0).sum() and (served & unprocessed).any()


def test_the_registered_pyfunc_serves_evaluates_masks(registered, monkeypatch):
    """On a copy of the session's registered phantom: the best model evaluated at the
    threshold that makes its masks the most likely pixels, with the decision forced;
    register logs the decision (threshold included) with a new version; the version's
    pyfunc on the validation slices: thresholding its answers gives evaluate's masks."""
    root = registered
    model = json.loads((root / "reports/comparison.json").read_text())["best_model"]
    val = pd.read_csv(root / "data/splits/val.csv", dtype={"slice_id": str})
    grey = np.stack([np.asarray(Image.open(root / "slices" / f"{sid}.png"))
                     for sid in val.slice_id])
    liver = np.mean([labels.decode(casestore.read(root / "data/raw", ref, "mask"), 2) > 0
                     for ref in val["mask"]])
    threshold = _fitted_threshold(root / "models" / model, grey, liver)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["evaluate"]["threshold"] = threshold
    params = parse_params(raw)
    _force(monkeypatch, FORCED)
    evaluate.run(params, model)
    compare.run(params)
    record = register.run(params)
    version = record["version"]

    pyfunc = tracking.mlflow().pyfunc.load_model(f"models:/{params.register_.model_name}/"
                                                 f"{version}")
    answers = pyfunc.predict(grey[:, None].astype(np.float32))
    served = (answers[:, 0] > threshold).astype(np.uint8)
    masks = load_masks(Artifacts(root).predictions(model))
    evaluated = np.stack([masks[sid] for sid in val.slice_id])
    np.testing.assert_array_equal(served, evaluated)
    assert evaluated.any()
    raw_answers = (pyfunc.unwrap_python_model().net(torch.from_numpy(
        grey[:, None].astype(np.float32)))[:, 0] > threshold).numpy()
    assert (raw_answers != served).any(), "post-processing changed no pixel: a no-op test"
