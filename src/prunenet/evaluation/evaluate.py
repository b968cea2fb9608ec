"""One evaluation of one model: perplexity, zero-shot accuracy, size and speed, as a JSON-able dict.

The dict always has the same keys (``SCHEMA_KEYS``); a part that was not asked for is ``None``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..errors import InputError
from ..families import check_sequence_length, context_length
from ..io.loading import RECORD_NAME, load_model_and_tokenizer, read_record, resolve_source
from ..io.streaming import (
    BASE_MEMORY,
    StreamedCheckpoint,
    check_gguf_fits,
    exceeds,
    format_bytes,
    memory_budget,
    streamable,
    unused_budget,
)
from ..model_view import FFNView, layers_from_disk
from ..naming import compression_summary, run_label
from .corpora import TokenCorpus, load_corpus
from .perplexity import perplexity
from .speed import SpeedProtocol, check_speed_memory, fitted_protocol, measure_speed
from .zeroshot import check_zero_shot, parse_tasks, zero_shot

log = logging.getLogger(__name__)
FORMAT = "prunenet-evaluation/1"
SCHEMA_KEYS = ("format", "model", "compression", "size", "perplexity", "zero_shot", "speed")


def bytes_on_disk(source: str | os.PathLike) -> int | None:
    """Bytes of a model folder (every file in it) or GGUF file; None for a Hub id."""
    folder, gguf_file = resolve_source(source)
    path = Path(folder)
    if gguf_file is not None:
        return (path / gguf_file).stat().st_size
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


DEFAULT_SEQLEN = 1024


# Zero-shot answers are scored in batches of 8 (zeroshot.zero_shot); the shipped tasks' longest
# context with its answer is taken as 256 tokens for the memory estimate.
ZERO_SHOT_BATCH, ZERO_SHOT_LENGTH = 8, 256


def offload_budget(checkpoint: StreamedCheckpoint, max_memory: int | str | None,
                   seqlen: int | None, tasks: Iterable[str] = ()) -> int | None:
    """How many bytes of ``checkpoint``'s layers may stay in memory while it is evaluated with
    the others read from disk, or None when the whole model fits ``max_memory`` (default: half
    the free RAM). Raises :class:`InputError` naming the need when not even one layer at a
    time fits; before that, a given ``seqlen`` beyond the model's context."""
    if seqlen is not None:  # the context is the first reason to refuse a window length
        check_sequence_length(checkpoint.model_config, seqlen)
    length = seqlen or DEFAULT_SEQLEN
    working = checkpoint.evaluation_memory(1, length)
    if list(tasks):
        working = max(working, checkpoint.evaluation_memory(ZERO_SHOT_BATCH, ZERO_SHOT_LENGTH))
    budget = memory_budget(max_memory)
    in_memory = BASE_MEMORY + checkpoint.loaded_bytes + working
    need = checkpoint.offloaded_memory(working)
    if not exceeds(checkpoint, budget, in_memory, need,
                   f": evaluating {checkpoint.folder} layer by layer",
                   f"two layers and the logits of {length}-token windows",
                   ", or evaluate shorter windows (--seqlen)"):
        return None
    log.info("evaluating %s with the layers that do not fit read from disk as they run (in "
             "memory it would need about %s, budget %s)", checkpoint.folder,
             format_bytes(in_memory), format_bytes(budget))
    return budget - need


