"""validate: describe every ingested slice in a manifest and check it with great-expectations.

Rows that break an expectation are quarantined (kept in the manifest with `accepted=False`
and the rule they broke), never dropped. The stage fails when more than
`validate.max_quarantine_fraction` of the slices are quarantined. Counts reconcile:
ingested = accepted + quarantined.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from liverseg.config import Params
from liverseg.data import layout
from liverseg.io import atomic_path, load_gray, sha256_file, write_json


class ValidationFailed(RuntimeError):
    """Too many slices broke the suite; the message names them."""


def describe_slice(raw_dir: Path, row: pd.Series) -> dict:
    """Facts about one image/mask pair, read from the files themselves."""
    image_path, mask_path = raw_dir / row["image"], raw_dir / row["mask"]
    facts = {"image_exists": image_path.is_file(), "mask_exists": mask_path.is_file()}
    if facts["image_exists"]:
        image = load_gray(image_path)
        facts |= {"image_sha256": sha256_file(image_path), "height": image.shape[0],
                  "width": image.shape[1], "image_dtype": str(image.dtype)}
    if facts["mask_exists"]:
        mask = load_gray(mask_path)
        values = np.unique(mask)
        facts |= {"mask_sha256": sha256_file(mask_path), "mask_height": mask.shape[0],
                  "mask_width": mask.shape[1],
                  "mask_values": ",".join(str(v) for v in values),
                  "fg_fraction": float((mask > 127).mean())}
    return facts


def build_manifest(raw_dir: str | Path) -> pd.DataFrame:
    raw_dir = Path(raw_dir)
    index = layout.read_index(raw_dir)
    facts = pd.DataFrame([describe_slice(raw_dir, row) for _, row in index.iterrows()])
    manifest = pd.concat([index, facts], axis=1)
    # Make the columns the suite reads exist even when every file of one kind is missing.
    for col in ["image_sha256", "mask_sha256", "height", "width", "mask_height", "mask_width",
                "mask_values", "fg_fraction", "image_dtype"]:
        if col not in manifest:
            manifest[col] = None
    return manifest


def expectations():
    """The suite: one expectation per rule, with the rule's name as its description."""
    import great_expectations as gx

    e = gx.expectations
    return {
        "image file exists": e.ExpectColumnValuesToBeInSet(column="image_exists", value_set=[True]),
        "mask file exists": e.ExpectColumnValuesToBeInSet(column="mask_exists", value_set=[True]),
        "image and mask sizes match (height)": e.ExpectColumnPairValuesToBeEqual(
            column_A="height", column_B="mask_height", ignore_row_if="either_value_is_missing"),
        "image and mask sizes match (width)": e.ExpectColumnPairValuesToBeEqual(
            column_A="width", column_B="mask_width", ignore_row_if="either_value_is_missing"),
        "mask is binary (0/255)": e.ExpectColumnValuesToBeInSet(
            column="mask_values", value_set=["0", "255", "0,255"]),
        "no duplicate image content": e.ExpectColumnValuesToBeUnique(column="image_sha256"),
        "slice id is unique": e.ExpectColumnValuesToBeUnique(column="slice_id"),
        "image is at least 32 px": e.ExpectColumnValuesToBeBetween(column="height", min_value=32),
    }


def run_suite(manifest: pd.DataFrame) -> tuple[bool, list[dict]]:
    """Validate with GX; return overall success and, per rule, the failing slice ids."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas("liverseg")
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": manifest})
    )
    rules = expectations()
    suite = context.suites.add(gx.ExpectationSuite(name="manifest"))
    for name, expectation in rules.items():
        expectation.description = name
        suite.add_expectation(expectation)
    result = batch.validate(suite, result_format={
        "result_format": "COMPLETE", "unexpected_index_column_names": ["slice_id"]})
    report = []
    for res in result.results:
        failing = sorted({row["slice_id"] for row in res.result.get("unexpected_index_list") or []})
        report.append({"rule": res.expectation_config.description,
                       "expectation": res.expectation_config.type,
                       "success": bool(res.success), "failing_slices": failing})
    return bool(result.success), report


def run(
    params: Params,
    raw_dir: str | Path = "data/raw",
    manifest_path: str | Path = "data/manifest.parquet",
    report_path: str | Path = "reports/validation.json",
) -> dict:
    manifest = build_manifest(raw_dir)
    success, rules = run_suite(manifest)
    reasons: dict[str, list[str]] = {}
    for rule in rules:
        for sid in rule["failing_slices"]:
            reasons.setdefault(sid, []).append(rule["rule"])
    manifest["quarantine_reason"] = [
        "; ".join(reasons.get(sid, [])) for sid in manifest["slice_id"]]
    manifest["accepted"] = manifest["quarantine_reason"] == ""

    n, quarantined = len(manifest), int((~manifest["accepted"]).sum())
    summary = {
        "success": success, "ingested": n, "accepted": n - quarantined,
        "quarantined": quarantined,
        "quarantine": {sid: r for sid, r in sorted(reasons.items())},
        "rules": rules,
    }
    write_json(report_path, summary)
    limit = params.validate_.max_quarantine_fraction
    if n == 0 or quarantined > limit * n:
        named = "\n  ".join(f"{sid}: {'; '.join(r)}" for sid, r in sorted(reasons.items())[:20])
        raise ValidationFailed(
            f"{raw_dir}: {quarantined} of {n} slices broke the suite (limit "
            f"validate.max_quarantine_fraction={limit}); see {report_path}\n  {named}")
    with atomic_path(manifest_path) as tmp:
        manifest.to_parquet(tmp, index=False)
    return {k: summary[k] for k in ("success", "ingested", "accepted", "quarantined")}
