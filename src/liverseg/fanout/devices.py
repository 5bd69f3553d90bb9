"""Which GPU each worker trains on, and how many trainings run at once.

Model i of params.yaml `models` gets GPU i mod n (round robin); the Dagster `gpu` pool
holds GPUs x LIVERSEG_TRAININGS_PER_GPU workers (docs/SCALING.md, "Devices").
"""

from __future__ import annotations

import os
import shutil

from liverseg import runner
from liverseg.fanout.errors import FanoutError

PER_GPU_ENV = "LIVERSEG_TRAININGS_PER_GPU"  # trainings sharing one GPU (gpu pool = GPUs x this)


def gpu_ids(env: dict[str, str] | None = None) -> list[str]:
    """GPUs this machine may use: CUDA_VISIBLE_DEVICES when set, else what nvidia-smi lists."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    if not shutil.which("nvidia-smi"):
        return []
    proc = runner.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], timeout=None)
    return proc.stdout.split() if proc.returncode == 0 else []


def gpu_slots(ids: list[str], n_models: int, env: dict[str, str] | None = None) -> int:
    """Size of the `gpu` pool: GPUs x trainings per GPU; on CPU, no limit beyond the models
    (the executor's max_concurrent is then the bound)."""
    env = os.environ if env is None else env
    raw = env.get(PER_GPU_ENV, "1")
    if not raw.isdigit() or int(raw) < 1:
        raise FanoutError(f"{PER_GPU_ENV}={raw!r}: expected a whole number >= 1")
    return len(ids) * int(raw) if ids else max(1, n_models)


def device_for(index: int, ids: list[str]) -> str | None:
    """Round robin: model i of params.yaml `models` trains on GPU ids[i % len(ids)]."""
    return ids[index % len(ids)] if ids else None
