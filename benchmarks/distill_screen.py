"""Self-distillation settings side by side: teacher text, what trains, learning rate, loss.

Distils a pruned model (``prunenet finetune --data self-generated``, teacher read from its
record; windows of ``--seqlen`` tokens (256), half as many teacher windows as steps so each is
seen twice, four held-back windows, no early stopping) with the settings given, then prints
one JSON line with the settings, the wall time of the run and the perplexity on the wiki
evaluation windows and on a second text. ``--temperature`` samples the teacher's windows at
another temperature than the distillation's 1; ``--hidden-weight`` adds matching every layer's
hidden states to the KL; ``--teacher-top K`` trains on the KL over the teacher's K most likely
tokens plus one bucket (what a run could learn from log-probabilities kept while the teacher
samples); ``--precision`` is finetune's (float32 here unless given). The teacher's windows go
through the package's probe cache in ~/.cache/prunenet/bench-distill (keyed by the teacher,
seed, size and recipe, not the precision), so arms that differ only in training train on the
very same text and pay for it once; ``seconds`` excludes generating them when they were cached.

    python benchmarks/distill_screen.py PRUNED OUT --lr 3e-3 --steps 100 \\
        --ppl ~/.cache/prunenet/bench-reconstruct/hellaswag-text.txt
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

import prunenet.distillation as distillation
from prunenet.evaluation.evaluate import evaluate
from prunenet.finetune import finetune
from prunenet.io.loading import load_model_and_tokenizer
from prunenet.probe import Probe

CACHE = Path.home() / ".cache" / "prunenet" / "bench-distill"


def cached_generation(model, tokenizer, tokens, seed, recipe, progress=True, label="probe"):
    """:func:`prunenet.probe.generate_probe` through the package's probe cache in CACHE
    (:class:`prunenet.probe.Probe`: keyed by the model's config and weights, the seed, the size
    and the recipe), for :func:`prunenet.distillation.teacher_windows` to call."""
    return Probe(model, tokenizer, tokens, seed, recipe, cache=CACHE, progress=False).ids()


class TrainingLossTrainer(distillation.DistillationTrainer):
    """The package's distillation, with another training loss (:meth:`training_loss` of the
    student's and the teacher's outputs, the teacher in the run's precision); evaluation (and so
    the kept checkpoint) stays the KL on the logits."""

    hidden_states = False  # whether the loss reads every layer's hidden states

    def training_loss(self, student, teacher):
        raise NotImplementedError

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        input_ids = inputs["input_ids"]
        teacher = self.teacher_outputs(input_ids, output_hidden_states=self.hidden_states)
        outputs = model(input_ids=input_ids, output_hidden_states=self.hidden_states)
        loss = self.training_loss(outputs, teacher)
        return (loss, outputs) if return_outputs else loss


class HiddenStateTrainer(TrainingLossTrainer):
    """Training loss ``KL + hidden_weight * mean over layers of ||h_s - h_t||^2 / ||h_t||^2``
    (every layer's output, per token)."""

    hidden_states = True
    hidden_weight = 0.0

    def training_loss(self, student, teacher):
        loss = distillation.kl_to_teacher(student.logits, teacher.logits)
        pairs = list(zip(student.hidden_states[1:], teacher.hidden_states[1:]))
        hidden = sum(((s.float() - t.float()).pow(2).sum(-1) / t.float().pow(2).sum(-1)).mean()
                     for s, t in pairs) / len(pairs)
        return loss + self.hidden_weight * hidden


def top_k_kl(student_logits, teacher_logits, k: int):
    """``KL(teacher || student)`` between the two distributions coarsened to the teacher's ``k``
    most likely tokens plus one bucket for all the others (per position, mean over positions):
    the loss a run could compute from only the teacher's top-k log-probabilities, kept while it
    samples, without a teacher forward per step."""
    vocab = student_logits.shape[-1]
    student = torch.log_softmax(student_logits.float().reshape(-1, vocab), dim=-1)
    teacher = torch.log_softmax(teacher_logits.float().reshape(-1, vocab), dim=-1)
    top, index = teacher.topk(k, dim=-1)
    student_top = student.gather(-1, index)
    masked = student.scatter(-1, index, float("-inf"))
    student_rest = torch.logsumexp(masked, dim=-1)
    teacher_rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))
    inside = (top.exp() * (top - student_top)).sum(-1)
    outside = teacher_rest.exp() * (teacher_rest - student_rest)
    return (inside + outside).mean()


class TopKTrainer(TrainingLossTrainer):
    """Training loss :func:`top_k_kl` (the teacher still runs here: this measures the loss's
    quality, not its speed)."""

    top_k = 64

    def training_loss(self, student, teacher):
        return top_k_kl(student.logits, teacher.logits, self.top_k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pruned")
    parser.add_argument("out")
    parser.add_argument("--temperature", type=float, default=1.0, help="the teacher's sampling")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seqlen", type=int, default=256, help="window length")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train", choices=("lora", "ffn"), default="lora")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=32.0)
    parser.add_argument("--targets", default="attn,mlp")
    parser.add_argument("--hidden-weight", type=float, default=0.0,
                        help="also match every layer's hidden states (relative squared error)")
    parser.add_argument("--teacher-top", type=int, default=0,
                        help="train on the KL over the teacher's top-k tokens plus one bucket")
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                        help="the training step's arithmetic (finetune's precision)")
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows")
    parser.add_argument("--ppl", help="a second evaluation text (a file)")
    parser.add_argument("--log", help="also append the JSON line to this file")
    args = parser.parse_args()
    if args.teacher_top and args.hidden_weight:
        parser.error("--teacher-top and --hidden-weight are separate arms; give one")
    distillation.TEACHER_RECIPE = dataclasses.replace(distillation.TEACHER_RECIPE,
                                                      temperature=args.temperature)
    distillation.generate_probe = cached_generation
    if args.hidden_weight:
        HiddenStateTrainer.hidden_weight = args.hidden_weight
        distillation.DistillationTrainer = HiddenStateTrainer
    if args.teacher_top:
        TopKTrainer.top_k = args.teacher_top
        distillation.DistillationTrainer = TopKTrainer
    lora = (dict(lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                 targets=tuple(args.targets.split(","))) if args.train == "lora" else {})
    started = time.perf_counter()
    finetune(args.pruned, "self-generated", args.out, steps=args.steps, seqlen=args.seqlen,
             generated_windows=args.steps // 2, eval_every=args.steps // 2, eval_windows=4,
             lr=args.lr, train=args.train, patience=None, progress=False,
             precision=args.precision, **lora)
    seconds = time.perf_counter() - started
    model, tokenizer = load_model_and_tokenizer(args.out)
    result = {"temperature": args.temperature, "steps": args.steps, "seqlen": args.seqlen,
              "train": args.train, "lr": args.lr, "seconds": seconds}
    if args.train == "lora":
        result.update(lora_r=args.lora_r, lora_alpha=args.lora_alpha, targets=args.targets)
    if args.hidden_weight:
        result["hidden_weight"] = args.hidden_weight
    if args.teacher_top:
        result["teacher_top"] = args.teacher_top
    if args.precision != "float32":
        result["precision"] = args.precision
    for name, corpus in (("wiki", "wiki"), ("second", args.ppl)):
        if corpus is not None:
            report = evaluate(model, tokenizer, ppl=corpus, windows=args.windows, progress=False)
            result[name] = report["perplexity"]["value"]
    line = json.dumps(result)
    print(line, flush=True)
    if args.log:
        with open(args.log, "a") as log:
            log.write(line + "\n")


if __name__ == "__main__":
    from script_main import run_script

    run_script(main)
