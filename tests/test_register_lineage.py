"""register's quality gate and alias history; `liverseg lineage` against a real repro."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from liverseg import tracking
from liverseg.cli import app
from liverseg.config import RegisterParams, load_params, parse_params
from liverseg.provenance import lineage
from liverseg.stages import register
from tests.helpers import sh

# ----------------------------------------------------------------------------- the gate


def test_gate_rejects_a_worse_model_and_names_the_reason():
    cfg = RegisterParams(min_fg_iou=0.3, min_dice=0.4, min_improvement=0.01)
    champion = {"version": 4, "fg_iou": 0.60, "split": "s1"}
    passed, text = register.quality_gate(cfg, {"fg_iou": 0.55, "dice": 0.7}, "s1", champion)
    assert not passed and "fg_iou 0.5500 < champion v4 0.6000 + min_improvement 0.01" in text
    passed, text = register.quality_gate(cfg, {"fg_iou": 0.605, "dice": 0.7}, "s1", champion)
    assert not passed  # better, but not by the margin
    passed, text = register.quality_gate(cfg, {"fg_iou": 0.62, "dice": 0.7}, "s1", champion)
    assert passed and text.startswith("passed")
    passed, text = register.quality_gate(cfg, {"fg_iou": 0.62, "dice": 0.3}, "s1", champion)
    assert not passed and "dice 0.3000 < min_dice 0.4" in text
    passed, text = register.quality_gate(cfg, {"fg_iou": None, "dice": None}, "s1", None)
    assert not passed and "fg_iou undefined" in text


def test_gate_does_not_compare_across_validation_splits():
    cfg = RegisterParams(min_fg_iou=0.3, min_improvement=0.0)
    champion = {"version": 2, "fg_iou": 0.9, "split": "old"}
    passed, text = register.quality_gate(cfg, {"fg_iou": 0.5, "dice": 0.6}, "new", champion)
    assert passed and "another split" in text and "not applicable" in text


# ----------------------------------------------------------------------------- registry

def _best_is(root, model: str) -> None:
    """Point reports/comparison.json's best model at `model` (its run is registered next)."""
    path = root / "reports/comparison.json"
    comparison = json.loads(path.read_text())
    path.write_text(json.dumps(comparison | {"best_model": model}))


def test_champion_stays_against_a_worse_candidate_and_moves_for_a_better_one(
        registered, registered_template):
    """The template's two training runs under a fresh registered-model name: the worse one
    is champion first, the better one is challenger while it must win by 1.0 and champion
    when the margin is 0; one version per run however often register reruns. (That the
    lineage tags hold dvc.lock's hashes is test_end_to_end's.)"""
    root = registered
    params = load_params(root / "params.yaml")
    params = _with_register(params, model_name="liverseg_gate_test", min_fg_iou=0.0)
    best = json.loads((root / "reports/comparison.json").read_text())["best_model"]
    worse = next(m for m in params.models if m != best)
    _best_is(root, worse)
    first = register.run(params)
    assert first["alias"] == "champion" and first["version"] == 1
    _best_is(root, best)
    # Not better by the gate: it would have to beat champion v1 by 1.0 on the same split.
    second = register.run(_with_register(params, min_improvement=1.0))
    assert second["alias"] == "challenger" and "champion v1" in second["quality_gate"]
    third = register.run(params)  # at least as good, margin 0: the alias moves to it
    assert third["alias"] == "champion" and third["version"] == 2
    fourth = register.run(params)  # a rerun: the same version, nothing moves
    assert fourth["alias"] == "champion" and fourth["version"] == 2

    client = tracking.mlflow().MlflowClient()
    model = client.get_registered_model("liverseg_gate_test")
    assert len(client.search_model_versions("name='liverseg_gate_test'")) == 2
    assert model.aliases == {"champion": 2, "challenger": 2}
    history = json.loads(model.tags["alias_history"])
    assert [(e["alias"], e["from_version"], e["to_version"]) for e in history] == [
        ("champion", None, 1), ("challenger", None, 2), ("champion", 1, 2)]
    assert all(e["who"] and e["when"] and e["why"] for e in history)
    record = json.loads((root / "reports/registry.json").read_text())
    assert record["alias_history"] == history and record["champion_before"]["version"] == 1
    tags = client.get_model_version("liverseg_gate_test", "2").tags
    assert json.loads(tags["alias_event"]) == history[-1]
    assert {"params", "params_hash", "model_config", "metrics", "metric_fg_iou",
            "data_splits_md5", "model_md5", "validation_success"} <= set(tags)
    # The cards went to the copy's artifact store: the shared template stays as it was.
    assert len(list(root.rglob("liverseg_gate_test/v*/model_card.md"))) == 2
    assert not list(registered_template.rglob("liverseg_gate_test"))


def _repro_with(root, env, **sections) -> dict:
    """Edit params.yaml, rerun the whole pipeline, return what register wrote."""
    raw = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in sections.items():
        raw[section] = raw[section] | values if isinstance(values, dict) else values
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    sh(["dvc", "repro"], root, env)
    return json.loads((root / "reports/registry.json").read_text())


