#!/usr/bin/env bash
# The one-GPU check (about 5 minutes on an H100), run from the repository root with the
# project installed: the tests marked `gpu`, three epochs of the Enhanced PAN on the
# embedded phantom through the real stages, and the training throughput at 256x256 of
# bf16 autocast + channels_last (+ torch.compile) against fp32 eager.
set -euo pipefail
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 MLFLOW_DISABLE_TELEMETRY=true

python -m pytest -q -m gpu tests

repo=$PWD work=$(mktemp -d)
python - "$repo/params.yaml" "$work/params.yaml" <<'PY'
import sys, yaml
params = yaml.safe_load(open(sys.argv[1]))
params["train"] |= {"epochs": 3, "batch_size": 16, "device": "cuda"}
yaml.safe_dump(params, open(sys.argv[2], "w"))
PY
(cd "$work" && for stage in ingest validate split; do liverseg "$stage"; done \
  && time liverseg train enhanced_pan && liverseg evaluate enhanced_pan)

python bench/gpu_throughput.py --compile
