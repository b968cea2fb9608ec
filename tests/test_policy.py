"""The policy network: cheap forward == reference form, probabilities, sampling."""

from __future__ import annotations

import pytest
import torch

from prunenet.errors import PolicyMismatchError
from prunenet.selection.base import top_rows
from prunenet.selection.prunenet.policy import PrunePolicy, keep_probabilities, sample_rows


def _policy_and_matrix(d_model=24, d_ff=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    policy = PrunePolicy(d_model, d_ff, generator=generator)
    matrix = torch.randn(d_ff, d_model, generator=generator)
    return policy, matrix


def test_cheap_forward_equals_reference_values():
    policy, matrix = _policy_and_matrix()
    torch.testing.assert_close(policy.keep_scores(matrix), policy.keep_scores_reference(matrix),
                               rtol=1e-5, atol=1e-6)


def test_cheap_forward_equals_reference_gradients():
    policy, matrix = _policy_and_matrix(seed=3)
    weights = torch.randn(matrix.shape[0])

    def gradients(forward):
        policy.zero_grad()
        (forward(matrix).log() * weights).sum().backward()
        return {name: p.grad.clone() for name, p in policy.named_parameters()}

    cheap, reference = gradients(policy.keep_scores), gradients(policy.keep_scores_reference)
    assert set(cheap) == {"projection", "bias", "row_weights"}
    for name in cheap:
        torch.testing.assert_close(cheap[name], reference[name], rtol=1e-4, atol=1e-6)


def test_init_matches_reference_distribution_and_is_seeded():
    a = PrunePolicy(64, 100, generator=torch.Generator().manual_seed(5))
    b = PrunePolicy(64, 100, generator=torch.Generator().manual_seed(5))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert a.row_weights.min() >= 0 and a.row_weights.max() < 1
    assert a.projection.abs().max() <= 1 / 8 and a.bias.abs().max() <= 1 / 8


def test_keep_probabilities_formula_and_guards():
    alpha = torch.tensor([0.2, 0.5, 0.9])
    noise = torch.tensor([0.3, 0.5, 0.1])
    logit = lambda x: torch.log(x) - torch.log1p(-x)  # noqa: E731
    torch.testing.assert_close(keep_probabilities(alpha, noise),
                               torch.sigmoid(logit(noise) + logit(alpha)))
    extreme = keep_probabilities(torch.tensor([0.0, 1.0, 0.0, 1.0]),
                                 torch.tensor([0.0, 1.0, 1.0, 0.0]))
    assert torch.isfinite(extreme).all() and (extreme > 0).all() and (extreme < 1).all()
    half = keep_probabilities(torch.tensor([0.5], dtype=torch.float16),
                              torch.tensor([0.5], dtype=torch.float16))
    assert half.dtype == torch.float32


def test_sample_rows_distinct_sorted_and_seeded():
    probabilities = torch.rand(50, generator=torch.Generator().manual_seed(1))
    rows = sample_rows(probabilities, 30, torch.Generator().manual_seed(2))
    again = sample_rows(probabilities, 30, torch.Generator().manual_seed(2))
    assert rows.numel() == 30 and rows.unique().numel() == 30
    assert torch.equal(rows, rows.sort().values) and torch.equal(rows, again)
    assert rows.min() >= 0 and rows.max() < 50


def test_sampling_favours_high_probabilities():
    probabilities = torch.full((100,), 1e-4)
    probabilities[:10] = 1.0
    rows = sample_rows(probabilities, 10, torch.Generator().manual_seed(0))
    assert rows.tolist() == list(range(10))


def test_top_rows():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.0])
    assert top_rows(scores, 3).tolist() == [1, 2, 3]


def test_shape_mismatch_is_a_clear_error():
    policy, _ = _policy_and_matrix(d_model=24, d_ff=40)
    with pytest.raises(PolicyMismatchError, match="d_ff=40.*d_ff=48"):
        policy.keep_scores(torch.randn(48, 24))


def test_a_policy_whose_scores_overflow_is_refused_when_rows_are_sampled(tmp_path):
    """A policy file of finite values (it loads) whose scores are NaN on a model had crashed
    the sampled selection with a FloatingPointError traceback; top-k refused it in one line."""
    import prunenet
    from conftest import make_tiny_model
    from prunenet.errors import NumericalError
    from prunenet.io.policy_file import save_policy

    policy = PrunePolicy(32, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # W (P^T v) overflows to +-inf across rows: + b.v gives NaN
        policy.projection.mul_(1e36)
        policy.row_weights.mul_(1e3)
    path = save_policy(policy, tmp_path / "policy.safetensors", {})
    for selection in ("sample", "topk"):
        with pytest.raises(NumericalError, match="^layer 0: "):
            prunenet.prune(make_tiny_model("llama"), path, 0.3, selection=selection,
                           reconstruct="none", progress=False, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