@contextlib.contextmanager
def opened_model(source: str | os.PathLike, *, max_memory: int | str | None = None,
                 seqlen: int | None = None, tasks: Iterable[str] = (), speed: bool = False,
                 trust_remote_code: bool = False, on_offload: Callable[[], None] | None = None
                 ) -> Iterator[tuple[nn.Module, Any]]:
    """``source`` loaded for evaluation: (model, tokenizer) for the length of the block.

    A local safetensors model that would need more than ``max_memory`` (accelerate's units;
    default: half the free RAM) is dispatched by accelerate with the decoder layers that fit
    held in memory and the others read from its files each time they run: the same numbers,
    more slowly. Raises :class:`InputError` when not even one layer at a time fits (naming the
    need), or for ``speed`` on a model that does not fit (its rate would be the disk's).
    ``on_offload`` is called before a model is loaded that way (the command line bounds the
    heap's growth there, as for a streamed compression).
    """
    checkpoint = streamable(source)
    resident = None
    if checkpoint is None:
        if max_memory is not None:
            raise unused_budget(source)
        check_gguf_fits(source)
    else:
        resident = offload_budget(checkpoint, max_memory, seqlen, tasks)
    if resident is None:
        yield load_model_and_tokenizer(source, trust_remote_code=trust_remote_code)
        return
    if speed:
        raise InputError(f"--speed measures a model held in memory, and {checkpoint.folder} "
                         f"does not fit {format_bytes(memory_budget(max_memory))}: raise "
                         "--max-memory, or measure speed on a machine that holds it")
    if on_offload is not None:
        on_offload()
    # accelerate reads safetensors weights in place; the folder takes what it cannot (none of
    # a checkpoint loaded in its own dtype) and is removed afterwards.
    with tempfile.TemporaryDirectory(prefix="prunenet-offload-") as scratch:
        model, tokenizer = load_model_and_tokenizer(
            source, trust_remote_code=trust_remote_code, offload=(resident, scratch))
        log.info("evaluating with %d of %d layers read from disk", layers_from_disk(model),
                 checkpoint.num_layers)
        yield model, tokenizer


def fitted_seqlen(config, seqlen: int | None) -> int:
    """``seqlen`` (refused below 2 tokens or beyond the model's context), or when None the
    default window length cut to the model's context (and said)."""
    if seqlen is not None:
        check_sequence_length(config, seqlen)
        return seqlen
    fitted = default_seqlen(config)
    if fitted < DEFAULT_SEQLEN:
        log.warning("perplexity windows of %d tokens: the model's context (the default is %d)",
                    fitted, DEFAULT_SEQLEN)
    return fitted


def default_seqlen(config) -> int:
    """The default perplexity window length, cut to the context of a model of ``config``."""
    context = context_length(config)
    return DEFAULT_SEQLEN if context is None else min(context, DEFAULT_SEQLEN)


def check_evaluation_windows(config, tokenizer: Any, windows: int, option: str = "--eval",
                             corpus: str = "wiki") -> TokenCorpus:
    """Refuse, before the model loads, ``windows`` perplexity windows of ``corpus`` that a
    model of ``config`` reading text with ``tokenizer`` could not be measured on: no tokenizer,
    or more windows (of the default length cut to its context) than the corpus's evaluation
    region holds. ``option`` names the setting in the message. Returns the corpus as read,
    for the measurement to use."""
    if tokenizer is None:
        raise InputError(f"{option} measures perplexity on text, and the model has no "
                         "tokenizer; save one next to the model, or leave out " + option)
    seqlen = default_seqlen(config)
    text = load_corpus(corpus, tokenizer)
    held = text.evaluation_windows(seqlen).shape[0]
    if windows > held:
        raise InputError(f"{option} {windows}: corpus {corpus!r} holds {held} evaluation "
                         f"windows of {seqlen} tokens; give {option} {held} or fewer")
    return text


def perplexity_windows(corpus: TokenCorpus, seqlen: int, windows: int) -> Tensor:
    """The first ``windows`` evaluation windows of ``corpus`` that perplexity scores; more than
    it holds are refused naming --windows and how many it holds."""
    return corpus.evaluation_windows(
        seqlen, windows,
        advice="give --windows {held} or fewer, more text or shorter windows (--seqlen)")


