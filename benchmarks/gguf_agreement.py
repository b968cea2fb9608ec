"""Does llama.cpp read a written GGUF as transformers does? For one GGUF file: the max next-token
KL between the two on a short prompt, and llama.cpp's greedy continuation checked token by token
against transformers' reading of the same file (each token's margin below transformers' best
choice; 0 where both pick the same token).

    python benchmarks/gguf_agreement.py OUT/model.gguf   # after prunenet compress X.gguf --out OUT
    python benchmarks/gguf_agreement.py X.gguf           # the input itself, for reference
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gguf_output import PROMPT, import_llama_cpp, kl_per_token, load  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--tokens", type=int, default=12, help="greedy tokens to check")
    args = parser.parse_args()
    path = args.gguf.expanduser()
    if not path.is_file():
        raise SystemExit(f"gguf_agreement.py: error: {path} is not a file")
    llama_cpp = import_llama_cpp("gguf_agreement.py")
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=128, n_threads=2,
                          n_batch=128, seed=0, verbose=False)
    ids = llm.tokenize(PROMPT, add_bos=True)
    llm.reset()
    llm.eval(ids)
    prompt_scores = np.array(llm.scores[: len(ids)], dtype=np.float64)
    generated: list[int] = []
    for _ in range(args.tokens):
        generated.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(generated[-1:])
    model = load(path)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids + generated])).logits[0].double(),
                                      dim=-1)
    kl = kl_per_token(log_probs[: len(ids)],
                      torch.log_softmax(torch.from_numpy(prompt_scores), dim=-1))
    continued = log_probs[len(ids) - 1:-1]
    margins = continued.max(-1).values - continued[torch.arange(len(generated)), generated]
    print(json.dumps({"gguf": path.name, "prompt_tokens": len(ids),
                      "llama_cpp_max_kl": float(kl.max()),
                      "greedy_text": llm.detokenize(generated).decode("utf-8", "replace"),
                      "greedy_margins": [round(float(m), 4) for m in margins]}))


if __name__ == "__main__":
    from script_main import run_script

    run_script(main)
