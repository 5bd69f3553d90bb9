"""Segmentation models: Enhanced PAN, UNet-CBAM and smp baselines behind one registry."""

from liverseg.models.registry import MODEL_NAMES, SegmentationModel, build_model

__all__ = ["MODEL_NAMES", "SegmentationModel", "build_model"]
