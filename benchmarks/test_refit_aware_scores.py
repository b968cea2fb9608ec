"""The refit-aware selections of benchmarks/quality_reconstruct.py against the refit they
predict, and its per-neuron ridge refit against the objective it minimises, computed
independently here by least squares on the activations themselves."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from quality_reconstruct import (  # noqa: E402
    add_zero_second_bias,
    diagonal_ridge_columns,
    refit_aware_rows,
    wanda_refit_aware,
)

from conftest import make_tiny_model  # noqa: E402
from prunenet.ffn_statistics import (  # noqa: E402
    SCORES,
    LayerStatistics,
    add_activations,
    collect_ffn_statistics,
)
from prunenet.model_view import FFNView  # noqa: E402
from prunenet.refit import least_squares_columns, refit_model  # noqa: E402

D_MODEL, D_FF, TOKENS, RIDGE = 5, 8, 300, 0.5


def _layer(seed: int) -> tuple[torch.Tensor, torch.Tensor, LayerStatistics]:
    generator = torch.Generator().manual_seed(seed)
    second = torch.randn(D_MODEL, D_FF, generator=generator, dtype=torch.float64)
    mixing = torch.randn(D_FF, D_FF, generator=generator, dtype=torch.float64)
    activations = torch.randn(TOKENS, D_FF, generator=generator, dtype=torch.float64) @ mixing
    stats = LayerStatistics.empty(D_FF)
    add_activations(stats, activations)
    return second, activations, stats


def _penalty(activations: torch.Tensor) -> float:
    return RIDGE * float(activations.pow(2).mean())  # ridge x mean diagonal of E[a a^T]


def _refit_cost(second: torch.Tensor, activations: torch.Tensor, removed: list[int]) -> float:
    """min over D of mean_t ||W_R a_R,t - D a_K,t||^2 + lambda ||D||^2, by an augmented lstsq
    (D = W' - W2[:, K]: the refit's change to the kept columns)."""
    kept = [i for i in range(D_FF) if i not in removed]
    penalty = _penalty(activations)
    scale = TOKENS ** -0.5
    design = torch.cat([activations[:, kept] * scale,
                        penalty ** 0.5 * torch.eye(len(kept), dtype=torch.float64)])
    target = torch.cat([activations[:, removed] @ second[:, removed].T * scale,
                        torch.zeros(len(kept), D_MODEL, dtype=torch.float64)])
    solution = torch.linalg.lstsq(design, target).solution
    return float((design @ solution - target).pow(2).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_shot_cost_is_the_refit_cost_of_each_neuron_alone(seed):
    second, activations, stats = _layer(seed)
    costs: list[float] = []
    refit_aware_rows(second, stats, D_FF - 1, RIDGE, costs=costs)
    expected = [_refit_cost(second, activations, [i]) for i in range(D_FF)]
    assert costs == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_costs_add_up_to_the_refit_cost_of_what_it_removed(seed):
    """One removal per step: the running sum of the increments is the refit cost of the removed
    set at every step, and each step removes the cheapest next neuron."""
    second, activations, stats = _layer(seed)
    costs: list[float] = []
    kept = refit_aware_rows(second, stats, D_FF - 4, RIDGE, greedy=True, block=1, costs=costs)
    order: list[int] = []
    for step in range(4):  # replay: the order follows from the cheapest next removal
        candidates = [i for i in range(D_FF) if i not in order]
        best = min(candidates, key=lambda i: _refit_cost(second, activations, order + [i]))
        order.append(best)
        assert sum(costs[:step + 1]) == pytest.approx(
            _refit_cost(second, activations, order), rel=1e-8)
    assert sorted(order) == sorted(set(range(D_FF)) - set(kept.tolist()))


def test_wanda_discount_is_the_unexplained_share_of_each_activation(monkeypatch):
    _, activations, stats = _layer(3)
    monkeypatch.setitem(SCORES, "wanda", lambda model, stats: [torch.ones(D_FF)])
    (discount,) = wanda_refit_aware(None, [stats], RIDGE)  # 1 x the discount
    penalty = _penalty(activations)
    for i in range(D_FF):  # ridge regression of a_i on the others, residual over E[a_i^2] + lambda
        others = [j for j in range(D_FF) if j != i]
        design = torch.cat([activations[:, others] * TOKENS ** -0.5,
                            penalty ** 0.5 * torch.eye(D_FF - 1, dtype=torch.float64)])
        target = torch.cat([activations[:, i:i + 1] * TOKENS ** -0.5,
                            torch.zeros(D_FF - 1, 1, dtype=torch.float64)])
        residual = (design @ torch.linalg.lstsq(design, target).solution - target).pow(2).sum()
        share = (residual + penalty) / (activations[:, i].pow(2).mean() + penalty)
        assert float(discount[i]) == pytest.approx(float(share), rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_neuron_ridge_minimises_its_objective(seed):
    """``ls-diag``: W' minimises mean_t ||W2 a_t - W' a_K,t||^2 + sum_i ridge E[a_i^2]
    ||W'_i - W2_i||^2 over the kept columns i, solved here as an augmented least squares."""
    second, activations, stats = _layer(seed)
    kept = torch.tensor([0, 2, 3, 5, 7])
    gram = stats.gram / stats.count
    columns = diagonal_ridge_columns(second, kept, gram[:, kept], gram[kept][:, kept], RIDGE)
    roots = (RIDGE * gram.diagonal()[kept]).sqrt()
    scale = TOKENS ** -0.5
    design = torch.cat([activations[:, kept] * scale, torch.diag(roots)])
    target = torch.cat([activations @ second.T * scale, (second[:, kept] * roots).T])
    expected = torch.linalg.lstsq(design, target).solution.T
    torch.testing.assert_close(columns, expected, rtol=1e-9, atol=1e-10)
    # equal mean squares make it the refit's uniform ridge
    unit = gram / gram.diagonal().sqrt()[:, None] / gram.diagonal().sqrt()[None, :]
    torch.testing.assert_close(
        diagonal_ridge_columns(second, kept, unit[:, kept], unit[kept][:, kept], RIDGE),
        least_squares_columns(second, kept, unit[:, kept], unit[kept][:, kept], RIDGE),
        rtol=1e-12, atol=1e-12)


def test_a_zero_second_bias_leaves_the_dense_model_and_gives_the_bias_refit_its_bias():
    """--mlp-bias: SmolLM2's LLaMA gets a zero bias on down_proj; the dense logits stay exactly
    what they were, and the FLAP refit then moves that bias by the removed neurons' mean output."""
    model = make_tiny_model("llama")
    tokens = torch.randint(0, model.config.vocab_size, (2, 12),
                           generator=torch.Generator().manual_seed(0))
    before = model(tokens).logits
    add_zero_second_bias(model)
    assert torch.equal(model(tokens).logits, before)
    view = FFNView(model)
    kept = [torch.arange(0, view.d_ff, 2) for _ in range(view.num_layers)]
    stats = collect_ffn_statistics(model, tokens)
    down = view.second_matrix_module(0)
    removed = torch.arange(1, view.d_ff, 2)
    expected = down.weight.double()[:, removed] @ stats[0].mean[removed]
    refit_model(model, kept, stats, "bias", 0.3)
    torch.testing.assert_close(down.bias.double(), expected, rtol=1e-5, atol=1e-6)
