"""Measured is delivered (DESIGN rule 8): for every source kind, `liverseg predict` on the
raw source files of the validation split reproduces evaluate's pooled confusion counts
exactly (CPU), and a reoriented copy of a volume predicts the same mask after mapping back.

Each case trains a tiny model (one epoch, 64 px, batch 2) on that source through the stage
functions, so the model carries that source's preprocessing (e.g. the NIfTI HU window).
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from liverseg import casestore, labels
from liverseg.config import parse_params
from liverseg.serving import predict
from liverseg.stages import evaluate, run_data_stages, train
from tests.helpers import slice_pngs, tiny_raw_params

MODEL = "enhanced_pan"
MSD_SLICES = 16  # of four patients: enough for a patient split, seconds to train


@pytest.fixture(autouse=True)
def no_tracking(monkeypatch):
    """Parity is about the numbers: no MLflow store to create and log into."""
    monkeypatch.setenv("LIVERSEG_TRACKING", "off")


def _pipeline(raw: dict) -> tuple[dict, pd.DataFrame]:
    """ingest -> validate -> split -> train -> evaluate in the cwd; (metrics, val split).
    A low `evaluate.threshold` (recorded with the model, so predict applies it too): a
    one-epoch model finds no foreground at 0.5, and two empty masks agree trivially."""
    params = parse_params(raw | {"evaluate": raw["evaluate"] | {"threshold": 0.05}})
    run_data_stages(params)
    train.run(params, MODEL)
    evaluate.run(params, MODEL)
    metrics = json.loads(Path(f"reports/metrics/{MODEL}.json").read_text())
    return metrics, pd.read_csv("data/splits/val.csv")


def _evaluated_counts() -> np.ndarray:
    per_image = pd.read_csv(f"reports/per_image/{MODEL}.csv")
    return per_image[["tp", "fp", "fn", "tn"]].to_numpy().sum(0)


def _counts(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    pred, truth = pred > 0, truth > 0
    return np.array([(pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum(),
                     (~pred & ~truth).sum()])


def _predict(inputs: list[Path], out: Path) -> pd.DataFrame:
    predict.run(f"models/{MODEL}", inputs, out)
    return pd.read_csv(out / "predictions.csv")


def _msd_subset(shared: Path, dest: Path, images="images", masks="masks") -> Path:
    """The first MSD slices of four patients (256 px JPEGs) as a folder source."""
    src = shared / "msd-liver-slices"
    names = sorted(p.name for p in (src / "images").glob("*.jpg"))
    by_patient: dict[str, list[str]] = {}
    for name in names:
        by_patient.setdefault(name.split("_")[1], []).append(name)
    chosen = [n for p in sorted(by_patient)[:4] for n in by_patient[p][:MSD_SLICES // 4]]
    for sub, folder in ((images, "images"), (masks, "masks")):
        (dest / sub).mkdir(parents=True)
        for name in chosen:
            shutil.copy(src / folder / name, dest / sub / name)
    return dest


def _assert_2d_parity(val: pd.DataFrame, tmp: Path, source_of) -> None:
    """Predict each validation slice's source image; pool against the source mask."""
    rows = _predict([source_of(sid) for sid in val.slice_id], tmp / "pred")
    pooled = np.zeros(4, np.int64)
    for ref, mask_file in zip(val["mask"], rows["mask"], strict=True):
        pred = labels.decode(np.asarray(Image.open(tmp / "pred" / mask_file)), 2)
        truth = labels.decode(casestore.read("data/raw", ref, "mask"), 2)
        pooled += _counts(pred, truth)
    np.testing.assert_array_equal(pooled, _evaluated_counts())
    assert pooled[0] > 0, "no true-positive pixel: parity of two empty predictions proves little"


