"""train@MODEL: the paper's recipe (AdamW + OneCycleLR), with binary cross-entropy on logits
plus soft Dice by default (`train.loss: bce_dice`; `bce` is the paper's loss alone).

Three classes (`model.num_classes: 3`, data.target liver_tumour): a softmax head and the
softmax form of the loss (cross-entropy, + multi-class soft Dice); everything else is the same.

Writes `models/<model>/model.safetensors` (the best epoch by validation foreground IoU),
`models/<model>/config.json` (the resolved config), `models/<model>/run.json` (the MLflow
run; `"tracking": "off"` under LIVERSEG_TRACKING=off) and `reports/training/<model>.csv`
(one row per epoch: losses, IoU, mIoU, pixel accuracy for train and validation; DVC plots
read it).

Resumable: after every epoch the whole training state (model, optimiser, scheduler, best
weights, history, MLflow run id) is replaced atomically in `.checkpoints/<model>/<key>.pt`
(see `checkpoint.TrainingCheckpoint`); a rerun after a kill continues from the last
finished epoch in the same MLflow run and ends bitwise equal to an uninterrupted run on
CPU, because every random stream (python, numpy, torch, the loader's shuffle generator,
albumentations) is re-seeded from (seed, epoch) at the start of each epoch, so an epoch's
randomness never depends on what ran before it. The checkpoint is deleted on success.

Hardware: on CUDA the step runs under bf16 autocast, in channels_last, with cudnn.benchmark
(all switchable in `train`; CPU stays fp32). Under `torchrun --nproc_per_node=N` the same
stage trains data-parallel (see `liverseg.distributed`): `train.batch_size` is per process,
train metrics are pooled over ranks, every rank validates on the whole validation split, and
only rank 0 logs, checkpoints and writes outputs.

Imports: torch, timm, smp, albumentations (with its pydantic and PyYAML), numpy and
safetensors; MLflow only when tracking is on. A bare GPU image can train.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import segmentation_models_pytorch as smp
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from liverseg import checkpoint, distributed, labels, redact, tracking
from liverseg.artifacts import CHECKPOINTS, RUN, WEIGHTS, Artifacts
from liverseg.config import Params
from liverseg.data.dataset import SliceDataset, train_augmentation
from liverseg.io import atomic_path, read_json, write_json
from liverseg.metrics import ConfusionMeter
from liverseg.models import build_model


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A well-mixed 32-bit seed for one epoch (and rank), a pure function of its inputs."""
    entropy = [seed, epoch] + ([rank] if rank else [])  # rank 0: as a single process
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def seed_epoch(seed: int, epoch: int, generator: torch.Generator, loader: DataLoader,
               rank: int = 0) -> None:
    """Re-seed every random stream an epoch uses, so a resumed epoch replays exactly.
    Other ranks get their own streams (different augmentations of their own shard)."""
    value = epoch_seed(seed, epoch, rank)
    seed_everything(value)
    generator.manual_seed(value)  # the loader's shuffle order (and its workers' seeds)
    augment = loader.dataset.augment  # a SliceDataset's; no getattr: a rename must fail
    if augment is not None:  # albumentations keeps its own generator
        augment.set_random_seed(value)


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors run: this rank's device, the autocast dtype, the memory format."""

    ctx: distributed.Context
    amp: torch.dtype | None = None
    channels_last: bool = False

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)


def make_runtime(cfg, ctx: distributed.Context) -> Runtime:
    """Kernel choices for this device: cuDNN autotuning or determinism, bf16 autocast."""
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    cuda = ctx.device.type == "cuda"
    torch.backends.cudnn.benchmark = cuda and not cfg.deterministic
    bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    if cfg.precision == "bf16" and cuda and not bf16:
        raise RuntimeError("train.precision is 'bf16' but this GPU does not support bfloat16")
    amp = torch.bfloat16 if bf16 and cfg.precision != "fp32" else None
    return Runtime(ctx, amp, channels_last=cuda and cfg.channels_last)


def make_loaders(params: Params, splits_dir: Path, raw_dir: Path, stats: dict, generator,
                 ctx: distributed.Context):
    """(train loader, val loader, the train DistributedSampler or None)."""
    size, cfg = params.train.image_size, params.train
    n = len(labels.classes_of(stats))
    augment = train_augmentation(params.seed) if cfg.augment else None
    train = SliceDataset(splits_dir / "train.csv", raw_dir, size, stats["mean"], stats["std"],
                         augment, num_classes=n)
    val = SliceDataset(splits_dir / "val.csv", raw_dir, size, stats["mean"], stats["std"],
                       num_classes=n, sampled_only=True)
    if len(train) < cfg.batch_size * ctx.world_size:
        raise ValueError(f"train split has {len(train)} slices, fewer than "
                         f"train.batch_size={cfg.batch_size} x {ctx.world_size} process(es)")
    cuda = ctx.device.type == "cuda"
    # Persistent workers keep their augmentation RNG across epochs, which exact resume on
    # CPU cannot allow (each epoch re-seeds it); on GPU speed wins.
    common = {"num_workers": cfg.num_workers, "pin_memory": cuda,
              "persistent_workers": cuda and cfg.num_workers > 0}
    sampler = DistributedSampler(train, ctx.world_size, ctx.rank, shuffle=True,
                                 seed=params.seed, drop_last=True) if ctx.distributed else None
    # drop_last: a final batch of one would break batch norm after global pooling.
    return (DataLoader(train, cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                       drop_last=True, generator=generator, **common),
            DataLoader(val, params.evaluate.batch_size, shuffle=False, **common), sampler)


