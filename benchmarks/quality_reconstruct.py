"""Selection x reconstruction on SmolLM2-135M: does the closed-form refit close the gap to
calibration?

Every run prunes a fresh copy of the dense model: select rows (``self-generated`` on the model's
own probe text, ``activation`` on real training windows, ``random``, ``magnitude``, the
paper's policy ``prunenet`` sampling its final rows or ``prunenet-topk`` keeping its top-scored
ones), optionally
refit the second FFN matrix (``ls`` from dense statistics; ``bias``, FLAP's mean
compensation, on a model given a bias of zeros by ``--mlp-bias``; sequential statistics: ``ls-seq``
matching the dense stream's FFN output, ``ls-seq-pruned`` the original FFN on the pruned
stream, ``ls-seq-select`` the same with the rows chosen on the pruned stream too;
``ls-diag``: each kept neuron's ridge proportional to its own mean square instead of the mean
over neurons, :func:`diagonal_ridge_columns`), slice, and measure perplexity on the
first ``--windows`` evaluation windows of the wiki sample (never used for calibration). The
score (third field of a job): ``wanda``, ``energy``,
``fluctuation`` (``prunenet.ffn_statistics.SCORES``), or two that know about the refit: ``obs`` /
``obs-greedy`` (the neurons whose removal the refit repairs best) and ``wanda-obs`` (Wanda
discounted by how well the other neurons predict each one), or gradient scores ``fisher-token``,
``fisher-sequence``, ``fisher-token-sampled`` (each neuron's diagonal Fisher information on the
probe, :func:`fisher_scores`), or the Wanda-style product with an aggregate over tokens or
sequences less swayed by a few of them, ``wanda-l1``, ``wanda-tokennorm``, ``wanda-seqnorm``,
``wanda-seqmedian``, ``wanda-seqq25``, ``wanda-seqgeo`` (:func:`aggregate_scores`), or the
mean square times another weight norm of gated FFNs, ``wanda-up`` (the up row), ``wanda-gate-up``
(gate and up rows), ``mean-square`` (none), ``wanda-gate-pP`` (the gate row's norm to the power
P instead of 2) (:func:`weight_norm_scores`). Results are
appended to a JSON-lines log; finished runs are skipped, ``--report`` prints the table.

    nice -n 10 python -u benchmarks/quality_reconstruct.py --ratios 0.3,0.2,0.1 --windows 4
    python benchmarks/quality_reconstruct.py --report
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import resource
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import Tensor

import prunenet.refit
from prunenet.evaluation.corpora import load_corpus
from prunenet.evaluation.perplexity import perplexity
from prunenet.families import kept_count
from prunenet.ffn_statistics import (
    SCORES,
    LayerStatistics,
    add_activations,
    collect_ffn_statistics,
    layer_wanda_product,
    second_matrix,
    wanda_product,
)
from prunenet.io.files import atomic_file
from prunenet.io.loading import load_model_and_tokenizer
from prunenet.model_view import FFNView
from prunenet.pipeline import select_rows, train_policy
from prunenet.probe import SAMPLER, ProbeRecipe, generate_probe
from prunenet.refit import reconstruction_error, refit_layer, refit_model, sequential_refit
from prunenet.selection.base import top_rows
from prunenet.slicing import slice_model

CACHE = Path.home() / ".cache" / "prunenet" / "bench-reconstruct"
LOG = "benchmarks/results/quality_reconstruct.jsonl"
DEFAULT_MODEL = "smollm2-135m"
EPISODES = 20  # the policy's training episodes of the logged prunenet runs (no key field)


def probe_text(model, tokenizer, tokens: int, seed: int, recipe: ProbeRecipe,
               name: str = DEFAULT_MODEL) -> tuple[Tensor, float]:
    """The self-generated probe of the model ``name`` (cached on disk by model, size, seed and
    recipe) and its seconds."""
    described = repr(recipe) if name == DEFAULT_MODEL else repr((name, recipe))
    described += recipe.cache_suffix()
    digest = hashlib.sha256(described.encode()).hexdigest()[:12]
    path = CACHE / f"probe-{tokens}-{seed}-{digest}.pt"
    if path.exists():
        saved = torch.load(path)
        return saved["tokens"], saved["seconds"]
    started = time.perf_counter()
    probe = generate_probe(model, tokenizer, tokens, seed, recipe, progress=False)
    seconds = time.perf_counter() - started
    CACHE.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as staging:  # an interrupted run leaves no partial probe to reuse
        torch.save({"tokens": probe, "seconds": seconds}, staging)
    return probe, seconds


@torch.no_grad()
def sequence_losses(model, ids: Tensor) -> Tensor:
    """Per sequence, the model's mean negative log-likelihood (temperature 1) of its tokens
    after the first, one sequence at a time (a vocabulary of 262k makes the logits large)."""
    losses = []
    for sequence in ids:
        logits = model(sequence[None], use_cache=False).logits[0, :-1].float()
        losses.append(torch.nn.functional.cross_entropy(logits, sequence[1:]))
    return torch.stack(losses)


def likeliest(model, ids: Tensor, count: int) -> Tensor:
    """The ``count`` sequences of ``ids`` the model finds likeliest (lowest mean loss), in their
    original order."""
    chosen = sequence_losses(model, ids).argsort()[:count].sort().values
    return ids[chosen]


def real_text(tokenizer, tokens: int) -> Tensor:
    """The first ``tokens`` of the wiki training region in 1024-token windows (or one shorter)."""
    length = min(1024, tokens)
    windows = load_corpus("wiki", tokenizer).training_windows(length)
    return windows[: max(1, tokens // length)]


def timed_statistics(model, tokens: Tensor, skip_positions: int = 0, weighting: str = "none"
                     ) -> tuple[list[LayerStatistics], float]:
    """The statistics of ``tokens`` and their seconds; ``skip_positions``: leave each
    sequence's first positions (the BOS token, the attention sink) out of the sums;
    ``weighting="residual"``: weigh each token's activations in every sum by ``1 / mean(h^2)``
    of the residual stream entering the decoder layer (what the next layers' norms divide an
    FFN's error by), so the Gram is ``sum_t w_t a_t a_t^T``; ``weighting="output"``: by
    ``1 / mean(y^2)`` of the FFN's own output ``y = W2 a`` (what a norm after the FFN, as
    Gemma's ``post_feedforward_layernorm``, divides its error by)."""
    started = time.perf_counter()
    if skip_positions == 0 and weighting == "none":
        stats = collect_ffn_statistics(model, tokens, batch_size=4)
    else:
        view = FFNView(model)
        stats = [LayerStatistics.empty(view.d_ff) for _ in range(view.num_layers)]
        weights: dict[int, Tensor] = {}

        def residual(index: int):
            def hook(_module, args, kwargs) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                weights[index] = hidden.detach().float().pow(2).mean(-1).reciprocal().sqrt()
            return hook

        def accumulate(index: int):
            def hook(_module, inputs, output) -> None:
                activation = inputs[0].detach().float()
                if weighting == "residual":
                    activation = activation * weights[index][..., None]
                elif weighting == "output":
                    scale = output.detach().float().pow(2).mean(-1).reciprocal().sqrt()
                    activation = activation * scale[..., None]
                kept = activation[:, skip_positions:]
                add_activations(stats[index], kept.reshape(-1, kept.shape[-1]))
            return hook

        handles = [view.second_matrix_module(i).register_forward_hook(accumulate(i))
                   for i in range(view.num_layers)]
        if weighting == "residual":
            handles += [layer.register_forward_pre_hook(residual(i), with_kwargs=True)
                        for i, layer in enumerate(view.layers)]
        try:
            with torch.no_grad():
                for start in range(0, tokens.shape[0], 4):
                    model(tokens[start:start + 4], use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
    return stats, time.perf_counter() - started


def fisher_scores(model, tokens: Tensor, per: str = "token", labels: str = "text",
                  batch_size: int = 4, seed: int = 0) -> list[Tensor]:
    """Each FFN neuron's diagonal Fisher information as a mask on its activation (Kwon et al.,
    2022): the squared derivative of the log-likelihood with respect to a multiplier on neuron
    i's activation, ``sum_t a_i(t) g_i(t)``, summed over probe sequences (``per="sequence"``)
    or taken per token (``per="token"``: ``sum (a_i(t) g_i(t))^2``). ``labels``: the text's own
    next tokens (``text``) or tokens sampled from the model's distribution at temperature 1 at
    every position (``sampled``: the true Fisher). The second-order estimate of the model's KL
    when the neuron is removed is half of it."""
    view = FFNView(model)
    scores = [torch.zeros(view.d_ff, dtype=torch.float64) for _ in range(view.num_layers)]
    masks: list[Tensor | None] = [None] * view.num_layers

    def masking(index: int):
        def hook(_module, inputs):
            activation = inputs[0]
            shape = activation.shape if per == "token" else (activation.shape[0], 1,
                                                             activation.shape[-1])
            mask = torch.ones(shape, dtype=activation.dtype, requires_grad=True)
            masks[index] = mask
            return (activation * mask,) + tuple(inputs[1:])
        return hook

    generator = torch.Generator().manual_seed(seed)
    requires = [p.requires_grad for p in model.parameters()]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    handles = [view.second_matrix_module(i).register_forward_pre_hook(masking(i))
               for i in range(view.num_layers)]
    try:
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start:start + batch_size]
            logits = model(batch, use_cache=False).logits[:, :-1].float()
            log_probs = torch.log_softmax(logits, dim=-1)
            if labels == "text":
                targets = batch[:, 1:]
            else:
                with torch.no_grad():
                    targets = torch.multinomial(log_probs.exp().reshape(-1, log_probs.shape[-1]),
                                                1, generator=generator).reshape(batch.shape[0], -1)
            log_likelihood = log_probs.gather(-1, targets.unsqueeze(-1)).sum()
            grads = torch.autograd.grad(log_likelihood, masks)
            for index, grad in enumerate(grads):
                scores[index] += grad.double().pow(2).sum(dim=(0, 1))
    finally:
        for handle in handles:
            handle.remove()
        for parameter, flag in zip(model.parameters(), requires, strict=True):
            parameter.requires_grad_(flag)
    return scores


AGGREGATES = ("l1", "tokennorm", "seqnorm", "seqmedian", "seqq25", "seqgeo")


def aggregate_scores(model, tokens: Tensor, how: str, batch_size: int = 4) -> list[Tensor]:
    """The Wanda-style product with the mean square ``mean_t a_i^2`` replaced by an aggregate
    less swayed by a few tokens or sequences (``how``): ``l1``, ``(mean_t |a_i|)^2``;
    ``tokennorm``, ``mean_t a_i^2 / mean_j a_j^2`` (every token's activation energy counts
    once); ``seqnorm``, each probe sequence's share ``sum_t a_i^2 / sum_tj a_j^2`` summed
    (every sequence counts once); ``seqmedian`` / ``seqq25`` / ``seqgeo``, the median, lower
    quartile or geometric mean over sequences of each sequence's ``mean_t a_i^2`` (a neuron
    the probe's many sequences use before one that a few use heavily)."""
    if how not in AGGREGATES:  # before the pass over the probe
        raise ValueError(f"unknown aggregate {how!r}; use one of {', '.join(AGGREGATES)}")
    view = FFNView(model)
    per_sequence: list[list[Tensor]] = [[] for _ in range(view.num_layers)]
    absolute = [torch.zeros(view.d_ff, dtype=torch.float64) for _ in range(view.num_layers)]
    normalised = [torch.zeros(view.d_ff, dtype=torch.float64) for _ in range(view.num_layers)]

    def collect(index: int):
        def hook(_module, inputs) -> None:
            activation = inputs[0].detach().double()  # sequences x positions x d_ff
            squares = activation.pow(2)
            absolute[index] += activation.abs().sum((0, 1))
            normalised[index] += (squares / squares.mean(-1, keepdim=True).clamp_min(1e-30)
                                  ).sum((0, 1))
            per_sequence[index].append(squares.mean(1))
        return hook

    handles = [view.second_matrix_module(i).register_forward_pre_hook(collect(i))
               for i in range(view.num_layers)]
    try:
        with torch.no_grad():
            for start in range(0, tokens.shape[0], batch_size):
                model(tokens[start:start + batch_size], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    count = tokens.numel()
    sequences = [torch.cat(means) for means in per_sequence]  # sequences x d_ff per layer
    if how == "l1":
        means = [(total / count) ** 2 for total in absolute]
    elif how == "tokennorm":
        means = [total / count for total in normalised]
    elif how == "seqnorm":
        means = [(s / s.sum(-1, keepdim=True)).sum(0) for s in sequences]
    elif how in ("seqmedian", "seqq25"):
        means = [s.quantile(0.5 if how == "seqmedian" else 0.25, dim=0) for s in sequences]
    else:  # seqgeo
        means = [(s + 1e-6 * s.mean()).log().mean(0).exp() for s in sequences]
    return wanda_product(model, means)


def _ridged_gram(stats: LayerStatistics, ridge: float) -> tuple[Tensor, float]:
    """``E[a a^T] + lambda I`` and ``lambda = ridge * mean diag E[a a^T]`` (float64)."""
    gram = stats.gram / max(stats.count, 1)
    penalty = ridge * float(gram.diagonal().mean())
    return gram + penalty * torch.eye(gram.shape[0], dtype=torch.float64), penalty


def refit_aware_rows(second: Tensor, stats: LayerStatistics, kept: int, ridge: float,
                     greedy: bool = False, block: int = 8,
                     costs: list[float] | None = None) -> Tensor:
    """The ``kept`` neurons whose removal costs the least probe reconstruction error *after* a
    ridge refit (an OBS / ZipLM-style selection; SmolLM2: no bias, uncentred statistics).

    With ``S = E[a a^T]``, ``lambda = ridge * mean diag S`` and ``H = S + lambda I``, refitting
    the kept columns to minimise ``E||W2 a - W' a_K||^2 + lambda ||W' - W2[:, K]||^2`` leaves
    ``tr(W_R (H^-1)_RR^-1 W_R^T) - lambda ||W_R||^2`` for a removed set R. One shot: each
    neuron's cost alone, ``||w_i||^2 (1 / H^-1_ii - lambda)``. Greedy: remove the ``block``
    cheapest, update the compensated columns and ``H^-1`` (block elimination), repeat; each
    removal's cost increment is appended to ``costs`` when given.
    """
    second = second.double()
    ridged, penalty = _ridged_gram(stats, ridge)
    inverse = torch.linalg.inv(ridged)
    norms = second.pow(2).sum(0)
    if not greedy:
        cost = norms / inverse.diagonal() - penalty * norms
        if costs is not None:
            costs.extend(cost.tolist())
        return torch.sort(torch.topk(cost, kept).indices).values
    compensated, alive = second.clone(), torch.ones(ridged.shape[0], dtype=torch.bool)
    removed = 0
    while removed < ridged.shape[0] - kept:
        cost = compensated.pow(2).sum(0) / inverse.diagonal() - penalty * norms
        cost[~alive] = float("inf")
        count = min(block, ridged.shape[0] - kept - removed)
        for j in torch.topk(cost, count, largest=False).indices.tolist():
            pivot = inverse[j, j].clone()
            if costs is not None:
                costs.append(float(compensated[:, j].pow(2).sum() / pivot - penalty * norms[j]))
            compensated -= torch.outer(compensated[:, j], inverse[j, :]) / pivot
            inverse -= torch.outer(inverse[:, j], inverse[j, :]) / pivot
            inverse[j, j], alive[j] = 1.0, False
            removed += 1
    return alive.nonzero().squeeze(1)


def wanda_refit_aware(model, stats: list[LayerStatistics], ridge: float) -> list[Tensor]:
    """The Wanda-style score times ``1 - R^2_i``, the share of neuron i's activation the others
    cannot predict linearly (``1 / (H_ii (H^-1)_ii)`` with the refit's ridged Gram ``H``): a
    neuron the refit can stand in for costs less."""
    scores = []
    for score, s in zip(SCORES["wanda"](model, stats), stats, strict=True):
        ridged, _ = _ridged_gram(s, ridge)
        unexplained = 1.0 / (ridged.diagonal() * torch.linalg.inv(ridged).diagonal())
        scores.append(score * unexplained.float())
    return scores


def held_out_ridge(model, stats_fit: list[LayerStatistics], stats_test: list[LayerStatistics],
                   rows: list[Tensor], ridges: list[float]) -> dict[float, float]:
    """Sum over layers of the relative reconstruction error on held-out probe statistics."""
    view = FFNView(model)
    result = {}
    for ridge in ridges:
        total = 0.0
        for index, kept in enumerate(rows):
            matrix = second_matrix(view, index)[0].double()  # SmolLM2: no bias
            columns, _ = refit_layer(matrix, None, kept, stats_fit[index], "ls", ridge)
            error = reconstruction_error(matrix, None, kept, columns, None, stats_test[index])
            energy = reconstruction_error(matrix, None, kept, torch.zeros_like(columns), None,
                                          stats_test[index])
            total += error / energy
        result[ridge] = total / len(rows)
    return result


def sequential_selection(model, ids: Tensor, kept: int, ridge: float
                         ) -> tuple[list[Tensor], dict]:
    """Layer by layer, in place: each layer's rows chosen by the Wanda-style score from its
    statistics on the probe run through the layers below, already pruned and refitted, then
    refitted on the same statistics (target: the original FFN on that input). Returns the rows
    and the refit's record."""
    view, rows = FFNView(model), []

    def select(index: int, stats: LayerStatistics) -> Tensor:
        rows.append(top_rows(layer_wanda_product(view, index, stats.mean_square), kept))
        return rows[-1]

    record = sequential_refit(model, None, ids, "ls", ridge, "pruned", batch_size=4,
                              select=select)
    return rows, record


def diagonal_ridge_columns(second: Tensor, kept_rows: Tensor, cross: Tensor,
                           kept_gram: Tensor, ridge: float) -> Tensor:
    """The ``ls`` refit with a per-neuron ridge: ``(W2 C + W2[:, K] L) (A + L)^-1`` with
    ``L = ridge * diag(A)`` (a neuron whose mean square is zero gets the mean's penalty), the
    uniform ridge on activations standardised to unit mean square. Same signature as
    :func:`prunenet.refit.least_squares_columns`."""
    second, kept_gram = second.double(), kept_gram.double()
    diagonal = kept_gram.diagonal().clone()
    floor = float(diagonal.mean()) or 1.0  # the mean of non-negative squares: 0 or positive
    penalty = ridge * torch.where(diagonal > 0, diagonal, torch.full_like(diagonal, floor))
    regularised = kept_gram + torch.diag(penalty)
    right = (second @ cross.double() + second[:, kept_rows] * penalty).T
    return torch.linalg.solve(regularised, right).T


WEIGHT_NORMS = ("wanda-up", "wanda-gate-up", "mean-square")
GATE_POWER = "wanda-gate-p"


def weight_norm_scores(model, stats: list[LayerStatistics], which: str) -> list[Tensor]:
    """Per layer ``mean a_i^2`` times the squared norm of neuron i's up row (``wanda-up``), the
    product of its gate and up rows' squared norms (``wanda-gate-up``) or nothing
    (``mean-square``), or the gate row's norm to the power P (``wanda-gate-pP``), for gated
    FFNs (``mlp.gate_proj`` / ``mlp.up_proj``); the default multiplies by the gate row's squared
    norm."""
    scores = []
    for layer, s in zip(FFNView(model).layers, stats, strict=True):
        gate = layer.mlp.gate_proj.weight.detach().float().pow(2).sum(1)
        up = layer.mlp.up_proj.weight.detach().float().pow(2).sum(1)
        if which.startswith(GATE_POWER):
            norm = gate.pow(float(which[len(GATE_POWER):]) / 2)
        else:
            norm = {"wanda-up": up, "wanda-gate-up": gate * up,
                    "mean-square": torch.ones_like(up)}[which]
        scores.append(s.mean_square.float() * norm)
    return scores


def run(args: argparse.Namespace) -> None:
    for job in args.jobs.split(",") if args.select_tokens else ():  # before any work
        method, _, score, text, _ = _parse(job, args)
        if text == "probe" and (method in ("random", "magnitude", "prunenet", "prunenet-topk")
                                or score not in SCORES):
            raise SystemExit(f"--select-tokens applies to probe jobs scored by "
                             f"{', '.join(SCORES)}; {job!r} selects otherwise")
    torch.set_num_threads(args.threads)
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    done = {json.dumps(record["key"]) for record in _records(log)}
    model, tokenizer = load_model_and_tokenizer(args.model)
    if args.mlp_bias:
        add_zero_second_bias(model)
    windows = load_corpus(_evaluation_text(args.eval_text), tokenizer).evaluation_windows(
        1024, args.windows)
    recipe = _recipe(args)

    def record(key: dict, **values) -> None:
        _append(log, {"key": key, **values, "peak_rss_mb": _peak_rss_mb()})

    dense_key = {"method": "dense", "windows": args.windows}
    if args.mlp_bias:
        dense_key["mlp_bias"] = True
    if args.model != DEFAULT_MODEL:
        dense_key["model"] = args.model
    if args.eval_text != "wiki":
        dense_key["eval_text"] = args.eval_text
    if json.dumps(dense_key) not in done:
        record(dense_key, perplexity=perplexity(model, windows, progress=False))

    texts: dict[str, tuple[list[LayerStatistics], dict]] = {}

    def text_statistics(name: str, tokens: int) -> tuple[list[LayerStatistics], dict]:
        if (name, tokens) not in texts:
            if name == "probe" and args.keep_likely < 1.0:  # a larger probe, filtered
                pool, generate_seconds = probe_text(
                    model, tokenizer, math.ceil(tokens / args.keep_likely), args.seed, recipe,
                    args.model)
                ids = likeliest(model, pool, math.ceil(tokens / pool.shape[1]))
            elif name == "probe":
                ids, generate_seconds = probe_text(model, tokenizer, tokens, args.seed, recipe,
                                                   args.model)
            else:
                ids, generate_seconds = real_text(tokenizer, tokens), 0.0
            stats, stats_seconds = timed_statistics(
                model, ids, args.skip_positions if name == "probe" else 0, args.weight_tokens)
            texts[(name, tokens)] = (stats, {"generate_s": generate_seconds,
                                             "statistics_s": stats_seconds, "ids": ids})
        return texts[(name, tokens)]

    for ratio in [float(r) for r in args.ratios.split(",")]:
        for job in args.jobs.split(","):
            method, refit, score, text, tokens = _parse(job, args)
            seeds = ([int(s) for s in args.random_seeds.split(",")]
                     if method in ("random", "prunenet", "prunenet-topk") else [0])
            for seed in seeds:
                key = run_key(args, job, ratio, seed)
                if json.dumps(key) in done:
                    continue
                stats, info = text_statistics(text, tokens)
                # The selection's statistics: the job's text, or a probe of --select-tokens.
                chosen_from = (text_statistics(text, args.select_tokens)[0]
                               if text == "probe" and args.select_tokens else stats)
                pruned = copy.deepcopy(model)
                started = time.perf_counter()
                kept = kept_count(FFNView(model).d_ff, ratio)
                if method in ("random", "magnitude"):
                    rows = select_rows(pruned, ratio, method=method, progress=False,
                                       **({"seed": seed} if method == "random" else {}))
                elif method in ("prunenet", "prunenet-topk"):  # the reference policy
                    policy = train_policy(pruned, ratio, episodes=args.episodes, seed=seed,
                                          device="cpu", progress=False).policy
                    # prunenet samples the final rows (the reference's way); prunenet-topk keeps
                    # the rows of the highest scores (--selection topk)
                    # a given policy's top-k rows draw nothing: no seed
                    rows = select_rows(pruned, ratio, policy=policy, method="prunenet",
                                       device="cpu", progress=False,
                                       **({"selection": "topk"} if method == "prunenet-topk"
                                          else {"selection": "sample", "seed": seed}))
                elif score in ("obs", "obs-greedy"):
                    view = FFNView(pruned)
                    rows = [refit_aware_rows(second_matrix(view, i)[0], s, kept, args.ridge,
                                             greedy=score == "obs-greedy")
                            for i, s in enumerate(stats)]
                elif score.startswith("fisher"):  # fisher-token|sequence[-sampled]
                    parts = score.split("-")
                    fisher = fisher_scores(model, info["ids"], per=parts[1],
                                           labels="sampled" if parts[-1] == "sampled" else "text")
                    rows = [top_rows(f, kept) for f in fisher]
                elif score.startswith("wanda-") and score[6:] in AGGREGATES:
                    rows = [top_rows(a, kept)
                            for a in aggregate_scores(model, info["ids"], score[6:])]
                elif score in WEIGHT_NORMS or score.startswith(GATE_POWER):
                    rows = [top_rows(w, kept)
                            for w in weight_norm_scores(pruned, chosen_from, score)]
                elif score == "wanda-obs":
                    rows = [top_rows(s, kept) for s in wanda_refit_aware(pruned, stats, args.ridge)]
                else:
                    rows = [top_rows(s, kept) for s in SCORES[score](pruned, chosen_from)]
                select_seconds = time.perf_counter() - started
                started = time.perf_counter()
                errors = None
                if refit in ("ls", "bias"):
                    rec = refit_model(pruned, rows, stats, refit, args.ridge)
                    errors = _mean_errors(rec)
                elif refit == "ls-diag":
                    original = prunenet.refit.least_squares_columns
                    prunenet.refit.least_squares_columns = diagonal_ridge_columns
                    try:
                        rec = refit_model(pruned, rows, stats, "ls", args.ridge)
                    finally:
                        prunenet.refit.least_squares_columns = original
                    errors = _mean_errors(rec)
                elif refit == "ls-seq-select":  # rows chosen on the pruned stream too
                    rows, rec = sequential_selection(pruned, info["ids"], kept, args.ridge)
                    errors = _mean_errors(rec)
                elif refit.startswith("ls-seq"):
                    target = "pruned" if refit.endswith("pruned") else "dense"
                    rec = sequential_refit(pruned, rows, info["ids"], "ls", args.ridge, target,
                                           batch_size=4)
                    errors = _mean_errors(rec)
                refit_seconds = time.perf_counter() - started
                slice_model(pruned, rows)
                value = perplexity(pruned, windows, progress=False)
                record(key, perplexity=value, generate_s=info["generate_s"],
                       statistics_s=info["statistics_s"], select_s=select_seconds,
                       refit_s=refit_seconds, probe_errors=errors)
                del pruned


def cross(args: argparse.Namespace) -> None:
    """Where the gap between the probe and real text lies: the rows selected on one text
    refitted on the other's statistics (``rows real, refit probe`` and the reverse, beside the
    default and the calibrated selection and refit, in the same process), and the
    default with the calibrated selection and refit in one group of ``--cross`` consecutive
    layers only (0: no groups), at each ratio; appended to the log like :func:`run`'s runs."""
    torch.set_num_threads(args.threads)
    log = Path(args.log)
    done = {json.dumps(record["key"]) for record in _records(log)}
    model, tokenizer = load_model_and_tokenizer(args.model)
    windows = load_corpus(_evaluation_text(args.eval_text), tokenizer).evaluation_windows(
        1024, args.windows)
    ids, _ = probe_text(model, tokenizer, args.tokens, args.seed, _recipe(args), args.model)
    stats = {"probe": timed_statistics(model, ids)[0],
             "real": timed_statistics(model, real_text(tokenizer, args.tokens))[0]}
    view = FFNView(model)
    layers = view.num_layers
    for ratio in [float(r) for r in args.ratios.split(",")]:
        kept = kept_count(view.d_ff, ratio)
        rows = {text: [top_rows(s, kept) for s in SCORES["wanda"](model, stats[text])]
                for text in stats}
        overlap = statistics.mean(
            len(set(a.tolist()) & set(b.tolist())) / kept
            for a, b in zip(rows["probe"], rows["real"], strict=True))
        runs = [(f"rows {a}, refit {b}", [a] * layers, [b] * layers)
                for a, b in (("probe", "probe"), ("real", "probe"), ("probe", "real"),
                             ("real", "real"))]
        for start in range(0, layers, args.cross) if args.cross else ():
            group = range(start, min(layers, start + args.cross))
            texts = ["real" if i in group else "probe" for i in range(layers)]
            runs.append((f"rows and refit real in layers {group[0]}-{group[-1]} only", texts,
                         texts))
        for method, row_texts, refit_texts in runs:
            key = cross_key(args, method, ratio)
            if json.dumps(key) in done:
                continue
            pruned = copy.deepcopy(model)
            chosen = [rows[text][i] for i, text in enumerate(row_texts)]
            refit_model(pruned, chosen, [stats[text][i] for i, text in enumerate(refit_texts)],
                        "ls", args.ridge)
            slice_model(pruned, chosen)
            _append(log, {"key": key, "perplexity": perplexity(pruned, windows, progress=False),
                          "kept_overlap": overlap, "peak_rss_mb": _peak_rss_mb()})
            del pruned


def ridge_sweep(args: argparse.Namespace) -> None:
    """Pick the ridge by held-out reconstruction: fit on the first half of the probe's
    sequences, measure on the second half, at each ratio; no perplexity involved."""
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model)
    recipe = _recipe(args)
    ids, _ = probe_text(model, tokenizer, args.tokens, args.seed, recipe, args.model)
    half = ids.shape[0] // 2
    fit, _ = timed_statistics(model, ids[:half])
    test, _ = timed_statistics(model, ids[half:])
    ridges = [0.0, 1e-3, 1e-2, 1e-1, 1.0, 3.0, 10.0]
    for ratio in [float(r) for r in args.ratios.split(",")]:
        kept = kept_count(FFNView(model).d_ff, ratio)
        rows = [top_rows(s, kept) for s in SCORES["wanda"](model, fit)]
        errors = held_out_ridge(model, fit, test, rows, ridges)
        plain = held_out_ridge(model, fit, test, rows, [1e12])[1e12]
        print(json.dumps({"ratio": ratio, "fit_tokens": int(ids[:half].numel()),
                          "sliced": plain, "refit": errors}), flush=True)


def _evaluation_text(name: str) -> str:
    """``wiki``, or a held-out text no method sees: ``hellaswag``, HellaSwag's validation
    contexts each followed by its correct ending (WikiHow articles and ActivityNet captions,
    markup removed), from example 1000 on (zero-shot runs read the first examples); or
    ``python``, the running Python's standard library, its top-level modules in name order up
    to a million characters (code, for a model that writes code)."""
    if name == "wiki":
        return name
    if name == "python":
        import sys
        import sysconfig

        path = CACHE / f"python{sys.version_info.major}.{sys.version_info.minor}-stdlib.txt"
        if not path.exists():
            parts, size = [], 0
            for module in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
                parts.append(module.read_text(encoding="utf-8"))
                size += len(parts[-1])
                if size >= 1_000_000:
                    break
            CACHE.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as staging:
                staging.write_text("\n\n".join(parts))
        return str(path)
    import re

    import datasets

    from prunenet.assets import asset_path

    path = CACHE / "hellaswag-text.txt"
    if not path.exists():
        rows = datasets.load_from_disk(str(asset_path("zeroshot") / "hf_datasets" / "hellaswag"
                                           / "none" / "validation"))
        lines = []
        for row in rows.select(range(1000, len(rows))):
            text = f"{row['ctx']} {row['endings'][int(row['label'])]}"
            lines.append(re.sub(r"\s+", " ", re.sub(r"\[[a-z]+\]", " ", text)).strip())
        CACHE.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as staging:
            staging.write_text("\n\n".join(lines) + "\n")
    return str(path)


def add_zero_second_bias(model) -> None:
    """Give every layer's second FFN matrix a bias of zeros (a family without one, such as
    SmolLM2's LLaMA, then has what ``bias`` refits and ``ls`` centres on; the dense model
    computes exactly what it did)."""
    view = FFNView(model)
    for index in range(view.num_layers):
        module = view.second_matrix_module(index)
        module.bias = torch.nn.Parameter(torch.zeros(module.out_features,
                                                     dtype=module.weight.dtype))


def _recipe(args: argparse.Namespace) -> ProbeRecipe:
    return ProbeRecipe(sequence_length=args.probe_length, batch_size=args.probe_batch,
                       first_token=args.first_token, temperature=args.temperature,
                       top_p=args.top_p, min_p=args.min_p,
                       start_temperature=args.start_temperature,
                       warmup_tokens=args.warmup_tokens, prompt=args.prompt,
                       one_script=args.one_script)


def _parse(job: str, args) -> tuple[str, str, str, str, int]:
    """``method:refit[:score[:text[:tokens]]]``, e.g. ``self-generated:ls:wanda:probe:4096``."""
    parts = job.split(":")
    method, refit = parts[0], parts[1]
    score = parts[2] if len(parts) > 2 else "wanda"
    default_text = "real" if method == "activation" else "probe"
    text = parts[3] if len(parts) > 3 else default_text
    tokens = int(parts[4]) if len(parts) > 4 else args.tokens
    return method, refit, score, text, tokens


def run_key(args: argparse.Namespace, job: str, ratio: float, seed: int) -> dict:
    """The log key of one run of :func:`run`: every setting its perplexity depends on, those at
    their defaults left out (so that runs logged before a setting existed still match)."""
    method, refit, score, text, tokens = _parse(job, args)
    key = {"method": method, "refit": refit, "score": score, "text": text,
           "tokens": tokens, "ratio": ratio, "seed": seed, "windows": args.windows,
           "probe_seed": args.seed, "ridge": args.ridge,
           "probe_length": args.probe_length}
    if (args.probe_batch, args.first_token) != (16, "bos"):
        key.update(probe_batch=args.probe_batch, first_token=args.first_token)
    if args.eval_text != "wiki":
        key["eval_text"] = args.eval_text
    if args.model != DEFAULT_MODEL:
        key["model"] = args.model
    if text == "probe" and (args.temperature, args.top_p) != (1.0, 1.0):
        key.update(temperature=args.temperature, top_p=args.top_p)
    if text == "probe" and args.min_p:
        key["min_p"] = args.min_p
    if text == "probe" and args.prompt:
        key["prompt"] = args.prompt
    if text == "probe" and args.one_script:
        key["one_script"] = True
    if text == "probe" and args.skip_positions:
        key["skip_positions"] = args.skip_positions
    if text == "probe" and args.select_tokens:
        key["select_tokens"] = args.select_tokens
    if text == "probe" and args.keep_likely < 1.0:
        key["keep_likely"] = args.keep_likely
    if args.weight_tokens != "none":
        key["weight_tokens"] = args.weight_tokens
    if args.mlp_bias:
        key["mlp_bias"] = True
    if text == "probe":  # runs logged without it drew with torch.multinomial
        key["sampler"] = SAMPLER
    if text == "probe" and args.start_temperature is not None:
        key.update(start_temperature=args.start_temperature,
                   warmup_tokens=args.warmup_tokens)
    if method in ("prunenet", "prunenet-topk") and args.episodes != EPISODES:
        key["episodes"] = args.episodes
    return key


def cross_key(args: argparse.Namespace, method: str, ratio: float) -> dict:
    """The log key of one run of :func:`cross` (``method``: its rows and refit texts)."""
    key = {"method": method, "refit": "ls", "score": "wanda", "text": "probe+real",
           "tokens": args.tokens, "ratio": ratio, "seed": 0, "windows": args.windows,
           "probe_seed": args.seed, "ridge": args.ridge,
           "probe_length": args.probe_length, "probe_batch": args.probe_batch,
           "temperature": args.temperature, "sampler": SAMPLER}
    if args.eval_text != "wiki":
        key["eval_text"] = args.eval_text
    if args.model != DEFAULT_MODEL:
        key["model"] = args.model
    if args.first_token != "bos":
        key["first_token"] = args.first_token
    if args.top_p != 1.0:
        key["top_p"] = args.top_p
    if args.min_p:
        key["min_p"] = args.min_p
    if args.prompt:
        key["prompt"] = args.prompt
    if args.one_script:
        key["one_script"] = True
    if args.start_temperature is not None:
        key.update(start_temperature=args.start_temperature, warmup_tokens=args.warmup_tokens)
    return key


def _mean_errors(record: dict) -> dict:
    layers = record["layers"]
    return {"sliced": statistics.mean(x["relative_error_sliced"] for x in layers),
            "refit": statistics.mean(x["relative_error_refit"] for x in layers)}


def _append(log: Path, entry: dict) -> None:
    """One run's line, appended to the log and printed."""
    with log.open("a") as handle:
        handle.write(json.dumps(entry) + "\n")
    print(json.dumps(entry), flush=True)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _recipe_label(key: dict) -> str:
    """The probe recipe of a run, as the table shows it (blank: BOS start, T 1, top-p 1,
    batches of 32)."""
    parts = []
    if key.get("first_token", "bos") != "bos":
        parts.append(f"{key['first_token']} start")
    if key.get("temperature", 1.0) != 1.0:
        parts.append(f"T {key['temperature']}")
    if key.get("top_p", 1.0) != 1.0:
        parts.append(f"top-p {key['top_p']}")
    if key.get("min_p"):
        parts.append(f"min-p {key['min_p']}")
    if key.get("start_temperature") is not None:
        parts.append(f"from T {key['start_temperature']} over {key['warmup_tokens']} tokens")
    if key.get("prompt"):
        parts.append(f"prompt {key['prompt']!r}".replace("|", "\\|"))  # a table cell
    if key.get("one_script"):
        parts.append("one script")
    if key.get("skip_positions"):
        parts.append(f"statistics from position {key['skip_positions']}")
    if key.get("select_tokens"):
        parts.append(f"rows from a {key['select_tokens']}-token probe")
    if key.get("keep_likely"):
        parts.append(f"likeliest {key['keep_likely']:.0%} of a larger probe")
    if key.get("probe_length", 256) != 256 and key["text"] == "probe":
        parts.append(f"sequences of {key['probe_length']}")
    # 32: ProbeRecipe's batch, $B's in quality_reconstruct.md (the key leaves out the script's 16)
    if key.get("probe_batch", 16) != 32 and "probe" in key["text"]:
        parts.append(f"batches of {key.get('probe_batch', 16)}")
    if key.get("weight_tokens"):
        parts.append(f"tokens weighted by 1/{key['weight_tokens']} norm^2")
    if key.get("sampler"):
        parts.append(f"{key['sampler']} draws")
    return ", ".join(parts)


def report(log: Path, windows: int | None = None) -> str:
    """Markdown: perplexity per (model, method and the policy's episodes, refit, score, text,
    tokens, recipe, windows, evaluation text, ridge) and ratio; repeated seeds (random
    selection's, or the probe's) as the geometric mean with the range and count. ``windows``:
    only runs on that many evaluation windows."""
    groups: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    dense = {}
    for entry in _records(log):
        key = entry["key"]
        if windows is not None and key["windows"] != windows:
            continue
        evaluated_on, model = key.get("eval_text", "wiki"), key.get("model", DEFAULT_MODEL)
        if key["method"] == "dense":
            dense[(model, key["windows"], evaluated_on)] = entry["perplexity"]
            continue
        refit = key["refit"] + (" (zero bias added)" if key.get("mlp_bias") else "")
        method = key["method"] + (f" ({key['episodes']} episodes)" if "episodes" in key else "")
        group = (model, method, refit, key["score"], key["text"], key["tokens"],
                 _recipe_label(key), key["windows"], evaluated_on, key.get("ridge"))
        groups[group][key["ratio"]].append(entry["perplexity"])
    ratios = sorted({r for cells in groups.values() for r in cells})
    lines = ["| model | method | refit | score | text | tokens | probe recipe | windows | "
             "evaluated on | ridge | " + " | ".join(f"r={r}" for r in ratios) + " |",
             "|---" * (len(ratios) + 10) + "|"]
    for (model, count, evaluated_on), value in sorted(dense.items()):
        lines.append(f"| {model} | dense | - | - | - | - | - | {count} | {evaluated_on} | - | "
                     + " | ".join(f"{value:.2f}" for _ in ratios) + " |")
    for group, cells in sorted(groups.items(), key=lambda item: str(item[0])):
        values = []
        for ratio in ratios:
            found = cells.get(ratio, [])
            if not found:
                values.append("-")
                continue
            geometric = math.exp(statistics.mean(math.log(v) for v in found))
            values.append(f"{geometric:.2f}" + (
                f" ({min(found):.2f}-{max(found):.2f}, n={len(found)})" if len(found) > 1
                else ""))
        lines.append("| " + " | ".join(str(part) for part in group) + " | "
                     + " | ".join(values) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="the dense model (an alias or a folder); recorded in each run's key "
                        "unless it is the default")
    parser.add_argument("--jobs", default="self-generated:none,self-generated:ls,"
                        "activation:none,activation:ls,random:none,random:ls,magnitude:none,"
                        "magnitude:ls")
    parser.add_argument("--ratios", default="0.3,0.2,0.1")
    parser.add_argument("--random-seeds", default="0",
                        help="seeds of the stochastic selections (random, prunenet)")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=4096, help="probe / real-text tokens")
    parser.add_argument("--seed", type=int, default=0, help="probe seed")
    parser.add_argument("--probe-length", type=int, default=256)
    parser.add_argument("--probe-batch", type=int, default=16)
    parser.add_argument("--eval-text", default="wiki", choices=("wiki", "hellaswag", "python"),
                        help="perplexity text (hellaswag, python: held-out texts)")
    parser.add_argument("--first-token", default="bos", choices=("bos", "random"))
    parser.add_argument("--temperature", type=float, default=1.0, help="probe sampling")
    parser.add_argument("--top-p", type=float, default=1.0, help="probe sampling")
    parser.add_argument("--min-p", type=float, default=0.0, help="probe sampling")
    parser.add_argument("--start-temperature", type=float,
                        help="probe sampling: the temperature rises from this ...")
    parser.add_argument("--warmup-tokens", type=int, default=32, help="... over these tokens")
    parser.add_argument("--prompt", default="",
                        help="probe sampling: words each sequence starts with after BOS")
    parser.add_argument("--one-script", action="store_true",
                        help="probe sampling: keep only sequences in the probe's main script")
    parser.add_argument("--skip-positions", type=int, default=0,
                        help="leave each probe sequence's first positions (BOS) out of the "
                             "statistics")
    parser.add_argument("--select-tokens", type=int,
                        help="probe jobs: the selection reads a probe of this many tokens (the "
                        "same seed and recipe; scores of --jobs' third field from "
                        "prunenet.ffn_statistics), the refit the job's")
    parser.add_argument("--keep-likely", type=float, default=1.0, metavar="FRACTION",
                        help="probe jobs: generate tokens / FRACTION and keep the sequences the "
                        "model finds likeliest (lowest mean loss at temperature 1)")
    parser.add_argument("--weight-tokens", default="none", choices=("none", "residual", "output"),
                        help="weigh each token in the statistics (selection and refit) by "
                             "1 / mean(h^2) of the residual entering its layer, or by 1 / "
                             "mean(y^2) of the FFN's output")
    parser.add_argument("--ridge", type=float, default=1.0)
    parser.add_argument("--mlp-bias", action="store_true",
                        help="give the second FFN matrix a bias of zeros first (refit jobs "
                             "'bias': FLAP's mean compensation; 'ls' then fits the bias too)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=EPISODES,
                        help="prunenet policy training (recorded in the key unless the default)")
    parser.add_argument("--log", default=LOG)
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--report-windows", type=int, help="--report: only these runs")
    parser.add_argument("--ridge-sweep", action="store_true",
                        help="instead: held-out probe reconstruction error per ridge")
    parser.add_argument("--cross", type=int, metavar="LAYERS",
                        help="instead: the rows of one text refitted on the other's statistics, "
                        "and the calibrated rows and refit in each group of LAYERS consecutive "
                        "layers only (0: no groups)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.report:
        print(report(Path(args.log), args.report_windows))
    elif args.ridge_sweep:
        ridge_sweep(args)
    elif args.cross is not None:
        cross(args)
    else:
        run(args)


if __name__ == "__main__":
    from script_main import run_script

    run_script(main)
