"""The torch dataset over a split CSV: decoded slice, albumentations, normalisation."""

from __future__ import annotations

import csv
import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no update check over the network

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from liverseg import labels  # noqa: E402
from liverseg.data import slice_cache  # noqa: E402
from liverseg.io import load_gray  # noqa: E402


def train_augmentation(image_size: int, seed: int) -> A.Compose:
    """Light, anatomy-preserving augmentation (albumentations 2.x argument names).

    Seeded: albumentations keeps its own random state, which torch's seed does not reach.
    """
    return A.Compose([
        A.Resize(image_size, image_size),
        A.HorizontalFlip(p=0.5),
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-10, 10),
                 border_mode=0, fill=0, fill_mask=0, p=0.7),
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
    ], seed=seed)


def eval_transform(image_size: int) -> A.Compose:
    return A.Compose([A.Resize(image_size, image_size)])


class SliceDataset(Dataset):
    """Yields (image [1,H,W] float32 normalised, mask [1,H,W] float32 class indices (0/1 for
    a binary target), slice_id).

    Reads the split's decoded-slice cache when the split stage wrote one (see
    `slice_cache`), else decodes the PNGs; `use_cache=False` forces decoding. `rows` are
    the CSV's rows as dicts of strings (the csv module: the training path needs no pandas).
    """

    def __init__(self, split_csv: str | Path, raw_dir: str | Path, mean: float, std: float,
                 transform: A.Compose | None = None, use_cache: bool = True,
                 num_classes: int = 2):
        with open(split_csv, newline="") as fh:
            self.rows = list(csv.DictReader(fh))
        self.raw_dir, self.mean, self.std, self.transform = Path(raw_dir), mean, std, transform
        self.num_classes = num_classes
        self.cache = slice_cache.open_cache(split_csv, len(self.rows)) if use_cache else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        if self.cache is not None:
            image, mask = np.array(self.cache[0][i]), np.array(self.cache[1][i])
        else:
            image = load_gray(self.raw_dir / row["image"])
            mask = labels.decode(load_gray(self.raw_dir / row["mask"]), self.num_classes)
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        x = (image.astype(np.float32) / 255.0 - self.mean) / self.std
        return (torch.from_numpy(x)[None], torch.from_numpy(mask.astype(np.float32))[None],
                row["slice_id"])
