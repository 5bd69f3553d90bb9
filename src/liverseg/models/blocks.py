"""Small attention / context building blocks used by the Enhanced PAN and UNet-CBAM models.

Normalisation policy: every branch that works on a globally pooled (1x1) map uses a biased
convolution and *no* BatchNorm, and so do FPA's single-channel pyramid convs (their maps shrink
to 1x1), so these blocks also train with batch size 1. Other convs keep BatchNorm. The smp
baselines (PSPNet, PAN, DeepLabV3+) and the encoder's deepest stage at tiny inputs do hit
BatchNorm on 1x1 maps; training therefore always uses ``drop_last=True`` and batch size >= 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    dilation: int = 1,
    relu: bool = True,
    norm: bool = True,
) -> nn.Sequential:
    """``Conv2d -> BatchNorm2d -> ReLU`` with 'same' padding; ``norm=False``: biased conv, no BN."""
    padding = dilation * (kernel_size // 2)
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=not norm
    )
    layers: list[nn.Module] = [conv, nn.BatchNorm2d(out_channels)] if norm else [conv]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _hidden(channels: int, reduction: int, min_hidden: int) -> int:
    return max(channels // reduction, min_hidden)


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class SqueezeExcitation(nn.Module):
    """Squeeze-and-Excitation channel recalibration (Hu et al., CVPR 2018, Fig. 2).

    ``s = sigmoid(W2 relu(W1 gap(x)))``, ``y = s * x``. The bottleneck is ``C // reduction``
    (reduction 16 as in the paper) floored at ``min_hidden`` (8), because the thin skip features
    of EfficientNet-B0 (24/40 channels) would otherwise get a 1- or 2-unit bottleneck.
    The FC layers are 1x1 convolutions with bias and no normalisation (as in the paper).
    """

    def __init__(self, channels: int, reduction: int = 16, min_hidden: int = 8):
        super().__init__()
        hidden = _hidden(channels, reduction, min_hidden)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al., ECCV 2018), channel then spatial.

    Channel: ``Mc = sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))`` with one shared MLP
    (reduction 16, floored at ``min_hidden``). Spatial: ``Ms = sigmoid(conv7x7([mean_c; max_c]))``.
    Choice: the 7x7 conv has a bias and no BatchNorm (the paper's equations have none; the
    authors' code adds BN, which we skip to keep the block batch-size independent).
    """

    def __init__(
        self, channels: int, reduction: int = 16, min_hidden: int = 8, spatial_kernel: int = 7
    ):
        super().__init__()
        hidden = _hidden(channels, reduction, min_hidden)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
        )
        self.spatial = nn.Conv2d(2, 1, spatial_kernel, padding=spatial_kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(F.adaptive_avg_pool2d(x, 1))
        mx = self.mlp(F.adaptive_max_pool2d(x, 1))
        x = x * torch.sigmoid(avg + mx)
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling (Chen et al. 2017, DeepLabv3, Sec. 3.3).

    Branches: 1x1 conv, one 3x3 atrous conv per rate, image pooling (GAP -> 1x1 conv ->
    upsample); concatenated and projected by a 1x1 conv. Rates (6, 12, 18) are the paper's
    values for output stride 16. Choices: the image-pooling branch has a biased 1x1 conv and
    *no* norm (BatchNorm over a 1x1 map fails in training at batch 1); DeepLabv3's dropout after
    the projection is omitted (the training sets are small and run few epochs).
    """

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int] = (6, 12, 18)):
        super().__init__()
        branches = [conv_bn_relu(in_channels, out_channels, 1)]
        branches += [conv_bn_relu(in_channels, out_channels, 3, dilation=r) for r in rates]
        self.branches = nn.ModuleList(branches)
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1),
            nn.ReLU(inplace=True),
        )
        self.project = conv_bn_relu(out_channels * (len(branches) + 1), out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class FPA(nn.Module):
    """Feature Pyramid Attention (Li et al., BMVC 2018, "Pyramid Attention Network", Fig. 2).

    A U-shaped pyramid (7x7, 5x5, 3x3 convs at 1/2, 1/4, 1/8 of the input map) yields an
    attention map that multiplies the 1x1-conv features pixel-wise; a global-pooling branch is
    added. Choices: like smp's PAN (our plain-PAN baseline) the pyramid is single-channel; max
    pooling uses ``ceil_mode`` and upsampling targets the actual tensor sizes, so maps as small as
    1x1 work (smp's version needs >= 8x8, i.e. 128 px input). The global branch and the
    single-channel pyramid convs have no BatchNorm: their maps shrink to 1x1 (BN fails at batch 1
    in training) and a one-channel BN would just re-standardise the attention map per batch.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.mid = conv_bn_relu(in_channels, out_channels, 1)
        self.glob = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1), nn.ReLU(inplace=True)
        )
        self.down1 = conv_bn_relu(in_channels, 1, 7, norm=False)
        self.down2 = conv_bn_relu(1, 1, 5, norm=False)
        self.down3 = nn.Sequential(
            conv_bn_relu(1, 1, 3, norm=False), conv_bn_relu(1, 1, 3, norm=False)
        )
        self.lat2 = conv_bn_relu(1, 1, 5, norm=False)
        self.lat1 = conv_bn_relu(1, 1, 7, norm=False)

    @staticmethod
    def _pool(x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, 2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d1 = self.down1(self._pool(x))
        d2 = self.down2(self._pool(d1))
        d3 = self.down3(self._pool(d2))
        up = self.lat2(d2) + _resize(d3, d2.shape[-2:])
        up = self.lat1(d1) + _resize(up, d1.shape[-2:])
        attention = _resize(up, x.shape[-2:])
        return self.mid(x) * attention + self.glob(x)


class GAU(nn.Module):
    """Global Attention Upsample (Li et al., BMVC 2018, Fig. 3).

    The high-level map is globally pooled into a channel-attention vector that weights the
    3x3-conv low-level features; the upsampled high-level map is added. Choice: the gate is a
    biased 1x1 conv + sigmoid (as in smp's PAN; the paper writes BN+ReLU) without BatchNorm,
    so it is batch-size independent. ``high`` must have ``out_channels`` channels.
    """

    def __init__(self, low_channels: int, out_channels: int):
        super().__init__()
        self.low = conv_bn_relu(low_channels, out_channels, 3)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(out_channels, out_channels, 1), nn.Sigmoid()
        )

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return self.low(low) * self.gate(high) + _resize(high, low.shape[-2:])


class ResidualUnit(nn.Module):
    """Post-fusion refinement ``relu(x + BN(conv3x3(relu(BN(conv3x3(x))))))`` (He et al. 2016)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(channels, channels, 3), conv_bn_relu(channels, channels, 3, relu=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class SpatialSoftmaxAttention(nn.Module):
    """Spatial attention of the paper's Algorithm 1: ``A = softmax(W_att * F')``, ``F'' = A . F'``.

    ``W_att`` is a 1x1 conv to one logit map; the softmax runs over all H*W positions. Choice:
    the result is multiplied by H*W. A softmax over H*W positions has mean 1/(H*W) (1/1024 at a
    32x32 map), so the literal ``A . F'`` shrinks the features -- and the gradient to everything
    below -- by about three orders of magnitude, depending on resolution. Scaled by H*W, the
    weights have mean exactly 1 at any resolution. ``W_att`` is zero-initialised, so the block
    starts as the identity and learns where to focus.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.logits = nn.Conv2d(channels, 1, 1)
        nn.init.zeros_(self.logits.weight)
        nn.init.zeros_(self.logits.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        attention = torch.softmax(self.logits(x).view(n, 1, h * w), dim=-1).view(n, 1, h, w)
        return x * (attention * (h * w))
