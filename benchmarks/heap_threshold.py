"""Time, peak resident memory and output of a streamed compression at two mmap thresholds.

A run that streams sets glibc's mmap threshold (``bound_heap_growth``) so that freed matrices
go back to the system. This runs the same ``prunenet compress`` command, every layer read from
disk, in a fresh process per run, alternating the project's threshold with ``--against`` (each
first in every other repeat, as the first run after a pause may find the files out of the page
cache), and prints each run's seconds, peak RSS and the sha256 of the written
``model.safetensors``: a lower threshold means more allocations served by mmap, which could cost
time.

    python benchmarks/heap_threshold.py --repeats 2 -- smollm2-135m --ratio 0.3 --max-memory 1348MiB
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _one_run(threshold: int, out: str, arguments: list[str]) -> None:
    """In this process: compress with ``threshold`` in place of the project's, print a JSON line."""
    import prunenet.io.streaming as streaming
    from prunenet.cli import main

    streaming.MMAP_THRESHOLD = threshold  # bound_heap_growth reads it when the run streams
    started = time.perf_counter()
    status = main(["-q", "compress", *arguments, "--out", out])
    seconds = time.perf_counter() - started
    digest = hashlib.sha256(Path(out, "model.safetensors").read_bytes()).hexdigest()
    print(json.dumps({"threshold": threshold, "status": status, "seconds": round(seconds, 1),
                      "peak_rss_mib": round(streaming.peak_rss() / 2**20, 1),
                      "sha256": digest[:16]}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=int, default=2**20,
                        help="the threshold to compare with, in bytes (default 1 MiB)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", nargs=2, metavar=("THRESHOLD", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("arguments", nargs="+", help="prunenet compress's arguments, less --out")
    args = parser.parse_args()
    if args.one:
        _one_run(int(args.one[0]), args.one[1], args.arguments)
        return
    from prunenet.io.streaming import MMAP_THRESHOLD

    with tempfile.TemporaryDirectory(prefix="heap-threshold-") as work:
        pair = (MMAP_THRESHOLD, args.against)
        for repeat in range(args.repeats):  # each threshold first in every other repeat
            for threshold in pair if repeat % 2 == 0 else pair[::-1]:
                out = str(Path(work) / f"out-{threshold}-{repeat}")
                subprocess.run([sys.executable, __file__, "--one", str(threshold), out, "--",
                                *args.arguments], check=True)


if __name__ == "__main__":
    main()
