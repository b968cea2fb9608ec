"""End to end on tiny models: compress, save, reload with plain transformers, reuse policies,
and every bad input of the core issue."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import prunenet
from conftest import make_tiny_model
from prunenet.cli import _training_options, main
from prunenet.errors import InputError, OutputError, PolicyMismatchError, UnsupportedModelError
from prunenet.io.loading import RECORD_NAME
from prunenet.io.policy_file import load_policy, save_policy
from prunenet.model_view import FFNView
from prunenet.pipeline import CompressOptions, plan_compression
from prunenet.selection.activation import Calibration
from prunenet.selection.prunenet.policy import policy_checksum


def _logits_in_fresh_process(folder: Path, inputs: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    """Load ``folder`` with plain transformers in a subprocess where prunenet cannot be imported."""
    torch.save(inputs, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["prunenet"] = None  # any import of prunenet now fails
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()
        inputs = torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True)
        with torch.no_grad():
            torch.save(model(inputs).logits, {str(tmp_path / "logits.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    return torch.load(tmp_path / "logits.pt", weights_only=True)


def test_compress_save_reload_in_fresh_process_gives_identical_logits(tiny_llama_dir, tmp_path):
    out = tmp_path / "pruned"
    result = prunenet.compress(str(tiny_llama_dir), ratio=0.25, episodes=2, out=out,
                               policy_out=tmp_path / "policy.safetensors", progress=False,
                               method="prunenet")
    inputs = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = result.model(inputs).logits
    actual = _logits_in_fresh_process(out, inputs, tmp_path)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)

    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == 36  # int(0.75 * 48)
    record = json.loads((out / RECORD_NAME).read_text())
    assert record["ffn_width_before"] == 48 and record["ffn_width_after"] == 36
    assert record["parameters_before"] - record["parameters_after"] == 2 * 3 * 12 * 32
    assert record["policy_sha256"] == policy_checksum(result.policy)
    assert record["method"] == "prunenet" and record["seed"] == 42
    assert not list(tmp_path.glob(".pruned.tmp-*")), "temporary folder left behind"


def test_saved_dtype_matches_input(tmp_path):
    model = make_tiny_model("qwen2").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    prunenet.compress(str(tmp_path / "bf16"), ratio=0.5, out=tmp_path / "out", progress=False)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as handle:
        dtypes = {handle.get_slice(name).get_dtype() for name in handle.keys()}
    assert dtypes == {"BF16"}


def test_policy_trained_at_one_ratio_prunes_at_others(tiny_llama, tmp_path):
    training = prunenet.train_policy(tiny_llama, ratio=0.3, episodes=2, progress=False)
    path = save_policy(training.policy, tmp_path / "p.safetensors", {"trained_ratio": 0.3})
    policy, metadata = load_policy(path)
    assert metadata == {"trained_ratio": 0.3}
    for ratio, width in [(0.1, 43), (0.5, 24)]:
        model = make_tiny_model("llama")
        result = prunenet.prune(model, policy, ratio, progress=False)
        assert FFNView(result.model).d_ff == width
        assert all(rows.numel() == width for rows in result.kept_rows)
        assert result.model.model.layers[1].mlp.down_proj.weight.shape == (32, width)


def test_same_seed_same_kept_rows_and_topk_is_deterministic(tiny_llama):
    training = prunenet.train_policy(tiny_llama, ratio=0.3, episodes=1, progress=False)
    sample = [prunenet.select_rows(tiny_llama, 0.3, policy=training.policy, seed=3)
              for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*sample))
    other = prunenet.select_rows(tiny_llama, 0.3, policy=training.policy, seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(sample[0], other))
    topk = prunenet.select_rows(tiny_llama, 0.3, policy=training.policy, selection="topk")
    view = FFNView(tiny_llama)
    for index, rows in enumerate(topk):
        alpha = training.policy.keep_scores(view.first_matrix(index))
        assert set(rows.tolist()) == set(alpha.topk(33).indices.tolist())


def test_policy_from_another_model_is_refused(tmp_path):
    training = prunenet.train_policy(make_tiny_model("llama"), ratio=0.3, episodes=1,
                                     progress=False)
    path = save_policy(training.policy, tmp_path / "p.safetensors", {})
    gpt2 = make_tiny_model("gpt2")  # d_ff 48 too, but d_model matches: change the width
    gpt2_wide = make_tiny_model("opt")
    prunenet.prune(gpt2, str(path), 0.3)  # same (d_model, d_ff): allowed by design
    from prunenet.slicing import slice_model

    slice_model(gpt2_wide, [torch.arange(40)] * 2)
    with pytest.raises(PolicyMismatchError, match="d_ff=48.*d_ff=40"):
        prunenet.prune(gpt2_wide, str(path), 0.3)


def test_policy_of_another_width_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """A folder's config declares its FFN and residual widths: a policy for another shape fails
    from them, with no weight read and nothing written."""
    training = prunenet.train_policy(make_tiny_model("llama"), ratio=0.3, episodes=1,
                                     progress=False)  # d_ff 48
    path = save_policy(training.policy, tmp_path / "p.safetensors", {})
    narrow = make_tiny_model("llama")
    from prunenet.slicing import slice_model

    slice_model(narrow, [torch.arange(40)] * 2)
    narrow.save_pretrained(tmp_path / "narrow")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    # the same FFN width on a wider residual stream: refused from its hidden_size
    make_tiny_model("llama", hidden_size=48).save_pretrained(tmp_path / "wide")

    monkeypatch.setattr(sys.modules["prunenet.pipeline"], "load_model_and_tokenizer", no_load)
    with pytest.raises(PolicyMismatchError, match=r"d_ff=48; this model has d_model=32, d_ff=40\."):
        prunenet.prune(tmp_path / "narrow", path, 0.3, out=tmp_path / "out", progress=False)
    with pytest.raises(PolicyMismatchError, match=r"this model has d_model=48, d_ff=48\."):
        prunenet.prune(tmp_path / "wide", path, 0.3, out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_gguf_input_tinycoder(tmp_path):
    from prunenet.assets import asset_path

    gguf = asset_path("tinycoder-gguf") / "tiny.gguf"
    result = prunenet.compress(str(gguf), ratio=0.5, out=tmp_path / "out", progress=False)
    assert result.record["ffn_width_before"] == 64 and result.record["ffn_width_after"] == 32
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.intermediate_size == 32
    assert reloaded.dtype == torch.float32
    assert (tmp_path / "out" / "tokenizer.json").exists()


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, 0.999])
def test_bad_ratio(tiny_llama, ratio):
    with pytest.raises(InputError, match="ratio"):
        prunenet.compress(tiny_llama, ratio=ratio, progress=False)


@pytest.mark.parametrize("windows, message", [
    (-1, "evaluate_windows must be 0 (no --eval) or a positive number of windows, got -1"),
    (True, "evaluate_windows must be 0 (no --eval) or a positive number of windows, got True"),
    (1.5, "evaluate_windows must be 0 (no --eval) or a positive number of windows, got 1.5"),
    (2, "--eval measures perplexity on text, and the model has no tokenizer; save one next to "
        "the model, or leave out --eval"),
])
def test_an_eval_an_in_memory_model_cannot_take_is_refused_before_it_is_sliced(windows, message):
    """compress slices a model given in memory in place: an --eval it cannot measure (no
    count of windows, no tokenizer to read text with) is refused before that, the caller's
    model left whole (it had been refused only after the model was pruned)."""
    model = make_tiny_model("llama")
    with pytest.raises(InputError) as refused:
        prunenet.compress(model, 0.25, method="random", reconstruct="none",
                          evaluate_windows=windows, progress=False)
    assert str(refused.value) == message
    assert FFNView(model).d_ff == 48


def test_more_eval_windows_than_the_corpus_holds_leave_an_in_memory_model_whole(
        tiny_llama_real_tokenizer_dir):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_real_tokenizer_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_real_tokenizer_dir)
    with pytest.raises(InputError, match=r"^--eval 100000: corpus 'wiki' holds \d+ evaluation "
                                         r"windows of 1024 tokens; give --eval \d+ or fewer$"):
        prunenet.compress(model, 0.25, method="random", reconstruct="none", tokenizer=tokenizer,
                          evaluate_windows=100000, progress=False)
    assert FFNView(model).d_ff == 48


def test_a_numpy_ratio_runs_and_is_recorded_as_its_value(tmp_path):
    """A numpy ratio (a model's numbers often are) runs as its value in every verb, as compare
    reads it, and the record holds a plain number (numpy's float32 had been refused as no
    number, its float64 recorded as a numpy scalar)."""
    import numpy

    model = make_tiny_model("llama")
    plain = prunenet.select_rows(model, 0.25, method="magnitude")
    for ratio in (numpy.float32(0.25), numpy.float64(0.25)):
        assert [r.tolist() for r in prunenet.select_rows(model, ratio, method="magnitude")] \
            == [r.tolist() for r in plain]
        result = prunenet.compress(make_tiny_model("llama"), ratio, method="magnitude",
                                   reconstruct="none", out=tmp_path / "out", overwrite=True,
                                   progress=False)
        assert type(result.record["ratio"]) is float and result.record["ratio"] == 0.25
        assert json.loads((tmp_path / "out" / RECORD_NAME).read_text())["ratio"] == 0.25
        training = prunenet.train_policy(model, ratio, episodes=1, progress=False)
        assert type(training.config.ratio) is float and training.config.ratio == 0.25
        pruned = prunenet.prune(make_tiny_model("llama"), training.policy, ratio,
                                reconstruct="none", progress=False)
        assert type(pruned.record["ratio"]) is float
        assert [len(r) for r in pruned.kept_rows] == [36, 36]


def test_numpy_settings_run_and_are_recorded_as_their_values(tmp_path):
    """The probe's, the refit's, --round-to's and --eval's numbers may be numpy's, as the seed
    and the training settings may: they run as their values and the record holds plain numbers
    (they had been refused as no integer or no number)."""
    import numpy

    plain = dict(probe_tokens=64, probe_length=16, ridge=0.5, probe_temperature=1.5, round_to=8)
    given = dict(probe_tokens=numpy.int64(64), probe_length=numpy.int32(16),
                 ridge=numpy.float32(0.5), probe_temperature=numpy.float64(1.5),
                 round_to=numpy.int64(8))
    results = [prunenet.compress(make_tiny_model("llama"), 0.25, out=tmp_path / name,
                                 progress=False, **settings)
               for name, settings in (("plain", plain), ("numpy", given))]
    assert [r.tolist() for r in results[1].kept_rows] == [r.tolist() for r in results[0].kept_rows]
    written = [(tmp_path / name / RECORD_NAME).read_text() for name in ("plain", "numpy")]
    assert written[1] == written[0]
    assert prunenet.select_rows(make_tiny_model("llama"), 0.25, method="magnitude",
                                round_to=numpy.int64(16))[0].numel() == 32


def test_training_settings_where_no_policy_trains_are_refused(tmp_path):
    """From Python as from the command line: a training setting for a run that trains no
    policy (another method, or a policy given) is refused before any work, not ignored."""
    model = make_tiny_model("llama")
    with pytest.raises(InputError, match=r"^episodes has no effect here: method "
                                         r"'self-generated' trains no PruneNet policy; drop it$"):
        prunenet.compress(model, ratio=0.3, episodes=3, progress=False)
    with pytest.raises(InputError, match=r"^episodes, lr have no effect here: method 'random' "
                                         r"trains no PruneNet policy; drop them$"):
        prunenet.compress(model, ratio=0.3, method="random", episodes=3, lr=1e-2,
                          out=tmp_path / "out")
    policy = prunenet.train_policy(model, 0.3, episodes=1, progress=False).policy
    with pytest.raises(InputError, match=r"^gamma has no effect here: method 'prunenet' with "
                                         r"policy uses that policy and trains none; drop it$"):
        prunenet.prune(model, policy, 0.3, gamma=0.9, progress=False)
    assert not (tmp_path / "out").exists()
    assert FFNView(model).d_ff == 48  # nothing was pruned


@pytest.mark.parametrize("settings, message", [
    ({"probe_length": 1}, "--probe-length must be at least 2 tokens, got 1"),
    ({"probe_temperature": 0.0}, "--probe-temperature must be a positive finite number, got 0.0"),
    ({"ridge": -1.0}, "--ridge must be a positive finite number, got -1.0"),
    ({"probe_sampler": "gumbel"}, "unknown probe sampler 'gumbel'; use one of inverse-cdf, "
                                  "multinomial"),
    ({"method": "self-generated", "episodes": 3}, "episodes has no effect here: method "
                                                  "'self-generated' trains no PruneNet policy; "
                                                  "drop it"),
])
def test_select_rows_refuses_what_compress_refuses(settings, message):
    """select_rows takes compress's options, and refuses the settings compress refuses, with
    the same one line (they had been read as they came: a probe of 1-token sequences, a
    sampler nobody named, training settings silently unused)."""
    model = make_tiny_model("llama")
    for verb in (prunenet.compress, prunenet.select_rows):
        with pytest.raises(InputError) as refused:
            verb(model, 0.25, probe_tokens=32, progress=False, **settings)
        assert str(refused.value) == message
    assert FFNView(model).d_ff == 48  # nothing was pruned


_NOT_USED = "has no effect here: "


@pytest.mark.parametrize("refused, message, accepted", [
    ({"method": "random", "selection": "topk"}, "selection " + _NOT_USED + "only a PruneNet "
     "policy's rows are drawn, and the method is 'random'; drop it",
     {"method": "prunenet", "episodes": 1, "selection": "topk"}),
    ({"method": "magnitude", "calibration": Calibration(windows=2)}, "calibration " + _NOT_USED
     + "calibration text feeds method='activation' only, and the method is 'magnitude'; "
     "drop it", {"method": "activation", "calibration": Calibration(windows=2)}),
    ({"method": "random", "ridge": 0.5}, "ridge " + _NOT_USED + "the ridge regularizes "
     "reconstruct='ls', and this run refits with none; drop it",
     {"method": "random", "ridge": 0.5, "reconstruct": "ls"}),
    ({"method": "magnitude", "probe_temperature": 1.5, "probe_length": 16}, "probe_length, "
     "probe_temperature have no effect here: method 'magnitude' with reconstruct='none' "
     "generates no probe text; drop them",
     {"method": "magnitude", "probe_temperature": 1.5, "probe_length": 16, "reconstruct": "ls"}),
    ({"method": "magnitude", "seed": 42}, "seed " + _NOT_USED + "method 'magnitude' with "
     "reconstruct='none' draws nothing at random and generates no probe text; drop it",
     {"method": "random", "seed": 42}),
    ({"method": "magnitude", "device": "cpu"}, "device " + _NOT_USED + "method 'magnitude' "
     "runs on the CPU, as the model's own passes do (only a PruneNet policy and a recovery "
     "fine-tune run on device); drop it", {"method": "prunenet", "device": "cpu"}),
    ({"method": "random", "gguf_down_type": "Q8_0"}, "gguf_down_type " + _NOT_USED + "no "
     "model.gguf is written (one is cut only from a .gguf input of an architecture GGUF output "
     "supports, with format auto, gguf or both); drop it", None),
    ({"method": "prunenet", "spectral": "svd", "precision": "float64"}, "precision "
     + _NOT_USED + "it sets the Gram path's float type, and spectral='svd' takes singular "
     "values directly; drop it", {"method": "prunenet", "precision": "float64"}),
    ({"method": "random", "selection": "sample", "ridge": 1e-3}, "selection " + _NOT_USED
     + "only a PruneNet policy's rows are drawn, and the method is 'random'; drop it; ridge "
     + _NOT_USED + "the ridge regularizes reconstruct='ls', and this run refits with none; "
     "drop it", None),
])
def test_settings_the_run_would_not_use_are_refused_from_python(tmp_path, refused, message,
                                                                 accepted):
    """From Python as from the command line (one rule table): a keyword named for a run that
    would not use it, at its default value too (seed=42, selection="sample"), is refused in
    one line naming the keyword, before any work; it had been ignored in silence. Where the
    planned run uses it, the same keyword is accepted."""
    model = make_tiny_model("llama")
    for verb in (prunenet.compress, prunenet.select_rows):
        with pytest.raises(InputError) as error:
            verb(model, 0.25, reconstruct="none", progress=False, **refused,
                 **({"out": tmp_path / "out"} if verb is prunenet.compress else {}))
        assert str(error.value) == message
    assert not (tmp_path / "out").exists()
    assert FFNView(model).d_ff == 48  # nothing was pruned
    if accepted is not None:  # gguf_down_type on a .gguf input: test_gguf_out
        settings = {"reconstruct": "none", **accepted}
        plan = plan_compression(model, 0.25, CompressOptions.from_keywords(0.25, **settings))
        assert plan.selector.name == settings["method"]


def test_missing_and_non_model_paths(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        prunenet.compress(str(tmp_path / "nope"), ratio=0.3, out=tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a model folder"):
        prunenet.compress(str(tmp_path / "empty"), ratio=0.3, out=tmp_path / "o")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match="not a .gguf"):
        prunenet.compress(str(tmp_path / "notes.txt"), ratio=0.3, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_pickled_weights_only_are_refused_without_unpickling(tmp_path, capsys, monkeypatch):
    """A folder whose weights are only a pickled pytorch_model.bin is refused in one line by
    every command that reads a model, and the pickle is never opened."""
    folder = tmp_path / "pickled"
    model = make_tiny_model("llama")
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    capsys.readouterr()

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", no_unpickling)
    for argv in (["compress", str(folder), "--ratio", "0.3", "--out", str(tmp_path / "o"),
                  "--method", "random"], ["eval", str(folder), "--windows", "1"]):
        assert main(["-q", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("prunenet: error: "), err
        assert err[0].endswith(f"{folder} has no .safetensors weights; prunenet does not unpickle "
                               ".bin files. Convert them with transformers (save_pretrained) "
                               "first."), err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pickled"]


def test_unsupported_architecture(tmp_path):
    import transformers

    config = transformers.MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "mamba")
    with pytest.raises(UnsupportedModelError, match="'mamba' is not supported; supported: .*llama"):
        prunenet.compress(str(tmp_path / "mamba"), ratio=0.3, out=tmp_path / "o")


def test_corrupted_and_wrong_shape_policy_files(tiny_llama, tmp_path):
    with pytest.raises(InputError, match="policy file .* is a folder; give the .safetensors"):
        load_policy(tmp_path)
    with pytest.raises(InputError, match="policy file .* does not exist"):
        load_policy(tmp_path / "none.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match="not a readable safetensors policy"):
        load_policy(tmp_path / "garbage.safetensors")
    save_file({"projection": torch.zeros(3, 2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(InputError, match="not a prunenet policy"):
        load_policy(tmp_path / "foreign.safetensors")
    training = prunenet.train_policy(tiny_llama, ratio=0.3, episodes=1, progress=False)
    good = save_policy(training.policy, tmp_path / "good.safetensors", {})
    tensors = prunenet.io.policy_file.load_file(str(good))
    from safetensors import safe_open

    with safe_open(str(good), "pt") as handle:
        header = handle.metadata()
    tensors["bias"] = torch.zeros(7)
    save_file(tensors, tmp_path / "shape.safetensors", metadata=header)
    with pytest.raises(PolicyMismatchError, match="do not match the header"):
        load_policy(tmp_path / "shape.safetensors")
    tensors["bias"] = training.policy.bias.detach() + 1
    save_file(tensors, tmp_path / "tampered.safetensors", metadata=header)
    with pytest.raises(InputError, match="checksum"):
        load_policy(tmp_path / "tampered.safetensors")


def test_output_that_holds_a_model_is_refused_unless_overwrite(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    prunenet.prune(str(tiny_llama_dir), None, 0.5, method="random", out=out)
    marker = (out / "config.json").read_text()
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        prunenet.prune(str(tiny_llama_dir), None, 0.25, method="random", out=out)
    assert (out / "config.json").read_text() == marker
    prunenet.prune(str(tiny_llama_dir), None, 0.25, method="random", out=out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 36
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_output_inside_input_is_refused(tiny_llama_dir):
    before = sorted(p.name for p in tiny_llama_dir.iterdir())
    with pytest.raises(OutputError, match="inside the input"):
        prunenet.compress(str(tiny_llama_dir), ratio=0.3, out=tiny_llama_dir / "pruned")
    assert sorted(p.name for p in tiny_llama_dir.iterdir()) == before


def test_failure_while_saving_leaves_no_output(tiny_llama_dir, tmp_path, monkeypatch):
    from prunenet.io import loading

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "write_json_atomic", explode)
    with pytest.raises(KeyboardInterrupt):
        prunenet.prune(str(tiny_llama_dir), None, 0.5, method="random", out=tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-llama"]


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_compress_train_and_prune(tiny_llama_dir, tmp_path, capsys):
    assert main(["-q", "train-policy", str(tiny_llama_dir), "--ratio", "0.3", "--episodes", "2",
                 "--out", str(tmp_path / "p.safetensors")]) == 0
    assert main(["-q", "prune", str(tiny_llama_dir), "--policy", str(tmp_path / "p.safetensors"),
                 "--ratio", "0.5", "--out", str(tmp_path / "half"), "--selection", "topk"]) == 0
    assert json.loads((tmp_path / "half" / "config.json").read_text())["intermediate_size"] == 24
    assert main(["-q", "compress", str(tiny_llama_dir), "--ratio", "0.25", "--out",
                 str(tmp_path / "c")]) == 0
    captured = capsys.readouterr()
    assert "FFN width 48 -> 36" in captured.out
    assert "it/s" not in captured.err  # -q: no progress bar, ours or transformers'
    # Without -q the same command shows progress (policy episodes, writing the model).
    assert main(["compress", str(tiny_llama_dir), "--ratio", "0.25", "--episodes", "1",
                 "--method", "prunenet", "--out", str(tmp_path / "c2")]) == 0
    assert "policy episodes" in capsys.readouterr().err


@pytest.mark.parametrize("ratio", ["30%", "abc", "1.0", "-0.2"])
def test_cli_bad_ratio_text(tiny_llama_dir, tmp_path, capsys, ratio):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", str(tiny_llama_dir), "--ratio", ratio, "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "ratio" in message and (ratio != "30%" or "write 0.3 for 30%" in message)


@pytest.mark.parametrize("argv", [["compress", "m", "--ratio", "0.3"],
                                  ["compress", "m", "--ratio", "0.3", "--out", "o",
                                   "--reconstruct", "magic"],
                                  ["eval", "m", "--windows", "-1"], ["no-such-command"], []])
def test_cli_option_errors_are_one_line(capsys, argv):
    """argparse's usage block is not printed: one line, that names the command's --help."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("prunenet: error: ") and "--help)" in err and "usage:" not in err
    if argv[:1] == ["compress"]:
        assert "(see prunenet compress --help)" in err


