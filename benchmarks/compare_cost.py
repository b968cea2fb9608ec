"""What one pass of the dense model for every run buys a ``prunenet compare``: the same compare
with the dense model's statistics on the probe and ``activation``'s calibration norms made once
(today) and made again by every run (as before), each in a fresh process, timed whole; prints
both times, their ratio, the number of passes over the probe and over the calibration text each
made, and whether their runs' records and perplexities are equal.

    python benchmarks/compare_cost.py /tmp/compare-cost -- smollm2-135m --ratios 0.2,0.3 \
        --methods self-generated,random --windows 2 --tasks '' --speed-repeats 1
    python benchmarks/compare_cost.py /tmp/compare-cost-activation -- smollm2-135m \
        --ratios 0.2,0.3,0.4 --methods activation --reconstruct none --windows 2 --tasks '' \
        --speed-repeats 1

The arguments after ``--`` are ``prunenet compare``'s, without ``--out`` (the arms write
``OUT/shared`` and ``OUT/each``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ARM = """
import sys
import prunenet.compare as compare
import prunenet.ffn_statistics as statistics
import prunenet.selection.activation as activation
from prunenet.cli import main

passes, calibration_passes = [], []
run_batches = statistics._run_batches
statistics._run_batches = lambda *args: passes.append(1) or run_batches(*args)
sums = activation.squared_activation_sums
activation.squared_activation_sums = lambda *args: calibration_passes.append(1) or sums(*args)
if sys.argv[1] == "each":
    statistics.ProbeStatistics.kept = classmethod(lambda *args, **kwargs: None)
    compare.activation_norms = lambda *args: None
code = main(["-q", "compare", *sys.argv[3:], "--out", sys.argv[2]])
print("passes", len(passes), len(calibration_passes))
sys.exit(code)
"""


def run_arm(arm: str, out: Path, arguments: list[str]) -> tuple[float, int, int]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", ARM, arm, str(out), *arguments],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{arm}: exit {done.returncode}\n{done.stderr}")
    passes, calibration_passes = map(int, done.stdout.split("passes")[-1].split())
    return seconds, passes, calibration_passes


def runs(out: Path) -> list:
    results = json.loads((out / "results.json").read_text())
    return [(run["method"], run["ratio"], run["record"], run["evaluation"]["perplexity"])
            for run in results["runs"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the two arms' outputs (must not exist)")
    parser.add_argument("compare", nargs=argparse.REMAINDER,
                        help="-- then prunenet compare's arguments, without --out")
    args = parser.parse_args()
    arguments = args.compare[1:] if args.compare[:1] == ["--"] else args.compare
    args.out.mkdir(parents=True)
    shared = run_arm("shared", args.out / "shared", arguments)
    each = run_arm("each", args.out / "each", arguments)
    print(json.dumps({
        "shared_s": round(shared[0], 1), "shared_passes": shared[1],
        "shared_calibration_passes": shared[2],
        "each_s": round(each[0], 1), "each_passes": each[1], "each_calibration_passes": each[2],
        "ratio": round(shared[0] / each[0], 3),
        "same_results": runs(args.out / "shared") == runs(args.out / "each"),
    }))


if __name__ == "__main__":
    from script_main import run_script

    run_script(main)
