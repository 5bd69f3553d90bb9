"""The layouts people download: NIfTI trees (LiTS, MSD / nnU-Net, Kaggle's LiTS copy) and 2D
folders (the paper's Kaggle `Images/` + `Mask/`, `image/` + `label/` with `_mask` names),
found and paired with default params; ambiguity and unpaired files are quarantine rows
naming the files; slices without a patient id are kept with a prominent warning."""

import gzip
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from liverseg.config import ConfigError, parse_params
from liverseg.data.sources import SourceError
from liverseg.report.figures import Figure
from liverseg.report.inputs import Inputs
from liverseg.report.sections import data_context
from liverseg.report.table import Table
from liverseg.stages import ingest, report, split, validate
from tests.helpers import without_cases


def params(source, path, **data):
    return parse_params({"seed": 5, "data": {"source": source, "path": str(path), **data},
                         "validate": {"max_quarantine_fraction": 1.0}})


def read_index(workdir):
    return pd.read_csv(workdir / "data/raw/slices.csv", dtype={"patient_id": str},
                       keep_default_na=False)


def quarantine(workdir):
    return pd.read_csv(workdir / "data/quarantine.csv", keep_default_na=False)


# ----------------------------------------------------------------------------- NIfTI layouts

# layout -> (volume path, label path, patient id); ".nii" names are decompressed copies.
NIFTI_LAYOUTS = {
    "same folder": ("lits/volume-117.nii.gz", "lits/segmentation-117.nii.gz", "117"),
    "image+target": ("ds/image/case117.nii.gz", "ds/target/case117.nii.gz", "case117"),
    "volumes+segmentations": ("LiTS/Volumes/volume-117.nii.gz",
                              "LiTS/Segmentations/segmentation-117.nii.gz", "117"),
    "ct+label": ("data/CT/117.nii.gz", "data/label/117.nii.gz", "117"),
    "images+labels, mixed .nii": ("x/images/volume-117.nii", "x/labels/segmentation-117.nii.gz",
                                  "117"),
    "imagesTr+labelsTr, nnU-Net _0000": ("Task03_Liver/imagesTr/liver_117_0000.nii.gz",
                                         "Task03_Liver/labelsTr/liver_117.nii.gz", "liver_117"),
    "kaggle volume_pt + segmentations": ("lits-kaggle/volume_pt3/volume-117.nii",
                                         "lits-kaggle/segmentations/segmentation-117.nii", "117"),
    "decompressed .nii side by side": ("flat/volume-117.nii", "flat/segmentation-117.nii",
                                       "117"),
}


def place(src, root, rel):
    """`src` (a shared .nii.gz) at `root/rel`: a link, or decompressed for a `.nii` name;
    in a temporary folder, never the repository."""
    dest = root / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    if rel.endswith(".gz"):
        dest.symlink_to(src)
    else:
        dest.write_bytes(gzip.decompress(src.read_bytes()))
    return dest


@pytest.mark.parametrize("layout", list(NIFTI_LAYOUTS))
def test_nifti_layouts_pair_the_one_lits_case(layout, shared_data, tmp_path, workdir):
    vol_rel, label_rel, pid = NIFTI_LAYOUTS[layout]
    root, lits = tmp_path / "download", shared_data / "lits-117"
    vol = place(lits / "volume-117.nii.gz", root, vol_rel)
    label = place(lits / "segmentation-117.nii.gz", root, label_rel)
    summary = ingest.run(params("nifti", root, target="liver"))  # data.nifti.slices: organ
    assert without_cases(summary) == {
        "source": "nifti", "classes": ["background", "liver"], "slices": 128, "sampled": 128,
        "patients": 1, "volumes": 1, "pairs": 1, "refused": 0, "unpaired": 0, "ambiguous": 0}
    index = read_index(workdir)
    assert set(index.patient_id) == {pid} and index.paired.all()
    assert index.source_image[0] == f"{vol}#0" and index.source_mask[0] == f"{label}#0"


