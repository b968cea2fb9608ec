"""The refit stage: exact where the kept activations span the removed ones, never worse than
slicing on the probe, and a stock checkpoint of the same size."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FFN, VOCAB, make_tiny_model
from prunenet.errors import InputError, NumericalError
from prunenet.ffn_statistics import (
    SCORES,
    LayerStatistics,
    add_activations,
    collect_ffn_statistics,
)
from prunenet.model_view import FFNView
from prunenet.refit import reconstruction_error, refit_layer, refit_model, sequential_refit
from prunenet.slicing import slice_model

KEPT = torch.arange(0, FFN, 2)  # even neurons kept, odd ones removed


def _stats(activations: torch.Tensor) -> LayerStatistics:
    stats = LayerStatistics(torch.zeros(activations.shape[1], activations.shape[1],
                                        dtype=torch.float64),
                            torch.zeros(activations.shape[1], dtype=torch.float64), 0)
    add_activations(stats, activations)
    return stats


def _probe(sequences: int = 6, length: int = 24, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (sequences, length), generator=generator)


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


@torch.no_grad()
def _duplicate_removed_neurons(model: torch.nn.Module) -> None:
    """Make every removed (odd) neuron a copy of the kept neuron before it (its activation, for
    every input, equals a kept one's), through the family's first-matrix cuts."""
    view = FFNView(model)
    for layer in view.layers:
        for cut in view.family.cuts[:-1]:
            try:
                tensor = layer.get_parameter(cut.name)
            except AttributeError:
                continue
            if tensor is None:
                continue
            moved = tensor.movedim(cut.axis, 0)
            moved[1::2] = moved[0::2]


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("sequential", [False, True])
def test_ls_is_exact_when_removed_activations_are_combinations_of_kept(model_type, sequential):
    # Removed neuron 2j+1 duplicates kept neuron 2j: the refit can fold it into column 2j, so
    # the sliced model computes the original function (up to the ridge, 1e-9 of the Gram scale).
    model = make_tiny_model(model_type)
    _duplicate_removed_neurons(model)
    tokens, held_out = _probe(), _probe(seed=2)
    reference, held_out_reference = _logits(model, tokens), _logits(model, held_out)
    kept = [KEPT] * FFNView(model).num_layers
    plain = slice_model(copy.deepcopy(model), kept)
    if sequential:
        sequential_refit(model, kept, tokens, ridge=1e-9)
    else:
        refit_model(model, kept, collect_ffn_statistics(model, tokens), ridge=1e-9)
    slice_model(model, kept)
    assert (_logits(model, tokens) - reference).abs().max() < 1e-5
    assert (_logits(model, held_out) - held_out_reference).abs().max() < 1e-5
    assert (_logits(plain, tokens) - reference).abs().max() > 1e-3  # slicing alone is not exact


def test_ls_is_exact_for_linear_dependence_with_an_offset():
    generator = torch.Generator().manual_seed(0)
    kept_part = torch.randn(200, 6, generator=generator, dtype=torch.float64)
    mixing = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    offset = torch.randn(4, generator=generator, dtype=torch.float64)
    activations = torch.cat([kept_part, kept_part @ mixing + offset], dim=1)
    second = torch.randn(5, 10, generator=generator, dtype=torch.float64)
    bias = torch.randn(5, generator=generator, dtype=torch.float64)
    kept = torch.arange(6)
    stats = _stats(activations)
    columns, new_bias = refit_layer(second, bias, kept, stats, "ls", ridge=1e-12)
    original = activations @ second.T + bias
    refitted = kept_part @ columns.T + new_bias
    assert torch.allclose(refitted, original, atol=1e-8)


def test_bias_mode_is_exact_for_constant_removed_activations():
    # OPT's ReLU FFN: a removed neuron with a zero fc1 row outputs relu(its bias), a constant.
    model = make_tiny_model("opt")
    view = FFNView(model)
    with torch.no_grad():
        for layer in view.layers:
            layer.fc1.weight[1::2] = 0
            layer.fc1.bias[1::2] = layer.fc1.bias[1::2].abs() + 0.1
    tokens, held_out = _probe(), _probe(seed=3)
    reference, held_out_reference = _logits(model, tokens), _logits(model, held_out)
    kept = [KEPT] * view.num_layers
    record = refit_model(model, kept, collect_ffn_statistics(model, tokens), mode="bias")
    slice_model(model, kept)
    assert record["mode"] == "bias"
    assert (_logits(model, tokens) - reference).abs().max() < 1e-5
    assert (_logits(model, held_out) - held_out_reference).abs().max() < 1e-5


def test_bias_mode_needs_a_bias():
    model = make_tiny_model("llama")
    stats = collect_ffn_statistics(model, _probe())
    with pytest.raises(InputError, match="use refit 'ls'"):
        refit_model(model, [KEPT] * 2, stats, mode="bias")


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), tokens=st.integers(1, 40), kept=st.integers(1, 11),
       ridge=st.sampled_from([0.0, 1e-6, 1e-2, 1.0, 100.0]), with_bias=st.booleans(),
       dead=st.integers(0, 3))
def test_refit_never_increases_the_probe_reconstruction_error(seed, tokens, kept, ridge,
                                                              with_bias, dead):
    generator = torch.Generator().manual_seed(seed)
    activations = torch.randn(tokens, 12, generator=generator, dtype=torch.float64)
    activations[:, :dead] = 0  # dead neurons: a singular Gram, handled by the ridge
    second = torch.randn(4, 12, generator=generator, dtype=torch.float64)
    bias = torch.randn(4, generator=generator, dtype=torch.float64) if with_bias else None
    kept_rows = torch.randperm(12, generator=generator)[:kept].sort().values
    stats = _stats(activations)
    try:
        columns, new_bias = refit_layer(second, bias, kept_rows, stats, "ls", ridge)
    except NumericalError:
        assert ridge == 0.0  # only an unregularised singular system may refuse
        return
    before = reconstruction_error(second, bias, kept_rows, second[:, kept_rows], bias, stats)
    after = reconstruction_error(second, bias, kept_rows, columns, new_bias, stats)
    assert after <= before * (1 + 1e-9) + 1e-9
    direct = activations @ second.T - activations[:, kept_rows] @ columns.T
    if bias is not None:
        direct += bias - new_bias
    assert after == pytest.approx(float(direct.pow(2).sum()), rel=1e-6, abs=1e-9)


def test_non_finite_statistics_raise_naming_the_layer():
    model = make_tiny_model("llama")
    stats = collect_ffn_statistics(model, _probe())
    stats[1].gram[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="layer 1"):
        refit_model(model, [KEPT] * 2, stats)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3", "falcon"])
def test_refit_keeps_the_architecture_and_reloads_exactly(model_type, tmp_path):
    model = make_tiny_model(model_type)
    tokens = _probe()
    stats = collect_ffn_statistics(model, tokens)
    kept = [rows for rows in
            (torch.topk(score, FFN // 2).indices.sort().values
             for score in SCORES["wanda"](model, stats))]
    plain = slice_model(copy.deepcopy(model), kept)
    record = refit_model(model, kept, stats)
    slice_model(model, kept)
    assert [layer["relative_error_refit"] <= layer["relative_error_sliced"] + 1e-12
            for layer in record["layers"]] == [True] * len(record["layers"])
    assert FFNView(model).parameter_counts() == FFNView(plain).parameter_counts()
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert torch.equal(_logits(reloaded, tokens), _logits(model, tokens))


def test_scores_read_the_statistics():
    model = make_tiny_model("gpt2")
    stats = collect_ffn_statistics(model, _probe())
    for name, score in SCORES.items():
        values = score(model, stats)
        assert len(values) == 2 and values[0].shape == (FFN,), name
        assert torch.isfinite(values[0]).all() and (values[0] >= 0).all(), name
