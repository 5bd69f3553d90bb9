"""The audit's verdict on a rebuilt model: weights, metrics and curve against the registry's.

Weights are compared by the sha256 of their tensors (and, when not identical, the largest
absolute difference and where), the metrics against those recorded at registration, the
training curve against the one logged with the run. `judge_mode` picks how: bitwise when
trained and rebuilt on CPU (deterministic there), within a tolerance when a GPU was involved
(cuDNN and bf16 autocast are not bitwise reproducible; weight drift is then reported, not
judged).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from liverseg.provenance import lineage
from liverseg.provenance.rebuild import AuditError

# measured speed, not a property of the model
TIMING_KEYS = {"images_per_second", "images_per_second_plain", "images_per_second_mirrored"}


def judge_mode(recorded_device: str, rebuilt_device: str, tolerance: float) -> tuple[str, str]:
    """bitwise or tolerance, and why, from the devices that trained and rebuilt the model."""
    if recorded_device.startswith("cpu") and rebuilt_device.startswith("cpu"):
        return "bitwise", ("trained and rebuilt on CPU, where training is bitwise deterministic "
                           "(fp32, every random stream seeded per epoch): any difference counts")
    return "tolerance", (f"trained on {recorded_device}, rebuilt on {rebuilt_device}: cuDNN "
                         f"kernels and bf16 autocast are not bitwise reproducible, so metrics and "
                         f"curve must agree within {tolerance:g} (absolute) and weight "
                         f"differences are reported, not judged")


def _close(a, b, tol: float) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b or abs(a - b) <= tol
    return a == b


def _digest(path: Path, whose: str) -> str:
    from safetensors import SafetensorError

    try:
        return lineage.tensor_digest(path)
    except (SafetensorError, OSError) as exc:
        raise AuditError(f"{whose} weights {path.name} are not a readable safetensors file "
                         f"({exc}): the file was damaged or replaced") from None


def compare_weights(registry: Path, rebuilt: Path, recorded_sha: str | None,
                    tol: float | None) -> dict:
    """Tensor digests of the registry's and the rebuilt weights (and the digest recorded at
    registration); the largest absolute difference when they are not identical. `tol` None:
    weights are compared bitwise; else their difference is reported, not judged."""
    from liverseg.checkpoint import load_weights

    out = {"registry_sha256": _digest(registry, "the registry's"),
           "rebuilt_sha256": _digest(rebuilt, "the rebuilt"), "recorded_sha256": recorded_sha}
    out["identical"] = out["registry_sha256"] == out["rebuilt_sha256"]
    diffs = []
    if recorded_sha and recorded_sha != out["registry_sha256"]:
        diffs.append(f"weights: the registry's model.safetensors (sha256 {out['registry_sha256']})"
                     f" is not what was registered (tag weights_sha256 {recorded_sha}): the "
                     "registry artifact was altered after registration")
    if not out["identical"]:
        a, b = load_weights(registry), load_weights(rebuilt)
        shared = sorted(a.keys() & b.keys())
        odd = sorted(a.keys() ^ b.keys()) + [k for k in shared if a[k].shape != b[k].shape]
        deltas = {k: float((a[k].double() - b[k].double()).abs().max())
                  for k in shared if a[k].shape == b[k].shape and a[k].numel()}
        worst = max(deltas, key=deltas.get) if deltas else None
        out |= {"max_abs_diff": deltas.get(worst), "max_abs_diff_tensor": worst,
                "differing_tensors": sum(v > 0 for v in deltas.values()) + len(odd),
                "tensors": len(a.keys() | b.keys())}
        line = (f"weights: rebuilt sha256 {out['rebuilt_sha256'][:16]} != registry "
                f"{out['registry_sha256'][:16]}; largest |difference| {out['max_abs_diff']:.3g} "
                f"in {worst!r} ({out['differing_tensors']} of {out['tensors']} tensors differ)"
                + (f"; names or shapes differ: {odd[:5]}" if odd else ""))
        if tol is None or odd:
            diffs.append(line)
        else:
            out["note"] = line + " (reported, not judged: weights drift on GPU)"
    out["differences"] = diffs
    return out


def compare_metrics(recorded: dict, rebuilt: dict, tol: float) -> dict:
    """The metrics recorded at registration (tag `metrics`) against the rebuilt evaluate's."""
    keys = sorted((recorded.keys() & rebuilt.keys()) - TIMING_KEYS - {"model"})
    diffs = [f"metrics {k}: recorded {recorded[k]!r}, rebuilt {rebuilt[k]!r}"
             for k in keys if not _close(recorded[k], rebuilt[k], tol)]
    return {"compared": keys, "identical": not diffs, "differences": diffs}


def _curve(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return [{k: float(v) if v != "" else math.nan for k, v in row.items()}
                for row in csv.DictReader(fh)]


def compare_curves(recorded: Path | None, rebuilt: Path, tol: float) -> dict:
    """The training curve logged with the run against the rebuilt reports/training CSV."""
    if recorded is None:
        return {"compared": False, "identical": None,
                "differences": [], "note": "the run has no training curve artifact"}
    old, new = _curve(recorded), _curve(rebuilt)
    diffs = []
    if len(old) != len(new) or (old and old[0].keys() != new[0].keys()):
        diffs.append(f"curve: recorded {len(old)} epochs {list(old[0]) if old else []}, "
                     f"rebuilt {len(new)} epochs {list(new[0]) if new else []}")
    else:
        diffs = [f"curve epoch {int(o.get('epoch', i + 1))} {k}: recorded {o[k]!r}, "
                 f"rebuilt {n[k]!r}" for i, (o, n) in enumerate(zip(old, new, strict=True))
                 for k in o if not _close(o[k], n[k], tol)]
    return {"compared": True, "epochs": len(new), "identical": not diffs, "differences": diffs}
