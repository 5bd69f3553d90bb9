"""liverseg: a reproducible, auditable liver-tumour segmentation pipeline."""

__version__ = "0.1.0"
