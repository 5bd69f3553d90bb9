"""Every source on real local files: folder and archive on msd-liver-slices, nifti on
lits-117 (and a tiny MSD-named tree), kaggle with only the download call faked."""

import json
import tarfile
import time
import zipfile

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from liverseg import casestore
from liverseg.config import parse_params
from liverseg.data.sources import kaggle
from liverseg.data.sources.kaggle import KaggleError
from liverseg.stages import ingest, split, validate
from tests.helpers import without_cases


def params(source, path=None, **sections):
    data = {"source": source, "path": None if path is None else str(path)}
    return parse_params({"seed": 5, "data": data | sections.pop("data", {}), **sections})


def read_index(workdir):
    return pd.read_csv(workdir / "data/raw/slices.csv", dtype={"patient_id": str})


def test_folder_on_msd_liver_slices(shared_data, workdir):
    msd = shared_data / "msd-liver-slices"
    p = params("folder", msd, data={"target": "liver"})
    summary = ingest.run(p)
    assert without_cases(summary) == {"source": "folder", "classes": ["background", "liver"],
                                      "slices": 527, "sampled": 527, "patients": 98,
                                      "layouts": ["."], "pairs": 527}
    assert summary["cases"]["total"] == 98  # one case file per volume (patient)
    index = read_index(workdir)
    row = index.set_index("slice_id").loc["flipped_10001_103"]
    assert (row.patient_id, row.slice_index) == ("10001", 103)
    assert row.source_image == str(msd / "images/flipped_10001_103.jpg")
    assert validate.run(p) == {"success": True, "ingested": 527, "accepted": 527,
                               "quarantined": 0}
    manifest = pd.read_parquet(workdir / "data/manifest.parquet")
    assert (manifest.fg_fraction > 0).all()  # every slice contains liver (data README)
    assert set(manifest.channels) == {3} and set(manifest.mask_values) == {"0,255"}
    for col in ("id", "patient_id", "image_path", "mask_path", "image_sha256", "width",
                "height", "fg_fraction"):
        assert manifest[col].notna().all(), col
    assert pd.read_csv(workdir / "data/quarantine.csv").empty


def test_archive_of_msd_slices_zip_and_tar(shared_data, workdir, tmp_path):
    msd = shared_data / "msd-liver-slices"
    names = sorted(p.name for p in (msd / "images").iterdir())[:12]
    zip_path, tar_path = tmp_path / "msd.zip", tmp_path / "msd.tar.gz"
    with zipfile.ZipFile(zip_path, "w") as zf, tarfile.open(tar_path, "w:gz") as tf:
        for name in names:
            for kind in ("images", "masks"):
                zf.write(msd / kind / name, f"msd-liver-slices/{kind}/{name}")
                tf.add(msd / kind / name, f"msd-liver-slices/{kind}/{name}")
    for archive in (zip_path, tar_path):
        summary = ingest.run(params("archive", archive))
        assert summary["slices"] == 12 and summary["layouts"] == ["msd-liver-slices"]
        index = read_index(workdir)
        assert index.source_image.str.startswith(f"{archive}!/msd-liver-slices/images/").all()
        assert validate.run(params("archive", archive))["accepted"] == 12


def test_nifti_on_lits_117(shared_data, workdir):
    lits = shared_data / "lits-117"
    p = params("nifti", lits, data={"target": "tumour", "nifti": {"slices": "all"}},
               split={"group_by": "slab"})
    assert without_cases(ingest.run(p)) == {
        "source": "nifti", "classes": ["background", "tumour"], "slices": 128, "sampled": 128,
        "patients": 1, "volumes": 1, "pairs": 1, "refused": 0, "unpaired": 0, "ambiguous": 0}
    index = read_index(workdir)
    assert set(index.patient_id) == {"117"} and index.slice_index.tolist() == list(range(128))
    assert validate.run(p)["accepted"] == 128
    manifest = pd.read_parquet(workdir / "data/manifest.parquet")
    assert (manifest.fg_fraction > 0).mean() > 0.9  # tumour in almost every slice
    assert (manifest.width == 128).all()
    split.run(p)
    val = pd.read_csv(workdir / "data/splits/val.csv")
    assert val.slice_index.tolist() == list(range(96, 128))  # the data README's reference
    liver = params("nifti", lits, data={"target": "liver", "nifti": {"slices": "tumour"}})
    ingest.run(liver)
    validate.run(liver)
    liver_fg = pd.read_parquet(workdir / "data/manifest.parquet").fg_fraction.mean()
    assert liver_fg > manifest.fg_fraction.mean()  # liver includes the tumour


