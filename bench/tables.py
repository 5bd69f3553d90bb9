"""The tables of docs/BENCHMARKS.md, generated from bench/results/: `python bench/tables.py`.

Every table in docs/BENCHMARKS.md sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->`
and is written by this script from the CSVs (and JSONs) it names, so the page and the results
cannot disagree. Mean ± sd columns are computed here from the per-seed CSVs that each row
names (sample standard deviation, n - 1).

    python bench/tables.py            # rewrite the tables in docs/BENCHMARKS.md
    python bench/tables.py --check    # exit 1 if a table there differs from the results
    python bench/tables.py --print    # print the tables, write nothing

Standard library only; no liverseg import.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = "bench/results"
DOC = REPO / "docs" / "BENCHMARKS.md"


# ------------------------------------------------------------------------------ formats


def f3(value) -> str:
    return f"{float(value):.3f}"


def f4(value) -> str:
    return f"{float(value):.4f}"


def f1(value) -> str:
    return f"{float(value):.1f}"


def f2(value) -> str:
    return f"{float(value):.2f}"


def millions(value) -> str:
    return f"{float(value) / 1e6:.2f} M"


def integer(value) -> str:
    return str(int(float(value)))


def plain(value) -> str:
    return str(value)


# Column key -> (header, format). `fg_iou` gains its 95% CI when the CSV has
# `fg_iou_ci_low`/`fg_iou_ci_high` (bench/quality.py's collect writes them).
COLUMNS = {
    "fg_iou": ("fg IoU", f3),
    "dice": ("Dice", f3),
    "miou": ("mIoU", f3),
    "image_iou": ("per-image IoU", f3),
    "pixel_accuracy": ("pixel acc.", f4),
    "params": ("params", millions),
    "best_epoch": ("best epoch", integer),
    "sec_per_epoch": ("s/epoch", plain),
    "iou_liver": ("liver IoU", f3),
    "iou_tumour": ("tumour IoU", f3),
    "device": ("device", plain),
    "gflops": ("GFLOPs", f2),
    "images_per_second": ("images/s", f1),
    "versus": ("versus", plain),
    "diff": ("fg IoU difference [95% CI]", f3),
    "excludes_0": ("interval excludes 0", plain),
    "with": ("with", plain),
}


# ------------------------------------------------------------------------------ sources


def read_csv(name: str) -> list[dict]:
    with (REPO / RESULTS / name).open(newline="") as fh:
        return list(csv.DictReader(fh))


def row_of(name: str, model: str) -> dict:
    rows = [r for r in read_csv(name) if r["model"] == model]
    if len(rows) != 1:
        raise ValueError(f"{RESULTS}/{name}: {len(rows)} rows for model {model!r}, expected 1")
    return rows[0]


def device_of(name: str, row: dict) -> str:
    """The CSV's `device` column, else the GPU named in the JSON beside it, else cpu."""
    if row.get("device"):
        return row["device"]
    facts = json.loads((REPO / RESULTS / name).with_suffix(".json").read_text())
    machine = facts.get("machine") or {}
    gpu = machine.get("gpu") or machine.get("cuda") or ""
    match = re.search(r"\b([A-Z]\d{2,4})\b", gpu)
    return match.group(1).lower() if match else ("gpu" if gpu else "cpu")


def json_value(name: str, path: str):
    """`a.b.c` in bench/results/NAME (keys may contain / and @, not dots)."""
    value = json.loads((REPO / RESULTS / name).read_text())
    for key in path.split("."):
        value = value[key]
    return value


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


# ------------------------------------------------------------------------------ tables


@dataclass
class ModelTable:
    """One row per model of one CSV, in the CSV's order (bench/quality.py sorts by fg IoU)."""

    csv: str
    columns: list[str]

    def sources(self) -> list[str]:
        return [self.csv]

    def render(self) -> list[str]:
        rows = read_csv(self.csv)
        with_ci = all(r.get("fg_iou_ci_low") for r in rows)

        def cell(r: dict, key: str) -> str:
            if key == "device":
                return device_of(self.csv, r)
            if key == "fg_iou" and with_ci:
                return f"{f3(r['fg_iou'])} [{f3(r['fg_iou_ci_low'])}, {f3(r['fg_iou_ci_high'])}]"
            if key == "diff":  # bench/cv_table.py's paired differences
                return f"{f3(r['diff'])} [{f3(r['ci_low'])}, {f3(r['ci_high'])}]"
            return COLUMNS[key][1](r[key])

        header = ["model"] + [COLUMNS[k][0] + (" [95% CI]" if k == "fg_iou" and with_ci else "")
                              for k in self.columns]
        return markdown(header, [[r["model"]] + [cell(r, k) for k in self.columns] for r in rows])


