"""GGUF output (prunenet.io.gguf_out): cost of the written type, write time and size, and
agreement of llama.cpp with transformers on the written files. SmolLM2-135M-Instruct Q4_1 by
default; any GGUF of a mapped architecture with --gguf (its tokenizer read from the file).

For each ratio: compress the GGUF (--method, the kept width rounded to --round-to), write it as
GGUF with ffn_down in each of --down-types (``default``: the writer's default, Q8_0 for a quantized
source; or a type such as Q4_1, F16 where the kept width is not a multiple of its blocks), then
report for each file: size, write time, next-token KL (mean and max over the tokens of a
Wikipedia passage) and NLL of transformers' reading of the file against the pruned model in memory,
and the max KL of llama.cpp against transformers on the same file (a short prompt).

    python benchmarks/gguf_output.py --method self-generated --ratios 0.3 --round-to 32 \\
        --down-types default,Q4_1,Q5_0,Q5_1 --json benchmarks/results/gguf_output_round32.json
    python benchmarks/gguf_output.py --method self-generated --ratios 0.3 --round-to 32 \\
        --gguf ~/.cache/prunenet/gemma3-gguf/gemma-3-270m-q4_k_m.gguf --down-types default,Q5_0
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import prunenet
from prunenet.assets import SMOLLM2_GGUF_NAME, asset_path, smollm2_path
from prunenet.io.gguf_out import write_pruned_gguf

PROMPT = b"The capital of France is Paris. The largest planet of the solar system is"


def log_probs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)


def kl_per_token(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    return (reference.exp() * (reference - other)).sum(-1)


def nll(lp: torch.Tensor, ids: list[int]) -> float:
    return float(-lp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).mean())


def import_llama_cpp(script: str):
    """The llama_cpp module, or an exit saying how to install it (``script`` names the caller)."""
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit(f"{script}: error: needs llama-cpp-python, which scripts/test.sh "
                         "installs into .venv") from None
    return llama_cpp


def llama_cpp_log_probs(path: Path, ids: list[int]) -> tuple[torch.Tensor, str]:
    llama_cpp = import_llama_cpp("gguf_output.py")
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=128, n_threads=2,
                          verbose=False)
    llm.eval(ids)
    scores = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float64))
    llm.reset()
    text = llm.create_completion(ids, max_tokens=8, temperature=0.0)["choices"][0]["text"]
    return torch.log_softmax(scores, dim=-1), text


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.3,0.25")
    parser.add_argument("--method", default="prunenet")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--gguf", type=Path, help="the GGUF to compress (default: SmolLM2's)")
    parser.add_argument("--down-types", default="default,F16",
                        help="ffn_down types to write, comma-separated (default: the writer's)")
    parser.add_argument("--probe-tokens", type=int, help="passed to compress (default: its own)")
    parser.add_argument("--round-to", type=int, default=1,
                        help="passed to compress: the kept width's multiple (default: 1, exact)")
    args = parser.parse_args()
    if args.gguf is None:
        source = asset_path("smollm2-gguf") / SMOLLM2_GGUF_NAME
        tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    else:
        source = args.gguf.expanduser()
        if not source.is_file():
            raise SystemExit(f"gguf_output.py: error: {source} is not a file")
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    import_llama_cpp("gguf_output.py")  # before minutes of compression
    options = {"round_to": args.round_to}
    if args.probe_tokens is not None:
        options["probe_tokens"] = args.probe_tokens
    text = (asset_path("wiki") / "wiki.utf8").read_text()[5000:12000]
    wiki_ids = tokenizer(text)["input_ids"][: args.tokens]
    prompt_ids = tokenizer(PROMPT.decode())["input_ids"]
    dense_lp = log_probs(load(source), prompt_ids)
    llama_lp, _ = llama_cpp_log_probs(source, prompt_ids)
    results = {"source": {"bytes": source.stat().st_size,
                          "llama_cpp_max_kl": float(kl_per_token(dense_lp, llama_lp).max())}}
    print(json.dumps(results["source"]), flush=True)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        started = time.perf_counter()
        result = prunenet.compress(str(source), ratio=ratio, method=args.method, progress=False,
                                   **options)
        compress_seconds = time.perf_counter() - started
        memory_wiki = log_probs(result.model, wiki_ids)
        for down_type in [None if name == "default" else name
                          for name in args.down_types.split(",")]:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "pruned.gguf"
                started = time.perf_counter()
                report = write_pruned_gguf(source, result.model, result.kept_rows, out,
                                           down_type=down_type)
                write_seconds = time.perf_counter() - started
                written = load(out)
                file_wiki = log_probs(written, wiki_ids)
                file_prompt = log_probs(written, prompt_ids)
                llama_lp, llama_text = llama_cpp_log_probs(out, prompt_ids)
                with torch.no_grad():
                    generated = written.generate(torch.tensor([prompt_ids]), max_new_tokens=8,
                                                 do_sample=False)[0, len(prompt_ids):]
                kl = kl_per_token(memory_wiki, file_wiki)
                row = {
                    "ratio": ratio, "width": int(result.kept_rows[0].numel()),
                    "method": args.method, "down_type": down_type or "default",
                    "written_down": sorted(set(report["requantized"].values())),
                    "compress_seconds": round(compress_seconds, 1),
                    "write_seconds": round(write_seconds, 1), "bytes": out.stat().st_size,
                    "kl_file_vs_memory_mean": float(kl.mean()),
                    "kl_file_vs_memory_max": float(kl.max()),
                    "nll_memory": nll(memory_wiki, wiki_ids), "nll_file": nll(file_wiki, wiki_ids),
                    "llama_cpp_max_kl": float(kl_per_token(file_prompt, llama_lp).max()),
                    "greedy_same": llama_text == tokenizer.decode(generated),
                    "llama_cpp_text": llama_text,
                }
            results.setdefault("runs", []).append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    from script_main import run_script

    run_script(main)
