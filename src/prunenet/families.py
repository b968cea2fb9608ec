"""Where the FFN of each model family lives, declared once per ``config.model_type``.

A neuron ``i`` of a layer's FFN is an index along one axis of a few tensors: rows of the first (and,
in gated FFNs, the up) matrix and their bias entries, columns of the down / output matrix. A family
entry lists those tensors by their names inside a decoder layer; everything else (in-memory slicing,
streaming shards, config updates) is derived from it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

from .errors import InputError, UnsupportedModelError


@dataclass(frozen=True)
class Cut:
    """A layer tensor that loses entries along ``axis`` when FFN neurons are removed.

    ``blocks`` > 1 marks a fused tensor that stacks that many neuron-indexed blocks along ``axis``
    (phi3's gate_up_proj holds the gate rows, then the up rows). ``optional`` tensors (biases) exist
    only in some configurations.
    """

    name: str
    axis: int
    blocks: int = 1
    optional: bool = False


@dataclass(frozen=True)
class Family:
    """Declarative description of one architecture's FFN."""

    model_types: tuple[str, ...]
    layers: str  # path of the decoder-layer list from the *ForCausalLM root
    first: Cut  # the first FFN matrix: what the policy sees and the reward measures (block 0)
    cuts: tuple[Cut, ...]  # every tensor that changes, ``first`` included
    width_fields: tuple[str, ...]  # config fields holding d_ff; all present ones are updated
    lora_targets: dict[str, tuple[str, ...]]  # "attn" / "mlp" -> module names for LoRA

    def tensor_name(self, layer_index: int, cut: Cut) -> str:
        """Full state-dict name of ``cut`` in layer ``layer_index``."""
        return f"{self.layers}.{layer_index}.{cut.name}"

    def first_matrix(self, tensor: Tensor, d_ff: int) -> Tensor:
        """The first FFN matrix as (d_ff x d_model), from the raw ``first`` tensor."""
        rows = tensor.movedim(self.first.axis, 0)
        return rows[:d_ff] if self.first.blocks > 1 else rows

    def d_ff_of(self, first_tensor: Tensor) -> int:
        return first_tensor.shape[self.first.axis] // self.first.blocks


def _llama_like(*model_types: str) -> Family:
    return Family(
        model_types=model_types,
        layers="model.layers",
        first=Cut("mlp.gate_proj.weight", 0),
        cuts=(
            Cut("mlp.gate_proj.weight", 0),
            Cut("mlp.gate_proj.bias", 0, optional=True),
            Cut("mlp.up_proj.weight", 0),
            Cut("mlp.up_proj.bias", 0, optional=True),
            Cut("mlp.down_proj.weight", 1),
        ),
        width_fields=("intermediate_size",),
        lora_targets={
            "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
            "mlp": ("gate_proj", "up_proj", "down_proj"),
        },
    )


def _two_matrix(model_types: tuple[str, ...], layers: str, first: str, second: str,
                width_fields: tuple[str, ...], attn: tuple[str, ...], conv1d: bool = False,
                bias_optional: bool = True, mlp: tuple[str, ...] | None = None) -> Family:
    """FFNs of two matrices (first with bias, second): OPT, Phi, GPT-2, GPT-NeoX, Falcon.

    ``attn`` and ``mlp`` (default: the two matrices' module names) name the LoRA targets as
    peft matches them, by the end of a module's path: a name both groups' modules end with
    is written with its parent (GPT-2's ``attn.c_proj``, ``mlp.c_proj``)."""
    # Conv1D stores weights as (in, out): neurons are columns of the first, rows of the second.
    first_axis, second_axis = (1, 0) if conv1d else (0, 1)
    return Family(
        model_types=model_types,
        layers=layers,
        first=Cut(f"{first}.weight", first_axis),
        cuts=(
            Cut(f"{first}.weight", first_axis),
            Cut(f"{first}.bias", 0, optional=bias_optional),
            Cut(f"{second}.weight", second_axis),
        ),
        width_fields=width_fields,
        lora_targets={"attn": attn,
                      "mlp": mlp or (first.split(".")[-1], second.split(".")[-1])},
    )


FAMILIES: tuple[Family, ...] = (
    _llama_like("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo",
                "olmo2", "granite"),
    Family(
        model_types=("phi3",),
        layers="model.layers",
        first=Cut("mlp.gate_up_proj.weight", 0, blocks=2),
        cuts=(Cut("mlp.gate_up_proj.weight", 0, blocks=2), Cut("mlp.down_proj.weight", 1)),
        width_fields=("intermediate_size",),
        lora_targets={"attn": ("qkv_proj", "o_proj"), "mlp": ("gate_up_proj", "down_proj")},
    ),
    _two_matrix(("opt",), "model.decoder.layers", "fc1", "fc2", ("ffn_dim",),
                ("q_proj", "k_proj", "v_proj", "out_proj")),
    _two_matrix(("phi",), "model.layers", "mlp.fc1", "mlp.fc2", ("intermediate_size",),
                ("q_proj", "k_proj", "v_proj", "dense")),
    _two_matrix(("gpt2",), "transformer.h", "mlp.c_fc", "mlp.c_proj", ("n_inner",),
                ("c_attn", "attn.c_proj"), conv1d=True, mlp=("c_fc", "mlp.c_proj")),
    _two_matrix(("gpt_neox",), "gpt_neox.layers", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h",
                ("intermediate_size",), ("query_key_value", "dense")),
    _two_matrix(("falcon",), "transformer.h", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h",
                ("ffn_hidden_size",), ("query_key_value", "dense")),
)

_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def family_for(model_type: str | None) -> Family:
    """The family entry of ``model_type``; :class:`UnsupportedModelError` lists the others."""
    family = _BY_MODEL_TYPE.get(model_type or "")
    if family is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: "
            + ", ".join(supported_model_types())
        )
    return family


