"""Recovery without data: a tiny pruned LLaMA (SmolLM2's real vocabulary) distilled from its
dense teacher on text the teacher writes itself."""

from __future__ import annotations

import importlib
import json
import shutil
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import transformers
from safetensors.torch import load_file
from test_finetune import InterruptAt, Interrupted, Recorder

from conftest import assert_same_weights, make_tiny_model
from prunenet.arithmetic import autocast
from prunenet.cli import main
from prunenet.distillation import TEACHER_RECIPE
from prunenet.errors import InputError, OutputError
from prunenet.finetune import finetune
from prunenet.pipeline import prune
from prunenet.probe import generate_probe

SETTINGS = dict(data="self-generated", seqlen=32, batch_size=4, eval_windows=4, lr=1e-3, seed=0,
                progress=False)
FFN_NAMES = ("gate_proj", "up_proj", "down_proj")


def _load(folder) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def kl_teacher_student(teacher, student, tokens) -> float:
    """Mean over positions of sum_v p_t(v) (log p_t(v) - log p_s(v)), written out plainly."""
    with torch.no_grad():
        teacher_probs = torch.softmax(teacher(tokens).logits.double(), dim=-1)
        student_probs = torch.softmax(student(tokens).logits.double(), dim=-1)
    per_position = (teacher_probs * (teacher_probs.log() - student_probs.log())).sum(-1)
    return float(per_position.mean())


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_real_tokenizer_dir):
    """The teacher: the tiny real-tokenizer LLaMA with strong FFNs and an untied head that
    favours 512 tokens (so that 40 short training windows cover what held-back text says);
    the student: it pruned at 0.5 by random rows, with prunenet.json naming the teacher; and
    held-back teacher text of a seed of its own."""
    root = tmp_path_factory.mktemp("distill")
    dense = root / "dense"
    model = _load(tiny_llama_real_tokenizer_dir)
    head = torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(1))
    head[:512] *= 0.6
    head[512:] *= 0.02
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(head)
    with torch.no_grad():  # make the FFNs, and so pruning them, matter
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(20)
    model.save_pretrained(dense)
    transformers.AutoTokenizer.from_pretrained(tiny_llama_real_tokenizer_dir).save_pretrained(
        dense)
    pruned = root / "pruned"
    prune(str(dense), None, 0.5, method="random", out=pruned)
    held_back = generate_probe(_load(dense), None, 8 * 32, seed=987654321,
                               recipe=replace(TEACHER_RECIPE, sequence_length=32), progress=False)
    return SimpleNamespace(root=root, dense=dense, pruned=pruned, held_back=held_back)


@pytest.fixture(scope="module")
def distilled(setup):
    recorder = Recorder()
    out = setup.root / "distilled"
    result = finetune(setup.pruned, SETTINGS["data"], out, steps=10, eval_every=5, patience=None,
                      callbacks=[recorder], **{k: v for k, v in SETTINGS.items() if k != "data"})
    return SimpleNamespace(result=result, out=out, recorder=recorder)


def test_distillation_lowers_the_kl_to_the_teacher_on_held_back_text(setup, distilled):
    teacher = _load(setup.dense)
    before = kl_teacher_student(teacher, _load(setup.pruned), setup.held_back)
    after = kl_teacher_student(teacher, _load(distilled.out), setup.held_back)
    assert after < 0.9 * before, (before, after)  # 1.27 -> 1.06 when written
    entry = distilled.result.record["finetune"]
    assert entry["eval_kl_after"] < entry["eval_kl_before"]
    assert entry["eval_perplexity_after"] < entry["eval_perplexity_before"]
    assert entry["steps_run"] == 10 and distilled.recorder.steps == list(range(1, 11))


