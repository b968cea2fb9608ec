"""Quality ablation (issue 7): which calibration-free selection keeps SmolLM2-135M useful?

Every variant prunes a fresh copy of the model at each ratio; perplexity on the first ``--windows``
evaluation windows (1024 tokens) of the Wikipedia sample. Results are appended to a JSON-lines log
(one record per variant, ratio and seed) and runs already in the log are skipped, so a sweep can be
resumed or extended. ``--report`` prints the markdown table of a log.

    nice -n 10 python benchmarks/quality_ablation.py --variants random,magnitude \\
        --ratios 0.1,0.2,0.3 --windows 8 --log benchmarks/results/quality_screen.jsonl
    python benchmarks/quality_ablation.py --report benchmarks/results/quality_screen.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from ablation_scores import (  # benchmarks/ablation_scores.py (this script's folder)
    down_column_norms,
    earlier_default_probe,
    expected_activation_scores,
    generated_tokens,
    input_scale,
    leverage_scores,
    probe_activation_scores,
    random_probe_tokens,
    rank_with_protection,
)
from torch import Tensor

from prunenet import pipeline
from prunenet.evaluation.corpora import load_corpus
from prunenet.evaluation.perplexity import perplexity
from prunenet.families import kept_count
from prunenet.io.loading import load_model_and_tokenizer
from prunenet.model_view import FFNView
from prunenet.selection import SELECTORS
from prunenet.selection.base import top_rows
from prunenet.selection.self_generated import self_generated_scores
from prunenet.slicing import slice_model

DEFAULT_MODEL = "smollm2-135m"
Selector = Callable[[torch.nn.Module, float, int], tuple[list[Tensor], float]]


def _per_layer(score: Callable[[FFNView, int, int], Tensor]) -> Selector:
    """A deterministic-or-seeded selector from a per-layer score (keep the top-k)."""

    def select(model, ratio, seed):
        started = time.perf_counter()
        view = FFNView(model)
        kept = kept_count(view.d_ff, ratio)
        rows = [top_rows(score(view, i, seed), kept) for i in range(view.num_layers)]
        return rows, time.perf_counter() - started

    return select


def _baseline(method: str) -> Selector:
    def select(model, ratio, seed):
        started = time.perf_counter()
        # a method runs on the CPU, and reads the seed where it draws (select_rows refuses it
        # elsewhere)
        rows = pipeline.select_rows(model, ratio, method=method,
                                    **({"seed": seed} if SELECTORS[method].seeded else {}))
        return rows, time.perf_counter() - started

    return select


def _activation(windows: int = 4) -> Selector:
    """The calibration-based ``activation`` baseline (NOT calibration-free: for reference),
    calibrated on ``windows`` x 1024 tokens of the wiki corpus's training region."""
    from prunenet.selection.activation import Calibration

    def select(model, ratio, seed):
        from transformers import AutoTokenizer

        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
        rows = pipeline.select_rows(model, ratio, method="activation", tokenizer=tokenizer,
                                    progress=False, calibration=Calibration(windows=windows))
        return rows, time.perf_counter() - started

    return select


def _self_generated(score: Callable[[torch.nn.Module, Tensor], list[Tensor]]) -> Selector:
    """Keep the top ``score`` on the default method's probe text as it was when the ablation
    ran (4 x 128 tokens, ``earlier_default_probe``), generated once per model and seed and
    reused across ratios. With ``self_generated_scores`` this is the default of that time
    (today's default reads a larger probe and refits: benchmarks/quality_reconstruct.md)."""
    tokens_of: dict[tuple[str, int], Tensor] = {}  # (model_type, seed) -> probe text

    def select(model, ratio, seed):
        started = time.perf_counter()
        key = (model.config.model_type, seed)
        if key not in tokens_of:
            tokens_of[key] = earlier_default_probe(model, seed)
        kept = kept_count(FFNView(model).d_ff, ratio)
        scores = score(model, tokens_of[key])
        return [top_rows(layer, kept) for layer in scores], time.perf_counter() - started

    return select


def _prunenet(selection: str, **options) -> Selector:
    def select(model, ratio, seed):
        started = time.perf_counter()
        training = pipeline.train_policy(model, ratio, seed=seed, device="cpu", progress=False,
                                    **options)
        # a given policy's top-k rows draw nothing: no seed
        rows = pipeline.select_rows(model, ratio, policy=training.policy, selection=selection,
                                    method="prunenet", device="cpu",
                                    **({"seed": seed} if selection == "sample" else {}))
        return rows, time.perf_counter() - started

    return select


def _gate(view: FFNView, index: int) -> Tensor:
    return view.first_matrix(index)


def _up(view: FFNView, index: int) -> Tensor:
    return view.layers[index].get_parameter("mlp.up_proj.weight").detach().float()


def _scaled_norm(view: FFNView, index: int, _seed: int) -> Tensor:
    scale, _ = input_scale(view, index)
    return (_gate(view, index) * scale).norm(dim=1)


