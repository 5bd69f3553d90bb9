"""`liverseg predict` and `liverseg export` with the champion of the registered template."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from PIL import Image
from typer.testing import CliRunner

from liverseg.cli import app
from liverseg.preprocess import Preprocessing
from liverseg.served import Served
from liverseg.serving import export, predict

CHAMPION = "models:/liverseg@champion"


def _predict(*args) -> dict:
    result = CliRunner().invoke(app, ["predict", *map(str, args)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # stderr may carry MLflow's warnings


def test_predict_slices_and_a_folder_keep_each_input_geometry(registry, tmp_path):
    images = sorted((registry / "slices").glob("*.png"))[:2]
    folder = tmp_path / "in"
    folder.mkdir()
    for image in images:
        (folder / image.name).write_bytes(image.read_bytes())
    with Image.open(images[0]) as img:  # an RGB JPEG of another size than the model's
        img.convert("RGB").resize((70, 50)).save(tmp_path / "odd.jpg")
    summary = _predict("--model", CHAMPION, folder, tmp_path / "odd.jpg", "--out", tmp_path / "out")
    assert summary["inputs"] == 3
    rows = pd.read_csv(tmp_path / "out/predictions.csv")
    assert rows["shape"].tolist() == ["64x64", "64x64", "50x70"]
    for row in rows.itertuples():
        mask = np.asarray(Image.open(tmp_path / "out" / row.mask))
        assert set(np.unique(mask)) <= {0, 255} and (mask > 0).sum() == row.liver_pixels
        overlay = Image.open(tmp_path / "out" / row.overlay)
        assert overlay.mode == "RGB" and overlay.size == (mask.shape[1], mask.shape[0])


def test_predict_nifti_keeps_shape_and_affine(registry, tmp_path):
    affine = np.array([[-0.7, 0, 0, 10], [0, 0.7, 0, -20], [0, 0, 2.5, 30], [0, 0, 0, 1.0]])
    hu = np.random.default_rng(0).normal(60, 40, (40, 48, 3)).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, affine), str(tmp_path / "case.nii.gz"))
    _predict("--model", CHAMPION, tmp_path / "case.nii.gz", "--out", tmp_path / "out")
    mask = nib.load(str(tmp_path / "out/case_mask.nii.gz"))
    assert mask.shape == hu.shape and np.allclose(mask.affine, affine)
    row = pd.read_csv(tmp_path / "out/predictions.csv").iloc[0]
    voxels = int(np.asarray(mask.dataobj).sum())
    assert row.liver_pixels == voxels
    assert np.isclose(row.liver_volume_ml, voxels * 0.7 * 0.7 * 2.5 / 1000)


def test_predict_lits_volume_117(registry, shared_data, tmp_path):
    volume = shared_data / "lits-117/volume-117.nii.gz"
    _predict("--model", CHAMPION, volume, "--out", tmp_path)
    source, mask = nib.load(str(volume)), nib.load(str(tmp_path / "volume-117_mask.nii.gz"))
    assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}


def test_predict_refuses_unknown_inputs(registry, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    image = next((registry / "slices").glob("*.png"))
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "notes.txt"), str(image),
                                      "--model", CHAMPION, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "unsupported input" in result.output  # the others done
    rows = pd.read_csv(tmp_path / "o/predictions.csv").set_index("status")
    assert rows.loc["refused", "input"] == str(tmp_path / "notes.txt")
    assert rows.loc["done", "input"] == str(image)


def _served_champion():
    """The champion's own weights behind `served.Served`: what predict runs."""
    model, config = predict.load(CHAMPION)
    return Served(model, Preprocessing.from_config(config)).eval(), config


