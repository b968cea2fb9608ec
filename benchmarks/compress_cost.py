"""Time and peak memory of one ``prunenet compress``, stage by stage.

Runs the command line in this process (``prunenet.cli.main``) and times its stages by wrapping
the pipeline's functions: load, probe generation, selection, the activation statistics pass
(shared by the selection and the refit when the refit runs), the later layer groups run again
where the Grams are held a few layers at a time, refit solve, slicing and saving. A stage
started inside another (the probe or a statistics pass inside the selection or the refit) is
counted once, as itself.
Prints one JSON line with the seconds of each stage, the total wall time from before the import
of prunenet, and the peak resident memory (``VmHWM``).

    python benchmarks/compress_cost.py /tmp/smol-r30 -- smollm2-135m --ratio 0.3
    python benchmarks/compress_cost.py --gram-budget -1 /tmp/smol-r30-one -- smollm2-135m \
        --ratio 0.3
    python benchmarks/compress_cost.py --same-as /tmp/smol-r30 /tmp/smol-r30-disk -- \
        smollm2-135m --ratio 0.3 --max-memory 1111MiB     # layers read from disk as they run

``--same-as DIR`` adds whether every tensor written equals DIR's (names, dtypes, values), and
model.gguf its bytes.

    python benchmarks/compress_cost.py /tmp/smol-gguf -- SmolLM2-135M-Instruct.Q4_1.gguf \
        --ratio 0.3                                         # GGUF in, safetensors + GGUF out
    python benchmarks/compress_cost.py --same-as /tmp/smol-gguf /tmp/smol-gguf-disk -- \
        SmolLM2-135M-Instruct.Q4_1.gguf --ratio 0.3 --max-memory 1400MiB   # converted, streamed
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import prunenet.ffn_statistics as ffn_statistics  # noqa: E402
import prunenet.io.gguf_convert as gguf_convert  # noqa: E402
import prunenet.io.gguf_out as gguf_out  # noqa: E402
import prunenet.pipeline as pipeline  # noqa: E402
import prunenet.probe as probe  # noqa: E402
from prunenet.cli import main as cli_main  # noqa: E402
from prunenet.io.streaming import peak_rss  # noqa: E402

STAGES = [  # (module, function, stage name)
    (gguf_convert, "convert_gguf", "convert"),  # a GGUF over the budget, before it streams
    (pipeline, "_as_model", "load"),
    (pipeline, "load_model_and_tokenizer", "load"),  # a streamed model that runs: offloaded
    (pipeline, "check_finite_parameters", "check weights"),
    (probe, "generate_probe", "probe"),
    (ffn_statistics.ProbeStatistics, "every_layer", "statistics"),  # selection and refit
    (ffn_statistics.ProbeStatistics, "_run_again", "statistics, later groups"),
    (pipeline, "refit_model", "refit solve"),
    (pipeline, "spill_refit", "refit solve"),  # offloaded: set aside for the streamed write
    (pipeline, "slice_model", "slice"),
    (pipeline, "save_compressed", "save"),
    (pipeline, "write_streamed", "save"),
    (gguf_out, "write_pruned_gguf", "model.gguf"),
]


def timed(seconds: dict[str, float], stage: str, function):
    """``function``, adding its seconds to ``stage`` less those of the stages it starts."""
    def wrapper(*args, **kwargs):
        started, inner = time.perf_counter(), sum(seconds.values())
        try:
            return function(*args, **kwargs)
        finally:
            seconds[stage] += (time.perf_counter() - started
                               - (sum(seconds.values()) - inner))
    return wrapper


def run(out: str, arguments: list[str]) -> dict:
    seconds: dict[str, float] = defaultdict(float)
    for module, name, stage in STAGES:
        setattr(module, name, timed(seconds, stage, getattr(module, name)))
    original_run = pipeline.run_compression

    def run_compression(plan):
        plan.selector.select = timed(seconds, "selection", plan.selector.select)
        return original_run(plan)

    pipeline.run_compression = run_compression
    code = cli_main(["-q", "compress", *arguments, "--out", out])
    if code:
        raise SystemExit(code)
    total = time.perf_counter() - STARTED
    return {"arguments": arguments, "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "total_s": round(total, 1),
            "peak_rss_gb": round(peak_rss() / 1e9, 2)}


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two outputs hold the same tensors (names, dtypes and values) and, where either
    has one, the same model.gguf bytes."""
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict:
        found = {}
        for file in sorted(folder.glob("*.safetensors")):
            found.update(load_file(file))
        return found

    first, second = tensors(a), tensors(b)
    same = sorted(first) == sorted(second) and all(
        first[name].dtype == second[name].dtype and bool((first[name] == second[name]).all())
        for name in first)
    gguf_a, gguf_b = a / "model.gguf", b / "model.gguf"
    if gguf_a.exists() or gguf_b.exists():
        same = same and gguf_a.exists() and gguf_b.exists() and \
            gguf_a.read_bytes() == gguf_b.read_bytes()
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output folder (must not exist)")
    parser.add_argument("--gram-budget", type=int,
                        help="bytes of Grams the refit's statistics hold at once (default: "
                        "prunenet's GRAM_BUDGET; negative: every layer's at once)")
    parser.add_argument("--same-as", metavar="DIR",
                        help="an earlier output: report whether every tensor equals its")
    parser.add_argument("arguments", nargs=argparse.REMAINDER,
                        help="after --: the compress arguments (MODEL --ratio R ...)")
    args = parser.parse_args()
    arguments = args.arguments[1:] if args.arguments[:1] == ["--"] else args.arguments
    if args.gram_budget is not None:
        ffn_statistics.GRAM_BUDGET = args.gram_budget
    result = run(args.out, arguments)
    result["gram_budget"] = ffn_statistics.GRAM_BUDGET
    if args.same_as is not None:
        result["same_tensors_as"] = args.same_as
        result["same_tensors"] = same_tensors(Path(args.same_as), Path(args.out))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    from script_main import run_script

    run_script(main)
