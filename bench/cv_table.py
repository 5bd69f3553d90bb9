"""One cross-validation table from several `bench/quality.py --folds K` runs, on demand:

    python bench/cv_table.py quality-tumor-cv quality-tumor-cv-no-se \
        quality-tumor-cv-context1 --name quality-tumor-cv-table

Each run's per-fold rows (`bench/results/<stem>.csv`) are labelled by the `--set` overrides
of its command (e.g. `enhanced_pan [se=false]`); rows are paired by fold (same folds, seed
and epochs in every run, checked). Writes to bench/results/:
- `<name>.csv`: per row, mean and sd over folds of fg IoU and Dice, beside its cost:
  GFLOPs per image at the trained size and evaluate's images/s (the CSV's columns; a run
  collected before quality.py wrote them gets them from each fold's metrics JSON in
  bench/.work/, written into its CSV);
- `<name>-paired.csv`: every Enhanced PAN row minus every other row (each pair once), paired
  by fold, with the 95% t-interval (folds are the sampled unit) and whether it excludes 0;
- `<name>-context.csv`: for a model run with and without `data.context_slices`, the paired
  difference (context minus none).
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import numpy as np
import pandas as pd

from liverseg.metrics import paired_difference

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
IGNORED_SETS = ("model.in_channels", "seed")  # implied by context_slices / equal in every run


def variant(command: str) -> str:
    """`a.b.c=v` overrides of a quality.py command as a label: "c=v, ..." ("" for none)."""
    words = shlex.split(command)
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    return ", ".join(s.split("=")[0].split(".")[-1] + "=" + s.split("=", 1)[1]
                     for s in sets if s.split("=")[0] not in IGNORED_SETS)


def cost(stem: str, model: str, fold: int) -> dict:
    """GFLOPs and images/s of one model in one fold, from the run's metrics JSON."""
    path = REPO / "bench" / ".work" / f"{stem}-fold{fold}" / "reports" / "metrics" / f"{model}.json"
    if not path.is_file():
        return {"gflops": np.nan, "images_per_second": np.nan}
    metrics = json.loads(path.read_text())
    return {"gflops": metrics["flops"] / 1e9, "images_per_second": metrics["images_per_second"]}


def per_fold_rows(stems: list[str]) -> pd.DataFrame:
    frames, recipes = [], {}
    for stem in stems:
        facts = json.loads((RESULTS / f"{stem}.json").read_text())
        label = variant(facts["command"])
        recipes[stem] = (facts["folds"], facts["params"]["seed"],
                         facts["params"]["train"]["epochs"])
        frame = pd.read_csv(RESULTS / f"{stem}.csv")
        if "gflops" not in frame:  # a run collected before quality.py wrote the cost: the
            frame[["gflops", "images_per_second"]] = [  # same run's metrics, added to its CSV
                list(cost(stem, m, f).values()) for m, f in zip(frame.model, frame.fold,
                                                              strict=True)]
            frame.to_csv(RESULTS / f"{stem}.csv", index=False)
        frame["base_model"] = frame["model"]
        frame["variant"] = label
        frame["model"] = [f"{m} [{label}]" if label else m for m in frame["model"]]
        frames.append(frame)
    if len(set(recipes.values())) > 1:
        raise SystemExit(f"runs differ in (folds, seed, epochs): {recipes}; rows would not pair")
    return pd.concat(frames, ignore_index=True)


def tables(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    summary = (rows.groupby("model")
               .agg(folds=("fold", "nunique"), fg_iou_mean=("fg_iou", "mean"),
                    fg_iou_sd=("fg_iou", "std"), dice_mean=("dice", "mean"),
                    dice_sd=("dice", "std"), gflops=("gflops", "mean"),
                    images_per_second=("images_per_second", "mean"))
               .reset_index().sort_values("fg_iou_mean", ascending=False))
    wide = rows.pivot(index="fold", columns="model", values="fg_iou")
    pans = [m for m in wide if m.startswith("enhanced_pan")]
    # each Enhanced PAN row against every baseline, and against each later Enhanced PAN row
    pairs = pd.DataFrame([{"model": a, "versus": b, **paired_difference(wide[a], wide[b])}
                          for i, a in enumerate(pans) for b in wide
                          if b not in pans or pans.index(b) > i])
    with_context = rows[rows.variant.str.contains("context_slices")]
    context = pd.DataFrame([
        {"model": base, "with": m, "without": base, **paired_difference(wide[m], wide[base])}
        for base, m in zip(with_context.base_model, with_context.model, strict=True)
        if base in wide]).drop_duplicates("with")
    return summary, pairs, context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stems", nargs="+", help="results stems of quality.py --folds runs")
    parser.add_argument("--name", required=True, help="output stem in bench/results/")
    args = parser.parse_args()
    summary, pairs, context = tables(per_fold_rows(args.stems))
    summary.to_csv(RESULTS / f"{args.name}.csv", index=False)
    pairs.to_csv(RESULTS / f"{args.name}-paired.csv", index=False)
    context.to_csv(RESULTS / f"{args.name}-context.csv", index=False)
    for table in (summary, pairs, context):
        print(table.to_markdown(index=False, floatfmt=".4f"), end="\n\n")


if __name__ == "__main__":
    main()
