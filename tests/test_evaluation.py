"""Evaluation: the perplexity protocol (hand computation, BOS rule), offline lm-eval, speed, the
JSON schema of `evaluate` and the `prunenet eval` command's bad inputs."""

from __future__ import annotations

import json
import math
import re
import shutil
import types

import pytest
import torch
import transformers

import prunenet
from conftest import edit_config, make_tiny_model, real_tokenizer_model
from prunenet.cli import main
from prunenet.errors import InputError, MissingAssetError
from prunenet.evaluation.corpora import TokenCorpus, load_corpus
from prunenet.evaluation.evaluate import SCHEMA_KEYS, evaluate, format_table
from prunenet.evaluation.speed import SpeedProtocol, measure_speed
from prunenet.evaluation.zeroshot import TASK_DIR, TASK_METRICS, parse_tasks, zero_shot

TEXT = (
    "The river rises in the northern hills and flows south through three towns before it "
    "reaches the sea. Its valley was settled early, and the old mills along its banks still "
    "stand. In spring the water runs high and fast; in late summer it is slow and clear. "
) * 6


class WordTokenizer:
    """A minimal tokenizer: word ``w{i}`` -> id ``i``, optionally prepending a BOS id."""

    def __init__(self, bos_token_id: int | None, prepends_bos: bool) -> None:
        self.bos_token_id = bos_token_id
        self.prepends_bos = prepends_bos

    def __call__(self, text, add_special_tokens=True, return_attention_mask=True):
        ids = [int(word[1:]) if word[1:].isdigit() else 0 for word in text.split()]
        if add_special_tokens and self.prepends_bos:
            ids = [self.bos_token_id, *ids]

        class Encoding:
            input_ids = ids

        return Encoding()


