"""The verbs: compress(), prune(), train_policy().

Every compression runs the same stages: plan (read the input's name, choose streaming or not,
build the selection method, check every output against every input) -> open the source (a loaded
model, or a streamed checkpoint read tensor by tensor) -> select the kept neurons -> write (slice
and save, or a streamed write) -> record. Settings live in :class:`CompressOptions` and
:class:`~prunenet.selection.prunenet.reinforce.TrainingConfig`, which hold every default once.
"""

from __future__ import annotations

import difflib
import logging
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from . import ffn_statistics
from .arithmetic import check_seed
from .errors import InputError
from .evaluation.corpora import TokenCorpus, check_corpus, corpus_read_path
from .families import check_multiple, checked_ratio, kept_count
from .ffn_statistics import ProbeStatistics
from .io.files import (
    Output,
    folder_of,
    guard_outputs,
    read_manifest,
    scratch_folder,
    sibling_path,
)
from .io.loading import (
    RECORD_NAME,
    declared_ffn_width,
    declared_model_width,
    hub_cache_folder,
    is_model_output,
    load_config,
    load_model_and_tokenizer,
    load_tokenizer,
    read_record,
    recorded_source,
    resolve_source,
    save_compressed,
)
from .io.policy_file import check_policy_name, is_policy_file, load_policy, save_policy
from .io.streaming import (
    PlannedConversion,
    StreamedCheckpoint,
    TensorSpill,
    check_disk_space,
    choose_streaming,
    memory_budget,
    refuse_below,
    write_streamed,
)
from .model_view import (
    FFNView,
    check_finite,
    evaluation_mode,
    layers_from_disk,
    parameters_in_memory,
)
from .naming import reads_seed
from .probe import (
    MIN_TEMPERATURE,
    Probe,
    ProbeRecipe,
    check_probe_prompt,
    check_probe_tokens,
    check_sampler,
    checked_prompt_ids,
    sequence_length_for,
)
from .recording import first_matrix_spectra, is_run_record, write_run_record
from .refit import DEFAULT_RIDGE, refit_layers, refit_model, refit_record
from .selection import (
    DEFAULT_METHOD,
    SELECTORS,
    Selector,
    Source,
    selector_class,
)
from .selection.activation import (
    Activation,
    Calibration,
    calibration_text,
    calibration_windows,
    fitted_calibration,
)
from .selection.prunenet import PruneNet, train_on
from .selection.prunenet.policy import PrunePolicy
from .selection.prunenet.reinforce import (
    TrainingConfig,
    TrainingResult,
    check_resumable,
    check_trainable_ratio,
    is_training_state,
)
from .selection.self_generated import SelfGenerated
from .slicing import slice_model
from .version import __version__

log = logging.getLogger(__name__)

# Probe size measured on SmolLM2 (benchmarks/quality_reconstruct.md); generation is its cost.
DEFAULT_PROBE_TOKENS = 8192
RECONSTRUCT = ("ls", "bias", "none")

# The former second option axis: ``--variant NAME`` named what is now ``--method NAME``.
VARIANT_METHODS = {"reference": PruneNet.name, "self-generated": DEFAULT_METHOD}


@dataclass
class CompressOptions:
    """How to compress; every default is held here once (the command line reads them).

    ``method`` None: the default method, or ``prunenet`` when a policy is given.
    ``probe_tokens`` of the model's own text (sequences of ``probe_length``, sampled at
    ``probe_temperature``, each started with ``probe_prompt`` after BOS) feed the
    ``self-generated`` selection and the refit; ``probe_cache`` keeps them for a later run.
    ``reconstruct`` refits what remains after any selection (:mod:`prunenet.refit`): ``ls`` the
    second FFN matrix by ridge least squares (``ridge`` relative to the Gram's scale), ``bias``
    its bias (FLAP), ``none``. ``format``:
    what the output folder holds: safetensors (a stock checkpoint), gguf (``model.gguf``, cut
    from a .gguf input) or both; ``auto`` is both for a .gguf input, else safetensors.
    ``gguf_down_type``: the type ``model.gguf``'s ``ffn_down`` is requantized to; ``auto``: Q8_0
    for a quantized source, the source's type for a float one (:mod:`prunenet.io.gguf_out`).
    ``round_to``: every layer keeps the multiple of it nearest the ratio's count; None (auto):
    32 when a GGUF is written whose ``ffn_down`` is quantized (whole 32-value blocks keep it
    quantized rather than F16), else 1 (the exact count). ``selection``
    and ``training`` concern ``prunenet`` only, ``calibration`` ``activation`` only.
    """

    method: str | None = None
    seed: int = 42
    device: str = "auto"
    selection: str = "sample"
    training: TrainingConfig = field(default_factory=TrainingConfig)
    calibration: Calibration = field(default_factory=Calibration)
    resume: bool = False
    probe_tokens: int = DEFAULT_PROBE_TOKENS
    probe_length: int = ProbeRecipe.sequence_length
    probe_temperature: float = ProbeRecipe.temperature
    probe_prompt: str = ProbeRecipe.prompt
    probe_sampler: str = ProbeRecipe.sampler
    probe_cache: str | os.PathLike | None = None
    reconstruct: str | None = None  # ls, bias or none; None: ls
    ridge: float = DEFAULT_RIDGE
    format: str = "auto"  # safetensors, gguf or both; auto: both for a .gguf input it can cut
    gguf_down_type: str = "auto"  # auto: Q8_0 for a quantized source, else the source's type
    round_to: int | None = None  # None: 32 when a quantized GGUF is written, else 1
    evaluate_windows: int = 0  # > 0: perplexity on that many wiki windows, kept in the record
    max_memory: int | str | None = None
    trust_remote_code: bool = False
    progress: bool = True
    # the keywords a Python caller named (from_keywords), at their defaults too: those the
    # planned run would not use are refused (unused_setting_rules); the command line names its
    # options itself
    given: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def from_keywords(cls, ratio: float, **keywords: Any) -> CompressOptions:
        """Options from flat keywords: these fields, and :class:`TrainingConfig` fields such as
        ``episodes`` or ``lr``. ``variant`` (deprecated) maps to its method name."""
        variant = keywords.pop("variant", None)
        if variant is not None:
            keywords["method"] = method_of_variant(variant, keywords.get("method"))
        if keywords.get("calibration", 0) is None:
            del keywords["calibration"]  # None: the default calibration
        own = {f.name for f in fields(cls)} - {"training"}
        trained = {f.name for f in fields(TrainingConfig)} - {"ratio", "seed"}
        unknown = set(keywords) - own - trained
        if unknown:
            close = {name: difflib.get_close_matches(name, sorted(own | trained), n=1)
                     for name in sorted(unknown)}
            hints = [f"{name}: did you mean {match[0]}?" for name, match in close.items() if match]
            if "policy" in unknown:  # compress trains its policy; prune applies a given one
                hints.append("policy: prune(model, policy, ratio) applies a trained policy")
            raise InputError(f"unknown option(s): {', '.join(sorted(unknown))}"
                             + (f" ({'; '.join(hints)})" if hints else ""))
        options = cls(**{k: v for k, v in keywords.items() if k in own})
        check_seed(options.seed)  # before the probe, whichever method runs
        options.seed = int(options.seed)  # a numpy integer is recorded as a number
        for name, kind, plain in (("probe_tokens", numbers.Integral, int),
                                  ("probe_length", numbers.Integral, int),
                                  ("round_to", numbers.Integral, int),
                                  ("evaluate_windows", numbers.Integral, int),
                                  ("ridge", numbers.Real, float),
                                  ("probe_temperature", numbers.Real, float)):
            value = getattr(options, name)  # a numpy number runs, and is recorded, as its value
            if isinstance(value, kind) and not isinstance(value, (bool, int, float)):
                setattr(options, name, plain(value))
        options.training = TrainingConfig(ratio=ratio, seed=options.seed,
                                          **{k: v for k, v in keywords.items() if k in trained})
        # resume is refused where nothing resumes with the state it needs (plan_compression)
        options.given = tuple(sorted(k for k, v in keywords.items()
                                     if v is not None and k != "resume"))
        return options


