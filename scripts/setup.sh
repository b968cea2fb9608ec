#!/usr/bin/env bash
# Set up a fresh machine in the project's virtual environment .venv (created with $PYTHON, else
# python3 when it is 3.10+, else the newest python3.N on PATH), so a distribution-managed Python
# works and nothing is installed globally:
# the pinned torch first (the CPU build where there is no NVIDIA GPU), then prunenet with its
# pinned dependencies, then the offline model and data into ~/.cache/prunenet ($PRUNENET_CACHE).
set -euo pipefail
# A relative $PRUNENET_CACHE names a folder under the directory the command was run from; blanks
# around it do not count, as in prunenet (blanks alone: the default cache).
cache=${PRUNENET_CACHE-}
cache=${cache#"${cache%%[![:space:]]*}"} && cache=${cache%"${cache##*[![:space:]]}"}
case $cache in "" | /* | "~"*) ;; *) export PRUNENET_CACHE="$PWD/$cache" ;; esac
cd "$(dirname "$0")/.."
# prunenet and the pinned torch need Python 3.10+; pip alone would say only that torch has no
# matching version.
new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' > /dev/null 2>&1; }
version_of() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2> /dev/null; }
too_old() {
  local found
  found=$("$1" -c 'import platform; print(platform.python_version())' 2> /dev/null || echo missing)
  echo "setup: prunenet needs Python 3.10 or newer; $1 is $found. Install one" \
    "(Debian/Ubuntu: sudo apt-get install python3.11 python3.11-venv) and run again, naming it" \
    "if it is not python3: PYTHON=python3.11 bash scripts/demo.sh (or test.sh)" >&2
  exit 2
}
# A Python named by $PYTHON is checked whatever .venv holds: the set-up is to run on it.
if [ -n "${PYTHON:-}" ] && ! new_enough "$PYTHON"; then too_old "$PYTHON"; fi
# A .venv without a working pip (a set-up interrupted while it made .venv, an interpreter since
# removed or upgraded) or of an older Python would fail every later step, and one of another
# Python version than $PYTHON names is not the one asked for: make it again.
if [ -e .venv ] && ! { new_enough .venv/bin/python \
    && .venv/bin/python -m pip --version > /dev/null 2>&1; }; then
  echo "setup: .venv has no working pip or a Python older than 3.10; making it again" >&2
  rm -rf .venv
elif [ -e .venv ] && [ -n "${PYTHON:-}" ] \
    && [ "$(version_of .venv/bin/python)" != "$(version_of "$PYTHON")" ]; then
  echo "setup: .venv is of Python $(version_of .venv/bin/python), PYTHON=$PYTHON is" \
    "$(version_of "$PYTHON"); making it again" >&2
  rm -rf .venv
fi
if [ ! -e .venv ]; then
  python=${PYTHON:-}
  if [ -z "$python" ]; then
    for candidate in python3 python3.14 python3.13 python3.12 python3.11 python3.10; do
      if new_enough "$candidate"; then python=$candidate; break; fi
    done
  fi
  if [ -z "$python" ] || ! new_enough "$python"; then too_old "${python:-python3}"; fi
  version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  "$python" -m venv .venv || {
    rm -rf .venv
    echo "setup: '$python -m venv' failed; on Debian/Ubuntu install its venv module:" \
      "sudo apt-get install python$version-venv, then run again" >&2
    exit 2
  }
fi
# PIP_USER=0: a pip configured for --user installs (user = true) refuses any inside a venv.
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_USER=0
# On Linux without an NVIDIA GPU, PyPI's torch wheel pulls gigabytes of CUDA libraries: offer
# PyTorch's CPU index beside it (its 2.13.0+cpu sorts above 2.13.0, so pip takes it). Only
# when the index answers within seconds; otherwise pip uses its configured indexes alone. Asked
# with .venv's Python, since minimal images (Debian's, Ubuntu's) have no curl. A GPU is one
# `nvidia-smi -L` lists: nvidia-smi without a working driver fails and lists none.
torch_index=()
cpu_index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
nvidia_gpu() {
  local listed
  command -v nvidia-smi > /dev/null 2>&1 && listed=$(timeout 10 nvidia-smi -L 2> /dev/null) \
    && case $listed in GPU*) true ;; *) false ;; esac
}
if [ "$(uname -s)" = Linux ] && ! nvidia_gpu \
    && timeout 10 .venv/bin/python -c 'import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=5)' "$cpu_index/torch/" > /dev/null 2>&1; then
  torch_index=(--extra-index-url "$cpu_index")
fi
# pip runs quietly; a line per step says what the minutes of silence are.
torch_source="from pip's configured indexes"
[ ${#torch_index[@]} -eq 0 ] || torch_source="CPU build, from $cpu_index"
echo "setup: installing torch 2.13.0 into .venv ($torch_source)"
.venv/bin/python -m pip install --quiet ${torch_index[@]+"${torch_index[@]}"} torch==2.13.0
echo "setup: installing prunenet with the versions in requirements-lock.txt into .venv"
.venv/bin/python -m pip install --quiet -c requirements-lock.txt -e ".[dev]"
echo "setup: prunenet fetch (SmolLM2-135M and the evaluation data, checked by sha256)"
.venv/bin/prunenet fetch
