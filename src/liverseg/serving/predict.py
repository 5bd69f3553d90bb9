"""Predictions from a trained or registered model on new slices and volumes, in a batch
that never dies for one input (DESIGN rule 9).

Inputs: PNG/JPG slices, folders of them, NIfTI volumes (`.nii`, `.nii.gz`, values in
Hounsfield units) and DICOM CT series (`liverseg.dicom.series`: files recognised by
content, grouped by series). All go through `liverseg.preprocess` with the parameters the
model recorded (grey conversion, canonical orientation, the training HU window, the resize
to the trained size and back), so a mask has the input's geometry and is what evaluate
measured; volume masks are written in the input's own axes, with its affine and header.

Before any work each input passes the boundary (`liverseg.boundary`): sizes from
the header within `Limits`, no NaN/inf voxel (unless `Policy.allow_nonfinite`: counted,
and masked as background), values that can be CT in HU (unless `Policy.hu_check` is off).

Outputs mirror the inputs' structure under DIR, every part of every name made safe by
`boundary.safe_name`: `<name>_mask.png|.nii.gz` (class indices for NIfTI: 0/1, or 0/1/2 =
background/liver/tumour as LiTS labels them; PNG values as `liverseg.labels` stores masks),
`<name>_overlay.png` (for a volume: the slice with the largest predicted foreground), for a
DICOM series `<folder>_series-<N>_seg.dcm` (a DICOM SEG on the source images, one segment
per class). A name two inputs would share gets a short hash of each input, and its rows say
so. `predictions.csv` has one row per input, rewritten atomically as each input finishes:
`status` done / refused / skipped with the `reason` naming the file and the rule, each
class's size (pixels; ml for a volume), the model (`model_ref`, `model_version`,
`model_run`) and `preprocessing_sha256`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from liverseg import checkpoint, labels
from liverseg.artifacts import inference_file
from liverseg.boundary import Limits, Refused, check_hu, nonfinite
from liverseg.dicom import seg_writer
from liverseg.dicom import series as dicom
from liverseg.io import atomic_path, read_json
from liverseg.monitoring.store import ServedCaseStore, default_store
from liverseg.postprocess import Inference
from liverseg.preprocess import (
    Preprocessing,
    context_stack,
    read_image,
    to_input_orientation,
    to_slices,
    volume_slices,
)
from liverseg.served import Served
from liverseg.serving.inputs import Item, expand_inputs, is_nifti, outcome
from liverseg.serving.outputs import Outcomes, class_sizes, overlay, overlay_row, save_png
from liverseg.serving.watch import Watch, record

PAD_HU = -1024.0  # what a NaN/inf voxel becomes under allow_nonfinite (then masked out)


@dataclass(frozen=True)
class Policy:
    """What the boundary lets through (`liverseg predict --allow-nonfinite/--no-hu-check`)."""

    limits: Limits = field(default_factory=Limits.from_env)
    allow_nonfinite: bool = False
    hu_check: bool = True


# ----------------------------------------------------------------------------- the model


def model_uri(ref: str, registered_model: str = "liverseg") -> str:
    """A bare version number or run id as an MLflow URI; URIs pass through."""
    if ref.isdigit():
        return f"models:/{registered_model}/{ref}"
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        return f"runs:/{ref}/model"
    return ref


def load(ref: str) -> tuple[torch.nn.Module, dict]:
    """(eval-mode torch model, its config) from a model directory (models/<name>) or an
    MLflow URI (models:/liverseg@champion, models:/liverseg/3, runs:/ID/model, a version
    number or a run id), loaded through the project's pyfunc (serving.mlflow_pyfunc).
    The config's `inference` is evaluate's choice of mirroring and post-processing: beside
    the folder (`artifacts.inference_file`), or logged with the registered version; absent
    (a model evaluate has not scored, a training run's own model), the raw output serves."""
    if Path(ref).is_dir():
        model, config = checkpoint.load_model(ref)
        decision = inference_file(ref)
        return model, config | ({"inference": read_json(decision)} if decision.exists() else {})
    from liverseg import tracking

    served = tracking.mlflow().pyfunc.load_model(model_uri(ref))
    python_model = served.unwrap_python_model()
    return python_model.model.eval(), python_model.config


def model_identity(ref: str, config: dict) -> dict:
    """Which model made a row: the reference given, its registry version and run (when it
    has them) and a hash of the preprocessing it applies."""
    inference = Inference.from_dict(config.get("inference"))
    prep = json.dumps(inference.preprocessing(Preprocessing.from_config(config)).to_dict(),
                      sort_keys=True)
    out = {"model_ref": ref, "model_name": config.get("model", ""), "model_version": "",
           "model_run": "",
           "preprocessing_sha256": hashlib.sha256(prep.encode()).hexdigest()[:16],
           "inference": inference.describe()}
    if Path(ref).is_dir():
        run = Path(ref) / "run.json"
        out["model_run"] = json.loads(run.read_text()).get("run_id") or "" if run.exists() else ""
        return out
    uri = model_uri(ref)
    if uri.startswith("runs:/"):
        out["model_run"] = uri.split("/")[1]
    elif re.fullmatch(r"models:/[^/@]+(/\d+|@.+)", uri):  # a registered version
        from liverseg import tracking
        from liverseg.provenance.lineage import resolve_version

        version = resolve_version(tracking.mlflow().MlflowClient(), uri)
        out["model_version"], out["model_run"] = str(version.version), version.run_id or ""
    return out


@dataclass
class Predictor:
    """A model behind the one preprocessing (`liverseg.served.Served`), in batches."""

    model: torch.nn.Module
    config: dict
    batch_size: int = 32  # CPU inference: larger batches amortise per-call overhead
    seg_description: str | None = None  # a SEG's SeriesDescription: the model and version
    identity: dict = field(default_factory=dict)  # model_identity: every row names the model
    store: ServedCaseStore | None = None  # where each served case's monitoring row goes
    watch: Watch | None = None  # the facts of the case being served

    def __post_init__(self):
        self.inference = Inference.from_dict(self.config.get("inference"))
        self.prep = self.inference.preprocessing(Preprocessing.from_config(self.config))
        self.net = Served(self.model, self.prep, mirror=self.inference.mirror).eval()

    def post(self, mask: np.ndarray, grid: bool) -> np.ndarray:
        """The post-processing evaluate chose: 3D components on a grid, else per slice."""
        return self.inference.apply(mask, self.classes, grid)

    def masks(self, slices: np.ndarray) -> np.ndarray:
        """uint8 grey slices [N, H, W] -> class indices [N, H, W] (uint8), one batch at a
        time (a volume's probabilities never all sit in memory). A 2.5D model gets each
        slice with its neighbours among `slices` (a volume's, in order) as channels."""
        k, out = self.prep.context_slices, []
        for i in range(0, len(slices), self.batch_size):
            batch = np.arange(i, min(i + self.batch_size, len(slices)))
            x = context_stack(slices, k, batch) if k else slices[batch]
            probs, classes = self.net.answer(x)
            if self.watch is not None:
                self.watch.guard(self.watch.confidence.update, probs)
            out.append(classes.numpy())
        return np.concatenate(out).astype(np.uint8)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.prep.classes


# ----------------------------------------------------------------------------- one input


class Screen:
    """A volume's intensities checked before they become grey slices (`volume_slices`)."""

    def __init__(self, what: str, policy: Policy):
        self.what, self.policy, self.invalid, self.count = what, policy, None, 0
        self.hu = None  # the voxels as checked, for the monitoring row's intensity facts

    def __call__(self, hu: np.ndarray) -> np.ndarray:
        self.hu = hu
        self.count = nonfinite(hu)
        if self.count:
            if not self.policy.allow_nonfinite:
                raise Refused(f"{self.what}: {self.count} NaN or infinite voxel(s) (rule: "
                              "finite intensities; --allow-nonfinite masks them instead)")
            self.invalid = ~np.isfinite(hu)
            hu = np.where(self.invalid, PAD_HU, hu)
        if self.policy.hu_check:
            check_hu(self.what, hu)
        return hu


def predict_image(predictor: Predictor, path: Path, out: Path) -> dict:
    if predictor.prep.context_slices:
        raise Refused(f"{path}: the model reads each slice with its "
                      f"{predictor.prep.context_slices} neighbour(s) on each side "
                      "(data.context_slices); give it a volume (NIfTI or a DICOM series), "
                      "not a single 2D image")
    gray = read_image(path, predictor.prep)
    mask, classes = predictor.post(predictor.masks(gray[None]), grid=False)[0], predictor.classes
    if predictor.watch is not None:
        predictor.watch.saw(gray[None])
        predictor.watch.answered(mask[None], classes, None, volume=False)
    save_png(out.with_name(f"{out.name}_mask.png"), labels.encode(mask, len(classes)))
    save_png(out.with_name(f"{out.name}_overlay.png"), overlay(gray, mask, classes))
    return {"kind": "image", "shape": "x".join(map(str, gray.shape)),
            **class_sizes(mask, classes), "mask": f"{out.name}_mask.png",
            "overlay": f"{out.name}_overlay.png"}


def segment_volume(predictor: Predictor, img, what: str, out: Path, policy: Policy
                   ) -> tuple[np.ndarray, dict]:
    """The mask of a nibabel image in its own axes (slices in canonical orientation,
    windowed as in training), written as NIfTI with its affine and header, and the overlay.
    The header's size is checked before a voxel is read, the intensities before the model."""
    import nibabel as nib

    policy.limits.check_volume(what, img.shape, img.get_data_dtype().itemsize)
    prep = predictor.prep
    if not prep.trained_on_volumes:
        warnings.warn(f"{what}: the model was trained on 2D images, so the HU window "
                      f"{list(prep.hu_window)} it applies is an assumption ({prep.hu_window_from})",
                      stacklevel=2)
    screen = Screen(what, policy)
    slices, ornt = volume_slices(img, prep, screen)
    canonical_mask = predictor.masks(slices)  # [Z, H, W], canonical
    if screen.invalid is not None:  # NaN/inf voxels are never foreground
        canonical_mask[np.transpose(np.atleast_3d(screen.invalid), (2, 1, 0))] = 0
    canonical_mask = predictor.post(canonical_mask, grid=True)
    mask = to_input_orientation(canonical_mask, ornt, img.shape)
    header = img.header.copy()
    header.set_data_dtype(np.uint8)
    with atomic_path(out.with_name(f"{out.name}_mask.nii.gz")) as tmp:
        tmp.write_bytes(gzip.compress(nib.Nifti1Image(mask, img.affine, header).to_bytes()))
    voxel_mm3 = float(np.prod([float(z) for z in header.get_zooms()[:3]]))
    if predictor.watch is not None:
        # the HU voxels as the grey slices hold them: canonical [X, Y, Z] -> [Z, Y, X]
        predictor.watch.saw(slices, to_slices(screen.hu), prep.hu_window)
        predictor.watch.answered(canonical_mask, predictor.classes, voxel_mm3, volume=True)
    return mask, {"kind": "volume", "shape": "x".join(map(str, mask.shape)),
                  **class_sizes(mask, predictor.classes, voxel_mm3),
                  "mask": f"{out.name}_mask.nii.gz", "nonfinite_voxels": screen.count,
                  **overlay_row(predictor.classes, slices, canonical_mask, out)}


def segment_slices(predictor: Predictor, images: list, what: str, policy: Policy
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Single-slice images of one series, each in its own geometry (no regular grid):
    (grey slices [N, H, W] and their masks, canonical; the masks [N, rows, columns] in
    each slice's own axes). NaN/inf are refused here (DICOM stores integers anyway)."""
    if predictor.prep.context_slices:
        raise Refused(f"{what}: the model reads each slice with its neighbours "
                      "(data.context_slices), which needs regularly spaced slices")
    for img in images:
        policy.limits.check_volume(what, img.shape, img.get_data_dtype().itemsize)
    policy_each = Policy(policy.limits, allow_nonfinite=False, hu_check=False)
    screens = [Screen(what, policy_each) for _ in images]
    grey, ornts = zip(*(volume_slices(img, predictor.prep, screen)
                        for img, screen in zip(images, screens, strict=True)), strict=True)
    hu = np.stack([np.asarray(i.dataobj) for i in images])
    if policy.hu_check:  # on the whole series: one slice of air alone is not a CT volume
        check_hu(what, hu)
    slices = np.concatenate(grey)
    masks = predictor.post(predictor.masks(slices), grid=False)
    if predictor.watch is not None:  # no grid: components per slice, sizes in pixels
        predictor.watch.saw(slices, np.concatenate([to_slices(s.hu) for s in screens]),
                            predictor.prep.hu_window)  # each slice's HU as its grey holds it
        predictor.watch.answered(masks, predictor.classes, None, volume=False)
    own = [to_input_orientation(masks[i:i + 1], ornt, img.shape)[0]  # [1, rows, cols]
           for i, (ornt, img) in enumerate(zip(ornts, images, strict=True))]
    return slices, masks, np.stack(own)


def predict_volume(predictor: Predictor, path: Path, out: Path, policy: Policy) -> dict:
    """A NIfTI volume; the mask in the input's own axes, shape, affine and header."""
    import nibabel as nib

    return segment_volume(predictor, nib.load(str(path)), str(path), out, policy)[1]


def predict_series(predictor: Predictor, series: dicom.Series, out: Path, policy: Policy
                   ) -> dict:
    """A DICOM CT series: as a volume (NIfTI mask too) when its slices form a regular grid,
    else slice by slice; either way a DICOM SEG on the source images."""
    images, datasets = dicom.load_series(series)
    what = f"series {series.uid} ({series.files[0].parent})"
    if predictor.watch is not None:
        predictor.watch.study_uid, predictor.watch.series_uid = series.study_uid, series.uid
    if series.irregular is None:
        mask, row = segment_volume(predictor, images, what, out, policy)
    else:
        slices, masks, mask = segment_slices(predictor, images, what, policy)
        row = {"kind": "dicom", "shape": "x".join(map(str, mask.shape)),
               **class_sizes(mask, predictor.classes), "mask": "",
               "reason": f"no NIfTI mask or ml: {series.irregular}; SEG on the source frames",
               **overlay_row(predictor.classes, slices, masks, out)}
    if predictor.watch is not None:
        predictor.watch.scanned(datasets[0], len(datasets))
    with atomic_path(out.with_name(f"{out.name}_seg.dcm")) as tmp:
        seg_writer.write_seg(tmp, datasets, mask, predictor.classes, predictor.config["model"],
                        predictor.seg_description)
    return row | {"kind": "dicom", "series_uid": series.uid, "study_uid": series.study_uid,
                  "slices": len(datasets), "seg": f"{out.name}_seg.dcm"}


def predict_item(predictor: Predictor, item: Item, out_dir: Path, policy: Policy) -> dict:
    """One input's row: done, or refused naming the file and the rule."""
    out = out_dir / item.name
    out.parent.mkdir(parents=True, exist_ok=True)
    kind = ("dicom" if isinstance(item.source, dicom.Series)
            else "volume" if is_nifti(item.source) else "image")
    predictor.watch = Watch() if predictor.store is not None else None
    try:
        if kind == "dicom":
            row = predict_series(predictor, item.source, out, policy)
        elif kind == "volume":
            row = predict_volume(predictor, item.source, out, policy)
        else:
            row = predict_image(predictor, item.source, out)
    except Exception as exc:  # one input's failure is its row, never the batch's end
        reason = str(exc) if isinstance(exc, ValueError | OSError) else \
            f"{item.label}: {type(exc).__name__}: {exc}"
        return outcome(item.label, "refused", reason, kind) | {"name": item.name}
    finally:
        watch, predictor.watch = predictor.watch, None
    record(predictor.store, predictor.identity, kind, watch)  # only a case served
    folder = str(Path(item.name).parent)
    for key in ("mask", "overlay", "seg"):  # paths relative to --out
        if row.get(key) and folder != ".":
            row[key] = f"{folder}/{row[key]}"
    reason = "; ".join(filter(None, [item.note, row.pop("reason", "")]))
    return outcome(item.label, "done", reason, kind) | {"name": item.name} | row


def start(model_ref: str, out_dir: str | Path) -> tuple[Predictor, Outcomes]:
    model, config = load(model_ref)
    identity = model_identity(model_ref, config)
    version = identity["model_version"] or identity["model_run"][:8]
    predictor = Predictor(model, config,
                          seg_description=seg_writer.seg_description(config["model"], version),
                          identity=identity, store=default_store())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return predictor, Outcomes(out_dir, identity)


def run(model_ref: str, inputs: list[str | Path], out_dir: str | Path,
        policy: Policy | None = None) -> dict:
    """Every input gets a row in DIR/predictions.csv; the summary counts them."""
    policy = policy or Policy()
    items, other_rows = expand_inputs(inputs, policy.limits)
    if not items and not other_rows:
        raise ValueError("no inputs given")
    predictor, outcomes = start(model_ref, out_dir)
    for row in other_rows:
        outcomes.add(row)
    for item in items:
        outcomes.add(predict_item(predictor, item, Path(out_dir), policy))
    return summary(model_ref, outcomes)


def summary(model_ref: str, outcomes: Outcomes) -> dict:
    out_dir = outcomes.path.parent
    return {"model": model_ref, "inputs": len(outcomes.rows), "out": str(out_dir),
            "summary": str(outcomes.path),
            **{s: outcomes.count(s) for s in ("done", "refused", "skipped")},
            "refusals": [r["reason"] for r in outcomes.rows if r["status"] == "refused"],
            **{k: sum(r.get(k) or 0 for r in outcomes.rows)
               for k in dict.fromkeys(k for r in outcomes.rows for k in r)
               if k.endswith("_pixels")}}
