"""The timing scripts run against today's pipeline: benchmarks/compress_cost.py and
benchmarks/compare_cost.py wrap functions of prunenet by name and signature, and a change there
must not leave them broken until the next measurement."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from conftest import make_tiny_model, real_tokenizer_model  # noqa: E402


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


def test_compare_cost_counts_the_passes_each_arm_makes(tmp_path, tmp_path_factory):
    model = real_tokenizer_model(tmp_path_factory, "tiny-compare-cost", hidden_size=32,
                                 intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)
    text = tmp_path / "text.txt"
    text.write_text("The river runs past the mill and under the old stone bridge. " * 300)
    done = subprocess.run(
        [sys.executable, str(HERE / "compare_cost.py"), str(tmp_path / "out"), "--", str(model),
         "--ratios", "0.25,0.5", "--methods", "self-generated,activation", "--ppl", str(text),
         "--seqlen", "32", "--windows", "1", "--tasks", "", "--calibration-corpus", str(text),
         "--calibration-windows", "1",
         "--speed-prompt", "4", "--speed-new-tokens", "1", "--speed-repeats", "1"],
        capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["shared_passes"], result["each_passes"]) == (1, 4)
    assert (result["shared_calibration_passes"], result["each_calibration_passes"]) == (1, 2)
    assert result["same_results"] is True
