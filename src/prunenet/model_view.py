"""A read-only view of a loaded model's FFNs through its family entry.

A model dispatched with disk offload (a checkpoint larger than memory, run layer by layer:
``prunenet.io.loading.load_model_and_tokenizer(..., offload=...)``) keeps its offloaded weights
on the meta device between uses; every read here brings the module holding them into memory
for the read and returns a copy, so the same code serves a loaded and an offloaded model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .errors import InputError, NumericalError, UnsupportedModelError
from .families import Cut, Family, family_for


def non_finite_error(name: str, consequence: str = "cannot be pruned") -> NumericalError:
    """The error for a weight tensor ``name`` that holds NaN or Inf; ``consequence`` says
    what is not done with the damaged checkpoint."""
    return NumericalError(f"{name} holds NaN or Inf; the checkpoint is damaged and {consequence}")


def check_finite(name: str, tensor: Tensor, consequence: str = "cannot be pruned") -> None:
    """Raise naming ``name`` when the floating ``tensor`` holds NaN or Inf."""
    if not tensor.is_floating_point():
        return
    if tensor.element_size() == 1:  # torch has no isfinite for float8; float32 holds it exactly
        tensor = tensor.float()
    # the extremes are NaN where any value is, infinite where any value is: no mask as large
    # as the tensor is made (a streamed layer's checks stay within its own memory)
    if tensor.numel() and not (torch.isfinite(tensor.amax()) and torch.isfinite(tensor.amin())):
        raise non_finite_error(name, consequence)


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
        self.d_ff = self._shared_width()
        self.d_model = self.family.first_matrix(self.first_tensor(0), self.d_ff).shape[1]

    def _shared_width(self) -> int:
        """The FFN width of layer 0, after checking that every layer holds every tensor of the
        family's layout at that width: the config states one width (``width_fields``) for all
        layers. Raises :class:`UnsupportedModelError` naming the first tensor that does not."""
        family, model_type = self.family, self.model.config.model_type
        width = None
        for index, layer in enumerate(self.layers):
            present = []
            for cut in family.cuts:
                try:
                    present.append((cut, layer.get_parameter(cut.name)))
                except AttributeError:
                    if cut.optional:
                        continue
                    layout = ", ".join(cut.name for cut in family.cuts if not cut.optional)
                    raise UnsupportedModelError(
                        f"{family.tensor_name(index, cut)} is missing: this {model_type} "
                        f"model's FFN is not laid out as transformers' {model_type} ({layout}), "
                        "so prunenet cannot prune it") from None
            if width is None:
                width = family.d_ff_of(layer.get_parameter(family.first.name))
            for cut, tensor in present:
                if tensor.shape[cut.axis] != cut.blocks * width:
                    raise UnsupportedModelError(
                        f"{family.tensor_name(index, cut)} has shape {list(tensor.shape)}, "
                        f"where layer 0's FFN width {width} needs {cut.blocks * width} along "
                        f"dimension {cut.axis}: prunenet prunes models whose layers share one "
                        f"FFN width, the one {family.width_fields[0]} a {model_type} config "
                        "states")
        return width

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def first_tensor(self, layer_index: int) -> Tensor:
        """The live first FFN parameter (on the meta device where offloaded: shape only)."""
        return self.layers[layer_index].get_parameter(self.family.first.name)

    def parameter(self, layer_index: int, name: str) -> Tensor:
        """Layer ``layer_index``'s parameter ``name`` (relative to the layer), detached; a copy
        read into memory where the layer is offloaded."""
        layer = self.layers[layer_index]
        if not is_offloaded(layer):
            return layer.get_parameter(name).detach()
        with onloaded(layer):
            return layer.get_parameter(name).detach().clone()

    def first_matrix(self, layer_index: int, device: torch.device | str | None = None) -> Tensor:
        """Layer ``layer_index``'s first FFN matrix, d_ff x d_model, detached, in fp32: a view of
        the weight where it is fp32 on ``device`` and not transposed (no copy of every layer's
        matrix while a policy trains), else a copy. Read it; never write into it."""
        tensor = self.parameter(layer_index, self.family.first.name)
        matrix = self.family.first_matrix(tensor, self.d_ff)
        return matrix.to(device=device or tensor.device, dtype=torch.float32).contiguous()

    @property
    def second_cut(self) -> Cut:
        """The cut of the second FFN matrix's weight: the module whose input is the FFN's
        intermediate activation (down_proj, fc2, ...)."""
        family = self.family
        return next(cut for cut in family.cuts
                    if cut.name.endswith(".weight") and cut.axis != family.first.axis)

    @property
    def second_module_name(self) -> str:
        """The name, in a layer, of that module."""
        return self.second_cut.name.rsplit(".", 1)[0]

    def second_matrix_module(self, layer_index: int) -> nn.Module:
        """The module whose input is the FFN's intermediate activation (down_proj, fc2, ...)."""
        return self.layers[layer_index].get_submodule(self.second_module_name)

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


def _offloading_modules(module: nn.Module) -> list[nn.Module]:
    from accelerate.utils import has_offloaded_params

    return [part for part in module.modules() if has_offloaded_params(part)]


def is_offloaded(module: nn.Module) -> bool:
    """Whether some of ``module``'s weights are offloaded (kept on disk between uses)."""
    return bool(_offloading_modules(module))


@contextlib.contextmanager
def onloaded(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with every offloaded weight inside it read into memory for the block (the
    dispatch hooks' own load and release; nothing else changes)."""
    from accelerate.utils import align_module_device

    with contextlib.ExitStack() as stack:
        for part in _offloading_modules(module):
            stack.enter_context(align_module_device(part))
        yield module


@contextlib.contextmanager
def evaluation_mode(model: nn.Module | None) -> Iterator[nn.Module | None]:
    """``model`` in eval mode for the block (no dropout: its passes over the probe and the
    text are deterministic), each module's training flag as it was afterwards; None: nothing."""
    if model is None:
        yield model
        return
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def parameters_in_memory(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``model.named_parameters()`` in their order, each in memory: an offloaded one is read
    with the module that holds it (one such module in memory at a time)."""
    from accelerate.utils import has_offloaded_params

    owners = {name: part for name, part in model.named_modules() if has_offloaded_params(part)}
    current, stack = None, contextlib.ExitStack()
    try:
        for name, parameter in model.named_parameters():
            if parameter.device.type != "meta":
                yield name, parameter.detach()
                continue
            owner = max((prefix for prefix in owners
                         if prefix == "" or name.startswith(prefix + ".")), key=len, default=None)
            if owner is None:
                raise ValueError(f"{name} is on the meta device and no module loads it")
            if owner != current:
                stack.close()
                stack = contextlib.ExitStack()
                stack.enter_context(onloaded(owners[owner]))
                current = owner
            yield name, model.get_parameter(name).detach()
    finally:
        stack.close()


def layers_from_disk(model: nn.Module) -> int:
    """How many of an offloaded model's decoder layers are read from disk as they run."""
    return sum(is_offloaded(layer) for layer in FFNView(model).layers)


def input_device(model: nn.Module) -> torch.device:
    """Where ``model``'s inputs go: its first parameter's device, or the CPU for a model whose
    first weights are offloaded (its dispatch hooks run every layer there)."""
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


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
    device = input_device(model)
    try:
        for sequence in tqdm(tokens, desc=desc, disable=not progress, leave=False):
            backbone(model)(sequence.unsqueeze(0).to(device))
    finally:
        for handle in handles:
            handle.remove()
    return sums
