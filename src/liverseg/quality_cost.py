"""Quality against cost: every model's fg IoU (with its 95% interval) against its GFLOPs per
image and its images/s, the models on the front of the best trade-off marked.

A model is on the front when no other model is at least as good in both quality and cost
and strictly better in one (fewer GFLOPs, or more images/s). Used by the report's comparison
section and by bench/tables.py for BENCHMARKS.md, so both draw the same picture.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

COSTS = (("gflops", "GFLOPs per image (forward, trained size)", "lower"),
         ("images_per_second", "images/s (evaluate, this machine)", "higher"))


def on_front(points: list[dict], cost: str, better: str) -> set[str]:
    """Models no other model dominates in (fg_iou, `cost`)."""
    def dominates(a: dict, b: dict) -> bool:
        cheaper = a[cost] <= b[cost] if better == "lower" else a[cost] >= b[cost]
        strictly = a["fg_iou"] > b["fg_iou"] or a[cost] != b[cost]
        return a["fg_iou"] >= b["fg_iou"] and cheaper and strictly

    return {p["model"] for p in points if not any(dominates(q, p) for q in points if q is not p)}


def points_of(rows: list[dict]) -> list[dict]:
    """The figure's points: model, fg_iou, its interval and both costs, from comparison rows
    (rows without a score or a cost are left out of the picture, not drawn as zero)."""
    out = []
    for row in rows:
        values = [row.get(k) for k in ("fg_iou", "gflops", "images_per_second")]
        if any(v is None for v in values):
            continue
        lo, hi = row.get("fg_iou_ci") or (row["fg_iou"], row["fg_iou"])
        out.append({"model": row["model"], "fg_iou": row["fg_iou"], "ci_low": lo,
                    "ci_high": hi, "gflops": row["gflops"],
                    "images_per_second": row["images_per_second"]})
    return out


def figure(points: list[dict], title: str = ""):
    """Two panels (quality against GFLOPs, against images/s); front models filled, named."""
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8), sharey=True)
    for ax, (cost, label, better) in zip(axes, COSTS, strict=True):
        front = on_front(points, cost, better)
        for p in points:
            marked = p["model"] in front
            ax.errorbar(p[cost], p["fg_iou"],
                        yerr=[[p["fg_iou"] - p["ci_low"]], [p["ci_high"] - p["fg_iou"]]],
                        fmt="o", ms=7, capsize=3, color="tab:red" if marked else "tab:blue",
                        mfc="tab:red" if marked else "white", label=p["model"])
            ax.annotate(p["model"] + (" *" if marked else ""), (p[cost], p["fg_iou"]),
                        textcoords="offset points", xytext=(5, 4), fontsize=7)
        front_points = sorted((p for p in points if p["model"] in front), key=lambda p: p[cost])
        ax.plot([p[cost] for p in front_points], [p["fg_iou"] for p in front_points],
                ls=":", color="tab:red", lw=1)
        ax.set_xlabel(f"{label}; {better} is better")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("FG IoU (global), 95% CI")
    fig.suptitle(title or "Quality against cost (* and red: on the best trade-off front)",
                 fontsize=9)
    fig.tight_layout()
    return fig
