"""``compare``: prune one model with several methods at several ratios and evaluate every result.

The PruneNet policy is trained once (at ``train_ratio``, default the largest ratio) and reused at
every ratio, as the method intends; every (method, ratio) pair prunes a fresh copy of the dense
model. Output, written atomically into one folder: ``results.json`` (dense + every pair, in the
schema of :func:`prunenet.evaluation.evaluate.evaluate`), ``report.md`` and PNG plots.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .arithmetic import check_seed
from .assets import asset_path
from .errors import InputError, refuse_repeats
from .evaluation.corpora import check_corpus, corpus_read_path, load_corpus, recorded_corpus
from .evaluation.evaluate import evaluate, examples_scored, fitted_seqlen, perplexity_windows
from .evaluation.speed import SpeedProtocol, fitted_protocol
from .evaluation.zeroshot import check_limit, parse_tasks
from .families import checked_ratio, kept_count
from .ffn_statistics import ProbeStatistics
from .io.files import atomic_folder, folder_of, json_with_format, write_json_atomic
from .io.loading import check_output_path, declared_ffn_width, load_model_and_tokenizer
from .io.streaming import check_models_fit
from .model_view import FFNView
from .naming import (
    calibration_sentence,
    markdown_code,
    markdown_text,
    method_label,
    number_text,
    probe_sentence,
    run_label,
)
from .pipeline import (
    CompressOptions,
    check_reconstruct,
    check_training,
    input_paths,
    method_of_variant,
    prune,
    run_probe,
    train_policy,
)
from .selection import SELECTORS
from .selection.activation import (
    Activation,
    Calibration,
    activation_norms,
    calibration_text,
    fitted_calibration,
)
from .selection.prunenet import PruneNet
from .version import __version__

log = logging.getLogger("prunenet")

FORMAT = "prunenet-compare/1"
PLOTS = ("perplexity.png", "accuracy.png", "speed.png", "size.png")
# A comparison prunenet wrote: its results, page and plots.
is_compare_output = folder_of("results.json", ("results.json", "report.md", *PLOTS),
                              check=lambda folder: json_with_format(folder / "results.json",
                                                                    FORMAT))


def parse_methods(methods: str | Sequence[str], variant: str | None = None,
                  quiet: bool = False) -> list[str]:
    """Method names from ``"self-generated,random"`` or a list; unknown names list the known
    ones. A deprecated ``variant`` renames ``prunenet`` in the list to the method it means
    (with its deprecation warning unless ``quiet``); with no ``prunenet`` to rename it is
    refused."""
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    if variant is not None:
        named = method_of_variant(variant, warn=not quiet)
        if PruneNet.name not in names:
            raise InputError(f"--variant has no effect here: it renames {PruneNet.name} in "
                             f"--methods, which does not list it; drop it (--variant is "
                             f"deprecated: name the methods in --methods)")
        if named in names:
            raise InputError(f"--variant {variant} renames {PruneNet.name} to {named}, which "
                             f"--methods already lists; drop --variant")
        names = [named if name == PruneNet.name else name for name in names]
    names = [name for name in names if name]
    refuse_repeats("--methods", names)
    unknown = [name for name in names if name not in SELECTORS]
    if unknown or not names:
        raise InputError(f"unknown method {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"known: {', '.join(SELECTORS)}")
    return names


def parse_ratios(ratios: Iterable[float]) -> list[float]:
    """The ratios of a comparison, sorted: numbers in [0, 1) (a numpy number runs as its value),
    each once, at least one. Raises :class:`InputError` otherwise."""
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Iterable):
        raise InputError(f"ratios must be a list of numbers such as [0.1, 0.3], got {ratios!r}")
    values = [checked_ratio(ratio) for ratio in ratios]
    refuse_repeats("--ratios", [str(value) for value in values])
    if not values:
        raise InputError("give at least one ratio, e.g. --ratios 0.1,0.2,0.3")
    return sorted(values)


def reads_seed(method_names: Sequence[str], reconstruct: str) -> bool:
    """Whether a comparison reads its seed: a refit samples a probe from it, or a method
    compared draws at random."""
    return reconstruct != "none" or any(SELECTORS[method].seeded for method in method_names)


def compare(
    model: str | os.PathLike,
    ratios: Sequence[float],
    methods: str | Sequence[str],
    out: str | os.PathLike,
    *,
    variant: str | None = None,
    episodes: int | None = None,
    train_ratio: float | None = None,
    ppl: str = "wiki",
    seqlen: int | None = None,
    windows: int = 8,
    tasks: str | Sequence[str] = ("piqa", "arc_easy", "winogrande"),
    limit: int | None = 100,
    speed: SpeedProtocol | None = None,
    calibration: Calibration | None = None,
    reconstruct: str = "ls",
    seed: int = 42,
    overwrite: bool = False,
    progress: bool = True,
    report: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Compress ``model`` with every method at every ratio, evaluate all, write ``out``.

    ``model``: a folder, GGUF file or alias. ``methods``: names from the selection registry;
    for ``prunenet`` one policy is trained at ``train_ratio`` (default: the largest ratio) with
    ``episodes`` (None: the default) and reused at every ratio; without ``prunenet`` both are
    refused unless None. ``ratios``: a list of numbers in [0, 1). ``variant`` is the deprecated
    name of a method (see :func:`parse_methods`). Evaluation: ``windows`` perplexity windows of
    ``seqlen`` tokens of ``ppl``; ``tasks`` with ``limit`` examples each; speed under ``speed``
    (default protocol). ``reconstruct`` is the refit after every method (``ls``, as compress
    does in memory; ``none`` for selection alone); tables and plots name it beside the method.
    Returns the results dict also written to ``out/results.json``. Raises :class:`InputError`
    for unknown methods/tasks/corpora, bad ratios, too many windows, and :class:`OutputError`
    for an ``out`` that exists (without ``overwrite``) or cannot be written, before any work.
    """
    method_names = parse_methods(methods, variant)
    check_seed(seed)  # the probe's and every run's: the results name it as it ran
    task_names = parse_tasks(tasks)
    ratios = parse_ratios(ratios)
    if PruneNet.name not in method_names:  # as the command line refuses them, not ignored
        given = [name for name, value in (("episodes", episodes), ("train_ratio", train_ratio))
                 if value is not None]
        if given:
            raise InputError(f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no "
                             "effect here: no method compared trains a PruneNet policy; drop "
                             + ("it" if len(given) == 1 else "them"))
    # Text corpora named by path are read too ("wiki" and other names are not paths).
    reads = [*input_paths(model), corpus_read_path(ppl),
             corpus_read_path((calibration or Calibration()).corpus)]
    out_path = check_output_path(out, overwrite, reads, ours=is_compare_output)
    if task_names:
        check_limit(limit)
        asset_path("zeroshot")  # data not fetched: fail before any work, naming the command
    speed = speed or SpeedProtocol()
    speed.validate()
    reads_text = ppl not in (None, "none")
    if reads_text:
        check_corpus(ppl)  # a missing or endless corpus: refused before the model loads
    if "activation" in method_names:
        check_corpus((calibration or Calibration()).corpus)
    training_options = {} if episodes is None else {"episodes": episodes}
    if train_ratio is not None:  # recorded in the results as it ran
        train_ratio = checked_ratio(train_ratio)
    if PruneNet.name in method_names:  # ratio 0, episodes 0 or 2.5: before the dense model runs
        check_training(model, max(ratios) if train_ratio is None else train_ratio, seed=seed,
                       **training_options)
    check_reconstruct(model, reconstruct)  # every method refits alike: refused before the load
    check_models_fit([model], "prunenet compare")
    pruned_at = [*ratios, *([train_ratio] if train_ratio is not None else [])]
    declared = declared_ffn_width(model)  # a ratio that keeps no neuron: refused before the load
    for ratio in pruned_at if declared is not None else []:
        kept_count(declared, ratio)
    dense, tokenizer = load_model_and_tokenizer(model)
    width = FFNView(dense).d_ff  # where no field read above declares it
    for ratio in pruned_at:
        kept_count(width, ratio)
    if reads_text:
        seqlen = fitted_seqlen(dense.config, seqlen)
    speed = fitted_protocol(dense.config, speed)  # recorded as measured, defaults resolved
    calibration_windows = None
    if "activation" in method_names:  # its text is read now: refused before any work
        calibration = fitted_calibration(dense.config, calibration or Calibration())
        calibration_windows = calibration_text(tokenizer, calibration)
    corpus = None
    if reads_text:
        corpus = load_corpus(ppl, tokenizer)
        perplexity_windows(corpus, seqlen, windows)  # too many windows: fail before work

    def run_evaluation(subject, source=None) -> dict[str, Any]:
        return evaluate(subject, tokenizer, ppl=corpus, seqlen=seqlen, windows=windows,
                        tasks=task_names, limit=limit, speed=speed, source=source,
                        progress=progress)

    report(f"evaluating the dense model {model}")
    results: dict[str, Any] = {
        "format": FORMAT,
        "prunenet_version": __version__,
        "model": str(model),
        "ratios": ratios,
        "methods": method_names,
        "settings": {
            # windows and limit of a measurement not made are null, not the defaults unused
            "corpus": ppl if reads_text else None, "seqlen": seqlen if reads_text else None,
            "windows": windows if reads_text else None, "tasks": task_names,
            "limit": limit if task_names else None, "speed": vars(speed),
            # null where no probe was sampled and no method compared draws at random
            "seed": seed if reads_seed(method_names, reconstruct) else None,
            "reconstruct": reconstruct,
            # a corpus file by its absolute path, as every run's record names it
            "calibration": {**vars(calibration), "corpus": recorded_corpus(calibration.corpus)}
            if "activation" in method_names else None,
        },
        "training": None,
        "dense": run_evaluation(dense, source=model),  # with its record, if prunenet made it
        "runs": [],
    }
    policy = None
    if PruneNet.name in method_names:
        train_at = max(ratios) if train_ratio is None else train_ratio
        report(f"training the PruneNet policy once, at ratio {train_at}")
        training = train_policy(dense, train_at, seed=seed, progress=progress,
                                **training_options)
        policy = training.policy
        results["training"] = {
            "ratio": train_at,
            "config": dict(vars(training.config)),
            "device": training.device,
            "best_episode": training.best_episode,
            "episode_total_reward": [r.total_reward for r in training.history],
            "episode_mean_ks": [r.mean_ks for r in training.history],
        }
    statistics = None  # every run refits on the dense model's statistics on one probe: made once
    if reconstruct != "none":
        probe = run_probe(dense, tokenizer, CompressOptions(seed=seed, progress=progress))
        statistics = ProbeStatistics.kept(dense, probe.ids(), progress=progress)
    selectors = {}  # made once, for methods whose scores do not depend on the ratio
    if calibration_windows is not None:  # one calibration pass, not one per ratio
        selectors["activation"] = Activation(
            calibration, calibration_windows, activation_norms(dense, calibration_windows,
                                                               progress))
    pairs = [(method, ratio) for method in method_names for ratio in ratios]
    for number, (method, ratio) in enumerate(pairs, 1):
        # each run is given the settings its method reads: prune refuses the others
        read = {**({"seed": seed} if reads_seed([method], reconstruct) else {}),
                **({"calibration": calibration} if method == Activation.name else {})}
        pruned = prune(copy.deepcopy(dense), policy if method == PruneNet.name else None, ratio,
                       method=method, tokenizer=tokenizer, reconstruct=reconstruct,
                       progress=progress, statistics=statistics, selector=selectors.get(method),
                       **read)
        evaluation = run_evaluation(pruned.model)
        record = {k: v for k, v in pruned.record.items() if k not in ("training", "source")}
        results["runs"].append({"method": method, "ratio": ratio, "record": record,
                                "evaluation": evaluation})
        report(f"[{number}/{len(pairs)}] {method_run_label(results, method)} at {ratio}: "
               f"{_one_line(evaluation)}")
        del pruned
    with atomic_folder(out_path, overwrite, ours=is_compare_output) as staging:
        write_json_atomic(staging / "results.json", results)
        plots = write_plots(results, staging)
        (staging / "report.md").write_text(render_report(results, [p.name for p in plots]))
    return results


