"""`prunenet convert`: a GGUF written as a safetensors checkpoint one layer at a time holds the
tensors transformers loads from the GGUF, streams like any checkpoint, and never holds the whole
model."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType
from safetensors.torch import load_file
from test_data_safety import digest
from test_gguf_out import GGUF_ARCHITECTURES, _asset, _load_gguf, _tiny_gguf
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model
from prunenet.cli import main
from prunenet.errors import InputError, OutputError
from prunenet.ffn_statistics import GRAM_BUDGET
from prunenet.io import gguf_convert, streaming
from prunenet.io.gguf_convert import convert_gguf
from prunenet.io.streaming import PlannedConversion, StreamedCheckpoint
from prunenet.pipeline import compress
from prunenet.probe import ProbeRecipe


@pytest.fixture(scope="module")
def tinycoder() -> Path:
    return _asset("tinycoder-gguf") / "tiny.gguf"


def _gguf(folder: Path, ffn_type: GGMLQuantizationType, tinycoder: Path, **shape) -> Path:
    folder.mkdir()
    return _tiny_gguf(folder / "model.gguf", ffn_type, tinycoder, **shape)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("architecture", GGUF_ARCHITECTURES)
def test_a_converted_gguf_holds_what_transformers_loads(tmp_path, tinycoder, architecture):
    source = _gguf(tmp_path / "in", GGMLQuantizationType.Q4_1, tinycoder,
                        layers=3, architecture=architecture)
    assert main(["-q", "convert", str(source), "--out", str(tmp_path / "out")]) == 0
    loaded = _load_gguf(source)
    expected = loaded.state_dict()
    written = _tensors(tmp_path / "out")
    for name, tensor in written.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, expected[name]), name
    tied = {"lm_head.weight"} if loaded.config.tie_word_embeddings else set()
    assert set(expected) - set(written) == tied
    # One shard per decoder layer (and the tensors outside them), named in the index.
    index = json.loads((tmp_path / "out" / gguf_convert.INDEX_NAME).read_text())
    assert {shard for name, shard in index["weight_map"].items()
            if ".layers.1." in name} == {"model-00003.safetensors"}
    assert len(set(index["weight_map"].values())) == 1 + 3 + 1  # embedding, layers, head
    # Plain transformers reads it, with the GGUF's logits exactly.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([[1, 5, 9, 200, 17, 3]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, loaded(ids).logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]
    # What a plan sizes before converting is what the conversion writes.
    planned, converted = PlannedConversion(source), StreamedCheckpoint(tmp_path / "out")
    assert _layout(planned) == _layout(converted)
    # In memory, transformers holds the dequantized tensors beside the model as it loads.
    assert planned.in_memory_need(False) == (converted.in_memory_need(False)
                                             + converted.weight_bytes)


def _layout(checkpoint: StreamedCheckpoint) -> tuple:
    """Everything a plan reads of a checkpoint to size a run: tensors (dtype, shape, bytes),
    layers, widths, and the largest layer and outside piece."""
    return ({name: (entry.dtype, entry.shape, entry.end - entry.start)
             for name, entry in checkpoint.entries.items()},
            checkpoint.num_layers, checkpoint.d_ff, checkpoint.d_model,
            checkpoint.weight_bytes, checkpoint.offloaded_memory(0))


def test_a_converted_gguf_streams_to_the_output_the_gguf_gives_in_memory(tmp_path, tinycoder):
    """The way to prune a GGUF larger than memory: convert it, then stream the checkpoint;
    the pruned tensors are those of the GGUF compressed in memory."""
    source = _gguf(tmp_path / "in", GGMLQuantizationType.Q8_0, tinycoder)
    options = {"probe_tokens": 256, "probe_length": 32, "progress": False}
    compress(str(source), 0.5, out=tmp_path / "memory", format="safetensors", **options)
    convert_gguf(source, tmp_path / "converted", progress=False)
    checkpoint = StreamedCheckpoint(tmp_path / "converted")
    compress(checkpoint, 0.5, out=tmp_path / "stream", max_memory="64GB", **options)
    expected, actual = _tensors(tmp_path / "memory"), _tensors(tmp_path / "stream")
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def test_convert_refuses_what_it_cannot_convert_and_leaves_nothing(tmp_path, tinycoder,
                                                                   monkeypatch, capsys):
    source = _gguf(tmp_path / "in", GGMLQuantizationType.Q8_0, tinycoder)
    folder = tmp_path / "folder"
    convert_gguf(source, folder, progress=False)
    with pytest.raises(InputError, match="is not a GGUF file"):
        convert_gguf(folder, tmp_path / "again", progress=False)
    # Inside the model folder named, or over a folder a conversion did not write: refused.
    assert main(["convert", str(source.parent), "--out", str(source.parent / "out")]) == 2
    assert "lies inside the input" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["convert", str(source), "--out", str(tmp_path / "mine"), "--overwrite"]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    # A conversion's own output is replaced with --overwrite, but not once the user added
    # anything to it.
    assert main(["-q", "convert", str(source), "--out", str(folder), "--overwrite"]) == 0
    for added in ("my-results.json", "my-lora/adapter_config.json"):
        (folder / added).parent.mkdir(exist_ok=True)
        (folder / added).write_text("mine")
        assert main(["-q", "convert", str(source), "--out", str(folder), "--overwrite"]) == 2
        assert "not written by prunenet" in capsys.readouterr().err
        assert (folder / added).read_text() == "mine"
        shutil.rmtree(folder / "my-lora", ignore_errors=True)
        (folder / added).unlink(missing_ok=True)
    # A failure part way leaves neither the output nor its staging folder.
    _fail_third_shard(monkeypatch, OSError(28, "No space left on device"))
    with pytest.raises(OSError):
        convert_gguf(source, tmp_path / "failed", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "in", "mine"]
    # Not enough disk for the float32 checkpoint: refused before writing.
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda path: type("Usage", (), {"free": 1000})())
    with pytest.raises(OutputError, match="not enough disk space"):
        convert_gguf(source, tmp_path / "full", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "in", "mine"]


@pytest.mark.parametrize("tensor", ["token_embd.weight", "blk.1.attn_q.weight"])
def test_a_gguf_holding_nan_is_not_converted(tmp_path, tinycoder, capsys, tensor):
    """A GGUF whose weights hold NaN or Inf is refused as compress refuses it, leaving
    nothing, and an earlier conversion at --out as it was (the NaN had been saved as a
    converted checkpoint)."""
    import gguf

    source = tmp_path / "in" / "model.gguf"
    source.parent.mkdir()
    shutil.copy(tinycoder, source)
    folder = tmp_path / "folder"
    assert main(["-q", "convert", str(source), "--out", str(folder)]) == 0
    before = digest(folder)
    offset = next(entry for entry in gguf.GGUFReader(str(source)).tensors
                  if entry.name == tensor).data_offset
    with open(source, "r+b") as handle:  # F16 NaN in the tensor's first weights
        handle.seek(offset)
        handle.write(b"\x00\x7e" * 4)
    for out in (tmp_path / "new", folder):
        assert main(["-q", "convert", str(source), "--out", str(out), "--overwrite"]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith(f"prunenet: error: {source}: model.") and line.endswith(
            " holds NaN or Inf; the checkpoint is damaged and is not converted; nothing was "
            "written"), line
    assert digest(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "in"]


@pytest.mark.parametrize("holds", ["a model", "a config", "a marker and data"])
def test_convert_overwrite_never_replaces_a_users_model_folder(tmp_path, tinycoder, capsys, holds):
    """A conversion writes any checkpoint's files (config.json, model.safetensors, the
    tokenizer's) and a marker anyone can name: without its list of what it wrote, a folder is
    the user's, and --overwrite leaves it."""
    source = _gguf(tmp_path / "in", GGMLQuantizationType.Q8_0, tinycoder)
    mine = tmp_path / "mine"
    if holds == "a model":
        make_tiny_model("llama").save_pretrained(mine)
    else:
        mine.mkdir()
        (mine / "config.json").write_text('{"model_type": "llama"}\n')
    if holds == "a marker and data":
        (mine / ".converted").write_text("model.gguf\n")
        (mine / "data.csv").write_text("1,2\n")
    before = digest(mine)
    assert main(["-q", "convert", str(source), "--out", str(mine), "--overwrite"]) == 2
    assert "not written by prunenet" in capsys.readouterr().err
    assert digest(mine) == before