def test_predict_reproduces_evaluate_on_the_registered_phantom(registered, tmp_path):
    """Fast (make test), on a copy of the session's registered phantom. Its one-epoch
    models find no liver at threshold 0.5 (two empty predictions would agree trivially), so
    the best model is served at the threshold that makes its predicted area on the
    validation slices the true liver area, as if trained with that `evaluate.threshold`
    (the threshold is recorded with the model and does not change training). Then evaluate
    scores it, and `liverseg predict` (predict.run) on the validation slices' PNG files
    gives each slice's confusion counts exactly, with true-positive pixels."""
    root = registered
    model = json.loads((root / "reports/comparison.json").read_text())["best_model"]
    val = pd.read_csv(root / "data/splits/val.csv")
    images = [root / "slices" / f"{sid}.png" for sid in val.slice_id]
    truth = {sid: labels.decode(casestore.read(root / "data/raw", ref, "mask"), 2)
             for sid, ref in zip(val.slice_id, val["mask"], strict=True)}
    config_path = root / "models" / model / "config.json"
    config = json.loads(config_path.read_text())
    net = predict.Predictor(*predict.load(str(root / "models" / model))).net
    grey = np.stack([np.asarray(Image.open(p)) for p in images])
    with torch.no_grad():
        probs = net(net.grey_batch(grey))[:, 0].numpy()
    liver = np.mean([t > 0 for t in truth.values()])
    threshold = float(np.quantile(probs, 1 - liver))
    config["preprocessing"]["threshold"] = threshold
    config_path.write_text(json.dumps(config))
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["evaluate"]["threshold"] = threshold
    evaluate.run(parse_params(raw), model)

    predict.run(str(root / "models" / model), images, tmp_path / "pred")
    rows = pd.read_csv(tmp_path / "pred/predictions.csv")
    assert list(rows["status"]) == ["done"] * len(val)
    evaluated = pd.read_csv(root / f"reports/per_image/{model}.csv",
                            dtype={"slice_id": str}).set_index("slice_id")
    for sid, mask_file in zip(val.slice_id, rows["mask"], strict=True):
        pred = labels.decode(np.asarray(Image.open(tmp_path / "pred" / mask_file)), 2)
        expected = evaluated.loc[str(sid), ["tp", "fp", "fn", "tn"]].to_numpy()
        np.testing.assert_array_equal(_counts(pred, truth[sid]), expected, err_msg=str(sid))
    assert evaluated["tp"].sum() > 0, "no true-positive pixel"


@pytest.mark.slow
def test_phantom_predict_reproduces_evaluate(workdir, tmp_path):
    """The phantom's items are generated in memory: its source files are the stored slices
    as PNG files, here at 128 px against a 64 px model (the resize and the way back are
    exercised)."""
    metrics, val = _pipeline(tiny_raw_params(data={"target": "liver", "phantom": {"size": 128}}))
    assert metrics["image_size"] == 64 and val.width.unique().tolist() == [128]
    pngs = slice_pngs(workdir / "data/raw", tmp_path / "png")
    _assert_2d_parity(val, tmp_path, lambda sid: tmp_path / "png" / f"{sid}.png")
    assert len(pngs) >= len(val)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["folder", "archive"])
def test_folder_and_archive_predict_reproduce_evaluate(kind, workdir, shared_data, tmp_path):
    source = _msd_subset(shared_data, tmp_path / "msd")
    path = source
    if kind == "archive":
        path = tmp_path / "msd.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for f in sorted(source.rglob("*.jpg")):
                zf.write(f, f.relative_to(source))
    metrics, val = _pipeline(tiny_raw_params(data={"source": kind, "path": str(path),
                                                   "target": "liver"}))
    assert metrics["n_images"] == len(val) > 0
    index = pd.read_csv("data/raw/slices.csv").set_index("slice_id")
    # The original JPEG of each validation slice (the archive's member, from the folder).
    _assert_2d_parity(val, tmp_path, lambda sid: source / "images" /
                      Path(index.loc[sid, "source_image"]).name)


def _lits_params(path: Path) -> dict:
    return tiny_raw_params(data={"source": "nifti", "path": str(path), "target": "liver"},
                           split={"group_by": "slab", "val_fraction": 0.25})


def _reoriented(src: Path, dest: Path) -> Path:
    """The volume with axes flipped and permuted, the affine adjusted to match: the same
    voxels in the same place in the world."""
    img = nib.load(str(src))
    data = np.asanyarray(img.dataobj)
    ornt = np.array([[1, -1], [2, 1], [0, -1]])  # new axis i takes old axis ornt[i, 0]
    transform = nib.orientations.inv_ornt_aff(ornt, data.shape)
    moved = nib.orientations.apply_orientation(data, ornt)
    out = nib.Nifti1Image(moved, img.affine @ transform, img.header)
    nib.save(out, str(dest))
    return dest


@pytest.mark.slow
def test_nifti_predict_reproduces_evaluate_also_reoriented(workdir, shared_data, tmp_path):
    lits = shared_data / "lits-117"
    metrics, val = _pipeline(_lits_params(lits))
    volume = lits / "volume-117.nii.gz"
    copy = _reoriented(volume, tmp_path / "reoriented-117.nii.gz")
    _predict([volume, copy], tmp_path / "pred")
    truth_img = nib.as_closest_canonical(nib.load(str(lits / "segmentation-117.nii.gz")))
    truth = np.asarray(truth_img.dataobj)
    k = val.slice_index.to_numpy()
    masks = {}
    for name in ("volume-117", "reoriented-117"):
        canon = nib.as_closest_canonical(nib.load(str(tmp_path / "pred" / f"{name}_mask.nii.gz")))
        masks[name] = np.asarray(canon.dataobj)
    np.testing.assert_array_equal(masks["volume-117"], masks["reoriented-117"])
    pooled = _counts(masks["volume-117"][:, :, k], truth[:, :, k] >= 1)
    np.testing.assert_array_equal(pooled, _evaluated_counts())
    assert pooled[0] > 0, "no true-positive voxel: both masks empty would also be equal"
    assert abs(pooled[0] / pooled[:3].sum() - metrics["fg_iou"]) < 1e-9
