"""The loop after deployment, end to end against a real Orthanc (issue 34's "Done when"):
CT studies with clinicians' SEGs in the archive train and register a champion (`dvc repro`
of a repository copy whose data is the archive); the PACS job serves a new study (the SEG
goes back into the archive, a monitoring row with hashed UIDs and no patient identity
appears); a clinician's correction of that SEG (MANUAL, another creator, a later
ContentDate) is stored; the data sensor sees it and requests a run; the `retrain` job's
assets, run with that request's tags, ingest the series as `corrected`, measure the
correction on the model SEG's row, retrain, and register records the gate's decision, the
champion re-scored on the new split and the trigger, which `liverseg lineage` shows; a
second tick with nothing new starts nothing; the `served_cases` asset's `corrections`
check reports the correction measured against the champion that made the SEG."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
from pathlib import Path

import dagster as dg
import highdicom as hd
import pydicom
import pytest

from liverseg.data.layout import read_index
from liverseg.dicom import series as dicom
from liverseg.dicom import web
from liverseg.monitoring.facts import hash_uid
from liverseg.monitoring.store import ServedCaseStore
from pipeline.assets import build_assets, trigger
from pipeline.pacs import segment_study_job
from pipeline.resources import DvcResource, MlflowResource, MonitoringResource, PacsResource
from pipeline.sensors import data_source_sensor
from tests.dicom_labels_data import label_on_frames, write_seg_highdicom
from tests.helpers import (
    SHARED_DATA,
    copy_repository,
    repo_env,
    sh,
    stages_run,
    tiny_raw_params,
    tracking_uri,
)
from tests.test_dicom_archive import Study, _write_study, stow
from tests.test_pacs import orthanc  # noqa: F401 -- the fixture, shared

# 12-slice slabs of lits-117, each its own patient. The ids place them by the stable split
# (seed 7): PT-LOOP-4 in test (position 0.085 < test_fraction), PT-LOOP-8 in validation,
# PT-LOOP-1 and the served PT-LOOP-2 in train, so the corrected series is trained on.
TRAINED = {"PT-LOOP-1": slice(60, 72), "PT-LOOP-8": slice(88, 100), "PT-LOOP-4": slice(40, 52)}
SERVED = ("PT-LOOP-2", slice(76, 88))
CHAMPION_SEG = "liverseg enhanced_pan 1"  # the SeriesDescription of v1's SEGs


def _data(tmp_path_factory) -> Path:
    if not SHARED_DATA.is_dir():
        if os.environ.get("LIVERSEG_REQUIRE_SHARED_DATA"):
            pytest.fail(f"{SHARED_DATA} is missing but LIVERSEG_REQUIRE_SHARED_DATA is set")
        pytest.skip("../shared/data not present")
    return tmp_path_factory.mktemp("loop-studies")


def _tick(instance, root: Path, cursor: str | None):
    """One evaluation of the data sensor over the repository copy: (its result, the cursor
    it leaves)."""
    context = dg.build_sensor_context(instance=instance, cursor=cursor,
                                      resources={"dvc": DvcResource(repo_root=str(root))})
    return data_source_sensor(context), context.cursor


def _model_seg(url: str, study: Study):
    """The SEG liverseg stored into the study (the only SEG there)."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url)
    segs = [s for s in client.search_for_series(study.study_uid)
            if s["00080060"]["Value"] == ["SEG"]]
    assert len(segs) == 1, segs
    (seg,) = client.retrieve_series(study.study_uid, segs[0]["0020000E"]["Value"][0])
    return seg


def _later(seg) -> tuple[str, str]:
    """A ContentDate/Time one day after the model SEG's."""
    day = datetime.datetime.strptime(str(seg.ContentDate), "%Y%m%d") + datetime.timedelta(1)
    return day.strftime("%Y%m%d"), "093000"


