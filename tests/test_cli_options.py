"""Command-line options: what the user gave is told from defaults, options a run would not use
are refused before any work, and defaults fit the model where a given value is refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import transformers

from conftest import edit_config, make_tiny_model
from prunenet.cli import build_parser, given_options, main
from prunenet.errors import InputError
from prunenet.evaluation.speed import SpeedProtocol, fitted_protocol
from prunenet.finetune import DEFAULT_SEQLEN, SELF_GENERATED, default_seqlen
from prunenet.io.loading import read_record
from prunenet.selection.prunenet.reinforce import TrainingConfig, train_policy_on_matrices


def refused(capsys, argv: list[str], match: str) -> str:
    """Run the CLI; assert exit 2 with one error line holding ``match``; return it."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prunenet: error: "), err
    assert match in err[0], err[0]
    return err[0]


@pytest.fixture
def llama(tmp_path) -> Path:
    folder = tmp_path / "llama"
    make_tiny_model("llama").save_pretrained(folder)
    return folder


def test_given_options_are_told_from_defaults():
    """An option given at its default value, in --name=value form or abbreviated counts as
    given; one left out does not, whatever its default."""
    argv = ["-q", "compress", "m", "--ratio", "0.3", "--out", "o", "--ridge=0.3",
            "--probe-tok", "64", "--method", "random"]
    args = build_parser().parse_args(argv)
    assert given_options(argv, args) == {"model", "ratio", "out", "ridge", "probe_tokens",
                                         "method"}
    argv = ["eval", "m", "--speed"]
    assert given_options(argv, build_parser().parse_args(argv)) == {"model", "speed"}


COMPRESS_UNUSED = [
    (["--method", "random", "--reconstruct", "none", "--ridge=0.3"],
     "--ridge has no effect here: the ridge regularizes --reconstruct ls, and this run refits "
     "with none; drop it"),
    (["--method", "prunenet", "--episodes", "1", "--reconstruct", "none", "--ridge", "0.5"],
     "--ridge has no effect here"),
    (["--method", "magnitude", "--reconstruct", "none", "--probe-tokens", "64",
      "--probe-prompt", "The"],
     "--probe-tokens, --probe-prompt have no effect here: method 'magnitude' with --reconstruct "
     "none generates no probe text; drop them"),
    (["--episodes", "3", "--lr", "0.1"],
     "--episodes, --lr have no effect here: method 'self-generated' trains no PruneNet policy"),
    (["--method", "random", "--resume"], "--resume has no effect here"),
    (["--method", "random", "--spectral-precision", "float64"],
     "--spectral-precision has no effect here"),
    (["--method", "magnitude", "--selection", "topk"],
     "--selection has no effect here: only a PruneNet policy's rows are drawn"),
    (["--calibration-windows", "2"],
     "calibration text feeds --method activation only, and the method is 'self-generated'"),
    (["--method", "random", "--gguf-down-type", "Q8_0"], "no model.gguf is written"),
    (["--method", "random", "--format", "safetensors", "--gguf-down-type", "Q8_0"],
     "no model.gguf is written"),
    (["--method", "random", "--finetune-data", "wiki"],
     "--finetune-data has no effect here: only --finetune-steps reads a corpus"),
    (["--method", "random", "--finetune-seqlen", "64", "--finetune-precision", "float32"],
     "--finetune-seqlen, --finetune-precision have no effect here"),
]


@pytest.mark.parametrize("options, match", COMPRESS_UNUSED)
def test_compress_options_a_run_would_not_use_are_refused_before_any_work(
        llama, tmp_path, capsys, options, match):
    out = tmp_path / "out"
    refused(capsys, ["-q", "compress", str(llama), "--ratio", "0.3", "--out", str(out),
                     *options], match)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["llama"]


