"""``prunenet``: the paper's method. A policy trained by REINFORCE on the FFN weights alone keeps
each pruned first FFN matrix's singular-value spectrum (docs/method.md).

The policy (:mod:`.policy`), the spectral reward (:mod:`.spectral`) and the training
(:mod:`.reinforce`) live here. Training reads only each layer's first FFN matrix, so it works on
a streamed checkpoint one layer at a time. A trained policy prunes any model with the same FFN
shapes at any ratio.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ...errors import InputError, NumericalError
from ...model_view import FFNView, check_finite
from ..base import FFNWeights, Selector, Source, top_rows
from .policy import PrunePolicy, keep_probabilities, policy_checksum, sample_rows
from .reinforce import TrainingConfig, TrainingResult, make_generator, train_policy_on_matrices

SELECTIONS = ("sample", "topk")


def check_finite_weights(view: FFNView) -> None:
    """Raise naming the first FFN tensor that holds NaN or Inf."""
    for index, layer in enumerate(view.layers):
        for cut in view.family.cuts:
            try:
                tensor = layer.get_parameter(cut.name)
            except AttributeError:
                continue
            check_finite(view.family.tensor_name(index, cut), tensor)


class LayerMatrices(Sequence):
    """Lazy sequence of first FFN matrices: indexing reads that layer again, every time (a
    streamed checkpoint reads it from disk), so memory stays at about one layer."""

    def __init__(self, weights: FFNWeights, device: torch.device | str) -> None:
        self.weights = weights
        self.device = device

    def __len__(self) -> int:
        return self.weights.num_layers

    def __getitem__(self, index: int) -> Tensor:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self.weights.first_matrix(index % len(self), self.device)


def train_on(weights: FFNWeights, config: TrainingConfig, device: torch.device, *,
             in_memory: bool, progress: bool = True,
             state_path: str | os.PathLike | None = None, resume: bool = False) -> TrainingResult:
    """Train a policy on ``weights``' first FFN matrices: all held on ``device`` when
    ``in_memory``, else read one layer at a time whenever used."""
    if in_memory:
        check_finite_weights(weights)
        matrices = [weights.first_matrix(i, device) for i in range(weights.num_layers)]
        return train_policy_on_matrices(matrices, config, progress=progress,
                                        state_path=state_path, resume=resume)
    return train_policy_on_matrices(LayerMatrices(weights, device), config, progress=progress,
                                    state_path=state_path, resume=resume, keep_matrices=False)


class PruneNet(Selector):
    """The paper's policy: ``policy`` when given, else one trained with ``training`` first.

    ``selection``: the final kept rows are a seeded sample of the keep probabilities (the
    reference) or the top-k rows by keep score. After :meth:`select`, ``policy`` and (when it
    trained) ``training`` hold what ran.
    """

    name = "prunenet"
    summary = ("PruneNet (the paper): a REINFORCE policy keeps each first FFN matrix's "
               "singular-value spectrum; weights only, reusable at any ratio")
    seeded = True  # its training, and rows sampled from the policy

    def __init__(self, policy: PrunePolicy | None = None, training: TrainingConfig | None = None,
                 selection: str = "sample", state_path: str | os.PathLike | None = None,
                 resume: bool = False) -> None:
        if selection not in SELECTIONS:
            raise InputError(f"unknown selection {selection!r}; use 'sample' or 'topk'")
        self.policy = policy
        self.training_config = training or TrainingConfig()
        self.selection = selection
        self.state_path = state_path
        self.resume = resume
        self.training: TrainingResult | None = None

    def reads_seed(self) -> bool:
        """A given policy's top-k rows draw nothing; training or sampling does."""
        return self.policy is None or self.selection != "topk"

    def train(self, source: Source) -> PrunePolicy:
        """Train the policy (unless one was given) and return it."""
        if self.policy is None:
            self.training = train_on(source.weights, self.training_config, source.device,
                                     in_memory=isinstance(source.weights, FFNView),
                                     progress=source.progress, state_path=self.state_path,
                                     resume=self.resume)
            self.policy = self.training.policy
        return self.policy

    def select(self, source: Source, kept: int, seed: int) -> list[Tensor]:
        weights, device = source.weights, source.device
        policy = self.train(source).to(device)
        policy.check_fits(weights.d_model, weights.d_ff)
        generator = make_generator(seed, device)
        rows = []
        with torch.no_grad():
            for index in tqdm(range(weights.num_layers), desc="selecting rows", leave=False,
                              disable=not source.progress):
                logits = policy.keep_logits(weights.first_matrix(index, device))
                if self.selection == "topk":  # by logit: alpha saturates to ties at 1.0
                    rows.append(top_rows(logits, kept, index).cpu())
                else:
                    if logits.isnan().any():  # no probability to draw with (an inf one is 0 or 1)
                        raise NumericalError(
                            f"layer {index}: the policy's keep scores are NaN on this model's "
                            "weights (its parameters overflow there), so no neurons can be "
                            "drawn; nothing was written. Train a policy for this model with a "
                            "lower --lr")
                    noise = torch.rand(weights.d_ff, generator=generator, device=device)
                    rows.append(sample_rows(keep_probabilities(torch.sigmoid(logits), noise),
                                            kept, generator).cpu())
        return rows

    def record(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "selection": self.selection,
            "policy_sha256": policy_checksum(self.policy) if self.policy is not None else None,
        }
        if self.training is not None:
            training = self.training
            record["training"] = {
                **dict(vars(training.config)),
                "best_episode": training.best_episode,
                "episode_total_reward": [r.total_reward for r in training.history],
                "episode_mean_ks": [r.mean_ks for r in training.history],
            }
        return record
