"""The report's sections as template context: what `report.html.j2` and `report.md.j2` show.

One `*_context` function per section (data, training, comparison, visual, lineage) turns the
`Inputs` into tables (`Table`, every cell through `fmt`) and figures; `build_context` puts
them together in the order of the report and `all_figures` lists every figure it holds. The
fixed text lives here too: the comparison's columns, the metric definitions, and the paper's
own numbers (`PAPER_RESULTS`), shown apart and never merged into our table.
"""

from __future__ import annotations

from pathlib import Path

from liverseg import labels, quality_cost
from liverseg.report.figures import (
    Figure,
    choose_visual_slices,
    fg_fraction_figure,
    iou_distribution_figure,
    load_visual_slices,
    overlay_figure,
    render_png,
    sample_rows,
    samples_figure,
    training_figure,
    visual_figure,
)
from liverseg.report.inputs import Inputs
from liverseg.report.table import Table, fmt

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
MULTICLASS_DEFINITIONS = (
    " With three classes (background, liver, tumour) each class is scored against the rest: "
    "FG IoU and Dice are the mean of the liver and tumour values, mIoU the mean over all "
    "three classes. In the figures masks are grey (liver) and white (tumour); a contour is "
    "the foreground (liver or tumour), the tumour dashed inside it."
)


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


def inference_table(comparison: dict) -> Table:
    """Each model's mirroring and post-processing as evaluate chose them on validation,
    their gains in the ranked score and mirroring's cost (`liverseg.postprocess`)."""
    rows = [[row["model"], row.get("served_as") or "n/a", fmt(row.get("gain_mirror"), "+.4f"),
             fmt(row.get("gain_postprocessing"), "+.4f"),
             fmt(row.get("images_per_second_plain"), ".1f"),
             fmt(row.get("images_per_second_mirrored"), ".1f")]
            for row in comparison["models"]]
    return Table(["Model", "Served as", "Gain: mirroring", "Gain: post-processing",
                  "Images/s plain", "Images/s mirrored"], rows)


CASE_KEYS = (("dice", "Dice", ".4f"), ("voe", "VOE", ".4f"), ("rvd", "RVD", "+.4f"),
             ("assd", "ASSD (mm)", ".2f"), ("mssd", "MSSD (mm)", ".2f"),
             ("hd95", "HD95 (mm)", ".2f"))


def per_case_table(metrics: dict[str, dict]) -> Table | None:
    """The LiTS challenge's per-case 3D rows of every model (volume sources with a grid;
    None when no model has any)."""
    rows = []
    for model, m in metrics.items():
        cases = (m.get("per_case_3d") or {}).get("cases") or []
        classes = (m.get("classes") or [])[1:]
        rows += [[model, str(case["case"]), name,
                  *(fmt(case.get(f"{name}_{k}"), spec) for k, _, spec in CASE_KEYS)]
                 for case in cases for name in classes]
    if not rows:
        return None
    return Table(["Model", "Case", "Class", *(h for _, h, _ in CASE_KEYS)], rows)


def visual_context(raw_dir: Path, inputs: Inputs, models: list[str], best: str) -> dict:
    chosen = choose_visual_slices(inputs.per_image[best])
    slices = load_visual_slices(raw_dir, inputs, models, chosen)
    figures = [visual_figure(slices, models), overlay_figure(slices, best)] if slices else []
    table = Table(["Role", "Slice", "Truth pixels", *models], [
        [s.role, s.slice_id, str(int(s.truth.sum())), *(fmt(s.ious[m]) for m in models)]
        for s in slices])
    figures.append(iou_distribution_figure(inputs.per_image, models))
    return {"best_model": best, "chosen": table, "figures": figures}


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
        "comparison": comparison_context(inputs.comparison) | {
            "inference": inference_table(inputs.comparison),
            "per_case": per_case_table(inputs.metrics)},
        "visual": visual_context(raw_dir, inputs, models, best),
        "lineage": lineage_context(inputs.registry),
    }


def all_figures(context: dict) -> list[Figure]:
    return (context["data"]["figures"] + [t["figure"] for t in context["training"]]
            + [context["comparison"]["cost_figure"]] + context["visual"]["figures"])
