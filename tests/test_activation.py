"""Baselines as selection methods: exactly k rows per layer, magnitude = top-k norms, and the
calibration-based `activation` score (hand computation, calibration never sees evaluation text)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import prunenet
from conftest import make_tiny_model
from prunenet.cli import main
from prunenet.errors import InputError
from prunenet.evaluation.corpora import TokenCorpus
from prunenet.families import kept_count
from prunenet.model_view import FFNView
from prunenet.pipeline import select_rows
from prunenet.selection import SELECTORS
from prunenet.selection.activation import (
    Calibration,
    activation_norms,
    activation_rows,
    calibration_windows,
)
from prunenet.selection.prunenet.reinforce import TrainingConfig, train_policy_on_matrices


class WordTokenizer:
    """Word ``w{i}`` -> id ``i``; no special tokens (so no BOS)."""

    bos_token_id = None

    def __call__(self, text, add_special_tokens=True, return_attention_mask=True):
        class Encoding:
            input_ids = [int(word[1:]) for word in text.split()]

        return Encoding()


@pytest.fixture
def word_corpus(tmp_path):
    """120 distinct token ids: the first 60 are the evaluation region, the rest training."""
    path = tmp_path / "words.txt"
    path.write_text(" ".join(f"w{i}" for i in range(120)))
    return str(path)


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_every_method_keeps_exactly_k_distinct_sorted_rows(ratio, word_corpus):
    model = make_tiny_model("llama")
    view = FFNView(model)
    kept = kept_count(view.d_ff, ratio)
    policy = train_policy_on_matrices(
        [view.first_matrix(i) for i in range(view.num_layers)],
        TrainingConfig(ratio=ratio, episodes=1), progress=False).policy
    for method in SELECTORS:
        read = ({"policy": policy, "device": "cpu"} if method == "prunenet" else
                {"calibration": Calibration(corpus=word_corpus, windows=2, seqlen=8)}
                if method == "activation" else {})  # select_rows refuses what is unused
        rows = select_rows(model, ratio, method=method, tokenizer=WordTokenizer(),
                           progress=False, **read)
        assert len(rows) == view.num_layers, method
        for layer_rows in rows:
            assert layer_rows.numel() == kept, method
            assert torch.equal(layer_rows, layer_rows.unique()), method  # sorted and distinct
            assert 0 <= int(layer_rows.min()) and int(layer_rows.max()) < view.d_ff, method


def test_magnitude_keeps_the_top_k_row_norms():
    model = make_tiny_model("mistral")
    rows = select_rows(model, 0.5, method="magnitude")
    for layer, layer_rows in zip(model.model.layers, rows, strict=True):
        norms = layer.mlp.gate_proj.weight.detach().norm(dim=1)
        kept_norms = norms[layer_rows]
        removed = torch.ones_like(norms, dtype=torch.bool)
        removed[layer_rows] = False
        assert float(kept_norms.min()) >= float(norms[removed].max())


def test_activation_score_is_row_norm_times_neuron_activation_norm(word_corpus):
    model = make_tiny_model("llama")
    calibration = Calibration(corpus=word_corpus, windows=3, seqlen=8)
    # Hand computation: run each layer's MLP pieces on its captured input.
    captured: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    handles = [layer.mlp.register_forward_pre_hook(
        lambda _m, inputs, i=i: captured[i].append(inputs[0].detach()))
        for i, layer in enumerate(model.model.layers)]
    windows = torch.tensor([[60 + 8 * w + t for t in range(8)] for w in range(3)])
    with torch.no_grad():
        for window in windows:
            model(window.unsqueeze(0))
    for handle in handles:
        handle.remove()
    kept = 20
    expected_rows = []
    for index, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured[index]])
        activation = mlp.act_fn(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
        score = mlp.gate_proj.weight.norm(dim=1) * activation.detach().norm(dim=0)
        expected_rows.append(score.argsort(descending=True)[:kept].sort().values)

    rows = activation_rows(model, WordTokenizer(), kept, calibration, progress=False)
    for actual, expected in zip(rows, expected_rows, strict=True):
        assert torch.equal(actual, expected)


def test_calibration_windows_never_overlap_evaluation_windows(word_corpus):
    corpus = TokenCorpus("ids", torch.arange(1000), None)
    evaluation = set(corpus.evaluation_windows(seqlen=10).flatten().tolist())
    calibration = calibration_windows(corpus, Calibration(windows=50, seqlen=10))
    assert calibration.shape == (50, 10)
    assert evaluation.isdisjoint(calibration.flatten().tolist())
    with pytest.raises(InputError, match="holds 50 calibration windows of 10 tokens; asked for 51"):
        calibration_windows(corpus, Calibration(windows=51, seqlen=10))

    # End to end: every token the model sees while calibrating is from the training region.
    model = make_tiny_model("llama")
    seen: list[torch.Tensor] = []
    model.get_input_embeddings().register_forward_pre_hook(  # every token the model reads
        lambda _m, args: seen.append(args[0].flatten()))
    activation_rows(model, WordTokenizer(), 10,
                    Calibration(corpus=word_corpus, windows=7, seqlen=8), progress=False)
    tokens = torch.cat(seen)
    assert tokens.numel() == 7 * 8 and int(tokens.min()) >= 60  # ids 0..59 are for evaluation


def test_activation_norms_hook_every_family_second_matrix(tiny_model_type):
    model = make_tiny_model(tiny_model_type)
    view = FFNView(model)
    norms = activation_norms(model, torch.randint(0, 128, (2, 6)), progress=False)
    assert [n.shape for n in norms] == [(view.d_ff,)] * view.num_layers
    assert all(bool((n > 0).any()) for n in norms)
    assert view.second_matrix_module(0) is not None


def test_activation_needs_a_tokenizer_and_records_its_calibration(word_corpus):
    with pytest.raises(InputError, match="needs the model's tokenizer"):
        select_rows(make_tiny_model("llama"), 0.5, method="activation")
    calibration = Calibration(corpus=word_corpus, windows=2, seqlen=8)
    result = prunenet.prune(make_tiny_model("llama"), None, 0.5, method="activation",
                            tokenizer=WordTokenizer(), calibration=calibration, progress=False)
    assert result.record["method"] == "activation"
    assert result.record["calibration"] == {"corpus": word_corpus, "windows": 2, "seqlen": 8}
    assert result.record["ffn_width_after"] == 24


def test_compress_command_offers_activation(tiny_llama_real_tokenizer_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The old mill stands by the river and the water runs fast. " * 600)
    out = tmp_path / "pruned"
    code = main(["compress", str(tiny_llama_real_tokenizer_dir), "--ratio", "0.25", "--method",
                 "activation", "--calibration-corpus", str(text), "--calibration-windows", "2",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert (out / "prunenet.json").exists()
    assert main(["compress", str(tiny_llama_real_tokenizer_dir), "--ratio", "0.25", "--method",
                 "activation", "--calibration-corpus", str(text), "--calibration-windows",
                 "100000", "--out", str(tmp_path / "too-many")]) == 2
    assert re.search("holds (\\d+) calibration windows of 1024 tokens; asked for 100000; give "
                     "--calibration-windows \\1 or fewer", capsys.readouterr().err)


def test_select_rows_and_compress_round_the_kept_count_alike():
    """round_to applies to select_rows as to compress: the multiple of 16 nearest 0.75 x 48."""
    model = make_tiny_model("llama")
    rows = select_rows(model, 0.25, method="magnitude", round_to=16)
    assert {len(layer) for layer in rows} == {32}
    result = prunenet.compress(make_tiny_model("llama"), ratio=0.25, method="magnitude",
                               round_to=16, progress=False)
    assert [torch.equal(a, b) for a, b in zip(rows, result.kept_rows, strict=True)] == [
        True] * len(rows)
    assert (result.record["ffn_width_after"], result.record["round_to"]) == (32, 16)


def test_calibration_windows_longer_than_the_context_are_cut_to_it(tmp_path):
    """The tiny LLaMA has 64 positions: windows of the default 1024 tokens are read as windows
    of 64 (the same rows as asking for 64), and the record names the 64 that ran."""
    word_corpus = str(tmp_path / "long.txt")  # 600 words: 300 of them training tokens
    Path(word_corpus).write_text(" ".join(f"w{(7 * i) % 128}" for i in range(600)))
    model = make_tiny_model("llama")
    seen: list[torch.Tensor] = []
    model.get_input_embeddings().register_forward_pre_hook(
        lambda _m, args: seen.append(args[0]))
    result = prunenet.prune(model, None, 0.5, method="activation", tokenizer=WordTokenizer(),
                            calibration=Calibration(corpus=word_corpus, windows=2),
                            reconstruct="none", progress=False)
    assert result.record["calibration"] == {"corpus": word_corpus, "windows": 2, "seqlen": 64}
    assert max(batch.shape[1] for batch in seen) == 64
    expected = activation_rows(make_tiny_model("llama"), WordTokenizer(), 24,
                               Calibration(corpus=word_corpus, windows=2, seqlen=64),
                               progress=False)
    assert [r.tolist() for r in result.kept_rows] == [r.tolist() for r in expected]


def test_bad_calibration_text_is_refused_before_the_model_loads(
        tiny_llama_dir, tiny_llama_real_tokenizer_dir, tmp_path, monkeypatch, capsys):
    """compress and prune --method activation read their calibration text with the model's
    tokenizer in planning: a missing, empty or binary file, a device, more windows than the
    corpus holds, or no tokenizer is refused in one line before the model loads (no probe is
    generated), with nothing written."""
    import prunenet.pipeline

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(prunenet.pipeline, "load_model_and_tokenizer", no_load)
    empty, binary = tmp_path / "empty.txt", tmp_path / "binary.txt"
    empty.write_text("")
    binary.write_bytes(bytes(range(128, 256)) * 8)
    model = str(tiny_llama_real_tokenizer_dir)
    cases = [
        (model, ["--calibration-corpus", str(tmp_path / "missing.txt")],
         f"unknown corpus '{tmp_path / 'missing.txt'}': not a named corpus (wiki) and no such "
         "file or folder"),
        (model, ["--calibration-corpus", str(empty)],
         f"corpus '{empty}' has 0 training tokens, fewer than one window of 1024"),
        (model, ["--calibration-corpus", str(binary)], f"{binary} is not UTF-8 text"),
        (model, ["--calibration-corpus", "/dev/zero"], "/dev/zero is not a regular file"),
        (model, ["--calibration-windows", "100000"],
         "corpus 'wiki' holds 319 calibration windows of 1024 tokens; asked for 100000; give "
         "--calibration-windows 319 or fewer, or a longer --calibration-corpus"),
        (str(tiny_llama_dir), [], "method 'activation' needs the model's tokenizer to read "
         "calibration text"),
    ]
    out = tmp_path / "o"
    for command in ("compress", "prune"):
        for source, options, message in cases:
            capsys.readouterr()
            assert main(["-q", command, source, "--ratio", "0.25", "--method", "activation",
                         *options, "--out", str(out)]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"prunenet: error: {message}"), err
    assert not out.exists()


def test_a_calibration_file_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    """A calibration corpus given by a relative path is recorded, and named in the card's
    command, by its absolute path, as the source and a fine-tune's corpus are: the command
    repeats the run from any folder (the relative name had read another file, or none, from
    anywhere but the folder the run started in). A named corpus stays as named."""
    from prunenet.io.model_card import render_card

    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "words.txt").write_text(" ".join(f"w{i}" for i in range(120)))
    monkeypatch.chdir(folder)
    result = prunenet.prune(make_tiny_model("llama"), None, 0.5, method="activation",
                            tokenizer=WordTokenizer(), reconstruct="none", progress=False,
                            calibration=Calibration(corpus="words.txt", windows=2, seqlen=8))
    absolute = str((folder / "words.txt").resolve())
    assert result.record["calibration"] == {"corpus": absolute, "windows": 2, "seqlen": 8}
    command = render_card(result.record).split("```bash\n")[1].split("\n```")[0]
    assert f"--calibration-corpus {absolute} --calibration-windows 2" in command
    named = Calibration(corpus="wiki", windows=2, seqlen=8)
    assert prunenet.selection.activation.Activation(named).record()["calibration"][
        "corpus"] == "wiki"
