"""The `dicom` data source over DICOMweb, against a real Orthanc (the PACS test's): the source
stage mirrors the archive and lists every study, series and SOP instance UID with the
SHA-256 of its file into data/source.json; ingest of the mirror is what the folder source
makes of the same files; the mirror follows the archive (a study stored is fetched, one
deleted disappears, nothing else is fetched again); a down archive or one that refuses the
credentials fails the listing by its URL and leaves the mirror as it was; credentials in
params are refused. Over `dvc repro` of a repository copy: a study added to the archive is
ingested and trained on, and with nothing added only the listing reruns."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from base64 import b64encode
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml

from liverseg import casestore
from liverseg.artifacts import DICOMWEB_MIRROR, Artifacts
from liverseg.config import ConfigError, parse_params
from liverseg.data.layout import read_index
from liverseg.dicom import series as dicom
from liverseg.dicom import web
from liverseg.io import sha256_file
from liverseg.stages import ingest, source
from tests.dicom_labels_data import label_on_frames, write_seg_highdicom
from tests.dicom_series import write_series
from tests.helpers import (
    SHARED_DATA,
    UP_TO_DATE,
    copy_repository,
    dvc_status,
    repo_env,
    sh,
    stages_run,
    tiny_raw_params,
    tracking_uri,
)
from tests.test_pacs import Orthanc, orthanc  # noqa: F401 -- the fixture, shared

# One study per patient: a 12-slice slab of lits-117 (liver and tumour on every slice),
# each slab under its own PatientID, so the split has patients to share out.
SLABS = {"A": (slice(88, 100), "117"), "B": (slice(40, 52), "218"), "C": (slice(60, 72), "319")}


@dataclass(frozen=True)
class Study:
    folder: Path  # ct/ (the series' files) and seg.dcm (a human SEG of it)
    patient: str
    study_uid: str
    series_uid: str
    seg_series_uid: str
    seg_uid: str
    ct_uids: tuple[str, ...]

    @property
    def files(self) -> list[Path]:
        return sorted((self.folder / "ct").iterdir()) + [self.folder / "seg.dcm"]

    def mirrored(self) -> set[str]:
        """The listing names of its instances: <study>/<series>/<sop>.dcm."""
        return {f"{self.study_uid}/{self.series_uid}/{uid}.dcm" for uid in self.ct_uids} | {
            f"{self.study_uid}/{self.seg_series_uid}/{self.seg_uid}.dcm"}


def _write_study(root: Path, slab: slice, patient: str) -> Study:
    root.mkdir(parents=True)
    for name in ("volume-117.nii.gz", "segmentation-117.nii.gz"):
        nib.save(nib.load(str(SHARED_DATA / "lits-117" / name)).slicer[:, :, slab],
                 str(root / name))
    files = write_series(root / "volume-117.nii.gz", root / "ct")
    for f in files:  # another patient's study
        ds = pydicom.dcmread(f)
        ds.PatientID, ds.PatientName = patient, f"Test^{patient}"
        ds.save_as(f)
    (series,) = dicom.find_series(files).series
    _, datasets = dicom.load_series(series)
    labels = label_on_frames(root / "segmentation-117.nii.gz", datasets)
    assert (labels == 1).any() and (labels == 2).any()
    seg = pydicom.dcmread(write_seg_highdicom(datasets, labels, root / "seg.dcm"))
    return Study(root, patient, series.study_uid, series.uid, str(seg.SeriesInstanceUID),
                 str(seg.SOPInstanceUID), tuple(str(d.SOPInstanceUID) for d in datasets))


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, Study]:
    if not SHARED_DATA.is_dir():
        if os.environ.get("LIVERSEG_REQUIRE_SHARED_DATA"):
            pytest.fail(f"{SHARED_DATA} is missing but LIVERSEG_REQUIRE_SHARED_DATA is set")
        pytest.skip("../shared/data not present")
    root = tmp_path_factory.mktemp("archive-studies")
    return {name: _write_study(root / name, slab, patient)
            for name, (slab, patient) in SLABS.items()}


def stow(url: str, study: Study) -> None:
    """The study's CT series and its SEG into the archive, by STOW-RS."""
    web.connect(url).store_instances([pydicom.dcmread(f) for f in study.files])


