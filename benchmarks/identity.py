"""Fingerprints of every output file of a fixed set of runs, to prove a change alters no result.

    python benchmarks/identity.py OUT.json            # tiny models of every family
    python benchmarks/identity.py OUT.json --real     # also SmolLM2-135M (needs `prunenet fetch`)
    python benchmarks/identity.py OUT.json --compare REFERENCE.json

For each run it records the sha256 of every weight, policy, spectra and plot file the run wrote,
and the compression records with machine-dependent fields (paths, version) removed. ``--compare``
exits 1 naming every file or record that differs from REFERENCE.json. Records written before the
method names were unified (``"method": "prunenet"`` with a ``"variant"``) are read with the names
of today, so a reference taken from that code compares equal when the results are.

A policy and a run record's spectra hold float32 values that BLAS and LAPACK compute (the
policy's training, singular values), whose last bits differ between CPUs (measured: at most
4.5e-7 on spectra of scale 0.3 and 1.5e-8 on policy weights between the kernels one CPU offers,
9e-8 relative on training losses between two machines). Their values are kept beside the
reference (REFERENCE.safetensors) and such a file equals its reference when its bytes do, or
else when every value lies within ``RTOL``/``ATOL`` of it; a run's plots, drawn from those
values, are then not compared by their bytes, and records compare their floats within the same
bounds. Weights of the pruned models are compared by their bytes everywhere, and so are the
real model's (``--real``) policy and spectra, whose values would add megabytes to the reference.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import TINY_CONFIGS, make_tiny_model  # noqa: E402
from prunenet.cli import main  # noqa: E402

try:
    from prunenet.io.loading import resolve_source
except ImportError:  # the code before the io package
    from prunenet.checkpoints import resolve_source

HASHED = ("*.safetensors", "*.png")
VOLATILE = ("source", "prunenet_version")  # paths of this machine, the package version
NUMERIC = ("policy.safetensors", "record/spectra.safetensors")  # float32 values of BLAS and LAPACK
RTOL, ATOL = 1e-4, 1e-5  # how far such a value may lie from its reference on another CPU

# Runs on every tiny family: (name, compress/prune arguments in today's option names). The code
# before the probe and refit stages had a probe of 4 sequences of min(128, positions) tokens
# drawn by torch.multinomial and no refit: NO_REFIT and LEGACY_PROBE repeat that (the tiny
# models have 64 positions).
TINY_RUNS = [
    ("self-generated", ["--method", "self-generated", "--probe-tokens", "{probe}"]),
    ("random", ["--method", "random", "--seed", "3"]),
    ("magnitude", ["--method", "magnitude"]),
    ("magnitude-product", ["--method", "magnitude-product"]),
    ("prunenet", ["--method", "prunenet", "--episodes", "2", "--record", "{work}/record",
                  "--policy-out", "{work}/policy.safetensors"]),
    ("prunenet-topk", ["--method", "prunenet", "--episodes", "2", "--selection", "topk"]),
]
REAL_RUNS = [
    ("self-generated", ["--method", "self-generated", "--probe-tokens", "{probe}"]),
    ("random", ["--method", "random"]),
    ("activation", ["--method", "activation", "--calibration-windows", "2"]),
    ("prunenet", ["--method", "prunenet", "--episodes", "1", "--record", "{work}/record",
                  "--policy-out", "{work}/policy.safetensors"]),
]


def unified_methods() -> bool:
    """Whether the code under test names methods in one namespace (no --variant axis)."""
    from prunenet.cli import build_parser

    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text), contextlib.suppress(SystemExit):
        build_parser().parse_args(["compress", "--help"])
    return "self-generated" in help_text.getvalue().split("--method", 1)[1].split("--", 1)[0]


NO_REFIT = ["--reconstruct", "none"]
LEGACY_PROBE = ["--probe-length", "128", "--probe-temperature", "1", "--probe-sampler",
                "multinomial"]


def today_arguments(arguments: list[str]) -> list[str]:
    """The arguments with the probe and refit stages set as the code before them ran (the
    probe's options only for the method that generates one: others refuse them)."""
    generates = arguments[arguments.index("--method") + 1] == "self-generated"
    return [*arguments, *NO_REFIT, *(LEGACY_PROBE if generates else [])]


def legacy_arguments(arguments: list[str]) -> list[str]:
    """Today's ``--method`` names in the options of the code before the names were unified."""
    result = list(arguments)
    if "--probe-tokens" in result:
        index = result.index("--probe-tokens")
        del result[index:index + 2]
    index = result.index("--method")
    method = result[index + 1]
    if method == "self-generated":
        result[index:index + 2] = ["--method", "prunenet", "--variant", "self-generated"]
    elif method == "prunenet":
        result[index:index + 2] = ["--method", "prunenet", "--variant", "reference"]
    return result


def normalized_record(record: dict[str, Any]) -> dict[str, Any]:
    """A record without machine-dependent fields, methods named as today."""
    record = {k: v for k, v in record.items() if k not in VOLATILE}
    if record.get("reconstruct") == {"mode": "none"}:
        del record["reconstruct"]  # the stage did not run: as before it existed
    if record.get("round_to") == 1:
        del record["round_to"]  # the exact kept count: as before the option existed
    if record.get("device") in (None, "cpu"):
        record.pop("device", None)  # on the CPU, or no policy ran: as before it was recorded
    if record.get("probe", {}).get("sequence_length") == 128:
        del record["probe"]
    variant = record.pop("variant", None)
    if record.get("method") == "prunenet" and variant not in (None, "reference"):
        record["method"] = variant
        record["selection"] = None
        record["policy_sha256"] = None
    for nested in ("compression",):
        if isinstance(record.get(nested), dict):
            record[nested] = normalized_record(record[nested])
    return record


def fingerprint(folder: Path, values: bool = True) -> dict[str, Any]:
    """sha256 of the hashed files under ``folder`` and its normalized JSON records; with
    ``values``, for the :data:`NUMERIC` files also their header and tensors."""
    result: dict[str, Any] = {}
    for pattern in HASHED:
        for path in sorted(folder.rglob(pattern)):
            name = str(path.relative_to(folder))
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            result[name] = _values(path, digest) if values and name in NUMERIC else digest
    for name in ("prunenet.json", "record/record.json"):
        path = folder / name
        if path.is_file():
            result[name] = normalized_record(json.loads(path.read_text()))
    return result


def _values(path: Path, digest: str) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as handle:
        header = {key: json.loads(text) for key, text in (handle.metadata() or {}).items()}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    return {"sha256": digest, "header": header, "tensors": tensors}


def save_reference(results: dict[str, Any], path: Path) -> None:
    """``results`` as ``path`` (JSON) and the :data:`NUMERIC` files' tensors beside it."""
    tensors, plain = {}, {}
    for run_name, files in results.items():
        plain[run_name] = {}
        for name, value in files.items():
            if isinstance(value, dict) and "tensors" in value:
                for tensor_name, tensor in value["tensors"].items():
                    tensors[f"{run_name}|{name}|{tensor_name}"] = tensor.contiguous()
                value = {k: v for k, v in value.items() if k != "tensors"}
            plain[run_name][name] = value
    path.write_text(json.dumps(plain, indent=1, sort_keys=True) + "\n")
    save_file(tensors, str(path.with_suffix(".safetensors")))


def load_reference(path: Path) -> dict[str, Any]:
    """What :func:`save_reference` wrote."""
    results = json.loads(path.read_text())
    tensors_file = path.with_suffix(".safetensors")
    for key, tensor in (load_file(str(tensors_file)) if tensors_file.exists() else {}).items():
        run_name, name, tensor_name = key.split("|")
        results[run_name][name].setdefault("tensors", {})[tensor_name] = tensor
    return results


def run(source: str, arguments: list[str], work: Path, legacy: bool, values: bool = True
        ) -> dict[str, Any]:
    # The earlier probe: 4 sequences of min(128, positions) tokens.
    config = json.loads((Path(resolve_source(source)[0]) / "config.json").read_text())
    positions = config.get("max_position_embeddings") or config.get("n_positions") or 128
    arguments = [part.replace("{work}", str(work)).replace("{probe}", str(4 * min(128, positions)))
                 for part in arguments]
    arguments = legacy_arguments(arguments) if legacy else today_arguments(arguments)
    argv = ["-q", "compress", source, "--ratio", "0.3", "--out", str(work / "out"), *arguments]
    if main(argv) != 0:
        raise SystemExit(f"failed: prunenet {' '.join(argv)}")
    if (work / "record").is_dir() and main(["-q", "report", str(work / "record")]) != 0:
        raise SystemExit(f"failed: prunenet report {work / 'record'}")
    if (work / "policy.safetensors").is_file():  # the saved policy reused at another ratio
        if main(["-q", "prune", source, "--policy", str(work / "policy.safetensors"),
                 "--ratio", "0.2", "--out", str(work / "reused"), "--method", "prunenet",
                 *(["--variant", "reference"] if legacy else NO_REFIT)]) != 0:
            raise SystemExit("failed: prunenet prune with the saved policy")
    return fingerprint(work, values)


def fingerprints(real: bool) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same BLAS reduction order on every machine and run
    try:
        return _fingerprints(real)
    finally:
        torch.set_num_threads(threads)


def _fingerprints(real: bool) -> dict[str, Any]:
    legacy = not unified_methods()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for model_type in sorted(TINY_CONFIGS):
            source = root / model_type
            make_tiny_model(model_type).save_pretrained(source)
            for name, arguments in TINY_RUNS:
                work = root / f"{model_type}-{name}"
                results[f"{model_type}/{name}"] = run(str(source), arguments, work, legacy)
        if real:
            for name, arguments in REAL_RUNS:
                work = root / f"smollm2-{name}"
                results[f"smollm2/{name}"] = run("smollm2-135m", arguments, work, legacy,
                                                 values=False)
    return results


def _without_timings(value: Any) -> Any:
    """``value`` without wall-clock fields (an episode's ``seconds``), which no run repeats."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def differences(new: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """One line per file or record of a run both sides have that differs (a :data:`NUMERIC`
    file, a record's floats and, where those differ in their last bits, its plots: as the
    module's docstring says)."""
    new, reference = _without_timings(new), _without_timings(reference)
    lines = []
    for run_name in sorted(set(new) | set(reference)):
        if run_name not in new or run_name not in reference:
            continue  # a run only one side has (e.g. --real on one side only)
        a, b = new[run_name], reference[run_name]
        rounded = any(isinstance(a.get(name), dict) and isinstance(b.get(name), dict)
                      and a[name]["sha256"] != b[name]["sha256"] for name in NUMERIC)
        for key in sorted(set(a) | set(b)):
            if not _equal(key, a.get(key), b.get(key), rounded):
                lines.append(f"{run_name}: {key} differs")
    return lines


def _equal(key: str, new: Any, reference: Any, rounded: bool) -> bool:
    """Whether one file or record of a run equals its reference; ``rounded``: the run's
    :data:`NUMERIC` files differ from theirs in their bytes."""
    if key in NUMERIC and isinstance(new, dict) and isinstance(reference, dict):
        return new["sha256"] == reference["sha256"] or (
            _tensors_close(new["tensors"], reference["tensors"])
            # the checksum hashes the tensors just compared
            and _close(new["header"], reference["header"], skip={"checksum"}))
    if key.endswith(".json"):  # policy_sha256 hashes the policy's tensors
        return _close(new, reference, skip={"policy_sha256"} if rounded else set())
    if key.endswith(".png") and rounded and new is not None and reference is not None:
        return True  # drawn from values that differ in their last bits, compared above
    return new == reference


def _tensors_close(new: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> bool:
    return new.keys() == reference.keys() and all(
        new[name].dtype == reference[name].dtype and new[name].shape == reference[name].shape
        and torch.allclose(new[name].double(), reference[name].double(), rtol=RTOL, atol=ATOL)
        for name in new)


def _close(new: Any, reference: Any, skip: set[str]) -> bool:
    """``new == reference`` but for floats, which may lie within RTOL/ATOL, and the keys in
    ``skip`` of any dict."""
    if isinstance(new, dict) and isinstance(reference, dict):
        return new.keys() == reference.keys() and all(
            key in skip or _close(new[key], reference[key], skip) for key in new)
    if isinstance(new, list) and isinstance(reference, list):
        return len(new) == len(reference) and all(
            _close(x, y, skip) for x, y in zip(new, reference))
    if isinstance(new, float) and isinstance(reference, float):
        return math.isclose(new, reference, rel_tol=RTOL, abs_tol=ATOL)
    return new == reference


def main_cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--real", action="store_true")
    parser.add_argument("--compare", type=Path)
    args = parser.parse_args()
    if args.out.suffix != ".json":  # the tensors are written beside it, as OUT.safetensors
        parser.error(f"OUT must end in .json (its tensors go to "
                     f"{args.out.with_suffix('.safetensors').name} beside it), got {args.out}")
    if args.compare is not None and args.out.resolve() == args.compare.resolve():
        parser.error("OUT is the --compare reference: it would be replaced before it is read")
    results = fingerprints(args.real)
    save_reference(results, args.out)
    if args.compare is None:
        return 0
    found = differences(results, load_reference(args.compare))
    print("\n".join(found) or f"identical: {len(results)} runs")
    return 1 if found else 0


if __name__ == "__main__":
    from script_main import run_script

    run_script(main_cli)
