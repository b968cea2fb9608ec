"""Calibration-free neuron scores that lost to the shipped default (research only).

Measured in benchmarks/quality_ablation.md on SmolLM2-135M; every one here is worse than the
``self-generated`` default, and most are worse than random selection. Kept so the ablation can be
rerun, not shipped in the package.

- ``input_scale``: the elementwise weight (and bias) of the norm that feeds the FFN.
- ``leverage_scores``: how much each row carries of a matrix's column space (a closed-form
  per-row spectral score).
- ``expected_activation_scores``: output energy ``E[h_i(x)^2] * ||down_i||^2`` for Gaussian
  inputs shaped by ``input_scale``.
- ``random_probe_tokens`` / ``probe_activation_scores``: output energy on uniformly random token
  ids, or on any probe.
- ``rank_with_protection``: keep a fraction of outlier neurons first, then follow a base score.
- ``generated_tokens`` / ``earlier_default_probe``: the model's own text as the ablation sampled
  it (one seed per call), and the default method's probe of that time (4 x 128 tokens), so the
  recorded ablation reproduces; the package's probe is ``prunenet.probe.generate_probe``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prunenet.families import context_length
from prunenet.model_view import FFNView
from prunenet.selection.magnitude import cut_norms
from prunenet.selection.self_generated import mean_squared_activations

EARLIER_PROBE_SEQUENCES, EARLIER_PROBE_LENGTH = 4, 128


@torch.no_grad()
def generated_tokens(model: nn.Module, sequences: int, length: int, seed: int) -> Tensor:
    """``sequences`` x ``length`` token ids the model samples itself (temperature 1), each
    continuing its BOS token (or a random first token when it has none), seeded by ``seed``
    without touching the global random state."""
    generator = torch.Generator().manual_seed(int(seed))
    vocab = model.get_input_embeddings().weight.shape[0]
    bos = getattr(model.config, "bos_token_id", None)
    first = torch.randint(0, vocab, (sequences, 1), generator=generator)
    if isinstance(bos, int) and 0 <= bos < vocab:
        first[:] = bos
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        prompt = first.to(next(model.parameters()).device)
        tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                temperature=1.0, top_k=0, top_p=1.0,
                                max_new_tokens=length - 1, min_new_tokens=length - 1,
                                pad_token_id=0)
    return tokens.cpu()


def earlier_default_probe(model: nn.Module, seed: int) -> Tensor:
    """The probe the ``self-generated`` default read when the ablation ran: 4 samples of 128
    tokens (fewer when the model has fewer positions)."""
    length = min(EARLIER_PROBE_LENGTH, context_length(model.config) or EARLIER_PROBE_LENGTH)
    return generated_tokens(model, EARLIER_PROBE_SEQUENCES, length, seed)


# The norm whose output feeds the FFN, per model_type, and whether its weight is stored as w - 1
# (Gemma's RMSNorm multiplies by 1 + w). Families not listed see the FFN input unscaled.
FFN_INPUT_NORMS: dict[str, tuple[str, bool]] = {
    **{t: ("post_attention_layernorm", False)
       for t in ("llama", "mistral", "qwen2", "qwen3", "granite", "phi3", "gpt_neox")},
    "gemma": ("post_attention_layernorm", True),
    "gemma2": ("pre_feedforward_layernorm", True),
    "gemma3_text": ("pre_feedforward_layernorm", True),
    "phi": ("input_layernorm", False),
    "gpt2": ("ln_2", False),
    "opt": ("final_layer_norm", False),
    "falcon": ("input_layernorm", False),
}


def input_scale(view: FFNView, layer_index: int) -> tuple[Tensor, Tensor]:
    """(scale, shift), each d_model: the FFN input is ``scale * z + shift`` for a normalised z.

    Identity (ones, zeros) for families whose FFN input norm is not known here or has no weight.
    """
    ones, zeros = torch.ones(view.d_model), torch.zeros(view.d_model)
    entry = FFN_INPUT_NORMS.get(view.model.config.model_type)
    layer = view.layers[layer_index]
    if entry is None or not hasattr(layer, entry[0]):
        return ones, zeros
    norm = getattr(layer, entry[0])
    weight = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    scale = ones if weight is None else weight.detach().float() + (1.0 if entry[1] else 0.0)
    shift = zeros if bias is None else bias.detach().float()
    return scale, shift


def leverage_scores(matrix: Tensor) -> Tensor:
    """Row leverage ``diag(M (M^T M)^+ M^T)`` of ``matrix`` (rows x columns), each in [0, 1].

    Computed from a thin SVD, keeping directions above a tolerance relative to the input's
    precision; the scores sum to the numerical rank. Invariant to invertible scaling of the columns.
    """
    work = matrix.double()
    left, values, _ = torch.linalg.svd(work, full_matrices=False)
    precision = matrix.dtype if matrix.dtype.is_floating_point else torch.float64
    tolerance = values.max() * max(work.shape) * torch.finfo(precision).eps
    basis = left[:, values > tolerance]
    return (basis**2).sum(dim=1).float()


def down_column_norms(view: FFNView, layer_index: int) -> Tensor:
    """L2 norm of each neuron's output vector (column of the second matrix), d_ff values."""
    second = view.second_matrix_module(layer_index)
    for cut in view.family.cuts:
        if cut.name.endswith(".weight") and view.layers[layer_index].get_submodule(
                cut.name.rsplit(".", 1)[0]) is second:
            return cut_norms(view, layer_index, cut)
    raise AssertionError("every family has a second FFN matrix")


