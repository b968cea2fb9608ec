"""The selection methods through the verbs and the command line: records name what ran, a
policy means prunenet, the default's score by hand, and training that cannot make progress."""

from __future__ import annotations

import json
import math

import pytest
import torch

import prunenet
from conftest import make_tiny_model
from prunenet.cli import main
from prunenet.errors import InputError, NumericalError
from prunenet.io.loading import RECORD_NAME
from prunenet.model_view import FFNView
from prunenet.probe import ProbeRecipe, generate_probe
from prunenet.selection import DEFAULT_METHOD
from prunenet.selection.base import top_rows
from prunenet.selection.prunenet.policy import PrunePolicy, policy_checksum
from prunenet.selection.prunenet.reinforce import TrainingConfig, train_policy_on_matrices
from prunenet.selection.self_generated import self_generated_scores


def _overflowing_policy(d_model: int, d_ff: int) -> PrunePolicy:
    """A finite policy whose scores overflow: logits of mixed-sign rows become inf - inf = NaN."""
    policy = PrunePolicy(d_model, d_ff, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        policy.projection.fill_(1e30)
        policy.row_weights.fill_(0.5)
    return policy


def test_non_finite_probabilities_skip_updates_and_are_counted():
    generator = torch.Generator().manual_seed(3)
    positive = torch.rand(24, 8, generator=generator) * 1e8 + 1e8  # logits +inf: alpha = 1
    mixed = torch.randn(24, 8, generator=generator) * 1e8  # logits NaN
    config = TrainingConfig(ratio=0.25, episodes=2)
    result = train_policy_on_matrices([positive, mixed], config,
                                      policy=_overflowing_policy(8, 24), progress=False)
    assert [record.skipped_updates for record in result.history] == [1, 1]
    assert all(math.isfinite(record.total_reward) for record in result.history)
    assert all(torch.isfinite(p).all() for p in result.policy.parameters())


def test_training_that_cannot_make_progress_stops_with_a_clear_message():
    mixed = torch.randn(24, 8, generator=torch.Generator().manual_seed(4)) * 1e8
    with pytest.raises(NumericalError, match="cannot make progress"):
        train_policy_on_matrices([mixed, mixed.flip(0)], TrainingConfig(ratio=0.25, episodes=2),
                                 policy=_overflowing_policy(8, 24), progress=False)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3"])
def test_default_score_is_mean_squared_activation_times_first_row_norm(model_type):
    """Written out by hand: hook the second matrix's input, square, average; times the squared
    norm of the neuron's row of the first matrix (gate; the gate half of phi3's fused gate_up;
    gpt2's Conv1D column)."""
    model = make_tiny_model(model_type)
    view = FFNView(model)
    tokens = generate_probe(model, None, 10, seed=0, recipe=ProbeRecipe(sequence_length=5),
                            progress=False)
    second = {"gpt2": "mlp.c_proj"}.get(model_type, "mlp.down_proj")
    captured = []
    handle = view.layers[1].get_submodule(second).register_forward_pre_hook(
        lambda module, args: captured.append(args[0].reshape(-1, view.d_ff)))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    if model_type == "gpt2":
        first_rows = model.transformer.h[1].mlp.c_fc.weight.T  # Conv1D: d_model x d_ff
    elif model_type == "phi3":
        first_rows = model.model.layers[1].mlp.gate_up_proj.weight[:view.d_ff]
    else:
        first_rows = model.model.layers[1].mlp.gate_proj.weight
    expected = captured[0].pow(2).mean(0) * first_rows.detach().norm(dim=1).pow(2)
    scores = self_generated_scores(model, tokens)
    assert len(scores) == view.num_layers
    torch.testing.assert_close(scores[1], expected, rtol=1e-4, atol=1e-7)


def test_default_selection_keeps_the_top_scores_on_the_runs_probe():
    """select_rows reads the probe compress reads (its size, temperature and seed), and keeps
    the rows compress keeps without the refit."""
    model = make_tiny_model("llama")
    options = dict(seed=3, probe_tokens=320, probe_temperature=1.0, progress=False)
    rows = prunenet.select_rows(model, 0.25, **options)
    tokens = generate_probe(model, None, 320, seed=3, recipe=ProbeRecipe(temperature=1.0),
                            progress=False)
    assert tokens.shape == (5, 64)  # 64 positions
    scores = self_generated_scores(model, tokens)
    assert [r.tolist() for r in rows] == [top_rows(s, 36).tolist() for s in scores]
    assert [r.tolist() for r in prunenet.select_rows(model, 0.25, method=DEFAULT_METHOD,
                                                     **options)] == [r.tolist() for r in rows]
    other_seed = prunenet.select_rows(model, 0.25, **{**options, "seed": 4})
    assert [r.tolist() for r in other_seed] != [r.tolist() for r in rows]
    compressed = prunenet.compress(model, 0.25, reconstruct="none", **options)
    assert [r.tolist() for r in compressed.kept_rows] == [r.tolist() for r in rows]


def test_a_policy_means_the_prunenet_method():
    model = make_tiny_model("llama")
    training = prunenet.train_policy(model, ratio=0.3, episodes=1, progress=False)
    implicit = prunenet.select_rows(model, 0.3, policy=training.policy, seed=9, progress=False)
    explicit = prunenet.select_rows(model, 0.3, policy=training.policy, seed=9, progress=False,
                                    method="prunenet")
    assert [r.tolist() for r in implicit] == [r.tolist() for r in explicit]
    with pytest.raises(InputError, match="uses no policy"):
        prunenet.select_rows(model, 0.3, policy=training.policy, method=DEFAULT_METHOD)
    with pytest.raises(InputError, match="unknown method"):
        prunenet.select_rows(model, 0.3, method="magic")


def test_records_name_the_method_that_ran(tmp_path):
    result = prunenet.compress(make_tiny_model("llama"), ratio=0.25, progress=False)
    assert result.policy is None and result.training is None
    assert result.record["method"] == DEFAULT_METHOD == "self-generated"
    assert result.record["policy_sha256"] is None and "variant" not in result.record
    trained = prunenet.compress(make_tiny_model("llama"), ratio=0.25, episodes=1,
                                method="prunenet", progress=False)
    assert trained.record["method"] == "prunenet"
    assert trained.record["policy_sha256"] == policy_checksum(trained.policy)
    assert trained.record["training"]["episodes"] == 1
    with pytest.raises(InputError, match="--policy-out needs a trained policy"):
        prunenet.compress(make_tiny_model("llama"), ratio=0.25, progress=False,
                          policy_out=tmp_path / "p.safetensors")


def test_a_record_of_an_earlier_version_is_read_as_the_method_that_ran(tmp_path):
    """Outputs written before methods had one name said "prunenet" and the variant that ran:
    every reader (eval, fine-tune, its card) gets the method that ran."""
    from prunenet.evaluation.evaluate import evaluate
    from prunenet.io.loading import read_record

    folder = tmp_path / "old"
    make_tiny_model("llama").save_pretrained(folder)
    (folder / RECORD_NAME).write_text(json.dumps({
        "format": "prunenet-compression/1", "method": "prunenet", "variant": "self-generated",
        "ratio": 0.25, "seed": 42, "selection": None}))
    record = read_record(folder)
    assert record["method"] == "self-generated" and "variant" not in record
    result = evaluate(str(folder), ppl=None, progress=False)
    assert result["compression"]["method"] == "self-generated"


def test_cli_method_names_and_the_deprecated_variant(tiny_llama_dir, tmp_path, capsys, caplog):
    assert main(["-q", "compress", str(tiny_llama_dir), "--ratio", "0.25", "--out",
                 str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / RECORD_NAME).read_text())["method"] == DEFAULT_METHOD
    assert main(["-q", "compress", str(tiny_llama_dir), "--ratio", "0.25", "--episodes", "1",
                 "--variant", "reference", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / RECORD_NAME).read_text())["method"] == "prunenet"
    assert "--variant is deprecated" in caplog.text
    assert main(["-q", "compress", str(tiny_llama_dir), "--ratio", "0.25", "--variant",
                 "reference", "--method", "random", "--out", str(tmp_path / "c")]) == 2
    assert "conflicts with --method random" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    with pytest.raises(SystemExit):
        main(["compress", str(tiny_llama_dir), "--ratio", "0.25", "--variant", "magic",
              "--out", str(tmp_path / "d")])


def test_self_generated_selection_without_a_probe_is_a_programming_error():
    from prunenet.selection.base import Source
    from prunenet.selection.self_generated import SelfGenerated

    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="reads the run's probe"):
        SelfGenerated().select(Source(FFNView(model), model), 4, seed=0)


