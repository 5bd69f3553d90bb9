"""Dagster as the control room: metadata, checks, sensors, resources (no pipeline run).

The stage assets run `dvc repro`; here a recording DvcResource stands in for DVC so that the
Dagster side (ordering, metadata read from real outputs, blocking checks) is tested in
seconds. The real `dvc repro` through Dagster is tested end to end in test_end_to_end.py.
"""

import json
import shutil
import stat

import dagster as dg
import pytest
import yaml

from liverseg.fanout.dvc_graph import load_stages
from pipeline.assets import POOL, asset_key, build_assets, trigger
from pipeline.checks import build_checks
from pipeline.monitoring import KEY as MONITORING_KEY
from pipeline.resources import DvcResource, MlflowResource, resources_from_env
from pipeline.sensors import data_source_sensor, source_fingerprint
from tests.helpers import REPO, record_failure

CALLS: list[str] = []


class RecordingDvc(DvcResource):
    """Records the stages Dagster asks for instead of running DVC."""

    def repro(self, stage: str, env: dict[str, str], log) -> None:
        CALLS.append(stage)


def materialize(root, **kwargs) -> dg.ExecuteInProcessResult:
    CALLS.clear()
    stages = load_stages(root)
    return dg.materialize(
        build_assets(root) + build_checks(stages),
        resources={"dvc": RecordingDvc(repo_root=str(root)), "mlflow": MlflowResource()},
        **kwargs)


def metadata(result: dg.ExecuteInProcessResult) -> dict[str, dict]:
    out = {}
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        out[mat.asset_key.to_user_string()] = {k: v.value for k, v in mat.metadata.items()}
    return out


def checks(result: dg.ExecuteInProcessResult) -> dict[tuple[str, str], dg.AssetCheckEvaluation]:
    return {(e.asset_key.to_user_string(), e.check_name): e
            for e in result.get_asset_check_evaluations()}


def test_definitions_validate_with_checks_sensors_and_pool():
    from pipeline.definitions import defs

    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    stages = load_stages(REPO)
    check_keys = {(k.asset_key, k.name) for k in graph.asset_check_keys}
    assert (asset_key("validate"), "gx_validation") in check_keys
    assert (asset_key("split"), "no_patient_leakage") in check_keys
    assert (asset_key("report"), "report_present") in check_keys
    evaluates = [n for n in stages if n.startswith("evaluate@")]
    assert {(asset_key(n), "quality_gate") for n in evaluates} <= check_keys
    blocking = {k.name for k in graph.asset_check_keys if graph.get_check_spec(k).blocking}
    assert blocking == {"gx_validation", "no_patient_leakage"}
    stage_keys = {asset_key(n) for n in stages}
    for key in stage_keys:  # DVC's repo lock: one stage at a time
        assert graph.get(key).pools == {POOL}, key
    # The one asset that is no DVC stage (live served cases): no DVC slot, not retrained.
    assert set(graph.get_all_asset_keys()) - stage_keys == {MONITORING_KEY}
    assert not graph.get(MONITORING_KEY).pools
    assert MONITORING_KEY not in defs.resolve_job_def("retrain").asset_layer.executable_asset_keys
    for name in ("data_source_changed", "record_run_failure", "new_ct_studies",
                 "retrain_on_evidence"):
        assert defs.resolve_sensor_def(name).default_status == dg.DefaultSensorStatus.STOPPED
    cron = yaml.safe_load((REPO / "params.yaml").read_text())["schedule"]["cron"]
    assert defs.resolve_schedule_def("weekly_retrain").cron_schedule == cron
    # Every pool gets one slot in the instance config that `make ui` copies to DAGSTER_HOME.
    config = yaml.safe_load((REPO / "pipeline/dagster.yaml").read_text())
    assert config["concurrency"]["pools"]["default_limit"] == 1


