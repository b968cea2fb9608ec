"""A read-only view of a loaded model's FFNs through its family entry."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .errors import InputError, NumericalError
from .families import Family, family_for


def non_finite_error(name: str) -> NumericalError:
    """The error for a weight tensor ``name`` that holds NaN or Inf."""
    return NumericalError(
        f"{name} holds NaN or Inf; the checkpoint is damaged and cannot be pruned"
    )


def check_finite(name: str, tensor: Tensor) -> None:
    """Raise naming ``name`` when the floating ``tensor`` holds NaN or Inf."""
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise non_finite_error(name)


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

    def second_matrix_module(self, layer_index: int) -> nn.Module:
        """The module whose input is the FFN's intermediate activation (down_proj, fc2, ...)."""
        family = self.family
        second = [cut for cut in family.cuts
                  if cut.name.endswith(".weight") and cut.axis != family.first.axis]
        return self.layers[layer_index].get_submodule(second[0].name.rsplit(".", 1)[0])

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


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack without the language-model head (``model.base_model``), for passes
    that only read FFN activations: the head's logits (sequence x vocabulary floats, 0.8 GB
    for 8 x 512 tokens of SmolLM2) are never built."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


@torch.no_grad()
def squared_activation_sums(model: nn.Module, tokens: Tensor, dtype: torch.dtype,
                            progress: bool = False, desc: str = "activations") -> list[Tensor]:
    """Per layer, the sum over every token of ``tokens`` (sequences x length) of each FFN
    neuron's squared activation, read at the input of the second FFN matrix and accumulated in
    ``dtype`` on the CPU. One forward pass per sequence."""
    view = FFNView(model)
    sums = [torch.zeros(view.d_ff, dtype=dtype) for _ in range(view.num_layers)]

    def accumulate(index: int):
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            activation = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            sums[index] += activation.to(dtype).pow(2).sum(0).cpu()
        return hook

    handles = [view.second_matrix_module(i).register_forward_pre_hook(accumulate(i))
               for i in range(view.num_layers)]
    device = next(model.parameters()).device
    try:
        for sequence in tqdm(tokens, desc=desc, disable=not progress, leave=False):
            backbone(model)(sequence.unsqueeze(0).to(device))
    finally:
        for handle in handles:
            handle.remove()
    return sums
