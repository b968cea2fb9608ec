"""`prunenet compare` on a tiny model: report, JSON (stable schema) and real PNG plots; bad input
fails before any work."""

from __future__ import annotations

import contextlib
import html
import json
import re

import pytest
from PIL import Image

from prunenet.cli import main
from prunenet.compare import FORMAT, compare, parse_methods
from prunenet.errors import InputError, MissingAssetError, OutputError
from prunenet.evaluation.evaluate import SCHEMA_KEYS
from prunenet.evaluation.speed import SpeedProtocol
from prunenet.selection import DEFAULT_METHOD
from prunenet.selection.activation import Calibration

TEXT = "The old mill stands by the river, and in spring the water runs high and fast. " * 400


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return str(path)


def _compare_argv(model, text_file, out):
    return ["compare", str(model), "--ratios", "0.25,0.5", "--methods",
            "prunenet,random,magnitude,activation", "--out", str(out),
            "--episodes", "2",
            "--ppl", text_file, "--seqlen", "32", "--windows", "2", "--tasks", "piqa",
            "--limit", "2", "--calibration-corpus", text_file, "--calibration-windows", "1",
            "--speed-prompt", "8", "--speed-new-tokens", "2", "--speed-repeats", "1"]


def test_compare_writes_report_json_and_plots(tiny_llama_real_tokenizer_dir, text_file, tmp_path,
                                              capsys):
    out = tmp_path / "cmp"
    assert main(_compare_argv(tiny_llama_real_tokenizer_dir, text_file, out)) == 0, \
        capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [
        ".prunenet-files", "accuracy.png", "perplexity.png", "report.md", "results.json",
        "size.png", "speed.png"]

    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"format", "prunenet_version", "model", "ratios", "methods",
                            "settings", "training", "dense", "runs"}
    assert results["format"] == FORMAT
    assert set(results["settings"]) == {"corpus", "seqlen", "windows", "tasks", "limit", "seed",
                                        "speed", "calibration", "reconstruct"}
    assert set(results["dense"]) == set(SCHEMA_KEYS)
    pairs = [(r["method"], r["ratio"]) for r in results["runs"]]
    assert pairs == [(m, r) for m in ("prunenet", "random", "magnitude", "activation")
                     for r in (0.25, 0.5)]
    for run in results["runs"]:
        assert set(run) == {"method", "ratio", "record", "evaluation"}
        assert set(run["evaluation"]) == set(SCHEMA_KEYS)
        assert run["evaluation"]["model"]["d_ff"] == int((1 - run["ratio"]) * 48)
        assert 0.0 <= run["evaluation"]["zero_shot"]["tasks"]["piqa"]["value"] <= 1.0
        assert run["evaluation"]["perplexity"]["windows"] == 2
    # The policy is trained once, at the largest ratio, and reused at both.
    assert results["training"]["ratio"] == 0.5
    assert results["training"]["device"] == "cpu"  # what its noise and arithmetic ran on
    shas = {r["record"]["policy_sha256"] for r in results["runs"] if r["method"] == "prunenet"}
    assert len(shas) == 1 and None not in shas

    report = (out / "report.md").read_text()
    for method in ("prunenet", "random", "magnitude", "activation"):
        assert f"| {method}+ls | 0.25 |" in report and f"| {method}+ls | 0.5 |" in report
    assert "| dense | 0 |" in report and "![perplexity](perplexity.png)" in report
    # The calibration text is named in the words of prunenet report's page, by naming's helper.
    assert (f"- Calibration: 1 window of 1024 tokens from the training region of {text_file} "
            "(never its evaluation windows).") in report.splitlines()

    for name in ("perplexity.png", "accuracy.png", "speed.png", "size.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG"
            assert image.width >= 400 and image.height >= 300
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colours is None or len(colours) > 10, f"{name} is (nearly) blank"
    assert not list(tmp_path.glob(".cmp.tmp-*")), "temporary folder left behind"


def test_compare_names_the_method_that_ran(tiny_llama_real_tokenizer_dir, text_file, tmp_path):
    results = compare(tiny_llama_real_tokenizer_dir, [0.5], DEFAULT_METHOD, tmp_path / "out",
                      ppl=text_file, seqlen=32, windows=1, tasks="", progress=False,
                      speed=SpeedProtocol(prompt_tokens=4, new_tokens=1, repeats=1))
    assert results["training"] is None  # the policy-free default trains nothing
    assert results["methods"] == [DEFAULT_METHOD]
    assert results["runs"][0]["record"]["method"] == DEFAULT_METHOD
    assert results["runs"][0]["record"]["policy_sha256"] is None
    assert results["runs"][0]["evaluation"]["model"]["d_ff"] == 24
    # The deprecated variant renames "prunenet" in the list to the method it meant.
    again = compare(tiny_llama_real_tokenizer_dir, [0.5], "prunenet", tmp_path / "again",
                    variant="self-generated", ppl=text_file, seqlen=32, windows=1, tasks="",
                    progress=False, speed=SpeedProtocol(prompt_tokens=4, new_tokens=1, repeats=1))
    assert again["methods"] == [DEFAULT_METHOD]
    assert again["runs"][0]["record"] == results["runs"][0]["record"]
    # Every method is refitted, as compress does, and the tables say so; none turns it off.
    assert results["runs"][0]["record"]["reconstruct"]["mode"] == "ls"
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"| {DEFAULT_METHOD}+ls | 0.5 |" in report and "Refit after every method: `ls`" in report
    alone = compare(tiny_llama_real_tokenizer_dir, [0.5], "random", tmp_path / "alone",
                    reconstruct="none", ppl=text_file, seqlen=32, windows=1, tasks="",
                    progress=False, speed=SpeedProtocol(prompt_tokens=4, new_tokens=1, repeats=1))
    assert alone["runs"][0]["record"]["reconstruct"] == {"mode": "none"}
    report = (tmp_path / "alone" / "report.md").read_text()
    assert "| random | 0.5 |" in report and "+ls" not in report


def test_every_run_of_a_compare_reads_one_pass_of_statistics_with_the_same_result(
        tiny_llama_real_tokenizer_dir, text_file, tmp_path, monkeypatch):
    """Every run refits on the dense model's statistics on one probe: compare makes them once
    (one pass of the model over the probe, not one per run), and the runs' records and
    perplexities are exactly those of runs that each take their own."""
    import prunenet.ffn_statistics
    from prunenet.ffn_statistics import ProbeStatistics

    passes = []
    run_batches = prunenet.ffn_statistics._run_batches
    monkeypatch.setattr(prunenet.ffn_statistics, "_run_batches",
                        lambda *args: passes.append(1) or run_batches(*args))

    def results(out):
        found = compare(tiny_llama_real_tokenizer_dir, [0.25, 0.5],
                        "self-generated,random,activation", tmp_path / out, ppl=text_file,
                        seqlen=32, windows=2, tasks="", progress=False,
                        calibration=Calibration(corpus=text_file, windows=1, seqlen=32),
                        speed=SpeedProtocol(prompt_tokens=4, new_tokens=1, repeats=1))
        return [(run["record"], run["evaluation"]["perplexity"]) for run in found["runs"]]

    shared = results("shared")
    assert len(passes) == 1
    passes.clear()
    monkeypatch.setattr(ProbeStatistics, "kept", classmethod(lambda *args, **kwargs: None))
    assert results("each") == shared
    assert len(passes) == 6
    assert {record["reconstruct"]["mode"] for record, _ in shared} == {"ls"}


def test_a_compare_reads_activation_calibration_once_for_every_ratio(
        tiny_llama_real_tokenizer_dir, text_file, tmp_path, monkeypatch):
    """activation's scores do not depend on the ratio: compare tokenizes its calibration text
    once and runs the dense model over it once for all ratios, and each run's record and
    perplexity are exactly those of runs that each read and run their own."""
    import prunenet.compare
    import prunenet.selection.activation as activation

    passes, reads = [], []
    sums, corpus = activation.squared_activation_sums, activation.load_corpus
    monkeypatch.setattr(activation, "squared_activation_sums",
                        lambda *args: passes.append(args[4]) or sums(*args))
    monkeypatch.setattr(activation, "load_corpus",
                        lambda *args: reads.append(args[0]) or corpus(*args))

    def results(out):
        found = compare(tiny_llama_real_tokenizer_dir, [0.25, 0.5, 0.75], "activation",
                        tmp_path / out, ppl=text_file, seqlen=32, windows=2, tasks="",
                        progress=False, reconstruct="none",
                        calibration=Calibration(corpus=text_file, windows=2, seqlen=32),
                        speed=SpeedProtocol(prompt_tokens=4, new_tokens=1, repeats=1))
        return [(run["record"], run["evaluation"]["perplexity"]) for run in found["runs"]]

    shared = results("shared")
    assert passes == ["calibration"] and reads == [text_file]
    passes.clear()
    reads.clear()
    monkeypatch.setattr(prunenet.compare, "activation_norms", lambda *args: None)
    assert results("each") == shared
    assert passes == ["calibration"] * 3 and reads == [text_file]
    kept = [record["ffn_width_after"] for record, _ in shared]
    assert kept == [36, 24, 12]


def test_compare_refuses_existing_and_unwritable_out_before_work(tmp_path, tiny_llama_dir,
                                                                monkeypatch):
    import prunenet.compare as compare_module

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(compare_module, "load_model_and_tokenizer", no_work)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("user data")
    with pytest.raises(OutputError, match="prunenet replaces only its own outputs"):
        compare(str(tiny_llama_dir), [0.5], "random", existing)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot create the folder"):
        compare(str(tiny_llama_dir), [0.5], "random", blocker / "out")
    assert (existing / "keep.txt").read_text() == "user data"


@pytest.mark.parametrize("limit", [0, 1.5, True])
def test_a_limit_that_is_no_whole_number_is_refused_before_the_model_loads(
        tmp_path, tiny_llama_dir, monkeypatch, limit):
    """From Python, a zero-shot limit that is not a positive integer is refused before the
    dense model loads (it had been refused only after the load)."""
    import prunenet.compare as compare_module

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the limit was checked")

    monkeypatch.setattr(compare_module, "load_model_and_tokenizer", no_load)
    with pytest.raises(InputError, match="^limit must be a positive number of examples, got "):
        compare(str(tiny_llama_dir), [0.5], "random", tmp_path / "out", tasks="piqa",
                limit=limit)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("episodes,match", [(0, "^episodes must be at least 1, got 0"),
                                            (2.5, "^episodes must be a whole number, got 2.5")])
def test_policy_episodes_it_cannot_train_are_refused_before_any_evaluation(
        tmp_path, tiny_llama_dir, monkeypatch, episodes, match):
    """From Python, episodes training cannot take had been refused only after the dense model
    was evaluated, as the policy's training began."""
    import prunenet.compare as compare_module

    def no_evaluation(*args, **kwargs):
        raise AssertionError("a model was evaluated")

    monkeypatch.setattr(compare_module, "evaluate", no_evaluation)
    with pytest.raises(InputError, match=match):
        compare(str(tiny_llama_dir), [0.3], "prunenet", tmp_path / "out", episodes=episodes,
                ppl="none", tasks=[])
    assert not (tmp_path / "out").exists()

def test_unknown_method_lists_known_ones():
    with pytest.raises(InputError,
                       match="unknown method 'wanda'; known: self-generated, prunenet, random"):
        parse_methods("random,wanda")
    assert parse_methods("random, magnitude,") == ["random", "magnitude"]


def test_a_method_or_ratio_given_twice_is_refused(tiny_llama_dir, tmp_path):
    """Each method and ratio runs once in a comparison; naming one twice (or renaming prunenet
    by --variant to a method already listed) is a typo, said before any work."""
    with pytest.raises(InputError, match="--methods names random more than once; give each once"):
        parse_methods("random, magnitude,random")
    with pytest.raises(InputError, match="--variant self-generated renames prunenet to "
                                         "self-generated, which --methods already lists"):
        parse_methods("prunenet,self-generated", "self-generated", quiet=True)
    out = tmp_path / "cmp"
    with pytest.raises(InputError, match="--ratios names 0.1 more than once"):
        compare(str(tiny_llama_dir), [0.3, 0.1, 0.10], "random", out)
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "piqa,boolq"], "unknown task 'boolq'; known"),
    (["--tasks", "winogrande,piqa,winogrande"], "--tasks names winogrande more than once"),
    (["--ppl", "not-a-corpus"], "unknown corpus 'not-a-corpus'"),
    (["--windows", "500"], "holds (\\d+) evaluation windows of 32 tokens; asked for 500; "
     "give --windows \\1 or fewer"),
    (["--ratios", "0.5,1.2"], "ratio must be in \\[0, 1\\)"),
])
def test_compare_bad_input_is_one_line_and_writes_nothing(tiny_llama_real_tokenizer_dir,
                                                          text_file, tmp_path, capsys, extra,
                                                          message):
    out = tmp_path / "cmp"
    argv = _compare_argv(tiny_llama_real_tokenizer_dir, text_file, out)
    option, value = extra
    argv[argv.index(option) + 1] = value  # in place: an option given twice is refused
    # argparse rejects a bad ratio itself (exit 2); the others are prunenet errors (return 2).
    with pytest.raises(SystemExit) if extra[0] == "--ratios" else contextlib.nullcontext():
        assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors and re.search(message, errors[-1]), errors
    assert not out.exists()


