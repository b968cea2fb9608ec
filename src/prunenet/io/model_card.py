"""The model card (``README.md``) of an output folder, as the Hugging Face Hub reads it.

YAML front matter (``base_model`` where known, ``tags``, ``license`` with its ``license_name``
and ``license_link`` copied from the input's own card, ``pipeline_tag``) and a short body:
what was done, by which method, what it changed, and a command that repeats it.
``prunenet.json`` stays the machine-readable record.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

from ..naming import (
    backtick_fence,
    history_sentence,
    markdown_code,
    markdown_text,
    reads_seed,
)
from ..version import __version__

CARD_NAME = "README.md"
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.DOTALL)
# The Hub's license metadata: an identifier, and for ``other`` the terms' name and link.
LICENSE_KEYS = ("license", "license_name", "license_link")


def card_fields(folder: str | os.PathLike | None) -> dict[str, str]:
    """The license keys (:data:`LICENSE_KEYS`) and ``base_model`` from the front matter of
    ``folder/README.md``, if any (one-line scalar values only; anything else is ignored). A
    GGUF's own license is read by :func:`prunenet.io.loading.inherited_card_fields`."""
    if folder is None or not (Path(folder) / CARD_NAME).is_file():
        return {}
    try:
        text = (Path(folder) / CARD_NAME).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    match = _FRONT_MATTER.match(text)
    if match is None:
        return {}
    fields = {}
    for line in match.group(1).splitlines():
        key, _, value = line.partition(":")
        value = card_value(value)
        if key in (*LICENSE_KEYS, "base_model") and value is not None:
            fields[key] = value
    return fields


def card_value(value: str) -> str | None:
    """``value`` as a one-line YAML scalar a card's front matter can carry, or None."""
    value = value.strip().strip("'\"")
    if not value or "\n" in value or value.startswith(("[", "{", "|")):
        return None
    return value


def conversion_card(gguf_name: str, terms: dict[str, str]) -> str:
    """The card of a folder converted from the GGUF file ``gguf_name``: its license keys
    (``terms``, the GGUF's own, where it names them), and what the folder is."""
    front = ["---", *_license_lines(terms), "library_name: transformers", "---", ""]
    return "\n".join(front + [
        f"# {Path(gguf_name).stem}, converted from GGUF", "",
        f"`{gguf_name}` dequantized to a float32 safetensors checkpoint by prunenet "
        f"{__version__}. It loads with plain `transformers.AutoModelForCausalLM.from_pretrained`.",
        ""])


