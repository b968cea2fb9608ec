"""Bad input, interruption, reproducibility and untrusted files (issue 6)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prunenet
from conftest import edit_config, make_tiny_model
from prunenet.cli import main
from prunenet.errors import InputError, NumericalError, OutputError
from prunenet.families import Cut, kept_count, slice_tensor
from prunenet.io.loading import load_model_and_tokenizer, read_record
from prunenet.io.policy_file import load_policy
from prunenet.io.streaming import StreamedCheckpoint
from prunenet.selection.base import top_rows
from prunenet.selection.prunenet.policy import keep_probabilities, sample_rows
from prunenet.selection.prunenet.reinforce import TrainingConfig, train_policy_on_matrices


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*")) if path.is_file()
    }


# --- resume and reproducibility ----------------------------------------------------------------


def _matrices():
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(64, 16, generator=generator) for _ in range(3)]


def test_resume_after_interruption_ends_identical_to_uninterrupted(tmp_path):
    config = TrainingConfig(ratio=0.3, episodes=5, lr=1e-2, seed=3)
    full = train_policy_on_matrices(_matrices(), config, progress=False)

    def interrupt(record, policy):
        if record.episode == 2:
            raise KeyboardInterrupt

    state = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        train_policy_on_matrices(_matrices(), config, progress=False, state_path=state,
                                 on_episode=interrupt)
    seen = []
    resumed = train_policy_on_matrices(_matrices(), config, progress=False, state_path=state,
                                       resume=True, on_episode=lambda r, p: seen.append(r.episode))
    assert seen == [3, 4]  # continued after the last complete episode, not from zero
    assert resumed.best_episode == full.best_episode
    assert [r.layer_ks for r in resumed.history] == [r.layer_ks for r in full.history]
    for name, value in full.policy.state_dict().items():
        assert torch.equal(resumed.policy.state_dict()[name], value), name


def test_resume_with_contradicting_settings_is_refused(tmp_path):
    state = tmp_path / "state.pt"
    train_policy_on_matrices(_matrices(), TrainingConfig(episodes=1, seed=1), progress=False,
                             state_path=state)
    with pytest.raises(InputError, match="different lr"):
        train_policy_on_matrices(_matrices(), TrainingConfig(episodes=2, seed=1, lr=0.5),
                                 progress=False, state_path=state, resume=True)


def test_cli_resume_continues_compress(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """An interrupted policy training keeps its state, which the interrupted line names as
    what the same command with --resume continues (not as a finished output); resumed, the
    run ends as an uninterrupted one."""
    from prunenet.selection import prunenet as prunenet_method

    original = prunenet_method.train_policy_on_matrices

    def interrupted(*args, **kwargs):
        def stop(record, policy):
            if record.episode == 1:
                raise KeyboardInterrupt

        return original(*args, **{**kwargs, "on_episode": stop})

    out = tmp_path / "out"
    argv = ["-q", "compress", str(tiny_llama_dir), "--ratio", "0.3", "--episodes", "3",
            "--method", "prunenet", "--out", str(out)]
    monkeypatch.setattr(prunenet_method, "train_policy_on_matrices", interrupted)
    assert main(argv) == 130
    state = tmp_path / "out.train-state.pt"
    assert sorted(tmp_path.iterdir()) == [state, tiny_llama_dir]
    assert capsys.readouterr().err == (
        f"prunenet: interrupted; written complete before the interrupt: {state} (the "
        "policy's training state: the same command with --resume continues from it; delete "
        "it to start over); every other output was not written and nothing partial was left "
        "behind\n")
    monkeypatch.setattr(prunenet_method, "train_policy_on_matrices", original)
    assert main([*argv, "--resume"]) == 0
    assert not (tmp_path / "out.train-state.pt").exists()
    assert main([*argv[:-1], str(tmp_path / "fresh")]) == 0
    assert _tree_digest(out) == _tree_digest(tmp_path / "fresh")


def test_same_seed_gives_byte_identical_outputs(tiny_llama_dir, tmp_path):
    for name in ("a", "b"):
        prunenet.compress(str(tiny_llama_dir), ratio=0.3, episodes=2, seed=11,
                          out=tmp_path / name, policy_out=tmp_path / f"{name}.safetensors",
                          progress=False, method="prunenet")
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


# --- untrusted and damaged files ---------------------------------------------------------------


def test_truncated_safetensors_is_named(tiny_llama_dir):
    weights = tiny_llama_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"model\.safetensors.*(truncated|lies)"):
        load_model_and_tokenizer(tiny_llama_dir)


def test_lying_safetensors_header_is_rejected_without_allocation(tmp_path, tiny_llama_dir):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20],
                               "data_offsets": [0, 16]}}).encode()
    (tiny_llama_dir / "model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + b"\x00" * 16)
    with pytest.raises(InputError, match="header lies|truncated"):
        load_model_and_tokenizer(tiny_llama_dir)
    (tiny_llama_dir / "model.safetensors").write_bytes((1 << 60).to_bytes(8, "little"))
    with pytest.raises(InputError, match="not a valid safetensors file.*header too large"):
        load_model_and_tokenizer(tiny_llama_dir)


def test_shard_index_pointing_outside_the_folder(tiny_llama_dir):
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "../../etc/passwd"}}
    (tiny_llama_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="outside the model folder"):
        load_model_and_tokenizer(tiny_llama_dir)
    index["weight_map"]["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (tiny_llama_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="model-00002-of-00002.safetensors, which is missing"):
        load_model_and_tokenizer(tiny_llama_dir)


def test_truncated_gguf(tmp_path):
    from prunenet.assets import asset_path

    data = (asset_path("tinycoder-gguf") / "tiny.gguf").read_bytes()
    (tmp_path / "bad.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a valid GGUF"):
        load_model_and_tokenizer(tmp_path / "bad.gguf")


def test_truncated_or_oversized_gguf_is_refused_before_the_load(tmp_path, monkeypatch, capsys):
    """A GGUF is loaded whole, dequantized to float32: for prunenet eval, one that would not fit
    the memory available now is refused (the parameters counted from its header), naming how
    to read it; prunenet compress converts and streams such a GGUF instead, and refuses it
    only when not even that fits, naming the need. A damaged one is refused as such first;
    nothing is loaded or written."""
    import psutil

    import prunenet.evaluation.evaluate
    import prunenet.pipeline
    from prunenet.assets import asset_path
    from prunenet.io.loading import gguf_reader

    def no_load(*args, **kwargs):
        raise InputError("the load starts here")

    source = asset_path("tinycoder-gguf") / "tiny.gguf"
    parameters = sum(int(tensor.n_elements) for tensor in gguf_reader(source).tensors)
    (tmp_path / "bad.gguf").write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    real = psutil.virtual_memory()
    monkeypatch.setattr(prunenet.pipeline, "load_model_and_tokenizer", no_load)
    monkeypatch.setattr(prunenet.evaluation.evaluate, "load_model_and_tokenizer", no_load)
    for available in (4 * parameters - 1, 4 * parameters):
        memory = real._replace(available=available)
        monkeypatch.setattr(psutil, "virtual_memory", lambda memory=memory: memory)
        for gguf in (tmp_path / "bad.gguf", source):
            assert main(["-q", "eval", str(gguf), "--windows", "1"]) == 2
            error = capsys.readouterr().err
            fits = available >= 4 * parameters and gguf == source
            assert ("the load starts here" in error) == fits
            if gguf != source:
                assert "is not a valid GGUF file" in error
            elif not fits:
                assert (f"tiny.gguf holds {parameters / 1e9:.2f}B parameters: "
                        f"{4 * parameters / 2**20:.2f}MiB once dequantized to float32") in error
                assert "prunenet compress converts and reads it from disk" in error
            assert main(["-q", "compress", str(gguf), "--ratio", "0.25", "--out",
                         str(tmp_path / "out"), "--method", "random"]) == 2
            error = capsys.readouterr().err
            if gguf != source:
                assert "is not a valid GGUF file" in error
            else:  # half of what is free: too little even to convert it
                assert "converting it to safetensors one layer at a time" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


@pytest.mark.parametrize("change", ["wrong", "missing"])
def test_config_with_wrong_or_missing_ffn_width(tiny_llama_dir, change):
    config_file = tiny_llama_dir / "config.json"
    config = json.loads(config_file.read_text())
    if change == "wrong":
        config["intermediate_size"] = 50
    else:
        del config["intermediate_size"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"wrongly shaped model.layers.0.mlp.down_proj.weight"):
        load_model_and_tokenizer(tiny_llama_dir)


def test_model_with_zero_layers(tmp_path):
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=0, num_attention_heads=2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "empty")
    with pytest.raises(InputError, match="no decoder layers"):
        prunenet.compress(str(tmp_path / "empty"), ratio=0.3, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PRUNENET_PICKLE_MARKER']}",))


def test_pickled_policy_is_never_unpickled(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PRUNENET_PICKLE_MARKER", str(marker))
    (tmp_path / "policy.pt").write_bytes(pickle.dumps({"projection": _Exploit()}))
    with pytest.raises(InputError, match="not a readable safetensors policy"):
        load_policy(tmp_path / "policy.pt")
    assert not marker.exists()


def test_nan_weights_are_reported_with_the_layer_name():
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")
    with pytest.raises(NumericalError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        prunenet.compress(model, ratio=0.3, progress=False)


def test_nan_outside_the_ffn_is_refused_in_memory_and_streamed(tmp_path):
    """A NaN anywhere (here an attention matrix, which no method reads) is never written out:
    in memory every parameter is checked after loading, streamed every copied tensor's bytes."""
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[2, 1] = float("nan")
    with pytest.raises(NumericalError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight"):
        prunenet.compress(model, ratio=0.5, method="random", reconstruct="none",
                          out=tmp_path / "memory", progress=False)
    model.save_pretrained(tmp_path / "model", max_shard_size="20KB")
    with pytest.raises(NumericalError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight"):
        prunenet.compress(str(tmp_path / "model"), ratio=0.5, method="random",
                          reconstruct="none", out=tmp_path / "streamed", progress=False,
                          max_memory=StreamedCheckpoint(tmp_path / "model")
                          .streaming_memory(training=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_nan_result_is_never_reported_or_saved(tmp_path):
    from prunenet.evaluation.perplexity import perplexity
    from prunenet.io.files import write_json_atomic

    model = make_tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")
    windows = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator()
                            .manual_seed(0))
    with pytest.raises(NumericalError, match="window 0 is nan"):
        perplexity(model, windows, progress=False)
    with pytest.raises(NumericalError, match="result.json would hold a NaN or Inf value"):
        write_json_atomic(tmp_path / "result.json", {"perplexity": float("nan")})
    with pytest.raises(NumericalError):
        write_json_atomic(tmp_path / "result.json", {"values": [1.0, float("inf")]})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype,code", [(torch.float16, "F16"), (torch.bfloat16, "BF16"),
                                        (torch.float32, "F32"), (torch.float64, "F64"),
                                        (torch.float8_e5m2, "F8_E5M2"),
                                        (torch.float8_e4m3fn, "F8_E4M3")])
def test_raw_bytes_check_finds_every_non_finite_value(dtype, code):
    from prunenet.io.streaming import _check_finite_bytes

    large = 65000.0 if dtype == torch.float16 else 1e30 if dtype.itemsize > 1 else 240.0
    finite = torch.tensor([0.0, -0.0, 1.5, -3.0, large,
                           torch.finfo(dtype).max, torch.finfo(dtype).tiny], dtype=dtype)
    _check_finite_bytes("w", code, finite.view(torch.uint8).numpy().tobytes())
    # float8_e4m3fn has no Inf (torch saturates one to the largest value)
    infinite = () if dtype == torch.float8_e4m3fn else (float("inf"), float("-inf"))
    for bad in (float("nan"), *infinite):
        values = finite.clone()
        values[3] = bad
        with pytest.raises(NumericalError, match="w holds NaN or Inf"):
            _check_finite_bytes("w", code, values.view(torch.uint8).numpy().tobytes())


def test_unfinished_output_is_refused_as_input(tmp_path, tiny_llama):
    staging = tmp_path / ".out.tmp-abc123"
    tiny_llama.save_pretrained(staging)
    with pytest.raises(InputError, match="unfinished prunenet output"):
        load_model_and_tokenizer(staging)
    with pytest.raises(InputError, match="not a complete prunenet output"):
        read_record(staging)


def test_read_only_output_location(tiny_llama_dir, tmp_path):
    mount_point = tmp_path / "ro"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs",
                              str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only filesystem here: {mounted.stderr.decode()}")
    try:
        with pytest.raises(OutputError, match="read-only"):
            prunenet.prune(str(tiny_llama_dir), None, 0.5, method="random",
                           out=mount_point / "out")
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_debug_flag_shows_the_traceback(tmp_path):
    with pytest.raises(InputError):
        main(["--debug", "compress", str(tmp_path / "missing"), "--ratio", "0.3",
              "--out", str(tmp_path / "o")])


# --- signals and concurrent writers ------------------------------------------------------------

# The child restores Python's Ctrl-C handler: a test runner started in the background by a
# non-interactive shell (`pytest &`, nohup) ignores SIGINT, its children inherit that, and an
# ignored SIGINT rightly interrupts nothing.
_SLOW_SAVE = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    from prunenet.io import loading
    from prunenet.cli import main

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal, not under nohup

    plain = loading.save_plain_checkpoint

    def slow(model, tokenizer, folder):
        plain(model, tokenizer, folder)
        Path(sys.argv[1]).write_text("saving")  # tell the test we are mid-save
        wait = sys.argv[2]
        if wait.replace(".", "", 1).isdigit():
            time.sleep(float(wait))
        else:  # a file: stay mid-save until the test creates it
            while not Path(wait).exists():
                time.sleep(0.05)

    loading.save_plain_checkpoint = slow
    sys.exit(main(sys.argv[3:]))
""")


def _start_slow_save(tmp_path, model_dir, out, sleep, marker_name="marker"):
    marker = tmp_path / marker_name
    command = [sys.executable, "-c", _SLOW_SAVE, str(marker), str(sleep), "-q", "prune",
               str(model_dir), "--method", "random", "--ratio", "0.5", "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    return process, marker


def _wait_for(marker: Path, process) -> None:
    while not marker.exists():
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP,
                                    signal.SIGKILL])
def test_signal_during_save_leaves_no_output_and_input_untouched(tiny_llama_dir, tmp_path,
                                                                 signum):
    """SIGHUP too (a closed terminal): it had ended the process without cleaning up, leaving
    the staging folder beside the output."""
    before = _tree_digest(tiny_llama_dir)
    out = tmp_path / "out"
    process, marker = _start_slow_save(tmp_path, tiny_llama_dir, out, sleep=30)
    _wait_for(marker, process)
    process.send_signal(signum)
    output = process.communicate(timeout=60)
    assert not out.exists(), (process.returncode, output)
    assert _tree_digest(tiny_llama_dir) == before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    if signum == signal.SIGKILL:
        assert all(not (tmp_path / name / "prunenet.json").exists() for name in leftovers)
    else:
        assert process.returncode == 130 and leftovers == []


def test_two_runs_writing_the_same_output(tiny_llama_dir, tmp_path):
    """Two runs past their checks, both mid-save, then released together: one publishes, the
    other finds the output written meanwhile and leaves it alone (held mid-save by a file, so
    a loaded machine cannot let one run finish before the other starts)."""
    out = tmp_path / "out"
    release = tmp_path / "release"
    first, first_marker = _start_slow_save(tmp_path, tiny_llama_dir, out, release, "m1")
    second, second_marker = _start_slow_save(tmp_path, tiny_llama_dir, out, release, "m2")
    _wait_for(first_marker, first)
    _wait_for(second_marker, second)
    release.write_text("go")
    results = [process.communicate() for process in (first, second)]
    codes = sorted([first.returncode, second.returncode])
    assert codes == [0, 2], results
    loser_err = [err for (_, err), p in zip(results, (first, second)) if p.returncode == 2][0]
    assert "written by another run" in loser_err
    assert read_record(out)["ffn_width_after"] == 24
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# --- properties --------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(d_ff=st.integers(1, 200), ratio=st.floats(0, 0.999), seed=st.integers(0, 2**31 - 1))
def test_selection_keeps_exactly_k_distinct_rows(d_ff, ratio, seed):
    try:
        kept = kept_count(d_ff, ratio)
    except InputError:
        assert (1 - Fraction(repr(ratio))) * d_ff < 1
        return
    generator = torch.Generator().manual_seed(seed)
    alpha = torch.rand(d_ff, generator=generator)
    probabilities = keep_probabilities(alpha, torch.rand(d_ff, generator=generator))
    for rows in (sample_rows(probabilities, kept, generator), top_rows(alpha, kept)):
        assert rows.numel() == kept == rows.unique().numel()
        assert torch.equal(rows, rows.sort().values)
        assert 0 <= int(rows.min()) and int(rows.max()) < d_ff


@settings(max_examples=200, deadline=None)
@given(d_ff=st.integers(1, 5000), ratio=st.floats(0, 0.999), multiple=st.integers(2, 300))
def test_rounded_kept_count_is_the_nearest_whole_multiple(d_ff, ratio, multiple):
    """--round-to N: a multiple of N, at least N, below d_ff for a positive ratio, and no
    further from (1 - ratio) d_ff than any other multiple of N allowed there."""
    largest = (d_ff - (1 if ratio > 0 else 0)) // multiple * multiple
    if largest < multiple:
        with pytest.raises(InputError, match=f"--round-to {multiple} leaves no whole multiple"):
            kept_count(d_ff, ratio, multiple)
        return
    kept = kept_count(d_ff, ratio, multiple)
    assert kept % multiple == 0 and multiple <= kept <= largest
    assert kept < d_ff or ratio == 0
    wanted = (1 - ratio) * d_ff
    allowed = range(multiple, largest + 1, multiple)
    assert abs(kept - wanted) <= min(abs(k - wanted) for k in allowed) + 1e-9


def test_round_to_one_is_the_exact_count_and_bad_multiples_are_refused():
    assert [kept_count(d, r, 1) for d, r in [(2048, 0.3), (4864, 0.3), (1536, 0.3)]] == [
        1433, 3404, 1075]
    assert [kept_count(d, r, 32) for d, r in [(2048, 0.3), (4864, 0.3), (1536, 0.3)]] == [
        1440, 3392, 1088]
    # The ratio as written, computed exactly: in floating point (1 - 0.34) * 100 is
    # 65.99999..., which int() cut to 65, removing 35% where 34% was asked.
    assert [kept_count(d, r) for d, r in [(100, 0.34), (10240, 0.8), (8960, 0.55), (8960, 0.9),
                                          (100, 0.345), (3, 1 / 3)]] == [66, 2048, 4032, 896,
                                                                          65, 2]
    assert kept_count(2048, 0.001, 32) == 2016  # rounding never undoes a positive ratio
    assert kept_count(2048, 0.0, 32) == 2048
    for bad in (0, -32, 1.5, True):
        with pytest.raises(InputError, match="--round-to must be a positive integer"):
            kept_count(2048, 0.3, bad)


def test_every_family_declares_its_ffn_width_before_it_loads(tmp_path, tiny_model_type):
    """config.json's width field of each family is the width its weights have."""
    from prunenet.io.loading import declared_ffn_width
    from prunenet.model_view import FFNView

    model = make_tiny_model(tiny_model_type)
    model.save_pretrained(tmp_path / "m")
    assert declared_ffn_width(tmp_path / "m") == FFNView(model).d_ff


def test_a_ratio_or_round_to_the_width_cannot_take_is_refused_before_the_load(
        tmp_path, tiny_llama_dir, monkeypatch, capsys):
    """Read from config.json or the GGUF header: the same one-line refusal as after a load,
    with nothing loaded or written (tinycoder's FFN is 64 wide, the tiny LLaMA's 48)."""
    import prunenet.pipeline
    from prunenet.assets import asset_path

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(prunenet.pipeline, "load_model_and_tokenizer", no_load)
    gguf = str(asset_path("tinycoder-gguf") / "tiny.gguf")
    out = tmp_path / "out"
    for source, options, message in [
        (gguf, ["--round-to", "64"], "--round-to 64 leaves no whole multiple of 64 below the "
                                     "FFN width 64"),
        (str(tiny_llama_dir), ["--round-to", "48"], "--round-to 48 leaves no whole multiple "
                                                    "of 48 below the FFN width 48"),
        (str(tiny_llama_dir), ["--ratio", "0.99"], "ratio 0.99 keeps 0 of 48 FFN neurons"),
    ]:
        ratio = [] if "--ratio" in options else ["--ratio", "0.25"]
        assert main(["-q", "compress", source, *ratio, *options, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()


@settings(max_examples=60, deadline=None)
@given(d_ff=st.integers(1, 40), other=st.integers(1, 8), axis=st.integers(0, 1),
       blocks=st.integers(1, 2), data=st.data())
def test_slice_equals_masking(d_ff, other, axis, blocks, data):
    kept_rows = torch.tensor(sorted(data.draw(st.sets(st.integers(0, d_ff - 1), min_size=1))))
    shape = [other, other]
    shape[axis] = d_ff * blocks
    tensor = torch.randn(*shape)
    cut = Cut("w", axis, blocks=blocks)
    mask = torch.zeros(d_ff, dtype=torch.bool)
    mask[kept_rows] = True
    full_mask = mask.repeat(blocks)
    expected = tensor[full_mask] if axis == 0 else tensor[:, full_mask]
    assert torch.equal(slice_tensor(tensor, cut, kept_rows, d_ff), expected)


def test_commands_that_hold_whole_models_refuse_models_larger_than_memory(tmp_path, monkeypatch,
                                                                          capsys):
    """compare and finetune hold their models in memory: weights that alone exceed the memory
    available are refused before any load, naming each model's size, and nothing is written."""
    import psutil

    from prunenet.io.streaming import StreamedCheckpoint, format_bytes

    dense = tmp_path / "dense"
    make_tiny_model("llama").save_pretrained(dense)
    student = tmp_path / "student"
    make_tiny_model("llama").save_pretrained(student)
    size = StreamedCheckpoint(dense).weight_bytes  # float32, as finetune loads them too
    real = psutil.virtual_memory()
    commands = [  # (arguments, memory available, the models named)
        (["compare", str(dense), "--ratios", "0.5", "--methods", "random", "--out",
          str(tmp_path / "compared")], size - 1,
         f"prunenet compare holds {dense} ({format_bytes(size)})"),
        # Student and teacher together: either alone would fit.
        (["finetune", str(student), "--data", "self-generated", "--teacher", str(dense),
          "--out", str(tmp_path / "tuned"), "--steps", "1"], 2 * size - 1,
         f"prunenet finetune holds {student} ({format_bytes(size)}) and {dense} "
         f"({format_bytes(size)})"),
    ]
    for argv, available, named in commands:
        memory = real._replace(available=available)
        monkeypatch.setattr(psutil, "virtual_memory", lambda memory=memory: memory)
        assert main(["-q", *argv]) == 2
        error = capsys.readouterr().err
        assert named in error and "in memory, weights alone" in error, error
        assert f"{format_bytes(available)} of memory is available now" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "student"]


# --- names and values that would mislead or hang ----------------------------------------------

def _refused_line(capsys, argv: list[str]) -> str:
    """Run the CLI; assert exit 2 with exactly one line on stderr; return it."""
    capsys.readouterr()  # what the test printed before
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prunenet: error: "), err
    return err[0]


@pytest.fixture
def hub_check():
    """The Hub's reachability is asked once per process; each test that fakes it asks anew."""
    from prunenet.io.loading import _connects

    _connects.cache_clear()
    yield
    _connects.cache_clear()


def test_a_mistyped_model_name_is_refused_at_once_naming_the_nearest(tmp_path, capsys,
                                                                     monkeypatch, hub_check):
    """Neither a path nor an alias, with the Hub's host not resolving: one line before any
    Hub request (the Hub client retries for half a minute), with the nearest local name or
    alias; a name in the Hub cache is still loaded from it."""
    import socket

    import transformers
    from huggingface_hub import constants

    from prunenet.io.loading import resolve_source

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    make_tiny_model("llama").save_pretrained(tmp_path / "llama")
    common = ["--ratio", "0.3", "--out", "o", "--method", "random"]
    line = _refused_line(capsys, ["-q", "compress", "lama", *common])
    assert "model 'lama' is neither a local path nor one of prunenet's models" in line
    assert "huggingface.co cannot be reached" in line and line.endswith("did you mean llama?")
    assert _refused_line(capsys, ["-q", "eval", "smollm2-13m"]).endswith(
        "did you mean smollm2-135m?")
    assert _refused_line(capsys, ["-q", "convert", "lama.gguf", "--out", "c"]).endswith(
        "model path lama.gguf does not exist")
    assert _refused_line(capsys, ["-q", "eval", ""]).endswith("the model path is empty; give "
                                                               "a model folder, a .gguf file "
                                                               "or one of smollm2-135m, "
                                                               "gemma3-270m")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # it may resolve the Hub
    assert resolve_source("lama") == ("lama", None)
    monkeypatch.delenv("HTTPS_PROXY")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["llama"]


def test_a_hub_id_not_in_the_cache_is_refused_in_one_line_in_offline_mode(
        tmp_path, capsys, monkeypatch, hub_check):
    """HF_HUB_OFFLINE set and the id not in the Hub cache: one line naming offline mode and
    what to pass instead, for every command that reads a model, and nothing written."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    expected = ("prunenet: error: could not load 'someorg/some-model': it is not a local path, "
                "and fetching it as a Hugging Face Hub id failed (offline mode: ")
    for argv in (["compress", "someorg/some-model", "--ratio", "0.3", "--out", "o"],
                 ["eval", "someorg/some-model"]):
        line = _refused_line(capsys, ["-q", *argv])
        assert line.startswith(expected), line
        assert line.endswith("Pass a local model folder or GGUF file, or connect to the Hub.")
    assert [path.name for path in tmp_path.iterdir()] == []


@pytest.mark.parametrize("error, line", [
    (OSError(5, "Input/output error", "/data/model.safetensors"),
     "/data/model.safetensors: Input/output error"),
    (json.JSONDecodeError("Expecting value", "{\n", 1), "JSONDecodeError: Expecting value: "
     "line 1 column 2 (char 1)"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
     "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 0: invalid start "
     "byte"),
])
def test_a_library_error_inside_a_command_is_one_line(capsys, monkeypatch, error, line):
    """An error of a library the commands use (a file that cannot be read, a file that is not
    JSON or not text), raised inside a command: exit 2 and one line, the file it names first
    where it names one, never a traceback."""
    from safetensors import SafetensorError

    from prunenet import assets

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(assets, "fetch_all", failing)
    assert _refused_line(capsys, ["fetch"]) == f"prunenet: error: {line}"
    monkeypatch.setattr(assets, "fetch_all", lambda *a, **k: (_ for _ in ()).throw(
        SafetensorError("Error while deserializing header: HeaderTooLarge\nmore")))
    assert _refused_line(capsys, ["fetch"]) == ("prunenet: error: SafetensorError: Error while "
                                                 "deserializing header: HeaderTooLarge")


def test_a_hub_id_in_the_cache_loads_from_it_without_asking_the_unreachable_hub(
        tmp_path, capsys, monkeypatch, hub_check):
    """Where the Hub's host does not resolve, a cached Hub id is read from the cache alone
    (the Hub client retried for minutes before falling back to it)."""
    import socket

    import huggingface_hub.file_download as file_download
    from huggingface_hub import constants

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    repository = tmp_path / "hub" / "models--org--tiny"
    make_tiny_model("llama").save_pretrained(repository / "snapshots" / "abc")
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text("abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(file_download, "get_hf_file_metadata", no_hub)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["-q", "compress", "org/tiny", "--ratio", "0.5", "--out", str(out), "--method",
                 "random", "--reconstruct", "none"]) == 0, capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 24


def test_a_cached_hub_id_whose_weights_do_not_fit_is_refused_without_asking_the_hub(
        tmp_path, capsys, monkeypatch, hub_check):
    """Where the Hub cannot be reached, a cached Hub id whose weights do not fit its config is
    refused naming them, from the cache alone: the second load that names the wrongly shaped
    weights had asked the Hub (and its client retried for minutes)."""
    import socket

    import huggingface_hub.file_download as file_download
    from huggingface_hub import constants

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc"
    make_tiny_model("llama").save_pretrained(snapshot)
    edit_config(snapshot, intermediate_size=40)  # the weights hold 48 neurons a layer
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(file_download, "get_hf_file_metadata", no_hub)
    line = _refused_line(capsys, ["-q", "compress", "org/tiny", "--ratio", "0.5", "--out",
                                  str(tmp_path / "out"), "--method", "random",
                                  "--reconstruct", "none"])
    assert "org/tiny: the checkpoint does not match its config: has wrongly shaped" in line
    assert not (tmp_path / "out").exists()


def test_a_hub_that_resolves_but_refuses_connections_is_judged_unreachable_at_once(
        tmp_path, capsys, monkeypatch, hub_check):
    """A Hub host whose name resolves while nothing answers on its port (a firewall, a
    closed port): one line before any Hub request, as for a name that does not resolve (the
    Hub client retried for about 30 s), and the connection is tried once per command."""
    import socket

    import transformers
    from huggingface_hub import constants

    from prunenet.io import loading

    with socket.socket() as probe:  # a port nothing listens on once this socket closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tries = []
    connect = socket.create_connection

    def counted(address, *args, **kwargs):
        tries.append(address)
        return connect(address, *args, **kwargs)

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(socket, "create_connection", counted)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    line = _refused_line(capsys, ["-q", "compress", "someone/some-model", "--ratio", "0.3",
                                  "--out", str(tmp_path / "o")])
    assert "as a Hugging Face Hub id it cannot be fetched: 127.0.0.1 cannot be reached" in line
    assert loading._unreachable_hub() == "127.0.0.1"
    assert tries == [("127.0.0.1", port)]
    with socket.socket() as server:  # the same check passes where the port answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert loading._unreachable_hub() is None
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("changes, field", [
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ({"rope_parameters": {"rope_theta": float("inf"), "rope_type": "default"}},
     "rope_parameters.rope_theta"),
])
def test_a_config_value_that_is_not_finite_is_refused(tmp_path, capsys, changes, field):
    """NaN or Inf in config.json (JSON allows them as NaN / Infinity) would be copied into the
    output by a method that does not run the model: refused on load, for every method."""
    folder = tmp_path / "m"
    make_tiny_model("llama").save_pretrained(folder)
    edit_config(folder, **changes)
    for method in (["--method", "random", "--reconstruct", "none"], []):
        line = _refused_line(capsys, ["-q", "compress", str(folder), "--ratio", "0.3", "--out",
                                      str(tmp_path / "o"), *method])
        assert f"config field {field}" in line and "is not a finite number" in line, line
    assert not (tmp_path / "o").exists()


def test_a_config_field_of_the_wrong_type_names_the_field_and_the_type(tmp_path, capsys):
    """A library message whose first line only announces the next (ends in a colon) keeps
    that next line."""
    folder = tmp_path / "m"
    make_tiny_model("llama").save_pretrained(folder)
    edit_config(folder, intermediate_size=None)
    line = _refused_line(capsys, ["-q", "compress", str(folder), "--ratio", "0.3", "--out",
                                  str(tmp_path / "o"), "--method", "random"])
    assert "intermediate_size" in line and "expected int, got NoneType" in line, line


@pytest.mark.parametrize("changes", [{"vocab_size": 100}, {"num_hidden_layers": 1}])
def test_a_config_contradicting_its_weights_is_one_line_on_stderr(tmp_path, changes):
    """transformers' own LOAD REPORT table is left out: the refusal names the same weights."""
    folder = tmp_path / "m"
    make_tiny_model("llama").save_pretrained(folder)
    edit_config(folder, **changes)
    done = subprocess.run([sys.executable, "-m", "prunenet", "-q", "compress", str(folder),
                           "--ratio", "0.3", "--out", str(tmp_path / "o"), "--method", "random"],
                          capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not match its config" in lines[0], lines


def test_devices_and_pipes_are_refused_as_corpora_and_as_output_files(tmp_path, capsys,
                                                                      tiny_llama_dir):
    """A corpus that reads without end (a device, a FIFO) or an output file that is not a
    regular file: one line, before anything is read or written."""
    from prunenet.evaluation.corpora import check_corpus

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for device in ("/dev/zero", str(fifo)):
        with pytest.raises(InputError, match="is not a regular file"):
            check_corpus(device)
    line = _refused_line(capsys, ["-q", "eval", str(tiny_llama_dir), "--ppl", "none", "--json",
                                  "/dev/null"])
    assert line.endswith("--json /dev/null is not a regular file; give the name of a file to "
                         "write")
    if Path("/proc/self").is_dir():  # a place where no file can be made, even by root
        line = _refused_line(capsys, ["-q", "eval", str(tiny_llama_dir), "--ppl", "none",
                                      "--json", "/proc/x.json"])
        assert line.startswith("prunenet: error: cannot write to /proc: "), line


def test_an_empty_policy_path_is_named(tiny_llama_dir, tmp_path, capsys):
    """'' would resolve to the current folder and be refused for overlapping --out."""
    line = _refused_line(capsys, ["-q", "prune", str(tiny_llama_dir), "--policy", "",
                                  "--ratio", "0.3", "--out", str(tmp_path / "o")])
    assert line.endswith("--policy is empty; give the policy file train-policy wrote")


def test_a_diverged_policy_run_leaves_no_training_state(tiny_llama_dir, tmp_path, capsys):
    """A resume repeats the run's settings, so it would diverge again: the state goes too."""
    out = tmp_path / "p.safetensors"
    line = _refused_line(capsys, ["-q", "train-policy", str(tiny_llama_dir), "--ratio", "0.3",
                                  "--out", str(out), "--episodes", "5", "--lr", "1e29"])
    assert "non-finite" in line and "the training state is removed" in line, line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny-llama"]


def test_a_folder_without_config_names_its_gguf_files(tmp_path, capsys):
    """A folder of one .gguf reads that file; with two, the message names them rather than
    only saying the folder has no config.json."""
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("a-Q4.gguf", "b-Q8.gguf"):
        (folder / name).write_bytes(b"")
    (tmp_path / "dir.gguf").mkdir()  # a folder named like a GGUF file is not one
    line = _refused_line(capsys, ["-q", "eval", str(folder)])
    assert line.endswith(f"{folder} holds 2 .gguf files (a-Q4.gguf, b-Q8.gguf) and no "
                         "config.json; name the .gguf file to read")
    line = _refused_line(capsys, ["-q", "eval", str(tmp_path)])
    assert line.endswith(f"{tmp_path} is not a model folder: it has no config.json (nor one "
                         ".gguf file)")


def _no_model_load(monkeypatch) -> None:
    """Any load of a model's weights by a compression fails the test."""
    import prunenet.pipeline

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(prunenet.pipeline, "load_model_and_tokenizer", no_load)


def test_an_eval_that_cannot_be_measured_is_refused_before_the_load(
        tiny_llama_dir, tiny_llama_real_tokenizer_dir, tmp_path, monkeypatch, capsys):
    """--eval beyond the wiki sample's evaluation windows, or on a model without a tokenizer:
    refused in planning, before the model loads or a policy trains; no training state and no
    parent folder is left."""
    _no_model_load(monkeypatch)
    out = tmp_path / "np" / "sub" / "o"
    for source, windows, message in [
        (tiny_llama_real_tokenizer_dir, "100000", "--eval 100000: corpus 'wiki' holds 128 "
         "evaluation windows of 1024 tokens; give --eval 128 or fewer"),
        (tiny_llama_dir, "2", "--eval measures perplexity on text, and the model has no "
         "tokenizer; save one next to the model, or leave out --eval"),
    ]:
        line = _refused_line(capsys, ["-q", "compress", str(source), "--ratio", "0.25",
                                      "--out", str(out), "--method", "prunenet", "--episodes",
                                      "1", "--reconstruct", "none", "--eval", windows])
        assert line == f"prunenet: error: {message}"
    assert not (tmp_path / "np").exists()


@pytest.mark.parametrize("model_type", ["gpt2", "opt", "gpt_neox", "qwen2", "gemma"])
def test_a_folder_without_tokenizer_files_has_no_tokenizer(model_type, tmp_path, capsys):
    """transformers builds these families a tokenizer of a few special tokens from config.json
    alone; a folder holding no tokenizer file has none, so --eval is refused as for any model
    without a tokenizer, and an output gets no tokenizer files."""
    source = tmp_path / "model"
    make_tiny_model(model_type).save_pretrained(source)
    assert load_model_and_tokenizer(str(source))[1] is None
    line = _refused_line(capsys, ["-q", "compress", str(source), "--ratio", "0.25", "--out",
                                  str(tmp_path / "o"), "--method", "random", "--reconstruct",
                                  "none", "--eval", "2"])
    assert line.endswith("the model has no tokenizer; save one next to the model, or leave "
                         "out --eval")
    assert main(["-q", "compress", str(source), "--ratio", "0.25", "--out",
                 str(tmp_path / "o"), "--method", "random", "--reconstruct", "none"]) == 0
    assert not [path.name for path in (tmp_path / "o").iterdir()
                if path.name.startswith(("tokenizer", "vocab", "merges", "special_tokens"))]


def test_train_policy_refuses_settings_it_cannot_train_before_the_load(
        tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """A ratio that keeps no neuron of the width config.json declares, --gamma above 1 and
    --device cuda without a GPU are refused before the model loads, as compress refuses them;
    nothing is written."""
    import prunenet.io.loading

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(prunenet.io.loading, "load_model_and_tokenizer", no_load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "p.safetensors"
    for options, message in [
        (["--ratio", "0.99"], "ratio 0.99 keeps 0 of 48 FFN neurons; the largest usable ratio "
                              "keeps 1 (ratio < 0.979167)"),
        (["--gamma", "2"], "gamma must be in (0, 1], got 2.0"),
        (["--device", "cuda"], "--device cuda was asked for, but no CUDA GPU is available; "
                               "use cpu"),
    ]:
        ratio = [] if "--ratio" in options else ["--ratio", "0.3"]
        line = _refused_line(capsys, ["-q", "train-policy", str(tiny_llama_dir), *ratio,
                                      *options, "--out", str(out)])
        assert line == f"prunenet: error: {message}"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny-llama"]


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 300), dtype=st.sampled_from(
           [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn]),
       bad=st.lists(st.tuples(st.integers(0, 299), st.sampled_from(
           [float("nan"), float("inf"), float("-inf")])), max_size=3),
       seed=st.integers(0, 2**16))
def test_check_finite_refuses_exactly_the_tensors_a_mask_finds_non_finite(size, dtype, bad, seed):
    """check_finite reads a tensor's extremes rather than a mask as large as the tensor: it
    refuses a tensor exactly when torch.isfinite finds a NaN or an infinity in it."""
    from prunenet.model_view import check_finite

    values = torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for index, value in bad:
        if index < size:
            values[index] = value
    tensor = values.to(dtype)
    finite = bool(torch.isfinite(tensor.float()).all())
    if finite:
        check_finite("w", tensor)
    else:
        with pytest.raises(NumericalError, match="^w holds NaN or Inf"):
            check_finite("w", tensor)


def test_a_reader_that_stops_reading_does_not_stop_the_command(tiny_llama_real_tokenizer_dir,
                                                                tmp_path):
    """`prunenet compress ... | head -1`: the reader closes the pipe early. The lines prunenet
    prints only say what its outputs hold, so the command goes on and writes every output (the
    first printed line had failed with a broken pipe after --out was written, and the record
    and the recovery never came)."""
    corpus = tmp_path / "text.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    out, record = tmp_path / "o", tmp_path / "r"
    reader, writer = os.pipe()
    os.close(reader)  # gone before the first line
    try:
        done = subprocess.run(
            [sys.executable, "-m", "prunenet", "-q", "compress",
             str(tiny_llama_real_tokenizer_dir), "--ratio", "0.3", "--method", "random",
             "--out", str(out), "--record", str(record), "--finetune-steps", "1",
             "--finetune-seqlen", "16", "--finetune-data", str(corpus)],
            stdout=writer, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(Path(prunenet.__file__).parents[1])})
    finally:
        os.close(writer)
    assert done.returncode == 0, done.stderr
    assert "pipe" not in done.stderr.lower(), done.stderr
    written = sorted(path.name for path in tmp_path.iterdir())
    assert written == ["o", "o-finetuned", "r", "text.txt"], written
    assert (record / "record.json").is_file()
    assert json.loads((tmp_path / "o-finetuned" / "prunenet.json").read_text())["finetune"]