def delete(server: Orthanc, study: Study) -> None:
    """The study deleted from Orthanc (its REST API: DICOMweb has no delete)."""
    lookup = urllib.request.urlopen(urllib.request.Request(
        f"{server.url}/tools/lookup", study.study_uid.encode()), timeout=30)
    (found,) = [r for r in json.loads(lookup.read()) if r["Type"] == "Study"]
    urllib.request.urlopen(urllib.request.Request(f"{server.url}/studies/{found['ID']}",
                                                  method="DELETE"), timeout=30).read()


def _params(**data):
    return parse_params(tiny_raw_params(
        data={"source": "dicom", "target": "liver_tumour", "nifti": {"slices": "all"}} | data,
        model={"num_classes": 3}))


def _archive(url: str):
    return _params(dicom={"url": url})


def _listed(root: Path) -> dict[str, str]:
    """data/source.json's files: name -> SHA-256."""
    listing = json.loads(Artifacts(root).source_listing.read_text())
    return {name: digest for name, _, digest in listing["files"]}


def _stored(root: Path) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    index = read_index(root / "data/raw")
    rows = index[index["image"] != ""].sort_values(["patient_id", "slice_index"])
    raw = root / "data/raw"
    return (np.stack([casestore.read(raw, r, "image") for r in rows["image"]]),
            np.stack([casestore.read(raw, r, "mask") for r in rows["mask"]]), rows)


def test_an_archive_study_is_listed_by_uid_and_hash_and_ingested_as_its_files_are(
        orthanc, studies, tmp_path, monkeypatch):  # noqa: F811
    """STOW a CT series and a human SEG; the source stage lists exactly their UIDs with the
    SHA-256 of each mirrored file, and ingest makes of the mirror the case the folder source
    makes of the files themselves: the same windowed slices and label voxels."""
    url, study = f"{orthanc.url}/dicom-web", studies["A"]
    stow(url, study)
    work = tmp_path / "w"
    work.mkdir()
    monkeypatch.chdir(work)
    summary = source.run(_archive(url))
    listing = json.loads(Artifacts(".").source_listing.read_text())
    assert listing["source"] == "dicom" and listing["archive"]["url"] == url
    listed = _listed(work)
    assert set(listed) == study.mirrored() and summary["files"] == len(study.files)
    for name, digest in listed.items():
        mirrored = work / DICOMWEB_MIRROR / name
        assert sha256_file(mirrored) == digest
        assert str(pydicom.dcmread(mirrored).SOPInstanceUID) == Path(name).stem

    from_archive = ingest.run(_archive(url))
    assert from_archive["cases"]["total"] == 1 and from_archive["labelled_series"] == 1
    images, masks, rows = _stored(work)
    (tmp_path / "f").mkdir()
    monkeypatch.chdir(tmp_path / "f")
    ingest.run(_params(path=str(study.folder)))
    want_images, want_masks, _ = _stored(tmp_path / "f")
    assert len(images) == len(study.ct_uids)
    np.testing.assert_array_equal(images, want_images)
    np.testing.assert_array_equal(masks, want_masks)
    assert (masks == 255).any() and (masks == 128).any()  # tumour and liver: not vacuous
    assert set(rows["study_uid"]) == {study.study_uid}
    assert set(rows["series_uid"]) == {study.series_uid}
    assert set(rows["label_uid"]) == {study.seg_uid} and set(rows["origin"]) == {"human"}
    assert set(rows["patient_id"]) == {study.patient}


