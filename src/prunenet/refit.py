"""Closed-form repair of the second FFN matrix after any selection (a stage, not a method).

Slicing a layer to the kept neurons K turns its FFN output ``W2 a + b`` into ``W2[:, K] a_K + b``.
The refit chooses new kept columns (and bias) that reproduce the original output on probe
activations instead:

- ``ls``: least squares, ``W2' = (W2 C + lambda W2[:, K]) (A + lambda I)^-1`` with
  ``A = E[a_K a_K^T]`` (the kept neurons' Gram) and ``C = E[a_target a_K^T]`` (``= G[:, K]`` when
  the statistics come from the dense model), ``lambda = ridge * mean(diag A)``. The ridge pulls
  towards the sliced columns rather than towards zero, so the refit never reconstructs worse than
  plain slicing on the probe, and dead (all-zero) neurons keep their original columns. A second
  matrix with a bias is fitted on centred statistics and its bias absorbs the means (the same as
  augmenting ``a`` with a constant 1 that the ridge does not shrink); ``A`` and the ridge's
  scale are then the kept neurons' covariance.
- ``bias`` (FLAP): the bias absorbs the removed neurons' mean output ``W2[:, R] E[a_R]``; only for
  families whose second matrix has a bias.

Only the kept columns of the second matrix (and its bias) change; :func:`prunenet.slicing.
slice_model` then removes the others, so the checkpoint keeps its architecture and size.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .errors import InputError, NumericalError
from .ffn_statistics import (
    LayerCall,
    LayerStatistics,
    add_activations,
    layer_calls,
    second_matrix,
)
from .model_view import FFNView

MODES = ("ls", "bias")
# Measured on SmolLM2 with the default 8,192-token probe: 0.3 beats 1.0 by 2% in perplexity at
# r = 0.3 (three probe seeds) and ties it at 0.1-0.2; 3.0 is worse; below 0.01 overfits the probe.
DEFAULT_RIDGE = 0.3


def least_squares_columns(second: Tensor, kept_rows: Tensor, cross: Tensor, kept_gram: Tensor,
                          ridge: float) -> Tensor:
    """``(second @ cross + lambda second[:, K]) @ (kept_gram + lambda I)^-1`` in float64
    (d_model x k): the minimiser of ``E||W2 a_target - W' a_K||^2 + lambda ||W' - W2[:, K]||^2``.

    ``second``: the original matrix (d_model x d_ff); ``cross``: E[a_target a_K^T] (d_ff x k);
    ``kept_gram``: E[a_K a_K^T] (k x k); ``lambda = ridge * mean(diag kept_gram)``.
    """
    second, kept_gram = second.double(), kept_gram.double()
    scale = float(kept_gram.diagonal().mean())
    penalty = ridge * (scale if scale > 0 else 1.0)
    # kept_gram + penalty I, without a second k x k temporary (the same values, bit for bit)
    regularised = torch.add(kept_gram, torch.eye(kept_gram.shape[0], dtype=torch.float64),
                            alpha=penalty)
    right = (second @ cross.double() + penalty * second[:, kept_rows]).T  # k x d_model
    # kept_gram is symmetric: solve (A + lambda I) X = C^T W2^T, then W2' = X^T.
    return torch.linalg.solve(regularised, right).T


def refit_layer(second: Tensor, bias: Tensor | None, kept_rows: Tensor, stats: LayerStatistics,
                mode: str = "ls", ridge: float = DEFAULT_RIDGE,
                target: LayerStatistics | None = None, cross: Tensor | None = None
                ) -> tuple[Tensor, Tensor | None]:
    """New kept columns (d_model x k) and bias for one layer, float64.

    ``stats``: the activations the pruned layer will see (full d_ff). By default the target is
    the original output on those same activations; for a different target stream (sequential
    refit against the dense model) pass its statistics as ``target`` and the cross sum
    ``sum a_target a_K^T`` (d_ff x k) as ``cross``. Raises :class:`InputError` for ``bias`` on a
    matrix without one and :class:`NumericalError` when the result is not finite.
    """
    if mode not in MODES:
        raise InputError(f"unknown refit mode {mode!r}; use one of {', '.join(MODES)}")
    second = second.double()
    count = max(stats.count, 1)
    target = target or stats
    target_mean, kept_mean = target.mean, stats.mean[kept_rows]
    if mode == "bias":
        if bias is None:
            raise InputError("refit 'bias' needs a bias on the second FFN matrix; this family "
                             "has none: use refit 'ls'")
        removed = _removed(kept_rows, second.shape[1])
        shift = second[:, removed] @ stats.mean[removed]
        if target is not stats:  # another stream's output: W2 E[a_target] - W2[:, K] E[a_K]
            shift += second @ (target_mean - stats.mean)
        return second[:, kept_rows], bias.double() + shift
    # Fresh tensors, scaled and centred in place: a d_ff x d_ff Gram is large (969 MB at
    # LLaMA-2-7B's width), and every copy of its kept part costs as much again.
    if cross is None:  # one stream: the kept Gram is the kept rows of the cross sums
        cross = stats.gram[:, kept_rows].div_(count)
        kept_gram = cross[kept_rows]
    else:
        cross = cross / count
        kept_gram = stats.gram[kept_rows[:, None], kept_rows].div_(count)
    if bias is not None:  # centre: the (unshrunk) bias absorbs the means
        cross.sub_(torch.outer(target_mean, kept_mean))
        kept_gram.sub_(torch.outer(kept_mean, kept_mean))
    try:
        columns = least_squares_columns(second, kept_rows, cross, kept_gram, ridge)
    except RuntimeError as error:  # a singular system (a ridge of 0 or one that underflows,
        # with dead neurons)
        raise NumericalError(f"the refit's system is singular ({error}) at ridge {ridge:g}; "
                             f"raise --ridge (the default is {DEFAULT_RIDGE:g})") from error
    new_bias = None
    if bias is not None:
        new_bias = bias.double() + second @ target_mean - columns @ kept_mean
    return columns, new_bias


def reconstruction_error(second: Tensor, bias: Tensor | None, kept_rows: Tensor,
                         columns: Tensor, new_bias: Tensor | None,
                         stats: LayerStatistics, target: LayerStatistics | None = None,
                         cross: Tensor | None = None) -> float:
    """``sum_t ||W2 a_t + b - (W2' a_t,K + b')||^2`` over the probe tokens, from the statistics;
    with a ``target`` stream (its statistics and ``cross = sum a_target a_K^T``, as
    :func:`refit_layer` takes them), ``sum_t ||W2 a_target,t + b - (W2' a_t,K + b')||^2``."""
    if target is not None:
        return _two_stream_error(second, bias, kept_rows, columns, new_bias, stats, target,
                                 cross)
    # The residual is M z with M = [W2 - W2'_scattered, b - b'] and z = [a, 1].
    second = second.double()
    difference = second.clone()
    difference[:, kept_rows] -= columns.double()
    shift = torch.zeros(second.shape[0], dtype=torch.float64)
    if bias is not None:
        shift = bias.double() - new_bias.double()
    quadratic = ((difference @ stats.gram) * difference).sum()
    linear = 2 * shift @ (difference @ stats.total)
    return float(quadratic + linear + stats.count * shift.pow(2).sum())


def _two_stream_error(second: Tensor, bias: Tensor | None, kept_rows: Tensor, columns: Tensor,
                      new_bias: Tensor | None, stats: LayerStatistics, target: LayerStatistics,
                      cross: Tensor) -> float:
    # sum ||u_t - v_t + s||^2 with u = W2 a_target, v = W' a_K, s = b - b'.
    second, columns = second.double(), columns.double()
    kept_gram = stats.gram[kept_rows[:, None], kept_rows]
    quadratic = (((second @ target.gram) * second).sum() + ((columns @ kept_gram) * columns).sum()
                 - 2 * ((second @ cross.double()) * columns).sum())
    if bias is None:
        return float(quadratic)
    shift = bias.double() - new_bias.double()
    linear = 2 * shift @ (second @ target.total - columns @ stats.total[kept_rows])
    return float(quadratic + linear + stats.count * shift.pow(2).sum())


def _named(layer_index: int, function, *args):
    """``function(*args)``, with the layer named in a :class:`NumericalError`."""
    try:
        return function(*args)
    except NumericalError as error:
        raise NumericalError(f"layer {layer_index}: {error}") from error


def _removed(kept_rows: Tensor, d_ff: int) -> Tensor:
    mask = torch.ones(d_ff, dtype=torch.bool)
    mask[kept_rows] = False
    return mask.nonzero().squeeze(1)


def _check_finite(layer_index: int, columns: Tensor, new_bias: Tensor | None) -> None:
    if not (torch.isfinite(columns).all() and (new_bias is None or torch.isfinite(new_bias).all())):
        raise NumericalError(f"the refit of layer {layer_index} is not finite; raise the ridge or "
                             "check the probe activations for inf/nan")


@torch.no_grad()
def _write(view: FFNView, layer_index: int, kept_rows: Tensor, columns: Tensor,
           new_bias: Tensor | None, zero_removed: bool = False) -> None:
    matrix, bias = second_matrix(view, layer_index)
    matrix[:, kept_rows.to(matrix.device)] = columns.to(matrix.dtype).to(matrix.device)
    if zero_removed:
        matrix[:, _removed(kept_rows, matrix.shape[1]).to(matrix.device)] = 0
    if new_bias is not None:
        bias.copy_(new_bias.to(bias.dtype))


def refit_layers(view: FFNView, kept_rows: Sequence[Tensor],
                 statistics: Iterable[LayerStatistics], mode: str = "ls",
                 ridge: float = DEFAULT_RIDGE
                 ) -> Iterator[tuple[int, Tensor, Tensor | None, dict]]:
    """Per layer, in order: (index, new kept columns (d_model x k) and bias in the matrix's
    dtype, the layer's record), from the unpruned model's statistics; the model is not changed.
    Raises :class:`NumericalError` naming the layer whose refit is not finite."""
    # Not zip(): it keeps its last tuple, and with it the previous layer's Gram, until the next
    # layer's statistics (a new Gram, collected as they are asked for) are in hand.
    statistics = iter(statistics)
    for index, rows in enumerate(kept_rows):
        stats = next(statistics, None)
        if stats is None:
            raise ValueError(f"statistics for {index} layers, kept rows for {len(kept_rows)}")
        matrix, bias = second_matrix(view, index)
        matrix, bias = matrix.cpu(), None if bias is None else bias.cpu()
        columns, new_bias = _named(index, refit_layer, matrix, bias, rows, stats, mode, ridge)
        layer = _layer_record(index, matrix, bias, rows, columns, new_bias, stats)
        del stats  # a Gram held apart is released before the next layer's is collected
        columns = columns.to(matrix.dtype)  # k of the d_ff columns: less than the matrix
        new_bias = None if new_bias is None else new_bias.to(bias.dtype)
        _check_finite(index, columns, new_bias)
        yield index, columns, new_bias, layer
    if next(statistics, None) is not None:
        raise ValueError(f"statistics for more layers than the {len(kept_rows)} kept rows")


def refit_record(mode: str, ridge: float, layers: list[dict]) -> dict:
    """The refit's part of the compression record: mode, the ridge where the mode uses one
    (``ls``; ``bias`` has none) and, per layer, the probe reconstruction error of plain slicing
    and of the refit (relative to the output energy)."""
    ridged = {"ridge": ridge} if mode == "ls" else {}
    return {"mode": mode, **ridged, "statistics": "dense", "layers": layers}


def refit_model(model: nn.Module, kept_rows: Sequence[Tensor],
                statistics: Iterable[LayerStatistics], mode: str = "ls",
                ridge: float = DEFAULT_RIDGE) -> dict:
    """Refit every layer's kept second-matrix columns (and bias) in place, before slicing.

    ``statistics``: the unpruned model's, in layer order, Grams included: the list of
    :func:`prunenet.ffn_statistics.collect_ffn_statistics`, or
    :meth:`prunenet.ffn_statistics.ProbeStatistics.with_grams`, which is read one layer at a
    time. Returns the record (:func:`refit_record`).
    """
    view = FFNView(model)
    layers, refitted = [], []
    for _, columns, new_bias, layer in refit_layers(view, kept_rows, statistics, mode, ridge):
        layers.append(layer)
        refitted.append((columns, new_bias))
    # Written once every layer is refitted: statistics collected a few layers per pass come
    # from the unchanged model, and a layer that fails leaves the model as it was.
    for index, (rows, (columns, new_bias)) in enumerate(zip(kept_rows, refitted, strict=True)):
        _write(view, index, rows, columns, new_bias)
    return refit_record(mode, ridge, layers)


def _layer_record(index: int, matrix: Tensor, bias: Tensor | None, rows: Tensor,
                  columns: Tensor, new_bias: Tensor | None, stats: LayerStatistics,
                  target: LayerStatistics | None = None, cross: Tensor | None = None) -> dict:
    """The layer's errors against the output the refit matches: the original FFN's on
    ``stats``' activations, or with a ``target`` stream on its activations."""
    zero_bias = None if bias is None else torch.zeros_like(bias)
    error = partial(reconstruction_error, matrix, bias, rows, stats=stats, target=target,
                    cross=cross)
    energy = reconstruction_error(matrix, bias, rows, torch.zeros_like(columns), zero_bias,
                                  target or stats)
    before = error(matrix[:, rows], bias)
    after = error(columns, new_bias)
    return {"layer": index, "relative_error_sliced": before / max(energy, 1e-30),
            "relative_error_refit": after / max(energy, 1e-30)}


@torch.no_grad()
def sequential_refit(model: nn.Module, kept_rows: Sequence[Tensor] | None, probe_tokens: Tensor,
                     mode: str = "ls", ridge: float = DEFAULT_RIDGE, target: str = "dense",
                     batch_size: int = 8, progress: bool = False,
                     select: Callable[[int, LayerStatistics], Tensor] | None = None) -> dict:
    """Refit layer by layer on the activations of the model pruned so far, in place.

    Layer l's statistics come from the probe run through layers < l already refitted (their
    removed columns zeroed, so the unsliced model computes what the sliced one will).
    ``target="dense"``: match the dense model's FFN output (cross sums between the dense and
    the pruned stream); ``"pruned"``: match the original FFN on the pruned stream's input.
    ``select(l, statistics)``, with ``target="pruned"`` and no ``kept_rows``, chooses layer l's
    kept rows from its statistics on the pruned stream. Slice afterwards with
    :func:`prunenet.slicing.slice_model`. Returns the record of :func:`refit_model` with
    ``statistics`` set to ``sequential-<target>``.
    """
    if target not in ("dense", "pruned"):
        raise InputError(f"unknown refit target {target!r}; use 'dense' or 'pruned'")
    if (select is None) == (kept_rows is None) or (select is not None and target != "pruned"):
        raise ValueError("give kept_rows, or select with target='pruned'")
    view = FFNView(model)
    pruned, calls = layer_calls(model, probe_tokens, batch_size)
    dense = list(pruned) if target == "dense" else None
    layers = []
    for index in tqdm(range(view.num_layers), desc="refit", disable=not progress, leave=False):
        layer = view.layers[index]
        rows = None if kept_rows is None else kept_rows[index].cpu()
        original = copy.deepcopy(layer) if dense is not None else None
        stats, target_stats, cross = _stream_statistics(view, index, layer, original, rows,
                                                        calls[index], pruned, dense)
        if select is not None:
            rows = select(index, stats).cpu()
        matrix, bias = second_matrix(view, index)
        matrix, bias = matrix.cpu().clone(), None if bias is None else bias.cpu().clone()
        columns, new_bias = _named(index, refit_layer, matrix, bias, rows, stats, mode, ridge,
                                   target_stats, cross)
        layers.append(_layer_record(index, matrix, bias, rows, columns, new_bias, stats,
                                    target_stats, cross))
        _check_finite(index, columns, new_bias)
        _write(view, index, rows, columns, new_bias, zero_removed=True)
        for batch, call in enumerate(calls[index]):
            pruned[batch] = call.run(layer, pruned[batch])
    ridged = {"ridge": ridge} if mode == "ls" else {}
    return {"mode": mode, **ridged, "statistics": f"sequential-{target}", "layers": layers}


def _stream_statistics(view: FFNView, index: int, layer: nn.Module, original: nn.Module | None,
                       rows: Tensor | None, calls: list[LayerCall], pruned: list[Tensor],
                       dense: list[Tensor] | None
                       ) -> tuple[LayerStatistics, LayerStatistics | None, Tensor | None]:
    """Statistics of layer ``index`` on the pruned stream; with a dense stream also its own
    statistics and the cross sum ``sum a_dense a_pruned,K^T``; advances the dense stream."""
    d_ff = view.d_ff
    stats = LayerStatistics.empty(d_ff)
    target = LayerStatistics.empty(d_ff) if dense is not None else None
    cross = torch.zeros(d_ff, rows.numel(), dtype=torch.float64) if dense is not None else None
    captured: list[Tensor] = []

    def hook(_module: nn.Module, args: tuple) -> None:
        captured.append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu())

    modules = [view.second_matrix_module(index)]
    if original is not None:
        modules.append(original.get_submodule(_relative_name(view, index)))
    handles = [module.register_forward_pre_hook(hook) for module in modules]
    try:
        for batch, call in enumerate(calls):
            captured.clear()
            call.run(layer, pruned[batch])
            add_activations(stats, captured[-1])
            if dense is not None:
                dense[batch] = call.run(original, dense[batch])
                add_activations(target, captured[-1])
                cross += (captured[-1].T @ captured[0][:, rows]).double()
    finally:
        for handle in handles:
            handle.remove()
    return stats, target, cross


def _relative_name(view: FFNView, index: int) -> str:
    layer = view.layers[index]
    module = view.second_matrix_module(index)
    return next(name for name, candidate in layer.named_modules() if candidate is module)