@pytest.mark.parametrize("command, options, match", [
    ("prune", ["--method", "random", "--reconstruct", "none", "--probe-length", "16"],
     "--probe-length has no effect here"),
    ("prune", ["--method", "magnitude", "--calibration-corpus", "wiki"],
     "--calibration-corpus has no effect here"),
    ("eval", ["--ppl", "none", "--windows", "3"],
     "--windows has no effect here: no perplexity window is read with --ppl none"),
    ("eval", ["--ppl", "None", "--windows", "3"],  # none in any case, as --tasks reads it
     "--windows has no effect here: no perplexity window is read with --ppl none"),
    ("compare", ["--methods", "random", "--tasks", "", "--ppl", "NONE", "--seqlen", "16"],
     "--seqlen has no effect here: no perplexity window is read with --ppl none"),
    ("eval", ["--ppl", "none", "--speed-new-tokens", "4", "--speed-repeats", "2"],
     "--speed-new-tokens, --speed-repeats have no effect here: speed is measured with --speed "
     "only"),
    ("eval", ["--ppl", "none", "--limit", "5"], "--limit has no effect here"),
    ("eval", ["--ppl", "none", "--windows", "2", "--limit", "3"],
     "--windows has no effect here: no perplexity window is read with --ppl none; drop it; "
     "--limit has no effect here: no zero-shot task runs (--tasks); drop it"),
    ("compare", ["--methods", "random,magnitude", "--episodes", "2"],
     "--episodes has no effect here: no method compared trains a PruneNet policy"),
    ("compare", ["--methods", "prunenet", "--variant", "self-generated", "--train-ratio", "0.5"],
     "--train-ratio has no effect here: no method compared trains a PruneNet policy"),
    ("compare", ["--methods", "random,self-generated", "--variant", "reference"],
     "--variant has no effect here: it renames prunenet in --methods, which does not list it"),
    ("compare", ["--methods", "random", "--calibration-windows", "2"],
     "--calibration-windows has no effect here: no method compared reads calibration text"),
    ("compare", ["--methods", "random", "--tasks", "", "--limit", "2"],
     "--limit has no effect here"),
    ("compare", ["--methods", "random", "--tasks", "", "--ppl", "none", "--seqlen", "16"],
     "--seqlen has no effect here: no perplexity window is read with --ppl none"),
    ("train-policy", ["--spectral", "svd", "--spectral-precision", "float64"],
     "--spectral-precision has no effect here: it sets the Gram path's float type, and "
     "--spectral svd takes singular values directly"),
    ("compress", ["--method", "prunenet", "--spectral", "svd", "--spectral-precision", "auto"],
     "--spectral-precision has no effect here"),
    ("finetune", ["--data", "wiki", "--generated-windows", "4"],
     "--generated-windows sets how much text the teacher writes for --data self-generated; a "
     "run on a corpus (wiki) generates none: drop it"),
])
def test_options_of_other_commands_a_run_would_not_use_are_refused(
        llama, tmp_path, capsys, command, options, match):
    out = ["--out", str(tmp_path / "out")] if command != "eval" else []
    ratio = {"compare": ["--ratios", "0.3"], "eval": [], "finetune": []}.get(command,
                                                                             ["--ratio", "0.3"])
    refused(capsys, ["-q", command, str(llama), *ratio, *out, *options], match)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["llama"]


@pytest.mark.parametrize("command, options, match", [
    ("compress", ["--variant", "reference", "--method", "random", "--episodes", "3"],
     "--variant reference means --method prunenet, which conflicts with --method random"),
    ("prune", ["--policy", "", "--selection", "topk"], "--policy is empty"),
])
def test_a_conflict_is_named_before_the_options_it_leaves_unused(llama, tmp_path, capsys,
                                                                command, options, match):
    """Unused options are judged for the run as planned: a conflict that stops the plan is
    the error, not an option the conflicting reading would leave unused."""
    refused(capsys, ["-q", command, str(llama), "--ratio", "0.3", "--out", str(tmp_path / "o"),
                     *options], match)


def test_a_memory_budget_for_a_model_loaded_whole_is_refused(tmp_path, capsys):
    """eval and train-policy load a GGUF whole: --max-memory would bound nothing."""
    from prunenet.assets import asset_path
    from prunenet.errors import MissingAssetError

    try:
        source = asset_path("tinycoder-gguf") / "tiny.gguf"
    except MissingAssetError as error:
        pytest.skip(str(error))
    refused(capsys, ["-q", "eval", str(source), "--ppl", "none", "--max-memory", "1GB"],
            f"--max-memory has no effect here: it bounds local safetensors folders only, and "
            f"{source} is loaded whole; drop it; to read a GGUF from disk, convert it first")
    refused(capsys, ["-q", "train-policy", str(source), "--ratio", "0.3", "--out",
                     str(tmp_path / "p.safetensors"), "--max-memory", "1GB"],
            "--max-memory has no effect here")
    assert not any(tmp_path.iterdir())


def test_eval_window_length_without_perplexity_is_accepted(llama, capsys):
    """--seqlen sizes the windows a model read from disk is planned for, even with --ppl none
    (the refusal of a budget too small suggests it), so it is not refused there."""
    assert main(["-q", "eval", str(llama), "--ppl", "none", "--seqlen", "16"]) == 0


def test_an_endless_corpus_is_refused_before_the_model_loads(llama, tmp_path, capsys,
                                                             monkeypatch):
    import os

    import prunenet.evaluation.evaluate as evaluate_module

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(evaluate_module, "opened_model", no_load)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused(capsys, ["-q", "eval", str(llama), "--ppl", str(fifo)], "is not a regular file")