def test_top_k_keeps_the_highest_scores_of_a_saturated_policy():
    """A trained policy's scores saturate (SmolLM2: alpha is 1.0 in float32 for nearly every
    row): top-k ranks the rows by the score before the sigmoid, not by their index."""
    model = make_tiny_model("llama")
    view = FFNView(model)
    policy = PrunePolicy(view.d_model, view.d_ff, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        policy.row_weights.fill_(1.0)
        policy.bias.fill_(100.0 / view.d_ff)  # b.v = 100: every alpha rounds to 1.0
        policy.projection.zero_()
        policy.projection[0] = torch.randn(view.d_model, generator=torch.Generator().manual_seed(1))
    rows = prunenet.select_rows(model, 0.5, policy=policy, selection="topk", progress=False)
    kept = rows[0].numel()
    for index, layer_rows in enumerate(rows):
        first_matrix = view.first_matrix(index, "cpu")
        assert bool((policy.keep_scores(first_matrix) == 1.0).all())
        expected = top_rows(first_matrix @ policy.projection[0], kept)
        assert layer_rows.tolist() == expected.tolist(), index


def test_scores_that_overflow_are_refused_naming_the_layer(tmp_path):
    """A layer whose activations on the probe overflow to inf or NaN has no ranking: the run
    is refused naming the layer, nothing written (its rows had been the first ones by index,
    chosen among NaN scores)."""
    model = make_tiny_model("llama")
    with torch.no_grad():  # finite weights whose products overflow float32
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(model.model.layers[1].mlp, name).weight.mul_(1e19)
    with pytest.raises(NumericalError, match="^layer 1: the selection's scores are not finite"):
        prunenet.compress(model, 0.5, reconstruct="none", probe_tokens=64,
                          probe_length=16, out=tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_top_rows_refuses_non_finite_scores():
    assert top_rows(torch.tensor([3.0, 1.0, 2.0]), 2).tolist() == [0, 2]
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(NumericalError, match="^layer 4: the selection's scores are not"):
            top_rows(torch.tensor([3.0, bad, 2.0]), 2, layer=4)
