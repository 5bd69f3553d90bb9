"""A corpus of awkward and bad inputs, built here: each is handled, or refused/quarantined
with a message naming the file and the rule, and no input file is ever modified."""

import hashlib
import io
import stat
import struct
import tarfile
import zipfile
import zlib

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from liverseg import casestore
from liverseg.config import parse_params
from liverseg.data.sources import SourceError
from liverseg.data.sources.archive import UnsafeArchiveError, extract
from liverseg.stages import ingest, validate
from liverseg.stages.validate import ValidationFailed

RNG = np.random.default_rng(0)


def ct(size=64, seed=None):
    rng = np.random.default_rng(seed)
    return rng.integers(20, 230, (size, size), dtype=np.uint8)


def square_mask(size=64, value=255):
    m = np.zeros((size, size), np.uint8)
    m[16:40, 20:44] = value
    return m


def bomb_png(width=30000, height=30000) -> bytes:
    """A tiny PNG whose header declares width x height pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def snapshot(root):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def params(path, source="folder", **data):
    return parse_params({"seed": 3, "data": {"source": source, "path": str(path), **data},
                         "validate": {"max_quarantine_fraction": 1.0}})


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    img, msk = root / "images", root / "masks"
    img.mkdir(parents=True)
    msk.mkdir()
    good = {}
    # Handled correctly.
    rgba = np.dstack([ct(seed=1)] * 3 + [np.full((64, 64), 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(img / "rgba_1.png")
    Image.fromarray(square_mask()).save(msk / "rgba_1.png")
    Image.fromarray(ct(seed=2)).convert("P").save(img / "palette_1.png")
    Image.fromarray(square_mask()).save(msk / "palette_1.png")
    deep = (np.linspace(1000, 3000, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(deep).save(img / "deep_1.png")  # 16-bit grayscale
    Image.fromarray(square_mask()).save(msk / "deep_1.png")
    Image.fromarray(ct(seed=3)).save(img / "jpeg_1.png")
    Image.fromarray(square_mask()).convert("RGB").save(msk / "jpeg_1.jpg", quality=75)
    Image.fromarray(ct(seed=4)).save(img / "fígado_ü_1.png")  # non-ASCII name
    Image.fromarray(square_mask()).save(msk / "fígado_ü_1.png")
    Image.fromarray(ct(seed=5)).save(img / "upper_1.PNG")  # mixed-case extensions
    Image.fromarray(square_mask(value=1)).save(msk / "upper_1.png")  # 0/1 mask
    good = {"rgba_1", "palette_1", "deep_1", "jpeg_1", "upper_1"}
    # Refused or quarantined: {stem: rule}.
    data = (img / "rgba_1.png").read_bytes()
    (img / "trunc_1.png").write_bytes(data[: len(data) // 2])
    (img / "empty_1.png").write_bytes(b"")
    (img / "text_1.jpg").write_text("not an image at all\n")
    (img / "bomb_1.png").write_bytes(bomb_png())
    Image.fromarray(ct(seed=6)).save(img / "nomask_1.png")
    Image.fromarray(square_mask()).save(msk / "noimage_1.png")
    Image.fromarray(ct(seed=7)).save(img / "size_1.png")
    Image.fromarray(square_mask(32)).save(msk / "size_1.png")
    Image.fromarray(ct(seed=8)).save(img / "labels_1.png")
    Image.fromarray(square_mask(value=2)).save(msk / "labels_1.png")  # 0/2: labels, no mapping
    Image.fromarray(ct(seed=9)).save(img / "dupa_1.png")
    (img / "dupb_1.png").write_bytes((img / "dupa_1.png").read_bytes())
    for stem in ("trunc_1", "empty_1", "text_1", "bomb_1", "dupa_1", "dupb_1"):
        Image.fromarray(square_mask()).save(msk / f"{stem}.png")
    (img / "README.txt").write_text("ignored, but reported\n")
    bad = {"trunc_1": "image decodable", "empty_1": "image decodable",
           "text_1": "image decodable", "bomb_1": "image decodable",
           "nomask_1": "pairing complete", "noimage_1": "pairing complete",
           "size_1": "image and mask sizes match (height)", "labels_1": "mask values allowed",
           "dupa_1": "no duplicate image content", "dupb_1": "no duplicate image content"}
    return root, good, bad


def test_corpus_is_handled_quarantined_and_untouched(corpus, tmp_path, monkeypatch):
    root, good, bad = corpus
    before = snapshot(root)
    monkeypatch.chdir(tmp_path)
    summary = ingest.run(params(root))
    assert summary["ignored_files"] == [str(root / "images/README.txt")]
    result = validate.run(params(root))
    manifest = pd.read_parquet("data/manifest.parquet")
    quarantine = pd.read_csv("data/quarantine.csv")
    by_stem = {sid.split("-")[0]: row for sid, row in manifest.set_index("slice_id").iterrows()}
    assert result["ingested"] == result["accepted"] + result["quarantined"] == len(manifest)
    assert result["ingested"] == len(good) + len(bad) + 1  # + the non-ASCII name
    for stem, rule in bad.items():
        row = by_stem[stem]
        assert not row["accepted"] and rule in row["quarantine_reason"], (stem, row)
        entries = quarantine[(quarantine.slice_id == row.name) & (quarantine.rule == rule)]
        assert len(entries) == 1 and entries.path.iloc[0], (stem, quarantine)
    assert "decompression bomb" in quarantine.loc[quarantine.slice_id == "bomb_1", "detail"].iloc[0]
    assert "text_1.jpg" in quarantine.loc[quarantine.slice_id == "text_1", "path"].iloc[0]
    assert "dupb_1" in quarantine.loc[quarantine.slice_id == "dupa_1", "detail"].iloc[0]
    accepted = set(manifest.loc[manifest.accepted, "slice_id"])
    assert good <= accepted
    non_ascii = [s for s in accepted if s.startswith("f")]
    assert len(non_ascii) == 1 and non_ascii[0].isascii()
    deep = casestore.read(tmp_path / "data/raw", manifest.set_index("slice_id").image["deep_1"])
    assert deep.min() == 0 and deep.max() == 255  # its 1000..3000 range kept, not clipped
    assert np.all(np.diff(deep.ravel().astype(int)) >= 0)  # monotone: order preserved
    jpeg = manifest.set_index("slice_id").loc["jpeg_1"]
    assert abs(jpeg.fg_fraction - (24 * 24) / 64**2) < 0.01  # noise thresholded away
    assert snapshot(root) == before  # every input left untouched


def test_policy_fail_lists_every_failing_file(corpus, tmp_path, monkeypatch):
    root, _, bad = corpus
    monkeypatch.chdir(tmp_path)
    p = parse_params({"data": {"source": "folder", "path": str(root)},
                      "validate": {"policy": "fail"}})
    ingest.run(p)
    with pytest.raises(ValidationFailed) as err:
        validate.run(p)
    for stem in bad:
        assert stem in str(err.value)
    assert not (tmp_path / "data/manifest.parquet").exists()


def test_mask_mapping_quarantines_values_outside_it(tmp_path, monkeypatch):
    root = tmp_path / "labels"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, extra in ((1, 0), (2, 7)):
        Image.fromarray(ct(seed=i)).save(root / f"images/p{i}_{i}.png")
        m = square_mask(value=2)
        m[0, 0] = extra
        m[50:60, 50:60] = 1  # liver label, not foreground under the mapping
        Image.fromarray(m).save(root / f"masks/p{i}_{i}.png")
    monkeypatch.chdir(tmp_path)
    p = params(root, folder={"mask_mapping": {0: 0, 1: 0, 2: 1}})
    ingest.run(p)
    validate.run(p)
    q = pd.read_csv("data/quarantine.csv")
    assert q.to_dict("records")[0] | {"detail": ""} == {
        "path": str(root / "masks/p2_2.png"), "rule": "mask values allowed", "detail": "",
        "slice_id": "p2_2"}
    assert "[7]" in q.detail[0]
    fg = pd.read_parquet("data/manifest.parquet").set_index("slice_id").fg_fraction
    assert fg["p1_1"] == pytest.approx(24 * 24 / 64**2)


def test_empty_source_is_refused(tmp_path, monkeypatch):
    (tmp_path / "src/images").mkdir(parents=True)
    (tmp_path / "src/masks").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError, match="empty source"):
        ingest.run(params(tmp_path / "src"))
    with pytest.raises(SourceError, match="empty source"):
        ingest.run(params(tmp_path / "src", source="nifti"))


def _zip_with(tmp_path, name, info: zipfile.ZipInfo, payload=b"x"):
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("data/images/a_1.png", b"fine")
        zf.writestr(info, payload)
    return path


def test_unsafe_archives_are_refused_naming_the_member(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    slip = _zip_with(tmp_path, "slip.zip", zipfile.ZipInfo("data/../../evil.png"))
    with pytest.raises(UnsafeArchiveError, match=r"data/\.\./\.\./evil\.png.*zip-slip"):
        extract(slip, target, params(slip).data.archive)
    link = zipfile.ZipInfo("data/masks/a_1.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    linked = _zip_with(tmp_path, "link.zip", link, b"/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match=r"data/masks/a_1\.png.*symbolic link"):
        extract(linked, target, params(linked).data.archive)
    absolute = _zip_with(tmp_path, "abs.zip", zipfile.ZipInfo("/tmp/evil.png"))
    with pytest.raises(UnsafeArchiveError, match="absolute path"):
        extract(absolute, target, params(absolute).data.archive)
    tar_path = tmp_path / "link.tar"
    with tarfile.open(tar_path, "w") as tf:
        info = tarfile.TarInfo("data/images/b_1.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(UnsafeArchiveError, match=r"b_1\.png.*link"):
        extract(tar_path, target, params(tar_path).data.archive)
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("data/images/z_1.png", b"\0" * 3 * 2**20)  # 3 MB of zeros, ~3 kB zipped
    tiny_limit = params(big, archive={"max_total_mb": 1}).data.archive
    with pytest.raises(UnsafeArchiveError, match="max_total_mb"):
        extract(big, target, tiny_limit)
    assert list(target.iterdir()) == [] and not (tmp_path / "evil.png").exists()


def test_nifti_label_volume_of_another_shape_is_quarantined(tmp_path, monkeypatch):
    root = tmp_path / "lits"
    root.mkdir()
    vol = (RNG.normal(60, 40, (32, 32, 4))).astype(np.int16)
    seg = np.zeros((32, 32, 4), np.uint8)
    seg[8:20, 8:20, :] = 1
    seg[10:14, 10:14, 1:3] = 2
    for n, seg_shape in ((1, seg), (2, seg[:, :16])):
        nib.save(nib.Nifti1Image(vol, np.eye(4)), root / f"volume-{n}.nii.gz")
        nib.save(nib.Nifti1Image(seg_shape, np.eye(4)), root / f"segmentation-{n}.nii")
    monkeypatch.chdir(tmp_path)
    p = params(root, source="nifti", target="liver")
    before = snapshot(root)
    assert ingest.run(p)["slices"] == 4  # volume 1; volume 2 is one quarantine row
    validate.run(p)
    q = pd.read_csv("data/quarantine.csv")
    assert q.path.tolist() == [str(root / "volume-2.nii.gz")]
    assert "(32, 32, 4)" in q.detail[0] and "(32, 16, 4)" in q.detail[0]
    assert snapshot(root) == before


def test_bomb_png_helper_really_declares_the_size():
    with Image.open(io.BytesIO(bomb_png(100, 50))) as img:
        assert img.size == (100, 50)
