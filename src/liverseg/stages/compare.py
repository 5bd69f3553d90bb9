"""compare: one table over every model (the paper's Table 1, on our data).

Metrics with their 95% bootstrap CIs (from evaluate), parameters, FLOPs per image (batch 1
at the trained size) and measured images/s. Every figure is the model as it serves:
`served_as` names the mirroring and post-processing evaluate chose on validation
(`liverseg.postprocess`), with each one's gain in the ranked score and the cost of
mirroring (images/s without and with it, measured on the same batches).
CSV keeps each CI as `<metric>_ci_lo/_hi` columns; Markdown prints `value [lo, hi]`; JSON
keeps `<metric>_ci: [lo, hi]`. A three-class model's own IoU and Dice per class
(`iou_liver`, `iou_tumour`, ...) are columns too.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from liverseg.artifacts import Artifacts
from liverseg.config import Params
from liverseg.io import atomic_path, write_json, write_text
from liverseg.metrics import CI_METRICS, nan_to_none

COLUMNS = ["model", "fg_iou", "miou", "dice", "precision", "recall", "pixel_accuracy",
           "per_image_fg_iou_mean", "per_image_dice_mean", "per_image_hd95_mean",
           "n_parameters", "flops", "images_per_second", "best_epoch"]


# `served_as`: the decision's description (the metrics file's `inference` is the whole record).
INFERENCE_COLUMNS = ["served_as", "gain_mirror", "gain_postprocessing",
                     "images_per_second_plain", "images_per_second_mirrored"]


def _row(metrics: dict) -> dict:
    row = {k: metrics.get(k) for k in COLUMNS}
    chosen = metrics.get("inference") or {}
    row |= {k: chosen.get("describe" if k == "served_as" else k) for k in INFERENCE_COLUMNS}
    classes = metrics.get("classes") or []
    for name in classes[1:] if len(classes) > 2 else []:  # binary: fg_iou is the class's
        row |= {f"iou_{name}": metrics[f"iou_{name}"], f"dice_{name}": metrics[f"dice_{name}"]}
    row["gflops"] = metrics["flops"] / 1e9 if metrics.get("flops") is not None else None
    for key in CI_METRICS:
        lo, hi = metrics.get(f"{key}_ci") or (None, None)
        row[f"{key}_ci_lo"], row[f"{key}_ci_hi"] = lo, hi
    return row


def comparison_table(params: Params, art: Artifacts) -> pd.DataFrame:
    table = pd.DataFrame([_row(art.read_metrics(name)) for name in params.models])
    key = params.compare.rank_by
    table[key] = pd.to_numeric(table[key])  # an undefined score (None in JSON) is NaN
    # NaN ranks last: an undefined score never wins; ties keep the params' order.
    return table.sort_values(key, ascending=False, na_position="last", kind="stable")


UNDEFINED = ("{models}: {key} undefined (0/0: neither the validation truth nor the "
             "predictions hold the class), ranked after every defined score")


def _fmt(value, spec: str = ".4f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else format(value, spec)


def markdown(table: pd.DataFrame) -> str:
    """Human table: each CI metric as `value [lo, hi]`, sizes in readable units."""
    per_class = [c for c in table.columns if c.startswith("iou_")]
    header = ["model", *(f"{k} [95% CI]" for k in CI_METRICS), *per_class, "precision", "recall",
              "pixel_accuracy", "per_image_fg_iou_mean", "per_image_hd95_mean (px)",
              "params (M)", "GFLOPs", "images/s", "served as (gain: mirror / post)",
              "images/s plain / mirrored"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.to_dict(orient="records"):
        cells = [row["model"]]
        cells += [f"{_fmt(row[k])} [{_fmt(row[f'{k}_ci_lo'])}, {_fmt(row[f'{k}_ci_hi'])}]"
                  for k in CI_METRICS]
        cells += [_fmt(row[k]) for k in per_class]
        cells += [_fmt(row[k]) for k in ("precision", "recall", "pixel_accuracy",
                                         "per_image_fg_iou_mean")]
        cells += [_fmt(row["per_image_hd95_mean"], ".2f"),
                  _fmt(row["n_parameters"] / 1e6 if row["n_parameters"] else None, ".2f"),
                  _fmt(row["gflops"], ".3f"), _fmt(row["images_per_second"], ".1f"),
                  f"{row['served_as'] or 'n/a'} ({_fmt(row['gain_mirror'], '+.4f')} / "
                  f"{_fmt(row['gain_postprocessing'], '+.4f')})",
                  f"{_fmt(row['images_per_second_plain'], '.1f')} / "
                  f"{_fmt(row['images_per_second_mirrored'], '.1f')}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(params: Params, root: str | Path = ".") -> dict:
    art = Artifacts(root)
    table = comparison_table(params, art).reset_index(drop=True)
    key = params.compare.rank_by
    best = table.iloc[0]
    runner_up = table.iloc[1] if len(table) > 1 else None
    margin = float(best[key] - runner_up[key]) if runner_up is not None else math.nan
    undefined = table.loc[table[key].isna(), "model"].tolist()
    note = UNDEFINED.format(models=", ".join(undefined), key=key) if undefined else None
    records = [nan_to_none(row) for row in table.to_dict(orient="records")]
    for rec in records:  # JSON: CIs as [lo, hi] pairs, like the metrics files
        for k in CI_METRICS:
            lo, hi = rec.pop(f"{k}_ci_lo"), rec.pop(f"{k}_ci_hi")
            rec[f"{k}_ci"] = None if lo is None else [lo, hi]
    summary = {"rank_by": key, "best_model": best["model"],
               "best_score": None if math.isnan(best[key]) else float(best[key]),
               "runner_up": None if runner_up is None else runner_up["model"],
               "margin_over_next": None if math.isnan(margin) else margin,
               "undefined": undefined, "note": note, "models": records}
    with atomic_path(art.comparison(".csv")) as tmp:
        table.to_csv(tmp, index=False)
    write_text(art.comparison(".md"), markdown(table)
               + f"\nBest by {key}: **{best['model']}**"
               + (f", {margin:+.4f} over {runner_up['model']}.\n" if not math.isnan(margin)
                  else ".\n") + (f"\n{note}.\n" if note else ""))
    write_json(art.comparison(".json"), summary)
    return {k: summary[k] for k in ("rank_by", "best_model", "best_score", "runner_up",
                                    "margin_over_next")} | ({"note": note} if note else {})