def test_the_record_says_what_was_distilled(setup, distilled):
    record = json.loads((distilled.out / "prunenet.json").read_text())
    source = json.loads((setup.pruned / "prunenet.json").read_text())
    assert {k: v for k, v in record.items() if k != "finetune"} == source
    entry = record["finetune"]
    distillation = entry["distillation"]
    assert distillation["teacher"] == str(setup.dense.resolve())  # from prunenet.json
    assert distillation["loss"] == "kl" and distillation["temperature"] == 1.0
    # one training window per window trained on (10 steps x 4), 4 held back: 32 tokens each
    assert distillation["generated_tokens"] == {"training": 40 * 32, "evaluation": 4 * 32}
    precision = entry["settings"]["precision"]  # the device's default
    assert distillation["generation"] == {"seed": 0, "batch_size": 32, "temperature": 1.0,
                                          "precision": precision, "sampler": "inverse-cdf"}
    assert distillation["text"] == "sampled by the teacher from its BOS token, temperature 1"
    assert entry["settings"]["data"] == "self-generated"
    assert entry["trained"] == "LoRA adapters" and entry["settings"]["train"] == "lora"
    assert [point["step"] for point in entry["eval_history"]] == [5, 10]
    kls = [point["kl"] for point in entry["eval_history"]]
    assert entry["eval_kl_after"] == pytest.approx(min(kls), rel=1e-5)
    assert not (setup.root / "distilled.work").exists()


