"""A trained model on disk: `model.safetensors` (weights, no pickle) + `config.json`.

`config.json` holds everything needed to rebuild and use the model (architecture,
options, normalisation, input size, threshold) and the full resolved params it was
trained with, so a model directory is self-describing (as nanoGPT's checkpoints are).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from liverseg.io import atomic_path, write_json
from liverseg.models import SegmentationModel, build_model

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def model_config(params, name: str, mean: float, std: float) -> dict:
    return {
        "model": name,
        "encoder": params.model.encoder,
        "in_channels": params.model.in_channels,
        "options": params.model.options_for(name),
        "image_size": params.train.image_size,
        "normalisation": {"mean": mean, "std": std, "scale": 255.0},
        "threshold": params.evaluate.threshold,
        "params": params.dump(),
    }


def build_from_config(config: dict, encoder_weights: str | None = None) -> SegmentationModel:
    return build_model(config["model"], encoder=config["encoder"], encoder_weights=encoder_weights,
                       in_channels=config["in_channels"], options=config["options"])


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
    config = json.loads((model_dir / CONFIG).read_text())
    model = build_from_config(config)
    model.load_state_dict(load_file(str(model_dir / WEIGHTS), device=device))
    return model.to(device).eval(), config
