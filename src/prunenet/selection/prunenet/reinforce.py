"""REINFORCE over layers (docs/method.md, section 4): episodes, spectral rewards, discounting,
updates, best policy.

Works on first FFN matrices and kept-row index sets only: no model copy, no forward pass of the LLM.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import numbers
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ...arithmetic import check_seed
from ...errors import InputError, NumericalError, OutputError, first_line
from ...families import kept_count
from ...io.files import atomic_file
from .policy import PrunePolicy, keep_probabilities, sample_rows
from .spectral import PRECISIONS, LayerSpectrum

log = logging.getLogger(__name__)

# AdamW divides the rate by its bias correction (down to 1e-3) in float32: keep that finite.
MAX_LEARNING_RATE = 1e30
# Reward when the sliced spectrum's KS distance is exactly 0 (the reference's constant).
ZERO_KS_REWARD = 99999.0


def check_trainable_ratio(ratio: float) -> None:
    """Refuse training a policy at ratio 0: no neuron is removed, every spectrum is kept
    whatever the policy does, and it learns nothing."""
    if float(ratio) == 0.0:
        raise InputError("a PruneNet policy trains at a ratio above 0: at ratio 0 no neuron is "
                         "removed, every spectrum is kept whatever the policy does, and it "
                         "learns nothing; train at the ratio you prune at")


def _check_number(name: str, value: object, most: float) -> None:
    """Refuse ``value`` unless it is a number in (0, ``most``]: no string, bool or NaN."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not 0 < value <= most:
        raise InputError(f"{name} must be in (0, {most:g}], got {value!r}")


