import json

import numpy as np
import pandas as pd
import pytest

from liverseg import casestore
from liverseg.data import phantom
from liverseg.stages import data_docs, ingest, split, validate
from liverseg.stages.split import LeakageError, check_no_leakage
from liverseg.stages.validate import ValidationFailed
from tests.helpers import rewrite_slot, without_cases


def test_ingest_writes_one_case_file_per_patient(workdir, tiny_params):
    summary = ingest.run(tiny_params)
    index = pd.read_csv("data/raw/slices.csv", dtype={"patient_id": str})
    assert without_cases(summary) == {"source": "phantom", "classes": ["background", "tumour"],
                                      "slices": 24, "sampled": 24, "patients": 6}
    assert summary["cases"] | {"workers": 0} == {"total": 6, "ingested": 6, "reused": 0,
                                                 "workers": 0}
    assert len(index) == 24 and sorted(p.name for p in workdir.glob("data/raw/**/*.*")) == \
        sorted([f"phantom{p:03d}.h5" for p in range(6)] + ["classes.json", "slices.csv"])
    mask = casestore.read("data/raw", index["mask"][0], "mask")
    assert set(np.unique(mask)) <= {0, 255} and mask.shape == (64, 64)
    # The stored slices are the phantom's own, bit for bit.
    first = next(phantom.generate(6, 4, 64, 4, 12.0, tiny_params.seed))
    np.testing.assert_array_equal(casestore.read("data/raw", index["image"][0]), first.image)
    pairs = zip(index.slice_id, index.patient_id, strict=True)
    assert all(sid.startswith(pid) for sid, pid in pairs)
    assert not [p for p in workdir.glob("data/.raw*")]  # no temporary left behind


def test_validate_accepts_clean_data_and_counts_reconcile(split_data):
    report = json.loads((split_data / "reports/validation.json").read_text())
    manifest = pd.read_parquet(split_data / "data/manifest.parquet")
    assert report["success"] and report["quarantined"] == 0
    assert report["ingested"] == report["accepted"] + report["quarantined"] == len(manifest)
    for col in ("image_sha256", "mask_sha256", "width", "height", "fg_fraction", "patient_id"):
        assert manifest[col].notna().all(), col


def _break_dataset(raw):
    index = pd.read_csv(raw / "slices.csv", dtype={"patient_id": str})
    rewrite_slot(raw, index["mask"][0], mask=np.full((64, 64), 7, np.uint8))  # not binary
    rewrite_slot(raw, index["image"][2], image=casestore.read(raw, index["image"][1]))  # twice
    index.loc[3, "mask"] = index["mask"][3].rsplit("/", 1)[0] + "/99"  # a slot not there
    index.to_csv(raw / "slices.csv", index=False)
    return index


def test_bad_slices_are_quarantined_named_and_failed_in_the_data_docs(workdir, tiny_params):
    ingest.run(tiny_params)
    index = _break_dataset(workdir / "data/raw")
    params = tiny_params.model_copy(update={"validate_": tiny_params.validate_.model_copy(
        update={"max_quarantine_fraction": 0.5})})
    summary = validate.run(params)
    report = json.loads((workdir / "reports/validation.json").read_text())
    quarantine = report["quarantine"]
    assert summary["quarantined"] == 4 and summary["accepted"] == 20
    assert quarantine[index.slice_id[0]] == ["mask is binary (0/255)"]
    assert quarantine[index.slice_id[1]] == quarantine[index.slice_id[2]] == [
        "no duplicate image content"]
    assert "mask file exists" in quarantine[index.slice_id[3]]
    manifest = pd.read_parquet(workdir / "data/manifest.parquet")
    assert len(manifest) == 24 and (~manifest.accepted).sum() == 4  # kept, not dropped
    _, html, text = _docs_page(workdir)  # the GX Data Docs of the same run
    assert "Status: Failed" in text and "Unsuccessful Expectations 3" in text
    assert "of 24 total rows" in text and index.slice_id[0] in text
    assert _rule_status(html, "mask is binary (0/255)") == "failed"
    assert _rule_status(html, "no duplicate image content") == "failed"
    assert _rule_status(html, "slice id is unique") == "passed"


def test_too_many_bad_slices_fail_the_stage_naming_them(workdir, tiny_params):
    ingest.run(tiny_params)
    index = _break_dataset(workdir / "data/raw")
    with pytest.raises(ValidationFailed, match=index.slice_id[0]):
        validate.run(tiny_params)  # default limit 0.1 < 4/24
    assert not (workdir / "data/manifest.parquet").exists()


def test_split_is_grouped_deterministic_and_has_stats(split_data, tiny_params):
    train = pd.read_csv(split_data / "data/splits/train.csv", dtype={"patient_id": str})
    val = pd.read_csv(split_data / "data/splits/val.csv", dtype={"patient_id": str})
    stats = json.loads((split_data / "data/splits/stats.json").read_text())
    assert not set(train.patient_id) & set(val.patient_id)
    assert len(train) + len(val) == 24 and val.patient_id.nunique() >= 1
    # Equal to the train slices' own pixel statistics, read from the case files directly.
    pixels = np.concatenate([casestore.read_case(path)[0]["64x64"][0].ravel()
                             for path in sorted((split_data / "data/raw/cases").glob("*.h5"))
                             if path.stem in set(train.patient_id)]) / 255.0
    assert stats["mean"] == pytest.approx(pixels.mean(), abs=1e-12)
    assert stats["std"] == pytest.approx(pixels.std(), rel=1e-9)
    before = val.slice_id.tolist()
    split.run(tiny_params)
    assert pd.read_csv(split_data / "data/splits/val.csv").slice_id.tolist() == before