def _hand_perplexity(model, token_rows: list[list[int]]) -> float:
    """Mean next-token NLL, each prediction from a separate forward pass over its own prefix."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in token_rows:
            for position in range(1, len(row)):
                prefix = torch.tensor([row[:position]])
                log_probs = torch.log_softmax(model(prefix).logits[0, -1].double(), dim=-1)
                total -= float(log_probs[row[position]])
                count += 1
    return math.exp(total / count)


def test_perplexity_equals_hand_computation_on_tiny_text(tiny_llama_real_tokenizer_dir, tmp_path):
    text_file = tmp_path / "tiny.txt"
    text_file.write_text(TEXT)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_real_tokenizer_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_real_tokenizer_dir)
    result = evaluate(model, tokenizer, ppl=str(text_file), seqlen=16, windows=3, progress=False)

    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    assert not load_corpus(str(text_file), tokenizer).bos_token_id  # SmolLM2 adds no BOS
    rows = [ids[0:16], ids[16:32], ids[32:48]]  # the first three non-overlapping windows
    expected = _hand_perplexity(model, rows)
    assert result["perplexity"]["value"] == pytest.approx(expected, rel=1e-4)
    assert result["perplexity"] | {"value": None} == {
        "corpus": str(text_file), "seqlen": 16, "windows": 3, "bos": False, "value": None,
    }


def test_bos_is_prepended_only_when_the_tokenizer_expects_it(tmp_path):
    text_file = tmp_path / "words.txt"
    text_file.write_text(" ".join(f"w{i}" for i in range(2, 42)))  # ids 2..41

    with_bos = load_corpus(str(text_file), WordTokenizer(bos_token_id=1, prepends_bos=True))
    windows = with_bos.evaluation_windows(seqlen=5, count=3)
    assert windows.tolist() == [[1, 2, 3, 4, 5], [1, 6, 7, 8, 9], [1, 10, 11, 12, 13]]

    without = load_corpus(str(text_file), WordTokenizer(bos_token_id=1, prepends_bos=False))
    assert without.evaluation_windows(seqlen=5, count=2).tolist() == [[2, 3, 4, 5, 6],
                                                                      [7, 8, 9, 10, 11]]
    # The BOS token is context only: the perplexity of a BOS window scores seqlen - 1 tokens,
    # all of them corpus tokens.
    model = make_tiny_model("llama")
    result = evaluate(model, WordTokenizer(1, True), ppl=str(text_file), seqlen=5, windows=3,
                      progress=False)
    assert result["perplexity"]["bos"] is True
    assert result["perplexity"]["value"] == pytest.approx(
        _hand_perplexity(model, windows.tolist()), rel=1e-4)


def test_evaluation_is_json_with_a_stable_schema(tiny_llama):
    corpus = TokenCorpus("ids", torch.arange(4, 100) % 128, None)
    result = evaluate(tiny_llama, None, ppl=corpus, seqlen=8, windows=2,
                      speed=SpeedProtocol(prompt_tokens=8, new_tokens=2, repeats=1),
                      progress=False)
    assert tuple(result) == SCHEMA_KEYS
    assert set(result["model"]) == {"source", "model_type", "num_layers", "d_model", "d_ff",
                                    "dtype"}
    assert set(result["size"]) == {"parameters", "ffn_parameters", "bytes_on_disk"}
    assert set(result["perplexity"]) == {"corpus", "seqlen", "windows", "bos", "value"}
    assert set(result["speed"]) == {"batch_size", "prompt_tokens", "new_tokens", "repeats",
                                    "warmup", "seed", "device", "threads",
                                    "prefill_tokens_per_s", "decode_tokens_per_s"}
    assert result["zero_shot"] is None and result["compression"] is None
    assert result["size"]["ffn_parameters"] == 2 * 3 * 48 * 32
    json.dumps(result)  # JSON-able as is

    skipped = evaluate(tiny_llama, None, ppl=None, progress=False)
    assert tuple(skipped) == SCHEMA_KEYS
    assert skipped["perplexity"] is None and skipped["speed"] is None


def test_eval_and_compress_name_the_refit_the_rounding_and_the_fine_tune(tmp_path, capsys):
    """Outputs that differ in their refit are told apart: compress's summary line and eval's
    table name the method with its refit as compare does (random+ls; random alone after
    none), a rounded kept count and a recovery fine-tune; eval's JSON adds reconstruct,
    round_to and finetune to its compression's earlier keys."""
    model = tmp_path / "m"
    make_tiny_model("llama").save_pretrained(model)
    runs = {"none": ["--reconstruct", "none"], "ls": ["--probe-tokens", "64", "--round-to", "8"]}
    printed, compressions, labels = {}, {}, {}
    for name, extra in runs.items():
        out = tmp_path / name
        assert main(["-q", "compress", str(model), "--ratio", "0.25", "--method", "random",
                     "--out", str(out), *extra]) == 0
        printed[name] = capsys.readouterr().out.splitlines()[0]
        result = evaluate(transformers.AutoModelForCausalLM.from_pretrained(out), None,
                          ppl=None, source=out, progress=False)
        compressions[name] = result["compression"]
        labels[name] = re.findall(r"^compression +(.*)$", format_table(result), re.M)
    assert printed["none"].startswith("pruned random at ratio 0.25: FFN width 48 -> 36")
    assert printed["ls"].startswith("pruned random+ls at ratio 0.25, kept rounded to a multiple "
                                    "of 8: FFN width 48 -> ")
    assert labels == {"none": ["random at ratio 0.25"],
                      "ls": ["random+ls at ratio 0.25, kept rounded to a multiple of 8"]}
    common = {"method": "random", "ratio": 0.25, "selection": None, "seed": 42, "finetune": None}
    assert compressions == {"none": {**common, "reconstruct": "none", "round_to": 1},
                            "ls": {**common, "reconstruct": "ls", "round_to": 8}}
    record_path = tmp_path / "ls" / "prunenet.json"
    record = json.loads(record_path.read_text())
    record["finetune"] = {"trained": "LoRA adapters", "steps_run": 60,
                          "settings": {"data": "wiki", "steps": 60}}
    record_path.write_text(json.dumps(record))
    result = evaluate(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ls"), None,
                      ppl=None, source=tmp_path / "ls", progress=False)
    assert result["compression"]["finetune"] == {"trained": "LoRA adapters", "data": "wiki",
                                                 "steps": 60, "teacher": None}
    assert re.findall(r"^compression +(.*)$", format_table(result), re.M) == [
        "random+ls at ratio 0.25, kept rounded to a multiple of 8 + LoRA fine-tune 60 steps "
        "on wiki"]


