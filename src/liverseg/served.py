"""The network half of the one preprocessing (`liverseg.preprocess` has the grey slices):
the resize to the trained size and back, the normalisation, and `Served`, the module every
path that runs a model goes through. Apart from `preprocess` because it needs torch, which
ingest, validate and split do not load (a second or so and 260 MB a process).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from liverseg import labels
from liverseg.preprocess import Preprocessing


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[N, C, H, W] float -> [N, C, *size]: the one resize, for images and probabilities."""
    return F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=False)


def resize_image(gray: np.ndarray, size: int) -> np.ndarray:
    """A uint8 slice [H, W] or context stack [C, H, W] -> float32 grey values at
    [size, size] (or [C, size, size]): the training loader's resize."""
    x = torch.from_numpy(np.asarray(gray, np.float32))
    stack = x.reshape(-1, 1, *x.shape[-2:])  # channels as a batch: resized independently
    return resize(stack, (size, size)).reshape(*x.shape[:-2], size, size).numpy()


def normalise(x, prep: Preprocessing):
    return (x / prep.scale - prep.mean) / prep.std


class Served(torch.nn.Module):
    """Grey values 0..255 [N, C, H, W] (any H, W) in, probabilities [N, K, H, W] out: the
    contract of predict, the pyfunc and the ONNX graph (K = 1 for a binary model).

    `mirror` (test-time mirroring, nnU-Net's): the probabilities are the mean over the input
    and its flips along W, H and both, each flipped back; evaluate decides it on validation
    (`liverseg.postprocess`). The ONNX export is the network without it."""

    FLIPS = ((), (-1,), (-2,), (-2, -1))  # identity first: `mirrored` returns it apart

    def __init__(self, model: torch.nn.Module, prep: Preprocessing, mirror: bool = False):
        super().__init__()
        self.model, self.prep, self.mirror = model, prep, mirror

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        if self.mirror:
            return self.mirrored(raw)[1]
        size = self.prep.image_size
        x = normalise(resize(raw, (size, size)), self.prep)
        return resize(labels.probabilities(self.model(x)), raw.shape[-2:])

    def mirrored(self, raw: torch.Tensor, clock: list | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(plain probabilities, their mean over the flips): both from one set of passes,
        so evaluate scores with and without mirroring at the cost of mirroring alone.
        `clock` gets (seconds to the plain answer, seconds to both): the cost of each."""
        start = time.perf_counter()
        size = self.prep.image_size
        x = normalise(resize(raw, (size, size)), self.prep)
        each = [labels.probabilities(self.model(x))]
        plain = resize(each[0], raw.shape[-2:])
        plain_seconds = time.perf_counter() - start
        each += [labels.probabilities(self.model(x.flip(d))).flip(d) for d in self.FLIPS[1:]]
        mean = resize(torch.stack(each).mean(0), raw.shape[-2:])
        if clock is not None:
            clock.append((plain_seconds, time.perf_counter() - start))
        return plain, mean

    def grey_batch(self, slices: np.ndarray) -> torch.Tensor:
        """uint8 grey slices [N, H, W] (or context stacks [N, C, H, W]) -> float input
        [N, C, H, W]; the channels must be the model's."""
        x = torch.from_numpy(np.asarray(slices, np.float32))
        x = x[:, None] if x.ndim == 3 else x
        if x.shape[1] != self.prep.in_channels:
            k = self.prep.context_slices
            raise ValueError(f"the model takes {self.prep.in_channels} channel(s) per slice "
                             f"(context_slices={k}: slices z-{k}..z+{k} of a volume), got "
                             f"{x.shape[1]}")
        return x

    @torch.no_grad()
    def answer(self, slices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 grey slices [N, H, W] or stacks [N, C, H, W] -> (probabilities
        [N, K, H, W], class indices [N, H, W]) at the slices' own size."""
        probs = self(self.grey_batch(slices))
        return probs, labels.to_classes(probs, self.prep.threshold)

    def classes_of(self, slices: np.ndarray) -> torch.Tensor:
        """uint8 grey slices [N, H, W] or stacks [N, C, H, W] -> [N, H, W] class indices."""
        return self.answer(slices)[1]
