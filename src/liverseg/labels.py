"""The label schema: which classes a target has, and how masks and logits carry them.

`data.target` names the task: `tumour` and `liver` are binary (background + one class, one
logit channel, sigmoid), `liver_tumour` has three classes (background, liver, tumour; three
logit channels, softmax). Ingest records the classes in `data/raw/classes.json`, so every
later stage reads the label schema from the data it was given, not from a guess.

Mask PNGs store class k of C as round(k * 255 / (C - 1)): binary masks stay 0/255 (the
usual convention, visible in any viewer), three classes are 0/128/255. `decode` rounds to the
nearest stored value, so the binary decode is exactly `value > 127`, and `> 127` is also
"any foreground class" for three classes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # tensors only pass through: ingest and validate need no torch
    import torch

TARGETS: dict[str, tuple[str, ...]] = {
    "tumour": ("background", "tumour"),
    "liver": ("background", "liver"),
    "liver_tumour": ("background", "liver", "tumour"),
}
CLASSES_FILE = "classes.json"
BINARY = TARGETS["tumour"]  # what an index written before classes.json was


def stored_values(num_classes: int) -> list[int]:
    """The PNG value of each class: [0, 255] for two classes, [0, 128, 255] for three."""
    return [round(k * 255 / (num_classes - 1)) for k in range(num_classes)]


def encode(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Class indices (or a bool mask) -> the uint8 values a mask PNG stores."""
    lut = np.array(stored_values(num_classes), dtype=np.uint8)
    return lut[np.asarray(classes, dtype=np.uint8)]


def decode(stored: np.ndarray, num_classes: int) -> np.ndarray:
    """A mask PNG's uint8 values -> class indices (uint8), nearest stored value."""
    scaled = np.asarray(stored, dtype=np.float32) * (num_classes - 1) / 255
    return np.rint(scaled).astype(np.uint8)


def from_volume_labels(labels: np.ndarray, target: str) -> np.ndarray:
    """A label map in the LiTS / MSD / phantom convention (0 background, 1 liver, 2 tumour;
    other values are background) -> the target's mask: bool for the binary targets (the
    liver includes its tumours), class indices 0/1/2 for liver_tumour."""
    liver, tumour = labels == 1, labels == 2
    if target == "tumour":
        return tumour
    if target == "liver":
        return liver | tumour
    return liver.astype(np.uint8) + 2 * tumour.astype(np.uint8)


def write_classes(raw_dir: str | Path, target: str) -> None:
    (Path(raw_dir) / CLASSES_FILE).write_text(
        json.dumps({"target": target, "classes": list(TARGETS[target])}, indent=2) + "\n")


def read_classes(raw_dir: str | Path) -> tuple[str, ...]:
    """The classes ingest recorded; an older ingest without the file was binary."""
    path = Path(raw_dir) / CLASSES_FILE
    if not path.is_file():
        return BINARY
    classes = tuple(json.loads(path.read_text())["classes"])
    if classes not in TARGETS.values():
        raise ValueError(f"{path}: unknown classes {list(classes)}; expected one of "
                         f"{[list(c) for c in TARGETS.values()]}")
    return classes


def classes_of(split_stats: dict) -> tuple[str, ...]:
    """The classes `data/splits/stats.json` records (binary when written before it did)."""
    return tuple(split_stats.get("classes", BINARY))


def out_channels(num_classes: int) -> int:
    """Logit channels of the head: one (sigmoid) for binary, one per class (softmax)."""
    return 1 if num_classes == 2 else num_classes


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Sigmoid for a one-channel (binary) head, softmax over classes otherwise."""
    return logits.sigmoid() if logits.shape[1] == 1 else logits.softmax(dim=1)


def to_classes(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """[N, K, H, W] probabilities -> [N, H, W] class indices (int64): the threshold for a
    binary head, argmax for a multi-class one (no threshold: the classes sum to one)."""
    if probs.shape[1] == 1:
        return (probs[:, 0] > threshold).long()
    return probs.argmax(dim=1)