def make_loss(name: str, num_classes: int = 2):
    """Binary cross-entropy on logits (the paper's loss), optionally plus soft Dice; for
    more than two classes their softmax forms: cross-entropy and multi-class soft Dice.
    `target` is [N, 1, H, W] class indices either way."""
    if num_classes == 2:
        xent, dice = torch.nn.BCEWithLogitsLoss(), smp.losses.DiceLoss("binary", from_logits=True)
        as_target = lambda target: target  # noqa: E731
    else:
        xent = torch.nn.CrossEntropyLoss()
        dice = smp.losses.DiceLoss("multiclass", from_logits=True)
        as_target = lambda target: target[:, 0].long()  # noqa: E731  [N, H, W] indices

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = as_target(target)
        value = xent(logits, target)
        return value + dice(logits, target) if name == "bce_dice" else value

    return loss


def run_epoch(model, loader, loss_fn, rt: Runtime, optimizer=None, scheduler=None, desc="",
              classes: tuple[str, ...] = labels.BINARY):
    """One pass; trains when an optimizer is given. Returns mean loss + pooled metrics.

    Loss and confusion counts stay on the device (one host sync per epoch, not per batch);
    a training pass pools them over all ranks.
    """
    training = optimizer is not None
    model.train(training)
    meter, seen = ConfusionMeter(classes), 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    with torch.set_grad_enabled(training):
        for x, y, _ in tqdm(loader, desc=desc, leave=False, mininterval=2,
                            disable=not rt.ctx.is_main):
            x, y = rt.batch(x, y)
            with rt.autocast():
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
            loss_sum += loss.detach().double() * len(x)
            seen += len(x)
            meter.update(logits.float(), y)
    totals = torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64,
                                                 device=rt.device)])
    if training:
        totals, meter.counts = rt.ctx.sum(totals), rt.ctx.sum(meter.counts)
    loss_total, seen = totals.tolist()
    return {"loss": loss_total / max(seen, 1)} | meter.compute()


def epoch_row(epoch: int, train: dict, val: dict, lr: float) -> dict:
    keys = ("loss", "fg_iou", "miou", "pixel_accuracy")
    return ({"epoch": epoch} | {f"train_{k}": train[k] for k in keys}
            | {f"val_{k}": val[k] for k in keys} | {"lr": lr})


def run(params: Params, model_name: str, root: str | Path = ".") -> dict:
    """Train `model_name` on the split of the repository at `root` (artifacts' paths)."""
    if model_name not in params.models:
        raise ValueError(f"model {model_name!r} is not listed in params.yaml `models`: "
                         f"{params.models}")
    with redact.redacted_errors():  # no credential reaches an error message
        return _train(params, model_name, Artifacts(root))


