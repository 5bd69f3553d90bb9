"""The model card of a registered version, written from the recorded facts only.

`facts` gathers what the pipeline recorded (the registration record, the model's config.json
and its preprocessing block, evaluate's metrics with their CIs, the comparison, validation and
split statistics); `limitations` states what those facts imply; `render` fills the Markdown
template (templates/model_card.md.j2). Nothing in a card is typed by hand: the template's prose
only chooses among sentences by the facts.
"""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined

from liverseg.artifacts import SPLIT_STATS
from liverseg.io import read_json, write_json, write_text

GLOBAL = ("fg_iou", "dice", "miou", "precision", "recall", "pixel_accuracy")
PER_IMAGE = ("per_image_fg_iou_mean", "per_image_dice_mean", "per_image_hd95_mean")
PER_VOLUME = ("per_volume_fg_iou_mean", "per_volume_dice_mean")
SMALL_VALIDATION = 10  # patients: below this the CIs are wide and per-volume means rest on few


def _optional_json(path: Path) -> dict:
    return read_json(path) if Path(path).is_file() else {}


def _split(stats: dict, part: str) -> dict:
    entry = stats.get(part) or {}
    return {"slices": entry.get("slices"), "patients": len(entry.get("patients") or [])}


def facts(record: dict, config: dict, metrics: dict, comparison: dict, validation: dict,
          stats: dict) -> dict:
    """The card as data (the JSON artifact); `record` is register's registry.json record."""
    params, tags = config.get("params", {}), record["tags"]
    data = params.get("data", {})
    return {
        "registered_model": record["registered_model"], "version": record["version"],
        "alias": record["alias"], "model": record["model"], "run_id": record["run_id"],
        "architecture": {k: config.get(k) for k in ("model", "encoder", "in_channels",
                                                     "num_classes", "classes", "options")}
        | {"encoder_weights": params.get("model", {}).get("encoder_weights"),
           "encoder_init": config.get("encoder_init"),
           "context_slices": data.get("context_slices", 0),
           "n_parameters": metrics.get("n_parameters"), "flops": metrics.get("flops")},
        "training_data": {
            "source": data.get("source"), "path": data.get("path"), "target": data.get("target"),
            "kaggle": data.get("kaggle") if data.get("source") == "kaggle" else None,
            **{k: validation.get(k) for k in ("ingested", "accepted", "quarantined")},
            "validation_success": validation.get("success"),
            "splits": {p: _split(stats, p) for p in ("train", "val", "test")},
            "grouped_by": stats.get("grouped_by"),
            "hashes": {k: v for k, v in tags.items() if k.startswith("data_")},
        },
        "training": {"epochs": params.get("train", {}).get("epochs"),
                     "best_epoch": config.get("best_epoch"),
                     "best_val_fg_iou": config.get("best_val_fg_iou"),
                     "device": config.get("device"), "seed": params.get("seed"),
                     **{k: params.get("train", {}).get(k)
                        for k in ("image_size", "batch_size", "lr", "loss", "augment")}},
        "preprocessing": config.get("preprocessing", {}),
        "metrics": {
            "global": {k: {"value": metrics.get(k), "ci": metrics.get(f"{k}_ci")}
                       for k in GLOBAL},
            "per_image": {k: metrics.get(k) for k in PER_IMAGE},
            "per_volume": {k: metrics.get(k) for k in PER_VOLUME},
            **{k: metrics.get(k) for k in ("n_images", "n_volumes", "n_empty_both", "ci_level",
                                           "bootstrap_resamples", "threshold", "aggregation")},
        },
        "comparison": {k: comparison.get(k) for k in ("rank_by", "best_model", "best_score",
                                                      "runner_up", "margin_over_next")}
        | {"models": [{k: row.get(k) for k in ("model", "fg_iou", "fg_iou_ci", "dice", "miou",
                                               "n_parameters")}
                      for row in comparison.get("models", [])]},
        "quality_gate": {"passed": record["passed"], "text": record["quality_gate"]},
        "lineage": {k: tags.get(k) for k in ("git_commit", "git_dirty", "params_hash",
                                             "model_md5", "weights_sha256")}
        | {"audit": f"liverseg audit models:/{record['registered_model']}/{record['version']}"},
    }


def limitations(card: dict) -> list[str]:
    """What the recorded facts imply a user must know, one sentence each."""
    data, train = card["training_data"], card["training"]
    prep, arch = card["preprocessing"], card["architecture"]
    val_patients = data["splits"]["val"]["patients"]
    out = []
    if data["source"] == "phantom":
        out.append("Trained and validated on synthetic phantom CT (data.source phantom): no "
                   "evidence of performance on real scans.")
    if arch["encoder_weights"] in (None, "none"):
        out.append(f"Trained from scratch (model.encoder_weights null) for {train['epochs']} "
                   f"epochs (best epoch {train['best_epoch']}).")
    k = arch.get("context_slices")
    if k:
        out.append(f"2.5D: reads each slice with its {k} neighbour(s) on each side "
                   "(data.context_slices), so it needs a volume (NIfTI or DICOM series) with "
                   "contiguous slices, not single 2D images.")
    size = train["image_size"]
    out.append(f"Every slice is resized to {size}x{size} px for the network and the "
               "probabilities back: detail finer than one pixel at that size is lost.")
    if val_patients and val_patients < SMALL_VALIDATION:
        out.append(f"Validated on {val_patients} patients ({data['splits']['val']['slices']} "
                   "slices): the confidence intervals are wide and per-volume means rest on "
                   "few volumes.")
    if data["grouped_by"] == "slab":
        out.append("Split by slabs of one volume (split.group_by slab): validation slices come "
                   "from the training patients, so the metrics are optimistic.")
    if prep.get("trained_on_volumes") is False:
        out.append(f"Trained on 2D images: the HU window for volumes is an assumption "
                   f"({prep.get('hu_window_from')}).")
    if data["target"] == "liver":
        out.append("Segments the liver only (data.target liver), not tumours.")
    if data["quarantined"]:
        out.append(f"{data['quarantined']} of {data['ingested']} ingested slices were "
                   "quarantined by validation and not used.")
    if not card["quality_gate"]["passed"]:
        out.append(f"Did not pass the quality gate ({card['quality_gate']['text']}).")
    if str(train["device"]).startswith("cuda"):
        out.append("Trained on a GPU: a rebuild matches within a tolerance, not bitwise.")
    if card["lineage"]["git_dirty"] != "false":
        out.append("Registered from a tree with uncommitted changes: it cannot be rebuilt.")
    return out


def _num(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _ci(pair) -> str:
    return f"[{_num(pair[0])}, {_num(pair[1])}]" if pair else "n/a"


def render(card: dict) -> str:
    env = Environment(loader=PackageLoader("liverseg", "templates"), undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters |= {"num": _num, "ci": _ci}
    return env.get_template("model_card.md.j2").render(card=card)


def write(record: dict, model_dir: Path, metrics_path: Path, comparison: dict,
          validation: dict, splits_dir: Path, prefix: Path) -> tuple[Path, Path]:
    """`<prefix>.md` and `<prefix>.json` for the registered version in `record`."""
    from liverseg.checkpoint import read_config  # torch: only when a card is written

    card = facts(record, read_config(model_dir), _optional_json(metrics_path),
                 comparison, validation, _optional_json(splits_dir / SPLIT_STATS))
    card["limitations"] = limitations(card)
    md = write_text(prefix.with_suffix(".md"), render(card))
    return md, write_json(prefix.with_suffix(".json"), card)