@dataclass
class SeedRow:
    label: str
    model: str
    csvs: list[str]  # seed 0, 1, 2, ... (fewer when fewer seeds ran)


@dataclass
class SeedTable:
    """One row per configuration: each metric per seed, then mean ± sd over the seeds run."""

    rows: list[SeedRow]
    metrics: list[str]
    seeds: int = 3
    first: str = "configuration"
    extra: list[str] = field(default_factory=list)  # single-value columns from seed 0's row

    def sources(self) -> list[str]:
        return list(dict.fromkeys(name for row in self.rows for name in row.csvs))

    def render(self) -> list[str]:
        header = [self.first]
        for key in self.metrics:
            name = COLUMNS[key][0]
            if self.seeds == 1:
                header.append(name)
                continue
            header += [f"{name} seed {s}" for s in range(self.seeds)] + [f"{name} mean ± sd"]
        header += [COLUMNS[k][0] for k in self.extra] + [f"from `{RESULTS}/`"]
        out = []
        for row in self.rows:
            found = [row_of(name, row.model) for name in row.csvs]
            cells = [row.label]
            for key in self.metrics:
                values = [float(r[key]) for r in found]
                cells += [f3(v) for v in values] + [""] * (self.seeds - len(values))
                if self.seeds == 1:
                    continue
                cells.append(f"{f3(statistics.mean(values))} ± {f3(statistics.stdev(values))}"
                             if len(values) > 1 else "")
            for key in self.extra:
                cells.append(device_of(row.csvs[0], found[0]) if key == "device"
                             else COLUMNS[key][1](found[0][key]))
            cells.append(", ".join(f"`{name}`" for name in row.csvs))
            out.append(cells)
        return markdown(header, out)


@dataclass
class FoldTable:
    """Cross-validation (`bench/quality.py --folds`): one row per (model, run), fg IoU per
    fold, mean ± sd over the folds, and the cost (GFLOPs per image, parameters)."""

    rows: list[tuple[str, str, str]]  # (label, model, per-fold CSV)
    folds: int = 4
    extra: list[str] = field(default_factory=lambda: ["gflops", "params"])

    def sources(self) -> list[str]:
        return list(dict.fromkeys(csv_name for _, _, csv_name in self.rows))

    def render(self) -> list[str]:
        header = (["configuration"] + [f"fg IoU fold {k}" for k in range(self.folds)]
                  + ["fg IoU mean ± sd"] + [COLUMNS[k][0] for k in self.extra]
                  + [f"from `{RESULTS}/`"])
        out = []
        for label, model, name in self.rows:
            found = sorted((r for r in read_csv(name) if r["model"] == model),
                           key=lambda r: int(r["fold"]))
            values = [float(r["fg_iou"]) for r in found]
            out.append([label] + [f3(v) for v in values]
                       + [f"{f3(statistics.mean(values))} ± {f3(statistics.stdev(values))}"]
                       + [COLUMNS[k][1](found[0][k]) for k in self.extra] + [f"`{name}`"])
        return markdown(header, out)


@dataclass
class JsonTable:
    """Measures read from one JSON of bench/results/: (what, key path, unit)."""

    json: str
    rows: list[tuple[str, str, str]]

    def sources(self) -> list[str]:
        return [self.json]

    def render(self) -> list[str]:
        return markdown(["measure", "value", "unit", f"key in `{RESULTS}/{self.json}`"],
                        [[what, plain(json_value(self.json, path)), unit, f"`{path}`"]
                         for what, path, unit in self.rows])


def seeds(stem: str, n: int = 3, suffix: str = "") -> list[str]:
    """quality-tumor-no-se.csv, quality-tumor-no-se-seed1.csv, ... (seed 0 has no suffix)."""
    return [f"{stem}{suffix}.csv"] + [f"{stem}-seed{s}{suffix}.csv" for s in range(1, n)]


QUALITY = ["fg_iou", "dice", "miou", "image_iou", "pixel_accuracy", "params"]

