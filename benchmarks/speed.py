"""Policy-training speed: the reference formulation against prunenet, in one run, same machine.

For SmolLM2-135M and a LLaMA-2-7B-shaped FFN stack (random 11008 x 4096 weights; the cost does
not depend on the values) it times, at compression ratio 0.3 and seed 42:

- the reference formulation (benchmarks/reference_impl.py): model deep copy per episode, d_ff x
  d_ff policy product, full SVD with U and V, scipy KS, one AdamW step per layer;
- prunenet's ``train_policy_on_matrices`` (the engine behind ``prunenet train-policy``);
- the "spectral floor": the singular values of one sliced first matrix per layer and nothing else,
  both with ``torch.linalg.svdvals`` (fp32) and with prunenet's engine as training configures it
  (``LayerSpectrum``: Gram downdate by BLAS syrk + eigvalsh, float32 where ``precision="auto"``
  allows it);
- the spectral engine's options on one matrix of each shape, and on SmolLM2 whether each option's
  KS statistic equals float64 svdvals' for sampled row sets.

Per-layer times are measured on fewer layers than the full stacks where the reference is too slow
and scaled to the full layer count; the output says which numbers are scaled. With
``--llama-full-episodes N`` prunenet also trains for N episodes on all 32 7B-shaped layers and the
wall-clock time of that whole run is reported (measured, not scaled).

    nice -n 10 python benchmarks/speed.py --json benchmarks/results/speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from reference_impl import train_reference
from torch import nn

from prunenet.families import family_for, kept_count
from prunenet.selection.prunenet.reinforce import TrainingConfig, train_policy_on_matrices
from prunenet.selection.prunenet.spectral import LayerSpectrum, ks_statistic

RATIO, SEED = 0.3, 42
LLAMA7B = {"layers": 32, "d_model": 4096, "d_ff": 11008}


DEVICE = torch.device("cpu")  # set by --device


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def timed(function: Callable[[], object], repeats: int = 1) -> float:
    """Fastest of ``repeats`` calls, in seconds (the CPU is shared: the minimum is the signal)."""
    seconds = []
    for _ in range(repeats):
        synchronize()
        started = time.perf_counter()
        function()
        synchronize()
        seconds.append(time.perf_counter() - started)
    return min(seconds)


def kept_rows(d_ff: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(d_ff, generator=generator)
    kept = kept_count(d_ff, RATIO)
    return order[:kept].sort().values.to(DEVICE), order[kept:].sort().values.to(DEVICE)


def spectral_floors(matrices: list[torch.Tensor], svdvals_layers: int) -> dict[str, float]:
    """Seconds per layer of one sliced spectrum: svdvals fp32, and prunenet's engine."""
    generator = torch.Generator().manual_seed(SEED)
    svd_seconds, engine_seconds, dtypes = [], [], set()
    for index, matrix in enumerate(matrices):
        kept, _ = kept_rows(matrix.shape[0], generator)
        spectrum = LayerSpectrum(matrix)  # set up once per layer by prunenet, outside episodes
        dtypes.add(str(spectrum.dtype))
        engine_seconds.append(timed(lambda s=spectrum, k=kept: s.sliced(k)))
        if index < svdvals_layers:
            svd_seconds.append(timed(lambda m=matrix, k=kept: torch.linalg.svdvals(m[k])))
    return {"svdvals_fp32_per_layer": sum(svd_seconds) / len(svd_seconds),
            "engine_per_layer": sum(engine_seconds) / len(engine_seconds),
            "engine_dtypes": sorted(dtypes),
            "svdvals_layers_timed": len(svd_seconds), "engine_layers_timed": len(matrices)}