@dataclass
class TrainingConfig:
    """Every setting of a policy-training run. Defaults follow the reference code."""

    ratio: float = 0.3
    episodes: int = 20
    lr: float = 1e-3
    seed: int = 42
    gamma: float = 0.99
    reward: str = "inverse"  # "inverse": 1/KS (reference); "penalty": -KS (the paper's wording)
    reward_to_go: bool = False  # reference: per-layer discounted reward, no reward-to-go
    baseline: str = "none"  # "none" (reference) or "mean": subtract the episode's mean return
    kld: bool = False  # the reference's optional --use_kld regulariser
    clip_norm: float = 1.0  # gradient-norm clipping, applied BEFORE the optimizer step
    spectral: str = "gram"  # "gram" (fast, same KS) or "svd" (reference computation)
    precision: str = "auto"  # Gram path: "auto" (float32 if well conditioned), float32, float64

    def validate(self) -> None:
        """Refuse a setting training cannot run as recorded, and make the numbers and flags
        plain Python values (a numpy number is recorded, and written to JSON, as a number)."""
        check_seed(self.seed)
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
            raise InputError(f"ratio must be a number in [0, 1), got {self.ratio!r}")
        if not 0.0 <= float(self.ratio) < 1.0:
            raise InputError(f"ratio must be in [0, 1), got {self.ratio}")
        if isinstance(self.episodes, bool) or not isinstance(self.episodes, numbers.Integral):
            raise InputError(f"episodes must be a whole number, got {self.episodes!r}")
        if self.episodes < 1:
            raise InputError(f"episodes must be at least 1, got {self.episodes}")
        _check_number("learning rate", self.lr, MAX_LEARNING_RATE)
        _check_number("gamma", self.gamma, 1.0)
        # the most a float32 gradient norm reaches: a larger bound, or inf, clips nothing
        _check_number("clip_norm", self.clip_norm, float(torch.finfo(torch.float32).max))
        for name in ("reward_to_go", "kld"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.reward not in ("inverse", "penalty"):
            raise InputError(f"reward must be 'inverse' or 'penalty', got {self.reward!r}")
        if self.baseline not in ("none", "mean"):
            raise InputError(f"baseline must be 'none' or 'mean', got {self.baseline!r}")
        if self.spectral not in ("gram", "svd"):
            raise InputError(f"spectral must be 'gram' or 'svd', got {self.spectral!r}")
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {self.precision!r}")
        self.seed, self.episodes = int(self.seed), int(self.episodes)
        self.lr, self.gamma, self.clip_norm = float(self.lr), float(self.gamma), \
            float(self.clip_norm)


@dataclass
class EpisodeRecord:
    episode: int
    total_reward: float  # undiscounted sum over layers
    mean_ks: float
    loss: float
    seconds: float
    skipped_updates: int = 0
    layer_ks: list[float] = field(default_factory=list)


@dataclass
class TrainingResult:
    policy: PrunePolicy  # the policy that acted in the best episode
    best_episode: int
    history: list[EpisodeRecord]
    config: TrainingConfig
    device: str = "cpu"  # the device type it trained on: its noise and arithmetic belong to it

    def history_dicts(self) -> list[dict]:
        return [asdict(record) for record in self.history]


def reward_of(ks: float, form: str) -> float:
    if form == "penalty":
        return -ks
    return ZERO_KS_REWARD if ks == 0 else 1.0 / ks


def returns_of(rewards: Sequence[float], config: TrainingConfig) -> list[float]:
    """Per-layer weights of the log-likelihood: discounted rewards, optional reward-to-go/baseline.

    Reference: ``gamma^l * R(l)``. Reward-to-go: ``sum_{j>=l} gamma^(j-l) R(j)``.
    """
    if config.reward_to_go:
        returns, running = [0.0] * len(rewards), 0.0
        for index in reversed(range(len(rewards))):
            running = rewards[index] + config.gamma * running
            returns[index] = running
    else:
        returns = [config.gamma**index * reward for index, reward in enumerate(rewards)]
    if config.baseline == "mean":
        mean = sum(returns) / len(returns)
        returns = [value - mean for value in returns]
    return returns


def kld_regulariser(alpha: Tensor) -> Tensor:
    """The reference's optional term: sum of ``-(1-a) log a - a log(1-a) + log 0.5``."""
    alpha = alpha.clamp(1e-6, 1 - 1e-6)
    return (-(1 - alpha) * torch.log(alpha) - alpha * torch.log(1 - alpha) + math.log(0.5)).sum()


def _noise(size: int, generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(size, generator=generator, device=device)


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator


# Settings that must agree between an interrupted run and its resumption.
_RESUME_FIELDS = ("ratio", "lr", "seed", "gamma", "reward", "reward_to_go", "baseline", "kld",
                  "clip_norm", "spectral", "precision")


def _save_state(path: Path, state: dict) -> None:
    """Write the training state atomically (tmp file + rename): a reader never sees half. A
    write that fails (a full disk: torch reports it as a RuntimeError) is an
    :class:`OutputError`; the state saved before it, if any, stays for ``--resume``."""
    try:
        with atomic_file(path) as tmp:
            torch.save(state, tmp)
    except (OSError, RuntimeError) as error:
        raise OutputError(f"cannot write the policy's training state {path} "
                          f"({first_line(error)}); is the disk full? Free space and run again "
                          "with --resume") from error


def matrices_fingerprint(first_matrices: Sequence[Tensor]) -> str:
    """Identity of the model a state was trained on: a hash of the layer count and the first
    and last layers' first FFN matrices (two models of the same shapes differ in it)."""
    digest = hashlib.sha256(str(len(first_matrices)).encode())
    for matrix in (first_matrices[0], first_matrices[len(first_matrices) - 1]):
        digest.update(str(tuple(matrix.shape)).encode())
        digest.update(matrix.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def is_training_state(path: Path) -> bool:
    """Whether ``path`` is a training state prunenet saved (read without unpickling code)."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001  (anything unreadable is not ours)
        return False
    return isinstance(state, dict) and {"config", "history", "policy"} <= set(state)


def check_resumable(state_path: str | os.PathLike | None) -> None:
    """Refuse ``--resume`` where no training state was saved, or none is kept (no
    ``state_path``): there is nothing to continue. Called before the model loads, and by the
    training itself."""
    if state_path is None:
        raise InputError("resume continues from a saved training state, and none is kept "
                         "here: give the state_path the interrupted run saved to")
    if not Path(state_path).exists():
        raise InputError(f"nothing to resume: no training state was saved at {state_path}; "
                         "drop --resume to start afresh")


def _load_state(path: Path, config: TrainingConfig, shapes: tuple[int, int],
                fingerprint: str, device: str) -> dict:
    try:
        state = torch.load(path, weights_only=True)  # tensors and plain values only, no pickles
    except Exception as error:  # noqa: BLE001  (any failure means an unusable state file)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(
            f"cannot resume from {path}: not a readable training state ({reason})"
        ) from error
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise InputError(f"cannot resume from {path}: not a prunenet training state")
    saved = state.get("config", {})
    different = [name for name in _RESUME_FIELDS if saved.get(name) != getattr(config, name)]
    if tuple(state.get("shapes", ())) != shapes:
        different.append("model FFN shapes")
    if state.get("source") != fingerprint:
        different.append("model weights (it belongs to another model)")
    if different:
        raise InputError(
            f"cannot resume from {path}: it was trained with different {', '.join(different)}; "
            "rerun with the same settings, or without --resume to start afresh"
        )
    saved_on = state.get("device")  # states saved before it was recorded: not checked
    if saved_on is not None and saved_on != device:
        # its generator's state and its arithmetic belong to that device: a resume elsewhere
        # could neither restore the one nor end as the uninterrupted run
        raise InputError(
            f"cannot resume from {path}: it was trained on {saved_on}, this run is on {device}; "
            f"resume on {saved_on} (--device {saved_on}), or start afresh without --resume"
        )
    done = len(state.get("history", ()))
    if done > config.episodes:
        raise InputError(
            f"cannot resume from {path}: it already holds {done} episodes, more than "
            f"--episodes {config.episodes}; ask for at least {done}, or start afresh"
        )
    return state


def _diverged(state_file: Path | None, what: str) -> NumericalError:
    """The error of a run that diverged; its saved state goes, as resuming it with the same
    settings (which a resume must keep) would diverge the same way."""
    if state_file is not None:
        state_file.unlink(missing_ok=True)
    return NumericalError(f"{what}; lower the learning rate (--lr) or use --reward penalty"
                          + (" (the training state is removed: a resume would diverge too)"
                             if state_file is not None else ""))


def train_policy_on_matrices(
    first_matrices: Sequence[Tensor],
    config: TrainingConfig,
    *,
    policy: PrunePolicy | None = None,
    progress: bool = True,
    on_episode: Callable[[EpisodeRecord, PrunePolicy], None] | None = None,
    state_path: str | os.PathLike | None = None,
    resume: bool = False,
    keep_matrices: bool = True,
) -> TrainingResult:
    """Train a policy by REINFORCE on the first FFN matrices of every layer (all d_ff x d_model).

    Each episode samples kept rows for every layer from the current policy, scores each slice by
    the KS distance of its singular values to the original's, then takes one AdamW step per layer
    on ``-(sum log p_kept) * return``. Returns the policy that acted in the best episode (highest
    undiscounted total reward) with the whole history.

    With ``state_path``, the whole training state (policy, optimizer, random generator, history,
    best policy) is saved there after every episode; ``resume=True`` continues from it and ends
    exactly as an uninterrupted run with the same settings would.

    ``keep_matrices=False`` (streaming) keeps no matrix or Gram matrix between uses: pass a lazy
    sequence that reads each layer's matrix when indexed, and memory stays at about one layer.
    """
    config.validate()
    if resume:
        check_resumable(state_path)
    if not first_matrices:
        raise InputError("no layers to train on")
    d_ff, d_model = first_matrices[0].shape
    device = first_matrices[0].device
    kept = kept_count(d_ff, config.ratio)
    generator = make_generator(config.seed, device)
    if policy is None:
        init_generator = make_generator(config.seed, "cpu")
        policy = PrunePolicy(d_model, d_ff, generator=init_generator)
    policy = policy.to(device)
    policy.check_fits(d_model, d_ff)
    spectra = [LayerSpectrum(matrix, config.spectral, keep_matrices, config.precision)
               for matrix in tqdm(first_matrices, desc="original spectra", disable=not progress,
                                  leave=False)]
    # foreach: the multi-tensor AdamW, bit-identical to the default single-tensor one on CPU and
    # 1.5-4x faster at the 7B shape (tests/test_reinforce.py compares with the plain form).
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, foreach=True)

    history: list[EpisodeRecord] = []
    best_state, best_total, best_episode = None, -math.inf, -1
    state_file = Path(state_path) if state_path is not None else None
    fingerprint = matrices_fingerprint(first_matrices) if state_file is not None else ""
    if resume and state_file is not None:
        state = _load_state(state_file, config, (d_ff, d_model), fingerprint,
                            torch.device(device).type)
        policy.load_state_dict(state["policy"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        history = [EpisodeRecord(**record) for record in state["history"]]
        best_state, best_total, best_episode = state["best_policy"], state["best_total"], state[
            "best_episode"]
        log.info("resuming from %s after episode %d", state_file, len(history) - 1)
    episodes = tqdm(range(len(history), config.episodes), desc="policy episodes",
                    disable=not progress, initial=len(history), total=config.episodes)
    for episode in episodes:
        started = time.perf_counter()
        acting_state = copy.deepcopy(policy.state_dict())
        actions, layer_ks, rewards = [], [], []
        with torch.no_grad():
            for matrix, spectrum in zip(first_matrices, spectra):
                alpha = policy.keep_scores(matrix)
                probabilities = keep_probabilities(alpha, _noise(d_ff, generator, device))
                # A non-finite policy output must not crash sampling: act uniformly on those
                # rows; the layer's update then has a non-finite loss and is skipped (counted).
                probabilities = torch.where(probabilities.isfinite(), probabilities, 0.5)
                rows = sample_rows(probabilities, kept, generator)
                ks = spectrum.ks(rows, matrix)
                actions.append(rows)
                layer_ks.append(ks)
                rewards.append(reward_of(ks, config.reward))
        returns = returns_of(rewards, config)

        total_loss, skipped = 0.0, 0
        for matrix, rows, weight in zip(first_matrices, actions, returns):
            alpha = policy.keep_scores(matrix)
            probabilities = keep_probabilities(alpha, _noise(d_ff, generator, device))
            loss = -torch.log(probabilities.index_select(0, rows)).sum() * weight
            if config.kld:
                loss = loss + kld_regulariser(alpha)
            if not torch.isfinite(loss):
                skipped += 1
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gradient_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), config.clip_norm)
            if not torch.isfinite(gradient_norm):  # a step would make the policy non-finite
                skipped += 1
                continue
            optimizer.step()
            total_loss += loss.item()
        if not all(torch.isfinite(p).all() for p in policy.parameters()):
            raise _diverged(state_file, f"policy parameters became non-finite in episode "
                            f"{episode}")
        if skipped == len(actions):
            raise _diverged(state_file, f"every update of episode {episode} had a non-finite "
                            "loss or gradient, so training cannot make progress")
        if skipped:
            log.warning("episode %d: skipped %d of %d updates with a non-finite loss or "
                        "gradient", episode, skipped, len(actions))

        record = EpisodeRecord(
            episode=episode,
            total_reward=float(sum(rewards)),
            mean_ks=float(sum(layer_ks) / len(layer_ks)),
            loss=total_loss / max(1, len(actions) - skipped),
            seconds=time.perf_counter() - started,
            skipped_updates=skipped,
            layer_ks=layer_ks,
        )
        history.append(record)
        if record.total_reward > best_total:
            best_total, best_state, best_episode = record.total_reward, acting_state, episode
        episodes.set_postfix(reward=f"{record.total_reward:.3g}", mean_ks=f"{record.mean_ks:.4f}")
        log.info("episode %d: total reward %.4g, mean KS %.4f, loss %.4g", episode,
                 record.total_reward, record.mean_ks, record.loss)
        if state_file is not None:
            _save_state(state_file, {
                "config": asdict(config), "shapes": (d_ff, d_model), "source": fingerprint,
                "device": torch.device(device).type,
                "policy": policy.state_dict(), "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(), "history": [asdict(r) for r in history],
                "best_policy": best_state, "best_total": best_total, "best_episode": best_episode,
            })
        if on_episode is not None:
            on_episode(record, policy)

    best = copy.deepcopy(policy)
    best.load_state_dict(best_state)
    return TrainingResult(policy=best, best_episode=best_episode, history=history, config=config,
                          device=torch.device(device).type)
