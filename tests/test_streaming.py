"""Streaming (out-of-core) compression: same output as in memory, bounded memory, bad input."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import TINY_CONFIGS, make_tiny_model
from prunenet.cli import main
from prunenet.errors import InputError, NumericalError, OutputError
from prunenet.ffn_statistics import GRAM_BUDGET
from prunenet.io import streaming
from prunenet.io.policy_file import save_policy
from prunenet.io.streaming import BASE_MEMORY, StreamedCheckpoint, choose_streaming, parse_memory
from prunenet.pipeline import (
    CompressOptions,
    compress,
    plan_compression,
    prune,
    train_policy,
    training_state_path,
)
from prunenet.probe import ProbeRecipe, sequence_length_for
from prunenet.selection.activation import Calibration


def sharded_checkpoint(folder: Path, model_type: str = "llama") -> Path:
    """A tiny model saved in several shards (save_pretrained with a small max_shard_size)."""
    model = make_tiny_model(model_type)
    model.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / streaming.INDEX_NAME).exists()
    return folder


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt2"])
def test_streamed_compress_equals_in_memory(tmp_path, model_type):
    source = sharded_checkpoint(tmp_path / "model", model_type)
    # Without the refit nothing runs the model: only the FFN weights are read, tensor by tensor.
    in_memory = compress(str(source), 0.5, episodes=2, out=tmp_path / "memory", progress=False,
                         method="prunenet", reconstruct="none")
    streamed = compress(StreamedCheckpoint(source), 0.5, episodes=2, out=tmp_path / "stream",
                        progress=False, method="prunenet", reconstruct="none")
    assert streamed.model is None and in_memory.model is not None
    for rows_a, rows_b in zip(in_memory.kept_rows, streamed.kept_rows, strict=True):
        assert torch.equal(rows_a, rows_b)
    expected, actual = all_tensors(tmp_path / "memory"), all_tensors(tmp_path / "stream")
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name
    record_a = json.loads((tmp_path / "memory" / "prunenet.json").read_text())
    record_b = json.loads((tmp_path / "stream" / "prunenet.json").read_text())
    assert record_a == record_b
    # The streamed output is a sharded stock checkpoint that transformers reloads.
    index = json.loads((tmp_path / "stream" / streaming.INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "stream")
    width_field = {"gpt2": "n_inner"}.get(model_type, "intermediate_size")
    assert getattr(reloaded.config, width_field) == 24
    assert (tmp_path / "stream" / "generation_config.json").exists() == (
        source / "generation_config.json").exists()
    # Beside the weights, both outputs hold the same files (no tokenizer: the source has none).
    def side_files(folder: Path) -> set[str]:
        return {path.name for path in folder.iterdir()
                if not path.name.endswith(".safetensors") and path.name != streaming.INDEX_NAME}

    assert side_files(tmp_path / "memory") == side_files(tmp_path / "stream")


def test_streamed_prune_with_saved_policy_equals_in_memory(tmp_path):
    source = sharded_checkpoint(tmp_path / "model")
    training = train_policy(str(source), 0.25, episodes=1, progress=False)
    policy_file = save_policy(training.policy, tmp_path / "policy.safetensors", {})
    for selection in ("sample", "topk"):
        a = prune(str(source), policy_file, 0.4, selection=selection, progress=False,
                  reconstruct="none",
                  out=tmp_path / f"memory-{selection}")
        b = prune(StreamedCheckpoint(source), policy_file, 0.4, selection=selection,
                  progress=False, reconstruct="none", out=tmp_path / f"stream-{selection}")
        assert all(torch.equal(x, y) for x, y in zip(a.kept_rows, b.kept_rows, strict=True))
        assert a.record == b.record


def test_streamed_training_equals_in_memory(tmp_path):
    source = sharded_checkpoint(tmp_path / "model")
    a = train_policy(str(source), 0.3, episodes=3, progress=False)
    b = train_policy(StreamedCheckpoint(source), 0.3, episodes=3, progress=False)
    assert [r.layer_ks for r in a.history] == [r.layer_ks for r in b.history]
    for name, tensor in a.policy.state_dict().items():
        assert torch.equal(tensor, b.policy.state_dict()[name]), name


def test_a_folder_holding_one_file_and_shards_streams_the_weights_it_loads(tmp_path):
    """transformers loads model.safetensors where a folder also holds an index and its
    shards; the streamed run reads the same weights, so both give one output."""
    source = tmp_path / "model"
    make_tiny_model("llama").save_pretrained(source)
    make_tiny_model("llama", seed=1).save_pretrained(tmp_path / "other", max_shard_size="20KB")
    for shard in (tmp_path / "other").glob("model*"):
        shard.rename(source / shard.name)
    options = {"method": "magnitude", "reconstruct": "none", "progress": False}
    compress(str(source), 0.5, out=tmp_path / "memory", **options)
    compress(StreamedCheckpoint(source), 0.5, out=tmp_path / "stream", **options)
    expected, actual = all_tensors(tmp_path / "memory"), all_tensors(tmp_path / "stream")
    assert sorted(actual) == sorted(expected)
    assert all(torch.equal(actual[name], tensor) for name, tensor in expected.items())


@pytest.mark.parametrize("same", [True, False])
def test_a_head_the_config_ties_is_written_as_the_load_holds_it(tmp_path, same):
    """tie_word_embeddings true while the file holds lm_head.weight too: transformers ties
    them only where their values are equal, else keeps the head it read. The streamed output
    does the same (it dropped a different head, so its model computed with the embedding as
    its head) and counts the parameters alike."""
    source = tmp_path / "model"
    model = make_tiny_model("llama")
    if same:
        model.lm_head.weight.data.copy_(model.model.embed_tokens.weight.data)
    model.save_pretrained(source, max_shard_size="20KB")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    options = {"method": "magnitude", "reconstruct": "none", "progress": False}
    in_memory = compress(str(source), 0.5, out=tmp_path / "memory", **options)
    streamed = compress(StreamedCheckpoint(source), 0.5, out=tmp_path / "stream", **options)
    expected, actual = all_tensors(tmp_path / "memory"), all_tensors(tmp_path / "stream")
    assert ("lm_head.weight" in expected) == (not same)
    assert sorted(actual) == sorted(expected)
    assert all(torch.equal(actual[name], tensor) for name, tensor in expected.items())
    for key in ("parameters_before", "parameters_after"):
        assert streamed.record[key] == in_memory.record[key], key
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "stream")
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("stored,declared,key", [(torch.bfloat16, "float32", "dtype"),
                                                 (torch.float16, "bfloat16", "torch_dtype"),
                                                 (torch.bfloat16, None, None),
                                                 (torch.float8_e4m3fn, "float32", "dtype")])
def test_weights_are_written_in_the_type_they_are_stored_in_whatever_the_config_says(
        tmp_path, stored, declared, key):
    """A config whose dtype (or older torch_dtype) is not the one its weights are stored in, or
    that names none: the pruned weights keep the stored type, in memory as streamed, their
    config.json names it (a streamed output had kept the source's, which a load in the
    config's type reads otherwise), and the memory plan sizes the load in the type it computes
    in (in memory, a bfloat16 checkpoint declared float32 was loaded and written in float32,
    twice its size, and float8 declared float32 was read as float32)."""
    source = sharded_checkpoint(tmp_path / "model")
    for shard in source.glob("*.safetensors"):
        save_file({name: tensor.to(stored) for name, tensor in load_file(shard).items()},
                  shard, metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config.pop("dtype", None)
    (source / "config.json").write_text(json.dumps({**config, key: declared} if key else config))
    options = {"method": "magnitude", "reconstruct": "none", "progress": False}
    compress(str(source), 0.5, out=tmp_path / "memory", **options)
    compress(StreamedCheckpoint(source), 0.5, out=tmp_path / "stream", **options)
    expected, actual = all_tensors(tmp_path / "memory"), all_tensors(tmp_path / "stream")
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert tensor.dtype == actual[name].dtype == stored, name
        assert torch.equal(actual[name].view(torch.uint8), tensor.view(torch.uint8)), name
    for output in ("memory", "stream"):
        written = json.loads((tmp_path / output / "config.json").read_text())
        assert written["dtype"] == str(stored).removeprefix("torch."), output
        assert "torch_dtype" not in written, output
    computed = torch.float32 if stored.itemsize < 2 else stored
    checkpoint = StreamedCheckpoint(source)
    assert checkpoint.loaded_bytes == computed.itemsize * sum(
        tensor.numel() for tensor in all_tensors(source).values())


def float8_checkpoint(folder: Path, model_type: str = "llama") -> Path:
    """A tiny model with every weight stored as float8_e4m3fn, in several shards."""
    sharded_checkpoint(folder, model_type)
    for shard in folder.glob("*.safetensors"):
        tensors = {name: tensor.to(torch.float8_e4m3fn) for name, tensor in
                   load_file(shard).items()}
        save_file(tensors, shard, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "float8_e4m3fn"}))
    return folder


@pytest.mark.parametrize("method", ["prunenet", "random"])
def test_a_float8_checkpoint_streams_to_what_it_gives_in_memory(tmp_path, method):
    source = float8_checkpoint(tmp_path / "model")
    options = {"method": method, "reconstruct": "none", "progress": False,
               **({"episodes": 1} if method == "prunenet" else {})}
    compress(str(source), 0.5, out=tmp_path / "memory", **options)
    compress(StreamedCheckpoint(source), 0.5, out=tmp_path / "stream", **options)
    expected, actual = all_tensors(tmp_path / "memory"), all_tensors(tmp_path / "stream")
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert tensor.dtype == actual[name].dtype == torch.float8_e4m3fn, name
        assert torch.equal(actual[name].view(torch.uint8), tensor.view(torch.uint8)), name


def test_a_float8_checkpoint_is_sized_as_the_float32_model_it_loads_as(tmp_path):
    """float8 weights are computed in float32: in memory, and a layer read from disk, take 4
    bytes a value, as the same model stored in float32 does. Sized as stored, a budget of a
    third of what a run in memory takes kept the model in memory (measured: a 66 MB float8
    model under --max-memory 410MiB peaked at 710 MiB)."""
    narrow = StreamedCheckpoint(float8_checkpoint(tmp_path / "float8"))
    wide = StreamedCheckpoint(sharded_checkpoint(tmp_path / "float32"))
    assert narrow.weight_bytes * 4 == wide.weight_bytes  # on disk, a quarter
    assert narrow.loaded_bytes == wide.loaded_bytes == wide.weight_bytes
    for training in (False, True):
        assert narrow.in_memory_need(training) == wide.in_memory_need(training)
        assert narrow.streaming_memory(training) == wide.streaming_memory(training)
    assert narrow.offloaded_memory(0) == wide.offloaded_memory(0)
    assert run_budget(narrow, 256, 32) == run_budget(wide, 256, 32)
    assert narrow.evaluation_memory(1, 64) == wide.evaluation_memory(1, 64)
    # A budget that held the float8 weights as stored, but not as loaded: read from disk.
    stored = narrow.in_memory_need(False) - 3 * narrow.weight_bytes
    assert choose_streaming(str(tmp_path / "float8"), stored, training=False) is not None


def test_a_float8_checkpoint_with_a_bias_refit_streams_to_what_it_gives_in_memory(tmp_path):
    """--reconstruct bias on float8 weights: planning reads whether the second matrix has a
    bias from a model built on the meta device in float32 (torch cannot build one in float8,
    the config's type: it had stopped with a TypeError), and the refitted bias is saved in
    float8 alike, in memory and read from disk."""
    source = float8_checkpoint(tmp_path / "model", "gpt2")
    options = {"method": "random", "reconstruct": "bias", **SMALL_PROBE}
    compress(str(source), 0.5, out=tmp_path / "memory", **options)
    least = run_budget(StreamedCheckpoint(source), 256, 32)
    compress(StreamedCheckpoint(source), 0.5, out=tmp_path / "stream", max_memory=least,
             **options)
    expected, actual = all_tensors(tmp_path / "memory"), all_tensors(tmp_path / "stream")
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert tensor.dtype == actual[name].dtype == torch.float8_e4m3fn, name
        assert torch.equal(actual[name].view(torch.uint8), tensor.view(torch.uint8)), name
    assert (json.loads((tmp_path / "memory" / "prunenet.json").read_text())
            == json.loads((tmp_path / "stream" / "prunenet.json").read_text()))


def test_a_nan_in_a_float8_tensor_copied_through_is_refused(tmp_path):
    source = float8_checkpoint(tmp_path / "model")
    name = "model.layers.0.self_attn.q_proj.weight"  # no method reads it: copied as bytes
    shard = source / json.loads((source / streaming.INDEX_NAME).read_text())["weight_map"][name]
    tensors = load_file(shard)
    raw = tensors[name].view(torch.uint8).clone()
    raw[2, 1] = 0x7F  # float8_e4m3fn's NaN
    tensors[name] = raw.view(torch.float8_e4m3fn)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(NumericalError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight holds"):
        compress(StreamedCheckpoint(source), 0.5, method="random", reconstruct="none",
                 out=tmp_path / "stream", progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def run_budget(checkpoint: StreamedCheckpoint, probe_tokens: int = 8192,
               probe_length: int = 256) -> int:
    """The least --max-memory that runs ``checkpoint`` offloaded: no layer stays in memory
    (its probe sequences ``probe_length`` cut to the model's positions, as they run)."""
    return checkpoint.model_run_memory(
        probe_tokens, ProbeRecipe.batch_size,
        sequence_length_for(checkpoint.model_config, probe_length), GRAM_BUDGET)


def test_cli_streams_when_the_model_exceeds_max_memory(tmp_path, capsys, caplog):
    source = sharded_checkpoint(tmp_path / "model")
    checkpoint = StreamedCheckpoint(source)
    budget = checkpoint.streaming_memory(training=True)
    assert checkpoint.in_memory_need(training=True) > budget
    assert choose_streaming(str(source), budget, training=True) is not None
    assert choose_streaming(str(source), "100GB", training=True) is None
    # No --method: the default method and its refit run the model layer by layer from disk.
    least = run_budget(checkpoint)
    assert checkpoint.in_memory_need(training=False) < least  # streams only as the model runs
    caplog.set_level(logging.INFO, logger="prunenet")
    status = main(["compress", str(source), "--ratio", "0.5", "--out", str(tmp_path / "out"),
                   "--max-memory", str(least)])
    assert status == 0
    record = json.loads((tmp_path / "out" / "prunenet.json").read_text())
    assert record["method"] == "self-generated" and record["reconstruct"]["mode"] == "ls"
    assert "with 2 of its 2 layers read from disk" in caplog.text
    assert json.loads((tmp_path / "out" / "config.json").read_text())["intermediate_size"] == 24
    # The policy PruneNet trains on a streamed model can be kept, and its training state is
    # resumable beside --out.
    plan = plan_compression(str(source), 0.5, CompressOptions(
        max_memory=budget, method="prunenet", reconstruct="none"), out=tmp_path / "out4")
    assert plan.selector.name == "prunenet" and plan.streamed is not None
    assert plan.resident is None  # nothing runs the model
    assert plan.selector.state_path == training_state_path(tmp_path / "out4")
    assert not (tmp_path / "out4").exists()
    status = main(["compress", str(source), "--ratio", "0.5", "--episodes", "1", "--out",
                   str(tmp_path / "out3"), "--max-memory", str(budget), "--device", "cpu",
                   "--method", "prunenet", "--reconstruct", "none",
                   "--policy-out", str(tmp_path / "streamed-policy.safetensors")])
    assert status == 0 and (tmp_path / "streamed-policy.safetensors").is_file()
    status = main(["train-policy", str(source), "--ratio", "0.5", "--episodes", "1", "--out",
                   str(tmp_path / "policy.safetensors"), "--max-memory", str(budget)])
    assert status == 0 and (tmp_path / "policy.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model", "out", "out3", "policy.safetensors", "streamed-policy.safetensors"]


def test_a_budget_too_small_to_run_the_model_names_its_need(tmp_path, capsys, caplog):
    source = sharded_checkpoint(tmp_path / "model")
    checkpoint = StreamedCheckpoint(source)
    least = run_budget(checkpoint)
    status = main(["-q", "compress", str(source), "--ratio", "0.5", "--out",
                   str(tmp_path / "out"), "--max-memory", str(least - 1)])
    error = capsys.readouterr().err
    assert status == 2 and f"needs at least {streaming.format_bytes(least)}" in error
    assert "--reconstruct none" in error  # what works in less
    # Less probe text needs less memory: the need follows the options.
    smaller = run_budget(checkpoint, 512, 64)
    assert smaller < least
    plan = plan_compression(str(source), 0.5, CompressOptions(
        max_memory=smaller, probe_tokens=512, probe_length=64), out=tmp_path / "out")
    assert plan.selector.name == "self-generated" and plan.resident == 0
    # Without the model running, the streaming minimum is enough, and the headers are read once.
    caplog.set_level(logging.INFO, logger="prunenet")
    selecting = checkpoint.streaming_memory(False)
    plan = plan_compression(str(source), 0.5, CompressOptions(
        max_memory=selecting, method="random", reconstruct="none"), out=tmp_path / "out")
    assert plan.resident is None and plan.streamed is not None
    assert caplog.text.count("streaming ") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_probe_too_large_for_the_default_budget_is_refused_naming_that_budget(
        tmp_path, capsys):
    """Without --max-memory the refusal names the default budget as such, not an option the
    user never gave; with it, the option's value; nothing is written either way."""
    source = sharded_checkpoint(tmp_path / "model")
    capsys.readouterr()
    huge = ["--probe-tokens", str(10**11)]
    status = main(["-q", "compress", str(source), "--ratio", "0.5", *huge, "--out",
                   str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert status == 2 and error.count("\n") == 1
    assert "the memory budget " in error and "--max-memory sets it) is too small" in error
    assert "--max-memory 64" not in error
    status = main(["-q", "compress", str(source), "--ratio", "0.5", *huge, "--out",
                   str(tmp_path / "out"), "--max-memory", "64GiB"])
    error = capsys.readouterr().err
    assert status == 2 and "--max-memory 64.00GiB is too small" in error
    assert "the memory budget" not in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_recovery_that_cannot_hold_a_streamed_model_is_refused_before_the_compression(
        tmp_path, capsys, monkeypatch):
    """--recover-steps holds the pruned model and its teacher in float32, --finetune-steps the
    pruned model: after a streamed compression, sizes that exceed the free memory are refused
    before any work (the source's size bounds the pruned model's), not once the compression
    is done."""
    import importlib

    import psutil

    import prunenet.pipeline

    source = sharded_checkpoint(tmp_path / "model")
    checkpoint = StreamedCheckpoint(source)
    size = 4 * sum(entry.numel for entry in checkpoint.entries.values())
    budget = str(checkpoint.streaming_memory(training=False))
    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory",
                        lambda: real._replace(available=2 * size - 1))
    class Started(Exception):
        pass

    def started(plan, tokenizer=None):
        raise Started

    monkeypatch.setattr(prunenet.pipeline, "run_compression", started)
    common = ["-q", "compress", str(source), "--ratio", "0.5", "--out", str(tmp_path / "out"),
              "--method", "random", "--reconstruct", "none", "--max-memory", budget]
    assert main([*common, "--recover-steps", "1"]) == 2
    error = capsys.readouterr().err
    assert "--recover-steps holds the pruned model (at most the source's size)" in error
    assert f"(the teacher) ({streaming.format_bytes(size)})" in error
    assert "Compress without --recover-steps" in error
    # One float32 copy fits: --finetune-steps passes this check (and goes on to compress;
    # windows within the tiny model's 64 positions, which the recovery's own check refuses).
    # This checkpoint has no tokenizer to read the corpus with: that check is another test's.
    monkeypatch.setattr(importlib.import_module("prunenet.finetune"), "corpus_windows",
                        lambda *args, **kwargs: None)
    with pytest.raises(Started):
        main([*common, "--finetune-steps", "1", "--finetune-seqlen", "32"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


SMALL_PROBE = {"probe_tokens": 256, "probe_length": 32, "progress": False}


def small_probe(options: dict) -> dict:
    """SMALL_PROBE for a run of ``options`` that generates a probe (the default method, or a
    refit); for another, only its progress setting (compress refuses the probe's)."""
    probes = options.get("method", "self-generated") == "self-generated" or options.get(
        "reconstruct", "ls") != "none"
    return SMALL_PROBE if probes else {"progress": False}


def assert_same_output(a: Path, b: Path) -> None:
    """Every tensor (dtype and values) and the record of two outputs are the same."""
    expected, actual = all_tensors(a), all_tensors(b)
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name
    assert (json.loads((a / "prunenet.json").read_text())
            == json.loads((b / "prunenet.json").read_text()))


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_offloaded_default_equals_in_memory(tmp_path, model_type, caplog):
    """The default (probe, selection, refit) on a model read layer by layer from disk writes
    what it writes in memory, tensor for tensor, in every family."""
    source = sharded_checkpoint(tmp_path / "model", model_type)
    bias = model_type in ("opt", "gpt2", "phi", "gpt_neox")
    reconstruct = "bias" if bias else "ls"
    in_memory = compress(str(source), 0.5, out=tmp_path / "memory", reconstruct=reconstruct,
                         **SMALL_PROBE)
    caplog.set_level(logging.INFO, logger="prunenet")
    least = run_budget(StreamedCheckpoint(source), 256, 32)
    streamed = compress(StreamedCheckpoint(source), 0.5, out=tmp_path / "stream",
                        max_memory=least, reconstruct=reconstruct, **SMALL_PROBE)
    layers = in_memory.model.config.num_hidden_layers
    assert f"with {layers} of its {layers} layers read from disk" in caplog.text
    assert streamed.model is None
    for rows_a, rows_b in zip(in_memory.kept_rows, streamed.kept_rows, strict=True):
        assert torch.equal(rows_a, rows_b)
    assert_same_output(tmp_path / "memory", tmp_path / "stream")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory", "model", "stream"]


def test_an_offloaded_run_reads_the_probe_a_run_in_memory_kept(tmp_path, monkeypatch):
    """The probe's key reads every weight, offloaded ones too: a probe kept by a run in memory
    (--probe-cache) serves a run from disk of the same model, with no second generation."""
    import prunenet.probe

    source = sharded_checkpoint(tmp_path / "model")
    generated = []
    real = prunenet.probe.generate_probe
    monkeypatch.setattr(prunenet.probe, "generate_probe",
                        lambda *args, **kwargs: generated.append(1) or real(*args, **kwargs))
    monkeypatch.setattr(prunenet.probe.Probe, "_memory", {})  # only the cache folder serves
    compress(str(source), 0.5, out=tmp_path / "memory", probe_cache=tmp_path / "probes",
             **SMALL_PROBE)
    prunenet.probe.Probe._memory.clear()
    least = run_budget(StreamedCheckpoint(source), 256, 32)
    compress(StreamedCheckpoint(source), 0.5, out=tmp_path / "stream", max_memory=least,
             probe_cache=tmp_path / "probes", **SMALL_PROBE)
    assert len(generated) == 1 and len(list((tmp_path / "probes").iterdir())) == 1
    assert_same_output(tmp_path / "memory", tmp_path / "stream")


def test_a_disk_too_small_for_the_refit_set_aside_is_refused_before_any_work(tmp_path,
                                                                             monkeypatch):
    """An offloaded run sets each refitted second matrix aside on the output's disk until the
    write: a disk holding the output but not those is refused while planning, before the
    model loads (it had been refused only when the write began, after the whole run)."""
    import shutil

    import prunenet.pipeline as pipeline

    source = sharded_checkpoint(tmp_path / "model")
    checkpoint = StreamedCheckpoint(source)
    least = run_budget(checkpoint, 256, 32)
    kept = 24  # of 48 at ratio 0.5
    set_aside = 4 * checkpoint.num_layers * checkpoint.d_model * (kept + 1)
    free = checkpoint.weight_bytes + set_aside
    monkeypatch.setattr(shutil, "disk_usage", lambda path: type("Usage", (), {"free": free - 1}))

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline, "load_model_and_tokenizer", no_load)
    with pytest.raises(OutputError, match="not enough disk space"):
        compress(StreamedCheckpoint(source), 0.5, out=tmp_path / "out", max_memory=least,
                 **SMALL_PROBE)
    # without the refit nothing is set aside: the same disk holds the output
    compress(StreamedCheckpoint(source), 0.5, out=tmp_path / "out", max_memory=least,
             method="random", reconstruct="none", progress=False)
    assert (tmp_path / "out" / "prunenet.json").is_file()


def test_a_failed_offloaded_run_leaves_nothing(tmp_path):
    """A damaged weight found while the model is read layer by layer: the run stops naming it,
    and neither the output nor the folder its offloaded run set aside remains."""
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 3] = float("inf")
    model.save_pretrained(tmp_path / "model", max_shard_size="20KB")
    least = run_budget(StreamedCheckpoint(tmp_path / "model"), 256, 32)
    with pytest.raises(NumericalError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight"):
        compress(StreamedCheckpoint(tmp_path / "model"), 0.5, out=tmp_path / "outputs" / "out",
                 max_memory=least, **SMALL_PROBE)
    assert not (tmp_path / "outputs").exists()  # nor the folder made for the output


@pytest.mark.parametrize("options", [
    {"method": "activation", "reconstruct": "none", "calibration": {"windows": 2, "seqlen": 64}},
    {"method": "magnitude-product", "reconstruct": "ls"},
    {"method": "prunenet", "reconstruct": "ls", "episodes": 1},
    {"method": "random", "reconstruct": "bias"},
], ids=["activation", "magnitude-product", "prunenet-ls", "random-bias"])
def test_offloaded_methods_equal_in_memory(tmp_path, options, request, caplog):
    """Every method that runs the model or refits, on a model read from disk, as in memory."""
    model_type = "gpt2" if options["reconstruct"] == "bias" else "llama"
    source = sharded_checkpoint(tmp_path / "model", model_type)
    options = dict(options)
    if "calibration" in options:  # real text: a tokenizer, read with the model
        options["calibration"] = Calibration(**options["calibration"])
        source = request.getfixturevalue("tiny_llama_real_tokenizer_dir")
    probe = small_probe(options)
    compress(str(source), 0.5, out=tmp_path / "memory", **options, **probe)
    # sized by the probe's settings, or by the calibration window where the run generates none
    checkpoint = StreamedCheckpoint(source)
    least = (checkpoint.offloaded_memory(checkpoint.calibration_memory(64))
             if "calibration" in options else run_budget(checkpoint, 256, 32))
    caplog.set_level(logging.INFO, logger="prunenet")
    compress(StreamedCheckpoint(source), 0.5, out=tmp_path / "stream", max_memory=least,
             **options, **probe)
    assert "with 2 of its 2 layers read from disk" in caplog.text
    assert_same_output(tmp_path / "memory", tmp_path / "stream")


def test_max_memory_below_one_layer_names_the_minimum(tmp_path):
    source = sharded_checkpoint(tmp_path / "model {0}")  # braces in a path are only text
    minimum = StreamedCheckpoint(source).streaming_memory(training=True)
    with pytest.raises(InputError, match="needs at least") as caught:
        choose_streaming(str(source), "1MB", training=True)
    assert streaming.format_bytes(minimum) in str(caught.value)
    assert f"streaming {source} needs" in str(caught.value)
    assert "plus the policy" in str(caught.value)
    with pytest.raises(InputError, match="needs at least") as caught:  # no policy to train
        choose_streaming(str(source), "1MB", training=False)
    assert "plus the policy" not in str(caught.value)


@pytest.mark.parametrize("text,expected", [("2GB", 2 * 10**9), ("2GiB", 2 * 2**30),
                                           ("512MB", 512 * 10**6), ("1.5GiB", int(1.5 * 2**30)),
                                           ("1000", 1000), (4096, 4096)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


def test_parse_memory_reads_units_in_any_case_as_bytes():
    """accelerate reads a lower-case b as bits: 2gb would be 2.5 x 10^8 bytes."""
    assert parse_memory("2gb") == parse_memory("2GB") == 2 * 10**9
    assert parse_memory("2gib") == parse_memory("2GiB") == 2 * 2**30
    assert parse_memory("512mb") == parse_memory("512Mb") == 512 * 10**6
    assert parse_memory(" 1.5gib ") == int(1.5 * 2**30)


@pytest.mark.parametrize("text", ["lots", "-1GB", "0", "2PB", "512M", "infGB", "1e400GB", "nanGB",
                                  "²", "2²GB", 2.5e9, -5])
def test_parse_memory_rejects(text):
    with pytest.raises(InputError, match="^--max-memory "):  # the option is named
        parse_memory(text)


def _shard_of(folder: Path, name: str) -> Path:
    index = json.loads((folder / streaming.INDEX_NAME).read_text())
    return folder / index["weight_map"][name]


def test_missing_shard_is_named(tmp_path):
    source = sharded_checkpoint(tmp_path / "model")
    shard = _shard_of(source, "model.layers.1.mlp.up_proj.weight")
    shard.unlink()
    with pytest.raises(InputError, match=shard.name):
        StreamedCheckpoint(source)


def test_truncated_shard_is_named(tmp_path):
    source = sharded_checkpoint(tmp_path / "model")
    shard = _shard_of(source, "model.layers.0.mlp.gate_proj.weight")
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(InputError, match=shard.name):
        StreamedCheckpoint(source)


def test_missing_or_truncated_index_is_named(tmp_path):
    source = sharded_checkpoint(tmp_path / "model")
    index = source / streaming.INDEX_NAME
    text = index.read_text()
    index.write_text(text[: len(text) // 2])
    with pytest.raises(InputError, match=streaming.INDEX_NAME):
        StreamedCheckpoint(source)
    index.unlink()
    with pytest.raises(InputError, match=streaming.INDEX_NAME):
        StreamedCheckpoint(source)


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    source = sharded_checkpoint(tmp_path / "model")
    index_file = source / streaming.INDEX_NAME
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = "model.layers.0.mlp.down_proj.weight"
    index["weight_map"][name] = next(s for s in shards if s != index["weight_map"][name])
    index_file.write_text(json.dumps(index))
    with pytest.raises(InputError, match=name):
        StreamedCheckpoint(source)


def test_unexpected_tensor_shape_is_named(tmp_path):
    source = sharded_checkpoint(tmp_path / "model")
    name = "model.layers.1.mlp.gate_proj.weight"
    shard = _shard_of(source, name)
    with safe_open(str(shard), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(shard)
    tensors[name] = tensors[name][:40].clone()
    save_file(tensors, shard, metadata=metadata)
    with pytest.raises(InputError, match=rf"{name}.*\[40, 32\]"):
        StreamedCheckpoint(source)


def test_disk_full_while_writing_leaves_nothing(tmp_path, monkeypatch):
    source = sharded_checkpoint(tmp_path / "model")
    real_write = streaming._write_shard
    written = []

    def write_then_fill_up(*args, **kwargs):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(real_write(*args, **kwargs))
        return written[-1]

    monkeypatch.setattr(streaming, "_write_shard", write_then_fill_up)
    out = tmp_path / "outputs" / "pruned"
    with pytest.raises(OutputError, match="disk filled up"):
        prune(StreamedCheckpoint(source), None, 0.5, method="random", out=out, progress=False)
    assert written, "the first shard should have been written before the disk filled up"
    assert not out.exists()
    assert not out.parent.exists()  # nor the folder made for the output


def test_disk_full_after_the_shards_names_what_was_written_and_keeps_the_earlier_output(
        tmp_path, monkeypatch):
    """The disk filling up while the card is written, over an earlier output (--overwrite):
    the message names the card, not config.json, and says the earlier output is kept, as it
    is (it had said that nothing was left at --out)."""
    source = sharded_checkpoint(tmp_path / "model")
    out = tmp_path / "pruned"
    options = {"method": "random", "reconstruct": "none", "progress": False}
    compress(StreamedCheckpoint(source), 0.5, out=out, **options)
    earlier = all_tensors(out)

    def fill_up(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(streaming, "write_card", fill_up)
    with pytest.raises(OutputError) as caught:
        compress(StreamedCheckpoint(source), 0.3, out=out, overwrite=True, **options)
    assert str(caught.value) == (
        f"the disk filled up while writing README.md; the earlier output at {out} is kept as "
        "it was. Free space or choose another --out")
    assert sorted(all_tensors(out)) == sorted(earlier)
    assert all(torch.equal(all_tensors(out)[name], tensor) for name, tensor in earlier.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "pruned"]


_SLOW_STREAMED_WRITE = """
import signal, sys, time
from pathlib import Path
from prunenet.io import streaming
from prunenet.cli import main

signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal, not under nohup
real = streaming._write_shard

def slow(*args, **kwargs):
    Path(sys.argv[1]).write_text("writing")  # the scratch folder and the staging exist now
    time.sleep(60)
    return real(*args, **kwargs)

streaming._write_shard = slow
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_during_a_streamed_run_leaves_no_scratch_folder(tmp_path, signum):
    """A run read from disk interrupted while it writes (its offload and refit folder beside
    the output, the output staged): nothing is left beside the output, the input unchanged."""
    import signal
    import time

    source = sharded_checkpoint(tmp_path / "model")
    before = {path.name: path.read_bytes() for path in source.iterdir()}
    least = run_budget(StreamedCheckpoint(source), 256, 32)
    marker = tmp_path / "marker"
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_STREAMED_WRITE, str(marker), "-q", "compress",
         str(source), "--ratio", "0.5", "--probe-tokens", "256", "--probe-length", "32",
         "--out", str(tmp_path / "out"), "--max-memory", str(least)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not marker.exists():
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]) == 2
    process.send_signal(getattr(signal, signum))
    _, error = process.communicate(timeout=60)
    assert process.returncode == 130, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["marker", "model"]
    assert {path.name: path.read_bytes() for path in source.iterdir()} == before


def test_outputs_carry_the_terms_of_the_source_and_none_of_its_other_files(tmp_path):
    """The source folder's license and notice files go with both outputs, byte for byte; a
    user's other files (notes, a script) go with neither, streamed or written from memory."""
    source = sharded_checkpoint(tmp_path / "model")
    terms = {"LICENSE": b"Apache-2.0\n", "USE_POLICY.md": b"# Use policy\n",
             "Notice.txt": b"third parties\n"}
    for name, content in {**terms, "notes.txt": b"mine", "train.py": b"print()"}.items():
        (source / name).write_bytes(content)
    options = {"method": "random", "reconstruct": "none", "progress": False}
    compress(str(source), 0.5, out=tmp_path / "memory", **options)
    compress(StreamedCheckpoint(source), 0.5, out=tmp_path / "stream", **options)
    for out in ("memory", "stream"):
        names = {path.name for path in (tmp_path / out).iterdir()}
        assert {"notes.txt", "train.py"}.isdisjoint(names), out
        assert {name: (tmp_path / out / name).read_bytes() for name in terms} == terms
    # and each stays an output prunenet replaces
    compress(str(source), 0.5, out=tmp_path / "stream", overwrite=True, **options)
    compress(StreamedCheckpoint(source), 0.5, out=tmp_path / "memory", overwrite=True, **options)


def test_a_streamed_output_is_written_into_folders_it_makes(tmp_path):
    """Missing folders above --out are made when the output is written, streamed as in
    memory; the disk's free space is read where they will be made."""
    source = sharded_checkpoint(tmp_path / "model")
    options = {"method": "random", "reconstruct": "none", "progress": False}
    compress(str(source), 0.5, out=tmp_path / "memory", **options)
    out = tmp_path / "new" / "folders" / "pruned"
    compress(StreamedCheckpoint(source), 0.5, out=out, **options)
    expected, actual = all_tensors(tmp_path / "memory"), all_tensors(out)
    assert sorted(actual) == sorted(expected)
    assert all(torch.equal(actual[name], tensor) for name, tensor in expected.items())


@pytest.mark.parametrize("options", [{"method": "random", "reconstruct": "none"}, {}],
                         ids=["weights-only", "default"])
def test_a_streamed_run_records_what_a_run_in_memory_records(tmp_path, options):
    """--record on a streamed run: the spectra of every layer's first matrix, before and after,
    read a layer at a time, and the record, as a run in memory writes them."""
    from prunenet.recording import read_run_record

    source = sharded_checkpoint(tmp_path / "model")
    compress(str(source), 0.5, out=tmp_path / "memory", record_dir=tmp_path / "memory-run",
             **options, **small_probe(options))
    compress(StreamedCheckpoint(source), 0.5, out=tmp_path / "stream",
             record_dir=tmp_path / "stream-run", max_memory=run_budget(
                 StreamedCheckpoint(source), 256, 32), **options, **small_probe(options))
    assert_same_output(tmp_path / "memory", tmp_path / "stream")
    expected, actual = read_run_record(tmp_path / "memory-run"), read_run_record(
        tmp_path / "stream-run")
    assert actual[0] == expected[0] and actual[0]["num_layers"] == 2
    for before, after in zip(expected[1:], actual[1:], strict=True):
        assert len(before) == len(after) == 2
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "memory", "memory-run", "model", "stream", "stream-run"]


# --- peak resident memory, measured in a subprocess ------------------------------------------

# Wide and short layers: 48 MiB each, yet cheap spectra (256 x 256 Gram matrices).
D_MODEL, D_FF, VOCAB = 256, 16384, 256
LAYER_BYTES = 3 * D_MODEL * D_FF * 4  # gate, up, down in fp32: 48 MiB


def generated_checkpoint(folder: Path, layers: int, d_model: int = D_MODEL,
                         d_ff: int = D_FF) -> Path:
    """A LLaMA-layout checkpoint of ``layers`` layers, one shard per layer, random fp32 weights."""
    folder.mkdir(parents=True)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=d_model,
                                      intermediate_size=d_ff, num_hidden_layers=layers,
                                      num_attention_heads=8, num_key_value_heads=8)
    config.save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    shared = {"model.embed_tokens.weight": torch.randn(VOCAB, d_model, generator=generator),
              "model.norm.weight": torch.ones(d_model),
              "lm_head.weight": torch.randn(VOCAB, d_model, generator=generator)}
    save_file(shared, folder / "shared.safetensors")
    weight_map.update(dict.fromkeys(shared, "shared.safetensors"))
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        tensors = {
            f"{prefix}.mlp.gate_proj.weight": torch.randn(d_ff, d_model, generator=generator),
            f"{prefix}.mlp.up_proj.weight": torch.randn(d_ff, d_model, generator=generator),
            f"{prefix}.mlp.down_proj.weight": torch.randn(d_model, d_ff, generator=generator),
            f"{prefix}.input_layernorm.weight": torch.ones(d_model),
            f"{prefix}.post_attention_layernorm.weight": torch.ones(d_model),
            **{f"{prefix}.self_attn.{name}_proj.weight":
               torch.randn(d_model, d_model, generator=generator) for name in "qkvo"},
        }
        shard = f"layer-{layer:03d}.safetensors"
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        del tensors
    (folder / streaming.INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map":
                                                           weight_map}))
    return folder


# The child's own high-water mark (VmHWM), not ru_maxrss: Linux carries the RSS of the process
# that forked it into the child's ru_maxrss across exec, so after tests that loaded models the
# pytest parent's 2.8 GiB showed up as the child's peak (issue 4's "in-suite anomaly").
_CHILD = """
import json, sys
import prunenet.ffn_statistics
from prunenet.pipeline import compress
from prunenet.io.streaming import StreamedCheckpoint, bound_heap_growth
bound_heap_growth()  # as the command line does for a streamed run
options = json.loads(sys.argv[3])
prunenet.ffn_statistics.GRAM_BUDGET = options.pop("gram_budget", 1 << 30)
compress(StreamedCheckpoint(sys.argv[1]), 0.3, out=sys.argv[2], progress=False, **options)
from prunenet.io.streaming import peak_rss
print(peak_rss())
"""
# the policy trains on the CPU (the other methods' passes run there whatever device says)
WEIGHTS_ONLY = {"method": "prunenet", "reconstruct": "none", "episodes": 1, "device": "cpu"}


def peak_rss_of_streamed_compress(source: Path, out: Path, options: dict = WEIGHTS_ONLY) -> int:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(source), str(out),
                           json.dumps(options)], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def test_peak_memory_does_not_grow_with_layers(tmp_path):
    few = generated_checkpoint(tmp_path / "few", layers=2)
    many = generated_checkpoint(tmp_path / "many", layers=12)
    rss_few = peak_rss_of_streamed_compress(few, tmp_path / "out-few")
    rss_many = peak_rss_of_streamed_compress(many, tmp_path / "out-many")
    size_many = sum(file.stat().st_size for file in many.glob("*.safetensors"))
    assert size_many > 12 * LAYER_BYTES
    # Ten more layers (480 MiB of weights) must not add even one layer's worth of memory.
    assert rss_many - rss_few < LAYER_BYTES, (rss_few, rss_many)
    assert rss_many < size_many, (rss_many, size_many)
    index = json.loads((tmp_path / "out-many" / streaming.INDEX_NAME).read_text())
    assert len(index["weight_map"]) == 3 + 9 * 12


_CLI_CHILD = """
import sys
from prunenet.cli import main
from prunenet.io.streaming import peak_rss
status = main(sys.argv[1:])
print(status, peak_rss())
"""


def test_peak_memory_of_a_weights_only_run_stays_within_the_least_budget_accepted(tmp_path):
    """The least --max-memory a run that reads only the FFN weights accepts holds it: the
    interpreter, transformers (every streamed run reads its config and checks its weights
    with it), a chunk of a tensor copied through and its check. Without the imports, a 4 MiB
    layer's minimum of 254 MiB was accepted and the run peaked at 388 MiB."""
    source = generated_checkpoint(tmp_path / "model", 2, 256, 1024)
    least = StreamedCheckpoint(source).streaming_memory(training=False)
    done = subprocess.run([sys.executable, "-c", _CLI_CHILD, "-q", "compress", str(source),
                           "--ratio", "0.5", "--method", "random", "--reconstruct", "none",
                           "--out", str(tmp_path / "out"), "--max-memory", str(least)],
                          capture_output=True, text=True, check=True)
    status, peak = map(int, done.stdout.split()[-2:])
    assert status == 0 and (tmp_path / "out" / "prunenet.json").is_file(), done.stderr
    assert peak <= least, (streaming.format_bytes(peak), streaming.format_bytes(least))


def test_peak_memory_of_the_offloaded_default_does_not_grow_with_layers(tmp_path):
    """The default and its refit on a model read layer by layer from disk: more layers add no
    layer's worth of memory (Grams one layer at a time; the budget below keeps no layer)."""
    d_model, d_ff = 512, 4096
    layer = 3 * d_model * d_ff * 4 + 4 * d_model**2 * 4  # FFN and attention, fp32: 28 MiB
    few = generated_checkpoint(tmp_path / "few", 2, d_model, d_ff)
    many = generated_checkpoint(tmp_path / "many", 10, d_model, d_ff)
    options = {"probe_tokens": 256, "probe_length": 16, "gram_budget": d_ff**2 * 8}
    peaks = []
    for source in (few, many):
        budget = StreamedCheckpoint(source).model_run_memory(256, ProbeRecipe.batch_size, 16,
                                                             d_ff**2 * 8)
        peaks.append(peak_rss_of_streamed_compress(source, tmp_path / f"out-{source.name}",
                                                   {**options, "max_memory": budget}))
    record = json.loads((tmp_path / "out-many" / "prunenet.json").read_text())
    assert record["method"] == "self-generated" and len(record["reconstruct"]["layers"]) == 10
    # Eight more layers (224 MiB of weights, 1 GiB of Grams) add less than one layer.
    assert peaks[1] - peaks[0] < layer, peaks


@pytest.mark.parametrize("options", [{"method": "random", "reconstruct": "none"}, {}],
                         ids=["weights-only", "default"])
def test_a_streamed_run_evaluates_what_it_wrote(tiny_llama_real_tokenizer_dir, tmp_path,
                                                options):
    """--eval on a streamed run scores the output as written, every layer read from disk,
    before its record is written: the record says what a run in memory says."""
    source = tiny_llama_real_tokenizer_dir
    compress(str(source), 0.5, out=tmp_path / "memory", evaluate_windows=2, **options,
             **small_probe(options))
    checkpoint = StreamedCheckpoint(source)
    evaluating = checkpoint.offloaded_memory(checkpoint.evaluation_memory(1, 1024))
    budget = max(evaluating, run_budget(checkpoint, 256, 32))
    compress(StreamedCheckpoint(source), 0.5, out=tmp_path / "stream", evaluate_windows=2,
             max_memory=budget, **options, **small_probe(options))
    assert_same_output(tmp_path / "memory", tmp_path / "stream")
    record = json.loads((tmp_path / "stream" / "prunenet.json").read_text())
    assert record["evaluation"]["perplexity"]["windows"] == 2
    assert "perplexity" in (tmp_path / "stream" / "README.md").read_text().lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory", "stream"]
    # Less than the evaluation needs is refused before any work, naming the need.
    with pytest.raises(InputError, match=f"--eval: .* needs at least "
                                         f"{streaming.format_bytes(evaluating)}"):
        compress(StreamedCheckpoint(source), 0.5, out=tmp_path / "small", evaluate_windows=2,
                 max_memory=evaluating - 1, method="random", reconstruct="none",
                 progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory", "stream"]


class _Planned(Exception):
    """Raised by a plan's ``before_text`` to hand the plan back before its text is read."""


def test_the_memory_eval_takes_counts_when_a_run_chooses_to_stream(tmp_path):
    """--eval scores the output after the compression: a budget that holds the model in memory
    but not its evaluation too streams it (the evaluation had been left out of that choice:
    SmolLM2-135M under --max-memory 1.1GiB was kept in memory and peaked at 1.68 GiB, while
    1.0GiB was refused as too small for --eval)."""
    from prunenet.evaluation.evaluate import DEFAULT_SEQLEN

    checkpoint = StreamedCheckpoint(generated_checkpoint(tmp_path / "model", 2, d_ff=4096))
    evaluating = checkpoint.evaluation_memory(1, DEFAULT_SEQLEN)
    from_disk = checkpoint.offloaded_memory(evaluating)
    in_memory = checkpoint.in_memory_need(False) + evaluating - streaming.MODEL_RUN_IMPORTS
    budget = (from_disk + in_memory) // 2
    assert checkpoint.in_memory_need(False) < from_disk < budget < in_memory

    def plan(**options):
        def hand_back(plan):
            raise _Planned(plan)

        with pytest.raises(_Planned) as planned:
            plan_compression(str(checkpoint.folder), 0.5, CompressOptions(
                max_memory=budget, method="magnitude", reconstruct="none", **options),
                out=tmp_path / "out", before_text=hand_back)
        return planned.value.args[0]

    assert plan().streamed is None  # without --eval the model fits
    assert plan(evaluate_windows=1).streamed is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


_EVALUATION_CHILD = """
import sys, torch
from prunenet.evaluation.evaluate import opened_model
from prunenet.evaluation.perplexity import perplexity
from prunenet.io.streaming import bound_heap_growth, peak_rss
with opened_model(sys.argv[1], max_memory=int(sys.argv[2]), seqlen=256,
                  on_offload=bound_heap_growth) as (model, _):  # as the command line does
    windows = torch.randint(0, 256, (4, 256), generator=torch.Generator().manual_seed(0))
    perplexity(model, windows, progress=False)
print(peak_rss())
"""


def test_peak_memory_of_an_evaluation_from_disk_stays_within_its_estimate(tmp_path):
    """A model evaluated with every layer read from disk peaks below the need the budget is
    checked against, and more layers add less than one layer's worth."""
    peaks = []
    for layers in (2, 10):
        source = generated_checkpoint(tmp_path / f"m{layers}", layers)
        checkpoint = StreamedCheckpoint(source)
        working = checkpoint.evaluation_memory(1, 256)
        need = checkpoint.offloaded_memory(working)
        assert need < BASE_MEMORY + checkpoint.weight_bytes + working  # it reads from disk
        done = subprocess.run([sys.executable, "-c", _EVALUATION_CHILD, str(source), str(need)],
                              capture_output=True, text=True, check=True)
        peaks.append(int(done.stdout.strip().splitlines()[-1]))
        assert peaks[-1] < need, (peaks, need)
    assert peaks[1] - peaks[0] < LAYER_BYTES, peaks


@pytest.mark.parametrize("stored", ["both", "head only"])
def test_a_tied_head_stored_beside_its_embedding_is_counted_once(tmp_path, stored):
    """A checkpoint of a model with tied embeddings that stores the head too (as some exporters
    write it): the loaded model holds that matrix once, and a streamed run counts it once, as
    the run in memory does, and writes it once (the streamed record had counted it twice and
    the streamed output had held the copy). One that stores the head alone: both outputs name
    the matrix as the in-memory save does, by the embedding (the streamed one had kept the
    head's name)."""
    source = tmp_path / "model"
    make_tiny_model("llama", tie_word_embeddings=True).save_pretrained(source)
    tensors = load_file(source / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    if stored == "head only":
        del tensors["model.embed_tokens.weight"]
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    options = {"method": "magnitude", "reconstruct": "none", "progress": False}
    compress(str(source), 0.5, out=tmp_path / "memory", **options)
    compress(StreamedCheckpoint(source), 0.5, out=tmp_path / "stream", **options)
    records = [json.loads((tmp_path / name / "prunenet.json").read_text())
               for name in ("memory", "stream")]
    counts = [{key: record[key] for key in ("parameters_before", "parameters_after")}
              for record in records]
    assert counts[1] == counts[0]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "stream")
    assert sum(p.numel() for p in reloaded.parameters()) == counts[1]["parameters_after"]
    # Nor is the copy written: both outputs hold the tensors the in-memory save writes.
    expected, actual = all_tensors(tmp_path / "memory"), all_tensors(tmp_path / "stream")
    assert sorted(actual) == sorted(expected) and "lm_head.weight" not in actual
    assert all(torch.equal(actual[name], tensor) for name, tensor in expected.items())


def _gpt2_checkpoint(folder: Path, base_model: bool = False, masks: bool = False) -> Path:
    """A tiny GPT-2 saved as the Hub's GPT-2 checkpoints are: ``base_model``, from the base
    model (``h.0.mlp.c_fc.weight``, no ``transformer.`` prefix, no head: it is tied to the
    embedding); ``masks``, with each layer's causal mask ``attn.bias`` stored as a weight, as
    older transformers saved it (transformers skips it on load)."""
    make_tiny_model("gpt2").save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    if base_model:
        tensors = {name.removeprefix("transformer."): tensor for name, tensor in tensors.items()
                   if not name.startswith("lm_head.")}
    prefix = "" if base_model else "transformer."
    if masks:
        for layer in range(2):
            tensors[f"{prefix}h.{layer}.attn.bias"] = torch.ones(64, 64).tril().view(1, 1, 64, 64)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("reconstruct", ["none", "bias"])
def test_a_checkpoint_saved_from_the_base_model_compresses_as_transformers_loads_it(
        tmp_path, reconstruct):
    """The Hub's GPT-2 stores its tensors without the base model's prefix, which transformers
    adds on load: it compresses in memory, and streamed (refitted from disk too) to the same
    tensors and record (both had been refused: the checkpoint seemed to hold no layers)."""
    source = _gpt2_checkpoint(tmp_path / "model", base_model=True)
    options = {"method": "magnitude", "reconstruct": reconstruct}
    options.update(small_probe(options))
    in_memory = compress(str(source), 0.5, out=tmp_path / "memory", **options)
    budget = run_budget(StreamedCheckpoint(source), 256, 32) if reconstruct != "none" else None
    compress(StreamedCheckpoint(source), 0.5, out=tmp_path / "stream", max_memory=budget,
             **options)
    assert_same_output(tmp_path / "memory", tmp_path / "stream")
    assert "transformer.h.0.mlp.c_fc.weight" in all_tensors(tmp_path / "stream")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "stream").eval()
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, in_memory.model(tokens).logits)
    assert reloaded.config.n_inner == 24


@pytest.mark.parametrize("base_model", [False, True], ids=["prefixed", "base-model"])
def test_causal_masks_stored_as_weights_are_neither_counted_nor_written(tmp_path, base_model):
    """GPT-2 checkpoints saved by older transformers hold each layer's causal mask, which the
    model does not hold and transformers skips on load: a streamed run counts and writes what
    the run in memory does (its record had counted the masks as parameters, and its output
    had kept them)."""
    source = _gpt2_checkpoint(tmp_path / "model", base_model=base_model, masks=True)
    options = {"method": "magnitude", "reconstruct": "none", "progress": False}
    compress(str(source), 0.5, out=tmp_path / "memory", **options)
    compress(StreamedCheckpoint(source), 0.5, out=tmp_path / "stream", **options)
    assert_same_output(tmp_path / "memory", tmp_path / "stream")
    record = json.loads((tmp_path / "stream" / "prunenet.json").read_text())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "stream")
    assert sum(p.numel() for p in reloaded.parameters()) == record["parameters_after"]
    assert not any(name.endswith(".attn.bias") for name in all_tensors(tmp_path / "stream"))


def test_activation_without_a_refit_is_sized_by_its_calibration_window(
        tmp_path, tiny_llama_real_tokenizer_dir):
    """Method activation without a refit generates no probe: read from disk, it needs one
    layer and one calibration window at a time, not the probe's cache and the refit's
    statistics (which had set its least budget at 1.30 GiB for SmolLM2, whose run at that
    budget peaked at 744 MiB, and below the needs of a long window for a narrow FFN, as this
    model's). The least budget runs it with every layer read from disk, as
    in memory, within that budget; a byte less is refused before any work, naming the
    window."""
    source = tiny_llama_real_tokenizer_dir
    calibration = Calibration(windows=2)  # of 1024 tokens
    checkpoint = StreamedCheckpoint(source)
    least = checkpoint.offloaded_memory(checkpoint.calibration_memory(1024))
    options = {"method": "activation", "reconstruct": "none", "calibration": calibration}
    with pytest.raises(InputError, match="one layer and a calibration window of 1024 tokens"):
        compress(StreamedCheckpoint(source), 0.5, out=tmp_path / "refused",
                 max_memory=least - 1, **options)
    assert not (tmp_path / "refused").exists()
    compress(str(source), 0.5, out=tmp_path / "memory", **options)
    done = subprocess.run([sys.executable, "-c", _CLI_CHILD, "-q", "compress", str(source),
                           "--ratio", "0.5", "--method", "activation", "--reconstruct", "none",
                           "--calibration-windows", "2",
                           "--out", str(tmp_path / "stream"), "--max-memory", str(least)],
                          capture_output=True, text=True, check=True)
    status, peak = map(int, done.stdout.split()[-2:])
    assert status == 0, done.stderr
    assert_same_output(tmp_path / "memory", tmp_path / "stream")
    assert peak <= least, (streaming.format_bytes(peak), streaming.format_bytes(least))
