"""k-fold cross-validation in the split stage (`split.folds`, `split.fold`, `split.fold_gap`)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from liverseg.config import ConfigError, parse_params
from liverseg.stages import ingest, split, validate
from tests.helpers import tiny_raw_params


def _volume(slices: int) -> pd.DataFrame:
    return pd.DataFrame({"patient_id": "117", "slice_index": range(slices),
                         "slice_id": [f"117_{k:04d}" for k in range(slices)]})


def test_slab_folds_cover_every_slice_once_with_a_gap_that_never_trains():
    frame, folds, gap = _volume(128), 4, 4
    seen = []
    for fold in range(folds):
        side = split.assign_slab_folds(frame, folds, fold, gap)
        val = frame.slice_index[side == "val"].tolist()
        assert val == list(range(32 * fold, 32 * (fold + 1)))  # one contiguous slab
        train = set(frame.slice_index[side == "train"])
        # No train slice within `gap` slices of the validation slab.
        assert min(abs(t - v) for t in train for v in (val[0], val[-1])) > gap
        edges = (fold > 0) + (fold < folds - 1)
        assert (side == "gap").sum() == gap * edges
        seen += val
    assert sorted(seen) == list(range(128))


def test_patient_folds_partition_the_patients():
    patients = [f"p{i}" for i in range(10)]
    vals = [sorted(p for p, s in split.assign_patient_folds(patients, 4, k, seed=3).items()
                   if s == "val") for k in range(4)]
    assert sorted(sum(vals, [])) == sorted(patients)
    assert sorted(map(len, vals)) == [2, 2, 3, 3]
    with pytest.raises(ValueError, match="at least 4 patients"):
        split.assign_patient_folds(patients[:3], 4, 0, seed=3)


def test_fold_settings_are_checked():
    with pytest.raises(ConfigError, match="split.fold 4 is not one of the 4 folds"):
        parse_params(tiny_raw_params(split={"folds": 4, "fold": 4}))
    with pytest.raises(ConfigError, match="replaces test_fraction"):
        parse_params(tiny_raw_params(split={"folds": 4, "test_fraction": 0.2}))


def test_split_stage_writes_fold_and_reconciles_the_gap(workdir):
    params = parse_params(tiny_raw_params(
        data={"phantom": {"patients": 2, "slices_per_patient": 12}},
        split={"group_by": "slab", "folds": 3, "fold": 1, "fold_gap": 1}))
    for stage in (ingest, validate):
        stage.run(params)
    counts = split.run(params)
    stats = json.loads((workdir / "data/splits/stats.json").read_text())
    assert stats["cv"] == {"folds": 3, "fold": 1}
    assert counts["val"] == 8 and stats["excluded"]["slices"] == 4  # 2 volumes x (1 + 1)
    assert counts["train"] + counts["val"] + stats["excluded"]["slices"] == 24
    val = pd.read_csv(workdir / "data/splits/val.csv")
    assert sorted(val.slice_index.unique()) == [4, 5, 6, 7]


def test_cv_summary_pairs_the_enhanced_pan_with_each_model_by_fold():
    from bench.quality import cv_summary

    per_fold = pd.DataFrame({
        "fold": [0, 0, 1, 1, 2, 2],
        "model": ["enhanced_pan", "unet"] * 3,
        "fg_iou": [0.50, 0.40, 0.60, 0.55, 0.40, 0.30]})
    summary = cv_summary(per_fold).set_index("model")
    assert summary.loc["unet", "fg_iou_mean"] == pytest.approx(0.4166667)
    unet = summary.loc["unet"]
    # Paired differences 0.10, 0.05, 0.10: mean 0.0833, sd 0.0289, t(0.975, 2) = 4.303.
    assert unet["diff_vs_reference"] == pytest.approx(0.083333, abs=1e-6)
    half = 4.302653 * 0.0288675 / 3 ** 0.5
    assert (unet["diff_ci_low"], unet["diff_ci_high"]) == pytest.approx(
        (0.083333 - half, 0.083333 + half), abs=1e-5)
    assert pd.isna(summary.loc["enhanced_pan", "diff_vs_reference"])


def test_cv_table_labels_runs_and_pairs_context_with_none():
    from bench.cv_table import tables, variant

    assert variant("python bench/quality.py tumor --folds 4 --set data.context_slices=1 "
                   "--set model.in_channels=3") == "context_slices=1"
    folds = [0, 1, 2]
    rows = pd.DataFrame({
        "fold": folds * 3, "fg_iou": [0.5, 0.6, 0.4, 0.4, 0.55, 0.3, 0.45, 0.6, 0.35],
        "dice": 0.0, "gflops": 1.0, "images_per_second": 10.0,
        "base_model": ["enhanced_pan"] * 3 + ["unet"] * 6,
        "variant": [""] * 6 + ["context_slices=1"] * 3,
        "model": ["enhanced_pan"] * 3 + ["unet"] * 3 + ["unet [context_slices=1]"] * 3})
    summary, pairs, context = tables(rows)
    assert summary.model.tolist()[0] == "enhanced_pan"
    versus_unet = pairs.set_index("versus").loc["unet"]
    assert versus_unet["diff"] == pytest.approx(0.083333, abs=1e-6)  # as cv_summary's
    assert bool(versus_unet["excludes_0"]) is True
    assert context.iloc[0][["model", "folds"]].tolist() == ["unet", 3]
    assert context.iloc[0]["diff"] == pytest.approx(0.05)
