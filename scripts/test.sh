#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, the real-model tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The peak-memory test measures a child process; run after the lm-eval tests in the same pytest
# process it measured 2.8 GiB instead of about 0.3 (cause not found yet, see issue 4's note), so it
# runs in a pytest process of its own first.
peak=tests/test_streaming.py::test_peak_memory_does_not_grow_with_layers
python3 -m pytest -q -p no:cacheprovider "$peak"
python3 -m pytest -q -p no:cacheprovider --deselect "$peak" "$@"
