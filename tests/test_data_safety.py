"""Nothing the user gave is ever written over, into or around; broken inputs are refused.

Each data-loss test proves the victim file or folder byte-identical afterwards; each refusal
is one line ``prunenet: error: ...`` with exit status 2 and no traceback.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import stat
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import edit_config, make_tiny_model
from prunenet.cli import main
from prunenet.errors import InputError, PruneNetError
from prunenet.finetune import FinetuneConfig
from prunenet.io.files import NAME_MAX, is_staging_name, sibling_path, sibling_prefix
from prunenet.io.loading import load_model_and_tokenizer, validate_safetensors
from prunenet.io.policy_file import is_policy_file, save_policy
from prunenet.selection.prunenet.policy import PrunePolicy


def digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (or of the file itself), by relative name."""
    path = Path(path)
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def refused(capsys, argv: list[str], match: str) -> str:
    """Run the CLI; assert exit 2 with one error line matching ``match``; return it."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("prunenet: error: "), err
    assert "Traceback" not in "\n".join(err)
    assert match in err[-1], err[-1]
    return err[-1]


@pytest.fixture
def models(tmp_path) -> Path:
    """models/p/llama (a tiny model) beside models/p/notes.txt, a file of the user's."""
    folder = tmp_path / "models" / "p"
    make_tiny_model("llama").save_pretrained(folder / "llama")
    (folder / "notes.txt").write_text("the user's own notes\n")
    return folder


# --- data loss ---------------------------------------------------------------------------------


def test_out_containing_the_input_is_refused_even_with_overwrite(models, capsys):
    before = digest(models)
    refused(capsys, ["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--out",
                     str(models), "--overwrite", "--method", "random"], "contains the input")
    assert digest(models) == before


@pytest.mark.parametrize("where", ["input", "parent"])
def test_out_dot_from_inside_or_above_the_input_is_refused(models, capsys, monkeypatch, where):
    before = digest(models)
    monkeypatch.chdir(models / "llama" if where == "input" else models)
    refused(capsys, ["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--out", ".",
                     "--overwrite", "--method", "random"], "the input")
    assert digest(models) == before


def test_policy_out_onto_the_input_weights_is_refused(models, capsys):
    weights = models / "llama" / "model.safetensors"
    before = digest(models)
    refused(capsys, ["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--out",
                     str(models.parent / "out"), "--method",
                     "prunenet", "--episodes", "1", "--policy-out", str(weights)], "the input")
    assert digest(models) == before
    assert not (models.parent / "out").exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_policy_out_onto_any_existing_file_is_refused(models, tmp_path, capsys, overwrite):
    victim = tmp_path / "thesis.safetensors"
    victim.write_bytes(b"not a policy")
    refused(capsys, ["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--out",
                     str(tmp_path / "out"), "--method", "prunenet", "--episodes", "1",
                     "--policy-out", str(victim), *(["--overwrite"] if overwrite else [])],
            "prunenet replaces only its own outputs")  # with --overwrite or without
    assert victim.read_bytes() == b"not a policy"


def test_policy_out_replaces_a_previous_policy_with_overwrite(models, tmp_path):
    policy_file = tmp_path / "p.safetensors"
    save_policy(PrunePolicy(32, 48), policy_file, {})
    old = policy_file.read_bytes()
    assert main(["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--out",
                 str(tmp_path / "out"), "--method", "prunenet", "--episodes", "1",
                 "--policy-out", str(policy_file), "--overwrite"]) == 0
    assert policy_file.read_bytes() != old


@pytest.mark.parametrize("command", ["train-policy", "compress"])
def test_a_policy_output_named_by_a_symlink_is_written_through_it(models, tmp_path, command):
    """A link as the policy's name: the file it names is written (absent first, then replaced
    with --overwrite), as the output checks judged it; the link stays a link."""
    target, link = tmp_path / "kept" / "policy.safetensors", tmp_path / "p.safetensors"
    target.parent.mkdir()
    link.symlink_to(target)  # dangling until the first run
    argv = (["-q", "train-policy", str(models / "llama"), "--ratio", "0.5", "--episodes", "1",
             "--out", str(link)] if command == "train-policy" else
            ["-q", "compress", str(models / "llama"), "--ratio", "0.5", "--method", "prunenet",
             "--episodes", "1", "--reconstruct", "none", "--out", str(tmp_path / "o"),
             "--policy-out", str(link)])
    assert main(argv) == 0
    assert link.is_symlink() and is_policy_file(target)
    first = target.read_bytes()
    assert main([*argv, "--seed", "1", "--overwrite"]) == 0
    assert link.is_symlink() and is_policy_file(target) and target.read_bytes() != first
    assert sorted(p.name for p in target.parent.iterdir()) == ["policy.safetensors"]


@pytest.fixture
def run_record(models, tmp_path) -> Path:
    record = tmp_path / "run"
    assert main(["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--out",
                 str(tmp_path / "out"), "--method", "random", "--record", str(record)]) == 0
    return record


def test_report_out_onto_its_run_record_is_refused(run_record, capsys):
    """Only the record's own report/ folder may sit inside it; the record itself, or any other
    folder inside it, is refused (a foreign folder inside would make it no record any more)."""
    before = digest(run_record)
    refused(capsys, ["-q", "report", str(run_record), "--out", str(run_record), "--overwrite"],
            "is the input")
    refused(capsys, ["-q", "report", str(run_record), "--out", str(run_record / "plots")],
            "lies inside the input")
    assert digest(run_record) == before


def test_eval_json_inside_a_ppl_dataset_folder_is_refused(models, tmp_path, capsys):
    data = tmp_path / "my_dataset"
    data.mkdir()
    (data / "dataset_info.json").write_text("{}")
    before = digest(data)
    refused(capsys, ["-q", "eval", str(models / "llama"), "--ppl", str(data), "--json",
                     str(data / "results.json")], "lies inside the input")
    assert digest(data) == before


def test_outputs_inside_a_gguf_model_folder_are_refused(tmp_path, capsys):
    """A folder holding one .gguf is the model the user named: nothing is written into it."""
    from prunenet.assets import asset_path

    folder = tmp_path / "ggufmodel"
    folder.mkdir()
    shutil.copy(asset_path("tinycoder-gguf") / "tiny.gguf", folder / "tiny.gguf")
    (folder / "notes.txt").write_text("mine")
    before = digest(folder)
    refused(capsys, ["-q", "compress", str(folder), "--ratio", "0.5", "--method", "random",
                     "--out", str(folder / "pruned")], "lies inside the input")
    refused(capsys, ["-q", "eval", str(folder), "--ppl", "none", "--json",
                     str(folder / "eval.json")], "lies inside the input")
    refused(capsys, ["-q", "train-policy", str(folder), "--ratio", "0.5", "--out",
                     str(folder / "policy.safetensors")], "lies inside the input")
    refused(capsys, ["-q", "convert", str(folder), "--out", str(folder / "converted")],
            "lies inside the input")
    student = tmp_path / "student"
    make_tiny_model("llama").save_pretrained(student)
    refused(capsys, ["-q", "finetune", str(student), "--data", "self-generated", "--teacher",
                     str(folder), "--out", str(folder / "distilled")], "lies inside the input")
    # the teacher the compressed folder's record names (the folder, as compress read it)
    pruned = tmp_path / "pruned"
    assert main(["-q", "compress", str(folder), "--ratio", "0.5", "--method", "random",
                 "--out", str(pruned)]) == 0
    before = digest(folder)
    refused(capsys, ["-q", "finetune", str(pruned), "--data", "self-generated", "--out",
                     str(folder / "distilled")], "lies inside the input")
    assert digest(folder) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_report_out_never_deletes_other_files_beside_a_previous_report(run_record, tmp_path,
                                                                       capsys, overwrite):
    folder = tmp_path / "mine"
    assert main(["-q", "report", str(run_record), "--out", str(folder)]) == 0
    (folder / "draft.docx").write_bytes(b"user data")
    before = digest(folder)
    refused(capsys, ["-q", "report", str(run_record), "--out", str(folder),
                     *(["--overwrite"] if overwrite else [])],
            "prunenet replaces only its own outputs")  # with --overwrite or without
    assert digest(folder) == before


def test_report_replaces_its_own_previous_report(run_record):
    assert main(["-q", "report", str(run_record)]) == 0
    assert main(["-q", "report", str(run_record)]) == 0  # the default folder is replaced
    assert sorted(p.name for p in (run_record / "report").iterdir() if p.suffix != ".png") == [
        ".prunenet-files",
        "report.html", "report.md"]


def test_report_of_one_record_never_replaces_anothers_report_unasked(run_record, models,
                                                                       tmp_path, capsys):
    """A report already in a record's report/ folder describes that record: another record's
    report goes there only with --overwrite."""
    other = tmp_path / "other-run"
    assert main(["-q", "compress", str(models / "llama"), "--ratio", "0.5", "--out",
                 str(tmp_path / "other-out"), "--method", "magnitude", "--reconstruct", "none",
                 "--record", str(other)]) == 0
    assert main(["-q", "report", str(run_record)]) == 0
    before = digest(run_record)
    refused(capsys, ["-q", "report", str(other), "--out", str(run_record / "report")],
            "already exists")
    assert digest(run_record) == before
    assert main(["-q", "report", str(other), "--out", str(run_record / "report"),
                 "--overwrite"]) == 0
    assert "magnitude" in (run_record / "report" / "report.md").read_text()


def test_eval_json_onto_the_model_config_is_refused(models, capsys):
    before = digest(models)
    refused(capsys, ["-q", "eval", str(models / "llama"), "--ppl", "none", "--json",
                     str(models / "llama" / "config.json")], "the input")
    assert digest(models) == before


def test_eval_json_onto_a_foreign_file_is_refused(models, capsys):
    before = digest(models)
    message = refused(capsys, ["-q", "eval", str(models / "llama"), "--ppl", "none", "--json",
                               str(models / "notes.txt")], "not written by prunenet")
    assert "--overwrite" not in message  # eval has none: it replaces its own JSON without one
    assert digest(models) == before


def test_overwrite_never_replaces_a_folder_prunenet_did_not_make(models, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"jpeg")
    refused(capsys, ["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--out",
                     str(folder), "--overwrite", "--method", "random"], "not written by prunenet")
    assert (folder / "a.jpg").read_bytes() == b"jpeg"