@pytest.mark.slow  # needs the repo_copy pipeline run
def test_materialisation_metadata_and_checks_come_from_the_stage_outputs(repo_copy):
    root, _ = repo_copy
    result = materialize(root)
    assert result.success
    stages = load_stages(root)
    # Dagster ran each stage once, every stage after the stages it depends on.
    assert sorted(CALLS) == sorted(stages)
    for name, stage in stages.items():
        assert all(CALLS.index(up) < CALLS.index(name) for up in stage.upstream), name
    meta = metadata(result)

    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    raw_md5 = next(o["md5"] for o in lock["ingest"]["outs"] if o["path"] == "data/raw")
    assert meta["ingest"]["md5 data/raw"] == raw_md5
    validation = json.loads((root / "reports/validation.json").read_text())
    assert meta["validate"]["ingested"] == validation["ingested"] > 0
    assert meta["validate"]["accepted"] + meta["validate"]["quarantined"] == validation["ingested"]
    assert meta["ingest"]["slices"] == validation["ingested"]
    split = json.loads((root / "data/splits/stats.json").read_text())
    for part in ("train", "val"):
        assert meta["split"][f"{part}_slices"] == split[part]["slices"]
        assert meta["split"][f"{part}_patients"] == len(split[part]["patients"])
    for model in yaml.safe_load((root / "params.yaml").read_text())["models"]:
        metrics = json.loads((root / f"reports/metrics/{model}.json").read_text())
        run = json.loads((root / f"models/{model}/run.json").read_text())
        ev = meta[f"evaluate_{model}"]
        assert (ev["fg_iou"], ev["best_epoch"]) == (metrics["fg_iou"], metrics["best_epoch"])
        assert ev["mlflow_run_id"] == meta[f"train_{model}"]["mlflow_run_id"] == run["run_id"]
        assert ev["mlflow_run"].endswith(f"/#/experiments/{run['experiment_id']}/runs/"
                                         f"{run['run_id']}")
        assert meta[f"train_{model}"]["epochs"] >= 1
        assert f"md5 reports/metrics/{model}.json" in ev  # matrix paths resolved
    comparison = json.loads((root / "reports/comparison.json").read_text())
    assert meta["compare"]["best_model"] == comparison["best_model"]
    assert meta["compare"]["comparison"].startswith("| model |")  # the Markdown table
    registry = json.loads((root / "reports/registry.json").read_text())
    assert (meta["register"]["version"], meta["register"]["alias"]) == (
        registry["version"], registry["alias"])
    assert meta["report"]["report"] == str(root / "reports/report.html")

    results = checks(result)
    assert results[("validate", "gx_validation")].passed
    assert results[("split", "no_patient_leakage")].passed
    assert results[("report", "report_present")].passed
    gates = [e for (_, name), e in results.items() if name == "quality_gate"]
    assert len(gates) == len(comparison["models"])
    assert all(e.passed for e in gates)  # tiny params: register.min_fg_iou is 0.0


def _tree(tmp_path, validation: dict, val_patients=("p2",)):
    """dvc.yaml/params.yaml of the repo plus planted validate and split outputs."""
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/validation.json").write_text(json.dumps(validation))
    (tmp_path / "data/splits").mkdir(parents=True)
    for part, patients in (("train", ("p0", "p1")), ("val", val_patients)):
        rows = "".join(f"{p}_0,{p}\n" for p in patients)
        (tmp_path / f"data/splits/{part}.csv").write_text("slice_id,patient_id\n" + rows)
    return tmp_path


def _validation(quarantined: int, n: int = 20, unattributed: bool = False) -> dict:
    """validation.json as the validate stage writes it; `unattributed`: a rule failed on
    the table as a whole, naming no slice."""
    bad = [f"p0_{i}" for i in range(quarantined)]
    failed = bool(bad) or unattributed
    return {"success": not failed, "policy": "quarantine",
            "ingested": n, "accepted": n - quarantined, "quarantined": quarantined,
            "quarantine": {s: ["image is not blank (std)"] for s in bad},
            "rules": [{"rule": "image is not blank (std)", "success": not failed,
                       "failing_slices": bad}]}


