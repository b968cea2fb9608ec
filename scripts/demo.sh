#!/usr/bin/env bash
# Set up a fresh machine and run the main job: compress SmolLM2-135M at 30% and compare.
set -euo pipefail
# A relative $PRUNENET_CACHE names a folder under the directory the command was run from.
case "${PRUNENET_CACHE:-/}" in /* | "~"*) ;; *) export PRUNENET_CACHE="$PWD/$PRUNENET_CACHE" ;; esac
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python scripts/demo.py "$@"
