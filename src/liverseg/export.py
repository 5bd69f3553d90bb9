"""Export a trained or registered model to ONNX, checked against torch.

The exported graph has the pyfunc's contract (raw pixel values 0..255 in, foreground or
class probabilities out; normalisation and sigmoid/softmax inside), input `image`
[N, C, S, S] with a free batch size and S the model's trained image size (the decoder's
padding is resolved for that size at export). After writing, the ONNX model is run with
onnxruntime on a seeded sample batch and compared with torch; the max absolute difference is
returned and a difference above `tolerance` is an error, not a warning.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from liverseg import predict

FORMATS = ("onnx",)


def sample_input(config: dict, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size, channels = config["image_size"], config["in_channels"]
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, size, size, generator=generator) * 255.0


def export_onnx(model_ref: str, out: str | Path, opset: int = 18,
                tolerance: float = 1e-4) -> dict:
    import onnxruntime as ort

    model, config = predict.load(model_ref)
    net = predict.Normalised(model, config).eval()
    example = sample_input(config)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written next to the target and renamed: no half-written model under the final name.
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".onnx", dir=out.parent)
    os.close(fd)
    try:
        torch.onnx.export(net, (example,), tmp, dynamo=True, opset_version=opset,
                          input_names=["image"], output_names=["probability"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},),
                          external_data=False)
        session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        check = sample_input(config, batch=3, seed=1)  # another batch size than traced
        onnx_out = session.run(None, {"image": check.numpy()})[0]
        with torch.no_grad():
            torch_out = net(check).numpy()
        diff = float(np.abs(onnx_out - torch_out).max())
        if not diff <= tolerance:
            raise ValueError(f"{out}: ONNX output differs from torch by {diff:.3g} "
                             f"(> tolerance {tolerance})")
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return {"format": "onnx", "out": str(out), "model": model_ref, "opset": opset,
            "input": ["batch", config["in_channels"], config["image_size"], config["image_size"]],
            "max_abs_diff": diff, "tolerance": tolerance}


def run(model_ref: str, fmt: str, out: str | Path) -> dict:
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: supported formats are {list(FORMATS)}")
    return export_onnx(model_ref, out)
