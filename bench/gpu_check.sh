#!/usr/bin/env bash
# The one-GPU check of issue 8 (a few minutes on an H100), run from the repository root.
# It installs nothing: the package runs from src/ (PYTHONPATH), and MLflow is used only
# when importable (else LIVERSEG_TRACKING=off: training needs torch, timm, smp,
# albumentations, numpy, safetensors). Steps: the tests marked `gpu`; three epochs of the
# Enhanced PAN on the embedded phantom through the real stages (ingest, validate, split,
# train, evaluate) on CUDA; the training throughput at 256x256 of bf16 autocast +
# channels_last (+ torch.compile with --compile) against fp32 eager -> bench/results/gpu.json.
# The data stages need great-expectations and pandas: on a bare GPU image, bring them as
# wheels (README "GPU check").
set -euo pipefail
repo=$PWD
export PYTHONPATH="$repo/src:$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 MLFLOW_DISABLE_TELEMETRY=true
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(), 'torch', torch.__version__)"
if [ -z "${LIVERSEG_TRACKING:-}" ]; then
  LIVERSEG_TRACKING=$(python3 -c 'import mlflow' 2>/dev/null && echo on || echo off)
fi
export LIVERSEG_TRACKING
echo "MLflow tracking: $LIVERSEG_TRACKING"

python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py

work=$(mktemp -d)
python3 - "$repo/params.yaml" "$work/params.yaml" <<'PY'
import sys, yaml
params = yaml.safe_load(open(sys.argv[1]))
params["models"] = ["enhanced_pan"]
params["train"] |= {"epochs": 3, "batch_size": 16, "device": "cuda"}
yaml.safe_dump(params, open(sys.argv[2], "w"))
PY
(cd "$work" && for stage in ingest validate split; do python3 -m liverseg "$stage"; done \
  && time python3 -m liverseg train enhanced_pan && python3 -m liverseg evaluate enhanced_pan)

python3 bench/gpu_throughput.py "$@"  # add --compile to time torch.compile too
