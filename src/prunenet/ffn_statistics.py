"""Second-order statistics of each FFN's intermediate activation, and neuron scores read from them.

The intermediate activation ``a`` of a layer is what its second FFN matrix (down_proj, fc2,
c_proj, dense_4h_to_h) receives: ``output = W2 a (+ b)``. A hooked pass over probe token ids
accumulates, per layer, ``sum a``, ``sum a^2`` (per neuron) and the token count, and where asked
the Gram ``sum a a^T`` (d_ff x d_ff, float64). The refit (:mod:`prunenet.refit`) and the
probe-based selection scores below read only these statistics. :class:`ProbeStatistics` holds the
Grams a few layers at a time, so that their memory stays within a budget whatever the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .model_view import FFNView, backbone, input_device

GRAM_BUDGET = 1 << 30
"""Bytes of float64 Grams :class:`ProbeStatistics` holds at once (at least one layer's): every
layer of SmolLM2-135M (30 x 1536^2 x 8 = 566 MB) or Gemma 3 270M fits in one group;
Qwen2.5-0.5B (24 x 4864^2 x 8 = 4.5 GB) takes five."""

BATCH_SIZE = 8
"""Probe sequences run at once for the statistics. The selection's own pass
(:func:`collect_activation_sums`) runs the same batches as the refit's, so that both read the
same activations, bit for bit."""


@dataclass
class LayerStatistics:
    """Sums over probe tokens of one layer's intermediate activation ``a`` (d_ff values).

    ``total = sum a`` and ``squares = sum a^2`` (d_ff each), ``gram = sum a a^T`` (d_ff x d_ff)
    where collected (else None), all float64; ``count`` tokens.
    """

    total: Tensor
    squares: Tensor
    count: int
    gram: Tensor | None = None

    @classmethod
    def empty(cls, d_ff: int, gram: bool = True) -> LayerStatistics:
        zeros = torch.zeros(d_ff, dtype=torch.float64)
        return cls(zeros, zeros.clone(), 0,
                   torch.zeros(d_ff, d_ff, dtype=torch.float64) if gram else None)

    @property
    def mean(self) -> Tensor:
        return self.total / max(self.count, 1)

    @property
    def mean_square(self) -> Tensor:
        """Per neuron ``mean a_i^2``."""
        return self.squares / max(self.count, 1)


def second_matrix(view: FFNView, layer_index: int) -> tuple[Tensor, Tensor | None]:
    """Layer ``layer_index``'s second FFN matrix as (d_model x d_ff) and its bias (or None).

    Returns views of the live parameters (Conv1D's (in, out) weight comes back transposed);
    copies where the layer is offloaded.
    """
    name = view.second_module_name
    weight = view.parameter(layer_index, name + ".weight")
    matrix = weight if view.second_cut.axis == 1 else weight.T
    if getattr(view.second_matrix_module(layer_index), "bias", None) is None:
        return matrix, None
    return matrix, view.parameter(layer_index, name + ".bias")


def collect_ffn_statistics(model: nn.Module, probe_tokens: Tensor, batch_size: int = BATCH_SIZE,
                           progress: bool = False) -> list[LayerStatistics]:
    """Per layer, the activation statistics of ``model`` on ``probe_tokens`` (sequences x
    length), every layer's Gram included, from one pass over them."""
    return list(ProbeStatistics(model, probe_tokens, budget=-1, batch_size=batch_size,
                                progress=progress).with_grams())


def collect_activation_sums(model: nn.Module, probe_tokens: Tensor,
                            batch_size: int = BATCH_SIZE,
                            progress: bool = False) -> list[LayerStatistics]:
    """Per layer ``total``, ``squares`` and ``count`` of ``model``'s activations on
    ``probe_tokens``, no Gram: the sums :meth:`ProbeStatistics.every_layer` makes, bit for bit
    (the same batches, float64 sums), from one pass over them."""
    view = FFNView(model)
    stats = [LayerStatistics.empty(view.d_ff, gram=False) for _ in range(view.num_layers)]
    handles = [view.second_matrix_module(index).register_forward_pre_hook(
        _accumulating(stats[index])) for index in range(view.num_layers)]
    _run_batches(model, probe_tokens, batch_size, handles, progress)
    return stats


def add_activations(stats: LayerStatistics, activation: Tensor) -> None:
    """Add the rows of ``activation`` (tokens x d_ff) to ``stats`` in place (the Gram, where
    collected, as a float32 product added to the float64 sum)."""
    if stats.gram is not None:
        stats.gram += (activation.T @ activation).double()
    wide = activation.double()
    stats.total += wide.sum(0)
    stats.squares += wide.pow(2).sum(0)
    stats.count += activation.shape[0]


@dataclass
class LayerCall:
    """What a decoder layer received in one batch, its hidden states apart."""

    args: tuple
    kwargs: dict
    keyword: bool  # the hidden states came as ``hidden_states=``

    @classmethod
    def of(cls, args: tuple, kwargs: dict) -> tuple[Tensor, LayerCall]:
        if args:
            return args[0], cls(args[1:], kwargs, False)
        rest = {key: value for key, value in kwargs.items() if key != "hidden_states"}
        return kwargs["hidden_states"], cls((), rest, True)

    def run(self, layer: nn.Module, hidden: Tensor) -> Tensor:
        output = (layer(*self.args, hidden_states=hidden, **self.kwargs) if self.keyword
                  else layer(hidden, *self.args, **self.kwargs))
        return output[0] if isinstance(output, tuple) else output


class ProbeStatistics:
    """Every layer's activation statistics on the probe, with the Grams ``budget`` bytes at a
    time (default :data:`GRAM_BUDGET`; at least one layer's; negative: every layer at once).

    Layers are taken in consecutive groups whose float64 Grams fit the budget.
    :meth:`every_layer` runs the model over the probe once: every layer's sums, the first
    group's Grams, and what each later layer receives besides its hidden states (masks,
    position embeddings: shared tensors) with the hidden states entering the second group.
    :meth:`with_grams` then yields the layers in order, Gram included: each later group's layers
    are run again from those hidden states, and each group is dropped once passed. Every
    layer runs once more at most, whatever the number of groups; where every Gram fits
    (SmolLM2, Gemma 3 270M) nothing runs again. The sums are the single pass's, bit for bit.
    """

    def __init__(self, model: nn.Module, tokens: Tensor, budget: int | None = None,
                 batch_size: int = BATCH_SIZE, progress: bool = False):
        self._view = view = FFNView(model)
        budget = GRAM_BUDGET if budget is None else budget
        size = view.num_layers if budget < 0 else max(1, budget // max(view.d_ff ** 2 * 8, 1))
        self.groups = [range(start, min(start + size, view.num_layers))
                       for start in range(0, view.num_layers, size)]
        self._model, self.tokens = model, tokens
        self._keep = False  # every Gram held for more than one refit (see kept)
        self._batch_size, self._progress = batch_size, progress
        self._every: list[LayerStatistics] | None = None
        self._held: dict[int, Tensor] = {}
        self._calls: dict[int, list[LayerCall]] = {}
        self._hidden: list[Tensor] = []

    @classmethod
    def kept(cls, model: nn.Module, tokens: Tensor, budget: int | None = None,
             batch_size: int = 8, progress: bool = False) -> ProbeStatistics | None:
        """Statistics whose Grams stay held for any number of refits of ``model``'s copies
        on ``tokens``; None where every layer's Gram does not fit ``budget`` at once (each
        refit then takes its own statistics, a group of layers at a time)."""
        statistics = cls(model, tokens, budget, batch_size, progress)
        if len(statistics.groups) > 1:
            return None
        statistics._keep = True
        return statistics

    def reads(self, tokens: Tensor) -> bool:
        """Whether these are statistics on ``tokens``."""
        return self.tokens.shape == tokens.shape and bool(torch.equal(self.tokens, tokens))

    @torch.no_grad()
    def every_layer(self) -> list[LayerStatistics]:
        """Per layer ``total``, ``squares`` and ``count`` (the Gram only where held)."""
        if self._every is None:
            view, first, later = self._view, self.groups[0], self.groups[1:]
            stats = [LayerStatistics.empty(view.d_ff, gram=index in first)
                     for index in range(view.num_layers)]
            handles = [view.second_matrix_module(index).register_forward_pre_hook(
                _accumulating(stats[index])) for index in range(view.num_layers)]
            for group in later:
                for index in group:
                    self._calls[index] = []
                    entering = self._hidden if index == later[0].start else None
                    handles.append(view.layers[index].register_forward_pre_hook(
                        _recording(self._calls[index], entering), with_kwargs=True))
            _run_batches(self._model, self.tokens, self._batch_size, handles, self._progress)
            self._held = {index: stats[index].gram for index in first}
            for layer_stats in stats:
                layer_stats.gram = None  # held apart, so that with_grams can let each one go
            self._every = stats
        return self._every

    def with_grams(self) -> Iterator[LayerStatistics]:
        """Each layer's statistics with its Gram, in layer order."""
        every = self.every_layer()
        for number, group in enumerate(self.groups):
            if number > 0:
                self._held = self._run_again(group)
            for index in group:
                gram = self._held[index] if self._keep else self._held.pop(index)
                yield LayerStatistics(every[index].total, every[index].squares,
                                      every[index].count, gram)
                del gram
        self._hidden = []  # the hidden states leaving the last group: nothing reads them

    @torch.no_grad()
    def _run_again(self, group: range) -> dict[int, Tensor]:
        """Run ``group``'s layers on the hidden states entering it, summing their Grams;
        leaves the hidden states leaving it for the next group."""
        view = self._view
        stats = {index: LayerStatistics.empty(view.d_ff) for index in group}
        handles = [view.second_matrix_module(index).register_forward_pre_hook(
            _accumulating(stats[index])) for index in group]
        try:
            for batch in tqdm(range(len(self._hidden)), desc=f"statistics, layers "
                              f"{group.start}-{group.stop - 1}", disable=not self._progress,
                              leave=False):
                hidden = self._hidden[batch]
                for index in group:
                    hidden = self._calls[index][batch].run(view.layers[index], hidden)
                self._hidden[batch] = hidden
        finally:
            for handle in handles:
                handle.remove()
        for index in group:
            del self._calls[index]
        return {index: stats[index].gram for index in group}


def _recording(calls: list[LayerCall], hidden_states: list[Tensor] | None):
    """A forward pre-hook (with kwargs) appending what the layer receives to ``calls``, and its
    hidden states to ``hidden_states`` where given."""
    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, call = LayerCall.of(args, kwargs)
        calls.append(call)
        if hidden_states is not None:
            hidden_states.append(hidden)
    return hook


@torch.no_grad()
def layer_calls(model: nn.Module, tokens: Tensor, batch_size: int = 8
                ) -> tuple[list[Tensor], list[list[LayerCall]]]:
    """One pass of ``tokens`` through the decoder, batch by batch: the hidden states entering
    the first layer, and per layer and batch what it receives besides its hidden states, so
    that the layers can be run again one at a time (``call.run(layer, hidden)``), each with its
    own mask and position embeddings (sliding-window layers differ from global ones)."""
    view = FFNView(model)
    entering: list[Tensor] = []
    calls: list[list[LayerCall]] = [[] for _ in range(view.num_layers)]
    handles = [layer.register_forward_pre_hook(
        _recording(calls[index], entering if index == 0 else None), with_kwargs=True)
        for index, layer in enumerate(view.layers)]
    _run_batches(model, tokens, batch_size, handles, progress=False)
    return entering, calls


def _run_batches(model: nn.Module, tokens: Tensor, batch_size: int, handles: list,
                 progress: bool) -> None:
    """Run ``tokens`` through the decoder (not the head) ``batch_size`` sequences at a time,
    for the hooks behind ``handles``, which are removed afterwards."""
    device = input_device(model)
    try:
        for start in tqdm(range(0, tokens.shape[0], batch_size), desc="statistics",
                          disable=not progress, leave=False):
            backbone(model)(tokens[start:start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()


def _accumulating(stats: LayerStatistics):
    """A forward pre-hook adding the module's input activations to ``stats``."""
    def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        activation = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float().cpu()
        add_activations(stats, activation)
    return hook


def wanda_product(model: nn.Module, mean_squares: list[Tensor]) -> list[Tensor]:
    """Per layer ``mean a_i^2 * ||first-matrix row i||^2`` (float32) from each neuron's mean
    squared activation: the default's Wanda-style score, whether the mean squares come from the
    refit's statistics or from the selection's own pass over the probe."""
    view = FFNView(model)
    return [layer_wanda_product(view, i, mean_square) for i, mean_square in enumerate(mean_squares)]


def layer_wanda_product(view: FFNView, layer_index: int, mean_square: Tensor) -> Tensor:
    """:func:`wanda_product` of one layer."""
    return mean_square.float() * view.first_matrix(layer_index, "cpu").norm(dim=1).pow(2)


def wanda_scores(model: nn.Module, stats: list[LayerStatistics]) -> list[Tensor]:
    """:func:`wanda_product` read from the statistics (the sums of squares over the count)."""
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
