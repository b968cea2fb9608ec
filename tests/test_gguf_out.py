"""GGUF in, GGUF out (prunenet.io.gguf_out): exact properties of the written file, and agreement of
llama.cpp (llama-cpp-python, installed by scripts/test.sh) with transformers on it.

Tolerances below were measured here (benchmarks/README.md, "GGUF output") and are stated per test.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize
from gguf.utility import size_label
from transformers import AutoModelForCausalLM

import prunenet
from prunenet.assets import asset_path, cache_dir
from prunenet.errors import InputError, MissingAssetError, OutputError
from prunenet.io.gguf_out import (
    GGUF_FFN_LAYOUTS,
    _written_type,
    block_multiple,
    default_down_type,
    gguf_output_supported,
    write_pruned_gguf,
)

LLAMA_CPP_REASON = "llama-cpp-python is not installed (scripts/test.sh installs it)"
LLAMA_CPP_SDIST = ("llama-cpp-python==0.3.36",
                   "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")
FFN_SUFFIXES = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
# Every architecture GGUF output maps, each built as a tiny file by _tiny_gguf (checked below).
GGUF_ARCHITECTURES = ["llama", "qwen2", "qwen3", "gemma3", "phi3"]


def _asset(name: str) -> Path:
    try:
        return asset_path(name)
    except MissingAssetError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def tinycoder() -> Path:
    return _asset("tinycoder-gguf") / "tiny.gguf"


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason=LLAMA_CPP_REASON)


def _raw_fields(reader: GGUFReader) -> dict[str, bytes]:
    """Every metadata key's bytes as stored (key, type, value), the writer's counts excluded."""
    return {name: b"".join(bytes(part) for part in field.parts)
            for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _tensors(reader: GGUFReader) -> dict[str, object]:
    return {tensor.name: tensor for tensor in reader.tensors}


def _is_ffn(name: str) -> bool:
    return name.endswith(FFN_SUFFIXES)


def _check_written_file(source: Path, written: Path, kept_rows: list[torch.Tensor],
                        pruned_model: torch.nn.Module) -> GGUFReader:
    """The exact properties of a written GGUF, against its source and the pruned model."""
    before, after = GGUFReader(str(source)), GGUFReader(str(written))
    width = len(kept_rows[0])
    old_fields, new_fields = _raw_fields(before), _raw_fields(after)
    assert list(old_fields) == list(new_fields)  # same keys, same order
    width_key = f"{before.fields['general.architecture'].contents()}.feed_forward_length"
    d_ff = before.fields[width_key].contents()
    assert after.fields[width_key].contents() == width
    changed = [name for name in old_fields if old_fields[name] != new_fields[name]]
    assert set(changed) - {"general.size_label"} == {width_key}
    if "general.size_label" in old_fields:  # as llama.cpp's converter writes it, of the
        assert after.fields["general.size_label"].contents() == size_label(  # tensors written
            sum(int(tensor.n_elements) for tensor in after.tensors), 0, 0, 0)
    old_tensors, new_tensors = _tensors(before), _tensors(after)
    assert list(old_tensors) == list(new_tensors)
    for name, old in old_tensors.items():
        new = new_tensors[name]
        if not _is_ffn(name):
            assert new.tensor_type == old.tensor_type and bytes(new.data) == bytes(old.data), name
            continue
        layer = int(name.split(".")[1])
        blocks = int(old.shape[1]) // d_ff  # 2: phi3's gate and up rows in one ffn_up
        assert [int(n) for n in new.shape] == (
            [width, int(old.shape[1])] if "ffn_down" in name
            else [int(old.shape[0]), blocks * width])
        if "ffn_down" in name:  # requantized from the pruned model's float weights
            down = pruned_model.model.layers[layer].mlp.down_proj.weight.detach().numpy()
            expected = quantize(down, new.tensor_type)
            assert bytes(new.data) == bytes(np.ascontiguousarray(expected)), name
        else:  # whole quantized rows of the source, byte for byte
            kept = kept_rows[layer].numpy()
            rows = old.data[np.concatenate([kept + block * d_ff for block in range(blocks)])]
            assert new.tensor_type == old.tensor_type
            assert bytes(new.data) == bytes(np.ascontiguousarray(rows)), name
    return after


def _load_gguf(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32).eval()


def _hf_log_probs(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1)


def _llama_cpp_model(llama_cpp, path: Path, n_ctx: int = 128):
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_threads=2,
                           n_batch=n_ctx, seed=0, verbose=False)


def _llama_cpp_log_probs(llm, token_ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(token_ids)
    logits = torch.from_numpy(np.array(llm.scores[: len(token_ids)], dtype=np.float64))
    return torch.log_softmax(logits, dim=-1)


def _llama_cpp_greedy(llm, token_ids: list[int], count: int) -> list[int]:
    """``count`` greedy next tokens from llama.cpp after ``token_ids``."""
    llm.reset()
    llm.eval(token_ids)
    generated: list[int] = []
    for _ in range(count):
        generated.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(generated[-1:])
    return generated


def _kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Largest per-position KL(reference || other) between two [tokens, vocab] log-prob tables."""
    return float((reference.exp() * (reference - other)).sum(-1).max())


# --- the writer, exact properties --------------------------------------------------------------


def test_tinycoder_round_trip(tmp_path, tinycoder):
    result = prunenet.compress(str(tinycoder), ratio=0.25, method="random", seed=3,
                               reconstruct="none",  # F16-exact kept columns: an exact round trip
                               progress=False)
    out = tmp_path / "pruned.gguf"
    report = write_pruned_gguf(tinycoder, result.model, result.kept_rows, out)
    assert report["feed_forward_length"] == {"before": 64, "after": 48}
    assert report["substituted"] == {}
    assert set(report["requantized"].values()) == {"F16"}
    assert len(report["sliced"]) == 4 and len(report["requantized"]) == 2
    _check_written_file(tinycoder, out, result.kept_rows, result.model)
    reloaded = _load_gguf(out)
    assert reloaded.config.intermediate_size == 48
    # F16 source and F16 rewrite of F16-exact values: the reloaded model is the pruned model.
    ids = list(range(5, 37))
    assert torch.equal(_hf_log_probs(reloaded, ids), _hf_log_probs(result.model, ids))
    assert not list(tmp_path.glob(".pruned.gguf.tmp-*"))