def test_leakage_check_catches_a_shared_patient():
    a = pd.DataFrame({"patient_id": ["p1", "p2"]})
    b = pd.DataFrame({"patient_id": ["p2"]})
    with pytest.raises(LeakageError, match="p2"):
        check_no_leakage({"train": a, "val": b})


def test_leakage_check_catches_identical_image_content():
    a = pd.DataFrame({"patient_id": ["p1"], "image_sha256": ["abc"]})
    b = pd.DataFrame({"patient_id": ["p2"], "image_sha256": ["abc"]})
    with pytest.raises(LeakageError, match="image content abc"):
        check_no_leakage({"train": a, "val": b})


def test_a_patients_side_never_moves_when_patients_arrive_or_leave():
    patients = [f"p{i:03d}" for i in range(200)]
    side = split.assign_patients(patients, 0.25, 1, test_fraction=0.1)
    counts = pd.Series(side).value_counts()
    assert 30 <= counts["val"] <= 70 and 8 <= counts["test"] <= 35  # the fractions, roughly
    more = split.assign_patients(patients + [f"new{i}" for i in range(50)], 0.25, 1, 0.1)
    fewer = split.assign_patients(patients[::2], 0.25, 1, 0.1)
    assert {p: more[p] for p in patients} == side  # 50 arrived: nobody moved
    assert {p: fewer[p] for p in patients[::2]} == {p: side[p] for p in patients[::2]}
    assert split.assign_patients(patients, 0.25, 2, 0.1) != side  # the seed does place them
    # A tiny set still gets a validation patient.
    tiny = split.assign_patients(["a", "b"], 0.01, 1)
    assert sorted(tiny.values()) == ["train", "val"]
    with pytest.raises(ValueError, match="at least 2 patients"):
        split.assign_patients(["a"], 0.5, 1)


def test_msd_split_keeps_volumes_apart_and_a_slice_split_leaks(shared_data, workdir):
    from liverseg.config import parse_params

    p = parse_params({"seed": 11, "data": {"source": "folder", "target": "liver",
                                           "path": str(shared_data / "msd-liver-slices")},
                      "split": {"val_fraction": 0.2, "test_fraction": 0.1}})
    ingest.run(p)
    validate.run(p)
    assert split.run(p)["test"] > 0
    frames = {n: pd.read_csv(workdir / f"data/splits/{n}.csv", dtype={"patient_id": str})
              for n in ("train", "val", "test")}
    volumes = [set(f.patient_id) for f in frames.values()]
    assert not (volumes[0] & volumes[1] or volumes[0] & volumes[2] or volumes[1] & volumes[2])
    assert sum(len(f) for f in frames.values()) == 527
    assert all("id" in f and f.id.equals(f.slice_id) for f in frames.values())
    stats = json.loads((workdir / "data/splits/stats.json").read_text())
    assert stats["leakage_checked"] and stats["grouped_by"] == "patient"
    # A slice-level random split puts flipped/mirrored slices of one volume on both sides.
    everything = pd.concat(frames.values()).sample(frac=1, random_state=0)
    naive = {"train": everything.iloc[:400], "val": everything.iloc[400:]}
    with pytest.raises(LeakageError, match="patient .* is in both"):
        check_no_leakage(naive)
    # The README's reference split: volume % 5 == 4 -> val, == 0 -> test, the rest train.
    ref = p.model_copy(update={"split": p.split.model_validate(
        {"patient_modulo": {"modulus": 5, "val": [4], "test": [0]}})})
    counts = split.run(ref)
    assert counts["train"] + counts["val"] + counts["test"] == 527
    for name, residues in (("train", {1, 2, 3}), ("val", {4}), ("test", {0})):
        frame = pd.read_csv(workdir / f"data/splits/{name}.csv", dtype={"patient_id": str})
        assert {int(v) % 5 for v in frame.patient_id} <= residues, name
        assert name == "test" or len(frame) > 0  # this copy of MSD has no volume % 5 == 0


def test_patient_modulo_rule_needs_numeric_ids_and_disjoint_residues():
    from liverseg.config import ConfigError, parse_params

    rule = parse_params({"split": {"patient_modulo": {"modulus": 5, "val": [4]}}})
    assert split.assign_by_modulo(["009", "014", "3"], rule.split.patient_modulo) == {
        "009": "val", "014": "val", "3": "train"}
    with pytest.raises(ValueError, match="numeric patient ids.*'p1'"):
        split.assign_by_modulo(["p1"], rule.split.patient_modulo)
    with pytest.raises(ConfigError, match="both val and test"):
        parse_params({"split": {"patient_modulo": {"modulus": 5, "val": [4], "test": [4]}}})
    with pytest.raises(ConfigError, match=r"residues \[7\] are not in 0..4"):
        parse_params({"split": {"patient_modulo": {"modulus": 5, "val": [7]}}})
    with pytest.raises(ConfigError, match="needs group_by: patient"):
        parse_params({"split": {"group_by": "slab", "patient_modulo": {"modulus": 5, "val": [4]}}})


