import math

import numpy as np
import torch

from liverseg.metrics import (
    CI_METRICS,
    ConfusionMeter,
    bootstrap_ci,
    class_confusion,
    class_metrics,
    confusion,
    foreground_counts,
    global_metrics,
    hd95,
    per_image_metrics,
    pooled_confusion,
)


def test_global_metrics_by_hand():
    m = global_metrics(tp=30, fp=10, fn=20, tn=940)
    assert math.isclose(m["fg_iou"], 30 / 60)
    assert math.isclose(m["bg_iou"], 940 / 970)
    assert math.isclose(m["miou"], (30 / 60 + 940 / 970) / 2)
    assert math.isclose(m["dice"], 60 / 90)
    assert math.isclose(m["pixel_accuracy"], 970 / 1000)


def test_undefined_is_nan_not_zero():
    m = global_metrics(tp=0, fp=0, fn=0, tn=100)
    assert math.isnan(m["fg_iou"]) and m["bg_iou"] == 1.0


def test_meter_pools_pixels_and_per_image_marks_empty_pairs():
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, :2, :2] = 1  # 4 foreground pixels in image 0, image 1 empty
    logits = torch.full((2, 1, 4, 4), -10.0)
    logits[0, 0, :2, :1] = 10  # 2 of them found
    meter = ConfusionMeter()
    counts = meter.update(logits, target)
    assert math.isclose(meter.compute()["fg_iou"], 2 / 4)
    ious = [m["fg_iou"] for m in per_image_metrics(counts)]
    assert math.isclose(ious[0], 0.5) and math.isnan(ious[1])
    # the binary counts, read back from the per-class ones: TP, FP, FN, TN of image 0
    assert foreground_counts(counts)[0].tolist() == [2, 0, 2, 12]


# ----------------------------------------------------------------------------- per image


def _counts(pred: np.ndarray, truth: np.ndarray):
    """smp's per-image counts for hard 0/1 masks ([N, H, W])."""
    logits = torch.where(torch.as_tensor(pred)[:, None] > 0, 10.0, -10.0)
    return confusion(logits, torch.as_tensor(truth, dtype=torch.float32)[:, None])


def _pair(pred_pixels, truth_pixels, size=8):
    pred, truth = np.zeros((1, size, size), np.uint8), np.zeros((1, size, size), np.uint8)
    for r, c in pred_pixels:
        pred[0, r, c] = 1
    for r, c in truth_pixels:
        truth[0, r, c] = 1
    return pred, truth


def test_empty_truth_false_positives_score_zero_recall_undefined():
    pred, truth = _pair([(1, 1), (1, 2)], [])
    (m,) = per_image_metrics(_counts(pred, truth))
    assert m["fg_iou"] == 0.0 and m["dice"] == 0.0 and m["precision"] == 0.0
    assert math.isnan(m["recall"]) and math.isnan(hd95(pred[0], truth[0]))


def test_empty_prediction_misses_score_zero_precision_undefined():
    pred, truth = _pair([], [(3, 3), (3, 4), (4, 4)])
    (m,) = per_image_metrics(_counts(pred, truth))
    assert m["fg_iou"] == 0.0 and m["dice"] == 0.0 and m["recall"] == 0.0
    assert math.isnan(m["precision"]) and math.isnan(hd95(pred[0], truth[0]))


def test_both_empty_is_undefined_everywhere():
    pred, truth = _pair([], [])
    (m,) = per_image_metrics(_counts(pred, truth))
    assert all(math.isnan(v) for v in m.values())
    assert math.isnan(hd95(pred[0], truth[0]))


def test_one_pixel_object_hit_and_miss():
    pred, truth = _pair([(2, 2)], [(2, 2)])
    (hit,) = per_image_metrics(_counts(pred, truth))
    assert hit == {"fg_iou": 1.0, "dice": 1.0, "precision": 1.0, "recall": 1.0}
    assert hd95(pred[0], truth[0]) == 0.0
    pred, truth = _pair([(0, 0)], [(3, 4)])
    (miss,) = per_image_metrics(_counts(pred, truth))
    assert miss["fg_iou"] == 0.0 and miss["dice"] == 0.0
    assert hd95(pred[0], truth[0]) == 5.0  # a 3-4-5 triangle, in pixels
    assert math.isclose(hd95(pred[0], truth[0], spacing=(2.0, 1.0)), math.sqrt(6**2 + 4**2))


def test_hd95_of_a_shifted_square_is_the_shift():
    truth, pred = np.zeros((16, 16), bool), np.zeros((16, 16), bool)
    truth[4:10, 4:10] = True
    pred[4:10, 6:12] = True  # the same square, 2 pixels to the right
    assert hd95(pred, truth) == 2.0


def test_per_image_and_global_disagree():
    """A large, perfectly found tumour and a missed one-pixel tumour with one false
    positive: pooling is dominated by the large one, the per-image mean is not."""
    pred, truth = np.zeros((2, 16, 16), np.uint8), np.zeros((2, 16, 16), np.uint8)
    truth[0, :10, :10] = pred[0, :10, :10] = 1  # 100 px, all found
    truth[1, 5, 5], pred[1, 12, 12] = 1, 1  # missed, plus one false positive
    counts = _counts(pred, truth)
    pooled = class_metrics(counts.sum(0))
    per_image = [m["fg_iou"] for m in per_image_metrics(counts)]
    assert math.isclose(pooled["fg_iou"], 100 / 102)
    assert per_image == [1.0, 0.0] and np.mean(per_image) == 0.5


