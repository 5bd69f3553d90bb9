"""evaluate's inference choice on one LiTS-sized case, run on demand:

    python bench/choice_cost.py new; python bench/choice_cost.py old

`postprocess.Choice.add` (24 candidates: mirroring x the three-class post-processing steps,
3D components) on a 448x512x512 three-class case with stray voxels: seconds and peak RSS.
`old` counts with smp's per-image int64 counts summed, as evaluate did before 26f417e
(its every-candidate cache of masks is not reproduced: run the commit before for that).
Each in its own process, so the peak RSS is its own."""
import resource, sys, time
import numpy as np, torch
from liverseg import postprocess, metrics

def old(pred, truth, c):
    return metrics.class_confusion(torch.from_numpy(pred.astype(np.int64)),
                                   torch.from_numpy(truth.astype(np.int64)), c).sum(0).double().numpy()
if sys.argv[1] == "old":
    metrics.pooled_confusion = old
rng = np.random.default_rng(0)
z, y, x = np.ogrid[:448, :512, :512]
truth = (((z - 224) / 150) ** 2 + ((y - 256) / 160) ** 2 + ((x - 256) / 160) ** 2 < 1).astype(np.uint8)
truth[((z - 200) / 20) ** 2 + ((y - 250) / 20) ** 2 + ((x - 250) / 20) ** 2 < 1] = 2
masks = {}
for m in (False, True):
    noisy = truth.copy()
    noisy[rng.random(truth.shape) < 0.001] = 1  # stray voxels: islands to remove
    masks[m] = noisy
choice = postprocess.Choice(("background", "liver", "tumour"), (False, True), True)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
choice.add(masks, truth, True)
print(sys.argv[1], f"{time.perf_counter() - t:.1f} s, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (before add {before:.0f}), variants {len(choice.variants)}")
print({v.describe(): round(metrics.class_metrics(choice.counts[v], ("background","liver","tumour"))["fg_iou"], 6) for v in list(choice.variants)[:4]})