def test_options_that_apply_take_effect(llama, tmp_path):
    """The same options the refusals name run where they apply, and the record shows them."""
    out = tmp_path / "out"
    assert main(["-q", "compress", str(llama), "--ratio", "0.3", "--out", str(out), "--method",
                 "prunenet", "--episodes", "1", "--selection", "topk", "--ridge", "0.5",
                 "--probe-tokens", "64", "--probe-length", "16"]) == 0
    record = read_record(out)
    assert record["method"] == "prunenet" and record["selection"] == "topk"
    assert record["reconstruct"]["ridge"] == 0.5
    assert record["probe"]["tokens"] == 64 and record["probe"]["sequence_length"] == 16


def test_resume_without_a_saved_state_is_refused(llama, tmp_path, capsys):
    """--resume where no run saved a state: one line before the model loads, nothing written
    (a fresh run silently standing in for a resumed one would hide a wrong path)."""
    refused(capsys, ["-q", "compress", str(llama), "--ratio", "0.3", "--out",
                     str(tmp_path / "o"), "--method", "prunenet", "--episodes", "2", "--resume"],
            f"nothing to resume: no training state was saved at {tmp_path / 'o.train-state.pt'}")
    refused(capsys, ["-q", "train-policy", str(llama), "--ratio", "0.3", "--out",
                     str(tmp_path / "p.safetensors"), "--episodes", "2", "--resume"],
            "nothing to resume")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["llama"]
    matrices = [layer.mlp.gate_proj.weight.detach() for layer in
                make_tiny_model("llama").model.layers]
    with pytest.raises(InputError, match="nothing to resume"):
        train_policy_on_matrices(matrices, TrainingConfig(episodes=1), progress=False,
                                 state_path=tmp_path / "none.pt", resume=True)


def test_speed_lengths_given_are_kept_or_refused_and_defaults_fit_the_context():
    """Only lengths left to their defaults are shortened to the context; a given length that
    does not fit is refused rather than changed."""
    config = transformers.LlamaConfig(max_position_embeddings=32)
    fitted = fitted_protocol(config, SpeedProtocol(), quiet=True)
    assert (fitted.prompt_tokens, fitted.new_tokens) == (24, 8)
    fitted = fitted_protocol(config, SpeedProtocol(prompt_tokens=30), quiet=True)
    assert (fitted.prompt_tokens, fitted.new_tokens) == (30, 2)
    fitted = fitted_protocol(config, SpeedProtocol(new_tokens=20), quiet=True)
    assert (fitted.prompt_tokens, fitted.new_tokens) == (12, 20)
    wide = fitted_protocol(transformers.LlamaConfig(max_position_embeddings=2048),
                           SpeedProtocol(), quiet=True)
    assert (wide.prompt_tokens, wide.new_tokens) == (128, 32)
    refusals = {SpeedProtocol(new_tokens=40): "--speed-new-tokens 40 leaves no room in the "
                "model's context of 32 tokens; give at most 31",
                SpeedProtocol(prompt_tokens=32): "--speed-prompt 32 leaves no room",
                SpeedProtocol(prompt_tokens=20, new_tokens=20): "--speed-prompt 20 + "
                "--speed-new-tokens 20 exceed the model's context of 32 tokens"}
    for given, message in refusals.items():
        with pytest.raises(InputError, match=re.escape(message)):
            fitted_protocol(config, given, quiet=True)


def test_finetune_default_window_fits_a_short_context(tiny_llama_real_tokenizer_dir, tmp_path,
                                                     capsys):
    """finetune's default window (1024 tokens on a corpus) is cut to a shorter context, as
    eval's is; a window the user gives beyond it is still refused."""
    assert default_seqlen("wiki", transformers.LlamaConfig(max_position_embeddings=64)) == 64
    assert default_seqlen(SELF_GENERATED, transformers.LlamaConfig(
        max_position_embeddings=4096)) == DEFAULT_SEQLEN[SELF_GENERATED]
    folder = tmp_path / "short"
    shutil.copytree(tiny_llama_real_tokenizer_dir, folder)
    edit_config(folder, max_position_embeddings=64)
    text = tmp_path / "text.txt"
    text.write_text("the river runs high in spring and low in autumn. " * 200)
    out = tmp_path / "ft"
    assert main(["-q", "finetune", str(folder), "--data", str(text), "--out", str(out),
                 "--steps", "1", "--eval-windows", "1"]) == 0
    assert read_record(out)["finetune"]["settings"]["seqlen"] == 64
    refused(capsys, ["-q", "finetune", str(folder), "--data", str(text), "--out",
                     str(tmp_path / "ft2"), "--seqlen", "128"],
            "--seqlen 128 exceeds the model's context of 64 tokens")


