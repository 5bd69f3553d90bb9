"""GPU training throughput, run on demand on a CUDA machine: `python bench/gpu_throughput.py`.

The Enhanced PAN at 256x256 (batch 64 by default), forward + backward + AdamW step, after
warm-up: fp32 eager against the train stage's GPU path (bf16 autocast + channels_last), and
with `--compile` also that path under torch.compile. Prints images/s and the ratios; writes
bench/results/gpu.json (issue 8's contract: `amp_vs_fp32`, plus the device facts).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from liverseg.config import Params
from liverseg.models import build_model

RESULTS = Path(__file__).with_name("results")


def images_per_s(size: int, batch: int, steps: int, warmup: int, amp: bool,
                 channels_last: bool, compile_: bool) -> float:
    torch.backends.cudnn.benchmark = True
    params = Params()
    model = build_model("enhanced_pan", encoder=params.model.encoder, in_channels=1,
                        options=params.model.options_for("enhanced_pan")).cuda().train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    net = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    x = torch.randn(batch, 1, size, size, device="cuda").contiguous(memory_format=fmt)
    y = (torch.rand(batch, 1, size, size, device="cuda") > 0.9).float()
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for a GPU machine")
    variants = {"fp32_eager": (False, False, False), "bf16_channels_last": (True, True, False)}
    if args.compile:
        variants["bf16_channels_last_compile"] = (True, True, True)
    results = {"machine": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "cpu": platform.processor(),
                           "cpu_count": os.cpu_count()},
               "model": "enhanced_pan", "size": args.size, "batch": args.batch,
               "steps": args.steps, "train_images_per_s": {}, "ratios": {}}
    for name, (amp, cl, comp) in variants.items():
        ips = images_per_s(args.size, args.batch, args.steps, 5 if not comp else 10, amp, cl, comp)
        results["train_images_per_s"][name] = round(ips, 1)
        ratio = ips / results["train_images_per_s"]["fp32_eager"]
        results["ratios"][f"{name}/fp32_eager"] = round(ratio, 2)
        print(f"enhanced_pan {args.size}px batch {args.batch} {name:28s} {ips:8.1f} images/s "
              f"({ratio:.2f}x fp32 eager)", flush=True)
    ips = results["train_images_per_s"]
    results["amp_vs_fp32"] = round(ips["bf16_channels_last"] / ips["fp32_eager"], 2)
    if args.compile:
        results["amp_compile_vs_fp32"] = round(
            ips["bf16_channels_last_compile"] / ips["fp32_eager"], 2)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
