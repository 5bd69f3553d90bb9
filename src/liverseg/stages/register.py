"""register: the best model becomes a version of the MLflow registered model.

It gets the alias (`champion`) only if it passes the quality gate
(`register.min_fg_iou`); otherwise it is registered without the alias and the reason is a
tag. Every version carries its lineage as tags: git commit and dirty flag, the dvc.lock
hashes of the raw data, manifest and split, the params hash, the validation result, the
model config and its metrics, and the Dagster run id when Dagster ran the stage.
"""

from __future__ import annotations

import os
from pathlib import Path

from liverseg import lineage, tracking
from liverseg.config import Params
from liverseg.io import read_json, write_json


def version_tags(params: Params, best: str, score: float, validation: dict) -> dict[str, str]:
    tags = lineage.git_state() | lineage.locked_out_hashes() | {
        "params_hash": lineage.params_hash(params.dump()),
        "model": best,
        f"metric_{params.compare.rank_by}": f"{score:.6f}",
        "validation_success": str(validation["success"]).lower(),
        "validation_counts": (f"ingested={validation['ingested']} accepted="
                              f"{validation['accepted']} quarantined={validation['quarantined']}"),
    }
    if os.environ.get("LIVERSEG_DAGSTER_RUN_ID"):
        tags["dagster_run_id"] = os.environ["LIVERSEG_DAGSTER_RUN_ID"]
    return tags


def run(params: Params, comparison_path: str | Path = "reports/comparison.json",
        validation_path: str | Path = "reports/validation.json",
        models_dir: str | Path = "models", out_path: str | Path = "reports/registry.json") -> dict:
    comparison, cfg = read_json(comparison_path), params.register_
    best, score = comparison["best_model"], comparison["best_score"]
    run = read_json(Path(models_dir) / best / "run.json")
    tags = version_tags(params, best, score, read_json(validation_path))

    mlf = tracking.mlflow()
    client = mlf.MlflowClient()
    version = mlf.register_model(run["model_uri"], cfg.model_name, tags=tags).version
    passed = score >= cfg.min_fg_iou
    gate = (f"passed: fg_iou {score:.4f} >= {cfg.min_fg_iou}" if passed
            else f"failed: fg_iou {score:.4f} < {cfg.min_fg_iou}")
    client.set_model_version_tag(cfg.model_name, version, "quality_gate", gate)
    if passed:
        client.set_registered_model_alias(cfg.model_name, cfg.alias, version)
    record = {"registered_model": cfg.model_name, "version": int(version),
              "alias": cfg.alias if passed else None, "quality_gate": gate, "model": best,
              "run_id": run["run_id"], "model_uri": run["model_uri"], "tags": tags}
    write_json(out_path, record)
    return {k: record[k] for k in ("registered_model", "version", "alias", "quality_gate")}
