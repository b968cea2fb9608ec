"""A read-only view of a loaded model's FFNs through its family entry."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import InputError
from .families import Family, family_for


class FFNView:
    """The decoder layers of ``model`` and their first FFN matrices, found via ``model_type``."""

    def __init__(self, model: nn.Module) -> None:
        config = getattr(model, "config", None)
        if config is None:
            raise InputError("expected a transformers model with a .config")
        self.model = model
        self.family: Family = family_for(getattr(config, "model_type", None))
        try:
            self.layers = model.get_submodule(self.family.layers)
        except AttributeError as error:
            raise InputError(
                f"{type(model).__name__} has no {self.family.layers!r}: pass the *ForCausalLM "
                f"model of a {config.model_type} checkpoint"
            ) from error
        if len(self.layers) == 0:
            raise InputError("the model has no decoder layers: nothing to prune")
        first = self.first_tensor(0)
        self.d_ff = self.family.d_ff_of(first)
        self.d_model = self.family.first_matrix(first, self.d_ff).shape[1]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def first_tensor(self, layer_index: int) -> Tensor:
        return self.layers[layer_index].get_parameter(self.family.first.name)

    def first_matrix(self, layer_index: int, device: torch.device | str | None = None) -> Tensor:
        """Layer ``layer_index``'s first FFN matrix, d_ff x d_model, as a detached fp32 copy."""
        tensor = self.first_tensor(layer_index).detach()
        matrix = self.family.first_matrix(tensor, self.d_ff)
        return matrix.to(device=device or tensor.device, dtype=torch.float32).contiguous()

    def parameter_counts(self) -> dict[str, int]:
        """Total and FFN parameter counts (tied weights counted once)."""
        seen: set[int] = set()
        total = 0
        for parameter in self.model.parameters():
            if id(parameter) not in seen:
                seen.add(id(parameter))
                total += parameter.numel()
        ffn = 0
        for layer in self.layers:
            for cut in self.family.cuts:
                try:
                    ffn += layer.get_parameter(cut.name).numel()
                except AttributeError:
                    pass
        return {"total": total, "ffn": ffn}
