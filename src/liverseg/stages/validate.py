"""validate: describe every ingested item in a manifest and check it with great-expectations.

One manifest row per item the source offered (slices, and items ingest could not turn into
a slice). Rows that break an expectation are quarantined: kept in the manifest with
`accepted=False` and the rules they broke, listed in `data/quarantine.csv` (path, rule,
detail; the path is the user's source file), never dropped. Policy `fail` stops at the
first bad row instead, listing every failing file and rule; `quarantine` still fails when
more than `validate.max_quarantine_fraction` of the items are bad. Counts reconcile:
ingested = accepted + quarantined + superseded (a DICOM label that a later label of its
series replaced: listed in the report, not checked).

A slice whose name carries no patient id (`data.folder.patient_regex` did not match) is
kept and split as a group of its own (its slice id); the result says so prominently, since
neighbouring slices of one patient may then land in both train and val.

The run also leaves GX's own Data Docs in `reports/validation/` (index.html, the result
page under validations/, the suite under expectations/, GX's static files), written to a
temporary directory and swapped in whole, even when the stage then fails.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from liverseg import casestore, labels
from liverseg.artifacts import Artifacts
from liverseg.casescan import CaseReader, case_order
from liverseg.config import Params, ValidateParams
from liverseg.data import layout
from liverseg.io import atomic_dir, atomic_path, write_json
from liverseg.stages import data_docs

QUARANTINE_COLUMNS = ["path", "rule", "detail", "slice_id"]


class ValidationFailed(RuntimeError, ValueError):  # ValueError: the CLI prints it cleanly
    """The suite failed under the configured policy; the message names files and rules."""


def _read(raw_dir: Path, ref: str, what: str, reader: CaseReader | None = None
          ) -> np.ndarray | None:
    """A stored slice, or None when its case file does not hold it."""
    try:
        return reader.read(ref, what) if reader else casestore.read(raw_dir, ref, what)
    except (OSError, KeyError, IndexError, ValueError):
        return None


def describe_slice(raw_dir: Path, row: pd.Series | dict, reader: CaseReader | None = None
                   ) -> dict:
    """Facts about one stored image/mask pair (the row's `image`, `mask`, `ingest_detail`),
    read from the case file itself (through `reader` when given: one file open at a time)."""
    image = _read(raw_dir, row["image"], "image", reader) if row["image"] else None
    mask = _read(raw_dir, row["mask"], "mask", reader) if row["mask"] else None
    # None (not checked) where ingest stored nothing: the rule it broke there says why.
    unexplained = False if not row["ingest_detail"] else None
    facts = {"image_exists": image is not None if row["image"] else unexplained,
             "mask_exists": mask is not None if row["mask"] else unexplained}
    if image is not None:
        facts |= {"image_sha256": casestore.slice_digest(image), "height": image.shape[0],
                  "width": image.shape[1], "image_mean": float(image.mean()),
                  "image_std": float(image.std())}
    if mask is not None:
        facts |= {"mask_sha256": casestore.slice_digest(mask), "mask_height": mask.shape[0],
                  "mask_width": mask.shape[1],
                  "mask_values": ",".join(str(v) for v in np.unique(mask)),
                  "fg_fraction": float((mask > 127).mean())}
    return facts


# What describe_slice may say of a slice: every manifest has these columns (None: unknown).
FACTS = ("image_exists", "mask_exists", "image_sha256", "height", "width", "image_mean",
         "image_std", "mask_sha256", "mask_height", "mask_width", "mask_values", "fg_fraction")


def build_manifest(raw_dir: str | Path) -> pd.DataFrame:
    raw_dir = Path(raw_dir)
    index = layout.read_index(raw_dir)
    # One case file open at a time, each read once (rows taken in case-file order), keeping
    # only each slice's scalars: memory flat in the number of cases (docs/SCALING.md).
    # Column by column, not a dict per row: a dict's overhead is more than its facts.
    images, masks, details = (index[c].tolist() for c in ("image", "mask", "ingest_detail"))
    columns = {col: [None] * len(index) for col in FACTS}
    with CaseReader(raw_dir) as reader:
        for at in case_order([i or m for i, m in zip(images, masks, strict=True)]):
            row = {"image": images[at], "mask": masks[at], "ingest_detail": details[at]}
            for col, value in describe_slice(raw_dir, row, reader).items():
                columns[col][at] = value
    manifest = pd.concat([index, pd.DataFrame(columns, index=index.index)], axis=1)
    del columns
    manifest.insert(0, "id", manifest["slice_id"])  # the contract's name for the slice id
    group_by_own_id(manifest)
    # Where the slice is stored (its case file and slot), for entries with no source file.
    manifest["image_path"] = [str(raw_dir / p) if p else "" for p in manifest["image"]]
    manifest["mask_path"] = [str(raw_dir / p) if p else "" for p in manifest["mask"]]
    return manifest


def group_by_own_id(manifest: pd.DataFrame) -> None:
    """Rows whose names gave no patient id are split as a group of their own (their slice
    id) instead of being quarantined; `patient_id_from_name` keeps what the name said."""
    named = manifest["patient_id"].fillna("").astype(str) != ""
    manifest["patient_id_from_name"] = named
    manifest["patient_id"] = manifest["patient_id"].where(named, manifest["slice_id"])


NO_PATIENT_ID = (
    "{missing} of {accepted} accepted slices have no patient id in their names "
    "(data.folder.patient_regex {regex!r} did not match, e.g. {examples}): each is split as a "
    "group of its own, so neighbouring slices of one patient may land in both train and val, "
    "a leakage the split cannot see. Set data.folder.patient_regex to a pattern whose "
    "(?P<patient>...) group matches the file names.")


def patient_ids(manifest: pd.DataFrame, regex: str) -> dict:
    """How the accepted slices are grouped for the split, with the warning when some have
    no patient id from their names."""
    accepted = manifest[manifest["accepted"]]
    missing = accepted.loc[~accepted["patient_id_from_name"], "slice_id"].tolist()
    warning = NO_PATIENT_ID.format(missing=len(missing), accepted=len(accepted), regex=regex,
                                   examples=", ".join(missing[:3])) if missing else None
    return {"from_names": len(accepted) - len(missing), "missing": len(missing),
            "missing_grouped_as": "own slice id", "setting": "data.folder.patient_regex",
            "examples": missing[:10], "warning": warning}


def mask_values_rule(num_classes: int) -> tuple[str, list[str]]:
    """The stored-values rule's name and its allowed sets (each slice's sorted values)."""
    values = [str(v) for v in labels.stored_values(num_classes)]
    name = ("mask is binary (0/255)" if num_classes == 2
            else f"mask values are the {num_classes} classes ({'/'.join(values)})")
    subsets = [",".join(c) for r in range(1, len(values) + 1)
               for c in itertools.combinations(values, r)]
    return name, subsets


def expectations(cfg: ValidateParams, num_classes: int = 2) -> dict:
    """The suite: one expectation per rule, with the rule's name as its description."""
    import great_expectations as gx

    e = gx.expectations
    is_true = {"value_set": [True]}
    lo_fg, hi_fg = cfg.fg_fraction
    lo_mean, hi_mean = cfg.image_mean
    values_rule, value_sets = mask_values_rule(num_classes)
    return {
        "pairing complete": e.ExpectColumnValuesToBeInSet(column="paired", **is_true),
        "image decodable": e.ExpectColumnValuesToBeInSet(column="image_decodable", **is_true),
        "mask decodable": e.ExpectColumnValuesToBeInSet(column="mask_decodable", **is_true),
        "mask values allowed": e.ExpectColumnValuesToBeInSet(
            column="mask_values_allowed", **is_true),
        "image file exists": e.ExpectColumnValuesToBeInSet(column="image_exists", **is_true),
        "mask file exists": e.ExpectColumnValuesToBeInSet(column="mask_exists", **is_true),
        "image and mask sizes match (height)": e.ExpectColumnPairValuesToBeEqual(
            column_A="height", column_B="mask_height", ignore_row_if="either_value_is_missing"),
        "image and mask sizes match (width)": e.ExpectColumnPairValuesToBeEqual(
            column_A="width", column_B="mask_width", ignore_row_if="either_value_is_missing"),
        values_rule: e.ExpectColumnValuesToBeInSet(column="mask_values", value_set=value_sets),
        "foreground fraction in bounds": e.ExpectColumnValuesToBeBetween(
            column="fg_fraction", min_value=lo_fg, max_value=hi_fg),
        "no duplicate image content": e.ExpectColumnValuesToBeUnique(column="image_sha256"),
        "slice id is unique": e.ExpectColumnValuesToBeUnique(column="slice_id"),
        "image is at least 32 px": e.ExpectColumnValuesToBeBetween(column="height", min_value=32),
        "image intensity in range (mean)": e.ExpectColumnValuesToBeBetween(
            column="image_mean", min_value=lo_mean, max_value=hi_mean),
        "image is not blank (std)": e.ExpectColumnValuesToBeBetween(
            column="image_std", min_value=cfg.min_image_std),
        # The split's group: the patient id from the name, else the slice's own id.
        "split group present": e.ExpectColumnValuesToNotBeNull(column="patient_id"),
        # DICOM labels (the dicom source; always true for file sources).
        "label readable on its series": e.ExpectColumnValuesToBeInSet(
            column="label_readable", **is_true),
        "label classes mapped": e.ExpectColumnValuesToBeInSet(column="label_mapped", **is_true),
        "label origin allowed for training": e.ExpectColumnValuesToBeInSet(
            column="origin_allowed", **is_true),
    }


