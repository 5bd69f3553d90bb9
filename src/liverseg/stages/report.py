"""report: one self-contained HTML report (and a Markdown twin) over every stage's outputs.

Figures are written as PNGs under `reports/figures/` and the same bytes are embedded in
`reports/report.html` as base64 data URIs, so the HTML is a single file that opens offline.
The stage only reads files that earlier stages wrote, and this module imports neither torch,
DVC, MLflow nor Dagster (`liverseg report` parses params.yaml first, and that parse imports
torch: the model-name validator asks the model registry).
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display inside DVC, CI or a container

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from liverseg import labels, quality_cost  # noqa: E402
from liverseg.io import atomic_dir, load_gray, load_masks, read_json, write_text  # noqa: E402

DPI = 100  # keeps the HTML small (well under 3 MB for six models)
TRUTH_COLOUR, PRED_COLOUR = "#00c853", "#ff1744"

SPLIT_COLUMNS = ["slice_id", "patient_id", "slice_index", "image", "mask", "fg_fraction"]
TRAINING_COLUMNS = ["epoch", "train_loss", "train_miou", "train_pixel_accuracy", "val_loss",
                    "val_fg_iou", "val_miou", "val_pixel_accuracy"]
PER_IMAGE_COLUMNS = ["slice_id", "fg_iou", "tp", "fp", "fn", "truth_pixels"]

# (key, header, format spec); "d" specs accept floats such as 7.0 (pandas turns int columns
# holding a null into floats).
COMPARISON_COLUMNS = [
    ("model", "Model", None), ("fg_iou", "FG IoU", ".4f"), ("fg_iou_ci", "FG IoU 95% CI", "ci"),
    ("miou", "mIoU", ".4f"),
    ("dice", "Dice", ".4f"), ("precision", "Precision", ".4f"), ("recall", "Recall", ".4f"),
    ("pixel_accuracy", "Pixel acc.", ".4f"), ("per_image_fg_iou_mean", "Per-image FG IoU", ".4f"),
    ("n_parameters", "Parameters", ",d"), ("gflops", "GFLOPs", ".3f"),
    ("images_per_second", "Images/s", ".1f"),
    ("best_epoch", "Best epoch", "d"),
]

# The paper's own numbers on its own data: shown apart, never merged into our table.
PAPER_TITLE = "Reported by the paper on its own data (not comparable)"
PAPER_RESULTS = [("MANet", 0.6555), ("Linknet", 0.6793), ("PSPNet", 0.9113),
                 ("UNet with CBAM", 0.9306), ("PAN (Enhanced, proposed)", 0.9323)]

METRIC_DEFINITIONS = (
    "Global metrics pool the pixels of the whole validation split before taking each ratio; "
    "mIoU is the mean of the background and foreground IoU; the per-image mean averages the "
    "foreground IoU of each slice and excludes slices where truth and prediction are both "
    "empty (their IoU is undefined); n/a marks a metric that is undefined on this data."
)


# ----------------------------------------------------------------------------- formatting


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt(value, spec: str | None = ".4f") -> str:
    """One table cell: undefined metrics (null in JSON, NaN in pandas) read as 'n/a'."""
    if is_missing(value):
        return "n/a"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if spec is None or isinstance(value, str):
        return str(value)
    if spec == "ci":  # a [low, high] bootstrap interval
        return "n/a" if any(is_missing(v) for v in value) else f"[{value[0]:.4f}, {value[1]:.4f}]"
    if spec.endswith("d"):
        value = int(value)
    return format(value, spec)


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[str]]


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


# ----------------------------------------------------------------------------- inputs


def read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected file is missing (did the upstream stage run?)")
    frame = pd.read_csv(path, dtype={"slice_id": str, "patient_id": str})
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {columns}")
    return frame


@dataclass
class Inputs:
    validation: dict
    stats: dict
    splits: dict[str, pd.DataFrame]
    histories: dict[str, pd.DataFrame]
    metrics: dict[str, dict]
    comparison: dict
    per_image: dict[str, pd.DataFrame]
    predictions: dict[str, dict[str, np.ndarray]]
    registry: dict


def load_inputs(models: list[str], splits_dir: Path, reports_dir: Path) -> Inputs:
    """Read every upstream output; a missing file raises FileNotFoundError naming it."""
    inputs = Inputs(
        validation=read_json(reports_dir / "validation.json"),
        stats=read_json(splits_dir / "stats.json"),
        splits={s: read_csv(splits_dir / f"{s}.csv", SPLIT_COLUMNS) for s in ("train", "val")},
        histories={m: read_csv(reports_dir / "training" / f"{m}.csv", TRAINING_COLUMNS)
                   for m in models},
        metrics={m: read_json(reports_dir / "metrics" / f"{m}.json") for m in models},
        comparison=read_json(reports_dir / "comparison.json"),
        per_image={m: read_csv(reports_dir / "per_image" / f"{m}.csv", PER_IMAGE_COLUMNS)
                   for m in models},
        predictions={m: load_masks(reports_dir / "predictions" / f"{m}.npz")
                     for m in models},
        registry=read_json(reports_dir / "registry.json"),
    )
    compared = {row["model"] for row in inputs.comparison["models"]}
    if compared != set(models):
        # A stale comparison would put numbers of other models next to these figures.
        raise ValueError(f"{reports_dir / 'comparison.json'}: compares {sorted(compared)} but "
                         f"params `models` is {sorted(models)}; rerun `compare`")
    return inputs


# ----------------------------------------------------------------------------- images


def load_slice(raw_dir: Path, row: pd.Series, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The CT slice and its truth as class indices."""
    return (load_gray(raw_dir / row["image"]),
            labels.decode(load_gray(raw_dir / row["mask"]), num_classes))


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


