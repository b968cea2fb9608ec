"""Calibration-free scoring pieces (issue 7) and training robustness, on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch

import prunenet
from conftest import make_tiny_model
from prunenet.checkpoints import RECORD_NAME
from prunenet.cli import main
from prunenet.errors import InputError, NumericalError
from prunenet.model_view import FFNView
from prunenet.policy import PrunePolicy, top_rows
from prunenet.reinforce import TrainingConfig, train_policy_on_matrices
from prunenet.variants import (
    DEFAULT_VARIANT,
    SELF_GENERATED_SEQUENCES,
    down_column_norms,
    input_scale,
    intermediate_activations,
    leverage_scores,
    probe_activation_scores,
    probe_tokens,
    rank_with_protection,
    self_generated_scores,
)


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


def test_probe_tokens_are_seeded_and_in_the_vocabulary():
    model = make_tiny_model("llama")
    tokens = probe_tokens(model, 3, 7, seed=5)
    assert tokens.shape == (3, 7) and 0 <= tokens.min() and tokens.max() < 128
    assert torch.equal(tokens, probe_tokens(model, 3, 7, seed=5))
    assert not torch.equal(tokens, probe_tokens(model, 3, 7, seed=6))
    generated = probe_tokens(model, 2, 6, seed=5, source="generated")
    assert generated.shape == (2, 6)
    assert (generated[:, 0] == model.config.bos_token_id).all()
    assert torch.equal(generated, probe_tokens(model, 2, 6, seed=5, source="generated"))


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3"])
def test_probe_scores_are_activation_energy_times_output_norm(model_type):
    model = make_tiny_model(model_type)
    view = FFNView(model)
    tokens = probe_tokens(model, 2, 5, seed=0)
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
    torch.testing.assert_close(scores[1], expected, rtol=1e-4, atol=1e-7)


def test_a_neuron_with_no_output_scores_zero():
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, 7] = 0
    scores = probe_activation_scores(model, probe_tokens(model, 2, 5, seed=0))
    assert scores[0][7] == 0 and (scores[0][torch.arange(48) != 7] > 0).all()


def test_protected_rows_come_first_then_the_base_order():
    base = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    outlier = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 9.0])
    ranking = rank_with_protection(base, outlier, fraction=1 / 6)
    assert torch.topk(ranking, 3).indices.sort().values.tolist() == [0, 1, 5]
    assert torch.equal(rank_with_protection(base, outlier, 0.0).argsort(), base.argsort())


def _overflowing_policy(d_model: int, d_ff: int) -> PrunePolicy:
    """A finite policy whose scores overflow: logits of mixed-sign rows become inf - inf = NaN."""
    policy = PrunePolicy(d_model, d_ff, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        policy.projection.fill_(1e30)
        policy.row_weights.fill_(0.5)
    return policy


def test_non_finite_probabilities_skip_updates_and_are_counted():
    generator = torch.Generator().manual_seed(3)
    positive = torch.rand(24, 8, generator=generator) * 1e8 + 1e8  # logits +inf: alpha = 1
    mixed = torch.randn(24, 8, generator=generator) * 1e8  # logits NaN
    config = TrainingConfig(ratio=0.25, episodes=2)
    result = train_policy_on_matrices([positive, mixed], config,
                                      policy=_overflowing_policy(8, 24), progress=False)
    assert [record.skipped_updates for record in result.history] == [1, 1]
    assert all(math.isfinite(record.total_reward) for record in result.history)
    assert all(torch.isfinite(p).all() for p in result.policy.parameters())


def test_training_that_cannot_make_progress_stops_with_a_clear_message():
    mixed = torch.randn(24, 8, generator=torch.Generator().manual_seed(4)) * 1e8
    with pytest.raises(NumericalError, match="cannot make progress"):
        train_policy_on_matrices([mixed, mixed.flip(0)], TrainingConfig(ratio=0.25, episodes=2),
                                 policy=_overflowing_policy(8, 24), progress=False)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3"])
def test_default_score_is_mean_squared_activation_times_first_row_norm(model_type):
    """Written out by hand: hook the second matrix's input, square, average; times the squared
    norm of the neuron's row of the first matrix (gate; the gate half of phi3's fused gate_up;
    gpt2's Conv1D column)."""
    model = make_tiny_model(model_type)
    view = FFNView(model)
    tokens = probe_tokens(model, 2, 5, seed=0)
    second = {"gpt2": "mlp.c_proj"}.get(model_type, "mlp.down_proj")
    captured = []
    handle = view.layers[1].get_submodule(second).register_forward_pre_hook(
        lambda module, args: captured.append(args[0].reshape(-1, view.d_ff)))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    if model_type == "gpt2":
        first_rows = model.transformer.h[1].mlp.c_fc.weight.T  # Conv1D: d_model x d_ff
    elif model_type == "phi3":
        first_rows = model.model.layers[1].mlp.gate_up_proj.weight[:view.d_ff]
    else:
        first_rows = model.model.layers[1].mlp.gate_proj.weight
    expected = captured[0].pow(2).mean(0) * first_rows.detach().norm(dim=1).pow(2)
    scores = self_generated_scores(model, tokens)
    assert len(scores) == view.num_layers
    torch.testing.assert_close(scores[1], expected, rtol=1e-4, atol=1e-7)


