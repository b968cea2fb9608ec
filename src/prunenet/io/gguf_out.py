"""GGUF in, GGUF out: write a pruned model as a GGUF file of the same architecture as its source.

Everything outside the FFN is copied from the source GGUF unchanged, byte for byte: metadata (the
tokenizer included), embeddings, attention, norms. Only ``<arch>.feed_forward_length`` changes,
and ``general.size_label`` where the source has one: it is the parameter count, rounded as
llama.cpp's converter writes it (``135M`` -> ``111M``).
In GGUF a weight's quantization blocks run along its input dimension (ne0), so an FFN neuron of
the first matrices (``ffn_gate``, ``ffn_up``) is one row of whole blocks: those rows are copied in
their quantized form. The second matrix (``ffn_down``) loses columns, which cuts through blocks, so
it is requantized from the model's float weights (pruned, possibly refitted) with
``gguf.quants.quantize``: by default to Q8_0 where the source's is a quantized type (a second
rounding at 4-6 bits costs perplexity, Q8_0 nothing measurable: benchmarks/README.md, "GGUF
output") and to the source's own type where it is a float type; or to a type asked for. Where
that type cannot be written (K-quants, i-quants) or the kept width is not a whole number of its
blocks, it becomes Q8_0, else F16 (a width that is not a multiple of 32). The returned report
says which tensors were substituted and why. :func:`block_multiple` is the kept-width multiple
that avoids F16.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import InputError
from ..families import family_for
from .files import Output, atomic_file, guard_outputs
from .loading import gguf_reader, validate_gguf


@dataclass(frozen=True)
class GGUFFFNLayout:
    """Where an architecture's FFN lives in a GGUF block, and the matching model tensors.

    Both maps go from the GGUF tensor name inside ``blk.N.`` to the Hugging Face parameter name
    inside decoder layer N (as transformers' GGUF loader names it). ``rows``: neurons are rows
    (ne1), copied from the source in their quantized form. ``columns``: neurons are columns (ne0),
    requantized from the model's weights. ``fused``: tensors of ``rows`` that stack two blocks of
    d_ff rows (phi3's gate then up in one ``ffn_up``); a kept neuron keeps its row in both.
    """

    rows: dict[str, str]
    columns: dict[str, str]
    fused: frozenset[str] = frozenset()


_GATED_FFN = GGUFFFNLayout(
    rows={"ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight"},
    columns={"ffn_down.weight": "mlp.down_proj.weight"},
)

_FUSED_GATED_FFN = GGUFFFNLayout(
    rows={"ffn_up.weight": "mlp.gate_up_proj.weight"},
    columns={"ffn_down.weight": "mlp.down_proj.weight"},
    fused=frozenset({"ffn_up.weight"}),
)

# GGUF ``general.architecture`` -> FFN layout. Only architectures checked end to end against
# transformers and llama.cpp are listed (tests/test_gguf_out.py).
GGUF_FFN_LAYOUTS: dict[str, GGUFFFNLayout] = {
    "llama": _GATED_FFN,
    "qwen2": _GATED_FFN,
    "qwen3": _GATED_FFN,
    "gemma3": _GATED_FFN,
    "phi3": _FUSED_GATED_FFN,
}

# Types gguf.quants.quantize writes faithfully; the others raise NotImplementedError (K-quants,
# i-quants) or are not weight formats for this purpose (ternary, MXFP4).
WRITABLE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")

_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(.+)")


def _gguf():
    import gguf  # imported lazily: only GGUF output needs it

    return gguf


def _open_source(source_gguf: str | os.PathLike):
    """(reader, architecture, layout) of a GGUF source whose FFN this module can cut."""
    path = Path(source_gguf).expanduser()
    if not path.is_file() or path.suffix.lower() != ".gguf":
        raise InputError(
            f"GGUF output needs a .gguf input, and {path} is not one; convert a safetensors output "
            "with llama.cpp's convert_hf_to_gguf.py instead"
        )
    validate_gguf(path)
    reader = gguf_reader(path)
    if reader.byte_order != "I":
        raise InputError(f"{path} is a big-endian GGUF; GGUF output writes little-endian only")
    field = reader.get_field("general.architecture")
    architecture = field.contents() if field is not None else None
    layout = GGUF_FFN_LAYOUTS.get(architecture)
    if layout is None:
        raise InputError(
            f"GGUF output supports the architectures {', '.join(sorted(GGUF_FFN_LAYOUTS))}; "
            f"{path.name} is {architecture!r}. Write safetensors instead (--format safetensors)"
        )
    for tensor in reader.tensors:
        match = _BLOCK_TENSOR.fullmatch(tensor.name)
        if match is None:
            continue
        suffix = match.group(2)
        known = suffix in layout.rows or suffix in layout.columns or "norm" in suffix
        if suffix.startswith("ffn_") and not known:  # a bias, experts, a router: not mapped
            raise InputError(
                f"{path.name} has the FFN tensor {tensor.name}, which GGUF output does not know "
                "how to cut; write safetensors instead (--format safetensors)"
            )
    for name, field in reader.fields.items():
        if _uncopyable(field):
            raise InputError(
                f"{path.name}'s metadata key {name!r} is an empty or nested array, which GGUF "
                "output cannot copy (the gguf package writes neither); write safetensors "
                "instead (--format safetensors)"
            )
    return reader, architecture, layout


def _uncopyable(field) -> bool:
    """Whether a metadata field is an array GGUFWriter refuses to write: an empty one, or one
    of arrays."""
    value_types = _gguf().GGUFValueType
    return field.types[0] == value_types.ARRAY and (len(field.types) != 2 or not field.data)


def gguf_output_supported(source_gguf: str | os.PathLike) -> None:
    """Raise :class:`InputError` unless :func:`write_pruned_gguf` can write from this source.

    Cheap (reads the header only), so a caller can refuse before any pruning work: the source must
    be a little-endian .gguf file of an architecture in :data:`GGUF_FFN_LAYOUTS` without FFN
    tensors outside the layout (biases, experts), and without metadata the writer cannot copy
    (an empty or nested array).
    """
    _open_source(source_gguf)


def _field_value(field) -> tuple[Any, Any, Any]:
    """(value, type, sub_type) that make GGUFWriter write ``field``'s value byte for byte."""
    gguf = _gguf()
    value_types = gguf.GGUFValueType
    main_type = field.types[0]
    if main_type == value_types.STRING:
        return bytes(field.parts[-1]), main_type, None
    if main_type != value_types.ARRAY:
        return field.parts[-1][0].item(), main_type, None
    sub_type = field.types[-1]  # neither empty nor nested: _open_source refused those
    if sub_type == value_types.STRING:
        return [bytes(field.parts[index]) for index in field.data], main_type, sub_type
    items = np.concatenate([field.parts[index] for index in field.data])
    return items.tolist(), main_type, sub_type


FLOAT_TYPES = ("F32", "F16", "BF16")
Q8_0_BLOCK = 32


def default_down_type(source_type: str) -> str:
    """What ``ffn_down`` is written as by default: the source's type where it is a float type or
    Q8_0, else Q8_0 (requantizing pruned and refitted weights to 4-6 bits rounds them a second
    time: SmolLM2 at 0.3, Q4_1 +7% perplexity, Q5_0 +4%, Q8_0 none measurable)."""
    return source_type if source_type in (*FLOAT_TYPES, "Q8_0") else "Q8_0"


def _written_type(target, width: int) -> tuple[Any, str | None]:
    """The type to requantize a tensor of row length ``width`` to, and why it is not ``target``.

    ``target`` when the package writes it and ``width`` fills whole blocks; else Q8_0 (finer than
    any 4-6 bit type it stands in for) when ``width`` fills its 32-value blocks; else F16.
    """
    gguf = _gguf()
    types = gguf.GGMLQuantizationType
    block = gguf.GGML_QUANT_SIZES[target][0]
    if target.name not in WRITABLE_TYPES:
        reason = f"the gguf package cannot write {target.name}"
    elif width % block:
        reason = f"the kept width {width} is not a multiple of {target.name}'s {block}-value blocks"
    else:
        return target, None
    if width % Q8_0_BLOCK == 0:
        return types.Q8_0, reason
    return types.F16, reason


def block_multiple(source_gguf: str | os.PathLike, down_type: str | None = None) -> int:
    """The kept width's multiple that keeps every ``ffn_down`` written from ``source_gguf`` (as
    ``down_type``, default :func:`default_down_type`) in a block type rather than F16: 32 where
    one is written quantized, 1 where all are written as float. Reads the header only."""
    if down_type is not None:
        return 1 if down_type in FLOAT_TYPES else Q8_0_BLOCK
    reader, _, layout = _open_source(source_gguf)
    for tensor in reader.tensors:
        match = _BLOCK_TENSOR.fullmatch(tensor.name)
        if match and match.group(2) in layout.columns and \
                default_down_type(tensor.tensor_type.name) not in FLOAT_TYPES:
            return Q8_0_BLOCK
    return 1


def _model_tensor(model: nn.Module, layers: str, layer: int, name: str) -> Tensor:
    return model.get_parameter(f"{layers}.{layer}.{name}").detach().cpu()


def _check_kept_rows(kept_rows: list[Tensor], block_count: int, d_ff: int) -> int:
    """The common kept width; :class:`InputError` for index sets that do not fit the source."""
    if len(kept_rows) != block_count:
        raise InputError(f"got {len(kept_rows)} kept-row sets for a GGUF of {block_count} blocks")
    widths = {int(rows.numel()) for rows in kept_rows}
    if len(widths) != 1:
        raise InputError(f"every layer must keep the same number of neurons, got {sorted(widths)}")
    for layer, rows in enumerate(kept_rows):
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= d_ff):
            raise InputError(f"layer {layer}: kept rows must lie in [0, {d_ff})")
        if torch.unique(rows).numel() != rows.numel():
            raise InputError(f"layer {layer}: kept rows repeat an index")
    return widths.pop()


def write_pruned_gguf(
    source_gguf: str | os.PathLike,
    model: nn.Module,
    kept_rows: list[Tensor],
    out_file: str | os.PathLike,
    down_type: str | None = None,
) -> dict[str, Any]:
    """Write ``model`` (``source_gguf`` loaded by transformers, pruned to ``kept_rows``) as GGUF.

    ``kept_rows[l]``: the FFN neurons layer l kept, in the order the model's weights hold them.
    Rows of ``ffn_gate``/``ffn_up`` are copied from the source in their quantized form, after a
    check that they are exactly the model's (dequantized) weights; ``ffn_down`` is requantized from
    the model, to ``down_type`` (one of :data:`WRITABLE_TYPES`; default: :func:`default_down_type`
    of the source tensor's type). Requantizing to a 4-bit type adds a second rounding to already
    rounded weights; Q8_0 keeps them within 0.6% at about 1.7x the bytes of Q4_1 for that
    tensor. All other tensors and metadata are the source's. The file is written to a temporary
    sibling and renamed onto ``out_file``, which may replace any file but the source (by any
    name: :class:`OutputError` before anything is written); a failed write leaves neither, nor
    the folders made for it.

    Returns a report: ``architecture``, ``feed_forward_length`` (before/after), ``sliced`` and
    ``requantized`` (tensor -> type written), ``substituted`` (tensor -> "SOURCE -> WRITTEN: why"),
    ``down_type`` (the type every ``ffn_down`` was asked as: ``down_type``, or the one the
    default chose; None where it chose several), ``summary`` (one line) and ``out_file``.
    Raises :class:`InputError` for an unsupported source (:func:`gguf_output_supported`), kept
    rows that do not fit it, or a model whose FFN rows are not the source's (fine-tuned, or
    pruned with other rows).
    """
    gguf = _gguf()
    if down_type is not None and down_type not in WRITABLE_TYPES:
        raise InputError(f"down_type must be one of {', '.join(WRITABLE_TYPES)}, got {down_type!r}")
    reader, architecture, layout = _open_source(source_gguf)
    width_key = f"{architecture}.feed_forward_length"
    width_field = reader.get_field(width_key)
    block_field = reader.get_field(f"{architecture}.block_count")
    if width_field is None or block_field is None or len(width_field.data) != 1:
        raise InputError(f"{source_gguf} has no single {width_key} / block_count; cannot prune it")
    d_ff = int(width_field.parts[-1][0])
    kept = _check_kept_rows(list(kept_rows), int(block_field.parts[-1][0]), d_ff)
    family = family_for(getattr(model.config, "model_type", None))

    guard_outputs([Output(out_file, "out_file", folder=False, ours=Path.is_file)],
                  [source_gguf], overwrite=True)
    out_file = Path(out_file).expanduser()
    report: dict[str, Any] = {
        "architecture": architecture,
        "feed_forward_length": {"before": d_ff, "after": kept},
        "sliced": {},
        "requantized": {},
        "substituted": {},
    }
    targets = set()  # the types ffn_down was asked as, before any substitution
    # a temporary sibling renamed onto out_file; on failure it goes, with the folders made for it
    with open(Path(source_gguf).expanduser(), "rb") as source_file, \
            atomic_file(out_file, ours=Path.is_file) as tmp:
        writer = gguf.GGUFWriter(tmp, architecture)
        writer.kv_data[0].clear()  # re-added below in the source's order
        writer.data_alignment = reader.alignment
        for name, field in reader.fields.items():
            if name.startswith("GGUF."):  # magic, version, counts: the writer's own
                continue
            value, value_type, sub_type = _field_value(field)
            if name == width_key:
                value = kept
            elif name == SIZE_LABEL:
                value = _size_label(reader, layout, d_ff, kept).encode()
            writer.add_key_value(name, value, value_type, sub_type)
        # The tensor table first, then the tensors one at a time, each made only when written:
        # at most one tensor of the model is held, whatever its size.
        makers = []
        for tensor in reader.tensors:
            match = _BLOCK_TENSOR.fullmatch(tensor.name)
            suffix = match.group(2) if match else None
            if suffix in layout.rows:
                layer = int(match.group(1))
                rows = kept_rows[layer]
                blocks = 2 if suffix in layout.fused else 1
                if tensor.data.shape[0] != blocks * d_ff:
                    raise InputError(f"{tensor.name} has {tensor.data.shape[0]} rows; "
                                     f"{blocks} x {width_key} = {blocks * d_ff} expected")
                if blocks == 2:  # the same neurons in the gate and the up block
                    rows = torch.cat([rows, rows + d_ff])
                shape = (int(rows.numel()), *tensor.data.shape[1:])
                _add_info(writer, tensor.name, shape, tensor.data.dtype, tensor.tensor_type)
                makers.append(partial(_kept_source_rows, source_file, tensor, rows, partial(
                    _model_tensor, model, family.layers, layer, layout.rows[suffix])))
                report["sliced"][tensor.name] = tensor.tensor_type.name
            elif suffix in layout.columns:
                layer = int(match.group(1))
                target = gguf.GGMLQuantizationType[
                    down_type or default_down_type(tensor.tensor_type.name)]
                targets.add(target.name)
                written, reason = _written_type(target, kept)
                rows_of = int(tensor.shape[1])
                example = gguf.quants.quantize(np.zeros((1, kept), np.float32), written)
                _add_info(writer, tensor.name, (rows_of, *example.shape[1:]), example.dtype,
                          written)
                makers.append(partial(_requantized, model, family.layers, layer,
                                      layout.columns[suffix], (rows_of, kept), written))
                report["requantized"][tensor.name] = written.name
                if reason is not None:
                    report["substituted"][tensor.name] = (
                        f"{target.name} -> {written.name}: {reason}")
            else:
                _add_info(writer, tensor.name, tensor.data.shape, tensor.data.dtype,
                          tensor.tensor_type)
                makers.append(partial(_read, source_file, tensor))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for make in makers:
            writer.write_tensor_data(make())
        writer.close()
    report["down_type"] = targets.pop() if len(targets) == 1 else None
    report["out_file"] = str(out_file)
    report["summary"] = _summary(report)
    return report


SIZE_LABEL = "general.size_label"


def _size_label(reader, layout, d_ff: int, kept: int) -> str:
    """The pruned model's parameter count as llama.cpp's converter labels it (``111M``): the
    source's tensors, each FFN matrix with ``kept`` of its ``d_ff`` neurons."""
    total = 0
    for tensor in reader.tensors:
        match = _BLOCK_TENSOR.fullmatch(tensor.name)
        ffn = match is not None and match.group(2) in {*layout.rows, *layout.columns}
        count = int(tensor.n_elements)
        total += count // d_ff * kept if ffn else count
    return _gguf().utility.size_label(total, 0, 0, 0)


def _add_info(writer, name: str, shape: tuple[int, ...], dtype: np.dtype, raw_dtype) -> None:
    """Add a tensor to the table as ``GGUFWriter.add_tensor`` adds an array of this shape and
    dtype, without the array."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    writer.add_tensor_info(name, shape, np.dtype(dtype), nbytes, raw_dtype=raw_dtype)


def _read(handle, tensor) -> np.ndarray:
    """A source tensor's stored bytes, read from the file rather than its memory map: pages of
    a mapping stay resident until the whole file is unmapped, which would hold the model."""
    handle.seek(tensor.data_offset)
    return np.fromfile(handle, dtype=tensor.data.dtype,
                       count=tensor.data.size).reshape(tensor.data.shape)


def _requantized(model: nn.Module, layers: str, layer: int, name: str,
                 expected: tuple[int, int], written) -> np.ndarray:
    """The model's (pruned, possibly refitted) second matrix of ``layer``, quantized."""
    matrix = _model_tensor(model, layers, layer, name)
    if tuple(matrix.shape) != expected:
        raise InputError(f"the model's {name} in layer {layer} has shape "
                         f"{tuple(matrix.shape)}, expected {expected}")
    quants = _gguf().quants
    data = quants.quantize(matrix.float().numpy(), written)
    # A weight beyond the type's range (F16 above 65504, a block scale stored in F16) becomes
    # inf: refuse it rather than write a file whose model outputs NaN.
    if not np.isfinite(quants.dequantize(data, written)).all():
        largest = matrix.float().abs().max().item()
        raise InputError(f"the model's {name} in layer {layer} does not fit GGUF type "
                         f"{written.name} (largest |weight| {largest:.4g}); write another "
                         "--gguf-down-type (F32, BF16) or safetensors alone")
    return data


def _kept_source_rows(handle, tensor, kept_rows: Tensor, model_rows) -> np.ndarray:
    """The source tensor's kept rows, still quantized, once they are known to be the model's
    (``model_rows()``)."""
    gguf = _gguf()
    rows = np.ascontiguousarray(_read(handle, tensor)[kept_rows.cpu().numpy()])
    dequantized = torch.from_numpy(gguf.quants.dequantize(rows, tensor.tensor_type))
    model_rows = model_rows()
    if tuple(model_rows.shape) != tuple(dequantized.shape) or not torch.equal(
        dequantized.to(model_rows.dtype), model_rows
    ):
        raise InputError(
            f"{tensor.name}: the model's FFN rows are not the source GGUF's kept rows; GGUF "
            "output copies them from the source, so it needs the source model pruned with these "
            "kept rows and not otherwise changed (write safetensors for a fine-tuned model)"
        )
    return rows


def _summary(report: dict[str, Any]) -> str:
    """One line: how many FFN tensors were sliced and requantized, to which types, and why."""
    sliced = Counter(report["sliced"].values())
    requantized = Counter(report["requantized"].values())
    reasons = Counter(reason for reason in report["substituted"].values())
    width = report["feed_forward_length"]
    parts = [f"FFN width {width['before']} -> {width['after']}"]
    parts += [f"{count} tensors row-sliced in {name}" for name, count in sorted(sliced.items())]
    parts += [f"{count} requantized to {name}" for name, count in sorted(requantized.items())]
    parts += [f"{count} substituted ({reason})" for reason, count in sorted(reasons.items())]
    return "; ".join(parts)