@torch.no_grad()
def intermediate_activations(view: FFNView, layer_index: int, inputs: Tensor) -> Tensor:
    """The FFN's intermediate activations (samples x d_ff) for ``inputs`` (samples x d_model).

    Runs the layer's own FFN module (the parent of its second matrix) and captures that matrix's
    input, so gating, biases and the activation function are the family's own.
    """
    layer = view.layers[layer_index]
    second = view.second_matrix_module(layer_index)
    second_name = next(name for name, module in layer.named_modules() if module is second)
    parent_name = second_name.rpartition(".")[0]
    if not parent_name:
        raise ValueError(f"{view.model.config.model_type}: the FFN is not a separate module")
    ffn = layer.get_submodule(parent_name)
    captured: list[Tensor] = []

    def capture(module: nn.Module, args: tuple) -> None:
        captured.append(args[0].detach().float())

    handle = second.register_forward_pre_hook(capture)
    try:
        parameter = next(ffn.parameters())
        ffn(inputs.to(dtype=parameter.dtype, device=parameter.device).unsqueeze(0))
    finally:
        handle.remove()
    return captured[0].reshape(inputs.shape[0], -1)


def gaussian_ffn_inputs(view: FFNView, layer_index: int, samples: int, seed: int) -> Tensor:
    """``samples`` synthetic FFN inputs ``scale * z + shift``, z ~ N(0, I): no data involved."""
    generator = torch.Generator().manual_seed(int(seed) + 7919 * layer_index)
    scale, shift = input_scale(view, layer_index)
    return torch.randn(samples, view.d_model, generator=generator) * scale + shift


def expected_activation_scores(
    view: FFNView, layer_index: int, samples: int = 512, seed: int = 0
) -> Tensor:
    """Per-neuron output energy ``mean_x h_i(x)^2 * ||down_i||^2`` over Gaussian FFN inputs."""
    inputs = gaussian_ffn_inputs(view, layer_index, samples, seed)
    activations = intermediate_activations(view, layer_index, inputs)
    return activations.pow(2).mean(dim=0) * down_column_norms(view, layer_index).pow(2)


def random_probe_tokens(model: nn.Module, sequences: int, length: int, seed: int) -> Tensor:
    """``sequences`` x ``length`` token ids uniform over the vocabulary, seeded by ``seed``."""
    generator = torch.Generator().manual_seed(int(seed))
    vocab = model.get_input_embeddings().weight.shape[0]
    return torch.randint(0, vocab, (sequences, length), generator=generator)


def probe_activation_scores(model: nn.Module, tokens: Tensor) -> list[Tensor]:
    """Per layer, each neuron's output energy ``mean h_i^2 * ||down_i||^2`` on probe ``tokens``.

    ``tokens`` (sequences x length) come from :func:`probe_tokens`: no text, only the model's own
    weights decide the activations. Returns one d_ff tensor per layer.
    """
    view = FFNView(model)
    return [mean_h2 * down_column_norms(view, index).pow(2)
            for index, mean_h2 in enumerate(mean_squared_activations(model, tokens))]


def rank_with_protection(base_scores: Tensor, outlier_scores: Tensor, fraction: float) -> Tensor:
    """Scores whose top-k is: the ``fraction`` of rows with the largest ``outlier_scores``, then
    the rest by ``base_scores``. Returns a float ranking (higher = keep first)."""
    count = int(round(fraction * base_scores.numel()))
    order = torch.argsort(base_scores, stable=True)  # ascending
    ranking = torch.empty_like(base_scores, dtype=torch.float64)
    ranking[order] = torch.arange(base_scores.numel(), dtype=torch.float64)
    if count:
        protected = torch.topk(outlier_scores, count).indices
        ranking[protected] += base_scores.numel()
    return ranking
