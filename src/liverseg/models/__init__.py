"""Segmentation models: Enhanced PAN, UNet-CBAM and smp baselines behind one registry.

The names are known without torch (`MODEL_NAMES`: every stage's params validation checks
them); `build_model` and `SegmentationModel` (in `registry`) import torch and smp when first
used, so a data stage or `liverseg report` starts without them.
"""

MODEL_NAMES = ("enhanced_pan", "pan", "manet", "linknet", "pspnet", "unet_cbam", "unet",
               "unetplusplus", "deeplabv3plus")  # registry.REGISTRY's keys, in its order

__all__ = ["MODEL_NAMES", "SegmentationModel", "build_model"]


def __getattr__(name: str):
    if name in ("SegmentationModel", "build_model"):
        from liverseg.models import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'liverseg.models' has no attribute {name!r}")