def _scaled_product(view: FFNView, index: int, _seed: int) -> Tensor:
    scale, _ = input_scale(view, index)
    gate = (_gate(view, index) * scale).norm(dim=1)
    up = (_up(view, index) * scale).norm(dim=1)
    return gate * up * down_column_norms(view, index)


def _random_scores(view: FFNView, index: int, seed: int) -> Tensor:
    return torch.rand(view.d_ff, generator=torch.Generator().manual_seed(seed * 1000 + index))


def _protected(base: Callable, outlier: Callable, fraction: float) -> Callable:
    def score(view, index, seed):
        return rank_with_protection(base(view, index, seed), outlier(view, index, seed), fraction)

    return score


def _energy(view: FFNView, index: int, seed: int) -> Tensor:
    return expected_activation_scores(view, index, samples=512, seed=0)


def _probe(sequences: int, length: int, source: str = "random") -> Selector:
    def select(model, ratio, seed):
        started = time.perf_counter()
        view = FFNView(model)
        kept = kept_count(view.d_ff, ratio)
        tokens = (generated_tokens(model, sequences, length, seed) if source == "generated"
                  else random_probe_tokens(model, sequences, length, seed))
        scores = probe_activation_scores(model, tokens)
        rows = [top_rows(layer_scores, kept) for layer_scores in scores]
        return rows, time.perf_counter() - started

    return select


VARIANTS: dict[str, tuple[Selector, bool]] = {  # name -> (selector, stochastic)
    "random": (_baseline("random"), True),
    "magnitude": (_baseline("magnitude"), False),
    "magnitude-product": (_baseline("magnitude-product"), False),
    "activation-calibrated-4": (_activation(4), False),
    "magnitude-inverse": (_per_layer(lambda v, i, s: -_gate(v, i).norm(dim=1)), False),
    "scaled-gate-norm": (_per_layer(_scaled_norm), False),
    "scaled-product": (_per_layer(_scaled_product), False),
    "down-norm": (_per_layer(lambda v, i, s: down_column_norms(v, i)), False),
    "leverage-gate": (_per_layer(lambda v, i, s: leverage_scores(_gate(v, i))), False),
    "leverage-gate-inverse": (_per_layer(lambda v, i, s: -leverage_scores(_gate(v, i))), False),
    "leverage-down": (
        _per_layer(lambda v, i, s: leverage_scores(v.layers[i].mlp.down_proj.weight.detach().T)),
        False,
    ),
    "energy": (_per_layer(_energy), False),
    "random-protect-energy-5": (_per_layer(_protected(_random_scores, _energy, 0.05)), True),
    "probe-8x128": (_probe(8, 128), True),
    "probe-32x128": (_probe(32, 128), True),
    "selfgen-8x128": (_probe(8, 128, "generated"), True),
    # The default since the second session: Wanda-style mean h^2 * ||gate row||^2.
    "self-generated": (_self_generated(self_generated_scores), True),
    # The first default: output energy mean h^2 * ||down column||^2 (the first session's
    # "self-generated" rows in the logs).
    "self-generated-energy": (_self_generated(probe_activation_scores), True),
    "prunenet-ref-lr1e-3-sample": (_prunenet("sample"), True),
    "prunenet-ref-lr1e-3-topk": (_prunenet("topk"), True),
    "prunenet-ref-lr1e-4-sample": (_prunenet("sample", lr=1e-4), True),
    "prunenet-ref-lr1e-4-topk": (_prunenet("topk", lr=1e-4), True),
    "prunenet-penalty-rtg-mean-topk": (
        _prunenet("topk", reward="penalty", reward_to_go=True, baseline="mean"), True),
}


def run_entry(model: str, variant: str, ratio: float, seed: int, windows: int) -> dict:
    """The fields of a log record that name its run (the model only when not the default, as
    the records logged before it was named)."""
    entry = {"variant": variant, "ratio": ratio, "seed": seed, "windows": windows}
    if model != DEFAULT_MODEL:
        entry["model"] = model
    return entry


def run_id(record: dict) -> tuple:
    """What a logged run is skipped by: its variant, ratio, seed, windows and model."""
    return (record["variant"], record["ratio"], record["seed"], record["windows"],
            record.get("model", DEFAULT_MODEL))


def done_runs(log_path: Path) -> set[tuple]:
    """The :func:`run_id` of every run in the log (none when there is no log)."""
    if not log_path.exists():
        return set()
    return {run_id(json.loads(line)) for line in log_path.read_text().splitlines()}


