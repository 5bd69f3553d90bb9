"""evaluate@MODEL: the saved best model on the validation split, as `predict` serves it.

Each validation slice goes through `liverseg.served.Served` at its stored size (resize
to the trained size, the network, probabilities resized back) and is scored against its
mask at that size: the numbers a user of `liverseg predict` gets on the source files (the
per-epoch validation figures of training, in reports/training/, are at the trained size).

Writes `reports/metrics/<model>.json` (global metrics with 95% bootstrap CIs, per-image and
per-volume summaries, size, FLOPs and speed), `reports/per_image/<model>.csv` (one row per
slice) and `reports/predictions/<model>.h5` (the predictions at each slice's stored size, for
the report's visual comparison: class indices, 0/1 for a binary model; `liverseg.io.MaskWriter`,
written slice by slice). Volume sources are scored on every slice of each validation case,
not only the slices training sampled. Definitions and the empty-mask
rule: `liverseg.metrics`; with three classes the JSON also has each class's IoU and Dice.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from liverseg import checkpoint, heap, labels, tracking
from liverseg.artifacts import RUN, Artifacts
from liverseg.case_metrics import case_row, summary
from liverseg.config import VOLUME_SOURCES, Params
from liverseg.data.dataset import SliceDataset
from liverseg.data.layout import read_index
from liverseg.io import MaskWriter, read_json, write_json
from liverseg.metrics import (
    ConfusionMeter,
    bootstrap_ci,
    class_metrics,
    foreground_counts,
    hd95,
    nan_to_none,
    per_image_metrics,
    slice_confusion,
)
from liverseg.monitoring import drift
from liverseg.monitoring.facts import Confidence
from liverseg.postprocess import Choice, Inference
from liverseg.preprocess import Preprocessing
from liverseg.served import Served
from liverseg.serving.watch import CaseWatches

RAW = Inference()  # the network's thresholded output, nothing after it
PER_IMAGE_KEYS = ("fg_iou", "dice", "precision", "recall", "hd95")


def grid_cases(rows: list[dict], raw_dir: Path) -> set[str]:
    """Cases of a volume source scored, and post-processed, as volumes: with a spacing and
    every slice ingest stored for the case in this split. Others (2D sources, the phantom,
    tilted or irregular series, a slab of a case, a case with a slice quarantined) are
    scored slice by slice, as predict serves slices without a grid."""
    indices: dict[str, list[int]] = {}
    for r in rows:
        if str(r.get("spacing") or "") not in ("", "nan"):
            indices.setdefault(str(r["case"]), []).append(int(r["slice_index"]))
    if not indices:
        return set()
    stored = read_index(raw_dir).groupby("case").size()
    return {case for case, idx in indices.items()
            if sorted(idx) == list(range(stored.get(case, -1)))}


def units(dataset: SliceDataset, batch_size: int, grid: set[str]):
    """(is a volume, grey uint8 [N, H, W] or stacks, truth [N, H, W], slice ids, cases) at the
    slices' stored size: each case of `grid` whole, in slice order (one case in memory), the
    other slices in batches of one size. Every slice is read once."""
    def unit(volume: bool, items: list):
        images, masks, ids, cases, _ = zip(*sorted(items, key=lambda it: it[4]), strict=True)
        items.clear()  # the slices' own arrays go with the unit's stacks: one copy held
        stacks = np.stack(images), np.stack(masks)
        del images, masks
        if volume:  # a case's slices, read one at a time, freed: their pages back now
            heap.trim()
        return volume, *stacks, list(ids), list(cases)

    items, key = [], None  # key: the case of a volume unit, None for a batch of slices
    for i, row in enumerate(dataset.rows):
        image, mask = dataset.stored(i)
        case = str(row["case"])
        new_key = case if case in grid else None
        if items and (new_key != key or key is None and (
                len(items) == batch_size or items[0][0].shape != image.shape)):
            yield unit(key is not None, items)
        key = new_key
        items.append((image, mask, str(row["slice_id"]), case,
                      int(row["slice_index"]) if key is not None else i))
    if items:
        yield unit(key is not None, items)


def serve_unit(served: Served, images: np.ndarray, batch_size: int, mirror_both: bool = False,
               clock: list | None = None):
    """The network over one unit in batches: ({mirror setting: class indices [N, H, W]
    uint8}, per-slice `Confidence` of the served probabilities). `mirror_both`: the plain
    and the mirrored answers from one set of passes (evaluate's choice), each batch's
    seconds to either going to `clock` (`Served.mirrored`)."""
    threshold, confidence = served.prep.threshold, []
    # Filled batch by batch: no list of batches to concatenate (a second copy of a case).
    out = {mirror: np.empty((len(images), *images.shape[-2:]), np.uint8)
           for mirror in ((False, True) if mirror_both else (served.mirror,))}
    for b in range(0, len(images), batch_size):
        x = served.grey_batch(images[b:b + batch_size])
        with torch.no_grad():
            answers = dict(zip((False, True), served.mirrored(x, clock), strict=True)) \
                if mirror_both else {served.mirror: served(x)}
        for mirror, probs in answers.items():
            out[mirror][b:b + len(probs)] = labels.to_classes(probs, threshold).numpy()
        probs = answers[served.mirror] if served.mirror in answers else answers[False]
        for i in range(len(probs)):
            confidence.append(Confidence())
            confidence[-1].update(probs[i:i + 1])
    return out, confidence


def predict_split(served: Served, dataset: SliceDataset, batch_size: int,
                  classes: tuple[str, ...], masks: MaskWriter,
                  watches: CaseWatches | None = None, case_of: dict | None = None,
                  volumes: CaseVolumes | None = None, inference: Inference = RAW,
                  grid: frozenset[str] = frozenset()):
    """Serve every slice of `dataset` as the model serves (`inference`: mirroring and the
    post-processing, 3D on the cases of `grid`), each predicted class mask going to `masks`
    (memory stays at one case); returns pooled meter, per-image rows, per-image class
    counts [N, C, 4] and seconds. With `watches`, each slice also feeds the monitoring row
    of its case (`case_of`: slice id -> case), the model's drift reference; with `volumes`,
    the case's 3D metrics.

    The CSV's tp/fp/fn/tn are foreground (any class) against background: the binary
    counts themselves for a binary model."""
    served.mirror = inference.mirror
    meter, rows, counts, seconds = ConfusionMeter(classes), [], [], 0.0
    for volume, images, truth, ids, _ in units(dataset, batch_size, grid):
        start = time.perf_counter()
        answer, confidence = serve_unit(served, images, batch_size)
        pred = inference.apply(answer.pop(inference.mirror), classes, grid=volume)
        seconds += time.perf_counter() - start
        if watches is not None:  # first, so that the grey slices can go before the scoring
            # A 2.5D stack's own slice is its centre channel.
            grey = images[:, images.shape[1] // 2] if images.ndim == 4 else images
            if volume:  # a whole case: watched as it is, without gathering its slices again
                watches.add_case(grey, confidence, pred)
            else:
                for i, sid in enumerate(ids):
                    watches.add(case_of[sid], grey[i], confidence[i], pred[i])
            del grey
        del images
        stats = meter.add(slice_confusion(pred, truth, len(classes)))
        per_image = per_image_metrics(stats, classes)
        fg_counts = foreground_counts(stats).tolist()
        for i, (sid, m) in enumerate(zip(ids, per_image, strict=True)):
            tp, fp, fn, tn = fg_counts[i]
            fg_truth = truth[i] > 0  # any foreground class
            rows.append({"slice_id": sid, **m, "hd95": hd95(pred[i] > 0, fg_truth),
                         "tp": int(tp), "fp": int(fp), "fn": int(fn), "tn": int(tn),
                         "truth_pixels": int(fg_truth.sum())})
            masks.add(sid, pred[i])
        if volumes is not None:
            if volume:  # a whole case: scored as it is
                volumes.add_case(ids[0], pred, truth)
            else:
                for i, sid in enumerate(ids):
                    volumes.add(sid, pred[i], truth[i])
        counts.append(stats.numpy())
        del truth, pred  # let go before the next case is read
        if volume:  # and what the case's 3D metrics left in cycles (`liverseg.heap`)
            heap.release()
    return meter, rows, np.concatenate(counts), seconds


def choose_inference(served: Served, dataset: SliceDataset, params: Params,
                     classes: tuple[str, ...], grid: set[str]) -> tuple[Inference, dict]:
    """nnU-Net's rule on validation (`liverseg.postprocess`): every candidate scored on every
    unit, mirroring kept if it raises `compare.rank_by`, each post-processing step if it does
    not lower it. `evaluate.tta` and `evaluate.postprocessing` force or switch them off.
    Also measures the cost of mirroring: the network's images/s without and with it, timed
    within the same passes (the plain answer is the first of the four)."""
    tta, post = params.evaluate.tta, params.evaluate.postprocessing == "auto"
    # flip forces mirroring, but the plain answer (the first of the four passes) is scored
    # too: the gain is reported either way.
    mirror = (False,) if tta == "none" else (False, True)
    if mirror == (False,) and not post:
        return Inference(), {"describe": "none", "tta": tta, "postprocessing": "none"}
    choice, clock = Choice(classes, mirror, post), []
    for volume, images, truth, *_ in units(dataset, params.evaluate.batch_size, grid):
        served.mirror = False
        answers, _ = serve_unit(served, images, params.evaluate.batch_size,
                                mirror_both=tta != "none", clock=clock)
        del images  # the answers are scored against the truth alone
        choice.add(answers, truth, volume)
        del truth, answers
        if volume:  # a case: its memory back before the next (batches of slices are small)
            heap.trim()
    decision, record = choice.choose(params.compare.rank_by, tta)
    if clock:
        n, (plain, both) = len(dataset.rows), np.sum(clock, axis=0)
        record |= {"images_per_second_plain": n / plain if plain else None,
                   "images_per_second_mirrored": n / both if both else None}
    return decision, record | {"postprocessing": params.evaluate.postprocessing}


class CaseVolumes:
    """Each validation case of a volume source put back together, slice by slice, for the
    LiTS challenge's 3D metrics (`liverseg.case_metrics`) at its spacing. Slices of a case
    are consecutive in a split: one case is held at a time. Cases without a grid (no
    `spacing`: 2D sources, the phantom, tilted or irregular series) keep per-slice figures."""

    def __init__(self, rows: list[dict], classes: tuple[str, ...]):
        self.classes, self.rows = classes, []
        self.where = {str(r["slice_id"]): (str(r["case"]), int(r["slice_index"]), str(r["spacing"]))
                      for r in rows if str(r.get("spacing") or "") not in ("", "nan")}
        self.case, self.slices = None, []

    def add(self, sid: str, pred: np.ndarray, truth: np.ndarray) -> None:
        if sid not in self.where:
            return
        case, index, spacing = self.where[sid]
        if case != self.case:
            self._close()
            self.case, self.spacing = case, spacing
        self.slices.append((index, pred, truth))

    def _close(self) -> None:
        self.slices.sort(key=lambda s: s[0])
        indices = [i for i, _, _ in self.slices]
        whole = indices == list(range(indices[0], indices[0] + len(indices))) if indices else False
        if self.case is None or not whole or len({p.shape for _, p, _ in self.slices}) != 1:
            # a slice quarantined inside the case (or slices of two sizes): no 3D grid
            self.case, self.slices = None, []
            return
        pred = np.stack([p for _, p, _ in self.slices])
        truth = np.stack([t for _, _, t in self.slices])
        self.slices = []
        self._score(self.case, self.spacing, pred, truth)
        self.case = None

    def add_case(self, sid: str, pred: np.ndarray, truth: np.ndarray) -> None:
        """A whole case at once, in slice order (`sid`: its first slice)."""
        self._close()
        if sid in self.where:
            case, _, spacing = self.where[sid]
            self._score(case, spacing, pred, truth)

    def _score(self, case: str, spacing: str, pred: np.ndarray, truth: np.ndarray) -> None:
        spacing = [float(v) for v in spacing.split(",")]
        self.rows.append({"case": case, "slices": len(pred), "spacing_mm": spacing}
                         | case_row(pred, truth, self.classes, spacing))

    def finish(self) -> dict | None:
        self._close()
        if not self.rows:
            return None
        return {"summary": summary(self.rows, self.classes), "cases": self.rows}


def flops_per_image(model: torch.nn.Module, in_channels: int, image_size: int) -> int:
    """FLOPs of one forward pass, batch 1, at the trained image size (torch's counter:
    a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, in_channels, image_size, image_size))
    return int(counter.get_total_flops())


