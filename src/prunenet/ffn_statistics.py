"""Second-order statistics of each FFN's intermediate activation, and neuron scores read from them.

The intermediate activation ``a`` of a layer is what its second FFN matrix (down_proj, fc2,
c_proj, dense_4h_to_h) receives: ``output = W2 a (+ b)``. One hooked pass over probe token ids
accumulates, per layer, the Gram ``sum a a^T`` (d_ff x d_ff, float64), ``sum a`` and the token
count. The refit (:mod:`prunenet.refit`) and the probe-based selection scores below read only
these statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .model_view import FFNView, backbone


@dataclass
class LayerStatistics:
    """Sums over probe tokens of one layer's intermediate activation ``a`` (d_ff values).

    ``gram = sum a a^T`` (d_ff x d_ff), ``total = sum a`` (d_ff), both float64; ``count`` tokens.
    """

    gram: Tensor
    total: Tensor
    count: int

    @property
    def mean(self) -> Tensor:
        return self.total / max(self.count, 1)

    @property
    def mean_square(self) -> Tensor:
        """Per neuron ``mean a_i^2`` (the diagonal of the Gram over the count)."""
        return self.gram.diagonal() / max(self.count, 1)


def second_matrix(view: FFNView, layer_index: int) -> tuple[Tensor, Tensor | None]:
    """Layer ``layer_index``'s second FFN matrix as (d_model x d_ff) and its bias (or None).

    Returns views of the live parameters (Conv1D's (in, out) weight comes back transposed).
    """
    module = view.second_matrix_module(layer_index)
    weight = module.weight.detach()
    matrix = weight if _second_axis(view) == 1 else weight.T
    bias = getattr(module, "bias", None)
    return matrix, None if bias is None else bias.detach()


def _second_axis(view: FFNView) -> int:
    family = view.family
    return next(cut.axis for cut in family.cuts
                if cut.name.endswith(".weight") and cut.axis != family.first.axis)


@torch.no_grad()
def collect_ffn_statistics(model: nn.Module, probe_tokens: Tensor, batch_size: int = 8,
                           progress: bool = False) -> list[LayerStatistics]:
    """Per layer, the activation statistics of ``model`` on ``probe_tokens`` (sequences x length).

    One forward pass per batch of ``batch_size`` sequences; each batch's Gram is a float32
    product added to a float64 sum (d_ff^2 x 8 bytes per layer: 19 MB for d_ff 1536).
    """
    view = FFNView(model)
    stats = [LayerStatistics(torch.zeros(view.d_ff, view.d_ff, dtype=torch.float64),
                             torch.zeros(view.d_ff, dtype=torch.float64), 0)
             for _ in range(view.num_layers)]

    def accumulate(index: int):
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            activation = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float().cpu()
            add_activations(stats[index], activation)
        return hook

    handles = [view.second_matrix_module(i).register_forward_pre_hook(accumulate(i))
               for i in range(view.num_layers)]
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, probe_tokens.shape[0], batch_size), desc="statistics",
                          disable=not progress, leave=False):
            backbone(model)(probe_tokens[start:start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def add_activations(stats: LayerStatistics, activation: Tensor) -> None:
    """Add the rows of ``activation`` (tokens x d_ff) to ``stats`` in place."""
    stats.gram += (activation.T @ activation).double()
    stats.total += activation.sum(0).double()
    stats.count += activation.shape[0]


def wanda_product(model: nn.Module, mean_squares: list[Tensor]) -> list[Tensor]:
    """Per layer ``mean a_i^2 * ||first-matrix row i||^2`` (float32) from each neuron's mean
    squared activation: the default's Wanda-style score, whether the mean squares come from the
    refit's statistics or from the selection's own pass over the probe."""
    view = FFNView(model)
    return [mean_square.float() * view.first_matrix(i, "cpu").norm(dim=1).pow(2)
            for i, mean_square in enumerate(mean_squares)]


def wanda_scores(model: nn.Module, stats: list[LayerStatistics]) -> list[Tensor]:
    """:func:`wanda_product` read from the statistics (the Gram's diagonal over the count)."""
    return wanda_product(model, [s.mean_square for s in stats])


def energy_scores(model: nn.Module, stats: list[LayerStatistics]) -> list[Tensor]:
    """Per layer ``mean a_i^2 * ||second-matrix column i||^2``: each neuron's output energy."""
    view = FFNView(model)
    return [s.mean_square.float() * _column_norms(view, i) for i, s in enumerate(stats)]


def fluctuation_scores(model: nn.Module, stats: list[LayerStatistics]) -> list[Tensor]:
    """Per layer ``var(a_i) * ||second-matrix column i||^2`` (FLAP): the energy a bias cannot
    restore once neuron i is gone."""
    view = FFNView(model)
    return [(s.mean_square - s.mean.pow(2)).clamp_min(0).float() * _column_norms(view, i)
            for i, s in enumerate(stats)]


def _column_norms(view: FFNView, layer_index: int) -> Tensor:
    matrix, _ = second_matrix(view, layer_index)
    return matrix.float().pow(2).sum(0).cpu()


SCORES = {"wanda": wanda_scores, "energy": energy_scores, "fluctuation": fluctuation_scores}
