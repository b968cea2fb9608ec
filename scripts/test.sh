#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, the real-model tests included.
set -euo pipefail
# A relative $PRUNENET_CACHE names a folder under the directory the command was run from; blanks
# around it do not count, as in prunenet (blanks alone: the default cache).
cache=${PRUNENET_CACHE-}
cache=${cache#"${cache%%[![:space:]]*}"} && cache=${cache%"${cache##*[![:space:]]}"}
case $cache in "" | /* | "~"*) ;; *) export PRUNENET_CACHE="$PWD/$cache" ;; esac
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# llama.cpp, to check that the GGUF files we write run outside transformers (tests/test_gguf_out.py),
# and sentencepiece for llama.cpp's converter. llama-cpp-python is an sdist: the first set-up builds
# it (about 8 CPU-minutes, 11 minutes wall on a busy 2-core machine); pip caches the built wheel, so
# later set-ups take seconds. GGML_NATIVE=OFF: the cached wheel must not assume this machine's CPU.
echo "test: installing llama-cpp-python and sentencepiece into .venv (the first time builds" \
  "llama.cpp: about 10 minutes)"
CMAKE_ARGS="-DGGML_NATIVE=OFF" PIP_USER=0 .venv/bin/python -m pip install --quiet \
    --disable-pip-version-check llama-cpp-python==0.3.36 sentencepiece==0.2.3 || {
  echo "test: installing llama-cpp-python failed (pip's error is above); building it needs a C" \
    "and C++ compiler: on Debian/Ubuntu sudo apt-get install build-essential, then run again" >&2
  exit 1
}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