def test_the_mirror_follows_the_archive(orthanc, studies, tmp_path, monkeypatch):  # noqa: F811
    """A study stored later is fetched and nothing else is; a study deleted from the archive
    leaves the mirror, the listing and the ingested cases; a listing with nothing changed
    is the same file."""
    url, a, b = f"{orthanc.url}/dicom-web", studies["A"], studies["B"]
    monkeypatch.chdir(tmp_path)
    mirror = tmp_path / DICOMWEB_MIRROR
    stow(url, a)
    source.run(_archive(url))
    first = Artifacts(".").source_listing.read_bytes()
    kept = {p: p.stat().st_mtime_ns for p in mirror.rglob("*.dcm")}
    assert len(kept) == len(a.files)
    source.run(_archive(url))
    assert Artifacts(".").source_listing.read_bytes() == first

    stow(url, b)
    counts = web.mirror(url, mirror)
    assert (counts["fetched"], counts["removed"]) == (len(b.files), 0)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # A's files not fetched again
    source.run(_archive(url))
    assert set(_listed(tmp_path)) == a.mirrored() | b.mirrored()
    ingest.run(_archive(url))
    assert set(_stored(tmp_path)[2]["patient_id"]) == {a.patient, b.patient}

    delete(orthanc, a)
    source.run(_archive(url))
    assert set(_listed(tmp_path)) == b.mirrored()
    assert not (mirror / a.study_uid).exists()  # no empty folders of a deleted study left
    assert {p.relative_to(mirror).as_posix() for p in mirror.rglob("*.dcm")} == b.mirrored()
    ingest.run(_archive(url))
    assert set(_stored(tmp_path)[2]["study_uid"]) == {b.study_uid}


def test_an_archive_that_does_not_answer_fails_the_listing_by_its_url_and_keeps_the_mirror(
        orthanc, studies, tmp_path, monkeypatch):  # noqa: F811
    """Never an empty listing from a down archive (which would drop every case): the source
    stage fails naming the archive, and the mirror and data/source.json stay as they were."""
    url = f"{orthanc.url}/dicom-web"
    stow(url, studies["A"])
    monkeypatch.chdir(tmp_path)
    source.run(_archive(url))
    before = Artifacts(".").source_listing.read_bytes()
    orthanc.stop()
    with pytest.raises(web.ArchiveUnavailable, match=f"{url}.*unreachable"):
        source.run(_archive(url))
    assert Artifacts(".").source_listing.read_bytes() == before
    assert {p.relative_to(tmp_path / DICOMWEB_MIRROR).as_posix()
            for p in (tmp_path / DICOMWEB_MIRROR).rglob("*.dcm")} == studies["A"].mirrored()


def test_credentials_in_the_url_are_refused_at_parse_time_naming_the_key():
    with pytest.raises(ConfigError) as refused:
        parse_params(tiny_raw_params(data={"source": "dicom", "dicom": {
            "url": "https://alice:s3cret@pacs.example:8042/dicom-web"}}))
    assert "data.dicom.url" in str(refused.value) and "LIVERSEG_DICOMWEB_USER" in str(
        refused.value)
    assert "s3cret" not in str(refused.value) and "alice" not in str(refused.value)
    with pytest.raises(ConfigError, match="data.dicom.url"):  # a user name alone, too
        parse_params(tiny_raw_params(data={"source": "dicom", "dicom": {
            "url": "https://alice@pacs.example/dicom-web"}}))


