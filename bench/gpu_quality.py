"""The quality benchmark's training on one GPU machine: `pack` here, `run` there, `collect` here.

`bench/quality.py` runs the whole pipeline with `dvc repro` on this machine. A GPU machine
lent for minutes has no dvc and cannot read ../shared/data, so the work is cut at the split:

  pack     (here)  for each run of RUNS: clone HEAD with the preset's params, run the data
                   stages (`dvc repro split`), and bundle what training reads (data/raw's
                   index and classes, data/splits with its decoded cache) plus params.yaml
                   (train.device cuda, train.precision fp32, as on CPU) into bench/.gpu/.
  run      (there) unpack each run and start every model's `liverseg train` then
                   `liverseg evaluate` at once (the GPU is idle most of a batch-8 step at
                   128 px, so concurrent runs share it); results go to $OUT/results.tar,
                   rewritten as models finish, so a run cut short still returns the finished.
  collect  (here)  unpack results.tar into bench/.work/gpu/ and write one CSV and JSON per
                   run with bench/quality.py's columns (bench/results/<run>.csv).

The stage commands are the ones dvc runs; only the orchestration differs. sec_per_epoch is
measured with every run sharing one GPU and 16 cores, so it is not a per-model speed.
`--only a,b` picks runs (a liver bundle is ~11 MB; a device call carries 64 MiB at most).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PACK = REPO / "bench" / ".gpu"
# name -> (preset, models, --set assignments); names become bench/results/<name>.csv
RUNS = {
    "quality-tumor-gpu": ("tumor", ["unetplusplus"], []),
    "quality-liver-gpu": ("liver", ["manet", "linknet", "pspnet", "unet", "unetplusplus",
                                    "deeplabv3plus", "enhanced_pan"], []),
    "quality-liver-no-se-stride-2-gpu": ("liver", ["enhanced_pan"], [
        "model.enhanced_pan.se=false", "model.enhanced_pan.decoder_stride=2"]),
    # the Enhanced PAN's tumour run of bench/results/quality-tumor.csv again, on the GPU
    "quality-tumor-enhanced_pan-gpu": ("tumor", ["enhanced_pan"], []),
    # seed spread of the three best liver models (a second GPU session: --only these)
    "quality-liver-unet_cbam-gpu": ("liver", ["unet_cbam"], []),
    "quality-liver-seed1-gpu": ("liver", ["enhanced_pan", "unetplusplus", "unet_cbam"],
                                ["seed=1"]),
    "quality-liver-seed2-gpu": ("liver", ["enhanced_pan", "unetplusplus", "unet_cbam"],
                                ["seed=2"]),
    "quality-tumor-unet_cbam-gpu": ("tumor", ["unet_cbam"], []),
    # issue 19 (a third session: --only these): the data's own resolution, liver at 256 px
    "quality-liver-256-gpu": ("liver", ["enhanced_pan", "unet_cbam", "unetplusplus"],
                              ["train.image_size=256"]),
}
ALL_MODELS = ["enhanced_pan", "pan", "unet_cbam", "manet", "linknet", "pspnet", "unet",
              "unetplusplus", "deeplabv3plus"]
FOLDS = 4


def cv_runs(name: str, models: list[str], sets: list[str]) -> dict:
    """The tumour cross-validation as one run per fold (`<name>-fold<k>`); `collect` joins
    them into bench/results/<name>.csv with a fold column, as `quality.py --folds` does."""
    return {f"{name}-fold{k}": ("tumor", models, [*sets, f"split.folds={FOLDS}",
                                                  f"split.fold={k}"]) for k in range(FOLDS)}


# issue 19: every model on every fold at the preset's 60 epochs, the candidate, 2.5D
RUNS |= cv_runs("quality-tumor-cv-gpu", ALL_MODELS, [])
RUNS |= cv_runs("quality-tumor-cv-no-se-gpu", ["enhanced_pan"], ["model.enhanced_pan.se=false"])
RUNS |= cv_runs("quality-tumor-cv-context1-gpu", ["enhanced_pan", "unet_cbam", "manet"],
                ["data.context_slices=1", "model.in_channels=3"])
# What training and evaluation read (the PNGs are not needed: the split's cache holds them).
DATA = ["data/raw/classes.json", "data/raw/slices.csv", "data/splits"]
MACHINE = ("import json, os, torch, timm, segmentation_models_pytorch as smp; print(json.dumps("
           "{'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None, "
           "'cores': os.cpu_count(), 'torch': torch.__version__, 'timm': timm.__version__, "
           "'smp': smp.__version__}))")
RESULTS = ["reports/metrics/{m}.json", "models/{m}/config.json", "reports/training/{m}.csv"]


def pack(epochs: int | None, only: list[str] | None) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import quality

    PACK.mkdir(exist_ok=True)
    for name, (preset, models, sets) in RUNS.items():
        if only and name not in only:
            continue
        params = quality.preset_params(preset, models, epochs, sets)
        params["train"] |= {"device": "cuda", "precision": "fp32"}
        work = REPO / "bench" / ".work" / name
        quality.prepare_workdir(work, params)
        subprocess.run(["dvc", "repro", "split"], cwd=work, env=quality.workdir_env(work),
                       check=True)
        with tarfile.open(PACK / f"{name}.tar.xz", "w:xz") as tar:
            for path in [*DATA, "params.yaml"]:
                tar.add(work / path, arcname=path)
        print(f"{name}: {(PACK / f'{name}.tar.xz').stat().st_size / 1e6:.1f} MB")


def unpack(root: Path, name: str, device: str) -> Path:
    work = root / name
    with tarfile.open(PACK / f"{name}.tar.xz") as tar:
        tar.extractall(work, filter="data")
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["train"]["device"] = device
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return work


def run(out: Path, device: str, only: list[str] | None, jobs: int, deadline: float) -> None:
    """Train and evaluate every model of every run (or of `only`), `jobs` at a time in RUNS'
    order; at `deadline` seconds the unfinished are stopped (results.tar keeps the finished)."""
    root = Path("/tmp/liverseg-gpu")
    path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"PYTHONPATH": path, "LIVERSEG_TRACKING": "off",
                        "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                        "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    queue = [(unpack(root, name, device), model) for name, (_, models, _) in RUNS.items()
             if not only or name in only for model in models]
    (root / "machine.json").write_text(subprocess.run(
        [sys.executable, "-c", MACHINE], env=env, capture_output=True, text=True).stdout)
    procs, started = {}, time.time()
    while True:
        while queue and sum(p.poll() is None for p in procs.values()) < jobs:
            work, model = queue.pop(0)
            log = open(work / f"{model}.log", "w")  # noqa: SIM115 (open for the process's life)
            cmd = (f"{sys.executable} -m liverseg train {model} && "
                   f"{sys.executable} -m liverseg evaluate {model}")
            procs[(work.name, model)] = subprocess.Popen(
                cmd, shell=True, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)  # a process group: the deadline stops train too
        elapsed = time.time() - started
        if elapsed > deadline:
            for p in procs.values():
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
        done = {key: p.poll() for key, p in procs.items()}
        write_results(root, out, done, elapsed)
        progress = {f"{n}/{m}": epochs_done(root / n, m) for n, m in procs}
        print(f"{elapsed:5.0f} s epochs {progress} exit {list(done.values())}", flush=True)
        if not queue and all(code is not None for code in done.values()):
            break
        time.sleep(15)


def epochs_done(work: Path, model: str) -> int:
    """Epochs ended so far, from the log (the history CSV is written when training ends)."""
    log = (work / f"{model}.log").read_text(errors="replace")
    return len(re.findall(rf"^{model} epoch \d+: train loss", log, flags=re.M))


def write_results(root: Path, out: Path, done: dict, elapsed: float) -> None:
    """results.tar: each model's log, each finished one's metrics, config and history."""
    status = {f"{name}/{model}": code for (name, model), code in done.items()}
    (root / "status.json").write_text(json.dumps({"elapsed_s": round(elapsed),
                                                  "exit_codes": status}, indent=1))
    tmp = out / "results.tar.tmp"
    with tarfile.open(tmp, "w") as tar:
        tar.add(root / "status.json", arcname="status.json")
        tar.add(root / "machine.json", arcname="machine.json")
        for (name, model), code in done.items():
            tar.add(root / name / f"{model}.log", arcname=f"{name}/{model}.log")
            for pattern in RESULTS if code == 0 else RESULTS[2:]:
                path = pattern.format(m=model)
                if (root / name / path).is_file():
                    tar.add(root / name / path, arcname=f"{name}/{path}")
    tmp.replace(out / "results.tar")


def collect(results: Path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import quality

    dest = REPO / "bench" / ".work" / "gpu"
    shutil.rmtree(dest, ignore_errors=True)
    with tarfile.open(results) as tar:
        tar.extractall(dest, filter="data")
    codes = json.loads((dest / "status.json").read_text())["exit_codes"]
    for name, (preset, models, sets) in RUNS.items():
        finished = [m for m in models if codes.get(f"{name}/{m}") == 0]
        if not finished:
            print(f"{name}: nothing finished ({ {m: codes.get(f'{name}/{m}') for m in models} })")
            continue
        table = quality.collect(dest / name, finished)
        table.to_csv(quality.RESULTS / f"{name}.csv", index=False)
        params = yaml.safe_load((REPO / "bench" / ".work" / name / "params.yaml").read_text())
        facts = {"command": "python bench/gpu_quality.py pack; (device) python3 "
                            "bench/gpu_quality.py run; python bench/gpu_quality.py collect",
                 "preset": preset, "sets": sets, "models": models, "finished": finished,
                 "commit": quality.head_commit(),
                 "machine": json.loads((dest / "machine.json").read_text()),
                 "sec_per_epoch": f"every model of the batch training at once on one GPU "
                                  f"({len(codes)} runs): shared-GPU time, not one model's",
                 "params": params}
        (quality.RESULTS / f"{name}.json").write_text(json.dumps(facts, indent=2) + "\n")
        print(name)
        print(table.to_markdown(index=False, floatfmt=".4f"))
    join_folds()


def join_folds() -> None:
    """`<cv>-fold<k>` results -> bench/results/<cv>.csv (a fold column) and a JSON with
    quality.py's keys (folds, a command with the --set overrides), for bench/cv_table.py."""
    groups: dict[str, list[str]] = {}
    for name in RUNS:
        if (match := re.fullmatch(r"(.+)-fold(\d+)", name)) and \
                (REPO / "bench" / "results" / f"{name}.csv").is_file():
            groups.setdefault(match[1], []).append(name)
    for cv, names in groups.items():
        import pandas as pd

        results = REPO / "bench" / "results"
        table = pd.concat([pd.read_csv(results / f"{n}.csv")
                           .assign(fold=int(n.rsplit("fold", 1)[1])) for n in names])
        table.to_csv(results / f"{cv}.csv", index=False)
        facts = json.loads((results / f"{names[0]}.json").read_text())
        sets = [a for a in facts["sets"] if not a.startswith("split.fold")]
        facts |= {"folds": FOLDS, "folds_finished": sorted(table.fold.unique().tolist()),
                  "command": " ".join(["python bench/gpu_quality.py", facts["preset"],
                                       *(f"--set {a}" for a in sets)]),
                  "per_fold_files": names}
        (results / f"{cv}.json").write_text(json.dumps(facts, indent=2) + "\n")
        print(f"{cv}: folds {facts['folds_finished']} -> bench/results/{cv}.csv")


def run_names(text: str) -> list[str]:
    names = text.split(",")
    if unknown := sorted(set(names) - set(RUNS)):
        raise argparse.ArgumentTypeError(f"unknown runs {unknown}; RUNS has {list(RUNS)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pack_parser = sub.add_parser("pack")
    pack_parser.add_argument("--epochs", type=int, help="override (a smoke test)")
    pack_parser.add_argument("--only", type=run_names, help="run names")
    run_parser = sub.add_parser("run")
    run_parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    run_parser.add_argument("--device", default="cuda", help="cpu for a local smoke test")
    run_parser.add_argument("--only", type=run_names, help="run names")
    run_parser.add_argument("--jobs", type=int, default=8, help="models training at once")
    run_parser.add_argument("--deadline", type=float, default=float("inf"), help="seconds")
    sub.add_parser("collect").add_argument("results", type=Path, help="results.tar")
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.epochs, args.only)
    elif args.command == "run":
        run(args.out, args.device, args.only, args.jobs, args.deadline)
    else:
        collect(args.results)


if __name__ == "__main__":
    main()