def test_overwrite_replaces_a_previous_output(models, tmp_path):
    out = tmp_path / "out"
    for ratio in ("0.3", "0.5"):
        assert main(["-q", "compress", str(models / "llama"), "--ratio", ratio, "--out",
                     str(out), "--overwrite", "--method", "random"]) == 0
    assert json.loads((out / "prunenet.json").read_text())["ratio"] == 0.5


def test_record_and_policy_out_may_not_overlap_the_output(models, tmp_path, capsys):
    out = tmp_path / "out"
    refused(capsys, ["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--out", str(out),
                     "--method", "prunenet", "--episodes", "1", "--policy-out",
                     str(out / "p.safetensors")], "must be separate")
    assert not out.exists()


# --- the property: refuse before work, or leave every input byte-identical ---------------------

_NAMES = st.sampled_from(["a", "b", "m", ".", ".."])
_LAYOUT = st.fixed_dictionaries({
    "out": st.lists(_NAMES, min_size=1, max_size=4),
    "record": st.one_of(st.none(), st.lists(_NAMES, min_size=1, max_size=3)),
    "symlink": st.booleans(),
    "overwrite": st.booleans(),
})


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=_LAYOUT)
def test_random_output_layouts_never_touch_the_input(tmp_path_factory, layout):
    """Inputs at root/m (the model) with root/m/a a user file; outputs anywhere, relative,
    through ``..`` or a symlink to the input: refused, or the input is byte-identical."""
    root = tmp_path_factory.mktemp("layout")
    model = root / "m"
    make_tiny_model("llama").save_pretrained(model)
    (model / "a").write_text("user file")
    (root / "link").symlink_to(model, target_is_directory=True)
    before = digest(model)
    cwd = os.getcwd()
    os.chdir(model)  # relative outputs start inside the input
    try:
        out = os.path.join(*(["../link"] if layout["symlink"] else []), *layout["out"])
        argv = ["-q", "compress", str(model), "--ratio", "0.3", "--out", out, "--method",
                "random"]
        if layout["record"] is not None:
            argv += ["--record", os.path.join(*layout["record"])]
        if layout["overwrite"]:
            argv.append("--overwrite")
        main(argv)
    finally:
        os.chdir(cwd)
    assert digest(model) == before
    assert sorted(p.name for p in model.iterdir()) == sorted(
        ["a", "config.json", "generation_config.json", "model.safetensors"])
    shutil.rmtree(root)


# --- broken inputs are refused -----------------------------------------------------------------


def _edit_weights(folder: Path, edit) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", ["more layers", "missing weight", "unused weight",
                                  "untied lm_head absent"])