def test_convert_overwrite_never_replaces_prunenet_outputs_saved_inside(tmp_path, tinycoder,
                                                                         tiny_llama_dir, capsys):
    """A pruned model and a run record the user moved inside a conversion's folder (prunenet
    writes no output there) are whole prunenet outputs of their own, but not the conversion's:
    --overwrite keeps all of it."""
    source = _gguf(tmp_path / "in", GGMLQuantizationType.Q8_0, tinycoder)
    converted = tmp_path / "converted"
    assert main(["-q", "convert", str(source), "--out", str(converted)]) == 0
    assert main(["-q", "compress", str(tiny_llama_dir), "--ratio", "0.5", "--method", "random",
                 "--reconstruct", "none", "--out", str(tmp_path / "pruned"),
                 "--record", str(tmp_path / "record")]) == 0
    for name in ("pruned", "record"):
        (tmp_path / name).rename(converted / name)
    before = digest(converted)
    assert main(["-q", "convert", str(source), "--out", str(converted), "--overwrite"]) == 2
    assert "not written by prunenet" in capsys.readouterr().err
    assert digest(converted) == before


def _fail_third_shard(monkeypatch, error: OSError) -> list:
    """Make the conversion's third shard fail with ``error``; returns the shards attempted."""
    calls, real_save = [], gguf_convert.save_file

    def fail_on_the_third(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            raise error
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(gguf_convert, "save_file", fail_on_the_third)
    return calls


_CHILD = """
import sys
from prunenet.io.gguf_convert import convert_gguf
from prunenet.io.streaming import bound_heap_growth, peak_rss
bound_heap_growth()
convert_gguf(sys.argv[1], sys.argv[2], progress=False)
print(peak_rss())
"""


def test_peak_memory_of_a_conversion_does_not_grow_with_layers(tmp_path, tinycoder):
    """Eight more layers of 48 MiB (float32 FFN matrices 256 x 16384) add less than one layer
    to the peak: the GGUF is never held whole."""
    layer = 3 * 256 * 16384 * 4
    peaks = []
    for layers in (2, 10):
        source = _gguf(tmp_path / f"in{layers}", GGMLQuantizationType.F32,
                            tinycoder, d_model=256, d_ff=16384, layers=layers)
        done = subprocess.run([sys.executable, "-c", _CHILD, str(source),
                               str(tmp_path / f"out{layers}")],
                              capture_output=True, text=True, check=True)
        peaks.append(int(done.stdout.strip().splitlines()[-1]))
    assert peaks[1] - peaks[0] < layer, peaks
    assert peaks[1] < 10 * layer, peaks  # less than the FFN weights alone


SMALL = ["--probe-tokens", "256", "--probe-length", "32"]


def _too_large_for_memory(monkeypatch) -> None:
    """From now on every GGUF is judged too large to compress in memory, as a GGUF larger than
    memory is (a tiny one needs less in memory than the conversion's imports alone)."""
    monkeypatch.setattr(PlannedConversion, "in_memory_need", lambda self, training: 2**50)


def _conversion_budget(source: Path) -> int:
    """The least --max-memory that converts ``source`` and runs it with no layer in memory."""
    planned = PlannedConversion(source)
    return max(planned.conversion_memory(),
               planned.model_run_memory(256, ProbeRecipe.batch_size, 32, GRAM_BUDGET))


def _outputs_agree(memory: Path, stream: Path) -> None:
    """Two outputs of one compression, in memory and streamed: the same tensors, model.gguf
    bytes, record and card; the streamed one as shards."""
    expected, actual = _tensors(memory), _tensors(stream)
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
    assert ((memory / "model.gguf").exists() == (stream / "model.gguf").exists())
    if (memory / "model.gguf").exists():
        assert (memory / "model.gguf").read_bytes() == (stream / "model.gguf").read_bytes()
    for name in ("prunenet.json", "README.md"):
        assert (memory / name).read_text() == (stream / name).read_text(), name
    shards = {p.name for p in stream.glob("model-*.safetensors")} | (
        {gguf_convert.INDEX_NAME} if (stream / gguf_convert.INDEX_NAME).exists() else set())
    single = {"model.safetensors"} & {p.name for p in memory.iterdir()}
    assert {p.name for p in stream.iterdir()} - shards == {p.name for p in memory.iterdir()} \
        - single


@pytest.mark.parametrize("architecture", GGUF_ARCHITECTURES)
def test_a_gguf_over_the_budget_is_converted_beside_the_output_and_streamed(
        tmp_path, tinycoder, architecture, caplog, monkeypatch):
    """compress MODEL.gguf over --max-memory converts it into a scratch folder beside --out,
    one layer at a time, and streams it: the default (probe, selection, refit) gives the
    in-memory output exactly, model.gguf cut from the source included, and the scratch folder
    is gone."""
    source = _gguf(tmp_path / "in", GGMLQuantizationType.Q8_0, tinycoder, layers=3,
                   architecture=architecture)
    budget = _conversion_budget(source)
    common = ["compress", str(source), "--ratio", "0.5", *SMALL]
    assert main(["-q", *common, "--out", str(tmp_path / "memory")]) == 0
    _too_large_for_memory(monkeypatch)
    caplog.set_level(logging.INFO, logger="prunenet")  # -q would silence the log
    assert main([*common, "--out", str(tmp_path / "stream"), "--max-memory",
                 str(budget)]) == 0
    assert "converting " in caplog.text and " layers read from disk as they run" in caplog.text
    _outputs_agree(tmp_path / "memory", tmp_path / "stream")
    record = json.loads((tmp_path / "stream" / "prunenet.json").read_text())
    assert record["source"] == str(source) and record["reconstruct"]["mode"] == "ls"
    assert "gguf" in record
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "memory", "stream"]


