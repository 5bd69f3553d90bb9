"""The train stage's hardware choices: fp32 on CPU; bf16 + channels_last on CUDA (marked
`gpu`, skipped without a CUDA device; bench/gpu_check.sh runs them on a GPU machine)."""

from __future__ import annotations

import pytest
import torch

from liverseg import distributed
from liverseg.config import TrainParams
from liverseg.stages import train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cpu_runtime_stays_fp32_and_contiguous():
    rt = train.make_runtime(TrainParams(), distributed.setup("cpu"))
    assert rt.amp is None and not rt.channels_last and rt.device.type == "cpu"
    assert not torch.backends.cudnn.benchmark


@pytest.mark.gpu
@cuda
def test_cuda_runtime_uses_bf16_channels_last_and_cudnn_benchmark():
    rt = train.make_runtime(TrainParams(), distributed.setup("cuda"))
    assert rt.amp is torch.bfloat16 and rt.channels_last and torch.backends.cudnn.benchmark
    x, _ = rt.batch(torch.randn(2, 1, 64, 64), torch.zeros(2, 1, 64, 64))
    assert x.is_cuda and x.is_contiguous(memory_format=torch.channels_last)
    try:
        fp32 = train.make_runtime(TrainParams(precision="fp32", deterministic=True),
                                  distributed.setup("cuda"))
        assert fp32.amp is None and not torch.backends.cudnn.benchmark
    finally:  # process-wide: later tests run the default, non-deterministic path
        torch.use_deterministic_algorithms(False)


@pytest.mark.gpu
@cuda
def test_one_epoch_on_cuda_writes_a_model(split_data, tiny_params):
    params = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(
        update={"device": "cuda"})})
    summary = train.run(params, "enhanced_pan")
    assert summary["device"].startswith("cuda")
    assert (split_data / "models/enhanced_pan/model.safetensors").is_file()
