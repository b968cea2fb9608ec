"""Quality benchmark: `prunenet compare` on SmolLM2-135M-Instruct at ratios 0.1-0.4.

Methods self-generated (the default), prunenet (the paper's policy, trained once), random,
magnitude and activation (calibration-based), each refitted (``ls``, compare's default); the
dense model and every (method, ratio) pair are evaluated on perplexity (the first ``--windows``
1024-token evaluation windows of the Wikipedia sample), zero-shot PIQA, ARC-Easy (validation
split) and WinoGrande on the first ``--limit`` examples each, and CPU speed. Writes the compare
folder (report.md, results.json, PNGs) and prints the markdown table for benchmarks/README.md.

    nice -n 10 python benchmarks/quality.py --out benchmarks/results/quality > quality.log 2>&1

The defaults (4 windows, 20 examples per task, 4 calibration windows, 1 thread) are sized for a
2-core machine shared with other jobs: 10-40 minutes there. With 20 examples a task's accuracy has
a standard error near 0.11, so perplexity is the metric that separates the methods.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from prunenet.compare import compare, results_table
from prunenet.evaluation.speed import SpeedProtocol
from prunenet.selection.activation import Calibration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.4")
    parser.add_argument("--methods",
                        default="self-generated,prunenet,random,magnitude,activation")
    parser.add_argument("--tasks", default="piqa,arc_easy,winogrande")
    parser.add_argument("--limit", type=int, default=20, help="examples per task (default: 20)")
    parser.add_argument("--windows", type=int, default=4, help="perplexity windows (default: 4)")
    parser.add_argument("--calibration-windows", type=int, default=4,
                        help="activation baseline calibration windows (default: 4)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default: 1; on a crowded machine one thread "
                        "runs 2-3x faster than two)")
    parser.add_argument("--speed-repeats", type=int, default=3, help="(default: 3)")
    parser.add_argument("--out", default="benchmarks/results/quality")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    results = compare(
        args.model, [float(r) for r in args.ratios.split(",")], args.methods, args.out,
        windows=args.windows, tasks=args.tasks, limit=args.limit,
        speed=SpeedProtocol(repeats=args.speed_repeats),
        calibration=Calibration(windows=args.calibration_windows), overwrite=args.overwrite,
        progress=False, report=lambda line: print(line, flush=True),
    )
    print(f"\nfinished in {time.perf_counter() - start:.0f} s; report in {args.out}/report.md\n")
    print(results_table(results))


if __name__ == "__main__":
    from script_main import run_script

    run_script(main)
