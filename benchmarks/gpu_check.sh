#!/usr/bin/env bash
# The prepared GPU check (for a session lent a device machine; CI has no GPU): the CUDA tests and
# the speed benchmark's 7B shape on the GPU, reference and prunenet, with a measured 20-episode
# run. Needs only torch, transformers, safetensors, scipy and pytest, which the lent machine's
# image holds; SmolLM2 is not there (too large to carry), so the SmolLM2 half is skipped.
#   device run:  bash benchmarks/gpu_check.sh        (writes into $OUT: gpu.txt, pytest.log,
#                                                     speed-cuda.json, speed-cuda.log)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/prunenet-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
    | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/pytest.log"
cd benchmarks
python3 speed.py --skip-smollm2 --device cuda --llama-full-episodes 20 \
    --json "$OUT/speed-cuda.json" 2>&1 | tee "$OUT/speed-cuda.log"
