"""Fingerprints of GGUF outputs, to prove a change to the GGUF writer alters no byte.

    python benchmarks/gguf_identity.py OUT.json            # tiny GGUFs of five architectures
    python benchmarks/gguf_identity.py OUT.json --real     # also SmolLM2-135M's Q4_1 GGUF
    python benchmarks/gguf_identity.py OUT.json --compare REFERENCE.json

Every tiny GGUF of the tests (llama, qwen2, qwen3, gemma3, phi3; FFN stored as Q4_1, Q8_0, F16
and Q4_K) is loaded, pruned to a seeded half of its neurons (whole 32-blocks), its ``ffn_down``
changed as a refit changes it, and written by ``write_pruned_gguf`` with ``ffn_down`` as each of
the source's default, Q4_0, F16, F32, BF16 and Q5_1; ``--real`` adds SmolLM2 at 0.3. Records the
sha256 of each file; ``--compare`` exits 1 naming every output that differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gguf import GGMLQuantizationType  # noqa: E402
from test_gguf_out import GGUF_ARCHITECTURES, _load_gguf, _tiny_gguf  # noqa: E402

from prunenet.assets import asset_path  # noqa: E402
from prunenet.io.gguf_out import write_pruned_gguf  # noqa: E402
from prunenet.model_view import FFNView  # noqa: E402
from prunenet.slicing import slice_model  # noqa: E402

SOURCE_TYPES = ("Q4_1", "Q8_0", "F16", "Q4_K")
DOWN_TYPES = (None, "Q4_0", "F16", "F32", "BF16", "Q5_1")


def fingerprints(source: Path, folder: Path, name: str, downs, ratio: float = 0.5) -> dict:
    """sha256 of each GGUF written from ``source`` pruned at ``ratio`` (seeded rows)."""
    model = _load_gguf(source)
    view = FFNView(model)
    generator = torch.Generator().manual_seed(0)
    kept = int(view.d_ff * (1 - ratio)) // 32 * 32
    rows = [torch.randperm(view.d_ff, generator=generator)[:kept].sort().values
            for _ in range(view.num_layers)]
    slice_model(model, rows)
    with torch.no_grad():  # a refitted ffn_down is not the slice of the source's
        for parameter_name, parameter in model.named_parameters():
            if "down_proj" in parameter_name:
                parameter.mul_(1.01)
    found = {}
    for down in downs:
        written = folder / f"{name}-{down}.gguf"
        write_pruned_gguf(source, model, rows, written, down)
        found[f"{name}-{down or 'default'}"] = hashlib.sha256(written.read_bytes()).hexdigest()
        written.unlink()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON file for the fingerprints")
    parser.add_argument("--real", action="store_true", help="also SmolLM2-135M's GGUF")
    parser.add_argument("--compare", metavar="REFERENCE", help="fingerprints to compare with")
    args = parser.parse_args()
    found: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as folder:
        tiny = asset_path("tinycoder-gguf") / "tiny.gguf"  # not fetched: a one-line error
        for architecture in GGUF_ARCHITECTURES:
            for source_type in SOURCE_TYPES:
                name = f"{architecture}-{source_type}"
                source = _tiny_gguf(Path(folder) / f"{name}.gguf",
                                    GGMLQuantizationType[source_type], tiny,
                                    architecture=architecture)
                found |= fingerprints(source, Path(folder), name, DOWN_TYPES)
        if args.real:
            found |= fingerprints(asset_path("smollm2-gguf") / "SmolLM2-135M-Instruct.Q4_1.gguf",
                                  Path(folder), "smollm2", [None], ratio=0.3)
    Path(args.out).write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
    print(f"{len(found)} GGUF outputs fingerprinted into {args.out}")
    if args.compare:
        reference = json.loads(Path(args.compare).read_text())
        differ = sorted(key for key in reference.keys() | found.keys()
                        if reference.get(key) != found.get(key))
        for key in differ:
            print(f"differs: {key}")
        print(f"{len(found) - len(differ)} of {len(found)} the same")
        raise SystemExit(1 if differ else 0)


if __name__ == "__main__":
    from script_main import run_script

    run_script(main)
