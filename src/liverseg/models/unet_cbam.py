"""U-Net with CBAM-refined decoder blocks on an smp encoder (EfficientNet-B0 by default).

Decoder block (Ronneberger et al. 2015, as in smp's Unet): nearest x2 upsample, concat skip,
two 3x3 conv-BN-ReLU, followed by CBAM (Woo et al. 2018). Channels follow smp's Unet default
(256, 128, 64, 32, 16) so the only difference to the ``unet`` baseline is CBAM. Returns logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from liverseg.models.blocks import CBAM, conv_bn_relu
from liverseg.models.enhanced_pan import build_encoder


class CBAMDecoderBlock(nn.Module):
    """Upsample to the skip size (or x2), concat, two conv-BN-ReLU, CBAM."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.convs = nn.Sequential(
            conv_bn_relu(in_channels + skip_channels, out_channels, 3),
            conv_bn_relu(out_channels, out_channels, 3),
        )
        self.cbam = CBAM(out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        if skip is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], dim=1)
        return self.cbam(self.convs(x))


class UNetCBAM(nn.Module):
    """smp encoder (depth 5, stride 32) + 5 CBAM decoder blocks + 3x3 conv head (logits)."""

    def __init__(
        self,
        in_channels: int = 1,
        classes: int = 1,
        encoder_name: str = "efficientnet-b0",
        encoder_weights: str | None = None,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
    ):
        super().__init__()
        self.encoder = build_encoder(encoder_name, in_channels, encoder_weights)
        enc = self.encoder.out_channels  # [in, 1/2, 1/4, 1/8, 1/16, 1/32]
        skips = [*reversed(enc[1:5]), 0]  # 1/16, 1/8, 1/4, 1/2, none (full resolution)
        ins = [enc[5], *decoder_channels[:-1]]
        self.blocks = nn.ModuleList(
            CBAMDecoderBlock(i, s, o) for i, s, o in zip(ins, skips, decoder_channels, strict=True)
        )
        self.head = nn.Conv2d(decoder_channels[-1], classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        skips = [*reversed(features[1:5]), None]
        out = features[5]
        for block, skip in zip(self.blocks, skips, strict=True):
            out = block(out, skip)
        return self.head(out)