TABLES: dict[str, ModelTable | SeedTable | FoldTable | JsonTable] = {
    "tumour": ModelTable("quality-tumor.csv", QUALITY + ["best_epoch", "device"]),
    "liver-current": ModelTable("quality-liver-current.csv",
                                QUALITY + ["gflops", "images_per_second", "best_epoch",
                                           "device"]),
    "liver": ModelTable("quality-liver.csv", QUALITY + ["best_epoch", "device"]),
    "liver-seeds": SeedTable(
        [SeedRow(m, m, ["quality-liver.csv", "quality-liver-seed1-gpu.csv",
                        "quality-liver-seed2-gpu.csv"])
         for m in ("unet_cbam", "unetplusplus", "enhanced_pan")],
        ["fg_iou", "miou"], first="model"),
    "liver-ablations": SeedTable([
        SeedRow("defaults (stride 4, 64 channels)", "enhanced_pan",
                ["quality-liver.csv", "quality-liver-seed1-gpu.csv",
                 "quality-liver-seed2-gpu.csv"]),
        SeedRow("`decoder_stride: 2`", "enhanced_pan", ["quality-liver-decoder-stride-2.csv"]),
        SeedRow("`se: false` + `decoder_stride: 2`", "enhanced_pan",
                ["quality-liver-no-se-stride-2-gpu.csv"]),
        SeedRow("`decoder_stride: 2` + `decoder_channels: 128`", "enhanced_pan",
                ["quality-liver-stride-2-ch128.csv", "quality-liver-stride-2-ch128-seed1.csv"]),
    ], ["fg_iou"], extra=["miou", "params", "sec_per_epoch", "device"]),
    "three-classes": ModelTable("quality-liver_tumour.csv",
                                ["fg_iou", "iou_liver", "iou_tumour", "miou", "image_iou",
                                 "pixel_accuracy", "params", "best_epoch"]),
    "tumour-ablations": SeedTable([
        SeedRow("full (SE, ASPP, attention, residual; stride 4)", "enhanced_pan",
                seeds("quality-tumor")),
        SeedRow("`se: false`", "enhanced_pan", seeds("quality-tumor-no-se")),
        SeedRow("`aspp: false`", "enhanced_pan", ["quality-tumor-no-aspp.csv"]),
        SeedRow("`attention: false`", "enhanced_pan", ["quality-tumor-no-attention.csv"]),
        SeedRow("`residual: false`", "enhanced_pan", ["quality-tumor-no-residual.csv"]),
        SeedRow("`decoder_stride: 2`", "enhanced_pan", ["quality-tumor-decoder-stride-2.csv"]),
        SeedRow("`se: false` + `decoder_stride: 2`", "enhanced_pan",
                seeds("quality-tumor-no-se-stride-2")),
        SeedRow("`decoder_stride: 2` + `decoder_channels: 128`", "enhanced_pan",
                ["quality-tumor-stride-2-ch128.csv"]),
    ], ["fg_iou"]),
    "tumour-cv": FoldTable([
        ("enhanced_pan (paper default)", "enhanced_pan", "quality-tumor-cv.csv"),
        ("unet_cbam", "unet_cbam", "quality-tumor-cv.csv"),
        ("manet", "manet", "quality-tumor-cv.csv"),
        ("unet", "unet", "quality-tumor-cv.csv"),
        ("enhanced_pan, se: false (the candidate)", "enhanced_pan",
         "quality-tumor-cv-no-se.csv"),
        ("enhanced_pan, 2.5D (context_slices 1)", "enhanced_pan",
         "quality-tumor-cv-context1.csv"),
    ]),
    "tumour-cv-paired": ModelTable("quality-tumor-cv-table-paired.csv",
                                   ["versus", "diff", "excludes_0"]),
    "tumour-cv-context": ModelTable("quality-tumor-cv-table-context.csv",
                                    ["with", "diff", "excludes_0"]),
    "tumour-device": SeedTable([
        SeedRow("enhanced_pan, 2-core CPU", "enhanced_pan", ["quality-tumor.csv"]),
        SeedRow("enhanced_pan, H100", "enhanced_pan", ["quality-tumor-enhanced_pan-gpu.csv"]),
        SeedRow("unet_cbam, 2-core CPU", "unet_cbam", ["quality-tumor.csv"]),
        SeedRow("unet_cbam, H100", "unet_cbam", ["quality-tumor-unet_cbam-gpu.csv"]),
    ], ["fg_iou"], seeds=1, first="run", extra=["miou", "best_epoch"]),
    "throughput-cpu": JsonTable("throughput.json", [
        ("Enhanced PAN training, 128 px", "train_images_per_s.enhanced_pan@128", "images/s"),
        ("smp PAN training, 128 px", "train_images_per_s.pan@128", "images/s"),
        ("Enhanced PAN / PAN, 128 px", "ratios.enhanced_pan/pan@128", "ratio"),
        ("Enhanced PAN training, 256 px", "train_images_per_s.enhanced_pan@256", "images/s"),
        ("smp PAN training, 256 px", "train_images_per_s.pan@256", "images/s"),
        ("Enhanced PAN / PAN, 256 px", "ratios.enhanced_pan/pan@256", "ratio"),
        ("inference, torch eager, 128 px", "inference_images_per_s@128.torch_eager", "images/s"),
        ("inference, ONNX Runtime, 128 px", "inference_images_per_s@128.onnxruntime",
         "images/s"),
        ("ONNX Runtime / torch eager", "ratios.onnxruntime/torch_eager@128", "ratio"),
        ("data pipeline, PNG", "data_images_per_s@128_png", "images/s"),
        ("data pipeline, decoded-slice cache", "data_images_per_s@128_cache", "images/s"),
        ("PNG supply / training consumption", "ratios.data_supply_png/enhanced_pan_consumption@128",
         "ratio"),
        ("cache supply / training consumption",
         "ratios.data_supply_cache/enhanced_pan_consumption@128", "ratio"),
        ("`dvc repro`, nothing to do", "pipeline_overhead.dvc_repro_noop_s", "s"),
        ("Dagster materialisation over the `dvc repro` it wraps",
         "pipeline_overhead.dagster_overhead_s", "s"),
    ]),
    "throughput-gpu": JsonTable("gpu.json", [
        ("fp32 eager (TF32 convolutions, torch's default), batch 256",
         "train_images_per_s.fp32_eager", "images/s"),
        ("strict fp32 (TF32 off), batch 256", "train_images_per_s.fp32_strict_eager", "images/s"),
        ("bf16 autocast + channels_last, batch 256", "train_images_per_s.bf16_channels_last",
         "images/s"),
        ("bf16 + channels_last / fp32 eager", "amp_vs_fp32", "ratio"),
        ("bf16 + channels_last / strict fp32", "amp_vs_fp32_strict", "ratio"),
        ("fp32 eager, batch 64", "earlier_run_batch_64.train_images_per_s.fp32_eager",
         "images/s"),
        ("bf16 + channels_last, batch 64",
         "earlier_run_batch_64.train_images_per_s.bf16_channels_last", "images/s"),
        ("bf16 + channels_last + torch.compile, batch 64",
         "earlier_run_batch_64.train_images_per_s.bf16_channels_last_compile", "images/s"),
        ("bf16 + channels_last / fp32 eager, batch 64", "earlier_run_batch_64.amp_vs_fp32",
         "ratio"),
    ]),
}


