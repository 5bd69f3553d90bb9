"""Tests for the report stage, on a small but real-format set of upstream outputs."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from liverseg import casestore
from liverseg.data.layout import CaseWriter
from liverseg.io import save_masks
from liverseg.report.inputs import SPLIT_COLUMNS
from liverseg.report.sections import COMPARISON_COLUMNS
from liverseg.stages import report
from tests.helpers import REPO

MODELS = ["enhanced_pan", "unet_cbam"]
SIZE = 64
FIGURES = ["fg_fraction.png", "samples.png", "visual.png", "overlay.png", "iou_distribution.png",
           "quality_cost.png", *(f"training_{m}.png" for m in MODELS)]


def make_params(models: list[str]):
    """Real Params; the model-name validator imports the model registry (torch), so fall back
    to an unvalidated instance if that registry cannot be imported here."""
    from liverseg.config import Params

    try:
        return Params(models=models)
    except Exception:  # registry under construction / torch missing
        return Params.model_construct(models=models)


def disc(cx: int, cy: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).astype(np.uint8) * 255


def write_slices(raw: Path, split: str, patients: list[str], rng) -> pd.DataFrame:
    """One case file per patient, as ingest writes them."""
    rows = []
    for p in patients:
        writer = CaseWriter(p, "phantom")
        for k in range(3):
            sid = f"{p}_{k:04d}"
            mask = disc(20 + 8 * k, 30, 6 + 2 * k) if k != 2 else np.zeros((SIZE, SIZE), np.uint8)
            image = rng.integers(0, 120, (SIZE, SIZE), dtype=np.uint8) + (mask // 3)
            row = writer.add(sid, p, k, image, mask > 127)
            rows.append([sid, p, k, row["image"], row["mask"], float((mask > 127).mean())])
        casestore.write_case(raw / casestore.case_file(p), writer.stacked(),
                             {"rows": writer.rows, "facts": {}})
    return pd.DataFrame(rows, columns=SPLIT_COLUMNS)


def per_image_rows(truths: dict[str, np.ndarray], preds: dict[str, np.ndarray]) -> pd.DataFrame:
    rows = []
    for sid, t in truths.items():
        p = preds[sid] > 0
        tp, fp, fn = int((t & p).sum()), int((~t & p).sum()), int((t & ~p).sum())
        den = tp + fp + fn
        rows.append({"slice_id": sid, "fg_iou": tp / den if den else float("nan"), "tp": tp,
                     "fp": fp, "fn": fn, "truth_pixels": int(t.sum())})
    return pd.DataFrame(rows)


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def metrics_row(model: str, i: int) -> dict:
    return {"model": model, "fg_iou": 0.71 - 0.1 * i, "bg_iou": 0.98, "miou": 0.845 - 0.05 * i,
            "dice": 0.83, "precision": None if i else 0.81, "recall": 0.79,
            "pixel_accuracy": 0.981, "per_image_fg_iou_mean": 0.66, "n_images": 6,
            "n_empty_both": 1, "n_parameters": 123456 * (i + 1), "images_per_second": 42.5,
            "flops": 1.5e9 * (i + 1), "fg_iou_ci": [0.66 - 0.1 * i, 0.75 - 0.1 * i],
            "best_epoch": 3, "threshold": 0.5, "aggregation": "global"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("report")
    raw, splits, reports = root / "data/raw", root / "data/splits", root / "reports"
    splits.mkdir(parents=True)
    rng = np.random.default_rng(0)
    frames = {"train": write_slices(raw, "train", ["p01", "p02"], rng),
              "val": write_slices(raw, "val", ["p03", "p04"], rng)}
    stats = {"mean": 0.2, "std": 0.1, "seed": 42, "leakage_checked": True}
    for name, frame in frames.items():
        frame.to_csv(splits / f"{name}.csv", index=False)
        stats[name] = {"slices": len(frame), "patients": sorted(frame["patient_id"].unique()),
                       "foreground_slices": int((frame["fg_fraction"] > 0).sum())}
    write_json(splits / "stats.json", stats)
    write_json(reports / "validation.json", {
        "success": False, "ingested": 13, "accepted": 12, "quarantined": 1,
        "quarantine": {"p05_0000": ["mask is binary (0/255)"]},
        "rules": [{"rule": "image file exists", "expectation": "expect_column_values_to_be_in_set",
                   "success": True, "failing_slices": []},
                  {"rule": "mask is binary (0/255)",
                   "expectation": "expect_column_values_to_be_in_set", "success": False,
                   "failing_slices": ["p05_0000"]}]})

    val = frames["val"]
    truths = {r.slice_id: casestore.read(raw, r.mask, "mask") > 127 for r in val.itertuples()}
    rows = []
    for i, model in enumerate(MODELS):
        epochs = np.arange(1, 6)
        pd.DataFrame({"epoch": epochs, "train_loss": 1 / epochs, "train_fg_iou": 0.1 * epochs,
                      "train_miou": 0.5 + 0.05 * epochs,
                      "train_pixel_accuracy": 0.9 + 0.01 * epochs,
                      "val_loss": 1.2 / epochs, "val_fg_iou": 0.09 * epochs,
                      "val_miou": 0.5 + 0.04 * epochs, "val_pixel_accuracy": 0.9 + 0.008 * epochs,
                      "lr": 1e-3}).to_csv(_mk(reports / "training" / f"{model}.csv"), index=False)
        # Shift each model's prediction differently so the per-image IoUs vary; stored as
        # evaluate stores them (at each slice's size: flat masks and their shapes).
        preds = {sid: np.roll(t, 2 * (i + 1) + k % 3, axis=1).astype(np.uint8)
                 for k, (sid, t) in enumerate(truths.items())}
        save_masks(reports / "predictions" / f"{model}.h5", preds)
        per_image_rows(truths, preds).to_csv(_mk(reports / "per_image" / f"{model}.csv"),
                                             index=False)
        metrics = metrics_row(model, i)
        write_json(reports / "metrics" / f"{model}.json", metrics)
        rows.append({k: metrics.get(k) for k, _, _ in COMPARISON_COLUMNS}
                    | {"gflops": metrics["flops"] / 1e9})
    rows[1]["precision"] = float("nan")  # compare writes NaN (not null) for undefined values
    (reports / "comparison.json").write_text(json.dumps({
        "rank_by": "fg_iou", "best_model": MODELS[0], "best_score": 0.71,
        "margin_over_next": 0.1, "models": rows}))
    write_json(reports / "registry.json", {
        "registered_model": "liverseg", "version": 3, "alias": None,
        "quality_gate": "failed: fg_iou 0.4100 < 0.5", "model": MODELS[0], "run_id": "abc123",
        "tags": {"git_commit": "deadbeef", "git_dirty": "true", "data_raw_md5": "r1.dir",
                 "data_manifest_md5": "m1", "data_splits_md5": "s1.dir",
                 "params_hash": "0123456789abcdef", "validation_success": "false",
                 "note": "<b>escaped</b>"},
        "alias_history": [
            {"alias": "champion", "from_version": None, "to_version": 1, "who": "ci@host",
             "when": "2026-11-01T03:00:00+00:00", "why": "passed: fg_iou 0.6000 >= 0.5"},
            {"alias": "champion", "from_version": 1, "to_version": 2, "who": "ci@host",
             "when": "2026-11-08T03:00:00+00:00", "why": "passed: fg_iou 0.7100 >= 0.5"},
            {"alias": "challenger", "from_version": None, "to_version": 3, "who": "ci@host",
             "when": "2026-11-15T03:00:00+00:00", "why": "failed: fg_iou 0.4100 < 0.5"}]})

    params = make_params(MODELS)
    summary = report.run(params, root)
    return {"root": root, "raw": raw, "splits": splits, "reports": reports, "params": params,
            "summary": summary, "html": (reports / "report.html").read_text()}


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_html_has_every_section_in_order(workspace):
    html = workspace["html"]
    positions = [html.find(f'<section id="{s}">') for s in
                 ("data", "training", "comparison", "visual", "lineage")]
    assert all(p >= 0 for p in positions) and positions == sorted(positions)


def test_html_is_self_contained(workspace):
    html = workspace["html"]
    assert html.count("data:image/png;base64,") == len(FIGURES)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "@import" not in html and "url(" not in html
    assert "&lt;b&gt;escaped&lt;/b&gt;" in html  # autoescape is on for report.html.j2


def test_paper_numbers_only_in_paper_table(workspace):
    html = workspace["html"]
    start = html.index('<table id="paper-table">')
    paper = html[start:html.index("</table>", start)]
    assert html.count("0.9323") == 1 and "0.9323" in paper
    ours = html[html.index('<table id="comparison-table">'):start]
    assert "PAN (Enhanced, proposed)" not in ours
    assert "Reported by the paper on its own data (not comparable)" in html


def test_content(workspace):
    html = workspace["html"]
    assert "n/a" in html  # null precision (metrics) and NaN precision (comparison)
    assert "no alias: gate failed" in html
    # The champion (v2) and every alias move, newest first, with who/when/why.
    assert "<td>Champion now</td><td>version 2</td>" in html
    history = html.split('id="alias-history"')[1].split("</table>")[0]
    assert history.index("2026-11-15") < history.index("2026-11-08") < history.index("2026-11-01")
    assert "failed: fg_iou 0.4100 &lt; 0.5" in history and history.count("ci@host") == 3
    assert "git checkout deadbeef &amp;&amp; dvc pull &amp;&amp; dvc repro" in html
    assert "p05_0000" in html  # quarantine table
    for role in ("best", "median", "worst"):
        assert f"<td>{role}</td>" in html


def test_figures_on_disk_match_embedded(workspace):
    reports, html = workspace["reports"], workspace["html"]
    for name in FIGURES:
        png = (reports / "figures" / name).read_bytes()
        assert png.startswith(b"\x89PNG")
        assert base64.b64encode(png).decode() in html
    assert workspace["summary"]["figures"] == len(FIGURES)
    assert len(html.encode()) < 3_000_000


def test_quality_cost_figure_plots_the_metrics_files_numbers(workspace):
    """Each point of both panels is a metrics file's fg IoU against its cost, its error bar
    the file's 95% interval; the better and cheaper model is the front."""
    from liverseg import quality_cost

    comparison = json.loads((workspace["reports"] / "comparison.json").read_text())
    points = quality_cost.points_of(comparison["models"])
    fig = quality_cost.figure(points)
    for ax, (cost, _, better) in zip(fig.axes, quality_cost.COSTS, strict=True):
        drawn = sorted(tuple(c.lines[0].get_xydata()[0]) for c in ax.containers)
        bars = sorted(tuple(c.lines[2][0].get_segments()[0][:, 1]) for c in ax.containers)
        files = [json.loads((workspace["reports"] / "metrics" / f"{m}.json").read_text())
                 for m in MODELS]
        cost_of = {"gflops": lambda f: f["flops"] / 1e9,
                   "images_per_second": lambda f: f["images_per_second"]}[cost]
        np.testing.assert_allclose(drawn, sorted((cost_of(f), f["fg_iou"]) for f in files))
        np.testing.assert_allclose(bars, sorted(tuple(f["fg_iou_ci"]) for f in files))
        assert quality_cost.on_front(points, cost, better) == {MODELS[0]}
    assert "Quality against cost" in workspace["html"]


