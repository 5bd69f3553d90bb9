"""Scale benchmark (issue 32, "grow with the data"), run on demand: `python bench/scale.py`.

    python bench/scale.py --cases 8 32 --workers 1 2 --increment --sharing "nothing else"
    python bench/scale.py --cases 131 --workers 2 --report --name lits131    # LiTS-sized
    python bench/scale.py --cases 2 3 --size 96 --slices 24 --increment --name smoke  # minutes
    python bench/scale.py --cases 8 32 --workers 1 2 --increment --data-only --name data
    python bench/scale.py --cases 8 32 --workers 1 --data-only --name mem-after \
        --overlay src/liverseg/stages/validate.py src/liverseg/stages/split.py \
        src/liverseg/data/casescan.py  # working-tree files over the committed code

Generates synthetic LiTS-shaped cases (bench/synthetic_lits.py: 512x512x448 int16 HU NIfTI
by default, cached under bench/.work/scale-data keyed by cases, size, slices and seed), then
for each dataset size (`--cases`) and each ingest worker count (`--workers`, passed to the
ingest stage as LIVERSEG_INGEST_WORKERS) clones the committed code (HEAD, or `--commit`) into
bench/.work/scale-<name>-n<cases>-w<workers> (with `--overlay`, the named files of the
working tree are copied over the clone's: a change measured before it is committed; the
JSON records their sha256), writes params.yaml there (this commit's
params + data.source nifti, data.path = the cases, models [enhanced_pan], 1 epoch at 128 px,
batch 8, no bootstrap; `--set KEY=VALUE` for more) and runs the data stages (those dvc.yaml
lists before train: ingest, validate, split at f5f98ce), then train@enhanced_pan and
evaluate@enhanced_pan (with `--report`, compare, register and report after them), one at
a time (`dvc repro --single-item <stage>`). Both worker counts
of one size read the same source folder (a hard-linked copy of the cases,
bench/.work/scale-<name>-source-n<cases>), so their outputs can be compared byte for byte.
Work directories and generated cases stay for inspection (about 125 MB per 512x512x448
case; bench/.work/ is git-ignored): delete them by hand.

The figures (one row per cases x workers in bench/results/scale-<name>.csv; the machine,
commit, command, seeds and the --sharing text in the .json beside it):
- `<stage>_s`: wall seconds of `dvc repro --single-item <stage>` (DVC's own start and
  hashing included).
- `<stage>_mib`: peak anonymous memory (MiB): every 50 ms the RssAnon of the dvc process
  and all its descendants (/proc/<pid>/status) is summed; the largest sum. Pages shared
  copy-on-write after a fork count once per process, so worker pools are over-counted
  rather than under-counted.
- `input_mib`: `du -sb` of the source folder, the cases as gzipped NIfTI (not `source_mib`:
  a later commit's `source` stage has that column).
- `disk_mib`: after the data stages, one `du -sbc data .dvc/cache [.liverseg]` (a file
  hard-linked into two of them counts once; .liverseg, an ingest store outside DVC, where
  the commit makes one; `disk_paths` says which); `disk_per_input` = disk_mib / input_mib.
- `files`: `find data -type f | wc -l` after the data stages (DVC's .gitignore included).
- `dvc_files`: files DVC tracks under data/: for each output of dvc.lock under data/, the
  number of files of a directory output (its `nfiles`) or 1 for a file output.
Then the ratios side by side: the machine's own ceiling for the most workers (that many
processes of a fixed zlib job at once against one alone, measured first: on shared or
hyperthreaded cores it is below the count), ingest seconds with the fewest / the most
workers at each size,
and each stage's peak memory (and seconds) at the largest / the smallest size.

`--workers 1 2`: after both runs of a size, the sha256 of every file of the ingest's outputs
(as dvc.lock names them: data/raw at this commit) is compared between the two work
directories (identical, or the files that differ).
`--pairs K`: at the end, in the last size's fewest-workers directory, K pairs of ingest runs
(the store emptied, `--force`): the fewest and the most workers one right after the other
(in turn first); each pair's ratio and their median (the rows' runs are minutes apart, and
this machine's speed drifts).
Every timed stage starts after an `os.sync()`, so the files the last one wrote are not
written back on its clock.
`--increment`: after the runs of a size, in the last work directory: one more case is linked
into the source folder; `dvc status` is timed (`status_s`) with the stages it names (compare,
register and report never ran here, so they are always named; whether the stages up to
ingest are named says if DVC itself sees the change); the data stages before ingest, if
any, rerun (`upstream_s`), then `dvc repro --single-item ingest` (with --force where no
`source` stage lists the source: at f5f98ce the source folder is no DVC dependency, so DVC
alone would skip the stage); its
seconds, also as a fraction of the full ingest, and the files of its outputs added, removed
and changed (by sha256: content, not time stamps) are reported. Then case 0 is deleted from
the source and the same again. Never run by the test suite; needs `make install`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
import zlib
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import synthetic_lits as lits  # bench/synthetic_lits.py
import yaml

from liverseg import runner
from liverseg.artifacts import INGEST_STORE
from liverseg.params_dict import deep_merge, set_key

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
WORK = REPO / "bench" / ".work"
MODEL = "enhanced_pan"
MODEL_STAGES = [f"train@{MODEL}", f"evaluate@{MODEL}"]
REPORT_STAGES = ["compare", "register", "report"]  # --report: to the end of the DAG
SAMPLE_SECONDS = 0.05
MIB = 1024 * 1024


# ---- memory of a process tree -------------------------------------------------------------

def children_map() -> dict[int, list[int]]:
    """{parent pid: child pids} of every process (this kernel has no /proc/*/children)."""
    kids: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue  # exited meanwhile
            kids[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry.name))
    return kids


def process_tree(root: int) -> list[int]:
    kids, tree = children_map(), [root]
    for pid in tree:  # grows while it is walked: breadth first
        tree.extend(kids.get(pid, []))
    return tree


def rss_anon_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0  # exited, or a zombie


class PeakSampler:
    """The peak over time of the summed RssAnon of `pid` and its descendants (KiB)."""

    def __init__(self, pid: int):
        self.pid, self.peak_kib, self.done = pid, 0, threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while True:
            total = sum(rss_anon_kib(p) for p in process_tree(self.pid))
            self.peak_kib = max(self.peak_kib, total)
            if self.done.wait(SAMPLE_SECONDS):
                return

    def __enter__(self) -> PeakSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


# ---- one stage ----------------------------------------------------------------------------

def run_stage(workdir: Path, stage: str, env: dict, force: bool = False) -> dict:
    """`dvc repro --single-item [--force] <stage>`: {seconds, peak_mib}; its output goes to
    <workdir>/bench-scale.log."""
    cmd = ["dvc", "repro", "--single-item", *(["--force"] if force else []), stage]
    log = workdir / "bench-scale.log"
    os.sync()  # the last stage's files written back before the clock starts, not during
    with log.open("a") as sink:
        sink.write(f"$ {shlex.join(cmd)}\n")
        sink.flush()
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=sink,
                                stderr=subprocess.STDOUT)
        with PeakSampler(proc.pid) as sampler:
            proc.wait()
        seconds = time.perf_counter() - started
    if proc.returncode:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise SystemExit(f"`{shlex.join(cmd)}` failed in {workdir}:\n{tail}")
    return {"s": round(seconds, 2), "mib": round(sampler.peak_kib / 1024, 1)}


def timed_status(workdir: Path, env: dict) -> dict:
    """`dvc status`: its seconds and the stages it names as changed."""
    started = time.perf_counter()
    proc = subprocess.run(["dvc", "status"], cwd=workdir, env=env, capture_output=True,
                          text=True, check=True)
    changed = [line[:-1] for line in proc.stdout.splitlines()
               if line.endswith(":") and not line.startswith((" ", "\t"))]
    return {"status_s": round(time.perf_counter() - started, 2), "status_changed": changed}


# ---- what the data stages leave on disk ---------------------------------------------------

def du_bytes(*paths: str | Path, cwd: Path = REPO) -> int:
    """One `du -sbc` over all `paths` (a hard-linked file counts once): the total."""
    out = subprocess.run(["du", "-sbc", *map(str, paths)], cwd=cwd, capture_output=True,
                         text=True, check=True).stdout
    return int(out.splitlines()[-1].split()[0])


def count_files(workdir: Path, folder: str = "data") -> int:
    """`find data -type f | wc -l`."""
    out = subprocess.run(["find", folder, "-type", "f"], cwd=workdir, capture_output=True,
                         text=True, check=True).stdout
    return len(out.splitlines())


def dvc_tracked_files(workdir: Path, prefix: str = "data/") -> int:
    """Files DVC tracks under `prefix`: a directory output's `nfiles` (dvc.lock), 1 a file."""
    stages = runner.dvc_lock(workdir).get("stages") or {}
    return sum(out.get("nfiles", 1) for stage in stages.values()
               for out in stage.get("outs") or [] if out["path"].startswith(prefix))


def disk_figures(workdir: Path, input_bytes: int) -> dict:
    store = Path(INGEST_STORE).parts[0]  # the ingest's store outside DVC (and its listing)
    paths = ["data", ".dvc/cache", *([store] if (workdir / store).exists() else [])]
    disk = du_bytes(*paths, cwd=workdir)
    return {"disk_mib": round(disk / MIB, 1), "disk_per_input": round(disk / input_bytes, 2),
            "files": count_files(workdir), "dvc_files": dvc_tracked_files(workdir),
            "disk_paths": " ".join(paths)}


def ingest_outputs(workdir: Path) -> list[Path]:
    """The ingest stage's outputs as dvc.lock records them (data/raw at this commit)."""
    return [workdir / path for path in runner.locked_outs(runner.dvc_lock(workdir), "ingest")]


def sha256_tree(workdir: Path) -> dict[str, str]:
    """{path relative to `workdir`: sha256} of every file of the ingest's outputs."""
    digests = {}
    for out in ingest_outputs(workdir):
        for path in sorted(p for p in [out, *out.rglob("*")] if p.is_file()):
            with path.open("rb") as f:
                digests[str(path.relative_to(workdir))] = hashlib.file_digest(
                    f, "sha256").hexdigest()
    return digests


def tree_diff(before: dict[str, str], after: dict[str, str]) -> dict:
    changed = sorted(p for p in before.keys() & after.keys() if before[p] != after[p])
    return {"added": sorted(after.keys() - before.keys()),
            "removed": sorted(before.keys() - after.keys()), "changed": changed,
            "unchanged": len(before.keys() & after.keys()) - len(changed)}


# ---- params and work directories ----------------------------------------------------------

def bench_params(head: str, source: Path, assignments: list[str]) -> dict:
    """params.yaml of commit `head` with the benchmark's settings and `--set`s over it."""
    base = yaml.safe_load(runner.git_checked("show", f"{head}:params.yaml", cwd=REPO))
    params = deep_merge(base, {"data": {"source": "nifti", "path": str(source)},
                               "models": [MODEL],
                               "train": {"epochs": 1, "image_size": 128, "batch_size": 8},
                               "evaluate": {"bootstrap": 0}})
    for assignment in assignments:
        set_key(params, assignment)
    return params


def fresh_workdir(workdir: Path, params: dict, head: str, cache_type: str | None,
                  overlay: list[str] = ()) -> None:
    """A new clone of REPO at `head` with `params` as its params.yaml (and DVC's
    `cache.type`, when given, set in its local config); the files of `overlay` (paths
    relative to REPO) copied from REPO's working tree over the clone's."""
    if workdir.exists():
        shutil.rmtree(workdir)
    runner.git_checked("clone", "--quiet", str(REPO), str(workdir), cwd=REPO)
    runner.git_checked("checkout", "--quiet", "--force", head, cwd=workdir)
    for path in overlay:
        (workdir / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / path, workdir / path)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if cache_type:
        subprocess.run(["dvc", "config", "--local", "cache.type", cache_type], cwd=workdir,
                       env=stage_env(workdir), check=True)


def stage_env(workdir: Path, ingest_workers: int | None = None) -> dict:
    """The clone's code with REPO's tools (dvc, liverseg), offline, MLflow off (on, in the
    work directory's own store, where `--report` needs register: LIVERSEG_TRACKING=on)."""
    env = os.environ | {"PYTHONPATH": str(workdir / "src"),
                        "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
                        "LIVERSEG_TRACKING": os.environ.get("LIVERSEG_TRACKING", "off"),
                        "DVC_NO_ANALYTICS": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
                        "GX_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    if ingest_workers:
        env["LIVERSEG_INGEST_WORKERS"] = str(ingest_workers)
    return env


def source_folder(name: str, cases: int, shape: lits.Shape, seed: int, gen_workers: int) -> Path:
    """A fresh hard-linked copy of the cached cases, which --increment may change."""
    cached = lits.dataset(WORK / "scale-data", cases, shape, seed, gen_workers)
    source = WORK / f"scale-{name}-source-n{cases}"
    if source.exists():
        shutil.rmtree(source)
    shutil.copytree(cached, source, copy_function=os.link)
    return source


# ---- the runs -----------------------------------------------------------------------------

def short(stage: str) -> str:
    return stage.split("@")[0]


def data_stages(workdir: Path) -> list[str]:
    """The stages dvc.yaml lists before train (ingest, validate, split at f5f98ce; a later
    commit may add one, e.g. a `source` listing before ingest)."""
    names = list(yaml.safe_load((workdir / "dvc.yaml").read_text())["stages"])
    return names[:names.index("train")]


def full_run(workdir: Path, params: dict, head: str, workers: int,
             cache_type: str | None = None, model_stages: list[str] = MODEL_STAGES,
             overlay: list[str] = ()) -> dict:
    """Every stage of one (cases, workers) row, one at a time; the row's figures."""
    input_bytes = du_bytes(params["data"]["path"])
    fresh_workdir(workdir, params, head, cache_type, overlay)
    stages, disk, data = {}, {}, data_stages(workdir)
    for stage in data + model_stages:
        env = stage_env(workdir, workers if stage == "ingest" else None)
        figures = run_stage(workdir, stage, env)
        stages |= {f"{short(stage)}_{key}": value for key, value in figures.items()}
        print(f"  {workdir.name} {stage}: {figures['s']} s, {figures['mib']} MiB", flush=True)
        if stage == data[-1]:
            disk = disk_figures(workdir, input_bytes)
    return stages | {"input_mib": round(input_bytes / MIB, 1)} | disk


def identity(cases: int, dirs: dict[int, Path]) -> dict:
    """The ingest outputs of the fewest- and the most-workers run, file by file."""
    (w_a, a), (w_b, b) = min(dirs.items()), max(dirs.items())
    diff = tree_diff(sha256_tree(a), sha256_tree(b))
    same = not (diff["added"] or diff["removed"] or diff["changed"])
    return {"cases": cases, "workers": [w_a, w_b], "identical": same,
            "files": diff["unchanged"] + len(diff["changed"]),
            "differ": (diff["added"] + diff["removed"] + diff["changed"])[:20]}


def ingest_pairs(workdir: Path, workers: list[int], rounds: int) -> list[dict]:
    """`rounds` times: ingest alone with the fewest and the most workers, one right after
    the other in one work directory (the store emptied, so every case is made again;
    `--force`), the order alternating from round to round. The rows' runs of one size are
    minutes apart, and this machine's speed drifts by 5-10% over an hour; each pair here is
    measured under the same conditions. DVC's cache already holds the case files here, so
    these seconds are a little under the rows'; their ratios compare."""
    lo, hi = min(workers), max(workers)
    pairs = []
    for number in range(1, rounds + 1):
        seconds = {}
        for count in (lo, hi) if number % 2 else (hi, lo):
            shutil.rmtree(workdir / INGEST_STORE, ignore_errors=True)
            seconds[count] = run_stage(workdir, "ingest", stage_env(workdir, count),
                                       force=True)["s"]
        pairs.append({"round": number, f"ingest_s_w{lo}": seconds[lo],
                      f"ingest_s_w{hi}": seconds[hi], "ratio": round(seconds[lo] / seconds[hi], 3)})
        print(f"  {workdir.name} ingest pair {number}: {seconds[lo]} / {seconds[hi]} s",
              flush=True)
    return pairs


def add_case(source: Path, pool: Path, index: int) -> None:
    lits.link_case(pool, index, source)


def delete_case(source: Path, index: int) -> None:
    for name in lits.case_names(index):
        (source / name).unlink()


def increment_step(workdir: Path, label: str, change, workers: int, full_ingest_s: float
                   ) -> dict:
    """Change the source, time `dvc status` (does DVC see it?), rerun the stages before
    ingest, then ingest (forced only where no `source` stage lists the source: there DVC
    itself must see the change), and diff the ingest's outputs by sha256."""
    before = sha256_tree(workdir)
    change()
    status = timed_status(workdir, stage_env(workdir))
    stages = data_stages(workdir)
    upstream = [run_stage(workdir, stage, stage_env(workdir))["s"]
                for stage in stages[:stages.index("ingest")]]
    figures = run_stage(workdir, "ingest", stage_env(workdir, workers),
                        force="source" not in stages)
    diff = tree_diff(before, sha256_tree(workdir))
    return {"step": label, "upstream_s": round(sum(upstream), 2), "ingest_s": figures["s"],
            "ingest_mib": figures["mib"],
            "fraction_of_full_ingest": round(figures["s"] / full_ingest_s, 3),
            "added": len(diff["added"]), "removed": len(diff["removed"]),
            "changed": len(diff["changed"]), "unchanged": diff["unchanged"],
            "changed_files": diff["changed"][:20], **status}


def increment(workdir: Path, row: dict, shape: lits.Shape, seed: int) -> list[dict]:
    """One more case into the source, re-ingest; then case 0 out of it, re-ingest."""
    cases, workers = row["cases"], row["workers"]
    source = Path(yaml.safe_load((workdir / "params.yaml").read_text())["data"]["path"])
    pool = lits.pool_folder(WORK / "scale-data", shape, seed)
    lits.ensure_cases(pool, [cases], seed, shape)
    steps = [(f"add case {cases}", lambda: add_case(source, pool, cases)),
             ("delete case 0", lambda: delete_case(source, 0))]
    return [{"cases": cases, "workers": workers,
             **increment_step(workdir, label, change, workers, row["ingest_s"])}
            for label, change in steps]


# ---- report -------------------------------------------------------------------------------

def ratios(table: pd.DataFrame, ceiling: float | None = None) -> pd.DataFrame:
    """Ingest s fewest/most workers per size (beside the machine's own `ceiling` for that
    many processes); per stage, peak MiB and s largest/smallest size."""
    rows = []
    w_lo, w_hi = table.workers.min(), table.workers.max()
    if ceiling is not None:
        rows.append({"ratio": f"the machine: {w_hi} processes of a fixed zlib job / 1",
                     "value": ceiling})
    for cases, group in table.groupby("cases"):
        by_w = group.set_index("workers")
        if w_lo != w_hi:
            rows.append({"ratio": f"ingest s, {w_lo} / {w_hi} workers, {cases} cases",
                         "value": by_w.ingest_s[w_lo] / by_w.ingest_s[w_hi]})
    n_lo, n_hi = table.cases.min(), table.cases.max()
    if n_lo == n_hi:
        return pd.DataFrame(rows, columns=["ratio", "value"])
    stages = [column[:-4] for column in table.columns if column.endswith("_mib")
              and column not in ("input_mib", "disk_mib")]
    for workers, group in table.groupby("workers"):
        by_n = group.set_index("cases")
        for stage in stages:
            for unit in ("mib", "s"):
                column = f"{stage}_{unit}"
                rows.append({"ratio": f"{column}, {n_hi} / {n_lo} cases, {workers} worker(s)",
                             "value": by_n[column][n_hi] / by_n[column][n_lo]})
    return pd.DataFrame(rows, columns=["ratio", "value"])


def zlib_seconds(_: int = 0) -> float:
    """Seconds of a fixed CPU job like a case file's (deflate level 4 of CT-like noise, then
    inflate), its data made before the clock starts."""
    import numpy as np

    data = np.random.default_rng(0).normal(0, 15, 8_000_000).astype(np.int16).tobytes()
    started = time.perf_counter()
    for _ in range(4):
        zlib.decompress(zlib.compress(data, 4))
    return time.perf_counter() - started


def parallel_ceiling(workers: int) -> float:
    """The most `workers` processes can gain on this machine: their throughput on the same
    fixed CPU job, each at once, over one process's alone (2.0 on two idle real cores; less
    where the cores are hyperthreads of one or the machine is busy)."""
    alone = zlib_seconds()
    with ProcessPoolExecutor(workers) as pool:
        together = list(pool.map(zlib_seconds, range(workers)))
    return workers * alone / max(together)


def machine() -> dict:
    meminfo = Path("/proc/meminfo").read_text().split()
    cpu = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
           .splitlines() if line.startswith("model name")]
    dvc = subprocess.run(["dvc", "--version"], capture_output=True, text=True,
                         env=stage_env(REPO)).stdout.strip()
    return {"nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
            "memory_gib": round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 1024 ** 2, 1),
            "cpu_model": cpu[0] if cpu else platform.processor(),
            "platform": platform.platform(), "python": platform.python_version(), "dvc": dvc}


def write_results(stem: str, table: pd.DataFrame, facts: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    table.to_csv(RESULTS / f"{stem}.csv", index=False)
    (RESULTS / f"{stem}.json").write_text(json.dumps(facts, indent=2, default=str) + "\n")


def print_report(table: pd.DataFrame, identities: list[dict], increments: list[dict],
                 ceiling: float | None = None, pairs: list[dict] = ()) -> None:
    pd.set_option("display.width", 250)
    print("\n" + table.to_string(index=False))
    side_by_side = ratios(table, ceiling)
    if len(side_by_side):
        print("\n" + side_by_side.to_string(index=False, float_format="{:.2f}".format))
    if pairs:
        values = [pair["ratio"] for pair in pairs]
        print(f"\ningest alone, fewest / most workers back to back ({pairs[0]['cases']} cases):"
              f"\n{pd.DataFrame(pairs).to_string(index=False)}\nmedian ratio "
              f"{statistics.median(values):.2f} (min {min(values):.2f}, max {max(values):.2f})")
    for check in identities:
        verdict = "identical" if check["identical"] else f"DIFFERENT: {check['differ']}"
        print(f"\ningest outputs, {check['cases']} cases, workers {check['workers']}: "
              f"{check['files']} files, {verdict}")
    if increments:
        columns = ["cases", "workers", "step", "status_s", "upstream_s", "ingest_s",
                   "fraction_of_full_ingest", "added", "removed", "changed", "unchanged"]
        print("\n" + pd.DataFrame(increments)[columns].to_string(index=False))
        for step in increments:
            print(f"{step['cases']} cases, {step['step']}: changed {step['changed_files']}; "
                  f"dvc status names {step['status_changed']}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="ingest workers (LIVERSEG_INGEST_WORKERS)")
    parser.add_argument("--size", type=int, default=512, help="voxels per side of a slice")
    parser.add_argument("--slices", type=int, default=448, help="slices per volume")
    parser.add_argument("--seed", type=int, default=0, help="the generator's seed")
    parser.add_argument("--gen-workers", type=int, default=2,
                        help="processes generating cases (one case each)")
    parser.add_argument("--increment", action="store_true",
                        help="then add one case, re-ingest; delete one, re-ingest")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="one more params override, e.g. data.nifti.slices=all")
    parser.add_argument("--name", help="results file stem scale-<name>; default s<size>-z<slices>")
    parser.add_argument("--cache-type", help="DVC cache.type for the work repositories, e.g. "
                        "hardlink (default: DVC's own, reflink,copy)")
    parser.add_argument("--data-only", action="store_true",
                        help="the data stages only (no train and evaluate rows)")
    parser.add_argument("--report", action="store_true",
                        help="after evaluate, compare, register and report too (MLflow on: "
                        "each work directory's own store)")
    parser.add_argument("--commit", default="HEAD",
                        help="the commit cloned into the work directories (default HEAD)")
    parser.add_argument("--overlay", nargs="+", default=[], metavar="PATH",
                        help="files (relative to the repository) copied from the working tree "
                        "over the clone of HEAD: measure a change before committing it")
    parser.add_argument("--pairs", type=int, default=0, metavar="K",
                        help="then, at the last size given, K pairs of ingest runs with the "
                        "fewest and the most workers, one right after the other: K ratios")
    parser.add_argument("--sharing", default="nothing else",
                        help="what else ran on the machine meanwhile (recorded in the JSON)")
    return parser.parse_args()


def overlay_digests(paths: list[str]) -> dict[str, str]:
    """{path: sha256} of the working-tree files laid over the clone (recorded in the JSON)."""
    digests = {}
    for path in paths:
        with (REPO / path).open("rb") as f:
            digests[path] = hashlib.file_digest(f, "sha256").hexdigest()
    return digests


def main() -> None:
    args = parse_args()
    if args.report:  # register needs the training run in MLflow (the work dir's own store)
        os.environ["LIVERSEG_TRACKING"] = "on"
    missing = [path for path in args.overlay if not (REPO / path).is_file()]
    if missing:
        raise SystemExit(f"--overlay: no such file(s) in {REPO}: {missing}")
    if args.pairs and len(set(args.workers)) < 2:
        raise SystemExit("--pairs needs two worker counts, e.g. --workers 1 2")
    name, shape = args.name or f"s{args.size}-z{args.slices}", lits.Shape(args.size, args.slices)
    head = runner.git_checked("rev-parse", args.commit, cwd=REPO).strip()
    started, rows, identities, increments, pairs = time.time(), [], [], [], []
    # measured first, beside the runs: what the worker ratios can be compared with
    ceiling = parallel_ceiling(max(args.workers)) if max(args.workers) > 1 else None
    model_stages = [] if args.data_only else MODEL_STAGES + (REPORT_STAGES if args.report
                                                             else [])
    for cases in args.cases:
        source = source_folder(name, cases, shape, args.seed, args.gen_workers)
        params = bench_params(head, source, args.set)
        dirs = {}
        for workers in args.workers:
            dirs[workers] = WORK / f"scale-{name}-n{cases}-w{workers}"
            rows.append({"cases": cases, "workers": workers,
                         "cache_type": args.cache_type or "reflink,copy",
                         **full_run(dirs[workers], params, head, workers, args.cache_type,
                                    model_stages, args.overlay)})
        if len(dirs) > 1:
            identities.append(identity(cases, dirs))
        if args.increment:
            increments += increment(dirs[args.workers[-1]], rows[-1], shape, args.seed)
    if args.pairs and len(dirs) > 1:  # the last size's fewest-workers directory
        pairs = [{"cases": cases, **pair}
                 for pair in ingest_pairs(dirs[min(dirs)], args.workers, args.pairs)]
    table = pd.DataFrame(rows)
    facts = {"command": shlex.join(["python", "bench/scale.py", *sys.argv[1:]]),
             "commit": head, "overlay": overlay_digests(args.overlay),
             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z",
                                                      time.localtime(started)),
             "wall_seconds": round(time.time() - started),
             "sharing_the_machine": args.sharing, "machine": machine(),
             "seeds": {"generator": args.seed, "params": params["seed"]},
             "generator": {"size": args.size, "slices": args.slices, "spacing_mm": lits.SPACING_MM,
                           "noise_hu": lits.NOISE_HU, "cache": str(WORK / "scale-data")},
             "params": params, "rows": rows, "identity": identities, "increment": increments,
             "parallel_ceiling": ceiling, "ingest_pairs": pairs}
    write_results(f"scale-{name}", table, facts)
    print_report(table, identities, increments, ceiling, pairs)


if __name__ == "__main__":
    main()