def _one_line(evaluation: dict[str, Any]) -> str:
    parts = []
    if evaluation["perplexity"]:
        parts.append(f"perplexity {evaluation['perplexity']['value']:.2f}")
    if evaluation["zero_shot"] and evaluation["zero_shot"]["average"] is not None:
        parts.append(f"accuracy {evaluation['zero_shot']['average']:.3f}")
    if evaluation["speed"]:
        parts.append(f"decode {evaluation['speed']['decode_tokens_per_s']:.1f} tok/s")
    return ", ".join(parts)


def method_run_label(results: dict[str, Any], method: str) -> str:
    """A method as it ran: with its refit (``random+ls``) unless there was none."""
    return method_label(method, results["settings"].get("reconstruct", "none"))


def _series(results: dict[str, Any], method: str, pick: Callable[[dict], float | None]):
    """(ratios, values) of ``method`` with the dense model as ratio 0."""
    points = [(0.0, pick(results["dense"]))]
    points += [(run["ratio"], pick(run["evaluation"]))
               for run in results["runs"] if run["method"] == method]
    points = [(r, v) for r, v in points if v is not None]
    return [r for r, _ in points], [v for _, v in points]


def write_plots(results: dict[str, Any], folder: Path) -> list[Path]:
    """PNG plots of ``results`` into ``folder``: perplexity, accuracy, speed and size vs ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    written = []

    def save(figure, name: str) -> None:
        figure.tight_layout()
        figure.savefig(folder / name, dpi=110)
        plt.close(figure)
        written.append(folder / name)

    def panel(axis, pick, ylabel: str, title: str, log_scale: bool = False) -> None:
        for method in methods:
            x, y = _series(results, method, pick)
            axis.plot(x, y, marker="o", label=method_run_label(results, method))
        axis.set_xlabel("compression ratio (fraction of FFN neurons removed)")
        axis.set_ylabel(ylabel)
        axis.set_title(title)
        if log_scale:
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend()

    settings = results["settings"]
    if results["dense"]["perplexity"]:
        figure, axis = plt.subplots(figsize=(6.5, 4.5))
        panel(axis, lambda e: e["perplexity"]["value"] if e["perplexity"] else None,
              "perplexity (log scale)",
              f"perplexity on {_plain(settings['corpus'])} ({settings['windows']} x "
              f"{settings['seqlen']})",
              log_scale=True)
        save(figure, "perplexity.png")
    tasks = measured_tasks(results)
    if tasks:
        names = [*tasks, "average"]
        figure, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.2), squeeze=False)
        for axis, name in zip(axes[0], names, strict=True):
            def pick(e, name=name):
                if not e["zero_shot"]:
                    return None
                if name == "average":
                    return e["zero_shot"]["average"]
                return _task_value(e["zero_shot"], name)
            scored = results["dense"]["zero_shot"]["tasks"]
            metric = "mean" if name == "average" else scored[name]["metric"]
            examples = examples_scored({task: scored[task] for task in
                                        (tasks if name == "average" else [name])})
            panel(axis, pick, metric, f"{name} ({examples})")
        save(figure, "accuracy.png")
    if results["dense"]["speed"]:
        figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        protocol = results["dense"]["speed"]
        for axis, key, label in ((axes[0], "prefill_tokens_per_s", "prefill"),
                                 (axes[1], "decode_tokens_per_s", "decode")):
            panel(axis, lambda e, key=key: e["speed"][key] if e["speed"] else None, "tokens/s",
                  f"{label}: batch {protocol['batch_size']}, prompt {protocol['prompt_tokens']}, "
                  f"{protocol['new_tokens']} new, {protocol['device']}")
        save(figure, "speed.png")
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for key, label in (("parameters", "all parameters"), ("ffn_parameters", "FFN parameters")):
        x, y = _series(results, methods[0], lambda e, key=key: e["size"][key] / 1e6)
        axis.plot(x, y, marker="o", label=label)
    axis.set_xlabel("compression ratio (fraction of FFN neurons removed)")
    axis.set_ylabel("millions of parameters")
    axis.set_title("model size (the same for every method)")
    axis.grid(alpha=0.3)
    axis.legend()
    save(figure, "size.png")
    return written


def _plain(text: str) -> str:
    """``text`` (a corpus path) as matplotlib draws it as written: a pair of dollar signs
    would open its mathematics, drawing another text or failing at the end of the run."""
    return str(text).replace("$", r"\$")


def measured_tasks(results: dict[str, Any]) -> list[str]:
    """The zero-shot tasks the dense model was scored on: those asked for, less any whose
    answers do not fit the model's context (skipped for every run alike)."""
    zero = results["dense"]["zero_shot"]
    return [name for name in results["settings"]["tasks"] if zero and name in zero["tasks"]]


