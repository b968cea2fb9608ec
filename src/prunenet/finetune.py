"""Recovery fine-tuning of a pruned model, ending in a stock checkpoint.

pruned folder -> what trains: LoRA adapters on the family's attention / FFN modules (peft), or
the FFN weights themselves -> the transformers Trainer on training windows (evaluation windows
held out, scored periodically, best checkpoint kept, early stopping) of either a corpus (loss:
next-token cross-entropy) or, with ``data="self-generated"``, text the dense teacher writes itself
(loss: KL to the teacher's distributions, :mod:`prunenet.distillation`) -> ``DIR/adapter/`` (LoRA:
a standard PEFT adapter) and, unless ``merge=False``, ``DIR/`` the merged stock checkpoint with the
input's ``prunenet.json`` plus a ``finetune`` entry. Trainer checkpoints (and the teacher's text)
live in ``DIR.work`` beside the output so that an interrupted run resumes from its last saved step;
it is removed once the output is complete.
Multi-GPU runs go through ``accelerate launch -m prunenet finetune ...``: the Trainer distributes
the work, and only the main process writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shlex
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .arithmetic import (
    PRECISIONS,
    accelerator_available,
    check_precision,
    check_seed,
    default_precision,
    exp_or_inf,
    global_generators_kept,
    hash_tensors,
)
from .errors import InputError, NumericalError, OutputError, first_line
from .evaluation.corpora import (
    NAMED_CORPORA,
    check_corpus,
    corpus_read_path,
    load_corpus,
    recorded_corpus,
)
from .families import check_sequence_length, context_length, family_for
from .io.files import (
    Output,
    atomic_file,
    atomic_folder,
    folder_of,
    guard_outputs,
    sibling_path,
    write_json_atomic,
)
from .io.loading import (
    RECORD_NAME,
    copy_terms,
    is_model_output,
    load_config,
    load_model_and_tokenizer,
    load_tokenizer,
    read_record,
    save_plain_checkpoint,
    write_card,
)
from .io.streaming import check_models_fit
from .version import __version__

log = logging.getLogger(__name__)

TARGET_GROUPS = ("attn", "mlp")
SETTINGS_NAME = "prunenet-finetune.json"
GENERATED_NAME = "generated-windows.pt"  # the teacher's text, kept in OUT.work for --resume
SELF_GENERATED = "self-generated"  # the data value that selects self-distillation
TRAINABLE = ("lora", "ffn")
# Defaults per kind of data: what trains, and at which learning rate (benchmarks/README.md).
DEFAULT_TRAIN = {"corpus": "lora", SELF_GENERATED: "lora"}
# LoRA 1e-3: measured better than 2e-4 for runs of 100-200 steps on real text and distilling
# (and level with 3e-3); FFN weights 1e-4 (1e-3 diverges from the teacher, 3e-4 trails LoRA).
DEFAULT_LR = {"lora": 1e-3, "ffn": 1e-4}
# Window length: 256 tokens distil better than 1024 for the same teacher tokens (and sample
# faster); real text keeps the evaluation's 1024.
DEFAULT_SEQLEN = {"corpus": 1024, SELF_GENERATED: 256}
# What a work folder saved before a setting existed ran with, for --resume (the arithmetic,
# prunenet.arithmetic, was float32 before it could be chosen).
EARLIER_SETTINGS = {"precision": "float32"}
# FinetuneConfig fields that only a LoRA run uses (left out of an FFN run's record, refused
# when given to one), and their defaults
DEFAULT_LORA = {"lora_r": 8, "lora_alpha": 32.0, "lora_dropout": 0.05, "targets": TARGET_GROUPS}
LORA_SETTINGS = tuple(DEFAULT_LORA)
TRAINER_SEEDS = 2**32  # the seeds the Trainer's set_seed takes (numpy's legacy generator)


@dataclass(frozen=True)
class FinetuneConfig:
    """Every setting that shapes a fine-tuning run; a resumed run must repeat them exactly.

    ``data`` is a corpus, or ``"self-generated"`` for distillation from the teacher's own text.
    ``train`` is "lora" or "ffn" (the FFN weights themselves); None: :data:`DEFAULT_TRAIN`. ``lr``
    None: :data:`DEFAULT_LR` of what trains; ``seqlen`` None: :data:`DEFAULT_SEQLEN` of the data.
    ``lora_r``, ``lora_alpha``, ``lora_dropout`` and ``targets`` shape the LoRA adapters (None:
    :data:`DEFAULT_LORA`; given with ``train="ffn"``, an :class:`InputError`); ``targets`` holds
    group names of the family entry ("attn", "mlp") and/or module names from those groups.
    ``generated_windows`` (distillation) is how many training sequences the teacher writes;
    None: one per window the run trains on, so none repeats. ``eval_every`` None means four
    evaluations over the run; ``patience`` None or 0 turns early stopping off (the best
    checkpoint is still the one kept).
    ``precision``: "float32", or "bfloat16" (autocast: the weights and the optimizer stay
    float32); None: :func:`prunenet.arithmetic.default_precision` of the device, chosen by
    :func:`finetune`.
    """

    data: str = "wiki"
    steps: int = 200
    seqlen: int | None = None
    batch_size: int = 1
    grad_accum: int = 1
    train: str | None = None
    lr: float | None = None
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    targets: tuple[str, ...] | None = None
    eval_every: int | None = None
    eval_windows: int = 8
    generated_windows: int | None = None
    patience: int | None = 3
    seed: int = 42
    precision: str | None = None

    def __post_init__(self) -> None:
        if self.train is None:
            object.__setattr__(self, "train", DEFAULT_TRAIN[
                SELF_GENERATED if self.distils else "corpus"])
        if self.train not in TRAINABLE:
            raise InputError(f"train must be one of {', '.join(TRAINABLE)}, got {self.train!r}")
        given = [name for name in LORA_SETTINGS if getattr(self, name) is not None]
        if self.train != "lora" and given:
            options = ", ".join("--" + name.replace("_", "-") for name in given)
            raise InputError(f"{options} set{'s' if len(given) == 1 else ''} the LoRA adapters; "
                             f"with train {self.train!r} no adapter trains: drop "
                             f"{'it' if len(given) == 1 else 'them'} or train lora")
        if self.generated_windows is not None and not self.distils:
            raise InputError(f"--generated-windows sets how much text the teacher writes for "
                             f"--data {SELF_GENERATED}; a run on a corpus ({self.data}) "
                             "generates none: drop it")
        for name, value in DEFAULT_LORA.items():  # an FFN run records none of them
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LR[self.train])
        if self.seqlen is None:
            object.__setattr__(self, "seqlen", DEFAULT_SEQLEN[
                SELF_GENERATED if self.distils else "corpus"])
        counts = {"steps": self.steps, "batch_size": self.batch_size,
                  "grad_accum": self.grad_accum, "lora_r": self.lora_r,
                  "eval_windows": self.eval_windows,
                  # None: the default (0 would be taken for it, the record would say 0)
                  **{name: getattr(self, name) for name in ("eval_every", "generated_windows")
                     if getattr(self, name) is not None}}
        for name, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if self.patience is not None and (isinstance(self.patience, bool) or not isinstance(
                self.patience, int) or self.patience < 0):
            raise InputError(f"patience must be 0 (never stop early) or a positive integer, got "
                             f"{self.patience!r}")
        if self.patience == 0:  # never, as --patience 0 (the Trainer's 0 stops at once)
            object.__setattr__(self, "patience", None)
        object.__setattr__(self, "seed", check_seed(self.seed))
        if self.seed >= TRAINER_SEEDS:
            raise InputError(f"seed must be below 2**32 for a fine-tune (the Trainer seeds "
                             f"numpy's generator, which takes no larger seed), got {self.seed}")
        if self.seqlen < 2:
            raise InputError(f"seqlen must be at least 2 tokens, got {self.seqlen}")
        if not self.lr > 0 or not self.lora_alpha > 0:
            raise InputError(
                f"lr and lora_alpha must be positive, got {self.lr} and {self.lora_alpha}"
            )
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0.0 <= self.lora_dropout < 1.0:
            raise InputError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                             f"{self.precision!r}")
        if not self.targets:
            raise InputError("targets is empty; name at least one of: " + ", ".join(TARGET_GROUPS))
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.eval_every is None:
            object.__setattr__(self, "eval_every", max(1, self.steps // 4))

    @property
    def distils(self) -> bool:
        """Whether the run distils the teacher on its own text instead of training on a corpus."""
        return self.data == SELF_GENERATED


@dataclass
class FinetuneResult:
    """The fine-tuned model (merged, or the PEFT model with ``merge=False``) and its record."""

    model: nn.Module
    tokenizer: Any
    record: dict[str, Any]
    out: str | None = None


def lora_target_modules(model: nn.Module, targets: tuple[str, ...] | list[str]) -> list[str]:
    """Module names for LoRA from the family entry of ``model.config.model_type``.

    ``targets`` are group names ("attn", "mlp") or module names listed in those groups. Raises
    :class:`InputError` listing the valid names for anything else, or for a module name the
    model does not contain.
    """
    family = family_for(getattr(model.config, "model_type", None))
    groups = family.lora_targets
    valid = [*groups, *dict.fromkeys(name for names in groups.values() for name in names)]
    modules: list[str] = []
    for target in targets:
        if target in groups:
            modules.extend(groups[target])
        elif target in valid:
            modules.append(target)
        else:
            raise InputError(
                f"LoRA target {target!r} does not exist in the {model.config.model_type} family; "
                f"valid targets: {', '.join(valid)}"
            )
    present = [name for name, _ in model.named_modules()]
    # peft's match: a module whose path is the target or ends with "." and the target
    missing = [target for target in modules
               if not any(name == target or name.endswith("." + target) for name in present)]
    if missing:
        raise InputError(
            f"the model has no module named {', '.join(missing)} although its family lists it; "
            f"choose among: {', '.join(sorted(set(modules) - set(missing))) or 'none'}"
        )
    return list(dict.fromkeys(modules))


def add_lora(model: nn.Module, config: FinetuneConfig) -> nn.Module:
    """Wrap ``model`` in a peft LoRA model on the configured targets; only LoRA weights train."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)  # LoRA A matrices start random: make them reproducible
    lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=lora_target_modules(model, config.targets), bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft reads a property transformers 5 deprecates
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        return get_peft_model(model, lora)


