"""``self-generated`` (the default): neurons most active on text the model writes itself.

The run's probe (:class:`prunenet.probe.Probe`: the model's own sampled text from its BOS token,
seeded) is run through the model once; each layer keeps the neurons of highest
``mean h_i^2 * ||first-matrix row i||^2`` on it: the Wanda-style product of the calibration-based
``activation`` baseline, with no data but the model's own. Calibration-free, but it runs the
model (so not on a streamed checkpoint).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..families import context_length
from ..ffn_statistics import wanda_product, wanda_scores
from ..model_view import squared_activation_sums
from .base import Selector, Source, top_rows_per_layer

SELF_GENERATED_SEQUENCES = 4
SELF_GENERATED_LENGTH = 128


class SelfGenerated(Selector):
    name = "self-generated"
    summary = ("the default: neurons most active on text the model generates itself "
               "(row norm^2 x mean activation^2); no policy, no data")
    needs_model = True

    def select(self, source: Source, kept: int, seed: int) -> list[Tensor]:
        model = source.model
        if source.probe_statistics is not None:  # the refit's pass over the probe serves both
            return top_rows_per_layer(wanda_scores(model, source.probe_statistics()), kept)
        tokens = source.probe.ids() if source.probe is not None else self_generated_tokens(
            model, seed)
        return top_rows_per_layer(self_generated_scores(model, tokens), kept)


@torch.no_grad()
def generated_tokens(model: nn.Module, sequences: int, length: int, seed: int,
                     temperature: float = 1.0) -> Tensor:
    """``sequences`` x ``length`` token ids the model writes itself (at ``temperature``), each
    continuing its BOS token (or a random first token when it has none or it lies outside the
    vocabulary), seeded by ``seed`` without touching the global random state."""
    generator = torch.Generator().manual_seed(int(seed))
    vocab = model.get_input_embeddings().weight.shape[0]
    bos = getattr(model.config, "bos_token_id", None)
    first = torch.randint(0, vocab, (sequences, 1), generator=generator)
    if isinstance(bos, int) and 0 <= bos < vocab:
        first[:] = bos
    device = next(model.parameters()).device
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        prompt = first.to(device)
        tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                temperature=temperature, top_k=0, top_p=1.0,
                                max_new_tokens=length - 1, min_new_tokens=length - 1,
                                pad_token_id=0)
    return tokens.cpu()


def mean_squared_activations(model: nn.Module, tokens: Tensor) -> list[Tensor]:
    """Per layer, each FFN neuron's mean squared activation ``mean h_i^2`` on ``tokens``
    (sequences x length), read at the input of the FFN's second matrix (float32 sums)."""
    sums = squared_activation_sums(model, tokens, torch.float32)
    return [layer_sum / tokens.numel() for layer_sum in sums]


def self_generated_scores(model: nn.Module, tokens: Tensor) -> list[Tensor]:
    """The default variant's score: ``mean h_i^2 * ||first_i||^2`` on the model's own text.

    The Wanda-style product of the calibration-based ``activation`` baseline (row norm of the
    first FFN matrix times activation norm), with self-generated text instead of calibration
    data (chosen over the output energy ``mean h_i^2 * ||down_i||^2`` by measurement:
    benchmarks/quality_ablation.md).
    """
    return wanda_product(model, mean_squared_activations(model, tokens))


def self_generated_tokens(model: nn.Module, seed: int) -> Tensor:
    """The default variant's probe: SELF_GENERATED_SEQUENCES samples of the model's own text,
    SELF_GENERATED_LENGTH tokens each (fewer when the model has fewer positions)."""
    positions = context_length(model.config) or SELF_GENERATED_LENGTH
    length = min(SELF_GENERATED_LENGTH, positions)
    return generated_tokens(model, SELF_GENERATED_SEQUENCES, length, seed)
