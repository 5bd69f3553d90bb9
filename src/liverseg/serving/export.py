"""Export a trained or registered model to ONNX, checked against torch.

The exported graph is `liverseg.served.Served`, the pyfunc's and predict's contract:
input `image` [N, C, H, W] of grey values 0..255 with free N, H and W; inside, the bilinear
resize to the trained size S, the normalisation, the network, sigmoid/softmax and the
resize of the probabilities back to H, W; output `probability` [N, K, H, W]. (The network
itself runs at S x S, so the decoder's padding is resolved for S at export.) After writing,
the ONNX model is run with onnxruntime on seeded batches of other sizes than traced,
including non-square ones, and compared with torch; the max absolute difference is returned
and a difference above `tolerance` is an error, not a warning.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from liverseg.io import atomic_path
from liverseg.preprocess import Preprocessing
from liverseg.served import Served
from liverseg.serving import predict

FORMATS = ("onnx",)


def sample_input(prep: Preprocessing, batch: int = 2, seed: int = 0,
                 size: tuple[int, int] | None = None) -> torch.Tensor:
    """Seeded grey values 0..255 [batch, C, H, W] (default: the trained size)."""
    h, w = size or (prep.image_size,) * 2
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, prep.in_channels, h, w, generator=generator) * 255.0


def export_onnx(model_ref: str, out: str | Path, opset: int = 18,
                tolerance: float = 1e-4) -> dict:
    import onnxruntime as ort

    model, config = predict.load(model_ref)
    prep = Preprocessing.from_config(config)
    net = Served(model, prep).eval()
    example = sample_input(prep, size=(prep.image_size + 8, prep.image_size - 8))
    out = Path(out)
    # Written next to the target and renamed: no half-written model under the final name.
    with atomic_path(out, suffix=".onnx") as tmp:
        torch.onnx.export(net, (example,), str(tmp), dynamo=True, opset_version=opset,
                          input_names=["image"], output_names=["probability"],
                          dynamic_shapes=({0: torch.export.Dim("batch"),
                                           2: torch.export.Dim("height", min=8),
                                           3: torch.export.Dim("width", min=8)},),
                          external_data=False)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        diff = 0.0
        for i, size in enumerate([(prep.image_size,) * 2, (50, 70), (301, 257)]):
            check = sample_input(prep, batch=3, seed=1 + i, size=size)  # not the traced
            onnx_out = session.run(None, {"image": check.numpy()})[0]
            with torch.no_grad():
                torch_out = net(check).numpy()
            diff = max(diff, float(np.abs(onnx_out - torch_out).max()))
        if not diff <= tolerance:
            raise ValueError(f"{out}: ONNX output differs from torch by {diff:.3g} "
                             f"(> tolerance {tolerance})")
    return {"format": "onnx", "out": str(out), "model": model_ref, "opset": opset,
            "input": ["batch", prep.in_channels, "height", "width"],
            "trained_size": prep.image_size,
            "max_abs_diff": diff, "tolerance": tolerance}


def run(model_ref: str, fmt: str, out: str | Path) -> dict:
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: supported formats are {list(FORMATS)}")
    return export_onnx(model_ref, out)
