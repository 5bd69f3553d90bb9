"""Two defects of the series reader found on real scanner exports, reproduced: an export's
"Exam Summary" series (Modality CT, Secondary Capture, DERIVED/SECONDARY, some instances
without ImageOrientationPatient) is a skipped row saying what it is, for `liverseg predict`
and the `dicom` data source alike, never `AttributeError`; and an anonymised source with
PatientIdentityRemoved YES and an empty DeidentificationMethod gives a SEG that dciodvfy
finds no error in."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from liverseg.config import parse_params
from liverseg.dicom import seg_writer
from liverseg.dicom import series as dicom
from liverseg.serving import predict
from liverseg.stages import ingest
from tests.dicom_labels_data import label_on_frames, write_seg_highdicom
from tests.dicom_series import write_series
from tests.helpers import SHARED_DATA, tiny_raw_params
from tests.test_dicom import _dciodvfy_clean

SLAB = slice(88, 100)


@pytest.fixture(scope="module")
def crop(tmp_path_factory) -> Path:
    """A 12-slice slab of lits-117: volume and segmentation."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("LIVERSEG_REQUIRE_SHARED_DATA"):
            pytest.fail(f"{SHARED_DATA} is missing but LIVERSEG_REQUIRE_SHARED_DATA is set")
        pytest.skip("../shared/data not present")
    root = tmp_path_factory.mktemp("defects")
    for name in ("volume-117.nii.gz", "segmentation-117.nii.gz"):
        nib.save(nib.load(str(SHARED_DATA / "lits-117" / name)).slicer[:, :, SLAB],
                 str(root / name))
    return root


@pytest.fixture
def model_dir(registered_template) -> str:
    return str(registered_template / "models/enhanced_pan")


def _exam_summary(ct: list[Path], folder: Path) -> list[Path]:
    """Three pages of a scanner's "Exam Summary" series in the CT's study: Modality CT,
    Secondary Capture, ImageType DERIVED/SECONDARY; pages 1 and 2 have no
    ImageOrientationPatient (nor position), page 0 has the slice geometry it was drawn on."""
    folder.mkdir(parents=True)
    series, paths = generate_uid(), []
    for page in range(3):
        ds = pydicom.dcmread(ct[page])
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = series, 999, page + 1
        ds.SeriesDescription, ds.ImageType = "Exam Summary", ["DERIVED", "SECONDARY"]
        ds.ConversionType = "WSD"
        if page:
            del ds.ImageOrientationPatient, ds.ImagePositionPatient
        paths.append(folder / f"SC{page}")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def _unplaced_ct(ct: list[Path], folder: Path) -> Path:
    """A CT Image Storage instance of its own series without ImageOrientationPatient."""
    folder.mkdir(parents=True)
    ds = pydicom.dcmread(ct[0])
    ds.SeriesInstanceUID, ds.SeriesNumber = generate_uid(), 998
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    del ds.ImageOrientationPatient
    ds.save_as(folder / "IM0", enforce_file_format=True)
    return folder / "IM0"


@pytest.fixture
def export(crop, tmp_path) -> dict:
    """A scanner export: the CT series, its Exam Summary and an unplaced CT instance."""
    root = tmp_path / "export"
    ct = write_series(crop / "volume-117.nii.gz", root / "ct")
    return {"root": root, "ct": ct, "summary": _exam_summary(ct, root / "summary"),
            "unplaced": _unplaced_ct(ct, root / "unplaced")}


def test_an_exam_summary_series_is_a_skipped_row_for_predict(export, model_dir, tmp_path):
    summary = predict.run(model_dir, [export["root"]], tmp_path / "out")
    rows = pd.read_csv(tmp_path / "out/predictions.csv")
    assert "AttributeError" not in rows.to_csv()
    assert (summary["done"], summary["skipped"], summary["refused"]) == (1, 4, 0)
    assert rows[rows.status == "done"].iloc[0]["slices"] == len(export["ct"])
    skipped = rows[rows.status == "skipped"].set_index("input")["reason"]
    for page in export["summary"]:
        assert "secondary capture (DERIVED/SECONDARY" in skipped[str(page)]
    assert "no ImageOrientationPatient" in skipped[str(export["unplaced"])]


