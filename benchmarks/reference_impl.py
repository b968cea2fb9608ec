"""The reference formulation of PruneNet's policy training, re-implemented for timing.

This mirrors what the authors' code (LCS2-IIITD/PruneNet, experiments/prunenet.py) does per
episode, so that ``benchmarks/speed.py`` compares prunenet against the same work on the same
machine:

- a deep copy of the whole model at the start of every episode, and a deep copy of each layer's
  first FFN matrix as the "state";
- the policy's d_ff x d_ff intermediate: ``sigmoid((W P^T + b) v)`` through an ``nn.Linear``;
- slicing the copied model's FFN modules, then a full SVD (U, S and V) of the sliced matrix;
- ``scipy.stats.ks_2samp`` on the singular values, reward ``1/KS`` (99999 when KS = 0),
  discount ``gamma^l``, one AdamW step per layer; gradient clipping after the step, where it
  does nothing (as in the reference).

Differences, all in the reference's favour on this machine: fp32 throughout (the reference runs
the policy under fp16 autocast, which is a GPU feature) and no GradScaler (CUDA only).
"""

from __future__ import annotations

import copy
import time

import torch
from scipy import stats
from torch import Tensor, nn

from prunenet.families import Family, kept_count
from prunenet.slicing import slice_layer

ZERO_KS_REWARD = 99999.0
GAMMA = 0.99


class ReferencePolicy(nn.Module):
    """The reference "SparsityPredictor": a Linear(d_model -> d_ff) and a (d_ff, 1) column."""

    def __init__(self, d_model: int, d_ff: int, generator: torch.Generator) -> None:
        super().__init__()
        self.proj_intermediate = nn.Linear(d_model, d_ff, bias=True)
        self.row_sparsities = nn.Parameter(torch.rand(d_ff, 1, generator=generator))

    def forward(self, weight: Tensor, generator: torch.Generator) -> Tensor:
        projected = self.proj_intermediate(weight)  # d_ff x d_ff: the costly intermediate
        alpha = torch.sigmoid(projected @ self.row_sparsities)[:, 0]
        eps = torch.rand(alpha.shape[0], generator=generator, device=alpha.device)
        return torch.sigmoid(torch.log(eps) - torch.log(1 - eps) + torch.log(alpha)
                             - torch.log(1 - alpha))


def full_svd_values(weight: Tensor) -> Tensor:
    """Singular values through a full SVD with U and V, as the reference computes them."""
    _, values, _ = torch.linalg.svd(weight.float(), full_matrices=False)
    return values


def reference_ks(original_values: Tensor, sliced_weight: Tensor) -> float:
    """KS statistic as the reference computes it: full SVD of the slice, then scipy."""
    return float(stats.ks_2samp(original_values.detach().cpu().numpy(),
                                full_svd_values(sliced_weight).detach().cpu().numpy()).statistic)


def reference_reward(original_values: Tensor, sliced_weight: Tensor) -> float:
    ks = reference_ks(original_values, sliced_weight)
    return ZERO_KS_REWARD if ks == 0 else 1.0 / ks


def train_reference(model: nn.Module, family: Family, ratio: float, episodes: int,
                    lr: float = 1e-3, seed: int = 42) -> list[float]:
    """Train the reference policy on ``model``'s decoder layers (found at ``family.layers``).

    ``model`` is deep-copied every episode, as in the reference. Runs on ``model``'s device.
    Returns each episode's seconds (on CUDA, synchronized).
    """
    torch.manual_seed(seed)
    layer_list = list(model.get_submodule(family.layers))
    first = layer_list[0].get_parameter(family.first.name)
    d_ff, d_model = first.shape
    device = first.device
    kept = kept_count(d_ff, ratio)
    policy = ReferencePolicy(d_model, d_ff, torch.Generator().manual_seed(seed)).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    original_values = [full_svd_values(layer.get_parameter(family.first.name).detach())
                       for layer in layer_list]
    seconds = []
    for _ in range(episodes):
        started = time.perf_counter()
        episode_model = copy.deepcopy(model)  # "get a fresh copy of the model"
        states, actions, rewards = [], [], []
        for index, layer in enumerate(episode_model.get_submodule(family.layers)):
            state = copy.deepcopy(layer.get_parameter(family.first.name).detach())
            with torch.no_grad():
                probabilities = policy(state, generator)
            rows = torch.multinomial(probabilities, kept, replacement=False,
                                     generator=generator).sort().values
            slice_layer(layer, family, rows, d_ff)
            sliced = layer.get_parameter(family.first.name).detach()
            rewards.append(reference_reward(original_values[index], sliced))
            states.append(state)
            actions.append(rows)
        discounted = [GAMMA**index * reward for index, reward in enumerate(rewards)]
        for state, rows, weight in zip(states, actions, discounted):
            probabilities = policy(state, generator)
            loss = -torch.gather(torch.log(probabilities), 0, rows).sum() * weight
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        del episode_model
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds
