"""The selection interface: which FFN neurons of every layer to keep.

A selection method is a :class:`Selector`: it reads a :class:`Source` (the model's FFN weights,
and the loaded model and tokenizer when it has them) and returns, per layer, the sorted indices
of the ``kept`` neurons. Its class says what it needs: ``needs_model`` (it runs the model, which
a streamed checkpoint then does layer by layer from disk), ``needs_data`` (it reads
calibration text) and ``seeded`` (its rows depend on the run's seed).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from ..errors import NumericalError


class FFNWeights(Protocol):
    """What every source of FFN weights offers: a loaded model's :class:`~prunenet.model_view.
    FFNView` or a streamed checkpoint (:class:`~prunenet.io.streaming.StreamedCheckpoint`)."""

    d_ff: int
    d_model: int

    @property
    def num_layers(self) -> int: ...

    def first_matrix(self, layer_index: int, device: torch.device | str | None = None) -> Tensor:
        """Layer ``layer_index``'s first FFN matrix, d_ff x d_model, float32."""
        ...


@dataclass
class Source:
    """What a selector reads: FFN ``weights`` always; ``model`` and ``tokenizer`` when loaded,
    and the run's ``probe`` (:class:`prunenet.probe.Probe`: the model's own text, generated once
    and shared with the refit stage). ``probe_statistics``, set when the refit will run: returns
    the dense model's activation statistics on the probe
    (:class:`prunenet.ffn_statistics.LayerStatistics` per layer: sums of ``a`` and ``a^2``,
    without Grams), computed on the first call and shared with the refit, so a selector that
    reads the probe's activations needs no pass of its own."""

    weights: FFNWeights
    model: nn.Module | None = None
    tokenizer: Any = None
    device: torch.device = torch.device("cpu")
    progress: bool = True
    probe: Any = None
    probe_statistics: Callable[[], list[Any]] | None = None


class Selector(ABC):
    """One selection method. Subclasses set the class attributes and implement :meth:`select`."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for --help and the docs
    needs_model: ClassVar[bool] = False
    needs_data: ClassVar[bool] = False
    # Its rows depend on the seed: drawn at random, or read from the probe (the model's text
    # sampled from the seed). A method that is not seeded ignores the seed select() is given.
    seeded: ClassVar[bool] = False

    def reads_seed(self) -> bool:
        """Whether this selection, as configured, reads the seed (a seeded method may be set
        up to draw nothing)."""
        return self.seeded

    @abstractmethod
    def select(self, source: Source, kept: int, seed: int) -> list[Tensor]:
        """Per layer, the sorted indices of the ``kept`` neurons to keep."""

    def record(self) -> dict[str, Any]:
        """What the compression record says of this selection besides its name."""
        return {}


def top_rows(scores: Tensor, kept: int, layer: int | None = None) -> Tensor:
    """The ``kept`` rows of highest score, sorted by index (ties broken by lower index).
    Raises :class:`NumericalError` (naming ``layer``) for a NaN or infinite score: no order
    among such scores means anything."""
    if not torch.isfinite(scores).all():
        where = "" if layer is None else f"layer {layer}: "
        raise NumericalError(f"{where}the selection's scores are not finite (NaN or inf: the "
                             "model's activations or weights overflow), so its neurons cannot be "
                             "ranked; nothing was written")
    order = torch.argsort(scores.detach(), descending=True, stable=True)
    return order[:kept].sort().values


def top_rows_per_layer(scores: Sequence[Tensor], kept: int) -> list[Tensor]:
    return [top_rows(layer_scores, kept, index) for index, layer_scores in enumerate(scores)]