def test_a_probe_prompt_the_run_cannot_use_is_refused_before_the_model_loads(
        llama, tiny_llama_real_tokenizer_dir, tmp_path, capsys, monkeypatch):
    """No tokenizer to read it, or too long for the probe's sequences: refused in the plan,
    before the model (of any size) loads."""
    import prunenet.pipeline

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(prunenet.pipeline, "load_model_and_tokenizer", no_load)
    common = ["--ratio", "0.3", "--out", str(tmp_path / "o")]
    refused(capsys, ["-q", "compress", str(llama), *common, "--probe-prompt", "The"],
            "a probe prompt needs the model's tokenizer, and there is none")
    refused(capsys, ["-q", "compress", str(tiny_llama_real_tokenizer_dir), *common,
                     "--probe-length", "8", "--probe-prompt", "word " * 10],
            "tokens, too many for probe sequences of 8; shorten it or raise --probe-length")
    # a model of 16 positions cuts --probe-length 256 to 16: raising it would not help
    short = tmp_path / "short-context"
    shutil.copytree(tiny_llama_real_tokenizer_dir, short)
    edit_config(short, max_position_embeddings=16)
    refused(capsys, ["-q", "compress", str(short), *common, "--probe-length", "256",
                     "--probe-prompt", "word " * 20],
            "tokens, too many for probe sequences of 16; shorten it: the probe sequences are "
            "cut to the model's context")
    assert not (tmp_path / "o").exists()


def test_a_compression_reads_its_text_once_and_only_after_its_options_are_checked(
        tiny_llama_real_tokenizer_dir, tmp_path, capsys, monkeypatch):
    """--eval and --method activation read the wiki sample with the model's tokenizer in
    planning, to refuse before the load what the run could not read: the run then uses that
    tokenizer and text (one tokenizer load, one tokenization of the corpus both read), and an
    option the run would not use is refused before any of it is read."""
    import prunenet.evaluation.corpora
    import prunenet.io.loading

    reads = {"tokenizer": 0, "corpus": 0}

    def counted(name, function):
        def call(*args, **kwargs):
            reads[name] += 1
            return function(*args, **kwargs)
        return call

    monkeypatch.setattr(prunenet.io.loading, "_tokenizer",
                        counted("tokenizer", prunenet.io.loading._tokenizer))
    monkeypatch.setattr(prunenet.evaluation.corpora, "read_corpus_text",
                        counted("corpus", prunenet.evaluation.corpora.read_corpus_text))
    out = tmp_path / "o"
    command = ["-q", "compress", str(tiny_llama_real_tokenizer_dir), "--ratio", "0.25",
               "--method", "activation", "--calibration-windows", "1", "--reconstruct", "none",
               "--eval", "1", "--out", str(out)]
    refused(capsys, [*command, "--probe-temperature", "1.5"],
            "--probe-temperature has no effect here: method 'activation' with --reconstruct "
            "none generates no probe text")
    assert reads == {"tokenizer": 0, "corpus": 0} and not out.exists()
    assert main(command) == 0
    assert reads == {"tokenizer": 1, "corpus": 1}
    recorded = read_record(out)["evaluation"]["perplexity"]
    capsys.readouterr()
    assert main(["-q", "eval", str(out), "--windows", "1", "--json", str(tmp_path / "e.json")]) \
        == 0
    measured = json.loads((tmp_path / "e.json").read_text())["perplexity"]
    assert (recorded["value"], recorded["windows"], recorded["seqlen"]) == (
        measured["value"], 1, measured["seqlen"])


def test_an_eval_window_beyond_the_context_is_refused_for_that_before_memory(llama, capsys):
    """A window longer than the model reads is refused as such, not as a memory budget too
    small for it (a budget the user could never meet usefully)."""
    refused(capsys, ["-q", "eval", str(llama), "--seqlen", "100000", "--max-memory", "1MB"],
            "--seqlen 100000 exceeds the model's context of 64 tokens")


