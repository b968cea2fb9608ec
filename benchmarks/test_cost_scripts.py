"""The timing scripts run against today's pipeline: benchmarks/compress_cost.py wraps functions
of prunenet by name and signature, and a change there must not leave it broken until the next
measurement."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from conftest import make_tiny_model  # noqa: E402


def test_compress_cost_times_every_stage_of_a_refitted_compression(tmp_path):
    make_tiny_model("llama").save_pretrained(tmp_path / "tiny")
    done = subprocess.run(
        [sys.executable, str(HERE / "compress_cost.py"), str(tmp_path / "out"), "--",
         str(tmp_path / "tiny"), "--ratio", "0.25", "--probe-tokens", "64", "--probe-length",
         "16"], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result["seconds"]) == {"load", "check weights", "probe", "statistics",
                                      "selection", "refit solve", "slice", "save"}
    assert (tmp_path / "out" / "prunenet.json").is_file()
