"""Where a GPU training step of the Enhanced PAN spends its time, run on demand on a CUDA
machine: `python bench/gpu_profile.py` (bf16 autocast + channels_last, 256 px, batch 256).

torch.profiler over a few steps after warm-up; prints the kernels that take most GPU time
and writes the table to bench/results/gpu-profile.txt.
"""

from __future__ import annotations

from pathlib import Path

import torch
from gpu_throughput import make_step, step_args  # the step the throughput bench times
from torch.profiler import ProfilerActivity, profile

RESULTS = Path(__file__).with_name("results")


def main() -> None:
    args = step_args(__doc__.splitlines()[0], 5, "--fp32", "profile fp32 eager instead")
    amp = not args.fp32
    step = make_step(args.size, args.batch, amp=amp, channels_last=amp, compile_=False,
                     tf32=True)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30,
                                      max_name_column_width=70)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    name = "gpu-profile-fp32.txt" if args.fp32 else "gpu-profile.txt"
    header = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {vars(args)}\n"
    (RESULTS / name).write_text(header + table + "\n")


if __name__ == "__main__":
    main()