def test_finetune_reads_a_model_alias_and_refuses_a_window_beyond_its_context_before_loading(
        tiny_llama_real_tokenizer_dir, tmp_path, capsys, monkeypatch):
    """An alias names its folder in the cache from any working folder (it was taken as a
    path there); a window longer than the model's context is refused before the model loads."""
    import importlib

    from prunenet.assets import CONVERTED_MARKER, MODELS, cache_dir, conversion_marker, model_path

    finetune_module = importlib.import_module("prunenet.finetune")  # not the function
    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path / "cache"))
    folder = cache_dir() / MODELS["smollm2-135m"].folder
    shutil.copytree(tiny_llama_real_tokenizer_dir, folder)
    edit_config(folder, max_position_embeddings=64)
    (folder / CONVERTED_MARKER).write_text(conversion_marker("smollm2-135m"))  # as fetch writes
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    text = tmp_path / "text.txt"
    text.write_text("the river runs high in spring and low in autumn. " * 200)
    load = finetune_module.load_model_and_tokenizer

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(finetune_module, "load_model_and_tokenizer", no_load)
    refused(capsys, ["-q", "finetune", "smollm2-135m", "--data", str(text), "--out", "ft",
                     "--seqlen", "65"], "--seqlen 65 exceeds the model's context of 64 tokens")
    monkeypatch.setattr(finetune_module, "load_model_and_tokenizer", load)
    assert main(["-q", "finetune", "smollm2-135m", "--data", str(text), "--out", "ft",
                 "--steps", "1", "--eval-windows", "1"]) == 0, capsys.readouterr().err
    assert read_record(work / "ft")["source"] == str(model_path("smollm2-135m").resolve())
    assert sorted(path.name for path in work.iterdir()) == ["ft"]


@pytest.mark.parametrize("argv", [
    ["train-policy", "{llama}", "--ratio", "0", "--out", "{tmp}/p.safetensors"],
    ["compress", "{llama}", "--ratio", "0", "--method", "prunenet", "--out", "{tmp}/o"],
    ["compare", "{llama}", "--ratios", "0.2", "--methods", "prunenet,random", "--train-ratio",
     "0", "--ppl", "none", "--tasks", "", "--out", "{tmp}/o"],
])
def test_a_policy_is_not_trained_at_ratio_0(llama, tmp_path, capsys, argv):
    """At ratio 0 every spectrum is kept whatever the policy does: training learns nothing,
    and a policy saved from it would prune at other ratios as if it had. Refused before any
    work; ratio 0 without training stays allowed."""
    refused(capsys, ["-q", *(part.format(llama=llama, tmp=tmp_path) for part in argv)],
            "a PruneNet policy trains at a ratio above 0")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["llama"]
    assert main(["-q", "compress", str(llama), "--ratio", "0", "--method", "random",
                 "--reconstruct", "none", "--out", str(tmp_path / "kept")]) == 0


@pytest.mark.parametrize("argv", [
    ["train-policy", "{llama}", "--ratio", "0.3", "--out", "{tmp}/policy.pt"],
    ["compress", "{llama}", "--ratio", "0.3", "--method", "prunenet", "--out", "{tmp}/o",
     "--policy-out", "{tmp}/policy"],
])
def test_a_policy_file_name_must_say_safetensors(llama, tmp_path, capsys, argv):
    """A policy is a safetensors file; a name like policy.pt promises a pickle."""
    refused(capsys, ["-q", *(part.format(llama=llama, tmp=tmp_path) for part in argv)],
            "a policy is written as safetensors; give a name ending in .safetensors")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["llama"]


def test_a_probe_length_below_two_tokens_is_refused(tiny_llama_dir, tmp_path, capsys):
    """A probe sequence of 1 token has no next token: refused in one line (it was read as 2,
    and the record said sequence_length 2), on the command line and from Python."""
    import prunenet

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["-q", "compress", str(tiny_llama_dir), "--ratio", "0.25", "--probe-length", "1",
              "--out", str(tmp_path / "o")])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "prunenet: error: argument --probe-length: must be at least 2 tokens, got 1 (see "
        "prunenet compress --help)"]
    with pytest.raises(InputError, match="^--probe-length must be at least 2 tokens, got 1$"):
        prunenet.compress(str(tiny_llama_dir), 0.25, probe_length=1, out=tmp_path / "o")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny-llama"]


@pytest.mark.parametrize("keywords, message", [
    ({"probe_tokens": "8192"}, "--probe-tokens must be a positive integer, got '8192'"),
    ({"probe_tokens": 0}, "--probe-tokens must be a positive integer, got 0"),
    ({"probe_tokens": 64.0}, "--probe-tokens must be a positive integer, got 64.0"),
    ({"probe_sampler": "gumbel"}, "unknown probe sampler 'gumbel'; use one of inverse-cdf, "
                                  "multinomial"),
    ({"probe_prompt": ["The", "A"]}, "--probe-prompt must be text, got ['The', 'A']; give the "
                                     "words every probe sequence starts with as one string"),
    ({"probe_prompt": 7}, "--probe-prompt must be text, got 7; give the words every probe "
                          "sequence starts with as one string"),
])
def test_probe_settings_python_cannot_run_are_refused_before_the_model_loads(
        tiny_llama_dir, tmp_path, monkeypatch, keywords, message):
    """From Python a probe size that is no positive integer (text crashed in the memory
    planning with a TypeError) or an unknown sampler is refused in one line while planning:
    before the model loads, and with nothing written."""
    import prunenet
    from prunenet import pipeline

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline, "load_model_and_tokenizer", never)
    with pytest.raises(InputError) as error:
        prunenet.compress(str(tiny_llama_dir), 0.25, out=tmp_path / "o", progress=False,
                          **keywords)
    assert str(error.value) == message
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny-llama"]


