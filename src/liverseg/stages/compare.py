"""compare: one table over every model (the paper's Table 1, on our data)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from liverseg.config import Params
from liverseg.io import atomic_path, read_json, write_json, write_text
from liverseg.metrics import nan_to_none

COLUMNS = ["model", "fg_iou", "miou", "dice", "precision", "recall", "pixel_accuracy",
           "per_image_fg_iou_mean", "n_parameters", "images_per_second", "best_epoch"]


def comparison_table(params: Params, metrics_dir: Path) -> pd.DataFrame:
    rows = [read_json(metrics_dir / f"{name}.json") for name in params.models]
    table = pd.DataFrame(rows)[COLUMNS]
    # NaN ranks last: an undefined score never wins.
    return table.sort_values(params.compare.rank_by, ascending=False, na_position="last")


def run(params: Params, metrics_dir: str | Path = "reports/metrics",
        out_prefix: str | Path = "reports/comparison") -> dict:
    table = comparison_table(params, Path(metrics_dir)).reset_index(drop=True)
    key = params.compare.rank_by
    best = table.iloc[0]
    margin = float(best[key] - table.iloc[1][key]) if len(table) > 1 else None
    summary = {"rank_by": key, "best_model": best["model"], "best_score": float(best[key]),
               "margin_over_next": margin,
               "models": [nan_to_none(row) for row in table.to_dict(orient="records")]}
    out_prefix = Path(out_prefix)
    with atomic_path(out_prefix.with_suffix(".csv")) as tmp:
        table.to_csv(tmp, index=False)
    write_text(out_prefix.with_suffix(".md"), table.to_markdown(index=False, floatfmt=".4f") + "\n")
    write_json(out_prefix.with_suffix(".json"), summary)
    return {k: summary[k] for k in ("rank_by", "best_model", "best_score", "margin_over_next")}
