"""ingest: bring a data source into the one on-disk layout (`liverseg.data.layout`): one
case file per case, made by parallel workers, and made again only for cases that changed.

Each case file is kept in the ingest store (`.liverseg/ingest/<key>.h5`, outside DVC's
outputs) under a key of everything that makes its bytes: the case's source files (path,
size, mtime), the `data` params, the seed and the code that writes it. data/raw/cases/ holds
hard links to the store's files (no second copy), so when DVC deletes data/raw before a
rerun, an unchanged case is linked again instead of being decoded again; the store keeps
only the keys of the last run, with each file's size and mtime, so a file edited in place
through its link is made anew rather than trusted. Workers: `LIVERSEG_INGEST_WORKERS` (not
a DVC param: it changes no byte of the output), default the CPU cores, capped by the memory
the largest case needs (from its header); with more than one case to make, even one worker
is a process of its own, so the memory it keeps between cases (`heap.keep_freed`) goes
with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from liverseg import casestore, heap, labels
from liverseg.artifacts import Artifacts
from liverseg.config import DataParams, Params
from liverseg.data import layout, sources
from liverseg.io import atomic_dir, atomic_path

WORKERS_ENV = "LIVERSEG_INGEST_WORKERS"
STAMPS = "stamps.json"  # in the store: each file's (size, mtime) as ingest left it
# The code that decides a case file's bytes: a change in it makes every case new. Also
# ingest's code deps in dvc.yaml (tests/test_artifacts.py keeps the two equal and this
# list closed under the imports it makes), so editing the training loader, the source
# listing, the DICOMweb client or the SEG writer re-ingests nothing.
CODE = ("data/layout.py", "data/phantom.py", "data/sources", "dicom/labels.py",
        "dicom/rtstruct.py", "dicom/seg_reader.py", "dicom/series.py", "preprocess.py",
        "labels.py", "imageio.py", "casestore.py", "boundary.py")


def code_version() -> str:
    package = Path(casestore.__file__).parent
    files = sorted(p for name in CODE for p in ([package / name] if name.endswith(".py")
                                                else (package / name).rglob("*.py")))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(package).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def case_key(task: layout.CaseTask, data: DataParams, seed: int, code: str) -> str:
    blob = json.dumps([code, seed, data.model_dump(mode="json"), task.case_id, task.files],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def worker_count(tasks: list[layout.CaseTask]) -> int:
    """`LIVERSEG_INGEST_WORKERS`, else the cores capped by available memory / the largest
    case's need."""
    if os.environ.get(WORKERS_ENV):
        return max(1, int(os.environ[WORKERS_ENV]))
    cores = len(os.sched_getaffinity(0))
    need = max((t.memory for t in tasks), default=0)
    if need:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        cores = min(cores, max(1, available // need))
    return max(1, min(cores, len(tasks)))


def ingest_case(source: str, task: layout.CaseTask, data: DataParams, seed: int,
                path: Path) -> None:
    """One case into its store file (a worker's job; also run in-process)."""
    writer = layout.CaseWriter(task.case_id, data.source, len(labels.TARGETS[data.target]))
    facts = sources.get(source).ingest_case(task, data, seed, writer)
    casestore.write_case(path, writer.stacked(), {"rows": writer.rows, "facts": facts})
    os.chmod(path, 0o444)  # linked into data/raw: nothing may write into it in place


def ingest_missing(tasks: list[layout.CaseTask], paths: dict[str, Path], data: DataParams,
                   seed: int, workers: int) -> None:
    """Make the store files of `tasks`: one case here, several in `workers` processes
    (one too), which keep the memory a case frees for the next (`heap.keep_freed`)."""
    jobs = [(data.source, task, data, seed, paths[task.case_id]) for task in tasks]
    progress = tqdm(total=len(jobs), desc="ingest", unit="case", disable=not jobs)
    if len(jobs) <= 1:
        for job in jobs:
            ingest_case(*job)
            progress.update()
    else:
        with ProcessPoolExecutor(workers, initializer=heap.keep_freed) as pool:
            for future in [pool.submit(ingest_case, *job) for job in jobs]:
                future.result()  # a worker's error surfaces here, naming its file
                progress.update()
    progress.close()


def stamp(path: Path) -> list[int] | None:
    """(size, mtime) of a store file, None when it is missing."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns]


def link(stored: Path, target: Path) -> None:
    """A hard link to the store's file; a copy where the filesystem has no links."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(stored, target)
    except OSError:
        shutil.copyfile(stored, target)


def add_facts(total: dict, facts: dict) -> None:
    for key, value in facts.items():
        total[key] = total.get(key, 0) + value if isinstance(value, int) else value


def run(params: Params, root: str | Path = ".") -> dict:
    """Write the source's cases under data/raw of `root` (replaced as a whole, atomically).

    A source that is unusable as a whole (missing, empty, unsafe archive, no Kaggle
    credentials) raises `SourceError` naming it; a bad item becomes an index row that
    validate quarantines.
    """
    art, data = Artifacts(root), params.data
    source, code = sources.get(data.source), code_version()
    store = art.ingest_store
    store.mkdir(parents=True, exist_ok=True)
    stamps_file = store / STAMPS
    stamps = json.loads(stamps_file.read_text()) if stamps_file.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="liverseg-ingest-") as work:
        plan = source.plan(data, params.seed, Path(work))
        paths = {t.case_id: store / f"{case_key(t, data, params.seed, code)}{casestore.SUFFIX}"
                 for t in plan.tasks}
        # A store file edited in place (through its link in data/raw) is made again.
        now = {t.case_id: stamp(paths[t.case_id]) for t in plan.tasks}
        todo = [t for t in plan.tasks
                if now[t.case_id] is None or now[t.case_id] != stamps.get(paths[t.case_id].name)]
        workers = worker_count(todo)
        ingest_missing(todo, paths, data, params.seed, workers)
    stamps = {path.name: stamp(path) for path in paths.values()}
    rows, facts = list(plan.rows), dict(plan.facts)
    with atomic_dir(art.raw) as tmp:
        labels.write_classes(tmp, data.target)
        for task in plan.tasks:
            record = casestore.read_record(paths[task.case_id])
            rows += record["rows"]
            add_facts(facts, record["facts"])
            if any(row["image"] or row["mask"] for row in record["rows"]):
                link(paths[task.case_id], tmp / casestore.case_file(task.case_id))
        index = pd.DataFrame(rows, columns=layout.INDEX_COLUMNS + layout.FACT_COLUMNS)
        index.to_csv(tmp / layout.INDEX_NAME, index=False)
    for stale in set(store.glob(f"*{casestore.SUFFIX}")) - set(paths.values()):
        stale.unlink()  # the store holds the last run's cases only
    with atomic_path(stamps_file) as tmp:
        tmp.write_text(json.dumps(stamps, sort_keys=True))
    written = index[index["image"] != ""]
    summary = {
        "source": data.source,
        "classes": list(labels.TARGETS[data.target]),
        "slices": len(written),
        "sampled": int(written["sampled"].sum()),
        "patients": int(written["patient_id"].replace("", None).nunique()),
        "cases": {"total": len(plan.tasks), "ingested": len(todo),
                  "reused": len(plan.tasks) - len(todo), "workers": workers},
    }
    if len(written) < len(index):
        summary["items_not_ingested"] = len(index) - len(written)
    return summary | {k: v for k, v in facts.items() if k != "ignored"} | (
        {"ignored_files": facts["ignored"]} if facts.get("ignored") else {})
