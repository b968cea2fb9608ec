"""Time and peak memory of converting a GGUF to safetensors one layer at a time, against
transformers' whole-model load and save.

Each conversion runs in a fresh process; the peak is the child's own ``VmHWM``. The third child
converts as ``prunenet compress`` does for a GGUF over its budget, after the plan's parse of the
header, and prints the plan's estimate of that peak beside it. Prints one JSON line per
conversion and a last line with the ratios of the layer-by-layer conversion to the whole-model
one and whether every tensor is the same in all three (names, dtypes, values).

    python benchmarks/convert_cost.py ~/.cache/prunenet/smollm2-gguf/*.gguf
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILDREN = {
    "whole model (transformers)": """
import sys, time
started = time.perf_counter()
from pathlib import Path
from prunenet.io.loading import load_model_and_tokenizer, save_plain_checkpoint
from prunenet.io.streaming import peak_rss
model, tokenizer = load_model_and_tokenizer(sys.argv[1])
save_plain_checkpoint(model, tokenizer, Path(sys.argv[2]))
print(round(time.perf_counter() - started, 1), peak_rss())
""",
    "layer by layer (prunenet convert)": """
import sys, time
started = time.perf_counter()
from prunenet.io.gguf_convert import convert_gguf
from prunenet.io.streaming import bound_heap_growth, peak_rss
bound_heap_growth()  # as the command line does
convert_gguf(sys.argv[1], sys.argv[2], progress=False)
print(round(time.perf_counter() - started, 1), peak_rss())
""",
    "layer by layer, planned first (prunenet compress over its budget)": """
import sys, time
started = time.perf_counter()
from prunenet.io.gguf_convert import convert_gguf
from prunenet.io.streaming import PlannedConversion, bound_heap_growth, peak_rss
bound_heap_growth()
planned = PlannedConversion(sys.argv[1])  # what compress's plan reads, and its estimate
convert_gguf(sys.argv[1], sys.argv[2], progress=False)
print(round(time.perf_counter() - started, 1), peak_rss(), planned.conversion_memory())
""",
}


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        found.update(load_file(file))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", help="the .gguf file to convert")
    args = parser.parse_args()
    if not Path(args.gguf).is_file():  # before three children fail on it
        raise SystemExit(f"convert_cost.py: error: {args.gguf} is not a file")
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for index, (name, child) in enumerate(CHILDREN.items()):
            out = Path(folder) / str(index)
            done = subprocess.run([sys.executable, "-c", child, args.gguf, str(out)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{name} failed: {done.stderr.strip()[-2000:]}")
            seconds, peak, *estimate = done.stdout.strip().splitlines()[-1].split()
            runs.append({"conversion": name, "seconds": float(seconds),
                         "peak_rss_mib": round(int(peak) / 2**20)}
                        | ({"estimated_peak_mib": round(int(estimate[0]) / 2**20)}
                           if estimate else {}))
            print(json.dumps(runs[-1]), flush=True)
        first = tensors(Path(folder) / "0")
        same = True
        for index in range(1, len(CHILDREN)):
            second = tensors(Path(folder) / str(index))
            same = same and sorted(first) == sorted(second) and all(
                first[name].dtype == second[name].dtype
                and bool((first[name] == second[name]).all()) for name in first)
    print(json.dumps({"time": round(runs[1]["seconds"] / runs[0]["seconds"], 2),
                      "peak_rss": round(runs[1]["peak_rss_mib"] / runs[0]["peak_rss_mib"], 2),
                      "same_tensors": same}))


if __name__ == "__main__":
    from script_main import run_script

    run_script(main)
