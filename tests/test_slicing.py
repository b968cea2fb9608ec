"""Slicing removes exactly the chosen neurons, for every supported family."""

from __future__ import annotations

import copy

import pytest
import torch

import prunenet
from conftest import TINY_CONFIGS, make_tiny_model
from prunenet.errors import UnsupportedModelError
from prunenet.families import Cut, family_for, kept_count, neuron_index, supported_model_types
from prunenet.model_view import FFNView
from prunenet.slicing import slice_layer, slice_model


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


class _FusedGateUp(torch.nn.Module):
    """A gated FFN holding gate and up in one matrix, under the names of no llama layout."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = torch.nn.Linear(32, 96, bias=False)
        self.down_proj = torch.nn.Linear(48, 32, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(hidden).chunk(2, dim=-1)
        return self.down_proj(torch.nn.functional.silu(gate) * up)


def _narrowed(layer_index: int) -> torch.nn.Module:
    """A tiny llama whose layer ``layer_index`` keeps 40 of its 48 FFN neurons."""
    model = make_tiny_model("llama")
    view = FFNView(model)
    slice_layer(view.layers[layer_index], view.family, torch.arange(40), view.d_ff)
    return model


def _fused_second_layer() -> torch.nn.Module:
    model = make_tiny_model("llama")
    model.model.layers[1].mlp = _FusedGateUp()
    return model


@pytest.mark.parametrize(("build", "message"), [
    (lambda: _narrowed(0), r"^model\.layers\.1\.mlp\.gate_proj\.weight has shape \[48, 32\], "
                           r"where layer 0's FFN width 40 needs 40 .*intermediate_size"),
    (lambda: _narrowed(1), r"^model\.layers\.1\.mlp\.gate_proj\.weight has shape \[40, 32\], "
                           r"where layer 0's FFN width 48 needs 48 .*intermediate_size"),
    (_fused_second_layer, r"^model\.layers\.1\.mlp\.gate_proj\.weight is missing: .*llama"),
], ids=["wider-later-layer", "narrower-later-layer", "fused-layout"])
@pytest.mark.parametrize("method", ["random", "magnitude"])
def test_layers_a_config_cannot_state_are_refused_before_any_work(build, message, method):
    """A model whose layers differ in FFN width, or one whose FFN is laid out otherwise than its
    family's, cannot be written as a checkpoint its config describes: one line, model untouched
    (it had been pruned to a wrong width, or half sliced before an AttributeError)."""
    model = build()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match=message) as refusal:
        prunenet.compress(model, 0.25, method=method, reconstruct="none", progress=False)
    assert "\n" not in str(refusal.value)
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