# ------------------------------------------------------------------------------ the page


def block(name: str) -> str:
    table = TABLES[name]
    cited = ", ".join(f"`{RESULTS}/{s}`" for s in table.sources())
    lines = [f"<!-- table:{name} -->",
             f"<!-- generated by `python bench/tables.py` from {cited}; edit those, not this -->",
             *table.render(), f"<!-- /table:{name} -->"]
    return "\n".join(lines)


BLOCK = re.compile(r"<!-- table:(?P<name>[\w-]+) -->\n.*?<!-- /table:(?P=name) -->", re.S)


def update(text: str) -> str:
    names = [m.group("name") for m in BLOCK.finditer(text)]
    unknown = sorted(set(names) - set(TABLES))
    if unknown:
        raise ValueError(f"{DOC.relative_to(REPO)}: unknown table(s) {unknown}; "
                         f"known: {sorted(TABLES)}")
    return BLOCK.sub(lambda m: block(m.group("name")), text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if the page is stale")
    mode.add_argument("--print", action="store_true", help="print every table, write nothing")
    args = parser.parse_args()
    if args.print:
        print("\n\n".join(block(name) for name in TABLES))
        return 0
    text = DOC.read_text()
    new = update(text)
    if args.check:
        if new != text:
            print(f"{DOC.relative_to(REPO)}: tables differ from {RESULTS}/; "
                  "run `python bench/tables.py`", file=sys.stderr)
            return 1
        return 0
    if new != text:
        DOC.write_text(new)
        print(f"updated {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