class GuardedOrthanc(Orthanc):
    """Orthanc that asks for HTTP basic credentials."""

    USER, PASSWORD = "liverseg", "pw-9f2c1e"

    def __init__(self, root: Path):
        super().__init__(root)
        config = json.loads((root / "orthanc.json").read_text())
        config |= {"AuthenticationEnabled": True, "RegisteredUsers": {self.USER: self.PASSWORD}}
        (root / "orthanc.json").write_text(json.dumps(config))

    def start(self) -> None:
        import time

        self.proc = subprocess.Popen(["/usr/sbin/Orthanc", str(self.root / "orthanc.json")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        auth = b64encode(f"{self.USER}:{self.PASSWORD}".encode()).decode()
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(urllib.request.Request(
                    f"{self.url}/system", headers={"Authorization": f"Basic {auth}"}), timeout=2)
                return
            except OSError:
                assert self.proc.poll() is None and time.time() < deadline, "Orthanc not up"
                time.sleep(0.3)


def test_credentials_come_from_the_environment(orthanc, studies, tmp_path,  # noqa: F811
                                               monkeypatch):
    """An archive that asks for a password: refused (naming the URL, never the password)
    without LIVERSEG_DICOMWEB_USER/PASSWORD, listed with them."""
    orthanc.stop()  # the fixture's: it checked that Orthanc and the plugin are here
    guarded = GuardedOrthanc(tmp_path / "guarded")
    guarded.start()
    try:
        url = f"{guarded.url}/dicom-web"
        monkeypatch.setenv(web.USER_ENV, guarded.USER)
        monkeypatch.setenv(web.PASSWORD_ENV, guarded.PASSWORD)
        stow(url, studies["A"])
        monkeypatch.chdir(tmp_path)
        source.run(_archive(url))
        assert set(_listed(tmp_path)) == studies["A"].mirrored()
        monkeypatch.setenv(web.PASSWORD_ENV, "wrong")
        with pytest.raises(web.ArchiveUnavailable, match="401") as refused:
            source.run(_archive(url))
        assert url in str(refused.value) and guarded.PASSWORD not in str(refused.value)
        monkeypatch.delenv(web.USER_ENV)
        monkeypatch.delenv(web.PASSWORD_ENV)
        monkeypatch.setenv("NETRC", str(tmp_path / "none"))  # no netrc entry either
        with pytest.raises(web.ArchiveUnavailable, match="401"):
            source.run(_archive(url))
    finally:
        guarded.stop()


def _lock(root: Path) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"]


def _out_md5(locked: dict, stage: str, path: str) -> str:
    return next(o["md5"] for o in locked[stage]["outs"] if o["path"] == path)


@pytest.mark.slow
def test_a_study_added_to_the_archive_is_ingested_and_trained_on_and_nothing_else_reruns(
        orthanc, studies, tmp_path):  # noqa: F811
    """`dvc repro` of a repository whose data is the archive (no data.path) trains; a study
    stored in the archive afterwards is ingested and the model retrained by the next
    `dvc repro`; one more with nothing added reruns the listing only."""
    url = f"{orthanc.url}/dicom-web"
    for name in ("A", "B"):
        stow(url, studies[name])
    root = tmp_path / "repo"
    root.mkdir()
    copy_repository(root, tiny_raw_params(data={"source": "dicom", "target": "liver",
                                                "dicom": {"url": url}}))
    env = repo_env(DAGSTER_HOME=str(root / ".dagster_home"),
                   MLFLOW_TRACKING_URI=tracking_uri(root))
    first = stages_run(sh(["dvc", "repro"], root, env))
    assert {"source", "ingest", "train@enhanced_pan"} <= set(first)
    assert set(_listed(root)) == studies["A"].mirrored() | studies["B"].mirrored()
    index = read_index(root / "data/raw")
    assert set(index["study_uid"]) == {studies["A"].study_uid, studies["B"].study_uid}
    locked = _lock(root)

    stow(url, studies["C"])
    added = stages_run(sh(["dvc", "repro"], root, env))
    assert {"source", "ingest", "train@enhanced_pan"} <= set(added)
    now = _lock(root)
    assert _out_md5(now, "ingest", "data/raw") != _out_md5(locked, "ingest", "data/raw")
    assert _out_md5(now, "train@enhanced_pan", "models/enhanced_pan") != \
        _out_md5(locked, "train@enhanced_pan", "models/enhanced_pan")
    assert set(read_index(root / "data/raw")["study_uid"]) == {
        s.study_uid for s in studies.values()}
    assert set(_listed(root)) == set().union(*(s.mirrored() for s in studies.values()))

    assert stages_run(sh(["dvc", "repro"], root, env)) == ["source"]
    assert _lock(root) == now
    assert dvc_status(root, env) == UP_TO_DATE


def test_the_study_date_filter_chooses_what_is_mirrored(orthanc, studies, tmp_path,  # noqa: F811
                                                         monkeypatch):
    """data.dicom.study_date is a QIDO-RS range: a range without the study mirrors nothing
    (an empty listing; ingest then says there is no DICOM file), one with it everything."""
    url = f"{orthanc.url}/dicom-web"
    stow(url, studies["A"])  # StudyDate 20260101
    monkeypatch.chdir(tmp_path)
    source.run(_params(dicom={"url": url, "study_date": "20250101-20251231"}))
    assert _listed(tmp_path) == {}
    with pytest.raises(Exception, match="no DICOM files"):
        ingest.run(_params(dicom={"url": url, "study_date": "20250101-20251231"}))
    source.run(_params(dicom={"url": url, "study_date": "20251231-"}))
    assert set(_listed(tmp_path)) == studies["A"].mirrored()
