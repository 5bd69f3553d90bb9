"""2.5D context (`data.context_slices`): each slice with its k neighbours on each side as
input channels, the same stack in training, evaluate, predict and ONNX.

The parity test crops 24 slices of the real LiTS volume and clears the liver label on its
first three, so with `slices: organ` training does not sample them (they are stored, and
serve as context and in evaluation), and the last row's neighbour repeats the volume's edge.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from liverseg import casestore
from liverseg.config import ConfigError, parse_params
from liverseg.data.dataset import SliceDataset
from liverseg.preprocess import context_stack
from liverseg.serving import export, predict
from liverseg.stages import evaluate, run_data_stages, train
from tests.helpers import slice_pngs, tiny_raw_params

MODEL = "enhanced_pan"


def test_context_stack_repeats_the_edge():
    volume = np.arange(5)[:, None, None] * np.ones((1, 2, 3), np.uint8)
    stacks = context_stack(volume, 2)
    assert stacks.shape == (5, 5, 2, 3)
    assert stacks[:, :, 0, 0].tolist() == [[0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [0, 1, 2, 3, 4],
                                           [1, 2, 3, 4, 4], [2, 3, 4, 4, 4]]
    assert context_stack(volume, 1, [4])[0, :, 0, 0].tolist() == [3, 4, 4]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"data": {"context_slices": 1}}, "model.in_channels is 1 but data.context_slices=1"),
    ({"data": {"source": "folder", "path": "x", "context_slices": 1},
      "model": {"in_channels": 3}}, "needs a volume source"),
    ({"data": {"context_slices": 2}, "model": {"in_channels": 5},
      "split": {"group_by": "slab", "folds": 4, "fold_gap": 1}}, "split.fold_gap=1 is below"),
    ({"model": {"in_channels": 3}}, "model.in_channels is 3 but data.context_slices=0"),
])
def test_config_refuses_context_that_cannot_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        parse_params(tiny_raw_params(**overrides))


def test_phantom_rows_name_their_neighbours(workdir):
    params = parse_params(tiny_raw_params(data={"context_slices": 1},
                                          model={"in_channels": 3}))
    run_data_stages(params)
    train_rows = pd.read_csv("data/splits/train.csv")
    first = train_rows[train_rows.slice_index == 0].iloc[0]
    pid = first.patient_id
    slot = f"cases/{pid}.h5#64x64/"
    assert first.context.split("|") == [slot + "0", slot + "0", slot + "1"]
    dataset = SliceDataset("data/splits/train.csv", "data/raw", 64, 0.0, 1.0)
    stack, _ = dataset.stored(int(first.name))
    assert stack.shape == (3, 64, 64)
    np.testing.assert_array_equal(stack[2], casestore.read("data/raw", slot + "1"))
    np.testing.assert_array_equal(stack[0], casestore.read("data/raw", first.image))


def _cropped_lits(shared: Path, dest: Path) -> Path:
    """24 slices of volume-117, the liver label cleared on the first three."""
    dest.mkdir()
    for name in ("volume-117", "segmentation-117"):
        img = nib.load(str(shared / "lits-117" / f"{name}.nii.gz"))
        data = np.asanyarray(img.dataobj)[:, :, 40:64].copy()
        if name.startswith("segmentation"):
            data[:, :, :3] = 0
        nib.save(nib.Nifti1Image(data, img.affine, img.header), str(dest / f"{name}.nii.gz"))
    return dest


@pytest.mark.slow
def test_context_model_predicts_what_evaluate_measured(workdir, shared_data, tmp_path,
                                                       monkeypatch):
    monkeypatch.setenv("LIVERSEG_TRACKING", "off")
    lits = _cropped_lits(shared_data, tmp_path / "lits")
    params = parse_params(tiny_raw_params(
        data={"source": "nifti", "path": str(lits), "target": "liver", "context_slices": 1,
              "nifti": {"slices": "organ"}},
        model={"in_channels": 3}, split={"group_by": "slab", "val_fraction": 0.25}))
    run_data_stages(params)
    index = pd.read_csv("data/raw/slices.csv", keep_default_na=False)
    assert index.slice_index.tolist() == list(range(24))  # every slice stored...
    sampled = index[index.sampled]
    assert sampled.slice_index.min() == 3  # ... the liver-free three not sampled
    train_rows = pd.read_csv("data/splits/train.csv")
    assert train_rows.sampled.all() and 0 not in train_rows.slice_index.tolist()
    first, last = sampled.iloc[0], index.iloc[-1]
    assert first.context.split("|")[0] == index.image.iloc[2]  # a stored, unsampled slice
    assert last.context.split("|")[1:] == [last.image, last.image]  # the edge repeats
    train.run(params, MODEL)
    evaluate.run(params, MODEL)
    metrics = json.loads(Path(f"reports/metrics/{MODEL}.json").read_text())

    predict.run(f"models/{MODEL}", [lits / "volume-117.nii.gz"], tmp_path / "pred")
    mask = np.asarray(nib.load(str(tmp_path / "pred" / "volume-117_mask.nii.gz")).dataobj)
    truth = np.asarray(nib.load(str(lits / "segmentation-117.nii.gz")).dataobj) >= 1
    k = pd.read_csv("data/splits/val.csv").slice_index.to_numpy()
    pred = mask[:, :, k] > 0  # RAS volume: slice k is [:, :, k]
    tp, fp, fn = (pred & truth[:, :, k]).sum(), (pred & ~truth[:, :, k]).sum(), \
        (~pred & truth[:, :, k]).sum()
    per_image = pd.read_csv(f"reports/per_image/{MODEL}.csv")
    assert [tp, fp, fn] == per_image[["tp", "fp", "fn"]].sum().tolist()
    assert tp > 0, "no true-positive voxel: two empty masks would also agree"
    assert abs(tp / (tp + fp + fn) - metrics["fg_iou"]) < 1e-9

    png = slice_pngs(Path("data/raw"), tmp_path / "png", 1)
    refused = predict.run(f"models/{MODEL}", png, tmp_path / "pred2d")  # 2D: says why
    assert refused["refused"] == 1 and "give it a volume" in refused["refusals"][0]
    onnx = export.export_onnx(f"models/{MODEL}", tmp_path / "model.onnx")
    assert onnx["input"][1] == 3 and onnx["max_abs_diff"] <= 1e-4