@pytest.mark.parametrize("case, validation, val_patients, ran", [
    # 5 of 20 quarantined > max_quarantine_fraction 0.1: the suite failed beyond policy.
    ("suite failed", _validation(5), ("p2",), ["source", "ingest", "validate"]),
    # A rule failed without naming slices: nothing could be quarantined.
    ("unattributed", _validation(0, unattributed=True), ("p2",),
     ["source", "ingest", "validate"]),
    # Patient p1 is in train and val.
    ("leakage", _validation(0), ("p1", "p2"), ["source", "ingest", "validate", "split"]),
])
def test_a_failing_blocking_check_stops_everything_downstream(tmp_path, case, validation,
                                                              val_patients, ran):
    result = materialize(_tree(tmp_path, validation, val_patients), raise_on_error=False)
    assert not result.success, case
    assert CALLS == ran, case  # nothing downstream of the failed check ran
    failed = [e for e in checks(result).values() if not e.passed]
    assert len(failed) == 1 and failed[0].severity == dg.AssetCheckSeverity.ERROR
    assert failed[0].asset_key == asset_key(ran[-1])
    materialized = {e.asset_key for e in result.get_asset_materialization_events()}
    assert materialized == {asset_key(n) for n in ran}


def test_quarantine_within_policy_warns_and_lets_the_pipeline_continue(tmp_path):
    # 1 of 20 quarantined <= 0.1: the suite failed on one slice, which is held back.
    result = materialize(_tree(tmp_path, _validation(1)), raise_on_error=False)
    evaluation = checks(result)[("validate", "gx_validation")]
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
    assert "split" in CALLS and "report" in CALLS


def _sensor_tick(root, cursor):
    context = dg.build_sensor_context(cursor=cursor,
                                      resources={"dvc": DvcResource(repo_root=str(root))})
    result = data_source_sensor(context)
    return result, context.cursor


def test_data_source_sensor_fires_on_changed_files_and_not_otherwise(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] |= {"source": "folder", "path": "incoming"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "incoming/images").mkdir(parents=True)
    (tmp_path / "incoming/images/a_0.png").write_bytes(b"a")

    first, cursor = _sensor_tick(tmp_path, None)  # first tick records, does not fire
    assert isinstance(first, dg.SkipReason) and cursor
    unchanged, same = _sensor_tick(tmp_path, cursor)
    assert isinstance(unchanged, dg.SkipReason) and same == cursor

    (tmp_path / "incoming/images/b_0.png").write_bytes(b"b")  # a new file
    fired, cursor2 = _sensor_tick(tmp_path, cursor)
    assert isinstance(fired, dg.RunRequest) and cursor2 != cursor
    assert fired.tags["liverseg/data_fingerprint"] == source_fingerprint(tmp_path)
    again, _ = _sensor_tick(tmp_path, cursor2)
    assert isinstance(again, dg.SkipReason)

    (tmp_path / "incoming/images/b_0.png").write_bytes(b"bigger")  # a changed file
    changed, cursor3 = _sensor_tick(tmp_path, cursor2)
    assert isinstance(changed, dg.RunRequest) and changed.run_key != fired.run_key

    params["data"] |= {"source": "phantom", "path": None}  # the phantom: params only
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    _, cursor4 = _sensor_tick(tmp_path, cursor3)
    params["data"]["phantom"]["patients"] += 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert isinstance(_sensor_tick(tmp_path, cursor4)[0], dg.RunRequest)