def test_an_exam_summary_series_is_skipped_by_the_dicom_source(export, crop, tmp_path,
                                                               monkeypatch):
    """The data source reads the same export with a human SEG of the CT series: the real
    series is the one case, the summary pages and the unplaced instance are skipped files."""
    found = dicom.find_series(sorted(p for p in export["root"].rglob("*") if p.is_file()))
    assert [s.files for s in found.series] == [sorted(export["ct"])] and not found.refused
    why = dict(found.skipped)
    assert all("secondary capture" in why[p] for p in export["summary"])
    assert "no ImageOrientationPatient" in why[export["unplaced"]]

    _, datasets = dicom.load_series(found.series[0])
    labels = label_on_frames(crop / "segmentation-117.nii.gz", datasets)
    write_seg_highdicom(datasets, labels, export["root"] / "seg.dcm")
    monkeypatch.chdir(tmp_path)
    params = parse_params(tiny_raw_params(data={"source": "dicom", "path": str(export["root"]),
                                                "target": "liver"}))
    done = ingest.run(params)
    assert (done["skipped_files"], done["series"], done["labelled_series"]) == (4, 1, 1)
    assert done["slices"] == len(export["ct"]) and "items_not_ingested" not in done


def _anonymised(crop: Path, folder: Path) -> list[Path]:
    """A gantry-tilted, irregularly spaced GE series an anonymiser left with
    PatientIdentityRemoved YES and an empty DeidentificationMethod."""
    files = write_series(crop / "volume-117.nii.gz", folder, tilt_degrees=12)
    by_position = sorted(files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    for f in by_position[5:7]:  # irregular too
        f.unlink()
        files.remove(f)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.Manufacturer, ds.PatientName, ds.PatientID = "GE MEDICAL SYSTEMS", "ANON", "ANON01"
        ds.PatientIdentityRemoved, ds.DeidentificationMethod = "YES", ""
        ds.save_as(f)
    return files


def _dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True)
    return [line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("Error")]


def test_an_empty_deidentification_method_never_reaches_the_seg(crop, tmp_path, monkeypatch):
    """The SEG states a DeidentificationMethod (Type 1C); without that guard dciodvfy finds
    exactly the error of the GE export, so the data reproduce the defect."""
    files = _anonymised(crop, tmp_path / "ct")
    (series,) = dicom.find_series(files).series
    _, datasets = dicom.load_series(series)
    assert series.irregular and "gantry tilt" in series.irregular
    assert pydicom.dcmread(files[0]).DeidentificationMethod == ""
    mask = (label_on_frames(crop / "segmentation-117.nii.gz", datasets) > 0).astype(np.uint8)
    seg = tmp_path / "seg.dcm"
    seg_writer.write_seg(seg, datasets, mask, ("background", "liver"), "enhanced_pan")
    _dciodvfy_clean(seg)
    written = pydicom.dcmread(seg)
    assert written.PatientIdentityRemoved == "YES" and written.DeidentificationMethod
    assert written.PatientID == "ANON01"
    # the source datasets are the caller's: their empty value stays as the anonymiser left it
    assert [d.DeidentificationMethod for d in datasets] == [""] * len(datasets)

    # the control: as highdicom copies it, the empty value is the one dciodvfy error
    monkeypatch.setattr(seg_writer, "_no_empty_deidentification_method", lambda seg: None)
    seg_writer.write_seg(tmp_path / "raw.dcm", datasets, mask, ("background", "liver"),
                         "enhanced_pan")
    (error,) = _dciodvfy_errors(tmp_path / "raw.dcm")
    assert "DeidentificationMethod" in error and "Empty attribute" in error


def test_predicts_seg_of_an_anonymised_series_has_no_dciodvfy_error(crop, model_dir, tmp_path):
    _anonymised(crop, tmp_path / "in/ct")
    summary = predict.run(model_dir, [tmp_path / "in"], tmp_path / "out")
    row = pd.read_csv(tmp_path / "out/predictions.csv").iloc[0]
    assert summary["done"] == 1 and "gantry tilt" in row["reason"]
    _dciodvfy_clean(tmp_path / "out" / row["seg"])
