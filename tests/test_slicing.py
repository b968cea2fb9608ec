"""Slicing removes exactly the chosen neurons, for every supported family."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import TINY_CONFIGS, make_tiny_model
from prunenet.families import Cut, family_for, kept_count, neuron_index, supported_model_types
from prunenet.model_view import FFNView
from prunenet.slicing import slice_model


def _zero_removed_outputs(model, kept_rows):
    """The original model with the removed neurons' output columns zeroed: its function equals
    that of the sliced model, because a neuron whose output weights are zero contributes nothing."""
    view = FFNView(model)
    with torch.no_grad():
        for layer, rows in zip(view.layers, kept_rows):
            for cut in view.family.cuts:
                second_matrix = cut.name.endswith("weight") and cut != view.family.first and (
                    cut.axis == (0 if view.family.first.axis == 1 else 1)
                )
                if not second_matrix:
                    continue
                tensor = layer.get_parameter(cut.name)
                removed = torch.ones(view.d_ff, dtype=torch.bool)
                removed[rows] = False
                tensor.index_fill_(cut.axis, removed.nonzero().flatten(), 0.0)
    return model


def test_every_declared_family_has_a_tiny_model():
    assert sorted(TINY_CONFIGS) == supported_model_types()


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_sliced_logits_equal_masked_original(tiny_model_type, ratio):
    model = make_tiny_model(tiny_model_type)
    view = FFNView(model)
    kept = kept_count(view.d_ff, ratio)
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randperm(view.d_ff, generator=generator)[:kept].sort().values
            for _ in range(view.num_layers)]
    inputs = torch.randint(0, model.config.vocab_size, (2, 7), generator=generator)

    masked = _zero_removed_outputs(copy.deepcopy(model), rows)
    before = view.parameter_counts()
    slice_model(model, rows)
    after = FFNView(model).parameter_counts()

    with torch.no_grad():
        expected = masked(inputs).logits
        actual = model(inputs).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)

    # Exactly the removed neurons' parameters are gone: per layer, per cut tensor.
    removed_per_neuron = 0
    for cut in view.family.cuts:
        try:
            tensor = masked.get_submodule(view.family.layers)[0].get_parameter(cut.name)
        except AttributeError:
            continue
        removed_per_neuron += tensor.numel() // view.d_ff
    expected_drop = removed_per_neuron * (view.d_ff - kept) * view.num_layers
    assert before["total"] - after["total"] == expected_drop
    assert before["ffn"] - after["ffn"] == expected_drop
    for field in view.family.width_fields:
        assert getattr(model.config, field) == kept


def test_sliced_layer_equals_original_without_removed_neurons():
    model = make_tiny_model("llama")
    original = copy.deepcopy(model)
    rows = [torch.tensor([0, 3, 7, 20, 47]), torch.tensor([1, 2, 3, 4, 5])]
    slice_model(model, rows)
    for index, kept_rows in enumerate(rows):
        new_mlp, old_mlp = model.model.layers[index].mlp, original.model.layers[index].mlp
        assert torch.equal(new_mlp.gate_proj.weight, old_mlp.gate_proj.weight[kept_rows])
        assert torch.equal(new_mlp.up_proj.weight, old_mlp.up_proj.weight[kept_rows])
        assert torch.equal(new_mlp.down_proj.weight, old_mlp.down_proj.weight[:, kept_rows])
        assert new_mlp.gate_proj.out_features == 5 and new_mlp.down_proj.in_features == 5


def test_fused_gate_up_keeps_same_indices_in_both_halves():
    cut = Cut("mlp.gate_up_proj.weight", 0, blocks=2)
    assert neuron_index(cut, torch.tensor([1, 4]), d_ff=6).tolist() == [1, 4, 7, 10]


def test_unequal_widths_are_refused():
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="same number"):
        slice_model(model, [torch.arange(10), torch.arange(11)])


def test_unsupported_model_type_lists_supported():
    with pytest.raises(Exception, match="supported: .*llama"):
        family_for("mamba")
