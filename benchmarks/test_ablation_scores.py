"""The research-only neuron scores of benchmarks/ablation_scores.py, each against its formula."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ablation_scores import (  # noqa: E402
    down_column_norms,
    input_scale,
    intermediate_activations,
    leverage_scores,
    probe_activation_scores,
    random_probe_tokens,
    rank_with_protection,
)

from conftest import make_tiny_model  # noqa: E402
from prunenet.model_view import FFNView  # noqa: E402


def test_leverage_scores_match_the_projection_formula():
    matrix = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    expected = torch.diagonal(matrix @ torch.linalg.pinv(matrix)).float()
    scores = leverage_scores(matrix)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)
    assert scores.sum().item() == pytest.approx(6.0, abs=1e-4)  # the rank
    scaled = leverage_scores(matrix * torch.tensor([1.0, 5.0, 0.1, 2.0, 3.0, 0.5]))
    torch.testing.assert_close(scaled, scores, atol=1e-5, rtol=1e-4)


def test_leverage_of_a_rank_deficient_matrix_sums_to_its_rank():
    generator = torch.Generator().manual_seed(1)
    matrix = torch.randn(30, 2, generator=generator) @ torch.randn(2, 5, generator=generator)
    assert leverage_scores(matrix).sum().item() == pytest.approx(2.0, abs=1e-4)


def test_input_scale_reads_the_norm_feeding_the_ffn():
    llama = make_tiny_model("llama")
    scale, shift = input_scale(FFNView(llama), 1)
    torch.testing.assert_close(scale, llama.model.layers[1].post_attention_layernorm.weight)
    assert torch.equal(shift, torch.zeros(32))
    gemma = make_tiny_model("gemma")  # Gemma's RMSNorm multiplies by 1 + weight
    scale, _ = input_scale(FFNView(gemma), 0)
    torch.testing.assert_close(scale, gemma.model.layers[0].post_attention_layernorm.weight + 1)
    gpt2 = make_tiny_model("gpt2")  # LayerNorm: weight and bias
    scale, shift = input_scale(FFNView(gpt2), 0)
    torch.testing.assert_close(shift, gpt2.transformer.h[0].ln_2.bias)


def test_intermediate_activations_are_the_ffn_formula():
    llama = make_tiny_model("llama")
    mlp = llama.model.layers[0].mlp
    inputs = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    gate, up = inputs @ mlp.gate_proj.weight.T, inputs @ mlp.up_proj.weight.T
    expected = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(intermediate_activations(FFNView(llama), 0, inputs), expected)
    gpt2 = make_tiny_model("gpt2")
    fc = gpt2.transformer.h[1].mlp.c_fc  # Conv1D: x @ W + b
    expected = gpt2.transformer.h[1].mlp.act(inputs @ fc.weight + fc.bias)
    torch.testing.assert_close(intermediate_activations(FFNView(gpt2), 1, inputs), expected)


def test_down_column_norms_follow_the_family_layout():
    llama, gpt2 = make_tiny_model("llama"), make_tiny_model("gpt2")
    torch.testing.assert_close(down_column_norms(FFNView(llama), 0),
                               llama.model.layers[0].mlp.down_proj.weight.norm(dim=0))
    torch.testing.assert_close(down_column_norms(FFNView(gpt2), 0),
                               gpt2.transformer.h[0].mlp.c_proj.weight.norm(dim=1))


def test_random_probe_tokens_are_seeded_and_in_the_vocabulary():
    model = make_tiny_model("llama")
    tokens = random_probe_tokens(model, 3, 7, seed=5)
    assert tokens.shape == (3, 7) and 0 <= tokens.min() and tokens.max() < 128
    assert torch.equal(tokens, random_probe_tokens(model, 3, 7, seed=5))
    assert not torch.equal(tokens, random_probe_tokens(model, 3, 7, seed=6))


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3"])
def test_probe_scores_are_activation_energy_times_output_norm(model_type):
    model = make_tiny_model(model_type)
    view = FFNView(model)
    tokens = random_probe_tokens(model, 2, 5, seed=0)
    captured = []
    second = "mlp.down_proj" if model_type != "gpt2" else "mlp.c_proj"
    handle = view.layers[1].get_submodule(second).register_forward_pre_hook(
        lambda module, args: captured.append(args[0].reshape(-1, view.d_ff)))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    expected = captured[0].pow(2).mean(0) * down_column_norms(view, 1).pow(2)
    scores = probe_activation_scores(model, tokens)
    assert len(scores) == view.num_layers and scores[1].shape == (view.d_ff,)
    torch.testing.assert_close(scores[1], expected.double(), rtol=1e-4, atol=1e-7)  # float64 sums


def test_a_neuron_with_no_output_scores_zero():
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, 7] = 0
    scores = probe_activation_scores(model, random_probe_tokens(model, 2, 5, seed=0))
    assert scores[0][7] == 0 and (scores[0][torch.arange(48) != 7] > 0).all()


def test_protected_rows_come_first_then_the_base_order():
    base = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    outlier = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 9.0])
    ranking = rank_with_protection(base, outlier, fraction=1 / 6)
    assert torch.topk(ranking, 3).indices.sort().values.tolist() == [0, 1, 5]
    assert torch.equal(rank_with_protection(base, outlier, 0.0).argsort(), base.argsort())