def test_bootstrap_ci_is_seeded_brackets_the_estimate_and_handles_edge_cases():
    counts = np.array([[100, 0, 0, 900], [0, 1, 1, 998], [10, 5, 5, 980], [3, 0, 9, 988]])
    point = global_metrics(*counts.sum(0))
    ci = bootstrap_ci(counts, 500, seed=1)
    assert ci == bootstrap_ci(counts, 500, seed=1)  # reproducible
    for key in CI_METRICS:
        lo, hi = ci[f"{key}_ci"]
        assert 0 <= lo <= point[key] <= hi <= 1, key
    same = bootstrap_ci(np.array([[3, 1, 2, 94]] * 5), 50, seed=0)
    assert same["fg_iou_ci"] == [0.5, 0.5]  # identical images: no spread
    assert bootstrap_ci(counts, 0, seed=1) == {f"{k}_ci": None for k in CI_METRICS}
    assert bootstrap_ci(np.array([[0, 0, 0, 10]]), 20, seed=0)["fg_iou_ci"] is None


# ----------------------------------------------------------------------------- three classes


def _one_hot_logits(pred: np.ndarray, classes: int = 3) -> torch.Tensor:
    """Logits whose argmax is `pred` ([N, H, W] class indices)."""
    return torch.nn.functional.one_hot(torch.as_tensor(pred).long(), classes).permute(
        0, 3, 1, 2).float() * 10


def test_three_class_metrics_by_hand():
    """A 4x4 slice: truth has 6 liver and 2 tumour pixels; the prediction finds 4 of the
    liver and 1 tumour pixel, calls one liver pixel tumour and one background pixel liver."""
    truth = np.zeros((1, 4, 4), np.int64)
    truth[0, 0, :] = 1
    truth[0, 1, :2] = 1  # 6 liver
    truth[0, 2, :2] = 2  # 2 tumour
    pred = np.zeros_like(truth)
    pred[0, 0, :] = 1
    pred[0, 1, 0] = 2  # liver called tumour
    pred[0, 2, 0] = 2  # tumour found; (2, 1) missed -> background
    pred[0, 3, 3] = 1  # background called liver
    # pixel (1, 1): liver missed -> background
    counts = confusion(_one_hot_logits(pred), torch.as_tensor(truth)[:, None].float())
    assert counts.shape == (1, 3, 4)
    m = class_metrics(counts.sum(0), ("background", "liver", "tumour"))
    liver, tumour = 4 / (4 + 1 + 2), 1 / (1 + 1 + 1)  # TP / (TP + FP + FN)
    background = 7 / (7 + 2 + 1)  # 7 found, 2 missed liver/tumour, 1 called liver
    assert math.isclose(m["iou_liver"], liver) and math.isclose(m["iou_tumour"], tumour)
    assert math.isclose(m["fg_iou"], (liver + tumour) / 2)
    assert math.isclose(m["bg_iou"], background)
    assert math.isclose(m["miou"], (background + liver + tumour) / 3)
    assert math.isclose(m["dice_tumour"], 2 / 4)
    assert math.isclose(m["pixel_accuracy"], (7 + 4 + 1) / 16)
    # Foreground (either class) against background, the CSV's counts: of the 8 foreground
    # pixels 6 are called liver or tumour and 2 background; 1 background pixel is called liver.
    assert foreground_counts(counts)[0].tolist() == [6, 1, 2, 7]


def test_three_class_per_image_leaves_out_a_class_absent_from_both_masks():
    truth = np.zeros((1, 4, 4), np.int64)
    truth[0, :2] = 1  # liver only, found exactly: tumour is 0/0 on this slice
    (m,) = per_image_metrics(confusion(_one_hot_logits(truth), torch.as_tensor(truth)[:, None]),
                             ("background", "liver", "tumour"))
    assert m["fg_iou"] == 1.0 and m["iou_liver"] == 1.0 and math.isnan(m["iou_tumour"])


def test_binary_bootstrap_keeps_the_binary_formulas():
    """The per-class code, given binary counts, gives the binary formulas' intervals."""
    counts = np.array([[100, 0, 0, 900], [0, 1, 1, 998], [10, 5, 5, 980], [3, 0, 9, 988]])
    rng = np.random.default_rng(3)
    tp, fp, fn, tn = counts[rng.integers(0, 4, (200, 4))].sum(axis=1).T
    fg, bg = tp / (tp + fp + fn), tn / (tn + fp + fn)
    expected = {"fg_iou": fg, "dice": 2 * tp / (2 * tp + fp + fn), "miou": (fg + bg) / 2}
    ci = bootstrap_ci(counts, 200, seed=3)
    for key, values in expected.items():
        assert np.allclose(ci[f"{key}_ci"], np.percentile(values, [2.5, 97.5]), rtol=1e-12), key


def test_pooled_confusion_is_the_per_image_counts_summed():
    """evaluate's choice pools counts over whole cases in numpy (`pooled_confusion`): the
    same numbers as smp's per-image counts (`class_confusion`) summed, for 2 and 3 classes."""
    rng = np.random.default_rng(0)
    for classes in (2, 3):
        pred = rng.integers(0, classes, (5, 16, 16), dtype=np.uint8)
        truth = rng.integers(0, classes, (5, 16, 16), dtype=np.uint8)
        expected = class_confusion(torch.from_numpy(pred.astype(np.int64)),
                                   torch.from_numpy(truth.astype(np.int64)), classes).sum(0)
        np.testing.assert_array_equal(pooled_confusion(pred, truth, classes), expected.numpy())
