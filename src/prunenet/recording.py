"""The data of one compression run that ``prunenet report`` draws (``compress --record DIR``).

A run record is a folder holding ``spectra.safetensors`` (the singular values of every layer's first
FFN matrix, original and pruned) and ``record.json`` (written last, so a folder without it is not a
finished record): the compression record, kept-neuron counts and KS statistics per layer, and the
policy's training history when the method has one. The whole folder is written atomically.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import InputError
from .families import kept_count
from .io.files import atomic_folder, folder_of, json_with_format, write_json_atomic
from .io.loading import check_output_path, method_that_ran
from .model_view import FFNView
from .naming import reads_seed
from .refit import MODES
from .selection import SELECTORS
from .selection.prunenet import SELECTIONS
from .selection.prunenet.reinforce import TrainingResult
from .selection.prunenet.spectral import LayerSpectrum, ks_statistic

RUN_RECORD_FORMAT = "prunenet-run-record/1"
RUN_RECORD_NAME = "record.json"
SPECTRA_NAME = "spectra.safetensors"

REPORT_NAMES = ("report.md", "report.html")
# A report prunenet wrote: its two pages and its plots, nothing else, as its manifest lists
# (a user's own report.md, report.html and figures carry the same names).
is_report = folder_of(REPORT_NAMES[0], (*REPORT_NAMES, "*.png"),
                      check=lambda folder: (folder / REPORT_NAMES[1]).is_file(),
                      names_suffice=False)
# A run record prunenet wrote; its default report folder may sit inside it.
is_run_record = folder_of(
    RUN_RECORD_NAME, (RUN_RECORD_NAME, SPECTRA_NAME), folders={"report": is_report},
    joined_later={"report": is_report},
    check=lambda folder: json_with_format(folder / RUN_RECORD_NAME, RUN_RECORD_FORMAT),
)


def first_matrix_spectra(weights: nn.Module | Any,
                         kept_rows: Sequence[Tensor] | None = None) -> list[Tensor]:
    """Singular values (descending, fp32, on cpu) of every layer's first FFN matrix, or of its
    ``kept_rows`` (sorted, as slicing keeps them): the pruned model's, taken before the slice.

    ``weights``: a model, or what reads its layers (``num_layers`` and ``first_matrix(index,
    device)``: an :class:`FFNView`, a streamed checkpoint), one layer at a time. Computed as the
    reward computes them (a Gram matrix in the precision ``LayerSpectrum`` chooses for the
    layer): faster than ``svdvals``, the same order of values (tested).
    """
    view = FFNView(weights) if isinstance(weights, nn.Module) else weights
    spectra = []
    for index in range(view.num_layers):
        matrix = view.first_matrix(index, "cpu")
        if kept_rows is not None:
            matrix = matrix[kept_rows[index]]
        spectra.append(LayerSpectrum(matrix).original)
    return spectra


def run_record(record: dict[str, Any], kept_rows: list[Tensor], original: list[Tensor],
               pruned: list[Tensor], training: TrainingResult | None) -> dict[str, Any]:
    """The ``record.json`` content of a run (see the module docstring)."""
    layers: dict[str, Any] = {
        "kept_neurons": [int(rows.numel()) for rows in kept_rows],
        "ks_selected": [ks_statistic(before, after) for before, after in zip(original, pruned)],
        "ks_first_episode": training.history[0].layer_ks if training is not None else None,
    }
    return {
        "format": RUN_RECORD_FORMAT,
        "compression": record,
        "num_layers": len(kept_rows),
        "layers": layers,
        "training": None if training is None else {
            "best_episode": training.best_episode,
            "config": vars(training.config),
            "episodes": training.history_dicts(),
        },
        "spectra": SPECTRA_NAME,
    }


def write_run_record(record_dir: str | os.PathLike, pruned: list[Tensor],
                     kept_rows: list[Tensor], record: dict[str, Any], original: list[Tensor],
                     training: TrainingResult | None = None, overwrite: bool = False) -> Path:
    """Write the run record into ``record_dir`` atomically; returns its path.

    ``original`` and ``pruned`` are the spectra of the first FFN matrices before and after
    pruning (:func:`first_matrix_spectra`), ``record`` the compression record
    (``prunenet.json`` content). Raises :class:`OutputError` when ``record_dir`` cannot be
    written or exists and ``overwrite`` is false.
    """
    path = check_output_path(record_dir, overwrite, what="--record", ours=is_run_record)
    tensors = {}
    for index, (before, after) in enumerate(zip(original, pruned)):
        tensors[f"layer.{index}.original"] = before.contiguous()
        tensors[f"layer.{index}.pruned"] = after.contiguous()
    with atomic_folder(path, overwrite, ours=is_run_record) as staging:
        save_file(tensors, staging / SPECTRA_NAME)
        write_json_atomic(staging / RUN_RECORD_NAME,
                          run_record(record, kept_rows, original, pruned, training))
    return path


def _is(value: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":  # finite: a report never draws or prints NaN or Inf
        return isinstance(value, (int, float)) and not isinstance(value, bool) \
            and math.isfinite(value)
    return isinstance(value, str)


_COMPRESSION_FIELDS = {
    "method": "str", "ratio": "number", "prunenet_version": "str",
    "ffn_width_before": "int", "ffn_width_after": "int", "parameters_before": "int",
    "parameters_after": "int", "ffn_parameters_before": "int", "ffn_parameters_after": "int",
    "parameter_reduction": "number",
}


def _compression_problem(compression: dict[str, Any]) -> str | None:
    """What is wrong with the fields of a run record's compression record that the report
    prints and that may be null or absent (the seed, source, selection, rounding, refit,
    calibration and policy), or None."""
    if "seed" not in compression:
        return "compression.seed is missing (an int, or null where the run drew nothing)"
    seed = compression["seed"]
    if seed is not None and not _is(seed, "int"):
        return f"compression.seed must be an int or null (the run drew nothing), got {seed!r}"
    if seed is None and reads_seed(compression):  # the page would print "seed None"
        return ("compression.seed is null, but the run read one (it sampled a probe or drew "
                "rows at random)")
    source = compression.get("source")
    if source is not None and (not isinstance(source, str) or not source.strip()):
        return f"compression.source must name the model it was made from, got {source!r}"
    for key in ("selection", "policy_sha256"):
        if compression.get(key) is not None and not _is(compression[key], "str"):
            return f"compression.{key} must be a str or null, got {compression[key]!r}"
    if compression.get("selection") not in (*SELECTIONS, None):  # the page names it as it ran
        return (f"compression.selection must be one of {', '.join(SELECTIONS)} or null, got "
                f"{compression['selection']!r}")
    round_to = compression.get("round_to")
    if round_to is not None and (not _is(round_to, "int") or round_to < 1):
        return f"compression.round_to must be a positive integer, got {round_to!r}"
    reconstruct, modes = compression.get("reconstruct"), (*MODES, "none")
    if isinstance(reconstruct, dict):
        mode, ridge = reconstruct.get("mode"), reconstruct.get("ridge")
        if mode is not None and mode not in modes:  # the page names it as it ran
            return (f"compression.reconstruct.mode must be one of {', '.join(MODES)}, none, got "
                    f"{mode!r}")
        if ridge is not None and (not _is(ridge, "number") or ridge < 0):
            return f"compression.reconstruct.ridge must be a finite number >= 0, got {ridge!r}"
    elif reconstruct is not None and reconstruct not in modes:
        return f"compression.reconstruct must be an object, got {reconstruct!r}"
    calibration = compression.get("calibration")
    if calibration is not None:
        if not isinstance(calibration, dict) or not _is(calibration.get("corpus"), "str") \
                or not all(_is(calibration.get(key), "int") and calibration[key] >= 1
                           for key in ("windows", "seqlen")):
            return ("compression.calibration must hold its corpus, windows and seqlen, got "
                    f"{calibration!r}")
    probe = compression.get("probe")
    if probe is not None:
        shape = probe.get("shape") if isinstance(probe, dict) else None
        if not isinstance(probe, dict) or not _is(probe.get("seed"), "int") \
                or not _is(probe.get("temperature"), "number") or not (
                    isinstance(shape, list) and len(shape) == 2
                    and all(_is(size, "int") and size >= 1 for size in shape)
                    if shape is not None else _is(probe.get("tokens"), "int")):
            return ("compression.probe must hold its seed, temperature and shape (or tokens), "
                    f"got {probe!r}")
        for key in ("prompt", "sampler"):
            if probe.get(key) is not None and not _is(probe[key], "str"):
                return f"compression.probe.{key} must be a str, got {probe[key]!r}"
    tune = compression.get("finetune")
    if tune is not None and (not isinstance(tune, dict) or not all(
            isinstance(tune.get(key), (dict, type(None)))
            for key in ("settings", "distillation"))):
        return "compression.finetune must be an object or null"
    return None


def schema_problem(data: dict[str, Any]) -> str | None:
    """What is wrong with a ``record.json`` content that ``prunenet report`` draws, or None."""
    count = data.get("num_layers")
    if not _is(count, "int") or count < 1:
        return f"num_layers must be a positive integer, got {count!r}"
    compression = data.get("compression")
    if not isinstance(compression, dict):
        return "compression must be an object"
    for key, kind in _COMPRESSION_FIELDS.items():
        if not _is(compression.get(key), kind):
            return f"compression.{key} must be a {kind}, got {compression.get(key)!r}"
    problem = _compression_problem(compression)
    if problem is not None:
        return problem
    layers = data.get("layers")
    if not isinstance(layers, dict):
        return "layers must be an object"
    for key, kind in (("kept_neurons", "int"), ("ks_selected", "number"),
                      ("ks_first_episode", "number")):
        values = layers.get(key)
        if key == "ks_first_episode" and values is None:
            continue
        if not isinstance(values, list) or len(values) != count or not all(
                _is(value, kind) for value in values):
            return f"layers.{key} must be a list of {count} finite {kind}s"
    width = compression["ffn_width_before"]
    if not all(0 <= kept <= width for kept in layers["kept_neurons"]):
        return f"layers.kept_neurons must lie between 0 and ffn_width_before ({width})"
    method = method_that_ran(compression)
    if method not in SELECTORS:
        return f"compression.method {method!r} is none of prunenet's ({', '.join(SELECTORS)})"
    if not 0 <= compression["ratio"] < 1:
        return f"compression.ratio must lie in [0, 1), got {compression['ratio']!r}"
    sizes = ("ffn_width", "parameters", "ffn_parameters")
    for size in sizes:
        before, after = compression[f"{size}_before"], compression[f"{size}_after"]
        if not 0 <= after <= before:
            return (f"compression.{size}_after ({after}) must lie between 0 and "
                    f"{size}_before ({before})")
    # The page prints these side by side: each must be what the others say.
    after = compression["ffn_width_after"]
    if any(kept != after for kept in layers["kept_neurons"]):
        return (f"layers.kept_neurons ({', '.join(map(str, layers['kept_neurons']))}) must "
                f"each be compression.ffn_width_after ({after})")
    round_to = compression.get("round_to") or 1
    if kept_count(compression["ffn_width_before"], compression["ratio"], round_to) != after:
        return (f"compression.ratio {compression['ratio']!r} of ffn_width_before "
                f"{compression['ffn_width_before']} keeps "
                f"{kept_count(compression['ffn_width_before'], compression['ratio'], round_to)}"
                f" neurons, not ffn_width_after ({after})")
    before, after = compression["parameters_before"], compression["parameters_after"]
    reduction = compression["parameter_reduction"]
    if not before or not math.isclose(reduction, 1 - after / before, abs_tol=1e-9):
        return (f"compression.parameter_reduction ({reduction!r}) is not 1 - parameters_after "
                f"/ parameters_before ({after} / {before})")
    for key in ("ks_selected", "ks_first_episode"):
        if not all(0 <= ks <= 1 for ks in layers.get(key) or []):
            return f"layers.{key} must lie in [0, 1] (KS statistics)"
    training = data.get("training", "absent")
    if training is None:
        return None
    if not isinstance(training, dict):
        return "training must be an object or null"
    episodes = training.get("episodes")
    if not isinstance(episodes, list) or not episodes or not all(
            isinstance(e, dict) and _is(e.get("episode"), "int")
            and _is(e.get("mean_ks"), "number") and _is(e.get("total_reward"), "number")
            for e in episodes):
        return "training.episodes must be a non-empty list of episode records"
    best = training.get("best_episode")
    if not _is(best, "int") or not 0 <= best < len(episodes):
        return f"training.best_episode must index one of {len(episodes)} episodes, got {best!r}"
    config = training.get("config")
    if not isinstance(config, dict) or not _is(config.get("lr"), "number") or not _is(
            config.get("reward"), "str"):
        return "training.config must hold lr and reward"
    # the page prints every setting: each a word, a switch or a finite number
    odd = [key for key, value in config.items() if not isinstance(value, (str, bool))
           and not _is(value, "number")]
    if odd:
        return (f"training.config.{odd[0]} must be a str, a bool or a finite number, got "
                f"{config[odd[0]]!r}")
    return None


def read_run_record(run_dir: str | os.PathLike) -> tuple[dict[str, Any], list[Tensor],
                                                          list[Tensor]]:
    """``(record.json content, original spectra, pruned spectra)`` of a run record folder.

    Raises :class:`InputError` saying what is missing when ``run_dir`` is not a complete record.
    """
    how = "make one with `prunenet compress MODEL --ratio R --out OUT --record DIR`"
    if not str(run_dir).strip():  # Path("") is the current folder
        raise InputError(f"the run record path is empty; give the folder --record named ({how})")
    folder = Path(run_dir).expanduser()
    if not folder.is_dir():
        raise InputError(f"run record {folder} does not exist or is not a folder; {how}")
    record_path = folder / RUN_RECORD_NAME
    if not record_path.is_file():
        hint = " (that is a compressed model: its run record is the --record folder)" if (
            folder / "prunenet.json").exists() else ""
        raise InputError(f"{folder} is not a prunenet run record: it has no {RUN_RECORD_NAME}"
                         f"{hint}; {how}")
    try:
        data = json.loads(record_path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{record_path} is not readable JSON ({error}); {how}") from error
    tag = data.get("format") if isinstance(data, dict) else None
    family = RUN_RECORD_FORMAT.rsplit("/", 1)[0] + "/"
    if isinstance(tag, str) and tag.startswith(family) and tag != RUN_RECORD_FORMAT:
        from .version import __version__

        raise InputError(f"{record_path} is a run record of another prunenet version (format "
                         f"{tag!r}); prunenet {__version__} reads {RUN_RECORD_FORMAT!r}: draw "
                         "it with the prunenet that wrote it, or record the run again")
    if tag != RUN_RECORD_FORMAT:
        raise InputError(f"{record_path} is not a prunenet run record (format tag is not "
                         f"{RUN_RECORD_FORMAT!r}); {how}")
    problem = schema_problem(data)
    if problem is not None:
        raise InputError(f"{record_path}: {problem}; the record is damaged")
    data["compression"]["method"] = method_that_ran(data["compression"])
    spectra_path = folder / SPECTRA_NAME
    if not spectra_path.is_file():
        raise InputError(f"{folder} has {RUN_RECORD_NAME} but no {SPECTRA_NAME}; the record is "
                         f"incomplete, {how}")
    try:
        tensors = load_file(str(spectra_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise InputError(f"{spectra_path} is not a readable safetensors file ({error})") from error
    names = [f"layer.{i}.{kind}" for i in range(data["num_layers"])
             for kind in ("original", "pruned")]
    absent = [name for name in names if name not in tensors]
    if absent:
        raise InputError(f"{spectra_path} lacks {len(absent)} spectra (first: {absent[0]}); "
                         "the record is damaged")
    for name in names:
        spectrum = tensors[name]
        if spectrum.dim() != 1 or not spectrum.numel() or not spectrum.isfinite().all():
            raise InputError(f"{spectra_path}: {name} is not a list of finite singular values "
                             f"(shape {list(spectrum.shape)}); the record is damaged")
    count = data["num_layers"]
    original = [tensors[f"layer.{i}.original"] for i in range(count)]
    pruned = [tensors[f"layer.{i}.pruned"] for i in range(count)]
    layers, width = data["layers"], data["compression"]["ffn_width_before"]
    for index, (before, after) in enumerate(zip(original, pruned)):
        # The record's KS statistic was computed from exactly these tensors: a mismatch means
        # spectra of another run (or edited ones) sit beside this record.json.
        ks = ks_statistic(before, after)
        if before.numel() > width or after.numel() > layers["kept_neurons"][index] or \
                not math.isclose(ks, layers["ks_selected"][index], abs_tol=1e-9):
            raise InputError(
                f"{spectra_path}: layer {index}'s spectra do not match {RUN_RECORD_NAME} "
                f"({after.numel()} pruned singular values for {layers['kept_neurons'][index]} "
                f"kept neurons, KS statistic {ks:.4f} where the record says "
                f"{layers['ks_selected'][index]:.4f}); the files come from different runs, "
                "the record is damaged")
    return data, original, pruned
