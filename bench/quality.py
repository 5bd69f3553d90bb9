"""Quality benchmark on real CT data, run on demand: `python bench/quality.py liver|tumor`.

Clones the committed code (HEAD) into a work directory, writes params.yaml there as
params.yaml + the preset in bench/quality.yaml, runs the whole pipeline with `dvc repro`
(ingest .. report, so the report of the run is in <workdir>/reports/report.html) and
collects one row per model into bench/results/quality-<dataset>.csv, with a JSON beside it
that says how it was measured (machine, commit, command, params). Needs `make install`.
Ablations: `--set model.enhanced_pan.aspp=false --name quality-tumor-no-aspp` (any params key,
as `dvc exp run -S`). Cross-validation: `--folds 4` runs every fold (`split.folds`/`split.fold`,
one work directory each) and writes the per-fold rows plus `<name>-summary.csv`: each model's
mean and sd over folds and the Enhanced PAN's paired difference to it with a 95% t-interval.
`--sharing TEXT` records what else ran on the machine meanwhile.
Options: --models / --epochs run less than the preset (the JSON then says
"complete_preset": false, and the CSV's rows and `epochs` column say what ran).

Re-score (`--rescore`): no cloning, no training. Takes the work directory a previous run left
(`--workdir`, default bench/.work/<name>: its models/, data/raw and data/splits) and scores
each trained model again with *this* checkout's evaluate, in-process, under each inference
setting of `RESCORE_SETTINGS` (none; post-processing; post-processing + mirroring), into
bench/results/quality-rescore-<name without "quality-">.csv and its JSON. MLflow is off for
it (LIVERSEG_TRACKING=off: no store needed, the models' runs untouched). Each setting's
metrics file is copied to <workdir>/reports/rescore/<setting>/ before the next overwrites it;
the work directory is left as the last setting left it (its dvc.lock then no longer matches
the evaluate outputs: `dvc repro` there would evaluate again).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from liverseg import runner
from liverseg.metrics import paired_difference
from liverseg.params_dict import deep_merge, set_key

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
COLUMNS = ["model", "fg_iou", "fg_iou_ci_low", "fg_iou_ci_high", "dice", "miou", "image_iou",
           "pixel_accuracy", "sec_per_epoch", "epochs", "params", "best_epoch", "gflops",
           "images_per_second"]
# The re-score's settings: (name, evaluate.tta, evaluate.postprocessing). `auto`
# post-processing keeps each step that does not lower the validation score (nnU-Net's rule,
# liverseg.postprocess); `flip` serves the mean of the four flipped passes.
RESCORE_SETTINGS = (("none", "none", "none"), ("post", "none", "auto"),
                    ("post+mirror", "flip", "auto"))
RESCORE_COLUMNS = ["model", "setting", "tta", "postprocessing", "describe", "fg_iou",
                   "fg_iou_ci_low", "fg_iou_ci_high", "dice", "miou", "image_iou",
                   "pixel_accuracy", "images_per_second", "gflops", "gflops_served",
                   "score_plain", "gain_mirror", "gain_postprocessing", "epochs", "seed",
                   "best_epoch", "eval_seconds", "load_before", "load_after"]


def preset_params(dataset: str, models: list[str] | None, epochs: int | None,
                  assignments: list[str], head: str | None = None) -> dict:
    """params.yaml of commit `head` (default: the working tree's) + the preset: the clone
    runs `head`'s code, which may not know a key the working tree's params.yaml has gained."""
    presets = yaml.safe_load((REPO / "bench" / "quality.yaml").read_text())
    if dataset not in presets or dataset == "common":
        raise SystemExit(f"unknown dataset {dataset!r}; bench/quality.yaml has "
                         f"{sorted(set(presets) - {'common'})}")
    params = yaml.safe_load(runner.git_checked("show", f"{head}:params.yaml", cwd=REPO)
                            if head else (REPO / "params.yaml").read_text())
    params = deep_merge(deep_merge(params, presets["common"]), presets[dataset])
    data_path = (REPO / params["data"]["path"]).resolve()
    if not data_path.exists():
        raise SystemExit(f"{data_path} not found: the benchmark reads ../shared/data")
    params["data"]["path"] = str(data_path)
    if models:
        params["models"] = models
    if epochs:
        params["train"]["epochs"] = epochs
    for assignment in assignments:
        set_key(params, assignment)
    return params


def head_commit() -> str:
    return runner.git_checked("rev-parse", "HEAD", cwd=REPO).strip()


def prepare_workdir(workdir: Path, params: dict, head: str | None = None) -> str:
    """A clone of REPO at `head` (default: HEAD now) with `params` as its params.yaml."""
    if not (workdir / ".git").exists():
        runner.git_checked("clone", "--quiet", str(REPO), str(workdir), cwd=REPO)
    head = head or head_commit()
    runner.git_checked("fetch", "--quiet", str(REPO), head, cwd=workdir)
    runner.git_checked("checkout", "--quiet", "--force", head, cwd=workdir)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return head


def workdir_env(workdir: Path) -> dict:
    """Run the clone's code (not REPO's) with REPO's environment (dvc, liverseg)."""
    return os.environ | {"PYTHONPATH": str(workdir / "src"),
                         "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}


def collect(workdir: Path, models: list[str]) -> pd.DataFrame:
    """One row per model; a three-class run adds each class's IoU (`iou_liver`, ...)."""
    rows, per_class = [], []
    for name in models:
        metrics = json.loads((workdir / "reports/metrics" / f"{name}.json").read_text())
        config = json.loads((workdir / "models" / name / "config.json").read_text())
        epochs = config["params"]["train"]["epochs"]
        low, high = metrics.get("fg_iou_ci") or (None, None)  # 95% bootstrap over images
        rows.append({"model": name, "fg_iou": metrics["fg_iou"], "fg_iou_ci_low": low,
                     "fg_iou_ci_high": high, "dice": metrics["dice"],
                     "miou": metrics["miou"], "image_iou": metrics["per_image_fg_iou_mean"],
                     "pixel_accuracy": metrics["pixel_accuracy"],
                     "sec_per_epoch": round(config["train_seconds"] / epochs, 2),
                     "epochs": epochs, "params": metrics["n_parameters"],
                     "best_epoch": metrics["best_epoch"],
                     # cost beside the score: forward GFLOPs per image at the trained size,
                     # evaluate's images/s (on whatever else the machine was running)
                     "gflops": metrics["flops"] / 1e9,
                     "images_per_second": metrics["images_per_second"]})
        classes = {k: v for k, v in metrics.items() if k.startswith("iou_")}
        rows[-1] |= classes
        per_class += [k for k in classes if k not in per_class]
    return (pd.DataFrame(rows, columns=COLUMNS + per_class)
            .sort_values("fg_iou", ascending=False))


def run_pipeline(workdir: Path, params: dict, head: str) -> tuple[pd.DataFrame, str]:
    """`dvc repro` of `params` in a clone at commit `head`; (one row per model, the commit)."""
    commit = prepare_workdir(workdir, params, head)
    subprocess.run(["dvc", "repro"], cwd=workdir, env=workdir_env(workdir), check=True)
    return collect(workdir, params["models"]), commit


def cv_summary(per_fold: pd.DataFrame, reference: str = "enhanced_pan",
               key: str = "fg_iou") -> pd.DataFrame:
    """Per model: mean and sd of `key` over folds, and `reference` minus the model, paired
    by fold, with its 95% t-interval (folds are the unit that was sampled)."""
    wide = per_fold.pivot(index="fold", columns="model", values=key)
    rows = []
    for model in wide.columns:
        row = {"model": model, "folds": int(wide[model].notna().sum()),
               f"{key}_mean": wide[model].mean(), f"{key}_sd": wide[model].std(ddof=1)}
        if reference in wide and model != reference:
            diff = paired_difference(wide[reference], wide[model])
            row |= {"diff_vs_reference": diff["diff"], "diff_ci_low": diff["ci_low"],
                    "diff_ci_high": diff["ci_high"]}
        rows.append(row)
    return pd.DataFrame(rows).sort_values(f"{key}_mean", ascending=False)


def workdir_facts(workdir: Path) -> dict:
    """The trained work directory: its commit, and the params its models were trained with."""
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    commit = runner.git_checked("rev-parse", "HEAD", cwd=workdir).strip() \
        if (workdir / ".git").exists() else None
    return {"workdir": str(workdir), "workdir_commit": commit, "params": params}


def checkout_facts() -> dict:
    """The checkout doing the scoring: its commit and its uncommitted changes under src/
    (they are what runs: evaluate is imported from this checkout)."""
    status = runner.git_checked("status", "--porcelain", "--", "src", cwd=REPO)
    return {"commit": head_commit(),
            "uncommitted_src": sorted(line[3:] for line in status.splitlines() if line)}


@contextlib.contextmanager
def tracking_off():
    """LIVERSEG_TRACKING=off while the re-score runs: evaluate then logs to no MLflow run
    (its default store would be the *current* directory's mlruns, not the work dir's)."""
    old = os.environ.get("LIVERSEG_TRACKING")
    os.environ["LIVERSEG_TRACKING"] = "off"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LIVERSEG_TRACKING", None)
        else:
            os.environ["LIVERSEG_TRACKING"] = old


def rescore_row(model: str, setting: tuple[str, str, str], metrics: dict, config: dict,
                seconds: float, load: tuple[float, float]) -> dict:
    name, tta, post = setting
    choice = metrics.get("inference") or {}
    low, high = metrics.get("fg_iou_ci") or (None, None)
    decision = choice.get("decision") or {}
    passes = 4 if decision.get("mirror", tta == "flip") else 1  # Served.FLIPS
    params = config.get("params") or {}
    return {"model": model, "setting": name, "tta": tta, "postprocessing": post,
            "describe": choice.get("describe"), "fg_iou": metrics["fg_iou"],
            "fg_iou_ci_low": low, "fg_iou_ci_high": high, "dice": metrics["dice"],
            "miou": metrics["miou"], "image_iou": metrics.get("per_image_fg_iou_mean"),
            "pixel_accuracy": metrics["pixel_accuracy"],
            "images_per_second": metrics["images_per_second"],
            "gflops": metrics["flops"] / 1e9, "gflops_served": passes * metrics["flops"] / 1e9,
            "score_plain": choice.get("score_plain"), "gain_mirror": choice.get("gain_mirror"),
            "gain_postprocessing": choice.get("gain_postprocessing"),
            "epochs": (params.get("train") or {}).get("epochs"), "seed": params.get("seed"),
            "best_epoch": metrics.get("best_epoch"), "eval_seconds": round(seconds, 1),
            "load_before": load[0], "load_after": load[1]}


def rescore(workdir: Path, models: list[str] | None = None, assignments: list[str] = (),
            settings=None, log=print) -> tuple[pd.DataFrame, dict]:
    """Every trained model of `workdir` scored by this checkout's evaluate under each
    setting: (one row per model and setting, {model: {setting: the metrics' inference
    block}}). `settings`: default `RESCORE_SETTINGS`. `assignments`: more params overrides
    (`evaluate.bootstrap=200`); the work dir's params.yaml is what its models were trained
    with."""
    from liverseg.config import parse_params
    from liverseg.stages import evaluate

    workdir, settings = Path(workdir).resolve(), settings or RESCORE_SETTINGS
    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    models = models or raw["models"]
    missing = [m for m in models if not (workdir / "models" / m / "model.safetensors").exists()]
    if missing:
        raise SystemExit(f"{workdir}: no trained model for {missing}")
    rows, inference = [], {}
    with tracking_off():
        for setting in settings:
            name, tta, post = setting
            params_raw = deep_merge(raw, {"evaluate": {"tta": tta, "postprocessing": post}})
            for assignment in assignments:
                set_key(params_raw, assignment)
            params = parse_params(params_raw, str(workdir / "params.yaml"))
            aside = workdir / "reports" / "rescore" / name
            aside.mkdir(parents=True, exist_ok=True)
            for model in models:
                load_before, start = os.getloadavg()[0], time.perf_counter()
                evaluate.run(params, model, root=workdir)
                seconds = time.perf_counter() - start
                metrics_file = workdir / "reports" / "metrics" / f"{model}.json"
                shutil.copy2(metrics_file, aside / f"{model}.json")  # before the next setting
                metrics = json.loads(metrics_file.read_text())
                config = json.loads((workdir / "models" / model / "config.json").read_text())
                rows.append(rescore_row(model, setting, metrics, config, seconds,
                                        (load_before, os.getloadavg()[0])))
                inference.setdefault(model, {})[name] = metrics.get("inference")
                log(f"{model} {name}: fg_iou {metrics['fg_iou']:.4f}, "
                    f"{metrics['images_per_second']:.1f} images/s, "
                    f"{(metrics.get('inference') or {}).get('describe')} ({seconds:.0f} s)")
    return pd.DataFrame(rows, columns=RESCORE_COLUMNS), inference


def machine() -> dict:
    return {"platform": platform.platform(), "cpu": platform.processor(),
            "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def rescore_main(args, stem: str, workdir: Path) -> None:
    out = f"quality-rescore-{stem.removeprefix('quality-')}"
    started, scoring = time.time(), checkout_facts()
    trained = workdir_facts(workdir)
    table, inference = rescore(workdir, args.models, args.set)
    RESULTS.mkdir(parents=True, exist_ok=True)
    table.to_csv(RESULTS / f"{out}.csv", index=False)
    params = trained["params"]
    facts = {"command": " ".join(["python bench/quality.py", *map(shlex.quote, sys.argv[1:])]),
             "what": ("already trained models re-scored by this checkout's evaluate, in-process, "
                      "under each setting: " + "; ".join(
                          f"{n}: evaluate.tta={t}, evaluate.postprocessing={p}"
                          for n, t, p in RESCORE_SETTINGS)),
             "commit": scoring["commit"], "uncommitted_src": scoring["uncommitted_src"],
             "workdir": trained["workdir"], "workdir_commit": trained["workdir_commit"],
             "seed": params.get("seed"), "epochs": params["train"]["epochs"],
             "models": sorted(set(table["model"])), "overrides": args.set,
             "tracking": "LIVERSEG_TRACKING=off: nothing logged to MLflow, no store needed",
             "workdir_left": (f"as the last setting ({RESCORE_SETTINGS[-1][0]}) left it; each "
                              "setting's metrics JSON copied to <workdir>/reports/rescore/"
                              "<setting>/<model>.json"),
             "images_per_second": ("evaluate's served throughput on the validation split "
                                   "(the network, mirroring if chosen, post-processing), "
                                   "batch evaluate.batch_size, on whatever else ran; "
                                   "load_before/load_after: 1-minute load average"),
             "gflops_served": "forward GFLOPs per image times the passes (4 when mirrored)",
             "wall_seconds": round(time.time() - started),
             "sharing_the_machine": args.sharing, "machine": machine(),
             "inference": inference, "params": params}
    (RESULTS / f"{out}.json").write_text(json.dumps(facts, indent=2, default=_plain) + "\n")
    print(table.drop(columns=["load_before", "load_after"])
          .to_markdown(index=False, floatfmt=".4f"))
    print(f"bench/results/{out}.csv, .json ({facts['wall_seconds']} s)")


def _plain(value):
    return None if isinstance(value, float) and math.isnan(value) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset",
                        help="a preset of bench/quality.yaml: liver | tumor | liver_tumour")
    parser.add_argument("--models", type=lambda s: s.split(","), help="comma-separated subset")
    parser.add_argument("--epochs", type=int, help="override the preset's epochs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="one more params override, e.g. model.enhanced_pan.aspp=false")
    parser.add_argument("--name", help="results file stem; default quality-<dataset>")
    parser.add_argument("--workdir", type=Path, help="default: bench/.work/<name>")
    parser.add_argument("--folds", type=int, help="k-fold CV: every fold, then a summary")
    parser.add_argument("--sharing", default="nothing else",
                        help="what else ran on the machine meanwhile (recorded in the JSON)")
    parser.add_argument("--rescore", action="store_true",
                        help="no training: score the work dir's trained models again with "
                             "this checkout's evaluate, without / with post-processing / "
                             "with post-processing and mirroring")
    args = parser.parse_args()

    stem = args.name or f"quality-{args.dataset}"
    workdir = (args.workdir or REPO / "bench" / ".work" / stem).resolve()
    if args.rescore:
        if args.epochs or args.folds:
            parser.error("--rescore trains nothing: --epochs and --folds do not apply")
        return rescore_main(args, stem, workdir)
    started, head = time.time(), head_commit()  # every fold at the commit of the start
    params = preset_params(args.dataset, args.models, args.epochs, args.set, head)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.folds:
        tables = []
        for fold in range(args.folds):
            fold_params = deep_merge(params, {"split": {"folds": args.folds, "fold": fold}})
            table, commit = run_pipeline(workdir.with_name(f"{workdir.name}-fold{fold}"),
                                         fold_params, head)
            tables.append(table.assign(fold=fold))
        table = pd.concat(tables)
        summary = cv_summary(table)
        summary.to_csv(RESULTS / f"{stem}-summary.csv", index=False)
        print(summary.to_markdown(index=False, floatfmt=".4f"))
    else:
        table, commit = run_pipeline(workdir, params, head)
    table.to_csv(RESULTS / f"{stem}.csv", index=False)
    facts = {"command": " ".join(["python bench/quality.py", *map(shlex.quote, sys.argv[1:])]),
             "commit": commit,
             # False when --models/--epochs ran less than the preset: the table says what ran
             "complete_preset": not (args.models or args.epochs or args.set),
             "folds": args.folds,
             "wall_seconds": round(time.time() - started),
             "sharing_the_machine": args.sharing,
             "machine": machine(),
             "params": params, "report": str(workdir / "reports" / "report.html")}
    (RESULTS / f"{stem}.json").write_text(json.dumps(facts, indent=2) + "\n")
    print(table.to_markdown(index=False, floatfmt=".4f"))


if __name__ == "__main__":
    main()
