"""Run records (`compress --record`) and `prunenet report` on tiny models."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file

import prunenet
from conftest import FFN, HIDDEN, LAYERS, make_tiny_model
from prunenet.cli import main
from prunenet.errors import InputError, OutputError
from prunenet.families import kept_count
from prunenet.io.loading import RECORD_NAME, read_record
from prunenet.model_view import FFNView
from prunenet.naming import calibration_sentence, markdown_text
from prunenet.recording import RUN_RECORD_NAME, SPECTRA_NAME, read_run_record
from prunenet.report import DPI, FIGURE_SIZE, write_report
from prunenet.selection.base import Source
from prunenet.selection.magnitude import Magnitude
from prunenet.selection.prunenet.spectral import ks_statistic, singular_values

TRAINING_PLOTS = {"training.png", "layer_ks.png", "spectra.png", "kept_neurons.png"}


@pytest.fixture(scope="module")
def prunenet_run(tmp_path_factory):
    """A PruneNet compress of the tiny LLaMA at 0.25 with --out and --record."""
    folder = tmp_path_factory.mktemp("prunenet-run")
    result = prunenet.compress(make_tiny_model("llama"), 0.25, episodes=3, device="cpu",
                               method="prunenet", progress=False, out=folder / "model",
                               record_dir=folder / "record")
    return result, folder / "record", folder / "model"


@pytest.fixture(scope="module")
def magnitude_run(tmp_path_factory):
    """A magnitude-baseline prune of the tiny LLaMA at 0.5 with a record and no model output."""
    folder = tmp_path_factory.mktemp("magnitude-run")
    result = prunenet.prune(make_tiny_model("llama"), None, 0.5, method="magnitude",
                            progress=False, record_dir=folder / "record")
    return result, folder / "record"


def _recorded(record_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return (json.loads((record_dir / RUN_RECORD_NAME).read_text()),
            load_file(str(record_dir / SPECTRA_NAME)))


def test_record_holds_exactly_the_runs_data(prunenet_run):
    result, record_dir, model_dir = prunenet_run
    assert sorted(p.name for p in record_dir.iterdir()) == [
        ".prunenet-files", RUN_RECORD_NAME, SPECTRA_NAME]
    data, spectra = _recorded(record_dir)
    assert data["format"] == "prunenet-run-record/1"
    assert data["num_layers"] == LAYERS
    # The compression record is the prunenet.json of the saved model, byte for byte in content.
    assert data["compression"] == read_record(model_dir) == json.loads(
        json.dumps(result.record))
    assert data["layers"]["kept_neurons"] == [kept_count(FFN, 0.25)] * LAYERS
    original = FFNView(make_tiny_model("llama"))
    pruned = FFNView(result.model)
    assert set(spectra) == {f"layer.{i}.{kind}" for i in range(LAYERS)
                            for kind in ("original", "pruned")}
    for layer in range(LAYERS):
        saved_original = spectra[f"layer.{layer}.original"]
        saved_pruned = spectra[f"layer.{layer}.pruned"]
        assert saved_original.shape == (HIDDEN,)
        assert saved_pruned.shape == (min(kept_count(FFN, 0.25), HIDDEN),)
        torch.testing.assert_close(saved_original, singular_values(original.first_matrix(layer)),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(saved_pruned, singular_values(pruned.first_matrix(layer)),
                                   rtol=1e-5, atol=1e-5)
        assert data["layers"]["ks_selected"][layer] == ks_statistic(saved_original, saved_pruned)
    training = result.training
    assert data["training"]["best_episode"] == training.best_episode
    assert data["training"]["episodes"] == json.loads(json.dumps(training.history_dicts()))
    assert [e["episode"] for e in data["training"]["episodes"]] == [0, 1, 2]
    assert data["layers"]["ks_first_episode"] == training.history[0].layer_ks
    assert data["training"]["config"]["ratio"] == 0.25


def test_baseline_record_has_no_training_and_matches_its_rows(magnitude_run):
    result, record_dir = magnitude_run
    data, spectra = _recorded(record_dir)
    assert data["training"] is None
    assert data["layers"]["ks_first_episode"] is None
    assert data["compression"]["method"] == "magnitude"
    fresh = make_tiny_model("llama")
    view = FFNView(fresh)
    expected_rows = Magnitude().select(Source(view), kept_count(FFN, 0.5), seed=0)
    assert data["layers"]["kept_neurons"] == [kept_count(FFN, 0.5)] * LAYERS
    for layer, rows in enumerate(expected_rows):
        torch.testing.assert_close(result.kept_rows[layer], rows)
        sliced = view.first_matrix(layer).index_select(0, rows)
        torch.testing.assert_close(spectra[f"layer.{layer}.pruned"], singular_values(sliced),
                                   rtol=1e-5, atol=1e-5)
        assert spectra[f"layer.{layer}.pruned"].shape == (kept_count(FFN, 0.5),)


def test_record_path_is_checked_before_any_work(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="must be separate"):
        prunenet.compress(make_tiny_model("llama"), 0.25, progress=False, out=out,
                          record_dir=out / "record")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match="not written by prunenet"):
        prunenet.prune(make_tiny_model("llama"), None, 0.5, method="random", progress=False,
                       record_dir=taken)
    assert not out.exists()
    assert (taken / "keep.txt").read_text() == "x"


def _check_png(path: Path) -> None:
    image = Image.open(path)
    assert image.size == (int(FIGURE_SIZE[0] * DPI), int(FIGURE_SIZE[1] * DPI))
    colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 10  # lines, text and axes: far more than a blank canvas


def test_report_writes_plots_and_pages(prunenet_run):
    _, record_dir, _ = prunenet_run
    folder = write_report(record_dir)
    assert folder == record_dir / "report"
    assert {p.name for p in folder.iterdir()} == TRAINING_PLOTS | {
        "report.md", "report.html", ".prunenet-files"}
    for name in TRAINING_PLOTS:
        _check_png(folder / name)
    markdown = (folder / "report.md").read_text()
    assert set(re.findall(r"\]\(([\w.]+\.png)\)", markdown)) == TRAINING_PLOTS
    data, _, _ = read_run_record(record_dir)
    for layer in range(LAYERS):
        assert f"| {layer} | {kept_count(FFN, 0.25)} | " in markdown
        assert f"{data['layers']['ks_selected'][layer]:.4f} |" in markdown
    page = (folder / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert sorted(base64.b64decode(image) for image in embedded) == sorted(
        (folder / name).read_bytes() for name in TRAINING_PLOTS)
    # A second report replaces the first one (it is a previous report, not user data).
    assert write_report(record_dir, layers=[1]) == folder


def test_the_training_line_names_every_setting_the_policy_trained_with(prunenet_run, tmp_path):
    """Policies trained with another gamma, KL term, baseline or spectral path had drawn the
    same summary (it named the learning rate and reward alone): the page names every setting
    of the training record."""
    _, record_dir, _ = prunenet_run

    def training_line(record: Path, out: Path) -> str:
        markdown = (write_report(record, out, layers=[0]) / "report.md").read_text()
        return next(line for line in markdown.splitlines()
                    if line.startswith("- Policy training: "))

    line = training_line(record_dir, tmp_path / "default")
    assert line.startswith("- Policy training: 3 episodes (baseline none, clip_norm 1, gamma "
                           "0.99, kld False, lr 0.001, precision auto, ratio 0.25, reward "
                           "inverse, reward_to_go False, seed 42, spectral gram); mean KS ")

    def other_settings(data):
        data["training"]["config"].update(gamma=0.5, kld=True, baseline="mean",
                                          spectral="svd")

    record = _edited_record(record_dir, tmp_path / "record", other_settings)
    assert training_line(record, tmp_path / "other").startswith(
        "- Policy training: 3 episodes (baseline mean, clip_norm 1, gamma 0.5, kld True, lr "
        "0.001, precision auto, ratio 0.25, reward inverse, reward_to_go False, seed 42, "
        "spectral svd); mean KS ")
    record = _edited_record(record_dir, tmp_path / "listed", lambda data: data["training"][
        "config"].update(gamma=[0.5]))
    with pytest.raises(InputError, match=r"training.config.gamma must be a str, a bool or a "
                       r"finite number, got \[0.5\]; the record is damaged"):
        write_report(record, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_report_of_a_baseline_has_no_training_plot(magnitude_run, tmp_path):
    _, record_dir = magnitude_run
    folder = write_report(record_dir, tmp_path / "pages", layers=[0])
    names = {p.name for p in folder.iterdir()} - {".prunenet-files"}
    assert names == TRAINING_PLOTS - {"training.png"} | {"report.md", "report.html"}
    for name in names - {"report.md", "report.html"}:
        _check_png(folder / name)
    markdown = (folder / "report.md").read_text()
    assert "No policy training: magnitude" in markdown
    assert "untrained" not in markdown + (folder / "report.html").read_text()  # no such policy
    assert "*Per-layer KS statistic of the selection (magnitude).*" in markdown
    assert "| layer | kept neurons | KS final selection |" in markdown


def test_not_a_record_says_what_is_missing(tmp_path, prunenet_run):
    _, record_dir, model_dir = prunenet_run
    with pytest.raises(InputError, match="does not exist"):
        write_report(tmp_path / "nowhere")
    with pytest.raises(InputError, match=f"no {RUN_RECORD_NAME}.*compressed model"):
        write_report(model_dir)
    assert (model_dir / RECORD_NAME).exists() and not (model_dir / "report").exists()
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / RUN_RECORD_NAME).write_text((record_dir / RUN_RECORD_NAME).read_text())
    with pytest.raises(InputError, match=f"no {SPECTRA_NAME}"):
        write_report(partial)
    (partial / RUN_RECORD_NAME).write_text('{"format": "something-else"}')
    with pytest.raises(InputError, match="format tag"):
        write_report(partial)
    with pytest.raises(InputError, match=r"layers 0\.\.1"):
        write_report(record_dir, tmp_path / "out", layers=[0, 5])


def test_report_output_must_be_writable_and_not_user_data(prunenet_run, tmp_path):
    _, record_dir, _ = prunenet_run
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot create"):
        write_report(record_dir, blocker / "report")
    user_data = tmp_path / "mine"
    user_data.mkdir()
    (user_data / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="prunenet replaces only its own outputs"):
        write_report(record_dir, user_data)
    assert [p.name for p in user_data.iterdir()] == ["notes.txt"]


def test_cli_compress_record_then_report(tiny_llama_dir, tmp_path, capsys):
    record = tmp_path / "record"
    assert main(["-q", "compress", str(tiny_llama_dir), "--ratio", "0.5", "--episodes", "2",
                 "--method", "prunenet", "--device", "cpu", "--out", str(tmp_path / "model"),
                 "--record", str(record)]) == 0
    data, _, _ = read_run_record(record)
    assert data["compression"]["source"] == str(tiny_llama_dir)
    assert len(data["training"]["episodes"]) == 2
    assert main(["-q", "report", str(record), "--layers", "1"]) == 0
    assert (record / "report" / "report.html").is_file()
    assert main(["-q", "report", str(tmp_path / "model")]) == 2
    assert "not a prunenet run record" in capsys.readouterr().err
    assert main(["-q", "report", ""]) == 2  # not the current folder
    assert capsys.readouterr().err.startswith("prunenet: error: the run record path is empty;")


def test_a_report_names_the_saved_policy_a_run_applied(tiny_llama_dir, tmp_path):
    """prune --policy trains nothing in the run but does not select neurons directly either:
    the report says a saved policy was applied, and which (its checksum)."""
    policy = tmp_path / "policy.safetensors"
    assert main(["-q", "train-policy", str(tiny_llama_dir), "--ratio", "0.5", "--episodes", "1",
                 "--out", str(policy)]) == 0
    record = tmp_path / "record"
    assert main(["-q", "prune", str(tiny_llama_dir), "--policy", str(policy), "--ratio", "0.3",
                 "--out", str(tmp_path / "model"), "--record", str(record)]) == 0
    checksum = read_record(tmp_path / "model")["policy_sha256"]
    assert re.fullmatch("[0-9a-f]{64}", checksum)
    assert main(["-q", "report", str(record)]) == 0
    page = (record / "report" / "report.md").read_text()
    assert (f"- No policy training in this run: prunenet applied a saved policy (sha256 "
            f"{checksum}).") in page
    assert "selects neurons directly" not in page


def test_a_source_with_a_newline_stays_on_its_summary_line(magnitude_run, tmp_path):
    """A model folder whose name holds a newline is written with escapes: the summary keeps one
    bullet per line, and the page shows the name as Python spells it."""
    _, record_dir = magnitude_run
    copy = shutil.copytree(record_dir, tmp_path / "record")
    data = json.loads((copy / RUN_RECORD_NAME).read_text())
    data["compression"]["source"] = "models/tiny\nllama"
    (copy / RUN_RECORD_NAME).write_text(json.dumps(data))
    markdown = (write_report(copy, tmp_path / "pages", layers=[0]) / "report.md").read_text()
    summary = markdown.split("\n\n")[1].splitlines()
    assert len(summary) == 6 and all(line.startswith("- ") for line in summary)
    assert summary[0].startswith("- Model: 'models/tiny\\nllama'; method **magnitude+ls**")


def test_the_report_names_the_refit_and_the_rounding(magnitude_run, tmp_path):
    """The title and summary name the method with its refit (magnitude+ls, as compare does),
    the ridge, and a kept count rounded to a multiple; a run without a refit says so."""
    _, record_dir = magnitude_run
    markdown = (write_report(record_dir, tmp_path / "ls", layers=[0]) / "report.md").read_text()
    summary = markdown.split("\n\n")[1].splitlines()
    assert markdown.startswith("# prunenet run report: magnitude+ls at ratio 0.5\n")
    assert "; method **magnitude+ls**, ratio 0.5, seed 42," in summary[0]
    assert summary[1] == "- Refit: `ls` on the model's own probe text (ridge 0.3)."
    copy = shutil.copytree(record_dir, tmp_path / "record")
    data = json.loads((copy / RUN_RECORD_NAME).read_text())
    data["compression"].update(reconstruct={"mode": "none"}, round_to=8)
    (copy / RUN_RECORD_NAME).write_text(json.dumps(data))
    page = write_report(copy, tmp_path / "none", layers=[0])
    markdown = (page / "report.md").read_text()
    summary = markdown.split("\n\n")[1].splitlines()
    assert markdown.startswith("# prunenet run report: magnitude at ratio 0.5, kept rounded to a "
                               "multiple of 8\n")
    assert ("; method **magnitude**, ratio 0.5 (kept neurons rounded to a multiple of 8), seed "
            "42,") in summary[0]
    assert summary[1] == "- Refit: none (the selection alone)."
    assert "<li>Refit: none (the selection alone).</li>" in (page / "report.html").read_text()


def test_the_report_names_the_probe_the_run_read(magnitude_run, tmp_path):
    """The probe text a run's refit (or self-generated) read is named with its settings, as
    compare's page names it: two runs apart only by their probe's temperature, prompt or
    sampler had drawn the same summary."""
    _, record_dir = magnitude_run
    page = write_report(record_dir, tmp_path / "default", layers=[0])
    summary = (page / "report.md").read_text().split("\n\n")[1].splitlines()
    assert summary[2] == ("- Probe: 128 sequences of 64 tokens of the model's own text, sampled "
                          "at temperature 1.2 from seed 42.")
    assert f"<li>{html.escape(summary[2][2:])}</li>" in (page / "report.html").read_text()

    def other_probe(data):
        data["compression"]["probe"].update(shape=[1, 64], temperature=0.7,
                                            sampler="multinomial", prompt="Once\nupon")

    record = _edited_record(record_dir, tmp_path / "record", other_probe)
    summary = (write_report(record, layers=[0]) / "report.md").read_text().split(
        "\n\n")[1].splitlines()
    assert summary[2] == ("- Probe: 1 sequence of 64 tokens of the model's own text after the "
                          "prompt 'Once\\nupon', sampled at temperature 0.7 from seed 42 (the "
                          "multinomial sampler).")
    # A record of a version before the probe's shape was recorded names the tokens asked for.
    record = _edited_record(record_dir, tmp_path / "older",
                            lambda data: data["compression"]["probe"].pop("shape"))
    summary = (write_report(record, layers=[0]) / "report.md").read_text().split(
        "\n\n")[1].splitlines()
    assert summary[2] == ("- Probe: 8192 tokens of the model's own text, sampled at temperature "
                          "1.2 from seed 42.")


def test_the_report_of_an_activation_run_names_its_calibration_text(
        tiny_llama_real_tokenizer_dir, tmp_path, capsys):
    """activation scores neurons on calibration text: the page names the windows it read and
    their corpus, as compare's page does, where it had said only that no policy trained."""
    text = tmp_path / "calibration.txt"
    text.write_text("The old mill stands by the river, and the water runs fast. " * 300)
    record = tmp_path / "record"
    assert main(["-q", "compress", str(tiny_llama_real_tokenizer_dir), "--ratio", "0.25",
                 "--method", "activation", "--reconstruct", "none", "--calibration-corpus",
                 str(text), "--calibration-windows", "1", "--out", str(tmp_path / "model"),
                 "--record", str(record)]) == 0, capsys.readouterr().err
    page = write_report(record)
    line = (f"- Calibration: 1 window of 1024 tokens from the training region of {text} "
            "(never its evaluation windows).")
    summary = (page / "report.md").read_text().split("\n\n")[1].splitlines()
    assert summary[2] == line
    assert f"<li>{line[2:]}</li>" in (page / "report.html").read_text()


