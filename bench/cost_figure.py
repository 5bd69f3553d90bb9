"""Quality against cost for BENCHMARKS.md, from a bench/quality.py result CSV.

    python bench/cost_figure.py quality-liver-current  # docs/images/quality-cost-liver-current.png
    python bench/cost_figure.py quality-rescore-liver-2ep  # ...-rescore-liver-2ep.png

The same picture as the report's comparison section (`liverseg.quality_cost`): each model's
fg IoU with its 95% bootstrap interval against GFLOPs per image and images/s, the models on
the front of the best trade-off marked. Reads only the CSV (and its JSON for the title).
A re-score CSV (`bench/quality.py --rescore`, a `setting` column) gives one point per model
and setting (`model setting`), GFLOPs as served (4 passes when mirrored), each model's
settings joined by a thin line in the order none, post, post+mirror.
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
    return [{"model": f"{r['model']} {r['setting']}" if r.get("setting") else r["model"],
             "fg_iou": float(r["fg_iou"]),
             "fg_iou_ci": [float(r["fg_iou_ci_low"]), float(r["fg_iou_ci_high"])],
             "gflops": float(r.get("gflops_served") or r["gflops"]),
             "images_per_second": float(r["images_per_second"])}
            for r in rows]


def join_settings(fig, rows: list[dict]) -> None:
    """A re-score's points of one model joined, setting after setting, in each panel."""
    by_model: dict[str, list[dict]] = {}
    for row in rows:
        by_model.setdefault(row["model"].split(" ")[0], []).append(row)
    for ax, cost in zip(fig.axes, quality_cost.COSTS, strict=True):
        for points in by_model.values():
            ax.plot([p[cost[0]] for p in points], [p["fg_iou"] for p in points],
                    color="grey", lw=0.6, alpha=0.6, zorder=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stem", help="a result in bench/results/, without .csv")
    args = parser.parse_args()
    facts = json.loads((REPO / "bench/results" / f"{args.stem}.json").read_text())
    params = facts["params"]
    rows = rows_of(args.stem)
    rescored = facts.get("workdir_commit", False) is not False
    trained = (f"trained at {(facts['workdir_commit'] or '?')[:8]}, re-scored at "
               f"{facts['commit'][:8]}" if rescored else f"at {facts['commit'][:8]}")
    title = (f"{args.stem} {trained}: seed {params['seed']}, {params['train']['epochs']} "
             f"epochs (* and red: on the best trade-off front)")
    if rescored:
        title += "\nGFLOPs as served: the four flipped passes when mirrored"
    fig = quality_cost.figure(quality_cost.points_of(rows), title)
    if rescored:
        join_settings(fig, rows)
    out = REPO / "docs/images" / f"quality-cost-{args.stem.removeprefix('quality-')}.png"
    fig.savefig(out, dpi=110, bbox_inches="tight", metadata={"Software": None})
    print(out.relative_to(REPO))


if __name__ == "__main__":
    main()