def train_ffn_only(model: nn.Module) -> nn.Module:
    """Freeze every weight of ``model`` but its FFN tensors (the family entry's cuts: the ones
    pruning sliced); returns ``model``."""
    family = family_for(getattr(model.config, "model_type", None))
    ffn_names = tuple(f".{cut.name}" for cut in family.cuts)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(f"{family.layers}.") and name.endswith(ffn_names))
    return model


class WindowDataset(torch.utils.data.Dataset):
    """Token windows (count x seqlen) as causal-LM examples: labels are the inputs."""

    def __init__(self, windows: Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        window = self.windows[index]
        return {"input_ids": window, "labels": window}


FINETUNE_REMEDY = "a shorter --seqlen or fewer --eval-windows"


def corpus_windows(data: str, tokenizer, seqlen: int, eval_windows: int,
                   remedy: str = FINETUNE_REMEDY) -> tuple[Tensor, Tensor]:
    """``(training_windows, evaluation_windows)`` of ``data``: disjoint regions of the corpus.

    Raises :class:`InputError` for a missing corpus, or one too short for one training window or
    for ``eval_windows`` evaluation windows, saying how many tokens it has and, besides more
    text, the ``remedy`` in the options of the command that runs it.
    """
    corpus = load_corpus(data, tokenizer)
    total = corpus.tokens.numel()
    try:
        training = corpus.training_windows(seqlen)
        evaluation = corpus.evaluation_windows(seqlen, eval_windows)
    except InputError as error:
        raise InputError(
            f"{error} (the corpus has {total} tokens in all, half of a small corpus is held out "
            f"for evaluation); give more text, {remedy}"
        ) from error
    return training, evaluation


def _training_arguments(config: FinetuneConfig, work: Path, device: str):
    from transformers import TrainingArguments

    arguments = TrainingArguments(
        output_dir=str(work),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        seed=config.seed,
        eval_strategy="steps",
        eval_steps=config.eval_every,
        save_strategy="steps",
        save_steps=config.eval_every,
        save_total_limit=2,  # the latest (for --resume) and the best (for the output)
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        # --resume continues early stopping's count of evaluations without improvement (the
        # Trainer would start it at 0 again, and train on past where the run had stopped)
        restore_callback_states_from_checkpoint=True,
        logging_steps=max(1, min(10, config.eval_every)),
        report_to="none",
        # bfloat16 with no accelerator is the CPU's: the Trainer must be told, or it refuses
        use_cpu=device == "cpu" or (config.precision == "bfloat16"
                                    and not accelerator_available()),
        remove_unused_columns=False,
        bf16=config.precision == "bfloat16",
        dataloader_num_workers=0,
        dataloader_pin_memory=device != "cpu" and torch.cuda.is_available(),
    )
    # without bf16 the Trainer would take ACCELERATE_MIXED_PRECISION (`accelerate config`):
    # the run computes in the precision its settings and record name, nothing else
    arguments.mixed_precision = "bf16" if config.precision == "bfloat16" else "no"
    return arguments


def _is_run_settings(folder: Path) -> bool:
    """Whether the folder's settings file is one a fine-tune wrote (a JSON object naming the
    run's source, data, steps and targets), not merely a file of that name."""
    try:
        saved = json.loads((folder / SETTINGS_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(saved, dict) and {"source", "data", "steps", "targets"} <= saved.keys()


# A fine-tune's working folder, written as it trains (so it keeps no manifest): its settings
# record, the teacher's text, and the Trainer's checkpoint-N folders of files. A checkpoint the
# Trainer was killed while saving lacks its trainer_state.json (written last): still the
# run's own, never resumed from (removed on --resume).
is_work_folder = folder_of(SETTINGS_NAME, (SETTINGS_NAME, GENERATED_NAME),
                           folders={"checkpoint-*": folder_of(None, ("*",))},
                           check=_is_run_settings)


# Settings whose None means "the default for this data or device": a resumed run that leaves
# them unset takes the checkpoint's value, so a default changed between the two runs cannot
# refuse it.
RESUMED_DEFAULTS = ("train", "lr", "seqlen", "precision", *LORA_SETTINGS)


def resume_command(work: Path) -> str | None:
    """The command that continues the interrupted fine-tune in ``work`` (``OUT.work``), from
    the settings it saved, with --overwrite where ``OUT`` exists (an earlier output the run was
    to replace); None where it holds none readable. (Where the run had written ``OUT``, it was
    stopped while it deleted ``work``: see :func:`finished_run`.)"""
    try:
        saved = _saved_settings(work)
    except InputError:
        return None
    out = work.with_suffix("")
    if work.suffix != ".work" or sibling_path(out, ".work") != work \
            or not isinstance(saved.get("source"), str):
        return None
    from .io.model_card import finetune_command

    tune = {"settings": saved, "merged": saved.get("merge", True), "device": saved.get("device"),
            "distillation": {"teacher": saved["teacher"]} if saved.get("teacher") else None}
    return shlex.join([*finetune_command(tune, saved["source"], str(out)), "--resume",
                       *(["--overwrite"] if out.exists() else [])])


def finished_run(work: Path) -> bool:
    """Whether the fine-tune in ``work`` (``OUT.work``) had written its output: ``OUT`` is
    complete (its record, written last, is there) and written after the run, or its resume,
    saved its settings. An earlier output that the run was to replace (--overwrite) is not."""
    out = work.with_suffix("")
    try:
        return is_model_output(out) and (out / RECORD_NAME).stat().st_mtime_ns >= (
            work / SETTINGS_NAME).stat().st_mtime_ns
    except OSError:  # no record, or no settings: not a finished run
        return False


def _saved_settings(work: Path) -> dict[str, Any]:
    """The settings record of the interrupted run in ``work``, settings it predates at their
    earlier values (:data:`EARLIER_SETTINGS`); :class:`InputError` when there is none to resume."""
    path = work / SETTINGS_NAME
    if not path.exists():
        raise InputError(f"nothing to resume: {work} holds no fine-tuning run; drop --resume")
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path} is not readable JSON; start over with --overwrite "
                         "instead of --resume") from error
    if not isinstance(saved, dict):
        raise InputError(f"{path} is not a fine-tuning settings record; start over with "
                         "--overwrite instead of --resume")
    return {**EARLIER_SETTINGS, **saved}


def _unset_from_checkpoint(settings: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with the :data:`RESUMED_DEFAULTS` left unset taken from the ``saved`` ones
    (the LoRA settings only for a run that trains LoRA: an FFN run's record holds defaults it
    never used)."""
    lora = (settings.get("train") or saved.get("train")) == "lora"
    return {**settings, **{key: saved[key] for key in RESUMED_DEFAULTS
                           if settings.get(key) is None and saved.get(key) is not None
                           and (lora or key not in LORA_SETTINGS)}}


# The run settings that identify what it read (:func:`tensors_digest`): the weights of the
# model and the teacher, the corpus's windows; checked once they are read. A work folder saved
# before they were recorded is not checked.
INPUT_DIGESTS = {"source_weights": ("the model", "weights"),
                 "teacher_weights": ("the teacher", "weights"),
                 "corpus_windows": ("the corpus", "text")}


def tensors_digest(tensors: dict[str, Tensor]) -> str:
    """The sha256 of ``tensors`` (a state dict, token windows): names, dtypes, shapes and bytes.
    Two models of the same shapes (the same model pruned by two methods) differ in it."""
    digest = hashlib.sha256()
    hash_tensors(digest, sorted(tensors.items()))
    return digest.hexdigest()


def _check_same_inputs(work: Path, digests: dict[str, str], saved: dict[str, Any],
                       paths: dict[str, str | None]) -> None:
    """Refuse --resume where a path the interrupted run read now holds another model (the
    input compressed again, by another method) or other text: its checkpoints trained on
    what was there."""
    for key, digest in digests.items():
        if saved.get(key) is not None and saved[key] != digest:
            what, kind = INPUT_DIGESTS[key]
            raise InputError(
                f"--resume: {what} {paths[key]} holds other {kind} than the interrupted run in "
                f"{work} trained on (it was replaced since); start over with --overwrite "
                "instead of --resume"
            )


def _check_work_folder(work: Path, settings: dict[str, Any], saved: dict[str, Any] | None,
                       overwrite: bool) -> None:
    """Refuse to mix runs: a leftover work folder needs --resume (``saved``: its settings, which
    must equal ``settings``, the inputs' digests apart) or --overwrite."""
    if saved is None:
        if work.exists() and not overwrite:
            raise OutputError(
                f"{work} holds an interrupted fine-tuning run; pass --resume to continue it or "
                "--overwrite to start over"
            )
        return
    differences = [
        f"{key}: checkpoint {saved.get(key)!r}, now {settings.get(key)!r}"
        for key in sorted(set(saved) | set(settings))
        if key not in INPUT_DIGESTS and saved.get(key) != settings.get(key)
    ]
    if differences:
        raise InputError(
            "--resume with settings that contradict the checkpoint in "
            f"{work} ({'; '.join(differences)}); repeat the original settings, or start over "
            "with --overwrite instead of --resume"
        )


def _saved_dtype(source: str) -> torch.dtype | None:
    """The checkpoint's own floating dtype (the weights train in float32, whatever the
    precision; the output keeps this one)."""
    dtype = getattr(load_config(source), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def default_seqlen(data: str, model_config: Any) -> int:
    """The window length of a run that sets none: :data:`DEFAULT_SEQLEN` of its data, cut to
    the context of the model ``model_config`` describes, as evaluation cuts its windows."""
    default = DEFAULT_SEQLEN[SELF_GENERATED if data == SELF_GENERATED else "corpus"]
    context = context_length(model_config)
    return default if context is None else min(default, context)


def corpus_as_recorded(data: Any) -> Any:
    """``data`` as the run's settings and record name it: a corpus file or datasets folder by
    its absolute path (the record, and the card's command, say which text from any folder, as
    they name the source); a named corpus, ``self-generated`` and a missing path as given."""
    if not isinstance(data, (str, os.PathLike)) or str(data) in (*NAMED_CORPORA, SELF_GENERATED):
        return data
    return recorded_corpus(str(data))


def check_recovery(source: str | os.PathLike, data: str, steps: int, seqlen: int | None,
                   precision: str | None, device: str, seed: int) -> None:
    """Refuse, before a compression, the recovery ``compress --finetune-steps`` or
    ``--recover-steps`` would refuse after it: its settings (a ``seed`` the Trainer does not
    take included), a precision the device does not
    compute, windows longer than the context of ``source`` (the pruned model keeps it), and a
    corpus that is missing, unreadable or too short for its windows (tokenized by ``source``'s
    tokenizer, which the pruned model keeps)."""
    model_config = load_config(source)
    settings = {"steps": steps, "seqlen": seqlen or default_seqlen(str(data), model_config),
                "precision": precision or default_precision(device), "seed": seed}
    config = FinetuneConfig(data=str(data), **settings)
    check_precision(device, config.precision)
    check_sequence_length(model_config, config.seqlen, option="--finetune-seqlen",
                          model="model")
    if not config.distils:  # the corpus read as the fine-tune will read it: enough windows
        check_corpus(config.data)
        corpus_windows(config.data, load_tokenizer(source), config.seqlen, config.eval_windows,
                       remedy=f"a shorter --finetune-seqlen (the recovery scores finetune's "
                       f"{config.eval_windows} evaluation windows; for fewer, compress without "
                       "--finetune-steps, then run prunenet finetune with --eval-windows)")


def finetune(
    model: str | os.PathLike,
    data: str,
    out: str | os.PathLike,
    *,
    teacher: str | os.PathLike | None = None,
    merge: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    progress: bool = True,
    callbacks: list | tuple = (),
    **settings: Any,
) -> FinetuneResult:
    """Recovery fine-tuning of the model folder ``model`` on ``data``; saves to ``out``.

    ``data`` is a corpus (cross-entropy on its training windows) or ``"self-generated"``:
    distillation from ``teacher`` (default: the ``source`` in ``model``'s prunenet.json) on text
    the teacher samples itself, loss ``KL(teacher || student)``, evaluated on held-back samples.
    ``settings`` are :class:`FinetuneConfig` fields (steps, seqlen, batch_size, grad_accum, train,
    lr, lora_r, lora_alpha, lora_dropout, targets, eval_every, eval_windows, generated_windows,
    patience, seed, precision). ``callbacks`` are extra transformers ``TrainerCallback``
    objects. Returns the merged model (or the PEFT model when ``merge=False``) and the record
    written as ``out/prunenet.json``.

    Raises :class:`InputError` for a ``model`` that is no path (a loaded model: save it first),
    a folder that is not a model, a missing or too short corpus,
    a missing teacher or one of another family or vocabulary, invalid settings or LoRA targets,
    and a ``resume`` whose settings contradict the checkpoint or whose model or teacher now
    holds other weights than it trained on; :class:`OutputError` for an output
    that exists or overlaps an input (the teacher included).

    The global random generators (Python's, numpy's, torch's) are as they were before the call:
    the run seeds them from ``seed``, the caller's later draws do not repeat.
    """
    with global_generators_kept():
        return _finetune(model, data, out, teacher=teacher, merge=merge, resume=resume,
                         overwrite=overwrite, device=device, progress=progress,
                         callbacks=callbacks, **settings)


def _finetune(model: str | os.PathLike, data: str, out: str | os.PathLike, *,
              teacher: str | os.PathLike | None, merge: bool, resume: bool, overwrite: bool,
              device: str, progress: bool, callbacks: list | tuple,
              **settings: Any) -> FinetuneResult:
    """:func:`finetune`, run inside the block that keeps the caller's random generators."""
    from accelerate import PartialState
    from transformers import EarlyStoppingCallback, Trainer, TrainerState
    from transformers.trainer_utils import get_last_checkpoint

    if not isinstance(model, (str, os.PathLike)):
        raise InputError(f"finetune reads a model folder, .gguf file or Hub id, got a "
                         f"{type(model).__name__}: save it (save_pretrained) and pass its folder")
    if not isinstance(out, (str, os.PathLike)):
        raise OutputError(f"--out must be a path, got {out!r}")
    data = corpus_as_recorded(data)
    saved = _saved_settings(sibling_path(out, ".work")) if resume else None
    if saved is not None:
        # a work folder of an earlier version kept the corpus path as given, and no merge
        saved = {**saved, "data": corpus_as_recorded(saved.get("data")),
                 "merge": saved.get("merge", merge)}
        settings = _unset_from_checkpoint(settings, saved)
    if settings.get("precision") is None:
        settings = {**settings, "precision": default_precision(device)}
    model_config = load_config(model)
    if settings.get("seqlen") is None:
        settings = {**settings, "seqlen": default_seqlen(str(data), model_config)}
    config = FinetuneConfig(data=str(data), **settings)
    check_sequence_length(model_config, config.seqlen)  # before anything loads or is written
    if not config.distils:
        check_corpus(config.data)
    check_precision(device, config.precision)
    if config.train == "ffn" and not merge:
        raise InputError("--no-merge keeps a LoRA adapter apart; with --train ffn the output is "
                         "always the full checkpoint: drop --no-merge")
    reads = _model_reads(model)
    source = reads[0]
    teacher_reads = _teacher_reads(source, teacher, config)
    teacher_source = teacher_reads[0] if teacher_reads else None
    if teacher_source in reads:
        raise InputError(f"the teacher {teacher_source} is the model being trained; distil from "
                         "the dense model it was pruned from (--teacher DENSE)")
    out_path, work = guard_outputs(
        [Output(out, "--out", ours=is_model_output),
         Output(sibling_path(out, ".work"), "work folder", working=True, ours=is_work_folder)],
        [*reads, corpus_read_path(data), *teacher_reads], overwrite)
    training_arguments = _training_arguments(config, work, device)
    # the device type trains in: a resume elsewhere (--device cpu or not, on a GPU machine)
    # draws and computes otherwise than the run it continues
    run_settings = {**asdict(config), "targets": list(config.targets), "source": source,
                    "teacher": teacher_source, "merge": merge,
                    "device": training_arguments.device.type}
    if saved is not None:  # a work folder of an earlier version named no device
        saved.setdefault("device", run_settings["device"])
    process = PartialState()
    _check_work_folder(work, run_settings, saved, overwrite)
    tokenizer = load_tokenizer(source)
    if config.distils:
        from .distillation import check_teacher

        check_teacher(model_config, teacher_source, seqlen=config.seqlen,
                      student_tokenizer=tokenizer, origin=_teacher_origin(source, teacher))
    if not config.distils:  # the text is read and cut into windows before any model loads
        training, evaluation = corpus_windows(config.data, tokenizer, config.seqlen,
                                              config.eval_windows)
    check_models_fit([source, *([teacher_source] if config.distils else [])],
                     "prunenet finetune", float32=True)
    loaded, _ = load_model_and_tokenizer(source, dtype=torch.float32, with_tokenizer=False)
    record = read_record(source) if (Path(source) / RECORD_NAME).exists() else {
        "format": "prunenet-compression/1", "prunenet_version": __version__, "source": source}
    # What describes the input's files or weights no longer holds for the output: its GGUF
    # is not rewritten, its measured perplexity was of the weights before training; an earlier
    # fine-tune is kept, nested, rather than replaced.
    superseded = {key: record.pop(key) for key in ("gguf", "evaluation") if key in record}
    earlier = record.pop("finetune", None)
    teacher_model = None
    if config.distils:
        teacher_model, _ = load_model_and_tokenizer(teacher_source, dtype=torch.float32,
                                                    with_tokenizer=False)
    digests = {"source_weights": tensors_digest(loaded.state_dict()),
               **({"teacher_weights": tensors_digest(teacher_model.state_dict())}
                  if config.distils else
                  {"corpus_windows": tensors_digest({"training": training,
                                                     "evaluation": evaluation})})}
    if saved is not None:
        _check_same_inputs(work, digests, saved, {"source_weights": source,
                                                  "teacher_weights": teacher_source,
                                                  "corpus_windows": config.data})
    run_settings.update(digests)
    student = add_lora(loaded, config) if config.train == "lora" else train_ffn_only(loaded)
    student.config.use_cache = False

    process.wait_for_everyone()  # every process has checked the work folder before it changes
    if process.is_main_process:
        if not resume and work.exists():
            shutil.rmtree(work)
        for partial in work.glob("checkpoint-*") if resume else ():
            if not _saved_completely(partial):  # its save was interrupted
                shutil.rmtree(partial)
        work.mkdir(parents=True, exist_ok=True)
        write_json_atomic(work / SETTINGS_NAME, run_settings)
    process.wait_for_everyone()
    checkpoint = get_last_checkpoint(str(work)) if resume else None
    try:
        if teacher_model is not None:
            training, evaluation, generation = _teacher_text(
                teacher_model, config, work, process.num_processes, process.is_main_process,
                progress)

        trainer_callbacks = [*callbacks]
        if config.patience is not None:
            trainer_callbacks.append(
                EarlyStoppingCallback(early_stopping_patience=config.patience))
        arguments = dict(model=student, args=training_arguments,
                         train_dataset=WindowDataset(training),
                         eval_dataset=WindowDataset(evaluation), callbacks=trainer_callbacks)
        if teacher_model is None:
            trainer = Trainer(**arguments)
        else:
            from .distillation import DistillationTrainer

            trainer = DistillationTrainer(teacher=teacher_model, **arguments)
        if not progress:
            from transformers import ProgressCallback

            trainer.remove_callback(ProgressCallback)
        before = _evaluation(trainer.evaluate())
        started = time.perf_counter()
        with warnings.catch_warnings():  # a GGUF source has no config.json for peft to read
            warnings.filterwarnings("ignore", message="Could not find a config file in",
                                    category=UserWarning)
            if checkpoint is not None and _run_ended(Path(checkpoint)):
                # interrupted after its last checkpoint: the Trainer, resumed from it, would
                # train a step past the end; the run's state and best weights are all it needs
                trainer.state = TrainerState.load_from_json(
                    str(Path(checkpoint) / "trainer_state.json"))
                if trainer.state.best_model_checkpoint is not None:
                    trainer._load_best_model()
            else:
                trainer.train(resume_from_checkpoint=checkpoint)
    except Exception as error:
        # A crash (not Ctrl-C, which keeps the folder for --resume) before anything worth
        # resuming was saved leaves no work folder that the next run would call interrupted.
        if process.is_main_process and not _holds_progress(work):
            shutil.rmtree(work, ignore_errors=True)
        if _failed_torch_write(error):
            kept = (f"; the checkpoints saved before are kept in {work} for --resume"
                    if work.is_dir() else "")
            raise OutputError(f"writing the fine-tune's files under {work} failed (torch.save: "
                              f"{first_line(error)}); the disk may be full{kept}") from error
        raise
    seconds = time.perf_counter() - started
    history = list(trainer.state.log_history)
    after = _evaluation(trainer.evaluate())
    _check_finite_run(student, history, after["perplexity"], work)
    _warn_if_worse(before, after, evaluation.shape[0])

    state = trainer.state
    settings_record = {**asdict(config), "targets": list(config.targets)}
    if config.train == "lora":
        settings_record["target_modules"] = sorted(student.peft_config["default"].target_modules)
    else:  # no adapter ran: its settings describe nothing
        for name in LORA_SETTINGS:
            settings_record.pop(name)
    record["finetune"] = {
        "prunenet_version": __version__,
        "source": source,
        "settings": settings_record,
        "trained": "LoRA adapters" if config.train == "lora" else "FFN weights",
        "merged": merge,
        "device": str(trainer.args.device),
        "world_size": trainer.args.world_size,
        "steps_run": state.global_step,
        "best_step": state.best_global_step,
        "resumed_from_step": int(Path(checkpoint).name.split("-")[-1]) if checkpoint else None,
        "train_seconds": round(seconds, 1),
        "training_windows": training.shape[0],
        "evaluation_windows": evaluation.shape[0],
        **{f"eval_{name}_before": value for name, value in before.items()},
        **{f"eval_{name}_after": value for name, value in after.items()},
        "eval_history": [{"step": log["step"], **_evaluation(log)}
                         for log in history if "eval_loss" in log],
        "train_loss": [{"step": log["step"], "loss": log["loss"]}
                       for log in history if "loss" in log],
        **({"input": superseded} if superseded else {}),
        **({"previous": earlier} if earlier else {}),
    }
    if teacher_model is not None:
        from .distillation import TEACHER_RECIPE
        from .probe import starts_from_bos

        start = ("its BOS token" if starts_from_bos(teacher_model, TEACHER_RECIPE)
                 else "a token drawn uniformly from its vocabulary (its config names no BOS)")

        record["finetune"]["distillation"] = {
            "teacher": teacher_source,
            "loss": "kl",
            "direction": "KL(teacher || student) on next-token logits",
            "temperature": 1.0,
            "text": f"sampled by the teacher from {start}, temperature "
                    f"{TEACHER_RECIPE.temperature:g}",
            "generated_tokens": {"training": training.numel(), "evaluation": evaluation.numel()},
            # with the window length, what the sampled tokens depend on
            "generation": generation,
            "evaluation": "the first evaluation_windows sequences, held back (never trained on)",
        }
    if process.is_main_process:
        try:
            with atomic_folder(out_path, overwrite, ours=is_model_output) as staging:
                result_model = _write_output(student, tokenizer, staging, record, source, merge)
        except NumericalError:  # as a diverged run: a resume would end the same
            shutil.rmtree(work, ignore_errors=True)
            raise
        shutil.rmtree(work, ignore_errors=True)
    else:
        result_model = _merged(student) if merge else student
    process.wait_for_everyone()
    return FinetuneResult(result_model.eval(), tokenizer, record, str(out_path))


def _failed_torch_write(error: BaseException) -> bool:
    """Whether ``error`` is torch.save failing to write its file (a full disk): torch raises a
    RuntimeError from its zip writer (``[enforce fail at inline_container.cc...]``)."""
    return isinstance(error, RuntimeError) and "inline_container" in str(error)


def _saved_completely(checkpoint: Path) -> bool:
    """Whether the Trainer finished saving ``checkpoint``: it writes trainer_state.json last,
    and in place (a save killed while writing it leaves it cut short, not JSON)."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(state, dict)


def _run_ended(checkpoint: Path) -> bool:
    """Whether the run had ended at ``checkpoint`` (its last step, or early stopping), before
    its output was written: the Trainer saved it with ``should_training_stop`` set."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    control = (state.get("stateful_callbacks") or {}).get("TrainerControl") or {}
    return bool((control.get("args") or {}).get("should_training_stop"))


def _holds_progress(work: Path) -> bool:
    """Whether ``work`` holds what a --resume would reuse: a completely saved checkpoint, or the
    teacher's generated text."""
    return (work / GENERATED_NAME).is_file() or any(
        _saved_completely(checkpoint) for checkpoint in work.glob("checkpoint-*"))


def _model_reads(model: str | os.PathLike) -> list[str]:
    """The paths the model to train reads, made absolute (first: the folder or .gguf file it
    loads; a model alias names its folder), which no output may touch; a Hub id as is."""
    from .pipeline import input_paths

    return [str(Path(path).resolve()) if Path(path).exists() else path
            for path in input_paths(model)]


def _teacher_reads(student: str, teacher: str | os.PathLike | None,
                   config: FinetuneConfig) -> list[str]:
    """The paths a distillation's teacher reads, which no output may touch: first the local
    path (folder or .gguf file) it loads, or its Hub id; then the folder named around a .gguf.
    The teacher is ``teacher``, else the student record's source; none when the run does not
    distil."""
    if not config.distils:
        if teacher is not None:
            raise InputError(f"--teacher applies to --data {SELF_GENERATED} only (this run trains "
                             f"on {config.data}); drop --teacher")
        return []
    from .distillation import default_teacher

    named = str(teacher) if teacher is not None else default_teacher(student)
    try:
        reads = _model_reads(named)
    except InputError as error:
        raise InputError(f"teacher {named} ({_teacher_origin(student, teacher)}): {error}; "
                         "pass --teacher DENSE") from error
    return reads


def _teacher_origin(student: str, teacher: str | os.PathLike | None) -> str:
    """Where the teacher was named, as a failure to read it says: --teacher, else the
    student's record."""
    return "--teacher" if teacher is not None else f"the source in {student}/{RECORD_NAME}"


def _teacher_text(teacher: nn.Module, config: FinetuneConfig, work: Path, processes: int,
                  main_process: bool, progress: bool) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """The teacher's training and evaluation windows and how they were sampled: sampled once,
    kept in the work folder so that a resumed run trains on the very same text."""
    from .distillation import TEACHER_RECIPE, teacher_windows
    from .probe import SAMPLER

    saved = work / GENERATED_NAME
    if saved.exists():
        kept = torch.load(saved)
        generation = kept.get("generation") or {  # a work folder from before generate_probe
            "seeds": kept.get("seeds"), "sampler": "one seed per batch of 32 sequences"}
        # a work folder without a sampler was sampled by torch.multinomial
        return kept["training"], kept["evaluation"], {**EARLIER_SETTINGS,
                                                      "sampler": "multinomial", **generation}
    # the teacher samples on the CPU (before the Trainer moves it): in bfloat16 only where the
    # CPU computes it natively, whatever the training device's precision
    precision = config.precision if default_precision("cpu") == "bfloat16" else "float32"
    generation = {"seed": config.seed, "batch_size": TEACHER_RECIPE.batch_size,
                  "temperature": TEACHER_RECIPE.temperature, "precision": precision,
                  "sampler": SAMPLER}
    windows = config.generated_windows or (config.steps * config.batch_size * config.grad_accum
                                           * processes)
    training, evaluation = teacher_windows(teacher, windows, config.eval_windows, config.seqlen,
                                           config.seed, progress and main_process, precision)
    if main_process:
        with atomic_file(saved) as staging:
            torch.save({"training": training, "evaluation": evaluation,
                        "generation": generation}, staging)
    return training, evaluation, generation


def _evaluation(metrics: dict[str, float]) -> dict[str, float]:
    """Perplexity (and, distilling, the KL to the teacher) from Trainer evaluation metrics."""
    if "eval_perplexity" in metrics:  # distillation: the loss is the KL
        return {"perplexity": metrics["eval_perplexity"], "kl": metrics["eval_loss"]}
    # Every window has the same length, so exp(mean eval loss) is the token-level perplexity.
    return {"perplexity": exp_or_inf(metrics["eval_loss"])}


def _warn_if_worse(before: dict[str, float], after: dict[str, float], windows: int) -> None:
    """Say so where the output does worse on the held-out windows than the input did: the
    best checkpoint is the best of the evaluations during training, and the input is never
    one of them."""
    measure = "kl" if "kl" in before else "perplexity"
    if after[measure] > before[measure]:
        log.warning("the fine-tuned model does worse than its input on the %d held-out windows "
                    "(%s %.4g -> %.4g); the output is the best checkpoint evaluated during "
                    "training. More steps, a lower --lr or more text may help", windows,
                    "KL to the teacher" if measure == "kl" else "perplexity",
                    before[measure], after[measure])


def _check_finite_run(student: nn.Module, history: list[dict[str, Any]], perplexity: float,
                      work: Path) -> None:
    """Refuse to keep a run whose loss or weights became NaN or Inf (no output, no work)."""
    losses = [log[key] for log in history for key in ("loss", "eval_loss") if key in log]
    bad = _first_non_finite(student)
    if bad is None and all(math.isfinite(value) for value in [*losses, perplexity]):
        return
    shutil.rmtree(work, ignore_errors=True)
    what = f"weight {bad}" if bad is not None else "the loss"
    raise NumericalError(f"fine-tuning diverged: {what} became NaN or Inf; nothing was saved. "
                         "Lower --lr and run again")


def _first_non_finite(model: nn.Module) -> str | None:
    """The name of ``model``'s first parameter that holds NaN or Inf; None where none does."""
    return next((name for name, parameter in model.named_parameters()
                 if not torch.isfinite(parameter).all()), None)


def _merged(student: nn.Module) -> nn.Module:
    """The plain model: LoRA adapters merged into the weights (an FFN-trained model as is)."""
    return student.merge_and_unload() if hasattr(student, "peft_config") else student


def _write_output(student, tokenizer, folder: Path, record: dict[str, Any], source: str,
                  merge: bool) -> nn.Module:
    """``folder/adapter`` (LoRA: PEFT), then the merged checkpoint, then the record (last)."""
    model = student
    if hasattr(student, "peft_config"):
        student.peft_config["default"].base_model_name_or_path = source
        # The vocabulary never changes here, so the base embeddings are not saved with the
        # adapter (peft would look for the base's config.json, which a GGUF source lacks).
        student.save_pretrained(folder / "adapter", save_embedding_layers=False)
    if merge:
        model = _merged(student)
        saved_dtype = _saved_dtype(source)
        if saved_dtype is not None:
            model.to(saved_dtype)
            bad = _first_non_finite(model)
            if bad is not None:  # finite in float32, beyond the range of float16
                raise NumericalError(
                    f"fine-tuning diverged: weight {bad} grew beyond the range of "
                    f"{str(saved_dtype).removeprefix('torch.')}, the input's dtype, and would "
                    "be saved as Inf; nothing was saved. Lower --lr and run again")
        model.config.use_cache = True
        save_plain_checkpoint(model, tokenizer, folder)
    copy_terms(source, folder)
    write_card(folder, record, record.get("source"))
    write_json_atomic(folder / RECORD_NAME, record)
    return model