def _docs_page(root):
    """Text and HTML of the one GX validation result page under reports/validation."""
    import re

    (page,) = (root / "reports/validation/validations").glob("**/*.html")
    html = page.read_text(encoding="utf-8")
    text = re.sub(r"<script.*?</script>|<style.*?</style>|<[^>]+>", " ", html, flags=re.S)
    return page, html, " ".join(text.split())


def _rule_status(html, rule):
    """GX puts a rule's status icon just before its text in the result table."""
    before = html[:html.index(rule)]
    return "failed" if before.rfind("text-danger") > before.rfind("text-success") else "passed"


def test_validate_writes_gx_data_docs_readable_offline(split_data, tiny_params):
    validate.run(tiny_params)  # a rerun replaces the site: still one result page
    docs = split_data / "reports/validation"
    index = (docs / "index.html").read_text(encoding="utf-8")
    page, html, text = _docs_page(split_data)
    assert len(index) > 5000 and len(html) > 20000
    assert "Status: Succeeded" in text and "Unsuccessful Expectations 0" in text
    assert _rule_status(html, "mask is binary (0/255)") == "passed"
    assert data_docs.OFFLINE_CSS.strip() in html  # status icons without the CDN's Font Awesome
    assert f'href="{page.relative_to(docs).as_posix()}"' in index  # a link that needs no JS
    assert (docs / "expectations/manifest.html").is_file()
    assert not list(split_data.glob("reports/.validation*"))  # no temporary left behind


def test_failed_data_docs_build_keeps_the_previous_site(split_data, tiny_params, monkeypatch):
    before = (split_data / "reports/validation/index.html").read_bytes()

    def broken(site):
        (site / "index.html").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(data_docs, "link_runs_from_index", broken)
    with pytest.raises(OSError, match="disk full"):
        validate.run(tiny_params)
    assert (split_data / "reports/validation/index.html").read_bytes() == before
    assert not list(split_data.glob("reports/.validation*"))


def test_the_loader_reads_each_slice_from_its_case_file(split_data):
    import torch

    from liverseg.data.dataset import SliceDataset

    splits = split_data / "data/splits"
    stats = json.loads((splits / "stats.json").read_text())
    assert not list(splits.glob("*.npy"))  # no decoded copy of the data
    val = SliceDataset(splits / "val.csv", split_data / "data/raw", 64, stats["mean"],
                       stats["std"])
    row = val.rows[-1]
    case, record = casestore.read_case(split_data / "data/raw/cases" / f"{row['case']}.h5")
    k = int(row["image"].rsplit("/", 1)[1])
    image, mask = val.stored(len(val) - 1)
    np.testing.assert_array_equal(image, case["64x64"][0][k])
    np.testing.assert_array_equal(mask, case["64x64"][1][k] // 255)
    x, y, sid = val[len(val) - 1]
    assert sid == row["slice_id"] and x.shape == (1, 64, 64) and y.shape == (1, 64, 64)
    assert torch.equal(y[0], torch.from_numpy(mask.astype(np.float32)))


def test_the_case_reader_reads_as_the_case_store_does_one_file_at_a_time(split_data):
    from liverseg.casescan import CaseReader, case_order

    raw = split_data / "data/raw"
    index = pd.read_csv(raw / "slices.csv", keep_default_na=False)
    rows = index.sample(frac=1, random_state=1)[["image", "context"]].to_dict("records")
    order = case_order([row["image"] for row in rows])
    cases = [row["image"].partition("#")[0] for row in rows]
    assert sorted(order) == list(range(len(rows)))
    assert [cases[i] for i in order] == sorted(cases)  # grouped by case file
    with CaseReader(raw) as reader:
        for i in order:
            for what in ("image", "mask"):
                np.testing.assert_array_equal(reader.read(rows[i]["image"], what),
                                              casestore.read(raw, rows[i]["image"], what))
        assert reader.opened == index["case"].nunique()  # each file once, in case order
        ref = casestore.SliceRef.parse(rows[0]["image"])
        for bad, error in ((f"{ref.case_file}#{ref.group}/99", IndexError),
                           (f"{ref.case_file}#1x1/0", KeyError),
                           (f"cases/gone.h5#{ref.group}/0", FileNotFoundError),
                           ("not a reference", ValueError)):
            with pytest.raises(error):
                reader.read(bad)
        assert len(reader._open) == 1
    assert not reader._open  # closed on exit
    # The split's statistics, read in case order, pooled in row order: the same figures,
    # bit for bit, as reading every row's image in row order.
    assert split.train_pixel_stats(raw, rows) == split.pixel_stats(
        casestore.read(raw, row["image"]) for row in rows)
