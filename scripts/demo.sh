#!/usr/bin/env bash
# Set up a fresh machine and run the main job: compress SmolLM2-135M at 30% and compare.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python scripts/demo.py "$@"
