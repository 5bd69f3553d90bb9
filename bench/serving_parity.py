"""Does `liverseg predict` deliver what evaluate measured? On a real volume, side by side.

Runs ingest -> validate -> split -> train -> evaluate on ../shared/data/lits-117 (liver
target, slab split: validation = slices 96..127) in a temporary folder, then
`liverseg predict` on volume-117.nii.gz and on a copy with flipped and permuted axes, and
scores the predicted masks on the validation slices against segmentation-117 (label >= 1).

    python bench/serving_parity.py [--epochs 12] [--model enhanced_pan] [--json out.json]

Runs against whichever `liverseg` is importable (PYTHONPATH=<checkout>/src to measure
another commit). No MLflow (LIVERSEG_TRACKING=off), CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
LITS = REPO.parent / "shared" / "data" / "lits-117"


def reoriented(src: Path, dest: Path) -> Path:
    """Axes permuted and two flipped, the affine adjusted: the same voxels in the world."""
    img = nib.load(str(src))
    ornt = np.array([[1, -1], [2, 1], [0, -1]])
    data = nib.orientations.apply_orientation(np.asanyarray(img.dataobj), ornt)
    affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, img.shape)
    nib.save(nib.Nifti1Image(data, affine, img.header), str(dest))
    return dest


def fg_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    return float((pred & truth).sum() / (pred | truth).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--model", default="enhanced_pan")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ["LIVERSEG_TRACKING"] = "off"
    import liverseg
    from liverseg.config import parse_params
    from liverseg.serving import predict
    from liverseg.stages import evaluate, run_data_stages, train

    # The params.yaml of the checkout whose code runs (its keys are the ones it parses).
    raw = yaml.safe_load((Path(liverseg.__file__).parents[2] / "params.yaml").read_text())
    raw["data"] |= {"source": "nifti", "path": str(LITS), "target": "liver"}
    raw["split"] |= {"group_by": "slab"}
    raw["models"], raw["train"]["epochs"], raw["train"]["device"] = [args.model], args.epochs, "cpu"
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        params = parse_params(raw)
        run_data_stages(params)
        train.run(params, args.model)
        measured = evaluate.run(params, args.model)["fg_iou"]
        val = [int(k) for k in __import__("pandas").read_csv("data/splits/val.csv").slice_index]
        inputs = [LITS / "volume-117.nii.gz", reoriented(LITS / "volume-117.nii.gz",
                                                         Path(tmp) / "reoriented-117.nii.gz")]
        predict.run(f"models/{args.model}", inputs, "pred")
        truth = nib.as_closest_canonical(nib.load(str(LITS / "segmentation-117.nii.gz")))
        truth = np.asarray(truth.dataobj)[:, :, val] >= 1
        delivered = {}
        for name in ("volume-117", "reoriented-117"):
            mask = nib.as_closest_canonical(nib.load(f"pred/{name}_mask.nii.gz"))
            delivered[name] = fg_iou(np.asarray(mask.dataobj)[:, :, val] > 0, truth)
    result = {"liverseg": str(Path(liverseg.__file__).parent), "model": args.model,
              "epochs": args.epochs, "seed": params.seed, "validation_slices": len(val),
              "evaluate_fg_iou": measured, "predict_fg_iou": delivered["volume-117"],
              "predict_reoriented_fg_iou": delivered["reoriented-117"],
              "seconds": round(time.time() - start)}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(0)


if __name__ == "__main__":
    main()
