"""The monitoring library (liverseg.monitoring): facts computed by hand, the store under
concurrent writers, drift on synthetic served cases, and the false-alarm rate of the drift
rules over repeated windows drawn from the reference distribution."""

from __future__ import annotations

import multiprocessing as mp
import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from liverseg.monitoring import drift, facts
from liverseg.monitoring.store import STORE_ENV, ServedCaseStore, default_store

# ---------------------------------------------------------------- facts


def test_output_facts_volumes_and_lesions_by_hand():
    # spacing 0.8 x 0.8 mm, 2.5 mm slices: one voxel is 1.6 mm3
    mask = np.zeros((6, 10, 10), np.uint8)
    mask[1:5, 1:9, 1:9] = 1                      # liver: 4 * 8 * 8 = 256 voxels
    mask[1:3, 2:4, 2:4] = 2                      # lesion A: 2 * 2 * 2 = 8 voxels
    mask[4, 6:8, 6:8] = 2                        # lesion B: 4 voxels, slices apart from A
    out = facts.output_facts(mask, ("background", "liver", "tumour"), 0.8 * 0.8 * 2.5, True)
    assert out["liver_ml"] == pytest.approx((256 - 12) * 1.6 / 1000)
    assert out["tumour_ml"] == pytest.approx(12 * 1.6 / 1000)
    assert out["lesion_count"] == 2
    # a third blob touching lesion B only at a corner (diagonally, across slices): with full
    # (26-) connectivity it is the same lesion
    mask[3, 5, 5] = 2
    assert facts.output_facts(mask, ("background", "liver", "tumour"), 1.6, True)[
        "lesion_count"] == 2
    # as 2D images: lesion A spans two images (2), B is one, the corner voxel another
    out2d = facts.output_facts(mask, ("background", "liver", "tumour"), None, False)
    assert out2d["lesion_count"] == 4
    assert out2d["tumour_pixels"] == 13 and "tumour_ml" not in out2d
    # a binary liver model: pixels of its one class, no lesion count
    binary = facts.output_facts((mask > 0).astype(np.uint8), ("background", "liver"), None, True)
    assert binary == {"liver_pixels": 256}  # the corner voxel lies inside the liver


def test_intensity_facts_window_fractions_and_percentiles():
    hu = np.array([-1000, -900, -400, -200, -150, 0, 50, 100, 250, 400], np.float32)
    hu = np.tile(hu, (2, 5, 1))  # [2, 5, 10]: every value 10 times
    grey = np.clip((hu + 100) / 300 * 255, 0, 255).astype(np.uint8)  # window -100..200
    out = facts.intensity_facts(grey, hu, (-100, 200))
    # body (HU > -500): 8 of the 10 values; below -100: -400, -200, -150; above 200: 250, 400
    assert out["hu_below_window"] == pytest.approx(3 / 8)
    assert out["hu_above_window"] == pytest.approx(2 / 8)
    assert out["body_fraction"] == pytest.approx(8 / 10)
    assert out["body_rule"] == "hu>-500"
    # grey inside the body only: 0 (x30: -400, -200, -150), 85, 127, 170 (x10), 255 (x20)
    assert (out["grey_p25"], out["grey_p50"], out["grey_p75"], out["grey_p99"]) == \
        (0, 85, 170, 255)
    assert out["grey_mean"] == pytest.approx(111.5)
    # grey percentiles on a known array (grey-only input; body = grey > 8): values 10..109,
    # and an image of 8s outside the body
    grey = np.arange(10, 110, dtype=np.uint8).reshape(1, 10, 10)
    out = facts.intensity_facts(np.concatenate([grey, np.full_like(grey, 8)]))
    expected = np.percentile(np.arange(10, 110), facts.PERCENTILES, method="inverted_cdf")
    assert [out[f"grey_p{q}"] for q in facts.PERCENTILES] == list(expected)
    assert out["grey_p50"] == 59 and out["grey_p1"] == 10 and out["grey_p99"] == 108
    assert out["grey_mean"] == pytest.approx(59.5)
    assert out["body_fraction"] == 0.5 and out["body_rule"] == "grey>8"
    assert out["hu_below_window"] is None and out["hu_above_window"] is None


def test_confidence_two_batches_equal_one():
    gen = torch.Generator().manual_seed(0)
    for k in (1, 3):
        probs = torch.rand(10, k, 64, 64, generator=gen)
        if k > 1:
            probs = probs.softmax(dim=1)
        whole, parts = facts.Confidence(max_side=32), facts.Confidence(max_side=32)
        whole.update(probs)
        parts.update(probs[:4])
        parts.update(probs[4:].numpy())  # numpy works as well as torch
        assert parts.facts() == pytest.approx(whole.facts(), abs=1e-9)
    # binary by hand: p = 0.5 everywhere -> max 0.5, entropy ln 2 nats
    half = facts.Confidence()
    half.update(np.full((2, 1, 8, 8), 0.5, np.float32))
    assert half.facts() == pytest.approx({"mean_max_prob": 0.5, "p5_max_prob": 0.5,
                                          "mean_entropy": np.log(2)})
    sure = facts.Confidence()
    sure.update(np.r_[np.zeros(95), np.full(5, 0.7)].reshape(1, 1, 10, 10))
    assert sure.facts()["p5_max_prob"] == pytest.approx(0.7)  # 5 of 100 pixels at 0.7


def test_header_facts_keep_no_identity():
    pydicom = pytest.importorskip("pydicom")
    ds = pydicom.Dataset()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "PID-123", "19700101"
    ds.Manufacturer, ds.ManufacturerModelName = "SIEMENS", "SOMATOM Force"
    ds.KVP, ds.ConvolutionKernel, ds.SliceThickness = "120", ["Br40d", "3"], "2.5"
    ds.PixelSpacing, ds.Rows, ds.Columns = ["0.7", "0.75"], 512, 512
    out = facts.header_facts(ds, 87)
    assert out == {"manufacturer": "SIEMENS", "manufacturer_model_name": "SOMATOM Force",
                   "kvp": 120.0, "convolution_kernel": "Br40d\\3", "slice_thickness": 2.5,
                   "pixel_spacing_row": 0.7, "pixel_spacing_col": 0.75, "rows": 512.0,
                   "columns": 512.0, "slices": 87}
    assert facts.header_facts(pydicom.Dataset(), 1)["kvp"] is None


# ---------------------------------------------------------------- store

UID = "1.2.826.0.1.3680043.8.498.99887766554433221100"
IDENTITY = {"model_name": "enhanced_pan", "model_version": "3", "model_run": "abc123"}


def _writer(directory: str, who: int, n: int) -> None:
    store = ServedCaseStore(directory)
    for i in range(n):
        row = facts.served_row(IDENTITY, "dicom", {"grey_p50": float(i), "writer": who,
                                                   "pad": "x" * 3000},
                               {"liver_ml": 1.5}, study_uid=UID, series_uid=f"{UID}.{i}")
        store.append(row)


def test_store_concurrent_writers_per_process_per_day(tmp_path, monkeypatch):
    ctx = mp.get_context("fork")  # forked workers, as `mlflow models serve` (gunicorn) has
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 200)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    frame = ServedCaseStore(tmp_path).read()
    assert len(frame) == 400
    assert sorted(frame.groupby("writer").size()) == [200, 200]
    assert (frame["pad"].str.len() == 3000).all()  # no torn row (rows > PIPE_BUF bytes)
    day = datetime.now(UTC).date().isoformat()
    files = sorted((tmp_path / f"day={day}").glob("*.jsonl"))
    assert len(files) == 2 and {f.parent.name for f in files} == {f"day={day}"}
    for f in files:  # one writer per file
        writers = {int(m) for m in re.findall(rb'"writer":(\d+)', f.read_bytes())}
        assert len(writers) == 1
    raw = b"".join(f.read_bytes() for f in tmp_path.rglob("*") if f.is_file())
    assert UID.encode() not in raw and b"Doe" not in raw
    assert facts.hash_uid(UID).encode() in raw
    assert len(ServedCaseStore(tmp_path).read(last=7)) == 7
    assert ServedCaseStore(tmp_path).read(since="2999-01-01").empty
    monkeypatch.delenv(STORE_ENV, raising=False)
    assert default_store() is None
    monkeypatch.setenv(STORE_ENV, str(tmp_path))
    assert default_store().directory == Path(tmp_path)


def test_store_reads_past_a_torn_last_line_and_refuses_raw_uids(tmp_path):
    store = ServedCaseStore(tmp_path)
    path = store.append(facts.served_row(IDENTITY, "rest", {"grey_p50": 1.0}, {}))
    with open(path, "ab") as fh:
        fh.write(b'{"time": "2026-01-01T00:00:00", "grey_p5')  # a write cut by a power loss
    assert len(store.read()) == 1
    with pytest.raises(ValueError, match="series_uid"):
        store.append({"time": "2026-01-01T00:00:00", "series_uid": UID})


# ---------------------------------------------------------------- drift

MANUFACTURERS = {"GE MEDICAL SYSTEMS": ("LightSpeed VCT", "STANDARD"),
                 "SIEMENS": ("SOMATOM Definition AS", "B30f"),
                 "Philips": ("Brilliance 64", "B")}
BASE = np.array([0, 2, 40, 95, 130, 170, 200], float)  # grey p1 .. p99 of a typical case


def _cases(rng: np.random.Generator, n: int, grey_shift: float = 0.0,
           scanner: str | None = None) -> pd.DataFrame:
    """Synthetic served cases: correlated intensity percentiles (a per-case brightness and
    contrast), a multi-vendor header mix, outputs and confidence."""
    bright = rng.normal(0, 8, n)[:, None]
    contrast = rng.normal(1, 0.08, n)[:, None]
    grey = np.clip(np.rint(BASE * contrast + bright + rng.normal(0, 3, (n, 7)) + grey_shift),
                   0, 255)
    grey.sort(axis=1)
    maker = rng.choice(list(MANUFACTURERS), n, p=[0.5, 0.3, 0.2])
    frame = pd.DataFrame({f"grey_p{q}": grey[:, i] for i, q in enumerate(facts.PERCENTILES)})
    frame["grey_mean"] = grey.mean(axis=1) + rng.normal(0, 2, n)
    frame["hu_below_window"] = rng.beta(8, 12, n)
    frame["hu_above_window"] = rng.beta(2, 40, n)
    frame["manufacturer"] = maker
    frame["manufacturer_model_name"] = [MANUFACTURERS[m][0] for m in maker]
    frame["convolution_kernel"] = [MANUFACTURERS[m][1] for m in maker]
    frame["kvp"] = rng.choice([100.0, 120.0, 140.0], n, p=[0.25, 0.65, 0.1])
    frame["slice_thickness"] = rng.choice([1.0, 2.5, 5.0], n, p=[0.3, 0.5, 0.2])
    spacing = np.round(rng.uniform(0.6, 0.95, n), 3)
    frame["pixel_spacing_row"] = frame["pixel_spacing_col"] = spacing
    frame["rows"] = frame["columns"] = 512.0
    frame["slices"] = np.maximum(40, rng.normal(150, 60, n)).round()
    frame["liver_ml"] = rng.normal(1600, 300, n)
    frame["tumour_ml"] = rng.lognormal(2, 1.2, n)
    frame["lesion_count"] = rng.poisson(2, n).astype(float)
    frame["mean_max_prob"] = 1 - rng.beta(2, 150, n)
    frame["p5_max_prob"] = 1 - rng.beta(3, 20, n)
    frame["mean_entropy"] = rng.gamma(2, 0.01, n)
    if scanner:
        frame["manufacturer"], frame["manufacturer_model_name"] = scanner, "Aquilion ONE"
        frame["convolution_kernel"], frame["kvp"] = "FC18", 80.0
    return frame


@pytest.fixture(scope="module")
def ref():
    return drift.reference(_cases(np.random.default_rng(1), 300))