def test_a_streamed_gguf_writes_gguf_alone_and_without_running_the_model(tmp_path, tinycoder,
                                                                        monkeypatch):
    """--format gguf keeps only model.gguf (the staged checkpoint it is cut with is removed);
    a method that reads only the FFN weights writes it from the converted tensors."""
    source = _gguf(tmp_path / "in", GGMLQuantizationType.Q4_1, tinycoder)
    budget = _conversion_budget(source)
    runs = [["--format", "gguf"], ["--method", "magnitude", "--reconstruct", "none"],
            ["--format", "gguf", "--eval", "2", "--method", "random"]]
    for index, options in enumerate(runs):
        probe = [] if "none" in options else SMALL  # magnitude without a refit uses none
        common = ["-q", "compress", str(source), "--ratio", "0.25", *probe, *options]
        assert main([*common, "--out", str(tmp_path / f"memory{index}")]) == 0
        with monkeypatch.context() as patch:
            _too_large_for_memory(patch)
            assert main([*common, "--out", str(tmp_path / f"stream{index}"), "--max-memory",
                         str(budget)]) == 0
        _outputs_agree(tmp_path / f"memory{index}", tmp_path / f"stream{index}")
    assert sorted(p.name for p in (tmp_path / "stream0").iterdir()) == [
        ".prunenet-files", "README.md", "model.gguf", "prunenet.json"]
    record = json.loads((tmp_path / "stream2" / "prunenet.json").read_text())
    assert record["evaluation"]["perplexity"]["value"] > 1  # --eval read the staged checkpoint