def _task_value(zero: dict[str, Any] | None, task: str) -> float | None:
    """A task's score in an evaluation's ``zero_shot`` part; None where it was not scored."""
    score = (zero or {}).get("tasks", {}).get(task)
    return None if score is None else score["value"]


def _cell(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _size_digits(sizes: Sequence[int]) -> int:
    """Decimals of the parameter column (millions): the fewest, from one, at which every
    different size reads differently; six (single parameters) at most."""
    distinct = set(sizes)
    return next((digits for digits in range(1, 6)
                 if len({f"{size / 1e6:.{digits}f}" for size in distinct}) == len(distinct)), 6)


def _row(label: str, ratio: str, evaluation: dict[str, Any], tasks: list[str],
         size_digits: int) -> str:
    size = evaluation["size"]
    ppl = evaluation["perplexity"]["value"] if evaluation["perplexity"] else None
    zero = evaluation["zero_shot"]
    accs = [_task_value(zero, t) for t in tasks]
    speed = evaluation["speed"] or {}
    cells = [label, ratio, f"{size['parameters'] / 1e6:.{size_digits}f}", _cell(ppl, 2),
             *(_cell(a, 3) for a in accs), _cell(zero["average"] if zero else None, 3),
             _cell(speed.get("prefill_tokens_per_s"), 0),
             _cell(speed.get("decode_tokens_per_s"), 1)]
    return "| " + " | ".join(cells) + " |"


def results_table(results: dict[str, Any]) -> str:
    """The markdown table of dense + every (method, ratio) run."""
    tasks = results["settings"]["tasks"]
    header = ["method", "ratio", "params (M)", "perplexity", *tasks, "avg acc", "prefill tok/s",
              "decode tok/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    digits = _size_digits([evaluation["size"]["parameters"] for evaluation in
                           (results["dense"], *(run["evaluation"] for run in results["runs"]))])
    lines.append(_row(markdown_text(input_label(results)), "0", results["dense"], tasks, digits))
    for run in sorted(results["runs"], key=lambda r: (r["ratio"], r["method"])):
        lines.append(_row(method_run_label(results, run["method"]), number_text(run["ratio"]),
                          run["evaluation"], tasks, digits))
    return "\n".join(lines)