def _write_unpruned(source: Path, out: Path) -> dict:
    """Write ``source`` through the writer keeping every neuron in order, ffn_down in the
    source's own type."""
    model = _load_gguf(source)
    every_row = [torch.arange(model.config.intermediate_size)] * model.config.num_hidden_layers
    types = {t.tensor_type.name for t in GGUFReader(str(source)).tensors if "ffn_down" in t.name}
    assert len(types) == 1
    return write_pruned_gguf(source, model, every_row, out, down_type=types.pop())


def test_keeping_every_neuron_reproduces_the_source_file(tmp_path, tinycoder):
    """Metadata, tensor table, alignment, padding and the requantized ffn_down: all identical."""
    _write_unpruned(tinycoder, tmp_path / "same.gguf")
    assert (tmp_path / "same.gguf").read_bytes() == tinycoder.read_bytes()


def test_down_type(tmp_path, tinycoder):
    source = _tiny_gguf(tmp_path / "tiny.gguf", GGMLQuantizationType.Q4_1, tinycoder)
    result = prunenet.compress(str(source), ratio=0.25, method="random", progress=False)
    out = tmp_path / "pruned.gguf"
    report = write_pruned_gguf(source, result.model, result.kept_rows, out, down_type="Q4_1")
    assert set(report["requantized"].values()) == {"Q4_1"} and report["substituted"] == {}
    assert set(report["sliced"].values()) == {"Q4_1"}
    _check_written_file(source, out, result.kept_rows, result.model)
    with pytest.raises(InputError, match="down_type must be one of"):
        write_pruned_gguf(source, result.model, result.kept_rows, out, down_type="Q4_K")


