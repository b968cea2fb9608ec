"""Self-distillation without data: the pruned student learns the dense teacher's next-token
distributions on text the teacher writes itself.

teacher (dense model) -> :func:`teacher_windows`: sequences it samples from its BOS token
(seeded, temperature 1, which distils better than the probe's 1.2; held-back ones for
evaluation) -> :class:`DistillationTrainer`: the transformers Trainer whose loss is
``KL(teacher || student)`` on the logits (teacher under ``no_grad``, on the student's device)
and whose evaluation adds the student's perplexity on the teacher's held-back text.
:mod:`prunenet.finetune` does the rest (LoRA or FFN weights, resume, the merged stock
checkpoint, the record) and imports this module only when it distils.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Trainer

from .arithmetic import autocast, exp_or_inf
from .errors import InputError
from .families import check_sequence_length
from .io.loading import MODEL_ALIASES, RECORD_NAME, load_config, load_tokenizer, read_record
from .naming import source_records
from .probe import ProbeRecipe, generate_probe

GENERATION_BATCH = 32  # sequences per generate() call: bounds the KV cache
# The teacher's text: sampled at temperature 1, which distils better than the probe's 1.2
# (benchmarks/README.md, "Recovery without data").
TEACHER_RECIPE = ProbeRecipe(batch_size=GENERATION_BATCH, temperature=1.0)


def kl_to_teacher(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean over token positions of ``KL(p_teacher || p_student)`` (temperature 1, in nats),
    from logits of shape (..., vocab); computed in float32."""
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab), dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def default_teacher(student: str | os.PathLike) -> str:
    """The model the student folder's ``prunenet.json`` says it was pruned from: its
    ``source``, or for a model pruned again from a model prunenet made, the first source of
    that chain (its ``source_history``), the dense model before any pruning. Raises
    :class:`InputError` when there is no record or it names no source."""
    if not (Path(student) / RECORD_NAME).exists():
        raise InputError(f"{student} has no {RECORD_NAME} naming the dense model it was pruned "
                         "from; pass --teacher DENSE")
    record = read_record(student)
    source = next((earlier.get("source") for earlier in source_records(record)
                   if earlier.get("source")), record.get("source"))
    if not source:
        raise InputError(f"{Path(student) / RECORD_NAME} names no source model; pass --teacher "
                         "DENSE")
    path = Path(str(source)).expanduser()
    if str(source) not in MODEL_ALIASES and not path.is_absolute() and path.exists():
        # an earlier version recorded the path as given: relative to a folder now unknown
        raise InputError(f"{Path(student) / RECORD_NAME} names the source {source!r} relative "
                         "to the folder the compression ran in, which may not be this one; "
                         "pass --teacher DENSE")
    return str(source)


def check_teacher(student_config: Any, teacher: str, seqlen: int | None = None,
                  trust_remote_code: bool = False, student_tokenizer: Any = None,
                  origin: str = "--teacher") -> None:
    """Refuse a teacher of another family or vocabulary than the student, one whose tokenizer
    gives tokens other ids than ``student_tokenizer`` does (the same vocabulary size is not the
    same vocabulary: the student would learn the teacher's ids for its own tokens), or one
    whose context is shorter than ``seqlen``, the windows it would write (configs and
    tokenizers only, before any weight loads): :class:`InputError` naming both. A teacher whose
    config does not load (a Hub id offline) is an :class:`InputError` naming ``origin``, where
    the teacher was named (``--teacher``, or the student's record)."""
    try:
        teacher_config = load_config(teacher, trust_remote_code=trust_remote_code)
    except InputError as error:
        raise InputError(f"teacher {teacher} ({origin}): {str(error).rstrip('.')}; pass "
                         "--teacher DENSE") from error
    described = {}
    for role, config in (("teacher", teacher_config), ("student", student_config)):
        described[role] = (getattr(config, "model_type", None), getattr(config, "vocab_size", None))
    if described["teacher"] != described["student"]:
        (teacher_type, teacher_vocab), (student_type, student_vocab) = described.values()
        raise InputError(
            f"teacher {teacher} is a {teacher_type} model with a vocabulary of {teacher_vocab}, "
            f"the student a {student_type} model with a vocabulary of {student_vocab}; distil "
            "from the dense model the student was pruned from (--teacher)"
        )
    teacher_tokenizer = load_tokenizer(teacher, trust_remote_code=trust_remote_code) \
        if student_tokenizer is not None else None
    if teacher_tokenizer is not None:  # a model without a tokenizer has nothing to compare
        student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        differ = sum(student_vocab.get(token) != index for token, index in teacher_vocab.items())
        if differ:
            raise InputError(
                f"teacher {teacher} has another tokenizer than the student: {differ} of its "
                f"{len(teacher_vocab)} tokens are missing from the student's or have other ids; "
                "distil from the dense model the student was pruned from (--teacher)")
    if seqlen is not None:
        check_sequence_length(teacher_config, seqlen, model="teacher")