def test_compare_names_the_fetch_command_when_data_is_missing(tiny_llama_real_tokenizer_dir,
                                                              text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(MissingAssetError, match="prunenet fetch"):
        compare(tiny_llama_real_tokenizer_dir, [0.5], "random", tmp_path / "out", ppl=text_file,
                seqlen=32, windows=1, tasks="piqa", limit=1)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model, options, match", [
    ("plain", ["--methods", "random,activation", "--ppl", "none"],
     "method 'activation' needs the model's tokenizer"),
    ("tokenizer", ["--methods", "activation", "--ppl", "none", "--calibration-corpus", "{short}"],
     "training tokens, fewer than one window"),
    ("tokenizer", ["--methods", "random", "--ppl", "{text}", "--seqlen", "100000"],
     "--seqlen 100000 exceeds the model's context of"),
])
def test_compare_refuses_what_a_method_or_window_cannot_use_before_any_evaluation(
        tiny_llama_dir, tiny_llama_real_tokenizer_dir, text_file, tmp_path, capsys,
        monkeypatch, model, options, match):
    """Calibration text the method cannot read, or windows the model cannot take, are refused
    before the dense model is evaluated and any method runs (they were refused after)."""
    import prunenet.compare

    def no_evaluation(*args, **kwargs):
        raise AssertionError("a model was evaluated")

    monkeypatch.setattr(prunenet.compare, "evaluate", no_evaluation)
    short = tmp_path / "short.txt"
    short.write_text("two words")
    folder = tiny_llama_dir if model == "plain" else tiny_llama_real_tokenizer_dir
    argv = ["-q", "compare", str(folder), "--ratios", "0.3", "--tasks", "", "--out",
            str(tmp_path / "out"), *(part.format(short=short, text=text_file)
                                     for part in options)]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_compare_without_measurements_says_so(tiny_llama_dir, tmp_path, capsys):
    """--ppl none and --tasks none (as --help writes it): the page says nothing was measured
    rather than naming windows of None tokens and examples that were never read."""
    out = tmp_path / "out"
    assert main(["-q", "compare", str(tiny_llama_dir), "--ratios", "0.3", "--methods", "random",
                 "--ppl", "none", "--tasks", "none", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    # Nor does the record name windows and a limit for measurements not made.
    settings = results["settings"]
    assert settings["tasks"] == []
    assert (settings["corpus"], settings["seqlen"], settings["windows"], settings["limit"]) == \
        (None, None, None, None)
    page = (out / "report.md").read_text()
    assert "- Perplexity: not measured (--ppl none)." in page
    assert "- Zero-shot: not measured (no --tasks)." in page
    assert "None" not in page
    ranking = page.split("## Ranking per ratio (best first)\n\n")[1].split("\n\n")[0]
    assert ranking == ("Nothing to rank the methods by: neither perplexity nor zero-shot "
                       "accuracy was measured.")


def test_a_bias_refit_without_a_bias_is_refused_before_the_load(tiny_llama_dir, tmp_path,
                                                                capsys, monkeypatch):
    """--reconstruct bias on a model whose second FFN matrix has no bias (LLaMA) is read from
    its config: refused before the dense model loads, is evaluated or a policy trains."""
    import prunenet.compare as compare_module

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(compare_module, "load_model_and_tokenizer", no_load)
    capsys.readouterr()
    assert main(["-q", "compare", str(tiny_llama_dir), "--ratios", "0.3", "--methods",
                 "random,prunenet", "--episodes", "1", "--ppl", "none", "--tasks", "",
                 "--reconstruct", "bias", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "prunenet: error: --reconstruct bias adds the removed neurons' mean output to the bias "
        "of the second FFN matrix, and this model's has none; use --reconstruct ls"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny-llama"]


def _compare_on_a_short_context(model_dir, tmp_path, capsys, tasks: str):
    """compare magnitude at 0.5, zero-shot ``tasks`` only, on a copy of ``model_dir`` with a
    32-token context (piqa's answers do not fit it, arc_easy's do); returns the output folder."""
    import shutil

    from conftest import edit_config

    model = tmp_path / "short"
    shutil.copytree(model_dir, model)
    edit_config(model, max_position_embeddings=32)
    out = tmp_path / "out"
    assert main(["-q", "compare", str(model), "--ratios", "0.5", "--methods", "magnitude",
                 "--reconstruct", "none", "--ppl", "none", "--tasks", tasks, "--limit", "2",
                 "--speed-repeats", "1", "--out", str(out)]) == 0, capsys.readouterr().err
    return out


def test_a_task_that_does_not_fit_the_context_is_left_out_of_the_tables_and_plots(
        tiny_llama_real_tokenizer_dir, tmp_path, capsys):
    """On a 32-token model piqa's answers do not fit (skipped, as eval skips it) while arc_easy's
    do: the comparison is written with arc_easy scored, piqa's cells empty and the page naming
    the skipped task, rather than ending in a KeyError after every run."""
    out = _compare_on_a_short_context(tiny_llama_real_tokenizer_dir, tmp_path, capsys,
                                      "piqa,arc_easy")
    results = json.loads((out / "results.json").read_text())
    for evaluation in (results["dense"], results["runs"][0]["evaluation"]):
        assert list(evaluation["zero_shot"]["tasks"]) == ["arc_easy"]
        assert evaluation["zero_shot"]["skipped"] == ["piqa"]
    page = (out / "report.md").read_text()
    assert ("Skipped: piqa (its answers do not fit the model's context)." in page)
    table = [line for line in page.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| method | ratio | params (M) | perplexity | piqa | arc_easy |")
    for row in table[1:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[4] == "-" and cells[5] != "-"
    assert (out / "accuracy.png").stat().st_size > 0


def test_a_pruned_input_is_named_as_made_not_called_dense(tiny_llama_dir, tmp_path, capsys):
    """compare on a model prunenet already pruned: results.json's ``dense`` entry holds its
    compression record, and the page's first row and a settings line name how it was made,
    where both had called it the dense model."""
    pruned = tmp_path / "pruned"
    assert main(["-q", "compress", str(tiny_llama_dir), "--ratio", "0.25", "--method",
                 "magnitude", "--reconstruct", "none", "--out", str(pruned)]) == 0
    out = tmp_path / "out"
    assert main(["-q", "compare", str(pruned), "--ratios", "0.5", "--methods", "magnitude",
                 "--reconstruct", "none", "--ppl", "none", "--tasks", "none",
                 "--speed-repeats", "1", "--out", str(out)]) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["dense"]["compression"]["method"] == "magnitude"
    assert results["dense"]["compression"]["ratio"] == 0.25
    assert results["dense"]["model"]["d_ff"] == 36
    page = (out / "report.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| input (magnitude at ratio 0.25) | 0 |")
    assert "| dense |" not in page
    assert ("- Input: a model prunenet made, magnitude at ratio 0.25; every ratio removes that "
            "fraction of its FFN neurons, and the row `input (magnitude at ratio 0.25)` stands "
            "where the dense model would.") in page
    dense = tmp_path / "dense-out"
    assert main(["-q", "compare", str(tiny_llama_dir), "--ratios", "0.5", "--methods",
                 "magnitude", "--reconstruct", "none", "--ppl", "none", "--tasks", "none",
                 "--speed-repeats", "1", "--out", str(dense)]) == 0
    assert "| dense | 0 |" in (dense / "report.md").read_text()
    assert "- Input:" not in (dense / "report.md").read_text()


def test_a_compare_whose_every_task_is_skipped_records_them_and_draws_no_accuracy(
        tiny_llama_real_tokenizer_dir, tmp_path, capsys):
    """Every task asked for is skipped (piqa's answers do not fit 32 tokens): each evaluation's
    zero_shot names the task skipped, with no average, instead of null (which says no task was
    asked for); the table's cells are empty and no accuracy plot is drawn."""
    out = _compare_on_a_short_context(tiny_llama_real_tokenizer_dir, tmp_path, capsys, "piqa")
    results = json.loads((out / "results.json").read_text())
    for evaluation in (results["dense"], results["runs"][0]["evaluation"]):
        assert evaluation["zero_shot"] == {"limit": 2, "tasks": {}, "average": None,
                                           "skipped": ["piqa"]}
    page = (out / "report.md").read_text()
    assert "Skipped: piqa (its answers do not fit the model's context)." in page
    table = [line for line in page.splitlines() if line.startswith("| ")]
    for row in table[1:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[4] == "-" and cells[5] == "-"  # piqa, avg acc
    assert not (out / "accuracy.png").exists()


def test_the_page_and_plots_name_only_the_tasks_measured(tiny_llama_real_tokenizer_dir, tmp_path,
                                                         capsys, monkeypatch):
    """A comparison on piqa alone names piqa's metric, not WinoGrande's and ARC's, which did not
    run; the page and the accuracy plots name the examples each task scored (a task holding
    fewer than the limit scores fewer), not the limit."""
    from matplotlib.axes import Axes

    from prunenet.compare import render_report, write_plots

    out = tmp_path / "out"
    assert main(["-q", "compare", str(tiny_llama_real_tokenizer_dir), "--ratios", "0.5",
                 "--methods", "magnitude", "--reconstruct", "none", "--ppl", "none", "--tasks",
                 "piqa", "--limit", "2", "--speed-repeats", "1", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    page = (out / "report.md").read_text()
    assert "- Zero-shot: piqa; 2 examples (piqa acc_norm).\n" in page
    assert "WinoGrande" not in page and "ARC" not in page
    results = json.loads((out / "results.json").read_text())
    results["dense"]["zero_shot"]["tasks"]["arc_easy"] = {
        **results["dense"]["zero_shot"]["tasks"]["piqa"], "examples": 1}
    results["settings"]["tasks"].append("arc_easy")
    assert ("- Zero-shot: piqa, arc_easy; piqa 2, arc_easy 1 examples (piqa acc_norm, arc_easy "
            "acc_norm; ARC on its validation split).\n" in render_report(results))
    titles = []
    monkeypatch.setattr(Axes, "set_title", lambda axis, text, *a, **k: titles.append(text))
    plots = tmp_path / "plots"
    plots.mkdir()
    write_plots(results, plots)
    assert {"piqa (2 examples)", "arc_easy (1 example)",
            "average (piqa 2, arc_easy 1 examples)"} <= set(titles)
    assert not [title for title in titles if "None" in title]


def _evaluation(perplexity: float, accuracy: float) -> dict:
    return {"size": {"parameters": 1_600_000}, "perplexity": {"value": perplexity},
            "zero_shot": {"tasks": {"piqa": {"value": accuracy, "metric": "acc_norm",
                                              "examples": 2}},
                          "average": accuracy}, "speed": None, "compression": None}


def test_the_ranking_prints_each_value_as_the_table_does():
    """Perplexities of 47709.26 and 47713.68 were ranked as '4.77e+04' both, an order the page
    could not show; the ranking now prints each value with its table column's digits."""
    from prunenet.compare import render_report

    results = {
        "model": "m", "prunenet_version": "0", "ratios": [0.5], "methods": ["random", "magnitude"],
        "settings": {"corpus": "wiki", "windows": 2, "seqlen": 32, "tasks": ["piqa"], "limit": 2,
                     "reconstruct": "none", "calibration": None},
        "training": None, "dense": _evaluation(47000.5, 0.5),
        "runs": [{"method": "random", "ratio": 0.5, "evaluation": _evaluation(47713.68, 0.25)},
                 {"method": "magnitude", "ratio": 0.5, "evaluation": _evaluation(47709.26, 0.5)}],
    }
    page = render_report(results, plots=[])
    assert page.startswith("# prunenet compare: m\n")
    assert render_report({**results, "model": "/m/a\nb"}, plots=[]).startswith(
        "# prunenet compare: '/m/a\\nb'\n")  # a newline in the path cannot split the heading
    assert "- ratio 0.5, perplexity: magnitude 47709.26, random 47713.68\n" in page
    assert "- ratio 0.5, average accuracy: magnitude 0.500, random 0.250\n" in page
    for row in ("| magnitude | 0.5 | 1.6 | 47709.26 | 0.500 | 0.500 |",
                "| random | 0.5 | 1.6 | 47713.68 | 0.250 | 0.250 |"):
        assert row in page


def test_results_name_the_seed_only_where_a_run_read_it(tiny_llama_dir, tmp_path, capsys):
    """magnitude with --reconstruct none samples no probe and draws nothing at random: its
    results.json records no seed (the command line refuses --seed there), as it records no
    windows for perplexity not measured; random reads it."""
    for method, seed in (("magnitude", None), ("random", 42)):
        out = tmp_path / method
        assert main(["-q", "compare", str(tiny_llama_dir), "--ratios", "0.5", "--methods",
                     method, "--reconstruct", "none", "--ppl", "none", "--tasks", "none",
                     "--speed-repeats", "1", "--out", str(out)]) == 0, capsys.readouterr().err
        assert json.loads((out / "results.json").read_text())["settings"]["seed"] == seed


@pytest.mark.parametrize("ratios, match", [
    ([0.3, 0.99], r"^ratio 0.99 keeps 0 of 48 FFN neurons; the largest usable ratio keeps 1"),
    ([0.3, 1.5], r"^ratio must be in \[0, 1\), got 1.5$"),
    ([0.3, float("nan")], r"^ratio must be in \[0, 1\), got nan$"),
    ([0.3, True], r"^ratio must be a number in \[0, 1\), got True$"),
    ([0.3, "0.5"], r"^ratio must be a number in \[0, 1\), got '0.5'$"),
    ("0.3,0.5", r"^ratios must be a list of numbers such as \[0.1, 0.3\], got '0.3,0.5'$"),
])
def test_ratios_a_comparison_cannot_run_are_refused_before_the_load(tmp_path, tiny_llama_dir,
                                                                    monkeypatch, ratios, match):
    """From Python, a ratio that keeps no neuron of the width config.json declares, one out of
    [0, 1), NaN, a bool or a string is refused before the dense model loads (they had been
    refused after the load, or run: True as ratio 1.0, '0.5' as 0.5; a string of ratios had
    ended in 'could not convert string to float')."""
    import prunenet.compare as compare_module

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the ratios were checked")

    monkeypatch.setattr(compare_module, "load_model_and_tokenizer", no_load)
    with pytest.raises(InputError, match=match):
        compare(str(tiny_llama_dir), ratios, "random", tmp_path / "out", ppl="none", tasks=[])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keywords, match", [
    ({"episodes": 3}, r"^episodes has no effect here: no method compared trains a PruneNet "
                      r"policy; drop it$"),
    ({"episodes": 3, "train_ratio": 0.3}, r"^episodes, train_ratio have no effect here: no "
                                          r"method compared trains a PruneNet policy; drop them$"),
])
def test_training_settings_without_prunenet_are_refused_from_python(
        tmp_path, tiny_llama_dir, monkeypatch, keywords, match):
    """As the command line refuses --episodes and --train-ratio without prunenet in --methods,
    and compress refuses training settings where no policy trains: not ignored (a comparison
    of random and magnitude had run without a word, its results naming no training)."""
    import prunenet.compare as compare_module

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(compare_module, "load_model_and_tokenizer", no_load)
    with pytest.raises(InputError, match=match):
        compare(str(tiny_llama_dir), [0.5], "random,magnitude", tmp_path / "out", ppl="none",
                tasks=[], **keywords)
    assert not (tmp_path / "out").exists()


def test_the_page_names_the_seed_and_the_probe_the_runs_read(tiny_llama_dir, tmp_path, capsys):
    """report.md names the seed every run read, what it drew and the probe sampled from it, as
    results.json does (pages of two seeds had read alike); where nothing was drawn it names
    none."""
    def page(out, *options):
        assert main(["-q", "compare", str(tiny_llama_dir), "--ratios", "0.25,0.5", "--ppl",
                     "none", "--tasks", "none", "--speed-repeats", "1", "--out", str(out),
                     *options]) == 0, capsys.readouterr().err
        return (out / "report.md").read_text().splitlines()

    refitted = page(tmp_path / "refit", "--methods", "random,magnitude", "--seed", "7")
    results = json.loads((tmp_path / "refit" / "results.json").read_text())
    assert [run["record"]["probe"] for run in results["runs"]] == 4 * [
        {"tokens": 8192, "seed": 7, "shape": [128, 64], "sequence_length": 64,
         "temperature": 1.2, "sampler": "inverse-cdf", "batch_size": 32}]
    assert ("- Refit after every method: `ls` on the model's own probe text, ridge 0.3 (named "
            "`+ls` in the tables).") in refitted
    assert "- Seed: 7, the same for every run (the probe text, random rows)." in refitted
    assert ("- Probe: 128 sequences of 64 tokens of the model's own text, sampled at "
            "temperature 1.2 from seed 7; made once and read by every run.") in refitted
    alone = page(tmp_path / "alone", "--methods", "self-generated,magnitude", "--reconstruct",
                 "none")
    assert "- Seed: 42, the same for every run (the probe text)." in alone
    assert ("- Probe: 128 sequences of 64 tokens of the model's own text, sampled at "
            "temperature 1.2 from seed 42; made once and read by every self-generated run."
            in alone)
    unseeded = page(tmp_path / "unseeded", "--methods", "magnitude", "--reconstruct", "none")
    assert not [line for line in unseeded if line.startswith(("- Seed", "- Probe"))]


def test_values_that_read_the_same_are_ranked_by_name_not_by_digits_the_page_hides():
    """Averages equal but for float rounding (0.42 and 0.4200000000000001, both '0.420': three
    task scores summed in another order) and perplexities that differ past the printed
    digits had been ranked by the digits no one sees; values that read the same now keep one
    order, by name, whichever carries the hidden digits."""
    from prunenet.compare import render_report

    def ranking(magnitude: tuple[float, float], random: tuple[float, float]) -> list[str]:
        results = {
            "model": "m", "prunenet_version": "0", "ratios": [0.5],
            "methods": ["random", "magnitude"],
            "settings": {"corpus": "wiki", "windows": 2, "seqlen": 32, "tasks": ["piqa"],
                         "limit": 2, "reconstruct": "none", "calibration": None},
            "training": None, "dense": _evaluation(20.0, 0.5),
            "runs": [{"method": "random", "ratio": 0.5, "evaluation": _evaluation(*random)},
                     {"method": "magnitude", "ratio": 0.5,
                      "evaluation": _evaluation(*magnitude)}],
        }
        return [line for line in render_report(results, plots=[]).splitlines()
                if line.startswith("- ratio 0.5")]

    low, high = (31.251, 0.42), (31.254, 0.4200000000000001)
    assert ranking(low, high) == ranking(high, low) == [
        "- ratio 0.5, perplexity: magnitude 31.25, random 31.25",
        "- ratio 0.5, average accuracy: magnitude 0.420, random 0.420"]


def test_ratios_that_differ_past_six_digits_read_apart_on_the_page():
    """Ratios 0.1234561 and 0.1234564 had both read 0.123456 (``:g``) in the ratio list, the
    table and the ranking: two rows of one label and one ratio, runs apart. Each ratio is now
    printed in its shortest form that reads back as itself."""
    from prunenet.compare import render_report

    results = {
        "model": "m", "prunenet_version": "0", "ratios": [0.1234561, 0.1234564, 0.5],
        "methods": ["random"],
        "settings": {"corpus": "wiki", "windows": 2, "seqlen": 32, "tasks": [], "limit": None,
                     "reconstruct": "none", "calibration": None},
        "training": None, "dense": _evaluation(20.0, 0.5),
        "runs": [{"method": "random", "ratio": ratio, "evaluation": _evaluation(value, 0.5)}
                 for ratio, value in ((0.1234561, 21.0), (0.1234564, 22.0), (0.5, 30.0))],
    }
    lines = render_report(results, plots=[]).splitlines()
    assert "ratios: 0.1234561, 0.1234564, 0.5 (fraction" in lines[2]
    assert [line.split(" | ")[:4] for line in lines if line.startswith("| random")] == [
        ["| random", "0.1234561", "1.6", "21.00"], ["| random", "0.1234564", "1.6", "22.00"],
        ["| random", "0.5", "1.6", "30.00"]]
    assert [line for line in lines if line.startswith("- ratio") and "perplexity" in line] == [
        "- ratio 0.1234561, perplexity: random 21.00",
        "- ratio 0.1234564, perplexity: random 22.00", "- ratio 0.5, perplexity: random 30.00"]


def test_the_refit_ridge_and_probe_temperature_are_printed_as_recorded():
    """A ridge of 0.30000001 had read 0.3 (``:g``), the default's words for another setting."""
    from prunenet.compare import render_report

    probe = {"tokens": 64, "seed": 1, "shape": [1, 64], "sequence_length": 64,
             "temperature": 1.2000001}
    results = {
        "model": "m", "prunenet_version": "0", "ratios": [0.5], "methods": ["random"],
        "settings": {"corpus": "wiki", "windows": 2, "seqlen": 32, "tasks": [], "limit": None,
                     "reconstruct": "ls", "calibration": None, "seed": 1},
        "training": None, "dense": _evaluation(20.0, 0.5),
        "runs": [{"method": "random", "ratio": 0.5, "evaluation": _evaluation(21.0, 0.5),
                  "record": {"reconstruct": {"mode": "ls", "ridge": 0.30000001},
                             "probe": probe}}],
    }
    lines = render_report(results, plots=[]).splitlines()
    assert ("- Refit after every method: `ls` on the model's own probe text, ridge 0.30000001 "
            "(named `+ls` in the tables).") in lines
    assert ("- Probe: 1 sequence of 64 tokens of the model's own text, sampled at temperature "
            "1.2000001 from seed 1; made once and read by every run.") in lines


def test_sizes_that_differ_read_apart_in_the_table():
    """The parameter column printed millions to one decimal: a dense model of 1,588,384 and a
    run of 1,583,776 parameters both read 1.6. It now prints the fewest decimals at which
    every different size reads differently (one, where that is enough)."""
    from prunenet.compare import results_table

    def evaluation(parameters: int) -> dict:
        return {**_evaluation(20.0, 0.5), "size": {"parameters": parameters}}

    def sizes(dense: int, *runs: int) -> list[str]:
        results = {
            "ratios": [0.25, 0.5][:len(runs)], "methods": ["random"],
            "settings": {"tasks": [], "reconstruct": "none"}, "dense": evaluation(dense),
            "runs": [{"method": "random", "ratio": ratio, "evaluation": evaluation(size)}
                     for ratio, size in zip((0.25, 0.5), runs)],
        }
        return [row.split(" | ")[2] for row in results_table(results).splitlines()[2:]]

    assert sizes(1_588_384, 1_583_776, 1_586_080) == ["1.588", "1.584", "1.586"]
    assert sizes(1_588_384, 1_588_384) == ["1.6", "1.6"]  # the same size reads the same
    assert sizes(134_515_008, 115_876_416) == ["134.5", "115.9"]
    assert sizes(1_000_001, 1_000_000) == ["1.000001", "1.000000"]


def test_user_text_reads_as_written_and_keeps_every_table_row_whole():
    """A model path, corpus and fine-tune data holding markdown and HTML (a cell bar, bold, code,
    a tag) read as written on compare's page: each table row keeps its cells, and no bold,
    link or tag forms, nor code but the page's own span naming the input's row."""
    import markdown_it

    from prunenet.compare import render_report

    markup = "a**b**_c_`d` | e\\*f <script>alert(1) $x$ &amp; [l](u)"
    dense = {**_evaluation(40.0, 0.5), "compression": {
        "method": None, "ratio": None, "reconstruct": None,
        "finetune": {"trained": "LoRA adapters", "data": markup, "steps": 2, "teacher": None}}}
    results = {
        "model": f"/m/{markup}", "prunenet_version": "0", "ratios": [0.5],
        "methods": ["magnitude"],
        "settings": {"corpus": markup, "windows": 2, "seqlen": 32, "tasks": ["piqa"],
                     "limit": 2, "reconstruct": "none",
                     "calibration": {"windows": 1, "seqlen": 32, "corpus": markup}},
        "training": None, "dense": dense,
        "runs": [{"method": "magnitude", "ratio": 0.5, "evaluation": _evaluation(50.0, 0.25)}],
    }
    rendered = markdown_it.MarkdownIt("commonmark").enable("table").render(
        render_report(results, plots=[]))
    rows = re.findall(r"<tr>(.*?)</tr>", rendered, re.DOTALL)
    assert len(rows) == 3 and {len(re.findall(r"<t[hd][ >]", row)) for row in rows} == {8}
    shown = html.escape(markup, quote=False).replace('"', "&quot;")
    assert f"<td>input (not pruned + LoRA fine-tune 2 steps on {shown})</td>" in rendered
    assert f"<h1>prunenet compare: /m/{shown}</h1>" in rendered
    assert f"Perplexity: {shown}, the first 2" in rendered
    assert f"training region of {shown} (never" in rendered
    assert (f"the row <code>input (not pruned + LoRA fine-tune 2 steps on {shown})</code> "
            "stands") in rendered
    assert "<strong>" not in rendered and rendered.count("<code>") == 1
    assert "<script>" not in rendered and "<a " not in rendered and "<em>" not in rendered


def test_a_corpus_path_holding_dollar_signs_is_drawn_as_written(tmp_path, monkeypatch):
    """The perplexity plot names the corpus: a path holding two dollar signs had been read by
    matplotlib as mathematics, which drew another text, or failed at the end of a comparison
    when what lay between them was no formula."""
    from matplotlib.axes import Axes

    from prunenet.compare import write_plots

    corpus = "/data/a$\\nocommand$b_c.txt"
    def evaluation(perplexity: float) -> dict:
        return {**_evaluation(perplexity, 0.5),
                "size": {"parameters": 1_600_000, "ffn_parameters": 600_000}}

    run = {"method": "random", "ratio": 0.5, "evaluation": evaluation(20.0)}
    results = {"methods": ["random"], "ratios": [0.5], "runs": [run], "dense": evaluation(10.0),
               "settings": {"corpus": corpus, "windows": 1, "seqlen": 16, "tasks": [],
                            "reconstruct": "none"}}
    titles = []
    set_title = Axes.set_title
    monkeypatch.setattr(Axes, "set_title", lambda axis, text, *a, **k: (
        titles.append(text), set_title(axis, text, *a, **k))[1])
    written = write_plots(results, tmp_path)
    assert tmp_path / "perplexity.png" in written
    (title,) = [text for text in titles if text.startswith("perplexity on")]
    assert title == "perplexity on /data/a\\$\\nocommand\\$b_c.txt (1 x 16)"
