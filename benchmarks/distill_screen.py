"""Self-distillation with the teacher's text sampled at another temperature.

The probe for selection and refit is sampled at temperature 1.2 (better than 1.0 there); this
checks whether the distillation's teacher text gains the same way. Distils a pruned model
(``prunenet finetune --data self-generated`` settings below, teacher read from its record) with
the teacher's windows sampled at ``--temperature``, then prints one JSON line with the wall time
and the perplexity on the wiki evaluation windows and on a second text.

    python benchmarks/distill_teacher_temperature.py PRUNED OUT --temperature 1.2 --steps 100 \\
        --ppl ~/.cache/prunenet/bench-reconstruct/hellaswag-text.txt
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import prunenet.distillation as distillation
from prunenet.evaluation.evaluate import evaluate
from prunenet.finetune import finetune
from prunenet.io.loading import load_model_and_tokenizer
from prunenet.selection.self_generated import generated_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pruned")
    parser.add_argument("out")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows")
    parser.add_argument("--ppl", help="a second evaluation text (a file)")
    args = parser.parse_args()
    distillation.generated_tokens = functools.partial(generated_tokens,
                                                      temperature=args.temperature)
    started = time.perf_counter()
    finetune(args.pruned, "self-generated", args.out, steps=args.steps, seqlen=256,
             generated_windows=args.steps // 2, eval_every=args.steps // 2, eval_windows=4,
             lr=1e-3, patience=None, progress=False)
    seconds = time.perf_counter() - started
    model, tokenizer = load_model_and_tokenizer(args.out)
    result = {"temperature": args.temperature, "steps": args.steps, "seconds": seconds}
    for name, corpus in (("wiki", "wiki"), ("second", args.ppl)):
        if corpus is not None:
            report = evaluate(model, tokenizer, ppl=corpus, windows=args.windows, progress=False)
            result[name] = report["perplexity"]["value"]
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
