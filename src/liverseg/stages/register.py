"""register: the best model becomes a version of the MLflow registered model.

Quality gate (params `register`): the candidate's global fg_iou >= `min_fg_iou`, dice >=
`min_dice` and, when a champion exists, fg_iou >= champion's fg_iou + `min_improvement` on
the same validation split: a champion validated on another split (the data grew) is served
anew on this one (`rescore_champion`); on the frozen test split, when there is one, the
candidate loses at most `max_test_regression` against it; on the validation cases new to the
champion (`liverseg.stages.new_cases`) it scores at least the champion + `min_new_case_gain`.
Passing moves the `champion`
alias to it; failing moves the `challenger` alias to it and tags `gate_reason`. The version
records both scores and what started the run (`retrain_trigger`).

Every version carries its lineage as tags (see `liverseg.provenance.lineage`). The registry keeps no
alias history (mlflow#2169), so every alias move (who, when, from and to which version,
why) is appended to the registered-model tag `alias_history` (JSON, newest last, oldest
entries dropped to fit MLflow's tag limit), tagged on the version it moved to
(`alias_event`, never dropped) and written to reports/registry.json.

Crash-safe: a rerun reuses the version already registered from the same training run (one
version per run; judged again, against the champion it replaced if it is the champion), and
the history is written before the alias moves, so a rerun after a crash completes a recorded
move instead of recording it twice.

A version serves evaluate's choice of mirroring and post-processing (`liverseg.postprocess`):
when there is one, the trained pyfunc is logged again with it as `served` in the training run,
and that package is registered (tag `inference`); one version per run and decision.

The weights' tensor digest is recorded (`weights_sha256`) so `liverseg audit` can tell a
registry artifact altered after registration from a rebuild that differs. Every version gets
a model card written from the recorded facts (`liverseg.provenance.model_card`):
reports/model_card.md and .json (register's outputs: models/<m>/ is train's), logged to the run
under `model_card/<name>/v<version>/`, named by the version's `model_card` tag.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path

from liverseg import tracking
from liverseg.artifacts import RUN, WEIGHTS, Artifacts
from liverseg.checkpoint import read_config
from liverseg.config import Params, RegisterParams
from liverseg.io import read_json
from liverseg.postprocess import Inference
from liverseg.provenance import lineage, model_card
from liverseg.stages import new_cases

METRIC_TAGS = ("fg_iou", "dice", "miou")


def version_tags(params: Params, best: str, metrics: dict, validation: dict,
                 config: dict, weights: Path | None = None) -> dict[str, str]:
    model_config = {k: v for k, v in config.items() if k != "params"}
    tags = lineage.git_state() | lineage.locked_out_hashes() | {
        "model_md5": lineage.locked_model_hash(best),
        **({"weights_sha256": lineage.tensor_digest(weights)} if weights else {}),
        "params_hash": lineage.params_hash(params.dump()),
        "params": lineage.truncate(json.dumps(params.dump(), sort_keys=True)),
        "model": best,
        "model_config": lineage.truncate(json.dumps(model_config, sort_keys=True)),
        "metrics": lineage.truncate(json.dumps(metrics, sort_keys=True)),
        "validation_success": str(validation["success"]).lower(),
        "validation_counts": (f"ingested={validation['ingested']} accepted="
                              f"{validation['accepted']} quarantined={validation['quarantined']}"
                              + (f" superseded={validation['superseded']}"
                                 if validation.get("superseded") else "")),
    }
    # Full precision (repr): the gate compares later candidates against these numbers.
    tags |= {f"metric_{k}": repr(metrics[k]) for k in METRIC_TAGS if metrics.get(k) is not None}
    if os.environ.get("LIVERSEG_DAGSTER_RUN_ID"):
        tags["dagster_run_id"] = os.environ["LIVERSEG_DAGSTER_RUN_ID"]
    return tags


TRIGGER_ENV = "LIVERSEG_RETRAIN_TRIGGER"  # set by the Dagster asset from the run's tags
TRAINING_LABELS = "lineage/training_labels.json"  # an artifact of the model's run
MONITORING_REFERENCE = "monitoring/reference.json"  # evaluate's rows of validation cases


def training_labels(split_stats: dict) -> dict | None:
    """The studies and label instances (dicom source) each split used, and a summary small
    enough for a version tag: their counts, origins and a digest of the full list."""
    per_split = {name: {k: split_stats[name][k] for k in ("studies", "label_instances",
                                                           "label_origins")}
                 for name in ("train", "val", "test")
                 if "label_instances" in split_stats.get(name, {})}
    if not per_split:
        return None
    digest = hashlib.sha256(json.dumps(per_split, sort_keys=True).encode()).hexdigest()
    summary = {name: {"studies": len(s["studies"]), "label_instances": len(s["label_instances"]),
                      "origins": s["label_origins"]} for name, s in per_split.items()}
    return {"splits": per_split, "summary": summary | {"sha256": digest,
                                                        "artifact": TRAINING_LABELS}}


class _Discard:
    """A mask sink for scoring only."""

    def add(self, *_) -> None:
        pass


def score(model_ref: str, split_csv: Path, art: Artifacts, params: Params) -> float | None:
    """fg_iou of a model (a registry URI or models/<m>) on a split of this workspace, served
    as evaluate serves it (None: the split is empty)."""
    from dataclasses import replace

    from liverseg.data.dataset import SliceDataset
    from liverseg.preprocess import Preprocessing
    from liverseg.served import Served
    from liverseg.serving.predict import load
    from liverseg.stages.evaluate import grid_cases, predict_split

    model, config = load(model_ref)
    inference = Inference.from_dict(config.get("inference"))  # served as it serves
    prep = Preprocessing.from_config(config)
    prep = inference.preprocessing(replace(prep, threshold=params.evaluate.threshold))
    dataset = SliceDataset(split_csv, art.raw, prep.image_size, prep.mean, prep.std,
                           num_classes=len(prep.classes))
    if not dataset.rows:
        return None
    meter, *_ = predict_split(Served(model, prep).eval(), dataset, params.evaluate.batch_size,
                              prep.classes, _Discard(),
                              inference=inference,
                              grid=grid_cases(dataset.rows, art.raw))
    return meter.compute()["fg_iou"]


def rescore_champion(champion: dict | None, split_hash: str, art: Artifacts, params: Params
                     ) -> dict | None:
    """The champion judged on the candidate's data: validated on another split, it is scored
    anew on this one (the recorded figure kept beside it), so every retraining, however the
    data grew, is compared with the champion on the same cases."""
    if champion is None or champion["split"] == split_hash or champion["fg_iou"] is None:
        return champion
    ref = f"models:/{params.register_.model_name}/{champion['version']}"
    try:
        fg = score(ref, art.splits / "val.csv", art, params)
    except Exception as exc:  # its artifacts gone, a model that no longer loads: say so
        return champion | {"rescore_error": f"{type(exc).__name__}: {exc}"[:200]}
    return champion | {"fg_iou": fg, "split": split_hash, "rescored": True,
                       "recorded_fg_iou": champion["fg_iou"], "recorded_split": champion["split"]}


def test_scores(best: str, champion: dict | None, art: Artifacts, params: Params) -> dict | None:
    """Both models on the frozen test split (`split.test_fraction`; no retraining ever trains
    on it), when there is one and a champion."""
    test_csv = art.splits / "test.csv"
    if champion is None or not test_csv.is_file() or test_csv.stat().st_size == 0:
        return None
    ref = f"models:/{params.register_.model_name}/{champion['version']}"
    return {"candidate": score(str(art.model_dir(best)), test_csv, art, params),
            "champion": score(ref, test_csv, art, params)}


def champion_info(client, cfg: RegisterParams, number: int | None = None) -> dict | None:
    """The current champion's (or version `number`'s) version, recorded fg_iou and split
    hash (None if none)."""
    try:
        version = (client.get_model_version(cfg.model_name, str(number)) if number
                   else client.get_model_version_by_alias(cfg.model_name, cfg.alias))
    except Exception:  # MlflowException: no such model or alias
        return None
    fg = version.tags.get("metric_fg_iou")
    return {"version": int(version.version), "fg_iou": float(fg) if fg else None,
            "split": version.tags.get("data_splits_md5"), "run_id": version.run_id}


def quality_gate(cfg: RegisterParams, metrics: dict, split_hash: str,
                 champion: dict | None, test: dict | None = None, new: dict | None = None
                 ) -> tuple[bool, str]:
    """(passed, one line stating every check and its numbers). `test`: both models' fg_iou
    on the frozen test split ({"candidate": x, "champion": y}), when there is one; `new`:
    both on the validation cases new to the champion (`new_cases.compare`)."""
    fg, dice = metrics.get("fg_iou"), metrics.get("dice")
    checks, failures = [], []

    def judge(ok: bool, text: str) -> None:
        (checks if ok else failures).append(text)

    if fg is None:
        failures.append("fg_iou undefined")
    else:
        judge(fg >= cfg.min_fg_iou, f"fg_iou {fg:.4f} {'>=' if fg >= cfg.min_fg_iou else '<'} "
              f"min_fg_iou {cfg.min_fg_iou}")
    if dice is None:
        failures.append("dice undefined")
    else:
        judge(dice >= cfg.min_dice,
              f"dice {dice:.4f} {'>=' if dice >= cfg.min_dice else '<'} min_dice {cfg.min_dice}")
    if champion is not None and fg is not None:
        v = champion["version"]
        if champion["split"] != split_hash:
            why = champion.get("rescore_error")
            checks.append(f"champion v{v} validated on another split ({champion['split']} vs "
                          f"{split_hash}): improvement check not applicable"
                          + (f" (re-scoring it failed: {why})" if why else ""))
        elif champion["fg_iou"] is None:
            checks.append(f"champion v{v} has no recorded fg_iou: improvement check skipped")
        else:
            need = champion["fg_iou"] + cfg.min_improvement
            scored = " (re-scored on this split)" if champion.get("rescored") else ""
            judge(fg >= need, f"fg_iou {fg:.4f} {'>=' if fg >= need else '<'} champion v{v} "
                  f"{champion['fg_iou']:.4f}{scored} + min_improvement {cfg.min_improvement}")
    if test and test.get("champion") is not None and champion is not None:
        ours, theirs = test["candidate"], test["champion"]
        floor = theirs - cfg.max_test_regression
        if ours is None:
            failures.append("test fg_iou undefined")
        else:
            judge(ours >= floor, f"test fg_iou {ours:.4f} {'>=' if ours >= floor else '<'} "
                  f"champion v{champion['version']} {theirs:.4f} - max_test_regression "
                  f"{cfg.max_test_regression}")
    if new and champion is not None:
        ours, theirs = new.get("candidate"), new.get("champion")
        if "note" in new:
            checks.append(new["note"])
        elif ours is None or theirs is None:
            checks.append(f"fg_iou undefined on the {new['cases']} new validation case(s) (no "
                          "foreground in truth or prediction): new-case check not applicable")
        else:
            need = theirs + cfg.min_new_case_gain
            judge(ours >= need, f"fg_iou on {new['cases']} new validation case(s) {ours:.4f} "
                  f"{'>=' if ours >= need else '<'} champion v{champion['version']} "
                  f"{theirs:.4f} + min_new_case_gain {cfg.min_new_case_gain}")
    passed = not failures
    return passed, ("passed: " if passed else "failed: ") + "; ".join(failures + checks)


who = lineage.who  # kept here too: alias events have always been signed by register


def _history(client, name: str) -> list[dict]:
    raw = client.get_registered_model(name).tags.get("alias_history")
    return json.loads(raw) if raw else []


def move_alias(client, name: str, alias: str, version: str, why: str) -> tuple[dict, list[dict]]:
    """Point `alias` at `version` and record the move; returns (event, history).

    The history is written before the alias moves, so a crash between the two leaves a
    recorded move that a rerun completes (no second event); a move already made and
    recorded is not recorded again."""
    current = client.get_registered_model(name).aliases.get(alias)
    current = int(current) if current else None
    history = _history(client, name)
    last = next((e for e in reversed(history) if e["alias"] == alias), None)
    if last and last["to_version"] == int(version) and current in (last["from_version"],
                                                                   int(version)):
        event = last  # a rerun after a crash: the move is recorded (and maybe made)
    else:
        event = {"alias": alias, "from_version": current, "to_version": int(version),
                 "who": who(), "when": datetime.now(UTC).isoformat(timespec="seconds"),
                 "why": why}
        history.append(event)
        while len(json.dumps(history)) > lineage.TAG_LIMIT and len(history) > 1:
            history.pop(0)  # the full record stays on each version's `alias_event` tag
        client.set_registered_model_tag(name, "alias_history", json.dumps(history))
    if current != int(version):
        client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "alias_event", lineage.truncate(json.dumps(event)))
    return event, history


# What a version registered before evaluate chose an inference serves: the raw output.
RAW_OUTPUT = json.dumps(Inference().to_dict(), sort_keys=True)


def registered_version(client, name: str, run_id: str, inference: str):
    """The version already registered from this training run with this inference decision
    (a rerun of register after a crash), or None: one version per run and decision (a
    version never changes what it serves)."""
    found = [v for v in client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
             if v.tags.get("inference", RAW_OUTPUT) == inference]
    return min(found, key=lambda v: int(v.version)) if found else None


def served_package(mlf, run: dict, model_dir: Path, decision: Path) -> str:
    """The URI a new version is made from: the trained pyfunc as train logged it, or, when
    evaluate chose mirroring or post-processing, the same weights and config with that
    decision (`liverseg.postprocess`), logged as `served` in the training run."""
    if not decision.exists():
        return run["model_uri"]
    with mlf.start_run(run_id=run["run_id"]):
        return tracking.log_model(mlf, model_dir, inference=decision, name="served")


def audits(client, name: str, versions: list) -> list[dict]:
    """The last `liverseg audit` of each version (None: never audited), for the report."""
    out = []
    for number in dict.fromkeys(v for v in versions if v is not None):
        tags = client.get_model_version(name, str(number)).tags
        out.append({"version": int(number), "audit": lineage.audit_record(tags)})
    return out


def publish_card(client, record: dict, paths: tuple[Path, Path]) -> str:
    """Log the card to the version's run (one folder per version) and name it in a tag."""
    # Named by model and version: one run can be registered under several names.
    folder = f"model_card/{record['registered_model']}/v{record['version']}"
    for path in paths:
        client.log_artifact(record["run_id"], str(path), folder)
    uri = f"runs:/{record['run_id']}/{folder}/{paths[0].name}"
    client.set_model_version_tag(record["registered_model"], record["version"], "model_card", uri)
    return uri