def test_the_calibration_sentence_counts_its_windows_and_keeps_a_path_on_one_line():
    """compare's and report's pages name activation's calibration text in one sentence: a
    window is counted in the singular, and a corpus path holding a newline is written escaped,
    so it cannot split the page's list."""
    one = calibration_sentence({"windows": 1, "seqlen": 32, "corpus": "wiki"})
    assert one == ("Calibration: 1 window of 32 tokens from the training region of wiki "
                   "(never its evaluation windows).")
    many = calibration_sentence({"windows": 4, "seqlen": 1024, "corpus": "/data/a\nb.txt"})
    assert many == ("Calibration: 4 windows of 1024 tokens from the training region of "
                    "'/data/a\\nb.txt' (never its evaluation windows).")
    assert "\n" not in many


def _edited_record(record_dir: Path, folder: Path, edit) -> Path:
    """A copy of the run record ``record_dir`` in ``folder`` with ``edit`` applied to its
    record.json content."""
    copy = shutil.copytree(record_dir, folder, ignore=shutil.ignore_patterns("report"))
    data = json.loads((copy / RUN_RECORD_NAME).read_text())
    edit(data)
    (copy / RUN_RECORD_NAME).write_text(json.dumps(data))
    return copy


def _refused_in_one_line(capsys, record: Path, match: str) -> None:
    assert main(["-q", "report", str(record)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prunenet: error: ") and err.count("\n") == 1, err
    assert re.search(match, err), err
    assert not (record / "report").exists()


@pytest.mark.parametrize("field, value, match", [
    ("source", 5, "compression.source must name the model it was made from, got 5"),
    ("seed", "42", r"compression.seed must be an int or null \(the run drew nothing\), got "
     "'42'"),
    ("seed", None, r"compression.seed is null, but the run read one \(it sampled a probe or "
     r"drew rows at random\)"),
    ("round_to", "32", "compression.round_to must be a positive integer, got '32'"),
    ("round_to", 0, "compression.round_to must be a positive integer, got 0"),
    ("selection", 3, "compression.selection must be a str or null, got 3"),
    ("selection", "greedy", "compression.selection must be one of sample, topk or null, got "
     "'greedy'"),
    ("policy_sha256", 7, "compression.policy_sha256 must be a str or null"),
    ("reconstruct", {"mode": "ls", "ridge": float("nan")},
     "compression.reconstruct.ridge must be a finite number >= 0, got nan"),
    ("reconstruct", [1], "compression.reconstruct must be an object"),
    ("reconstruct", "sgd", "compression.reconstruct must be an object, got 'sgd'"),
    ("reconstruct", {"mode": "sgd"}, "compression.reconstruct.mode must be one of ls, bias, "
     "none, got 'sgd'"),
    ("calibration", {"corpus": "wiki"}, "compression.calibration must hold its corpus, "
     "windows and seqlen"),
    ("finetune", [], "compression.finetune must be an object or null"),
    ("probe", {"seed": 1, "shape": [2, 8], "sequence_length": 8, "temperature": "hot"},
     r"compression.probe must hold its seed, temperature and shape \(or tokens\)"),
    ("probe", {"seed": 1, "shape": [2, 8], "sequence_length": 8, "temperature": 1.0,
               "prompt": 3}, "compression.probe.prompt must be a str, got 3"),
])
def test_an_edited_field_the_page_prints_is_refused_in_one_line(magnitude_run, tmp_path, capsys,
                                                                 field, value, match):
    """Every field of the compression record the page prints is checked as the numbers are: a
    source that is a number or a rounding given as text had ended in a traceback, a NaN ridge
    or a list as calibration had been printed as they came."""
    _, record_dir = magnitude_run
    record = _edited_record(record_dir, tmp_path / "record",
                            lambda data: data["compression"].__setitem__(field, value))
    _refused_in_one_line(capsys, record, match)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.__setitem__("parameter_reduction", 0.5),
     r"compression.parameter_reduction \(0.5\) is not 1 - parameters_after / parameters_before"),
    (lambda c: c.__setitem__("ffn_width_after", 20),
     r"layers.kept_neurons \(24, 24\) must each be compression.ffn_width_after \(20\)"),
    (lambda c: c.__setitem__("ratio", 0.1),
     r"compression.ratio 0.1 of ffn_width_before 48 keeps 43 neurons, not ffn_width_after "
     r"\(24\)"),
])
def test_sizes_that_contradict_each_other_are_refused(magnitude_run, tmp_path, capsys, edit,
                                                      match):
    """The summary prints the FFN width after, the parameter counts and their reduction beside
    the per-layer kept counts: an edit that makes one contradict the others (a 50% reduction of
    23,712 -> 19,104 parameters, a width of 20 over rows that keep 24) is refused, not printed."""
    _, record_dir = magnitude_run
    record = _edited_record(record_dir, tmp_path / "record",
                            lambda data: edit(data["compression"]))
    _refused_in_one_line(capsys, record, match)