@pytest.mark.slow
def test_served_corrected_and_retrained_on_the_evidence_with_the_gate_on_record(
        orthanc, tmp_path_factory, tmp_path, monkeypatch):  # noqa: F811
    started = time.time()
    url = f"{orthanc.url}/dicom-web"
    data = _data(tmp_path_factory)
    for patient, slab in TRAINED.items():
        stow(url, _write_study(data / patient, slab, patient))
    root = tmp_path / "repo"
    root.mkdir()
    copy_repository(root, tiny_raw_params(
        data={"source": "dicom", "target": "liver", "dicom": {"url": url}},
        split={"test_fraction": 0.09}))
    uri = tracking_uri(root)
    env = repo_env(DAGSTER_HOME=str(root / ".dagster_home"), MLFLOW_TRACKING_URI=uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    # 1. the archive's studies train and register the first champion
    first = stages_run(sh(["dvc", "repro"], root, env))
    assert {"source", "ingest", "train@enhanced_pan", "register"} <= set(first)
    registry = json.loads((root / "reports/registry.json").read_text())
    assert (registry["version"], registry["alias"]) == (1, "champion")
    instance = dg.DagsterInstance.ephemeral()
    seen, cursor = _tick(instance, root, None)  # the first tick records the source as it is
    assert isinstance(seen, dg.SkipReason) and "recorded" in seen.skip_message
    print(f"step 1 (train, register v1): {time.time() - started:.0f} s")
    step = time.time()

    # 2. the PACS job serves a new study, no label yet: its SEG goes back into the archive
    patient, slab = SERVED
    served = _write_study(data / patient, slab, patient)  # its seg.dcm stays out of the archive
    web.connect(url).store_instances([pydicom.dcmread(f) for f in
                                      sorted((served.folder / "ct").iterdir())])
    store_dir = tmp_path / "monitoring"
    instance.add_dynamic_partitions("ct_studies", [served.study_uid])
    job = segment_study_job.execute_in_process(
        partition_key=served.study_uid, instance=instance, resources={
            "pacs": PacsResource(url=url, out_dir=str(tmp_path / "pacs")),
            "mlflow": MlflowResource(tracking_uri=uri),
            "monitoring": MonitoringResource(directory=str(store_dir))})
    meta = job.output_for_node("segment_one_study")
    assert meta["model_version"] == "1" and len(meta["seg_sop_instance_uids"]) == 1
    model_seg = _model_seg(url, served)
    assert str(model_seg.SOPInstanceUID) == meta["seg_sop_instance_uids"][0]
    assert model_seg.Manufacturer == "liverseg" and model_seg.SeriesDescription == CHAMPION_SEG
    rows = ServedCaseStore(store_dir).read()
    assert len(rows) == 1
    row = rows.iloc[0]
    assert (row["kind"], row["model_name"], str(row["model_version"])) == (
        "dicom", "enhanced_pan", "1")
    assert row["model_ref"] == "models:/liverseg@champion" and row["slices"] == len(served.ct_uids)
    assert row["study_uid_hash"] == hash_uid(served.study_uid)
    assert row["series_uid_hash"] == hash_uid(served.series_uid)
    stored = b"".join(p.read_bytes() for p in store_dir.rglob("*") if p.is_file())
    for secret in (patient, f"Test^{patient}", served.study_uid, served.series_uid):
        assert secret.encode() not in stored, f"{secret} in the served-case store"

    # 3. a clinician corrects it: the true liver, MANUAL, another creator, a day later
    (series,) = dicom.find_series(sorted((served.folder / "ct").iterdir())).series
    _, datasets = dicom.load_series(series)
    truth = label_on_frames(served.folder / "segmentation-117.nii.gz", datasets)
    correction = write_seg_highdicom(datasets, truth, tmp_path / "corrected.dcm",
                                     content_creator="Smith^Anna", content_time=_later(model_seg),
                                     description="Liver (corrected)")
    web.connect(url).store_instances([pydicom.dcmread(correction)])
    sources = [d.SOPInstanceUID for d in datasets]
    predicted = hd.seg.Segmentation.from_dataset(model_seg).get_pixels_by_source_instance(
        sources, combine_segments=True) > 0
    human = truth > 0
    dice = 2 * (predicted & human).sum() / (predicted.sum() + human.sum())
    spacing = [float(v) for v in datasets[0].PixelSpacing]
    thickness = abs(float(datasets[1].ImagePositionPatient[2])
                    - float(datasets[0].ImagePositionPatient[2]))
    ml = (int(human.sum()) - int(predicted.sum())) * spacing[0] * spacing[1] * thickness / 1000

    print(f"steps 2-3 (serve, correct): {time.time() - step:.0f} s")
    step = time.time()

    # 4. the data sensor sees it; the retrain job's assets run with the request's tags
    request, cursor = _tick(instance, root, cursor)
    assert isinstance(request, dg.RunRequest), request
    assert request.tags["liverseg/trigger"] == "data_source_changed"
    retrain = dg.materialize(
        build_assets(root), instance=instance, tags=request.tags, resources={
            "dvc": DvcResource(repo_root=str(root)), "mlflow": MlflowResource(tracking_uri=uri)})
    assert retrain.success
    index = read_index(root / "data/raw")
    of_series = index[index["series_uid"] == served.series_uid]
    slices = of_series[of_series["image"] != ""]
    assert len(slices) and set(slices["origin"]) == {"corrected"}
    assert set(slices["label_uid"]) == {str(pydicom.dcmread(correction).SOPInstanceUID)}
    (model_row,) = of_series[of_series["label_uid"] == str(model_seg.SOPInstanceUID)].itertuples()
    assert model_row.origin == "model"
    assert model_row.corrected_by == str(pydicom.dcmread(correction).SOPInstanceUID)
    assert json.loads(model_row.label_creator)["SeriesDescription"] == CHAMPION_SEG
    assert float(model_row.correction_dice) == pytest.approx(dice, abs=1e-5)
    assert float(model_row.correction_ml) == pytest.approx(ml, abs=0.01)
    assert abs(ml) > 0 or dice < 1  # the clinician changed something: not vacuous

    lineage = subprocess.run(["liverseg", "lineage", "models:/liverseg/2", "--json"], cwd=root,
                             env=env, capture_output=True, text=True, timeout=300)
    assert lineage.returncode == 0, lineage.stderr
    trail = json.loads(lineage.stdout)
    # The correction is the one labelled arrival (retrain.min_new_labels 1, the default).
    assert trail["retrain_trigger"] == trigger(request.tags) == (
        "data_source_changed: 1 labelled case(s) new or relabelled (retrain.min_new_labels 1)")
    gate = trail["quality_gate"]
    assert gate.startswith(("passed: ", "failed: ")) and "champion v1" in gate
    assert "re-scored on this split" in gate
    assert (gate.startswith("passed") and trail["alias"] == ["champion"]) or (
        gate.startswith("failed") and trail["alias"] == ["challenger"]
        and trail["gate_reason"] == gate)
    rescored = trail["gate_champion_rescored"]
    assert rescored["version"] == 1 and rescored["recorded_split"] != trail["data_hashes"][
        "data_splits_md5"]
    assert set(trail["gate_test_fg_iou"]) == {"candidate", "champion"}
    labels = trail["training_labels"]
    assert labels["train"]["origins"] == {"corrected": 1, "human": 1}
    assert labels["train"]["studies"] == 2 and labels["val"]["studies"] == 1
    assert labels["test"]["studies"] == 1

    print(f"step 4 (sensor, retrain, lineage): {time.time() - step:.0f} s; correction Dice "
          f"{dice:.3f}, {ml:+.1f} mL; v2 {trail['alias']}: {gate}")

    # 5. a second tick with nothing new starts nothing
    again, _ = _tick(instance, root, cursor)
    assert isinstance(again, dg.SkipReason) and "unchanged" in again.skip_message

    # 6. the monitoring asset's corrections check: the correction measured against v1
    from pipeline.monitoring import served_cases

    checked = dg.materialize([served_cases], instance=instance, resources={
        "mlflow": MlflowResource(tracking_uri=uri), "dvc": DvcResource(repo_root=str(root)),
        "monitoring": MonitoringResource(directory=str(store_dir), model="models:/liverseg/1")})
    (check,) = [e for e in checked.get_asset_check_evaluations() if e.check_name == "corrections"]
    assert check.metadata["corrections"].value == 1
    assert check.metadata["rolling_dice"].value == pytest.approx(dice, abs=1e-5)
    print(f"the loop end to end: {time.time() - started:.0f} s")
