"""Calibration-free neuron scores and the named variants of compression (issue 7).

PruneNet's spectral reward alone does not protect what small models need: on SmolLM2-135M the
faithful policy and every weight-only score below are worse than random selection
(benchmarks/quality_ablation.md). All pieces here take only the model (no corpus, no user data):

- ``input_scale``: the elementwise weight (and bias) of the norm that feeds the FFN.
- ``leverage_scores``: how much each row carries of a matrix's column space (a closed-form
  per-row spectral score: removing a row of leverage h scales one direction's energy by 1 - h).
- ``expected_activation_scores``: each neuron's output energy ``E[h_i(x)^2] * ||down_i||^2`` for
  Gaussian inputs shaped by ``input_scale`` (through the layer's own FFN module).
- ``probe_tokens`` / ``probe_activation_scores``: the same energy measured by running the model on
  token ids it is given (uniformly random) or writes itself (``generated``).
- ``self_generated_scores``: the default's score, ``mean h_i^2 * ||first_i||^2`` on the model's
  own generated text (the calibration-based baseline's product, without calibration data).
- ``rank_with_protection``: keep a fraction of outlier neurons first, then follow a base score.

Variants: ``reference`` (the SPEC method, a trained policy) and ``self-generated`` (the default:
activations on the model's own samples, which nearly matches a calibration-based selection).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .baselines import cut_norms
from .calibration import squared_activation_sums
from .errors import InputError
from .families import context_length, kept_count
from .model_view import FFNView
from .policy import top_rows

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


def _second_module_name(view: FFNView) -> str:
    """Name (inside a layer) of the matrix whose input is the FFN's intermediate activation."""
    weights = [cut.name for cut in view.family.cuts if cut.name.endswith("weight")]
    return weights[-1].rsplit(".", 1)[0]


def down_column_norms(view: FFNView, layer_index: int) -> Tensor:
    """L2 norm of each neuron's output vector (column of the second matrix), d_ff values."""
    for cut in view.family.cuts:
        if cut.name == f"{_second_module_name(view)}.weight":
            return cut_norms(view, layer_index, cut)
    raise AssertionError("every family has a second FFN matrix")


@torch.no_grad()
def intermediate_activations(view: FFNView, layer_index: int, inputs: Tensor) -> Tensor:
    """The FFN's intermediate activations (samples x d_ff) for ``inputs`` (samples x d_model).

    Runs the layer's own FFN module (the parent of its second matrix) and captures that matrix's
    input, so gating, biases and the activation function are the family's own.
    """
    layer = view.layers[layer_index]
    second_name = _second_module_name(view)
    parent_name = second_name.rpartition(".")[0]
    if not parent_name:
        raise ValueError(f"{view.model.config.model_type}: the FFN is not a separate module")
    second = layer.get_submodule(second_name)
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


@torch.no_grad()
def probe_tokens(
    model: nn.Module, sequences: int, length: int, seed: int, source: str = "random"
) -> Tensor:
    """``sequences`` x ``length`` token ids made without any data, seeded by ``seed``.

    ``source="random"``: uniform over the vocabulary. ``source="generated"``: the model's own
    samples (temperature 1) continuing its BOS token (or a random first token when it has none or
    it lies outside the vocabulary).
    """
    generator = torch.Generator().manual_seed(int(seed))
    vocab = model.get_input_embeddings().weight.shape[0]
    if source == "random":
        return torch.randint(0, vocab, (sequences, length), generator=generator)
    if source != "generated":
        raise ValueError(f"unknown probe source {source!r}; use 'random' or 'generated'")
    bos = getattr(model.config, "bos_token_id", None)
    first = torch.randint(0, vocab, (sequences, 1), generator=generator)
    if isinstance(bos, int) and 0 <= bos < vocab:
        first[:] = bos
    device = next(model.parameters()).device
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        prompt = first.to(device)
        tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=length - 1,
                                min_new_tokens=length - 1, pad_token_id=0)
    return tokens.cpu()