# ----------------------------------------------------------------------------- data section


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


def data_context(params, inputs: Inputs) -> dict:
    v, stats = inputs.validation, inputs.stats
    rules = Table(["Rule", "Expectation", "Result", "Failing slices"], [
        [r["rule"], r["expectation"], "pass" if r["success"] else "FAIL",
         f"{len(r['failing_slices'])}" + (f": {', '.join(r['failing_slices'][:5])}"
                                          + (" ..." if len(r["failing_slices"]) > 5 else "")
                                          if r["failing_slices"] else "")]
        for r in v["rules"]])
    quarantine = Table(["Slice", "Rules broken"],
                       [[sid, "; ".join(reasons)] for sid, reasons in v["quarantine"].items()])
    splits = Table(["Split", "Patients", "Slices", "Foreground slices", "Patient ids"], [
        [name, str(len(stats[name]["patients"])), str(stats[name]["slices"]),
         str(stats[name]["foreground_slices"]), ", ".join(map(str, stats[name]["patients"]))]
        for name in ("train", "val")])
    return {
        "source": params.data.source, "target": params.data.target,
        "success": v["success"], "ingested": v["ingested"], "accepted": v["accepted"],
        "quarantined": v["quarantined"], "rules": rules, "quarantine": quarantine,
        "splits": splits, "mean": fmt(stats["mean"]), "std": fmt(stats["std"]),
        "seed": stats["seed"], "leakage_checked": fmt(bool(stats.get("leakage_checked"))),
        # validate's warnings (e.g. slices without a patient id: a leakage risk); older
        # validation.json files have none.
        "warnings": list(v.get("warnings") or []),
    }


# ----------------------------------------------------------------------------- training


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


def training_context(inputs: Inputs, models: list[str]) -> tuple[list[dict], Table]:
    sections, rows = [], []
    for model in models:
        history, best = inputs.histories[model], inputs.metrics[model].get("best_epoch")
        at_best = history[history["epoch"] == best]
        pick = at_best.iloc[0] if len(at_best) else {}
        rows.append([model, str(len(history)), fmt(best, "d"), fmt(pick.get("val_fg_iou")),
                     fmt(pick.get("val_miou")), fmt(pick.get("val_pixel_accuracy"))])
        sections.append({"model": model, "figure": training_figure(model, history, best)})
    table = Table(["Model", "Epochs", "Best epoch", "Val FG IoU", "Val mIoU", "Val pixel acc."],
                  rows)
    return sections, table