def context_length(config) -> int | None:
    """The most positions a model of ``config`` reads at once, when its config says."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_sequence_length(config, seqlen: int, option: str = "--seqlen",
                          model: str = "model") -> None:
    """Refuse windows of fewer than 2 tokens (no next token to predict) or beyond the context of
    the ``model`` (its name in the message) that ``config`` describes."""
    if seqlen < 2:
        raise InputError(f"{option} must be at least 2 tokens, got {seqlen}")
    context = context_length(config)
    if context is not None and seqlen > context:
        raise InputError(f"{option} {seqlen} exceeds the {model}'s context of {context} tokens")


def check_multiple(multiple: int) -> None:
    """Refuse a kept-count multiple (``--round-to``) that is not a positive integer."""
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise InputError(f"--round-to must be a positive integer, got {multiple!r}")


def _kept_share(ratio: float) -> Fraction:
    """``1 - ratio`` exactly, the ratio read as the decimal it prints as."""
    return 1 - Fraction(repr(float(ratio)))


def check_ratio(ratio: float) -> None:
    """Refuse a compression ratio that is not a number in [0, 1) (a bool, a string, NaN)."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise InputError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if not 0.0 <= float(ratio) < 1.0:
        raise InputError(f"ratio must be in [0, 1), got {ratio}")


def checked_ratio(ratio: float) -> float:
    """``ratio`` as the float every run records (a numpy number as its value, -0.0 as 0.0);
    :func:`check_ratio` refuses what is no ratio."""
    check_ratio(ratio)
    return float(ratio) + 0.0


def kept_count(d_ff: int, ratio: float, multiple: int = 1) -> int:
    """Neurons kept per layer at compression ``ratio``: ``floor((1 - ratio) * d_ff)``, computed
    exactly on the ratio as written (its shortest decimal form): 0.34 of 100 keeps 66, where
    floating point gives ``(1 - 0.34) * 100 = 65.99999...`` and ``int`` would keep 65.

    ``multiple`` > 1: the multiple of it nearest to ``(1 - ratio) * d_ff`` instead (whole
    quantization blocks, whole kernel tiles), at least ``multiple`` and, for a positive ratio,
    less than ``d_ff``.
    """
    check_ratio(ratio)
    check_multiple(multiple)
    if multiple > 1:
        largest = (d_ff - (1 if ratio > 0 else 0)) // multiple * multiple
        if largest < multiple:
            raise InputError(f"--round-to {multiple} leaves no whole multiple of {multiple} "
                             f"below the FFN width {d_ff}; use a smaller --round-to")
        nearest = math.floor(_kept_share(ratio) * d_ff / multiple + Fraction(1, 2)) * multiple
        return min(max(nearest, multiple), largest)
    kept = math.floor(_kept_share(ratio) * d_ff)
    if kept < 1:
        raise InputError(
            f"ratio {ratio} keeps {kept} of {d_ff} FFN neurons; the largest usable ratio keeps 1 "
            f"(ratio < {1 - 1 / d_ff:.6f})"
        )
    return kept


def neuron_index(cut: Cut, kept_rows: Tensor, d_ff: int) -> Tensor:
    """Indices to keep along ``cut.axis``: ``kept_rows`` repeated per fused block."""
    if cut.blocks == 1:
        return kept_rows
    return torch.cat([kept_rows + block * d_ff for block in range(cut.blocks)])


def slice_tensor(tensor: Tensor, cut: Cut, kept_rows: Tensor, d_ff: int) -> Tensor:
    """``tensor`` with only the kept neurons along ``cut.axis`` (a new contiguous tensor)."""
    index = neuron_index(cut, kept_rows.to(tensor.device), d_ff)
    return tensor.index_select(cut.axis, index).contiguous()
