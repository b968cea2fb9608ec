"""The model card (``README.md``) of an output folder, as the Hugging Face Hub reads it.

YAML front matter (``base_model`` where known, ``tags``, ``license`` copied from the input's own
card, ``pipeline_tag``) and a short body: what was done, by which method, what it changed, and a
command that repeats it. ``prunenet.json`` stays the machine-readable record.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

CARD_NAME = "README.md"
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.DOTALL)


def card_fields(folder: str | os.PathLike | None) -> dict[str, str]:
    """``license`` and ``base_model`` from the front matter of ``folder/README.md``, if any
    (one-line scalar values only; anything else is ignored)."""
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
        value = value.strip().strip("'\"")
        if key in ("license", "base_model") and value and not value.startswith(("[", "{", "|")):
            fields[key] = value
    return fields


def _yaml_value(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML scalar


def render_card(record: dict[str, Any], input_folder: str | os.PathLike | None = None,
                hub_id: str | None = None, files: set[str] | None = None) -> str:
    """The card of an output described by ``record`` (its ``prunenet.json``).

    ``input_folder``: the local model folder it came from (its card gives ``license`` and the
    lineage); ``hub_id``: the Hub id it came from, when it did; ``files``: the names in the
    output folder (what it says loads where follows them; None: a stock checkpoint).
    """
    inherited = card_fields(input_folder)
    base_model = hub_id or inherited.get("base_model")
    method = record.get("method")  # None: a model prunenet fine-tuned but did not prune
    tune = record.get("finetune")
    front = ["---"]
    if base_model:
        front.append(f"base_model: {_yaml_value(base_model)}")
    front += ["tags:", "- pruned" if method else "- fine-tuned", "- prunenet"]
    if method:
        front.append(f"- {_yaml_value(method)}")
    if "license" in inherited:
        front.append(f"license: {_yaml_value(inherited['license'])}")
    front += ["pipeline_tag: text-generation", "library_name: transformers", "---", ""]
    source = record.get("source") or "an in-memory model"
    checkpoint = files is None or ("config.json" in files and any(
        name.endswith(".safetensors") for name in files))
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
        loads = (f"This folder holds a LoRA adapter (`adapter/`, PEFT) for `{source}`, not "
                 "merged into a checkpoint.")
    else:
        loads = "This folder holds no model weights."
    if method:
        reduction = 100 * record["parameter_reduction"]
        title = f"# {Path(str(source)).name or source}, FFN-pruned with prunenet ({method})"
        before, after = record["ffn_width_before"], record["ffn_width_after"]
        share = f"{100 * record['ratio']:g}%"
        if record.get("round_to", 1) > 1:  # the kept count was rounded: say what was removed
            share = (f"{100 * (1 - after / before):.1f}% (ratio {record['ratio']:g}, rounded to "
                     f"a multiple of {record['round_to']} kept neurons)")
        body = [
            title, "",
            f"Structured pruning: {share} of the FFN neurons of every layer "
            f"were removed (FFN width {before} -> {after}) with the `{method}` method of prunenet "
            f"{record['prunenet_version']}. Parameters {record['parameters_before']:,} -> "
            f"{record['parameters_after']:,} (-{reduction:.1f}%). " + loads, "",
        ]
    else:
        body = [f"# {Path(str(source)).name or source}, fine-tuned with prunenet", "", loads, ""]
    if gguf:
        written = sorted(set(gguf.get("requantized", {}).values()))
        kept = sorted(set(gguf.get("sliced", {}).values()))
        body += [f"{'Also `' if checkpoint else '`'}{gguf.get('file', 'model.gguf')}` for "
                 f"llama.cpp: the input's GGUF with every non-FFN tensor unchanged, FFN rows kept "
                 f"in their {'/'.join(kept)} blocks and ffn_down written as {'/'.join(written)}"
                 + (" (the type asked for cannot hold the new width or cannot be written)"
                    if gguf.get("substituted") else "") + ".", ""]
    if record.get("evaluation", {}).get("perplexity"):
        measured = record["evaluation"]["perplexity"]
        body += [f"Measured after pruning: perplexity {measured['value']:.2f} on the first "
                 f"{measured['windows']} evaluation windows of {measured['seqlen']} tokens of "
                 f"{measured['corpus']} (`prunenet eval` reproduces it).", ""]
    if record.get("policy_sha256"):
        body += [f"PruneNet policy checksum (sha256): `{record['policy_sha256']}`.", ""]
    if tune:
        body += [_finetune_sentence(tune), ""]
    commands = [_compress_command(record, "both" if checkpoint else "gguf")] if method else []
    if tune:
        commands.append(_finetune_command(tune))
    if commands:
        body += ["Made with:", "", "```bash", *(shlex.join(c) for c in commands), "```", ""]
    body += ["The full record is `prunenet.json` in this folder.", ""]
    return "\n".join(front + body)


def _finetune_sentence(tune: dict[str, Any]) -> str:
    """What the recovery trained, on what, and what it measured."""
    trained = tune.get("trained", "LoRA adapters")
    steps = tune.get("steps_run")
    distilled = tune.get("distillation")
    if distilled:
        how = (f"Recovered without data by self-distillation from `{distilled.get('teacher')}` "
               f"(KL to its next-token distributions on text it sampled itself), training "
               f"{trained} for {steps} steps")
        measure = "held-out KL to the teacher"
        before, after = tune.get("eval_kl_before"), tune.get("eval_kl_after")
    else:
        data = (tune.get("settings") or {}).get("data")
        how = f"Recovered by fine-tuning {trained} on `{data}` for {steps} steps"
        measure = "evaluation perplexity"
        before = tune.get("eval_perplexity_before")
        after = tune.get("eval_perplexity_after")
    if isinstance(before, (int, float)) and isinstance(after, (int, float)):
        return f"{how}: {measure} {before:.3g} -> {after:.3g}."
    return how + "."


def _compress_command(record: dict[str, Any], gguf_format: str = "both") -> list[str]:
    """A command that repeats the compression this record describes (``OUT``: any folder);
    ``gguf_format`` is its --format when it wrote a GGUF (``both``, or ``gguf`` alone)."""
    method = record["method"]
    source = str(record.get("source") or "MODEL")
    reused = method == "prunenet" and record.get("policy_sha256") and not record.get("training")
    command = ["prunenet", "prune" if reused else "compress", source,
               *(["--policy", "POLICY.safetensors"] if reused else []),
               "--ratio", f"{record['ratio']:g}", "--method", method,
               "--seed", str(record["seed"])]
    if method == "prunenet":
        if record.get("selection"):
            command += ["--selection", record["selection"]]
        training = record.get("training") or {}
        for key, option in (("episodes", "--episodes"), ("lr", "--lr")):
            if key in training:
                command += [option, f"{training[key]:g}"]
    calibration = record.get("calibration")
    if method == "activation" and isinstance(calibration, dict):
        command += ["--calibration-corpus", str(calibration.get("corpus")),
                    "--calibration-windows", str(calibration.get("windows"))]
    probe = record.get("probe")
    if isinstance(probe, dict):
        for key, option in (("tokens", "--probe-tokens"), ("sequence_length", "--probe-length"),
                            ("temperature", "--probe-temperature"), ("prompt", "--probe-prompt")):
            if probe.get(key) not in (None, ""):
                command += [option, f"{probe[key]:g}" if isinstance(probe[key], float)
                            else str(probe[key])]
    reconstruct = record.get("reconstruct")
    if isinstance(reconstruct, dict) and reconstruct.get("mode"):
        command += ["--reconstruct", reconstruct["mode"]]
        if reconstruct.get("ridge") is not None and reconstruct["mode"] == "ls":
            command += ["--ridge", f"{reconstruct['ridge']:g}"]
    if record.get("gguf"):
        command += ["--format", gguf_format]
        if record["gguf"].get("down_type", "auto") != "auto":
            command += ["--gguf-down-type", record["gguf"]["down_type"]]
    if record.get("round_to", 1) != 1:
        command += ["--round-to", str(record["round_to"])]
    return command + ["--out", "OUT"]


def _finetune_command(tune: dict[str, Any]) -> list[str]:
    settings = tune.get("settings") or {}
    command = ["prunenet", "finetune", "OUT", "--data", str(settings.get("data"))]
    distilled = tune.get("distillation")
    if distilled:
        command += ["--teacher", str(distilled.get("teacher"))]
    for key, option in (("steps", "--steps"), ("seqlen", "--seqlen"), ("train", "--train"),
                        ("lr", "--lr")):
        if settings.get(key) is not None:
            value = settings[key]
            command += [option, f"{value:g}" if isinstance(value, float) else str(value)]
    return command + ["--out", "OUT2"]