def test_a_distilled_or_only_fine_tuned_model_is_named_so():
    from prunenet.naming import compression_summary, run_label

    distilled = {"trained": "FFN weights", "steps_run": 40,
                 "settings": {"data": "self-generated"}, "distillation": {"teacher": "/m/d"}}
    record = {"method": "self-generated", "ratio": 0.3, "seed": 1, "round_to": 1,
              "reconstruct": {"mode": "bias"}, "finetune": distilled}
    assert run_label(compression_summary(record)) == (
        "self-generated+bias at ratio 0.3 + FFN self-distillation 40 steps")
    only = compression_summary({"source": "/m/d", "finetune": {**distilled,
                                                               "distillation": None}})
    assert only["method"] is None and only["reconstruct"] is None
    assert run_label(only) == "not pruned + FFN fine-tune 40 steps on self-generated"
    assert run_label(compression_summary({"method": "random", "ratio": 0.3})) == (
        "random at ratio 0.3")  # a record from before the refit: none ran


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_timed_prefill_computes_the_last_positions_logits_only(family):
    """As generate's prefill: the output head reads one position per sequence, then one per
    decode step; the greedy tokens are those of the full logits."""
    model = make_tiny_model(family)
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, inputs, output: seen.append(tuple(inputs[0].shape[:2])))
    try:
        measure_speed(model, SpeedProtocol(batch_size=2, prompt_tokens=6, new_tokens=3,
                                           repeats=1, warmup=0))
    finally:
        hook.remove()
    assert seen == [(2, 1)] * 4


def test_speed_reports_its_protocol_and_positive_rates(tiny_llama):
    protocol = SpeedProtocol(batch_size=2, prompt_tokens=6, new_tokens=3, repeats=2, warmup=1)
    result = measure_speed(tiny_llama, protocol)
    assert {k: result[k] for k in ("batch_size", "prompt_tokens", "new_tokens", "repeats",
                                   "warmup")} == {"batch_size": 2, "prompt_tokens": 6,
                                                  "new_tokens": 3, "repeats": 2, "warmup": 1}
    assert result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0
    with pytest.raises(InputError, match="context of 64"):
        measure_speed(tiny_llama, SpeedProtocol(prompt_tokens=60, new_tokens=8))
    with pytest.raises(InputError, match="repeats"):
        measure_speed(tiny_llama, SpeedProtocol(repeats=0))


@pytest.mark.parametrize("field, value, message", [
    ("repeats", True, "speed repeats must be a positive integer, got True"),
    ("prompt_tokens", True, "speed prompt_tokens must be a positive integer, got True"),
    ("batch_size", 1.0, "speed batch_size must be a positive integer, got 1.0"),
    ("warmup", -1, "speed warmup must be 0 or a positive integer, got -1"),
    ("seed", 1.5, "speed seed must be an integer in [0, 2**63), got 1.5"),
    ("seed", -1, "speed seed must be an integer in [0, 2**63), got -1"),
])
def test_a_speed_protocol_field_out_of_its_range_is_refused_in_one_line(tiny_llama, field, value,
                                                                         message):
    """repeats=True had run once and been recorded as True; seed=1.5 had ended in torch's
    RuntimeError after the other measurements."""
    with pytest.raises(InputError, match=re.escape(message)):
        measure_speed(tiny_llama, SpeedProtocol(**{field: value}))


def test_a_speed_protocol_beyond_the_context_fails_before_the_other_measurements(
        tiny_llama, monkeypatch):
    import prunenet.evaluation.evaluate as evaluate_module

    measured = []
    monkeypatch.setattr(evaluate_module, "_perplexity_part",
                        lambda *args: measured.append("perplexity"))
    with pytest.raises(InputError, match="context of 64"):
        evaluate(tiny_llama, None, ppl=TokenCorpus("ids", torch.arange(2000), None),
                 speed=SpeedProtocol(prompt_tokens=100, new_tokens=8), progress=False)
    assert measured == []
    with pytest.raises(InputError, match=r"a batch of 1000000000 x 4 tokens does not fit in "
                       r"memory: it needs about [\d.]+GiB \(KV cache, activations, logits\)"):
        evaluate(tiny_llama, None, ppl=TokenCorpus("ids", torch.arange(2000), None),
                 speed=SpeedProtocol(batch_size=10**9, prompt_tokens=4, new_tokens=1),
                 progress=False)
    assert measured == []