def test_nifti_msd_naming_selection_and_window(tmp_path, workdir):
    root = tmp_path / "Task03_Liver"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    hu = np.full((16, 16, 6), -1000, np.int16)
    hu[4:12, 4:12, :] = 100  # soft tissue
    seg = np.zeros((16, 16, 6), np.uint8)
    seg[4:12, 4:12, 1:4] = 1
    seg[6:8, 6:8, 2] = 2
    for name in ("liver_0", "liver_1"):
        nib.save(nib.Nifti1Image(hu, np.eye(4)), root / f"imagesTr/{name}.nii.gz")
        nib.save(nib.Nifti1Image(seg, np.eye(4)), root / f"labelsTr/{name}.nii.gz")
    (root / "imagesTr/._liver_0.nii.gz").write_bytes(b"macOS fork")  # ignored
    p = params("nifti", root, data={"target": "liver", "nifti": {"slices": "organ"}})
    summary = ingest.run(p)  # every slice stored, the 3 organ slices x 2 volumes sampled
    assert (summary["slices"], summary["sampled"]) == (12, 6)
    index = read_index(workdir)
    assert sorted(set(index.patient_id)) == ["liver_0", "liver_1"]
    assert index[index.sampled].slice_index.tolist() == [1, 2, 3, 1, 2, 3]
    image = casestore.read(workdir / "data/raw", index.image[1])
    assert image[0, 0] == 0 and image[8, 8] == round((100 + 200) / 450 * 255)
    keep_all = params("nifti", root, data={"nifti": {"slices": "tumour",
                                                     "empty_fraction": 1.0}})
    assert ingest.run(keep_all)["sampled"] == 12


def kaggle_zip(dest):
    """What Kaggle serves: one zip of the dataset's folders (here train/ and test/), each
    with `Images/` and `Mask/` as in robintrmbtt/data-unet."""
    with zipfile.ZipFile(dest / "data-unet.zip", "w") as zf:
        rng = np.random.default_rng(0)
        for part in ("train", "test"):
            for i in range(3):
                img = Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8))
                mask = np.zeros((64, 64), np.uint8)
                mask[10:20, 10:20] = 255
                for kind, array in (("Images", img), ("Mask", Image.fromarray(mask))):
                    path = dest / f"{part}{i}.png"
                    array.save(path)
                    zf.write(path, f"data/{part}/{kind}/case{part}_{i}.png")
                    path.unlink()


def test_kaggle_download_is_cached_verified_and_ingested(tmp_path, workdir, monkeypatch):
    calls = []

    def fake_download(cfg, dest):  # the network boundary, and nothing else
        calls.append(cfg.slug)
        kaggle_zip(dest)

    monkeypatch.setattr(kaggle, "download", fake_download)
    p = params("kaggle", data={"kaggle": {"cache_dir": str(tmp_path / "cache"), "version": 2}})
    cache = tmp_path / "cache/robintrmbtt/data-unet/2"
    cache.mkdir(parents=True)
    (cache / "half.png").write_bytes(b"\x89PNG")  # an interrupted download: no marker
    summary = ingest.run(p)
    assert summary["slices"] == 6 and summary["layouts"] == ["data/test", "data/train"]
    assert summary["cache"] == str(cache) and calls == ["robintrmbtt/data-unet"]
    assert read_index(workdir).source_image.str.startswith(str(cache / "data")).all()
    assert not (cache / "half.png").exists() and kaggle.is_complete(cache)
    assert json.loads((cache / ".complete").read_text())["handle"] == \
        "robintrmbtt/data-unet/versions/2"
    assert validate.run(p)["accepted"] == 6
    ingest.run(p)
    assert len(calls) == 1  # complete cache reused
    (cache / "data/train/Images/casetrain_0.png").unlink()  # damaged: fails verification
    ingest.run(p)
    assert len(calls) == 2


def test_kaggle_without_credentials_fails_fast_and_caches_nothing(tmp_path, workdir,
                                                                  monkeypatch):
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle"))
    p = params("kaggle", data={"kaggle": {"cache_dir": str(tmp_path / "cache")}})
    start = time.monotonic()
    with pytest.raises(KaggleError, match="no Kaggle credentials.*KAGGLE_USERNAME"):
        ingest.run(p)
    assert time.monotonic() - start < 5
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert leftovers == [] and not (workdir / "data/raw").exists()


def test_kaggle_unreachable_fails_within_the_timeout(monkeypatch):
    monkeypatch.setattr(kaggle, "HOST", "host.invalid")
    start = time.monotonic()
    with pytest.raises(KaggleError, match="cannot reach host.invalid"):
        kaggle.check_reachable(2.0)
    assert time.monotonic() - start < 5

