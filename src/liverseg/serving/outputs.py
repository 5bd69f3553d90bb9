"""What predict writes for each input beside its mask: predictions.csv (`Outcomes`), the
overlay PNG of the slice with the largest predicted foreground, and each class's size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from liverseg import labels
from liverseg.io import atomic_path

CLASS_RGB = {"tumour": (255, 40, 40), "liver": (40, 200, 90)}
SUMMARY = "predictions.csv"


class Outcomes:
    """predictions.csv, rewritten atomically after every input (a killed batch leaves the
    rows of the inputs it finished), each row with the model's identity."""

    def __init__(self, out_dir: Path, identity: dict):
        self.path, self.identity, self.rows = out_dir / SUMMARY, identity, []

    def add(self, row: dict) -> None:
        self.rows.append(row | self.identity)
        with atomic_path(self.path) as tmp:
            pd.DataFrame(self.rows).to_csv(tmp, index=False)

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)


def overlay(gray: np.ndarray, mask: np.ndarray, classes: tuple[str, ...] = labels.BINARY
            ) -> np.ndarray:
    """RGB uint8: the slice in gray, each predicted class tinted (tumour red, liver green)."""
    rgb = np.repeat(gray.astype(np.float32)[..., None], 3, axis=2)
    for k, name in enumerate(classes[1:], start=1):
        sel = mask == k
        rgb[sel] = 0.5 * rgb[sel] + 0.5 * np.array(CLASS_RGB[name], np.float32)
    return rgb.clip(0, 255).astype(np.uint8)


def class_sizes(mask: np.ndarray, classes: tuple[str, ...],
                voxel_mm3: float | None = None) -> dict:
    """`<class>_pixels` per foreground class, and `<class>_volume_ml` for a volume."""
    out = {}
    for k, name in enumerate(classes[1:], start=1):
        n = int((mask == k).sum())
        out[f"{name}_pixels"] = n
        out[f"{name}_volume_ml"] = None if voxel_mm3 is None else n * voxel_mm3 / 1000.0
    return out


def save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def overlay_row(classes: tuple[str, ...], slices: np.ndarray, masks: np.ndarray, out: Path
                ) -> dict:
    """The overlay of the slice with the largest predicted foreground."""
    areas = (masks > 0).sum(axis=(1, 2))
    best = int(areas.argmax()) if areas.any() else len(slices) // 2
    save_png(out.with_name(f"{out.name}_overlay.png"),
             overlay(slices[best], masks[best], classes))
    return {"overlay": f"{out.name}_overlay.png", "overlay_slice": best}
