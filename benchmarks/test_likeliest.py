"""The probe filter of benchmarks/quality_reconstruct.py (--keep-likely): each sequence's loss is
the model's own language-modelling loss on it, and the filter keeps the sequences of lowest loss
in their original order."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_reconstruct import likeliest, sequence_losses  # noqa: E402
from test_aggregate_scores import _model  # noqa: E402  (the same tiny LLaMA)


def test_sequence_losses_are_the_models_loss_on_each_sequence():
    model = _model()
    ids = torch.randint(0, 64, (5, 12), generator=torch.Generator().manual_seed(1))
    losses = sequence_losses(model, ids)
    with torch.no_grad():
        expected = [model(row[None], labels=row[None]).loss for row in ids]
    assert torch.allclose(losses, torch.stack(expected), rtol=1e-6, atol=0)
    assert len(set(losses.tolist())) == 5


def test_likeliest_keeps_the_lowest_losses_in_their_order():
    model = _model()
    ids = torch.randint(0, 64, (7, 12), generator=torch.Generator().manual_seed(2))
    losses = sequence_losses(model, ids).tolist()
    kept = likeliest(model, ids, 3)
    lowest = sorted(sorted(range(7), key=losses.__getitem__)[:3])
    assert torch.equal(kept, ids[lowest])
