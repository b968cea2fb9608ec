"""Peak resident memory of the default (probe, statistics, refit) on a model run layer by layer
from disk, against its layer count.

Generates the LLaMA-layout checkpoints of ``tests/test_streaming.py`` (d_model 512, d_ff 4096,
random float32 weights, one shard per layer: 28 MiB a layer) with each of ``--layers``, and
compresses each ``--repeats`` times in a fresh process at ratio 0.3 with a 256-token probe, the
Grams one layer at a time and the budget of ``StreamedCheckpoint.model_run_memory`` (no layer
stays in memory). Prints each peak (``VmHWM``), the estimate, and the growth per added layer
against the smallest count measured in the same run.

    python benchmarks/offload_peak.py --layers 2,10,18 --repeats 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_streaming import generated_checkpoint, peak_rss_of_streamed_compress  # noqa: E402

from prunenet.io.streaming import StreamedCheckpoint  # noqa: E402
from prunenet.probe import ProbeRecipe  # noqa: E402

D_MODEL, D_FF, MIB = 512, 4096, 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="2,10,18")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    counts = sorted(int(count) for count in args.layers.split(","))
    gram = D_FF**2 * 8
    options = {"probe_tokens": 256, "probe_length": 16, "gram_budget": gram}
    peaks = {}
    with tempfile.TemporaryDirectory() as work:
        for count in counts:
            source = generated_checkpoint(Path(work) / f"m{count}", count, D_MODEL, D_FF)
            budget = StreamedCheckpoint(source).model_run_memory(256, ProbeRecipe.batch_size,
                                                                 16, gram)
            peaks[count] = [peak_rss_of_streamed_compress(
                source, Path(work) / f"out{count}-{repeat}", {**options, "max_memory": budget})
                for repeat in range(args.repeats)]
            print(f"{count} layers: peak {', '.join(f'{p / MIB:.1f}' for p in peaks[count])} "
                  f"MiB, estimate {budget / MIB:.1f} MiB", flush=True)
    base = min(peaks[counts[0]])
    for count in counts[1:]:
        growth = (max(peaks[count]) - base) / (count - counts[0])
        print(f"{counts[0]} -> {count} layers: {growth / MIB:.2f} MiB per added layer "
              f"(one layer's weights: {(3 * D_MODEL * D_FF + 4 * D_MODEL**2) * 4 / MIB:.0f} MiB)")


if __name__ == "__main__":
    from script_main import run_script

    run_script(main)