def engine_options(matrix: torch.Tensor, ks_row_sets: int) -> dict[str, dict]:
    """Time each way to get the sliced spectrum; count KS agreements with float64 svdvals."""
    generator = torch.Generator().manual_seed(SEED)
    kept, _ = kept_rows(matrix.shape[0], generator)
    spectra = {
        (precision, cached): LayerSpectrum(matrix, keep_matrix=cached, precision=precision)
        for precision in ("float64", "float32") for cached in (True, False)}
    options: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "svdvals fp32": lambda k: torch.linalg.svdvals(matrix[k]),
        "svdvals fp64": lambda k: torch.linalg.svdvals(matrix[k].double()),
    }
    for (precision, cached), spectrum in spectra.items():
        how = "downdate" if cached else "kept-rows Gram"
        options[f"{how} {precision} + eigvalsh"] = (
            lambda k, s=spectrum: s.sliced(k, matrix))
    if matrix.shape[0] > 5000:  # minutes per call at the 7B shape; the floor times svdvals
        del options["svdvals fp64"], options["svdvals fp32"]
    results = {}
    repeats = 1 if matrix.shape[0] > 5000 else 5
    for name, option in options.items():
        results[name] = {"seconds": timed(lambda option=option: option(kept), repeats)}
    if ks_row_sets:
        original = torch.linalg.svdvals(matrix.double())
        agree = dict.fromkeys(options, 0)
        for _ in range(ks_row_sets):
            kept, _ = kept_rows(matrix.shape[0], generator)
            expected = ks_statistic(original, torch.linalg.svdvals(matrix[kept].double()))
            for name, option in options.items():
                base = original
                for (precision, cached), spectrum in spectra.items():
                    if name.endswith(f"{precision} + eigvalsh") and name.startswith(
                            "downdate" if cached else "kept-rows"):
                        base = spectrum.original  # each engine compares with its own original
                agree[name] += ks_statistic(base, option(kept)) == expected
        for name in options:
            results[name]["ks_equal_to_svdvals_fp64"] = f"{agree[name]}/{ks_row_sets}"
    return results


def prunenet_training(matrices: list[torch.Tensor], episodes: int) -> dict[str, float]:
    config = TrainingConfig(ratio=RATIO, episodes=episodes, seed=SEED)
    started = time.perf_counter()
    result = train_policy_on_matrices(matrices, config, progress=False)
    total = time.perf_counter() - started
    episode_seconds = [record.seconds for record in result.history]
    return {"per_episode": sum(episode_seconds) / len(episode_seconds),
            "setup": total - sum(episode_seconds), "episodes": episodes}


