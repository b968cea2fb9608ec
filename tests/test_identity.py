"""The outputs of a fixed set of runs on every tiny family are byte-identical to those recorded
from the code before the selection methods became one package (tests/data/identity-reference.json,
written by ``python benchmarks/identity.py tests/data/identity-reference.json --real`` on that
code): every weight, policy, spectra and plot file, and the records up to the method's name.
The report's plots are pinned as drawn since their x axes tick whole layers and episodes only
(the kept-neurons and layer-KS plots, and the training plot of a one-episode run): the same
lines, other ticks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _identity_module():
    spec = importlib.util.spec_from_file_location("identity", ROOT / "benchmarks" / "identity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_outputs_are_byte_identical_to_the_recorded_reference():
    identity = _identity_module()
    reference = json.loads((ROOT / "tests" / "data" / "identity-reference.json").read_text())
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