def test_default_selection_keeps_the_top_scores_on_self_generated_text():
    model = make_tiny_model("llama")
    rows = prunenet.select_rows(model, 0.25, seed=3, progress=False)
    tokens = probe_tokens(model, SELF_GENERATED_SEQUENCES, 64, 3, "generated")  # 64 positions
    scores = self_generated_scores(model, tokens)
    assert [r.tolist() for r in rows] == [top_rows(s, 36).tolist() for s in scores]
    # Not the output-energy score of the first default: on this model the two choose differently.
    energy = probe_activation_scores(model, tokens)
    assert [r.tolist() for r in rows] != [top_rows(s, 36).tolist() for s in energy]
    assert [r.tolist() for r in prunenet.select_rows(model, 0.25, seed=3, progress=False,
                                                     variant=DEFAULT_VARIANT)] == [
        r.tolist() for r in rows]


def test_a_policy_means_the_reference_variant():
    model = make_tiny_model("llama")
    training = prunenet.train_policy(model, ratio=0.3, episodes=1, progress=False)
    implicit = prunenet.select_rows(model, 0.3, policy=training.policy, seed=9, progress=False)
    explicit = prunenet.select_rows(model, 0.3, policy=training.policy, seed=9, progress=False,
                                    variant="reference")
    assert [r.tolist() for r in implicit] == [r.tolist() for r in explicit]
    with pytest.raises(InputError, match="uses no policy"):
        prunenet.select_rows(model, 0.3, policy=training.policy, variant=DEFAULT_VARIANT)
    with pytest.raises(InputError, match="unknown variant"):
        prunenet.select_rows(model, 0.3, variant="magic")


def test_compress_default_needs_no_policy_and_reference_trains_one(tmp_path):
    result = prunenet.compress(make_tiny_model("llama"), ratio=0.25, progress=False)
    assert result.policy is None and result.training is None
    assert result.record["variant"] == DEFAULT_VARIANT
    reference = prunenet.compress(make_tiny_model("llama"), ratio=0.25, episodes=1,
                                  variant="reference", progress=False)
    assert reference.policy is not None and reference.record["variant"] == "reference"
    with pytest.raises(InputError, match="--policy-out needs a trained policy"):
        prunenet.compress(make_tiny_model("llama"), ratio=0.25, progress=False,
                          policy_out=tmp_path / "p.safetensors")


def test_cli_variant_choices(tiny_llama_dir, tmp_path):
    assert main(["-q", "compress", str(tiny_llama_dir), "--ratio", "0.25", "--out",
                 str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / RECORD_NAME).read_text())["variant"] == DEFAULT_VARIANT
    assert main(["-q", "compress", str(tiny_llama_dir), "--ratio", "0.25", "--episodes", "1",
                 "--variant", "reference", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / RECORD_NAME).read_text())["variant"] == "reference"
