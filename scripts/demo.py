"""The main job: compress the default real model (SmolLM2-135M) at 30% and show what it cost.

Prints parameters, size on disk and perplexity (first 4 evaluation windows of 1024 tokens of the
Wikipedia sample) before and after, beside random selection at the same ratio, and a greedy sample
from the pruned checkpoint reloaded with plain transformers.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers.utils.logging as transformers_logging
from transformers import AutoModelForCausalLM, AutoTokenizer

import prunenet
from prunenet.assets import smollm2_path
from prunenet.evaluation.corpora import load_corpus
from prunenet.evaluation.perplexity import perplexity
from prunenet.model_view import FFNView


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def generate(model, tokenizer, prompt: str) -> str:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    return tokenizer.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)


def label(record: dict) -> str:
    """The method that ran, and the refit when one did (e.g. ``random+ls``)."""
    mode = record.get("reconstruct", {}).get("mode", "none")
    return record["method"] + ("" if mode == "none" else f"+{mode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--out", default="out/smollm2-135m-pruned")
    args = parser.parse_args()
    transformers_logging.disable_progress_bar()  # the table and the text, not loading bars
    transformers_logging.set_verbosity_error()

    source = smollm2_path()
    out = Path(args.out)
    dense, tokenizer = prunenet.load_model_and_tokenizer(source)
    windows = load_corpus("wiki", tokenizer).evaluation_windows(1024, args.windows)
    rows = [("dense", FFNView(dense).parameter_counts()["total"], folder_bytes(source),
             perplexity(dense, windows, progress=False), 0.0)]

    started = time.perf_counter()
    result = prunenet.compress(str(source), ratio=args.ratio, out=out, overwrite=True,
                               progress=False)
    method = result.record["method"]
    seconds = time.perf_counter() - started
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers
    rows.append((f"{label(result.record)} r={args.ratio}", result.record["parameters_after"],
                 folder_bytes(out), perplexity(reloaded, windows, progress=False), seconds))

    baseline, _ = prunenet.load_model_and_tokenizer(source)
    random = prunenet.compress(baseline, args.ratio, method="random", seed=0, progress=False)
    rows.append((f"{label(random.record)} r={args.ratio}",
                 FFNView(baseline).parameter_counts()["total"], None,
                 perplexity(baseline, windows, progress=False), None))

    print(f"\nSmolLM2-135M-Instruct, perplexity on the first {args.windows} evaluation windows "
          "(1024 tokens) of the Wikipedia sample")
    print(f"{'model':<26}{'parameters':>14}{'size on disk':>16}{'perplexity':>12}{'time':>9}")
    for name, params, size, ppl, secs in rows:
        size_text = f"{size / 1e6:,.1f} MB" if size else "-"
        time_text = f"{secs:.0f} s" if secs else "-"
        print(f"{name:<26}{params:>14,}{size_text:>16}{ppl:>12.2f}{time_text:>9}")
    print(f"\nsaved to {out} (method {method}; record in prunenet.json, model card README.md)")
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = "The capital of France is"
    print(f"greedy, dense:  {prompt!r} -> {generate(dense, tokenizer, prompt)!r}")
    print(f"greedy, pruned: {prompt!r} -> {generate(reloaded, tokenizer, prompt)!r}")


if __name__ == "__main__":
    main()
