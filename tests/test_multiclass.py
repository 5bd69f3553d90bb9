"""Three classes (background, liver, tumour): `data.target: liver_tumour` + `model.num_classes: 3`
end to end, from the label schema to predictions and the registry."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from liverseg import casestore, labels, tracking
from liverseg.config import ConfigError, parse_params
from liverseg.data.dataset import SliceDataset
from liverseg.data.layout import read_index
from liverseg.io import load_masks
from liverseg.serving import export, predict
from liverseg.stages import compare, evaluate, ingest, register, report, split, train, validate
from tests.helpers import rewrite_slot, slice_pngs, tiny_raw_params

THREE = ("background", "liver", "tumour")


def test_masks_store_classes_so_the_binary_decode_is_the_old_threshold():
    assert labels.stored_values(2) == [0, 255] and labels.stored_values(3) == [0, 128, 255]
    every = np.arange(256, dtype=np.uint8)
    assert (labels.decode(every, 2) == (every > 127)).all()  # binary masks read as before
    classes = np.array([[0, 1, 2]], np.uint8)
    assert (labels.decode(labels.encode(classes, 3), 3) == classes).all()
    assert ((labels.encode(classes, 3) > 127) == (classes > 0)).all()  # "> 127" = foreground
    lits = np.array([[0, 1, 2, 7]])  # LiTS labels; an unknown value is background
    assert labels.from_volume_labels(lits, "liver_tumour").tolist() == [[0, 1, 2, 0]]
    assert labels.from_volume_labels(lits, "liver").tolist() == [[False, True, True, False]]


@pytest.mark.parametrize("overrides, message", [
    ({"model": {"num_classes": 3}}, "data.target tumour has 2 classes"),
    ({"data": {"target": "liver_tumour"}}, "model.num_classes is 2 but data.target liver_tumour"),
    ({"data": {"target": "liver_tumour", "source": "folder", "path": "x"},
      "model": {"num_classes": 3}}, "needs data.folder.mask_mapping"),
    ({"data": {"source": "folder", "path": "x", "folder": {"mask_mapping": {0: 0, 1: 1, 2: 2}}}},
     "maps onto class 2, but data.target tumour is binary"),
])
def test_config_refuses_classes_that_disagree(overrides, message):
    with pytest.raises(ConfigError, match=message):
        parse_params(tiny_raw_params(**overrides))


@pytest.fixture
def three_class(workdir):
    params = parse_params(tiny_raw_params(data={"target": "liver_tumour"},
                                          model={"num_classes": 3}))
    ingest.run(params)
    validate.run(params)
    split.run(params)
    return params


def test_three_class_data_stages_record_and_check_the_classes(three_class, workdir):
    assert json.loads((workdir / "data/raw/classes.json").read_text())["classes"] == list(THREE)
    index = read_index(workdir / "data/raw")
    values = set()
    for ref in index["mask"]:
        values |= set(np.unique(casestore.read(workdir / "data/raw", ref, "mask")).tolist())
    assert values == {0, 128, 255}  # background, liver, tumour
    report_ = json.loads((workdir / "reports/validation.json").read_text())
    rule = "mask values are the 3 classes (0/128/255)"
    assert report_["classes"] == list(THREE) and report_["quarantined"] == 0
    assert any(r["rule"] == rule and r["success"] for r in report_["rules"])
    stats = json.loads((workdir / "data/splits/stats.json").read_text())
    assert stats["classes"] == list(THREE)
    train_set = SliceDataset(workdir / "data/splits/train.csv", workdir / "data/raw", 64, 0, 1,
                             num_classes=3)
    masks = np.stack([train_set.stored(i)[1] for i in range(len(train_set))])
    assert set(np.unique(masks).tolist()) == {0, 1, 2}  # the loader yields class indices


def test_a_binary_mask_under_the_three_class_rule_is_quarantined(three_class, workdir):
    index = read_index(workdir / "data/raw")
    stored = casestore.read(workdir / "data/raw", index["mask"][0], "mask")
    rewrite_slot(workdir / "data/raw", index["mask"][0],
                 mask=np.where(stored > 0, 200, 0).astype(np.uint8))
    validate.run(three_class)
    quarantine = pd.read_csv(workdir / "data/quarantine.csv")
    assert quarantine.slice_id.tolist() == [index.slice_id[0]]
    assert quarantine.rule[0] == "mask values are the 3 classes (0/128/255)"
    assert quarantine.detail[0] == "stored mask values 0,200"
    assert quarantine.path[0].endswith(index["mask"][0])


def test_three_class_model_trains_evaluates_registers_and_predicts(three_class, workdir, tmp_path):
    summary = train.run(three_class, "enhanced_pan")
    config = json.loads((workdir / "models/enhanced_pan/config.json").read_text())
    assert config["num_classes"] == 3 and config["preprocessing"]["classes"] == list(THREE)
    model, _ = predict.load(str(workdir / "models/enhanced_pan"))
    assert model.net.head.out_channels == 3  # softmax head: one logit per class

    evaluate.run(three_class, "enhanced_pan")
    metrics = json.loads((workdir / "reports/metrics/enhanced_pan.json").read_text())
    assert metrics["classes"] == list(THREE)
    for key in ("fg_iou", "miou", "dice", "iou_liver", "iou_tumour", "dice_liver"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert np.isclose(metrics["fg_iou"], (metrics["iou_liver"] + metrics["iou_tumour"]) / 2)
    history = pd.read_csv(workdir / "reports/training/enhanced_pan.csv")
    assert np.isclose(history.val_fg_iou.max(), summary["val_fg_iou"])
    masks = load_masks(workdir / "reports/predictions/enhanced_pan.h5")
    assert set(np.unique([masks[sid] for sid in masks]).tolist()) <= {0, 1, 2}
    per_image = pd.read_csv(workdir / "reports/per_image/enhanced_pan.csv")
    assert {"iou_liver", "iou_tumour", "tp"} <= set(per_image.columns)

    compare.run(three_class)
    assert "iou_tumour" in (workdir / "reports/comparison.md").read_text()
    assert {"iou_liver", "dice_tumour"} <= set(pd.read_csv(workdir / "reports/comparison.csv"))
    assert register.run(three_class)["alias"] == "champion"
    report.run(three_class)
    assert "Tumour IoU" in (workdir / "reports/report.html").read_text()
    served = tracking.mlflow().pyfunc.load_model("models:/liverseg@champion")
    (output,) = served.metadata.get_output_schema().inputs
    assert output.shape == (-1, 3, -1, -1)
    probs = served.predict(np.random.default_rng(0).uniform(0, 255, (2, 1, 48, 80))
                           .astype(np.float32))
    assert probs.shape == (2, 3, 48, 80) and np.allclose(probs.sum(1), 1, atol=1e-5)

    hu = np.random.default_rng(0).normal(60, 40, (40, 48, 3)).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(tmp_path / "case.nii.gz"))
    (image,) = slice_pngs(workdir / "data/raw", tmp_path / "png", 1)
    out = predict.run("models:/liverseg@champion", [tmp_path / "case.nii.gz", image],
                      tmp_path / "out")
    rows = pd.read_csv(tmp_path / "out/predictions.csv")
    volume = np.asarray(nib.load(str(tmp_path / "out/case_mask.nii.gz")).dataobj)
    assert set(np.unique(volume).tolist()) <= {0, 1, 2}  # LiTS's own label values
    assert rows.liver_pixels[0] == (volume == 1).sum()
    assert rows.tumour_pixels[0] == (volume == 2).sum()
    png = np.asarray(Image.open(tmp_path / "out" / rows["mask"][1]))
    assert set(np.unique(png).tolist()) <= {0, 128, 255}
    assert out["liver_pixels"] == rows.liver_pixels.sum()

    onnx = export.run("models:/liverseg@champion", "onnx", tmp_path / "model.onnx")
    assert onnx["max_abs_diff"] <= 1e-4


def test_lits_volume_ingests_with_liver_and_tumour_labels(shared_data, workdir):
    params = parse_params(tiny_raw_params(
        data={"source": "nifti", "path": str(shared_data / "lits-117"), "target": "liver_tumour",
              "nifti": {"slices": "all"}},
        model={"num_classes": 3}, split={"group_by": "slab"}))
    assert ingest.run(params)["classes"] == list(THREE)
    assert validate.run(params)["accepted"] == 128
    source = np.asarray(nib.load(str(shared_data / "lits-117/segmentation-117.nii.gz")).dataobj)
    k = int((source == 2).sum(axis=(0, 1)).argmax())  # the slice with most tumour
    index = pd.read_csv(workdir / "data/raw/slices.csv", keep_default_na=False)
    ref = index.loc[index.slice_index == k, "mask"].item()
    stored = casestore.read(workdir / "data/raw", ref, "mask")
    truth = source[:, :, k].T  # ingest transposes (rows along the volume's second axis)
    assert ((stored == 128) == (truth == 1)).all() and ((stored == 255) == (truth == 2)).all()


def test_a_tumour_free_volume_counts_by_its_liver():
    """Per volume, a class absent from both masks of a volume is left out of its mean."""
    perfect_liver = [[90, 0, 0, 10], [10, 0, 0, 90], [0, 0, 0, 100]]  # no tumour anywhere
    half_tumour = [[80, 5, 5, 10], [5, 0, 0, 95], [5, 5, 5, 85]]  # tumour IoU 5/15
    counts = np.array([perfect_liver, half_tumour], np.float64)
    summary = evaluate.per_volume_summary(counts, ["a", "b"])
    assert summary["n_volumes"] == 2
    assert np.isclose(summary["per_volume_fg_iou_mean"], (1.0 + (1.0 + 1 / 3) / 2) / 2)
