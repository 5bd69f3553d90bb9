"""What a monitoring row costs against the forward pass it describes, side by side in one run:
`python bench/monitoring_overhead.py [--slices 100] [--side 512] [--model linknet] [--repeat 3]`.

A synthetic 100-slice 512x512 CT series (HU: air, fat, soft tissue, a liver with lesions,
bone, noise; seeded) is windowed to grey as predict windows it. Then, per repeat:
  - forward: `liverseg.served.Served` around a small registry model (3 classes, random
    weights, 128 px): grey [32, 1, 512, 512] -> resize to 128 -> model -> softmax -> resize
    back -> class indices, in batches of 32, as `liverseg predict` runs it;
  - monitoring: `intensity_facts` on the series' grey and HU, `Confidence.update` on each
    batch's probabilities, `output_facts` (mL, lesion count in 3D) on the mask a working
    model answers (the synthetic series' own liver and lesions: the random-weight model's
    mask is not one), `served_row` and one `ServedCaseStore.append` to a temporary folder;
  - the worst case: `output_facts` on the random-weight model's own mask (tumour nearly
    everywhere, hundreds of components: what a model that has failed answers).
Prints both medians, the ratio, the machine, the load average and the seed; writes
bench/results/monitoring_overhead.json. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from liverseg import labels
from liverseg.models import build_model
from liverseg.monitoring import Confidence, ServedCaseStore, facts
from liverseg.preprocess import Preprocessing, window
from liverseg.served import Served

RESULTS = Path(__file__).with_name("results")
CLASSES = ("background", "liver", "tumour")
HU_WINDOW = (-200.0, 250.0)


def synthetic_series(n: int, side: int, rng: np.random.Generator) -> tuple[np.ndarray,
                                                                          np.ndarray]:
    """[n, side, side] float32 HU: an elliptical body (fat rim, soft tissue), a liver with two
    lesions, a spine, Gaussian noise; air outside. And its labels (0, 1 liver, 2 tumour)."""
    y, x = np.mgrid[:side, :side].astype(np.float32) / side - 0.5
    body = (x / 0.42) ** 2 + (y / 0.32) ** 2 < 1
    inner = (x / 0.38) ** 2 + (y / 0.28) ** 2 < 1
    liver = ((x + 0.12) / 0.16) ** 2 + ((y + 0.02) / 0.12) ** 2 < 1
    lesion = (((x + 0.15) / 0.03) ** 2 + ((y + 0.0) / 0.03) ** 2 < 1) | \
        (((x + 0.05) / 0.02) ** 2 + ((y - 0.05) / 0.02) ** 2 < 1)
    spine = (x / 0.05) ** 2 + ((y - 0.2) / 0.05) ** 2 < 1
    base = np.full((side, side), -1000.0, np.float32)
    base[body] = -100.0
    base[inner] = 40.0
    base[liver] = 60.0
    base[lesion] = 20.0
    base[spine] = 700.0
    vol = np.repeat(base[None], n, axis=0)
    vol += rng.normal(0, 15, vol.shape).astype(np.float32)
    label = np.zeros((side, side), np.uint8)
    label[liver] = 1
    label[lesion] = 2
    return vol, np.repeat(label[None], n, axis=0)


def forward_batches(served: Served, grey: np.ndarray, batch: int):
    """Yields (probabilities, class indices) per batch, as predict computes them."""
    with torch.no_grad():
        for i in range(0, len(grey), batch):
            probs = served(served.grey_batch(grey[i:i + batch]))
            yield probs, labels.to_classes(probs, served.prep.threshold)


def run(args) -> dict:
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    hu, truth = synthetic_series(args.slices, args.side, rng)
    grey = window(hu, HU_WINDOW)
    prep = Preprocessing(image_size=args.size, in_channels=1, mean=0.2, std=0.25,
                         classes=CLASSES, hu_window=HU_WINDOW)
    model = build_model(args.model, in_channels=1, classes=len(CLASSES)).eval()
    served = Served(model, prep).eval()
    identity = {"model_name": args.model, "model_version": "1", "model_run": "bench"}
    voxel_mm3 = 0.7 * 0.7 * 2.5
    forward_s, monitor_s, worst_s, parts = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        store = ServedCaseStore(tmp)
        for rep in range(args.repeat + 1):  # the first round warms up and is not counted
            fwd = mon = 0.0
            split = {"intensity": 0.0, "confidence": 0.0, "output": 0.0, "row": 0.0}
            worst = 0.0
            conf = Confidence()
            masks = []
            batches = forward_batches(served, grey, args.batch)
            while True:
                t0 = time.perf_counter()
                try:
                    probs, classes = next(batches)
                except StopIteration:
                    break
                masks.append(classes.numpy().astype(np.uint8))
                t1 = time.perf_counter()
                conf.update(probs)
                t2 = time.perf_counter()
                fwd += t1 - t0
                split["confidence"] += t2 - t1
            model_mask = np.concatenate(masks)
            t0 = time.perf_counter()
            worst_outputs = facts.output_facts(model_mask, CLASSES, voxel_mm3, True)
            worst = time.perf_counter() - t0
            t0 = time.perf_counter()
            inputs = facts.intensity_facts(grey, hu, HU_WINDOW)
            t1 = time.perf_counter()
            outputs = facts.output_facts(truth, CLASSES, voxel_mm3, True)
            t2 = time.perf_counter()
            outputs.update(conf.facts())
            store.append(facts.served_row(identity, "dicom", inputs, outputs,
                                          study_uid="1.2.3.4", series_uid="1.2.3.4.5"))
            t3 = time.perf_counter()
            split.update(intensity=t1 - t0, output=t2 - t1, row=t3 - t2)
            mon = sum(split.values())
            if rep:
                forward_s.append(fwd)
                monitor_s.append(mon)
                parts.append(split)
                worst_s.append(mon - split["output"] + worst)
        rows = len(store.read())
    fwd, mon = statistics.median(forward_s), statistics.median(monitor_s)
    worst = statistics.median(worst_s)
    return {
        "forward_s": fwd, "monitoring_s": mon, "ratio": mon / fwd,
        "monitoring_random_model_mask_s": worst, "ratio_random_model_mask": worst / fwd,
        "random_model_mask": worst_outputs,
        "monitoring_parts_s": {k: statistics.median(p[k] for p in parts) for k in parts[0]},
        "rows_written": rows, "last_row": {k: v for k, v in outputs.items()},
        "series": f"{args.slices}x{args.side}x{args.side}", "model": args.model,
        "model_px": args.size, "batch": args.batch, "repeat": args.repeat, "seed": args.seed,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "cuda": torch.cuda.is_available(),
                    "loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--side", type=int, default=512)
    ap.add_argument("--size", type=int, default=128, help="the model's input size (px)")
    ap.add_argument("--model", default="linknet")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true", help="do not write bench/results/")
    args = ap.parse_args()
    out = run(args)
    m = out["machine"]
    print(f"machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']} with "
          f"{m['torch_threads']} threads, CUDA {m['cuda']}, load average {m['loadavg_1_5_15']}")
    print(f"series {out['series']}, model {out['model']} at {out['model_px']} px, batch "
          f"{out['batch']}, seed {out['seed']}, median of {out['repeat']} (after a warm-up)")
    print(f"forward (Served: resize, model, softmax, resize back, classes): "
          f"{out['forward_s']:.3f} s")
    parts = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in out["monitoring_parts_s"].items())
    print(f"monitoring row: {out['monitoring_s']:.3f} s ({parts})")
    print(f"ratio monitoring / forward: {out['ratio']:.2%}")
    w = out["random_model_mask"]
    print(f"worst case, output facts on the random-weight model's own mask (tumour "
          f"{w['tumour_ml']:.0f} mL in {w['lesion_count']} lesions): monitoring "
          f"{out['monitoring_random_model_mask_s']:.3f} s, ratio "
          f"{out['ratio_random_model_mask']:.2%}")
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "monitoring_overhead.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
