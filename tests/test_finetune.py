"""LoRA recovery fine-tuning on a tiny pruned LLaMA with a tiny word-level tokenizer and corpus."""

from __future__ import annotations

import importlib
import json
import math
import random
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy
import pytest
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers

from conftest import TINY_CONFIGS, VOCAB, assert_same_weights, make_tiny_model
from prunenet.arithmetic import PRECISIONS, autocast, default_precision
from prunenet.cli import main
from prunenet.errors import InputError, OutputError
from prunenet.evaluation.corpora import load_corpus
from prunenet.evaluation.perplexity import perplexity
from prunenet.families import family_for
from prunenet.finetune import (
    DEFAULT_LR,
    DEFAULT_SEQLEN,
    SELF_GENERATED,
    FinetuneConfig,
    add_lora,
    corpus_windows,
    finetune,
)
from prunenet.pipeline import prune

SUBJECTS = "the cat|a dog|the big bird|a small fox|the red hen".split("|")
VERBS = "sat|ran|flew|slept|hid".split("|")
PLACES = "on the mat|under the log|over the tree|near a pond|in the barn".split("|")
WORDS = sorted({word for phrase in SUBJECTS + VERBS + PLACES for word in phrase.split()} | {"."})
SETTINGS = dict(seqlen=32, batch_size=4, eval_windows=4, lr=2e-2, seed=0)


class Interrupted(Exception):
    """Stands in for a crash or Ctrl-C in the middle of training."""


class InterruptAt(transformers.TrainerCallback):
    def __init__(self, step: int, error: type[BaseException] = Interrupted) -> None:
        self.step = step
        self.error = error

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise self.error


class Recorder(transformers.TrainerCallback):
    """Records the steps run, the parameters holding gradients, and the training batches."""

    def __init__(self) -> None:
        self.steps, self.with_grad, self.batches = [], set(), []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def capture(module, args, kwargs):
            if module.training:
                self.batches.append(kwargs["input_ids"].detach().clone())

        model.register_forward_pre_hook(capture, with_kwargs=True)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.with_grad |= {n for n, p in model.named_parameters() if p.grad is not None}

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, **{word: index + 1 for index, word in enumerate(WORDS)}}
    assert len(vocab) <= VOCAB
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")


