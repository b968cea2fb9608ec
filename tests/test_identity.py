"""The outputs of a fixed set of runs on every tiny family are byte-identical to those recorded
from the code before the selection methods became one package (tests/data/identity-reference.json,
written by ``python benchmarks/identity.py tests/data/identity-reference.json --real`` on that
code): every weight, policy, spectra and plot file, and the records up to the method's name.
The report's plots are pinned as drawn since their x axes tick whole layers and episodes only
(the kept-neurons and layer-KS plots, and the training plot of a one-episode run): the same
lines, other ticks. A policy's and a record's spectra values, which BLAS and LAPACK compute
differently on other CPUs in their last bits, equal the reference's bytes on the machine that
wrote it and lie within float32 rounding of its values elsewhere (benchmarks/identity.py)."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _identity_module():
    spec = importlib.util.spec_from_file_location("identity", ROOT / "benchmarks" / "identity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_outputs_are_byte_identical_to_the_recorded_reference():
    identity = _identity_module()
    reference = identity.load_reference(ROOT / "tests" / "data" / "identity-reference.json")
    results = identity.fingerprints(real=False)
    assert set(results) <= set(reference)
    assert len(results) == 16 * len(identity.TINY_RUNS)
    assert any(name.endswith(".safetensors") for run in results.values() for name in run)
    assert identity.differences(results, reference) == []


def test_the_comparison_notices_a_changed_file_and_a_renamed_method():
    identity = _identity_module()
    reference = {"llama/x": {"out/model.safetensors": "aa", "prunenet.json": {"method": "random"}}}
    assert identity.differences(reference, reference) == []
    changed = {"llama/x": {"out/model.safetensors": "ab", "prunenet.json": {"method": "random"}}}
    assert identity.differences(changed, reference) == ["llama/x: out/model.safetensors differs"]
    renamed = {"llama/x": {"out/model.safetensors": "aa", "prunenet.json": {"method": "magic"}}}
    assert identity.differences(renamed, reference) == ["llama/x: prunenet.json differs"]
    legacy = identity.normalized_record({"method": "prunenet", "variant": "self-generated",
                                         "selection": "sample", "policy_sha256": None})
    assert legacy == {"method": "self-generated", "selection": None, "policy_sha256": None}


def _numeric_run(policy_weight: float, loss: float, png: str = "p1") -> dict:
    tensors = {"weight": torch.tensor([0.25, policy_weight], dtype=torch.float32)}
    digest = hashlib.sha256(tensors["weight"].numpy().tobytes()).hexdigest()
    return {"llama/x": {
        "out/model.safetensors": "aa",
        "policy.safetensors": {"sha256": digest, "tensors": tensors,
                               "header": {"prunenet": {"checksum": digest, "loss": loss}}},
        "record/report/training.png": png,
        "record/record.json": {"compression": {"policy_sha256": digest[:8]},
                               "training": {"loss": loss}},
    }}


def test_values_computed_by_another_cpu_compare_within_float32_rounding_and_no_further(
        tmp_path):
    """A policy whose values differ from the reference's in their last bits (another CPU's
    kernels) equals it, with its checksums and plots; one an update away does not; the
    pruned weights are compared by their bytes however the values compare."""
    identity = _identity_module()
    reference = _numeric_run(0.5, 145.40193)
    identity.save_reference(reference, tmp_path / "ref.json")
    loaded = identity.load_reference(tmp_path / "ref.json")
    assert loaded["llama/x"]["policy.safetensors"]["tensors"]["weight"].tolist() == [0.25, 0.5]
    assert identity.differences(reference, loaded) == []
    other_cpu = _numeric_run(0.5 + 3e-8, 145.40193 * (1 + 1e-7), png="p2")
    assert identity.differences(other_cpu, loaded) == []
    one_update = _numeric_run(0.5 + 1e-3, 145.40193)
    assert identity.differences(one_update, loaded) == ["llama/x: policy.safetensors differs"]
    other_loss = _numeric_run(0.5 + 3e-8, 145.5)
    assert identity.differences(other_loss, loaded) == [
        "llama/x: policy.safetensors differs", "llama/x: record/record.json differs"]
    same_values_other_plot = _numeric_run(0.5, 145.40193, png="p2")
    assert identity.differences(same_values_other_plot, loaded) == [
        "llama/x: record/report/training.png differs"]
    other_cpu["llama/x"]["out/model.safetensors"] = "ab"
    assert identity.differences(other_cpu, loaded) == ["llama/x: out/model.safetensors differs"]


@pytest.mark.parametrize("argv, message", [
    (["ref.safetensors"], "OUT must end in .json (its tensors go to ref.safetensors beside "
                          "it), got ref.safetensors"),
    (["ref.json", "--compare", "ref.json"], "OUT is the --compare reference: it would be "
                                            "replaced before it is read"),
])
def test_the_script_never_writes_over_the_reference_it_reads(tmp_path, monkeypatch, capsys,
                                                             argv, message):
    """A reference named as OUT was replaced by the new fingerprints and then compared with
    itself; an OUT ending in .safetensors was overwritten by its own tensors."""
    identity = _identity_module()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ref.json").write_text("{}")
    monkeypatch.setattr(identity, "fingerprints", lambda real: pytest.fail("it ran"))
    monkeypatch.setattr("sys.argv", ["identity.py", *argv])
    with pytest.raises(SystemExit):
        identity.main_cli()
    assert capsys.readouterr().err.strip().endswith(message)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ref.json"]
    assert (tmp_path / "ref.json").read_text() == "{}"
