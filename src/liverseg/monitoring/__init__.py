"""Monitoring after deployment (DESIGN rule 12): the facts of every served case, the store
they are appended to, the reference saved with a model version and drift against it.

A service package: numpy, scipy, pandas (matplotlib for figures) only; no Dagster, MLflow or
DVC. `drift` (scipy.stats, seconds to import) loads only when one of its names is used, so
serving pays for `facts` and `store` alone. `facts` computes a row's facts, `store` appends
and reads rows, `drift` builds a model's reference and tests a window of served cases
against it.
"""

from liverseg.monitoring.facts import (
    HEADER_KEYS,
    Confidence,
    hash_uid,
    header_facts,
    intensity_facts,
    output_facts,
    served_row,
)
from liverseg.monitoring.store import STORE_ENV, ServedCaseStore, default_store

__all__ = [
    "GROUPS", "HEADER_KEYS", "STORE_ENV", "Confidence", "GroupResult", "ServedCaseStore",
    "check", "default_store", "figure", "hash_uid", "header_facts", "intensity_facts",
    "output_facts", "reference", "served_row",
]


_DRIFT = ("GROUPS", "GroupResult", "check", "figure", "reference")


def __getattr__(name: str):
    if name in _DRIFT:
        from liverseg.monitoring import drift

        return getattr(drift, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
