"""register's gate after the data grew: the champion is judged on the candidate's data (scored
anew when it was validated on another split), the frozen test split bounds any regression,
and the version records both scores and what started the run."""

from __future__ import annotations

import json

import pytest

from liverseg import tracking
from liverseg.config import RegisterParams, load_params
from liverseg.provenance import lineage
from liverseg.stages import compare, evaluate, register


def test_a_regression_on_the_frozen_test_split_fails_the_gate():
    cfg = RegisterParams(min_fg_iou=0.3, min_improvement=0.0, max_test_regression=0.02)
    champion = {"version": 3, "fg_iou": 0.6, "split": "s"}
    ok, text = register.quality_gate(cfg, {"fg_iou": 0.65, "dice": 0.7}, "s", champion,
                                     {"candidate": 0.59, "champion": 0.60})
    assert ok and "test fg_iou 0.5900 >= champion v3 0.6000 - max_test_regression 0.02" in text
    ok, text = register.quality_gate(cfg, {"fg_iou": 0.65, "dice": 0.7}, "s", champion,
                                     {"candidate": 0.55, "champion": 0.60})
    assert not ok and "test fg_iou 0.5500 < champion v3" in text
    ok, text = register.quality_gate(cfg, {"fg_iou": 0.65, "dice": 0.7}, "s", champion,
                                     {"candidate": None, "champion": 0.60})
    assert not ok and "test fg_iou undefined" in text


def test_the_candidate_must_do_as_well_as_the_champion_on_new_validation_cases():
    cfg = RegisterParams(min_fg_iou=0.3, min_new_case_gain=0.0)
    champion = {"version": 3, "fg_iou": 0.6, "split": "s"}
    metrics = {"fg_iou": 0.65, "dice": 0.7}
    ok, text = register.quality_gate(cfg, metrics, "s", champion, None,
                                     {"cases": 2, "candidate": 0.7, "champion": 0.5})
    assert ok and "fg_iou on 2 new validation case(s) 0.7000 >= champion v3 0.5000" in text
    ok, text = register.quality_gate(cfg, metrics, "s", champion, None,
                                     {"cases": 2, "candidate": 0.4, "champion": 0.5})
    assert not ok and "0.4000 < champion v3 0.5000 + min_new_case_gain 0.0" in text
    ok, text = register.quality_gate(cfg, metrics, "s", champion, None,
                                     {"cases": 0, "note": "no validation case is new"})
    assert ok and "no validation case is new" in text


def test_new_cases_are_those_in_none_of_the_champions_splits(tmp_path):
    from liverseg.stages import new_cases

    ours = {"train": ["a", "b"], "val": ["c", "d", "e"]}
    theirs = {"train": ["a", "c"], "val": ["b"], "test": ["e"]}
    assert new_cases.new_validation_cases(ours, theirs) == ["d"]
    val = tmp_path / "val.csv"
    val.write_text("slice_id,case\n1,c\n2,d\n3,d\n4,e\n")
    seen = {}

    def score(ref, csv):
        seen[ref] = [line.split(",")[0] for line in csv.read_text().splitlines()[1:]]
        return {"cand": 0.8, "champ": 0.6}[ref]

    out = new_cases.scores_on(["d"], val, score, "cand", "champ")
    assert out == {"cases": 1, "candidate": 0.8, "champion": 0.6}
    assert seen == {"cand": ["2", "3"], "champ": ["2", "3"]}  # the new case's rows only


def _hashes(split: str):
    return lambda *_: {"data_raw_md5": "r", "data_manifest_md5": "m", "data_splits_md5": split}


@pytest.mark.slow  # register twice, evaluate once
def test_a_champion_validated_on_another_split_is_scored_anew_on_this_one(registered,
                                                                          monkeypatch):
    """Champion v1 registered on split "old"; the data changed (split "new", half the
    validation slices): the gate serves v1 on this validation split and finds evaluate's
    own figure for it there, to the last bit; the version tags the new and the recorded
    score, and what started the run."""
    root = registered
    params = load_params(root / "params.yaml")
    # A low threshold, so that this one-epoch model's foreground is not empty either way;
    # no mirroring or post-processing, so v1's decision (its threshold) is the only one.
    params = params.model_copy(update={
        "register_": params.register_.model_copy(update={
            "model_name": "liverseg_rescore", "min_fg_iou": 0.0, "min_improvement": 1.0}),
        "evaluate": params.evaluate.model_copy(update={
            "threshold": 0.05, "tta": "none", "postprocessing": "none"})})
    comparison_path = root / "reports/comparison.json"
    comparison = json.loads(comparison_path.read_text())
    # v1: the better model (it finds liver: its score can change with the data)
    champion = comparison["best_model"]
    candidate = next(m for m in params.models if m != champion)
    evaluate.run(params, champion)  # v1 serves at this threshold (its decision)
    compare.run(params)  # v1's recorded figure is this one
    comparison = json.loads(comparison_path.read_text())
    comparison_path.write_text(json.dumps(comparison | {"best_model": champion}))
    monkeypatch.setattr(lineage, "locked_out_hashes", _hashes("old"))
    assert register.run(params)["version"] == 1

    # The data changed: half the validation slices. Evaluate's figure for v1's model on it
    # is what the gate must find when it scores v1 anew.
    recorded = json.loads((root / f"reports/metrics/{champion}.json").read_text())["fg_iou"]
    val = root / "data/splits/val.csv"
    lines = val.read_text().splitlines()
    val.write_text("\n".join(lines[:1 + (len(lines) - 1) // 2]) + "\n")
    now = evaluate.run(params, champion)["fg_iou"]
    assert now > 0 and now != recorded
    comparison_path.write_text(json.dumps(comparison | {"best_model": candidate}))
    monkeypatch.setattr(lineage, "locked_out_hashes", _hashes("new"))
    monkeypatch.setenv(register.TRIGGER_ENV, "retrain_on_evidence: intensity")
    second = register.run(params)
    assert second["version"] == 2 and second["alias"] == "challenger"  # min_improvement 1.0
    assert "champion v1" in second["quality_gate"]
    assert "re-scored on this split" in second["quality_gate"]

    tags = tracking.mlflow().MlflowClient().get_model_version("liverseg_rescore", "2").tags
    rescored = json.loads(tags["gate_champion_rescored"])
    assert rescored["version"] == 1 and rescored["recorded_split"] == "old"
    assert rescored["fg_iou"] == pytest.approx(now, abs=1e-12)
    assert rescored["recorded_fg_iou"] == pytest.approx(recorded, abs=1e-12)
    assert tags["retrain_trigger"] == "retrain_on_evidence: intensity"