def _train(params: Params, model_name: str, art: Artifacts) -> dict:
    splits_dir, raw_dir = art.splits, art.raw
    cfg = params.train
    ctx = distributed.setup(cfg.device)
    # First: an unreachable server fails before any real work. Only rank 0 talks to MLflow.
    mlf = tracking.mlflow() if ctx.is_main and tracking.enabled() else None
    stats = read_json(art.split_stats)
    classes = labels.classes_of(stats)
    if len(classes) != params.model.num_classes:
        raise ValueError(f"model.num_classes is {params.model.num_classes} but the split's data "
                         f"has {len(classes)} classes {list(classes)} ({art.split_stats}); "
                         "rerun ingest and split with the matching data.target")
    generator = seed_everything(params.seed)
    rt = make_runtime(cfg, ctx)
    train_loader, val_loader, sampler = make_loaders(params, splits_dir, raw_dir, stats,
                                                     generator, ctx)
    model = build_model(model_name, encoder=params.model.encoder,
                        encoder_weights=params.model.encoder_weights_for(model_name),
                        in_channels=params.model.in_channels,
                        classes=labels.out_channels(len(classes)),
                        options=params.model.options_for(model_name)).to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # DDP when distributed; `model` shares its parameters
    example = torch.zeros(2, params.model.in_channels, cfg.image_size, cfg.image_size,
                          device=rt.device)
    net = ctx.wrap(model, example)
    net = torch.compile(net) if cfg.compile else net
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * len(train_loader))
    loss_fn = make_loss(cfg.loss, len(classes))

    ckpt = checkpoint.TrainingCheckpoint(
        art.path(CHECKPOINTS), model_name,
        checkpoint.run_key(params, model_name, splits_dir, raw_dir, ctx.world_size))
    state = ckpt.load() or {"epoch": 0, "history": [], "run_id": None, "seconds": 0.0,
                            "best": {"epoch": 0, "val_fg_iou": -math.inf}}
    if state["epoch"]:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        say(ctx, f"{model_name}: resuming after epoch {state['epoch']} from {ckpt.path}")

    started = time.perf_counter() - state["seconds"]
    run = tracking.start_run(mlf, model_name, state["run_id"]) if mlf \
        else contextlib.nullcontext()
    with run as active:
        if mlf:
            _log_start(mlf, active, params, model_name, model, state)
        for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
            if sampler is not None:
                sampler.set_epoch(epoch)
            seed_epoch(params.seed, epoch, generator, train_loader, ctx.rank)
            train = run_epoch(net, train_loader, loss_fn, rt, optimizer, scheduler,
                              desc=f"{model_name} epoch {epoch}/{cfg.epochs}", classes=classes)
            ctx.broadcast_buffers(model)  # batch-norm statistics as rank 0 has them
            val = run_epoch(model, val_loader, loss_fn, rt, desc="validate", classes=classes)
            row = epoch_row(epoch, train, val, scheduler.get_last_lr()[0])
            state["history"].append(row)
            score = -1.0 if math.isnan(val["fg_iou"]) else val["fg_iou"]
            if score > state["best"]["val_fg_iou"]:
                state["best"] = {"epoch": epoch, "val_fg_iou": score}
                state["best_model"] = checkpoint.cpu_state(model)
            state |= {"epoch": epoch, "seconds": time.perf_counter() - started,
                      "model": checkpoint.cpu_state(model),
                      "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            # Logged before the checkpoint: a kill in between replays this epoch and logs
            # the same values again at the same step, rather than losing them.
            if mlf:
                mlf.log_metrics({k: v for k, v in row.items() if k != "epoch"
                                 and not math.isnan(v)}, step=epoch)
            if ctx.is_main:
                ckpt.save(state)
            say(ctx, f"{model_name} epoch {epoch}: train loss {train['loss']:.4f}, "
                     f"val loss {val['loss']:.4f}, val fg IoU {val['fg_iou']:.4f}")
        if ctx.is_main:
            run_info = _finish(mlf, active, params, model_name, state, art, stats,
                               rt.device, val_loader)
    if ctx.is_main:
        write_json(art.model_dir(model_name) / RUN, run_info)
        ckpt.remove()  # only now: everything the checkpoint protected is written
    distributed.teardown(ctx)
    best, seconds = state["best"], round(state["seconds"], 1)
    return {"model": model_name, **best, "epochs": cfg.epochs, "seconds": seconds,
            "device": str(rt.device), "world_size": ctx.world_size,
            "run_id": state["run_id"] if ctx.is_main else None}


def say(ctx: distributed.Context, text: str) -> None:
    if ctx.is_main:
        print(text, flush=True)


def _log_start(mlf, active, params: Params, model_name: str, model, state: dict) -> None:
    """Tag a resumed run, or record params of a new one; remember the run id."""
    if state["run_id"] == active.info.run_id:
        mlf.set_tag("resumed_after_epoch", state["epoch"])
    else:
        mlf.set_tags(redact.redact_mapping({"model": model_name,
                                            "stage": f"train@{model_name}"}))
        mlf.log_params(redact.redact_mapping(tracking.flatten(params.dump()) | {
            "model_name": model_name,
            "n_parameters": sum(p.numel() for p in model.parameters())}))
    state["run_id"] = active.info.run_id


def _finish(mlf, active, params: Params, model_name: str, state: dict, art: Artifacts,
            stats: dict, device, val_loader) -> dict:
    """Write the best weights, config and curves; log them and the model to MLflow (when
    tracking is on)."""
    best, seconds = state["best"], state["seconds"]
    out_dir = art.model_dir(model_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / WEIGHTS) as tmp:
        save_file(state["best_model"], str(tmp))
    config = checkpoint.model_config(params, model_name, stats["mean"], stats["std"],
                                     labels.classes_of(stats))
    config |= {"best_epoch": best["epoch"], "best_val_fg_iou": best["val_fg_iou"],
               "train_seconds": round(seconds, 1), "device": str(device)}
    checkpoint.save_config(config, art.model_config(model_name))
    art.write_curve(model_name, state["history"])
    if mlf is None:
        return {"run_id": None, "model_uri": None, "tracking": "off"}
    mlf.log_metrics({"best_epoch": best["epoch"], "best_val_fg_iou": best["val_fg_iou"],
                     "train_seconds": seconds})
    mlf.log_artifact(str(art.curve(model_name)))
    example = next(iter(val_loader))[0][:1].numpy()
    model_uri = tracking.log_model(mlf, out_dir, example)
    return {"run_id": active.info.run_id, "experiment_id": active.info.experiment_id,
            "model_uri": model_uri, "tracking_uri": tracking.public_tracking_uri()}