def test_the_speed_memory_plan_counts_the_cache_the_activations_and_the_logits(tiny_llama):
    """The KV cache grows with every token, every part with the batch, and the float32
    next-token logits are counted."""
    from prunenet.evaluation.speed import speed_memory

    def need(batch, prompt, new):
        return speed_memory(tiny_llama, SpeedProtocol(batch_size=batch, prompt_tokens=prompt,
                                                      new_tokens=new))

    config = tiny_llama.config
    kv_width = 2 * config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    cache_per_token = config.num_hidden_layers * kv_width * 4
    assert need(1, 4, 2) - need(1, 4, 1) == cache_per_token
    assert need(3, 4, 2) - need(3, 4, 1) == 3 * cache_per_token
    assert need(2, 4, 1) == 2 * need(1, 4, 1)  # every part is per sequence
    assert need(1, 1, 1) > 2 * config.vocab_size * 4  # the float32 logits and their argmax


@pytest.mark.parametrize("tokenizer, limit, error, message", [
    (None, 2, InputError, "this model has no tokenizer"),
    (types.SimpleNamespace(eos_token_id=None), 2, InputError, "end-of-text token"),
    (types.SimpleNamespace(eos_token_id=0), 0, InputError, "limit must be a positive number"),
    (types.SimpleNamespace(eos_token_id=0), 2, MissingAssetError, "prunenet fetch"),
])
def test_zero_shot_inputs_are_refused_before_the_other_measurements(
        tiny_llama, tmp_path, monkeypatch, tokenizer, limit, error, message):
    """They had been refused only after every perplexity window was scored."""
    import prunenet.evaluation.evaluate as evaluate_module

    if error is MissingAssetError:
        monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path / "empty-cache"))
    measured = []
    monkeypatch.setattr(evaluate_module, "_perplexity_part",
                        lambda *args: measured.append("perplexity"))
    with pytest.raises(error, match=message):
        evaluate(tiny_llama, tokenizer, ppl=TokenCorpus("ids", torch.arange(2000), None),
                 tasks="piqa", limit=limit, progress=False)
    assert measured == []


def test_lm_eval_runs_offline_on_a_tiny_model(tiny_llama_real_tokenizer_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_real_tokenizer_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_real_tokenizer_dir)
    scores = zero_shot(model, tokenizer, list(TASK_METRICS), limit=3)
    assert list(scores) == list(TASK_METRICS)
    for name, score in scores.items():
        assert score["metric"] == ("acc" if name == "winogrande" else "acc_norm")
        assert score["examples"] == 3
        # With 3 examples an accuracy is one of 0, 1/3, 2/3, 1.
        assert 0.0 <= score["value"] <= 1.0
        assert score["value"] * 3 == pytest.approx(round(score["value"] * 3))


@pytest.mark.parametrize("positions", [2048, 40])
def test_answers_scored_after_a_question_cut_to_fit_the_context_are_counted(
        tiny_llama_real_tokenizer_dir, tmp_path, positions):
    """lm-eval cuts a question from the left where question and answer exceed the model's
    context, with a warning its log level hides: each task counts the answers it scored so,
    as many as the question + answer token counts say, and the table names them."""
    from datasets import load_from_disk

    from prunenet.assets import asset_path

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_real_tokenizer_dir, folder)
    edit_config(folder, max_position_embeddings=positions)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    questions = load_from_disk(str(asset_path("zeroshot") / "hf_datasets/ai2_arc/ARC-Challenge/"
                                   "validation")).select(range(2))
    lengths = [len(tokenizer(f"Question: {question['question']}\nAnswer: {choice}",
                             add_special_tokens=False).input_ids)
               for question in questions for choice in question["choices"]["text"]]
    expected = sum(length > positions + 1 for length in lengths)
    assert (expected > 0) == (positions == 40)
    scores = zero_shot(model, tokenizer, "arc_challenge", limit=2)
    assert scores["arc_challenge"]["cut_answers"] == expected
    table = format_table({"model": {"source": "m", "model_type": "llama", "num_layers": 2,
                                    "d_ff": 48}, "compression": None,
                          "size": {"parameters": 1, "ffn_parameters": 1, "bytes_on_disk": None},
                          "perplexity": None, "speed": None,
                          "zero_shot": {"limit": 2, "tasks": scores, "average": None,
                                        "skipped": []}})
    assert (f"{expected} of its answers scored after the question was cut to fit the context"
            in table) == (positions == 40)


