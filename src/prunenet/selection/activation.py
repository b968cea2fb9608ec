"""The calibration-based reference selection ``activation`` (Wanda-style, structured).

Score of FFN neuron i of a layer = ||first-matrix row i||_2 x ||a_i||_2, where a_i is the neuron's
activation (the value it feeds into the second / down matrix) over every token of
``windows`` calibration windows. The windows come from the corpus's training region
(:meth:`TokenCorpus.training_windows`), never from its evaluation windows. Unlike PruneNet this
needs text and forward passes of the model: it shows what calibration buys or costs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..evaluation.corpora import TokenCorpus, load_corpus, recorded_corpus
from ..families import context_length
from ..model_view import FFNView, squared_activation_sums
from .base import Selector, Source, top_rows


@dataclass(frozen=True)
class Calibration:
    """Which text the ``activation`` baseline sees: ``windows`` windows of ``seqlen`` tokens."""

    corpus: str = "wiki"
    windows: int = 16
    seqlen: int = 1024

    def validate(self) -> None:
        if self.windows < 1 or self.seqlen < 2:
            raise InputError(
                f"calibration needs at least 1 window of at least 2 tokens, got {self.windows} "
                f"x {self.seqlen}"
            )


log = logging.getLogger(__name__)


def fitted_calibration(config: Any, calibration: Calibration) -> Calibration:
    """``calibration`` with its windows cut to the model's context where it is shorter (said
    once in the log; the record then names the length that ran)."""
    context = context_length(config)
    if context is None or calibration.seqlen <= context:
        return calibration
    log.warning("calibration windows of %d tokens: the model's context (the default is %d)",
                context, calibration.seqlen)
    return replace(calibration, seqlen=context)


def calibration_windows(corpus: TokenCorpus, calibration: Calibration) -> Tensor:
    """The first ``calibration.windows`` training windows of ``corpus`` (never evaluation ones)."""
    windows = corpus.training_windows(calibration.seqlen)
    if calibration.windows > windows.shape[0]:
        raise InputError(
            f"corpus {corpus.name!r} holds {windows.shape[0]} calibration windows of "
            f"{calibration.seqlen} tokens; asked for {calibration.windows}; give "
            f"--calibration-windows {windows.shape[0]} or fewer, or a longer --calibration-corpus"
        )
    return windows[: calibration.windows]


def calibration_text(tokenizer: Any, calibration: Calibration) -> Tensor:
    """The calibration windows ``tokenizer`` reads from ``calibration``'s corpus; refused
    without a tokenizer, or with too little text for the windows asked for."""
    if tokenizer is None:
        raise InputError("method 'activation' needs the model's tokenizer to read calibration text")
    return calibration_windows(load_corpus(calibration.corpus, tokenizer), calibration)


def activation_norms(model: nn.Module, windows: Tensor, progress: bool = True) -> list[Tensor]:
    """Per layer, the L2 norm of each FFN neuron's activation over all tokens of ``windows``."""
    sums = squared_activation_sums(model, windows, torch.float64, progress, "calibration")
    return [total.sqrt().float() for total in sums]


class Activation(Selector):
    name = "activation"
    summary = ("calibration-based Wanda-style reference: row norm x activation norm on "
               "training windows of a corpus (needs data)")
    needs_model = True
    needs_data = True

    def __init__(self, calibration: Calibration | None = None, windows: Tensor | None = None,
                 norms: list[Tensor] | None = None) -> None:
        """``windows``: the calibration text already read (:func:`calibration_text`, with
        ``calibration`` fitted to the model), else read when selecting. ``norms``: the
        activation norms on ``windows`` of the model it selects for (or of a model with the
        same weights), already computed (:func:`activation_norms`), else computed when
        selecting: a compare computes them once and selects at every ratio from them."""
        self.calibration = calibration or Calibration()
        self.calibration.validate()
        if norms is not None and windows is None:
            raise ValueError("activation norms are given with the windows they were read on")
        self.windows = windows
        self.norms = norms

    def select(self, source: Source, kept: int, seed: int) -> list[Tensor]:
        self.calibration = fitted_calibration(source.model.config, self.calibration)
        return activation_rows(source.model, source.tokenizer, kept, self.calibration,
                               source.progress, self.windows, self.norms)

    def record(self) -> dict[str, Any]:
        """The calibration that ran: a corpus file by its absolute path (the card's command
        reads the same text from any folder)."""
        return {"calibration": {**vars(self.calibration),
                                "corpus": recorded_corpus(self.calibration.corpus)}}


def activation_rows(model: nn.Module, tokenizer: Any, kept: int, calibration: Calibration,
                    progress: bool = True, windows: Tensor | None = None,
                    norms: list[Tensor] | None = None) -> list[Tensor]:
    """The ``kept`` neurons per layer with the largest row-norm x activation-norm score, on
    ``windows`` (None: read from ``calibration`` with ``tokenizer``), from their activation
    ``norms`` (None: computed here, one pass of ``model`` over ``windows``)."""
    if norms is None:
        if windows is None:
            windows = calibration_text(tokenizer, calibration)
        norms = activation_norms(model, windows, progress)
    view = FFNView(model)
    rows = []
    for index in range(view.num_layers):
        row_norms = view.first_matrix(index, "cpu").norm(dim=1)
        rows.append(top_rows(row_norms * norms[index], kept, index))
    return rows