def test_the_summary_names_the_seed_only_where_the_run_read_it(magnitude_run, tmp_path):
    """magnitude with a refit read the seed (its probe was sampled from it); without the refit
    it drew nothing at random, and the summary names no seed, as the model card's command
    does not."""
    _, record_dir = magnitude_run
    page = write_report(record_dir, tmp_path / "refit", layers=[0]) / "report.md"
    assert ", ratio 0.5, seed 42, prunenet " in page.read_text()

    def no_probe(data):
        data["compression"].pop("probe")
        data["compression"]["reconstruct"] = {"mode": "none"}

    record = _edited_record(record_dir, tmp_path / "record", no_probe)
    pages = write_report(record, layers=[0])
    summary = (pages / "report.md").read_text().split("\n\n")[1].splitlines()
    assert "; method **magnitude**, ratio 0.5, prunenet " in summary[0]
    assert "seed" not in (pages / "report.md").read_text() + (pages / "report.html").read_text()


def test_a_record_of_another_version_is_named_so(magnitude_run, tmp_path, capsys):
    """A run record of another format version is a prunenet run record all the same: the error
    names its version and the one this prunenet reads, where it had said the folder was not a
    run record at all and to make one."""
    _, record_dir = magnitude_run
    record = _edited_record(record_dir, tmp_path / "record",
                            lambda data: data.__setitem__("format", "prunenet-run-record/2"))
    _refused_in_one_line(capsys, record, r"record.json is a run record of another prunenet "
                         r"version \(format 'prunenet-run-record/2'\); prunenet .* reads "
                         r"'prunenet-run-record/1'")
    other = _edited_record(record_dir, tmp_path / "other",
                           lambda data: data.__setitem__("format", "something-else"))
    _refused_in_one_line(capsys, other, "is not a prunenet run record")