def _yaml_value(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML scalar


def _license_lines(fields: dict[str, str]) -> list[str]:
    """The front matter lines of the license keys ``fields`` holds, in the Hub's order."""
    return [f"{key}: {_yaml_value(fields[key])}" for key in LICENSE_KEYS if key in fields]


def render_card(record: dict[str, Any], inherited: dict[str, str] | None = None,
                hub_id: str | None = None, files: set[str] | None = None) -> str:
    """The card of an output described by ``record`` (its ``prunenet.json``).

    ``inherited``: the license keys and ``base_model`` the input declares (its card, or a
    GGUF's header); ``hub_id``: the Hub id it came from, when it did; ``files``: the names in
    the output folder (what it says loads where follows them; None: a stock checkpoint).
    """
    inherited = inherited or {}
    base_model = hub_id or inherited.get("base_model")
    method = record.get("method")  # None: a model prunenet fine-tuned but did not prune
    tune = record.get("finetune")
    front = ["---"]
    if base_model:
        front.append(f"base_model: {_yaml_value(base_model)}")
    front += ["tags:", "- pruned" if method else "- fine-tuned", "- prunenet"]
    if method:
        front.append(f"- {_yaml_value(method)}")
    front += _license_lines(inherited)
    checkpoint = files is None or ("config.json" in files and any(
        name.endswith(".safetensors") for name in files))
    # the library the Hub offers to load the folder with: none for model.gguf or an adapter
    # alone (it tells a GGUF by its files), which from_pretrained does not load
    front += ["pipeline_tag: text-generation",
              *(["library_name: transformers"] if checkpoint else []), "---", ""]
    source = record.get("source") or "an in-memory model"
    gguf = record.get("gguf") if files is None or (record.get("gguf") or {}).get(
        "file", "model.gguf") in files else None
    if checkpoint:
        loads = ("The architecture is unchanged: the checkpoint loads with plain "
                 "`transformers.AutoModelForCausalLM.from_pretrained`.")
    elif gguf:
        loads = (f"The architecture is unchanged; this folder holds the GGUF file only "
                 f"(`{gguf.get('file', 'model.gguf')}`, for llama.cpp), no safetensors "
                 "checkpoint.")
    elif files is not None and "adapter" in files:
        loads = (f"This folder holds a LoRA adapter (`adapter/`, PEFT) for "
                 f"{markdown_code(str(source))}, not merged into a checkpoint.")
    else:
        loads = "This folder holds no model weights."
    if method:
        reduction = 100 * record["parameter_reduction"]
        title = f"# {_name(source)}, FFN-pruned with prunenet ({method})"
        before, after = record["ffn_width_before"], record["ffn_width_after"]
        share = f"{100 * record['ratio']:g}%"
        removed = 1 - after / before
        if record.get("round_to", 1) > 1:  # the kept count was rounded: say what was removed
            share = (f"{100 * removed:.1f}% (ratio {record['ratio']:g}, rounded to "
                     f"a multiple of {record['round_to']} kept neurons)")
        elif round(100 * removed, 1) != round(100 * record["ratio"], 1):  # a narrow layer
            share = (f"{100 * removed:.1f}% (ratio {record['ratio']:g}, the kept count rounded "
                     "down to whole neurons)")
        body = [
            title, "",
            f"Structured pruning: {share} of the FFN neurons of every layer "
            f"were removed (FFN width {before} -> {after}) with the `{method}` method of prunenet "
            f"{record['prunenet_version']}. Parameters {record['parameters_before']:,} -> "
            f"{record['parameters_after']:,} (-{reduction:.1f}%). " + loads, "",
        ]
    else:
        body = [f"# {_name(source)}, fine-tuned with prunenet", "", loads, ""]
    history = history_sentence(record)
    if history:
        body += [markdown_text(history), ""]
    if gguf:
        written = sorted(set(gguf.get("requantized", {}).values()))
        kept = sorted(set(gguf.get("sliced", {}).values()))
        body += [f"{'Also `' if checkpoint else '`'}{gguf.get('file', 'model.gguf')}` for "
                 f"llama.cpp: the input's GGUF with every non-FFN tensor unchanged, FFN rows kept "
                 f"in their {'/'.join(kept)} blocks and ffn_down written as {'/'.join(written)}"
                 + (" (the type asked for cannot hold the new width or cannot be written)"
                    if gguf.get("substituted") else "") + ".", ""]
    if record.get("evaluation", {}).get("perplexity"):
        body += [_measured_sentence(record, checkpoint), ""]
    if record.get("policy_sha256"):
        body += [f"PruneNet policy checksum (sha256): `{record['policy_sha256']}`.", ""]
    if tune:
        body += [_finetune_sentence(tune), ""]
    commands = [_compress_command(record, "both" if checkpoint else "gguf")] if method else []
    tunes = []  # the fine-tunes, the first first: each read the output of the one before
    while isinstance(tune, dict):
        tunes.insert(0, tune)
        tune = tune.get("previous")
    for number, entry in enumerate(tunes, 1):
        commands.append(finetune_command(entry, "OUT" if number == 1 else f"OUT{number}",
                                         f"OUT{number + 1}"))
    if commands:
        lines = [shlex.join(command) for command in commands]
        fence = backtick_fence("\n".join(lines), least=3)  # a path's own cannot close it
        body += ["Made with:", "", f"{fence}bash", *lines, fence, ""]
    body += ["The full record is `prunenet.json` in this folder.", ""]
    return "\n".join(front + body)


def _name(source: str) -> str:
    """The card's title for a model from ``source``: its folder's name, as written."""
    return markdown_text(Path(str(source)).name or str(source))


def _measured_sentence(record: dict[str, Any], checkpoint: bool) -> str:
    """What --eval measured and what measures it again. It measured the pruned checkpoint's
    float weights; where a GGUF was written, not that file, whose ffn_down was requantized
    after: `prunenet eval` on the same windows (eval's default count differs) reproduces the
    number from the checkpoint (``checkpoint``: this folder holds it), never from the GGUF."""
    measured = record["evaluation"]["perplexity"]
    value = (f"perplexity {measured['value']:.2f} on the first {measured['windows']} evaluation "
             f"windows of {measured['seqlen']} tokens of {measured['corpus']}")
    again = f"--windows {measured['windows']} --seqlen {measured['seqlen']}"
    gguf = record.get("gguf")
    if not gguf:
        return (f"Measured after pruning: {value} (`prunenet eval {again}` of this folder "
                "reproduces it).")
    file = gguf.get("file", "model.gguf")
    down = "/".join(sorted(set(gguf.get("requantized", {}).values()))) or "its own type"
    if checkpoint:
        return (f"Measured after pruning, on the safetensors checkpoint: {value} (`prunenet "
                f"eval {again}` of this folder, which reads the checkpoint, reproduces it). "
                f"`{file}`, whose ffn_down was then written as {down}, was not measured: "
                f"`prunenet eval {file} {again}` measures that file, which can differ.")
    return (f"Measured after pruning, on the pruned model's float weights before `{file}`'s "
            f"ffn_down was written as {down} (that checkpoint is not kept in this folder): "
            f"{value}. `{file}` itself was not measured: `prunenet eval {file} {again}` "
            "measures the file as written, which can differ.")


def _finetune_sentence(tune: dict[str, Any]) -> str:
    """What the recovery trained, on what, and what it measured."""
    trained = tune.get("trained", "LoRA adapters")
    steps = tune.get("steps_run")
    distilled = tune.get("distillation")
    if distilled:
        how = (f"Recovered without data by self-distillation from "
               f"{markdown_code(str(distilled.get('teacher')))} "
               f"(KL to its next-token distributions on text it sampled itself), training "
               f"{trained} for {steps} steps")
        measure = "held-out KL to the teacher"
        before, after = tune.get("eval_kl_before"), tune.get("eval_kl_after")
    else:
        data = (tune.get("settings") or {}).get("data")
        how = f"Recovered by fine-tuning {trained} on {markdown_code(str(data))} for {steps} steps"
        measure = "evaluation perplexity"
        before = tune.get("eval_perplexity_before")
        after = tune.get("eval_perplexity_after")
    best = tune.get("best_step")
    if isinstance(best, int) and best != steps:  # the best evaluated checkpoint is kept
        how += f", keeping the weights of step {best}, its best evaluation"
    if isinstance(before, (int, float)) and isinstance(after, (int, float)):
        return f"{how}: {measure} {before:.3g} -> {after:.3g}."
    return how + "."


def _number(value: Any) -> str:
    """A setting as the command line reads it back to the same value: a float as its shortest
    round-trip text (``repr``), never rounded to fewer digits."""
    return repr(float(value)) if isinstance(value, float) else str(value)


# Record keys of a PruneNet policy training, with the options that set them: valued, then flags.
_TRAINING_OPTIONS = (("episodes", "--episodes"), ("lr", "--lr"), ("gamma", "--gamma"),
                     ("reward", "--reward"), ("baseline", "--baseline"),
                     ("spectral", "--spectral"))
_TRAINING_FLAGS = (("reward_to_go", "--reward-to-go"), ("kld", "--kld"))
_PROBE_OPTIONS = (("tokens", "--probe-tokens"), ("sequence_length", "--probe-length"),
                  ("temperature", "--probe-temperature"), ("prompt", "--probe-prompt"),
                  ("sampler", "--probe-sampler"))


def _valued(settings: dict[str, Any], options: tuple[tuple[str, str], ...]) -> list[str]:
    """``option value`` for every key of ``settings`` that holds a value (None and "" hold
    none)."""
    command = []
    for key, option in options:
        if settings.get(key) not in (None, ""):
            command += [option, _number(settings[key])]
    return command


def _compress_command(record: dict[str, Any], gguf_format: str = "both") -> list[str]:
    """A command that repeats the compression this record describes (``OUT``: any folder);
    ``gguf_format`` is its --format when it wrote a GGUF (``both``, or ``gguf`` alone).

    It names every setting the record holds that the run used, defaults included, so that it
    repeats the run under a prunenet whose defaults differ; the options the run did not use
    (the command line refuses them) are left out: training options where no policy was
    trained, the probe's where no probe ran, the ridge of a refit that has none, the GGUF
    type where no GGUF was written, the seed where nothing was drawn at random (no probe, and
    neither random rows nor a policy's trained or sampled ones). The device a PruneNet policy
    ran on is named (a CPU and a CUDA generator draw differently from one seed). A record made
    before a setting was recorded names the value that ran then: no refit (``--reconstruct
    none``), the exact kept count (``--round-to 1``), the probe's tokens drawn by
    ``torch.multinomial``.
    """
    method = record["method"]
    source = str(record.get("source") or "MODEL")
    reused = method == "prunenet" and record.get("policy_sha256") and not record.get("training")
    seeded = reads_seed(record)
    command = ["prunenet", "prune" if reused else "compress", source,
               *(["--policy", "POLICY.safetensors"] if reused else []),
               "--ratio", _number(record["ratio"]), "--method", method,
               *(["--seed", str(record["seed"])] if seeded else []),
               *(["--device", str(record["device"])] if record.get("device") else [])]
    if method == "prunenet":
        if record.get("selection"):
            command += ["--selection", record["selection"]]
        command += _training_arguments(record.get("training") or {})
    calibration = record.get("calibration")
    if method == "activation" and isinstance(calibration, dict):
        command += ["--calibration-corpus", str(calibration.get("corpus")),
                    "--calibration-windows", str(calibration.get("windows"))]
    probe = record.get("probe")
    if isinstance(probe, dict):
        command += _valued({"sampler": "multinomial", **probe}, _PROBE_OPTIONS)
    reconstruct = record.get("reconstruct", {"mode": "none"})
    if isinstance(reconstruct, dict) and reconstruct.get("mode"):
        command += ["--reconstruct", reconstruct["mode"]]
        if reconstruct.get("ridge") is not None and reconstruct["mode"] == "ls":
            command += ["--ridge", _number(reconstruct["ridge"])]
    if record.get("gguf"):
        command += ["--format", gguf_format,
                    "--gguf-down-type", record["gguf"].get("down_type", "auto")]
    else:
        command += ["--format", "safetensors"]
    command += ["--round-to", str(record.get("round_to", 1))]
    measured = (record.get("evaluation") or {}).get("perplexity")
    if measured:
        command += ["--eval", str(measured["windows"])]
    return command + ["--out", "OUT"]


def _training_arguments(training: dict[str, Any]) -> list[str]:
    """The options of a recorded policy training: its valued settings, its flags that were on,
    and the Gram path's float type where the Gram path ran (--spectral svd refuses it)."""
    command = _valued(training, _TRAINING_OPTIONS)
    command += [option for key, option in _TRAINING_FLAGS if training.get(key)]
    if training.get("precision") and training.get("spectral", "gram") == "gram":
        command += ["--spectral-precision", training["precision"]]
    return command


# Recorded fine-tuning settings, with the options that set them; LoRA's only where LoRA trained.
_FINETUNE_OPTIONS = (("train", "--train"), ("steps", "--steps"), ("seqlen", "--seqlen"),
                     ("batch_size", "--batch-size"), ("grad_accum", "--grad-accum"),
                     ("lr", "--lr"), ("precision", "--precision"), ("seed", "--seed"))
_LORA_OPTIONS = (("lora_r", "--lora-r"), ("lora_alpha", "--lora-alpha"),
                 ("lora_dropout", "--lora-dropout"))
_EVALUATION_OPTIONS = (("eval_every", "--eval-every"), ("eval_windows", "--eval-windows"),
                       ("generated_windows", "--generated-windows"))


def finetune_command(tune: dict[str, Any], model: str = "OUT",
                     out: str = "OUT2") -> list[str]:
    """A command that repeats the fine-tune this record entry describes on ``model`` (the
    compression's output, or an earlier fine-tune's) into ``out``.

    Like the compression's, it names every setting the entry records, defaults and the
    resolved ones (the learning rate, window length and arithmetic the run chose) included;
    the LoRA settings and --no-merge only where LoRA adapters trained, --generated-windows
    (the number of training windows the teacher wrote) only where the run distilled.
    --patience 0 stands for a run that never stopped early. A run on the CPU is repeated with
    --device cpu (auto trains on a GPU where there is one, whose random draws differ); a run
    on a GPU with the default, auto, the only choice that reaches one.
    """
    settings = tune.get("settings") or {}
    command = ["prunenet", "finetune", model, "--data", str(settings.get("data"))]
    distilled = tune.get("distillation")
    if distilled:
        command += ["--teacher", str(distilled.get("teacher"))]
    command += _valued(settings, _FINETUNE_OPTIONS)
    lora = settings.get("train", "lora") == "lora"
    if lora:
        command += _valued(settings, _LORA_OPTIONS)
        if settings.get("targets"):
            command += ["--targets", ",".join(settings["targets"])]
    # a distillation without --generated-windows had the teacher write one window per step and
    # process: the count it wrote repeats the run under any number of processes
    evaluation = dict(settings)
    if distilled and evaluation.get("generated_windows") is None:
        evaluation["generated_windows"] = tune.get("training_windows")
    command += _valued(evaluation, _EVALUATION_OPTIONS)
    if "patience" in settings:
        command += ["--patience", str(settings["patience"] or 0)]
    if lora and tune.get("merged") is False:
        command.append("--no-merge")
    if tune.get("device") == "cpu":
        command += ["--device", "cpu"]
    return command + ["--out", out]
