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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
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


def preset_params(dataset: str, models: list[str] | None, epochs: int | None,
                  assignments: list[str]) -> dict:
    presets = yaml.safe_load((REPO / "bench" / "quality.yaml").read_text())
    if dataset not in presets or dataset == "common":
        raise SystemExit(f"unknown dataset {dataset!r}; bench/quality.yaml has "
                         f"{sorted(set(presets) - {'common'})}")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
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
    args = parser.parse_args()

    params = preset_params(args.dataset, args.models, args.epochs, args.set)
    stem = args.name or f"quality-{args.dataset}"
    workdir = (args.workdir or REPO / "bench" / ".work" / stem).resolve()
    started, head = time.time(), head_commit()  # every fold at the commit of the start
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
             "machine": {"platform": platform.platform(), "cpu": platform.processor(),
                         "cores": os.cpu_count(), "torch": torch.__version__,
                         "threads": torch.get_num_threads(),
                         "cuda": torch.cuda.get_device_name() if torch.cuda.is_available()
                         else None},
             "params": params, "report": str(workdir / "reports" / "report.html")}
    (RESULTS / f"{stem}.json").write_text(json.dumps(facts, indent=2) + "\n")
    print(table.to_markdown(index=False, floatfmt=".4f"))


if __name__ == "__main__":
    main()