def smollm2(args: argparse.Namespace) -> dict:
    from prunenet.io.loading import load_model_and_tokenizer
    from prunenet.model_view import FFNView

    model, _ = load_model_and_tokenizer("smollm2-135m", dtype=torch.float32)
    model.to(DEVICE)
    view = FFNView(model)
    matrices = [view.first_matrix(index, DEVICE) for index in range(view.num_layers)]
    print(f"SmolLM2-135M: {view.num_layers} layers, {view.d_ff} x {view.d_model}", flush=True)
    reference = train_reference(model, view.family, RATIO, args.reference_episodes, seed=SEED)
    print(f"  reference per episode: {reference}", flush=True)
    ours = prunenet_training(matrices, args.episodes)
    print(f"  prunenet: {ours}", flush=True)
    floors = spectral_floors(matrices, svdvals_layers=view.num_layers)
    options = engine_options(matrices[view.num_layers // 2], args.ks_row_sets)
    reference_episode = sum(reference) / len(reference)
    return {
        "layers": view.num_layers, "d_ff": view.d_ff, "d_model": view.d_model,
        "reference_per_episode": reference_episode, "reference_episodes": len(reference),
        "prunenet": ours,
        "speedup": reference_episode / ours["per_episode"],
        "floor_svdvals_per_episode": floors["svdvals_fp32_per_layer"] * view.num_layers,
        "floor_engine_per_episode": floors["engine_per_layer"] * view.num_layers,
        "engine_options_middle_layer": options,
    }


def llama7b_stack(layers: int) -> nn.Module:
    """``layers`` LLaMA FFNs (gate, up, down) of the 7B shape under ``model.layers``."""
    generator = torch.Generator().manual_seed(SEED)
    stack = nn.Module()
    stack.model = nn.Module()
    stack.model.layers = nn.ModuleList()
    for _ in range(layers):
        layer, mlp = nn.Module(), nn.Module()
        d_model, d_ff = LLAMA7B["d_model"], LLAMA7B["d_ff"]
        for name, shape in (("gate_proj", (d_ff, d_model)), ("up_proj", (d_ff, d_model)),
                            ("down_proj", (d_model, d_ff))):
            linear = nn.Linear(shape[1], shape[0], bias=False)
            with torch.no_grad():
                linear.weight.copy_(torch.randn(shape, generator=generator) * 0.02)
            linear.requires_grad_(False)
            setattr(mlp, name, linear)
        layer.mlp = mlp
        stack.model.layers.append(layer)
    return stack


def llama7b(args: argparse.Namespace) -> dict:
    family = family_for("llama")
    full = LLAMA7B["layers"]
    print(f"LLaMA-2-7B FFN shape: prunenet on {args.llama_layers} of {full} layers, reference on "
          f"{args.llama_reference_layers}", flush=True)
    stack = llama7b_stack(args.llama_reference_layers).to(DEVICE)
    reference = train_reference(stack, family, RATIO, 1, seed=SEED)
    del stack
    reference_per_layer = reference[0] / args.llama_reference_layers
    print(f"  reference per layer: {reference_per_layer:.1f} s", flush=True)
    generator = torch.Generator().manual_seed(SEED)
    matrices = [(torch.randn(LLAMA7B["d_ff"], LLAMA7B["d_model"], generator=generator) * 0.02)
                .to(DEVICE) for _ in range(args.llama_layers)]
    ours = prunenet_training(matrices, 1)
    ours_per_layer = ours["per_episode"] / args.llama_layers
    setup_per_layer = ours["setup"] / args.llama_layers
    print(f"  prunenet per layer: {ours_per_layer:.1f} s (+ setup {setup_per_layer:.1f} s)",
          flush=True)
    floors = spectral_floors(matrices, svdvals_layers=1)
    options = engine_options(matrices[0], ks_row_sets=0)
    full_run = None
    if args.llama_full_episodes:
        del matrices
        print(f"  prunenet: {args.llama_full_episodes} episodes on all {full} layers ...",
              flush=True)
        generator = torch.Generator().manual_seed(SEED)
        matrices = [(torch.randn(LLAMA7B["d_ff"], LLAMA7B["d_model"], generator=generator)
                     * 0.02).to(DEVICE) for _ in range(full)]
        started = time.perf_counter()
        full_run = prunenet_training(matrices, args.llama_full_episodes)
        full_run["wall_seconds"] = time.perf_counter() - started
        print(f"  full run: {full_run}", flush=True)
    return {
        "layers_scaled_to": full,
        "reference_layers_timed": args.llama_reference_layers,
        "prunenet_layers_timed": args.llama_layers,
        "reference_per_layer": reference_per_layer,
        "reference_per_episode_scaled": reference_per_layer * full,
        "prunenet_per_layer": ours_per_layer,
        "prunenet_per_episode_scaled": ours_per_layer * full,
        "prunenet_setup_scaled": setup_per_layer * full,
        "prunenet_20_episodes_scaled": (ours_per_layer * 20 + setup_per_layer) * full,
        "speedup": reference_per_layer / ours_per_layer,
        "floor_svdvals_per_episode_scaled": floors["svdvals_fp32_per_layer"] * full,
        "floor_engine_per_episode_scaled": floors["engine_per_layer"] * full,
        "engine_options": options,
        "full_run_measured": full_run,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=3, help="prunenet episodes on SmolLM2")
    parser.add_argument("--reference-episodes", type=int, default=1,
                        help="reference episodes on SmolLM2")
    parser.add_argument("--ks-row-sets", type=int, default=20,
                        help="row sets for the KS agreement of each engine option (SmolLM2)")
    parser.add_argument("--llama-layers", type=int, default=2,
                        help="7B-shaped layers prunenet trains on (scaled to 32)")
    parser.add_argument("--llama-reference-layers", type=int, default=1,
                        help="7B-shaped layers the reference trains on (scaled to 32)")
    parser.add_argument("--llama-full-episodes", type=int, default=0,
                        help="also train prunenet for N episodes on all 32 7B-shaped layers and "
                        "time the whole run (default 0: skip; 20 is the issue's target run)")
    parser.add_argument("--skip-llama", action="store_true", help="SmolLM2 only")
    parser.add_argument("--skip-smollm2", action="store_true", help="the 7B shape only")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both implementations (default 1: on a shared "
                        "CPU, OpenMP threads that spin-wait make LAPACK up to 20x slower)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where both implementations run (default: cpu)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    results = {"machine": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                           "cpu": platform.processor() or platform.machine(),
                           "device": torch.cuda.get_device_name(DEVICE)
                           if DEVICE.type == "cuda" else "cpu"},
               "ratio": RATIO, "seed": SEED}
    if not args.skip_smollm2:
        results["smollm2"] = smollm2(args)
    if not args.skip_llama:
        results["llama7b_shape"] = llama7b(args)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    from script_main import run_script

    run_script(main)
