"""The verbs: train_policy(), prune(), compress().

load a model -> see its FFNs through a family entry -> train (or load) a policy ->
select rows -> slice -> save. Each verb accepts a loaded transformers model or anything
``load_model_and_tokenizer`` accepts (folder, GGUF file, alias, Hub id).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import __version__
from .baselines import magnitude_product_rows, magnitude_rows, random_rows
from .calibration import Calibration, activation_rows
from .checkpoints import (
    is_model_output,
    is_policy_file,
    load_model_and_tokenizer,
    load_policy,
    policy_checksum,
    resolve_source,
    save_compressed,
    save_policy,
)
from .errors import InputError, NumericalError
from .families import kept_count
from .io.files import Output, guard_outputs, sibling_path
from .model_view import FFNView
from .policy import PrunePolicy, keep_probabilities, sample_rows, top_rows
from .recording import first_matrix_spectra, is_run_record, write_run_record
from .reinforce import TrainingConfig, TrainingResult, make_generator, train_policy_on_matrices
from .slicing import slice_model
from .streaming import LayerMatrices, StreamedCheckpoint, choose_streaming, prune_streamed
from .variants import DEFAULT_VARIANT, REFERENCE, resolve_variant, variant_rows

log = logging.getLogger(__name__)

METHODS = ("prunenet", "random", "magnitude", "magnitude-product", "activation")
SELECTIONS = ("sample", "topk")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; a clear error for an unavailable device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA GPU is available; use cpu")
    return resolved


def _as_model(model: Any, trust_remote_code: bool = False):
    if isinstance(model, nn.Module):
        return model, None
    if isinstance(model, (str, os.PathLike)):
        return load_model_and_tokenizer(model, device="cpu", trust_remote_code=trust_remote_code)
    raise InputError(f"expected a model or a model path, got {type(model).__name__}")


def check_finite_weights(view: FFNView) -> None:
    """Raise naming the first FFN tensor that holds NaN or Inf."""
    for index, layer in enumerate(view.layers):
        for cut in view.family.cuts:
            try:
                tensor = layer.get_parameter(cut.name)
            except AttributeError:
                continue
            if not torch.isfinite(tensor).all():
                raise NumericalError(
                    f"{view.family.tensor_name(index, cut)} holds NaN or Inf; the checkpoint is "
                    "damaged and cannot be pruned"
                )


def train_policy(
    model: Any,
    ratio: float = 0.3,
    *,
    episodes: int = 20,
    lr: float = 1e-3,
    seed: int = 42,
    device: str | torch.device = "auto",
    progress: bool = True,
    state_path: str | os.PathLike | None = None,
    resume: bool = False,
    max_memory: int | str | None = None,
    **options: Any,
) -> TrainingResult:
    """Train a PruneNet policy on ``model``'s FFN weights at compression ``ratio``.

    ``options`` are further :class:`TrainingConfig` fields (gamma, reward, reward_to_go, baseline,
    kld, clip_norm, spectral, precision). ``state_path`` keeps the training state after every
    episode so that ``resume=True`` continues an interrupted run. A safetensors folder that would
    not fit ``max_memory`` (e.g. "2GB"; default: half the free RAM) is streamed one layer at a
    time.
    Returns a :class:`TrainingResult`.
    """
    config = TrainingConfig(ratio=ratio, episodes=episodes, lr=lr, seed=seed, **options)
    config.validate()
    run_device = resolve_device(device)
    streamed = choose_streaming(model, max_memory, training=True)
    if streamed is not None:  # one layer's matrix in memory at a time, read again per use
        kept_count(streamed.d_ff, ratio)
        return train_policy_on_matrices(LayerMatrices(streamed, run_device), config,
                                        progress=progress, state_path=state_path, resume=resume,
                                        keep_matrices=False)
    model, _ = _as_model(model)
    view = FFNView(model)
    kept_count(view.d_ff, ratio)
    check_finite_weights(view)
    matrices = [view.first_matrix(i, run_device) for i in range(view.num_layers)]
    return train_policy_on_matrices(matrices, config, progress=progress, state_path=state_path,
                                    resume=resume)


def input_path(source: str | os.PathLike) -> str:
    """The local path a MODEL argument reads (the folder, or the .gguf file); a Hub id as is."""
    folder, gguf_file = resolve_source(source)
    return str(Path(folder) / gguf_file) if gguf_file else folder


def model_outputs(out, record_dir, overwrite: bool, reads: list, *extra: Output | None) -> None:
    """Check a compression's outputs against its inputs before any work (see prunenet.io.files)."""
    guard_outputs([
        Output(out, "--out", ours=is_model_output) if out is not None else None,
        Output(record_dir, "--record", ours=is_run_record) if record_dir is not None else None,
        *extra,
    ], reads, overwrite)