def nii(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


def small_case(depth=3, dtype=np.int16, seed=0):
    """A 40x40xdepth CT (noisy, so no two slices are equal) and its liver label volume."""
    hu = np.random.default_rng(seed).normal(0, 80, (40, 40, depth)).astype(dtype)
    hu[8:30, 8:30] += 100
    seg = np.zeros((40, 40, depth), np.uint8)
    seg[8:30, 8:30] = 1
    return hu, seg


def test_nifti_ambiguous_and_unpaired_cases_are_rows_naming_the_files(tmp_path, workdir):
    root = tmp_path / "tree"
    hu, seg = small_case()
    for i, site in enumerate(("siteA", "siteB")):  # case 0 in both: two pairs, never crossed
        nii(root / site / "images/0.nii.gz", small_case(seed=i + 1)[0])
        nii(root / site / "labels/0.nii.gz", seg)
    b = root / "siteB"
    nii(b / "images/1.nii", hu)  # two volumes for case 1
    nii(b / "images/1.nii.gz", hu)
    nii(b / "labels/1.nii.gz", seg)
    nii(b / "images/2.nii.gz", hu)  # two label volumes for case 2
    nii(b / "labels/2.nii", seg)
    nii(b / "labels/2.nii.gz", seg)
    nii(b / "images/3.nii.gz", hu)  # no label
    nii(b / "labels/4.nii.gz", seg)  # no image
    nii(root / "single/volume-5.nii.gz", small_case(1, np.float64, 3)[0])  # 40x40x1 float64
    nii(root / "single/segmentation-5.nii.gz", small_case(1)[1].astype(np.float64))
    nii(root / "flat2d/volume-6.nii.gz", hu[:, :, 0])  # a 2D array: refused, not guessed
    nii(root / "flat2d/segmentation-6.nii.gz", seg[:, :, 0])
    p = params("nifti", root, target="liver")
    summary = ingest.run(p)
    assert {k: summary[k] for k in ("volumes", "pairs", "refused", "unpaired", "ambiguous",
                                    "slices")} == {"volumes": 3, "pairs": 4, "refused": 1,
                                                   "unpaired": 2, "ambiguous": 2, "slices": 7}
    index = read_index(workdir)
    written = index[index.image != ""]
    pairs = set(zip(written.source_image.str.split("#").str[0],
                    written.source_mask.str.split("#").str[0], strict=True))
    assert pairs == {(str(root / f"{s}/images/0.nii.gz"), str(root / f"{s}/labels/0.nii.gz"))
                     for s in ("siteA", "siteB")} | {
        (str(root / "single/volume-5.nii.gz"), str(root / "single/segmentation-5.nii.gz"))}
    result = validate.run(p)
    assert result["ingested"] == 7 + 5 and result["quarantined"] == 5
    q = quarantine(workdir).set_index("path")
    assert set(q.rule) == {"pairing complete", "image decodable"}
    two_vols = q.loc[str(b / "images/1.nii"), "detail"]
    assert str(b / "images/1.nii.gz") in two_vols and "ambiguous" in two_vols
    two_labels = q.loc[str(b / "images/2.nii.gz"), "detail"]
    assert str(b / "labels/2.nii") in two_labels and str(b / "labels/2.nii.gz") in two_labels
    assert "no label volume" in q.loc[str(b / "images/3.nii.gz"), "detail"]
    assert "no image volume" in q.loc[str(b / "labels/4.nii.gz"), "detail"]
    assert "(40, 40)" in q.loc[str(root / "flat2d/volume-6.nii.gz"), "detail"]


def test_nifti_labels_dir_names_an_unusual_label_folder(tmp_path, workdir):
    hu, seg = small_case()
    root = tmp_path / "odd"
    nii(root / "scans/liver7.nii.gz", hu)
    nii(root / "Annotations/liver7.nii.gz", seg)
    with pytest.raises(SourceError) as err:
        ingest.run(params("nifti", root))
    message = str(err.value)
    assert "no volume pairs" in message and "segmentations/segmentation/labels" in message
    assert "labelstr" in message and "data.nifti.labels_dir" in message
    assert str(root / "Annotations/liver7.nii.gz") in message  # the first unpaired files
    summary = ingest.run(params("nifti", root, nifti={"labels_dir": "annotations"}))
    assert summary["volumes"] == 1 and summary["patients"] == 1 and summary["slices"] == 3
    with pytest.raises(ConfigError, match="data.nifti.labels_dir.*not a folder name"):
        params("nifti", root, nifti={"labels_dir": "a/b"})


# ----------------------------------------------------------------------------- 2D layouts


def link_msd(msd, root, images, masks, mask_suffix=""):
    (root / images).mkdir(parents=True)
    (root / masks).mkdir()
    for path in sorted((msd / "images").iterdir()):
        (root / images / path.name).symlink_to(path)
        (root / masks / f"{path.stem}{mask_suffix}{path.suffix}").symlink_to(msd / "masks" /
                                                                           path.name)


@pytest.mark.parametrize(("images", "masks", "suffix"),
                         [("Images", "Mask", ""), ("image", "label", "_mask")])
def test_msd_slices_ingest_from_the_usual_2d_layouts(images, masks, suffix, shared_data,
                                                     tmp_path, workdir):
    msd = shared_data / "msd-liver-slices"
    root = tmp_path / "kaggle-like" / "data-unet"
    link_msd(msd, root, images, masks, suffix)
    p = params("folder", tmp_path / "kaggle-like", target="liver")  # the folders, found below
    summary = ingest.run(p)
    assert (summary["slices"], summary["patients"], summary["pairs"]) == (527, 98, 527)
    assert summary["layouts"] == ["data-unet"] and "items_not_ingested" not in summary
    row = read_index(workdir).set_index("slice_id").loc["flipped_10001_103"]
    assert row.source_mask == str(root / masks / f"flipped_10001_103{suffix}.jpg")
    assert validate.run(p) == {"success": True, "ingested": 527, "accepted": 527,
                               "quarantined": 0}
    v = json.loads((workdir / "reports/validation.json").read_text())
    assert v["warnings"] == [] and v["patient_ids"]["from_names"] == 527  # ids in the names


def png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def ct(seed):
    return np.random.default_rng(seed).integers(20, 230, (40, 40), dtype=np.uint8)


def mask():
    m = np.zeros((40, 40), np.uint8)
    m[10:20, 10:25] = 255
    return m


def test_2d_ambiguous_and_unpaired_files_are_rows_naming_them(tmp_path, workdir):
    root = tmp_path / "set"
    img, msk = root / "imgs", root / "GT"
    for i, stem in enumerate(["p1_1", "p1_2", "p1_2_mask", "p1_3", "p1_4", "p1_5"]):
        png(img / f"{stem}.png", ct(i))
    png(img / "p1_5.jpg", ct(9))  # p1_5.png and p1_5.jpg: two images for one stem
    png(msk / "p1_1_seg.png", mask())  # pairs with p1_1 through the suffix
    png(msk / "p1_2_mask.png", mask())  # fits image p1_2 (suffix) and p1_2_mask (stem)
    png(msk / "p1_3.png", mask())  # image p1_3 has two candidate masks
    png(msk / "p1_3_mask.png", mask())
    png(msk / "p1_5.png", mask())
    png(msk / "p1_9_gt.png", mask())  # no image; p1_4 has no mask
    p = params("folder", root)
    summary = ingest.run(p)
    assert summary["pairs"] == 1 and summary["slices"] == 2  # p1_1, and p1_4 (no mask)
    validate.run(p)
    q = quarantine(workdir).set_index("slice_id")
    assert set(q.rule) == {"pairing complete"} and sorted(q.index) == [
        "p1_2", "p1_3", "p1_4", "p1_5", "p1_9"]
    assert str(img / "p1_2.png") in q.detail["p1_2"] and str(img / "p1_2_mask.png") in \
        q.detail["p1_2"] and str(msk / "p1_2_mask.png") in q.detail["p1_2"]
    assert str(msk / "p1_3.png") in q.detail["p1_3"] and str(msk / "p1_3_mask.png") in \
        q.detail["p1_3"]
    assert str(img / "p1_5.jpg") in q.detail["p1_5"] and str(img / "p1_5.png") in \
        q.detail["p1_5"]
    assert q.path["p1_4"] == str(img / "p1_4.png") and "no mask" in q.detail["p1_4"]
    assert q.path["p1_9"] == str(msk / "p1_9_gt.png") and "no image" in q.detail["p1_9"]
    exact = params("folder", root, folder={"mask_suffix": ""})  # explicit: stems must match
    # p1_2_mask and p1_3 pair by stem; p1_1 and p1_1_seg stay apart
    assert ingest.run(exact)["pairs"] == 2


def test_2d_folder_search_names_the_folders_and_refuses_two_candidates(tmp_path, workdir):
    root = tmp_path / "odd"
    png(root / "scans/a_1.png", ct(1))
    png(root / "masks/a_1.png", mask())
    with pytest.raises(SourceError) as err:
        ingest.run(params("folder", root))
    assert "no images folder (looked for images/image/imgs/img/ct/frames, any case)" in \
        str(err.value) and "data.folder.images / data.folder.masks" in str(err.value)
    assert ingest.run(params("folder", root, folder={"images": "SCANS"}))["pairs"] == 1
    png(root / "Labels/a_1.png", mask())
    two = r"two candidate mask folders, Labels/ and masks/; set data.folder.masks"
    with pytest.raises(SourceError, match=two):
        ingest.run(params("folder", root, folder={"images": "scans"}))
    assert ingest.run(params("folder", root, folder={"images": "scans", "masks": "labels"})
                      )["pairs"] == 1


def test_slices_without_patient_id_are_kept_with_a_leakage_warning(tmp_path, workdir):
    root = tmp_path / "noid"
    for i in range(6):
        png(root / f"images/slice{i}.png", ct(i))
        png(root / f"masks/slice{i}.png", mask())
    p = params("folder", root)
    assert ingest.run(p)["patients"] == 0  # the names carry no patient id
    result = validate.run(p)
    assert result["accepted"] == 6 and result["quarantined"] == 0
    (warning,) = result["warnings"]
    assert warning.startswith("6 of 6 accepted slices have no patient id")
    assert "train and val" in warning and "data.folder.patient_regex" in warning
    v = json.loads((workdir / "reports/validation.json").read_text())
    assert v["warnings"] == [warning] and list(v)[:2] == ["success", "warnings"]
    rules = {r["rule"]: r["success"] for r in v["rules"]}
    assert rules["split group present"] and "patient id present" not in rules
    assert v["patient_ids"] | {"warning": None} == {
        "from_names": 0, "missing": 6, "missing_grouped_as": "own slice id",
        "setting": "data.folder.patient_regex", "warning": None,
        "examples": [f"slice{i}" for i in range(6)]}
    manifest = pd.read_parquet(workdir / "data/manifest.parquet")
    assert manifest.patient_id.tolist() == manifest.slice_id.tolist()
    assert not manifest.patient_id_from_name.any()
    counts = split.run(p)
    assert counts["train"] + counts["val"] == 6  # one group per slice
    stats = json.loads((workdir / "data/splits/stats.json").read_text())
    data = data_context(p, Inputs(v, stats, *[None] * 7))
    assert data["warnings"] == [warning]
    for name in ("report.html.j2", "report.md.j2"):
        page = report.environment().get_template(name).render(**render_context(data))
        assert "Warning:" in page and "6 of 6 accepted slices have no patient id" in page


def render_context(data):
    """The report's context with empty sections besides `data` (only data is checked)."""
    empty = Table([], [])
    return {"title": "t", "models": [], "data": data | {"figures": []}, "training": [],
            "training_table": empty,
            "comparison": {"table": empty, "paper": empty, "paper_title": "p", "rank_by": "k",
                           "best_model": "m", "best_score": "1", "margin": "n/a",
                           "definitions": "", "cost_figure": Figure("c.png", "c", b""),
                           "inference": empty, "per_case": None},
            "visual": {"best_model": "m", "chosen": empty, "figures": []},
            "lineage": {"rows": empty, "history": empty, "tags": empty, "command": "c",
                        "dirty": False, "audit_command": "c", "audits": empty,
                        "model_card": None}}
