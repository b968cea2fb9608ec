"""`prunenet convert`: a GGUF written as a safetensors checkpoint one layer at a time holds the
tensors transformers loads from the GGUF, streams like any checkpoint, and never holds the whole
model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType
from safetensors.torch import load_file
from test_gguf_out import GGUF_ARCHITECTURES, _asset, _load_gguf, _tiny_gguf
from transformers import AutoModelForCausalLM

from prunenet.cli import main
from prunenet.errors import InputError, OutputError
from prunenet.io import gguf_convert
from prunenet.io.gguf_convert import convert_gguf
from prunenet.io.streaming import StreamedCheckpoint
from prunenet.pipeline import compress


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
    # A conversion's own output is replaced with --overwrite.
    assert main(["-q", "convert", str(source), "--out", str(folder), "--overwrite"]) == 0
    # A failure part way leaves neither the output nor its staging folder.
    saved = []

    def fail_on_the_third(tensors, path, metadata=None):
        saved.append(path)
        if len(saved) == 3:
            raise OSError(28, "No space left on device")
        return real_save(tensors, path, metadata=metadata)

    real_save = gguf_convert.save_file
    monkeypatch.setattr(gguf_convert, "save_file", fail_on_the_third)
    with pytest.raises(OSError):
        convert_gguf(source, tmp_path / "failed", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "in", "mine"]
    # Not enough disk for the float32 checkpoint: refused before writing.
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda path: type("Usage", (), {"free": 1000})())
    with pytest.raises(OutputError, match="not enough disk space"):
        convert_gguf(source, tmp_path / "full", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "in", "mine"]


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
