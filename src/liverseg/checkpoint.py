"""A trained model on disk: `model.safetensors` (weights, no pickle) + `config.json`.

`config.json` holds everything needed to rebuild and use the model (architecture,
options, normalisation, input size, threshold) and the full resolved params it was
trained with, so a model directory is self-describing (as nanoGPT's checkpoints are).

Training state (`TrainingCheckpoint`) is a separate, temporary thing: one file per
training run under `.checkpoints/<model>/`, outside every DVC output (DVC deletes outputs
before it runs a stage), replaced atomically after every epoch and deleted once the model
is written. Nothing here unpickles arbitrary objects: weights are safetensors, training
state is read with `torch.load(weights_only=True)` (tensors, numbers, strings, containers).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from liverseg.artifacts import CONFIG, SPLIT_STATS, WEIGHTS
from liverseg.io import atomic_path, sha256_file, write_json
from liverseg.labels import out_channels
from liverseg.models import SegmentationModel, build_model
from liverseg.preprocess import Preprocessing

STATE_FORMAT = 1  # bump when the layout of the training state changes


class UnsafeCheckpointError(ValueError):
    """A weights or state file is not what we write (possibly a pickle that would run code)."""


def encoder_init(weights: str | None) -> dict:
    """Where the encoder started, for lineage: scratch, named (downloaded) weights, or a
    local file with its sha256 (the file is no DVC dependency, so the hash is the record)."""
    if weights is None:
        return {"weights": None}
    path = Path(weights)
    if not path.is_file():
        return {"weights": weights}  # a named set such as imagenet (build_model checks)
    return {"weights": str(path.resolve()), "sha256": sha256_file(path)}


def model_config(params, name: str, mean: float, std: float,
                 classes: tuple[str, ...] | None = None) -> dict:
    """`classes`: the data's, as the split recorded them (default: the configured target's).
    `preprocessing` is the serving contract (liverseg.preprocess); the other keys rebuild
    the network."""
    prep = Preprocessing.from_params(params, mean, std, classes)
    return {
        "model": name,
        "encoder": params.model.encoder,
        "in_channels": params.model.in_channels,
        "num_classes": params.model.num_classes,
        "options": params.model.options_for(name),
        "encoder_init": encoder_init(params.model.encoder_weights_for(name)),
        # Size, normalisation, threshold and classes: here only, the serving contract.
        "preprocessing": prep.to_dict(),
        "params": params.dump(),
    }


def read_config(model_dir: str | Path) -> dict:
    """A model's config.json. One written before the `preprocessing` block (size,
    normalisation, threshold and classes at the top level) gets the block derived from what
    it recorded, so every reader finds each preprocessing fact in one place."""
    config = json.loads((Path(model_dir) / CONFIG).read_text())
    if "preprocessing" not in config:
        block = Preprocessing.from_config(config).to_dict()
        config["preprocessing"] = json.loads(json.dumps(block))  # as written: lists
    return config


def build_from_config(config: dict, encoder_weights: str | None = None) -> SegmentationModel:
    return build_model(config["model"], encoder=config["encoder"], encoder_weights=encoder_weights,
                       in_channels=config["in_channels"],
                       classes=out_channels(config.get("num_classes", 2)),  # older: binary
                       options=config["options"])


def save_weights(model: torch.nn.Module, path: str | Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def save_config(config: dict, path: str | Path) -> None:
    write_json(path, config)


def load_model(model_dir: str | Path, device: str = "cpu") -> tuple[SegmentationModel, dict]:
    """Rebuild a model from its directory; weights are read with safetensors only."""
    model_dir = Path(model_dir)
    for name in (WEIGHTS, CONFIG):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name}: missing; run `liverseg train` first")
    config = read_config(model_dir)
    model = build_from_config(config)
    model.load_state_dict(load_weights(model_dir / WEIGHTS, device))
    return model.to(device).eval(), config


def load_weights(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors state dict; anything else (a pickle, a truncated file) is refused."""
    try:
        return load_file(str(path), device=device)
    except SafetensorError as exc:
        raise UnsafeCheckpointError(f"{path}: not a valid safetensors file ({exc}); refusing "
                                    f"to load it (weights are only read as safetensors)") from None


def run_key(params, model_name: str, splits_dir: str | Path, raw_dir: str | Path,
            world_size: int = 1) -> str:
    """Identity of a training run: resolved params, model and the data it trains on.

    A checkpoint is resumed only under the same key, so a changed config or split never
    continues a stale run. Data is identified by the split files, their normalisation
    stats and the raw index (cheap; pixel changes show in the stats).
    """
    files = [Path(splits_dir) / n for n in ("train.csv", "val.csv", SPLIT_STATS)]
    files.append(Path(raw_dir) / "slices.csv")
    # world size: the LR schedule's length and the shards depend on the process count
    identity = {"format": STATE_FORMAT, "model": model_name, "params": params.dump(),
                **({"world_size": world_size} if world_size > 1 else {}),
                "data": {f.name: sha256_file(f) if f.is_file() else None for f in files}}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a state dict (a snapshot that later steps do not change)."""
    # contiguous: channels_last weights (the GPU path) are strided; safetensors refuses those
    return {k: v.detach().to("cpu", copy=True).contiguous()
            for k, v in module.state_dict().items()}


class TrainingCheckpoint:
    """The resumable state of one training run: `<root>/<model>/<key>.pt`, written atomically."""

    def __init__(self, root: str | Path, model_name: str, key: str):
        self.dir = Path(root) / model_name
        self.key = key
        self.path = self.dir / f"{key[:20]}.pt"

    def load(self) -> dict | None:
        """The saved state of this run, or None; stale runs and half-written files go first."""
        self._remove_stale()
        if not self.path.is_file():
            return None
        state = load_state(self.path)
        if state.get("format") != STATE_FORMAT or state.get("key") != self.key:
            raise UnsafeCheckpointError(f"{self.path}: belongs to another run or format; "
                                        f"delete {self.dir} to start training afresh")
        return state

    def save(self, state: dict) -> None:
        # fsync: the checkpoint is what survives a crash, so it must survive a power cut too.
        with atomic_path(self.path, fsync=True) as tmp:
            torch.save(state | {"format": STATE_FORMAT, "key": self.key}, tmp)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _remove_stale(self) -> None:
        """Checkpoints of other configs and temporaries left by a kill mid-write."""
        for path in self.dir.glob("*") if self.dir.is_dir() else []:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path != self.path:
                path.unlink(missing_ok=True)


def load_state(path: str | Path) -> dict:
    """Training state with `weights_only=True`: a pickle that would run code is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path}: refused, not a weights-only checkpoint (it may run code when unpickled):"
            f" {str(exc).splitlines()[0]}; delete it to start training afresh") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise UnsafeCheckpointError(f"{path}: unreadable checkpoint ({exc}); delete it to "
                                    f"start training afresh") from None
    if not isinstance(state, dict):
        raise UnsafeCheckpointError(f"{path}: not a liverseg training checkpoint")
    return state