def per_image_summary(per_image: pd.DataFrame) -> dict:
    """Mean of each per-image metric over the slices where it is defined (NaN excluded)."""
    out = {}
    for key in PER_IMAGE_KEYS:
        defined = per_image[key].dropna()
        out[f"per_image_{key}_mean"] = float(defined.mean()) if len(defined) else math.nan
    out["n_hd95"] = int(per_image["hd95"].notna().sum())
    return out


def per_volume_summary(counts: np.ndarray, patients: list[str]) -> dict:
    """Counts [N, C, 4] pooled within each patient (volume), then fg_iou/dice averaged over
    patients. As per image, a class absent from a volume's truth and prediction is left out
    of that volume's mean over classes (a tumour-free liver still counts by its liver)."""
    patients = np.asarray(patients)
    per_volume = [class_metrics(counts[patients == p].sum(0), skip_nan=True)
                  for p in np.unique(patients)]
    out = {"n_volumes": len(per_volume)}
    for key in ("fg_iou", "dice"):
        values = [m[key] for m in per_volume if not math.isnan(m[key])]
        out[f"per_volume_{key}_mean"] = float(np.mean(values)) if values else math.nan
    return out


def run(params: Params, model_name: str, root: str | Path = ".") -> dict:
    """Score `model_name` on the validation split of the repository at `root`."""
    art = Artifacts(root)
    splits_dir, model_dir = art.splits, art.model_dir(model_name)
    model, config = checkpoint.load_model(model_dir)
    stats = read_json(art.split_stats)
    classes = labels.classes_of(stats)
    prep = Preprocessing.from_config(config)
    if prep.threshold != params.evaluate.threshold:  # evaluate.threshold is the one served
        prep = replace(prep, threshold=params.evaluate.threshold)
    dataset = SliceDataset(splits_dir / "val.csv", art.raw, prep.image_size, prep.mean,
                           prep.std, num_classes=len(classes))
    # The drift reference: a monitoring row per validation case (a volume source's case,
    # else each image, as predict and REST serve them), saved in the metrics file.
    watches = CaseWatches(classes, {"model_name": model_name})
    volumes = params.data.source in VOLUME_SOURCES
    case_of = {str(r["slice_id"]): str(r["case"] if volumes else r["slice_id"])
               for r in dataset.rows}
    volumes = CaseVolumes(dataset.rows, classes)
    served = Served(model, prep).eval()
    grid = grid_cases(dataset.rows, art.raw)
    inference, choice = choose_inference(served, dataset, params, classes, grid)
    inference = replace(inference, threshold=params.evaluate.threshold)
    write_json(art.inference(model_name), inference.to_dict())  # what serves with the model
    with MaskWriter(art.predictions(model_name)) as masks:
        meter, rows, counts, seconds = predict_split(
            served, dataset, params.evaluate.batch_size, classes, masks, watches, case_of,
            volumes, inference, grid)

    per_image = pd.DataFrame(rows)
    metrics = meter.compute() | bootstrap_ci(counts, params.evaluate.bootstrap, params.seed) | {
        "classes": list(classes),
        "ci_level": 0.95,
        "bootstrap_resamples": params.evaluate.bootstrap,
        **per_image_summary(per_image),
        **per_volume_summary(counts, [r["patient_id"] for r in dataset.rows]),
        "n_images": len(per_image),
        "n_empty_both": int(per_image["fg_iou"].isna().sum()),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "flops": flops_per_image(model, prep.in_channels, prep.image_size),
        "image_size": prep.image_size,
        "images_per_second": len(per_image) / seconds if seconds > 0 else math.nan,
        "best_epoch": config.get("best_epoch"),
        "threshold": params.evaluate.threshold,
        # Mirroring and post-processing chosen on this split (every figure above uses them).
        "inference": choice,
        # Stated in the file itself (full definitions: liverseg.metrics and the README).
        "aggregation": ("global=pooled pixels (CIs: bootstrap over images); per_image=mean, "
                        "0/0 excluded; per_volume=pooled per patient, then mean; hd95 in pixels"),
        "monitoring_reference": drift.reference(pd.DataFrame(watches.finish())),
        # The LiTS challenge's per-case 3D metrics (volume sources with a grid; else None).
        "per_case_3d": volumes.finish(),
    }
    metrics = {"model": model_name} | nan_to_none(metrics)
    art.write_metrics(model_name, metrics)
    art.write_per_image(model_name, per_image)

    run_id = read_json(model_dir / RUN)["run_id"]
    if run_id is None or not tracking.enabled():
        print(f"{model_name}: metrics written, not logged to MLflow "
              f"({'trained without tracking' if run_id is None else 'LIVERSEG_TRACKING=off'})")
    else:
        mlf = tracking.mlflow()
        with mlf.start_run(run_id=run_id):
            mlf.log_metrics({f"eval_{k}": v for k, v in metrics.items()
                             if isinstance(v, float | int) and not isinstance(v, bool)})
    return {k: metrics[k] for k in ("model", "fg_iou", "fg_iou_ci", "miou", "dice",
                                    "pixel_accuracy")}