def test_cli_error_is_one_line_without_traceback(tmp_path, capsys):
    code = main(["compress", str(tmp_path / "missing"), "--ratio", "0.3", "--out",
                 str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("prunenet: error: model path") and "does not exist" in err


def test_cli_ratio_leaving_no_neuron(tiny_llama_dir, tmp_path, capsys):
    code = main(["prune", str(tiny_llama_dir), "--method", "random", "--ratio", "0.99",
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "keeps 0 of 48" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read once, when first imported
    with pytest.raises(InputError, match="Hugging Face Hub id failed.*Pass a local model folder"):
        prunenet.compress("some-org/some-model-that-is-not-cached", ratio=0.3,
                          out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_cuda_asked_without_a_gpu(tiny_llama):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(InputError, match="no CUDA GPU"):
        prunenet.train_policy(tiny_llama, ratio=0.3, episodes=1, device="cuda")


def test_spectral_and_finetune_precision_are_different_options():
    """compress / train-policy: --spectral-precision (the Gram path's float type); finetune:
    --precision (the training step's arithmetic). Neither command takes the other's."""
    from prunenet.cli import build_parser

    parser = build_parser()
    for command in ("compress", "train-policy"):
        args = parser.parse_args([command, "m", "--ratio", "0.3", "--out", "o",
                                  "--spectral-precision", "float64"])
        assert _training_options(args)["precision"] == "float64"
        with pytest.raises(SystemExit):
            parser.parse_args([command, "m", "--ratio", "0.3", "--out", "o",
                               "--precision", "float64"])
    assert parser.parse_args(["finetune", "m", "--data", "wiki", "--out", "o",
                              "--precision", "bfloat16"]).precision == "bfloat16"
    with pytest.raises(SystemExit):
        parser.parse_args(["finetune", "m", "--data", "wiki", "--out", "o",
                           "--spectral-precision", "float64"])


def test_the_readme_python_example_runs_as_written(tiny_llama_dir, tmp_path, monkeypatch):
    """README.md's Python block, on tiny models (its model path the tiny folder): every line
    runs, and the results say what its comments say."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("From Python:\n\n```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    names = {"model": make_tiny_model("llama"), "other_model": make_tiny_model("llama", seed=1)}
    exec(block.replace("path/to/model", str(tiny_llama_dir)), names)
    assert json.loads(Path("pruned", RECORD_NAME).read_text())["method"] == "self-generated"
    assert json.loads(Path("pruned-0.2", RECORD_NAME).read_text())["method"] == "prunenet"
    assert names["result"].record["method"] == "prunenet"


def test_an_unknown_keyword_names_the_nearest_option_and_where_a_policy_goes(tiny_llama):
    """A misspelt keyword named alone left the caller to find the right name; a policy given
    to compress, which trains its own, did not say that prune applies one."""
    with pytest.raises(InputError) as refused:
        prunenet.compress(tiny_llama, 0.3, method="random", reconstrut="none", colour=1)
    assert str(refused.value) == ("unknown option(s): colour, reconstrut (reconstrut: did you "
                                  "mean reconstruct?)")
    with pytest.raises(InputError) as refused:
        prunenet.compress(tiny_llama, 0.3, policy="p.safetensors")
    assert str(refused.value) == ("unknown option(s): policy (policy: prune(model, policy, "
                                  "ratio) applies a trained policy)")
