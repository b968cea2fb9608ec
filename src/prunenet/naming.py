"""How a pruned or fine-tuned model is named wherever prunenet shows one (``eval``'s table and
JSON, ``report``, compress's summary line, ``compare``'s tables): the method with the refit that
followed it (``random+ls``; the method alone after ``none``), the ratio, a kept count rounded to
a multiple, and the recovery fine-tune, read from its record (``prunenet.json``)."""

from __future__ import annotations

import re
from typing import Any


def one_line(text: str | None) -> str | None:
    """``text`` on one line: a path holding a newline or another control character is written
    with Python's escapes, so it cannot split the markdown list it stands in."""
    return text if text is None or text.isprintable() else repr(text)


# What can start markdown or HTML in running text: emphasis, code, links, a table's cell bar,
# tags and entities, strikethrough, a heading's closing hashes, math (GitHub's, the Hub's); a
# ">" only at a line's start (a quote), where no name stands.
_MARKUP = frozenset("*_`[]<|&~#$")
_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")  # what a backslash escapes


def markdown_text(text: str | None) -> str | None:
    """``text`` (a path, a prompt, a model name) as markdown and its HTML show it as written,
    on one line (:func:`one_line`): every character that could start markup backslash-escaped
    (an underscore inside a word starts none), and a backslash that would escape the character
    after it escaped itself; letters and other text unchanged, so the file still reads as the
    text."""
    text = one_line(text)
    if text is None:
        return None
    shown = []
    for index, char in enumerate(text):
        before, after = text[index - 1:index], text[index + 1:index + 2]
        if char == "_" and before.isalnum() and after.isalnum():
            shown.append(char)  # inside a word it emphasizes nothing: my_model reads as is
        elif char in _MARKUP or char == "\\" and (after in _PUNCTUATION or not after):
            shown.append("\\" + char)  # a last backslash would escape what follows it
        else:
            shown.append(char)
    return "".join(shown)


def backtick_fence(text: str, least: int = 1) -> str:
    """The backticks that fence ``text`` as markdown code (a span, or a block with ``least``
    3): more than it holds in a row, so none of its own closes the fence."""
    longest = max((len(run) for run in re.findall("`+", text)), default=0)
    return "`" * max(least, longest + 1)