def test_reference_is_bounded_and_json(ref):
    import json

    big = drift.reference(_cases(np.random.default_rng(2), 1500))
    assert big["rows"] == 1500 and big["sampled"] == drift.REFERENCE_SIZE
    assert all(len(f.get("values", ())) <= drift.REFERENCE_SIZE for f in big["features"].values())
    assert json.loads(json.dumps(ref)) == ref
    assert ref["features"]["manufacturer"]["type"] == "categorical"
    assert "liver_pixels" not in ref["features"]  # no value, no reference


def test_drift_same_distribution_ok_shift_and_scanner_flagged(ref, tmp_path):
    rng = np.random.default_rng(3)
    same = drift.check(ref, _cases(rng, 40))
    assert {g: r.status for g, r in same.items()} == {g: "OK" for g in drift.GROUPS}
    shifted = drift.check(ref, _cases(rng, 40, grey_shift=20))
    assert shifted["intensity"].status in ("WARN", "ERROR")
    assert {"grey_p50", "grey_mean"} <= set(shifted["intensity"].drifted)
    assert "grey_p50" in shifted["intensity"].reason
    assert shifted["header"].status == "OK"
    scanner = drift.check(ref, _cases(rng, 40, scanner="TOSHIBA"))
    assert scanner["header"].status == "ERROR"
    assert {"manufacturer", "kvp", "convolution_kernel"} <= set(scanner["header"].drifted)
    feat = scanner["header"].features["kvp"]
    assert feat["drifted"] and feat["p_value"] == 0.0 and feat["n_cur"] == 40
    assert scanner["intensity"].status == "OK"
    png = drift.figure(ref, _cases(rng, 40, grey_shift=20), "grey_p50", tmp_path / "p50.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drift.figure(ref, _cases(rng, 40, scanner="X"), "manufacturer",
                        tmp_path / "m.png").stat().st_size > 1000


def test_missing_reference_and_too_few_rows_skip_saying_so(ref):
    rng = np.random.default_rng(4)
    phantom_ref = {**ref, "features": {k: v for k, v in ref["features"].items()
                                       if k not in drift.GROUPS["header"]}}
    res = drift.check(phantom_ref, _cases(rng, 30))
    assert res["header"].status == "SKIPPED"
    assert "no reference: the model's training data has no manufacturer" in res["header"].reason
    assert res["header"].features["kvp"]["skipped"].startswith("no reference")
    assert res["intensity"].status == "OK"
    # hu fractions without a reference: skipped, the group still tested on the rest
    no_hu = {**ref, "features": {k: v for k, v in ref["features"].items()
                                 if not k.startswith("hu_")}}
    res = drift.check(no_hu, _cases(rng, 30, grey_shift=20))
    assert res["intensity"].status in ("WARN", "ERROR")
    assert "not tested: hu_below_window, hu_above_window" in res["intensity"].reason
    few = drift.check(ref, _cases(rng, drift.MIN_CURRENT_ROWS - 1))
    assert all(r.status == "SKIPPED" and "fewer than the 20" in r.reason for r in few.values())


def _alarm_rates(ref: dict, draws: int, n: int, correction: str | None) -> dict[str, dict]:
    rng = np.random.default_rng(5)
    counts = {g: {"WARN": 0, "ERROR": 0} for g in drift.GROUPS}
    for _ in range(draws):
        for g, r in drift.check(ref, _cases(rng, n), correction=correction).items():
            if r.status in ("WARN", "ERROR"):
                counts[g]["WARN"] += 1  # WARN or worse
            if r.status == "ERROR":
                counts[g]["ERROR"] += 1
    return {g: {k: v / draws for k, v in c.items()} for g, c in counts.items()}


def test_false_alarm_rate_over_repeated_windows(ref, capsys):
    """200 windows of 30 cases drawn from the reference distribution: the share that warns
    (WARN or ERROR) and errs, per group, printed for the record."""
    rates = _alarm_rates(ref, 200, 30, "bonferroni")
    with capsys.disabled():
        print(f"\nfalse-alarm rate, 200 windows of 30 cases (Bonferroni): {rates}")
    for g, r in rates.items():
        assert r["WARN"] <= 0.10, (g, r)
        assert r["ERROR"] <= 0.02, (g, r)