def test_the_data_sensor_waits_for_min_new_labels_labelled_cases(tmp_path):
    """retrain.min_new_labels 2: one new image/mask pair (a new patient's case) is not
    enough, an image without a mask is no labelled case, a second pair starts the run and
    its tags say how many arrived; a relabelled case (its mask changed) counts again."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] |= {"source": "folder", "path": "incoming"}
    params["retrain"] = {"min_new_labels": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    incoming = tmp_path / "incoming"

    def pair(patient: str, mask: bytes = b"m") -> None:
        (incoming / "images" / f"{patient}_0.png").write_bytes(b"i")
        (incoming / "masks" / f"{patient}_0.png").write_bytes(mask)

    (incoming / "images").mkdir(parents=True)
    (incoming / "masks").mkdir()
    pair("p1")
    _, cursor = _sensor_tick(tmp_path, None)
    pair("p2")
    (incoming / "images/p9_0.png").write_bytes(b"no mask")
    waiting, cursor = _sensor_tick(tmp_path, cursor)
    assert isinstance(waiting, dg.SkipReason)
    assert "1 labelled case(s)" in waiting.skip_message and "p2" in waiting.skip_message
    pair("p3")
    fired, cursor = _sensor_tick(tmp_path, cursor)
    assert isinstance(fired, dg.RunRequest)
    assert fired.tags["liverseg/evidence"].startswith("2 labelled case(s)")
    assert trigger(fired.tags).startswith("data_source_changed: 2 labelled case(s)")
    pair("p4")
    (incoming / "masks/p1_0.png").write_bytes(b"corrected")  # p1 relabelled
    again, _ = _sensor_tick(tmp_path, cursor)
    assert isinstance(again, dg.RunRequest) and again.tags["liverseg/evidence"].startswith("2 ")


def test_run_failure_sensor_appends_a_json_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))

    @dg.op
    def breaks():
        raise RuntimeError("planted failure")

    @dg.job
    def fragile():
        breaks()

    instance = dg.DagsterInstance.ephemeral()
    result = fragile.execute_in_process(instance=instance, raise_on_error=False)
    record_failure(instance, result)
    lines = (tmp_path / "failures.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["run_id"] == result.run_id and record["job"] == "fragile"
    assert "planted failure" in record["failed_steps"]["breaks"]


def test_resources_come_from_environment_variables(monkeypatch):
    monkeypatch.setenv("LIVERSEG_DVC_REMOTE", "s3store")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    monkeypatch.delenv("LIVERSEG_REPO_ROOT", raising=False)
    resources = resources_from_env()
    dvc = resources["dvc"].process_config_and_initialize()
    mlflow = resources["mlflow"].process_config_and_initialize()
    assert dvc.remote == "s3store" and dvc.repo_root == str(REPO)
    assert mlflow.env() == {"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000"}
    assert mlflow.browser_url() == "http://mlflow.internal:5000"  # the server is the UI
    local = resources_from_env({})["mlflow"]
    assert local.env() == {} and local.browser_url() == "http://127.0.0.1:5000"


def test_dvc_resource_pulls_runs_and_pushes_with_a_remote(tmp_path):
    fake = tmp_path / "dvc"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n'
                    '[ "$1" != repro ] || [ "$3" != broken ] || exit 3\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    log = dg.get_dagster_logger()
    DvcResource(repo_root=str(tmp_path), executable=str(fake)).repro("split", {}, log)
    DvcResource(repo_root=str(tmp_path), executable=str(fake),
                remote="store").repro("train@pan", {}, log)
    assert (tmp_path / "calls").read_text().splitlines() == [
        "repro --single-item split",
        "pull --allow-missing -r store train@pan",
        "repro --single-item train@pan",
        "push -r store train@pan",
    ]
    with pytest.raises(dg.Failure, match="exit code 3"):
        DvcResource(repo_root=str(tmp_path), executable=str(fake),
                    remote="store").repro("broken", {}, log)
    # The failed stage was run, and nothing after it: its outputs are never pushed.
    assert (tmp_path / "calls").read_text().splitlines()[4:] == [
        "pull --allow-missing -r store broken",
        "repro --single-item broken",
    ]


def test_schedule_evaluates_to_a_run_of_the_whole_pipeline():
    from pipeline.definitions import defs

    schedule = defs.resolve_schedule_def("weekly_retrain")
    context = dg.build_schedule_context(scheduled_execution_time=None)
    requests = schedule.evaluate_tick(context).run_requests
    assert len(requests) == 1
    assert schedule.job_name == "retrain"
    job = defs.resolve_job_def("retrain")
    stages = load_stages(REPO)
    assert set(job.asset_layer.executable_asset_keys) == {asset_key(n) for n in stages}
    # ... and its checks, so a scheduled run is stopped by a blocking check too.
    assert {"validate_gx_validation", "split_no_patient_leakage"} <= set(job.graph.node_dict)
