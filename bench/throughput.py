"""Throughput benchmark, run on demand: `python bench/throughput.py [--quick]`.

Measures side by side in one process and prints ratios:
  - training images/s (forward + backward + AdamW step, fixed steps after warm-up) of the
    Enhanced PAN and smp's plain PAN, same encoder, at 128 and 256 px, batch 8;
  - the data pipeline (a slice read from its case file, or from a memory-mapped array as
    the old decoded cache served it, + resize + albumentations + normalisation) in images/s,
    for slices stored at 512 px, against what the Enhanced PAN consumes in training at 128 px;
  - inference of the Enhanced PAN at 128 px, batch 8: torch eager against ONNX Runtime (CPU),
    same inputs, outputs compared;
  - with `--workspace DIR` (a workspace where the pipeline has run): `dvc repro` with nothing
    changed, and what a Dagster materialisation adds over the `dvc repro` it wraps.
Writes bench/results/throughput.json with the machine facts. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from liverseg.config import Params
from liverseg.data import phantom
from liverseg.data.dataset import SliceDataset, train_augmentation
from liverseg.models import build_model

RESULTS = Path(__file__).with_name("results")


def train_throughput(name: str, size: int, batch: int, steps: int, warmup: int) -> float:
    params = Params()
    model = build_model(name, encoder=params.model.encoder, in_channels=1,
                        options=params.model.options_for(name))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    x = torch.randn(batch, 1, size, size)
    y = (torch.rand(batch, 1, size, size) > 0.9).float()
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def data_throughput(n: int, stored: int, size: int) -> dict[str, float]:
    """Read + resized + augmented images/s at `size` px, single process (num_workers=0), of
    `n` phantom slices stored at `stored` px: from their case files (the loader training
    uses) and from a memory-mapped uint8 array of the same slices (the decoded `.npy` cache
    that split wrote before the case store, as `np.load(mmap_mode="r")` served it)."""
    from liverseg import casestore
    from liverseg.data.layout import CaseWriter

    class MappedCache(SliceDataset):
        def __init__(self, *args, images, masks, **kwargs):
            super().__init__(*args, **kwargs)
            self.images, self.masks = images, masks

        def stored(self, i):
            return np.array(self.images[i]), np.array(self.masks[i]) // 255

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows, slices = [], list(phantom.generate(max(n // 10, 1), 10, stored, 3, 12.0, 0))
        for p in range(0, len(slices), 10):
            writer = CaseWriter(f"p{p}", "phantom")
            for sl in slices[p:p + 10]:
                row = writer.add(f"{p}_{sl.slice_index}", f"p{p}", sl.slice_index, sl.image,
                                 sl.labels == phantom.TUMOUR)
                rows.append(row)
            casestore.write_case(root / casestore.case_file(f"p{p}"), writer.stacked(),
                                 {"rows": writer.rows, "facts": {}})
        pd.DataFrame(rows).to_csv(root / "split.csv", index=False)
        images = np.lib.format.open_memmap(root / "images.npy", "w+", np.uint8,
                                           (len(slices), stored, stored))
        masks = np.lib.format.open_memmap(root / "masks.npy", "w+", np.uint8, images.shape)
        for i, row in enumerate(rows):
            images[i] = casestore.read(root, row["image"])
            masks[i] = casestore.read(root, row["mask"], "mask")
        images.flush()
        masks.flush()
        args = (root / "split.csv", root, size, 0.2, 0.2, train_augmentation(0))
        datasets = {"case_files": SliceDataset(*args), "mapped_npy": MappedCache(
            *args, images=np.load(root / "images.npy", mmap_mode="r"),
            masks=np.load(root / "masks.npy", mmap_mode="r"))}
        out = {}
        for name, ds in datasets.items():
            ds[0]  # open the file once before timing
            start = time.perf_counter()
            for i in range(len(ds)):
                ds[i]
            out[name] = len(ds) / (time.perf_counter() - start)
        casestore.close_all()
        return out


def inference_throughput(size: int, batch: int, steps: int, warmup: int) -> dict:
    """Images/s of the Enhanced PAN (eval) in torch eager and in ONNX Runtime, same inputs."""
    import onnxruntime as ort

    model = build_model("enhanced_pan", encoder=Params().model.encoder, in_channels=1,
                        options=Params().model.options_for("enhanced_pan")).eval()
    x = torch.randn(batch, 1, size, size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["image"],
                          external_data=False)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def eager():
            with torch.no_grad():
                return model(x).numpy()

        def onnx():
            return session.run(None, {"image": x.numpy()})[0]

        out = {name: _images_per_s(fn, batch, steps, warmup)
               for name, fn in (("torch_eager", eager), ("onnxruntime", onnx))}
        out["max_abs_diff"] = float(np.abs(eager() - onnx()).max())
    return out


def _images_per_s(fn, batch: int, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return steps * batch / (time.perf_counter() - start)


def pipeline_overhead(workspace: Path) -> dict:
    """In a workspace where the pipeline has run: `dvc repro` with nothing to do; the bare
    `compare` stage; and Dagster's materialisation of the `compare` asset (which runs
    `dvc repro --single-item compare`, a no-op here) against that same DVC call alone, so
    the difference is what Dagster adds."""
    if not (workspace / "dvc.lock").is_file():
        raise SystemExit(f"--workspace {workspace}: no dvc.lock (run the pipeline there first)")
    env = os.environ | {"PATH": f"{Path(__file__).parents[1] / '.venv/bin'}:{os.environ['PATH']}",
                        "DAGSTER_HOME": str(workspace / ".dagster_home")}
    (workspace / ".dagster_home").mkdir(exist_ok=True)

    def timed(*cmd: str) -> float:
        start = time.perf_counter()
        subprocess.run(cmd, cwd=workspace, env=env, check=True, capture_output=True)
        return time.perf_counter() - start

    status = subprocess.run(["dvc", "status", "--json"], cwd=workspace, env=env,
                            capture_output=True, text=True, check=True).stdout.strip()
    if status not in ("{}", ""):
        raise SystemExit(f"--workspace {workspace}: pipeline not up to date ({status[:200]})")
    out = {"dvc_repro_noop_s": timed("dvc", "repro"),
           "dvc_single_item_compare_noop_s": timed("dvc", "repro", "--single-item", "compare"),
           "dagster_materialize_compare_noop_s": timed(
               "dagster", "asset", "materialize", "-m", "pipeline.definitions",
               "--select", "compare"),
           "bare_stage_compare_s": timed("liverseg", "compare")}  # same inputs, same outputs
    out["dagster_overhead_s"] = (out["dagster_materialize_compare_noop_s"]
                                 - out["dvc_single_item_compare_noop_s"])
    return {k: round(v, 2) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    parser.add_argument("--workspace", type=Path,
                        help="a workspace where the pipeline has run, e.g. bench/.work/"
                             "quality-tumor: also measure dvc/Dagster overhead there")
    args = parser.parse_args()
    steps, warmup = (2, 1) if args.quick else (10, 3)
    results: dict = {"machine": {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device": "cpu"}, "train_images_per_s": {}, "ratios": {}}
    for size in (128, 256):
        for name in ("enhanced_pan", "pan"):
            ips = train_throughput(name, size, 8, steps, warmup)
            results["train_images_per_s"][f"{name}@{size}"] = round(ips, 2)
            print(f"train {name:13s} {size}px batch 8: {ips:7.2f} images/s", flush=True)
        t = results["train_images_per_s"]
        ratio = t[f"enhanced_pan@{size}"] / t[f"pan@{size}"]
        results["ratios"][f"enhanced_pan/pan@{size}"] = round(ratio, 3)
        print(f"  ratio enhanced_pan / pan at {size}px: {ratio:.2f}")
    loader = data_throughput(40 if args.quick else 200, 512, 128)
    consume = results["train_images_per_s"]["enhanced_pan@128"]
    ratio = loader["case_files"] / loader["mapped_npy"]
    results["ratios"]["data_case_files/mapped_npy@128"] = round(ratio, 3)
    print(f"data pipeline, slices stored at 512px: case files / memory-mapped array = "
          f"{ratio:.3f}")
    for source, ips in loader.items():
        results[f"data_images_per_s@128_{source}"] = round(ips, 1)
        results["ratios"][f"data_supply_{source}/enhanced_pan_consumption@128"] = round(
            ips / consume, 2)
        print(f"data pipeline ({source} + augment), 1 process: {ips:.1f} images/s "
              f"= {ips / consume:.1f}x what the Enhanced PAN consumes at 128px")
    inference = inference_throughput(128, 8, steps, warmup)
    results["inference_images_per_s@128"] = {k: round(v, 6 if k == "max_abs_diff" else 2)
                                             for k, v in inference.items()}
    ratio = inference["onnxruntime"] / inference["torch_eager"]
    results["ratios"]["onnxruntime/torch_eager@128"] = round(ratio, 2)
    print(f"inference enhanced_pan 128px batch 8: eager {inference['torch_eager']:.1f}, "
          f"onnxruntime {inference['onnxruntime']:.1f} images/s = {ratio:.2f}x "
          f"(max abs diff {inference['max_abs_diff']:.2g})")
    if args.workspace:
        overhead = pipeline_overhead(args.workspace.resolve())
        results["pipeline_overhead"] = overhead
        print(f"pipeline overhead: {overhead}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS / 'throughput.json'}")


if __name__ == "__main__":
    main()
