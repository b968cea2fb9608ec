"""The log keys of benchmarks/quality_reconstruct.py: a run already in the log is skipped when
its key matches, so every setting that changes a run's perplexity must change its key (or a
changed setting silently reuses an old result), and the documented commands must still find the
runs the log holds."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from quality_reconstruct import build_parser, cross_key, report, run_key  # noqa: E402

# $B of benchmarks/quality_reconstruct.md
B = "--windows 16 --probe-length 256 --probe-batch 32"


def _args(words: str):
    return build_parser().parse_args(shlex.split(words))


# (starting settings, changed settings): the change alters what a run computes. Settings
# cross() reads: the probe recipe, the texts' size, the evaluation and the refit.
CROSS_CHANGES = [
    ("", "--model gemma3-270m"), ("", "--windows 8"), ("", "--tokens 2048"), ("", "--seed 1"),
    ("", "--probe-length 128"), ("", "--probe-batch 8"), ("", "--eval-text hellaswag"),
    ("", "--first-token random"), ("", "--temperature 1.2"), ("", "--top-p 0.9"),
    ("", "--min-p 0.05"), ("", "--start-temperature 0.6"),
    ("--start-temperature 0.6", "--start-temperature 0.6 --warmup-tokens 16"),
    ("", "--prompt The"), ("", "--one-script"), ("", "--ridge 0.3"),
]

# A probe run reads those and more.
PROBE_CHANGES = [
    *CROSS_CHANGES, ("", "--skip-positions 1"), ("", "--select-tokens 2048"),
    ("", "--keep-likely 0.5"), ("", "--weight-tokens residual"), ("", "--mlp-bias"),
]


@pytest.mark.parametrize(("before", "after"), PROBE_CHANGES)
def test_every_setting_of_a_probe_run_is_in_its_key(before, after):
    job = "self-generated:ls"
    assert run_key(_args(before), job, 0.3, 0) != run_key(_args(after), job, 0.3, 0)


def test_the_policys_training_episodes_are_in_its_key():
    for job in ("prunenet:ls", "prunenet-topk:none"):
        assert run_key(_args("--episodes 20"), job, 0.3, 0) != \
            run_key(_args("--episodes 5"), job, 0.3, 0)


def test_ratio_seed_and_job_are_in_the_key():
    args = _args("")
    keys = {json.dumps(run_key(args, job, ratio, seed))
            for job in ("self-generated:ls", "self-generated:none", "self-generated:ls:energy",
                        "self-generated:ls:wanda:probe:2048", "activation:ls")
            for ratio in (0.2, 0.3) for seed in (0, 1)}
    assert len(keys) == 5 * 2 * 2




@pytest.mark.parametrize(("before", "after"), CROSS_CHANGES)
def test_every_setting_of_a_cross_run_is_in_its_key(before, after):
    method = "rows probe, refit real"
    assert cross_key(_args(before), method, 0.3) != cross_key(_args(after), method, 0.3)


def _logged(name: str) -> set[str]:
    lines = (HERE / "results" / name).read_text().splitlines()
    return {json.dumps(json.loads(line)["key"]) for line in lines}


# Commands of benchmarks/quality_reconstruct.md and a job each: the run they name is in the log.
DOCUMENTED_RUNS = [
    (f"{B} --temperature 1.2 --tokens 8192 --ridge 0.3", "self-generated:ls", 0.3, 0),
    (f"{B} --temperature 1.2 --tokens 8192 --ridge 0.3 --seed 2 --eval-text hellaswag",
     "self-generated:ls", 0.2, 0),
    (f"{B} --temperature 1.2 --tokens 8192 --ridge 0.3 --episodes 20 --random-seeds 0,1,2",
     "prunenet-topk:none", 0.3, 1),
    (f"{B} --tokens 8192 --ridge 0.3", "activation:ls", 0.4, 0),
]


@pytest.mark.parametrize(("words", "job", "ratio", "seed"), DOCUMENTED_RUNS)
def test_documented_commands_find_their_logged_runs(words, job, ratio, seed):
    assert json.dumps(run_key(_args(words), job, ratio, seed)) in \
        _logged("quality_reconstruct.jsonl")


def test_the_documented_32k_command_finds_its_logged_runs():
    args = _args(f"{B} --temperature 1.2 --tokens 32768 --ridge 0.3")
    logged = _logged("quality_reconstruct_32k.jsonl")
    for job in ("self-generated:ls", "activation:ls"):
        assert json.dumps(run_key(args, job, 0.3, 0)) in logged


def test_documented_cross_command_finds_its_logged_runs():
    args = _args(f"{B} --temperature 1.2 --tokens 8192 --ridge 0.3 --cross 0 "
                 "--eval-text hellaswag")
    logged = _logged("quality_reconstruct.jsonl")
    for method in ("rows probe, refit probe", "rows real, refit probe", "rows probe, refit real",
                   "rows real, refit real"):
        assert json.dumps(cross_key(args, method, 0.3)) in logged


def _report(tmp_path, keys_and_values) -> list[str]:
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"key": key, "perplexity": value}) + "\n"
                           for key, value in keys_and_values))
    return report(log).splitlines()


def test_report_gives_the_geometric_mean_and_range_over_seeds(tmp_path):
    args = _args(B)
    runs = [(run_key(args, "random:ls", 0.3, seed), value)
            for seed, value in enumerate((10.0, 20.0, 40.0))]
    runs.append((run_key(args, "random:ls", 0.2, 0), 12.5))
    (row,) = [line for line in _report(tmp_path, runs) if "| random |" in line]
    assert row.endswith("| 12.50 | 20.00 (10.00-40.00, n=3) |")


@pytest.mark.parametrize(("job", "other"), [
    ("prunenet:ls", "--episodes 5"), ("self-generated:ls", "--probe-batch 16"),
    ("self-generated:ls", "--model gemma3-270m"), ("random:ls", "--model gemma3-270m")])
def test_report_keeps_runs_of_other_settings_apart(tmp_path, job, other):
    runs = [(run_key(_args(B), job, 0.3, 0), 30.0), (run_key(_args(f"{B} {other}"), job, 0.3, 0),
                                                     40.0)]
    rows = _report(tmp_path, runs)[2:]
    assert len(rows) == 2 and not any("n=2" in row for row in rows)


def test_report_keeps_the_dense_runs_of_two_models_apart(tmp_path):
    dense = {"method": "dense", "windows": 16}
    rows = _report(tmp_path, [(dense, 19.82), ({**dense, "model": "gemma3-270m"}, 25.0),
                              (run_key(_args(B), "random:ls", 0.3, 0), 30.0)])
    assert sum("19.82" in row for row in rows) == 1 and sum("25.00" in row for row in rows) == 1
