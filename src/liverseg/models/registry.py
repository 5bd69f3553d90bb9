"""Model registry: one name -> builder table and ``build_model``.

Every model returns logits (N, classes, H, W); apply sigmoid/softmax in the loss or at
inference. ``SegmentationModel`` pads inputs up to a size the architecture accepts and crops
the logits back, so any H, W >= 32 works.

Batch-size note: PSPNet, PAN and DeepLabV3+ (smp) apply BatchNorm after global pooling, which
raises in training mode for batch size 1. Training therefore uses ``drop_last=True`` and a batch
size >= 2 (our own blocks avoid BatchNorm on pooled maps, but the baselines do not).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.encoders import encoders as smp_encoders
from torch import nn

from liverseg.models import MODEL_NAMES
from liverseg.models.enhanced_pan import EnhancedPAN
from liverseg.models.unet_cbam import UNetCBAM

log = logging.getLogger(__name__)

# builder(encoder_name, encoder_weights, in_channels, classes, **options) -> nn.Module
Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """Registry entry: the builder, the input-size constraints and the allowed option keys."""

    builder: Builder
    min_size: int = 32
    divisor: int = 32
    options: tuple[str, ...] = ()


def _smp(cls: type[nn.Module]) -> Builder:
    def build(encoder: str, weights: str | None, in_channels: int, classes: int) -> nn.Module:
        return cls(
            encoder_name=encoder, encoder_weights=weights, in_channels=in_channels, classes=classes
        )

    return build


def _own(cls: type[nn.Module]) -> Builder:
    def build(
        encoder: str, weights: str | None, in_channels: int, classes: int, **options: object
    ) -> nn.Module:
        return cls(
            in_channels=in_channels,
            classes=classes,
            encoder_name=encoder,
            encoder_weights=weights,
            **options,
        )

    return build


ENHANCED_PAN_OPTIONS = ("se", "aspp", "attention", "residual", "aspp_rates", "decoder_channels",
                        "decoder_stride")

REGISTRY: dict[str, ModelSpec] = {
    # stride-16 encoder; our FPA handles tiny maps, so only divisibility by 16 is needed
    "enhanced_pan": ModelSpec(_own(EnhancedPAN), divisor=16, options=ENHANCED_PAN_OPTIONS),
    # smp's FPA pools the 1/16 map three times: needs >= 8x8 there, i.e. 128 px input
    "pan": ModelSpec(_smp(smp.PAN), min_size=128, divisor=16),
    "manet": ModelSpec(_smp(smp.MAnet)),
    "linknet": ModelSpec(_smp(smp.Linknet)),
    "pspnet": ModelSpec(_smp(smp.PSPNet)),
    "unet_cbam": ModelSpec(_own(UNetCBAM)),
    "unet": ModelSpec(_smp(smp.Unet)),
    "unetplusplus": ModelSpec(_smp(smp.UnetPlusPlus)),
    "deeplabv3plus": ModelSpec(_smp(smp.DeepLabV3Plus)),
}

if tuple(REGISTRY) != MODEL_NAMES:  # the torch-free list params are validated against
    raise ImportError(f"liverseg.models.MODEL_NAMES {MODEL_NAMES} != the registry's "
                      f"{tuple(REGISTRY)}: update it with the registry")


class SegmentationModel(nn.Module):
    """Wraps a registry network; pads the input, runs the net, crops the logits back.

    Padding is zero padding at the bottom/right, up to ``max(min_size, ceil(. / divisor))``.
    Zero rather than reflect: reflection would mirror anatomy (liver) into the border, and it
    cannot pad beyond the image (32 px up to 128). Inputs are normalised, so zero is the
    training mean intensity rather than air: a featureless border, not a fake organ.
    """

    def __init__(self, name: str, net: nn.Module, min_size: int = 32, divisor: int = 32):
        super().__init__()
        self.name = name
        self.net = net
        self.min_size = min_size
        self.divisor = divisor

    @property
    def encoder(self) -> nn.Module:
        return self.net.encoder

    def _target(self, size: int) -> int:
        return max(self.min_size, -(-size // self.divisor) * self.divisor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pad_h, pad_w = self._target(h) - h, self._target(w) - w
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.net(x)[..., :h, :w]


def _check_options(name: str, spec: ModelSpec, options: Mapping[str, object]) -> None:
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        allowed = ", ".join(spec.options) or "none"
        raise ValueError(f"unknown option(s) {unknown} for model {name!r}; allowed: {allowed}")


def _is_named_weights(encoder: str, weights: str) -> bool:
    """True for smp's named pretrained weights ("imagenet", "advprop", ...), else a file path."""
    settings = smp_encoders.get(encoder, {}).get("pretrained_settings", {"imagenet": None})
    return weights in settings


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, Mapping) else state
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not contain a state dict")
    return dict(state)


def _strip_prefix(key: str) -> str:
    for prefix in ("net.encoder.", "encoder."):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load a local encoder checkpoint non-strictly and report what did not match.

    Accepts bare encoder keys or keys prefixed ``encoder.`` / ``net.encoder.`` (full model
    checkpoints). Tensors whose shape differs (e.g. a 3-channel stem into a 1-channel model) are
    skipped. Raises ValueError if the file is missing or no key matched.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"encoder weights file not found: {path}")
    own = encoder.state_dict()
    loaded = {_strip_prefix(k): v for k, v in _read_state_dict(path).items()}
    matched = {k: v for k, v in loaded.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise ValueError(f"no encoder key in {path} matches the encoder ({len(loaded)} keys)")
    report = {
        "missing": sorted(set(own) - set(matched)),
        "skipped": sorted(set(loaded) - set(matched)),
    }
    own.update(matched)
    encoder.load_state_dict(own)
    if report["missing"] or report["skipped"]:
        log.warning(
            "encoder weights %s: %d loaded, %d missing, %d skipped",
            path,
            len(matched),
            len(report["missing"]),
            len(report["skipped"]),
        )
    return report


def build_model(
    name: str,
    *,
    encoder: str = "efficientnet-b0",
    encoder_weights: str | None = None,
    in_channels: int = 1,
    classes: int = 1,
    options: dict | None = None,
) -> SegmentationModel:
    """Build a registered model wrapped in ``SegmentationModel``.

    ``encoder_weights``: None = random init; an smp weight name such as "imagenet" is passed to
    smp (downloads); any other string is a local file (.safetensors, else ``torch.load`` with
    ``weights_only=True``) loaded into the encoder, see ``load_encoder_weights``.
    ``options``: model-specific constructor switches; only ``enhanced_pan`` has any.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    spec = REGISTRY[name]
    options = dict(options or {})
    _check_options(name, spec, options)
    local = encoder_weights is not None and not _is_named_weights(encoder, encoder_weights)
    if local and not Path(encoder_weights).is_file():  # fail before building the network
        raise ValueError(f"encoder weights file not found: {encoder_weights}")
    smp_weights = None if local else encoder_weights
    net = spec.builder(encoder, smp_weights, in_channels, classes, **options)
    if local:
        load_encoder_weights(net.encoder, encoder_weights)
    return SegmentationModel(name, net, spec.min_size, spec.divisor)
