"""A report table and its cells: what every section's rows are made of.

`fmt` turns one value into the text of its cell (undefined metrics, null in JSON and NaN in
pandas, read as 'n/a'; booleans as yes/no; bootstrap intervals as [low, high]), and `Table`
is the headers and rows the templates lay out, in HTML and Markdown alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt(value, spec: str | None = ".4f") -> str:
    """One table cell: undefined metrics (null in JSON, NaN in pandas) read as 'n/a'."""
    if is_missing(value):
        return "n/a"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if spec is None or isinstance(value, str):
        return str(value)
    if spec == "ci":  # a [low, high] bootstrap interval
        return "n/a" if any(is_missing(v) for v in value) else f"[{value[0]:.4f}, {value[1]:.4f}]"
    if spec.endswith("d"):
        value = int(value)
    return format(value, spec)


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[str]]