def mean_squared_activations(model: nn.Module, tokens: Tensor) -> list[Tensor]:
    """Per layer, each FFN neuron's mean squared activation ``mean h_i^2`` on ``tokens``
    (sequences x length), read at the input of the FFN's second matrix (float32 sums)."""
    sums = squared_activation_sums(model, tokens, torch.float32)
    return [layer_sum / tokens.numel() for layer_sum in sums]


def probe_activation_scores(model: nn.Module, tokens: Tensor) -> list[Tensor]:
    """Per layer, each neuron's output energy ``mean h_i^2 * ||down_i||^2`` on probe ``tokens``.

    ``tokens`` (sequences x length) come from :func:`probe_tokens`: no text, only the model's own
    weights decide the activations. Returns one d_ff tensor per layer.
    """
    view = FFNView(model)
    return [mean_h2 * down_column_norms(view, index).pow(2)
            for index, mean_h2 in enumerate(mean_squared_activations(model, tokens))]


def self_generated_scores(model: nn.Module, tokens: Tensor) -> list[Tensor]:
    """The default variant's score: ``mean h_i^2 * ||first_i||^2`` on the model's own text.

    The Wanda-style product of the calibration-based ``activation`` baseline (row norm of the
    first FFN matrix times activation norm), with self-generated text instead of calibration
    data. On SmolLM2 it beat the output energy ``mean h_i^2 * ||down_i||^2`` for 3 of 3 seeds at
    each of r = 0.1, 0.2, 0.3 (benchmarks/quality_ablation.md).
    """
    view = FFNView(model)
    return [mean_h2 * view.first_matrix(index, "cpu").float().norm(dim=1).pow(2)
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


REFERENCE = "reference"
# name -> what it does; the default is chosen by benchmarks/quality_ablation.md.
VARIANTS: dict[str, str] = {
    REFERENCE: "PruneNet as in SPEC.md: a REINFORCE policy on the first FFN matrix's spectrum",
    "self-generated": "keep the neurons of highest output energy on text the model generates "
    "itself (seeded samples from its BOS token); no policy, no data",
}
DEFAULT_VARIANT = "self-generated"
SELF_GENERATED_SEQUENCES = 4
SELF_GENERATED_LENGTH = 128


def resolve_variant(variant: str | None, policy: object | None = None) -> str:
    """The variant to run: ``variant`` when named, else ``reference`` for a given policy and the
    default otherwise. Raises :class:`InputError` for an unknown name or a policy given to a
    variant that uses none."""
    if variant is None:
        return REFERENCE if policy is not None else DEFAULT_VARIANT
    if variant not in VARIANTS:
        raise InputError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    if policy is not None and variant != REFERENCE:
        raise InputError(f"variant {variant!r} uses no policy; pass --variant reference to "
                         "prune with a trained policy")
    return variant


def variant_rows(model: nn.Module, ratio: float, variant: str, seed: int) -> list[Tensor]:
    """Kept neuron indices per layer for a policy-free ``variant`` (sorted, same count)."""
    if not isinstance(model, nn.Module):
        raise InputError(f"variant {variant!r} runs the model and needs it in memory; raise "
                         "--max-memory or use --variant reference")
    if variant != "self-generated":
        raise InputError(f"variant {variant!r} has no policy-free selection")
    kept = kept_count(FFNView(model).d_ff, ratio)
    scores = self_generated_scores(model, self_generated_tokens(model, seed))
    return [top_rows(layer_scores, kept) for layer_scores in scores]


def self_generated_tokens(model: nn.Module, seed: int) -> Tensor:
    """The default variant's probe: SELF_GENERATED_SEQUENCES samples of the model's own text,
    SELF_GENERATED_LENGTH tokens each (fewer when the model has fewer positions)."""
    positions = context_length(model.config) or SELF_GENERATED_LENGTH
    length = min(SELF_GENERATED_LENGTH, positions)
    return probe_tokens(model, SELF_GENERATED_SEQUENCES, length, seed, "generated")
