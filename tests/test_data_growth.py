"""A source that grows: a case added to a folder is seen by `dvc status`, the Dagster data
sensor and the retrain job; only that case is ingested, no other case file changes and no
patient changes sides; with nothing added, a retrain is the no-op it should be."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from liverseg.data import phantom
from liverseg.fanout.dvc_graph import load_stages
from liverseg.io import sha256_file
from liverseg.stages import ingest
from pipeline.resources import DvcResource
from pipeline.sensors import data_source_sensor
from tests.helpers import (
    UP_TO_DATE,
    copy_repository,
    dvc_status,
    repo_env,
    sh,
    tiny_raw_params,
    tracking_uri,
)


def write_patient(folder: Path, p: int, slices: int = 4, size: int = 64) -> None:
    """Patient `p` of the phantom as 2D files: `images/p<p>_<k>.png` beside masks."""
    for sl in phantom.generate_patient(p, slices, size, 2, 12.0, seed=3):
        for kind, array in (("images", sl.image), ("masks", (sl.labels > 0) * np.uint8(255))):
            (folder / kind).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(folder / kind / f"p{p:02d}_{sl.slice_index}.png")


def case_hashes(root: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted((root / "data/raw/cases").glob("*.h5"))}


def sides(root: Path) -> dict[str, str]:
    out = {}
    for name in ("train", "val", "test"):
        frame = pd.read_csv(root / f"data/splits/{name}.csv", dtype={"patient_id": str})
        out |= {p: name for p in frame.patient_id.unique()}
    return out


def lock(root: Path) -> dict:
    import yaml

    return yaml.safe_load((root / "dvc.lock").read_text())["stages"]


def out_md5(locked: dict, stage: str, path: str) -> str:
    return next(o["md5"] for o in locked[stage]["outs"] if o["path"] == path)


def sensor_tick(root: Path, cursor: str | None):
    context = dg.build_sensor_context(cursor=cursor,
                                      resources={"dvc": DvcResource(repo_root=str(root))})
    return data_source_sensor(context), context.cursor


def test_ingest_reuses_unchanged_cases_and_drops_removed_ones(workdir):
    incoming = workdir / "incoming"
    for p in range(3):
        write_patient(incoming, p)
    from liverseg.config import parse_params

    params = parse_params(tiny_raw_params(data={"source": "folder", "path": str(incoming)}))
    first = ingest.run(params)
    assert first["cases"] | {"workers": 0} == {"total": 3, "ingested": 3, "reused": 0,
                                               "workers": 0}
    before = case_hashes(workdir)
    write_patient(incoming, 3)
    second = ingest.run(params)
    assert (second["cases"]["ingested"], second["cases"]["reused"]) == (1, 3)
    after = case_hashes(workdir)
    assert {k: after[k] for k in before} == before and set(after) - set(before) == {"p03.h5"}
    for kind in ("images", "masks"):  # patient 1 leaves: its file and rows go
        for f in (incoming / kind).glob("p01_*"):
            f.unlink()
    third = ingest.run(params)
    index = pd.read_csv(workdir / "data/raw/slices.csv", dtype={"patient_id": str})
    assert third["cases"]["ingested"] == 0 and "p01.h5" not in case_hashes(workdir)
    assert "p01" not in set(index.patient_id) and len(index) == 12
    assert len(list((workdir / ".liverseg/ingest").glob("*.h5"))) == 3  # the last run's


def test_a_case_file_edited_in_place_is_made_again_not_trusted(workdir):
    from liverseg.config import parse_params

    incoming = workdir / "incoming"
    for p in range(2):
        write_patient(incoming, p)
    params = parse_params(tiny_raw_params(data={"source": "folder", "path": str(incoming)}))
    ingest.run(params)
    before = case_hashes(workdir)
    edited = workdir / "data/raw/cases/p00.h5"  # a hard link to the store's file
    with open(edited, "ab") as fh:
        fh.write(b"\0")
    again = ingest.run(params)
    assert (again["cases"]["ingested"], again["cases"]["reused"]) == (1, 1)
    assert case_hashes(workdir) == before


def test_case_files_are_the_same_bytes_for_one_and_two_workers(workdir, monkeypatch):
    from liverseg.config import parse_params

    incoming = workdir / "incoming"
    for p in range(3):
        write_patient(incoming, p)
    params = parse_params(tiny_raw_params(data={"source": "folder", "path": str(incoming)}))
    hashes = []
    for workers in ("1", "2"):
        monkeypatch.setenv("LIVERSEG_INGEST_WORKERS", workers)
        for stale in (workdir / ".liverseg/ingest").glob("*.h5"):
            stale.unlink()  # make every case again
        assert ingest.run(params)["cases"]["workers"] == int(workers)
        hashes.append(case_hashes(workdir) | {"index": sha256_file(
            workdir / "data/raw/slices.csv")})
    assert hashes[0] == hashes[1] and len(hashes[0]) == 4


def test_ingest_workers_even_one_keep_freed_memory_and_the_stage_s_process_never(
        workdir, monkeypatch):
    """heap.keep_freed (no trimming, no separate mappings) is for processes that make case
    after case; several cases go to worker processes even with one worker, and the stage's
    own process, which may be Dagster's, never calls it; a single case is made in place."""
    import os

    from liverseg import heap
    from liverseg.config import parse_params

    calls = workdir / "keep_freed.pids"
    monkeypatch.setattr(heap, "keep_freed",
                        lambda: calls.open("a").write(f"{os.getpid()}\n"))
    monkeypatch.setenv("LIVERSEG_INGEST_WORKERS", "1")
    incoming = workdir / "incoming"
    for p in range(2):
        write_patient(incoming, p)
    params = parse_params(tiny_raw_params(data={"source": "folder", "path": str(incoming)}))
    assert ingest.run(params)["cases"] == {"total": 2, "ingested": 2, "reused": 0,
                                           "workers": 1}
    pids = calls.read_text().split()
    assert len(pids) == 1 and int(pids[0]) != os.getpid()  # one worker, not this process
    write_patient(incoming, 2)
    assert ingest.run(params)["cases"]["ingested"] == 1  # one case: here, no pool
    assert calls.read_text().split() == pids