@pytest.mark.slow
def test_pipeline_reruns_move_the_champion_for_a_better_model_and_keep_it_against_a_worse(
        repo_clone, monkeypatch):
    """Two more `dvc repro` runs on the same split: a better model (more epochs) and then a
    genuinely worse one (learning rate 1000x too small). Versions are counted from what the
    shared repro (and the tests before this one) registered."""
    root, env = repo_clone
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    client = tracking.mlflow().MlflowClient()
    champion = client.get_model_version_by_alias("liverseg", "champion")
    fg = {"champion": float(champion.tags["metric_fg_iou"])}
    latest = json.loads((root / "reports/registry.json").read_text())["version"]

    better = _repro_with(root, env, models=["unet_cbam"], train={"epochs": 6})
    fg["better"] = _best_score(root)
    assert fg["better"] > fg["champion"], fg  # the premise: this run really is better
    assert better["version"] == latest + 1 and better["alias"] == "champion"

    worse = _repro_with(root, env, train={"epochs": 1, "lr": 3e-6})
    fg["worse"] = _best_score(root)
    assert fg["worse"] < fg["better"], fg
    assert worse["version"] == latest + 2 and worse["alias"] == "challenger"
    assert f"< champion v{latest + 1} {fg['better']:.4f}" in worse["quality_gate"]

    model = client.get_registered_model("liverseg")
    assert model.aliases == {"champion": latest + 1, "challenger": latest + 2}
    reason = client.get_model_version("liverseg", str(latest + 2)).tags["gate_reason"]
    assert f"champion v{latest + 1}" in reason
    moves = [(e["alias"], e["from_version"], e["to_version"])
             for e in json.loads(model.tags["alias_history"])]
    assert moves[-2] == ("champion", int(champion.version), latest + 1)
    assert moves[-1][::2] == ("challenger", latest + 2)
    html = (root / "reports/report.html").read_text()  # the report shows both moves
    history = html.split('id="alias-history"')[1].split("</table>")[0]
    assert f"<td>Champion now</td><td>version {latest + 1}</td>" in html
    rows = history.split("<tr>")[2:4]  # newest first, after the header row
    assert "<td>challenger</td>" in rows[0] and f"<td>{latest + 2}</td>" in rows[0]
    assert "<td>champion</td>" in rows[1] and f"<td>{latest + 1}</td>" in rows[1]


def _best_score(root) -> float:
    return json.loads((root / "reports/comparison.json").read_text())["best_score"]


def _with_register(params, **update):
    return params.model_copy(update={"register_": params.register_.model_copy(update=update)})


# ----------------------------------------------------------------------------- lineage


def _lineage(root, env, monkeypatch, *args):
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    monkeypatch.setenv("PATH", env["PATH"])
    result = CliRunner().invoke(app, ["lineage", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.slow  # git and dvc.lock: the repro'd repo_copy
def test_lineage_of_the_first_champion_reproduces_then_names_what_changed(
        repo_clone, monkeypatch):
    root, env = repo_clone
    # Version 1 came from the first `dvc repro` of this commit (its champion then).
    info = json.loads(_lineage(root, env, monkeypatch, "1", "--json"))
    for key in ("model_version", "alias", "git_commit", "git_dirty", "data_hashes",
                "params_hash", "validation_success", "metrics", "reproducible", "differences"):
        assert key in info, key
    assert info["differences"] == [] and info["reproducible"] is True
    assert info["validation_success"] is True and info["git_dirty"] == "false"
    assert set(info["data_hashes"]) == {"data_raw_md5", "data_manifest_md5", "data_splits_md5"}
    assert "missing" not in info["data_hashes"].values() and info["metrics"]["fg_iou"] is not None
    assert "reproducible: yes" in _lineage(root, env, monkeypatch, "models:/liverseg/1")

    found = json.loads(_lineage(root, env, monkeypatch, "--data-hash",
                                info["data_hashes"]["data_raw_md5"][:12]))
    assert 1 in [v["model_version"] for v in found["versions"]]

    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["train"]["epochs"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    case = sorted((root / "data/raw/cases").iterdir())[0]
    case.write_bytes(case.read_bytes() + b"\0")  # an edited data file
    changed = json.loads(_lineage(root, env, monkeypatch, "1", "--json"))
    assert changed["reproducible"] is False
    text = "\n".join(changed["differences"])
    assert "params train.epochs: 1 -> 2" in text
    assert "workspace has uncommitted changes: params.yaml" in text
    assert "data/raw: modified" in text


@pytest.mark.slow  # git and dvc.lock: the repro'd repo_copy
def test_lineage_resolves_aliases_and_run_ids(repo_clone, monkeypatch):
    root, env = repo_clone
    champion = json.loads(_lineage(root, env, monkeypatch, "models:/liverseg@champion",
                                   "--json", "--no-dvc-status"))
    assert "champion" in champion["alias"]
    by_run = json.loads(_lineage(root, env, monkeypatch, champion["run_id"], "--json",
                                 "--no-dvc-status"))
    assert by_run["run_id"] == champion["run_id"]
    bad = CliRunner().invoke(app, ["lineage", "not-a-model"])
    assert bad.exit_code == 1 and "expected models:/" in bad.output


def test_params_hash_matches_a_fresh_parse_of_params_yaml(registry):
    """The champion's recorded params_hash is the hash of params.yaml as it lies on disk,
    parsed afresh; a one-value change of that file changes the hash."""
    version = tracking.mlflow().MlflowClient().get_model_version_by_alias("liverseg",
                                                                         "champion")
    raw = yaml.safe_load((registry / "params.yaml").read_text())
    assert version.tags["params_hash"] == lineage.params_hash(parse_params(raw).dump())
    raw["train"]["lr"] = raw["train"]["lr"] * 2
    assert version.tags["params_hash"] != lineage.params_hash(parse_params(raw).dump())