def test_markdown(workspace):
    md = (workspace["reports"] / "report.md").read_text()
    for model in MODELS:
        assert model in md
        assert f"(figures/training_{model}.png)" in md
    assert "## 5. Lineage" in md and "0.9323" in md


def test_missing_training_csv_names_the_file(workspace, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(workspace["root"], root)
    missing = root / "reports" / "training" / f"{MODELS[1]}.csv"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        report.run(workspace["params"], root)


def test_report_module_does_not_import_heavy_stacks():
    """Nor does validating params.yaml (every stage command does): model names need no torch."""
    code = ("import sys, liverseg.stages.report; from liverseg.config import load_params; "
            f"load_params({str(REPO / 'params.yaml')!r}); "
            "print(sorted({'torch', 'dagster', 'mlflow', 'dvc'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_report_lists_each_case_3d_row_and_each_models_inference():
    from liverseg.report.sections import inference_table, per_case_table

    metrics = {"pan": {"classes": ["background", "liver", "tumour"], "per_case_3d": {"cases": [
        {"case": "c1", "liver_dice": 0.9, "liver_voe": 0.18, "liver_rvd": -0.05,
         "liver_assd": 1.234, "liver_mssd": 9.0, "liver_hd95": 4.5, "tumour_dice": None}]}},
        "unet": {"classes": ["background", "liver"], "per_case_3d": None}}
    table = per_case_table(metrics)
    assert table.rows == [["pan", "c1", "liver", "0.9000", "0.1800", "-0.0500", "1.23", "9.00",
                           "4.50"],
                          ["pan", "c1", "tumour", "n/a", "n/a", "n/a", "n/a", "n/a", "n/a"]]
    assert per_case_table({"unet": metrics["unet"]}) is None  # no volume case: no table
    rows = inference_table({"models": [{"model": "pan", "served_as": "mirror",
                                        "gain_mirror": 0.01, "gain_postprocessing": 0.0,
                                        "images_per_second_plain": 40.0,
                                        "images_per_second_mirrored": 10.04}]}).rows
    assert rows == [["pan", "mirror", "+0.0100", "+0.0000", "40.0", "10.0"]]
