"""The report's figures: which slices they show, how each is drawn, and its PNG bytes.

A `Figure` is a rendered PNG with its caption, written to `reports/figures/<name>` and
embedded in the HTML as a data URI; `render_png` saves without metadata, so identical inputs
give byte-identical PNGs. The drawing helpers (`show_ct`, `draw_contour`, `grid`) and one
`*_figure` function per figure live here, with the seeded or ranked choice of the slices
they show (`sample_rows`, `choose_visual_slices`) and those slices read with every model's
prediction (`VisualSlice`, `load_visual_slices`). Matplotlib runs headless (Agg).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display inside DVC, CI or a container

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from liverseg import labels  # noqa: E402
from liverseg.report.inputs import Inputs, load_slice  # noqa: E402
from liverseg.report.table import fmt, is_missing  # noqa: E402

DPI = 100  # keeps the HTML small (well under 3 MB for six models)
TRUTH_COLOUR, PRED_COLOUR = "#00c853", "#ff1744"


@dataclass(frozen=True)
class Figure:
    """A rendered PNG: written to `figures/<name>` and embedded as a data URI."""

    name: str
    caption: str
    png: bytes

    @property
    def path(self) -> str:
        return f"figures/{self.name}"

    @property
    def uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


def render_png(fig, name: str, caption: str) -> Figure:
    buf = io.BytesIO()
    try:
        # No "Software" metadata: identical inputs give byte-identical PNGs (DVC-friendly).
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    finally:
        plt.close(fig)
    return Figure(name, caption, buf.getvalue())


# ----------------------------------------------------------------------------- drawing


def show_ct(ax, image: np.ndarray, title: str) -> None:
    ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def draw_contour(ax, mask: np.ndarray, colour: str, fill: bool = False) -> None:
    """The foreground's outline (any class); with three classes the tumour's (class 2)
    dashed inside it."""
    for part, style in ((mask > 0, "solid"), (mask == 2, "dashed")):
        if fill and style == "solid":
            ax.imshow(np.ma.masked_where(~part, part), cmap=ListedColormap([colour]),
                      alpha=0.35, interpolation="nearest")
        if part.any():  # contour() warns on a constant array
            ax.contour(part.astype(float), levels=[0.5], colors=[colour], linewidths=1.2,
                       linestyles=style)


def grid(nrows: int, ncols: int, cell: float = 2.0):
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell * ncols, cell * nrows + 0.3),
                             squeeze=False, layout="constrained")
    return fig, axes


# ----------------------------------------------------------------------------- data and training


def fg_fraction_figure(splits: dict[str, pd.DataFrame]) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    top = max((float(f["fg_fraction"].max()) for f in splits.values() if len(f)), default=0.0)
    top = top or 1.0  # all-empty masks: still a valid bin range
    bins = np.linspace(0.0, top, 21)
    for name, frame in splits.items():
        ax.hist(frame["fg_fraction"], bins=bins, alpha=0.55, label=f"{name} ({len(frame)} slices)")
    ax.set_xlabel("foreground fraction of the slice")
    ax.set_ylabel("slices")
    ax.legend(fontsize=8)
    return render_png(fig, "fg_fraction.png", "Foreground fraction per slice, by split.")


def sample_rows(val: pd.DataFrame, seed: int, n: int = 4) -> pd.DataFrame:
    """A seeded choice of validation slices with foreground (any slices if none have it)."""
    pool = val[val["fg_fraction"] > 0]
    pool = pool if len(pool) else val
    picks = np.random.default_rng(seed).choice(len(pool), size=min(n, len(pool)), replace=False)
    return pool.iloc[np.sort(picks)]


def samples_figure(raw_dir: Path, rows: pd.DataFrame, num_classes: int) -> Figure:
    fig, axes = grid(1, max(len(rows), 1), cell=2.6)
    for ax, (_, row) in zip(axes[0], rows.iterrows(), strict=False):
        image, truth = load_slice(raw_dir, row, num_classes)
        show_ct(ax, image, f"{row['slice_id']}\nforeground {row['fg_fraction']:.3f}")
        draw_contour(ax, truth, TRUTH_COLOUR, fill=True)
    for ax in axes[0][len(rows):]:
        ax.set_axis_off()
    return render_png(fig, "samples.png",
                      "Sample validation slices (seeded choice) with the ground-truth mask.")


def training_figure(model: str, history: pd.DataFrame, best_epoch) -> Figure:
    """Loss, mIoU and pixel accuracy per epoch (the paper's Figures 4-6), best epoch marked."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), layout="constrained")
    panels = [("loss", "Loss"), ("miou", "mIoU"), ("pixel_accuracy", "Pixel accuracy")]
    for ax, (key, label) in zip(axes, panels, strict=True):
        ax.plot(history["epoch"], history[f"train_{key}"], "o-", ms=3, label="train")
        ax.plot(history["epoch"], history[f"val_{key}"], "s-", ms=3, label="validation")
        if not is_missing(best_epoch):
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"best epoch {best_epoch}")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(model, fontsize=11)
    return render_png(fig, f"training_{model}.png",
                      f"{model}: train and validation loss, mIoU and pixel accuracy per epoch.")


# ----------------------------------------------------------------------------- visual


