"""The calibration-based reference selection ``activation`` (Wanda-style, structured).

Score of FFN neuron i of a layer = ||first-matrix row i||_2 x ||a_i||_2, where a_i is the neuron's
activation (the value it feeds into the second / down matrix) over every token of
``windows`` calibration windows. The windows come from the corpus's training region
(:meth:`TokenCorpus.training_windows`), never from its evaluation windows. Unlike PruneNet this
needs text and forward passes of the model: it shows what calibration buys or costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .errors import InputError
from .evaluation.corpora import TokenCorpus, load_corpus
from .model_view import FFNView
from .policy import top_rows


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


def calibration_windows(corpus: TokenCorpus, calibration: Calibration) -> Tensor:
    """The first ``calibration.windows`` training windows of ``corpus`` (never evaluation ones)."""
    windows = corpus.training_windows(calibration.seqlen)
    if calibration.windows > windows.shape[0]:
        raise InputError(
            f"corpus {corpus.name!r} holds {windows.shape[0]} calibration windows of "
            f"{calibration.seqlen} tokens; asked for {calibration.windows}"
        )
    return windows[: calibration.windows]


def second_matrix_module(view: FFNView, layer_index: int) -> nn.Module:
    """The module whose input is the FFN's intermediate activation (down_proj, fc2, c_proj...)."""
    family = view.family
    second = [cut for cut in family.cuts
              if cut.name.endswith(".weight") and cut.axis != family.first.axis]
    return view.layers[layer_index].get_submodule(second[0].name.rsplit(".", 1)[0])


@torch.no_grad()
def squared_activation_sums(model: nn.Module, tokens: Tensor, dtype: torch.dtype,
                            progress: bool = False, desc: str = "activations") -> list[Tensor]:
    """Per layer, the sum over every token of ``tokens`` (sequences x length) of each FFN
    neuron's squared activation, read at the input of the second FFN matrix and accumulated in
    ``dtype`` on the CPU. One forward pass per sequence."""
    view = FFNView(model)
    sums = [torch.zeros(view.d_ff, dtype=dtype) for _ in range(view.num_layers)]

    def accumulate(index: int):
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            activation = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            sums[index] += activation.to(dtype).pow(2).sum(0).cpu()
        return hook

    handles = [second_matrix_module(view, i).register_forward_pre_hook(accumulate(i))
               for i in range(view.num_layers)]
    device = next(model.parameters()).device
    try:
        for sequence in tqdm(tokens, desc=desc, disable=not progress, leave=False):
            model(sequence.unsqueeze(0).to(device))
    finally:
        for handle in handles:
            handle.remove()
    return sums


def activation_norms(model: nn.Module, windows: Tensor, progress: bool = True) -> list[Tensor]:
    """Per layer, the L2 norm of each FFN neuron's activation over all tokens of ``windows``."""
    sums = squared_activation_sums(model, windows, torch.float64, progress, "calibration")
    return [total.sqrt().float() for total in sums]


def activation_rows(model: nn.Module, tokenizer: Any, kept: int,
                    calibration: Calibration | None = None, progress: bool = True) -> list[Tensor]:
    """The ``kept`` neurons per layer with the largest row-norm x activation-norm score."""
    calibration = calibration or Calibration()
    calibration.validate()
    if tokenizer is None:
        raise InputError("method 'activation' needs the model's tokenizer to read calibration text")
    corpus = load_corpus(calibration.corpus, tokenizer)
    norms = activation_norms(model, calibration_windows(corpus, calibration), progress)
    view = FFNView(model)
    rows = []
    for index in range(view.num_layers):
        row_norms = view.first_matrix(index, "cpu").norm(dim=1)
        rows.append(top_rows(row_norms * norms[index], kept))
    return rows