# Probe files, and the hidden staging file and lock of one being written (atomic_file): another
# run writing into the cache now, or one killed while it wrote, leaves them there.
_probe_files_only = folder_of(None, ("probe-*.safetensors", ".probe-*.safetensors.tmp-*",
                                     ".probe-*.safetensors.lock-*"))


def is_probe_cache(folder: Path) -> bool:
    """A probe cache prunenet wrote: probe files only (with the staging file or lock of a probe
    being written), and no manifest (a folder with one is another prunenet output, a model or a
    report, which a probe file would spoil)."""
    return read_manifest(folder) is None and _probe_files_only(folder)


def method_of_variant(variant: str, method: str | None = None, warn: bool = True) -> str:
    """The method a deprecated ``variant`` names (said in a deprecation warning if ``warn``);
    refuses an unknown one or a conflict."""
    if variant not in VARIANT_METHODS:
        raise InputError(f"unknown variant {variant!r}; --variant is deprecated, use --method "
                         f"({', '.join(f'{v} -> {m}' for v, m in VARIANT_METHODS.items())})")
    named = VARIANT_METHODS[variant]
    if method is not None and method != named:
        raise InputError(f"--variant {variant} means --method {named}, which conflicts with "
                         f"--method {method}; give --method only")
    if warn:
        log.warning("--variant is deprecated: --variant %s is --method %s", variant, named)
    return named


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; a clear error for an unavailable device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA GPU is available; use cpu")
    return resolved


def input_path(source: str | os.PathLike) -> str:
    """The local path a MODEL argument reads (the folder, or the .gguf file); a Hub id as is."""
    return input_paths(source)[0]


def input_paths(source: str | os.PathLike) -> list[str]:
    """Every local path a MODEL argument puts off limits to outputs: what it reads (first:
    the folder, or the .gguf file; a Hub id as is, then its repository's folder in the Hugging
    Face cache, where its snapshots are read) and, for a folder that holds a .gguf, that whole
    folder."""
    folder, gguf_file = resolve_source(source)
    if not gguf_file:
        cached = hub_cache_folder(folder) if not Path(folder).exists() else None
        return [folder, *([str(cached)] if cached is not None else [])]
    read = str(Path(folder) / gguf_file)
    return [read, folder] if Path(source).expanduser().is_dir() else [read]


TRAINING_STATE_SUFFIX = ".train-state.pt"


def training_state_path(output: str | os.PathLike) -> Path:
    """Where a run writing ``output`` keeps its resumable training state: a sibling file."""
    return sibling_path(output, TRAINING_STATE_SUFFIX)


def _as_model(model: Any, trust_remote_code: bool = False, with_tokenizer: bool = True):
    if isinstance(model, nn.Module):
        return model, None
    if isinstance(model, (str, os.PathLike)):
        return load_model_and_tokenizer(model, device="cpu", trust_remote_code=trust_remote_code,
                                        with_tokenizer=with_tokenizer)
    raise InputError(f"expected a model or a model path, got {type(model).__name__}")


@dataclass
class CompressionResult:
    model: nn.Module | None  # None when the model was streamed: the result is on disk at ``out``
    tokenizer: Any
    kept_rows: list[Tensor]
    record: dict[str, Any]
    policy: PrunePolicy | None = None
    training: TrainingResult | None = None
    out: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """Everything decided before any work: what to read, how, with which method, where to."""

    model: Any
    source: str | None  # the MODEL argument as given, None for an in-memory model
    ratio: float
    options: CompressOptions
    selector: Selector
    streamed: StreamedCheckpoint | None
    out: str | os.PathLike | None = None
    record_dir: str | os.PathLike | None = None
    policy_out: str | os.PathLike | None = None
    overwrite: bool = False

    formats: tuple[str, ...] = ("safetensors",)
    reconstruct: str = "none"
    round_to: int = 1  # the kept count's multiple (CompressOptions.round_to, resolved)
    # A streamed model that runs (probe, statistics, text): bytes of its layers kept in memory,
    # the others read from disk as they run. None: not run, or in memory.
    resident: int | None = None
    # What the run reads text with: the caller's tokenizer, or the source's as planning read it
    # to check the run's text; None: the model's own, loaded with it.
    tokenizer: Any = None
    evaluation_text: TokenCorpus | None = None  # --eval's corpus, as planning read it
    # The dense model's statistics on the probe, made before and kept (ProbeStatistics.kept):
    # the refit's and selection's, where they are on this run's probe (a compare's runs).
    statistics: ProbeStatistics | None = None
    # The input's own prunenet.json, where prunenet made it: the output's record keeps it.
    source_record: dict[str, Any] | None = None


def make_selector(method: str, options: CompressOptions, policy: PrunePolicy | None = None,
                  state_path: Path | None = None) -> Selector:
    """The selection method ``method`` with its settings from ``options``."""
    cls = selector_class(method)
    if policy is not None and cls is not PruneNet:
        raise InputError(f"method {method!r} uses no policy; use --method prunenet to prune "
                         "with a trained policy")
    if cls is PruneNet:
        return PruneNet(policy, options.training, options.selection, state_path, options.resume)
    if cls is Activation:
        return Activation(options.calibration)
    return cls()


def second_has_bias(model: Any, trust_remote_code: bool = False) -> bool:
    """Whether ``model``'s second FFN matrix has a bias (what ``--reconstruct bias`` adds to):
    read from the model, or for a path from a model of its config on the meta device (no
    weight is read; in float32, as a float8 checkpoint is computed: torch cannot make float8
    its default type, which building a model in the config's type does)."""
    if not isinstance(model, nn.Module):
        from transformers import AutoModelForCausalLM

        config = load_config(model, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                     dtype=torch.float32)
    view = FFNView(model)
    return getattr(view.second_matrix_module(0), "bias", None) is not None


def check_reconstruct(model: Any, reconstruct: str, trust_remote_code: bool = False) -> None:
    """Refuse a refit ``model`` cannot take: an unknown mode, or ``bias`` where its second FFN
    matrix has no bias (read from its config for a path: no weight is loaded)."""
    if reconstruct not in RECONSTRUCT:
        raise InputError(f"unknown --reconstruct {reconstruct!r}; choose from "
                         f"{', '.join(RECONSTRUCT)}")
    if reconstruct == "bias" and not second_has_bias(model, trust_remote_code):
        raise InputError("--reconstruct bias adds the removed neurons' mean output to the bias "
                         "of the second FFN matrix, and this model's has none; use "
                         "--reconstruct ls")