def run_sweep(args: argparse.Namespace) -> None:
    names = args.variants.split(",")
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:  # before the model loads
        raise SystemExit(f"unknown variant {unknown[0]!r}; use one of {', '.join(VARIANTS)}")
    log_path = Path(args.log)
    done = done_runs(log_path)
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    windows = load_corpus("wiki", tokenizer).evaluation_windows(1024, args.windows)
    torch.set_num_threads(args.threads)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    dense = run_entry(args.model, "dense", 0.0, 0, args.windows)
    if run_id(dense) not in done:
        _append(log_path, {**dense, "perplexity": perplexity(model, windows, progress=False),
                           "select_seconds": 0.0})
    for name in names:
        selector, stochastic = VARIANTS[name]
        for ratio in [float(r) for r in args.ratios.split(",")]:
            for seed in [int(s) for s in args.seeds.split(",")] if stochastic else [0]:
                entry = run_entry(args.model, name, ratio, seed, args.windows)
                if run_id(entry) in done:
                    continue
                pruned = copy.deepcopy(model)
                rows, seconds = selector(pruned, ratio, seed)
                slice_model(pruned, rows)
                value = perplexity(pruned, windows, progress=False)
                _append(log_path, {**entry, "perplexity": value, "select_seconds": seconds})
                print(f"{name} r={ratio} seed={seed}: ppl {value:.2f} ({seconds:.1f} s)",
                      flush=True)
                del pruned


def second_family(model_types: list[str], ratios: list[float], seeds: list[int]) -> str:
    """KL(dense || pruned) of next-token distributions on random tokens, per variant, for the
    tiny random models of tests/conftest.py (no data; a check that the default is no worse than
    the reference on other families). Returns a markdown table."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_tiny_model

    variants = ["prunenet-ref-lr1e-3-sample", "prunenet-ref-lr1e-3-topk", "self-generated",
                "random", "magnitude"]
    lines = ["| model | variant | " + " | ".join(f"KL r={r}" for r in ratios) + " |",
             "|---" * (len(ratios) + 2) + "|"]
    for model_type in model_types:
        dense = make_tiny_model(model_type)
        vocab = dense.get_input_embeddings().weight.shape[0]
        tokens = torch.randint(0, vocab, (8, 32), generator=torch.Generator().manual_seed(123))
        with torch.no_grad():
            reference_log = torch.log_softmax(dense(tokens).logits.float(), dim=-1)
        for name in variants:
            selector, stochastic = VARIANTS[name]
            cells = []
            for ratio in ratios:
                values = []
                for seed in seeds if stochastic else [0]:
                    pruned = copy.deepcopy(dense)
                    rows, _ = selector(pruned, ratio, seed)
                    slice_model(pruned, rows)
                    with torch.no_grad():
                        log_p = torch.log_softmax(pruned(tokens).logits.float(), dim=-1)
                    kl = (reference_log.exp() * (reference_log - log_p)).sum(-1).mean()
                    values.append(float(kl))
                cells.append(f"{statistics.mean(values):.2e}"
                             + (f" ({min(values):.2e}-{max(values):.2e})" if len(values) > 1
                                else ""))
            lines.append(f"| tiny {model_type} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _append(path: Path, record: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def report(path: str) -> str:
    """Markdown table: the geometric mean (min-max over seeds) perplexity per model, variant,
    windows and ratio."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        groups[(record.get("model", DEFAULT_MODEL), record["variant"], record["windows"])
               ].append(record)
    ratios = sorted({r["ratio"] for rs in groups.values() for r in rs if r["ratio"] > 0})
    lines = ["| model | variant | windows | seeds | " + " | ".join(f"r={r}" for r in ratios)
             + " | select s (mean) |", "|---" * (len(ratios) + 5) + "|"]
    for (model, name, count), records in groups.items():
        cells = []
        for ratio in ratios:
            values = [r["perplexity"] for r in records if r["ratio"] == ratio]
            cells.append(_cell(values))
        seeds = len({r["seed"] for r in records})
        seconds = statistics.mean(r["select_seconds"] for r in records)
        if name == "dense":
            cells = [f"{records[0]['perplexity']:.2f} (dense)"] * len(ratios)
        lines.append(f"| {model} | {name} | {count} | {seeds} | " + " | ".join(cells)
                     + f" | {seconds:.1f} |")
    return "\n".join(lines)


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean = math.exp(statistics.mean(math.log(v) for v in values))  # geometric mean
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="random,magnitude")
    parser.add_argument("--ratios", default="0.1,0.2,0.3")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="the dense model (recorded in each run unless the default)")
    parser.add_argument("--log", default="benchmarks/results/quality_screen.jsonl")
    parser.add_argument("--report", metavar="LOG", help="print the table of LOG and exit")
    parser.add_argument("--second-family", metavar="TYPES",
                        help="instead: KL check on tiny random models of these model_types "
                        "(comma-separated, e.g. gpt2,qwen2)")
    args = parser.parse_args()
    if args.second_family:
        print(second_family(args.second_family.split(","),
                            [float(r) for r in args.ratios.split(",")],
                            [int(s) for s in args.seeds.split(",")]))
        return
    if args.report:
        print(report(args.report))
        return
    run_sweep(args)


if __name__ == "__main__":
    from script_main import run_script

    run_script(main)