def test_zero_shot_leaves_the_callers_random_generators_as_they_were(
        tiny_llama_real_tokenizer_dir):
    """lm-eval reseeds Python's, numpy's and torch's global generators unless told not to:
    every draw a caller made after an evaluation had been the same, whatever its own seed."""
    import random

    import numpy

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_real_tokenizer_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_real_tokenizer_dir)

    def draws() -> tuple:
        return random.random(), float(numpy.random.rand()), float(torch.rand(1))

    random.seed(7), numpy.random.seed(7), torch.manual_seed(7)
    expected = draws()
    random.seed(7), numpy.random.seed(7), torch.manual_seed(7)
    zero_shot(model, tokenizer, "arc_easy", limit=1)
    assert draws() == expected


def test_shipped_tasks_read_the_cached_splits():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    assert set(TASK_METRICS) <= set(manager.all_subtasks)
    tasks = manager.load(["arc_easy", "arc_challenge", "piqa", "winogrande"])["tasks"]
    sizes = {name: len(task.validation_docs()) for name, task in tasks.items()}
    assert sizes == {"arc_easy": 570, "arc_challenge": 299, "piqa": 1838, "winogrande": 1267}


def test_unknown_task_lists_known_ones():
    with pytest.raises(InputError, match="known: piqa, hellaswag, winogrande, arc_easy"):
        parse_tasks("piqa,boolq")
    assert parse_tasks(" arc_easy,piqa") == ["arc_easy", "piqa"]
    # a task named twice is a typo (it was evaluated once, silently), as in compare's lists
    with pytest.raises(InputError, match="--tasks names piqa more than once; give each once"):
        parse_tasks("piqa, arc_easy,piqa")
    # "none" is what --help writes for no task; compare refused it as an unknown task
    assert parse_tasks("none") == parse_tasks(" None ") == parse_tasks("") == []
    with pytest.raises(InputError, match="unknown task 'none'"):
        parse_tasks("piqa,none")  # only alone