@pytest.mark.slow
def test_a_case_added_to_the_folder_retrains_through_the_sensor_and_nothing_else_does(
        tmp_path):
    root, incoming = tmp_path / "repo", tmp_path / "incoming"
    root.mkdir()
    for p in range(6):
        write_patient(incoming, p)
    copy_repository(root, tiny_raw_params(data={"source": "folder", "path": str(incoming),
                                                "target": "liver"}))
    env = repo_env(DAGSTER_HOME=str(root / ".dagster_home"), MLFLOW_TRACKING_URI=tracking_uri(root))
    sh(["dvc", "repro"], root, env)
    assert dvc_status(root, env) == UP_TO_DATE
    cases, split_sides, locked = case_hashes(root), sides(root), lock(root)
    assert len(cases) == 6

    first, cursor = sensor_tick(root, None)  # records the source
    assert isinstance(first, dg.SkipReason)
    nothing, cursor = sensor_tick(root, cursor)
    assert isinstance(nothing, dg.SkipReason)
    retrain = ["dagster", "job", "execute", "-m", "pipeline.definitions", "-j", "retrain"]
    sh(retrain, root, env)  # the scheduled run with nothing new: a no-op
    assert lock(root) == locked and case_hashes(root) == cases

    write_patient(incoming, 6)
    fired, cursor = sensor_tick(root, cursor)
    assert isinstance(fired, dg.RunRequest) and fired.job_name in (None, "retrain")
    assert load_stages(root)  # the job is the whole DAG of this repository
    out = sh(retrain + ["--tags", json.dumps(fired.tags)], root, env)
    assert "RUN_SUCCESS" in out
    now = lock(root)
    assert out_md5(now, "ingest", "data/raw") != out_md5(locked, "ingest", "data/raw")
    assert out_md5(now, "train@enhanced_pan", "models/enhanced_pan") != \
        out_md5(locked, "train@enhanced_pan", "models/enhanced_pan")  # retrained
    after = case_hashes(root)
    assert {k: after[k] for k in cases} == cases and set(after) - set(cases) == {"p06.h5"}
    assert {p: s for p, s in sides(root).items() if p in split_sides} == split_sides
    again, _ = sensor_tick(root, cursor)
    assert isinstance(again, dg.SkipReason)


def _open_case_files(root: Path) -> int:
    """HDF5 files of `root` this process holds open now."""
    import h5py

    return sum(1 for fid in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE)
               if Path(fid.name.decode()).resolve().is_relative_to(root.resolve()))


