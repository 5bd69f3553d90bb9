"""compare ranks an undefined score (0/0) after every defined one and says so; a run
whose validation holds no tumour still goes on to register (whose gate refuses it) and a
report."""

from __future__ import annotations

import json

from liverseg.artifacts import Artifacts
from liverseg.config import parse_params
from liverseg.stages import compare, evaluate, register, report, run_data_stages, train
from tests.helpers import tiny_raw_params


def metrics(model: str, fg_iou: float | None) -> dict:
    ci = None if fg_iou is None else [fg_iou - 0.1, fg_iou + 0.1]
    return {"model": model, "fg_iou": fg_iou, "fg_iou_ci": ci, "miou": 0.5, "dice": fg_iou,
            "classes": ["background", "tumour"], "flops": 2e9, "n_parameters": 10**6,
            "images_per_second": 5.0}


def test_an_undefined_score_ranks_last_and_is_named(workdir):
    params = parse_params(tiny_raw_params(models=["enhanced_pan", "pan", "unet_cbam"]))
    art = Artifacts()
    for model, score in (("enhanced_pan", None), ("pan", 0.4), ("unet_cbam", 0.6)):
        art.write_metrics(model, metrics(model, score))
    summary = compare.run(params)
    assert (summary["best_model"], summary["runner_up"]) == ("unet_cbam", "pan")
    assert abs(summary["margin_over_next"] - 0.2) < 1e-12
    written = art.read_comparison()
    assert [m["model"] for m in written["models"]] == ["unet_cbam", "pan", "enhanced_pan"]
    assert written["undefined"] == ["enhanced_pan"] and "enhanced_pan: fg_iou undefined" in \
        (workdir / "reports/comparison.md").read_text()


def test_no_defined_score_at_all_still_compares(workdir):
    params = parse_params(tiny_raw_params(models=["enhanced_pan", "pan"]))
    for model in params.models:
        Artifacts().write_metrics(model, metrics(model, None))
    summary = compare.run(params)
    assert summary["best_score"] is None and summary["margin_over_next"] is None
    assert Artifacts().read_comparison()["undefined"] == ["enhanced_pan", "pan"]


def test_a_validation_without_tumour_runs_through_register_and_report(workdir):
    # No tumour in any phantom, and a threshold a 1-epoch model never passes: fg IoU is 0/0.
    params = parse_params(tiny_raw_params(data={"phantom": {"max_tumours": 0}},
                                          evaluate={"threshold": 0.99}))
    run_data_stages(params)
    train.run(params, "enhanced_pan")
    assert evaluate.run(params, "enhanced_pan")["fg_iou"] is None
    assert compare.run(params)["best_score"] is None
    record = register.run(params)  # the gate refuses an undefined score
    assert record["alias"] == "challenger" and record["quality_gate"].startswith("failed")
    report.run(params)
    html = (workdir / "reports/report.html").read_text()
    assert "enhanced_pan" in html and json.loads(
        (workdir / "reports/comparison.json").read_text())["undefined"] == ["enhanced_pan"]
