"""Perplexity: mean token negative log-likelihood over evaluation windows, exponentiated."""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import NumericalError
from ..model_view import input_device


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: Tensor, batch_size: int = 1, progress: bool = True
) -> float:
    """``exp(mean NLL)`` of every next-token prediction inside each window (count x seqlen).

    Each window is scored independently; the first position is context only, so every window
    contributes ``seqlen - 1`` predictions. Raises :class:`NumericalError` when the model's loss
    is not finite (its outputs hold NaN or Inf), or when its mean is so large that its exponential
    exceeds the largest float: no such number is ever reported or saved.
    """
    device = input_device(model)  # the CPU where the first weights are offloaded
    total_nll, total_tokens = 0.0, 0
    batches = range(0, windows.shape[0], batch_size)
    for start in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch).logits.float()
        nll = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        if not math.isfinite(float(nll)):
            raise NumericalError(f"the model's loss on evaluation window {start} is {float(nll)}: "
                                 "its outputs hold NaN or Inf, so it has no perplexity")
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
    mean = total_nll / total_tokens
    try:
        return math.exp(mean)
    except OverflowError:
        raise NumericalError(
            f"the model's mean loss on {windows.shape[0]} evaluation windows is {mean:.4g} nats "
            f"per token, and its exponential, the perplexity, exceeds the largest float "
            f"({sys.float_info.max:.3g}): it predicts the text far worse than a uniform guess "
            "(its weights are damaged, or pruned past use), so it has no perplexity to "
            "report") from None
