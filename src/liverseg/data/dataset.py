"""The torch dataset over a split CSV: decoded slice, the serving resize, augmentation,
normalisation.

The resize to the trained size is `liverseg.served.resize_image`, the one evaluate,
predict, the pyfunc and the ONNX graph apply; albumentations only augments, on [0, 1]
floats after it.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no update check over the network

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from liverseg import casestore, labels  # noqa: E402
from liverseg.served import resize_image  # noqa: E402


def train_augmentation(seed: int) -> A.Compose:
    """Light, anatomy-preserving augmentation (albumentations 2.x argument names), applied
    to the resized slice (float32 in [0, 1]) and its mask.

    Seeded: albumentations keeps its own random state, which torch's seed does not reach.
    """
    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-10, 10),
                 border_mode=0, fill=0, fill_mask=0, p=0.7),
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
    ], seed=seed)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Class indices resized by nearest neighbour (no new classes at the edges)."""
    x = torch.from_numpy(np.ascontiguousarray(mask))[None, None].float()
    return torch.nn.functional.interpolate(x, (size, size), mode="nearest")[0, 0].to(
        torch.uint8).numpy()


class SliceDataset(Dataset):
    """Yields (image [C,S,S] float32 normalised, mask [1,S,S] float32 class indices (0/1 for
    a binary target), slice_id) at the trained size S; C = 1, or 2k + 1 with 2.5D context.

    Reads each slice from its case file (`liverseg.casestore`: one compressed chunk per
    slice, no decoded copy). `rows` are the CSV's rows as dicts of strings (the csv module:
    the training path needs no pandas); `sampled_only` keeps the rows training samples
    (training's own validation), where evaluate takes every slice of each case.
    """

    def __init__(self, split_csv: str | Path, raw_dir: str | Path, image_size: int,
                 mean: float, std: float, augment: A.Compose | None = None,
                 num_classes: int = 2, sampled_only: bool = False):
        with open(split_csv, newline="") as fh:
            self.rows = [row for row in csv.DictReader(fh)
                         if not sampled_only or row.get("sampled", "True") == "True"]
        self.raw_dir, self.image_size, self.augment = Path(raw_dir), image_size, augment
        self.mean, self.std = mean, std
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.rows)

    def stored(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Slice `i` as stored: (uint8 grey, uint8 class indices), at its own size."""
        row = self.rows[i]
        return (casestore.read_input(self.raw_dir, row),
                labels.decode(casestore.read(self.raw_dir, row["mask"], "mask"),
                              self.num_classes))

    def __getitem__(self, i: int):
        row = self.rows[i]
        image, mask = self.stored(i)
        # [C, S, S]: one channel, or the 2k + 1 slices of a 2.5D context stack
        image = resize_image(image, self.image_size).reshape(-1, self.image_size,
                                                             self.image_size) / np.float32(255.0)
        mask = resize_mask(mask, self.image_size)
        if self.augment is not None:  # albumentations: [H, W] or channels-last
            hwc = image[0] if len(image) == 1 else np.ascontiguousarray(image.transpose(1, 2, 0))
            out = self.augment(image=hwc, mask=mask)
            image, mask = out["image"].reshape(*mask.shape, -1).transpose(2, 0, 1), out["mask"]
        x = np.ascontiguousarray((image - self.mean) / self.std, dtype=np.float32)
        return (torch.from_numpy(x), torch.from_numpy(mask.astype(np.float32))[None],
                row["slice_id"])
