"""``random``: uniformly random neurons per layer, the baseline every method must beat."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Selector, Source


class Random(Selector):
    name = "random"
    summary = "uniformly random neurons per layer (seeded baseline)"
    seeded = True

    def select(self, source: Source, kept: int, seed: int) -> list[Tensor]:
        """One seeded generator draws every layer's neurons in turn."""
        weights = source.weights
        generator = torch.Generator().manual_seed(int(seed))
        return [torch.randperm(weights.d_ff, generator=generator)[:kept].sort().values
                for _ in range(weights.num_layers)]