def run(params: Params, root: str | Path = ".") -> dict:
    art = Artifacts(root)
    comparison, cfg = art.read_comparison(), params.register_
    best = comparison["best_model"]
    metrics = next(row for row in comparison["models"] if row["model"] == best)
    model_dir = art.model_dir(best)
    run = read_json(model_dir / RUN)
    if run.get("model_uri") is None:
        raise ValueError(f"{model_dir / RUN}: {best} was trained with "
                         f"{tracking.TRACKING_ENV}=off, so there is no MLflow run to register; "
                         "retrain it with tracking on")
    validation = read_json(art.validation)
    tags = version_tags(params, best, metrics, validation, read_config(model_dir),
                        model_dir / WEIGHTS)
    labelled = training_labels(read_json(art.split_stats))
    if labelled:
        tags["training_labels"] = lineage.truncate(json.dumps(labelled["summary"]))

    mlf = tracking.mlflow()
    client = mlf.MlflowClient()
    champion = champion_info(client, cfg)
    decision = art.inference(best)
    tags["inference"] = json.dumps(Inference.from_dict(
        read_json(decision) if decision.exists() else None).to_dict(), sort_keys=True)
    existing = registered_version(client, cfg.model_name, run["run_id"], tags["inference"])
    if existing is not None and champion and champion["version"] == int(existing.version):
        # A rerun after the alias moved to this very version: judge it against the
        # champion it replaced, never against itself.
        replaced = json.loads(existing.tags.get("alias_event", "{}")).get("from_version")
        champion = champion_info(client, cfg, replaced) if replaced else None
    champion = rescore_champion(champion, tags["data_splits_md5"], art, params)
    test = test_scores(best, champion, art, params)
    cases = new_cases.split_cases(art.splits)
    new = new_cases.compare(client, champion, cases, str(art.model_dir(best)),
                            art.splits / "val.csv", params.register_.model_name,
                            lambda model, csv: score(model, csv, art, params))
    if champion and champion.get("rescored"):
        tags["gate_champion_rescored"] = json.dumps(
            {k: champion[k] for k in ("version", "fg_iou", "recorded_fg_iou", "recorded_split")})
    if test:
        tags["gate_test_fg_iou"] = json.dumps(test)
    if new:
        tags["gate_new_cases"] = lineage.truncate(json.dumps(new))
    if os.environ.get(TRIGGER_ENV):  # which evidence started this run (Dagster's tags)
        tags["retrain_trigger"] = lineage.truncate(os.environ[TRIGGER_ENV])
    passed, gate = quality_gate(cfg, metrics, tags["data_splits_md5"], champion, test, new)
    version = existing.version if existing is not None else mlf.register_model(
        served_package(mlf, run, model_dir, decision), cfg.model_name, tags=tags).version
    client.set_model_version_tag(cfg.model_name, version, "quality_gate", gate)
    client.log_dict(run["run_id"], cases, new_cases.CASES)  # what later gates call new
    if labelled:  # the full list of archive objects, beside the run's model
        client.log_dict(run["run_id"], labelled, TRAINING_LABELS)
    reference = read_json(art.metrics(best)).get("monitoring_reference")
    if reference:  # what served cases are compared with (pipeline.monitoring's drift checks)
        client.log_dict(run["run_id"], reference, MONITORING_REFERENCE)
    if not passed:
        client.set_model_version_tag(cfg.model_name, version, "gate_reason", gate)
    elif existing is not None and "gate_reason" in existing.tags:  # it failed an earlier run
        client.delete_model_version_tag(cfg.model_name, version, "gate_reason")
    alias = cfg.alias if passed else cfg.challenger_alias
    event, history = move_alias(client, cfg.model_name, alias, version, gate)
    record = {"registered_model": cfg.model_name, "version": int(version), "alias": alias,
              "passed": passed, "quality_gate": gate, "gate_reason": None if passed else gate,
              "champion_before": champion,
              "champion_version": int(version) if passed else (champion or {}).get("version"),
              "model": best, "run_id": run["run_id"],
              "model_uri": client.get_model_version(cfg.model_name, version).source,
              "tags": tags, "alias_event": event,
              "alias_history": history}
    card = model_card.write(record, model_dir, art.metrics(best), comparison, validation,
                            art.splits, art.model_card(""))
    record["model_card"] = {"markdown": str(card[0]), "json": str(card[1]),
                            "artifact": publish_card(client, record, card)}
    record["audits"] = audits(client, cfg.model_name,
                              [record["version"], record["champion_version"]])
    art.write_registry(record)
    return {k: record[k] for k in ("registered_model", "version", "alias", "quality_gate")}
