#!/usr/bin/env bash
# Set up a fresh machine in the project's virtual environment .venv (created with the python3 it
# finds, or $PYTHON), so a distribution-managed python3 works and nothing is installed globally:
# the pinned torch first (the CPU build where there is no NVIDIA GPU), then prunenet with its
# pinned dependencies, then the offline model and data into ~/.cache/prunenet ($PRUNENET_CACHE).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv || {
    rm -rf .venv
    echo "setup: '${PYTHON:-python3} -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv" >&2
    exit 2
  }
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# On Linux without an NVIDIA GPU, PyPI's torch wheel pulls gigabytes of CUDA libraries: offer
# PyTorch's CPU index beside it (its 2.13.0+cpu sorts above 2.13.0, so pip takes it). Only
# when the index answers within seconds; otherwise pip uses its configured indexes alone.
torch_index=()
cpu_index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
if [ "$(uname -s)" = Linux ] && ! command -v nvidia-smi > /dev/null 2>&1 \
    && command -v curl > /dev/null 2>&1 \
    && curl -fsS --max-time 5 -o /dev/null "$cpu_index/torch/" 2> /dev/null; then
  torch_index=(--extra-index-url "$cpu_index")
fi
.venv/bin/python -m pip install --quiet ${torch_index[@]+"${torch_index[@]}"} torch==2.13.0
.venv/bin/python -m pip install --quiet -c requirements-lock.txt -e ".[dev]"
.venv/bin/prunenet fetch
