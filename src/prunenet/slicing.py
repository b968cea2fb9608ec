"""Apply kept-neuron index sets to a model's FFNs: exact removal, no masks.

Works on the in-memory module tree; the streaming path applies the same :func:`slice_tensor` to
tensors read from shards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .families import Family, slice_tensor
from .model_view import FFNView


def _set_parameter(module: nn.Module, name: str, value: Tensor) -> None:
    owner_name, _, attribute = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    old = getattr(owner, attribute)
    setattr(owner, attribute, nn.Parameter(value, requires_grad=old.requires_grad))
    # Keep the module's shape attributes true to its weights (nn.Linear, transformers' Conv1D).
    if attribute == "weight":
        if hasattr(owner, "nf") and hasattr(owner, "nx"):
            owner.nx, owner.nf = value.shape
        elif hasattr(owner, "in_features"):
            owner.out_features, owner.in_features = value.shape


@torch.no_grad()
def slice_layer(layer: nn.Module, family: Family, kept_rows: Tensor, d_ff: int) -> None:
    """Remove every FFN neuron of ``layer`` not in ``kept_rows`` (sorted, distinct)."""
    for cut in family.cuts:
        try:
            tensor = layer.get_parameter(cut.name)
        except AttributeError:
            if cut.optional:
                continue
            raise
        if tensor is None:
            continue
        _set_parameter(layer, cut.name, slice_tensor(tensor.data, cut, kept_rows, d_ff))


def slice_model(model: nn.Module, kept_rows: Sequence[Tensor]) -> nn.Module:
    """Slice every layer of ``model`` in place to ``kept_rows[l]``; update the config's FFN width.

    All layers must keep the same number of neurons (one ``intermediate_size`` in the config).
    """
    view = FFNView(model)
    if len(kept_rows) != view.num_layers:
        raise ValueError(f"got {len(kept_rows)} index sets for {view.num_layers} layers")
    widths = {int(rows.numel()) for rows in kept_rows}
    if len(widths) != 1:
        raise ValueError(f"every layer must keep the same number of neurons, got {sorted(widths)}")
    for layer, rows in zip(view.layers, kept_rows):
        slice_layer(layer, view.family, rows, view.d_ff)
    set_ffn_width(model.config, view.family, widths.pop())
    return model


def set_ffn_width(config, family: Family, width: int) -> None:
    """Write the new FFN width into every width field the config has (and the family names)."""
    for field in family.width_fields:
        setattr(config, field, width)
