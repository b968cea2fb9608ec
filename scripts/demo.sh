#!/usr/bin/env bash
# Set up a fresh machine and run the main job: compress SmolLM2-135M at 30% and compare.
set -euo pipefail
# A relative $PRUNENET_CACHE names a folder under the directory the command was run from; blanks
# around it do not count, as in prunenet (blanks alone: the default cache).
cache=${PRUNENET_CACHE-}
cache=${cache#"${cache%%[![:space:]]*}"} && cache=${cache%"${cache##*[![:space:]]}"}
case $cache in "" | /* | "~"*) ;; *) export PRUNENET_CACHE="$PWD/$cache" ;; esac
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python scripts/demo.py "$@"