def check_settings(options: CompressOptions, method: str, policy_given: bool) -> bool:
    """Refuse settings no run of ``method`` can take, before any work: the policy training's,
    the probe's, the ridge and --eval's count. :func:`compress` and :func:`select_rows` check
    alike. Returns whether a PruneNet policy trains."""
    options.training.validate()
    trains = selector_class(method) is PruneNet and not policy_given
    if trains:
        check_trainable_ratio(options.training.ratio)
    for name, value in (("--ridge", options.ridge),
                        ("--probe-temperature", options.probe_temperature)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not 0 < value < float("inf"):
            raise InputError(f"{name} must be a positive finite number, got {value!r}")
    if options.probe_temperature < MIN_TEMPERATURE:
        raise InputError(f"--probe-temperature must be at least {MIN_TEMPERATURE:g} (there "
                         f"sampling keeps the likeliest token already), got "
                         f"{options.probe_temperature!r}")
    length = options.probe_length
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise InputError(f"--probe-length must be at least 2 tokens, got {length!r}")
    windows = options.evaluate_windows
    if isinstance(windows, bool) or not isinstance(windows, int) or windows < 0:
        raise InputError(f"evaluate_windows must be 0 (no --eval) or a positive number of "
                         f"windows, got {windows!r}")
    check_probe_tokens(options.probe_tokens)  # read in sizing a planned run's memory
    check_sampler(options.probe_sampler)
    check_probe_prompt(options.probe_prompt)  # a planned run reads it with the tokenizer next
    return trains


# A rule on settings a run would not use: the settings (compress's keywords) and why this run
# does not use them, or None where it does.
UnusedRule = tuple[Sequence[str], str | None]

TRAINING_SETTINGS = ("episodes", "lr", "gamma", "reward", "reward_to_go", "baseline", "kld",
                     "spectral", "precision", "resume")
PROBE_SETTINGS = ("probe_tokens", "probe_length", "probe_temperature", "probe_prompt",
                  "probe_sampler", "probe_cache")


def keyword_spelling(name: str, value: str | None = None) -> str:
    """How a message from Python names a setting (``ridge``), or a setting at a value
    (``reconstruct='ls'``); the command line spells its options instead."""
    return name if value is None else f"{name}={value!r}"


def unused_setting_rules(selector: Selector, options: CompressOptions, reconstruct: str,
                         formats: Sequence[str], recovers: bool = False,
                         spell: Callable[..., str] = keyword_spelling) -> list[UnusedRule]:
    """compress, prune and select_rows: settings of a method, the probe, the refit or the GGUF
    writer that the run (``selector``, refitting with ``reconstruct``, writing ``formats``)
    does not use. ``recovers``: a fine-tune follows (the command line's --finetune-steps,
    --recover-steps), which reads the seed and runs on the device. ``spell`` names another
    setting in a reason, as the caller gives it (:func:`keyword_spelling`)."""
    method = selector.name
    trains = isinstance(selector, PruneNet) and selector.policy is None
    return [
        (TRAINING_SETTINGS, None if trains else
         f"method 'prunenet' with {spell('policy')} uses that policy and trains none"
         if method == PruneNet.name else f"method {method!r} trains no PruneNet policy"),
        *([spectral_rule(options.training.spectral, spell)] if trains else []),
        (("selection",), None if method == PruneNet.name else
         f"only a PruneNet policy's rows are drawn, and the method is {method!r}"),
        (("calibration",), None if method == Activation.name else
         f"calibration text feeds {spell('method', Activation.name)} only, and the method is "
         f"{method!r}"),
        (("ridge",), None if reconstruct == "ls" else
         f"the ridge regularizes {spell('reconstruct', 'ls')}, and this run refits with "
         f"{reconstruct}"),
        (PROBE_SETTINGS, None if generates_probe(method, reconstruct) else
         f"method {method!r} with {spell('reconstruct', 'none')} generates no probe text"),
        (("seed",), None if selector.reads_seed() or reconstruct != "none" or recovers else
         f"method {method!r} with "
         + (f"{spell('policy')}, {spell('selection', 'topk')} and "
            if method == PruneNet.name else "")
         + f"{spell('reconstruct', 'none')} draws nothing at random and generates no probe "
         "text"),
        (("device",), None if method == PruneNet.name or recovers else
         f"method {method!r} runs on the CPU, as the model's own passes do (only a PruneNet "
         f"policy and a recovery fine-tune run on {spell('device')})"),
        (("gguf_down_type",), None if "gguf" in formats else "no model.gguf is written (one "
         "is cut only from a .gguf input of an architecture GGUF output supports, with "
         f"{spell('format')} auto, gguf or both)"),
    ]


def spectral_rule(spectral: str, spell: Callable[..., str] = keyword_spelling) -> UnusedRule:
    """Policy training: the Gram path's float type means nothing to singular values taken
    directly."""
    return (("precision",), None if spectral == "gram" else
            f"it sets the Gram path's float type, and {spell('spectral', 'svd')} takes "
            "singular values directly")


def refuse_unused(rules: Sequence[UnusedRule], named: Callable[[str], list[str]]) -> None:
    """Refuse settings given that this run would not use, before any work: a user who sets
    them expects an effect. ``named``: the names a caller gave one of a rule's settings by
    (none where it was not given); every broken rule is named in the one line."""
    problems = []
    for settings, reason in rules:
        names = [name for setting in settings for name in named(setting)]
        if names and reason is not None:
            one = len(names) == 1
            problems.append(f"{', '.join(names)} {'has' if one else 'have'} no effect here: "
                            f"{reason}; drop {'it' if one else 'them'}")
    if problems:
        raise InputError("; ".join(problems))


def refuse_unused_keywords(options: CompressOptions, rules: Sequence[UnusedRule]) -> None:
    """:func:`refuse_unused` for the keywords a Python caller named."""
    refuse_unused(rules, lambda setting: [setting] if setting in options.given else [])


def plan_compression(model: Any, ratio: float, options: CompressOptions, *,
                     policy: PrunePolicy | str | os.PathLike | None = None,
                     out: str | os.PathLike | None = None,
                     record_dir: str | os.PathLike | None = None,
                     policy_out: str | os.PathLike | None = None,
                     overwrite: bool = False, extra_outputs: Sequence[Output] = (),
                     extra_reads: Sequence[str | os.PathLike] = (),
                     tokenizer: Any = None,
                     before_text: Callable[[Plan], None] | None = None) -> Plan:
    """Decide the run and check it before any work: a bad input, method or output path fails
    here, with nothing written. ``extra_outputs`` and ``extra_reads`` are what a caller will
    write and read after the compression (a fine-tune of its output), checked together.
    ``tokenizer``: the one the run will read text with (None: the model's own).
    ``before_text`` is called with the plan as decided, before the text the run reads (the
    probe prompt, --eval's windows, calibration text) is read and checked, the slowest
    checks: the command line refuses options the run would not use there."""
    source = None if isinstance(model, nn.Module) else str(model)
    reads = input_paths(source) if source is not None else []  # a bad input fails first
    source_record = _source_record(source) if source is not None else None
    if isinstance(policy, (str, os.PathLike)):
        if not str(policy).strip():
            raise InputError("--policy is empty; give the policy file train-policy wrote")
        reads.append(policy)
    reads.append(corpus_read_path(options.calibration.corpus))  # its file, or the cache's
    method = options.method or (PruneNet.name if policy is not None else DEFAULT_METHOD)
    trains = check_settings(options, method, policy is not None)
    if policy_out is not None:
        check_policy_name(policy_out, "--policy-out")
    reconstruct = "ls" if options.reconstruct is None else options.reconstruct
    check_reconstruct(model, reconstruct, options.trust_remote_code)
    runs = selector_class(method).needs_model or reconstruct != "none"
    generates = generates_probe(method, reconstruct)
    streamed = None
    if source is not None:  # reading the checkpoint's header writes nothing
        streamed = choose_streaming(model, options.max_memory, training=trains,
                                    working=partial(working_memory, options, runs, generates)
                                    if runs or options.evaluate_windows else None, convert=True)
    if policy_out is not None and not trains:
        raise InputError(f"--policy-out needs a trained policy: method 'prunenet' without "
                         f"--policy (method {method!r} trains none)")
    state_of = (out if out is not None else policy_out) if trains else None
    if options.resume and state_of is not None:
        check_resumable(training_state_path(state_of))
    guard_outputs([
        probe_cache_output(options),
        Output(out, "--out", ours=is_model_output) if out is not None else None,
        Output(record_dir, "--record", ours=is_run_record) if record_dir is not None else None,
        Output(policy_out, "--policy-out", folder=False, ours=is_policy_file)
        if policy_out is not None else None,
        Output(training_state_path(state_of), "training state", folder=False, working=True,
               ours=is_training_state) if state_of is not None else None,
        *extra_outputs,
    ], [*reads, *extra_reads], overwrite)
    if isinstance(policy, (str, os.PathLike)):
        policy, _ = load_policy(policy)
    state_path = training_state_path(state_of) if state_of is not None else None
    selector = make_selector(method, options, policy, state_path)
    resident = None
    if streamed is not None:
        if out is None:
            raise InputError("a streamed compression writes its result to disk: pass --out")
        # Read once: the default budget is a share of the memory free now, which moves.
        budget = memory_budget(options.max_memory)
        evaluating = evaluation_need(streamed, budget) if options.evaluate_windows else 0
        if runs:  # the model runs, offloaded; its resident layers stay while the output is
            resident = min(resident_bytes(streamed, options, budget, method, reconstruct,
                                          generates),
                           budget - evaluating)  # evaluated
    formats = output_formats(options.format, reads[0] if source is not None else None)
    round_to = kept_multiple(options, formats,
                             reads[0] if out is not None and source is not None else None)
    if streamed is not None:  # before any work, what the run writes beside its output
        check_disk_space(Path(out).expanduser().resolve(),
                         streamed_disk_need(streamed, ratio, round_to, runs and reconstruct
                                            != "none", "gguf" in formats))
    width = declared_ffn_width(source) if source is not None else None
    if width is not None:  # a ratio, --round-to or policy the width cannot take fails before
        kept_count(width, ratio, round_to)  # the load
        if policy is not None:
            policy.check_fits(declared_model_width(source), width)
    plan = Plan(model, source, ratio, options, selector, streamed, out, record_dir, policy_out,
                overwrite, formats, reconstruct, round_to, resident, tokenizer,
                source_record=source_record)
    refuse_unused_keywords(options, unused_setting_rules(selector, options, reconstruct,
                                                          formats))
    if before_text is not None:
        before_text(plan)
    if options.resume and state_of is None:  # the command line refused it in before_text
        raise InputError("resume continues a PruneNet policy's training from the state saved "
                         "beside out or policy_out, and "
                         + ("this run writes neither; give the out of the interrupted run"
                            if trains else f"method {method!r}"
                            + (" with a policy" if method == PruneNet.name else "")
                            + " trains none"))
    return with_checked_text(plan)


def _source_record(source: str) -> dict[str, Any] | None:
    """The ``prunenet.json`` of the folder a MODEL argument reads, where prunenet made it (a
    damaged one is refused, as eval and finetune refuse it); None elsewhere."""
    folder = resolve_source(source)[0]
    return read_record(folder) if (Path(folder) / RECORD_NAME).is_file() else None


def with_checked_text(plan: Plan) -> Plan:
    """``plan`` with the text its run reads checked before the model loads, and kept for the
    run, each read once: the probe prompt (no tokenizer to read it, or too long for the
    probe's sequences cut to the context), --eval's windows of the wiki sample, and method
    activation's calibration text (its corpus, and its windows cut to the model's context;
    tokenized once where it is --eval's corpus too), all read with the plan's tokenizer
    (None: the source's, loaded here and kept). An in-memory model's text is read by the
    run."""
    options, source = plan.options, plan.source
    activation = isinstance(plan.selector, Activation)
    prompt = bool(options.probe_prompt) and generates_probe(plan.selector.name,
                                                             plan.reconstruct)
    if source is None or not (prompt or options.evaluate_windows or activation):
        return plan
    if activation:
        check_corpus(options.calibration.corpus)
    config = load_config(source, options.trust_remote_code)
    tokenizer = plan.tokenizer
    if tokenizer is None:
        tokenizer = load_tokenizer(source, options.trust_remote_code)
    if prompt:
        checked_prompt_ids(tokenizer, ProbeRecipe(sequence_length=options.probe_length,
                                                  prompt=options.probe_prompt),
                           sequence_length_for(config, options.probe_length))
    evaluation_text = None
    if options.evaluate_windows:
        from .evaluation.evaluate import check_evaluation_windows

        evaluation_text = check_evaluation_windows(config, tokenizer, options.evaluate_windows)
    selector = plan.selector
    if activation:
        calibration = fitted_calibration(config, options.calibration)
        options = replace(options, calibration=calibration)
        same = evaluation_text is not None and evaluation_text.name == calibration.corpus
        selector = Activation(calibration, calibration_windows(evaluation_text, calibration)
                              if same else calibration_text(tokenizer, calibration))
    return replace(plan, options=options, selector=selector, tokenizer=tokenizer,
                   evaluation_text=evaluation_text)


def _run_sizes(options: CompressOptions, checkpoint: StreamedCheckpoint
               ) -> tuple[int, int, int, int]:
    # the probe's sequences as generated: --probe-length cut to the model's positions
    length = sequence_length_for(checkpoint.model_config, options.probe_length)
    return (options.probe_tokens, ProbeRecipe.batch_size, length,
            ffn_statistics.GRAM_BUDGET)  # read when used: a benchmark may change it


def generates_probe(method: str, reconstruct: str) -> bool:
    """Whether a run generates the model's own text: the default method selects on it, and
    every refit reads it; method activation without a refit reads its calibration text only."""
    return method == DEFAULT_METHOD or reconstruct != "none"


def run_working_memory(options: CompressOptions, checkpoint: StreamedCheckpoint,
                       generates: bool) -> int:
    """What running the model needs besides its weights: the probe, its statistics and the
    refit where it ``generates`` one, else one calibration window at a time."""
    if not generates:
        return checkpoint.calibration_memory(options.calibration.seqlen)
    return checkpoint.run_working_memory(*_run_sizes(options, checkpoint))


def working_memory(options: CompressOptions, runs: bool, generates: bool,
                   checkpoint: StreamedCheckpoint) -> int:
    """What a run needs besides the weights of ``checkpoint``: running the model where it
    ``runs``, and scoring the output where --eval asks, the larger (one follows the other)."""
    from .evaluation.evaluate import DEFAULT_SEQLEN

    evaluating = (checkpoint.evaluation_memory(1, DEFAULT_SEQLEN) if options.evaluate_windows
                  else 0)
    return max(run_working_memory(options, checkpoint, generates) if runs else 0, evaluating)


def resident_bytes(checkpoint: StreamedCheckpoint, options: CompressOptions, budget: int,
                   method: str, reconstruct: str, generates: bool) -> int:
    """How many bytes of a streamed model's layers may stay in memory while the model runs
    (the probe, the statistics, a method that reads text) offloaded: the budget less what
    the run needs besides them. Refuses a budget below that need, naming it."""
    need = checkpoint.offloaded_memory(run_working_memory(options, checkpoint, generates))
    what = f"method {method!r}" + (f" with --reconstruct {reconstruct}"
                                   if reconstruct != "none" else "")
    streamable = [name for name, cls in SELECTORS.items() if not cls.needs_model]
    refuse_below(budget, need, f": {what} runs {checkpoint.folder} layer by layer and",
                 "one layer, the probe's cache and the refit's statistics" if generates else
                 f"one layer and a calibration window of {options.calibration.seqlen} tokens",
                 f", or use --method {'|'.join(streamable)} --reconstruct none, which read only "
                 "the FFN weights")
    return budget - need


def evaluation_need(checkpoint: StreamedCheckpoint, budget: int) -> int:
    """What --eval needs on a streamed run, whose written output is evaluated with every layer
    read from disk (the source's layers bound the pruned ones). Refuses a budget below it,
    naming it."""
    from .evaluation.evaluate import DEFAULT_SEQLEN

    need = checkpoint.offloaded_memory(checkpoint.evaluation_memory(1, DEFAULT_SEQLEN))
    refuse_below(budget, need, f" for --eval: evaluating the output of {checkpoint.folder} "
                 "layer by layer", f"two layers and the logits of a {DEFAULT_SEQLEN}-token window",
                 ", or leave out --eval and run prunenet eval on the output")
    return need


def evaluate_written(plan: Plan, out: Path, folder: Path) -> dict[str, Any]:
    """--eval on a streamed run: the checkpoint written to ``folder`` (staged, before its
    record), every layer read from disk as it runs, on the text planning read; what joins
    the record."""
    from .evaluation.evaluate import evaluate

    options = plan.options
    with scratch_folder(out) as scratch:
        model, tokenizer = load_model_and_tokenizer(
            folder, trust_remote_code=options.trust_remote_code, offload=(0, scratch),
            staged=True, with_tokenizer=plan.evaluation_text is None)
        measured = evaluate(model, tokenizer, ppl=plan.evaluation_text or "wiki",
                            windows=options.evaluate_windows,
                            progress=options.progress)["perplexity"]
    return {"evaluation": evaluation_entry(measured)}


def evaluation_entry(measured: dict[str, Any]) -> dict[str, Any]:
    """The record's ``evaluation`` of --eval: the perplexity, and the weights it is of
    (``weights``): the pruned checkpoint's (``safetensors``, in float), also where only
    ``model.gguf`` is kept; never ``model.gguf``, whose ``ffn_down`` is requantized after."""
    return {"perplexity": measured, "weights": "safetensors"}


def kept_multiple(options: CompressOptions, formats: tuple[str, ...], written_from: str | None
                  ) -> int:
    """The multiple every layer's kept count is rounded to: ``options.round_to`` when given,
    else 32 where a GGUF is written (from ``written_from``) whose ``ffn_down`` is written
    quantized, else 1. Refuses an unknown ``gguf_down_type``."""
    from .io.gguf_out import WRITABLE_TYPES, block_multiple

    down_type = options.gguf_down_type
    if down_type not in ("auto", *WRITABLE_TYPES):
        raise InputError(f"unknown --gguf-down-type {down_type!r}; choose from auto, "
                         f"{', '.join(WRITABLE_TYPES)}")
    round_to = options.round_to
    if round_to is not None:
        check_multiple(round_to)
        return round_to
    if "gguf" not in formats or written_from is None:
        return 1
    return block_multiple(written_from, None if down_type == "auto" else down_type)


FORMATS = ("auto", "safetensors", "gguf", "both")
GGUF_NAME = "model.gguf"


def output_formats(fmt: str, read_path: str | None) -> tuple[str, ...]:
    """What the output folder holds for ``--format fmt`` and the input path; a GGUF output is
    checked here (its source must be a .gguf file the writer can cut), before any work."""
    if fmt not in FORMATS:
        raise InputError(f"unknown --format {fmt!r}; choose from {', '.join(FORMATS)}")
    from .io.gguf_out import gguf_output_supported

    is_gguf = read_path is not None and read_path.lower().endswith(".gguf")
    if fmt == "auto":
        if not is_gguf:
            return ("safetensors",)
        try:  # both where the GGUF can be cut, else what can be written
            gguf_output_supported(read_path)
        except InputError as error:
            log.warning("--format auto writes safetensors only: %s", error)
            return ("safetensors",)
        return ("safetensors", "gguf")
    formats = ("safetensors", "gguf") if fmt == "both" else (fmt,)
    if "gguf" in formats:
        if not is_gguf:
            raise InputError(f"--format {fmt} writes a model.gguf cut from the input's own "
                             "GGUF file, and this input is not one; write safetensors "
                             "(--format safetensors) and convert it with llama.cpp's "
                             "convert_hf_to_gguf.py")
        gguf_output_supported(read_path)
    return formats


def check_finite_parameters(model: nn.Module) -> None:
    """Raise naming the first parameter that holds NaN or Inf: nothing is pruned from, or
    written for, a damaged model (an offloaded one is read a layer at a time; a streamed one
    is also checked tensor by tensor as it is copied)."""
    for name, parameter in parameters_in_memory(model):
        check_finite(name, parameter)


def run_compression(plan: Plan) -> CompressionResult:
    """Open the source, select, write and record, as ``plan`` says. A GGUF planned for
    streaming is first converted into a scratch folder beside the output, one layer at a
    time, and the checkpoint written there is streamed (the scratch folder is removed
    whatever happens)."""
    if isinstance(plan.streamed, PlannedConversion):
        from .io.gguf_convert import convert_gguf

        planned = plan.streamed
        with scratch_folder(Path(plan.out).expanduser().resolve()) as scratch:
            log.info("converting %s to float32 safetensors beside the output, one layer at a "
                     "time, to read it from disk as it runs", planned.gguf)
            converted = StreamedCheckpoint(convert_gguf(planned.gguf, scratch / "converted",
                                                        progress=plan.options.progress))
            # What the plan sized: every weight the config declares, in its shape (a GGUF
            # holding fewer blocks than its header promises is refused here).
            converted.check_weights()
            return run_compression(replace(plan, streamed=converted))
    if plan.resident is None:  # a model given in training mode runs without dropout
        with evaluation_mode(plan.model if isinstance(plan.model, nn.Module) else None):
            return _compress(plan)
    # A streamed model that runs: offloaded, its refitted matrices set aside until the write.
    with scratch_folder(Path(plan.out).expanduser().resolve()) as scratch:
        (scratch / "offload").mkdir()
        (scratch / "refit").mkdir()
        model, tokenizer = load_model_and_tokenizer(
            plan.streamed.folder, trust_remote_code=plan.options.trust_remote_code,
            offload=(plan.resident, scratch / "offload"), with_tokenizer=plan.tokenizer is None)
        return _compress(plan, tokenizer, model, TensorSpill(scratch / "refit"))


def _compress(plan: Plan, tokenizer: Any = None, offloaded: nn.Module | None = None,
              spill: TensorSpill | None = None) -> CompressionResult:
    options = plan.options
    device = resolve_device(options.device)
    tokenizer = plan.tokenizer if tokenizer is None else tokenizer
    if plan.streamed is not None:
        model, weights = offloaded, plan.streamed
        if model is not None:
            check_finite_parameters(model)
            log.info("running %s with %d of its %d layers read from disk as they run",
                     plan.streamed.folder, layers_from_disk(model), weights.num_layers)
    else:
        model, loaded_tokenizer = _as_model(plan.model, options.trust_remote_code,
                                            with_tokenizer=tokenizer is None)
        tokenizer = loaded_tokenizer if tokenizer is None else tokenizer
        check_finite_parameters(model)
        weights = FFNView(model)
    kept = kept_count(weights.d_ff, plan.ratio, plan.round_to)
    exact = kept_count(weights.d_ff, plan.ratio)
    if kept != exact:
        log.warning("keeping %d of %d FFN neurons per layer (ratio %.4f), the multiple of %d "
                    "nearest ratio %g%s; --round-to 1 keeps %d", kept, weights.d_ff,
                    1 - kept / weights.d_ff, plan.round_to, plan.ratio,
                    ": whole blocks keep model.gguf's ffn_down quantized"
                    if plan.options.round_to is None else "", exact)
    selector = plan.selector
    if isinstance(selector, PruneNet) and selector.policy is not None:
        selector.policy.check_fits(weights.d_model, weights.d_ff)
    evaluation_text = plan.evaluation_text  # an in-memory model's is read here, before any slice
    if options.evaluate_windows and evaluation_text is None and plan.streamed is None:
        from .evaluation.evaluate import check_evaluation_windows

        evaluation_text = check_evaluation_windows(model.config, tokenizer,
                                                   options.evaluate_windows)
    probe = None
    if model is not None and generates_probe(selector.name, plan.reconstruct):
        probe = run_probe(model, tokenizer, options)
    statistics = None  # one pass over the probe serves the selection and the refit
    if plan.reconstruct != "none" and model is not None:
        statistics = plan.statistics
        if statistics is None or not statistics.reads(probe.ids()):
            statistics = ProbeStatistics(model, probe.ids(), progress=options.progress)
    source = Source(weights, model, tokenizer, device, options.progress, probe,
                    statistics.every_layer if statistics is not None else None)
    policy_file = None  # what --policy-out gets, described before the model is sliced
    if isinstance(selector, PruneNet):
        selector.train(source)
        if plan.policy_out is not None:
            policy_file = policy_metadata(model if model is not None else weights,
                                          selector.training)
    original_spectra = first_matrix_spectra(weights) if plan.record_dir is not None else None
    before = weights.parameter_counts()
    rows = selector.select(source, kept, options.seed)
    pruned_spectra = (first_matrix_spectra(weights, rows) if plan.record_dir is not None
                      else None)  # before any slice; a streamed model reads its layers again
    refit = None
    if plan.reconstruct != "none" and spill is not None:
        refit = spill_refit(model, rows, statistics, plan.reconstruct, options.ridge, spill)
    elif plan.reconstruct != "none":
        refit = refit_model(model, rows, statistics.with_grams(), plan.reconstruct,
                            options.ridge)
    if plan.streamed is None:
        slice_model(model, rows)
        after = FFNView(model).parameter_counts()
    else:
        after = weights.parameter_counts(kept)
    record = compression_record(plan, selector, before, after, weights.d_ff, kept, device)
    if options.evaluate_windows and plan.streamed is None:  # a streamed output: as written
        from .evaluation.evaluate import evaluate

        measured = evaluate(model, tokenizer, ppl=evaluation_text,
                            windows=options.evaluate_windows,
                            progress=options.progress)["perplexity"]
        record["evaluation"] = evaluation_entry(measured)
    if probe is not None:
        record["probe"] = probe.record()
    if not reads_seed(record):  # nothing was drawn from it: null, as the card and report read it
        record["seed"] = None
    record["reconstruct"] = refit if refit is not None else {"mode": "none"}
    saved = None
    if plan.out is not None:
        if plan.streamed is not None:
            out = Path(plan.out).expanduser().resolve()
            saved = str(write_streamed(weights, rows, out, record, plan.overwrite,
                                       options.progress, spill,
                                       measure=_staged_work(plan, rows, out),
                                       source=input_path(plan.source)))
        else:
            reads = input_paths(plan.source) if plan.source else []
            saved = str(save_compressed(model, tokenizer, plan.out, record, plan.overwrite,
                                        reads, safetensors="safetensors" in plan.formats,
                                        also=_gguf_writer(reads, model, rows,
                                                          options.gguf_down_type)
                                        if "gguf" in plan.formats else None))
    if policy_file is not None:  # with the output, not before: a failed run writes neither
        save_policy(selector.policy, plan.policy_out, policy_file, plan.overwrite)
    if plan.record_dir is not None:
        training = selector.training if isinstance(selector, PruneNet) else None
        write_run_record(plan.record_dir, pruned_spectra, rows, record, original_spectra, training,
                         plan.overwrite)
    policy = selector.policy if isinstance(selector, PruneNet) else None
    training = selector.training if isinstance(selector, PruneNet) else None
    if training is not None and selector.state_path is not None:
        Path(selector.state_path).unlink(missing_ok=True)  # finished: nothing left to resume
    return CompressionResult(model if plan.streamed is None else None, tokenizer, rows, record,
                             policy, training, saved)


def streamed_disk_need(streamed: StreamedCheckpoint, ratio: float, round_to: int | None,
                       refits: bool, gguf: bool) -> int:
    """The bytes a streamed run writes on its output's disk, at most: the output (no larger
    than the input's weights), the refitted second matrices set aside until the write (float32
    at most, :func:`spill_refit`) and, for a GGUF converted first, the conversion (float32)
    and the pruned model.gguf (no larger than the source file)."""
    need = streamed.weight_bytes
    if refits:
        kept = kept_count(streamed.d_ff, ratio, round_to or 1)
        need += 4 * streamed.num_layers * streamed.d_model * (kept + 1)  # and the bias
    if isinstance(streamed, PlannedConversion):
        need += streamed.weight_bytes + (streamed.gguf.stat().st_size if gguf else 0)
    return need


def spill_refit(model: nn.Module, rows: list[Tensor], statistics: ProbeStatistics, mode: str,
                ridge: float, spill: TensorSpill) -> dict:
    """The refit of an offloaded model: each layer's refitted second matrix, cut to the kept
    neurons in the checkpoint's layout, and its bias, set aside in ``spill`` for the streamed
    write (the model is not changed). Returns the refit's record."""
    view = FFNView(model)
    family, second = view.family, view.second_cut
    layers = []
    for index, columns, new_bias, layer in refit_layers(view, rows, statistics.with_grams(),
                                                        mode, ridge):
        spill.put(family.tensor_name(index, second), columns if second.axis == 1 else columns.T)
        if new_bias is not None:
            spill.put(f"{family.layers}.{index}.{view.second_module_name}.bias", new_bias)
        layers.append(layer)
    return refit_record(mode, ridge, layers)


def _staged_work(plan: Plan, rows: list[Tensor], out: Path):
    """What a streamed run does with its output once the checkpoint is staged, before the card
    and the record: ``model.gguf`` cut from the GGUF source, with the staged FFN tensors;
    --eval; and, where only GGUF is asked for, the staged checkpoint removed again. Returns
    the work (staged folder -> what joins the record), or None."""
    work = []
    if "gguf" in plan.formats:
        work.append(_gguf_writer(input_paths(plan.source), None, rows,
                                 plan.options.gguf_down_type))
    if plan.options.evaluate_windows:
        work.append(partial(evaluate_written, plan, out))
    if "safetensors" not in plan.formats:
        work.append(_keep_only_gguf)
    if not work:
        return None

    def run(folder: Path) -> dict[str, Any]:
        record: dict[str, Any] = {}
        for step in work:
            record.update(step(folder))
        return record

    return run


def _keep_only_gguf(folder: Path) -> dict[str, Any]:
    """Remove from a staged output everything but ``model.gguf`` (the card and record follow)."""
    for path in folder.iterdir():
        if path.name != GGUF_NAME:
            path.unlink()
    return {}


class StagedTensors:
    """A staged checkpoint's tensors by their model names, read from disk when asked for: what
    :func:`~prunenet.io.gguf_out.write_pruned_gguf` reads from a model."""

    def __init__(self, folder: Path) -> None:
        self.checkpoint = StreamedCheckpoint(folder, staged=True)
        self.config = SimpleNamespace(model_type=self.checkpoint.model_type)

    def get_parameter(self, name: str) -> Tensor:
        return self.checkpoint.tensor(name)


def _gguf_writer(reads: list[str], model: nn.Module | None, rows: list[Tensor], down_type: str):
    """Writes the pruned model as ``model.gguf`` cut from its GGUF source (``ffn_down`` as
    ``down_type``, ``auto``: the writer's default) into a folder; returns its record, which
    names the type ``auto`` chose (``auto`` where it chose several), so that the card's command
    repeats the file under another default. Without ``model``, the FFN tensors are the
    checkpoint staged in that folder (a streamed run)."""
    from .io.gguf_out import write_pruned_gguf

    def write(folder: Path) -> dict[str, Any]:
        report = write_pruned_gguf(reads[0], StagedTensors(folder) if model is None else model,
                                   rows, folder / GGUF_NAME,
                                   None if down_type == "auto" else down_type)
        # a type other than the one asked for (a width that cuts its blocks) is said now
        log.log(logging.WARNING if report["substituted"] else logging.INFO, "%s: %s",
                GGUF_NAME, report["summary"])
        return {"gguf": {key: value for key, value in report.items()
                         if key not in ("out_file", "summary")}
                | {"file": GGUF_NAME, "down_type": report["down_type"] or down_type}}

    return write


def compression_record(plan: Plan, selector: Selector, before: dict, after: dict, d_ff: int,
                       kept: int, device: torch.device) -> dict[str, Any]:
    """The ``prunenet.json`` content: what ran (the method's own name), on what, with what.
    ``device``: where a PruneNet policy trained and drew its rows (a CPU and a CUDA generator
    draw different numbers from one seed), recorded for that method only; the others run on
    the CPU whatever --device says (null)."""
    return {
        "format": "prunenet-compression/1",
        "prunenet_version": __version__,
        "method": selector.name,
        "ratio": plan.ratio,
        "seed": plan.options.seed,  # made null once the record shows nothing read it
        "device": device.type if isinstance(selector, PruneNet) else None,
        "selection": None,
        "ffn_width_before": d_ff,
        "ffn_width_after": kept,
        "round_to": plan.round_to,
        "parameters_before": before["total"],
        "parameters_after": after["total"],
        "ffn_parameters_before": before["ffn"],
        "ffn_parameters_after": after["ffn"],
        "parameter_reduction": 1 - after["total"] / before["total"],
        "source": recorded_source(plan.source) if plan.source is not None else None,
        "policy_sha256": None,
        **selector.record(),
        # how the input was made, where prunenet made it: this record's sizes are relative to it
        **({"source_history": plan.source_record} if plan.source_record is not None else {}),
    }


def compress(model: Any, ratio: float = 0.3, *, out: str | os.PathLike | None = None,
             policy_out: str | os.PathLike | None = None,
             record_dir: str | os.PathLike | None = None, overwrite: bool = False,
             tokenizer: Any = None, **options: Any) -> CompressionResult:
    """Remove the fraction ``ratio`` of FFN neurons of every layer of ``model``.

    ``model``: a loaded transformers model (sliced in place) or anything
    :func:`~prunenet.io.loading.load_model_and_tokenizer` reads (folder, GGUF file, alias, Hub
    id). ``options``: :class:`CompressOptions` fields (``method``, ``seed``, ``device``,
    ``selection``, ``calibration``, ``max_memory``, ...) and :class:`TrainingConfig` fields
    (``episodes``, ``lr``, ...) for ``method="prunenet"``.

    ``out`` saves a stock checkpoint with ``prunenet.json``; ``policy_out`` the trained policy;
    ``record_dir`` the run's data for ``prunenet report``. A local safetensors folder that would
    not fit ``max_memory`` is streamed (same result; ``result.model`` is None).
    Raises :class:`~prunenet.errors.InputError` / ``OutputError`` before any work for a bad
    input, method, ratio or output path, and for an option named that the run would not use
    (``ridge`` where nothing refits with ``ls``: :func:`unused_setting_rules`).
    """
    ratio = checked_ratio(ratio)  # a numpy number runs, and is recorded, as its value
    plan = plan_compression(model, ratio, CompressOptions.from_keywords(ratio, **options),
                            out=out, record_dir=record_dir, policy_out=policy_out,
                            overwrite=overwrite, tokenizer=tokenizer)
    return run_compression(plan)


def prune(model: Any, policy: PrunePolicy | str | os.PathLike | None = None, ratio: float = 0.3,
          *, out: str | os.PathLike | None = None, record_dir: str | os.PathLike | None = None,
          overwrite: bool = False, tokenizer: Any = None,
          statistics: ProbeStatistics | None = None, selector: Selector | None = None,
          **options: Any) -> CompressionResult:
    """:func:`compress` with a trained ``policy`` (object or policy file): PruneNet without
    training, at any ``ratio``. Without a policy, ``options["method"]`` selects as compress.
    ``statistics``: the dense model's, kept (:meth:`ProbeStatistics.kept`) on the probe this
    run makes, for ``model`` a copy of that dense model: the refit reads them instead of
    running the model over the probe again (they are not used for another probe).
    ``selector``: the method's selector, made before and holding what it read of that dense
    model (an :class:`Activation` with its norms), used instead of a new one."""
    ratio = checked_ratio(ratio)
    plan = plan_compression(model, ratio, CompressOptions.from_keywords(ratio, **options),
                            policy=policy, out=out, record_dir=record_dir, overwrite=overwrite,
                            tokenizer=tokenizer)
    if selector is not None:
        if type(selector) is not type(plan.selector):
            raise ValueError(f"a {selector.name} selector given for method "
                             f"{plan.selector.name!r}")
        plan = replace(plan, selector=selector)
    return run_compression(replace(plan, statistics=statistics))


def select_rows(model: nn.Module, ratio: float, *, tokenizer: Any = None,
                policy: PrunePolicy | None = None, **options: Any) -> list[Tensor]:
    """Kept neuron indices per layer of a loaded ``model`` (sorted, distinct, the same count in
    every layer), without slicing it. ``options`` as :func:`compress`; a setting it refuses
    raises the same :class:`~prunenet.errors.InputError` here, and so does one this selection
    would not use (it refits and writes nothing: ``ridge``, ``gguf_down_type``)."""
    ratio = checked_ratio(ratio)
    settings = CompressOptions.from_keywords(ratio, **options)
    method = settings.method or (PruneNet.name if policy is not None else DEFAULT_METHOD)
    check_settings(settings, method, policy is not None)  # what compress refuses
    selector = make_selector(method, settings, policy)
    # no refit, and nothing written
    refuse_unused_keywords(settings, unused_setting_rules(selector, settings, "none", ()))
    view = FFNView(model)
    with evaluation_mode(model):  # as compress runs it
        probe = None
        if isinstance(selector, SelfGenerated):
            guard_outputs([probe_cache_output(settings)], [], overwrite=False)
            probe = run_probe(model, tokenizer, settings)
        source = Source(view, model, tokenizer, resolve_device(settings.device),
                        settings.progress, probe)
        return selector.select(source, kept_count(view.d_ff, ratio, settings.round_to or 1),
                               settings.seed)


def probe_cache_output(options: CompressOptions) -> Output | None:
    """The ``--probe-cache`` folder as an output to check before any work (None without one)."""
    if options.probe_cache is None:
        return None
    return Output(options.probe_cache, "--probe-cache", working=True, ours=is_probe_cache)


def run_probe(model: nn.Module, tokenizer: Any, options: CompressOptions) -> Probe:
    """The run's probe as ``options`` describe it (size, sequence length, temperature, prompt,
    seed, cache): the same text for :func:`compress` and :func:`select_rows`."""
    return Probe(model, tokenizer, options.probe_tokens, options.seed,
                 ProbeRecipe(sequence_length=options.probe_length,
                             temperature=options.probe_temperature,
                             prompt=options.probe_prompt, sampler=options.probe_sampler),
                 options.probe_cache,
                 options.progress)


def train_policy(model: Any, ratio: float = 0.3, *, device: str | torch.device = "auto",
                 progress: bool = True, state_path: str | os.PathLike | None = None,
                 resume: bool = False, max_memory: int | str | None = None,
                 **training: Any) -> TrainingResult:
    """Train a PruneNet policy on ``model``'s FFN weights at compression ``ratio``.

    ``training``: :class:`TrainingConfig` fields (episodes, lr, seed, gamma, reward, ...).
    ``state_path`` keeps the training state after every episode so that ``resume=True``
    continues an interrupted run; it is checked as every output is, before the model loads:
    never an input nor inside one, and an existing file there only a training state. A
    safetensors folder that would not fit ``max_memory`` is streamed one layer at a time.
    Returns a :class:`TrainingResult`.
    """
    config, run_device = check_training(model, ratio, device, **training)
    if state_path is not None:
        guard_outputs([Output(state_path, "state_path", folder=False, working=True,
                              ours=is_training_state)],
                      input_paths(model) if isinstance(model, (str, os.PathLike)) else [],
                      overwrite=False)
    if resume:
        check_resumable(state_path)
    streamed = choose_streaming(model, max_memory, training=True)
    if streamed is not None:
        weights, in_memory = streamed, False
    else:
        weights, in_memory = FFNView(_as_model(model)[0]), True
    kept_count(weights.d_ff, ratio)
    return train_on(weights, config, run_device, in_memory=in_memory, progress=progress,
                    state_path=state_path, resume=resume)


def check_training(model: Any, ratio: float, device: str | torch.device = "auto",
                   **training: Any) -> tuple[TrainingConfig, torch.device]:
    """Refuse, before ``model`` loads, a policy training that cannot run: settings out of
    range, ratio 0, a device this machine lacks, or a ratio that keeps no neuron of the FFN
    width a path's config.json or GGUF header declares. Returns the settings and the device."""
    known = {f.name for f in fields(TrainingConfig)} - {"ratio"}
    unknown = set(training) - known
    if unknown:  # as compress refuses them, not a TypeError from the dataclass
        raise InputError(f"unknown option(s): {', '.join(sorted(unknown))}; train_policy takes "
                         f"{', '.join(sorted(known))}, device, progress, state_path, resume "
                         "and max_memory")
    ratio = checked_ratio(ratio)  # recorded in the policy's metadata as it ran
    config = TrainingConfig(ratio=ratio, **training)
    config.validate()
    check_trainable_ratio(config.ratio)
    run_device = resolve_device(device)
    width = declared_ffn_width(model) if isinstance(model, (str, os.PathLike)) else None
    if width is not None:
        kept_count(width, ratio)
    return config, run_device


def policy_metadata(model: Any, training: TrainingResult) -> dict[str, Any]:
    """What a policy file stores with the policy: the shapes and model it fits, how it trained."""
    streamed = isinstance(model, StreamedCheckpoint)
    view = model if streamed else FFNView(model)
    return {
        "d_model": view.d_model,
        "d_ff": view.d_ff,
        "model_type": model.model_type if streamed else model.config.model_type,
        "num_layers": view.num_layers,
        "trained_ratio": training.config.ratio,
        "episodes": training.config.episodes,
        "seed": training.config.seed,
        "lr": training.config.lr,
        "config": vars(training.config),
        "device": training.device,
        "best_episode": training.best_episode,
        "history": [
            {"episode": r.episode, "total_reward": r.total_reward, "mean_ks": r.mean_ks,
             "loss": r.loss}
            for r in training.history
        ],
        "prunenet_version": __version__,
    }
