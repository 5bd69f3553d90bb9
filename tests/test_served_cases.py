"""After deployment the pipeline keeps watching: every served case leaves a monitoring row,
the champion carries its reference from evaluate, the Dagster `served_cases` asset checks
the recent rows against it, and an ERROR starts one retraining run that says why."""

from __future__ import annotations

import json
import os

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from liverseg import tracking
from liverseg.monitoring import drift
from liverseg.monitoring.store import ServedCaseStore
from liverseg.serving import predict

CHAMPION = "models:/liverseg@champion"


def test_every_served_image_leaves_a_row_naming_the_model(registered, tmp_path, monkeypatch):
    """predict on images: one row per input served (none for a refused one), the model's
    name, version and run, the grey facts and the confidence."""
    store = tmp_path / "monitoring"
    monkeypatch.setenv("LIVERSEG_MONITORING_DIR", str(store))
    images = sorted((registered / "slices").glob("*.png"))[:3]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    summary = predict.run(CHAMPION, [*images, bad], tmp_path / "out")
    rows = ServedCaseStore(store).read()
    assert summary["done"] == len(rows) == 3 and summary["refused"] == 1
    assert set(rows["kind"]) == {"image"} and set(rows["model_version"]) == {"1"}
    assert rows["model_run"].str.len().min() == 32 and set(rows["model_name"]) <= {
        "enhanced_pan", "unet_cbam", "manet", "linknet", "pspnet"}
    assert rows["grey_p50"].notna().all() and rows["mean_max_prob"].between(0.5, 1).all()


def test_without_a_store_nothing_is_recorded(registered, tmp_path, monkeypatch):
    monkeypatch.delenv("LIVERSEG_MONITORING_DIR", raising=False)
    images = sorted((registered / "slices").glob("*.png"))[:1]
    predict.run(CHAMPION, images, tmp_path / "out")
    assert not list(tmp_path.rglob("*.jsonl")) and not list(tmp_path.rglob("day=*"))


def _champion_reference(root, n: int = 40) -> pd.DataFrame:
    """The champion's reference, made richer: the tiny phantom's validation has two cases,
    below the drift tests' minimum, so n rows are drawn around its real values and logged
    as the version's reference (what register logs); returns those rows."""
    from liverseg.stages.register import MONITORING_REFERENCE

    metrics = json.loads(next((root / "reports/metrics").glob("*.json")).read_text())
    real = metrics["monitoring_reference"]["features"]
    assert "grey_p50" in real and "mean_max_prob" in real  # evaluate wrote the reference
    rng = np.random.default_rng(0)
    rows = pd.DataFrame({name: rng.normal(np.mean(f["values"]), np.std(f["values"]) + 1, n)
                         for name, f in real.items() if f["type"] == "numeric"})
    client = tracking.mlflow().MlflowClient()
    version = client.get_model_version_by_alias("liverseg", "champion")
    client.log_dict(version.run_id, drift.reference(rows), MONITORING_REFERENCE)
    return rows.assign(model_version=str(version.version))


def _materialise(root, store, monkeypatch):
    from pipeline.monitoring import served_cases
    from pipeline.resources import DvcResource, MlflowResource, MonitoringResource

    result = dg.materialize([served_cases], resources={
        "monitoring": MonitoringResource(directory=str(store)),
        "dvc": DvcResource(repo_root=str(root)),
        "mlflow": MlflowResource(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])})
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_served_cases_are_checked_against_the_champions_reference(registered, tmp_path,
                                                                  monkeypatch):
    """Rows like the champion's validation cases pass every drift check; rows whose grey
    values are 40 higher fail the intensity check (ERROR, the percentiles named), and the
    monitoring status says so, which starts one retraining run tagged with the evidence."""
    from pipeline.monitoring import STATUS, retrain_on_evidence
    from pipeline.resources import MonitoringResource

    store = tmp_path / "monitoring"
    same = _champion_reference(registered)  # served cases exactly like the reference's
    for row in same.to_dict("records"):
        ServedCaseStore(store).append(row)
    checks = _materialise(registered, store, monkeypatch)
    assert checks["intensity_drift"].passed and checks["confidence_drift"].passed
    status = json.loads((store / STATUS).read_text())
    assert status["intensity"] == "OK"

    shifted = same.copy()
    for name in drift.GROUPS["intensity"]:
        if name.startswith("grey_"):
            shifted[name] = shifted[name] + 40
    for row in shifted.to_dict("records"):
        ServedCaseStore(store).append(row)
    checks = _materialise(registered, store, monkeypatch)
    intensity = checks["intensity_drift"]
    assert not intensity.passed and intensity.severity == dg.AssetCheckSeverity.ERROR
    assert "grey_p50" in intensity.metadata["drifted"].value
    assert (store / "page" / "index.html").is_file()

    context = dg.build_sensor_context(resources={
        "monitoring": MonitoringResource(directory=str(store))})
    request = retrain_on_evidence(context)
    assert isinstance(request, dg.RunRequest)
    assert request.tags["liverseg/evidence"] == "intensity"
    again = retrain_on_evidence(dg.build_sensor_context(
        cursor=context.cursor, resources={"monitoring": MonitoringResource(directory=str(store))}))
    assert isinstance(again, dg.SkipReason)


@pytest.mark.parametrize("dice, passes", [([0.95] * 12, True), ([0.95] * 10 + [0.3] * 10, False)])
def test_the_correction_check_holds_a_version_to_its_control_limit(tmp_path, dice, passes):
    """Corrections of one version's SEGs (measured at ingest): a rolling Dice that falls
    below mean - 3 sd of its first corrections fails; other versions' rows do not count."""
    from liverseg.data.layout import FACT_COLUMNS, INDEX_COLUMNS, ROW_DEFAULTS
    from pipeline.monitoring import correction_result

    rows = []
    for i, d in enumerate(dice):
        for desc in ("liverseg enhanced_pan 3", "liverseg enhanced_pan 2"):
            rows.append({c: "" for c in INDEX_COLUMNS} | ROW_DEFAULTS | {
                "slice_id": f"{desc[-1]}-{i}", "correction_dice": d if desc.endswith("3")
                else 0.0, "label_creator": json.dumps(
                    {"SeriesDescription": desc, "time": f"2026010{i // 10}{i % 10:02d}"})})
    raw = tmp_path / "raw"
    raw.mkdir()
    pd.DataFrame(rows, columns=INDEX_COLUMNS + FACT_COLUMNS).to_csv(raw / "slices.csv",
                                                                    index=False)
    result = correction_result(raw, "liverseg enhanced_pan 3", validation_dice=[0.9, 0.8])
    assert result.passed is passes
    assert result.metadata["corrections"].value == len(dice)


def test_a_monitoring_failure_never_refuses_the_answer(registered, tmp_path, monkeypatch):
    """A fact that cannot be computed: the image is still served, its row is not written
    (no partial row), and a warning says why."""
    from liverseg.monitoring import facts

    def broken(*_, **__):
        raise RuntimeError("a monitoring bug")

    monkeypatch.setenv("LIVERSEG_MONITORING_DIR", str(tmp_path / "monitoring"))
    monkeypatch.setattr(facts, "intensity_facts", broken)
    images = sorted((registered / "slices").glob("*.png"))[:1]
    with pytest.warns(UserWarning, match="a monitoring bug"):
        summary = predict.run(CHAMPION, images, tmp_path / "out")
    assert summary["done"] == 1 and summary["refused"] == 0
    assert ServedCaseStore(tmp_path / "monitoring").read().empty