def test_checkpoints_that_do_not_match_their_config_are_refused(tmp_path, capsys, case, stream):
    folder = tmp_path / "m"
    make_tiny_model("llama").save_pretrained(folder)
    if case == "more layers":
        edit_config(folder, num_hidden_layers=3)
    elif case == "missing weight":
        _edit_weights(folder, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    elif case == "unused weight":
        _edit_weights(folder, lambda t: t.update({"model.layers.9.mlp.up_proj.weight":
                                                  torch.zeros(48, 32)}))
    else:
        edit_config(folder, tie_word_embeddings=False)
        _edit_weights(folder, lambda t: t.pop("lm_head.weight", None))
    memory = ["--max-memory", "1MB", "--method", "prunenet", "--episodes", "1"] if stream \
        else ["--method", "random"]
    line = refused(capsys, ["-q", "compress", str(folder), "--ratio", "0.3", "--out",
                            str(tmp_path / "out"), *memory], "does not match its config")
    assert ("holds unused" if case == "unused weight" else "lacks") in line
    assert not (tmp_path / "out").exists()


def test_gguf_promising_more_blocks_than_it_holds_is_refused(tmp_path, capsys, monkeypatch):
    gguf = pytest.importorskip("gguf")
    from prunenet.assets import asset_path

    source = asset_path("tinycoder-gguf") / "tiny.gguf"
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"]
    arch = bytes(arch.parts[arch.data[0]]).decode()
    writer = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        if field.name == f"{arch}.block_count":
            value = int(value) + 1
        writer.add_key_value(field.name, value, field.types[0],
                             sub_type=field.types[-1] if len(field.types) > 1 else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_shape=list(reversed(tensor.shape)),
                          raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    line = refused(capsys, ["-q", "compress", str(tmp_path / "bad.gguf"), "--ratio", "0.3",
                            "--out", str(tmp_path / "out"), "--method", "random"],
                   "does not match its config")
    assert "lacks" in line
    # Converted to be read from disk (as a GGUF larger than memory is): refused once converted,
    # the scratch conversion removed.
    from prunenet.io.streaming import PlannedConversion

    monkeypatch.setattr(PlannedConversion, "in_memory_need", lambda self, training: 2**50)
    line = refused(capsys, ["-q", "compress", str(tmp_path / "bad.gguf"), "--ratio", "0.3",
                            "--out", str(tmp_path / "out"), "--method", "random",
                            "--max-memory", "64GB"], "does not match its config")
    assert "lacks" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_finetune_that_diverges_leaves_nothing(tmp_path, capsys, tiny_llama_real_tokenizer_dir):
    out = tmp_path / "ft"
    refused(capsys, ["-q", "finetune", str(tiny_llama_real_tokenizer_dir), "--out", str(out),
                     "--steps", "2", "--seqlen", "64", "--eval-windows", "1", "--lr", "1e300"],
            "diverged")
    assert not out.exists() and not sibling_path(out, ".work").exists()


@pytest.mark.parametrize("tensor", ["projection", "bias", "row_weights"])
def test_a_policy_holding_nan_is_never_saved(tmp_path, tensor):
    """save_policy refuses a policy that load_policy would refuse: nothing is written, and a
    policy already at the path is kept (the NaN policy had been saved)."""
    from prunenet.errors import NumericalError

    path = tmp_path / "p.safetensors"
    save_policy(PrunePolicy(32, 48), path, {})
    before = path.read_bytes()
    policy = PrunePolicy(32, 48)
    with torch.no_grad():
        getattr(policy, tensor).view(-1)[3] = float("nan")
    with pytest.raises(NumericalError, match=f"^the policy's {tensor} holds NaN or Inf; "):
        save_policy(policy, path, {}, overwrite=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors"]


@pytest.mark.parametrize("checksum", ["", None])
def test_policy_without_a_checksum_is_refused(tmp_path, checksum):
    path = tmp_path / "p.safetensors"
    save_policy(PrunePolicy(32, 48), path, {})
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["prunenet"])
    tensors = load_file(str(path))
    tensors["bias"] = tensors["bias"] + 1  # tampered values
    if checksum is None:
        del header["checksum"]
    else:
        header["checksum"] = checksum
    save_file(tensors, str(path), metadata={"prunenet": json.dumps(header)})
    from prunenet.io.policy_file import load_policy

    with pytest.raises(InputError, match="no checksum"):
        load_policy(path)


def test_resume_refuses_the_state_of_another_model(tmp_path, capsys):
    for seed, name in ((0, "one"), (1, "two")):
        make_tiny_model("llama", seed=seed).save_pretrained(tmp_path / name)
    out = tmp_path / "p.safetensors"
    state = sibling_path(out, ".train-state.pt")
    from prunenet.io.loading import load_model_and_tokenizer as load
    from prunenet.pipeline import train_policy

    model, _ = load(tmp_path / "one")
    train_policy(model, 0.3, episodes=2, progress=False, state_path=state, device="cpu")
    refused(capsys, ["-q", "train-policy", str(tmp_path / "two"), "--ratio", "0.3", "--out",
                     str(out), "--episodes", "3", "--resume"], "another model")


def test_resume_with_fewer_episodes_than_done_is_refused(tmp_path, capsys):
    make_tiny_model("llama").save_pretrained(tmp_path / "m")
    out = tmp_path / "p.safetensors"
    from prunenet.pipeline import train_policy

    model, _ = load_model_and_tokenizer(tmp_path / "m")
    train_policy(model, 0.3, episodes=4, progress=False, device="cpu",
                 state_path=sibling_path(out, ".train-state.pt"))
    refused(capsys, ["-q", "train-policy", str(tmp_path / "m"), "--ratio", "0.3", "--out",
                     str(out), "--episodes", "2", "--resume"], "already holds 4 episodes")


def test_resume_on_another_device_than_the_state_was_saved_on_is_refused(tmp_path, capsys):
    """A training state names the device it ran on (its generator's state belongs to it): a
    resume on another device is refused in one line, where it had tried to continue. The state
    is marked as saved on CUDA, as no GPU is needed to check the refusal."""
    make_tiny_model("llama").save_pretrained(tmp_path / "m")
    out = tmp_path / "p.safetensors"
    state_path = sibling_path(out, ".train-state.pt")
    from prunenet.pipeline import train_policy

    model, _ = load_model_and_tokenizer(tmp_path / "m")
    train_policy(model, 0.3, episodes=2, progress=False, device="cpu", state_path=state_path)
    state = torch.load(state_path, weights_only=True)
    assert state["device"] == "cpu"
    torch.save({**state, "device": "cuda"}, state_path)
    refused(capsys, ["-q", "train-policy", str(tmp_path / "m"), "--ratio", "0.3", "--out",
                     str(out), "--episodes", "3", "--resume", "--device", "cpu"],
            "it was trained on cuda, this run is on cpu; resume on cuda (--device cuda)")
    assert not out.exists()


def test_unreadable_tokenizer_is_refused(tmp_path, capsys, tiny_llama_real_tokenizer_dir):
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama_real_tokenizer_dir, folder)
    (folder / "tokenizer.json").write_text("{garbage")
    refused(capsys, ["-q", "compress", str(folder), "--ratio", "0.3", "--out",
                     str(tmp_path / "out"), "--method", "random"], "tokenizer")
    assert not (tmp_path / "out").exists()


def test_an_unreadable_tokenizer_is_refused_before_the_weights_load_or_stream(
        tmp_path, monkeypatch, tiny_llama_real_tokenizer_dir):
    """In memory the tokenizer was read after the weights loaded (a large model loaded for
    minutes before the refusal); a streamed run never read it and copied the damaged files
    into its output."""
    from prunenet.io.streaming import StreamedCheckpoint
    from prunenet.pipeline import compress

    folder = tmp_path / "m"
    shutil.copytree(tiny_llama_real_tokenizer_dir, folder)
    (folder / "tokenizer.json").write_text("{garbage")
    loads = []
    load = transformers.AutoModelForCausalLM.from_pretrained

    def counted(*args, **kwargs):
        loads.append(kwargs.get("device_map"))
        return load(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", counted)
    with pytest.raises(InputError, match="the tokenizer .*tokenizer.json.* cannot be read"):
        load_model_and_tokenizer(folder)
    assert loads == []
    with pytest.raises(InputError, match="the tokenizer .*tokenizer.json.* cannot be read"):
        compress(StreamedCheckpoint(folder), 0.5, method="random", reconstruct="none",
                 out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("broken", ["config.json", "model.safetensors"])
def test_a_snapshot_whose_links_lead_nowhere_is_refused_naming_the_link(tmp_path, capsys,
                                                                         broken):
    """A Hugging Face cache snapshot (every file a link into ../../blobs) copied elsewhere,
    or missing a blob: the link and what to do are named (it was 'has no config.json' or 'is
    not a file'); the snapshot in place is read through its links."""
    repository = tmp_path / "hub" / "models--org--tiny"
    make_tiny_model("llama").save_pretrained(tmp_path / "files")
    (repository / "blobs").mkdir(parents=True)
    (repository / "snapshots" / "abc").mkdir(parents=True)
    for file in sorted((tmp_path / "files").iterdir()):
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        file.rename(repository / "blobs" / blob)
        (repository / "snapshots" / "abc" / file.name).symlink_to(f"../../blobs/{blob}")
    snapshot = repository / "snapshots" / "abc"
    assert main(["-q", "compress", str(snapshot), "--ratio", "0.5", "--out",
                 str(tmp_path / "out"), "--method", "random"]) == 0
    _reloads(tmp_path / "out", 24)
    copy = tmp_path / "copy"
    shutil.copytree(snapshot, copy, symlinks=True)  # as cp -r copies links
    for link in sorted(copy.iterdir()):
        if link.name != broken:  # every other file copied whole
            link.unlink()
            shutil.copy(snapshot / link.name, copy)
    line = refused(capsys, ["-q", "compress", str(copy), "--ratio", "0.5", "--out",
                            str(tmp_path / "out2"), "--method", "random"],
                   f"{copy / broken} is a symbolic link to ../../blobs/")
    assert "which does not exist" in line and "cp -rL" in line
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("argv", [
    lambda snapshot: ["compress", "org/tiny", "--ratio", "0.5", "--method", "random",
                      "--reconstruct", "none", "--out", str(snapshot / "pruned")],
    lambda snapshot: ["eval", "org/tiny", "--ppl", "none", "--json", str(snapshot / "r.json")],
    lambda snapshot: ["train-policy", "org/tiny", "--ratio", "0.5", "--episodes", "1", "--out",
                      str(snapshot.parents[1] / "refs" / "p.safetensors")],
])
def test_no_output_goes_into_the_hub_cache_of_a_hub_id_it_reads(tmp_path, capsys, monkeypatch,
                                                                argv):
    """A Hub id is read from its repository's folder in the Hugging Face cache (snapshots,
    blobs, refs): no output goes there, as none goes into a local model folder (outputs
    inside the snapshot had been written, adding files to the model's snapshot)."""
    from huggingface_hub import constants

    repository = tmp_path / "hub" / "models--org--tiny"
    make_tiny_model("llama").save_pretrained(repository / "snapshots" / "abc")
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text("abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    before = digest(tmp_path)
    refused(capsys, ["-q", *argv(repository / "snapshots" / "abc")],
            f"lies inside the input {repository}; prunenet never writes into")
    assert digest(tmp_path) == before
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == sorted(
        ["hub", "hub/models--org--tiny", "hub/models--org--tiny/refs",
         "hub/models--org--tiny/refs/main", "hub/models--org--tiny/snapshots",
         "hub/models--org--tiny/snapshots/abc", *(f"hub/models--org--tiny/snapshots/abc/{name}"
         for name in ("config.json", "generation_config.json", "model.safetensors"))])


# --- valid inputs are accepted -----------------------------------------------------------------


def _reloads(folder: Path, width: int) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert model.config.intermediate_size == width


def test_train_policy_creates_parent_folders(models, tmp_path):
    """Missing folders above an output are made when it is written; the policy file is
    readable like every other output (0644 less the umask), not the temporary file's 0600."""
    out = tmp_path / "new" / "dir" / "p.safetensors"
    assert main(["-q", "train-policy", str(models / "llama"), "--ratio", "0.3", "--out",
                 str(out), "--episodes", "1"]) == 0
    assert out.is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o644 & ~umask


@pytest.mark.parametrize("argv", [
    ["compress", "{model}", "--ratio", "0.99", "--out", "{tmp}/deep/er/out"],
    ["eval", "{model}", "--ppl", "none", "--tasks", "no-such-task", "--json", "{tmp}/sub/r.json"],
])
def test_a_refused_command_leaves_no_parent_folders(models, tmp_path, capsys, argv):
    """The folders above an output are made only when it is written: a command refused after
    its outputs were checked leaves none behind."""
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = [a.format(model=models / "llama", tmp=tmp_path) for a in argv]
    assert main(["-q", *argv]) == 2
    assert "prunenet: error: " in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_long_output_names_stay_within_the_name_limit(models, tmp_path):
    out = tmp_path / ("x" * 250)
    assert main(["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--out", str(out),
                 "--method", "prunenet", "--episodes", "1"]) == 0
    _reloads(out, 33)
    assert all(len(p.name.encode()) <= NAME_MAX for p in tmp_path.iterdir())
    assert len(sibling_prefix(out, "tmp").encode()) + 8 <= NAME_MAX


@pytest.mark.parametrize("dtype", [torch.float8_e8m0fnu, torch.float4_e2m1fn_x2,
                                   torch.complex64, torch.float8_e4m3fnuz])
def test_every_safetensors_dtype_is_accepted(tmp_path, dtype):
    path = tmp_path / "w.safetensors"
    save_file({"t": torch.zeros(4, 4).to(dtype) if dtype != torch.float4_e2m1fn_x2
               else torch.zeros(4, 4, dtype=torch.uint8).view(dtype)}, str(path))
    assert "t" in validate_safetensors(path)


def test_float8_weights_are_pruned_and_saved_as_float8(tmp_path):
    folder = tmp_path / "f8"
    make_tiny_model("llama").save_pretrained(folder)
    _edit_weights(folder, lambda t: t.update({k: v.to(torch.float8_e4m3fn) for k, v in t.items()}))
    edit_config(folder, dtype="float8_e4m3fn")
    assert main(["-q", "compress", str(folder), "--ratio", "0.3", "--out", str(tmp_path / "out"),
                 "--method", "random"]) == 0
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.float8_e4m3fn}
    source = load_file(str(folder / "model.safetensors"))
    # Untouched tensors come back bit for bit through float32.
    assert torch.equal(saved["model.embed_tokens.weight"].view(torch.uint8),
                       source["model.embed_tokens.weight"].view(torch.uint8))
    _reloads(tmp_path / "out", 33)


# --- tracebacks become one line ----------------------------------------------------------------


def _raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)


@pytest.mark.parametrize("case", ["overlapping", "non-integer", "trailing bytes"])
def test_malformed_safetensors_headers_are_one_line(tmp_path, capsys, case):
    folder = tmp_path / "m"
    make_tiny_model("llama").save_pretrained(folder)
    weights = folder / "model.safetensors"
    if case == "trailing bytes":
        weights.write_bytes(weights.read_bytes() + b"\x00" * 3)
    else:
        offsets = [[0, 16], [8, 24]] if case == "overlapping" else [[0, 16.5], [16.5, 32]]
        _raw_safetensors(weights, {"a": {"dtype": "F32", "shape": [4], "data_offsets": offsets[0]},
                                   "b": {"dtype": "F32", "shape": [4],
                                         "data_offsets": offsets[1]}}, b"\x00" * 32)
    refused(capsys, ["-q", "compress", str(folder), "--ratio", "0.3", "--out",
                     str(tmp_path / "out"), "--method", "random"], "not a valid safetensors")


@pytest.mark.parametrize("weight_map", [[], None])
def test_shard_index_with_a_bad_weight_map_is_one_line(tmp_path, capsys, weight_map):
    folder = tmp_path / "m"
    make_tiny_model("llama").save_pretrained(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    refused(capsys, ["-q", "compress", str(folder), "--ratio", "0.3", "--out",
                     str(tmp_path / "out"), "--method", "random"], "weight_map")


@pytest.mark.parametrize("config", ["[1, 2]", '{"model_type": "llama", "intermediate_size": "48"}',
                                    "width-float"])
def test_bad_configs_are_one_line(tmp_path, capsys, config):
    folder = tmp_path / "m"
    make_tiny_model("llama").save_pretrained(folder)
    if config == "width-float":
        edit_config(folder, intermediate_size=48.0)
    else:
        (folder / "config.json").write_text(config)
    refused(capsys, ["-q", "compress", str(folder), "--ratio", "0.3", "--out",
                     str(tmp_path / "out"), "--method", "random"], "config")


QUANTIZATIONS = {
    "bitsandbytes": {"quant_method": "bitsandbytes", "load_in_8bit": True},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"},
    "fp8": {"quant_method": "fp8", "weight_block_size": [16, 16]},
}


@pytest.mark.parametrize("where", ["folder", "hub id"])
@pytest.mark.parametrize("method", sorted(QUANTIZATIONS))
def test_a_quantized_checkpoint_is_refused_before_any_work(tmp_path, capsys, monkeypatch,
                                                            method, where):
    """A config declaring quantized weights: one line naming the method and what to give
    instead, before anything loads (bitsandbytes, GPTQ and AWQ ended in an ImportError
    traceback; fp8 was dequantized, pruned and saved in another dtype without its scales)."""
    from huggingface_hub import constants

    if where == "hub id":
        folder = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc"
        (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir(parents=True)
        (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("abc")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    else:
        folder = tmp_path / "m"
    make_tiny_model("llama").save_pretrained(folder)
    edit_config(folder, quantization_config=QUANTIZATIONS[method])
    source = "org/tiny" if where == "hub id" else str(folder)
    for options in (["--method", "random"], ["--method", "prunenet", "--max-memory", "1MB"]):
        if where == "hub id" and "--max-memory" in options:
            continue  # a Hub id is loaded whole
        line = refused(capsys, ["-q", "compress", source, "--ratio", "0.3", "--out",
                                str(tmp_path / "out"), *options],
                       f"declares quantized weights (quantization_config, quant_method {method})")
        assert "Give the unquantized checkpoint" in line
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--out", "--record"])
def test_symlink_loops_as_outputs_are_one_line(models, tmp_path, capsys, option):
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    paths = {"--out": str(tmp_path / "out"), "--record": str(tmp_path / "rec")}
    paths[option] = str(tmp_path / "loop1")
    refused(capsys, ["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--out",
                     paths["--out"], "--record", paths["--record"], "--method", "random"],
            "cannot be resolved")


def test_folder_named_like_a_weights_file_is_one_line(tmp_path, capsys):
    folder = tmp_path / "m"
    make_tiny_model("llama").save_pretrained(folder)
    (folder / "x.safetensors").mkdir()
    refused(capsys, ["-q", "compress", str(folder), "--ratio", "0.3", "--out",
                     str(tmp_path / "out"), "--method", "random"], "is not a file")


def test_learning_rate_beyond_float32_is_one_line(models, tmp_path, capsys):
    refused(capsys, ["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--out",
                     str(tmp_path / "out"), "--method", "prunenet", "--lr", "1e300"],
            "learning rate")


def test_seed_beyond_64_bits_is_a_usage_error(models, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--out",
              str(tmp_path / "out"), "--seed", str(2**64)])
    assert exit_info.value.code == 2
    assert f"seed must be an integer in [0, 2**63), got {2**64}" in capsys.readouterr().err


def test_eval_and_finetune_sequence_lengths_are_checked(tmp_path, capsys,
                                                       tiny_llama_real_tokenizer_dir):
    model = str(tiny_llama_real_tokenizer_dir)
    # Below 2 tokens: refused by the option's parser, which names the option as typed, before
    # any model is read (finetune's had named its settings field, seqlen, after reading one).
    for argv in (["eval", model, "--windows", "1", "--seqlen", "1"],
                 ["finetune", model, "--out", str(tmp_path / "ft"), "--seqlen", "1"],
                 ["finetune", model, "--out", str(tmp_path / "ft"), "--data", "self-generated",
                  "--seqlen", "0"],
                 ["compare", model, "--ratios", "0.3", "--out", str(tmp_path / "cmp"),
                  "--seqlen", "1"],
                 ["compress", model, "--ratio", "0.3", "--out", str(tmp_path / "c"),
                  "--recover-steps", "1", "--finetune-seqlen", "1"]):
        option = argv[-2]
        with pytest.raises(SystemExit) as exit_info:
            main(["-q", *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"prunenet: error: argument {option}: must be at least 2 tokens, "
                              f"got {argv[-1]} (see prunenet {argv[0]} --help)"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    refused(capsys, ["-q", "finetune", str(tiny_llama_real_tokenizer_dir), "--out",
                     str(tmp_path / "ft"), "--seqlen", "4096"], "exceeds the model's context")


def test_jsonl_text_that_is_not_a_string_is_one_line(tmp_path, capsys,
                                                     tiny_llama_real_tokenizer_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": null}\n')
    refused(capsys, ["-q", "eval", str(tiny_llama_real_tokenizer_dir), "--ppl", str(data),
                     "--windows", "1", "--seqlen", "64"], "must be a string")


def test_corrupt_record_in_a_model_folder_is_one_line(models, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--out", str(out),
                 "--method", "random"]) == 0
    (out / "prunenet.json").write_text("{not json")
    refused(capsys, ["-q", "eval", str(out), "--ppl", "none"], "prunenet.json")
    # pruned again, the output would keep its input's record: a damaged one is refused first
    refused(capsys, ["-q", "compress", str(out), "--ratio", "0.3", "--method", "random",
                     "--out", str(tmp_path / "again")], "prunenet.json is not readable JSON")
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("edit, match", [
    (lambda r: r.update(method="magic"), "method 'magic' is none of prunenet's"),
    (lambda r: r.update(format="x"), "its format tag 'x' is not prunenet-compression/N"),
    (lambda r: r.update(source=5), "source must name the model it was made from, got 5"),
    (lambda r: r.update(source=""), "source must name the model it was made from, got ''"),
])
def test_an_edited_record_in_a_model_folder_is_refused_not_passed_on(models, tmp_path, capsys,
                                                                     edit, match):
    """eval would print the method a record names, and a fine-tune or a compression copy it
    into its output: a record naming no method prunenet has, or no model, is refused by every
    reader."""
    out = tmp_path / "out"
    assert main(["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--out", str(out),
                 "--method", "random", "--reconstruct", "none"]) == 0
    record = json.loads((out / "prunenet.json").read_text())
    edit(record)
    (out / "prunenet.json").write_text(json.dumps(record))
    line = refused(capsys, ["-q", "eval", str(out), "--ppl", "none"], match)
    assert line.endswith("the record is damaged")
    refused(capsys, ["-q", "finetune", str(out), "--data", "self-generated", "--out",
                     str(tmp_path / "ft"), "--steps", "1"], match)
    refused(capsys, ["-q", "compress", str(out), "--ratio", "0.3", "--method", "random",
                     "--reconstruct", "none", "--out", str(tmp_path / "again")], match)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["models", "out"]


def test_a_record_naming_the_student_as_its_teacher_is_refused(models, tmp_path, capsys):
    """Distilling a model from itself learns nothing (its KL is 0 throughout)."""
    out = tmp_path / "out"
    assert main(["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--out", str(out),
                 "--method", "random", "--reconstruct", "none"]) == 0
    record = json.loads((out / "prunenet.json").read_text())
    record["source"] = str(out)
    (out / "prunenet.json").write_text(json.dumps(record))
    for teacher in ([], ["--teacher", str(out)]):
        refused(capsys, ["-q", "finetune", str(out), "--data", "self-generated", "--out",
                         str(tmp_path / "ft"), "--steps", "1", *teacher],
                f"the teacher {out} is the model being trained")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["models", "out"]


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(num_layers="2"), "num_layers"),
    (lambda d: d.update(num_layers=-1), "num_layers"),
    (lambda d: d.pop("layers"), "layers"),
    (lambda d: d["compression"].update(ratio="0.3"), "compression.ratio"),
    (lambda d: d["layers"]["ks_selected"].__setitem__(0, float("nan")), "finite numbers"),
    (lambda d: d["layers"]["kept_neurons"].__setitem__(0, -5), "kept_neurons must lie"),
    (lambda d: d["layers"]["kept_neurons"].__setitem__(0, 10 ** 30), "kept_neurons must lie"),
    (lambda d: d["compression"].update(ratio=float("inf")), "compression.ratio"),
    (lambda d: d["compression"].update(ratio=7), "compression.ratio must lie in [0, 1)"),
    (lambda d: d["compression"].update(method="magic"), "compression.method 'magic' is none"),
    (lambda d: d["layers"]["ks_selected"].__setitem__(0, -1), "ks_selected must lie in [0, 1]"),
    (lambda d: d["layers"]["ks_selected"].__setitem__(0, 5.0), "ks_selected must lie in [0, 1]"),
    (lambda d: d["compression"].update(parameters_before=-1),
     "compression.parameters_after"),
    (lambda d: d["compression"].update(ffn_width_after=10 ** 6), "compression.ffn_width_after"),
])
def test_edited_run_records_are_one_line(run_record, capsys, edit, match):
    """Damaged numbers (NaN, Inf, a kept count outside the layer) are refused, never drawn."""
    path = run_record / "record.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    refused(capsys, ["-q", "report", str(run_record)], match)


@pytest.mark.parametrize("spectrum", [torch.ones(5, 5), torch.full((8,), float("nan")),
                                      torch.ones(0)])
def test_edited_spectra_are_one_line(run_record, tmp_path, capsys, spectrum):
    """A spectrum that is not a finite list of singular values is refused, not drawn (a NaN
    curve vanished from its plot under a legend that still named it; a matrix crashed)."""
    from safetensors.torch import load_file, save_file

    path = run_record / "spectra.safetensors"
    tensors = load_file(str(path))
    tensors["layer.0.pruned"] = spectrum
    save_file(tensors, str(path))
    refused(capsys, ["-q", "report", str(run_record), "--out", str(tmp_path / "r")],
            "layer.0.pruned is not a list of finite singular values")
    assert not (tmp_path / "r").exists()



def test_spectra_of_another_run_are_refused(models, run_record, tmp_path, capsys):
    """spectra.safetensors is checked against its record.json: the spectra of another run (a
    copy from a record at another ratio) are refused, not drawn under this run's numbers."""
    other = tmp_path / "other-run"
    assert main(["-q", "compress", str(models / "llama"), "--ratio", "0.7", "--out",
                 str(tmp_path / "other-out"), "--method", "random", "--record", str(other)]) == 0
    shutil.copy(other / "spectra.safetensors", run_record / "spectra.safetensors")
    refused(capsys, ["-q", "report", str(run_record), "--out", str(tmp_path / "r")],
            "layer 0's spectra do not match")
    assert not (tmp_path / "r").exists()

# --- prunenet's own working files, locks and races ---------------------------------------------


@pytest.mark.parametrize("kind", ["folder", "symlink"])
def test_finetune_never_deletes_a_user_folder_at_its_work_path(tmp_path, capsys, kind,
                                                               tiny_llama_real_tokenizer_dir):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"jpeg")
    out = tmp_path / "f" / "o"
    out.parent.mkdir()
    work = sibling_path(out, ".work")
    if kind == "symlink":
        work.symlink_to(photos, target_is_directory=True)
    else:
        shutil.copytree(photos, work)
    refused(capsys, ["-q", "finetune", str(tiny_llama_real_tokenizer_dir), "--out", str(out),
                     "--steps", "1", "--seqlen", "16", "--eval-windows", "1", "--overwrite"],
            "symlink" if kind == "symlink" else "not written by prunenet")
    assert (photos / "a.jpg").read_bytes() == b"jpeg"
    assert kind == "symlink" or (work / "a.jpg").read_bytes() == b"jpeg"


def test_a_user_file_at_the_training_state_path_is_kept(models, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    state = sibling_path(out, ".train-state.pt")
    state.write_text("my data")
    refused(capsys, ["-q", "train-policy", str(models / "llama"), "--ratio", "0.3", "--episodes",
                     "1", "--out", str(out)], "not written by prunenet")
    assert state.read_text() == "my data"


@pytest.mark.parametrize("victim, message", [
    ("notes.txt", "exists and was not written by prunenet; move it away"),
    ("llama/model.safetensors", "lies inside the input"),
])
def test_train_policy_from_python_never_writes_its_state_over_a_file(models, victim, message):
    """train_policy's state_path is checked as the command line checks the state beside
    --out, before the model loads: a user's file, or the weights of the model it trains on,
    is never replaced by the training state (both had been)."""
    import prunenet
    from prunenet.errors import OutputError

    before = digest(models)
    with pytest.raises(OutputError, match=message):
        prunenet.train_policy(str(models / "llama"), 0.5, episodes=1, progress=False,
                              state_path=models / victim)
    assert digest(models) == before


def test_a_symlink_at_the_lock_path_is_never_followed(models, tmp_path):
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    out = tmp_path / "o"
    (tmp_path / (sibling_prefix(out, "lock") + "0")).symlink_to(victim)
    main(["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--out", str(out),
          "--method", "random"])
    assert victim.read_bytes() == b"precious"


# Names a model output's own files also take: only the output's list of what it wrote
# (.prunenet-files) tells them from the user's.
@pytest.mark.parametrize("intruder", [
    "adapter/essay.txt", "README.md", "other.safetensors", "pruned-q4_k_m.gguf",
    "tokenizer-notes.txt", "model-draft.safetensors", "vocab-ideas.txt", "mine.model",
    "my-lora/adapter_model.safetensors"])
def test_overwrite_keeps_user_files_added_to_a_previous_output(models, tmp_path, capsys,
                                                               intruder):
    out = tmp_path / "m"
    assert main(["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--out", str(out),
                 "--method", "random"]) == 0
    (out / intruder).parent.mkdir(exist_ok=True)
    (out / intruder).write_text("mine")
    refused(capsys, ["-q", "compress", str(models / "llama"), "--ratio", "0.5", "--out",
                     str(out), "--method", "random", "--overwrite"], "not written by prunenet")
    assert (out / intruder).read_text() == "mine"


def test_a_user_figure_added_to_a_report_is_kept(run_record, capsys):
    """report replaces its own report folder without --overwrite, but not one the user added a
    figure to, with or without --overwrite."""
    assert main(["-q", "report", str(run_record)]) == 0
    (run_record / "report" / "my-figure.png").write_bytes(b"png of the user's")
    before = digest(run_record)
    refused(capsys, ["-q", "report", str(run_record)], "not written by prunenet")
    refused(capsys, ["-q", "report", str(run_record), "--overwrite"], "not written by prunenet")
    assert digest(run_record) == before


@pytest.mark.parametrize("page", ["report.md", "report.html"])
def test_a_report_the_user_edited_is_replaced_only_with_overwrite(run_record, capsys, page):
    """report replaces its own previous report unasked, but not once the user edited its
    pages (notes added to report.md): that takes --overwrite (the edits had been lost)."""
    assert main(["-q", "report", str(run_record)]) == 0
    report = run_record / "report"
    with open(report / page, "a") as stream:
        stream.write("\nMy discussion of the run, hours of work.\n")
    later = (report / ".prunenet-files").stat().st_mtime_ns + 10**9  # whatever the clock
    os.utime(report / page, ns=(later, later))
    before = digest(run_record)
    refused(capsys, ["-q", "report", str(run_record)],
            f"{report} holds a report whose {page} changed since prunenet wrote it; pass "
            "--overwrite to replace it")
    assert digest(run_record) == before
    assert main(["-q", "report", str(run_record), "--overwrite"]) == 0
    assert "hours of work" not in (report / page).read_text()


def test_an_output_written_before_manifests_is_still_replaced(models, tmp_path):
    """An output without .prunenet-files (an earlier version's) is judged by its file names, as
    then: replaced with --overwrite when every name is one a model output takes."""
    out = tmp_path / "m"
    assert main(["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--out", str(out),
                 "--method", "random"]) == 0
    listed = json.loads((out / ".prunenet-files").read_text())
    assert listed == sorted(p.name for p in out.iterdir() if p.name != ".prunenet-files")
    (out / ".prunenet-files").unlink()
    assert main(["-q", "compress", str(models / "llama"), "--ratio", "0.5", "--out", str(out),
                 "--method", "random", "--overwrite"]) == 0
    assert json.loads((out / "prunenet.json").read_text())["ratio"] == 0.5


def test_an_output_inside_another_output_is_refused(run_record, models, tmp_path, capsys):
    """No output, of any command, is written into a folder prunenet committed (a pruned model,
    a run record, a report): it would change that output. A run record's own report folder is
    the one output that goes inside another."""
    out, report = tmp_path / "out", run_record / "report"
    assert main(["-q", "report", str(run_record)]) == 0
    before = {folder: digest(folder) for folder in (out, run_record)}
    compress = ["-q", "compress", str(models / "llama"), "--ratio", "0.3"]
    for argv in ([*compress, "--out", str(out / "inner")],
                 [*compress, "--out", str(tmp_path / "o"), "--record", str(out / "rec")],
                 [*compress, "--out", str(tmp_path / "o"), "--policy-out",
                  str(run_record / "p.safetensors"), "--method", "prunenet", "--episodes", "1"],
                 ["-q", "report", str(run_record), "--out", str(out / "report")],
                 ["-q", "compress", str(out), "--ratio", "0.3", "--out", str(report / "m")],
                 ["-q", "eval", str(out), "--ppl", "none", "--tasks", "none", "--json",
                  str(run_record / "eval.json")]):
        refused(capsys, argv, "an output prunenet wrote; writing there would change that output")
    assert {folder: digest(folder) for folder in (out, run_record)} == before
    assert not (tmp_path / "o").exists()
    assert main(["-q", "report", str(run_record)]) == 0  # replaced in place: its own report


def test_a_user_file_in_a_records_report_folder_is_kept(run_record, models, tmp_path, capsys):
    (run_record / "report").mkdir()
    (run_record / "report" / "notes.txt").write_text("mine")
    refused(capsys, ["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--out",
                     str(tmp_path / "o2"), "--method", "random", "--record", str(run_record),
                     "--overwrite"], "not written by prunenet")
    assert (run_record / "report" / "notes.txt").read_text() == "mine"


def test_a_calibration_corpus_inside_the_output_is_an_input(models, tmp_path, capsys):
    out = tmp_path / "M"
    assert main(["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--out", str(out),
                 "--method", "random"]) == 0
    corpus = out / "tokenizer_corpus.txt"
    corpus.write_text("words " * 100)
    refused(capsys, ["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--out",
                     str(out), "--method", "activation", "--calibration-corpus", str(corpus),
                     "--overwrite"], "contains the input")
    assert corpus.read_text() == "words " * 100


def test_a_file_that_appears_while_the_work_runs_is_not_replaced(tmp_path):
    from prunenet.errors import OutputError
    from prunenet.io.files import atomic_file

    path = tmp_path / "p.safetensors"
    with pytest.raises(OutputError, match="another run"):
        with atomic_file(path, overwrite=False) as tmp:
            tmp.write_bytes(b"ours")
            path.write_bytes(b"theirs")  # appears meanwhile
    assert path.read_bytes() == b"theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]


def test_finetune_outputs_are_checked_with_the_compression(tmp_path, capsys,
                                                           tiny_llama_real_tokenizer_dir):
    out = tmp_path / "x"
    refused(capsys, ["-q", "compress", str(tiny_llama_real_tokenizer_dir), "--ratio", "0.3",
                     "--out", str(out), "--method", "random", "--record",
                     f"{out}-finetuned", "--finetune-steps", "1"], "must be separate")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("out, match", [("/", "root folder"), (".m.tmp-1", "staging")])
def test_nameless_and_staging_like_outputs_are_one_line(models, tmp_path, capsys, monkeypatch,
                                                        out, match):
    monkeypatch.chdir(tmp_path)
    refused(capsys, ["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--out", out,
                     "--method", "random"], match)


@pytest.mark.parametrize("case", ["dot", "by another name", "a record holding it"])
def test_an_output_that_is_or_holds_the_current_folder_is_refused(models, tmp_path, capsys,
                                                                  monkeypatch, case):
    """An output folder is put in place by renaming onto it: the current folder, or one
    holding it, would be renamed away under the shell and the run. Refused before any work
    (`--out .` in an empty folder had been replaced, leaving the shell in a removed folder,
    and a relative --record then failed after --out was written)."""
    if case == "a record holding it":  # the user looks at its report, then runs again
        record = tmp_path / "r"
        assert main(_compress_random(models, tmp_path / "o", "0.5", "--record",
                                     str(record))) == 0
        assert main(["-q", "report", str(record)]) == 0
        here, expected = record / "report", f"--record {record} contains"
        argv = _compress_random(models, tmp_path / "o", "0.25", "--record", "..", "--overwrite")
    else:
        here, expected = tmp_path / "here", f"--out {tmp_path / 'here'} is"
        here.mkdir()
        argv = _compress_random(models, "." if case == "dot" else "../here", "0.5",
                                "--record", "../r")
    monkeypatch.chdir(here)
    before = digest(tmp_path)
    line = refused(capsys, argv, "the current folder; an output is put in place by renaming")
    assert line.startswith(f"prunenet: error: {expected} the current folder"), line
    assert digest(tmp_path) == before and here.is_dir()


def test_a_garbage_training_state_is_one_line(models, tmp_path, capsys):
    out = tmp_path / "b.safetensors"
    sibling_path(out, ".train-state.pt").write_bytes(b"garbage")
    assert main(["-q", "train-policy", str(models / "llama"), "--ratio", "0.3", "--out",
                 str(out), "--episodes", "2", "--resume"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_resume_with_a_damaged_settings_record_is_one_line(tmp_path, capsys,
                                                           tiny_llama_real_tokenizer_dir):
    out = tmp_path / "F"
    work = sibling_path(out, ".work")
    work.mkdir()
    (work / "prunenet-finetune.json").write_text("[1, 2]")
    refused(capsys, ["-q", "finetune", str(tiny_llama_real_tokenizer_dir), "--out", str(out),
                     "--steps", "1", "--seqlen", "16", "--eval-windows", "1", "--resume"],
            "not a fine-tuning settings record")


def test_a_speed_batch_beyond_memory_is_one_line(tiny_llama_real_tokenizer_dir, capsys):
    refused(capsys, ["-q", "eval", str(tiny_llama_real_tokenizer_dir), "--ppl", "none",
                     "--speed", "--speed-batch", "10000000", "--speed-repeats", "1",
                     "--speed-prompt", "4", "--speed-new-tokens", "1"], "does not fit in memory")


def test_negative_zero_ratio_is_recorded_as_zero(models, tmp_path):
    assert main(["-q", "compress", str(models / "llama"), "--ratio", "-0", "--out",
                 str(tmp_path / "o"), "--method", "random"]) == 0
    assert str(json.loads((tmp_path / "o" / "prunenet.json").read_text())["ratio"]) == "0.0"


def test_a_foreign_folder_appearing_at_the_output_during_a_run_is_kept(tmp_path):
    """Even with --overwrite, the rename that publishes an output replaces only what the
    recognizer calls prunenet's own: files that appeared there meanwhile stay."""
    from prunenet.errors import OutputError
    from prunenet.io.files import atomic_folder
    from prunenet.io.loading import is_model_output

    out = tmp_path / "out"
    with pytest.raises(OutputError, match="holds files prunenet did not write"):
        with atomic_folder(out, overwrite=True, ours=is_model_output) as staging:
            (staging / "config.json").write_text("{}")
            out.mkdir()
            (out / "thesis.tex").write_text("mine")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "thesis.tex").read_text() == "mine"
    with atomic_folder(out, overwrite=True) as staging:  # without a recognizer: replaced
        (staging / "config.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == [".prunenet-files", "config.json"]


@pytest.mark.parametrize("recovery", [["--recover-steps", "2", "--finetune-seqlen", "256"],
                                      ["--finetune-steps", "2", "--finetune-seqlen", "128"]])
def test_a_recovery_the_model_cannot_run_is_refused_before_the_compression(models, tmp_path,
                                                                           capsys, recovery):
    """The tiny model has 64 positions: recovery windows given as 256 or 128 tokens are
    refused before anything is compressed or written (defaults are cut to the context)."""
    before = sorted(p.name for p in tmp_path.iterdir())
    refused(capsys, ["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--out",
                     str(tmp_path / "out" / "m"), "--method", "random", *recovery],
            f"--finetune-seqlen {256 if recovery[0] == '--recover-steps' else 128} exceeds the "
            "model's context of 64 tokens")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("recovery", [["--recover-steps", "1"],
                                      ["--finetune-steps", "1", "--finetune-data", "wiki"]])
def test_a_seed_the_recovery_cannot_take_is_refused_before_the_compression(models, tmp_path,
                                                                           capsys, recovery):
    """--seed 2**32 is a seed compress takes and the Trainer does not (numpy's generator): the
    recovery had failed in a traceback after the compression was written."""
    before = sorted(p.name for p in tmp_path.iterdir())
    refused(capsys, ["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--out",
                     str(tmp_path / "m"), "--method", "random", "--seed", str(2**32),
                     "--finetune-seqlen", "16", *recovery],
            "seed must be below 2**32 for a fine-tune")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_seed_the_trainer_cannot_take_is_refused_before_any_work(models, tmp_path, capsys):
    """finetune --seed 2**32 (a seed --seed reads): one line, no work folder of teacher text."""
    teacher = tmp_path / "teacher"
    shutil.copytree(models / "llama", teacher)
    refused(capsys, ["-q", "finetune", str(models / "llama"), "--data", "self-generated",
                     "--teacher", str(teacher), "--out", str(tmp_path / "o"),
                     "--seed", str(2**32), "--steps", "1", "--seqlen", "16"],
            f"seed must be below 2**32 for a fine-tune (the Trainer seeds numpy's generator, "
            f"which takes no larger seed), got {2**32}")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["models", "teacher"]
    with pytest.raises(InputError, match=r"seed must be an integer in \[0, 2\*\*63\), got None"):
        FinetuneConfig(seed=None)
    assert FinetuneConfig(seed=2**32 - 1).seed == 2**32 - 1


def test_a_compression_failing_after_training_writes_no_policy(models, tmp_path, monkeypatch,
                                                               capsys):
    """--policy-out is written with the output, not when training ends: a run that fails
    afterwards (here: the output's save) leaves no policy behind to block the next run."""
    import prunenet.pipeline

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prunenet.pipeline, "save_compressed", fail)
    policy = tmp_path / "policy.safetensors"
    assert main(["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--method",
                 "prunenet", "--episodes", "1", "--policy-out", str(policy), "--out",
                 str(tmp_path / "out")]) != 0
    assert "No space left on device" in capsys.readouterr().err
    assert not policy.exists() and not (tmp_path / "out").exists()


def test_a_bias_refit_without_a_bias_is_refused_before_any_work(models, tmp_path, capsys,
                                                               monkeypatch):
    import prunenet.selection.prunenet as prunenet_selection

    monkeypatch.setattr(prunenet_selection, "train_on", None)  # training would fail loudly
    before = sorted(p.name for p in tmp_path.iterdir())
    refused(capsys, ["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--method",
                     "prunenet", "--episodes", "1", "--reconstruct", "bias", "--policy-out",
                     str(tmp_path / "p.safetensors"), "--out", str(tmp_path / "out")],
            "this model's has none; use --reconstruct ls")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_outputs_inside_a_named_corpus_folder_are_refused(tiny_llama_real_tokenizer_dir,
                                                          tmp_path, capsys):
    """A corpus named by its name (wiki) is read from its folder in the cache: no output may
    lie inside it either (as inside any folder fetch writes)."""
    from prunenet.assets import asset_path
    from prunenet.errors import MissingAssetError

    try:
        wiki = asset_path("wiki")
    except MissingAssetError as error:
        pytest.skip(str(error))
    before = digest(wiki)
    refused(capsys, ["-q", "eval", str(tiny_llama_real_tokenizer_dir), "--ppl", "wiki",
                     "--json", str(wiki / "results.json")],
            f"lies inside prunenet's asset folder {wiki}")
    refused(capsys, ["-q", "compress", str(tiny_llama_real_tokenizer_dir), "--ratio", "0.3",
                     "--method", "activation", "--out", str(wiki / "pruned")],
            f"lies inside prunenet's asset folder {wiki}")
    assert digest(wiki) == before


# --- names a user's own folder has too, and one file by two names ------------------------------


@pytest.mark.parametrize("where", ["--out", "the record's report folder"])
def test_report_never_replaces_a_users_own_report_pages(run_record, tmp_path, capsys, where):
    """A folder of the user's holding report.md, report.html and figures, the names a report
    takes, is not a report prunenet wrote (it has no list of what prunenet wrote there):
    refused, with and without --overwrite, every file kept."""
    folder = tmp_path / "mydocs" if where == "--out" else run_record / "report"
    folder.mkdir()
    (folder / "report.md").write_text("# My thesis chapter\n")
    (folder / "report.html").write_text("<html>mine</html>\n")
    (folder / "figure1.png").write_bytes(b"png of the user's")
    before = digest(folder)
    option = ["--out", str(folder)] if where == "--out" else []
    refused(capsys, ["-q", "report", str(run_record), *option], "not written by prunenet")
    refused(capsys, ["-q", "report", str(run_record), *option, "--overwrite"],
            "not written by prunenet")
    assert digest(folder) == before


def test_an_input_of_links_into_the_output_is_refused(models, tmp_path, capsys):
    """A model folder whose files are links into an earlier output reads that output: replacing
    it would replace the weights the run reads and leave the links pointing at the new model."""
    out = tmp_path / "o"
    assert main(["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--out", str(out),
                 "--method", "random"]) == 0
    view = tmp_path / "view"
    view.mkdir()
    for file in out.iterdir():
        (view / file.name).symlink_to(file)
    before = digest(out)
    refused(capsys, ["-q", "compress", str(view), "--ratio", "0.5", "--out", str(out),
                     "--method", "random", "--overwrite"], "contains the input")
    assert digest(out) == before


def test_a_file_by_two_names_is_one_path(tmp_path):
    """A hard link to an input is the input, even to an output prunenet would replace."""
    from prunenet.errors import OutputError
    from prunenet.io.files import Output, guard_outputs

    source = tmp_path / "texts" / "corpus.txt"
    source.parent.mkdir()
    source.write_text("words\n")
    link = tmp_path / "results.json"
    os.link(source, link)
    with pytest.raises(OutputError, match="is the input"):
        guard_outputs([Output(link, "--json", folder=False, ours=lambda _: True)], [source],
                      overwrite=True)
    assert source.read_text() == "words\n"


def test_one_folder_by_two_names_is_one_input(tmp_path, monkeypatch):
    """A folder reached by another name (a bind mount: the same device and inode) is compared
    as the folder it is: an output below the other name lies inside the input, and an output
    at it contains what the input holds."""
    from prunenet.errors import OutputError
    from prunenet.io import files

    real, mount = tmp_path / "real", tmp_path / "mount"
    (real / "model").mkdir(parents=True)
    mount.mkdir()
    identity = files._identity
    monkeypatch.setattr(files, "_identity", lambda path: identity(real if path == mount else path))
    with pytest.raises(OutputError, match="lies inside the input"):
        files.guard_outputs([files.Output(mount / "out", "--out")], [real], overwrite=True)
    with pytest.raises(OutputError, match="contains the input"):
        files.guard_outputs([files.Output(mount, "--out", ours=lambda _: True)],
                            [real / "model"], overwrite=True)
    assert files.guard_outputs([files.Output(tmp_path / "elsewhere", "--out")], [real],
                               overwrite=False) == [tmp_path / "elsewhere"]


@pytest.mark.parametrize("settings, intruder", [
    ("{}", "checkpoint-1/notes.txt"),
    ('{"source": "m", "data": "wiki", "steps": 1, "targets": []}',
     "checkpoint-1/mydata/precious.txt")])
def test_finetune_never_deletes_a_folder_that_only_looks_like_its_work(
        tmp_path, capsys, settings, intruder, tiny_llama_real_tokenizer_dir):
    """The work folder is recognized by its settings' content (not the file's name) and by
    checkpoints that hold files only, as the Trainer writes them."""
    out = tmp_path / "f" / "o"
    work = sibling_path(out, ".work")
    (work / intruder).parent.mkdir(parents=True)
    (work / "prunenet-finetune.json").write_text(settings)
    (work / intruder).write_text("mine")
    before = digest(work)
    refused(capsys, ["-q", "finetune", str(tiny_llama_real_tokenizer_dir), "--out", str(out),
                     "--steps", "1", "--seqlen", "16", "--eval-windows", "1", "--overwrite"],
            "not written by prunenet")
    assert digest(work) == before


@pytest.mark.parametrize("stop, status, said, rest", [
    (KeyboardInterrupt(), 130, "interrupted; written complete before the interrupt",
     "every other output was not written and nothing partial was left behind"),
    (PruneNetError("the policy cannot be written"), 2,
     "error: the policy cannot be written; written complete before the error",
     "every other output was not written")], ids=["interrupt", "error"])
def test_a_stop_between_outputs_names_what_was_written(models, tmp_path, capsys, monkeypatch,
                                                       stop, status, said, rest):
    """A compression commits --out, then --policy-out and --record: interrupted between them,
    or failing there (the policy cannot be written), it says which outputs are in place
    (complete; the policy's training state too, kept for --resume, named once however often it
    was replaced) and that the others were not written; a failed command had named the error
    alone, as if it had written nothing. The next command, failing before any output, names
    none."""
    import prunenet.pipeline

    def stopped(*args, **kwargs):
        raise stop

    monkeypatch.setattr(prunenet.pipeline, "save_policy", stopped)
    out, policy, record = tmp_path / "o", tmp_path / "p.safetensors", tmp_path / "run"
    assert main(["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--out", str(out),
                 "--method", "prunenet", "--episodes", "3", "--policy-out", str(policy),
                 "--record", str(record)]) == status  # the state is replaced after each episode
    line = capsys.readouterr().err.strip().splitlines()[-1]
    state = sibling_path(out, ".train-state.pt")
    assert line == (f"prunenet: {said}: {state} (the policy's training state: the same command "
                    f"with --resume continues from it; delete it to start over), "
                    f"{out.resolve()}; {rest}")
    assert (out / "prunenet.json").is_file() and not policy.exists() and not record.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "o", state.name]
    assert main(["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--out", str(out),
                 "--method", "random"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("prunenet: error: ") and "written complete" not in line


@pytest.mark.parametrize("corpus, message", [
    ("no-such.txt", "unknown corpus"), ("models", "is not a datasets folder"),
    ("", "the corpus is empty"), ("empty.txt", "has 0 tokens in all"),
    ("short.txt", "give more text"), ("binary.txt", "is not UTF-8 text")])
def test_a_bad_finetune_corpus_is_refused_before_the_compression(
        tiny_llama_real_tokenizer_dir, tmp_path, capsys, corpus, message):
    """What the recovery would refuse after the compression is refused before it: a missing or
    unreadable corpus, or one too short for a training and an evaluation window."""
    (tmp_path / "models").mkdir()
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("Four words, no more.")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)))
    texts = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "o"
    refused(capsys, ["-q", "compress", str(tiny_llama_real_tokenizer_dir), "--ratio", "0.3",
                     "--out", str(out), "--method", "random", "--finetune-steps", "2",
                     "--finetune-seqlen", "16",
                     "--finetune-data", str(tmp_path / corpus) if corpus else ""], message)
    assert sorted(p.name for p in tmp_path.iterdir()) == texts


def test_a_finetune_corpus_too_short_names_the_options_compress_takes(
        tiny_llama_real_tokenizer_dir, tmp_path, capsys):
    """compress's recovery reads --finetune-seqlen and has no --eval-windows: a corpus too
    short for its windows names the option compress takes, and finetune's for fewer
    evaluation windows as finetune's (it had said `a shorter --seqlen or fewer --eval-windows`,
    options compress refuses as unknown)."""
    corpus = tmp_path / "short.txt"
    corpus.write_text("Four words, no more. " * 20)
    line = refused(capsys, ["-q", "compress", str(tiny_llama_real_tokenizer_dir), "--ratio",
                            "0.3", "--out", str(tmp_path / "o"), "--method", "random",
                            "--finetune-steps", "2", "--finetune-seqlen", "16",
                            "--finetune-data", str(corpus)], "give more text")
    assert "a shorter --finetune-seqlen" in line and "prunenet finetune" in line, line
    assert " --seqlen" not in line and "or fewer --eval-windows" not in line, line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option, path, message", [
    ("--out", "", "--out is empty"), ("--record", "", "--record is empty"),
    ("--out", "o\udcff\udcfe", "is not valid UTF-8"),
    ("--record", "r\udcff", "is not valid UTF-8")])