def test_a_probe_prompt_that_is_no_text_is_refused_before_the_model_loads(
        tiny_llama_real_tokenizer_dir, tmp_path):
    """From Python a list of prompts had been read by the tokenizer as a batch and crashed the
    generation with a RuntimeError after the model loaded; a number or bytes crashed in the
    tokenizer. Refused in one line, nothing written."""
    import prunenet

    for prompt in (["The", "A"], 7, b"The"):
        with pytest.raises(InputError, match=r"^--probe-prompt must be text, got "):
            prunenet.compress(str(tiny_llama_real_tokenizer_dir), 0.25, out=tmp_path / "o",
                              progress=False, probe_prompt=prompt, probe_tokens=64,
                              probe_length=16)
    assert list(tmp_path.iterdir()) == []


def usage_error(capsys, argv: list[str]) -> str:
    """Run the CLI; assert argparse's exit 2 with one error line; return it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def commands_never_run(monkeypatch) -> list[str]:
    """Every command's run function replaced by one that notes its name (none should)."""
    import prunenet.cli

    ran: list[str] = []
    for name in vars(prunenet.cli).copy():
        if name.startswith("run_"):
            monkeypatch.setattr(prunenet.cli, name, lambda args, name=name: ran.append(name))
    return ran


@pytest.mark.parametrize("argv, message", [
    (["compress", "{llama}", "--ratio", "0.2", "--out", "{tmp}/o", "--ratio", "0.3"],
     "--ratio is given twice (0.2, then 0.3)"),
    (["compress", "{llama}", "--ratio", "0.2", "--out", "{tmp}/o", "--ratio=0.3"],
     "--ratio is given twice (0.2, then 0.3)"),
    (["compress", "{llama}", "--ratio", "0.2", "--out", "{tmp}/o", "--rat", "0.3"],
     "--ratio is given twice (0.2, then 0.3)"),
    (["compress", "{llama}", "--ratio", "0.2", "--out", "{tmp}/o", "--method", "prunenet",
      "--kld", "--kld"], "--kld is given twice"),
    (["-q", "--quiet", "eval", "{llama}"], "--quiet is given twice (-q, then --quiet)"),
    (["prune", "{llama}", "--ratio", "0.2", "--out", "{tmp}/o", "--policy", "a.safetensors",
      "--policy", "b.safetensors"], "--policy is given twice (a.safetensors, then b.safetensors)"),
    (["train-policy", "{llama}", "--ratio", "0.2", "--out", "{tmp}/p.safetensors",
      "--episodes", "1", "--episodes", "2"], "--episodes is given twice (1, then 2)"),
    (["compare", "{llama}", "--ratios", "0.1,0.2", "--out", "{tmp}/o", "--ratios", "0.3"],
     "--ratios is given twice (0.1,0.2, then 0.3)"),
    (["eval", "{llama}", "--windows", "2", "--windows=3"], "--windows is given twice (2, then 3)"),
    (["finetune", "{llama}", "--out", "{tmp}/o", "--merge", "--no-merge"],
     "--merge is given twice (--merge, then --no-merge)"),
    (["convert", "{llama}", "--out", "{tmp}/a", "--out", "{tmp}/b"],
     "--out is given twice ({tmp}/a, then {tmp}/b)"),
    (["report", "{tmp}/r", "--layers", "0,1", "--layers", "2"],
     "--layers is given twice (0,1, then 2)"),
    (["fetch", "wiki", "--force", "--force"], "--force is given twice"),
])
def test_an_option_given_twice_is_refused_before_any_work(llama, tmp_path, capsys,
                                                          commands_never_run, argv, message):
    """argparse keeps an option's last value and drops the first without a word: a line that
    gives one twice (in any spelling: --ratio=0.3, an abbreviation, a flag's other name) is
    refused, naming both values, before the command runs; nothing is written."""
    argv = [part.format(llama=llama, tmp=tmp_path) for part in argv]
    prog = "prunenet" if argv[0].startswith("-") else f"prunenet {argv[0]}"
    assert usage_error(capsys, argv) == (f"prunenet: error: {message.format(tmp=tmp_path)}; "
                                         f"give it once (see {prog} --help)")
    assert commands_never_run == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["llama"]