def test_onnx_graph_serves_any_size_as_predict_does(registry, tmp_path):
    """The resize in and out is inside the graph: a slice at its own size (not the trained
    one) gives predict's probabilities within 1e-4, so the same mask off the threshold."""
    import onnxruntime as ort

    summary = export.run(CHAMPION, "onnx", tmp_path / "model.onnx")
    assert summary["max_abs_diff"] < 1e-4 and summary["input"][2:] == ["height", "width"]
    session = ort.InferenceSession(str(tmp_path / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    image = sorted((registry / "slices").glob("*.png"))[0]
    with Image.open(image) as img:  # 64 px slices; served at 90x70, the model runs at 64
        gray = np.asarray(img.convert("L").resize((70, 90), Image.BILINEAR))
    net, config = _served_champion()
    x = net.grey_batch(gray[None])
    onnx_probs = session.run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        torch_probs = net(x).numpy()
    assert onnx_probs.shape == (1, 1, 90, 70)
    assert np.abs(onnx_probs - torch_probs).max() < 1e-4
    threshold = config["preprocessing"]["threshold"]
    decided = np.abs(torch_probs - threshold) > 1e-4  # pixels the tolerance cannot flip
    np.testing.assert_array_equal((onnx_probs > threshold)[decided],
                                  (torch_probs > threshold)[decided])
    bad = CliRunner().invoke(app, ["export", "--format", "tflite", "--out",
                                   str(tmp_path / "m.tflite")])
    assert bad.exit_code == 1 and "supported formats" in bad.output


def test_registered_model_carries_the_preprocessing(registry):
    import mlflow

    info = mlflow.models.get_model_info(CHAMPION)
    _, config = _served_champion()
    assert info.metadata["preprocessing"] == config["preprocessing"]
    assert config["preprocessing"]["hu_window"] == [-150.0, 250.0]  # the phantom's window


def test_mlflow_models_predict_cli_serves_the_champion(registry, tmp_path):
    """MLflow's own CLI (no liverseg code path in the call) on the registered pyfunc, on a
    40x56 crop of a stored slice (a size other than the trained one): the probabilities of
    predict's own Predictor (loaded by `liverseg predict`'s path, not the pyfunc's) to 1e-5
    (JSON round trip), and at the served threshold the mask `liverseg predict` wrote."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    source = sorted((registry / "slices").glob("*.png"))[0]
    crop = np.asarray(Image.open(source))[:40, :56]
    Image.fromarray(crop).save(tmp_path / "crop.png")
    predict.run(CHAMPION, [tmp_path / "crop.png"], tmp_path / "pred")
    written = pd.read_csv(tmp_path / "pred/predictions.csv").iloc[0]
    mask = np.asarray(Image.open(tmp_path / "pred" / written["mask"])) > 127
    x = crop.astype(np.float32)[None, None]
    (tmp_path / "input.json").write_text(json.dumps({"inputs": x.tolist()}))
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.run(
        [str(mlflow), "models", "predict", "-m", CHAMPION, "-i", str(tmp_path / "input.json"),
         "-t", "json", "-o", str(tmp_path / "out.json"), "--env-manager", "local"],
        cwd=registry, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True,
        text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = np.asarray(json.loads((tmp_path / "out.json").read_text())["predictions"])
    assert served.shape == (1, 1, 40, 56)
    predictor, _ = predict.start(CHAMPION, tmp_path / "unused")  # what predict runs
    with torch.no_grad():
        expected = predictor.net(torch.as_tensor(x)).numpy()
    assert np.ptp(expected) > 1e-3  # not a constant that any model would match
    assert np.abs(served - expected).max() < 1e-5
    np.testing.assert_array_equal(served[0, 0] > predictor.prep.threshold, mask)


def test_predict_exits_1_when_nothing_can_start(registry, tmp_path):
    """No model, or no inputs: exit code 1, one line naming why, no predictions.csv (exit 2
    is for refused inputs, 0 for none refused)."""
    image = next((registry / "slices").glob("*.png"))
    missing = tmp_path / "models/no_such_model"
    no_model = CliRunner().invoke(app, ["predict", str(image), "--model", str(missing),
                                        "--out", str(tmp_path / "a")])
    assert no_model.exit_code == 1, no_model.output
    assert "no_such_model" in no_model.output and "Traceback" not in no_model.output
    no_inputs = CliRunner().invoke(app, ["predict", "--model", CHAMPION,
                                         "--out", str(tmp_path / "b")])
    assert no_inputs.exit_code == 1 and "give INPUTS" in no_inputs.output, no_inputs.output
    assert not list(tmp_path.rglob("predictions.csv"))


# A `predict.run` that stops (for the parent's SIGKILL) as it starts its third image.
KILLED_PREDICT = r"""
import os, sys, time
from pathlib import Path
from liverseg.serving import predict

model, out, paused, *images = sys.argv[1:]
real, started = predict.predict_image, []

def pausing(predictor, path, dest):
    started.append(path)
    if len(started) == 3:
        Path(paused).write_text(str(os.getpid()))
        time.sleep(600)  # the parent kills us here
    return real(predictor, path, dest)

predict.predict_image = pausing
predict.run(model, images, out)
"""


def test_a_killed_predict_batch_keeps_the_rows_it_finished(registry, tmp_path):
    """SIGKILL while the third of four images is predicted: predictions.csv is whole and
    holds the first two rows, done, with their masks written."""
    import os
    import signal
    import subprocess
    import sys
    import time

    images = sorted((registry / "slices").glob("*.png"))[:4]
    out, paused = tmp_path / "out", tmp_path / "paused"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PREDICT,
                             str(registry / "models/enhanced_pan"), str(out), str(paused),
                             *map(str, images)], env=os.environ | {"OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not paused.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "the third image was never reached"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    rows = pd.read_csv(out / "predictions.csv")
    assert list(rows["input"]) == [str(p) for p in images[:2]]
    assert list(rows["status"]) == ["done", "done"]
    assert all((out / mask).is_file() for mask in rows["mask"])
