"""The gate's comparison on new cases (issue 34): challenger and champion scored on the
validation cases the champion never saw, so a retraining that new labels started must do at
least as well as the champion where those labels are (`register.min_new_case_gain`).

Every registered version logs the case ids of each of its splits (`lineage/cases.json` in
its run); a candidate's validation cases in none of the champion's splits are the new ones.
A champion registered before versions logged their cases has no such list: the check is not
applicable, saying so.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pandas as pd

CASES = "lineage/cases.json"  # an artifact of each registered version's run
SPLITS = ("train", "val", "test")


def split_cases(splits_dir: Path) -> dict[str, list[str]]:
    """The case ids of each split of this workspace."""
    out = {}
    for name in SPLITS:
        path = Path(splits_dir) / f"{name}.csv"
        if path.is_file() and path.stat().st_size:
            cases = pd.read_csv(path, usecols=["case"], dtype=str)["case"].dropna()
            out[name] = sorted(cases.unique())
    return out


def logged_cases(client, run_id: str) -> dict[str, list[str]] | None:
    """A version's case lists, as register logged them (None: logged before they were)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return json.loads(Path(client.download_artifacts(run_id, CASES, tmp)).read_text())
        except Exception:  # MlflowException / OSError: no such artifact
            return None


def new_validation_cases(ours: dict[str, list[str]], theirs: dict[str, list[str]]
                         ) -> list[str]:
    seen = {case for cases in theirs.values() for case in cases}
    return [case for case in ours.get("val", []) if case not in seen]


def compare(client, champion: dict | None, cases: dict, candidate: str, split_csv: Path,
            model_name: str, score) -> dict | None:
    """Both models' fg_iou on the validation cases new to the champion (`score(ref, csv)`),
    or a note saying why there is no such comparison; None without a champion."""
    if champion is None:
        return None
    v = champion["version"]
    theirs = logged_cases(client, champion["run_id"]) if champion.get("run_id") else None
    if theirs is None:
        return {"note": f"champion v{v} logged no case lists (registered before versions "
                        "did): new-case check not applicable"}
    new = new_validation_cases(cases, theirs)
    if not new:
        return {"cases": 0, "note": f"no validation case is new to champion v{v}: new-case "
                                    "check not applicable"}
    return scores_on(new, split_csv, score, candidate, f"models:/{model_name}/{v}")


def scores_on(cases: list[str], split_csv: Path, score, candidate: str, champion: str
              ) -> dict:
    """Both models' fg_iou on the rows of `cases` in `split_csv` (`score(ref, csv)`)."""
    rows = pd.read_csv(split_csv, dtype={"case": str})
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp) / "new_cases.csv"
        rows[rows["case"].isin(cases)].to_csv(subset, index=False)
        return {"cases": len(cases), "candidate": score(candidate, subset),
                "champion": score(champion, subset)}
