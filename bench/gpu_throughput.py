"""GPU training throughput, run on demand on a CUDA machine: `python bench/gpu_throughput.py`.

The Enhanced PAN at 256x256 (batch 256 by default), forward + backward + AdamW step, after
warm-up, in one process:
- `fp32_eager`: torch's defaults, which already run convolutions in TF32 on Ampere+;
- `fp32_strict_eager`: TF32 off (true fp32), the baseline most AMP speed-ups are quoted to;
- `bf16_channels_last`: the train stage's GPU path (bf16 autocast + channels_last);
- with `--compile`, that path under torch.compile.
Prints images/s and the ratios; writes bench/results/gpu.json (issue 8's contract field
`amp_vs_fp32` is bf16_channels_last over torch's default fp32, the honest one).
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
# name: (bf16 autocast, channels_last, torch.compile, TF32 convolutions)
VARIANTS = {"fp32_eager": (False, False, False, True),
            "fp32_strict_eager": (False, False, False, False),
            "bf16_channels_last": (True, True, False, True)}


def make_step(size: int, batch: int, amp: bool, channels_last: bool, compile_: bool,
              tf32: bool):
    """One training step of the Enhanced PAN on fixed random data, as a closure."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = tf32
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

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def images_per_s(size: int, batch: int, steps: int, warmup: int, amp: bool,
                 channels_last: bool, compile_: bool, tf32: bool) -> float:
    step = make_step(size, batch, amp, channels_last, compile_, tf32)
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def step_args(description: str, steps: int, flag: str, flag_help: str) -> argparse.Namespace:
    """--size, --batch, --steps of a timed Enhanced PAN training step and one switch (this
    benchmark and gpu_profile.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument(flag, action="store_true", help=flag_help)
    return parser.parse_args()


def main() -> None:
    args = step_args(__doc__.splitlines()[0], 20, "--compile", "also time torch.compile")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for a GPU machine")
    variants = dict(VARIANTS)
    if args.compile:
        variants["bf16_channels_last_compile"] = (True, True, True, True)
    results = {"machine": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "cpu": platform.processor(),
                           "cpu_count": os.cpu_count()},
               "model": "enhanced_pan", "size": args.size, "batch": args.batch,
               "steps": args.steps, "train_images_per_s": {}, "ratios": {}}
    ips = results["train_images_per_s"]
    for name, (amp, cl, comp, tf32) in variants.items():
        ips[name] = round(images_per_s(args.size, args.batch, args.steps, 10 if comp else 5,
                                       amp, cl, comp, tf32), 1)
        ratio = ips[name] / ips["fp32_eager"]
        results["ratios"][f"{name}/fp32_eager"] = round(ratio, 2)
        print(f"enhanced_pan {args.size}px batch {args.batch} {name:28s} {ips[name]:8.1f} "
              f"images/s ({ratio:.2f}x fp32 eager)", flush=True)
    results["amp_vs_fp32"] = round(ips["bf16_channels_last"] / ips["fp32_eager"], 2)
    results["amp_vs_fp32_strict"] = round(ips["bf16_channels_last"] / ips["fp32_strict_eager"], 2)
    if args.compile:
        results["amp_compile_vs_fp32"] = round(
            ips["bf16_channels_last_compile"] / ips["fp32_eager"], 2)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