def test_options_given_once_are_told_from_defaults_as_before(commands_never_run):
    """The check counts uses within one parse: the same parser parses a second line afresh, and
    given_options, which parses the line again, still sees each option once."""
    parser = build_parser()
    argv = ["compress", "m", "--ratio", "0.3", "--out", "o", "--kld"]
    args = parser.parse_args(argv)
    assert parser.parse_args(argv).ratio == 0.3
    assert given_options(argv, args) == {"model", "ratio", "out", "kld"}
    assert main(argv) == 0 and commands_never_run == ["run_compress"]


SEED_UNUSED = ("--seed has no effect here: method '{}' with --reconstruct none draws nothing at "
               "random and generates no probe text; drop it")
DEVICE_UNUSED = ("--device has no effect here: method '{}' runs on the CPU, as the model's own "
                 "passes do (only a PruneNet policy and a recovery fine-tune run on --device); "
                 "drop it")


@pytest.fixture
def never_loaded(monkeypatch) -> None:
    """Loading a model fails the test: a refusal comes before it."""
    import prunenet.compare
    import prunenet.evaluation.evaluate
    import prunenet.io.loading
    import prunenet.pipeline

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    for module in (prunenet.pipeline, prunenet.compare, prunenet.evaluation.evaluate,
                   prunenet.io.loading):  # train-policy imports it when it runs
        monkeypatch.setattr(module, "load_model_and_tokenizer", no_load)


@pytest.mark.parametrize("argv, message", [
    (["compress", "--method", "magnitude", "--reconstruct", "none", "--seed", "3"],
     SEED_UNUSED.format("magnitude")),
    (["compress", "--method", "magnitude-product", "--reconstruct", "none", "--seed=0"],
     SEED_UNUSED.format("magnitude-product")),
    (["compress", "--method", "random", "--device", "cpu"], DEVICE_UNUSED.format("random")),
    (["compress", "--device", "auto"], DEVICE_UNUSED.format("self-generated")),
    (["compress", "--method", "magnitude", "--reconstruct", "none", "--seed", "1", "--device",
      "cpu"], SEED_UNUSED.format("magnitude") + "; " + DEVICE_UNUSED.format("magnitude")),
    (["prune", "--method", "magnitude", "--reconstruct", "none", "--seed", "5"],
     SEED_UNUSED.format("magnitude")),
    (["prune", "--method", "activation", "--calibration-windows", "1", "--device", "cpu"],
     DEVICE_UNUSED.format("activation")),
    (["compare", "--methods", "magnitude,activation", "--reconstruct", "none", "--seed", "2"],
     "--seed has no effect here: with --reconstruct none no method compared is seeded "
     "(self-generated, prunenet, random are); drop it"),
])
def test_seed_and_device_where_the_run_reads_neither_are_refused_before_any_work(
        tiny_llama_real_tokenizer_dir, tmp_path, capsys, never_loaded, argv, message):
    """magnitude, magnitude-product and activation with --reconstruct none choose rows by
    weights and calibration text alone: no probe is sampled and nothing is drawn, so --seed
    changes nothing; every method but prunenet runs on the CPU, so --device changes nothing
    (a recovery would read both). Refused in one line, before the model loads."""
    command, *options = argv
    ratio = ["--ratios", "0.3"] if command == "compare" else ["--ratio", "0.3"]
    line = refused(capsys, ["-q", command, str(tiny_llama_real_tokenizer_dir), *ratio, "--out",
                            str(tmp_path / "o"), *options], message)
    assert line == f"prunenet: error: {message}"
    assert not any(tmp_path.iterdir())