# ----------------------------------------------------------------------------- comparison


MULTICLASS_DEFINITIONS = (
    " With three classes (background, liver, tumour) each class is scored against the rest: "
    "FG IoU and Dice are the mean of the liver and tumour values, mIoU the mean over all "
    "three classes. In the figures masks are grey (liver) and white (tumour); a contour is "
    "the foreground (liver or tumour), the tumour dashed inside it."
)


def comparison_context(comparison: dict) -> dict:
    per_class = sorted({k for row in comparison["models"] for k in row if k.startswith("iou_")})
    columns = COMPARISON_COLUMNS[:3] + [
        (k, f"{k.removeprefix('iou_').capitalize()} IoU", ".4f") for k in per_class
    ] + COMPARISON_COLUMNS[3:]
    table = Table([h for _, h, _ in columns],
                  [[fmt(row.get(k), spec) for k, _, spec in columns]
                   for row in comparison["models"]])
    paper = Table(["Model (paper)", "Reported score"], [[m, f"{s:.4f}"] for m, s in PAPER_RESULTS])
    points = quality_cost.points_of(comparison["models"])
    cost = render_png(quality_cost.figure(points), "quality_cost.png",
                      "FG IoU (95% CI) against GFLOPs per image and images/s; red and *: on "
                      "the front of the best trade-off (no model both better and cheaper)")
    return {"table": table, "paper": paper, "paper_title": PAPER_TITLE,
            "cost_figure": cost, "cost_points": points,
            "rank_by": comparison["rank_by"], "best_model": comparison["best_model"],
            "best_score": fmt(comparison["best_score"]),
            "margin": fmt(comparison.get("margin_over_next")),
            "definitions": METRIC_DEFINITIONS + (MULTICLASS_DEFINITIONS if per_class else "")}


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
                raise ValueError(f"predictions/{m}.npz has no mask for validation slice {sid}")
            preds[m] = inputs.predictions[m][sid]
            if preds[m].shape != image.shape:  # evaluate scores at the stored size
                raise ValueError(f"predictions/{m}.npz: mask of {sid} is {preds[m].shape}, "
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


def visual_context(raw_dir: Path, inputs: Inputs, models: list[str], best: str) -> dict:
    chosen = choose_visual_slices(inputs.per_image[best])
    slices = load_visual_slices(raw_dir, inputs, models, chosen)
    figures = [visual_figure(slices, models), overlay_figure(slices, best)] if slices else []
    table = Table(["Role", "Slice", "Truth pixels", *models], [
        [s.role, s.slice_id, str(int(s.truth.sum())), *(fmt(s.ious[m]) for m in models)]
        for s in slices])
    figures.append(iou_distribution_figure(inputs.per_image, models))
    return {"best_model": best, "chosen": table, "figures": figures}


# ----------------------------------------------------------------------------- lineage


def lineage_context(registry: dict) -> dict:
    tags = registry.get("tags", {})
    commit = tags.get("git_commit", "unknown")
    alias = registry.get("alias") or "no alias: gate failed"
    rows = [
        ("Registered model", registry["registered_model"]),
        ("Version", registry["version"]),
        ("Alias", alias),
        ("Quality gate", registry["quality_gate"]),
        ("Model", registry["model"]),
        ("MLflow run id", registry["run_id"]),
        ("Git commit", commit),
        ("Git dirty", tags.get("git_dirty", "unknown")),
        ("Raw data md5", tags.get("data_raw_md5", "missing")),
        ("Manifest md5", tags.get("data_manifest_md5", "missing")),
        ("Splits md5", tags.get("data_splits_md5", "missing")),
        ("Params hash", tags.get("params_hash", "missing")),
        ("Validation success", tags.get("validation_success", "unknown")),
        ("Weights sha256 (tensors)", tags.get("weights_sha256", "not recorded")),
        ("Model card", (registry.get("model_card") or {}).get("artifact", "none")),
    ]
    history = registry.get("alias_history") or []
    champion = registry.get("champion_version") or next(
        (e["to_version"] for e in reversed(history) if e["alias"] == "champion"), None)
    rows.insert(3, ("Champion now", f"version {champion}" if champion else "none"))
    return {
        "rows": Table(["Field", "Value"], [[k, fmt(v, None)] for k, v in rows]),
        # The registry keeps no alias history (mlflow#2169): register records every move.
        "history": Table(["When (UTC)", "Alias", "From version", "To version", "Who", "Why"],
                         [[e["when"], e["alias"], fmt(e["from_version"], None),
                           str(e["to_version"]), e["who"], e["why"]]
                          for e in reversed(history)]),
        "tags": Table(["Tag", "Value"], [[k, str(v)] for k, v in sorted(tags.items())]),
        "command": f"git checkout {commit} && dvc pull && dvc repro",
        "dirty": tags.get("git_dirty") == "true",
        "audit_command": f"liverseg audit models:/{registry['registered_model']}/"
                         f"{registry['version']}",
        "audits": audit_table(registry.get("audits") or []),
        "model_card": (registry.get("model_card") or {}).get("markdown"),
    }


def audit_table(audits: list[dict]) -> Table:
    """The last `liverseg audit` of the registered version and the champion, as register saw
    them (an audit records itself on the version: `liverseg lineage` shows the newest)."""
    rows = []
    for entry in audits:
        version, a = str(entry["version"]), entry.get("audit")
        if a is None:
            rows.append([version, "never", "", "not audited", ""])
            continue
        diffs = a["differences"]  # a list, or the text when the tag was truncated
        rows.append([version, a["at"], a["by"] or "", a["result"],
                     "; ".join(diffs) if isinstance(diffs, list) else diffs or ""])
    return Table(["Version", "Audited at (UTC)", "By", "Result", "Differences"], rows)


# ----------------------------------------------------------------------------- entry point


def environment() -> Environment:
    # "html.j2" too: select_autoescape matches name suffixes, and ours end in .j2.
    return Environment(loader=PackageLoader("liverseg", "templates"),
                       autoescape=select_autoescape(["html", "html.j2"]),
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                       keep_trailing_newline=True)


def build_context(params, raw_dir: Path, inputs: Inputs) -> dict:
    models = list(params.models)
    best = inputs.comparison["best_model"]
    training, training_table = training_context(inputs, models)
    val = inputs.splits["val"]
    data = data_context(params, inputs)
    data["figures"] = [fg_fraction_figure(inputs.splits),
                       samples_figure(raw_dir, sample_rows(val, int(inputs.stats["seed"])),
                                      len(labels.classes_of(inputs.stats)))]
    return {
        "title": "Liver-tumour segmentation report",
        "models": models,
        "data": data,
        "training": training,
        "training_table": training_table,
        "comparison": comparison_context(inputs.comparison),
        "visual": visual_context(raw_dir, inputs, models, best),
        "lineage": lineage_context(inputs.registry),
    }


def all_figures(context: dict) -> list[Figure]:
    return (context["data"]["figures"] + [t["figure"] for t in context["training"]]
            + [context["comparison"]["cost_figure"]] + context["visual"]["figures"])


def run(params, raw_dir: str | Path = "data/raw", splits_dir: str | Path = "data/splits",
        reports_dir: str | Path = "reports") -> dict:
    raw_dir, reports_dir = Path(raw_dir), Path(reports_dir)
    inputs = load_inputs(list(params.models), Path(splits_dir), reports_dir)
    context = build_context(params, raw_dir, inputs)
    figures = all_figures(context)
    env = environment()
    html = env.get_template("report.html.j2").render(**context)
    markdown = env.get_template("report.md.j2").render(**context)

    # Everything is rendered before anything is written: a failure leaves the old report whole.
    with atomic_dir(reports_dir / "figures") as tmp:
        for figure in figures:
            (tmp / figure.name).write_bytes(figure.png)
    html_path = write_text(reports_dir / "report.html", html)
    md_path = write_text(reports_dir / "report.md", markdown)
    return {"report": str(html_path), "markdown": str(md_path), "figures": len(figures),
            "models": context["models"], "best_model": context["comparison"]["best_model"],
            "html_bytes": len(html.encode())}