def markdown_code(text: str) -> str:
    """``text`` as a markdown code span, on one line (:func:`one_line`), fenced by
    :func:`backtick_fence` and padded where it starts or ends with a backtick."""
    text = one_line(text)
    fence = backtick_fence(text)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def number_text(value: float) -> str:
    """A setting (a ratio, a ridge, a temperature) in its shortest form that reads back as itself
    (``0.25``, ``0.1234561``, ``1e-05``): ``:g`` keeps six digits, and two runs whose settings
    differ past them would read the same."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def calibration_sentence(calibration: dict[str, Any]) -> str:
    """What a calibration-based method (activation) read, as compare's and report's pages say
    it: ``Calibration: 4 windows of 1024 tokens from the training region of wiki (never its
    evaluation windows).``"""
    windows = calibration.get("windows")
    return (f"Calibration: {windows} window{'' if windows == 1 else 's'} of "
            f"{calibration.get('seqlen')} tokens from the training region of "
            f"{one_line(str(calibration.get('corpus')))} (never its evaluation windows).")


def probe_sentence(probe: dict[str, Any]) -> str:
    """The probe text a run read, as compare's and report's pages say it, without the closing
    full stop: ``Probe: 128 sequences of 64 tokens of the model's own text, sampled at
    temperature 1.2 from seed 42``, with the prompt it followed and a sampler other than the
    default where the record names them; the tokens asked for where it names no shape (records
    of prunenet versions before it did)."""
    from .probe import SAMPLER

    shape, prompt, sampler = probe.get("shape"), probe.get("prompt"), probe.get("sampler")
    size = (f"{shape[0]} sequence{'' if shape[0] == 1 else 's'} of {shape[1]} tokens" if shape
            else f"{probe.get('tokens')} tokens")
    return (f"Probe: {size} of the model's own text"
            + (f" after the prompt {prompt!r}" if prompt else "")
            + f", sampled at temperature {number_text(probe.get('temperature'))} from seed "
            f"{probe.get('seed')}"
            + (f" (the {sampler} sampler)" if sampler not in (None, SAMPLER) else ""))


def method_label(method: str, refit: str | None) -> str:
    """A method as it ran: with its refit (``random+ls``) unless there was none."""
    return method if refit in (None, "none") else f"{method}+{refit}"


def reads_seed(record: dict[str, Any]) -> bool:
    """Whether the compression a record describes read its seed: a probe was sampled from it,
    or a seeded method drew its rows (random, self-generated's probe before the record named
    it, a PruneNet policy's training or sampled rows), but not a given policy's top-k rows,
    which draw nothing."""
    from .selection import SELECTORS

    method = record.get("method")
    reused = method == "prunenet" and record.get("policy_sha256") and not record.get("training")
    return isinstance(record.get("probe"), dict) or (
        getattr(SELECTORS.get(method), "seeded", False)
        and not (reused and record.get("selection") == "topk"))


def refit_mode(record: dict[str, Any]) -> str:
    """The refit a record names: its ``reconstruct`` mode (a compression record holds an object,
    an evaluation's ``compression`` the mode alone); ``none`` where it names none (records of
    prunenet versions before the refit)."""
    reconstruct = record.get("reconstruct")
    if isinstance(reconstruct, dict):
        return reconstruct.get("mode") or "none"
    return reconstruct if isinstance(reconstruct, str) else "none"


def finetune_summary(tune: dict[str, Any]) -> dict[str, Any]:
    """A record's ``finetune`` entry in short: what trained (``LoRA adapters``, ``FFN
    weights``), on which data, for how many steps, and the teacher a distillation learnt from
    (None on a corpus)."""
    return {"trained": tune.get("trained"), "data": (tune.get("settings") or {}).get("data"),
            "steps": tune.get("steps_run"),
            "teacher": (tune.get("distillation") or {}).get("teacher")}


def finetune_label(summary: dict[str, Any]) -> str:
    """``+ LoRA fine-tune 200 steps on wiki``, ``+ FFN self-distillation 100 steps``."""
    kind = "FFN" if summary.get("trained") == "FFN weights" else "LoRA"
    steps = summary.get("steps")
    if summary.get("teacher"):
        return f"+ {kind} self-distillation {steps} steps"
    return f"+ {kind} fine-tune {steps} steps on {summary.get('data')}"


def compression_summary(record: dict[str, Any]) -> dict[str, Any]:
    """What a record says of how its model was made: the method, ratio, selection and seed,
    the refit (``reconstruct``: ls, bias, none), the multiple kept counts were rounded to
    (``round_to``) and the recovery fine-tune (``finetune``, :func:`finetune_summary`; None
    when there was none), and where prunenet made its input, the labels of the runs that did
    (``history``, :func:`source_records`, the first first). A model prunenet fine-tuned but
    did not prune has method, ratio and refit None."""
    pruned = record.get("method") is not None
    tune = record.get("finetune")
    chain = source_records(record)
    return {
        **{key: record.get(key) for key in ("method", "ratio", "selection", "seed")},
        "reconstruct": refit_mode(record) if pruned else None,
        "round_to": record.get("round_to"),
        "finetune": finetune_summary(tune) if isinstance(tune, dict) else None,
        **({"history": [run_label(compression_summary(earlier)) for earlier in chain]}
           if chain else {}),
    }


def source_records(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The records of the prunenet runs that made a record's input, the first first: its
    ``source_history`` (the input's own ``prunenet.json``) and the history that holds in
    turn; each without its own history. Empty where prunenet did not make the input."""
    chain = []
    earlier = record.get("source_history")
    while isinstance(earlier, dict):
        chain.insert(0, {key: value for key, value in earlier.items()
                         if key != "source_history"})
        earlier = earlier.get("source_history")
    return chain


def history_sentence(record: dict[str, Any]) -> str | None:
    """How the model a record's pruning read was made, where prunenet made it, as the card
    and the report say it (a fine-tune's card too): ``The model this pruning read was made by
    prunenet: random+ls at ratio 0.25 + LoRA fine-tune 200 steps on wiki (FFN width 48 -> 36);
    this pruning's ratio, FFN widths and parameter counts are relative to that model.`` None
    where prunenet did not make it."""
    chain = source_records(record)
    if not chain:
        return None
    pruned = [earlier for earlier in chain if earlier.get("ffn_width_before") is not None]
    widths = (f" (FFN width {pruned[0]['ffn_width_before']} -> {pruned[-1]['ffn_width_after']})"
              if pruned else "")
    labels = ", then ".join(run_label(compression_summary(earlier)) for earlier in chain)
    return (f"The model this pruning read was made by prunenet: {labels}{widths}; this "
            "pruning's ratio, FFN widths and parameter counts are relative to that model.")


def run_label(summary: dict[str, Any]) -> str:
    """A model as it was made, from its :func:`compression_summary`: ``random+ls at ratio
    0.25``, with ``, kept rounded to a multiple of 32`` and ``+ LoRA fine-tune 200 steps on
    wiki`` where they apply; ``not pruned + ...`` for a model only fine-tuned; after the labels
    of the runs that made its input (its ``history``) and ``, then``."""
    if summary.get("method") is None:
        label = "not pruned"
    else:
        label = (f"{method_label(summary['method'], refit_mode(summary))} at ratio "
                 f"{summary.get('ratio')}")
        if (summary.get("round_to") or 1) > 1:
            label += f", kept rounded to a multiple of {summary['round_to']}"
    if summary.get("finetune"):
        label += " " + finetune_label(summary["finetune"])
    return ", then ".join([*(summary.get("history") or []), label])
