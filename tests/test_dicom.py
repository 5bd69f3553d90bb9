"""`liverseg predict` on DICOM CT series: the NIfTI's mask voxel for voxel, a DICOM SEG that
highdicom, dciodvfy and dcmqi accept with the same frames, series as hospitals export them
(no SeriesNumber, hostile UIDs, missing Type 2 attributes, two studies with the same series
numbers, gantry tilt, irregular spacing), and bad series refused or skipped by name, each
in its own row."""

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

from liverseg.config import parse_params
from liverseg.dicom import series as dicom
from liverseg.serving import predict
from tests.dicom_series import write_series
from tests.helpers import SHARED_DATA, tiny_raw_params

SLAB = slice(88, 104)  # 16 slices with liver and tumour: seconds to write, read, compress


@pytest.fixture(scope="module")
def lits_model(tmp_path_factory) -> Path:
    """A liver model trained one epoch (64 px) on lits-117, and a 16-slice crop of it."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present") if not os.environ.get(
            "LIVERSEG_REQUIRE_SHARED_DATA") else pytest.fail("../shared/data is missing")
    from liverseg.stages import run_data_stages, train

    root, cwd, env = tmp_path_factory.mktemp("lits"), Path.cwd(), os.environ.copy()
    os.environ["LIVERSEG_TRACKING"] = "off"
    try:
        os.chdir(root)
        params = parse_params(tiny_raw_params(
            data={"source": "nifti", "path": str(SHARED_DATA / "lits-117"), "target": "liver"},
            split={"group_by": "slab", "val_fraction": 0.25}))
        run_data_stages(params)
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
    summary = predict.run(model, [tmp_path / "plain", tmp_path / "rle"], tmp_path / "both")
    row = pd.read_csv(tmp_path / "both/predictions.csv").iloc[0]
    assert (summary["refused"], row["status"]) == (1, "refused")  # one series, twice
    assert "two images at one position" in row["reason"]
    for name in ("plain", "rle"):
        predict.run(model, [tmp_path / name], tmp_path / "out")
    np.testing.assert_array_equal(_canonical(tmp_path / "out/plain_series-2_mask.nii.gz"),
                                  _canonical(tmp_path / "out/rle_series-2_mask.nii.gz"))


def test_single_slice_scouts_and_two_series(lits_model, tmp_path):
    """pydicom's own CT slice is a one-slice volume; a localiser beside it gets a skipped
    row naming it; two series in one folder are predicted separately, named by number."""
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
    assert (summary["inputs"], summary["done"], summary["skipped"]) == (3, 2, 1)
    skipped = rows[rows.status == "skipped"].iloc[0]
    assert skipped["input"].endswith("scout") and "localiser" in skipped["reason"]
    done = rows[rows.status == "done"]
    assert sorted(done["slices"]) == [1, 16]
    assert {Path(m).name for m in done["mask"]} == {
        "abdomen_series-5_mask.nii.gz", f"mixed_series-{scout.SeriesNumber}_mask.nii.gz"}
    assert set(rows["preprocessing_sha256"]) == {done["preprocessing_sha256"].iloc[0]}


def _files_outside(root: Path, out: Path) -> set[Path]:
    return {p for p in root.rglob("*") if out not in p.parents and p != out}


def test_hostile_uid_and_missing_type2_attributes_stay_inside_out(lits_model, tmp_path):
    """No SeriesNumber, a SeriesInstanceUID with `../`, no PatientBirthDate/PatientSex/
    StudyID/AccessionNumber: every output lands inside --out and the SEG is valid."""
    write_series(lits_model / "crop-117.nii.gz", tmp_path / "in/ct", series_number=None,
                 series_uid="1.2.3/../../../escaped",
                 drop=("PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber"))
    out = tmp_path / "deep/er/out"
    before = _files_outside(tmp_path, out)
    summary = predict.run(str(lits_model / "models/enhanced_pan"), [tmp_path / "in"], out)
    assert _files_outside(tmp_path, out) - before == {tmp_path / "deep", tmp_path / "deep/er"}
    row = pd.read_csv(out / "predictions.csv").iloc[0]
    assert summary["done"] == 1 and "/" not in row["seg"] and ".." not in Path(row["seg"]).parts
    assert row["seg"].startswith("ct_uid-1.2.3_.._.._.._escaped-")
    seg = hd.seg.segread(out / row["seg"])
    assert seg.PatientBirthDate == "" and seg.AccessionNumber == ""
    # dciodvfy finds no error but the source's own invalid UID, which the SEG must quote
    _dciodvfy_clean(out / row["seg"], allowed="1.2.3/../../../escaped")


def test_two_studies_with_the_same_series_numbers_never_meet(lits_model, tmp_path):
    """An export with two studies, each with series 201 and 401 in folders S2010/S4010:
    outputs follow the folders; two series of one name in one folder are suffixed."""
    volume = lits_model / "crop-117.nii.gz"
    for study in ("ST1", "ST2"):
        uid = pydicom.uid.generate_uid()
        for number in (201, 401):
            write_series(volume, tmp_path / f"export/{study}/S{number}0", number, uid)
    flat = tmp_path / "export/flat"
    flat.mkdir()
    for copy in ("a", "b"):  # two studies' series 7 dumped into one folder
        for f in write_series(volume, tmp_path / copy, 7):
            f.rename(flat / f"{copy}{f.name}")
    summary = predict.run(str(lits_model / "models/enhanced_pan"), [tmp_path / "export"],
                          tmp_path / "out")
    rows = pd.read_csv(tmp_path / "out/predictions.csv")
    assert (summary["done"], summary["refused"]) == (6, 0)
    assert len(set(rows["seg"])) == 6
    assert {"ST1/S2010_series-201_seg.dcm", "ST2/S2010_series-201_seg.dcm",
            "ST1/S4010_series-401_seg.dcm", "ST2/S4010_series-401_seg.dcm"} <= set(rows["seg"])
    suffixed = rows[rows["name"].str.startswith("flat_series-7-")]
    assert len(suffixed) == 2 and all("shared by 2 inputs" in r for r in suffixed["reason"])
    for seg in rows["seg"]:
        assert (tmp_path / "out" / seg).is_file()


def _dciodvfy_clean(path: Path, allowed: str | None = None) -> None:
    """dicom3tools' validator on a SEG: no line that says Error (but about `allowed`)."""
    import subprocess

    result = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True)
    errors = [line for line in (result.stdout + result.stderr).splitlines()
              if line.startswith("Error") and not (allowed and allowed in line)]
    assert not errors, errors