def _q4_k_blocks(rows: int, columns: int, generator: np.random.Generator) -> np.ndarray:
    """Valid Q4_K data (the gguf package cannot quantize to K-quants): small scales, random
    6-bit block scales and 4-bit values. 144 bytes per 256 values."""
    blocks = generator.integers(0, 256, size=(rows * columns // 256, 144), dtype=np.uint8)
    blocks[:, 0:4] = np.array([2e-4, 1.5e-3], dtype=np.float16).view(np.uint8)  # d, dmin
    return blocks.reshape(rows, columns // 256 * 144)


def _tiny_gguf(path: Path, ffn_type: GGMLQuantizationType, tinycoder: Path,
               d_model: int = 256, d_ff: int = 512, layers: int = 2,
               vocab: int = 512, architecture: str = "llama", license: str | None = None,
               license_name: str | None = None, license_link: str | None = None) -> Path:
    """A random LLaMA GGUF whose FFN matrices are stored in ``ffn_type``; its vocabulary is the
    first ``vocab`` tokens of tinycoder's SentencePiece vocabulary (byte fallback included), so
    llama.cpp loads it. d_model and d_ff are multiples of 256 so that K-quants fit.
    ``architecture="qwen2"``: the same with Qwen2's attention biases (q, k, v); ``"gemma3"``:
    Gemma 3's blocks (q/k norms, norms after attention and FFN, 256-wide heads, one KV head,
    the output matrix tied to the embeddings); ``"qwen3"``: q/k norms and 128-wide heads (the
    head width transformers assumes for a Qwen3 GGUF); ``"phi3"``: fused q/k/v and one
    ``ffn_up`` of 2 x d_ff rows, the gate's above the up's, no ``ffn_gate``. ``license``: its
    ``general.license``, where given (``license_name``, ``license_link``: its
    ``general.license.name`` and ``.link``)."""
    generator = np.random.default_rng(0)
    arch = architecture
    gemma, fused, qk_norms = arch == "gemma3", arch == "phi3", arch in ("gemma3", "qwen3")
    heads, kv_heads, head_dim = {"gemma3": (2, 1, 256), "qwen3": (2, 1, 128)}.get(
        arch, (4, 2, d_model // 4))
    writer = GGUFWriter(path, arch)
    for key, value in (("general.license", license), ("general.license.name", license_name),
                       ("general.license.link", license_link)):
        if value is not None:
            writer.add_string(key, value)
    writer.add_string("general.size_label", "1.0M")  # rewritten for the pruned file
    for key, value in [("context_length", 256), ("embedding_length", d_model),
                       ("block_count", layers), ("feed_forward_length", d_ff),
                       ("attention.head_count", heads), ("attention.head_count_kv", kv_heads)]:
        writer.add_uint32(f"{arch}.{key}", value)
    if qk_norms:  # and their own head width
        for key in ("attention.key_length", "attention.value_length"):
            writer.add_uint32(f"{arch}.{key}", head_dim)
    if gemma:
        writer.add_uint32(f"{arch}.attention.sliding_window", 512)
        writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
    else:
        writer.add_uint32(f"{arch}.rope.dimension_count", head_dim)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    source = GGUFReader(str(tinycoder))
    for name, field in source.fields.items():
        if name.startswith("tokenizer."):
            value = field.contents()
            writer.add_key_value(name, value[:vocab] if isinstance(value, list) else value,
                                 field.types[0], field.types[-1] if len(field.types) > 1 else None)
    if fused:  # else transformers' Phi-3 default, 32000, lies outside this vocabulary
        writer.add_uint32("tokenizer.ggml.padding_token_id", 0)

    def random(*shape: int, scale: float = 0.05) -> np.ndarray:
        return (generator.standard_normal(shape) * scale).astype(np.float32)

    def ffn(rows: int, columns: int) -> np.ndarray:
        if ffn_type == GGMLQuantizationType.Q4_K:
            return _q4_k_blocks(rows, columns, generator)
        return quantize(random(rows, columns), ffn_type)

    def norm(name: str, width: int = d_model, gain: float = 1.0) -> None:
        writer.add_tensor(name, gain + random(width))

    embedding_scale = 0.2 if gemma else 1.0  # Gemma's is also its output matrix
    writer.add_tensor("token_embd.weight",
                      random(vocab, d_model, scale=embedding_scale).astype(np.float16))
    for layer in range(layers):
        prefix = f"blk.{layer}."
        norm(prefix + "attn_norm.weight")
        attention = [("attn_q", (heads * head_dim, d_model)),
                     ("attn_k", (kv_heads * head_dim, d_model)),
                     ("attn_v", (kv_heads * head_dim, d_model))]
        if fused:
            attention = [("attn_qkv", ((heads + 2 * kv_heads) * head_dim, d_model))]
        for name, shape in [*attention, ("attn_output", (d_model, heads * head_dim))]:
            writer.add_tensor(prefix + name + ".weight", random(*shape).astype(np.float16))
            if arch == "qwen2" and name != "attn_output":
                writer.add_tensor(prefix + name + ".bias", random(shape[0], scale=0.5))
        if qk_norms:
            norm(prefix + "attn_q_norm.weight", head_dim)
            norm(prefix + "attn_k_norm.weight", head_dim)
        if gemma:
            # Gemma's residual stream starts at 16 x the embedding, which the tied output
            # matrix reads back: gains of 5 let the blocks, not the input token, decide.
            norm(prefix + "post_attention_norm.weight", gain=5.0)
        norm(prefix + "ffn_norm.weight")
        if fused:
            writer.add_tensor(prefix + "ffn_up.weight", ffn(2 * d_ff, d_model),
                              raw_dtype=ffn_type)
        else:
            writer.add_tensor(prefix + "ffn_gate.weight", ffn(d_ff, d_model), raw_dtype=ffn_type)
            writer.add_tensor(prefix + "ffn_up.weight", ffn(d_ff, d_model), raw_dtype=ffn_type)
        writer.add_tensor(prefix + "ffn_down.weight", ffn(d_model, d_ff), raw_dtype=ffn_type)
        if gemma:
            norm(prefix + "post_ffw_norm.weight", gain=5.0)
    norm("output_norm.weight")
    if not gemma:
        writer.add_tensor("output.weight", random(vocab, d_model, scale=0.2).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# kept width 384 fills whole 32-value blocks; 300 does not (block types fall back to F16). By
# default a quantized ffn_down is written as Q8_0, a float one in its own type.
@pytest.mark.parametrize("source_type,ratio,written,substituted_from", [
    ("Q4_1", 0.25, "Q8_0", None),
    ("Q8_0", 0.25, "Q8_0", None),
    ("BF16", 0.25, "BF16", None),
    ("Q4_K", 0.25, "Q8_0", None),
    ("Q4_1", 0.4140625, "F16", "Q8_0"),
    ("Q4_K", 0.4140625, "F16", "Q8_0"),
    ("BF16", 0.4140625, "BF16", None),
])
@pytest.mark.parametrize("architecture", GGUF_ARCHITECTURES)
def test_quantized_ffn_types(tmp_path, tinycoder, source_type, ratio, written, substituted_from,
                             architecture):
    source = _tiny_gguf(tmp_path / "tiny.gguf", GGMLQuantizationType[source_type], tinycoder,
                        architecture=architecture)
    result = prunenet.compress(str(source), ratio=ratio, method="random", progress=False)
    width = result.model.config.intermediate_size
    out = tmp_path / "out" / "pruned.gguf"
    report = write_pruned_gguf(source, result.model, result.kept_rows, out)
    assert set(report["requantized"].values()) == {written}
    assert set(report["sliced"].values()) == {source_type}
    assert bool(report["substituted"]) == (substituted_from is not None)
    if substituted_from is not None:
        assert all(f"{substituted_from} -> {written}" in why
                   for why in report["substituted"].values())
    _check_written_file(source, out, result.kept_rows, result.model)
    reloaded = _load_gguf(out)
    assert reloaded.config.intermediate_size == width
    rows = ("gate_up_proj",) if architecture == "phi3" else ("gate_proj", "up_proj")
    for layer, original in zip(reloaded.model.layers, result.model.model.layers):
        for name in rows:
            assert torch.equal(getattr(layer.mlp, name).weight, getattr(original.mlp, name).weight)
        down = original.mlp.down_proj.weight.detach().numpy()
        requantized = dequantize(quantize(down, GGMLQuantizationType[written]),
                                 GGMLQuantizationType[written])
        assert torch.equal(layer.mlp.down_proj.weight, torch.from_numpy(requantized))


def test_every_mapped_architecture_is_built_and_tested():
    assert sorted(GGUF_ARCHITECTURES) == sorted(GGUF_FFN_LAYOUTS)


def test_written_types():
    """By default a quantized ffn_down is written as Q8_0 and a float one in its own type; a type
    that cannot be written, or whose blocks the kept width cuts, becomes Q8_0, else F16."""
    assert {t: default_down_type(t) for t in ("Q4_1", "Q4_K", "Q6_K", "IQ4_XS", "Q8_0", "F16",
                                              "BF16", "F32")} == {
        "Q4_1": "Q8_0", "Q4_K": "Q8_0", "Q6_K": "Q8_0", "IQ4_XS": "Q8_0", "Q8_0": "Q8_0",
        "F16": "F16", "BF16": "BF16", "F32": "F32"}
    types = GGMLQuantizationType
    assert _written_type(types.Q4_K, 1440) == (types.Q8_0, "the gguf package cannot write Q4_K")
    assert _written_type(types.Q4_K, 1433)[0] == types.F16
    assert _written_type(types.Q4_1, 1440) == (types.Q4_1, None)
    assert _written_type(types.Q4_1, 1433) == (
        types.F16, "the kept width 1433 is not a multiple of Q4_1's 32-value blocks")
    assert _written_type(types.Q8_0, 1440) == (types.Q8_0, None)
    assert _written_type(types.F16, 1433) == (types.F16, None)


def test_block_multiple_reads_the_second_matrix_type(tmp_path, tinycoder):
    for source_type, multiple in [("Q4_1", 32), ("Q4_K", 32), ("F16", 1), ("BF16", 1)]:
        source = _tiny_gguf(tmp_path / f"{source_type}.gguf", GGMLQuantizationType[source_type],
                            tinycoder)
        assert block_multiple(source) == multiple
        assert block_multiple(source, "F16") == 1 and block_multiple(source, "Q4_0") == 32
    assert block_multiple(asset_path("tinycoder-gguf") / "tiny.gguf") == 1  # F16 ffn_down


def test_compress_rounds_the_kept_width_to_whole_blocks_for_a_quantized_gguf(tmp_path, tinycoder,
                                                                             caplog):
    """Ratio 0.4140625 keeps 300 of 512 neurons, which cuts 32-value blocks (ffn_down would be
    F16). Writing model.gguf, the default keeps 288, so ffn_down is Q8_0 (the default for a
    quantized source) and the safetensors beside it have the same width; --round-to 1 keeps 300
    (F16, as asked); a float --gguf-down-type or a safetensors-only output keeps the exact
    count; --gguf-down-type Q4_1 writes the source's own type."""
    from prunenet.cli import main

    source = _tiny_gguf(tmp_path / "tiny.gguf", GGMLQuantizationType.Q4_1, tinycoder)
    runs = {"auto": [], "exact": ["--round-to", "1"], "plain": ["--format", "safetensors"],
            "64": ["--round-to", "64", "--format", "safetensors"],
            "q4": ["--gguf-down-type", "Q4_1"], "f16": ["--gguf-down-type", "F16"]}
    for name, extra in runs.items():
        assert main(["-q", "compress", str(source), "--ratio", "0.4140625", "--out",
                     str(tmp_path / name), "--method", "random", *extra]) == 0
    records = {name: json.loads((tmp_path / name / "prunenet.json").read_text())
               for name in runs}
    assert {name: (r["ffn_width_after"], r["round_to"]) for name, r in records.items()} == {
        "auto": (288, 32), "exact": (300, 1), "plain": (300, 1), "64": (320, 64),
        "q4": (288, 32), "f16": (300, 1)}
    assert "keeping 288 of 512 FFN neurons per layer (ratio 0.4375), the multiple of 32" in \
        caplog.text and "--round-to 1 keeps 300" in caplog.text
    # a type other than the one asked for is said as the run writes it, not only in the record
    substituted = [record.getMessage() for record in caplog.records
                   if record.levelname == "WARNING" and "substituted" in record.getMessage()]
    assert substituted == [
        "model.gguf: FFN width 512 -> 300; 4 tensors row-sliced in Q4_1; 2 requantized to F16; "
        "2 substituted (Q8_0 -> F16: the kept width 300 is not a multiple of Q8_0's 32-value "
        "blocks)"]
    written = {name: (set(r["gguf"]["requantized"].values()), bool(r["gguf"]["substituted"]))
               for name, r in records.items() if "gguf" in r}
    assert written == {"auto": ({"Q8_0"}, False), "exact": ({"F16"}, True),
                       "q4": ({"Q4_1"}, False), "f16": ({"F16"}, False)}
    for name in written:
        reloaded = _load_gguf(tmp_path / name / "model.gguf")
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        assert reloaded.config.intermediate_size == stock.config.intermediate_size == \
            records[name]["ffn_width_after"]
    cards = {name: (tmp_path / name / "README.md").read_text() for name in ("auto", "q4")}
    assert "--format both --gguf-down-type Q8_0 --round-to 32 --out OUT" in cards["auto"]
    assert "--format both --gguf-down-type Q4_1 --round-to 32 --out OUT" in cards["q4"]
    assert "43.8% (ratio 0.414062, rounded to a multiple of 32 kept neurons)" in cards["auto"]
    size = {name: (tmp_path / name / "model.gguf").stat().st_size for name in written}
    assert size["q4"] < size["auto"] < size["exact"] and size["auto"] < source.stat().st_size


def test_bad_round_to_and_down_type_are_refused_with_nothing_written(tmp_path, capsys):
    """A multiple with no whole multiple below the FFN width (tinycoder's 64), a non-positive
    one, or a type the writer cannot write: one line, exit 2, nothing written."""
    from prunenet.cli import main

    source = str(asset_path("tinycoder-gguf") / "tiny.gguf")
    out = tmp_path / "out"
    assert main(["-q", "compress", source, "--ratio", "0.25", "--out", str(out), "--method",
                 "random", "--round-to", "64"]) == 2
    assert "--round-to 64 leaves no whole multiple of 64 below the FFN width 64" in \
        capsys.readouterr().err
    for bad in (["--round-to", "0"], ["--gguf-down-type", "Q4_K"]):
        with pytest.raises(SystemExit):
            main(["-q", "compress", source, "--ratio", "0.25", "--out", str(out), *bad])
    with pytest.raises(InputError, match="unknown --gguf-down-type 'Q4_K'; choose from auto, F32"):
        prunenet.compress(source, ratio=0.25, method="random", gguf_down_type="Q4_K",
                          progress=False)
    with pytest.raises(InputError, match="--round-to must be a positive integer, got 0"):
        prunenet.compress(source, ratio=0.25, method="random", round_to=0, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_refuses_a_model_that_is_not_the_pruned_source(tmp_path, tinycoder):
    result = prunenet.compress(str(tinycoder), ratio=0.25, method="random", progress=False)
    shifted = [torch.roll(rows, 1) for rows in result.kept_rows]  # other row order
    with pytest.raises(InputError, match="not the source GGUF's kept rows"):
        write_pruned_gguf(tinycoder, result.model, shifted, tmp_path / "x.gguf")
    with pytest.raises(InputError, match="same number of neurons"):
        write_pruned_gguf(tinycoder, result.model, [result.kept_rows[0], torch.arange(40)],
                          tmp_path / "x.gguf")
    with pytest.raises(InputError, match="kept-row sets"):
        write_pruned_gguf(tinycoder, result.model, result.kept_rows[:1], tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())  # nothing written, no temporary file left


def test_a_fused_ffn_up_that_is_not_two_blocks_high_is_refused(tmp_path, tinycoder):
    """phi3's ffn_up holds the gate's d_ff rows above the up's; a file whose header names another
    width is refused with both numbers, before any row is copied."""
    source = _tiny_gguf(tmp_path / "tiny.gguf", GGMLQuantizationType.Q8_0, tinycoder,
                        architecture="phi3")
    result = prunenet.compress(str(source), ratio=0.25, method="random", progress=False)
    edited = GGUFReader(str(source), "r+")  # the header's width, edited in place
    edited.fields["phi3.feed_forward_length"].parts[-1][0] = 1024
    edited.data.flush()
    del edited
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"blk\.0\.ffn_up\.weight has 1024 rows; "
                                         r"2 x phi3\.feed_forward_length = 2048 expected"):
        write_pruned_gguf(source, result.model, result.kept_rows, out / "pruned.gguf")
    assert not out.exists()  # no temporary file left, nor the folder made for the file


def test_failed_write_leaves_the_old_file(tmp_path, tinycoder, monkeypatch):
    result = prunenet.compress(str(tinycoder), ratio=0.25, method="random", progress=False)
    out = tmp_path / "pruned.gguf"
    out.write_bytes(b"previous")

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("gguf.quants.quantize", fail)
    with pytest.raises(KeyboardInterrupt):
        write_pruned_gguf(tinycoder, result.model, result.kept_rows, out)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["pruned.gguf"]


@pytest.mark.parametrize("down_type,weight", [("F16", 1e5), ("Q8_0", 1e7), ("F16", float("nan"))])
def test_a_second_matrix_the_type_cannot_hold_is_refused_with_nothing_written(
        tmp_path, tinycoder, down_type, weight):
    """A weight beyond the written type's range (F16 above 65504; Q8_0, whose block scale is
    F16, above 127 x 65504) would be stored as inf, and a NaN as NaN: the write is refused,
    naming the layer, and leaves nothing (it had written a file whose model outputs NaN), not
    even the folders it made for the file (they had stayed, empty)."""
    source = _tiny_gguf(tmp_path / "tiny.gguf", GGMLQuantizationType.Q8_0, tinycoder)
    result = prunenet.compress(str(source), ratio=0.25, method="random", progress=False)
    with torch.no_grad():  # 384 neurons kept: whole Q8_0 blocks, so Q8_0 is written as asked
        result.model.model.layers[1].mlp.down_proj.weight[0, 0] = weight
    out = tmp_path / "out" / "deeper" / "pruned.gguf"
    with pytest.raises(InputError, match=f"down_proj.weight in layer 1 does not fit GGUF type "
                                         f"{down_type} "):
        write_pruned_gguf(source, result.model, result.kept_rows, out, down_type=down_type)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny.gguf"]


def test_the_source_gguf_is_never_written_over(tmp_path, tinycoder):
    """out_file naming the source (by its path, or by a hard link to it) is refused before
    anything is written: the source had been replaced by the pruned file."""
    source = tmp_path / "tiny.gguf"
    source.write_bytes(tinycoder.read_bytes())
    os.link(source, tmp_path / "same.gguf")
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    result = prunenet.compress(str(source), ratio=0.25, method="random", progress=False)
    for out_file in (source, tmp_path / "same.gguf"):
        with pytest.raises(OutputError, match="is the input"):
            write_pruned_gguf(source, result.model, result.kept_rows, out_file)
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.gguf", "tiny.gguf"]


def _write_mamba_gguf(path) -> None:
    """A one-tensor GGUF of an architecture GGUF output does not map."""
    writer = GGUFWriter(path, "mamba")
    writer.add_tensor("blk.0.ssm_in.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unsupported_sources_are_refused_up_front(tmp_path, tinycoder):
    gguf_output_supported(tinycoder)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(InputError, match="needs a .gguf input"):
        gguf_output_supported(folder)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(InputError, match="not a valid GGUF"):
        gguf_output_supported(tmp_path / "junk.gguf")
    _write_mamba_gguf(tmp_path / "mamba.gguf")
    with pytest.raises(InputError,
                       match="supports the architectures gemma3, llama, phi3, qwen2, qwen3; "
                             "mamba.gguf is 'mamba'"):
        gguf_output_supported(tmp_path / "mamba.gguf")
    writer = GGUFWriter(tmp_path / "moe.gguf", "llama")
    writer.add_tensor("blk.0.ffn_gate_exps.weight", np.zeros((2, 4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InputError, match="ffn_gate_exps.weight, which GGUF output does not know"):
        gguf_output_supported(tmp_path / "moe.gguf")


def test_metadata_value_types_copy_byte_for_byte(tmp_path, tinycoder):
    """Every GGUF value type the format has, scalar and array, survives the copy unchanged."""
    source = tmp_path / "source.gguf"
    writer = GGUFWriter(source, "llama")
    for field in GGUFReader(str(tinycoder)).fields.values():
        if not field.name.startswith(("GGUF.", "general.architecture")):
            writer.add_key_value(field.name, field.contents(), field.types[0],
                                 field.types[-1] if len(field.types) > 1 else None)
    scalars = {GGUFValueType.UINT8: 250, GGUFValueType.INT8: -3, GGUFValueType.UINT16: 65000,
               GGUFValueType.INT16: -300, GGUFValueType.UINT32: 4_000_000_000,
               GGUFValueType.INT32: -70000, GGUFValueType.FLOAT32: 0.1,
               GGUFValueType.UINT64: 2**63 + 5, GGUFValueType.INT64: -(2**40),
               GGUFValueType.FLOAT64: 1 / 3, GGUFValueType.BOOL: True,
               GGUFValueType.STRING: "héllo"}
    for value_type, value in scalars.items():
        writer.add_key_value(f"test.{value_type.name}", value, value_type)
        writer.add_key_value(f"test.array.{value_type.name}", [value, value], GGUFValueType.ARRAY,
                             value_type)
    for tensor in GGUFReader(str(tinycoder)).tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = prunenet.compress(str(source), ratio=0.5, method="random", progress=False)
    out = tmp_path / "out.gguf"
    write_pruned_gguf(source, result.model, result.kept_rows, out)
    _check_written_file(source, out, result.kept_rows, result.model)


def _with_empty_array(source: Path, path: Path, monkeypatch) -> Path:
    """``source`` with one more metadata key, ``general.tags``, an empty array of strings (the
    format allows it, llama.cpp's own writer makes it; GGUFWriter refuses to, so it is packed
    here by hand)."""
    packer = GGUFWriter._pack_val

    def pack(self, value, value_type, add_vtype, sub_type=None):
        if value_type == GGUFValueType.ARRAY and isinstance(value, list) and not value:
            return ((self._pack("I", value_type) if add_vtype else b"")
                    + self._pack("I", sub_type) + self._pack("Q", 0))
        return packer(self, value, value_type, add_vtype, sub_type)

    reader = GGUFReader(str(source))
    with monkeypatch.context() as patched:
        patched.setattr(GGUFWriter, "_pack_val", pack)
        writer = GGUFWriter(path, reader.fields["general.architecture"].contents())
        for field in reader.fields.values():
            if not field.name.startswith(("GGUF.", "general.architecture")):
                writer.add_key_value(field.name, field.contents(), field.types[0],
                                     field.types[-1] if len(field.types) > 1 else None)
        writer.add_key_value("general.tags", [], GGUFValueType.ARRAY, GGUFValueType.STRING)
        for tensor in reader.tensors:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    assert GGUFReader(str(path)).fields["general.tags"].contents() == []
    return path


def test_metadata_the_writer_cannot_copy_is_refused_before_any_work(tmp_path, tinycoder,
                                                                     monkeypatch, capsys):
    """An empty metadata array cannot be copied into model.gguf (GGUFWriter writes none): GGUF
    output is refused up front, so --format auto writes safetensors alone and --format gguf
    fails before the model loads (both had pruned the model, then failed writing model.gguf)."""
    from prunenet import pipeline
    from prunenet.cli import main
    from prunenet.pipeline import output_formats

    source = _with_empty_array(tinycoder, tmp_path / "tagged.gguf", monkeypatch)
    message = ("tagged.gguf's metadata key 'general.tags' is an empty or nested array, which "
               "GGUF output cannot copy (the gguf package writes neither); write safetensors "
               "instead (--format safetensors)")
    with pytest.raises(InputError, match=re.escape(message)):
        gguf_output_supported(source)
    assert output_formats("auto", str(source)) == ("safetensors",)
    assert main(["-q", "compress", str(source), "--ratio", "0.25", "--method", "random",
                 "--out", str(tmp_path / "auto")]) == 0
    assert "gguf" not in json.loads((tmp_path / "auto" / "prunenet.json").read_text())
    assert not (tmp_path / "auto" / "model.gguf").exists()
    assert (tmp_path / "auto" / "model.safetensors").is_file()
    monkeypatch.setattr(pipeline, "load_model_and_tokenizer", None)  # never reached
    capsys.readouterr()
    assert main(["-q", "compress", str(source), "--ratio", "0.25", "--method", "random",
                 "--format", "gguf", "--out", str(tmp_path / "gguf")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "gguf").exists()


# --- llama.cpp reads what we write -------------------------------------------------------------


# Measured max next-token KL between llama.cpp and transformers on the written file (llama /
# qwen2 with attention biases / gemma3): F16 1.0e-6 / 9.9e-7 / 3.3e-6 (the same function up to
# float rounding; Gemma's source file 5.4e-6); Q4_K source, ffn_down written as Q8_0 (the
# default) 1.2e-3 / 4.9e-4 / 2.7e-4 (llama.cpp quantizes activations to 8 bits in quantized
# matmuls; on the unpruned Q4_K llama source itself it is 2.1e-3); written as Q5_0 1.0e-3 /
# 7.1e-4 / 3.9e-4.
@pytest.mark.parametrize("source_type,down_type,written,bound", [
    ("F16", None, "F16", 1e-5), ("Q4_K", None, "Q8_0", 5e-3), ("Q4_K", "Q5_0", "Q5_0", 5e-3)])
@pytest.mark.parametrize("architecture", GGUF_ARCHITECTURES)
def test_llama_cpp_runs_written_tiny_gguf(tmp_path, tinycoder, llama_cpp, source_type,
                                          down_type, written, bound, architecture):
    """Gate/up rows kept in the source type, ffn_down requantized (Q4_K: Q8_0 by default);
    llama.cpp and transformers agree on the written file (Qwen2: with attention biases)."""
    source = _tiny_gguf(tmp_path / "tiny.gguf", GGMLQuantizationType[source_type], tinycoder,
                        architecture=architecture)
    result = prunenet.compress(str(source), ratio=0.25, method="random", progress=False)
    out = tmp_path / "pruned.gguf"
    report = write_pruned_gguf(source, result.model, result.kept_rows, out, down_type)
    assert set(report["requantized"].values()) == {written}
    ids = [1] + list(range(300, 331))
    reference = _hf_log_probs(_load_gguf(out), ids)
    assert _kl(reference, _llama_cpp_log_probs(_llama_cpp_model(llama_cpp, out), ids)) < bound


# --- the real model ----------------------------------------------------------------------------


PROMPT = b"The capital of France is Paris. The largest planet of the solar system is"


def _smollm2_gguf() -> Path:
    return _asset("smollm2-gguf") / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.real
def test_smollm2_unpruned_write_reproduces_the_file(tmp_path):
    """The real Q4_1 file: requantizing its unchanged ffn_down gives back the same blocks."""
    _write_unpruned(_smollm2_gguf(), tmp_path / "same.gguf")
    assert (tmp_path / "same.gguf").read_bytes() == _smollm2_gguf().read_bytes()


@pytest.fixture(scope="module")
def smollm2_compressed(tmp_path_factory):
    """SmolLM2 Q4_1 compressed at 0.3 with the default method, saved as safetensors (the stock
    output) and model.gguf beside it. A randomly pruned model is too chaotic for tight
    reader-agreement bounds: it amplifies llama.cpp's rounding to a next-token KL of 0.55 (GGUF)
    and 5.5e-4 (f16)."""
    folder = tmp_path_factory.mktemp("smollm2-pruned") / "out"
    result = prunenet.compress(str(_smollm2_gguf()), ratio=0.3, out=folder, progress=False)
    return result, folder


@pytest.mark.real
def test_smollm2_gguf_in_llama_cpp(llama_cpp, smollm2_compressed):
    """SmolLM2 Q4_1 pruned at 0.3 by the default command: ratio 0.3 keeps 1075 neurons, which
    cuts 32-value blocks, so the command keeps 1088 and model.gguf has ffn_down in Q8_0 (the
    default for a quantized source), smaller than the input. llama.cpp and transformers read
    the file alike: measured max next-token KL 0.0094 on the prompt's 15 positions (llama.cpp's
    quantized matmuls quantize activations to 8 bits; on the unpruned source file it is 0.011;
    with the exact 1075 written as F16 it was 0.010); bound 0.05."""
    result, folder = smollm2_compressed
    source = _smollm2_gguf()
    out = folder / "model.gguf"
    record = json.loads((folder / "prunenet.json").read_text())
    assert (record["ffn_width_after"], record["round_to"]) == (1088, 32)
    report = record["gguf"]
    assert set(report["requantized"].values()) == {"Q8_0"} and report["substituted"] == {}
    assert set(report["sliced"].values()) == {"Q4_1"}
    _check_written_file(source, out, result.kept_rows, result.model)
    reloaded = _load_gguf(out)
    assert reloaded.config.intermediate_size == 1088
    assert out.stat().st_size < source.stat().st_size
    llm = _llama_cpp_model(llama_cpp, out)
    ids = llm.tokenize(PROMPT, add_bos=False)
    assert _kl(_hf_log_probs(reloaded, ids), _llama_cpp_log_probs(llm, ids)) < 0.05
    # llama.cpp's greedy continuation is text, and each of its tokens is transformers' greedy
    # choice up to a near-tie. Measured: 7 of 8 tokens its argmax; the 4th 0.27 nats below it
    # in a flat distribution (transformers' top two 8.9% and 6.8%, which llama.cpp, reading
    # each within 0.26 nats, ranks the other way); allowed 0.5 nats and a KL of 0.05 at every
    # continued position.
    generated = _llama_cpp_greedy(llm, ids, 8)
    assert llm.detokenize(generated).decode("utf-8", "replace").strip()
    continued = _hf_log_probs(reloaded, ids + generated)[len(ids) - 1:-1]
    margins = continued.max(-1).values - continued[torch.arange(8), generated]
    assert float(margins.max()) < 0.5 and int((margins == 0).sum()) >= 6
    assert _kl(continued, _llama_cpp_log_probs(llm, ids + generated)[len(ids) - 1:-1]) < 0.05


@pytest.fixture(scope="session")
def llama_cpp_converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py (with its conversion/ and gguf-py/), out of the pinned
    llama-cpp-python sdist, cached under the prunenet cache. Skips when PyPI is unreachable."""
    requirement, sha256 = LLAMA_CPP_SDIST
    folder = cache_dir() / f"llama-cpp-converter-{requirement.split('==')[1]}"
    script = folder / "convert_hf_to_gguf.py"
    if (folder / ".complete").exists():
        return script
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".llama-cpp-sdist-") as tmp:
        download = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--quiet", requirement, "-d", tmp], capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if download.returncode != 0 or len(archives) != 1:
            pytest.skip(f"could not download the {requirement} sdist: {download.stderr[-300:]}")
        if hashlib.sha256(archives[0].read_bytes()).hexdigest() != sha256:
            pytest.fail(f"{archives[0].name} does not have the pinned sha256")
        staging = Path(tmp) / "converter"
        prefix = f"{archives[0].name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                relative = member.name.removeprefix(prefix)
                if member.isfile() and member.name.startswith(prefix) and relative.startswith(
                        wanted):
                    member.name = relative
                    archive.extract(member, staging, filter="data")
        (staging / ".complete").write_text(requirement + "\n")
        os.replace(staging, folder)
    return script


@pytest.mark.real
def test_converted_safetensors_output_in_llama_cpp(tmp_path, llama_cpp, llama_cpp_converter,
                                                   smollm2_compressed):
    """Our stock safetensors output, converted to f16 GGUF by llama.cpp's own converter, runs in
    llama.cpp like in transformers. Measured max next-token KL 1.7e-5 (f16 weights and
    activations in llama.cpp); bound 1e-4."""
    pytest.importorskip("sentencepiece", reason="the converter needs sentencepiece")
    result, folder = smollm2_compressed
    converted = tmp_path / "pruned-f16.gguf"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(llama_cpp_converter.parent), str(llama_cpp_converter.parent / "gguf-py")])}
    run = subprocess.run([sys.executable, str(llama_cpp_converter), str(folder),
                          "--outtype", "f16", "--outfile", str(converted)],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert GGUFReader(str(converted)).fields["llama.feed_forward_length"].contents() == 1088
    llm = _llama_cpp_model(llama_cpp, converted)
    ids = llm.tokenize(PROMPT, add_bos=False)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert _kl(_hf_log_probs(reloaded, ids), _llama_cpp_log_probs(llm, ids)) < 1e-4


def test_format_auto_writes_safetensors_alone_for_a_gguf_it_cannot_cut(tmp_path, caplog):
    """A .gguf input of an architecture GGUF output does not support gets safetensors (the
    reason logged) under --format auto; asked for by name, GGUF output is refused as before."""
    from prunenet.pipeline import output_formats

    _write_mamba_gguf(tmp_path / "mamba.gguf")
    source = str(tmp_path / "mamba.gguf")
    assert output_formats("auto", source) == ("safetensors",)
    assert ("supports the architectures gemma3, llama, phi3, qwen2, qwen3; mamba.gguf is 'mamba'"
            in caplog.text)
    for fmt in ("gguf", "both"):
        with pytest.raises(InputError, match="mamba.gguf is 'mamba'"):
            output_formats(fmt, source)
    tiny = str(asset_path("tinycoder-gguf") / "tiny.gguf")
    assert output_formats("auto", tiny) == ("safetensors", "gguf")
    assert output_formats("auto", str(tmp_path)) == ("safetensors",)


def test_compress_writes_gguf_beside_safetensors_for_a_gguf_input(tmp_path, capsys):
    """--format auto: a .gguf input gets both outputs, named in the record and the card; gguf
    alone leaves out the safetensors; a folder input cannot be cut as GGUF (refused first)."""
    from prunenet.cli import main

    source = asset_path("tinycoder-gguf") / "tiny.gguf"
    assert main(["-q", "compress", str(source), "--ratio", "0.25", "--out",
                 str(tmp_path / "both"), "--method", "random"]) == 0
    names = sorted(p.name for p in (tmp_path / "both").iterdir())
    assert "model.gguf" in names and "model.safetensors" in names
    record = json.loads((tmp_path / "both" / "prunenet.json").read_text())
    assert record["gguf"]["feed_forward_length"] == {"before": 64, "after": 48}
    assert "model.gguf" in (tmp_path / "both" / "README.md").read_text()
    assert main(["-q", "compress", str(source), "--ratio", "0.25", "--out",
                 str(tmp_path / "gguf"), "--method", "random", "--format", "gguf"]) == 0
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == [
        ".prunenet-files", "README.md", "model.gguf", "prunenet.json"]
    assert _load_gguf(tmp_path / "gguf" / "model.gguf").config.intermediate_size == 48
    for fmt in ("gguf", "both"):  # the message names the format asked for
        capsys.readouterr()
        assert main(["-q", "compress", str(tmp_path / "both"), "--ratio", "0.25", "--out",
                     str(tmp_path / "no"), "--method", "random", "--format", fmt]) == 2
        err = capsys.readouterr().err
        assert f"--format {fmt} writes a model.gguf cut from the input's own GGUF file, and " \
            "this input is not one" in err and not (tmp_path / "no").exists()


def test_a_gguf_header_is_parsed_once_per_compression_and_again_when_the_file_changes(
        tmp_path, tinycoder):
    """The input checks, its width and the output's formats and block multiple share one parse
    of an unchanged file's header (gguf_reader), released before the weights load; the writer
    parses it again. Loading passes the config it read to transformers. Both give what separate
    reads give: the same model, the same written file."""
    import gguf

    from prunenet.cli import main
    from prunenet.io.loading import _gguf_reader, gguf_reader, load_model_and_tokenizer

    parsed_by = []

    class CountingReader(GGUFReader):
        def __init__(self, *args, **kwargs):
            parsed_by.append(sys._getframe(1).f_code.co_name)
            super().__init__(*args, **kwargs)

    source = _tiny_gguf(tmp_path / "tiny.gguf", GGMLQuantizationType.Q4_1, tinycoder)
    _gguf_reader.cache_clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", CountingReader)
        assert main(["-q", "compress", str(source), "--ratio", "0.25", "--out",
                     str(tmp_path / "shared"), "--method", "random"]) == 0
    # prunenet's: the plan's and the load's checks, then the writer's; transformers' own:
    # the config, the weights and the tokenizer.
    assert parsed_by.count("_gguf_reader") == 2
    assert len(parsed_by) == 5
    assert _gguf_reader.cache_info().currsize == 1  # the writer's, until another file is read
    result = prunenet.compress(str(source), ratio=0.25, method="random", progress=False)
    _gguf_reader.cache_clear()  # the writer from a parse of its own, as before the sharing
    write_pruned_gguf(source, result.model, result.kept_rows, tmp_path / "fresh.gguf")
    assert _gguf_reader.cache_info().misses == 1
    result = prunenet.compress(str(source), ratio=0.25, method="random", progress=False)
    write_pruned_gguf(source, result.model, result.kept_rows, tmp_path / "shared.gguf")
    assert _gguf_reader.cache_info().misses == 1  # the same parse for the second write
    assert (tmp_path / "fresh.gguf").read_bytes() == (tmp_path / "shared.gguf").read_bytes()

    model, _ = load_model_and_tokenizer(source)
    plain = _load_gguf(source)
    plain_config = plain.config.to_dict()
    del plain_config["quantization_config"]  # the loader drops it: the output saves unquantized
    assert model.config.to_dict() == plain_config
    assert list(model.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(tensor, plain.state_dict()[name])
               for name, tensor in model.state_dict().items())

    first = gguf_reader(source)
    assert gguf_reader(source) is first
    _tiny_gguf(source, GGMLQuantizationType.Q8_0, tinycoder)  # replaced: read again
    replaced = gguf_reader(source)
    assert replaced is not first
    assert {tensor.tensor_type.name for tensor in replaced.tensors
            if _is_ffn(tensor.name)} == {"Q8_0"}
