"""Peak resident memory of streamed compression on checkpoints with LLaMA-2-7B layer shapes.

Generates sharded fp16 checkpoints (one shard per layer; gate/up 11008 x 4096, down 4096 x 11008,
attention, norms, a 32000 x 4096 embedding and LM head: a complete LLaMA-2-7B layer layout)
with several layer counts, runs
``prunenet.pipeline.compress`` on each in a fresh subprocess forced to stream (1 episode, ratio
0.3),
and reports the child's peak RSS (``VmHWM``, ``prunenet.io.streaming.peak_rss``) next to the
checkpoint size. The bound is independent of the layer count when the peaks agree across counts.

    nice -n 10 python benchmarks/memory.py --layers 2,4 --work /tmp/prunenet-memory
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

D_MODEL, D_FF, VOCAB = 4096, 11008, 32000

CHILD = """
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
from prunenet.pipeline import compress
from prunenet.io.streaming import StreamedCheckpoint, bound_heap_growth, peak_rss
bound_heap_growth()  # as the command line does for a streamed run
started = time.perf_counter()
compress(StreamedCheckpoint(sys.argv[1]), 0.3, episodes=1, out=sys.argv[2], progress=False,
         device="cpu", method="prunenet", reconstruct="none")
print(json.dumps({"peak_rss": peak_rss(),
                  "seconds": time.perf_counter() - started}))
"""


def generate(folder: Path, layers: int) -> int:
    """Write the checkpoint; returns its size in bytes."""
    import transformers

    folder.mkdir(parents=True)
    transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=D_FF,
                             num_hidden_layers=layers, num_attention_heads=32,
                             torch_dtype="float16").save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)

    def weight(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).half()

    weight_map = {}
    shared = {"model.embed_tokens.weight": weight(VOCAB, D_MODEL),
              "lm_head.weight": weight(VOCAB, D_MODEL),
              "model.norm.weight": torch.ones(D_MODEL, dtype=torch.float16)}
    save_file(shared, folder / "shared.safetensors", metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(shared, "shared.safetensors"))
    del shared
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        tensors = {f"{prefix}.mlp.gate_proj.weight": weight(D_FF, D_MODEL),
                   f"{prefix}.mlp.up_proj.weight": weight(D_FF, D_MODEL),
                   f"{prefix}.mlp.down_proj.weight": weight(D_MODEL, D_FF),
                   f"{prefix}.input_layernorm.weight": torch.ones(D_MODEL, dtype=torch.float16),
                   f"{prefix}.post_attention_layernorm.weight":
                       torch.ones(D_MODEL, dtype=torch.float16),
                   **{f"{prefix}.self_attn.{name}_proj.weight": weight(D_MODEL, D_MODEL)
                      for name in "qkvo"}}
        shard = f"model-{layer + 1:05d}.safetensors"
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", default="2,4", help="comma-separated layer counts")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (deleted)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the child")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = []
    for layers in [int(part) for part in args.layers.split(",")]:
        source, out = args.work / f"llama7b-{layers}", args.work / f"out-{layers}"
        shutil.rmtree(args.work, ignore_errors=True)
        size = generate(source, layers)
        done = subprocess.run([sys.executable, "-c", CHILD, str(source), str(out),
                               str(args.threads)], capture_output=True, text=True, check=True)
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        results.append({"layers": layers, "checkpoint_bytes": size, **measured})
        print(f"{layers} layers: checkpoint {size / 2**30:.2f} GiB, peak RSS "
              f"{measured['peak_rss'] / 2**30:.2f} GiB, {measured['seconds']:.0f} s", flush=True)
        shutil.rmtree(args.work, ignore_errors=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    from script_main import run_script

    run_script(main)
