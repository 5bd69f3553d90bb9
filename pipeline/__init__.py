"""Dagster code location for liverseg, derived from dvc.yaml (never a second graph)."""
