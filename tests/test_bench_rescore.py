"""bench/quality.py's re-score mode (issue 35): already trained models scored again by the
current evaluate under none / post-processing / post-processing + mirroring, without
training. On the registered phantom workspace (two tiny 64 px models, 2D slices)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_rescore_scores_each_setting_as_evaluate_does_and_keeps_each_metrics_file(
        quality, registered, monkeypatch):
    import yaml

    from liverseg.config import parse_params
    from liverseg.params_dict import deep_merge
    from liverseg.stages import evaluate

    monkeypatch.setenv("LIVERSEG_TRACKING", "on")  # the re-score turns it off itself
    raw = yaml.safe_load((registered / "params.yaml").read_text())
    models = raw["models"]
    assert len(models) == 2
    runs = {m: json.loads((registered / "models" / m / "run.json").read_text())["run_id"]
            for m in models}
    assert all(runs.values())  # trained with tracking: evaluate would log if tracking were on
    mlflow_db = registered / "mlruns" / "mlflow.db"
    before = mlflow_db.stat().st_mtime_ns

    table, inference = quality.rescore(registered, assignments=["evaluate.bootstrap=200"],
                                       log=lambda _: None)

    assert mlflow_db.stat().st_mtime_ns == before  # nothing logged to MLflow
    assert len(table) == 3 * len(models)
    assert sorted(zip(table["model"], table["setting"], strict=True)) == sorted(
        (m, s) for m in models for s in ("none", "post", "post+mirror"))
    rows = {(r["model"], r["setting"]): r for r in table.to_dict("records")}
    for model in models:
        none, post, both = (rows[model, s] for s in ("none", "post", "post+mirror"))
        assert none["describe"] == "none" and none["tta"] == "none"
        assert both["describe"].startswith("mirror")  # tta flip forces the mirror
        assert both["gflops_served"] == pytest.approx(4 * both["gflops"])
        assert none["gflops_served"] == pytest.approx(none["gflops"])
        for row in (none, post, both):
            assert row["images_per_second"] > 0
            assert row["fg_iou_ci_low"] <= row["fg_iou"] <= row["fg_iou_ci_high"]
        # post-processing is kept only if it does not lower the validation fg IoU, which
        # is what evaluate scores on (the same split): never below `none`
        assert post["fg_iou"] >= none["fg_iou"] - 1e-12
        assert post["gain_postprocessing"] >= 0
        # each setting's metrics file was copied aside before the next one overwrote it
        for setting in ("none", "post", "post+mirror"):
            kept = json.loads((registered / "reports/rescore" / setting / f"{model}.json")
                              .read_text())
            assert kept["fg_iou"] == rows[model, setting]["fg_iou"]
            assert kept["inference"] == inference[model][setting]
        # the work dir is left as the last setting left it
        served = json.loads((registered / "models" / f"{model}.inference.json").read_text())
        assert served["mirror"] is True

    # `none` is exactly evaluate with tta none and no post-processing, run independently
    params = parse_params(deep_merge(raw, {"evaluate": {"tta": "none", "postprocessing": "none",
                                                        "bootstrap": 200}}))
    monkeypatch.setenv("LIVERSEG_TRACKING", "off")
    model = models[0]
    alone = evaluate.run(params, model, root=registered)
    assert rows[model, "none"]["fg_iou"] == alone["fg_iou"]
    assert rows[model, "none"]["miou"] == alone["miou"]
    assert [rows[model, "none"]["fg_iou_ci_low"], rows[model, "none"]["fg_iou_ci_high"]] \
        == alone["fg_iou_ci"]


def test_rescore_cli_writes_the_csv_and_how_it_was_measured(quality, registered, tmp_path,
                                                            monkeypatch):
    results = tmp_path / "results"
    monkeypatch.setattr(quality, "RESULTS", results)
    monkeypatch.setattr(quality, "RESCORE_SETTINGS", quality.RESCORE_SETTINGS[:1])  # fast
    monkeypatch.setattr(sys, "argv", ["bench/quality.py", "liver", "--rescore", "--workdir",
                                      str(registered), "--name", "quality-tiny",
                                      "--models", "enhanced_pan", "--sharing", "a test"])
    quality.main()
    table = (results / "quality-rescore-tiny.csv").read_text().splitlines()
    assert table[0].split(",")[:3] == ["model", "setting", "tta"]
    assert [line.split(",")[:2] for line in table[1:]] == [["enhanced_pan", "none"]]
    facts = json.loads((results / "quality-rescore-tiny.json").read_text())
    assert facts["commit"] == quality.head_commit()
    assert facts["workdir"] == str(registered.resolve())
    assert facts["workdir_commit"] is None  # the phantom workspace is no git clone
    assert facts["sharing_the_machine"] == "a test"
    assert facts["seed"] == 7 and facts["models"] == ["enhanced_pan"]
    assert "LIVERSEG_TRACKING=off" in facts["tracking"]
    assert facts["inference"]["enhanced_pan"]["none"]["describe"] == "none"
