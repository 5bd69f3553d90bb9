"""The train stage under `torchrun`: 2 CPU processes, gloo backend, DistributedDataParallel."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import torch
import yaml
from safetensors.torch import load_file

from liverseg import artifacts, tracking

# Each rank records the last snapshot train takes of its model (the product code has no
# test hooks), so the test can compare the ranks' final weights.
CHILD = r"""
import os
from pathlib import Path
import yaml
from safetensors.torch import save_file
from liverseg import checkpoint
from liverseg.config import parse_params
from liverseg.stages import train

snapshots, cpu_state, make_loaders = [], checkpoint.cpu_state, train.make_loaders
def spy(module):
    snapshots.append(cpu_state(module))
    return snapshots[-1]
def loaders(*args):
    out = make_loaders(*args)
    Path(f"steps{os.environ['RANK']}").write_text(str(len(out[0])))  # batches per epoch
    return out
checkpoint.cpu_state, train.make_loaders = spy, loaders
train.run(parse_params(yaml.safe_load(Path("params.yaml").read_text())), "enhanced_pan")
save_file(snapshots[-1], f"rank{os.environ['RANK']}.safetensors")
"""


def test_two_gloo_processes_train_in_lockstep_and_only_rank_0_writes(split_data, tiny_params):
    workdir = split_data
    params = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(
        update={"epochs": 1, "image_size": 32, "device": "cpu"})})  # gloo, even on a GPU box
    (workdir / "params.yaml").write_text(yaml.safe_dump(params.dump()))
    (workdir / "child.py").write_text(CHILD)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "child.py"], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # Each rank took its steps on its own half of the train split (DistributedSampler).
    per_rank = len(pd.read_csv(workdir / "data/splits/train.csv")) // 2
    steps = [int((workdir / f"steps{r}").read_text()) for r in (0, 1)]
    assert steps == [per_rank // params.train.batch_size] * 2 and steps[0] >= 2
    ranks = [load_file(str(workdir / f"rank{r}.safetensors")) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    different = [k for k in ranks[0] if not (ranks[0][k] == ranks[1][k]).all()]
    assert different == []  # parameters and batch-norm buffers alike

    written = load_file(str(workdir / "models/enhanced_pan/model.safetensors"))
    assert all((written[k] == ranks[0][k]).all() for k in ranks[0])  # one epoch: best = last
    assert not (workdir / artifacts.CHECKPOINTS).exists() or not any(
        (workdir / artifacts.CHECKPOINTS).rglob("*.pt"))
    history = pd.read_csv(workdir / "reports/training/enhanced_pan.csv")
    assert len(history) == 1  # one writer, one row per epoch
    client = tracking.mlflow().MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert proc.stdout.count("enhanced_pan epoch 1:") == 1  # rank 0 alone reports


def test_parameters_without_gradient_are_found_for_ddp():
    """PSPNet reads the encoder to depth 3 only: DDP must be told, or its 2nd step fails."""
    from liverseg import distributed
    from liverseg.models import build_model

    x = torch.zeros(2, 1, 64, 64)
    psp = build_model("pspnet", encoder="tu-efficientnet_b0")
    assert distributed.has_unused_parameters(psp, x)
    assert all(p.grad is None for p in psp.parameters()) and psp.training  # left as found
    assert not distributed.has_unused_parameters(
        build_model("enhanced_pan", encoder="tu-efficientnet_b0"), x)
