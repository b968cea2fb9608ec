"""``self-generated`` (the default): neurons most active on text the model writes itself.

The run's probe (:class:`prunenet.probe.Probe`: the model's own sampled text from its BOS token,
seeded) is run through the model once; each layer keeps the neurons of highest
``mean h_i^2 * ||first-matrix row i||^2`` on it: the Wanda-style product of the calibration-based
``activation`` baseline, with no data but the model's own. Calibration-free, but it runs the
model (a streamed checkpoint layer by layer from disk).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..ffn_statistics import collect_activation_sums, wanda_product, wanda_scores
from .base import Selector, Source, top_rows_per_layer


class SelfGenerated(Selector):
    name = "self-generated"
    summary = ("the default: neurons most active on text the model generates itself "
               "(row norm^2 x mean activation^2); no policy, no data")
    needs_model = True
    seeded = True  # the probe is sampled from the seed

    def select(self, source: Source, kept: int, seed: int) -> list[Tensor]:
        model = source.model
        if source.probe_statistics is not None:  # the refit's pass over the probe serves both
            return top_rows_per_layer(wanda_scores(model, source.probe_statistics()), kept)
        if source.probe is None:
            raise ValueError("self-generated selection reads the run's probe; the pipeline "
                             "gives every loaded model one (prunenet.pipeline.run_probe)")
        return top_rows_per_layer(self_generated_scores(model, source.probe.ids()), kept)


def mean_squared_activations(model: nn.Module, tokens: Tensor) -> list[Tensor]:
    """Per layer, each FFN neuron's mean squared activation ``mean h_i^2`` on ``tokens``
    (sequences x length), read at the input of the FFN's second matrix (float64 sums). The
    values, bit for bit, that the refit's statistics on ``tokens`` give: the same rows are kept
    with the refit on or off."""
    return [stats.mean_square for stats in collect_activation_sums(model, tokens)]


def self_generated_scores(model: nn.Module, tokens: Tensor) -> list[Tensor]:
    """The default variant's score: ``mean h_i^2 * ||first_i||^2`` on the model's own text.

    The Wanda-style product of the calibration-based ``activation`` baseline (row norm of the
    first FFN matrix times activation norm), with self-generated text instead of calibration
    data (chosen over the output energy ``mean h_i^2 * ||down_i||^2`` by measurement:
    benchmarks/quality_ablation.md).
    """
    return wanda_product(model, mean_squared_activations(model, tokens))