def test_data_not_fetched_names_the_fetch_command(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(MissingAssetError, match="prunenet fetch"):  # a tokenizer it accepts
        zero_shot(tiny_llama, types.SimpleNamespace(eos_token_id=0), "piqa", limit=1)
    with pytest.raises(MissingAssetError, match="prunenet fetch"):
        evaluate(tiny_llama, object(), ppl="wiki", seqlen=16, progress=False)


def test_prunenet_evaluate_is_exported():
    assert prunenet.evaluate is evaluate


def test_eval_command_prints_a_table_and_writes_json(tiny_llama_real_tokenizer_dir, tmp_path,
                                                     capsys):
    text_file = tmp_path / "tiny.txt"
    text_file.write_text(TEXT)
    out = tmp_path / "eval" / "result.json"
    code = main(["eval", str(tiny_llama_real_tokenizer_dir), "--ppl", str(text_file),
                 "--seqlen", "16", "--windows", "2", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "bytes on disk" in printed
    result = json.loads(out.read_text())
    assert set(result) == set(SCHEMA_KEYS)
    files = sum(f.stat().st_size for f in tiny_llama_real_tokenizer_dir.iterdir())
    assert result["size"]["bytes_on_disk"] == files
    assert result["perplexity"]["windows"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--ppl", "no-such-corpus"], "unknown corpus 'no-such-corpus'.*named corpus \\(wiki\\)"),
    (["--windows", "1000", "--seqlen", "16"], "holds (\\d+) evaluation windows of 16 tokens; "
     "asked for 1000; give --windows \\1 or fewer"),
    (["--tasks", "piqa,mmlu"], "unknown task 'mmlu'; known: piqa"),
    (["--tasks", "piqa,piqa"], "--tasks names piqa more than once"),
    (["--seqlen", "4096"], "exceeds the model's context of 2048"),
])
def test_eval_bad_input_is_one_line(tiny_llama_real_tokenizer_dir, tmp_path, capsys, argv,
                                    message):
    text_file = tmp_path / "tiny.txt"
    text_file.write_text(TEXT)
    argv = [*argv] if "--ppl" in argv else ["--ppl", str(text_file), *argv]
    assert main(["eval", str(tiny_llama_real_tokenizer_dir), *argv]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "prunenet: error" in line]
    assert len(errors) == 1 and re.search(message, errors[0]), errors


def test_eval_refuses_unwritable_json_and_unloadable_models(tiny_llama_real_tokenizer_dir, tmp_path,
                                                        capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["eval", str(tiny_llama_real_tokenizer_dir), "--ppl", "none",
                 "--json", str(blocker / "result.json")]) == 2
    assert "cannot create the folder" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing-model"), "--ppl", "none"]) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"')
    assert main(["eval", str(broken), "--ppl", "none"]) == 2
    assert "config.json is not readable JSON" in capsys.readouterr().err


def test_defaults_fit_a_model_with_a_short_context(tiny_llama_real_tokenizer_dir, tmp_path,
                                                   capsys, caplog):
    """Left at their defaults, the window length, the speed prompt and the zero-shot tasks fit
    a 32-token model (each change said in one line); nothing has to be found by trial."""
    import shutil

    from prunenet.cli import main

    folder = tmp_path / "short"
    shutil.copytree(tiny_llama_real_tokenizer_dir, folder)
    edit_config(folder, max_position_embeddings=32)
    out = tmp_path / "eval.json"
    assert main(["-q", "eval", str(folder), "--windows", "1", "--tasks", "piqa", "--limit", "2",
                 "--speed", "--speed-repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["perplexity"]["seqlen"] == 32
    speed = result["speed"]
    assert speed["prompt_tokens"] + speed["new_tokens"] <= 32
    # piqa's answers do not fit 32 tokens: skipped, said, and recorded as asked and skipped
    # (not null, which says no task was asked for)
    assert result["zero_shot"] == {"limit": 2, "tasks": {}, "average": None,
                                   "skipped": ["piqa"]}
    table = format_table(result)
    assert "zero-shot skipped" in table and "zero-shot average" not in table
    assert "zero-shot task piqa skipped" in caplog.text
    assert "perplexity windows of 32 tokens" in caplog.text


@pytest.fixture(scope="module")
def wide_layers_dir(tmp_path_factory):
    """A tiny LLaMA whose decoder layers outweigh its embedding (so that reading them from disk
    saves memory), with SmolLM2's real tokenizer, saved in several shards."""
    return real_tokenizer_model(tmp_path_factory, "wide-layers", max_shard_size="4MB",
                                hidden_size=16, intermediate_size=16384, num_hidden_layers=8,
                                num_attention_heads=2, num_key_value_heads=1,
                                max_position_embeddings=512)


def test_a_model_larger_than_the_budget_is_evaluated_from_disk_with_the_same_numbers(
        wide_layers_dir, tmp_path, monkeypatch, caplog, capsys):
    """Past --max-memory, the layers are read from disk as they run: perplexity and zero-shot
    accuracy are those of the model in memory, nothing is left in the temporary folder, and a
    budget below one layer at a time, or --speed, is refused with the reason."""
    import logging
    import tempfile

    from prunenet.io.streaming import BASE_MEMORY, StreamedCheckpoint, format_bytes

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    text_file = tmp_path / "tiny.txt"
    text_file.write_text(TEXT)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    checkpoint = StreamedCheckpoint(wide_layers_dir)
    need = checkpoint.offloaded_memory(max(checkpoint.evaluation_memory(1, 32),
                                           checkpoint.evaluation_memory(8, 256)))
    arguments = {"ppl": str(text_file), "seqlen": 32, "windows": 3, "tasks": "piqa,arc_easy",
                 "limit": 4, "progress": False}
    in_memory = evaluate(str(wide_layers_dir), **arguments)
    caplog.set_level(logging.INFO, logger="prunenet")
    from_disk = evaluate(str(wide_layers_dir), max_memory=need, **arguments)
    assert "with 8 of 8 layers read from disk" in caplog.text
    assert from_disk == in_memory
    assert in_memory["zero_shot"]["tasks"]["piqa"]["examples"] == 4
    assert list(scratch.iterdir()) == []
    # The command: the same table, at a budget that keeps some layers in memory.
    perplexity_need = checkpoint.offloaded_memory(checkpoint.evaluation_memory(1, 32))
    argv = ["eval", str(wide_layers_dir), "--ppl", str(text_file), "--seqlen", "32",
            "--windows", "3"]
    bounded = []  # the heap's growth is bounded for a run from disk, as for a streamed one
    monkeypatch.setattr("prunenet.io.streaming.bound_heap_growth", lambda: bounded.append(1))
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert bounded == []
    caplog.clear()
    caplog.set_level(logging.INFO, logger="prunenet")
    in_memory_need = BASE_MEMORY + checkpoint.weight_bytes + checkpoint.evaluation_memory(1, 32)
    assert main([*argv, "--max-memory", str((perplexity_need + in_memory_need) // 2)]) == 0
    assert capsys.readouterr().out == table
    assert re.search(r"with [1-7] of 8 layers read from disk", caplog.text)
    assert bounded == [1]
    assert main([*argv, "--max-memory", str(perplexity_need - 1)]) == 2
    error = capsys.readouterr().err
    assert f"needs at least {format_bytes(perplexity_need)}" in error
    assert main([*argv, "--max-memory", str(perplexity_need), "--speed"]) == 2
    assert "--speed measures a model held in memory" in capsys.readouterr().err
    assert list(scratch.iterdir()) == []


def test_quiet_commands_print_no_library_progress_bars_nor_git_noise(
        tiny_llama_real_tokenizer_dir, tmp_path, monkeypatch, capfd):
    """-q silences every progress bar (lm-eval's requests, transformers' weight loading),
    not only prunenet's, and restores them afterwards; lm-eval asks git nothing, so outside a
    git repository no "fatal: not a git repository" line appears, with or without -q."""
    from tqdm import std

    monkeypatch.chdir(tmp_path)  # not inside a git repository
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    original = std.tqdm.__dict__["__init__"]
    argv = ["eval", str(tiny_llama_real_tokenizer_dir), "--ppl", "none", "--tasks", "piqa",
            "--limit", "2"]
    assert main(["-q", *argv]) == 0
    err = capfd.readouterr().err
    assert "%|" not in err and "it/s" not in err and "fatal" not in err, err
    assert std.tqdm.__dict__["__init__"] is original
    assert main(argv) == 0  # without -q the bars are back, and still no git noise
    err = capfd.readouterr().err
    assert "%|" in err and "fatal" not in err


def test_zero_shot_needs_an_end_of_text_token():
    """lm-eval ends every context with the tokenizer's end-of-text token: a tokenizer without
    one is refused in one line before lm-eval runs, not met with its TypeError."""
    from test_finetune import _tokenizer

    tokenizer = _tokenizer()
    assert tokenizer.eos_token_id is None
    with pytest.raises(InputError, match="need the tokenizer's end-of-text token"):
        zero_shot(make_tiny_model("llama"), tokenizer, "piqa", limit=1)


@pytest.mark.parametrize("limit", [0, -1, 1.5, True, 0.5])
def test_a_limit_that_is_not_a_positive_integer_is_refused_from_python(tiny_llama, limit):
    """zero_shot(limit=1.5) and limit=True had scored one example of each task and recorded the
    limit as given (lm-eval reads them as 1); 0.5 is refused, not read as half a task."""
    with pytest.raises(InputError, match=re.escape(
            f"limit must be a positive number of examples, got {limit!r}")):
        zero_shot(tiny_llama, types.SimpleNamespace(eos_token_id=0), "piqa", limit=limit)


@pytest.mark.parametrize("windows", [0, -1, 1.5, True])
def test_a_window_count_that_is_not_a_positive_integer_is_refused_from_python(tiny_llama, windows):
    """evaluate(windows=-1) had scored every window but the last and reported that many;
    windows=0 had been called a corpus too short for one window."""
    corpus = TokenCorpus("ids", torch.arange(4, 100) % 128, None)
    with pytest.raises(InputError, match=re.escape(
            f"windows must be a positive number of windows, got {windows!r}")):
        evaluate(tiny_llama, None, ppl=corpus, seqlen=8, windows=windows, progress=False)


@pytest.mark.parametrize("content", ["", "hi", "\n\n"])
def test_a_corpus_too_short_for_one_window_says_so_not_how_many_windows_were_asked(
        tiny_llama_real_tokenizer_dir, tmp_path, capsys, content):
    """An empty or tiny --ppl file holds no window at all: the line says it is too short,
    where it had said it holds 0 windows and was asked for 16, as if fewer would do."""
    text_file = tmp_path / "short.txt"
    text_file.write_text(content)
    assert main(["eval", str(tiny_llama_real_tokenizer_dir), "--ppl", str(text_file),
                 "--windows", "1"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "prunenet: error" in line]
    assert errors == [f"prunenet: error: corpus {str(text_file)!r} is too short for one window "
                      "of 1024 tokens: its evaluation region (the first half of a small corpus) "
                      "holds 0 tokens; give a longer text or shorter windows"]


@pytest.mark.parametrize("name", ["data.JSONL", "data.Jsonl"])
def test_a_jsonl_file_is_read_as_jsonl_whatever_the_case_of_its_suffix(tmp_path, name):
    """data.JSONL is read for its "text" fields, as data.jsonl is; it had been read as plain
    text, so perplexity was measured on its JSON syntax."""
    from prunenet.evaluation.corpora import read_corpus_text

    lines = "".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(3))
    (tmp_path / name).write_text(lines)
    assert read_corpus_text(str(tmp_path / name)) == "line 0\n\nline 1\n\nline 2"


def test_a_perplexity_beyond_the_largest_float_is_one_line_and_saves_nothing(
        tiny_llama_real_tokenizer_dir, tmp_path, capsys):
    """Finite but enormous logits that are wrong give a finite mean loss whose exponential
    overflows: eval ended in math's OverflowError with a traceback; it says so in one line,
    with the loss, and writes no --json."""
    import shutil

    folder = tmp_path / "loud"
    shutil.copytree(tiny_llama_real_tokenizer_dir, folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.norm.weight.mul_(1e6)  # logits a million times larger, as wrong as before
    model.save_pretrained(folder)
    text_file = tmp_path / "tiny.txt"
    text_file.write_text(TEXT)
    out = tmp_path / "result.json"
    assert main(["-q", "eval", str(folder), "--ppl", str(text_file), "--seqlen", "16",
                 "--windows", "2", "--json", str(out)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "prunenet: error" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.fullmatch(
        r"prunenet: error: the model's mean loss on 2 evaluation windows is [0-9.e+]+ nats per "
        r"token, and its exponential, the perplexity, exceeds the largest float \(1.8e\+308\): "
        r".*so it has no perplexity to report", errors[0]), errors
    assert not out.exists()


def test_the_zero_shot_average_names_the_examples_each_task_scored():
    """A task holding fewer examples than --limit scores all it holds (arc_challenge: 299):
    the average's row had said "first 500 examples" of a mean over 500 and 299; it names
    what each task scored, and says the mean is unweighted where the counts differ."""
    def result(examples: dict[str, int], limit: int | None) -> dict:
        tasks = {name: {"metric": "acc_norm", "value": 0.5, "stderr": None, "examples": count}
                 for name, count in examples.items()}
        return {"model": {"source": "m", "model_type": "llama", "num_layers": 2, "d_ff": 48},
                "compression": None, "perplexity": None, "speed": None,
                "size": {"parameters": 1, "ffn_parameters": 1, "bytes_on_disk": None},
                "zero_shot": {"limit": limit, "tasks": tasks, "average": 0.5, "skipped": []}}

    def average_row(table: str) -> str:
        return next(line for line in table.splitlines() if line.startswith("zero-shot average"))

    assert average_row(format_table(result({"piqa": 500, "arc_challenge": 299}, 500))).split(
        "  ", 1)[1].strip() == ("0.5000  [unweighted mean of 2 tasks: piqa 500, arc_challenge "
                                "299 examples]")
    assert average_row(format_table(result({"piqa": 100, "arc_easy": 100}, 100))).endswith(
        "0.5000  [mean of 2 tasks, 100 examples each]")
    assert average_row(format_table(result({"arc_easy": 570}, None))).endswith(
        "0.5000  [1 task, 570 examples]")
