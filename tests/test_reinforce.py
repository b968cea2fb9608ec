"""REINFORCE training: exact agreement with a straightforward re-statement of the training in
docs/method.md (section 4), returns, improvement of the objective, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import ks_2samp

from prunenet.errors import InputError
from prunenet.selection.prunenet.policy import PrunePolicy
from prunenet.selection.prunenet.reinforce import (
    TrainingConfig,
    returns_of,
    train_policy_on_matrices,
)


def _matrices(layers=3, d_ff=64, d_model=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.2, 2.0, d_ff).unsqueeze(1)
    return [torch.randn(d_ff, d_model, generator=generator) * scales for _ in range(layers)]


def _spec_reference_training(matrices, ratio, episodes, lr, seed, gamma=0.99):
    """docs/method.md section 4 written out plainly: d_ff x d_ff forward, svdvals, scipy KS."""
    d_ff, d_model = matrices[0].shape
    kept = int((1 - ratio) * d_ff)
    generator = torch.Generator().manual_seed(seed)
    policy = PrunePolicy(d_model, d_ff, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)

    def probabilities(matrix):
        alpha = policy.keep_scores_reference(matrix)
        eps = torch.rand(d_ff, generator=generator)
        return torch.sigmoid(torch.log(eps) - torch.log(1 - eps) + torch.log(alpha)
                             - torch.log(1 - alpha))

    all_rows = []
    for _ in range(episodes):
        actions, rewards = [], []
        with torch.no_grad():
            for matrix in matrices:
                rows = torch.multinomial(probabilities(matrix), kept, replacement=False,
                                         generator=generator).sort().values
                ks = ks_2samp(torch.linalg.svdvals(matrix).numpy(),
                              torch.linalg.svdvals(matrix[rows]).numpy()).statistic
                actions.append(rows)
                rewards.append(99999.0 if ks == 0 else 1 / ks)
        all_rows.append(actions)
        for index, (matrix, rows) in enumerate(zip(matrices, actions)):
            loss = -torch.log(probabilities(matrix)[rows]).sum() * gamma**index * rewards[index]
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
    return policy, all_rows


@pytest.mark.parametrize("spectral", ["svd", "gram"])
def test_training_equals_plain_restatement_of_the_spec(spectral):
    matrices = _matrices()
    config = TrainingConfig(ratio=0.3, episodes=3, lr=1e-2, seed=7, spectral=spectral)
    recorded = []
    result = train_policy_on_matrices(
        matrices, config, progress=False,
        on_episode=lambda record, policy: recorded.append(
            {k: v.detach().clone() for k, v in policy.state_dict().items()}),
    )
    reference, reference_rows = _spec_reference_training(matrices, 0.3, 3, 1e-2, 7)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(recorded[-1][name], value, rtol=1e-4, atol=1e-6)
    # The kept policy is the one that acted in the best episode; its rewards are 1/KS sums.
    best = max(range(3), key=lambda e: result.history[e].total_reward)
    assert result.best_episode == best
    for record in result.history:
        assert record.total_reward == pytest.approx(sum(1 / ks for ks in record.layer_ks))
    assert len(reference_rows) == 3


def test_returns_discount_reward_to_go_and_baseline():
    rewards = [1.0, 2.0, 4.0]
    plain = returns_of(rewards, TrainingConfig(gamma=0.5))
    assert plain == [1.0, 1.0, 1.0]
    to_go = returns_of(rewards, TrainingConfig(gamma=0.5, reward_to_go=True))
    assert to_go == [1.0 + 0.5 * 2.0 + 0.25 * 4.0, 2.0 + 0.5 * 4.0, 4.0]
    centred = returns_of(rewards, TrainingConfig(gamma=1.0, baseline="mean"))
    assert centred == pytest.approx([1 - 7 / 3, 2 - 7 / 3, 4 - 7 / 3])


def test_penalty_reward_is_negative_ks():
    config = TrainingConfig(ratio=0.5, episodes=2, reward="penalty", seed=1)
    result = train_policy_on_matrices(_matrices(), config, progress=False)
    for record in result.history:
        assert record.total_reward == pytest.approx(-sum(record.layer_ks))


def test_training_improves_the_spectral_objective():
    matrices = _matrices(layers=4, d_ff=256, d_model=32, seed=3)
    config = TrainingConfig(ratio=0.5, episodes=12, lr=1e-2, seed=42)
    history = train_policy_on_matrices(matrices, config, progress=False).history
    first = history[0].mean_ks
    best = max(history, key=lambda record: record.total_reward)
    assert best.mean_ks < first
    assert sum(r.mean_ks for r in history[-4:]) / 4 < first


def test_same_seed_same_result_and_different_seed_differs():
    matrices = _matrices()

    def run(seed):
        config = TrainingConfig(ratio=0.4, episodes=2, seed=seed)
        return train_policy_on_matrices(matrices, config, progress=False)

    a, b, c = run(5), run(5), run(6)
    for name, value in a.policy.state_dict().items():
        assert torch.equal(value, b.policy.state_dict()[name])
    assert [r.layer_ks for r in a.history] == [r.layer_ks for r in b.history]
    assert not torch.equal(a.policy.projection, c.policy.projection)


def test_kld_regulariser_changes_updates():
    matrices = _matrices()
    plain = train_policy_on_matrices(matrices, TrainingConfig(episodes=1, seed=2), progress=False)
    with_kld = train_policy_on_matrices(
        matrices, TrainingConfig(episodes=1, seed=2, kld=True), progress=False
    )
    assert plain.history[0].layer_ks == with_kld.history[0].layer_ks  # same actions
    assert plain.history[0].loss != with_kld.history[0].loss


@pytest.mark.parametrize(
    "field,value",
    [("ratio", 1.0), ("ratio", -0.1), ("ratio", "0.3"), ("episodes", 0), ("lr", -1.0),
     ("lr", math.nan), ("gamma", 0.0), ("reward", "log"), ("baseline", "median"),
     # From Python these had ended in a TypeError traceback (episodes 2.5, "3", None; lr or
     # gamma a string), or had run otherwise than recorded: clip_norm -1 turned every step
     # against its gradient and 0 made none; reward_to_go "no" ran reward-to-go.
     ("episodes", 2.5), ("episodes", "3"), ("episodes", None), ("episodes", True),
     ("lr", "1e-3"), ("gamma", "0.9"), ("clip_norm", -1.0), ("clip_norm", 0.0),
     ("clip_norm", math.nan), ("clip_norm", math.inf), ("reward_to_go", "no"), ("kld", 1)],
)
def test_bad_training_settings_are_refused(field, value):
    named = {"lr": "learning rate"}.get(field, field)
    with pytest.raises(InputError, match=f"^{named} must be|^ratio|^reward|^baseline"):
        train_policy_on_matrices(_matrices(), TrainingConfig(**{field: value}), progress=False)


def test_numpy_training_settings_are_recorded_as_plain_numbers(tmp_path):
    """numpy numbers had trained, then failed writing prunenet.json with a TypeError traceback
    (not JSON serializable), leaving no output and a training state behind."""
    import json

    import numpy as np

    import prunenet
    from conftest import make_tiny_model

    result = prunenet.compress(make_tiny_model("llama"), 0.3, method="prunenet",
                               episodes=np.int64(2), lr=np.float64(1e-2),
                               gamma=np.float32(0.5), reconstruct="none", progress=False,
                               out=tmp_path / "out", policy_out=tmp_path / "p.safetensors")
    record = json.loads((tmp_path / "out" / "prunenet.json").read_text())["training"]
    assert (record["episodes"], record["lr"], record["gamma"]) == (2, 0.01, 0.5)
    assert len(result.training.history) == 2
    _, metadata = prunenet.load_policy(tmp_path / "p.safetensors")
    assert (metadata["episodes"], metadata["lr"]) == (2, 0.01)
    assert metadata["device"] == result.training.device == "cpu"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "p.safetensors"]


def test_foreach_adamw_equals_the_single_tensor_form_bit_for_bit():
    """The trainer uses AdamW(foreach=True) for speed; on CPU it must change no bit of a step."""
    def steps(foreach):
        policy = PrunePolicy(48, 160, generator=torch.Generator().manual_seed(3))
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2, foreach=foreach)
        for step in range(5):
            generator = torch.Generator().manual_seed(step)
            for parameter in policy.parameters():
                parameter.grad = torch.randn(parameter.shape, generator=generator)
            optimizer.step()
        return policy.state_dict()

    fast, plain = steps(True), steps(False)
    assert all(torch.equal(fast[name], plain[name]) for name in plain)


def test_resume_without_a_saved_state_to_read_is_refused():
    """From Python, resume=True where no state is kept had started a fresh run in silence."""
    import prunenet
    from conftest import make_tiny_model

    with pytest.raises(InputError, match="resume continues .* state_path"):
        train_policy_on_matrices(_matrices(), TrainingConfig(episodes=1), progress=False,
                                 resume=True)
    model = make_tiny_model("llama")
    with pytest.raises(InputError, match="resume continues .* state_path"):
        prunenet.train_policy(model, 0.3, episodes=1, resume=True, progress=False)
    with pytest.raises(InputError, match="resume continues .* out or policy_out"):
        prunenet.compress(model, 0.3, method="prunenet", episodes=1, resume=True,
                          reconstruct="none", progress=False)
    with pytest.raises(InputError, match="resume continues .* method 'random' trains none"):
        prunenet.compress(model, 0.3, method="random", resume=True, reconstruct="none",
                          progress=False)


def test_train_policy_refuses_an_unknown_option_in_one_line():
    """A misspelt or misplaced keyword had ended in a TypeError traceback from the dataclass;
    compress refuses the same in one line."""
    import prunenet
    from conftest import make_tiny_model

    model = make_tiny_model("llama")
    with pytest.raises(InputError, match="^unknown option.*: epsiodes;"):
        prunenet.train_policy(model, 0.3, progress=False, epsiodes=2)
    with pytest.raises(InputError, match="^unknown option.*: method, policy_out;"):
        prunenet.train_policy(model, 0.3, progress=False, method="random",
                              policy_out="p.safetensors")
