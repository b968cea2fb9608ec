"""The probe and refit stages through compress and the command line."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
import transformers

import prunenet
from conftest import make_tiny_model
from prunenet import probe as probe_module
from prunenet.cli import main
from prunenet.errors import InputError, OutputError
from prunenet.model_view import FFNView
from prunenet.refit import DEFAULT_RIDGE


def _hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.suffix == ".safetensors"}


def test_reconstruction_is_reproducible_keeps_size_and_reloads_exactly(tmp_path):
    source = tmp_path / "m"
    make_tiny_model("llama").save_pretrained(source)
    outs = {}
    for name, extra in (("a", []), ("b", []), ("plain", ["--reconstruct", "none"]),
                        ("hot", ["--probe-temperature", "0.7"])):
        outs[name] = tmp_path / name
        assert main(["-q", "compress", str(source), "--ratio", "0.3", "--out", str(outs[name]),
                     "--probe-tokens", "256", *extra]) == 0
    assert _hashes(outs["a"]) == _hashes(outs["b"])  # same inputs and seed: same bytes
    assert _hashes(outs["a"]) != _hashes(outs["plain"])  # the refit changed the down matrix
    assert _hashes(outs["a"]) != _hashes(outs["hot"])  # another probe temperature, another probe
    records = {k: json.loads((v / "prunenet.json").read_text()) for k, v in outs.items()}
    assert records["a"]["parameters_after"] == records["plain"]["parameters_after"]
    assert records["a"]["reconstruct"]["mode"] == "ls"
    assert records["a"]["reconstruct"]["ridge"] == DEFAULT_RIDGE == 0.3
    assert records["plain"]["reconstruct"] == {"mode": "none"}
    # 256 tokens asked for; the tiny model has 64 positions: 4 sequences of 64 were made.
    assert records["a"]["probe"] == {"tokens": 256, "seed": 42, "sequence_length": 64,
                                     "shape": [4, 64],
                                     "temperature": probe_module.ProbeRecipe.temperature,
                                     "sampler": "inverse-cdf", "batch_size": 32}
    assert records["hot"]["probe"]["temperature"] == 0.7
    layers = records["a"]["reconstruct"]["layers"]
    assert all(layer["relative_error_refit"] <= layer["relative_error_sliced"] + 1e-12
               for layer in layers)
    # Only the second matrix changed: the same kept neurons, gate and up rows identical.
    a = transformers.AutoModelForCausalLM.from_pretrained(outs["a"]).eval()
    plain = transformers.AutoModelForCausalLM.from_pretrained(outs["plain"]).eval()
    for la, lp in zip(a.model.layers, plain.model.layers):
        assert torch.equal(la.mlp.gate_proj.weight, lp.mlp.gate_proj.weight)
        assert not torch.equal(la.mlp.down_proj.weight, lp.mlp.down_proj.weight)


def test_the_saved_model_is_the_model_in_memory(tmp_path):
    model = make_tiny_model("gpt2")
    result = prunenet.compress(model, 0.25, out=tmp_path / "out", probe_tokens=128,
                               progress=False)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits, atol=0,
                                   rtol=0)


@pytest.fixture
def generations(monkeypatch) -> list[int]:
    """One entry per probe generation from here on (no probe kept in memory from other tests)."""
    calls: list[int] = []
    original = probe_module.generate_probe

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(probe_module, "generate_probe", counting)
    monkeypatch.setattr(probe_module.Probe, "_memory", {})
    return calls


def test_one_probe_per_run_and_a_cache_serves_the_next(tmp_path, monkeypatch, generations):
    model = make_tiny_model("llama")
    cache = tmp_path / "probes"
    first = prunenet.compress(model, 0.3, probe_tokens=128, probe_cache=cache, progress=False)
    assert len(generations) == 1  # the selection and the refit share one probe
    assert [p.name.startswith("probe-") for p in cache.iterdir()] == [True]
    monkeypatch.setattr(probe_module.Probe, "_memory", {})  # a new process: only the disk
    second = prunenet.compress(make_tiny_model("llama"), 0.3, probe_tokens=128,
                               probe_cache=cache, progress=False)
    assert len(generations) == 1
    assert [r.tolist() for r in first.kept_rows] == [r.tolist() for r in second.kept_rows]
    other_seed = prunenet.compress(make_tiny_model("llama"), 0.3, probe_tokens=128, seed=7,
                                   probe_cache=cache, progress=False)
    assert len(generations) == 2 and other_seed.record["probe"]["seed"] == 7


def test_a_model_moved_to_another_folder_is_served_from_the_cache(tmp_path, monkeypatch,
                                                                   generations):
    """The folder a model is read from is no part of its probe: the same checkpoint copied
    elsewhere (or a GGUF converted into a new scratch folder each run) reads the cached probe,
    and the outputs are the same bytes."""
    import shutil

    first, moved = tmp_path / "m", tmp_path / "elsewhere" / "m"
    make_tiny_model("llama").save_pretrained(first)
    shutil.copytree(first, moved)
    cache = tmp_path / "probes"
    for number, source in enumerate((first, moved)):
        monkeypatch.setattr(probe_module.Probe, "_memory", {})  # a new process: only the disk
        assert main(["-q", "compress", str(source), "--ratio", "0.3", "--probe-tokens", "128",
                     "--probe-cache", str(cache), "--out", str(tmp_path / f"out{number}")]) == 0
    assert len(generations) == 1 and len(list(cache.iterdir())) == 1
    assert _hashes(tmp_path / "out0") == _hashes(tmp_path / "out1")


@pytest.mark.parametrize("seed", [1.5, 7.0, "7", True, -1, 2**63, 2**64])
def test_a_seed_the_command_line_would_not_read_is_refused_from_python(tmp_path, seed):
    """The probe is drawn from ``int(seed)`` (a negative seed as its two's complement), so a
    fraction, a string, a bool or a negative seed ran as another seed than the record and the
    card's command named (``--seed -1`` the command line refuses); 2**64 ended in a
    ValueError. Refused as ``--seed`` is, before any work; a numpy integer runs as its
    value."""
    import numpy

    for run in (lambda: prunenet.compress(make_tiny_model("llama"), 0.3, seed=seed,
                                          probe_tokens=64, out=tmp_path / "out",
                                          progress=False),
                lambda: prunenet.select_rows(make_tiny_model("llama"), 0.3, seed=seed,
                                             probe_tokens=64, progress=False),
                lambda: prunenet.train_policy(make_tiny_model("llama"), 0.3, seed=seed,
                                              episodes=1, progress=False)):
        with pytest.raises(InputError, match=r"^seed must be an integer in \[0, 2\*\*63\)"):
            run()
    assert not (tmp_path / "out").exists()
    result = prunenet.compress(make_tiny_model("llama"), 0.3, seed=numpy.int64(7),
                               probe_tokens=64, out=tmp_path / "out", progress=False)
    assert json.loads((tmp_path / "out" / "prunenet.json").read_text())["seed"] == 7
    assert result.record["probe"]["seed"] == 7


def test_bias_refit_for_families_with_a_bias_and_refused_without(tmp_path, capsys):
    opt = prunenet.compress(make_tiny_model("opt"), 0.25, reconstruct="bias", probe_tokens=128,
                            progress=False)
    assert opt.record["reconstruct"]["mode"] == "bias"
    assert "ridge" not in opt.record["reconstruct"]  # the bias refit has none to record
    with pytest.raises(InputError, match="^ridge has no effect here: .* refits with bias; "
                                         "drop it$"):
        prunenet.compress(make_tiny_model("opt"), 0.25, reconstruct="bias", probe_tokens=128,
                          ridge=5.0, progress=False)
    source = tmp_path / "m"
    make_tiny_model("llama").save_pretrained(source)
    assert main(["-q", "compress", str(source), "--ratio", "0.3", "--out", str(tmp_path / "o"),
                 "--reconstruct", "bias", "--probe-tokens", "64"]) == 2
    assert "bias" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize(("model_type", "fields", "has_bias"), [
    ("llama", {"mlp_bias": True}, True), ("granite", {"mlp_bias": True}, True),
    ("opt", {"enable_bias": False}, False), ("falcon", {"bias": False}, False),
    ("falcon", {"bias": True}, True),
])
def test_bias_refit_follows_the_config_switch_of_the_second_matrix_bias(tmp_path, model_type,
                                                                        fields, has_bias):
    """``bias`` runs exactly where the config gives the second FFN matrix a bias (judged from
    the saved config, as the command line does), and the refitted checkpoint reloads to the
    model in memory, bit for bit."""
    source = tmp_path / "m"
    dense = make_tiny_model(model_type, **fields)
    dense.save_pretrained(source)
    if not has_bias:
        with pytest.raises(InputError, match="this model's has none; use --reconstruct ls"):
            prunenet.compress(str(source), 0.25, out=tmp_path / "o", method="random",
                              reconstruct="bias", probe_tokens=64, progress=False)
        assert not (tmp_path / "o").exists()
        return
    result = prunenet.compress(str(source), 0.25, out=tmp_path / "o", method="random",
                               reconstruct="bias", probe_tokens=64, progress=False)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits, atol=0,
                                   rtol=0)
    view = FFNView(dense)
    bias = view.second_module_name + ".bias"
    refitted = FFNView(result.model).layers[0].get_parameter(bias)
    assert not torch.equal(refitted, view.layers[0].get_parameter(bias))  # the removed's mean


def test_reconstruct_bad_values_and_streaming(tmp_path, capsys):
    source = tmp_path / "m"
    make_tiny_model("llama").save_pretrained(source)
    with pytest.raises(SystemExit):
        main(["compress", str(source), "--ratio", "0.3", "--out", str(tmp_path / "o"),
              "--probe-tokens", "0"])
    with pytest.raises(SystemExit):
        main(["compress", str(source), "--ratio", "0.3", "--out", str(tmp_path / "o"),
              "--reconstruct", "magic"])
    for option in ("--probe-temperature", "--ridge"):
        for value in ("0", "-1", "nan", "inf", "1e400", "hot"):
            with pytest.raises(SystemExit):
                main(["compress", str(source), "--ratio", "0.3", "--out", str(tmp_path / "o"),
                      option, value])
            assert option in capsys.readouterr().err
    for keyword in ("probe_temperature", "ridge"):  # the API checks them too, before any work
        with pytest.raises(InputError, match="must be a positive finite number"):
            prunenet.compress(str(source), 0.3, out=tmp_path / "o", **{keyword: float("inf")})
    for value in ("1e-5", "9.9e-05"):  # sampled as 1e-4, so recorded as asked it would lie
        assert main(["-q", "compress", str(source), "--ratio", "0.3", "--out",
                     str(tmp_path / "o"), "--probe-temperature", value]) == 2
        assert "--probe-temperature must be at least 0.0001" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    from prunenet.io.streaming import StreamedCheckpoint

    budget = StreamedCheckpoint(source).streaming_memory(training=False)  # streams, fits
    assert main(["-q", "compress", str(source), "--ratio", "0.3", "--out", str(tmp_path / "o"),
                 "--max-memory", str(budget), "--method", "random", "--reconstruct", "ls"]) == 2
    error = capsys.readouterr().err  # the refit runs the model, which needs more than that
    assert "method 'random' with --reconstruct ls runs" in error and "needs at least" in error
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "falcon"])
def test_the_default_selection_reads_the_refit_statistics_and_keeps_the_same_rows(family):
    """With the refit on, the self-generated score comes from the refit's one pass over the
    probe (the Gram's diagonal) instead of a pass of its own; the rows are the same."""
    from prunenet.ffn_statistics import collect_ffn_statistics
    from prunenet.model_view import FFNView
    from prunenet.probe import Probe
    from prunenet.selection.base import Source
    from prunenet.selection.self_generated import SelfGenerated

    model = make_tiny_model(family)
    probe = Probe(model, None, 192, seed=3, progress=False)
    view = FFNView(model)
    alone = SelfGenerated().select(Source(view, model, probe=probe), 40, seed=0)
    stats = collect_ffn_statistics(model, probe.ids())
    shared = SelfGenerated().select(Source(view, model, probe=probe,
                                           probe_statistics=lambda: stats), 40, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(alone, shared, strict=True))


def test_the_default_selection_keeps_the_same_rows_with_the_refit_on_or_off_at_near_ties():
    """Two neurons whose scores differ by a few float32 roundings: the selection's own pass
    (``--reconstruct none``, select_rows) and the refit's statistics rank them alike, because
    both read the same mean squares, bit for bit (float32 sums had kept the other neuron)."""
    from prunenet.ffn_statistics import collect_ffn_statistics, wanda_scores
    from prunenet.model_view import FFNView
    from prunenet.probe import Probe
    from prunenet.selection.base import Source
    from prunenet.selection.self_generated import SelfGenerated, mean_squared_activations

    model = make_tiny_model("llama")
    probe = Probe(model, None, 2048, seed=3, progress=False)
    probe.ids()  # the text of the model as made: the probe stays while the weights change
    view, up = FFNView(model), model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        up[:2] *= 2.0 ** -12  # neurons 0 and 1 of layer 0: the two of lowest score
    scores = wanda_scores(model, collect_ffn_statistics(model, probe.ids()))[0].double()
    assert set(scores.argsort()[:2].tolist()) == {0, 1}
    level = float((scores[0] / scores[1]).sqrt())  # neuron 1 scaled to neuron 0's score
    original, differing, means = up[1].clone(), [], []
    for step in range(-8, 9):  # neuron 1 a few float32 roundings above or below neuron 0
        with torch.no_grad():
            up[1] = original * (level * (1 + step * 2.0 ** -24))
        stats = collect_ffn_statistics(model, probe.ids())
        alone = SelfGenerated().select(Source(view, model, probe=probe), 47, seed=0)
        shared = SelfGenerated().select(Source(view, model, probe=probe,
                                               probe_statistics=lambda s=stats: s), 47, seed=0)
        if not all(torch.equal(a, b) for a, b in zip(alone, shared, strict=True)):
            differing.append(step)
        means.append(all(torch.equal(mean, layer.mean_square) for mean, layer in zip(
            mean_squared_activations(model, probe.ids()), stats, strict=True)))
    assert differing == []
    assert all(means)


def test_a_model_in_training_mode_is_compressed_as_in_eval_mode_and_left_in_its_mode(
        monkeypatch):
    """GPT-2 drops 10% of its activations in training mode: the probe, the statistics and the
    selection run without dropout, so the rows and the refitted weights are those of the same
    model in eval mode (they had changed from run to run); the model's mode is given back."""
    monkeypatch.setattr(probe_module.Probe, "_memory", {})
    dense = make_tiny_model("gpt2")
    assert dense.config.resid_pdrop > 0
    wanted = prunenet.compress(copy.deepcopy(dense), 0.3, probe_tokens=128, progress=False)
    for _ in range(2):
        probe_module.Probe._memory.clear()  # each run samples its probe afresh
        model = copy.deepcopy(dense).train()
        result = prunenet.compress(model, 0.3, probe_tokens=128, progress=False)
        assert all(module.training for module in model.modules())
        assert [torch.equal(a, b) for a, b in zip(result.kept_rows, wanted.kept_rows,
                                                  strict=True)] == [True, True]
        for name, tensor in wanted.model.state_dict().items():
            assert torch.equal(result.model.state_dict()[name], tensor), name
        probe_module.Probe._memory.clear()
        rows = prunenet.select_rows(copy.deepcopy(dense).train(), 0.3, probe_tokens=128,
                                    progress=False)
        assert [torch.equal(a, b) for a, b in zip(rows, wanted.kept_rows, strict=True)] == [
            True, True]


def test_a_default_compress_runs_the_model_once_over_the_probe(tmp_path):
    model = make_tiny_model("llama")
    length = model.config.max_position_embeddings
    full_passes = []
    model.get_input_embeddings().register_forward_pre_hook(
        lambda _m, args: full_passes.append(args[0].shape) if args[0].shape[-1] == length
        else None)
    prunenet.compress(model, 0.3, probe_tokens=4 * length, progress=False)
    assert full_passes == [torch.Size([4, length])]  # one batch: selection and refit share it
    full_passes.clear()
    prunenet.compress(model, 0.3, probe_tokens=4 * length, reconstruct="none", progress=False)
    # the selection's own pass, in the refit's batches (the same activations, bit for bit)
    assert full_passes == [torch.Size([4, length])]


def test_select_rows_checks_and_shares_the_probe_cache_as_compress_does(tmp_path, monkeypatch,
                                                                        generations):
    model = make_tiny_model("llama")
    user_folder = tmp_path / "notes"
    user_folder.mkdir()
    (user_folder / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="--probe-cache"):
        prunenet.select_rows(model, 0.3, probe_tokens=128, probe_cache=user_folder,
                             progress=False)
    assert [p.name for p in user_folder.iterdir()] == ["notes.txt"] and generations == []
    cache = tmp_path / "probes"
    rows = prunenet.select_rows(model, 0.3, probe_tokens=128, probe_cache=cache, progress=False)
    assert len(generations) == 1
    assert [p.name.startswith("probe-") for p in cache.iterdir()] == [True]
    monkeypatch.setattr(probe_module.Probe, "_memory", {})  # a new process: only the disk
    compressed = prunenet.compress(make_tiny_model("llama"), 0.3, probe_tokens=128,
                                   probe_cache=cache, reconstruct="none", progress=False)
    assert len(generations) == 1
    assert [r.tolist() for r in compressed.kept_rows] == [r.tolist() for r in rows]


def test_a_probe_being_written_or_cut_short_by_a_kill_leaves_the_cache_usable(
        tmp_path, monkeypatch, generations):
    """Another run writing a probe into the cache leaves its hidden staging file and lock
    there while it writes, and a run killed while it wrote leaves its staging file for good:
    both are prunenet's own, so the cache is still read and written, not refused as a user's
    folder."""
    from prunenet.io.files import STAGING_TAG, sibling_prefix

    cache = tmp_path / "probes"
    rows = prunenet.select_rows(make_tiny_model("llama"), 0.3, probe_tokens=128,
                                probe_cache=cache, progress=False)
    path, = cache.iterdir()
    other = path.with_name("probe-" + "0" * 32 + ".safetensors")  # another key, mid-write
    (cache / (sibling_prefix(other, STAGING_TAG) + "x1y2z3")).write_bytes(b"partial")
    (cache / (sibling_prefix(other, "lock") + "0")).write_bytes(b"")
    monkeypatch.setattr(probe_module.Probe, "_memory", {})  # a new process: only the disk
    again = prunenet.select_rows(make_tiny_model("llama"), 0.3, probe_tokens=128,
                                 probe_cache=cache, progress=False)
    assert len(generations) == 1
    assert [r.tolist() for r in again] == [r.tolist() for r in rows]
    prunenet.select_rows(make_tiny_model("llama"), 0.3, probe_tokens=128, seed=7,
                         probe_cache=cache, progress=False)
    assert len(generations) == 2 and len(list(cache.glob("probe-*.safetensors"))) == 2


def test_probe_prompt_through_the_command_line(tiny_llama_real_tokenizer_dir, tmp_path, capsys):
    """--probe-prompt starts every probe sequence with its words after BOS: another probe, so
    other rows or refit, named in the record; a prompt longer than the sequences is refused
    before any output."""
    source = tiny_llama_real_tokenizer_dir
    outs = {name: tmp_path / name for name in ("plain", "prompted", "long")}
    common = ["--ratio", "0.3", "--probe-tokens", "128", "--probe-length", "32"]
    assert main(["-q", "compress", str(source), "--out", str(outs["plain"]), *common]) == 0
    assert main(["-q", "compress", str(source), "--out", str(outs["prompted"]), *common,
                 "--probe-prompt", "The history of"]) == 0
    records = {k: json.loads((outs[k] / "prunenet.json").read_text())
               for k in ("plain", "prompted")}
    assert records["prompted"]["probe"]["prompt"] == "The history of"
    assert "prompt" not in records["plain"]["probe"]
    assert _hashes(outs["plain"]) != _hashes(outs["prompted"])
    assert main(["-q", "compress", str(source), "--out", str(outs["long"]), *common,
                 "--probe-prompt", "word " * 40]) == 2
    assert "the probe prompt takes" in capsys.readouterr().err
    assert not outs["long"].exists()


@pytest.mark.parametrize("damage, why", [
    (lambda ids: {"ids": ids[:0]}, "its ids have shape [0, 64], not [2, 64]"),
    (lambda ids: {"ids": ids[:, :32].contiguous()}, "its ids have shape [2, 32], not [2, 64]"),
    (lambda ids: {"ids": ids.flatten()}, "its ids have shape [128], not [2, 64]"),
    (lambda ids: {"ids": ids.float()}, "its ids are float32, not int64"),
    (lambda ids: {"ids": ids + 1000}, "its ids leave the model's vocabulary of 128"),
    (lambda ids: {"ids": ids - 1000}, "its ids leave the model's vocabulary of 128"),
    (lambda ids: {"tokens": ids}, "it holds no tensor 'ids'"),
    (None, "Error while deserializing header"),
])
def test_a_damaged_cached_probe_is_refused_naming_the_file(tmp_path, monkeypatch, generations,
                                                           damage, why):
    """A cache file edited or damaged after it was written would select and refit on other
    text than the probe's (or on none): refused, naming the file, and no output is written."""
    from safetensors.torch import load_file, save_file

    cache = tmp_path / "probes"
    prunenet.select_rows(make_tiny_model("llama"), 0.3, probe_tokens=128, probe_cache=cache,
                         progress=False)
    path, = cache.iterdir()
    if damage is None:
        path.write_bytes(b"\xff" * 64)
    else:
        save_file(damage(load_file(str(path))["ids"]), str(path))
    monkeypatch.setattr(probe_module.Probe, "_memory", {})  # a new process: only the disk
    with pytest.raises(InputError, match="the cached probe .* is damaged") as error:
        prunenet.compress(make_tiny_model("llama"), 0.3, probe_tokens=128, probe_cache=cache,
                          out=tmp_path / "out", progress=False)
    assert str(path) in str(error.value) and why in str(error.value), error.value
    assert len(generations) == 1 and not (tmp_path / "out").exists()


def test_a_cached_probe_copied_from_another_key_or_edited_is_refused(tmp_path, monkeypatch,
                                                                     generations):
    """A cache file is read only under the key it was written under and with the ids it was
    written with: another seed's probe copied to this key's name, or ids edited within the
    vocabulary, would select and refit on other text than this probe's. Refused, naming the
    file, and nothing is written."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    cache = tmp_path / "probes"
    files = {}
    for seed in (42, 7):
        prunenet.select_rows(make_tiny_model("llama"), 0.3, probe_tokens=128, seed=seed,
                             probe_cache=cache, progress=False)
        key = probe_module.Probe(make_tiny_model("llama"), None, 128, seed).key()
        files[seed] = cache / f"probe-{key}.safetensors"
    assert all(path.is_file() for path in files.values()) and len(generations) == 2
    files[7].write_bytes(files[42].read_bytes())  # seed 42's probe under seed 7's name
    monkeypatch.setattr(probe_module.Probe, "_memory", {})  # a new process: only the disk
    with pytest.raises(InputError, match="is damaged .*a probe file copied or renamed") as error:
        prunenet.compress(make_tiny_model("llama"), 0.3, probe_tokens=128, seed=7,
                          probe_cache=cache, out=tmp_path / "out", progress=False)
    assert str(files[7]) in str(error.value)
    assert not (tmp_path / "out").exists() and len(generations) == 2
    with safe_open(str(files[42]), framework="pt") as opened:
        metadata = opened.metadata()
    ids = load_file(str(files[42]))["ids"]
    ids[0, 5] = (ids[0, 5] + 1) % 128  # still a token of the vocabulary
    save_file({"ids": ids}, str(files[42]), metadata=metadata)
    with pytest.raises(InputError, match="is damaged .*not those it was written with") as error:
        prunenet.compress(make_tiny_model("llama"), 0.3, probe_tokens=128, probe_cache=cache,
                          out=tmp_path / "out", progress=False)
    assert str(files[42]) in str(error.value)
    assert not (tmp_path / "out").exists() and len(generations) == 2


def test_a_cached_probe_that_does_not_say_what_it_holds_is_generated_again(
        tmp_path, monkeypatch, generations):
    """A cache file without the key and checksum prunenet writes with it (an earlier
    prunenet's) cannot be vouched for: the probe is generated again and the file replaced by
    one that says what it holds, which later runs read."""
    from safetensors.torch import load_file, save_file

    cache = tmp_path / "probes"
    rows = prunenet.select_rows(make_tiny_model("llama"), 0.3, probe_tokens=128,
                                probe_cache=cache, progress=False)
    path, = cache.iterdir()
    ids = load_file(str(path))["ids"]
    save_file({"ids": ids.flip(0).contiguous()}, str(path))  # as earlier versions wrote it
    for generated in (2, 2):  # generated again once, then read back
        monkeypatch.setattr(probe_module.Probe, "_memory", {})  # a new process: only the disk
        again = prunenet.select_rows(make_tiny_model("llama"), 0.3, probe_tokens=128,
                                     probe_cache=cache, progress=False)
        assert len(generations) == generated
        assert [r.tolist() for r in again] == [r.tolist() for r in rows]
        assert torch.equal(load_file(str(path))["ids"], ids)


def test_the_probe_cache_is_not_put_into_another_prunenet_output(tmp_path, generations):
    """A model or report folder prunenet wrote is not a probe cache: a probe file in it would
    make it a folder prunenet no longer recognizes (and refuses to replace)."""
    model_out = tmp_path / "pruned"
    prunenet.compress(make_tiny_model("llama"), 0.5, method="random", reconstruct="none",
                      out=model_out, progress=False)
    before = sorted(path.name for path in model_out.iterdir())
    with pytest.raises(OutputError, match="--probe-cache .* was not written by prunenet"):
        prunenet.compress(make_tiny_model("llama"), 0.3, probe_tokens=128,
                          probe_cache=model_out, progress=False)
    assert sorted(path.name for path in model_out.iterdir()) == before and generations == []


def test_a_probe_length_beyond_the_context_is_planned_as_the_length_that_runs(tmp_path):
    """--probe-length is cut to the model's positions (64 here): the run's memory is planned
    for the sequences generated, so a longer ask runs as the cut one does, in memory and to
    the same bytes (it was sized as sequences of 10^9 tokens and refused as needing TiBs)."""
    source = tmp_path / "m"
    make_tiny_model("llama").save_pretrained(source)
    common = ["-q", "compress", str(source), "--ratio", "0.3", "--probe-tokens", "128"]
    for length in ("64", "1000000000"):
        assert main([*common, "--probe-length", length, "--out", str(tmp_path / length)]) == 0
    assert _hashes(tmp_path / "64") == _hashes(tmp_path / "1000000000")
    records = [json.loads((tmp_path / length / "prunenet.json").read_text())["probe"]
               for length in ("64", "1000000000")]
    assert records[0] == records[1] and records[0]["sequence_length"] == 64