def _perplexity_part(model: nn.Module, tokenizer: Any, ppl: str | TokenCorpus, seqlen: int | None,
                     windows: int, progress: bool) -> dict[str, Any]:
    seqlen = fitted_seqlen(model.config, seqlen)
    corpus = ppl if isinstance(ppl, TokenCorpus) else load_corpus(ppl, tokenizer)
    batch = perplexity_windows(corpus, seqlen, windows)
    return {
        "corpus": corpus.name,
        "seqlen": seqlen,
        "windows": int(batch.shape[0]),
        "bos": corpus.bos_token_id is not None,
        "value": perplexity(model, batch, progress=progress),
    }


def _accuracy_part(model: nn.Module, tokenizer: Any, tasks: list[str],
                   limit: int | None) -> dict[str, Any] | None:
    scores = zero_shot(model, tokenizer, tasks, limit=limit)
    return {  # average None: every task was skipped (each said why)
        "limit": limit,
        "tasks": scores,
        "average": sum(s["value"] for s in scores.values()) / len(scores) if scores else None,
        "skipped": [name for name in tasks if name not in scores],
    }


def evaluate(
    model: nn.Module | str | os.PathLike,
    tokenizer: Any = None,
    *,
    ppl: str | TokenCorpus | None = "wiki",
    seqlen: int | None = None,
    windows: int = 16,
    tasks: str | list[str] = (),
    limit: int | None = None,
    speed: bool | SpeedProtocol = False,
    source: str | os.PathLike | None = None,
    progress: bool = True,
    max_memory: int | str | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` (a loaded model, or a folder / GGUF / alias to load) and return a dict.

    ``ppl``: corpus name, text/jsonl file, datasets folder or a loaded :class:`TokenCorpus`
    (None skips perplexity); the first ``windows`` evaluation windows of ``seqlen`` tokens
    (None: :data:`DEFAULT_SEQLEN`, or the model's context when shorter, said in a log line) are
    scored (see :mod:`prunenet.evaluation.corpora`). ``tasks``: zero-shot task names (see
    :data:`~prunenet.evaluation.zeroshot.TASK_METRICS`), ``limit`` examples each. ``speed``: True
    or a :class:`SpeedProtocol` to measure CPU/GPU throughput. ``source`` (set automatically when
    ``model`` is a path) adds bytes on disk and the compression record of a prunenet output.
    ``max_memory``: for a model to load, the budget above which its layers are read from disk
    as they run (:func:`opened_model`).

    Raises :class:`InputError` for unknown corpora or tasks, too many windows, a model without a
    tokenizer, and :class:`MissingAssetError` when data has not been fetched.
    """
    task_names = parse_tasks(tasks)
    if not isinstance(model, nn.Module):
        with opened_model(model, max_memory=max_memory, seqlen=seqlen, tasks=task_names,
                          speed=bool(speed)) as (loaded, tokenizer):
            return evaluate(loaded, tokenizer, ppl=ppl, seqlen=seqlen, windows=windows,
                            tasks=task_names, limit=limit, speed=speed, source=model,
                            progress=progress)
    # zero-shot inputs and a speed protocol the model cannot run fail before any measurement
    if task_names:
        check_zero_shot(tokenizer, limit)
    if speed:
        check_speed_memory(model, fitted_protocol(
            model.config, speed if isinstance(speed, SpeedProtocol) else SpeedProtocol(),
            quiet=True))
    view = FFNView(model)
    counts = view.parameter_counts()
    compression = None
    if source is not None and (Path(resolve_source(source)[0]) / RECORD_NAME).exists():
        compression = compression_summary(read_record(resolve_source(source)[0]))
    result: dict[str, Any] = {
        "format": FORMAT,
        "model": {
            "source": None if source is None else str(source),
            "model_type": model.config.model_type,
            "num_layers": view.num_layers,
            "d_model": view.d_model,
            "d_ff": view.d_ff,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        },
        "compression": compression,
        "size": {
            "parameters": counts["total"],
            "ffn_parameters": counts["ffn"],
            "bytes_on_disk": None if source is None else bytes_on_disk(source),
        },
        "perplexity": None,
        "zero_shot": None,
        "speed": None,
    }
    if ppl is not None:
        result["perplexity"] = _perplexity_part(model, tokenizer, ppl, seqlen, windows, progress)
    if task_names:
        result["zero_shot"] = _accuracy_part(model, tokenizer, task_names, limit)
    if speed:
        result["speed"] = measure_speed(model, speed if isinstance(speed, SpeedProtocol) else None)
    return result


def examples_scored(scores: dict[str, dict[str, Any]]) -> str:
    """The examples each zero-shot task scored (a task holding fewer than the limit scores all
    it holds): ``100 examples each``, or ``piqa 500, arc_challenge 299 examples``."""
    counts = {score["examples"] for score in scores.values()}
    if len(counts) == 1:
        count = counts.pop()
        return f"{count} example{'' if count == 1 else 's'}" \
            + (" each" if len(scores) > 1 else "")
    return ", ".join(f"{name} {score['examples']}" for name, score in scores.items()) \
        + " examples"


def _averaged(scores: dict[str, dict[str, Any]]) -> str:
    """What the zero-shot average is the mean of: the tasks and the examples each one scored,
    unweighted where they differ."""
    if len(scores) == 1:
        return f"1 task, {examples_scored(scores)}"
    counts = {score["examples"] for score in scores.values()}
    mean = "mean" if len(counts) == 1 else "unweighted mean"
    return f"{mean} of {len(scores)} tasks" + (", " if len(counts) == 1 else ": ") \
        + examples_scored(scores)


def format_table(result: dict[str, Any]) -> str:
    """The evaluation as a two-column text table for the terminal."""
    rows: list[tuple[str, str]] = []
    model = result["model"]
    rows.append(("model", f"{model['source'] or model['model_type']} ({model['model_type']}, "
                          f"{model['num_layers']} layers, d_ff {model['d_ff']})"))
    if result["compression"]:
        rows.append(("compression", run_label(result["compression"])))
    size = result["size"]
    rows.append(("parameters", f"{size['parameters']:,} (FFN {size['ffn_parameters']:,})"))
    if size["bytes_on_disk"] is not None:
        rows.append(("bytes on disk", f"{size['bytes_on_disk']:,}"))
    if result["perplexity"]:
        p = result["perplexity"]
        rows.append((f"perplexity ({p['corpus']})",
                     f"{p['value']:.3f}  [{p['windows']} windows x {p['seqlen']} tokens, "
                     f"BOS {'yes' if p['bos'] else 'no'}]"))
    if result["zero_shot"]:
        z = result["zero_shot"]
        for name, score in z["tasks"].items():
            stderr = "" if score["stderr"] is None else f" +- {score['stderr']:.4f}"
            cut = score.get("cut_answers")  # absent from records of earlier versions
            cut = (f"; {cut} of its answers scored after the question was cut to fit the "
                   "context" if cut else "")
            rows.append((f"{name} {score['metric']}",
                         f"{score['value']:.4f}{stderr}  [{score['examples']} examples{cut}]"))
        if z["average"] is not None:
            rows.append(("zero-shot average", f"{z['average']:.4f}  [{_averaged(z['tasks'])}]"))
        if z.get("skipped"):
            rows.append(("zero-shot skipped", f"{', '.join(z['skipped'])} (do not fit the "
                                              "model's context)"))
    if result["speed"]:
        s = result["speed"]
        protocol = (f"[batch {s['batch_size']}, prompt {s['prompt_tokens']}, "
                    f"{s['new_tokens']} new tokens, median of {s['repeats']}, {s['device']}, "
                    f"{s['threads']} threads]")
        rows.append(("prefill tokens/s", f"{s['prefill_tokens_per_s']:.1f}"))
        rows.append(("decode tokens/s", f"{s['decode_tokens_per_s']:.1f}  {protocol}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
