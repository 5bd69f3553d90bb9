"""What the serving boundary refuses before any work (DESIGN rule 9).

- `safe_name`: serving's sanitiser for every name made from input data (UIDs, patient ids,
  descriptions, file and folder names) before it touches a path. (Ingest's slice ids come
  from the older `data.layout.safe_stem`, same rule, another hash; merging them would
  rename every slice in data/raw.)
- `Limits`: sizes read from headers (NIfTI header, DICOM Rows/Columns, the REST array's
  shape) and refused before a pixel is decoded; each limit has a default that fits a
  24 GiB machine and an environment variable that changes it (`LIVERSEG_MAX_VOXELS`, ...).
- `check_hu`: voxels that cannot be CT in Hounsfield units (NaN/inf, values within 0..1,
  an almost constant volume, no value below 0) are refused by name, never made a mask.
- `check_grey_batch`: the pyfunc's (REST) input contract.

Every refusal is a `Refused` error whose message names the input and the rule.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, fields

import numpy as np

NAME_LENGTH = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class Refused(ValueError):
    """An input the boundary will not serve; the message names the input and the rule."""


# ----------------------------------------------------------------------------- names


def safe_name(text: object, max_length: int = NAME_LENGTH) -> str:
    """`text` as one safe path component: letters, digits, `.`, `_`, `-` only, no leading
    dot (so never `.` or `..`), at most `max_length` characters. A name that had to change
    keeps a short hash of the original, so two different inputs never meet in one name."""
    raw = str(text)
    edges = "._-"  # no leading dot (hidden, `.`, `..`), no trailing dot (Windows)
    clean = _UNSAFE.sub("_", raw).strip(edges)[:max_length].strip(edges) or "unnamed"
    if clean == raw:
        return clean
    digest = hashlib.sha256(raw.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{clean[: max_length - 9]}-{digest}"


# ----------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class Limits:
    """Largest input served. A 512x512x1500 CT volume is 393 M voxels: ~0.8 GB as int16,
    ~1.6 GB as float32, which with its windowed copy and mask fits 24 GiB with room."""

    max_voxels: int = 400_000_000  # a volume's voxels (NIfTI, DICOM series)
    max_slices: int = 4096  # a volume's slices, a DICOM series' files
    max_side: int = 4096  # rows or columns of a slice
    max_bytes: int = 4 << 30  # a volume's decompressed pixel data
    max_batch: int = 64  # REST: images per request
    min_side_rest: int = 16  # REST: H and W of each image ...
    max_side_rest: int = 2048  # ... within these bounds

    @classmethod
    def from_env(cls, environ=os.environ) -> Limits:
        """Defaults, each changed by `LIVERSEG_<NAME>` (e.g. LIVERSEG_MAX_VOXELS=8e8)."""
        values = {}
        for f in fields(cls):
            raw = environ.get(f"LIVERSEG_{f.name.upper()}")
            if raw is not None:
                try:
                    values[f.name] = int(float(raw))
                except ValueError:
                    raise Refused(f"LIVERSEG_{f.name.upper()}={raw!r}: not a number") from None
        return cls(**values)

    @staticmethod
    def env_name(limit: str) -> str:
        return f"LIVERSEG_{limit.upper()}"

    def check_volume(self, what: str, shape: tuple[int, ...], itemsize: int) -> None:
        """Refuse a volume by its declared shape (slices last) before reading it."""
        if len(shape) < 2:
            raise Refused(f"{what}: declares shape {tuple(shape)}; expected 2D or 3D")
        rows, cols, slices = shape[0], shape[1], int(np.prod(shape[2:], dtype=np.int64))
        voxels = rows * cols * slices
        self._check(what, "max_side", max(rows, cols), f"{rows}x{cols} per slice")
        self._check(what, "max_slices", slices, f"{slices} slices")
        self._check(what, "max_voxels", voxels, f"{voxels:,} voxels")
        self._check(what, "max_bytes", voxels * itemsize,
                    f"{voxels * itemsize / 2**30:.1f} GiB of pixel data")

    def _check(self, what: str, limit: str, value: int, described: str) -> None:
        bound = getattr(self, limit)
        if value > bound:
            raise Refused(f"{what}: declares {described}, above the limit {limit}={bound:,} "
                          f"(rule: sizes bounded from the header; raise it with "
                          f"{self.env_name(limit)})")


# ----------------------------------------------------------------------------- intensities


def nonfinite(values: np.ndarray) -> int:
    """How many voxels are NaN or +-inf (0 for integer data, which cannot be)."""
    if not np.issubdtype(values.dtype, np.floating):
        return 0
    return int(values.size - np.count_nonzero(np.isfinite(values)))


def check_hu(what: str, hu: np.ndarray) -> None:
    """Refuse voxels that cannot be CT in Hounsfield units (finite values assumed).

    Real CT spans air (-1000) to bone (+1000 and more), with padding down to -3024; a
    volume within 0..1 (normalised), almost constant, or without a value below 0 (stored
    values whose RescaleIntercept was not applied, windowed grey values) is not HU."""
    low, high = float(hu.min()), float(hu.max())
    found = f"values {low:g}..{high:g}"
    if high - low < 50:
        raise Refused(f"{what}: {found} span under 50 HU: not CT in Hounsfield units "
                      "(normalised or constant?) (rule: CT in HU; --no-hu-check overrides)")
    if low >= 0:
        raise Refused(f"{what}: {found}, none below 0 HU (air is -1000, fat about -100): not "
                      "Hounsfield units (intercept not applied, or grey values?) "
                      "(rule: CT in HU; --no-hu-check overrides)")
    if low < -32768 or high > 32767:
        raise Refused(f"{what}: {found} outside the range CT stores (-32768..32767) "
                      "(rule: CT in HU; --no-hu-check overrides)")


def check_grey_batch(x: np.ndarray, in_channels: int, limits: Limits) -> None:
    """The REST contract: float grey values 0..255, [N, C, H, W] with the model's C, H and
    W within bounds, N at most `max_batch`; anything else is refused with the rule."""
    if x.ndim != 4:
        raise Refused(f"input of shape {x.shape}: expected [N, C, H, W] grey values 0..255")
    n, c, h, w = x.shape
    if not 1 <= n <= limits.max_batch:
        raise Refused(f"batch of {n} image(s): 1..{limits.max_batch} per request (max_batch)")
    if c != in_channels:
        raise Refused(f"{c} channel(s): the model takes {in_channels} per image")
    lo, hi = limits.min_side_rest, limits.max_side_rest
    if not (lo <= h <= hi and lo <= w <= hi):
        raise Refused(f"image of {h}x{w}: height and width must be {lo}..{hi} pixels")
    bad = nonfinite(x)
    if bad:
        raise Refused(f"{bad} NaN or infinite value(s): grey values must be finite 0..255")
    low, high = float(x.min()), float(x.max())
    if low < 0 or high > 255:
        raise Refused(f"values {low:g}..{high:g} outside 0..255: send grey values windowed as "
                      "liverseg.preprocess makes them (raw HU are not accepted)")
