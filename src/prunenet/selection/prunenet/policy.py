"""The PruneNet policy ("action model") and row sampling (docs/method.md, section 2).

One small network shared by every layer: a linear map P (d_ff x d_model) with bias b, and a vector
v (d_ff). Given a layer's first FFN matrix W (d_ff x d_model) it scores each row:
``alpha = sigmoid((W P^T + 1 b^T) v)``. By associativity this is ``sigmoid(W (P^T v) + b.v)``,
computed here without the d_ff x d_ff intermediate of the reference code.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor, nn

from ...errors import PolicyMismatchError

# Probabilities are kept this far inside (0, 1) so logits and logs stay finite in fp32.
PROBABILITY_EPS = 1e-6


class PrunePolicy(nn.Module):
    """Scores the rows of a first FFN matrix; shapes fixed by (d_model, d_ff)."""

    def __init__(self, d_model: int, d_ff: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_ff = d_ff
        self.projection = nn.Parameter(torch.empty(d_ff, d_model))
        self.bias = nn.Parameter(torch.empty(d_ff))
        self.row_weights = nn.Parameter(torch.empty(d_ff))
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """nn.Linear's default init for (P, b) (uniform in +-1/sqrt(d_model)); v uniform [0, 1)."""
        bound = 1.0 / math.sqrt(self.d_model)
        self.projection.uniform_(-bound, bound, generator=generator)
        self.bias.uniform_(-bound, bound, generator=generator)
        self.row_weights.uniform_(0.0, 1.0, generator=generator)

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> PrunePolicy:
        """A policy holding exactly ``tensors`` (projection, bias, row_weights)."""
        d_ff, d_model = tensors["projection"].shape
        policy = cls(d_model, d_ff, generator=torch.Generator().manual_seed(0))
        policy.load_state_dict({name: value.float() for name, value in tensors.items()})
        return policy

    def check_fits(self, d_model: int | None, d_ff: int) -> None:
        """Refuse a model of another shape; ``d_model`` None: only its FFN width is known yet
        (declared in its config, before it loads)."""
        if d_ff != self.d_ff or d_model not in (None, self.d_model):
            has = f"d_ff={d_ff}" if d_model is None else f"d_model={d_model}, d_ff={d_ff}"
            raise PolicyMismatchError(
                f"policy expects d_model={self.d_model}, d_ff={self.d_ff}; this model has "
                f"{has}. Train a policy for this model (train-policy)."
            )

    def keep_logits(self, first_matrix: Tensor) -> Tensor:
        """``W (P^T v) + b.v``, one per row, in O(d_ff * d_model): alpha before its sigmoid.

        Ranks rows as alpha does, also where a trained policy's alpha rounds to 1.0 in float32.
        """
        self.check_fits(first_matrix.shape[1], first_matrix.shape[0])
        direction = self.projection.T @ self.row_weights  # d_model
        return (first_matrix @ direction + self.bias @ self.row_weights).float()

    def keep_scores(self, first_matrix: Tensor) -> Tensor:
        """alpha in (0, 1), one per row, in O(d_ff * d_model): ``sigmoid(W (P^T v) + b.v)``."""
        return torch.sigmoid(self.keep_logits(first_matrix))

    def keep_scores_reference(self, first_matrix: Tensor) -> Tensor:
        """The reference formulation with its d_ff x d_ff product; for tests and benchmarks."""
        self.check_fits(first_matrix.shape[1], first_matrix.shape[0])
        projected = first_matrix @ self.projection.T + self.bias  # d_ff x d_ff
        return torch.sigmoid((projected @ self.row_weights).float())


def keep_probabilities(alpha: Tensor, noise: Tensor) -> Tensor:
    """Relaxed-Bernoulli keep probabilities ``sigmoid(logit(eps) + logit(alpha))``, in fp32.

    Both inputs are clamped strictly inside (0, 1) first, so the result is finite and positive
    (the reference fails with "invalid multinomial distribution" under fp16).
    """
    alpha = alpha.float().clamp(PROBABILITY_EPS, 1 - PROBABILITY_EPS)
    noise = noise.float().clamp(PROBABILITY_EPS, 1 - PROBABILITY_EPS)
    probabilities = torch.sigmoid(torch.logit(noise) + torch.logit(alpha))
    return probabilities.clamp(PROBABILITY_EPS, 1 - PROBABILITY_EPS)


def sample_rows(probabilities: Tensor, kept: int, generator: torch.Generator | None) -> Tensor:
    """``kept`` distinct row indices drawn without replacement, weighted by ``probabilities``."""
    if not torch.isfinite(probabilities).all():
        raise FloatingPointError("non-finite keep probabilities")
    rows = torch.multinomial(probabilities.detach(), kept, replacement=False, generator=generator)
    return rows.sort().values


def policy_checksum(policy: PrunePolicy) -> str:
    """sha256 of the policy's parameters by name: its identity in records and policy files."""
    digest = hashlib.sha256()
    for name, tensor in sorted(policy.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
