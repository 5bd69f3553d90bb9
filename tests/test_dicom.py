"""`liverseg predict` on DICOM CT series: the NIfTI's mask voxel for voxel, a DICOM SEG that
highdicom reads back with the same frames, and bad series refused or skipped by name."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import HTJ2KLossless, RLELossless

from liverseg.serving import dicom, predict
from liverseg.config import parse_params
from tests.conftest import SHARED_DATA, tiny_raw_params
from tests.dicom_series import write_series

SLAB = slice(88, 104)  # 16 slices with liver and tumour: seconds to write, read, compress


@pytest.fixture(scope="module")
def lits_model(tmp_path_factory) -> Path:
    """A liver model trained one epoch (64 px) on lits-117, and a 16-slice crop of it."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present") if not os.environ.get(
            "LIVERSEG_REQUIRE_SHARED_DATA") else pytest.fail("../shared/data is missing")
    from liverseg.stages import ingest, split, train, validate

    root, cwd, env = tmp_path_factory.mktemp("lits"), Path.cwd(), os.environ.copy()
    os.environ["LIVERSEG_TRACKING"] = "off"
    try:
        os.chdir(root)
        params = parse_params(tiny_raw_params(
            data={"source": "nifti", "path": str(SHARED_DATA / "lits-117"), "target": "liver"},
            split={"group_by": "slab", "val_fraction": 0.25}))
        for stage in (ingest, validate, split):
            stage.run(params)
        train.run(params, "enhanced_pan")
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
    img = nib.load(str(SHARED_DATA / "lits-117/volume-117.nii.gz"))
    crop = img.slicer[:, :, SLAB]
    nib.save(crop, str(root / "crop-117.nii.gz"))
    return root


def _canonical(path: Path) -> np.ndarray:
    return np.asarray(nib.as_closest_canonical(nib.load(str(path))).dataobj)


def test_series_gives_the_niftis_mask_and_a_seg_with_the_same_frames(lits_model, tmp_path):
    volume = lits_model / "crop-117.nii.gz"
    write_series(volume, tmp_path / "study/ct")
    out = tmp_path / "out"
    predict.run(str(lits_model / "models/enhanced_pan"), [tmp_path / "study", volume], out)
    rows = pd.read_csv(out / "predictions.csv").set_index("kind")
    series, nifti = rows.loc["dicom"], rows.loc["volume"]
    from_dicom, from_nifti = _canonical(out / series["mask"]), _canonical(out / nifti["mask"])
    assert from_nifti.sum() > 0  # a model that finds liver: the comparison is not vacuous
    np.testing.assert_array_equal(from_dicom, from_nifti)
    assert series["liver_pixels"] == nifti["liver_pixels"]
    assert np.isclose(series["liver_volume_ml"], nifti["liver_volume_ml"])

    seg = hd.seg.segread(out / series["seg"])
    _, datasets = _load(sorted((tmp_path / "study/ct").iterdir()))
    frames = seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in datasets],
                                               combine_segments=True)
    np.testing.assert_array_equal(frames, np.asarray(nib.load(str(out / series["mask"])).dataobj))
    assert seg.SeriesInstanceUID != datasets[0].SeriesInstanceUID
    assert seg.get_segment_description(1).segmented_property_type.meaning == "Liver"
    assert series["series_uid"] == datasets[0].SeriesInstanceUID


def test_compressed_series_decodes_to_the_same_mask(lits_model, tmp_path):
    files = write_series(lits_model / "crop-117.nii.gz", tmp_path / "plain")
    (tmp_path / "rle").mkdir()
    for f in files:
        ds = pydicom.dcmread(f)
        ds.compress(RLELossless)
        ds.save_as(tmp_path / "rle" / f.name)
    model = str(lits_model / "models/enhanced_pan")
    with pytest.raises(dicom.DicomError, match="two images at one position"):  # one series
        predict.run(model, [tmp_path / "plain", tmp_path / "rle"], tmp_path / "out")
    for name in ("plain", "rle"):
        predict.run(model, [tmp_path / name], tmp_path / "out")
    np.testing.assert_array_equal(_canonical(tmp_path / "out/plain_series-2_mask.nii.gz"),
                                  _canonical(tmp_path / "out/rle_series-2_mask.nii.gz"))


def test_single_slice_scouts_and_two_series(lits_model, tmp_path):
    """pydicom's own CT slice is a one-slice volume; a localiser beside it is skipped and
    named; two series in one folder are predicted separately, named by series number."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct_small")
    scout = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.SOPInstanceUID = pydicom.uid.generate_uid()
    scout.save_as(folder / "scout")
    write_series(lits_model / "crop-117.nii.gz", folder / "abdomen", series_number=5)
    summary = predict.run(str(lits_model / "models/enhanced_pan"), [folder], tmp_path / "out")
    rows = pd.read_csv(tmp_path / "out/predictions.csv")
    assert summary["inputs"] == 2 and sorted(rows["slices"]) == [1, 16]
    assert all("scout: localiser" in s for s in rows["skipped"])
    assert {Path(m).name for m in rows["mask"]} == {
        "abdomen_series-5_mask.nii.gz", f"mixed_series-{scout.SeriesNumber}_mask.nii.gz"}


@pytest.fixture
def series(lits_model, tmp_path) -> list[Path]:
    return write_series(lits_model / "crop-117.nii.gz", tmp_path / "ct")


def _edit(path: Path, **values) -> None:
    ds = pydicom.dcmread(path)
    for key, value in values.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path)


def _load(files: list[Path]):
    return dicom.load_series(dicom.find_series(files)[0])


def _by_position(files: list[Path]) -> list[Path]:
    return sorted(files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))


def test_a_missing_slice_names_the_files_around_the_gap(series):
    ordered = _by_position(series)
    ordered[7].unlink()
    with pytest.raises(dicom.DicomError, match="slice is missing") as err:
        _load(ordered[:7] + ordered[8:])
    assert ordered[6].name in str(err.value) and ordered[8].name in str(err.value)


def test_bad_series_are_refused_naming_file_and_rule(series, tmp_path):
    _edit(series[3], SeriesInstanceUID=None)
    with pytest.raises(dicom.DicomError, match=f"{series[3].name}: no SeriesInstanceUID"):
        dicom.find_series(series)
    _edit(series[3], SeriesInstanceUID=pydicom.dcmread(series[0]).SeriesInstanceUID,
          Modality="MR")
    with pytest.raises(dicom.DicomError, match=f"{series[3].name}: modality 'MR'.*modality CT"):
        dicom.find_series(series)
    _edit(series[3], Modality="CT", ImageOrientationPatient=[1, 0, 0, 0, 0.8, 0.6])
    with pytest.raises(dicom.DicomError, match="orientation|one volume"):
        _load(series)


def test_an_undecodable_transfer_syntax_is_named(series):
    ds = pydicom.dcmread(series[0])
    ds.PixelData = encapsulate([b"\xff\x0a not a real HTJ2K codestream"])
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    ds.save_as(series[0])
    with pytest.raises(dicom.DicomError, match=r"High-Throughput JPEG 2000 .*\(1\.2\.840\.10008"
                                               r"\.1\.2\.4\.201\) cannot be decoded"):
        _load(series)