def training_state_path(output: str | os.PathLike) -> Path:
    """Where a run writing ``output`` keeps its resumable training state: a sibling file."""
    return sibling_path(output, ".train-state.pt")


def select_rows(
    model: nn.Module,
    ratio: float,
    *,
    method: str = "prunenet",
    policy: PrunePolicy | None = None,
    selection: str = "sample",
    seed: int = 42,
    device: str | torch.device = "auto",
    progress: bool = True,
    tokenizer: Any = None,
    calibration: Calibration | None = None,
    variant: str | None = None,
) -> list[Tensor]:
    """Kept neuron indices per layer (sorted, distinct, all the same count) for ``method``.

    ``activation`` (the calibration-based reference) also needs ``tokenizer`` and reads
    ``calibration`` (default: 16 training windows of the wiki corpus). For ``prunenet``,
    ``variant`` (see :mod:`prunenet.variants`; None: ``reference`` when a policy is given, else
    the default variant) picks the faithful policy path or a policy-free selection.
    """
    view = model if isinstance(model, StreamedCheckpoint) else FFNView(model)
    kept = kept_count(view.d_ff, ratio)
    if method == "activation":
        return activation_rows(model, tokenizer, kept, calibration, progress)
    if method == "random":
        return random_rows(view, kept, seed)
    if method == "magnitude":
        return magnitude_rows(view, kept)
    if method == "magnitude-product":
        return magnitude_product_rows(view, kept)
    if method != "prunenet":
        raise InputError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    variant = resolve_variant(variant, policy)
    if variant != REFERENCE:
        return variant_rows(model, ratio, variant, seed)
    if selection not in SELECTIONS:
        raise InputError(f"unknown selection {selection!r}; use 'sample' or 'topk'")
    if policy is None:
        raise InputError("method 'prunenet' needs a policy (train one, or pass --policy)")
    run_device = resolve_device(device)
    policy = policy.to(run_device)
    policy.check_fits(view.d_model, view.d_ff)
    generator = make_generator(seed, run_device)
    rows = []
    with torch.no_grad():
        for index in tqdm(range(view.num_layers), desc="selecting rows", leave=False,
                          disable=not progress):
            alpha = policy.keep_scores(view.first_matrix(index, run_device))
            if selection == "topk":
                rows.append(top_rows(alpha, kept).cpu())
            else:
                noise = torch.rand(view.d_ff, generator=generator, device=run_device)
                rows.append(sample_rows(keep_probabilities(alpha, noise), kept, generator).cpu())
    return rows


@dataclass
class CompressionResult:
    model: nn.Module
    tokenizer: Any
    kept_rows: list[Tensor]
    record: dict[str, Any]
    policy: PrunePolicy | None = None
    training: TrainingResult | None = None
    out: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def _record(method: str, ratio: float, seed: int, before: dict, after: dict, d_ff: int,
            kept: int, source: str | None, policy: PrunePolicy | None, selection: str | None,
            training: TrainingResult | None) -> dict[str, Any]:
    record = {
        "format": "prunenet-compression/1",
        "prunenet_version": __version__,
        "method": method,
        "ratio": ratio,
        "seed": seed,
        "selection": selection,
        "ffn_width_before": d_ff,
        "ffn_width_after": kept,
        "parameters_before": before["total"],
        "parameters_after": after["total"],
        "ffn_parameters_before": before["ffn"],
        "ffn_parameters_after": after["ffn"],
        "parameter_reduction": 1 - after["total"] / before["total"],
        "source": source,
        "policy_sha256": policy_checksum(policy) if policy is not None else None,
    }
    if training is not None:
        record["training"] = {
            **{k: v for k, v in vars(training.config).items()},
            "best_episode": training.best_episode,
            "episode_total_reward": [r.total_reward for r in training.history],
            "episode_mean_ks": [r.mean_ks for r in training.history],
        }
    return record