def test_an_empty_or_undecodable_output_path_is_refused(models, tmp_path, capsys, monkeypatch,
                                                        option, path, message):
    """An empty path would name the current folder; a name of bytes that are not UTF-8
    (a surrogate in Python's view of argv) cannot be written in a record or a message."""
    run = tmp_path / "cwd"
    run.mkdir()
    monkeypatch.chdir(run)
    argv = ["-q", "compress", str(models / "llama"), "--ratio", "0.3", "--method", "random"]
    argv += ["--out", path] if option == "--out" else ["--out", str(tmp_path / "o"), option, path]
    refused(capsys, argv, message)
    assert list(run.iterdir()) == [] and not (tmp_path / "o").exists()


def test_a_full_disk_while_training_a_policy_is_one_line(models, tmp_path, capsys, monkeypatch):
    """torch reports a failed write of the training state as a RuntimeError: one line, exit 2,
    and no staging file left."""
    from prunenet.selection.prunenet import reinforce

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 0")

    monkeypatch.setattr(reinforce.torch, "save", full)
    refused(capsys, ["-q", "train-policy", str(models / "llama"), "--ratio", "0.3", "--episodes",
                     "2", "--out", str(tmp_path / "p.safetensors")],
            "cannot write the policy's training state")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def _compress_random(models: Path, out: Path, ratio: str, *extra: str) -> list[str]:
    return ["-q", "compress", str(models / "llama"), "--ratio", ratio, "--method", "random",
            "--reconstruct", "none", "--out", str(out), *extra]