def input_label(results: dict[str, Any]) -> str:
    """The model every method pruned: ``dense``, or how prunenet made it where it was itself
    a prunenet output (``input (magnitude+ls at ratio 0.25)``)."""
    compression = results["dense"].get("compression")
    return "dense" if not compression else f"input ({run_label(compression)})"


def _winners(results: dict[str, Any]) -> list[str]:
    """Per ratio and metric: every method, best first."""
    lines = []
    for ratio in results["ratios"]:
        runs = [r for r in results["runs"] if r["ratio"] == ratio]
        # each value as the results table prints it (its column's digits), and ranked as
        # printed (ties by name), so the ranking never orders numbers that read the same by
        # digits it hides, nor reads otherwise than the table
        for label, key, better_low, digits in (
            ("perplexity", lambda e: e["perplexity"]["value"] if e["perplexity"] else None, True,
             2),
            ("average accuracy", lambda e: e["zero_shot"]["average"] if e["zero_shot"] else None,
             False, 3),
        ):
            scored = [(key(r["evaluation"]), method_run_label(results, r["method"])) for r in runs]
            scored = [(v, m) for v, m in scored if v is not None]
            if not scored:
                continue
            sign = 1 if better_low else -1
            scored.sort(key=lambda item: (sign * round(item[0], digits), item[1]))
            ranking = ", ".join(f"{m} {_cell(v, digits)}" for v, m in scored)
            lines.append(f"- ratio {number_text(ratio)}, {label}: {ranking}")
    return lines