def test_two_processes_record_the_perplexity_of_every_held_back_window(setup, tmp_path):
    """Under torchrun each process scores its share of the held-back windows: the recorded
    perplexity is that of all of them, as one process records (it had been the main
    process's share alone)."""
    import os
    import subprocess
    import sys

    command = ["-m", "prunenet", "-q", "finetune", str(setup.pruned), "--data",
               "self-generated", "--steps", "1", "--eval-windows", "4",
               "--generated-windows", "8", "--seqlen", "32", "--device", "cpu"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    recorded = []
    for launcher, out in (([], "one"), (["-m", "torch.distributed.run", "--standalone",
                                         "--nproc_per_node", "2"], "two")):
        done = subprocess.run([sys.executable, *launcher, *command, "--out", str(tmp_path / out)],
                              capture_output=True, text=True, env=environment, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        tune = json.loads((tmp_path / out / "prunenet.json").read_text())["finetune"]
        recorded.append((tune["world_size"], tune["evaluation_windows"],
                         tune["eval_perplexity_before"], tune["eval_kl_before"]))
    (one, windows, perplexity, kl), (two, *rest) = recorded
    assert (one, two, windows) == (1, 2, 4)
    assert rest[0] == windows
    assert rest[1] == pytest.approx(perplexity, rel=1e-6)
    assert rest[2] == pytest.approx(kl, rel=1e-5)


def test_training_never_sees_the_held_back_windows(distilled):
    fed = {tuple(row.tolist()) for batch in distilled.recorder.batches for row in batch}
    assert len(fed) == 10 * 4  # every training window once
    distillation = distilled.result.record["finetune"]["distillation"]
    # the evaluation windows are the first 4 sequences: regenerate them from the teacher
    generation = distillation["generation"]
    recipe = replace(TEACHER_RECIPE, sequence_length=32, batch_size=generation["batch_size"],
                     temperature=generation["temperature"])
    with autocast("cpu", generation["precision"]):
        sequences = generate_probe(_load(distillation["teacher"]), None, 44 * 32,
                                   generation["seed"], recipe, progress=False)
    evaluation = sequences[:4]
    # the record reproduces the text: the rest are exactly the windows trained on
    assert fed == {tuple(row.tolist()) for row in sequences[4:]}
    assert not fed & {tuple(row.tolist()) for row in evaluation}


def test_merged_output_reloads_with_plain_transformers_and_gives_the_same_logits(distilled):
    reloaded = _load(distilled.out)
    tokens = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = distilled.result.model(tokens).logits
        assert torch.equal(reloaded(tokens).logits, expected)
    assert (distilled.out / "adapter" / "adapter_config.json").exists()


def test_ffn_training_changes_only_the_ffn_weights(setup):
    out = setup.root / "ffn"
    result = finetune(setup.pruned, SETTINGS["data"], out, steps=4, train="ffn",
                      **{k: v for k, v in SETTINGS.items() if k not in ("data", "lr")})
    assert result.record["finetune"]["trained"] == "FFN weights"
    assert result.record["finetune"]["settings"]["lr"] == 1e-4  # the ffn default
    assert not (out / "adapter").exists()
    before, after = load_file(setup.pruned / "model.safetensors"), load_file(
        out / "model.safetensors")
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        changed = not torch.equal(tensor, after[name])
        assert changed == (name.rsplit(".", 2)[-2] in FFN_NAMES), name


def test_the_teacher_samples_and_scores_in_the_runs_precision(setup, monkeypatch):
    """A bfloat16 run: the teacher's forward during training computes in bfloat16, and its text
    was sampled in the precision the record names (bfloat16 where the CPU has it natively)."""
    finetune_module = importlib.import_module("prunenet.finetune")  # not the function
    seen: dict[int, set] = {}  # per sequence length: the dtypes the teacher's FFN computed in
    loaded = []
    original = finetune_module.load_model_and_tokenizer

    def load(*args, **kwargs):
        model, tokenizer = original(*args, **kwargs)
        loaded.append(model)
        if len(loaded) == 2:  # the student loads first, then the teacher
            def capture(_module, _inputs, output):
                seen.setdefault(output.shape[1], set()).add(output.dtype)

            model.model.layers[0].mlp.down_proj.register_forward_hook(capture)
        return model, tokenizer

    monkeypatch.setattr(finetune_module, "load_model_and_tokenizer", load)
    result = finetune(setup.pruned, "self-generated", setup.root / "teacher-bf16", steps=2,
                      eval_every=2, patience=None, precision="bfloat16",
                      **{k: v for k, v in SETTINGS.items() if k != "data"})
    sampled = result.record["finetune"]["distillation"]["generation"]["precision"]
    assert seen[32] == {torch.bfloat16}  # training and evaluation: whole 32-token windows
    assert seen[1] == {getattr(torch, sampled)}  # sampling: one token per step
    from prunenet.arithmetic import default_precision

    assert sampled == default_precision("cpu")


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(setup):
    settings = dict(steps=6, eval_every=2, **{k: v for k, v in SETTINGS.items() if k != "data"})
    straight = finetune(setup.pruned, "self-generated", setup.root / "straight", **settings)
    out = setup.root / "resumed"
    with pytest.raises(Interrupted):
        finetune(setup.pruned, "self-generated", out, callbacks=[InterruptAt(3)], **settings)
    assert not out.exists()
    work = setup.root / "resumed.work"
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (work / "generated-windows.pt").exists()
    recorder = Recorder()
    resumed = finetune(setup.pruned, "self-generated", out, resume=True, callbacks=[recorder],
                       **settings)
    assert recorder.steps == [3, 4, 5, 6]
    assert resumed.record["finetune"]["resumed_from_step"] == 2
    assert_same_weights(setup.root / "straight", out)
    assert resumed.record["finetune"]["eval_kl_after"] == pytest.approx(
        straight.record["finetune"]["eval_kl_after"], rel=1e-5)
    assert (resumed.record["finetune"]["distillation"]["generation"]
            == straight.record["finetune"]["distillation"]["generation"])


def test_resume_refuses_a_teacher_that_now_holds_other_weights(setup):
    """A teacher replaced at its path since the interruption would score the student against
    another model than the one that wrote its text and trained its checkpoints: refused."""
    teacher = setup.root / "replaced-teacher"
    shutil.copytree(setup.dense, teacher)
    settings = dict(steps=4, eval_every=2, **{k: v for k, v in SETTINGS.items() if k != "data"})
    out = setup.root / "replaced-teacher-student"
    with pytest.raises(Interrupted):
        finetune(setup.pruned, "self-generated", out, teacher=teacher,
                 callbacks=[InterruptAt(3)], **settings)
    model = _load(teacher)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    model.save_pretrained(teacher)
    with pytest.raises(InputError, match=f"the teacher {teacher} holds other weights"):
        finetune(setup.pruned, "self-generated", out, teacher=teacher, resume=True, **settings)
    assert (setup.root / "replaced-teacher-student.work" / "checkpoint-2").is_dir()


def test_a_resumed_text_sampled_by_torch_multinomial_is_named_so(setup):
    """Teacher text kept by a version whose generator drew with torch.multinomial (its saved
    generation names no sampler) is trained on as it is, and the record says how it was
    drawn."""
    settings = dict(steps=4, eval_every=2, **{k: v for k, v in SETTINGS.items() if k != "data"})
    out = setup.root / "multinomial"
    with pytest.raises(Interrupted):
        finetune(setup.pruned, "self-generated", out, callbacks=[InterruptAt(3)], **settings)
    saved = setup.root / "multinomial.work" / "generated-windows.pt"
    kept = torch.load(saved)
    generation = {k: v for k, v in kept["generation"].items() if k != "sampler"}
    torch.save({**kept, "generation": generation}, saved)
    resumed = finetune(setup.pruned, "self-generated", out, resume=True, **settings)
    assert resumed.record["finetune"]["distillation"]["generation"] == {
        **generation, "sampler": "multinomial"}


def test_resuming_a_work_folder_of_an_earlier_version_keeps_its_settings_and_text(setup):
    """A run started with other defaults resumes with the command repeated as it was (unset
    lr, seqlen and precision take the checkpoint's; a checkpoint that names no precision ran in
    float32), and the record names how that text was sampled."""
    settings = dict(steps=4, eval_every=2, **{k: v for k, v in SETTINGS.items() if k != "data"})
    settings["lr"] = 2e-3  # neither today's default nor the earlier one
    settings["precision"] = "float32"  # what every run computed in before the setting
    out = setup.root / "earlier"
    with pytest.raises(Interrupted):
        finetune(setup.pruned, "self-generated", out, callbacks=[InterruptAt(3)], **settings)
    saved = setup.root / "earlier.work" / "generated-windows.pt"
    kept = torch.load(saved)
    torch.save({"training": kept["training"], "evaluation": kept["evaluation"],
                "seeds": [11, 12]}, saved)  # as the earlier sampler kept it
    settings_file = setup.root / "earlier.work" / "prunenet-finetune.json"
    saved_settings = json.loads(settings_file.read_text())
    del saved_settings["precision"]  # saved before the setting existed: float32 ran
    del saved_settings["source_weights"], saved_settings["teacher_weights"]  # nor these
    settings_file.write_text(json.dumps(saved_settings))
    repeated = {k: v for k, v in settings.items() if k not in ("lr", "seqlen", "precision")}
    resumed = finetune(setup.pruned, "self-generated", out, resume=True, **repeated)
    entry = resumed.record["finetune"]
    assert entry["settings"]["lr"] == 2e-3 and entry["settings"]["seqlen"] == 32
    assert entry["settings"]["precision"] == "float32"
    assert entry["resumed_from_step"] == 2 and entry["steps_run"] == 4
    assert entry["distillation"]["generation"] == {
        "seeds": [11, 12], "sampler": "one seed per batch of 32 sequences",
        "precision": "float32"}


def test_a_teacher_with_fewer_positions_than_the_windows_is_refused(setup):
    from prunenet.distillation import teacher_windows

    with pytest.raises(InputError,
                       match="--seqlen 4096 exceeds the teacher's context of 2048 tokens"):
        teacher_windows(_load(setup.dense), 2, 1, 4096, seed=0, progress=False)


def test_a_teacher_with_fewer_positions_is_refused_before_any_model_loads(
        setup, tmp_path, monkeypatch):
    """The teacher's context is read from its config: windows longer than it are refused
    before the student or the teacher loads (they had been refused after both loaded)."""
    import shutil
    import sys

    from conftest import edit_config

    teacher = tmp_path / "short-teacher"
    shutil.copytree(setup.dense, teacher)
    edit_config(teacher, max_position_embeddings=16)

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(sys.modules["prunenet.finetune"], "load_model_and_tokenizer", no_load)
    with pytest.raises(InputError, match="^--seqlen 32 exceeds the teacher's context of 16 "
                                         "tokens$"):
        finetune(setup.pruned, "self-generated", tmp_path / "out", teacher=teacher, steps=2,
                 **{k: v for k, v in SETTINGS.items() if k != "data"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short-teacher"]


def test_a_teacher_path_equal_to_out_is_refused(setup):
    with pytest.raises(OutputError, match="is the input"):
        finetune(setup.pruned, "self-generated", setup.dense, teacher=setup.dense, overwrite=True,
                 steps=2, **{k: v for k, v in SETTINGS.items() if k != "data"})
    assert (setup.dense / "model.safetensors").exists()


def test_no_teacher_and_no_record_is_a_clear_error(setup, tmp_path):
    bare = tmp_path / "bare"
    _load(setup.pruned).save_pretrained(bare)
    with pytest.raises(InputError, match="has no prunenet.json .* pass --teacher DENSE"):
        finetune(bare, "self-generated", tmp_path / "out", steps=2)
    with pytest.raises(InputError, match="--teacher applies to --data self-generated only"):
        finetune(bare, "wiki", tmp_path / "out", teacher=setup.dense, steps=2)


def test_a_recorded_teacher_that_does_not_load_is_named_as_the_records(setup, tmp_path,
                                                                        capsys):
    """A record whose source is a Hub id not to be had (offline): the line says that the
    teacher is the record's, which the command line never named, and what to pass instead."""
    student = tmp_path / "student"
    shutil.copytree(setup.pruned, student)
    record = json.loads((student / "prunenet.json").read_text())
    (student / "prunenet.json").write_text(json.dumps({**record, "source": "no-org/no-model"}))
    capsys.readouterr()
    assert main(["-q", "finetune", str(student), "--data", "self-generated", "--out",
                 str(tmp_path / "out"), "--steps", "2", "--seqlen", "32"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"prunenet: error: teacher no-org/no-model (the source in "
                            f"{student}/prunenet.json): could not load 'no-org/no-model'"), error
    assert error.endswith("or connect to the Hub; pass --teacher DENSE"), error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["student"]


def _teacher_refused(setup, teacher, out, capsys) -> str:
    """The one-line error of distilling ``setup.pruned`` from ``teacher`` into ``out``."""
    capsys.readouterr()
    assert main(["-q", "finetune", str(setup.pruned), "--data", "self-generated", "--teacher",
                 str(teacher), "--out", str(out), "--steps", "2", "--seqlen", "32"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    return error


def test_a_mismatched_teacher_is_a_one_line_error(setup, tmp_path, capsys):
    other = tmp_path / "other-vocabulary"
    make_tiny_model("llama").save_pretrained(other)  # vocabulary 128, not 49152
    error = _teacher_refused(setup, other, tmp_path / "out", capsys)
    assert "vocabulary of 128" in error and "49152" in error and "--teacher" in error
    gpt2 = tmp_path / "other-family"
    make_tiny_model("gpt2").save_pretrained(gpt2)
    with pytest.raises(InputError, match="a gpt2 model .* the student a llama model"):
        finetune(setup.pruned, "self-generated", tmp_path / "out", teacher=gpt2, steps=2)
    assert not (tmp_path / "out").exists()


def test_a_teacher_with_another_tokenizer_of_the_same_size_is_refused_before_any_load(
        setup, tmp_path, capsys, monkeypatch):
    """The teacher's family and vocabulary size are the student's, but its tokenizer gives the
    tokens other ids: its text and distributions would teach the student other words. Refused
    in one line from the tokenizers, before either model loads; nothing written."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    other = tmp_path / "other-tokenizer"
    other.mkdir()
    for name in ("config.json", "model.safetensors"):
        (other / name).write_bytes((setup.dense / name).read_bytes())
    size = len(transformers.AutoTokenizer.from_pretrained(setup.dense))
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0").save_pretrained(
        other)

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(importlib.import_module("prunenet.finetune"), "load_model_and_tokenizer",
                        no_load)
    error = _teacher_refused(setup, other, tmp_path / "out", capsys)
    assert f"teacher {other} has another tokenizer than the student" in error
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.work").exists()


def test_cli_finetune_distils(setup, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["-q", "finetune", str(setup.pruned), "--data", "self-generated", "--out",
                 str(out), "--steps", "2", "--seqlen", "32", "--eval-windows", "2",
                 "--precision", "float32"]) == 0
    assert "held-out KL to the teacher" in capsys.readouterr().out
    entry = json.loads((out / "prunenet.json").read_text())["finetune"]
    assert entry["distillation"]["teacher"] == str(setup.dense.resolve())
    assert entry["settings"]["precision"] == entry["distillation"]["generation"]["precision"] \
        == "float32"


def test_compress_recovers_without_data(setup, tmp_path):
    out = tmp_path / "compressed"
    recovered = tmp_path / "compressed-recovered"
    recovered.mkdir()
    (recovered / "mine.txt").write_text("not prunenet's")
    argv = ["-q", "compress", str(setup.dense), "--ratio", "0.5", "--method", "random",
            "--out", str(out), "--recover-steps", "2", "--finetune-seqlen", "32",
            "--finetune-precision", "bfloat16"]
    assert main(argv) == 2  # the recovery output is checked before any work
    assert not out.exists()
    (recovered / "mine.txt").unlink()
    assert main(argv) == 0
    entry = json.loads((recovered / "prunenet.json").read_text())["finetune"]
    assert entry["source"] == str(out.resolve()) and entry["steps_run"] == 2
    assert entry["distillation"]["teacher"] == str(setup.dense.resolve())
    assert entry["settings"]["precision"] == "bfloat16"


def test_the_teacher_text_progress_bar_names_what_it_samples(setup, capsys):
    from prunenet.distillation import teacher_windows

    training, evaluation = teacher_windows(_load(setup.dense), 3, 1, 8, seed=0, progress=True)
    assert training.shape == (3, 8) and evaluation.shape == (1, 8)
    err = capsys.readouterr().err
    assert "teacher text" in err and "probe" not in err


def test_the_teacher_is_the_model_compressed_whatever_folder_the_commands_run_in(
        tmp_path, monkeypatch, capsys):
    """A compression given a relative path records it absolute, so a later distillation run
    from another folder, where that relative name is another model, reads the dense model it
    was pruned from; a record of an earlier version holding a relative name that exists here
    is refused, not guessed."""
    from prunenet.distillation import default_teacher

    first, second = tmp_path / "first", tmp_path / "second"
    make_tiny_model("llama", seed=1).save_pretrained(first / "dense")
    make_tiny_model("llama", seed=2).save_pretrained(second / "dense")
    monkeypatch.chdir(first)
    assert main(["-q", "compress", "dense", "--ratio", "0.3", "--out", "pruned", "--method",
                 "random", "--reconstruct", "none"]) == 0
    record = json.loads((first / "pruned" / "prunenet.json").read_text())
    assert record["source"] == str(first / "dense")
    monkeypatch.chdir(second)
    assert default_teacher(first / "pruned") == str(first / "dense")
    record["source"] = "dense"  # as an earlier version wrote it
    (first / "pruned" / "prunenet.json").write_text(json.dumps(record))
    with pytest.raises(InputError, match="names the source 'dense' relative to the folder"):
        default_teacher(first / "pruned")
    monkeypatch.chdir(tmp_path)  # where no "dense" exists: a Hub id, as before
    assert default_teacher(first / "pruned") == "dense"


def test_a_model_pruned_again_is_distilled_from_the_dense_model_first_pruned(tmp_path):
    """A model pruned from a model prunenet had pruned (and fine-tuned) is taught by the dense
    model at the start of that chain, the model the docs name, not by the pruned model it was
    last pruned from (its record's ``source``), a weaker teacher."""
    from prunenet.distillation import default_teacher

    make_tiny_model("llama", seed=1).save_pretrained(tmp_path / "dense")
    for source, out in (("dense", "once"), ("once", "twice"), ("twice", "thrice")):
        assert main(["-q", "compress", str(tmp_path / source), "--ratio", "0.25", "--out",
                     str(tmp_path / out), "--method", "random", "--reconstruct", "none"]) == 0
    assert default_teacher(tmp_path / "once") == str(tmp_path / "dense")
    assert json.loads((tmp_path / "twice" / "prunenet.json").read_text())["source"] == str(
        tmp_path / "once")
    assert default_teacher(tmp_path / "twice") == str(tmp_path / "dense")
    assert default_teacher(tmp_path / "thrice") == str(tmp_path / "dense")


@pytest.mark.parametrize("given", ["ro/", "ro/.", "../work/ro"])
def test_a_recovery_is_written_beside_out_however_out_is_spelt(
        tiny_llama_real_tokenizer_dir, tmp_path, monkeypatch, capsys, given):
    """--out with a trailing slash, '.' or '..' names the folder it means: the recovery is
    written beside it as NAME-recovered (not inside it, nor as a hidden '.-recovered'). (The
    current folder itself is no output: test_data_safety.py tests '--out .')"""
    from pathlib import Path

    finetune_module = importlib.import_module("prunenet.finetune")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    written = []

    def recorded(model, data, out, **settings):
        written.append((Path(model), Path(out)))
        raise KeyboardInterrupt  # the recovery itself is tested above

    monkeypatch.setattr(finetune_module, "finetune", recorded)
    assert main(["-q", "compress", str(tiny_llama_real_tokenizer_dir), "--ratio", "0.5",
                 "--method", "random", "--reconstruct", "none", "--out", given,
                 "--recover-steps", "1"]) == 130
    folder = (work / given).resolve()
    assert written == [(folder, folder.with_name(f"{folder.name}-recovered"))]
    assert (folder / "prunenet.json").exists()
