"""evaluate's inference choice on one LiTS-sized case, run on demand:

    python bench/choice_cost.py new; python bench/choice_cost.py old

`postprocess.Choice.add` (24 candidates: mirroring x the three-class post-processing steps,
3D components) on a 448x512x512 three-class case with stray voxels: seconds and peak RSS.
`old` counts with smp's per-image int64 counts summed, as evaluate did before 26f417e
(its every-candidate cache of masks is not reproduced: run the commit before for that).
Each in its own process, so the peak RSS is its own."""

from __future__ import annotations

import resource
import sys
import time

import numpy as np
import torch

from liverseg import metrics, postprocess

CLASSES = ("background", "liver", "tumour")


def smp_counts(pred: np.ndarray, truth: np.ndarray, classes: int) -> np.ndarray:
    """The counts as evaluate made them before: smp's per image, on int64 copies, summed."""
    return metrics.class_confusion(torch.from_numpy(pred.astype(np.int64)),
                                   torch.from_numpy(truth.astype(np.int64)),
                                   classes).sum(0).double().numpy()


def case(seed: int = 0) -> tuple[dict[bool, np.ndarray], np.ndarray]:
    """A 448x512x512 liver (1) with a tumour (2), and two answers with stray voxels."""
    z, y, x = np.ogrid[:448, :512, :512]
    ball = lambda c, r: ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 \
        + ((x - c[2]) / r[2]) ** 2 < 1  # noqa: E731
    truth = ball((224, 256, 256), (150, 160, 160)).astype(np.uint8)
    truth[ball((200, 250, 250), (20, 20, 20))] = 2
    rng, masks = np.random.default_rng(seed), {}
    for mirror in (False, True):
        masks[mirror] = truth.copy()
        masks[mirror][rng.random(truth.shape) < 0.001] = 1  # islands to remove
    return masks, truth


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "new"
    if mode == "old":
        metrics.pooled_confusion = smp_counts  # Choice.add imports it when called
    masks, truth = case()
    choice = postprocess.Choice(CLASSES, (False, True), True)
    before, started = peak_mib(), time.perf_counter()
    choice.add(masks, truth, True)
    print(f"{mode}: {time.perf_counter() - started:.1f} s, peak RSS {peak_mib():.0f} MiB "
          f"({before:.0f} before the call), {len(choice.variants)} candidates")
    print({v.describe(): round(metrics.class_metrics(choice.counts[v], CLASSES)["fg_iou"], 6)
           for v in choice.variants[:4]})


if __name__ == "__main__":
    main()
