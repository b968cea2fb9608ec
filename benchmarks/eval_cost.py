"""Time and peak memory of ``prunenet eval`` held in memory against read from disk.

Runs the evaluation once as given (the reference, in memory) and once for each ``--max-memory``
budget, each in a fresh process (the command line in that process, ``prunenet.cli.main``), and
prints one JSON line per run and a last line with each run's time and peak resident memory
(``VmHWM``) as ratios to the reference and whether its results (perplexity, zero-shot) are the
reference's exactly.

    python benchmarks/eval_cost.py --budgets 1350MiB,1500MiB -- smollm2-135m --windows 16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, sys, time
started = time.perf_counter()
from prunenet.cli import main
from prunenet.io.streaming import peak_rss
status = main(sys.argv[1:])
print(json.dumps({"status": status, "seconds": round(time.perf_counter() - started, 1),
                  "peak_rss_mib": round(peak_rss() / 2**20)}))
"""


def run(arguments: list[str], budget: str | None, folder: Path) -> dict:
    result_file = folder / f"{budget or 'in-memory'}.json"
    command = ["-q", "eval", *arguments, "--json", str(result_file)]
    if budget is not None:
        command += ["--max-memory", budget]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *command], capture_output=True,
                          text=True)
    measured = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {}
    if measured.get("status") != 0:  # prunenet's own errors return a status, not an exception
        raise SystemExit(f"prunenet eval failed ({budget or 'in memory'}): "
                         f"{done.stderr.strip()[-2000:]}")
    result = json.loads(result_file.read_text())
    return {"max_memory": budget, "wall_s": round(time.perf_counter() - started, 1), **measured,
            "perplexity": (result["perplexity"] or {}).get("value"),
            "zero_shot": result["zero_shot"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", required=True,
                        help="comma-separated --max-memory values to run from disk")
    parser.add_argument("arguments", nargs=argparse.REMAINDER,
                        help="after --: the eval arguments (MODEL --windows N ...)")
    args = parser.parse_args()
    arguments = args.arguments[1:] if args.arguments[:1] == ["--"] else args.arguments
    with tempfile.TemporaryDirectory() as folder:
        runs = [run(arguments, None, Path(folder))]
        print(json.dumps(runs[0]), flush=True)
        for budget in args.budgets.split(","):
            runs.append(run(arguments, budget, Path(folder)))
            print(json.dumps(runs[-1]), flush=True)
    reference = runs[0]
    print(json.dumps({"ratios_to_in_memory": [
        {"max_memory": entry["max_memory"],
         "time": round(entry["seconds"] / reference["seconds"], 2),
         "peak_rss": round(entry["peak_rss_mib"] / reference["peak_rss_mib"], 2),
         "same_results": entry["perplexity"] == reference["perplexity"]
         and entry["zero_shot"] == reference["zero_shot"]}
        for entry in runs[1:]]}))


if __name__ == "__main__":
    from script_main import run_script

    run_script(main)
