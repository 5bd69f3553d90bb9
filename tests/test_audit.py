"""`liverseg audit`: the registered champion rebuilt from its trail, and every fault named.

The end-to-end tests work on a private copy of the shared `dvc repro` (`repo_copy`) with its
own MLflow store, since an audit writes tags on the version it audits.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import dagster as dg
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from liverseg import tracking
from liverseg.cli import app
from liverseg.provenance import audit, comparison, lineage, model_card, rebuild
from liverseg.report.sections import lineage_context
from liverseg.stages import report
from tests.helpers import GIT, REPO

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def audit_repo(repo_clone, monkeypatch):
    """A private copy of the shared repro, reset to its commit, with its own MLflow store."""
    root, env = repo_clone
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlruns/mlflow.db'}")
    monkeypatch.setenv("PATH", env["PATH"])
    # Version 1 is the shared repro's own, from a clean tree; later tests of the session may
    # have moved the shared champion to versions trained from edited params (dirty trails).
    _client().set_registered_model_alias("liverseg", "champion", "1")
    return root


def _audit(*args) -> tuple[int, dict, str]:
    result = CliRunner().invoke(app, ["audit", *args, "--json"])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    try:
        report_ = json.loads(result.stdout)
    except json.JSONDecodeError:
        report_ = {}
    return result.exit_code, report_, result.output


def _client():
    return tracking.mlflow().MlflowClient()


def _tag(version: str, **tags) -> None:
    for key, value in tags.items():
        _client().set_model_version_tag("liverseg", version, key, value)


def _trail(ref: str) -> dict:
    client = _client()
    return lineage.trail(client, lineage.resolve_version(client, ref))


# ----------------------------------------------------------------------------- the proof


@pytest.mark.slow
def test_the_champion_rebuilds_bitwise_identical_on_cpu_and_the_registry_records_it(
        audit_repo):
    versions_before = len(_client().search_model_versions("name = 'liverseg'"))
    start = time.perf_counter()
    code, report_, output = _audit("models:/liverseg@champion")
    wall = time.perf_counter() - start
    print(f"\naudit wall time {wall:.1f} s; stages {report_.get('seconds')}")
    assert code == 0, output
    assert report_["result"] == "identical" and report_["passed"] and report_["mode"] == "bitwise"
    assert report_["device"] == {"recorded": "cpu", "rebuilt": "cpu"}
    weights = report_["weights"]
    assert weights["identical"] and weights["registry_sha256"] == weights["rebuilt_sha256"] \
        == weights["recorded_sha256"]
    assert {"fg_iou", "fg_iou_ci", "dice", "miou", "n_parameters"} <= set(
        report_["metrics"]["compared"]) and report_["metrics"]["identical"]
    assert report_["curve"] == {"compared": True, "epochs": 1, "identical": True,
                                "differences": []}
    assert report_["params"]["params_hash_commit"] == report_["params"]["params_hash_recorded"]
    assert report_["differences"] == [] and report_["data"]["cache"].endswith(".dvc/cache")

    recorded = _trail("models:/liverseg@champion")["audit"]
    assert recorded["result"] == "identical" and recorded["differences"] == []
    assert recorded["at"] == report_["audited_at"] and recorded["by"] == lineage.who()
    shown = CliRunner().invoke(app, ["lineage", "models:/liverseg@champion", "--no-dvc-status"])
    assert '"result": "identical"' in shown.stdout
    registered = _client().search_model_versions("name = 'liverseg'")
    assert len(registered) == versions_before  # the audit registered no version


# ----------------------------------------------------------------------------- faults


@pytest.mark.slow  # a trail needs git, dvc.lock and the DVC cache: repo_copy
def test_a_trail_from_a_dirty_tree_is_refused_not_rebuilt(audit_repo):
    _tag("1", git_dirty="true", git_dirty_files="src/liverseg/stages/train.py")
    code, report_, _ = _audit("1")
    assert code == 2 and report_["result"] == "not rebuilt"
    assert "registered from a dirty tree" in report_["error"]
    assert "src/liverseg/stages/train.py" in report_["error"]
    assert _trail("1")["audit"]["result"] == "not rebuilt"  # the attempt is on record


@pytest.mark.slow  # a trail needs git, dvc.lock and the DVC cache: repo_copy
def test_a_commit_missing_from_the_repository_is_named(audit_repo):
    _tag("1", git_commit="0" * 40)
    code, report_, _ = _audit("1", "--no-record")
    assert code == 2 and f"commit {'0' * 40} (tag git_commit) is not in the repository" \
        in report_["error"]
    assert _trail("1")["audit"] is None  # --no-record


@pytest.mark.slow  # a trail needs git, dvc.lock and the DVC cache: repo_copy
def test_data_gone_from_cache_and_remote_is_named_with_its_hash(audit_repo):
    shutil.rmtree(audit_repo / ".dvc" / "cache")
    code, report_, _ = _audit("1", "--no-record")
    raw = _trail("1")["data_hashes"]["data_raw_md5"]
    assert code == 2 and "the recorded data is not available" in report_["error"]
    assert f"data/raw (md5 {raw}, tag data_raw_md5)" in report_["error"]
    assert "remote 'local'" in report_["error"]


@pytest.mark.slow  # a trail needs git, dvc.lock and the DVC cache: repo_copy
def test_data_the_cache_lost_comes_from_the_dvc_remote(audit_repo, tmp_path):
    subprocess.run(["dvc", "push", "-q"], cwd=audit_repo, check=True)  # remote 'local'
    hashes = _trail("1")["data_hashes"]
    # The workspace holds the recorded data (its dvc.lock says so): the expected content.
    locked = lineage.locked_out_hashes(audit_repo / "dvc.lock")
    assert {k: locked[k] for k in rebuild.DATA} == {k: hashes[k] for k in rebuild.DATA}
    expected = _file_bytes(audit_repo, "data/raw", "data/splits")
    shutil.rmtree(audit_repo / ".dvc" / "cache")
    dest = tmp_path / "rebuild"
    dest.mkdir()
    fetched = rebuild.fetch_data(audit_repo, hashes, tmp_path, dest)
    assert fetched["remote"] == "local"
    fetched_files = _file_bytes(dest, "data/raw", "data/splits")
    assert "data/raw/slices.csv" in fetched_files and "data/splits/val.csv" in fetched_files
    assert fetched_files == expected  # every file, byte for byte


def _file_bytes(root: Path, *folders: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for folder in folders
            for p in sorted((root / folder).rglob("*")) if p.is_file()}


@pytest.mark.slow  # a trail needs git, dvc.lock and the DVC cache: repo_copy
def test_params_changed_at_the_recorded_commit_are_named_key_by_key(audit_repo):
    raw = yaml.safe_load((audit_repo / "params.yaml").read_text())
    raw["train"]["epochs"] = 2
    raw["register"]["min_fg_iou"] = 0.3  # register's params cannot change the model: not named
    (audit_repo / "params.yaml").write_text(yaml.safe_dump(raw))
    subprocess.run(GIT + ["commit", "-qam", "more epochs"], cwd=audit_repo, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=audit_repo, check=True,
                          capture_output=True, text=True).stdout.strip()
    _tag("1", git_commit=head)
    code, report_, _ = _audit("1", "--no-record")
    assert code == 2 and f"params.yaml at commit {head[:12]} differs" in report_["error"]
    assert "train.epochs: trained with 1, params.yaml has 2" in report_["error"]
    assert "register" not in report_["error"]


@pytest.mark.slow
def test_a_tampered_weights_file_in_the_registry_is_noticed(audit_repo, tmp_path):
    from mlflow.artifacts import download_artifacts

    original = _client().get_model_version("liverseg", "1")
    copy = Path(download_artifacts(artifact_uri="models:/liverseg/1", dst_path=str(tmp_path / "m")))
    weights = copy / "artifacts" / "model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, str(weights))
    tampered = _client().create_model_version("liverseg", source=str(copy),
                                              run_id=original.run_id, tags=original.tags)
    code, report_, output = _audit(str(tampered.version))
    assert code == 1 and report_["result"] == "differs", output
    text = "\n".join(report_["differences"])
    assert "the registry artifact was altered after registration" in text
    assert f"largest |difference| 0.5 in {name!r}" in text
    # The rebuild is the registered model: the registry copy is the odd one out.
    assert report_["weights"]["rebuilt_sha256"] == original.tags["weights_sha256"]
    assert report_["metrics"]["identical"] and report_["curve"]["identical"]


def test_a_tracking_server_that_is_down_fails_within_seconds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv(tracking.PROBE_TIMEOUT_ENV, "3")
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["audit", "models:/liverseg@champion"])
    assert time.perf_counter() - start < 10
    assert result.exit_code == 2
    assert "MLflow tracking server http://127.0.0.1:9 is unreachable" in result.output


# ----------------------------------------------------------------------------- the parts


def _safetensors(path: Path, shift: float = 0.0) -> Path:
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3) + shift,
               "b": torch.ones(4)}, str(path))
    return path


def test_weights_are_compared_by_tensor_digest_with_the_largest_difference(tmp_path):
    same = _safetensors(tmp_path / "same.safetensors")
    rebuilt = _safetensors(tmp_path / "rebuilt.safetensors")
    digest = lineage.tensor_digest(rebuilt)
    assert comparison.compare_weights(same, rebuilt, digest, None)["differences"] == []
    shifted = _safetensors(tmp_path / "shifted.safetensors", 0.25)
    out = comparison.compare_weights(shifted, rebuilt, digest, None)
    assert out["max_abs_diff"] == 0.25 and out["max_abs_diff_tensor"] == "a"
    assert out["differing_tensors"] == 1 and len(out["differences"]) == 2  # altered + differs
    # Within tolerance (GPU), a drift in the weights is reported, not judged.
    drift = comparison.compare_weights(shifted, rebuilt, None, 0.01)
    assert drift["differences"] == [] and "reported, not judged" in drift["note"]
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(audit.AuditError, match="junk.safetensors are not a readable"):
        comparison.compare_weights(tmp_path / "junk.safetensors", rebuilt, digest, None)


def test_metrics_and_curves_are_bitwise_on_cpu_and_within_tolerance_otherwise(tmp_path):
    recorded = {"fg_iou": 0.5, "fg_iou_ci": [0.4, 0.6], "precision": None,
                "images_per_second": 10.0, "gflops": 1.0}
    rebuilt = {"fg_iou": 0.5 + 1e-9, "fg_iou_ci": [0.4, 0.6], "precision": None,
               "images_per_second": 99.0}
    bitwise = comparison.compare_metrics(recorded, rebuilt, 0.0)
    assert bitwise["compared"] == ["fg_iou", "fg_iou_ci", "precision"]  # no timing, no extras
    assert bitwise["differences"] == [f"metrics fg_iou: recorded 0.5, rebuilt {0.5 + 1e-9!r}"]
    assert comparison.compare_metrics(recorded, rebuilt, 0.01)["identical"]
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("epoch,val_loss,val_fg_iou\n1,0.5,\n2,0.4,0.1\n")
    b.write_text("epoch,val_loss,val_fg_iou\n1,0.5,\n2,0.41,0.1\n")
    assert comparison.compare_curves(a, b, 0.0)["differences"] == [
        "curve epoch 2 val_loss: recorded 0.4, rebuilt 0.41"]
    assert comparison.compare_curves(a, b, 0.02)["identical"]
    assert comparison.compare_curves(None, b, 0.0)["compared"] is False
    assert comparison.judge_mode("cpu", "cpu", 0.01)[0] == "bitwise"
    mode, why = comparison.judge_mode("cuda:0", "cuda:0", 0.01)
    assert mode == "tolerance" and "cuDNN" in why and "0.01" in why


def test_params_differences_ignore_what_cannot_change_the_model():
    trained = {"train": {"epochs": 1, "lr": 0.003}, "register": {"min_fg_iou": 0.0},
               "models": ["enhanced_pan"]}
    committed = {"train": {"epochs": 1, "lr": 0.001}, "register": {"min_fg_iou": 0.5},
                 "models": ["enhanced_pan", "unet_cbam"]}
    assert rebuild.params_differences(trained, committed) == [
        "train.lr: trained with 0.003, params.yaml has 0.001"]


# ----------------------------------------------------------------------------- model card


@pytest.mark.slow
def test_register_writes_a_model_card_and_logs_it_to_the_version(repo_copy, monkeypatch):
    root, env = repo_copy
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    registry = json.loads((root / "reports/registry.json").read_text())
    card = json.loads((root / "reports/model_card.json").read_text())
    text = (root / "reports/model_card.md").read_text()
    for heading in ("Intended use", "Out-of-scope use", "Training data", "Preprocessing contract",
                    "Metrics", "The comparison it won", "Known limitations", "Lineage"):
        assert f"## {heading}" in text, heading
    assert card["version"] == registry["version"] and card["model"] == registry["model"]
    assert card["preprocessing"]["image_size"] == 64
    assert card["training_data"]["hashes"]["data_raw_md5"] == registry["tags"]["data_raw_md5"]
    assert card["training_data"]["splits"]["val"]["patients"] >= 1
    assert card["metrics"]["global"]["fg_iou"]["ci"] is not None
    assert "per_volume" in card["metrics"]["aggregation"]
    assert any("synthetic phantom" in line for line in card["limitations"])
    assert any("from scratch" in line for line in card["limitations"])
    assert card["lineage"]["weights_sha256"] == registry["tags"]["weights_sha256"]
    client = _client()
    version = client.get_model_version("liverseg", str(registry["version"]))
    folder = f"model_card/liverseg/v{registry['version']}"
    assert version.tags["model_card"] == f"runs:/{registry['run_id']}/{folder}/model_card.md"
    logged = {Path(a.path).name for a in client.list_artifacts(registry["run_id"], folder)}
    assert logged == {"model_card.md", "model_card.json"}
    assert registry["audits"][0] == {"version": registry["version"], "audit": None}


def test_limitations_are_stated_from_the_facts():
    card = {"training_data": {"source": "nifti", "target": "liver_tumour", "quarantined": 2,
                              "ingested": 40, "grouped_by": "slab",
                              "splits": {"val": {"patients": 1, "slices": 9}}},
            "training": {"epochs": 30, "best_epoch": 12, "image_size": 128, "device": "cuda:0"},
            "preprocessing": {"trained_on_volumes": True},
            "architecture": {"encoder_weights": "imagenet", "context_slices": 1},
            "quality_gate": {"passed": False, "text": "failed: fg_iou 0.3 < 0.5"},
            "lineage": {"git_dirty": "false"}}
    text = "\n".join(model_card.limitations(card))
    assert "its 1 neighbour(s) on each side" in text
    assert "phantom" not in text and "from scratch" not in text
    assert "resized to 128x128" in text and "Validated on 1 patients (9 slices)" in text
    assert "slab" in text and "2 of 40 ingested slices were quarantined" in text
    assert "quality gate (failed: fg_iou 0.3 < 0.5)" in text and "within a tolerance" in text


def test_the_report_lineage_section_shows_the_audit():
    registry = {"registered_model": "liverseg", "version": 4, "alias": "champion",
                "quality_gate": "passed", "model": "enhanced_pan", "run_id": "r1",
                "tags": {"weights_sha256": "ab" * 32}, "champion_version": 4,
                "model_card": {"markdown": "reports/model_card.md",
                               "artifact": "runs:/r1/model_card/liverseg/v4/model_card.md"},
                "audits": [{"version": 4, "audit": {"at": "2026-11-30T08:00:00+00:00",
                                                    "by": "ci@host", "result": "differs",
                                                    "differences": ["metrics dice: 1 vs 2"]}},
                           {"version": 3, "audit": None}]}
    context = lineage_context(registry)
    assert context["audit_command"] == "liverseg audit models:/liverseg/4"
    assert context["audits"].rows == [
        ["4", "2026-11-30T08:00:00+00:00", "ci@host", "differs", "metrics dice: 1 vs 2"],
        ["3", "never", "", "not audited", ""]]
    for name in ("report.html.j2", "report.md.j2"):  # both formats show the table
        source = report.environment().loader.get_source(report.environment(), name)[0]
        assert "table(lineage.audits" in source and "lineage.audit_command" in source, name


# ----------------------------------------------------------------------------- Dagster


def test_the_audit_check_is_non_blocking_and_skipped_by_the_retrain_job(tmp_path, monkeypatch):
    from liverseg.fanout.dvc_graph import load_stages
    from pipeline import checks
    from pipeline.assets import asset_key, build_assets
    from pipeline.resources import MlflowResource
    from pipeline.schedules import retrain_job
    from tests.test_dagster_control_room import RecordingDvc

    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/registry.json").write_text(json.dumps(
        {"registered_model": "liverseg", "version": 2, "alias": "champion"}))
    calls = []

    def fake_audit(root, ref, env):
        calls.append(ref)
        return {"result": "identical", "passed": True, "mode": "bitwise", "differences": [],
                "seconds": {"total": 42.0}}, ""

    monkeypatch.setattr(checks, "run_audit", fake_audit)
    register = [a for a in build_assets(REPO) if asset_key("register") in a.keys]
    (check,) = checks.build_audit_check(load_stages(REPO))
    resources = {"dvc": RecordingDvc(repo_root=str(tmp_path)), "mlflow": MlflowResource()}
    defs = dg.Definitions(assets=register, asset_checks=[check], jobs=[retrain_job],
                          resources=resources)
    spec = defs.resolve_asset_graph().get_check_spec(
        dg.AssetCheckKey(asset_key("register"), checks.AUDIT_CHECK))
    assert spec.blocking is False
    scheduled = defs.resolve_job_def("retrain").execute_in_process()
    assert scheduled.success and scheduled.get_asset_check_evaluations() == [] and calls == []

    by_hand = dg.materialize(register + [check], resources=resources)
    (evaluation,) = by_hand.get_asset_check_evaluations()
    assert evaluation.passed and calls == ["models:/liverseg/2"]
    assert evaluation.metadata["result"].value == "identical"
