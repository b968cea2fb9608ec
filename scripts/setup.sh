#!/usr/bin/env bash
# Set up a fresh machine: the pinned CPU build of torch first (so no resolver pulls a CUDA build),
# then prunenet with its pinned dependencies, then the offline model and data into the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check torch==2.13.0
python3 -m pip install --quiet --disable-pip-version-check -c requirements-lock.txt -e ".[dev]"
python3 -m prunenet fetch