def test_seed_and_device_are_accepted_where_the_run_reads_them(llama, tmp_path, capsys,
                                                               monkeypatch):
    """The default method samples its probe from the seed; a refit samples one for any
    method; random draws its rows; prunenet trains and selects on --device; a recovery reads
    both. There --seed and --device are accepted (and the first run shows the seed in use)."""
    import prunenet.cli

    out = tmp_path / "out"
    assert main(["-q", "compress", str(llama), "--ratio", "0.3", "--out", str(out), "--seed",
                 "3", "--probe-tokens", "64", "--probe-length", "16"]) == 0
    record = read_record(out)
    assert record["method"] == "self-generated" and record["seed"] == record["probe"]["seed"] == 3
    policy = tmp_path / "p.safetensors"
    assert main(["-q", "train-policy", str(llama), "--ratio", "0.3", "--out", str(policy),
                 "--episodes", "1", "--seed", "3", "--device", "cpu"]) == 0

    class Planned(Exception):
        pass

    def planned(plan):
        raise Planned

    monkeypatch.setattr(prunenet.cli, "_run_plan", planned)
    for command, options in [
        ("compress", ["--method", "magnitude", "--seed", "1"]),
        ("compress", ["--method", "random", "--reconstruct", "none", "--seed", "1"]),
        ("compress", ["--method", "prunenet", "--reconstruct", "none", "--seed", "1",
                      "--device", "cpu"]),
        ("compress", ["--method", "magnitude", "--reconstruct", "none", "--seed", "1",
                      "--device", "cpu", "--recover-steps", "1", "--finetune-seqlen", "32"]),
        ("prune", ["--policy", str(policy), "--reconstruct", "none", "--seed", "1", "--device",
                   "cpu"]),
        ("prune", ["--policy", str(policy), "--selection", "topk", "--seed", "1"]),
    ]:
        with pytest.raises(Planned):
            main(["-q", command, str(llama), "--ratio", "0.3", "--out", str(tmp_path / "o"),
                  *options])
    refused(capsys, ["-q", "prune", str(llama), "--ratio", "0.3", "--out", str(tmp_path / "o"),
                     "--policy", str(policy), "--selection", "topk", "--reconstruct", "none",
                     "--seed", "1"],
            "--seed has no effect here: method 'prunenet' with --policy, --selection topk and "
            "--reconstruct none draws nothing at random and generates no probe text; drop it")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["llama", "out", "p.safetensors"]


@pytest.mark.parametrize("argv", [
    ["compress", "{llama}", "--ratio", "0.3", "--out", "{tmp}/o", "--max-memory", "-1GB"],
    ["prune", "{llama}", "--ratio", "0.3", "--out", "{tmp}/o", "--max-memory", "-1GB"],
    ["train-policy", "{llama}", "--ratio", "0.3", "--out", "{tmp}/p.safetensors",
     "--max-memory", "-1GB"],
    ["eval", "{llama}", "--max-memory", "-1GB"],
])
def test_a_negative_memory_budget_is_refused_as_not_positive(llama, tmp_path, capsys,
                                                             never_loaded, argv):
    """-1GB after --max-memory is the option's value, refused as a budget that is not
    positive (argparse had taken it for an unknown option: 'expected one argument'); before
    the model loads, nothing written."""
    line = refused(capsys, ["-q", *(part.format(llama=llama, tmp=tmp_path) for part in argv)],
                   "--max-memory must be positive")
    assert line == "prunenet: error: --max-memory must be positive, got '-1GB'"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["llama"]


def test_a_negative_number_in_any_notation_reaches_the_options_own_check(llama, tmp_path,
                                                                        capsys):
    """-1e-3 is a value as -1 is, and the option's type says why it is refused."""
    assert usage_error(capsys, ["-q", "compress", str(llama), "--ratio", "0.3", "--out",
                                str(tmp_path / "o"), "--method", "prunenet", "--lr", "-1e-3"]) \
        == ("prunenet: error: argument --lr: expected a positive finite number, got -1e-3 (see "
            "prunenet compress --help)")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["llama"]


@pytest.mark.parametrize("command", ["compress", "prune", "train-policy"])
def test_the_model_help_says_a_cached_hub_id_needs_no_network(command):
    """A Hub id in the Hugging Face cache loads from it with no network
    (test_robustness.py::test_a_hub_id_in_the_cache_loads_from_it_without_asking_the_unreachable_hub);
    the help had said a Hub id needs the network."""
    parser = build_parser().commands[command]
    model = next(action for action in parser._actions if action.dest == "model")
    assert "needs network" not in model.help
    assert "Hugging Face cache" in model.help


@pytest.mark.parametrize("command", ["compress", "prune"])
def test_the_probe_tokens_help_says_the_size_is_rounded_up_to_whole_sequences(command):
    """--probe-tokens 300 with --probe-length 256 samples 2 sequences, 512 tokens
    (test_probe.py::test_the_record_says_what_was_generated); the help had said the probe is
    --probe-tokens tokens."""
    parser = build_parser().commands[command]
    tokens = next(action for action in parser._actions if action.dest == "probe_tokens")
    assert "rounded up to whole --probe-length sequences" in tokens.help


def test_the_compare_help_names_only_options_compare_has():
    """compare takes --methods, not compress's --method: its description and --episodes help had
    said '--method prunenet', an option compare refuses."""
    parser = build_parser().commands["compare"]
    texts = [parser.description, *(action.help for action in parser._actions if action.help)]
    assert not [text for text in texts if re.search(r"--method\b(?!s)", text)]
    episodes, train_ratio = (next(action for action in parser._actions if action.dest == dest)
                             for dest in ("episodes", "train_ratio"))
    assert episodes.help.startswith("prunenet in --methods:")
    assert train_ratio.help.startswith("prunenet in --methods:")