def _corpus_text(sentences: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(
        f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(PLACES)} ."
        for _ in range(sentences)
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny LLaMA pruned at 0.25 (random rows, with prunenet.json) and a text corpus."""
    root = tmp_path_factory.mktemp("finetune")
    dense = root / "dense"
    model = make_tiny_model("llama")
    with torch.no_grad():  # a frozen head this small can only say "uniform" unless it is scaled up
        model.lm_head.weight.mul_(10)
    model.save_pretrained(dense)
    _tokenizer().save_pretrained(dense)
    pruned = root / "pruned"
    prune(str(dense), None, 0.25, method="random", out=pruned)
    corpus = root / "corpus.txt"
    corpus.write_text(_corpus_text(900))  # ~6,700 tokens: half held out
    return SimpleNamespace(root=root, dense=dense, pruned=pruned, corpus=str(corpus))


@pytest.fixture(scope="module")
def trained(setup):
    recorder = Recorder()
    out = setup.root / "trained"
    result = finetune(setup.pruned, setup.corpus, out, steps=10, eval_every=5, patience=None,
                      progress=False, callbacks=[recorder], **SETTINGS)
    return SimpleNamespace(result=result, out=out, recorder=recorder)


def _load(folder) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def test_a_few_steps_reduce_training_loss(setup, trained):
    tokenizer = transformers.AutoTokenizer.from_pretrained(setup.pruned)
    training, _ = corpus_windows(setup.corpus, tokenizer, 32, 4)
    before = perplexity(_load(setup.pruned), training[:16], progress=False)
    after = perplexity(_load(trained.out), training[:16], progress=False)
    assert after < 0.5 * before
    entry = trained.result.record["finetune"]
    assert entry["steps_run"] == 10 and trained.recorder.steps == list(range(1, 11))
    assert entry["eval_perplexity_after"] < entry["eval_perplexity_before"]


def test_only_lora_parameters_receive_gradients_and_change(setup, trained):
    names = trained.recorder.with_grad
    lora = {n for n in names if ".lora_A." in n or ".lora_B." in n}
    assert names == lora
    # Every target module of both groups (attention and FFN) of both layers got an adapter.
    targets = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora} == targets
    assert len(lora) == 2 * 2 * len(targets)
    before = load_file(setup.pruned / "model.safetensors")
    after = load_file(trained.out / "model.safetensors")
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        changed = not torch.equal(tensor, after[name])
        assert changed == (name.rsplit(".", 2)[-2] in targets), name


def test_merged_checkpoint_equals_adapter_applied_model(setup, trained):
    from peft import PeftModel

    adapter_config = json.loads((trained.out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(setup.pruned.resolve())
    merged = _load(trained.out)
    adapted = PeftModel.from_pretrained(_load(setup.pruned), trained.out / "adapter").eval()
    windows = torch.randint(0, len(WORDS) + 1, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = adapted(windows).logits, merged(windows).logits
    assert not torch.allclose(_load(setup.pruned)(windows).logits, expected, atol=1e-3)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_record_is_carried_over_and_the_best_checkpoint_kept(setup, trained):
    source_record = json.loads((setup.pruned / "prunenet.json").read_text())
    record = json.loads((trained.out / "prunenet.json").read_text())
    assert {k: v for k, v in record.items() if k != "finetune"} == source_record
    entry = record["finetune"]
    assert entry["settings"]["lr"] == 2e-2 and entry["settings"]["lora_r"] == 8
    history = [point["perplexity"] for point in entry["eval_history"]]
    assert [point["step"] for point in entry["eval_history"]] == [5, 10]
    assert entry["eval_perplexity_after"] == pytest.approx(min(history), rel=1e-5)
    assert entry["best_step"] == [5, 10][history.index(min(history))]
    tokenizer = transformers.AutoTokenizer.from_pretrained(setup.pruned)
    _, evaluation = corpus_windows(setup.corpus, tokenizer, 32, 4)
    with autocast("cpu", entry["settings"]["precision"]):  # evaluation computes as training
        expected = perplexity(_load(setup.pruned), evaluation, progress=False)
    assert entry["eval_perplexity_before"] == pytest.approx(expected, rel=1e-5)
    assert not (setup.root / "trained.work").exists()


def test_training_never_sees_evaluation_windows(setup, trained):
    tokenizer = transformers.AutoTokenizer.from_pretrained(setup.pruned)
    corpus = load_corpus(setup.corpus, tokenizer)
    training, evaluation = corpus_windows(setup.corpus, tokenizer, 32, 4)
    fed = {tuple(row.tolist()) for batch in trained.recorder.batches for row in batch}
    assert len(fed) == 10 * 4  # 10 steps of 4 distinct windows (fewer than one epoch)
    assert fed <= {tuple(row.tolist()) for row in training}
    evaluation_region = corpus.tokens[: corpus.evaluation_tokens].tolist()
    assert evaluation.numel() <= len(evaluation_region)
    region_windows = {tuple(evaluation_region[i:i + 32])
                      for i in range(len(evaluation_region) - 31)}
    assert not fed & region_windows  # not even a shifted window of the held-out text


class Spoil(transformers.TrainerCallback):
    """Stands in for training that makes the model worse: after every step the LoRA
    updates get large random values, far from anything the optimiser would choose."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        generator = torch.Generator().manual_seed(state.global_step)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.add_(50 * torch.randn(parameter.shape, generator=generator))


def test_an_output_worse_than_its_input_is_said_so(setup, trained, caplog):
    settings = dict(SETTINGS, steps=2, eval_every=1, patience=None, progress=False)
    with caplog.at_level("WARNING", logger="prunenet.finetune"):
        improved = finetune(setup.pruned, setup.corpus, setup.root / "improved", **settings)
    entry = improved.record["finetune"]
    assert entry["eval_perplexity_after"] < entry["eval_perplexity_before"]
    assert not caplog.records
    with caplog.at_level("WARNING", logger="prunenet.finetune"):  # from a fine-tuned input
        spoiled = finetune(trained.out, setup.corpus, setup.root / "spoiled",
                           callbacks=[Spoil()], **settings)
    entry = spoiled.record["finetune"]
    assert entry["eval_perplexity_after"] > entry["eval_perplexity_before"]
    assert [record.getMessage() for record in caplog.records] == [
        f"the fine-tuned model does worse than its input on the 4 held-out windows (perplexity "
        f"{entry['eval_perplexity_before']:.4g} -> {entry['eval_perplexity_after']:.4g}); the "
        "output is the best checkpoint evaluated during training. More steps, a lower --lr or "
        "more text may help"]


def test_resume_continues_from_the_saved_step_and_matches_an_uninterrupted_run(setup):
    settings = dict(steps=6, eval_every=2, progress=False, **SETTINGS)
    straight = finetune(setup.pruned, setup.corpus, setup.root / "straight", **settings)
    out = setup.root / "resumed"
    with pytest.raises(Interrupted):
        finetune(setup.pruned, setup.corpus, out, callbacks=[InterruptAt(3)], **settings)
    assert not out.exists()
    assert sorted(p.name for p in (setup.root / "resumed.work").glob("checkpoint-*")) == [
        "checkpoint-2"]
    recorder = Recorder()
    resumed = finetune(setup.pruned, setup.corpus, out, resume=True, callbacks=[recorder],
                       **settings)
    assert recorder.steps == [3, 4, 5, 6]
    assert resumed.record["finetune"]["resumed_from_step"] == 2
    assert resumed.record["finetune"]["steps_run"] == 6
    assert_same_weights(setup.root / "straight", out)
    assert resumed.record["finetune"]["eval_perplexity_after"] == pytest.approx(
        straight.record["finetune"]["eval_perplexity_after"], rel=1e-5)


class InterruptAtTheEnd(transformers.TrainerCallback):
    """Ctrl-C once training has ended: after its last checkpoint, before the output is written."""

    def on_train_end(self, args, state, control, **kwargs):
        raise KeyboardInterrupt


def _same_run(resumed, straight) -> None:
    """Two fine-tune results that ran the same steps, evaluations and losses."""
    keys = ("steps_run", "best_step", "eval_history", "train_loss", "eval_perplexity_after")
    assert {key: resumed.record["finetune"][key] for key in keys} == {
        key: straight.record["finetune"][key] for key in keys}


def test_resume_after_the_last_checkpoint_trains_no_step_past_the_end(setup):
    """Interrupted after the run's last step was saved, --resume writes the output of the
    uninterrupted run: no seventh step of six, no evaluation after the last."""
    settings = dict(steps=6, eval_every=2, patience=None, progress=False, **SETTINGS)
    straight = finetune(setup.pruned, setup.corpus, setup.root / "ended-straight", **settings)
    out = setup.root / "ended"
    with pytest.raises(KeyboardInterrupt):
        finetune(setup.pruned, setup.corpus, out, callbacks=[InterruptAtTheEnd()], **settings)
    recorder = Recorder()
    resumed = finetune(setup.pruned, setup.corpus, out, resume=True, callbacks=[recorder],
                       **settings)
    assert recorder.steps == [] and resumed.record["finetune"]["resumed_from_step"] == 6
    _same_run(resumed, straight)
    assert_same_weights(setup.root / "ended-straight", out)


def test_resume_continues_early_stopping_where_the_run_left_it(setup):
    """Early stopping's count of evaluations without improvement goes on from the checkpoint:
    a run resumed after one evaluation that did not improve stops where the uninterrupted run
    stopped, and so does one interrupted after it had stopped early."""
    settings = dict(steps=40, eval_every=1, patience=2, progress=False,
                    **{**SETTINGS, "lr": 5e-2})
    straight = finetune(setup.pruned, setup.corpus, setup.root / "patient", **settings)
    history = [point["perplexity"] for point in straight.record["finetune"]["eval_history"]]
    worse = next(step for step, value in enumerate(history, 1) if value >= min(history[:step - 1],
                                                                             default=math.inf))
    stopped = straight.record["finetune"]["steps_run"]
    assert worse < stopped < settings["steps"]  # the run stopped early, not at its first miss
    out = setup.root / "patient-resumed"
    with pytest.raises(Interrupted):
        finetune(setup.pruned, setup.corpus, out, callbacks=[InterruptAt(worse + 1)], **settings)
    resumed = finetune(setup.pruned, setup.corpus, out, resume=True, **settings)
    assert resumed.record["finetune"]["resumed_from_step"] == worse
    _same_run(resumed, straight)
    assert_same_weights(setup.root / "patient", out)
    out = setup.root / "patient-ended"
    with pytest.raises(KeyboardInterrupt):
        finetune(setup.pruned, setup.corpus, out, callbacks=[InterruptAtTheEnd()], **settings)
    resumed = finetune(setup.pruned, setup.corpus, out, resume=True, **settings)
    assert resumed.record["finetune"]["resumed_from_step"] == stopped
    _same_run(resumed, straight)
    assert_same_weights(setup.root / "patient", out)


def _resumed_past_a_damaged_checkpoint(setup, name: str, damage) -> dict:
    """Stop a 6-step run at step 5, ``damage`` checkpoint-4's trainer_state.json, resume: it
    continues from checkpoint-2 and ends as the uninterrupted run. Returns the settings."""
    settings = dict(steps=6, eval_every=2, progress=False, **SETTINGS)
    if not (setup.root / "straight").exists():  # the uninterrupted run of the tests above
        finetune(setup.pruned, setup.corpus, setup.root / "straight", **settings)
    out = setup.root / name
    with pytest.raises(Interrupted):
        finetune(setup.pruned, setup.corpus, out, callbacks=[InterruptAt(5)], **settings)
    damage(setup.root / f"{name}.work" / "checkpoint-4" / "trainer_state.json")
    recorder = Recorder()
    resumed = finetune(setup.pruned, setup.corpus, out, resume=True, callbacks=[recorder],
                       **settings)
    assert recorder.steps == [3, 4, 5, 6] and resumed.record["finetune"]["resumed_from_step"] == 2
    assert_same_weights(setup.root / "straight", out)
    return settings


def test_a_checkpoint_whose_save_was_killed_is_dropped_on_resume(setup):
    """Killed while the Trainer saved checkpoint-4 (its trainer_state.json, written last, is
    missing): --resume continues from checkpoint-2 and ends as an uninterrupted run, and
    --overwrite may replace the work folder; neither refuses it as someone else's."""
    settings = _resumed_past_a_damaged_checkpoint(setup, "killed", Path.unlink)
    with pytest.raises(Interrupted):
        finetune(setup.pruned, setup.corpus, setup.root / "killed2",
                 callbacks=[InterruptAt(5)], **settings)
    (setup.root / "killed2.work" / "checkpoint-4" / "trainer_state.json").unlink()
    finetune(setup.pruned, setup.corpus, setup.root / "killed2", overwrite=True, **settings)
    assert_same_weights(setup.root / "straight", setup.root / "killed2")


def test_a_checkpoint_killed_while_writing_its_trainer_state_is_dropped_on_resume(setup):
    """Killed while the Trainer wrote checkpoint-4's trainer_state.json (in place, so cut
    short): --resume continues from checkpoint-2 and ends as an uninterrupted run."""
    _resumed_past_a_damaged_checkpoint(
        setup, "cut-short", lambda state: state.write_text(state.read_text()[:100]))


def test_a_crash_before_the_first_checkpoint_leaves_no_work_folder(setup, capsys):
    """A crash before any checkpoint was saved leaves nothing to resume, so no work folder
    that the next run would refuse as an interrupted run; Ctrl-C keeps its folder as always."""
    settings = dict(steps=4, eval_every=2, progress=False, **SETTINGS)
    out = setup.root / "crashed"
    with pytest.raises(Interrupted):
        finetune(setup.pruned, setup.corpus, out, callbacks=[InterruptAt(1)], **settings)
    assert not out.exists() and not (setup.root / "crashed.work").exists()
    assert finetune(setup.pruned, setup.corpus, out, **settings).record["finetune"][
        "steps_run"] == 4
    stopped = setup.root / "stopped"
    with pytest.raises(KeyboardInterrupt):
        finetune(setup.pruned, setup.corpus, stopped,
                 callbacks=[InterruptAt(1, KeyboardInterrupt)], **settings)
    assert (setup.root / "stopped.work").is_dir()
    with pytest.raises(OutputError, match="holds an interrupted fine-tuning run"):
        finetune(setup.pruned, setup.corpus, stopped, **settings)


def test_a_full_disk_while_the_trainer_saves_is_one_line(setup, capsys, monkeypatch):
    """torch.save failing to write (here: onto /dev/full, a disk that is always full) is a
    one-line error naming the work folder, not torch's RuntimeError with a traceback; a run
    with no checkpoint saved leaves no work folder."""
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *args, **kwargs:
                        real_save(obj, "/dev/full", *args, **kwargs))
    out = setup.root / "full"
    assert main(["-q", "finetune", str(setup.pruned), "--data", str(setup.corpus), "--out",
                 str(out), "--steps", "2", "--eval-every", "1", "--seqlen", "16",
                 "--eval-windows", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith(f"prunenet: error: writing the fine-tune's files under "
                             f"{out.parent / 'full.work'} failed (torch.save: [enforce fail at "
                             "inline_container"), err[0]
    assert err[0].endswith("the disk may be full")
    assert sorted(p.name for p in setup.root.iterdir() if p.name.startswith("full")) == []


def _interrupted_then_resumed(capsys, monkeypatch, argv: list[str], work: Path) -> Path:
    """Run ``argv`` with training stopped by Ctrl-C; check the line names ``work`` (not the
    files inside) with a command, run that command, and return the output it wrote."""
    import shlex

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(transformers.Trainer, "train", interrupted)
        assert main(argv) == 130
    line = capsys.readouterr().err.strip()
    prefix = "prunenet: interrupted; written complete before the interrupt: "
    assert line.startswith(prefix) and line.endswith(
        "; delete it to start over); every other output was not written and nothing partial "
        "was left behind"), line
    assert f"{work} (the fine-tune's work folder, `prunenet finetune " in line, line
    command = line.split("`")[1]
    assert "--resume" in shlex.split(command) and work.is_dir()
    assert main(["-q", *shlex.split(command)[1:]]) == 0, capsys.readouterr().err
    assert not work.exists()
    return Path(shlex.split(command)[shlex.split(command).index("--out") + 1])


def test_an_interrupted_fine_tune_names_its_work_folder_and_the_command_that_resumes_it(
        setup, capsys, monkeypatch):
    """Ctrl-C during training: the line names the work folder kept for --resume, not the
    settings file written inside it as if it were an output, and the command that resumes
    it, which ends the run with the settings asked."""
    out = setup.root / "stopped-cli"
    resumed = _interrupted_then_resumed(
        capsys, monkeypatch, ["-q", "finetune", str(setup.pruned), "--data", str(setup.corpus),
                              "--out", str(out), "--steps", "2", "--seqlen", "16",
                              "--eval-windows", "1", "--no-merge"],
        (setup.root / "stopped-cli.work").resolve())
    assert resumed == out.resolve()
    record = json.loads((out / "prunenet.json").read_text())["finetune"]
    assert (record["steps_run"], record["settings"]["seqlen"], record["merged"]) == (2, 16, False)


def test_a_recovery_compress_ran_is_resumed_by_the_command_its_interrupt_names(
        setup, tmp_path, capsys, monkeypatch):
    """compress cannot resume its recovery (its --out exists by then): the interrupt line
    names the prunenet finetune command that does."""
    out = tmp_path / "compressed"
    resumed = _interrupted_then_resumed(
        capsys, monkeypatch, ["-q", "compress", str(setup.dense), "--ratio", "0.25", "--method",
                              "random", "--out", str(out), "--finetune-steps", "2",
                              "--finetune-data", setup.corpus, "--finetune-seqlen", "32"],
        (tmp_path / "compressed-finetuned.work").resolve())
    assert resumed == (tmp_path / "compressed-finetuned").resolve()
    record = json.loads((resumed / "prunenet.json").read_text())
    assert record["method"] == "random" and record["finetune"]["steps_run"] == 2
    assert record["finetune"]["source"] == str(out.resolve())


def test_an_interrupted_overwrite_of_an_earlier_output_is_resumed_not_called_complete(
        setup, capsys, monkeypatch):
    """--overwrite over an earlier fine-tune's output, stopped while training: that output is
    not this run's, so the line names the command that resumes the run (with --overwrite, to
    replace it as the run would have), not that the work folder can be deleted."""
    out = setup.root / "replaced"
    settings = ["--data", str(setup.corpus), "--out", str(out), "--seqlen", "16",
                "--eval-windows", "1"]
    assert main(["-q", "finetune", str(setup.pruned), *settings, "--steps", "1"]) == 0
    capsys.readouterr()
    resumed = _interrupted_then_resumed(
        capsys, monkeypatch, ["-q", "finetune", str(setup.pruned), *settings, "--steps", "2",
                              "--overwrite"], (setup.root / "replaced.work").resolve())
    assert resumed == out.resolve()
    assert json.loads((out / "prunenet.json").read_text())["finetune"]["steps_run"] == 2


def test_an_interrupt_once_the_output_is_complete_says_the_work_folder_can_go(
        setup, capsys, monkeypatch):
    """Stopped while it deletes its work folder, after its output is in place: the line says
    the output is complete and names no resume (which would be refused: the output exists)."""
    import shutil
    from types import SimpleNamespace

    module = sys.modules["prunenet.finetune"]
    out = setup.root / "complete"

    def rmtree(path, *args, **kwargs):
        if Path(path).name == "complete.work":
            raise KeyboardInterrupt
        return shutil.rmtree(path, *args, **kwargs)

    monkeypatch.setattr(module, "shutil", SimpleNamespace(**{**vars(shutil), "rmtree": rmtree}))
    assert main(["-q", "finetune", str(setup.pruned), "--data", str(setup.corpus), "--out",
                 str(out), "--steps", "1", "--seqlen", "16", "--eval-windows", "1"]) == 130
    work = (setup.root / "complete.work").resolve()
    line = capsys.readouterr().err.strip()
    assert f"{work} (the work folder of a fine-tune whose output {out.resolve()} is complete: " \
        "delete it)" in line and "--resume" not in line, line
    assert (out / "prunenet.json").is_file()


def test_resume_refuses_contradicting_settings(setup):
    out = setup.root / "contradict"
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C keeps the work folder of an early stop
        finetune(setup.pruned, setup.corpus, out, steps=4,
                 callbacks=[InterruptAt(1, KeyboardInterrupt)], progress=False, **SETTINGS)
    with pytest.raises(OutputError, match="pass --resume"):
        finetune(setup.pruned, setup.corpus, out, steps=4, progress=False, **SETTINGS)
    changed = {**SETTINGS, "lr": 1e-3}
    with pytest.raises(InputError, match=r"lr: checkpoint 0\.02, now 0\.001"):
        finetune(setup.pruned, setup.corpus, out, steps=4, resume=True, **changed)
    with pytest.raises(InputError, match="steps: checkpoint 4, now 5"):
        finetune(setup.pruned, setup.corpus, out, steps=5, resume=True, **SETTINGS)
    with pytest.raises(InputError, match="nothing to resume"):
        finetune(setup.pruned, setup.corpus, setup.root / "never", resume=True, **SETTINGS)


def test_resume_refuses_a_work_folder_whose_input_now_holds_other_weights(setup):
    """The input compressed again at the same path, by another method (the same shapes): the
    checkpoints trained adapters for other weights, so --resume is refused and they are kept."""
    model = setup.root / "recompressed"
    shutil.copytree(setup.pruned, model)
    out = setup.root / "recompressed-tuned"
    settings = dict(steps=6, eval_every=2, progress=False, **SETTINGS)
    with pytest.raises(Interrupted):
        finetune(model, setup.corpus, out, callbacks=[InterruptAt(3)], **settings)
    prune(str(setup.dense), None, 0.25, method="magnitude", out=model, overwrite=True)
    with pytest.raises(InputError, match=f"the model {model} holds other weights than the "
                       "interrupted run in .*recompressed-tuned.work trained on"):
        finetune(model, setup.corpus, out, resume=True, **settings)
    assert not out.exists()
    assert sorted(p.name for p in (setup.root / "recompressed-tuned.work").glob(
        "checkpoint-*")) == ["checkpoint-2"]


def test_resume_refuses_a_work_folder_whose_corpus_now_holds_other_text(setup):
    """The corpus file rewritten since the interruption: the resumed run would train, and pick
    its best checkpoint, on other windows than the checkpoints saw."""
    corpus = setup.root / "rewritten.txt"
    corpus.write_text(_corpus_text(900))
    out = setup.root / "rewritten-tuned"
    settings = dict(steps=6, eval_every=2, progress=False, **SETTINGS)
    with pytest.raises(Interrupted):
        finetune(setup.pruned, corpus, out, callbacks=[InterruptAt(3)], **settings)
    corpus.write_text(_corpus_text(900, seed=1))
    with pytest.raises(InputError, match=f"the corpus {corpus} holds other text than the "
                       "interrupted run in .*rewritten-tuned.work trained on"):
        finetune(setup.pruned, corpus, out, resume=True, **settings)
    assert (setup.root / "rewritten-tuned.work" / "checkpoint-2").is_dir()


def test_resume_refuses_another_device_and_its_command_names_the_device(setup):
    """The device type a run trained on is one of its settings: its resume command repeats
    --device cpu, and a resume on another device (its draws and arithmetic differ) is refused."""
    import shlex

    from prunenet.finetune import resume_command

    out = setup.root / "on-cpu"
    settings = dict(steps=4, eval_every=2, progress=False, **SETTINGS)
    with pytest.raises(Interrupted):
        finetune(setup.pruned, setup.corpus, out, device="cpu", callbacks=[InterruptAt(3)],
                 **settings)
    work = (setup.root / "on-cpu.work").resolve()
    command = shlex.split(resume_command(work))
    assert command[command.index("--device") + 1] == "cpu"
    settings_file = work / "prunenet-finetune.json"
    saved = json.loads(settings_file.read_text())
    assert saved["device"] == "cpu"
    settings_file.write_text(json.dumps({**saved, "device": "cuda"}))  # as a GPU run saves it
    with pytest.raises(InputError, match="device: checkpoint 'cuda', now 'cpu'"):
        finetune(setup.pruned, setup.corpus, out, device="cpu", resume=True, **settings)
    assert (work / "checkpoint-2").is_dir()


def test_resume_takes_lora_settings_left_out_from_the_checkpoint(setup):
    """A LoRA run of rank 4 with alpha 8, resumed without naming them, continues with the
    checkpoint's adapters and ends as the uninterrupted run; naming another rank is refused."""
    lora = dict(lora_r=4, lora_alpha=8.0, targets=("mlp",))
    settings = dict(steps=4, eval_every=2, progress=False, **SETTINGS)
    straight = finetune(setup.pruned, setup.corpus, setup.root / "rank4", **settings, **lora)
    out = setup.root / "rank4-resumed"
    with pytest.raises(Interrupted):
        finetune(setup.pruned, setup.corpus, out, callbacks=[InterruptAt(3)], **settings,
                 **lora)
    with pytest.raises(InputError, match="lora_r: checkpoint 4, now 8"):
        finetune(setup.pruned, setup.corpus, out, resume=True, lora_r=8, **settings)
    resumed = finetune(setup.pruned, setup.corpus, out, resume=True, **settings)
    assert resumed.record["finetune"]["resumed_from_step"] == 2
    assert {key: resumed.record["finetune"]["settings"][key] for key in lora} == {
        "lora_r": 4, "lora_alpha": 8.0, "targets": ["mlp"]}
    assert straight.record["finetune"]["settings"]["lora_r"] == 4
    assert_same_weights(setup.root / "rank4", out)


def test_lora_settings_with_ffn_training_are_refused_before_any_work(setup, tmp_path, capsys):
    """--train ffn trains no adapter: a LoRA setting given with it is refused in one line,
    naming the option, and nothing is written; left out, the FFN run takes no LoRA setting."""
    assert FinetuneConfig(train="ffn").lora_r == 8  # the defaults, never given
    with pytest.raises(InputError, match="--lora-r sets the LoRA adapters; with train 'ffn'"):
        FinetuneConfig(train="ffn", lora_r=8)  # the default's value, given, is refused too
    with pytest.raises(InputError, match="--lora-alpha, --targets set the LoRA adapters"):
        finetune(setup.pruned, setup.corpus, tmp_path / "f", train="ffn", lora_alpha=16.0,
                 targets=("mlp",), **SETTINGS)
    argv = ["finetune", str(setup.pruned), "--data", setup.corpus, "--out", str(tmp_path / "o"),
            "--train", "ffn", "--seqlen", "32"]
    assert main([*argv, "--lora-r", "64"]) == 2
    err = capsys.readouterr().err
    assert "--lora-r sets the LoRA adapters; with train 'ffn' no adapter trains" in err
    assert len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_bad_input_is_refused_with_a_clear_message(setup, tmp_path):
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    with pytest.raises(InputError, match="not a model folder"):
        finetune(not_a_model, setup.corpus, tmp_path / "a", **SETTINGS)
    with pytest.raises(InputError, match="no such file"):
        finetune(setup.pruned, str(tmp_path / "missing.txt"), tmp_path / "b", **SETTINGS)
    short = tmp_path / "short.txt"
    short.write_text(_corpus_text(4))  # 4 sentences, under 40 tokens
    with pytest.raises(InputError, match=r"has \d+ tokens in all"):
        finetune(setup.pruned, str(short), tmp_path / "c", **SETTINGS)
    with pytest.raises(InputError, match="steps must be a positive integer, got 0"):
        finetune(setup.pruned, setup.corpus, tmp_path / "d", steps=0)
    with pytest.raises(InputError, match="valid targets: attn, mlp, q_proj, k_proj"):
        finetune(setup.pruned, setup.corpus, tmp_path / "e", targets=("attn", "c_fc"), **SETTINGS)
    assert not any(tmp_path.glob("[abcde]*"))


def test_a_loaded_model_or_no_out_is_refused_in_one_line(setup, tmp_path):
    """compress and prune take a loaded model; finetune reads a folder. A model object had
    failed as "File name too long" (its printout taken for a path), out=None as a TypeError."""
    with pytest.raises(InputError, match="finetune reads a model folder, .gguf file or Hub id, "
                       "got a LlamaForCausalLM: save it"):
        finetune(_load(setup.pruned), setup.corpus, tmp_path / "a", **SETTINGS)
    with pytest.raises(OutputError, match="--out must be a path, got None"):
        finetune(setup.pruned, setup.corpus, None, resume=True, **SETTINGS)
    assert list(tmp_path.iterdir()) == []


def test_text_too_short_for_its_windows_is_refused_before_any_model_loads(setup, tmp_path,
                                                                         monkeypatch):
    """An empty file, one shorter than a window, or fewer evaluation windows than asked: said
    once the tokenizer has read the text, before the model (of any size) is loaded."""
    module = importlib.import_module("prunenet.finetune")

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(module, "load_model_and_tokenizer", no_load)
    empty, short = tmp_path / "empty.txt", tmp_path / "short.txt"
    empty.write_text("")
    short.write_text(_corpus_text(4))
    for data, settings, message in (
            (empty, SETTINGS, "has 0 tokens in all"), (short, SETTINGS, r"has \d+ tokens in all"),
            (setup.corpus, {**SETTINGS, "eval_windows": 10**4}, "evaluation windows")):
        with pytest.raises(InputError, match=message):
            finetune(setup.pruned, str(data), tmp_path / "out", **settings)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.work").exists()


def test_cli_bad_input_exits_2(setup, tmp_path, capsys):
    argv = ["finetune", str(setup.pruned), "--data", setup.corpus, "--out", str(tmp_path / "o")]
    assert main([*argv, "--targets", "mlp,fc1", "--seqlen", "32"]) == 2
    assert "valid targets: attn, mlp" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--steps", "0"])
    assert exit_info.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--precision", "float16"])
    assert exit_info.value.code == 2
    assert ("invalid choice: 'float16' (choose from 'auto', 'float32', 'bfloat16')"
            in capsys.readouterr().err)
    for dropout in ("nan", "1", "-0.1", "high"):  # named by its option, when it is parsed
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--lora-dropout", dropout])
        assert exit_info.value.code == 2
        assert "argument --lora-dropout: expected a number in [0, 1), got" in \
            capsys.readouterr().err
    with pytest.raises(InputError, match=r"lora_dropout must be in \[0, 1\), got nan"):
        finetune(setup.pruned, setup.corpus, tmp_path / "o", lora_dropout=float("nan"))
    assert not (tmp_path / "o").exists()


def test_compress_chains_finetune(setup, tmp_path):
    out = tmp_path / "compressed"
    assert main(["-q", "compress", str(setup.dense), "--ratio", "0.25", "--method", "random",
                 "--out", str(out), "--finetune-steps", "2", "--finetune-data", setup.corpus,
                 "--finetune-seqlen", "32"]) == 0
    record = json.loads((tmp_path / "compressed-finetuned" / "prunenet.json").read_text())
    assert record["method"] == "random" and record["ratio"] == 0.25
    assert record["finetune"]["steps_run"] == 2
    assert record["finetune"]["source"] == str(out.resolve())


def test_a_fine_tune_record_says_what_changed_and_keeps_an_earlier_one(setup, tmp_path):
    """A compress output with a measured perplexity, fine-tuned twice: the output holds no
    claim about weights it no longer has (the measurement moves under finetune.input), the
    second fine-tune nests the first, and the card names what trained on which data."""
    out = tmp_path / "compressed"
    assert main(["-q", "compress", str(setup.dense), "--ratio", "0.25", "--method", "random",
                 "--reconstruct", "none", "--out", str(out), "--eval", "1"]) == 0
    measured = json.loads((out / "prunenet.json").read_text())["evaluation"]
    finetune(out, setup.corpus, tmp_path / "once", steps=2, progress=False, **SETTINGS)
    once = json.loads((tmp_path / "once" / "prunenet.json").read_text())
    assert "evaluation" not in once and once["finetune"]["input"] == {"evaluation": measured}
    assert "previous" not in once["finetune"]
    finetune(tmp_path / "once", setup.corpus, tmp_path / "twice", steps=2, progress=False,
             train="ffn", **SETTINGS)
    twice = json.loads((tmp_path / "twice" / "prunenet.json").read_text())
    assert twice["finetune"]["trained"] == "FFN weights"
    assert not {"lora_r", "lora_alpha", "lora_dropout", "targets"} & set(
        twice["finetune"]["settings"])  # no adapter ran: none of its settings is recorded
    assert once["finetune"]["settings"]["lora_r"] == 8  # the LoRA run names its rank
    assert twice["finetune"]["previous"]["trained"] == "LoRA adapters"
    assert twice["finetune"]["previous"]["input"] == {"evaluation": measured}
    card = (tmp_path / "twice" / "README.md").read_text()
    assert f"Recovered by fine-tuning FFN weights on `{setup.corpus}` for 2 steps" in card
    assert "Measured after pruning" not in card and "prunenet finetune OUT" in card


def test_a_model_pruned_again_keeps_how_its_input_was_made(setup, trained, tmp_path):
    """A pruned, fine-tuned model pruned again: the new record keeps its input's own record
    (source_history), and the card, the report and every label name the earlier pruning and
    fine-tune, with this run's widths read as relative to that input."""
    from prunenet.naming import compression_summary, run_label
    from prunenet.report import write_report

    again = tmp_path / "again"
    prune(str(trained.out), None, 0.25, method="random", out=again, record_dir=tmp_path / "run")
    earlier = json.loads((trained.out / "prunenet.json").read_text())
    record = json.loads((again / "prunenet.json").read_text())
    assert record["source_history"] == earlier
    assert (record["ffn_width_before"], record["ffn_width_after"]) == (36, 27)
    history = (f"The model this pruning read was made by prunenet: random+ls at ratio 0.25 + "
               f"LoRA fine-tune 10 steps on {setup.corpus} (FFN width 48 -> 36); this "
               "pruning's ratio, FFN widths and parameter counts are relative to that model.")
    assert history in (again / "README.md").read_text()
    # fine-tuned once more, the output still names the whole history
    finetune(again, setup.corpus, tmp_path / "tuned", steps=1, progress=False, **SETTINGS)
    assert json.loads((tmp_path / "tuned" / "prunenet.json").read_text())[
        "source_history"] == earlier
    assert history in (tmp_path / "tuned" / "README.md").read_text()
    report = (write_report(tmp_path / "run") / "report.md").read_text()
    assert f"- {history}" in report
    assert run_label(compression_summary(record)) == (
        f"random+ls at ratio 0.25 + LoRA fine-tune 10 steps on {setup.corpus}, then random+ls "
        "at ratio 0.25")
    assert report.startswith(f"# prunenet run report: {run_label(compression_summary(record))}")


def test_the_summary_of_a_model_pruned_again_says_what_this_run_pruned(setup, trained,
                                                                      tmp_path, capsys):
    """compress's summary line names this run's pruning, of an input prunenet made (named),
    where it had read as if this run had pruned and fine-tuned the whole chain."""
    assert main(["compress", str(trained.out), "--ratio", "0.25", "--method", "random",
                 "--reconstruct", "none", "--out", str(tmp_path / "again")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "pruned random at ratio 0.25 of an input prunenet made (random+ls at ratio 0.25 + LoRA "
        f"fine-tune 10 steps on {setup.corpus}): FFN width 36 -> 27, parameters 21,408 -> "
        "19,680 (-8.1%)")


def test_no_merge_writes_only_the_adapter_and_the_record(setup):
    from peft import PeftModel

    out = setup.root / "adapter-only"
    result = finetune(setup.pruned, setup.corpus, out, steps=2, merge=False, progress=False,
                      **SETTINGS)
    assert isinstance(result.model, PeftModel)
    assert sorted(p.name for p in out.iterdir()) == [
        ".prunenet-files", "README.md", "adapter", "prunenet.json"]
    assert (out / "adapter" / "adapter_config.json").exists()
    assert json.loads((out / "prunenet.json").read_text())["finetune"]["merged"] is False


def test_a_fine_tune_carries_the_license_of_the_model_it_tuned(setup, tmp_path):
    """The input folder's license and notice files go with the output, adapter alone too."""
    source = tmp_path / "licensed"
    shutil.copytree(setup.pruned, source)
    (source / "LICENSE.txt").write_text("the model's terms\n")
    out = tmp_path / "tuned"
    finetune(source, setup.corpus, out, steps=1, merge=False, progress=False, **SETTINGS)
    assert (out / "LICENSE.txt").read_text() == "the model's terms\n"


def test_a_lora_output_is_prunenets_to_replace_with_overwrite(setup, trained, tmp_path):
    """A LoRA run's output, whose adapter/ holds peft's own README.md, is prunenet's: run again
    onto it, it is refused as existing (not as someone else's), and --overwrite replaces it."""
    assert (trained.out / "adapter" / "README.md").is_file()
    out = tmp_path / "again"
    shutil.copytree(trained.out, out)
    with pytest.raises(OutputError, match="already exists; pass --overwrite to replace it"):
        finetune(setup.pruned, setup.corpus, out, steps=1, progress=False, **SETTINGS)
    finetune(setup.pruned, setup.corpus, out, steps=1, overwrite=True, progress=False,
             **SETTINGS)
    assert json.loads((out / "prunenet.json").read_text())["finetune"]["steps_run"] == 1


def test_default_learning_rates_are_the_measured_ones():
    """LoRA 1e-3 (better than 2e-4 on real text and distilling, level with 3e-3), FFN weights
    1e-4, whatever the data; an explicit rate wins (benchmarks/README.md)."""
    assert FinetuneConfig().lr == DEFAULT_LR["lora"] == 1e-3
    assert FinetuneConfig(data=SELF_GENERATED).lr == 1e-3
    assert FinetuneConfig(data=SELF_GENERATED, train="ffn").lr == DEFAULT_LR["ffn"] == 1e-4
    assert FinetuneConfig(lr=5e-4).lr == 5e-4


def test_default_window_length_depends_on_the_data():
    """1024 tokens on a corpus (the evaluation's windows), 256 distilling (measured better for the
    same teacher tokens); an explicit length wins."""
    assert FinetuneConfig().seqlen == DEFAULT_SEQLEN["corpus"] == 1024
    assert FinetuneConfig(data=SELF_GENERATED).seqlen == DEFAULT_SEQLEN[SELF_GENERATED] == 256
    assert FinetuneConfig(data=SELF_GENERATED, seqlen=64).seqlen == 64
    with pytest.raises(InputError, match="seqlen must be at least 2"):
        FinetuneConfig(seqlen=1)


@pytest.mark.parametrize(("native", "expected"), [(True, "bfloat16"), (False, "float32")])
def test_default_precision_on_a_gpu_is_bfloat16_only_where_it_is_native(monkeypatch, native,
                                                                        expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    asked = []

    def supported(including_emulation=True):
        asked.append(including_emulation)
        return native or including_emulation  # V100-like when not native: emulation only

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert default_precision("auto") == default_precision("cuda") == expected
    assert asked == [False, False]
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # an older or other torch
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert default_precision("cpu") == "float32"


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [
    (True, False, "bfloat16"), (False, True, "bfloat16"), (False, False, "float32")])
def test_default_precision_is_bfloat16_only_where_the_cpu_computes_it(monkeypatch, avx512_bf16,
                                                                     amx, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert default_precision("auto") == default_precision("cpu") == expected
    with pytest.raises(InputError, match="precision must be one of float32, bfloat16"):
        FinetuneConfig(precision="float16")


class Arithmetic(transformers.TrainerCallback):
    """The dtype of the first LoRA-wrapped projection's output in training forwards."""

    def __init__(self) -> None:
        self.dtypes: set[torch.dtype] = set()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def capture(module, _inputs, output):
            if module.training:
                self.dtypes.add(output.dtype)

        model.get_submodule("base_model.model.model.layers.0.mlp.down_proj").register_forward_hook(
            capture)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_training_step_runs_in_the_precision_asked_and_the_weights_stay_float32(
        setup, precision, monkeypatch):
    # what `accelerate config` may leave behind must not change the arithmetic the record names
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    arithmetic = Arithmetic()
    out = setup.root / f"precision-{precision}"
    result = finetune(setup.pruned, setup.corpus, out, steps=2, eval_every=2, patience=None,
                      progress=False, callbacks=[arithmetic], precision=precision, **SETTINGS)
    assert arithmetic.dtypes == {getattr(torch, precision)}
    assert result.record["finetune"]["settings"]["precision"] == precision
    assert {p.dtype for p in _load(out).parameters()} == {torch.float32}


def test_an_unset_precision_is_the_devices_default(setup, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    result = finetune(setup.pruned, setup.corpus, setup.root / "unset-precision", steps=1,
                      eval_every=1, patience=None, progress=False, device="cpu", **SETTINGS)
    assert result.record["finetune"]["settings"]["precision"] == "float32"


def test_bfloat16_on_a_gpu_that_cannot_compute_it_is_refused_before_any_work(setup, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla P100")
    with pytest.raises(InputError, match=r"this GPU \(Tesla P100\) cannot compute bfloat16; "
                                         "use --precision float32"):
        finetune(setup.pruned, setup.corpus, tmp_path / "o", precision="bfloat16", **SETTINGS)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.work").exists()


def test_a_corpus_file_is_recorded_by_its_absolute_path(setup, monkeypatch):
    """A corpus named relative to the current folder is recorded, and repeated by the card's
    command, by its absolute path (the text it names from any folder); --resume with the same
    relative path continues the run."""
    monkeypatch.chdir(setup.root)
    settings = dict(steps=2, eval_every=1, patience=None, progress=False, **SETTINGS)
    with pytest.raises(Interrupted):
        finetune("pruned", "corpus.txt", "relative", callbacks=[InterruptAt(2)], **settings)
    result = finetune("pruned", "corpus.txt", "relative", resume=True, **settings)
    absolute = str((setup.root / "corpus.txt").resolve())
    assert result.record["finetune"]["settings"]["data"] == absolute
    card = (setup.root / "relative" / "README.md").read_text()
    assert f"prunenet finetune OUT --data {absolute} " in card


def test_a_fine_tune_leaves_the_callers_random_generators_as_they_were(setup):
    """The run seeds Python's, numpy's and torch's generators from its seed (the Trainer, the
    LoRA initialisation); the caller's next draws are the ones it would have made without it."""
    def draws():
        return (random.random(), float(numpy.random.rand()), float(torch.rand(1)))

    random.seed(7), numpy.random.seed(7), torch.manual_seed(7)
    expected = draws()
    random.seed(7), numpy.random.seed(7), torch.manual_seed(7)
    finetune(setup.pruned, setup.corpus, setup.root / "generators", steps=1, eval_every=1,
             patience=None, progress=False, **SETTINGS)
    assert draws() == expected


def test_patience_takes_zero_for_never_and_refuses_negatives(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "pruned", "--out", "tuned", "--patience", "-1"])
    assert "--patience: expected 0 or a positive integer, got -1" in capsys.readouterr().err


def test_weights_beyond_float16_are_refused_not_saved_as_inf(setup, capsys):
    """A float16 input trained (in float32) to weights beyond float16's range: the output,
    saved in the input's dtype, would hold Inf while the record reports the float32 model's
    perplexity. Refused as a diverged run: no output, no work folder."""
    half = setup.root / "half"
    _load(setup.pruned).to(torch.float16).save_pretrained(half)
    _tokenizer().save_pretrained(half)
    out = setup.root / "half-tuned"
    capsys.readouterr()
    assert main(["-q", "finetune", str(half), "--data", setup.corpus, "--out", str(out),
                 "--train", "ffn", "--lr", "1e5", "--precision", "float32", "--steps", "2",
                 "--seqlen", "32", "--eval-windows", "2"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    assert "fine-tuning diverged: weight model.layers." in error and (
        "grew beyond the range of float16, the input's dtype, and would be saved as Inf; "
        "nothing was saved. Lower --lr and run again") in error, error
    assert not out.exists() and not (setup.root / "half-tuned.work").exists()


def test_patience_zero_from_python_never_stops_early_as_on_the_command_line(setup):
    """patience=0 is --patience 0, never: the Trainer's own 0 had stopped at the first
    evaluation, while the card's command (--patience 0) repeats a run that never stops."""
    result = finetune(setup.pruned, setup.corpus, setup.root / "patience-zero", steps=4,
                      eval_every=1, patience=0, progress=False, **SETTINGS)
    entry = result.record["finetune"]
    assert entry["steps_run"] == 4 and [point["step"] for point in entry["eval_history"]] == [
        1, 2, 3, 4]
    assert entry["settings"]["patience"] is None
    for bad in (-1, True, 1.5):
        with pytest.raises(InputError, match=r"patience must be 0 \(never stop early\) or a "
                           "positive integer"):
            FinetuneConfig(patience=bad)


def test_zero_evaluation_interval_or_teacher_windows_from_python_is_refused():
    """0 is not "the default" (None): it had run with evaluations every step, or the default
    count of teacher windows, and recorded 0, which the card's command then gave back to a
    command line that refuses it."""
    with pytest.raises(InputError, match="eval_every must be a positive integer, got 0"):
        FinetuneConfig(eval_every=0)
    with pytest.raises(InputError, match="generated_windows must be a positive integer, got 0"):
        FinetuneConfig(data=SELF_GENERATED, generated_windows=0)


@pytest.mark.parametrize("train", ["lora", "ffn"])
def test_a_gguf_file_fine_tunes_and_saves_a_plain_checkpoint(tmp_path, capsys, train):
    """A GGUF read by transformers is dequantized, and no longer marked quantized: the
    Trainer fine-tunes it (it refused a model marked quantized, and crashed naming none), the
    output is a plain checkpoint, and the adapter needs no config.json beside the GGUF."""
    from prunenet.assets import asset_path

    gguf = asset_path("tinycoder-gguf") / "tiny.gguf"
    text = tmp_path / "text.txt"
    text.write_text("the river runs high in spring and low in autumn. " * 200)
    out = tmp_path / "ft"
    capsys.readouterr()
    assert main(["-q", "finetune", str(gguf), "--data", str(text), "--out", str(out),
                 "--steps", "1", "--seqlen", "16", "--eval-windows", "1", "--train",
                 train]) == 0, capsys.readouterr().err
    assert "Could not find a config file" not in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert (out / "adapter").is_dir() == (train == "lora")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.float32 and not getattr(reloaded, "is_quantized", False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ft", "text.txt"]


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_the_mlp_group_adapts_the_ffn_and_the_attn_group_only_the_rest(model_type):
    """--targets mlp puts adapters on exactly the FFN's matrices of every layer, and attn on
    none of them (GPT-2's attention and FFN both hold a c_proj: either group had adapted both)."""
    def adapted(group: str) -> set[str]:
        model = add_lora(make_tiny_model(model_type), FinetuneConfig(targets=(group,)))
        return {name.split(".lora_A.")[0].split(f"{family.layers}.0.")[-1]
                for name, _ in model.named_parameters()
                if ".lora_A." in name and f"{family.layers}.0." in name}

    family = family_for(model_type)
    ffn = {cut.name.rsplit(".", 1)[0] for cut in family.cuts if cut.name.endswith(".weight")}
    assert adapted("mlp") == ffn
    attention = adapted("attn")
    assert attention and not attention & ffn


def test_an_evaluation_loss_beyond_exp_is_an_infinite_perplexity_refused_as_divergence(
        tmp_path):
    """A mean held-out loss above 709.78 nats has no float exponential: it reads as an infinite
    perplexity, which the run refuses as diverged (math.exp had raised an OverflowError
    traceback); below it, the plain exponential."""
    import math

    from prunenet.arithmetic import exp_or_inf
    from prunenet.errors import NumericalError
    from prunenet.finetune import _check_finite_run, _evaluation

    assert _evaluation({"eval_loss": 800.0}) == {"perplexity": math.inf}
    assert _evaluation({"eval_loss": 2.0}) == {"perplexity": math.exp(2.0)}
    assert exp_or_inf(709.0) == math.exp(709.0) and exp_or_inf(710.0) == math.inf  # distilling
    work = tmp_path / "out.work"
    work.mkdir()
    with pytest.raises(NumericalError, match="diverged"):
        _check_finite_run(torch.nn.Linear(2, 2), [{"loss": 1.0}], math.inf, work)
    assert not work.exists()