def test_a_streamed_gguf_that_cannot_run_leaves_nothing(tmp_path, tinycoder, monkeypatch,
                                                      capsys):
    """Below what converting needs, or on a disk too small for the conversion and the output:
    refused before any work; a conversion that fails part way leaves no output and no scratch
    folder."""
    source = _gguf(tmp_path / "in", GGMLQuantizationType.Q8_0, tinycoder)
    planned = PlannedConversion(source)
    _too_large_for_memory(monkeypatch)
    common = ["-q", "compress", str(source), "--ratio", "0.5", "--out", str(tmp_path / "out"),
              "--method", "random", "--reconstruct", "none"]
    least = planned.streaming_memory(training=False)
    assert least == planned.conversion_memory()  # here converting needs more than selecting
    assert main([*common, "--max-memory", str(least - 1)]) == 2
    error = capsys.readouterr().err
    assert "converting it to safetensors one layer at a time" in error
    assert f"needs at least {streaming.format_bytes(least)}" in error
    calls = _fail_third_shard(monkeypatch, OSError(5, "Input/output error"))
    assert main([*common, "--max-memory", str(least)]) == 2
    assert len(calls) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    free = 2 * planned.weight_bytes + source.stat().st_size  # float32 twice, and model.gguf
    monkeypatch.setattr(shutil, "disk_usage", lambda path: type("Usage", (), {"free": free - 1})())
    assert main([*common, "--max-memory", str(least)]) == 2
    assert "not enough disk space" in capsys.readouterr().err
    assert len(calls) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_a_gguf_tensor_type_gguf_cannot_dequantize_is_refused_before_any_work(
        tmp_path, tinycoder, monkeypatch, capsys):
    """Every load and conversion dequantizes every tensor: a GGUF holding one of a type the
    gguf library cannot dequantize (here F64) is refused naming the tensor and its type, by
    convert, a streamed compress and eval alike, before anything is written."""
    import numpy as np
    import test_gguf_out
    from gguf import GGUFWriter

    class WithAFloat64Norm(GGUFWriter):
        def add_tensor(self, name, tensor, *args, **kwargs):
            if name == "blk.1.attn_norm.weight":
                tensor = tensor.astype(np.float64)
            return super().add_tensor(name, tensor, *args, **kwargs)

    monkeypatch.setattr(test_gguf_out, "GGUFWriter", WithAFloat64Norm)
    source = _gguf(tmp_path / "in", GGMLQuantizationType.Q8_0, tinycoder)
    _too_large_for_memory(monkeypatch)
    for command in (["convert", str(source), "--out", str(tmp_path / "out")],
                    ["compress", str(source), "--ratio", "0.5", "--out", str(tmp_path / "out"),
                     "--method", "random", "--reconstruct", "none", "--max-memory", "8GB"],
                    ["eval", str(source), "--ppl", "none"]):
        assert main(["-q", *command]) == 2
        error = capsys.readouterr().err
        assert error.startswith("prunenet: error: ") and error.count("\n") == 1, error
        assert "tensor blk.1.attn_norm.weight is stored as F64" in error
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_gguf_outputs_in_folders_yet_to_be_made(tmp_path, tinycoder, monkeypatch):
    """A streamed compress of a GGUF writes into folders it makes above --out; a conversion
    refused for want of disk leaves no folder it made behind."""
    source = _gguf(tmp_path / "in", GGMLQuantizationType.Q8_0, tinycoder)
    _too_large_for_memory(monkeypatch)
    out = tmp_path / "new" / "folders" / "pruned"
    assert main(["-q", "compress", str(source), "--ratio", "0.5", "--out", str(out),
                 "--method", "random", "--reconstruct", "none", "--max-memory", "8GB"]) == 0
    assert json.loads((out / "prunenet.json").read_text())["ffn_width_after"] == 256
    monkeypatch.setattr(shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    with pytest.raises(OutputError, match="not enough disk space"):
        convert_gguf(source, tmp_path / "other" / "converted", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "new"]


def test_a_gguf_whose_tokenizer_transformers_cannot_build_streams_as_it_loads(
        tmp_path, tinycoder, monkeypatch):
    """A GGUF naming a tokenizer transformers cannot build (here 'rwkv') loads without one;
    converted, and compressed streamed, it gives the same output, without a tokenizer."""
    import test_gguf_out
    from gguf import GGUFWriter

    class WithAnRwkvTokenizer(GGUFWriter):
        def add_key_value(self, key, value, *args, **kwargs):
            value = "rwkv" if key == "tokenizer.ggml.model" else value
            return super().add_key_value(key, value, *args, **kwargs)

    monkeypatch.setattr(test_gguf_out, "GGUFWriter", WithAnRwkvTokenizer)
    source = _gguf(tmp_path / "in", GGMLQuantizationType.Q8_0, tinycoder)
    common = ["-q", "compress", str(source), "--ratio", "0.5", "--method", "random",
              "--reconstruct", "none"]
    assert main([*common, "--out", str(tmp_path / "memory")]) == 0
    _too_large_for_memory(monkeypatch)
    assert main([*common, "--out", str(tmp_path / "stream"), "--max-memory", "8GB"]) == 0
    _outputs_agree(tmp_path / "memory", tmp_path / "stream")
    assert not list((tmp_path / "stream").glob("tokenizer*"))


_COMPRESS_CHILD = """
import sys
from prunenet.cli import main
from prunenet.io.streaming import peak_rss
assert main(["-q", "compress", *sys.argv[1:]]) == 0
print(peak_rss())
"""


def test_peak_memory_of_a_streamed_gguf_does_not_grow_with_layers(tmp_path, tinycoder):
    """Conversion, streamed write and model.gguf together: eight more layers of 48 MiB add
    less than one layer to the peak (the GGUF writer, too, holds one tensor at a time)."""
    layer = 3 * 256 * 16384 * 4
    peaks = []
    for layers in (2, 10):
        source = _gguf(tmp_path / f"in{layers}", GGMLQuantizationType.F32, tinycoder,
                       d_model=256, d_ff=16384, layers=layers)
        budget = PlannedConversion(source).streaming_memory(training=False)
        done = subprocess.run(
            [sys.executable, "-c", _COMPRESS_CHILD, str(source), "--ratio", "0.5",
             "--method", "magnitude", "--reconstruct", "none", "--format", "both",
             "--max-memory", str(budget), "--out", str(tmp_path / f"out{layers}")],
            capture_output=True, text=True, check=True)
        peaks.append(int(done.stdout.strip().splitlines()[-1]))
        assert (tmp_path / f"out{layers}" / "model.gguf").is_file()
    assert peaks[1] - peaks[0] < layer, peaks
    assert peaks[1] < 10 * layer, peaks  # less than the FFN weights alone
