"""Enhanced Pyramid Attention Network: PAN (FPA + GAU) plus switchable SE, ASPP, residual
refinement and softmax spatial attention, on an smp encoder (EfficientNet-B0 by default).

Data flow (encoder output stride 16, features f1..f5 at 1/2, 1/4, 1/8, 1/16, 1/16)::

    f5 -> [ASPP] -> FPA -> GAU(f4) -> GAU(f3) -> GAU(f2) [-> GAU(f1)] -> [attention]
       -> 1x1 conv -> x4 (x2) up
    each GAU level: skip -> [SE] -> GAU -> [SE] -> [residual unit]

``decoder_stride`` 4 is PAN as published (the decoder ends at 1/4 of the input). 2 adds one
more GAU level on the stride-2 features: at 128 px a stride-4 map is 32x32, so a lesion of a
few pixels is below its resolution; U-Net-style decoders, which reach full resolution, keep
such lesions. The level costs little (16 skip channels at 1/2).

With every switch off this is the plain PAN decoder of Li et al. 2018 (FPA + three GAUs), up to
the small deviations documented in ``blocks.FPA``/``blocks.GAU`` and the 1x1 head.
The model returns logits; sigmoid/softmax is applied by the loss (BCEWithLogits / Dice on
logits) and at inference time, which is numerically safer than a sigmoid inside the net.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.encoders import get_encoder
from torch import nn

from liverseg.models.blocks import (
    ASPP,
    FPA,
    GAU,
    ResidualUnit,
    SpatialSoftmaxAttention,
    SqueezeExcitation,
)


def build_encoder(
    name: str, in_channels: int, weights: str | None, output_stride: int = 32
) -> nn.Module:
    """smp encoder of depth 5; falls back to stride 32 if the encoder cannot be dilated.

    smp 0.6's ``efficientnet-b0`` supports stride 16: its ``get_stages()`` lets ``make_dilated``
    turn the stride of the last stage (blocks 9-15) into dilation 2. Encoders without
    ``get_stages`` raise NotImplementedError/ValueError; we then warn and keep stride 32, which
    only changes which resolution the ASPP/FPA see (the decoder resizes to the skip sizes).
    """
    try:
        return get_encoder(
            name, in_channels=in_channels, depth=5, weights=weights, output_stride=output_stride
        )
    except (NotImplementedError, ValueError) as err:
        if output_stride == 32:
            raise
        warnings.warn(
            f"encoder {name!r} does not support output stride {output_stride} ({err}); using 32",
            stacklevel=2,
        )
        return get_encoder(name, in_channels=in_channels, depth=5, weights=weights)


class DecoderLevel(nn.Module):
    """One PAN decoder level: optional SE on the skip, GAU fusion, optional SE and residual."""

    def __init__(self, skip_channels: int, channels: int, se: bool, residual: bool):
        super().__init__()
        self.skip_se = SqueezeExcitation(skip_channels) if se else nn.Identity()
        self.gau = GAU(skip_channels, channels)
        self.out_se = SqueezeExcitation(channels) if se else nn.Identity()
        self.refine = ResidualUnit(channels) if residual else nn.Identity()

    def forward(self, skip: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        x = self.gau(self.skip_se(skip), high)
        return self.refine(self.out_se(x))


class EnhancedPAN(nn.Module):
    """Enhanced PAN for binary/multi-class segmentation; ``forward`` returns logits.

    Args:
        in_channels: image channels (1 for CT slices).
        classes: output logit maps.
        encoder_name / encoder_weights: passed to ``smp.encoders.get_encoder``.
        decoder_channels: width of every decoder level (64 keeps a 2-core CPU step fast).
        se, aspp, attention, residual: switch the corresponding added component on/off.
        aspp_rates: atrous rates; (6, 12, 18) is DeepLabv3's choice at stride 16. At 128 px input
            the stride-16 map is 8x8, so rates >= 8 see mostly padding (they behave like 1x1).
        output_stride: encoder output stride (16: last stage dilated, as in PAN/DeepLabv3).
        decoder_stride: 4 (PAN) or 2 (one more GAU level on the stride-2 encoder features).
    """

    def __init__(
        self,
        in_channels: int = 1,
        classes: int = 1,
        encoder_name: str = "efficientnet-b0",
        encoder_weights: str | None = None,
        decoder_channels: int = 64,
        se: bool = True,
        aspp: bool = True,
        attention: bool = True,
        residual: bool = True,
        aspp_rates: Sequence[int] = (6, 12, 18),
        output_stride: int = 16,
        decoder_stride: int = 4,
    ):
        super().__init__()
        self.encoder = build_encoder(encoder_name, in_channels, encoder_weights, output_stride)
        if decoder_stride not in (2, 4):
            raise ValueError(f"decoder_stride must be 2 or 4, got {decoder_stride}")
        self.first_skip = {4: 2, 2: 1}[decoder_stride]  # features[i] is at stride 2**i
        skips = self.encoder.out_channels[self.first_skip:5]
        deepest = self.encoder.out_channels[5]
        c = decoder_channels
        self.aspp = ASPP(deepest, c, tuple(aspp_rates)) if aspp else nn.Identity()
        self.fpa = FPA(c if aspp else deepest, c)
        self.levels = nn.ModuleList(DecoderLevel(s, c, se, residual) for s in reversed(skips))
        self.attention = SpatialSoftmaxAttention(c) if attention else nn.Identity()
        self.head = nn.Conv2d(c, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        out = self.fpa(self.aspp(features[5]))
        for level, skip in zip(self.levels, reversed(features[self.first_skip:5]), strict=True):
            out = level(skip, out)
        logits = self.head(self.attention(out))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
