"""``prunenet report RUN_DIR``: plots and a page about one compression run.

Reads a run record (:mod:`prunenet.recording`) and writes, atomically into one folder, PNG plots
(training curves, per-layer KS, singular-value CDFs, kept neurons), ``report.md`` linking them and a
self-contained ``report.html`` with the same content and the images embedded.
"""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from .errors import InputError, OutputError
from .io.files import (
    Output,
    atomic_folder,
    changed_since_written,
    guard_outputs,
    write_text_atomic,
)
from .naming import (
    calibration_sentence,
    compression_summary,
    history_sentence,
    markdown_text,
    method_label,
    number_text,
    probe_sentence,
    reads_seed,
    refit_mode,
    run_label,
)
from .recording import RUN_RECORD_NAME, SPECTRA_NAME, is_report, is_run_record, read_run_record

FIGURE_SIZE = (7.0, 4.2)  # inches; at DPI this gives 700 x 420 pixel PNGs
DPI = 100


def default_layers(num_layers: int) -> list[int]:
    """First, middle and last layer (fewer when the model has fewer layers)."""
    return sorted({0, num_layers // 2, num_layers - 1})


def _check_layers(layers: Sequence[int] | None, num_layers: int) -> list[int]:
    if layers is None:
        return default_layers(num_layers)
    wrong = [layer for layer in layers if not 0 <= layer < num_layers]
    if wrong or not layers:
        raise InputError(f"--layers must name layers 0..{num_layers - 1} of this run, got "
                         f"{', '.join(map(str, layers)) or 'none'}")
    return sorted(set(layers))


def _empirical_cdf(values: Tensor) -> tuple[list[float], list[float]]:
    ordered = values.double().sort().values
    count = ordered.numel()
    return ordered.tolist(), [(index + 1) / count for index in range(count)]


def write_plots(data: dict[str, Any], original: list[Tensor], pruned: list[Tensor],
                layers: list[int], folder: Path) -> list[str]:
    """Write the report's PNGs into ``folder``; returns their file names in reading order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[str] = []

    def save(figure, name: str) -> None:
        figure.tight_layout()
        figure.savefig(folder / name, dpi=DPI)
        plt.close(figure)
        written.append(name)

    per_layer = data["layers"]
    layer_index = list(range(data["num_layers"]))
    training = data["training"]
    if training is not None:
        episodes = training["episodes"]
        numbers = [episode["episode"] for episode in episodes]
        best = training["best_episode"]
        figure, (reward_axis, ks_axis) = plt.subplots(1, 2, figsize=FIGURE_SIZE)
        for axis, key, label in ((reward_axis, "total_reward", "total reward (sum over layers)"),
                                 (ks_axis, "mean_ks", "mean KS over layers")):
            axis.plot(numbers, [episode[key] for episode in episodes], marker="o", markersize=3)
            axis.axvline(best, color="tab:red", linestyle="--", label=f"best episode ({best})")
            _whole_numbers(axis, numbers)
            axis.set_xlabel("episode")
            axis.set_title(label, fontsize=10)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
        selected = _mean(per_layer["ks_selected"])
        ks_axis.axhline(selected, color="tab:green", linestyle=":",
                        label=f"final selection ({selected:.4f})")
        ks_axis.legend(fontsize=8)
        save(figure, "training.png")

    figure, axis = plt.subplots(figsize=FIGURE_SIZE)
    if per_layer["ks_first_episode"] is not None:
        axis.plot(layer_index, per_layer["ks_first_episode"], marker="o", markersize=3,
                  label="before: untrained policy (episode 0)")
    axis.plot(layer_index, per_layer["ks_selected"], marker="o", markersize=3,
              label=f"after: final selection ({data['compression']['method']})")
    _whole_numbers(axis, layer_index)
    axis.set_xlabel("layer")
    axis.set_ylabel("KS statistic (lower keeps the spectrum)")
    axis.set_title("KS distance of each layer's pruned to original spectrum", fontsize=10)
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    save(figure, "layer_ks.png")

    figure, axes = plt.subplots(1, len(layers), figsize=FIGURE_SIZE, squeeze=False, sharey=True)
    for axis, layer in zip(axes[0], layers):
        for values, label in ((original[layer], f"original ({original[layer].numel()})"),
                              (pruned[layer], f"pruned ({pruned[layer].numel()})")):
            x, y = _empirical_cdf(values)
            axis.step(x, y, where="post", label=label)
        axis.set_title(f"layer {layer}: KS {per_layer['ks_selected'][layer]:.4f}", fontsize=10)
        axis.set_xlabel("singular value")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("empirical CDF")
    save(figure, "spectra.png")

    compression = data["compression"]
    figure, axis = plt.subplots(figsize=FIGURE_SIZE)
    axis.bar(layer_index, per_layer["kept_neurons"], color="tab:blue", label="kept")
    axis.axhline(compression["ffn_width_before"], color="tab:gray", linestyle="--",
                 label=f"original width ({compression['ffn_width_before']})")
    _whole_numbers(axis, layer_index)
    axis.set_xlabel("layer")
    axis.set_ylabel("FFN neurons")
    axis.set_title(f"kept FFN neurons per layer (ratio {number_text(compression['ratio'])})",
                   fontsize=10)
    axis.set_ylim(0, compression["ffn_width_before"] * 1.25)
    axis.legend(fontsize=8, loc="upper right", ncols=2)
    save(figure, "kept_neurons.png")
    return written


def _whole_numbers(axis, values: Sequence[int]) -> None:
    """Ticks of the x axis at whole numbers only (episodes, layers). The locator falls back to
    fractions where fewer than two whole numbers are in view: a single episode or layer is
    given its own tick, in a view one unit either side."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    if len(set(values)) == 1:
        axis.xaxis.set_major_locator(FixedLocator([values[0]]))
        axis.set_xlim(values[0] - 1, values[0] + 1)
    else:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def summary_lines(data: dict[str, Any]) -> list[str]:
    """Markdown bullet lines: what was compressed, how, and what it gave."""
    c = data["compression"]
    per_layer = data["layers"]
    lines = [
        f"- Model: {markdown_text(c.get('source')) or 'an in-memory model'}; method "
        f"**{method_label(c['method'], refit_mode(c))}**"
        + (f" (selection {c['selection']})" if c.get("selection") else "")
        + f", ratio {c['ratio']}" + _rounding(c)
        + (f", seed {c['seed']}" if reads_seed(c) else "")  # not where nothing was drawn
        + f", prunenet {c['prunenet_version']}.",
        *([f"- {markdown_text(history)}"] if (history := history_sentence(c)) else []),
        _refit_line(c),
        *([f"- {markdown_text(probe_sentence(c['probe']))}."]
          if isinstance(c.get("probe"), dict) else []),
        *_calibration_line(c),
        f"- FFN width {c['ffn_width_before']} -> {c['ffn_width_after']} in each of "
        f"{data['num_layers']} layers; parameters {c['parameters_before']:,} -> "
        f"{c['parameters_after']:,} (-{100 * c['parameter_reduction']:.1f}%), FFN parameters "
        f"{c['ffn_parameters_before']:,} -> {c['ffn_parameters_after']:,}.",
        f"- Final selection: mean KS over layers {_mean(per_layer['ks_selected']):.4f} "
        f"(min {min(per_layer['ks_selected']):.4f}, max {max(per_layer['ks_selected']):.4f}).",
    ]
    training = data["training"]
    if training is not None:
        episodes = training["episodes"]
        best = episodes[training["best_episode"]]
        lines.append(
            f"- Policy training: {len(episodes)} episodes ({_training_settings(training)}); "
            f"mean KS {episodes[0]['mean_ks']:.4f} in "
            f"episode 0, {best['mean_ks']:.4f} in the best episode {best['episode']} (total "
            f"reward {best['total_reward']:.4g}), {episodes[-1]['mean_ks']:.4f} in the last."
        )
    elif c.get("policy_sha256"):
        lines.append(f"- No policy training in this run: {c['method']} applied a saved policy "
                     f"(sha256 {c['policy_sha256']}).")
    else:
        lines.append(f"- No policy training: {c['method']} selects neurons directly.")
    return lines


def _training_settings(training: dict[str, Any]) -> str:
    """Every setting the policy trained with but its episodes, counted beside them: ``baseline
    none, clip_norm 1, gamma 0.99, ...``."""
    return ", ".join(
        f"{key} {number_text(value) if isinstance(value, float) else markdown_text(str(value))}"
        for key, value in sorted(training["config"].items()) if key != "episodes")


def _rounding(compression: dict[str, Any]) -> str:
    """The multiple every layer's kept count was rounded to, where it was not the exact one."""
    round_to = compression.get("round_to") or 1
    return f" (kept neurons rounded to a multiple of {round_to})" if round_to > 1 else ""


def _refit_line(compression: dict[str, Any]) -> str:
    """What followed the selection: the refit of each layer's second FFN matrix on the model's
    own probe text, with its ridge, or none."""
    reconstruct = compression.get("reconstruct")
    mode = refit_mode(compression)
    if mode == "none":
        return "- Refit: none (the selection alone)."
    ridge = reconstruct.get("ridge") if isinstance(reconstruct, dict) else None
    return (f"- Refit: `{mode}` on the model's own probe text"
            + (f" (ridge {ridge})" if ridge is not None else "") + ".")


def _calibration_line(compression: dict[str, Any]) -> list[str]:
    """The text a calibration-based method (activation) read, where the record names it."""
    calibration = compression.get("calibration")
    if not isinstance(calibration, dict):
        return []
    return [f"- {markdown_text(calibration_sentence(calibration))}"]


def layer_table(data: dict[str, Any]) -> list[str]:
    """Markdown table: per layer, kept neurons and KS before/after selection."""
    per_layer = data["layers"]
    before = per_layer["ks_first_episode"]  # None: no policy was trained
    lines = ["| layer | kept neurons |" + (" KS untrained policy (episode 0) |" if before else "")
             + " KS final selection |", "|---|---|" + ("---|" if before else "") + "---|"]
    for layer in range(data["num_layers"]):
        untrained = f" {before[layer]:.4f} |" if before else ""
        lines.append(f"| {layer} | {per_layer['kept_neurons'][layer]} |{untrained} "
                     f"{per_layer['ks_selected'][layer]:.4f} |")
    return lines


CAPTIONS = {
    "training.png": "Total reward and mean KS per training episode.",
    "layer_ks.png": "Per-layer KS statistic before (untrained policy) and after selection.",
    "spectra.png": "Singular-value CDFs of the first FFN matrix, original vs pruned.",
    "kept_neurons.png": "Kept FFN neurons per layer.",
}


def caption(name: str, data: dict[str, Any]) -> str:
    """The caption of plot ``name``: a run that trained no policy has no "before" curve."""
    if name == "layer_ks.png" and data["layers"]["ks_first_episode"] is None:
        return f"Per-layer KS statistic of the selection ({data['compression']['method']})."
    return CAPTIONS[name]


def render_markdown(data: dict[str, Any], plots: Sequence[str]) -> str:
    """``report.md``: the summary, the plots (relative links) and the per-layer table."""
    title = ("prunenet run report: "
             + markdown_text(run_label(compression_summary(data["compression"]))))
    lines = [f"# {title}", "", *summary_lines(data), "", "## Plots", ""]
    for name in plots:
        lines += [f"![{caption(name, data)}]({name})", "", f"*{caption(name, data)}*", ""]
    lines += ["## Per layer", "", *layer_table(data)]
    return "\n".join(lines) + "\n"


def _inline_markdown(text: str) -> str:
    """A summary line's markdown as HTML: its ``**`` in bold, a backslash-escaped character
    (:func:`~prunenet.naming.markdown_text`) as itself, everything else escaped."""
    shown, bold = [], False
    for index, part in enumerate(re.split(r"(\\[!-/:-@\[-`{-~]|\*\*)", text)):
        if index % 2 == 0:  # text between the separators split on
            shown.append(html.escape(part))
        elif part == "**":
            shown.append("</b>" if bold else "<b>")
            bold = not bold
        else:
            shown.append(html.escape(part[1]))
    return "".join(shown) + ("</b>" if bold else "")


def render_html(data: dict[str, Any], plots: Sequence[str], folder: Path) -> str:
    """``report.html``: the same content as the markdown, images embedded as base64 PNG."""
    c = data["compression"]
    title = html.escape(f"prunenet run report: {run_label(compression_summary(c))}")
    body = [f"<h1>{title}</h1>", "<ul>"]
    body += [f"<li>{_inline_markdown(line[2:])}</li>" for line in summary_lines(data)]
    body += ["</ul>", "<h2>Plots</h2>"]
    for name in plots:
        encoded = base64.b64encode((folder / name).read_bytes()).decode("ascii")
        text = html.escape(caption(name, data))
        body.append(f'<figure><img src="data:image/png;base64,{encoded}" alt="{text}">'
                    f"<figcaption>{text}</figcaption></figure>")
    rows = layer_table(data)
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    body += ["<h2>Per layer</h2>", "<table>",
             "<tr>" + "".join(f"<th>{html.escape(cell)}</th>" for cell in header) + "</tr>"]
    for row in rows[2:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        body.append("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + "</tr>")
    body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
             "img{max-width:100%}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{title}</title><style>{style}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                 layers: Sequence[int] | None = None, overwrite: bool = False) -> Path:
    """Write the report of the run record ``run_dir`` into ``out`` (default ``RUN_DIR/report``).

    ``layers`` picks the layers whose singular-value CDFs are drawn (default: first, middle,
    last). A previous report in ``out`` is replaced, unless another run record holds it or its
    pages were edited since it was written (then only with ``overwrite``); no other non-empty
    folder is, and ``out`` never holds the record's own files. Returns the output folder.
    Raises :class:`InputError` for a folder that is not a run record or layers it does not
    have, :class:`OutputError` for an unwritable output.
    """
    if out is not None and not str(out).strip():  # as a path it would be the current folder
        raise OutputError("--out is empty; give a path")
    data, original, pruned = read_run_record(run_dir)
    chosen = _check_layers(layers, data["num_layers"])
    folder = Path(run_dir).expanduser()
    target = folder / "report" if out is None else Path(out).expanduser()
    # The record's default report folder may sit beside its files (a run record holds it);
    # anywhere else inside the record, or around it, is refused.
    beside = target.resolve() == (folder / "report").resolve()
    reads = [folder / RUN_RECORD_NAME, folder / SPECTRA_NAME] if beside else [folder]
    # A previous report is replaced without --overwrite, but not the report of another record.
    theirs = not beside and is_run_record(target.parent)
    # A run record's report folder is the one output inside another (any record's report)
    slot = target.parent if target.name == "report" and (
        target.parent / RUN_RECORD_NAME).is_file() else None
    # ... nor a report whose pages the user edited since (their edits would be lost)
    edited = changed_since_written(target) if is_report(target) and not overwrite else []
    if edited:
        raise OutputError(f"{target} holds a report whose {', '.join(edited)} changed since "
                          "prunenet wrote it; pass --overwrite to replace it, or move it away")
    target, = guard_outputs([Output(target, "--out", ours=is_report, within=slot)], reads,
                            overwrite=overwrite or (is_report(target) and not theirs))
    with atomic_folder(target, overwrite=True, ours=is_report) as staging:
        plots = write_plots(data, original, pruned, chosen, staging)
        write_text_atomic(staging / "report.md", render_markdown(data, plots))
        write_text_atomic(staging / "report.html", render_html(data, plots, staging))
    return target
