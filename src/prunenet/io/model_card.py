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
                hub_id: str | None = None) -> str:
    """The card of an output described by ``record`` (its ``prunenet.json``).

    ``input_folder``: the local model folder it came from (its card gives ``license`` and the
    lineage); ``hub_id``: the Hub id it came from, when it did.
    """
    inherited = card_fields(input_folder)
    base_model = hub_id or inherited.get("base_model")
    method = record["method"]
    front = ["---"]
    if base_model:
        front.append(f"base_model: {_yaml_value(base_model)}")
    front += ["tags:", "- pruned", "- prunenet", f"- {_yaml_value(method)}"]
    if "license" in inherited:
        front.append(f"license: {_yaml_value(inherited['license'])}")
    front += ["pipeline_tag: text-generation", "library_name: transformers", "---", ""]
    source = record.get("source") or "an in-memory model"
    reduction = 100 * record["parameter_reduction"]
    command = ["prunenet", "compress", str(source), "--ratio", f"{record['ratio']:g}",
               "--method", method, "--seed", str(record["seed"])]
    if record.get("selection") and method == "prunenet":
        command += ["--selection", record["selection"]]
    body = [
        f"# {Path(str(source)).name or source}, FFN-pruned with prunenet ({method})",
        "",
        f"Structured pruning: {100 * record['ratio']:g}% of the FFN neurons of every layer were "
        f"removed (FFN width {record['ffn_width_before']} -> {record['ffn_width_after']}) with "
        f"the `{method}` method of prunenet {record['prunenet_version']}. Parameters "
        f"{record['parameters_before']:,} -> {record['parameters_after']:,} (-{reduction:.1f}%). "
        "The architecture is unchanged: the checkpoint loads with plain "
        "`transformers.AutoModelForCausalLM.from_pretrained`.",
        "",
    ]
    if record.get("gguf"):
        written = sorted(set(record["gguf"].get("requantized", {}).values()))
        kept = sorted(set(record["gguf"].get("sliced", {}).values()))
        body += [f"Also `{record['gguf'].get('file', 'model.gguf')}` for llama.cpp: the input's "
                 f"GGUF with every non-FFN tensor unchanged, FFN rows kept in their "
                 f"{'/'.join(kept)} blocks and ffn_down written as {'/'.join(written)}"
                 + (" (the input's type cannot hold the new width or cannot be written)"
                    if record["gguf"].get("substituted") else "") + ".", ""]
    if record.get("evaluation", {}).get("perplexity"):
        measured = record["evaluation"]["perplexity"]
        body += [f"Measured after pruning: perplexity {measured['value']:.2f} on the first "
                 f"{measured['windows']} evaluation windows of {measured['seqlen']} tokens of "
                 f"{measured['corpus']} (`prunenet eval` reproduces it).", ""]
    if record.get("policy_sha256"):
        body += [f"PruneNet policy checksum (sha256): `{record['policy_sha256']}`.", ""]
    if record.get("finetune"):
        tune = record["finetune"]
        body += [f"Recovered by LoRA fine-tuning ({tune.get('steps_run')} steps): evaluation "
                 f"perplexity {tune.get('eval_perplexity_before', float('nan')):.2f} -> "
                 f"{tune.get('eval_perplexity_after', float('nan')):.2f}.", ""]
    body += ["Made with:", "", "```bash", shlex.join(command), "```", "",
             "The full record of the compression is `prunenet.json` in this folder.", ""]
    return "\n".join(front + body)