def _dcmqi_frames(seg: Path, tmp_path: Path) -> np.ndarray:
    """The SEG as dcmqi (3D Slicer's SEG reader) reads it: segment 1, canonical axes."""
    import subprocess

    out = tmp_path / "dcmqi"
    out.mkdir(parents=True)
    subprocess.run(["segimage2itkimage", "--inputDICOM", str(seg), "--outputDirectory",
                    str(out), "--outputType", "nifti"], check=True, capture_output=True)
    return _canonical(next(out.glob("*1.nii.gz")))


@pytest.mark.parametrize("kind", ["tilted", "irregular"])
def test_tilted_and_irregular_series_are_segmented_slice_by_slice(lits_model, tmp_path, kind):
    """A gantry-tilted series and one whose spacing varies get a SEG on their source frames,
    frame for frame the regular series' mask (a 2D model sees the same slices), no NIfTI,
    and a row that says what the series is. dciodvfy and dcmqi accept both SEGs."""
    volume, model = lits_model / "crop-117.nii.gz", str(lits_model / "models/enhanced_pan")
    write_series(volume, tmp_path / "regular/ct")
    files = write_series(volume, tmp_path / kind / "ct", tilt_degrees=15 * (kind == "tilted"))
    if kind == "irregular":  # spacing 1x, then 2x and 3x: slices dropped by design
        for f in [f for i, f in enumerate(_by_position(files)) if i in (5, 9, 10)]:
            f.unlink()
    predict.run(model, [tmp_path / "regular", tmp_path / kind], tmp_path / "out")
    rows = pd.read_csv(tmp_path / "out/predictions.csv").set_index("input")
    regular, odd = rows.loc[str(tmp_path / "regular/ct")], rows.loc[str(tmp_path / kind / "ct")]
    assert odd["status"] == "done" and pd.isna(odd["mask"])
    assert ("gantry tilt 15.0 deg" if kind == "tilted" else "spacing varies") in odd["reason"]
    seg_regular = hd.seg.segread(tmp_path / "out" / regular["seg"])
    seg_odd = hd.seg.segread(tmp_path / "out" / odd["seg"])
    twins = {round(float(pydicom.dcmread(f).ImagePositionPatient[2]), 3): f
             for f in (tmp_path / "regular/ct").iterdir()}
    for f in _by_position(sorted((tmp_path / kind / "ct").iterdir())):
        ds = pydicom.dcmread(f)
        twin = pydicom.dcmread(twins[round(float(ds.ImagePositionPatient[2]), 3)])
        np.testing.assert_array_equal(
            seg_odd.get_pixels_by_source_instance([ds.SOPInstanceUID], combine_segments=True),
            seg_regular.get_pixels_by_source_instance([twin.SOPInstanceUID],
                                                      combine_segments=True))
    assert int(odd["liver_pixels"]) > 0
    _dciodvfy_clean(tmp_path / "out" / odd["seg"])
    _dciodvfy_clean(tmp_path / "out" / regular["seg"])
    # dcmqi reads the regular SEG back onto exactly the NIfTI mask's voxels, and the tilted
    # one (its frames stacked along their normal, as dcmqi does) onto the same voxels
    nifti = _canonical(tmp_path / "out" / regular["mask"])
    np.testing.assert_array_equal(_dcmqi_frames(tmp_path / "out" / regular["seg"],
                                                tmp_path / "a"), nifti)
    dcmqi = _dcmqi_frames(tmp_path / "out" / odd["seg"], tmp_path / "b")
    if kind == "tilted":
        np.testing.assert_array_equal(dcmqi, nifti)
    assert dcmqi.sum() == odd["liver_pixels"]


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
    return dicom.load_series(dicom.find_series(files).series[0])


