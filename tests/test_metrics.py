import math

import torch

from liverseg.metrics import ConfusionMeter, global_metrics, per_image_iou


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
    tp, fp, fn, _ = meter.update(logits, target)
    assert math.isclose(meter.compute()["fg_iou"], 2 / 4)
    ious = per_image_iou(tp, fp, fn)
    assert math.isclose(ious[0], 0.5) and math.isnan(ious[1])
