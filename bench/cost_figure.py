"""Quality against cost for BENCHMARKS.md, from a bench/quality.py result CSV.

    python bench/cost_figure.py quality-liver-current  # docs/images/quality-cost-liver-current.png

The same picture as the report's comparison section (`liverseg.quality_cost`): each model's
fg IoU with its 95% bootstrap interval against GFLOPs per image and images/s, the models on
the front of the best trade-off marked. Reads only the CSV (and its JSON for the title).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from liverseg import quality_cost

REPO = Path(__file__).resolve().parents[1]


def rows_of(stem: str) -> list[dict]:
    with (REPO / "bench/results" / f"{stem}.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [{"model": r["model"], "fg_iou": float(r["fg_iou"]),
             "fg_iou_ci": [float(r["fg_iou_ci_low"]), float(r["fg_iou_ci_high"])],
             "gflops": float(r["gflops"]), "images_per_second": float(r["images_per_second"])}
            for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stem", help="a result in bench/results/, without .csv")
    args = parser.parse_args()
    facts = json.loads((REPO / "bench/results" / f"{args.stem}.json").read_text())
    params = facts["params"]
    title = (f"{args.stem} at {facts['commit'][:8]}: seed {params['seed']}, "
             f"{params['train']['epochs']} epochs (* and red: on the best trade-off front)")
    fig = quality_cost.figure(quality_cost.points_of(rows_of(args.stem)), title)
    out = REPO / "docs/images" / f"quality-cost-{args.stem.removeprefix('quality-')}.png"
    fig.savefig(out, dpi=110, bbox_inches="tight", metadata={"Software": None})
    print(out.relative_to(REPO))


if __name__ == "__main__":
    main()