def teacher_windows(teacher: nn.Module, training: int, evaluation: int, seqlen: int,
                    seed: int, progress: bool = True, precision: str = "float32"
                    ) -> tuple[Tensor, Tensor]:
    """``(training_windows, evaluation_windows)``: ``training`` and ``evaluation`` sequences of
    ``seqlen`` tokens the teacher samples from its BOS token at :data:`TEACHER_RECIPE`'s
    temperature, with the probe's generator (:func:`prunenet.probe.generate_probe`: batches of
    up to :data:`GENERATION_BATCH` with the KV cache, reproducible from ``seed``, a progress bar
    with tokens/s), the teacher computing in ``precision`` (bfloat16: autocast). The first
    ``evaluation`` sequences are held back, never trained on."""
    check_sequence_length(teacher.config, seqlen, model="teacher")  # generate_probe would split
    recipe = dataclasses.replace(TEACHER_RECIPE, sequence_length=seqlen)
    with autocast(next(teacher.parameters()).device, precision):
        sequences = generate_probe(teacher, None, (training + evaluation) * seqlen, seed, recipe,
                                   progress, label="teacher text")
    return sequences[evaluation:], sequences[:evaluation]


class DistillationTrainer(Trainer):
    """The transformers Trainer with ``KL(teacher || student)`` as its loss (``teacher`` under
    ``no_grad``, moved to the training device, in bfloat16 autocast when the run's arguments say
    ``bf16`` as the student's forward is); evaluation also reports ``eval_perplexity``, the
    student's perplexity on the evaluation windows' own tokens (the teacher's text)."""

    def __init__(self, *args: Any, teacher: nn.Module, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        # our loss is a mean per token: the Trainer must divide it by the accumulation steps
        self.model_accepts_loss_kwargs = False
        self._held_out: list[tuple[float, int]] = []

    def teacher_outputs(self, input_ids: Tensor, **kwargs: Any) -> Any:
        """The teacher's forward on ``input_ids`` (no gradients, the run's precision)."""
        precision = "bfloat16" if self.args.bf16 else "float32"
        with torch.no_grad(), autocast(self.args.device, precision):
            return self.teacher(input_ids=input_ids, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids = inputs["input_ids"]
        teacher_logits = self.teacher_outputs(input_ids).logits
        if model.training:
            outputs = model(input_ids=input_ids)
        else:  # the labels (the teacher's own text) give the student's perplexity on it
            outputs = model(input_ids=input_ids, labels=inputs["labels"])
            self._held_out.append((float(outputs.loss), input_ids.shape[0]))
        loss = kl_to_teacher(outputs.logits, teacher_logits)
        return (loss, outputs) if return_outputs else loss

    def evaluation_loop(self, *args: Any, metric_key_prefix: str = "eval", **kwargs: Any):
        self._held_out = []
        output = super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        # each process scored its share of the windows: the sums of every process
        totals = torch.tensor([sum(loss * count for loss, count in self._held_out),
                               sum(count for _, count in self._held_out)],
                              dtype=torch.float64, device=self.args.device)
        loss, windows = self.accelerator.reduce(totals, reduction="sum").tolist()
        output.metrics[f"{metric_key_prefix}_perplexity"] = exp_or_inf(loss / windows)
        return output
