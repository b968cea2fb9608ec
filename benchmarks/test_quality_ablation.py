"""benchmarks/quality_ablation.py's log: a run already logged is skipped only for the same
variant, ratio, seed, windows and model, and --report keeps each model's runs apart."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_ablation  # noqa: E402


def _log(tmp_path, entries) -> Path:
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    return log


def test_a_run_of_another_model_is_not_taken_from_the_log(tmp_path):
    from quality_ablation import done_runs, run_entry, run_id

    smollm = run_entry("smollm2-135m", "random", 0.3, 1, 16)
    log = _log(tmp_path, [{**smollm, "perplexity": 40.0, "select_seconds": 0.0}])
    done = done_runs(log)
    assert run_id(run_entry("smollm2-135m", "random", 0.3, 1, 16)) in done
    for other in (run_entry("gemma3-270m", "random", 0.3, 1, 16),
                  run_entry("smollm2-135m", "random", 0.2, 1, 16),
                  run_entry("smollm2-135m", "random", 0.3, 2, 16),
                  run_entry("smollm2-135m", "random", 0.3, 1, 8),
                  run_entry("smollm2-135m", "magnitude", 0.3, 1, 16)):
        assert run_id(other) not in done


def test_a_logged_record_of_the_default_model_is_still_found():
    from quality_ablation import run_entry, run_id

    with (Path(__file__).resolve().parent / "results" / "quality_confirm16.jsonl").open() as log:
        first = json.loads(log.readline())
    entry = run_entry("smollm2-135m", first["variant"], first["ratio"], first["seed"],
                      first["windows"])
    assert run_id(entry) == run_id(first)


def test_report_gives_each_model_its_rows_and_the_geometric_mean_over_seeds(tmp_path):
    entries = [{"variant": "random", "ratio": 0.3, "seed": seed, "windows": 16,
                "perplexity": value, "select_seconds": 0.0, **model}
               for model, values in (({}, (10.0, 40.0)), ({"model": "gemma3-270m"}, (30.0,)))
               for seed, value in enumerate(values)]
    rows = quality_ablation.report(str(_log(tmp_path, entries))).splitlines()[2:]
    assert len(rows) == 2
    assert any("| 20.00 (10.00-40.00) |" in row for row in rows)
    assert any("| 30.00 |" in row for row in rows)


def test_an_unknown_variant_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    def load(*_args, **_kwargs):
        raise AssertionError("loaded the model")

    monkeypatch.setattr(quality_ablation, "load_model_and_tokenizer", load)
    monkeypatch.setattr(sys, "argv", ["quality_ablation.py", "--variants", "random,randm",
                                      "--log", str(tmp_path / "log.jsonl")])
    with pytest.raises(SystemExit) as exit_info:
        quality_ablation.main()
    assert str(exit_info.value).startswith("unknown variant 'randm'; use one of random, ")
    assert not (tmp_path / "log.jsonl").exists()