def test_the_overwrite_help_says_what_it_changes():
    """report --overwrite is what lets a report replace another run record's report
    (test_data_safety.py::test_report_of_one_record_never_replaces_anothers_report_unasked);
    its help had said it was accepted for symmetry, a previous report being replaced anyway."""
    from prunenet.cli import build_parser

    parser = build_parser().commands["report"]
    helps = {action.dest: action.help for action in parser._actions}
    assert "replaced anyway" not in helps["overwrite"]
    assert helps["overwrite"].startswith("replace the report of another run record in --out")
    assert "inside another run record only with --overwrite" in helps["out"]


def _drawn_figures(monkeypatch) -> dict:
    """The figures write_report saves, by file name, kept for inspection."""
    from matplotlib.figure import Figure

    figures, save = {}, Figure.savefig

    def keep(figure, path, *args, **kwargs):
        figures[Path(path).name] = figure
        return save(figure, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


@pytest.mark.parametrize("layers, episodes", [(1, 1), (LAYERS, 3)])
def test_episode_and_layer_axes_are_ticked_at_whole_numbers(tmp_path, monkeypatch, layers,
                                                            episodes):
    """Episodes and layers are whole numbers: a run of one episode had its episode axis ticked
    -0.045, -0.030, ... (overlapping), and a model of one or two layers its layer axes -0.4 or
    0.2, 0.4, ... as if there were layers between them."""
    record = tmp_path / "record"
    prunenet.compress(make_tiny_model("llama", num_hidden_layers=layers), 0.5,
                      episodes=episodes, device="cpu", method="prunenet", progress=False,
                      record_dir=record)
    figures = _drawn_figures(monkeypatch)
    write_report(record)
    axes = {"training.png": "episode", "layer_ks.png": "layer", "kept_neurons.png": "layer"}
    drawn = {"episode": list(range(episodes)), "layer": list(range(layers))}
    for name, quantity in axes.items():
        for axis in figures[name].axes:
            assert axis.get_xlabel() == quantity
            low, high = axis.get_xlim()
            ticks = [tick for tick in axis.get_xticks() if low <= tick <= high]
            assert ticks and all(float(tick).is_integer() for tick in ticks), (name, ticks)
            if len(drawn[quantity]) == 1:  # the one episode or layer, ticked alone
                assert ticks == drawn[quantity], (name, ticks)


def test_the_plots_print_each_ks_statistic_as_the_table_does(prunenet_run, tmp_path,
                                                             monkeypatch):
    """The singular-value plots had titled a layer's KS statistic with three decimals where the
    table prints four (0.1875 read 0.188 above the curves and 0.1875 below them); every KS
    drawn now reads as the table's cell does."""
    _, record_dir, _ = prunenet_run
    figures = _drawn_figures(monkeypatch)
    markdown = (write_report(record_dir, tmp_path / "pages", layers=[0, 1]) /
                "report.md").read_text()
    cells = [row.strip("| ").split(" | ")[-1] for row in markdown.splitlines()[-LAYERS:]]
    titles = [axis.get_title() for axis in figures["spectra.png"].axes]
    assert titles == [f"layer {layer}: KS {cells[layer]}" for layer in range(LAYERS)]


# A name holding markdown and HTML: bold, emphasis, code, a table's cell bar, an escaped star,
# a tag, math, an entity and a link.
MARKUP = "a**b**_c_`d` | e\\*f <script>alert(1) $x$ &amp; [l](u)"


def test_user_text_reads_as_written_on_both_pages(magnitude_run, tmp_path):
    """A source path and a probe prompt holding markdown and HTML read as written on report.md
    (as a CommonMark renderer shows it) and report.html: in the summary no bold, code, link,
    emphasis or tag forms but the page's own (the method in bold, the refit as code)."""
    import markdown_it
    _, record_dir = magnitude_run

    def markup(data):
        data["compression"]["source"] = f"runs/{MARKUP}"
        data["compression"]["probe"]["prompt"] = MARKUP

    page = write_report(_edited_record(record_dir, tmp_path / "record", markup),
                        tmp_path / "pages", layers=[0])
    rendered = markdown_it.MarkdownIt("commonmark").render((page / "report.md").read_text())
    written = (page / "report.html").read_text()
    for page_text, bold, code in ((rendered, "<strong>", 1), (written, "<b>", 0)):
        summary = page_text[page_text.index("<ul>"):page_text.index("</ul>")]
        shown = summary.replace("&quot;", '"').replace("&#x27;", "'")
        assert f"Model: {html.escape(f'runs/{MARKUP}', quote=False)}; method" in shown
        assert f"after the prompt {html.escape(repr(MARKUP), quote=False)}, sampled" in shown
        assert shown.count(bold) == 1 and shown.count("<code>") == code  # the refit's `ls`
        assert "<script>" not in shown and "<a " not in shown and "<em>" not in shown


@given(st.text(alphabet="ab1_*`|<>&;[]()\\!#$~/. -", max_size=24))
def test_markdown_text_renders_as_the_text_it_escapes(text):
    """Whatever markdown or HTML a name holds, markdown_text's form renders (CommonMark, inline)
    as the name itself: no emphasis, code, link, tag or entity forms."""
    import markdown_it
    rendered = markdown_it.MarkdownIt("commonmark").renderInline(markdown_text(text))
    assert html.unescape(rendered) == text and "<" not in rendered
