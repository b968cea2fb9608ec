"""The aggregate scores of benchmarks/quality_reconstruct.py against the same aggregates
computed here from the activations themselves, and against the Wanda-style score they replace
on a probe whose sequences are all the same."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_reconstruct import AGGREGATES, aggregate_scores  # noqa: E402

from prunenet.ffn_statistics import collect_ffn_statistics, wanda_scores  # noqa: E402
from prunenet.model_view import FFNView  # noqa: E402

SEQUENCES, LENGTH = 6, 10


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


def _activations(model: torch.nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's second-matrix input, sequences x positions x d_ff, float64."""
    view = FFNView(model)
    seen: list[torch.Tensor] = []
    handles = [view.second_matrix_module(i).register_forward_pre_hook(
        lambda _m, inputs: seen.append(inputs[0].detach().double()))
        for i in range(view.num_layers)]
    with torch.no_grad():
        model(tokens, use_cache=False)
    for handle in handles:
        handle.remove()
    return seen


def _rows_squared(model: torch.nn.Module, layer: int) -> torch.Tensor:
    return FFNView(model).first_matrix(layer, "cpu").norm(dim=1).pow(2).double()


def test_each_aggregate_is_its_formula_on_the_activations():
    model = _model()
    tokens = torch.randint(0, 64, (SEQUENCES, LENGTH), generator=torch.Generator().manual_seed(1))
    activations = _activations(model, tokens)
    for how in AGGREGATES:
        scores = aggregate_scores(model, tokens, how, batch_size=4)  # two batches: 4 and 2
        for layer, a in enumerate(activations):
            flat = a.reshape(-1, a.shape[-1])
            per_sequence = a.pow(2).mean(1)
            expected = {
                "l1": flat.abs().mean(0).pow(2),
                "tokennorm": (flat.pow(2) / flat.pow(2).mean(1, keepdim=True)).mean(0),
                "seqnorm": (per_sequence / per_sequence.sum(1, keepdim=True)).sum(0),
                "seqmedian": per_sequence.quantile(0.5, dim=0),
                "seqq25": per_sequence.quantile(0.25, dim=0),
                "seqgeo": (per_sequence + 1e-6 * per_sequence.mean()).log().mean(0).exp(),
            }[how] * _rows_squared(model, layer)
            torch.testing.assert_close(scores[layer].double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("how", ["seqnorm", "seqmedian", "seqq25", "seqgeo"])
def test_on_identical_sequences_the_sequence_aggregates_rank_as_wanda(how):
    model = _model()
    tokens = torch.randint(0, 64, (1, LENGTH), generator=torch.Generator().manual_seed(2))
    tokens = tokens.repeat(SEQUENCES, 1)
    wanda = wanda_scores(model, collect_ffn_statistics(model, tokens))
    for mine, reference in zip(aggregate_scores(model, tokens, how), wanda, strict=True):
        assert torch.equal(mine.argsort(descending=True), reference.argsort(descending=True))


def test_an_unknown_aggregate_is_refused():
    with pytest.raises(ValueError, match="unknown aggregate 'mean'"):
        aggregate_scores(_model(), torch.zeros(1, 4, dtype=torch.long), "mean")
