"""Reference selections to compare PruneNet against: weights in, kept rows out.

Each function returns, per layer, the sorted indices of the ``kept`` neurons it keeps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .families import Cut
from .model_view import FFNView
from .policy import top_rows


def random_rows(view: FFNView, kept: int, seed: int) -> list[Tensor]:
    """Uniformly random ``kept`` neurons per layer, from one seeded generator."""
    generator = torch.Generator().manual_seed(int(seed))
    return [
        torch.randperm(view.d_ff, generator=generator)[:kept].sort().values
        for _ in range(view.num_layers)
    ]


def magnitude_rows(view: FFNView, kept: int) -> list[Tensor]:
    """The ``kept`` neurons whose first-matrix row has the largest L2 norm."""
    return [top_rows(view.first_matrix(i).norm(dim=1), kept) for i in range(view.num_layers)]


def cut_norms(view: FFNView, layer_index: int, cut: Cut) -> Tensor:
    """L2 norm of each neuron's slice of the weight ``cut`` (blocks * d_ff values)."""
    tensor = view.layers[layer_index].get_parameter(cut.name).detach().float()
    return tensor.norm(dim=1 - cut.axis)


def neuron_norms(view: FFNView, layer_index: int) -> list[Tensor]:
    """Per-neuron L2 norms in every weight matrix of the FFN (fused blocks separately)."""
    norms = []
    for cut in view.family.cuts:
        if cut.name.endswith("weight"):
            per_index = cut_norms(view, layer_index, cut)
            norms.extend(per_index.reshape(cut.blocks, view.d_ff).unbind(0))
    return norms


def magnitude_product_rows(view: FFNView, kept: int) -> list[Tensor]:
    """The ``kept`` neurons with the largest product of their norms in all FFN matrices."""
    rows = []
    for index in range(view.num_layers):
        log_score = torch.stack([norm.clamp_min(1e-30).log() for norm in neuron_norms(view, index)])
        rows.append(top_rows(log_score.sum(0), kept))
    return rows
