"""Data-parallel training under `torchrun`, and nothing at all without it.

`torchrun --nproc_per_node=N -m liverseg.cli train MODEL` sets RANK/WORLD_SIZE/LOCAL_RANK;
`setup` then joins the process group (NCCL on CUDA, gloo on CPU) and each rank trains on
its shard of every epoch (DistributedSampler), with gradients averaged by
DistributedDataParallel. Only rank 0 logs to MLflow and writes checkpoints and outputs.
A plain `liverseg train` is world size 1: no process group, no wrapper, same code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
        """DDP around the model when distributed (gradients all-reduced in backward).

        DDP must be told when some parameters never get a gradient (PSPNet reads its encoder
        to depth 3 only; smp's efficientnet-b0 never uses its head conv), else it fails on
        the second step; `example` finds out, as the check costs time on every step."""
        if not self.distributed:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=has_unused_parameters(model, example))

    def broadcast_buffers(self, model: torch.nn.Module) -> None:
        """Rank 0's buffers (batch-norm running statistics) everywhere: each rank updated its
        own from its shard, so without this the ranks' models would differ in them."""
        if self.distributed:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place; a no-op for one process)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


def has_unused_parameters(model: torch.nn.Module, example: torch.Tensor) -> bool:
    """True if a backward pass from `example` leaves some trainable parameter without a
    gradient. Runs in eval mode (batch-norm statistics untouched); gradients are cleared."""
    was_training = model.training
    model.eval()
    model(example).float().sum().backward()
    unused = any(p.grad is None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return unused


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    if choice != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(device_choice: str) -> Context:
    """Join the torchrun process group if there is one; pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_choice, local_rank)
    if world_size == 1:
        return Context(0, 1, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # Long timeout: the other ranks wait in teardown's barrier while rank 0 uploads the
        # model to MLflow, which can take longer than the default 10 minutes.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(hours=1))
    return Context(dist.get_rank(), world_size, device)


def teardown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.barrier()  # rank 0 has written everything before anyone exits
        dist.destroy_process_group()
