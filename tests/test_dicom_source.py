"""The `dicom` data source: CT series labelled by SEG or RTSTRUCT become cases that hold the
same slices and labels as the NIfTI they were written from, and every label object is an
outcome that validate counts (accepted, quarantined by its rule, or superseded), with its
origin: a model's own SEG is never a training target."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from liverseg import casestore
from liverseg.artifacts import Artifacts
from liverseg.config import parse_params
from liverseg.data.layout import read_index
from liverseg.dicom import seg_writer
from liverseg.dicom import series as dicom
from liverseg.stages import ingest, validate
from tests.dicom_labels_data import (
    BONE_CODE,
    label_on_frames,
    write_rtstruct,
    write_seg_dcmqi,
    write_seg_highdicom,
)
from tests.dicom_series import write_series
from tests.helpers import SHARED_DATA, tiny_raw_params

SLAB = slice(88, 100)  # 12 slices with liver and tumour


@pytest.fixture(scope="module")
def lits(tmp_path_factory) -> dict:
    """A 12-slice crop of lits-117 as NIfTI (volume + segmentation) and as a CT series."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present") if not os.environ.get(
            "LIVERSEG_REQUIRE_SHARED_DATA") else pytest.fail("../shared/data is missing")
    root = tmp_path_factory.mktemp("dicom-source")
    nifti = root / "nifti"
    nifti.mkdir()
    for name in ("volume-117.nii.gz", "segmentation-117.nii.gz"):
        nib.save(nib.load(str(SHARED_DATA / "lits-117" / name)).slicer[:, :, SLAB],
                 str(nifti / name))
    series_dir = root / "ct"
    files = write_series(nifti / "volume-117.nii.gz", series_dir)
    (series,) = dicom.find_series(files).series
    _, datasets = dicom.load_series(series)
    labels = label_on_frames(nifti / "segmentation-117.nii.gz", datasets)
    assert (labels == 2).any() and (labels == 1).any()
    return {"root": root, "nifti": nifti, "series_dir": series_dir, "datasets": datasets,
            "labels": labels}


def _ingest(root: Path, **data) -> tuple[dict, pd.DataFrame]:
    params = parse_params(tiny_raw_params(
        data={"target": "liver_tumour", "nifti": {"slices": "all"}} | data,
        model={"num_classes": 3}, validate={"max_quarantine_fraction": 0.5}))
    summary = ingest.run(params, root)
    return summary, read_index(root / "data/raw")