def prune(
    model: Any,
    policy: PrunePolicy | str | os.PathLike | None = None,
    ratio: float = 0.3,
    *,
    method: str = "prunenet",
    selection: str = "sample",
    seed: int = 42,
    device: str | torch.device = "auto",
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    tokenizer: Any = None,
    calibration: Calibration | None = None,
    record_dir: str | os.PathLike | None = None,
    max_memory: int | str | None = None,
    variant: str | None = None,
    _training: TrainingResult | None = None,
) -> CompressionResult:
    """Remove FFN neurons of ``model`` at ``ratio`` with a trained ``policy`` (or a baseline).

    The model is sliced in place. With ``out``, the result is saved atomically as a stock
    checkpoint with ``prunenet.json``. With ``record_dir``, the run's data for ``prunenet report``
    is saved there too (:mod:`prunenet.recording`). Raises for a ratio outside [0, 1), a policy
    that does not fit the model's FFN shapes, or an output that would overwrite a model or sit
    inside the input. ``variant`` as in :func:`select_rows` (method ``prunenet`` only).
    """
    source = None if isinstance(model, nn.Module) else str(model)
    reads = [input_path(source)] if source is not None else []  # a bad input fails first
    if isinstance(policy, (str, os.PathLike)):
        reads.append(policy)
    model_outputs(out, record_dir, overwrite, reads)
    if isinstance(policy, (str, os.PathLike)):
        policy, _ = load_policy(policy)
    variant = resolve_variant(variant, policy) if method == "prunenet" else None
    streamed = choose_streaming(model, max_memory, training=False) if source else None
    if streamed is not None:  # too big for max_memory: read, slice and write tensor by tensor
        _check_streamed_outputs(out, record_dir)
        return prune_streamed(streamed, policy, ratio, method=method, selection=selection,
                              seed=seed, device=device, out=out, overwrite=overwrite,
                              progress=progress, training=_training, variant=variant)
    model, loaded_tokenizer = _as_model(model, trust_remote_code)
    tokenizer = loaded_tokenizer if tokenizer is None else tokenizer
    view = FFNView(model)
    kept = kept_count(view.d_ff, ratio)
    if policy is not None:
        policy.check_fits(view.d_model, view.d_ff)
    check_finite_weights(view)
    before = view.parameter_counts()
    original_spectra = first_matrix_spectra(model) if record_dir is not None else None
    rows = select_rows(model, ratio, method=method, policy=policy, selection=selection,
                       seed=seed, device=device, progress=progress, tokenizer=tokenizer,
                       calibration=calibration, variant=variant)
    slice_model(model, rows)
    after = FFNView(model).parameter_counts()
    record = _record(method, ratio, seed, before, after, view.d_ff, kept, source,
                     policy if method == "prunenet" else None,
                     selection if method == "prunenet" else None, _training)
    if method == "activation":
        record["calibration"] = vars(calibration or Calibration())
    if variant is not None:
        record["variant"] = variant
    saved = None
    if out is not None:
        saved = str(save_compressed(model, tokenizer, out, record, overwrite,
                                    [source] if source else []))
    if record_dir is not None:
        write_run_record(record_dir, model, rows, record, original_spectra, _training, overwrite)
    return CompressionResult(model, tokenizer, rows, record, policy, _training, saved)