def test_an_interrupt_while_an_output_is_replaced_keeps_one_whole_output(models, tmp_path,
                                                                         capsys, monkeypatch):
    """--overwrite moves the previous output aside, then renames the new one in: SIGTERM
    between the two renames is held until both are done, so the new output is in place and
    nothing is left aside (it had left no --out at all, the previous one hidden)."""
    out = tmp_path / "o"
    assert main(_compress_random(models, out, "0.5")) == 0
    real_rename = os.rename

    def rename_then_terminate(source, destination):
        real_rename(source, destination)
        if Path(source) == out:  # the previous output just moved aside
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(os, "rename", rename_then_terminate)
    assert main(_compress_random(models, out, "0.25", "--overwrite")) == 130
    assert f"written complete before the interrupt: {out.resolve()}" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == int(0.75 * make_tiny_model("llama").config
                                              .intermediate_size)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "o"]


@pytest.mark.parametrize("where", ["staging", "scratch"])
def test_a_second_interrupt_while_a_run_cleans_up_leaves_nothing(models, tmp_path, capsys,
                                                                 monkeypatch, where):
    """Ctrl-C pressed twice: the second arrives while the first's cleanup removes the
    unfinished output (or a streamed run's scratch folder beside it); it is held until the
    removal is done, so no partial folder is left (it had stopped the removal half way)."""
    import prunenet.io.loading
    from prunenet.io import files

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    real_rmtree = shutil.rmtree

    def rmtree_interrupted(path, *args, **kwargs):
        if is_staging_name(Path(path).name):
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, as the removal starts
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(files.shutil, "rmtree", rmtree_interrupted)
    # Python's own Ctrl-C handler, whatever this process inherited (a background job ignores it)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if where == "staging":
            monkeypatch.setattr(prunenet.io.loading, "write_card", interrupted)
            assert main(_compress_random(models, tmp_path / "o", "0.5")) == 130
            assert capsys.readouterr().err.strip().splitlines()[-1] == (
                "prunenet: interrupted; no partial output was left behind")
        else:
            with pytest.raises(KeyboardInterrupt):
                with files.scratch_folder(tmp_path / "o") as scratch:
                    (scratch / "offload").mkdir()
                    (scratch / "offload" / "layer-0.safetensors").write_bytes(b"0" * 4096)
                    raise KeyboardInterrupt
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_a_failed_replacement_puts_the_previous_output_back(models, tmp_path, capsys,
                                                          monkeypatch):
    out = tmp_path / "o"
    assert main(_compress_random(models, out, "0.5")) == 0
    before = digest(out)
    real_rename = os.rename

    def refuse_the_new_output(source, destination):
        if Path(destination) == out and is_staging_name(Path(source).name):
            raise OSError(errno.EIO, "Input/output error")
        real_rename(source, destination)

    monkeypatch.setattr(os, "rename", refuse_the_new_output)
    refused(capsys, _compress_random(models, out, "0.25", "--overwrite"), "Input/output error")
    assert digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "o"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_take_the_permissions_the_umask_leaves(models, tmp_path, umask):
    """Output folders, as the files in them and the folders mkdir makes, are 0755 and files
    0644 less the umask: under umask 077 nothing is readable by others (the output folders had
    been 0755 whatever the umask)."""
    previous = os.umask(umask)
    try:
        assert main([*_compress_random(models, tmp_path / "o", "0.5"), "--record",
                     str(tmp_path / "r")]) == 0
    finally:
        os.umask(previous)
    for folder in (tmp_path / "o", tmp_path / "r"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755 & ~umask, folder
        for file in folder.iterdir():
            assert stat.S_IMODE(file.stat().st_mode) == 0o644 & ~umask, file


def test_a_mount_point_as_out_is_refused_before_any_work(models, tmp_path, capsys,
                                                        monkeypatch):
    """A mount point cannot be renamed onto: refused at once, not after the work."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == mount
                        or real_ismount(path))
    refused(capsys, _compress_random(models, mount, "0.5"), f"--out {mount} is a mount point")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt", "models"]
    assert not any(mount.iterdir())


@pytest.mark.parametrize("argv", [
    lambda models, where: _compress_random(models, where / "o", "0.5"),
    lambda models, where: ["-q", "eval", str(models / "llama"), "--ppl", "none", "--json",
                           str(where / "result.json")],
])
def test_a_write_failing_on_a_full_disk_leaves_no_folders_it_made(models, tmp_path, capsys,
                                                                   monkeypatch, argv):
    """The folders made above an output (a folder, a file) are removed with it when its write
    fails: here the disk is full as the finished files are made readable."""
    import prunenet.io.files

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prunenet.io.files, "make_readable", full)
    refused(capsys, argv(models, tmp_path / "a" / "b"), "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


@pytest.mark.parametrize("argv, message", [
    (["compress", "M", "--ratio", "0.3", "--method", "activation", "--calibration-corpus", "",
      "--out", "o"], "the corpus is empty; give a named corpus"),
    (["compare", "M", "--ratios", "0.3", "--ppl", "", "--out", "o"],
     "the corpus is empty; give a named corpus"),
    (["compare", "M", "--ratios", "0.3", "--methods", "activation", "--calibration-corpus", "",
      "--out", "o"], "the corpus is empty; give a named corpus"),
    (["eval", "M", "--json", ""], "--json is empty; give a path"),
    (["eval", "M", "--ppl", ""], "the corpus is empty; give a named corpus"),
    (["report", "R", "--out", ""], "--out is empty; give a path"),
])
def test_an_empty_path_or_corpus_is_refused_not_read_as_the_current_folder(
        tiny_llama_dir, tmp_path, monkeypatch, capsys, argv, message):
    """'' as a path is the current folder: a corpus, JSON file or report folder given as ''
    is refused in one line saying it is empty, before any work (no model loads), and the
    current folder is left as it was."""
    import prunenet.io.loading

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(prunenet.io.loading, "load_model_and_tokenizer", no_load)
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("user data")
    monkeypatch.chdir(work)
    argv = [str(tiny_llama_dir) if part == "M" else str(tmp_path / "run") if part == "R"
            else part for part in argv]
    capsys.readouterr()
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"prunenet: error: {message}"), err
    assert sorted(path.name for path in work.iterdir()) == ["keep.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny-llama", "work"]


def test_an_empty_corpus_or_report_folder_is_refused_from_python(tiny_llama_dir, tmp_path,
                                                                 monkeypatch):
    """From Python, as on the command line: '' names no corpus and no report folder."""
    import prunenet
    from prunenet.errors import OutputError
    from prunenet.evaluation.corpora import corpus_read_path
    from prunenet.report import write_report
    from prunenet.selection.activation import Calibration

    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="^the corpus is empty; give a named corpus"):
        corpus_read_path("")
    with pytest.raises(InputError, match="^the corpus is empty; give a named corpus"):
        prunenet.compress(str(tiny_llama_dir), 0.3, method="activation",
                          calibration=Calibration(corpus=""), out=tmp_path / "o")
    with pytest.raises(OutputError, match="^--out is empty; give a path$"):
        write_report(tmp_path / "run", out="")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny-llama"]


@pytest.mark.parametrize("keywords, message", [
    ({"out": 3}, "--out must be a path, got 3"),
    ({"out": "o", "probe_cache": 3}, "--probe-cache must be a path, got 3"),
    ({"out": "o", "record_dir": 3.5}, "--record must be a path, got 3.5"),
])
def test_an_output_that_is_no_path_is_refused_in_one_line(tiny_llama_dir, tmp_path, monkeypatch,
                                                         keywords, message):
    """From Python, an output given as a number is refused naming it, before any work (it had
    ended in a TypeError from pathlib)."""
    import prunenet
    from prunenet.errors import OutputError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match=f"^{message}$"):
        prunenet.compress(str(tiny_llama_dir), 0.5, method="random", reconstruct="none",
                          progress=False, **keywords)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny-llama"]


@pytest.mark.parametrize("argv, what, folder", [
    (lambda models, cache: ["-q", "eval", str(models / "llama"), "--ppl", "none", "--json",
                            str(cache / "zeroshot" / "hf_datasets" / "result.json")],
     "--json", "zeroshot"),
    (lambda models, cache: _compress_random(models, cache / "models" / "SmolLM2-135M-Instruct",
                                            "0.5", "--overwrite"),
     "--out", "models/SmolLM2-135M-Instruct"),
    (lambda models, cache: _compress_random(models, cache / "o", "0.5", "--record",
                                            str(cache / "wiki" / "run")),
     "--record", "wiki"),
    (lambda models, cache: _compress_random(models, cache, "0.5"), "--out", "smollm2-gguf"),
])
def test_no_output_goes_into_the_folders_fetch_replaces(models, tmp_path, capsys, monkeypatch,
                                                        argv, what, folder):
    """The asset cache's folders are fetch's (data other runs read, the conversions the model
    aliases load, replaced by `fetch --force`): an output inside one, or one that is one, or
    holds one, is refused before any work, fetched or not yet."""
    cache = tmp_path / "cache"
    (cache / "zeroshot" / "hf_datasets").mkdir(parents=True)
    monkeypatch.setenv("PRUNENET_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    before = digest(tmp_path)
    line = refused(capsys, argv(models, cache), f"prunenet's asset folder {cache / folder}")
    assert line.startswith(f"prunenet: error: {what} ")
    assert digest(tmp_path) == before
    assert sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*")) == [
        "zeroshot", "zeroshot/hf_datasets"]


_KILLED_WHILE_STAGING = """
import os, sys
from pathlib import Path
from prunenet.io.files import atomic_folder
with atomic_folder(Path(sys.argv[1])) as staging:
    (staging / "model.safetensors").write_bytes(bytes(4096))
    os.kill(os.getpid(), 9)
"""


def test_a_staging_folder_left_by_a_killed_run_is_removed_by_the_next_run(models, tmp_path):
    """A run killed outright (SIGKILL, the out-of-memory killer) cannot clean up: its staging
    folder, as large as the model it was writing, had stayed beside the output for good. The
    next run for the same output removes it; a live run's staging folder, another output's, a
    file, and a folder of another name are left alone."""
    import subprocess
    import sys

    import prunenet
    from prunenet.io.files import atomic_folder

    out = tmp_path / "o"
    source = str(Path(prunenet.__file__).parents[1])
    killed = subprocess.run([sys.executable, "-c", _KILLED_WHILE_STAGING, str(out)],
                            env={**os.environ, "PYTHONPATH": source})
    assert killed.returncode == -signal.SIGKILL
    (left,) = [p for p in tmp_path.iterdir() if is_staging_name(p.name)]
    assert left.name.startswith(sibling_prefix(out, "tmp"))
    assert (left / "model.safetensors").is_file()
    kept = {tmp_path / ".o.tmp-mine": "folder", tmp_path / ".o.tmp-abcdefgh": "file",
            tmp_path / f"{sibling_prefix(tmp_path / 'p', 'tmp')}abcdefgh": "folder"}
    for path, kind in kept.items():
        if kind == "folder":
            path.mkdir()
            (path / "notes.txt").write_text("mine")
        else:
            path.write_text("mine")
    with pytest.raises(KeyboardInterrupt):  # a run for the same output, still working
        with atomic_folder(out) as live:
            (live / "part").write_text("working")
            assert main(_compress_random(models, out, "0.5")) == 0
            assert (live / "part").read_text() == "working"
            raise KeyboardInterrupt
    assert not left.exists() and (out / "prunenet.json").is_file()
    assert all(path.exists() for path in kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["models", "o", *(path.name for path in kept)])


def _lock_is_taken(lock_path: Path) -> bool:
    """Whether another holder has the flock on the file now at ``lock_path``."""
    import fcntl

    handle = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(handle)
    return False


def test_the_output_lock_leaves_no_file_even_after_a_killed_run(models, tmp_path):
    """A run killed while it held the output lock leaves its empty lock file; the next run
    writing that output takes the lock on it and removes it when done. A file at the lock
    path that holds anything is not prunenet's: refused, kept."""
    from prunenet.errors import OutputError
    from prunenet.io.files import output_lock

    out = tmp_path / "o"
    lock_path = tmp_path / (sibling_prefix(out, "lock") + "0")
    lock_path.write_bytes(b"")
    with output_lock(out):
        assert _lock_is_taken(lock_path)
    assert not lock_path.exists()
    lock_path.write_bytes(b"")
    assert main(_compress_random(models, out, "0.5")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "o"]
    lock_path.write_text("mine")
    with pytest.raises(OutputError, match="not an empty file"):
        with output_lock(out):
            pass
    assert lock_path.read_text() == "mine"


def test_a_lock_taken_on_a_file_removed_meanwhile_is_taken_again(tmp_path, monkeypatch):
    """The previous holder removes the lock file as it lets go: a run that was waiting gets
    the lock on a file no longer at the path, where a third run could make and lock a new one.
    It takes the lock again on the file at the path, so it never holds it beside another."""
    import fcntl

    import prunenet.io.files as files

    out = tmp_path / "o"
    lock_path = tmp_path / (sibling_prefix(out, "lock") + "0")
    removed = []

    class PreviousHolderLetsGo:  # the first flock returns once that file was removed
        LOCK_EX, LOCK_NB, LOCK_UN = fcntl.LOCK_EX, fcntl.LOCK_NB, fcntl.LOCK_UN

        @staticmethod
        def flock(handle, operation):
            if not removed:
                removed.append(lock_path)
                lock_path.unlink()
            return fcntl.flock(handle, operation)

    monkeypatch.setattr(files, "fcntl", PreviousHolderLetsGo)
    with files.output_lock(out):
        assert removed and _lock_is_taken(lock_path)
    assert not lock_path.exists()