def _task_metrics(results: dict[str, Any]) -> str:
    """The metric of every task scored (`` (piqa acc_norm, winogrande acc)``) and, where an ARC
    task was, the split it is scored on; nothing for a task that was not."""
    tasks = measured_tasks(results)
    if not tasks:
        return ""
    zero = results["dense"]["zero_shot"]
    metrics = ", ".join(f"{name} {zero['tasks'][name]['metric']}" for name in tasks)
    arc = any(name.startswith("arc_") for name in tasks)
    return f" ({metrics}{'; ARC on its validation split' if arc else ''})"


def _task_examples(results: dict[str, Any]) -> str:
    """The examples every task scored (``100 examples each``: a task holding fewer than the
    limit scores all it holds), or, where none was scored, what the limit asked for."""
    tasks = measured_tasks(results)
    if tasks:
        scored = results["dense"]["zero_shot"]["tasks"]
        return examples_scored({name: scored[name] for name in tasks})
    limit = results["settings"]["limit"]
    return "all examples" if limit is None else f"at most {limit} examples of each"


def _skipped_tasks(results: dict[str, Any]) -> str:
    """The report's note of the tasks asked for but not scored, if any."""
    skipped = [name for name in results["settings"]["tasks"]
               if name not in measured_tasks(results)]
    if not skipped:
        return ""
    whose = "its answers do" if len(skipped) == 1 else "their answers do"
    return f" Skipped: {', '.join(skipped)} ({whose} not fit the model's context)."