def choose_visual_slices(per_image: pd.DataFrame) -> list[tuple[str, str]]:
    """(role, slice_id): best, median and worst per-image IoU among slices with truth
    foreground; ties broken by slice id so the choice is deterministic."""
    fg = per_image[per_image["truth_pixels"] > 0]
    fg = fg.sort_values(["fg_iou", "slice_id"], ascending=[False, True], kind="mergesort")
    ids = fg["slice_id"].tolist()
    if not ids:
        return []
    chosen: list[tuple[str, str]] = []
    for role, i in (("best", 0), ("median", len(ids) // 2), ("worst", len(ids) - 1)):
        if ids[i] not in {sid for _, sid in chosen}:
            chosen.append((role, ids[i]))
    return chosen


def iou_of(per_image: pd.DataFrame, slice_id: str):
    hit = per_image.loc[per_image["slice_id"] == slice_id, "fg_iou"]
    return float(hit.iloc[0]) if len(hit) else None


@dataclass
class VisualSlice:
    role: str
    slice_id: str
    image: np.ndarray
    truth: np.ndarray
    preds: dict[str, np.ndarray]
    ious: dict[str, float | None]
    num_classes: int

    def shown(self, mask: np.ndarray) -> np.ndarray:
        """A class mask as grey levels: 0/255, or 0/128/255 for three classes."""
        return labels.encode(mask, self.num_classes)


def load_visual_slices(raw_dir: Path, inputs: Inputs, models: list[str],
                       chosen: list[tuple[str, str]]) -> list[VisualSlice]:
    val = inputs.splits["val"].set_index("slice_id", drop=False)
    num_classes = len(labels.classes_of(inputs.stats))
    out = []
    for role, sid in chosen:
        if sid not in val.index:
            raise ValueError(f"slice {sid} is in the per-image results but not in val.csv; "
                             "are the splits and the evaluation from the same run?")
        image, truth = load_slice(raw_dir, val.loc[sid], num_classes)
        preds = {}
        for m in models:
            if sid not in inputs.predictions[m]:
                raise ValueError(f"predictions/{m}.h5 has no mask for validation slice {sid}")
            preds[m] = inputs.predictions[m][sid]
            if preds[m].shape != image.shape:  # evaluate scores at the stored size
                raise ValueError(f"predictions/{m}.h5: mask of {sid} is {preds[m].shape}, "
                                 f"the slice is {image.shape}; rerun `liverseg evaluate {m}`")
        out.append(VisualSlice(role, sid, image, truth, preds,
                               {m: iou_of(inputs.per_image[m], sid) for m in models},
                               num_classes))
    return out


def visual_figure(slices: list[VisualSlice], models: list[str]) -> Figure:
    """CT, truth, then every model's prediction (the paper's Figures 7 and 9)."""
    fig, axes = grid(len(slices), 2 + len(models))
    for row, s in zip(axes, slices, strict=True):
        show_ct(row[0], s.image, f"CT ({s.role})\n{s.slice_id}")
        show_ct(row[1], s.shown(s.truth), "ground truth")
        for ax, m in zip(row[2:], models, strict=True):
            show_ct(ax, s.shown(s.preds[m]), f"{m}\nIoU {fmt(s.ious[m], '.3f')}")
    return render_png(fig, "visual.png",
                      "Best, median and worst validation slice (by the best model's per-image "
                      "IoU): CT, ground truth and each model's prediction.")


def overlay_figure(slices: list[VisualSlice], best: str) -> Figure:
    """Prediction and truth contours on the CT (the paper's Figure 8)."""
    fig, axes = grid(1, len(slices), cell=3.2)
    for ax, s in zip(axes[0], slices, strict=True):
        show_ct(ax, s.image, f"{s.role}: {s.slice_id}\n{best} IoU {fmt(s.ious[best], '.3f')}")
        draw_contour(ax, s.truth, TRUTH_COLOUR)
        draw_contour(ax, s.preds[best], PRED_COLOUR)
    handles = [Line2D([], [], color=TRUTH_COLOUR, label="ground truth"),
               Line2D([], [], color=PRED_COLOUR, label=f"{best} prediction")]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=8)
    return render_png(fig, "overlay.png",
                      f"Contours of the ground truth and of {best}'s prediction on the CT.")


def iou_distribution_figure(per_image: dict[str, pd.DataFrame], models: list[str]) -> Figure:
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(models)), 3.6))
    jitter = np.random.default_rng(0)  # fixed: the figure is reproducible
    ticks = []
    for x, m in enumerate(models, start=1):
        values = per_image[m]["fg_iou"].dropna().to_numpy()
        ticks.append(f"{m}\n(n={len(values)})")
        if len(values):
            ax.boxplot(values, positions=[x], widths=0.5, showfliers=False)
            ax.scatter(x + jitter.uniform(-0.15, 0.15, len(values)), values, s=8, alpha=0.6)
    ax.set_xticks(range(1, len(models) + 1), ticks, fontsize=8)
    ax.set_xlim(0.4, len(models) + 0.6)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("per-image foreground IoU")
    ax.grid(axis="y", alpha=0.3)
    return render_png(fig, "iou_distribution.png",
                      "Per-image foreground IoU per model (slices where truth and prediction are "
                      "both empty are excluded; n counts the rest).")
