"""``magnitude`` and ``magnitude-product``: neurons with the largest weights, no data at all."""

from __future__ import annotations

import torch
from torch import Tensor

from ..families import Cut
from ..model_view import FFNView
from .base import Selector, Source, top_rows


class Magnitude(Selector):
    name = "magnitude"
    summary = "neurons whose first-matrix row has the largest L2 norm"

    def select(self, source: Source, kept: int, seed: int) -> list[Tensor]:
        weights = source.weights
        return [top_rows(weights.first_matrix(i).norm(dim=1), kept, i)
                for i in range(weights.num_layers)]


def cut_norms(view: FFNView, layer_index: int, cut: Cut) -> Tensor:
    """L2 norm of each neuron's slice of the weight ``cut`` (blocks * d_ff values)."""
    tensor = view.parameter(layer_index, cut.name).float()
    return tensor.norm(dim=1 - cut.axis)


def neuron_norms(view: FFNView, layer_index: int) -> list[Tensor]:
    """Per-neuron L2 norms in every weight matrix of the FFN (fused blocks separately)."""
    norms = []
    for cut in view.family.cuts:
        if cut.name.endswith("weight"):
            per_index = cut_norms(view, layer_index, cut)
            norms.extend(per_index.reshape(cut.blocks, view.d_ff).unbind(0))
    return norms


class MagnitudeProduct(Selector):
    name = "magnitude-product"
    summary = "neurons with the largest product of their norms in all FFN matrices"
    needs_model = True  # reads every FFN matrix of the loaded model

    def select(self, source: Source, kept: int, seed: int) -> list[Tensor]:
        view = FFNView(source.model)
        rows = []
        for index in range(view.num_layers):
            log_score = torch.stack([norm.clamp_min(1e-30).log()
                                     for norm in neuron_norms(view, index)])
            rows.append(top_rows(log_score.sum(0), kept, index))
        return rows
