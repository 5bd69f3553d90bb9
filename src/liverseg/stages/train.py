"""train@MODEL: the paper's recipe (AdamW + OneCycleLR + binary cross-entropy on logits).

Writes `models/<model>/model.safetensors` (the best epoch by validation foreground IoU),
`models/<model>/config.json` (the resolved config), `models/<model>/run.json` (the MLflow
run) and `reports/training/<model>.csv` (one row per epoch: losses, IoU, mIoU, pixel
accuracy for train and validation; DVC plots read it).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import segmentation_models_pytorch as smp
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from liverseg import checkpoint, tracking
from liverseg.config import Params
from liverseg.data.dataset import SliceDataset, eval_transform, train_augmentation
from liverseg.io import atomic_path, read_json, write_json
from liverseg.metrics import ConfusionMeter
from liverseg.models import build_model


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


def make_loaders(params: Params, splits_dir: Path, raw_dir: Path, stats: dict, generator):
    size, cfg = params.train.image_size, params.train
    train_tf = train_augmentation(size, params.seed) if cfg.augment else eval_transform(size)
    train = SliceDataset(splits_dir / "train.csv", raw_dir, stats["mean"], stats["std"], train_tf)
    val = SliceDataset(splits_dir / "val.csv", raw_dir, stats["mean"], stats["std"],
                       eval_transform(size))
    if len(train) < cfg.batch_size:
        raise ValueError(f"train split has {len(train)} slices, fewer than "
                         f"train.batch_size={cfg.batch_size}")
    # drop_last: a final batch of one would break batch norm after global pooling.
    common = {"num_workers": cfg.num_workers, "pin_memory": torch.cuda.is_available()}
    return (DataLoader(train, cfg.batch_size, shuffle=True, drop_last=True,
                       generator=generator, **common),
            DataLoader(val, params.evaluate.batch_size, shuffle=False, **common))


def make_loss(name: str):
    """Binary cross-entropy on logits (the paper's loss), optionally plus soft Dice."""
    bce = torch.nn.BCEWithLogitsLoss()
    if name == "bce":
        return bce
    dice = smp.losses.DiceLoss(mode="binary", from_logits=True)
    return lambda logits, target: bce(logits, target) + dice(logits, target)


def run_epoch(model, loader, loss_fn, device, optimizer=None, scheduler=None, desc=""):
    """One pass; trains when an optimizer is given. Returns mean loss + pooled metrics."""
    training = optimizer is not None
    model.train(training)
    meter, total_loss, seen = ConfusionMeter(), 0.0, 0
    with torch.set_grad_enabled(training):
        for x, y, _ in tqdm(loader, desc=desc, leave=False, mininterval=2):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            loss = loss_fn(logits, y)
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
            total_loss += loss.item() * len(x)
            seen += len(x)
            meter.update(logits, y)
    return {"loss": total_loss / max(seen, 1)} | meter.compute()


def epoch_row(epoch: int, train: dict, val: dict, lr: float) -> dict:
    keys = ("loss", "fg_iou", "miou", "pixel_accuracy")
    return ({"epoch": epoch} | {f"train_{k}": train[k] for k in keys}
            | {f"val_{k}": val[k] for k in keys} | {"lr": lr})


def run(
    params: Params,
    model_name: str,
    splits_dir: str | Path = "data/splits",
    raw_dir: str | Path = "data/raw",
    models_dir: str | Path = "models",
    history_dir: str | Path = "reports/training",
) -> dict:
    if model_name not in params.models:
        raise ValueError(f"model {model_name!r} is not listed in params.yaml `models`: "
                         f"{params.models}")
    splits_dir, raw_dir = Path(splits_dir), Path(raw_dir)
    out_dir, history_path = Path(models_dir) / model_name, Path(history_dir) / f"{model_name}.csv"
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = read_json(splits_dir / "stats.json")
    generator = seed_everything(params.seed)
    device = pick_device(params.train.device)
    train_loader, val_loader = make_loaders(params, splits_dir, raw_dir, stats, generator)

    cfg = params.train
    model = build_model(model_name, encoder=params.model.encoder,
                        encoder_weights=params.model.encoder_weights,
                        in_channels=params.model.in_channels,
                        options=params.model.options_for(model_name)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * len(train_loader))
    loss_fn = make_loss(cfg.loss)
    config = checkpoint.model_config(params, model_name, stats["mean"], stats["std"])

    mlf = tracking.mlflow()  # before the first epoch: an unreachable server fails fast
    history, best = [], {"epoch": 0, "val_fg_iou": -math.inf}
    started = time.perf_counter()
    with mlf.start_run(run_name=model_name) as active:
        mlf.set_tags({"model": model_name, "stage": f"train@{model_name}"})
        mlf.log_params(tracking.flatten(params.dump()) | {"model_name": model_name,
                       "n_parameters": sum(p.numel() for p in model.parameters())})
        for epoch in range(1, cfg.epochs + 1):
            train = run_epoch(model, train_loader, loss_fn, device, optimizer, scheduler,
                              desc=f"{model_name} epoch {epoch}/{cfg.epochs}")
            val = run_epoch(model, val_loader, loss_fn, device, desc="validate")
            row = epoch_row(epoch, train, val, scheduler.get_last_lr()[0])
            history.append(row)
            mlf.log_metrics({k: v for k, v in row.items() if k != "epoch"
                             and not math.isnan(v)}, step=epoch)
            score = -1.0 if math.isnan(val["fg_iou"]) else val["fg_iou"]
            if score > best["val_fg_iou"]:
                best = {"epoch": epoch, "val_fg_iou": score}
                checkpoint.save_weights(model, out_dir / checkpoint.WEIGHTS)
            print(f"{model_name} epoch {epoch}: train loss {train['loss']:.4f}, "
                  f"val loss {val['loss']:.4f}, val fg IoU {val['fg_iou']:.4f}", flush=True)

        seconds = time.perf_counter() - started
        config |= {"best_epoch": best["epoch"], "best_val_fg_iou": best["val_fg_iou"],
                   "train_seconds": round(seconds, 1), "device": str(device)}
        checkpoint.save_config(config, out_dir / checkpoint.CONFIG)
        with atomic_path(history_path) as tmp:
            pd.DataFrame(history).to_csv(tmp, index=False)
        mlf.log_metrics({"best_epoch": best["epoch"], "best_val_fg_iou": best["val_fg_iou"],
                         "train_seconds": seconds})
        mlf.log_artifact(str(history_path))
        example = next(iter(val_loader))[0][:1].numpy()
        model_uri = tracking.log_model(mlf, out_dir, example)
        run_info = {"run_id": active.info.run_id, "experiment_id": active.info.experiment_id,
                    "model_uri": model_uri,
                    "tracking_uri": tracking.tracking_uri()}
    write_json(out_dir / "run.json", run_info)
    return {"model": model_name, **best, "epochs": cfg.epochs, "seconds": round(seconds, 1),
            "device": str(device), "run_id": run_info["run_id"]}