def _ingested(patients: int):
    """Phantom patients (8 slices of 128 px: 128 KiB of image per case) ingested in the
    working directory; the params."""
    from liverseg.config import parse_params

    params = parse_params(tiny_raw_params(data={"phantom": {
        "patients": patients, "slices_per_patient": 8, "size": 128}}))
    ingest.run(params)
    return params


def test_validate_and_split_read_one_case_file_at_a_time_flat_in_cases(tmp_path, monkeypatch):
    """Issue 32: validate's and split's memory grew with the number of cases because every
    case file stayed open with its HDF5 chunk cache (8 MiB per dataset read). Each pass
    over the slices holds one case file open at a time and closes it, and the Python heap's
    peak does not grow by the cases' pixels: 2 against 6 cases."""
    import tracemalloc

    import h5py

    from liverseg import casestore
    from liverseg.stages import split, validate

    casestore.close_all()
    most_open: dict[str, int] = {}
    now = {"phase": ""}
    read_slice = h5py.Dataset.__getitem__

    def counting(self, key):  # every slice either stage reads comes through here
        if phase := now["phase"]:
            most_open[phase] = max(most_open.get(phase, 0), _open_case_files(tmp_path))
        return read_slice(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counting)
    monkeypatch.setenv("LIVERSEG_INGEST_WORKERS", "1")  # one worker process, whatever the cores
    peaks, rows = {}, {}
    for patients in (2, 6):
        root = tmp_path / f"n{patients}"
        root.mkdir()
        monkeypatch.chdir(root)
        params = _ingested(patients)
        # validate's pass over the slices (its GX suite reads no pixels), then the split of
        # every slice; each once before it is traced (imports and caches of a first call)
        manifest = validate.build_manifest("data/raw").assign(accepted=True)
        manifest.to_parquet("data/manifest.parquet")
        for stage, step, arg in (("validate", validate.build_manifest, "data/raw"),
                                 ("split", split.run, params)):
            step(arg)
            casestore.close_all()
            now["phase"] = phase = f"{stage} {patients}"
            tracemalloc.start()
            try:
                step(arg)
                peaks[phase] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            now["phase"] = ""
            assert _open_case_files(tmp_path) == 0, f"{phase} left case files open"
        rows[patients] = len(pd.read_csv("data/raw/slices.csv"))
        assert len(list(Path("data/raw/cases").glob("*.h5"))) == patients
    assert rows == {2: 16, 6: 48}
    # At most the one case file being read is open, however many cases there are.
    assert most_open == {f"{stage} {n}": 1 for stage in ("validate", "split") for n in (2, 6)}
    # Four more cases are 512 KiB of images (and as much mask); 32 more rows, a few KB.
    four_cases_of_images = 4 * 8 * 128 * 128
    for stage in ("validate", "split"):
        grown = peaks[f"{stage} 6"] - peaks[f"{stage} 2"]
        assert grown < four_cases_of_images / 4, (stage, peaks)


def test_case_files_read_slice_by_slice_keep_no_chunk_cache(tmp_path, monkeypatch):
    """Training's loader keeps up to casestore.MAX_OPEN case files open; HDF5's chunk cache
    (8 MiB a dataset under HDF5 2.0) made its peak grow with the number of cases (1.09 ->
    1.54 GB from 8 to 32 LiTS-sized cases). A slice is one chunk, read once a visit: every
    file opened to read slices has no chunk cache, and reads the same pixels."""
    import h5py

    from liverseg import casestore
    from liverseg.casescan import CaseReader

    monkeypatch.setenv("LIVERSEG_INGEST_WORKERS", "1")
    monkeypatch.chdir(tmp_path)
    _ingested(3)
    casestore.close_all()
    refs = pd.read_csv("data/raw/slices.csv")["image"].tolist()
    loader = [casestore.read("data/raw", ref) for ref in refs]
    with CaseReader("data/raw", max_open=3) as reader:
        scan = [reader.read(ref) for ref in refs]
        handles = [fid for fid in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE)
                   if Path(fid.name.decode()).resolve().is_relative_to(tmp_path.resolve())]
        assert len(handles) == 6  # three through each path
        assert [fid.get_access_plist().get_cache()[2] for fid in handles] == [0] * 6
    for ref, a, b in zip(refs, loader, scan, strict=True):
        slot = casestore.SliceRef.parse(ref)
        with h5py.File(tmp_path / "data/raw" / slot.case_file) as f:
            expected = f[f"{slot.group}/image"][slot.index]
        np.testing.assert_array_equal(a, expected)
        np.testing.assert_array_equal(b, expected)
    casestore.close_all()