def _run_records(results: dict[str, Any], part: str) -> dict[str, Any]:
    """A part of the compression records (``probe``, ``reconstruct``) the runs share, from the
    first run that holds it; empty where none does."""
    found = [(run.get("record") or {}).get(part) for run in results["runs"]]
    return next((value for value in found if isinstance(value, dict)), {})


def _seed_lines(results: dict[str, Any]) -> list[str]:
    """The seed every run read and what it drew, and the probe sampled from it; nothing where
    no run read a seed."""
    seed = results["settings"].get("seed")
    if seed is None:
        return []
    probe = _run_records(results, "probe")
    drawn = [*(["the probe text"] if probe else []),
             *(["random rows"] if "random" in results["methods"] else []),
             *(["the PruneNet policy's training and its sampled rows"]
               if PruneNet.name in results["methods"] else [])]
    lines = [f"- Seed: {seed}, the same for every run ({', '.join(drawn)})."]
    if probe:
        readers = list(dict.fromkeys(run["method"] for run in results["runs"]
                                     if "probe" in (run.get("record") or {})))
        readers_named = ("every run" if len(readers) == len(results["methods"])
                         else f"every {', '.join(readers)} run")
        lines.append(f"- {markdown_text(probe_sentence(probe))}; made once and read by "
                     f"{readers_named}.")
    return lines


def render_report(results: dict[str, Any], plots: Sequence[str] = PLOTS) -> str:
    """``report.md``: settings, the table, per-ratio rankings and the ``plots`` (file names)."""
    settings = results["settings"]
    dense_speed = results["dense"]["speed"]
    lines = [
        f"# prunenet compare: {markdown_text(results['model'])}",
        "",
        f"prunenet {results['prunenet_version']}. Methods: {', '.join(results['methods'])}; "
        f"ratios: {', '.join(map(number_text, results['ratios']))} (fraction of FFN neurons "
        "removed in every layer; no recovery fine-tuning).",
        "",
        "- Perplexity: not measured (--ppl none)." if settings["corpus"] in (None, "none") else
        f"- Perplexity: {markdown_text(settings['corpus'])}, the first {settings['windows']} "
        "evaluation windows "
        f"of {settings['seqlen']} tokens.",
        "- Zero-shot: not measured (no --tasks)." if not settings["tasks"] else
        f"- Zero-shot: {', '.join(settings['tasks'])}; " + _task_examples(results)
        + _task_metrics(results) + "." + _skipped_tasks(results),
    ]
    if dense_speed:
        lines.append(
            f"- Speed: batch {dense_speed['batch_size']}, prompt {dense_speed['prompt_tokens']} "
            f"tokens, {dense_speed['new_tokens']} decoded tokens, median of "
            f"{dense_speed['repeats']} after {dense_speed['warmup']} warm-up, "
            f"{dense_speed['device']}, {dense_speed['threads']} threads."
        )
    if input_label(results) != "dense":
        made = markdown_text(run_label(results["dense"]["compression"]))
        lines.append(f"- Input: a model prunenet made, {made}; every ratio removes that "
                     "fraction of its FFN neurons, and the row "
                     f"{markdown_code(input_label(results))} stands where the dense model "
                     "would.")
    refit = settings.get("reconstruct", "none")
    ridge = _run_records(results, "reconstruct").get("ridge")
    lines.append("- Refit after every method: none (the selections alone)." if refit == "none"
                 else f"- Refit after every method: `{refit}` on the model's own probe text"
                 + (f", ridge {number_text(ridge)}" if ridge is not None else "")
                 + f" (named `+{refit}` in the tables).")
    lines += _seed_lines(results)
    for method in results["methods"]:
        lines.append(f"- {method}: {SELECTORS[method].summary}." if method in SELECTORS
                     else f"- {method}.")
    if results["training"]:
        training = results["training"]
        lines.append(
            f"- PruneNet: one policy trained at ratio {training['ratio']} "
            f"({training['config']['episodes']} episodes, best episode "
            f"{training['best_episode']}), reused at every ratio."
        )
    if settings["calibration"]:
        lines.append(f"- {markdown_text(calibration_sentence(settings['calibration']))}")
    winners = _winners(results) or ["Nothing to rank the methods by: neither perplexity nor "
                                    "zero-shot accuracy was measured."]
    lines += ["", "## Results", "", results_table(results), "", "## Ranking per ratio (best first)",
              "", *winners, "", "## Plots", ""]
    lines += [f"![{Path(name).stem}]({name})" for name in plots]
    return "\n".join(lines) + "\n"
