"""Decoding source images and masks safely, into the layout's 8-bit arrays.

Every failure is a `DecodeError` whose message names the file and why, so a bad file
becomes a quarantine entry (or a clear error) instead of a traceback without a name.

Intensity choice: 8-bit input is kept as is; colour, RGBA (alpha ignored) and palette
images become luminance; 16-bit and 32-bit grayscale are rescaled linearly from their own
range (`window`, or the image's min..max when none is given) to 0..255, never clipped to
the low 8 bits.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

# The phantom's CT window (level 50, width 400 HU): the generator windows with it, and
# `preprocess` records it for phantom-trained models. Here, below both, so neither imports up.
PHANTOM_WINDOW = (50.0 - 400.0 / 2, 50.0 + 400.0 / 2)
HIGH_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


class DecodeError(ValueError):
    """A file could not be decoded; the message names it and the reason."""


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open and fully decode, refusing decompression bombs before any pixel is read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            width, height = img.size
            if width * height > max_pixels:
                img.close()
                raise DecodeError(f"{path}: declares {width}x{height} pixels, above the limit "
                                  f"data.max_pixels={max_pixels} (decompression bomb?)")
            img.load()
            return img
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"{path}: decompression bomb refused: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated, empty, not an image
        size = path.stat().st_size if path.exists() else "missing"
        raise DecodeError(f"{path}: not a decodable image ({size} bytes): {exc}") from None


def rescale(array: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """Linear map of `window` (default: the array's own min..max) onto 0..255."""
    a = array.astype(np.float64)
    low, high = window if window is not None else (float(a.min()), float(a.max()))
    if high <= low:
        return np.zeros(a.shape, np.uint8)
    # The same operations as (clip((a - low) / (high - low), 0, 1) * 255).round(), in one
    # float buffer: a whole CT volume's float64 copy is ~1 GB, and that expression held up
    # to three at once.
    a -= low
    a /= high - low
    np.clip(a, 0, 1, out=a)
    a *= 255
    return np.rint(a, out=a).astype(np.uint8)


def decode_image(path: str | Path, max_pixels: int,
                 window: tuple[float, float] | None = None) -> tuple[np.ndarray, dict]:
    """A 2D uint8 image and facts about the source (mode, dtype, channels)."""
    path = Path(path)
    with _open(path, max_pixels) as img:
        facts = {"mode": img.mode, "channels": len(img.getbands())}
        if img.mode in HIGH_BIT_MODES:
            raw = np.asarray(img)
            facts["dtype"] = str(raw.dtype)
            return rescale(raw, window), facts
        facts["dtype"] = "uint8"
        return np.asarray(img.convert("L")), facts


def decode_mask(path: str | Path, max_pixels: int) -> np.ndarray:
    """The mask's raw values: palette indices stay indices (they are labels), colour -> L."""
    path = Path(path)
    with _open(path, max_pixels) as img:
        if img.mode in ("RGB", "RGBA", "LA", "1"):
            img = img.convert("L")
        raw = np.asarray(img)
    if raw.ndim != 2:
        raise DecodeError(f"{path}: mask must be single-channel, got shape {raw.shape}")
    return raw


def mask_classes(raw: np.ndarray, mapping: dict[int, int] | None, threshold: int,
                 max_ambiguous: float) -> tuple[np.ndarray, str | None]:
    """The mask's classes (bool foreground, or class indices through a mapping), plus a
    problem (None when the values are allowed).

    Without a mapping a mask is 0/1, or 0/255 with JPEG noise (foreground > threshold,
    few pixels far from both ends). With a mapping every value must be one of its keys;
    unknown values become background in the returned array, and the problem names them.
    """
    values = np.unique(raw)
    if mapping is not None:
        unknown = [int(v) for v in values if int(v) not in mapping]
        problem = (f"values {unknown} are not in data.folder.mask_mapping {sorted(mapping)}"
                   if unknown else None)
        classes = np.zeros(raw.shape, np.uint8)
        for value, cls in mapping.items():
            classes[raw == value] = cls
        return classes, problem
    if values.max(initial=0) <= 1:
        return raw == 1, None
    ambiguous = float(((raw > 32) & (raw < 223)).mean())
    if ambiguous > max_ambiguous:
        return raw > threshold, (f"{ambiguous:.1%} of pixels are neither near 0 nor near 255 "
                                 f"(limit {max_ambiguous:.0%}); not a binary mask")
    if values.max() <= threshold and float((raw > 0).mean()) > 0.005:
        return raw > threshold, (f"values {[int(v) for v in values[:8]]} look like labels, "
                                 "not 0/255: set data.folder.mask_mapping")
    return raw > threshold, None


def compact_values(raw: np.ndarray, limit: int = 12) -> str:
    """The distinct values of a mask as short text (for the manifest)."""
    values = [str(int(v)) for v in np.unique(raw)]
    if len(values) <= limit:
        return ",".join(values)
    return f"{len(values)} values {values[0]}..{values[-1]}"