def _by_position(files: list[Path]) -> list[Path]:
    return sorted(files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))


def test_bad_series_are_refused_or_skipped_naming_file_and_rule(series, tmp_path):
    _edit(series[3], SeriesInstanceUID=None)
    found = dicom.find_series(series)
    assert found.refused == [(series[3], "no SeriesInstanceUID; cannot tell which series it "
                                         "belongs to (rule: every image names its series)")]
    assert len(found.series[0].files) == len(series) - 1  # the rest of the series goes on
    _edit(series[3], SeriesInstanceUID=pydicom.dcmread(series[0]).SeriesInstanceUID,
          Modality="MR")
    (path, why), = dicom.find_series(series).skipped
    assert path == series[3] and "modality 'MR', not CT" in why
    _edit(series[3], Modality="CT", ImageOrientationPatient=[1, 0, 0, 0, 0.8, 0.6])
    with pytest.raises(dicom.DicomError, match="orientation"):
        _load(series)


def test_a_series_over_the_limits_is_refused_from_its_headers(series):
    found = dicom.find_series(series, dicom.Limits(max_slices=8))
    assert not found.series and len(found.refused) == len(series)
    assert "16 slices, above the limit max_slices=8" in found.refused[0][1]
    assert "LIVERSEG_MAX_SLICES" in found.refused[0][1]
    assert "max_side=64" in dicom.find_series(series, dicom.Limits(max_side=64)).refused[0][1]


def test_an_undecodable_transfer_syntax_is_named(series):
    ds = pydicom.dcmread(series[0])
    ds.PixelData = encapsulate([b"\xff\x0a not a real HTJ2K codestream"])
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    ds.save_as(series[0])
    with pytest.raises(dicom.DicomError, match=r"High-Throughput JPEG 2000 .*\(1\.2\.840\.10008"
                                               r"\.1\.2\.4\.201\) cannot be decoded"):
        _load(series)


def test_a_dicomdir_tree_is_read_as_the_files_it_indexes(series, lits_model, tmp_path):
    """A media export (pydicom's FileSet: DICOMDIR + PT*/ST*/SE*/IM* files): the series is
    predicted, the DICOMDIR gets a skipped row saying what it is."""
    from pydicom.fileset import FileSet

    fs = FileSet()
    for f in series:
        fs.add(pydicom.dcmread(f))
    fs.write(tmp_path / "media")
    summary = predict.run(str(lits_model / "models/enhanced_pan"), [tmp_path / "media"],
                          tmp_path / "out")
    rows = pd.read_csv(tmp_path / "out/predictions.csv").set_index("status")
    assert (summary["done"], summary["skipped"], summary["refused"]) == (1, 1, 0)
    assert rows.loc["skipped", "input"].endswith("DICOMDIR")
    assert "DICOMDIR" in rows.loc["skipped", "reason"] and rows.loc["done", "slices"] == 16