RESULT_FORMAT = {"result_format": "COMPLETE", "unexpected_index_column_names": ["slice_id"]}
def _add_suite(context, cfg: ValidateParams, num_classes: int):
    import great_expectations as gx

    suite = context.suites.add(gx.ExpectationSuite(name="manifest"))
    for name, expectation in expectations(cfg, num_classes).items():
        expectation.description = name
        suite.add_expectation(expectation)
    return suite


def _validate(manifest: pd.DataFrame, cfg: ValidateParams | None, num_classes: int,
              site_dir: Path | None = None, plugins_dir: Path | None = None):
    """Run the suite through a GX Checkpoint; with `site_dir`, it also writes Data Docs there."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_definition = (context.data_sources.add_pandas("liverseg")
                        .add_dataframe_asset("manifest")
                        .add_batch_definition_whole_dataframe("all"))
    definition = context.validation_definitions.add(gx.ValidationDefinition(
        name="manifest", data=batch_definition,
        suite=_add_suite(context, cfg or ValidateParams(), num_classes)))
    actions = [data_docs.add_site(context, site_dir, plugins_dir)] if site_dir else []
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name="validate", validation_definitions=[definition], actions=actions,
        result_format=RESULT_FORMAT))
    result = checkpoint.run(batch_parameters={"dataframe": manifest},
                            run_id=gx.RunIdentifier(run_name="liverseg-validate"))
    (suite_result,) = result.run_results.values()
    return suite_result


def _rules(result) -> tuple[bool, list[dict]]:
    report = []
    for res in result.results:
        failing = sorted({row["slice_id"] for row in res.result.get("unexpected_index_list") or []})
        report.append({"rule": res.expectation_config.description,
                       "expectation": res.expectation_config.type,
                       "success": bool(res.success), "failing_slices": failing})
    return bool(result.success), report


def run_suite(manifest: pd.DataFrame, cfg: ValidateParams | None = None, num_classes: int = 2
              ) -> tuple[bool, list[dict]]:
    """Validate with GX; return overall success and, per rule, the failing slice ids."""
    return _rules(_validate(manifest, cfg, num_classes))


def run_suite_with_data_docs(manifest: pd.DataFrame, cfg: ValidateParams | None,
                             docs_dir: str | Path, num_classes: int = 2
                             ) -> tuple[bool, list[dict]]:
    """run_suite, also writing GX Data Docs of the run to `docs_dir`, replaced as a whole."""
    with atomic_dir(docs_dir) as site, tempfile.TemporaryDirectory() as plugins:
        result = _validate(manifest, cfg, num_classes, site, Path(plugins))
        data_docs.link_runs_from_index(site)
        data_docs.drop_unreferenced_static(site)
    return _rules(result)


# Which file a rule is about, so quarantine.csv names the file to fix.
def _about_mask(rule: str) -> bool:
    return rule.startswith(("mask ", "label ")) or rule == "foreground fraction in bounds"


def _detail(rule: str, row: pd.Series, manifest: pd.DataFrame) -> str:
    """A short, specific reason for one row breaking one rule."""
    ingest_detail = {part.split(": ", 1)[0]: part.split(": ", 1)[-1]
                     for part in str(row.get("ingest_detail") or "").split(" | ") if part}
    if rule in ingest_detail:
        return ingest_detail[rule]
    if rule == "pairing complete" and ingest_detail:
        return str(row["ingest_detail"])
    if rule.startswith("image and mask sizes"):
        return f"image {row['width']}x{row['height']}, mask {row['mask_width']}x" \
               f"{row['mask_height']}"
    if rule == "no duplicate image content":
        same = manifest.loc[(manifest["image_sha256"] == row["image_sha256"])
                            & (manifest["slice_id"] != row["slice_id"]), "slice_id"]
        return f"same pixels as {', '.join(same)}"
    if rule == "foreground fraction in bounds":
        return f"fg_fraction {row['fg_fraction']:.3f}"
    if rule.startswith(("mask is binary", "mask values are the")):
        return f"stored mask values {row['mask_values']}"
    if rule.startswith("image intensity") or rule.startswith("image is not blank"):
        return f"mean {row['image_mean']:.1f}, std {row['image_std']:.2f}"
    if rule in ("image file exists", "mask file exists"):
        ref = row["mask_path" if rule.startswith("mask") else "image_path"]
        return f"{ref}: not in data/raw (case file missing, or no such slot in it)"
    if rule == "split group present":
        return f"no patient id and no slice id to split {row['source_image']!r} by"
    return rule


def quarantine_entries(manifest: pd.DataFrame, reasons: dict[str, list[str]]) -> pd.DataFrame:
    rows = []
    by_id = manifest.set_index("slice_id", drop=False)
    for sid, rules in sorted(reasons.items()):
        row = by_id.loc[sid]
        row = row.iloc[0] if isinstance(row, pd.DataFrame) else row
        for rule in rules:
            key = "source_mask" if _about_mask(rule) else "source_image"
            raw_key = "mask_path" if _about_mask(rule) else "image_path"
            path = (row[key] or row["source_image"] or row["source_mask"] or row[raw_key]
                    or row["image_path"] or row["mask_path"])
            rows.append({"path": path, "rule": rule, "detail": _detail(rule, row, manifest),
                         "slice_id": sid})
    return pd.DataFrame(rows, columns=QUARANTINE_COLUMNS)


def origin_allowed(manifest: pd.DataFrame, train_on: tuple[str, ...]) -> pd.Series:
    """A row's label may train: a file source's own label (no origin), or an origin in
    data.dicom.train_on."""
    return manifest["origin"].fillna("").isin(("", *train_on))


def run(params: Params, root: str | Path = ".") -> dict:
    art = Artifacts(root)
    raw_dir, report_path = art.raw, art.validation
    cfg = params.validate_
    manifest = build_manifest(raw_dir)
    manifest["origin_allowed"] = origin_allowed(manifest, params.data.dicom.train_on)
    # A label a later one of its series replaced is no item to check: counted apart.
    superseded = manifest["label_status"] == "superseded"
    classes = labels.read_classes(raw_dir)
    checked = manifest[~superseded] if superseded.any() else manifest  # no copy when none
    success, rules = run_suite_with_data_docs(checked, cfg, art.validation_docs, len(classes))
    del checked
    reasons: dict[str, list[str]] = {}
    for rule in rules:
        for sid in rule["failing_slices"]:
            reasons.setdefault(sid, []).append(rule["rule"])
    manifest["quarantine_reason"] = [
        "; ".join(reasons.get(sid, [])) for sid in manifest["slice_id"]]
    manifest["accepted"] = (manifest["quarantine_reason"] == "") & ~superseded
    quarantine = quarantine_entries(manifest, reasons)

    n, n_superseded = len(manifest), int(superseded.sum())
    quarantined = int((~manifest["accepted"]).sum()) - n_superseded
    groups = patient_ids(manifest, params.data.folder.patient_regex)
    warnings = [groups["warning"]] if groups["warning"] else []
    summary = {
        "success": success, "warnings": warnings, "policy": cfg.policy, "classes": list(classes),
        "ingested": n, "accepted": n - quarantined - n_superseded,
        "quarantined": quarantined, "superseded": n_superseded,
        "reconciles": n == int(manifest["accepted"].sum()) + quarantined + n_superseded,
        "superseded_labels": manifest.loc[superseded, ["label_uid", "ingest_detail"]].to_dict(
            "records"),
        "quarantine": {sid: r for sid, r in sorted(reasons.items())},
        "quarantine_files": quarantine.to_dict("records"),
        "patient_ids": groups,
        "rules": rules,
    }
    write_json(report_path, summary)
    listing = "\n  ".join(f"{q.path} (slice {q.slice_id}): {q.rule}: {q.detail}"
                          for q in quarantine.itertuples())
    if cfg.policy == "fail" and quarantined:
        raise ValidationFailed(f"{raw_dir}: {quarantined} of {n} items broke the suite "
                               f"(validate.policy=fail); see {report_path}\n  {listing}")
    limit = cfg.max_quarantine_fraction
    if n == n_superseded or quarantined > limit * (n - n_superseded):
        raise ValidationFailed(
            f"{raw_dir}: {quarantined} of {n} items broke the suite (limit "
            f"validate.max_quarantine_fraction={limit}); see {report_path}\n  {listing}")
    with atomic_path(art.quarantine) as tmp:
        quarantine.to_csv(tmp, index=False)
    with atomic_path(art.manifest) as tmp:
        manifest.to_parquet(tmp, index=False)
    return {k: summary[k] for k in ("success", "ingested", "accepted", "quarantined")} | (
        {"superseded": n_superseded} if n_superseded else {}) | (
        {"warnings": warnings} if warnings else {})