def _stored(root: Path, index: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    rows = index[index["image"] != ""].sort_values("slice_index")
    raw = root / "data/raw"
    return (np.stack([casestore.read(raw, r, "image") for r in rows["image"]]),
            np.stack([casestore.read(raw, r, "mask") for r in rows["mask"]]))


def _study(lits: dict, tmp_path: Path) -> Path:
    """A folder holding the CT series (hard links), for labels to be added beside it."""
    study = tmp_path / "study"
    (study / "ct").mkdir(parents=True)
    for f in lits["series_dir"].iterdir():
        os.link(f, study / "ct" / f.name)
    return study


@pytest.mark.parametrize("writer", ["highdicom", "fractional", "labelmap", "dcmqi", "rtstruct"])
def test_a_labelled_series_is_the_nifti_case_slice_for_slice(lits, tmp_path, writer):
    """The case a SEG (highdicom BINARY, FRACTIONAL at its threshold, LABELMAP; dcmqi's) makes
    of the series holds exactly the slices and labels the NIfTI source makes of the volume
    it was written from: windowed as predict windows the series. An RTSTRUCT's rasterised
    contours reach Dice >= 0.98 on every slice with tumour."""
    study = _study(lits, tmp_path)
    label = study / "label.dcm"
    if writer == "dcmqi":
        write_seg_dcmqi(lits["series_dir"], lits["nifti"] / "segmentation-117.nii.gz", label)
    elif writer == "rtstruct":
        write_rtstruct(lits["series_dir"], lits["datasets"], lits["labels"], label)
    else:
        kind = {"highdicom": "BINARY", "fractional": "FRACTIONAL", "labelmap": "LABELMAP"}
        write_seg_highdicom(lits["datasets"], lits["labels"], label, kind=kind[writer])
    from_nifti = _stored(tmp_path / "n", _ingest(tmp_path / "n", source="nifti",
                                                  path=str(lits["nifti"]))[1])
    summary, index = _ingest(tmp_path / "d", source="dicom", path=str(study))
    from_dicom = _stored(tmp_path / "d", index)
    assert summary["cases"]["total"] == 1 and summary["labelled_series"] == 1
    np.testing.assert_array_equal(from_dicom[0], from_nifti[0])  # the windowed slices
    tumour_slices = [k for k in range(len(from_nifti[1])) if (from_nifti[1][k] == 255).any()]
    assert len(tumour_slices) >= 3
    if writer != "rtstruct":
        np.testing.assert_array_equal(from_dicom[1], from_nifti[1])
        return
    for k in tumour_slices:
        for value in (128, 255):  # liver, tumour (labels.encode of 3 classes)
            got, want = from_dicom[1][k] >= value, from_nifti[1][k] >= value
            dice = 2 * (got & want).sum() / (got.sum() + want.sum())
            assert dice >= 0.98, (k, value, dice)


def _liverseg_seg(lits: dict, path: Path, when: str, mask: np.ndarray | None = None) -> None:
    """liverseg predict's own SEG of the series (the liver, or `mask`), as if written at
    `when`."""
    mask = (lits["labels"] > 0) if mask is None else mask
    seg_writer.write_seg(path, lits["datasets"], mask.astype(np.uint8),
                         ("background", "liver"), "enhanced_pan", "liverseg enhanced_pan 3")
    ds = pydicom.dcmread(path)
    ds.ContentDate, ds.ContentTime = when.split()
    ds.save_as(path)


@pytest.mark.slow  # ingest and validate (GX)
def test_every_label_object_has_an_origin_and_one_outcome(lits, tmp_path):
    """On one series: liverseg's SEG (model, not a target), another vendor's AUTOMATIC SEG
    (model), a segment named Bone (no class), an older human SEG (after the model's, so a
    correction, but superseded) and the latest human SEG, which the slices carry. Counts
    reconcile: ingested = accepted + quarantined + superseded."""
    study, labels = _study(lits, tmp_path), lits["labels"]
    missed = labels > 0
    missed[:2] = False  # the model missed the liver on two slices; the clinician drew it
    _liverseg_seg(lits, study / "model.dcm", "20260101 090000", missed)
    write_seg_highdicom(lits["datasets"], labels, study / "vendor.dcm", algorithm="AUTOMATIC",
                        manufacturer="OtherAI", content_time=("20260101", "091000"))
    write_seg_highdicom(lits["datasets"], labels, study / "bone.dcm",
                        segments=[("Bone", BONE_CODE, labels > 0)],
                        content_time=("20260103", "080000"))
    older = np.where(labels == 2, 1, labels)  # the tumour not yet drawn
    write_seg_highdicom(lits["datasets"], older, study / "older.dcm",
                        content_time=("20260101", "100000"))
    write_seg_highdicom(lits["datasets"], labels, study / "latest.dcm",
                        content_time=("20260102", "101500"), content_creator="Roe^Rita")
    root = tmp_path / "w"
    summary, index = _ingest(root, source="dicom", path=str(study))
    uid = {name: str(pydicom.dcmread(study / f"{name}.dcm").SOPInstanceUID)
           for name in ("model", "vendor", "bone", "older", "latest")}
    slices = index[index["image"] != ""]
    assert len(slices) == len(labels)
    assert set(slices["label_uid"]) == {uid["latest"]} and set(slices["origin"]) == {"corrected"}
    assert "Roe^Rita" in slices["label_creator"].iloc[0]
    assert (_stored(root, index)[1] == 255).any()  # the latest one's tumour, not the older's
    by_uid = index[index["image"] == ""].set_index("label_uid")
    assert by_uid.loc[uid["model"], "origin"] == "model"
    # The correction's size, on the model's row: Dice and mL against the winning label.
    truth = labels > 0
    dice = 2 * (missed & truth).sum() / (missed.sum() + truth.sum())
    ds = lits["datasets"][0]
    step = abs(float(lits["datasets"][1].ImagePositionPatient[2]) - float(
        ds.ImagePositionPatient[2]))
    voxel_ml = float(ds.PixelSpacing[0]) * float(ds.PixelSpacing[1]) * step / 1000
    model_row = by_uid.loc[uid["model"]]
    assert 0.5 < dice < 1 and float(model_row["correction_dice"]) == pytest.approx(dice, abs=1e-5)
    assert float(model_row["correction_ml"]) == pytest.approx(
        (truth.sum() - missed.sum()) * voxel_ml, rel=1e-3)
    assert model_row["corrected_by"] == uid["latest"]
    assert by_uid.loc[uid["vendor"], "origin"] == "model"
    assert by_uid.loc[uid["older"], "label_status"] == "superseded"
    assert not by_uid.loc[uid["bone"], "label_mapped"]

    params = parse_params(tiny_raw_params(
        data={"source": "dicom", "path": str(study), "target": "liver_tumour"},
        model={"num_classes": 3}, validate={"max_quarantine_fraction": 0.5}))
    checked = validate.run(params, root)
    report = json.loads(Artifacts(root).validation.read_text())
    assert (checked["ingested"], checked["accepted"], checked["quarantined"],
            checked["superseded"]) == (len(labels) + 4, len(labels), 3, 1)
    assert report["reconciles"]
    rules: dict[str, set] = {}
    for q in report["quarantine_files"]:
        rules.setdefault(q["path"], set()).add(q["rule"])
    origin_rule = {"label origin allowed for training"}
    assert rules[str(study / "model.dcm")] == rules[str(study / "vendor.dcm")] == origin_rule
    assert "label classes mapped" in rules[str(study / "bone.dcm")]
    assert set(rules) == {str(study / f"{n}.dcm") for n in ("model", "vendor", "bone")}


def test_a_series_labelled_only_by_the_model_trains_nothing_until_a_human_label_arrives(
        lits, tmp_path):
    """predict's own SEG alone: no slice is stored, one quarantined row. A human SEG added
    later for the same series makes it `corrected` and its slices used."""
    study = _study(lits, tmp_path)
    _liverseg_seg(lits, study / "model.dcm", "20260101 090000")
    summary, index = _ingest(tmp_path / "w", source="dicom", path=str(study))
    assert (index["image"] != "").sum() == 0
    assert index["origin"].tolist() == ["model"]
    write_seg_highdicom(lits["datasets"], lits["labels"], study / "human.dcm")
    summary, index = _ingest(tmp_path / "w", source="dicom", path=str(study))
    used = index[index["image"] != ""]
    assert len(used) == len(lits["labels"]) and set(used["origin"]) == {"corrected"}


@pytest.mark.slow  # every data stage
def test_the_split_names_the_studies_and_label_instances_each_side_used(lits, tmp_path):
    """Two patients' series, each with a human SEG: every series of a patient lands on one
    side, and the split's stats (which register tags and logs for lineage) name exactly the
    studies and label instances of each side."""
    from liverseg.stages import run_data_stages
    from liverseg.stages.register import training_labels

    study = tmp_path / "export"
    uids = {}
    for patient in ("P1", "P2"):
        files = write_series(lits["nifti"] / "volume-117.nii.gz", study / patient / "ct")
        for f in files:  # another patient: own PatientID, HU 1 higher (no duplicate slices)
            ds = pydicom.dcmread(f)
            ds.PatientID, ds.RescaleIntercept = patient, ds.RescaleIntercept + (patient == "P2")
            ds.save_as(f)
        (series,) = dicom.find_series(files).series
        _, datasets = dicom.load_series(series)
        seg = write_seg_highdicom(datasets, lits["labels"], study / patient / "seg.dcm")
        uids[patient] = (series.study_uid, str(pydicom.dcmread(seg).SOPInstanceUID))
    params = parse_params(tiny_raw_params(
        data={"source": "dicom", "path": str(study), "target": "liver"},
        split={"val_fraction": 0.5}, validate={"fg_fraction": [0.0, 1.0]}))
    cwd = Path.cwd()
    try:
        os.chdir(tmp_path)
        run_data_stages(params)
    finally:
        os.chdir(cwd)
    stats = json.loads(Artifacts(tmp_path).split_stats.read_text())
    sides = {name: stats[name]["patients"] for name in ("train", "val")}
    assert sorted(sides["train"] + sides["val"]) == ["P1", "P2"]
    for name, (patient,) in sides.items():
        assert stats[name]["studies"] == [uids[patient][0]]
        assert stats[name]["label_instances"] == [uids[patient][1]]
        assert stats[name]["label_origins"] == {"human": 1}
    summary = training_labels(stats)["summary"]
    assert summary["train"]["label_instances"] == summary["val"]["label_instances"] == 1