def compress(
    model: Any,
    ratio: float = 0.3,
    *,
    method: str = "prunenet",
    episodes: int = 20,
    lr: float = 1e-3,
    seed: int = 42,
    selection: str = "sample",
    device: str | torch.device = "auto",
    out: str | os.PathLike | None = None,
    policy_out: str | os.PathLike | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
    tokenizer: Any = None,
    calibration: Calibration | None = None,
    record_dir: str | os.PathLike | None = None,
    max_memory: int | str | None = None,
    variant: str | None = None,
    **options: Any,
) -> CompressionResult:
    """Prune ``model`` at ``ratio``; for ``method="prunenet"`` with ``variant="reference"``,
    train a PruneNet policy first (the faithful method); other variants need no policy.
    ``variant=None``: the default variant in memory, ``reference`` when the model is streamed
    (the default variant runs the model, which a streamed checkpoint never holds in memory).

    Returns a :class:`CompressionResult` with the pruned model, kept rows, record and policy.
    ``out``/``policy_out`` save them; ``record_dir`` keeps the run's data for ``prunenet report``.
    ``options`` are extra :class:`TrainingConfig` fields. A safetensors folder that would not fit
    ``max_memory`` is streamed (:mod:`prunenet.streaming`): same result, ``result.model`` None.
    """
    source = None if isinstance(model, nn.Module) else str(model)
    reads = [input_path(source)] if source is not None else []  # a bad input fails first
    state_of = out if out is not None else policy_out
    model_outputs(
        out, record_dir, overwrite, reads,
        Output(policy_out, "--policy-out", folder=False, ours=is_policy_file)
        if policy_out is not None else None,
        Output(training_state_path(state_of), "training state", folder=False, working=True)
        if state_of is not None else None,
    )
    streamed = choose_streaming(model, max_memory, method == "prunenet") if source else None
    if variant is None:
        variant = DEFAULT_VARIANT
        if streamed is not None and method == "prunenet":
            variant = REFERENCE
            log.warning("the model is streamed, and the default variant %r needs it in memory: "
                        "training a PruneNet policy instead (--variant reference)",
                        DEFAULT_VARIANT)
    trains_policy = method == "prunenet" and resolve_variant(variant) == REFERENCE
    if policy_out is not None and not trains_policy:
        raise InputError(f"--policy-out needs a trained policy: method 'prunenet' with variant "
                         f"'reference' (variant {variant!r} uses none)")
    if streamed is None:
        model, loaded_tokenizer = _as_model(model, trust_remote_code)
    else:
        _check_streamed_outputs(out, record_dir)
        model, loaded_tokenizer = streamed, None
    tokenizer = loaded_tokenizer if tokenizer is None else tokenizer
    training = None
    policy = None
    state_path = None
    if trains_policy:
        state_path = training_state_path(out or policy_out) if (out or policy_out) else None
        training = train_policy(model, ratio, episodes=episodes, lr=lr, seed=seed, device=device,
                                progress=progress, state_path=state_path, resume=resume,
                                **options)
        policy = training.policy
        if policy_out is not None:
            save_policy(policy, policy_out, policy_metadata(model, training))
    original_spectra = first_matrix_spectra(model) if record_dir is not None else None
    result = prune(model, policy, ratio, method=method, selection=selection, seed=seed,
                   device=device, progress=progress, tokenizer=tokenizer,
                   calibration=calibration, out=out if streamed else None, overwrite=overwrite,
                   variant=variant if method == "prunenet" else None, _training=training)
    result.tokenizer = tokenizer
    result.record["source"] = source
    if out is not None and streamed is None:
        result.out = str(save_compressed(result.model, tokenizer, out, result.record, overwrite,
                                         [source] if source else []))
    if record_dir is not None:
        write_run_record(record_dir, result.model, result.kept_rows, result.record,
                         original_spectra, training, overwrite)
    if training is not None and state_path is not None:
        state_path.unlink(missing_ok=True)  # the run finished: nothing left to resume
    return result


def _check_streamed_outputs(out: str | os.PathLike | None,
                            record_dir: str | os.PathLike | None) -> None:
    if out is None:
        raise InputError("a streamed compression writes its result to disk: pass --out")
    if record_dir is not None:
        raise InputError("--record needs the model in memory; it is not available when "
                         "streaming (raise --max-memory)")


def policy_metadata(model: nn.Module, training: TrainingResult) -> dict[str, Any]:
    """What SPEC §5 asks to store with a policy."""
    streamed = isinstance(model, StreamedCheckpoint)
    view = model if streamed else FFNView(model)
    return {
        "d_model": view.d_model,
        "d_ff": view.d_ff,
        "model_type": model.model_type if streamed else model.config.model_type,
        "num_layers": view.num_layers,
        "trained_ratio": training.config.ratio,
        "episodes": training.config.episodes,
        "seed": training.config.seed,
        "lr": training.config.lr,
        "config": vars(training.config),
        "best_episode": training.best_episode,
        "history": [
            {"episode": r.episode, "total_reward": r.total_reward, "mean_ks": r.mean_ks,
             "loss": r.loss}
            for r in training.history
        ],
        "prunenet_version": __version__,
    }
