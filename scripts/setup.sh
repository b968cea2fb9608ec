#!/usr/bin/env bash
# Set up a fresh machine in the project's virtual environment .venv (created with the python3 it
# finds, or $PYTHON), so a distribution-managed python3 works and nothing is installed globally:
# the pinned CPU build of torch first (so no resolver pulls a CUDA build), then prunenet with its
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
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -c requirements-lock.txt -e ".[dev]"
.venv/bin/prunenet fetch
