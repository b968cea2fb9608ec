"""Time, peak resident memory and output of a streamed compression under two heap policies.

A run that streams sets glibc's mmap threshold (``bound_heap_growth``) so that freed matrices
go back to the system. This runs the same ``prunenet compress`` command, every layer read from
disk, in a fresh process per run, alternating the project's threshold with ``--against`` (each
first in every other repeat, as the first run after a pause may find the files out of the page
cache), and prints each run's seconds, peak RSS, minor page faults and the sha256 of the
written ``model.safetensors``. ``--against`` is another threshold in bytes, ``glibc`` (no bound:
glibc's own threshold, which rises after each freed large block up to 32 MiB) or ``glibc-trim``
(no bound, and ``malloc_trim(0)`` before every token the probe generates, which hands the
heap's free pages back while they stay in the heap): a lower threshold means more allocations
served by mmap, whose fresh pages each fault in when first written, which could cost time.

    python benchmarks/heap_threshold.py --repeats 2 -- smollm2-135m --ratio 0.3 --max-memory 1348MiB
    python benchmarks/heap_threshold.py --repeats 1 --against glibc -- smollm2-135m --ratio 0.3 \
        --max-memory 1348MiB                                         # likewise glibc-trim
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

POLICIES = ("glibc", "glibc-trim")


def _policy(text: str) -> str:
    if text in POLICIES or text.isdigit():
        return text
    raise argparse.ArgumentTypeError(f"a threshold in bytes or one of {', '.join(POLICIES)}")


def _one_run(policy: str, out: str, arguments: list[str]) -> None:
    """In this process: compress under ``policy`` instead of the project's threshold, print a
    JSON line."""
    import ctypes
    import resource

    import prunenet.io.streaming as streaming
    from prunenet.cli import main

    trims = 0
    if policy.isdigit():
        streaming.MMAP_THRESHOLD = int(policy)  # bound_heap_growth reads it when the run streams
    else:
        streaming.bound_heap_growth = lambda: None  # the command line looks it up when it runs
    if policy == "glibc-trim":
        import prunenet.probe as probe

        trim, sample = ctypes.CDLL("libc.so.6").malloc_trim, probe._Sampling.__call__

        def trimmed(self, *args, **kwargs):
            nonlocal trims
            trim(0)
            trims += 1
            return sample(self, *args, **kwargs)

        probe._Sampling.__call__ = trimmed  # called once per generated token
    started = time.perf_counter()
    status = main(["-q", "compress", *arguments, "--out", out])
    seconds = time.perf_counter() - started
    if status:  # prunenet printed why
        raise SystemExit(status)
    digest = hashlib.sha256(Path(out, "model.safetensors").read_bytes()).hexdigest()
    print(json.dumps({"policy": policy, "status": status, "seconds": round(seconds, 1),
                      "peak_rss_mib": round(streaming.peak_rss() / 2**20, 1),
                      "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt,
                      "trims": trims, "sha256": digest[:16]}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=_policy, default=str(2**20),
                        help="a threshold in bytes (default 1 MiB), glibc or glibc-trim")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", nargs=2, metavar=("POLICY", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("arguments", nargs="+", help="prunenet compress's arguments, less --out")
    args = parser.parse_args()
    if args.one:
        _one_run(args.one[0], args.one[1], args.arguments)
        return
    from prunenet.io.streaming import MMAP_THRESHOLD

    with tempfile.TemporaryDirectory(prefix="heap-threshold-") as work:
        pair = (str(MMAP_THRESHOLD), args.against)
        for repeat in range(args.repeats):  # each policy first in every other repeat
            for policy in pair if repeat % 2 == 0 else pair[::-1]:
                out = str(Path(work) / f"out-{policy}-{repeat}")
                done = subprocess.run([sys.executable, __file__, "--one", policy, out, "--",
                                       *args.arguments])
                if done.returncode:
                    raise SystemExit(f"heap_threshold.py: the compression under {policy} failed "
                                     f"(exit {done.returncode}; its error is above)")


if __name__ == "__main__":
    from script_main import run_script

    run_script(main)
