"""A benchmark script given a model or asset that is not there ends with one line saying so
(status 1), not a traceback from inside prunenet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

# (script and arguments, the error it ends with); OUT: a folder under the test's tmp_path.
MISSING = [
    (["quality_reconstruct.py", "--model", "/nonexistent", "--log", "OUT/log.jsonl"],
     "quality_reconstruct.py: error: model path /nonexistent does not exist"),
    (["quality_ablation.py", "--model", "/nonexistent", "--log", "OUT/log.jsonl"],
     "quality_ablation.py: error: model path /nonexistent does not exist"),
    (["quality.py", "--model", "/nonexistent", "--out", "OUT/quality"],
     "quality.py: error: model path /nonexistent does not exist"),
    (["distill_screen.py", "/nonexistent", "OUT/distilled"],
     "distill_screen.py: error: model path /nonexistent does not exist"),
    (["convert_cost.py", "/nonexistent.gguf"],
     "convert_cost.py: error: /nonexistent.gguf is not a file"),
    (["speed.py", "--skip-llama"], "speed.py: error: smollm2-135m is not in "),
    (["score_vs_text.py", "0"], "score_vs_text.py: error: smollm2-135m is not in "),
    (["gguf_output.py"], "gguf_output.py: error: asset 'smollm2-gguf' is not in "),
    (["gguf_output.py", "--gguf", "/nonexistent.gguf"],
     "gguf_output.py: error: /nonexistent.gguf is not a file"),
    (["gguf_identity.py", "OUT/fingerprints.json"],
     "gguf_identity.py: error: asset 'tinycoder-gguf' is not in "),
    (["gguf_agreement.py", "/nonexistent.gguf"],
     "gguf_agreement.py: error: /nonexistent.gguf is not a file"),
    (["eval_cost.py", "--budgets", "1GiB", "--", "/nonexistent", "--windows", "1"],
     "prunenet eval failed (in memory): prunenet: error: model path /nonexistent does not exist"),
    (["heap_threshold.py", "--repeats", "1", "--", "/nonexistent", "--ratio", "0.3"],
     "heap_threshold.py: the compression under "),
]


@pytest.mark.parametrize(("command", "message"), MISSING, ids=[" ".join(c[:3]) for c, _ in MISSING])
def test_a_missing_model_or_asset_ends_the_script_with_one_line(tmp_path, command, message):
    (tmp_path / "cache").mkdir()
    arguments = [word.replace("OUT", str(tmp_path)) for word in command]
    environment = {**os.environ, "PRUNENET_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, str(HERE / arguments[0]), *arguments[1:]],
                          capture_output=True, text=True, env=environment, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(message)


@pytest.mark.parametrize("script", ["gguf_agreement", "gguf_output"])
def test_the_gguf_checks_without_llama_cpp_say_what_to_install(tmp_path, monkeypatch, script):
    sys.path.insert(0, str(HERE))
    module = __import__(script)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")

    def tokenizer(*_args, **_kwargs):  # gguf_output reads the tokenizer first
        return None

    monkeypatch.setattr(module, "AutoTokenizer", type("T", (), {"from_pretrained": tokenizer}),
                        raising=False)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    argv = [str(gguf)] if script == "gguf_agreement" else ["--gguf", str(gguf)]
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(SystemExit, match=f"^{script}.py: error: needs llama-cpp-python"):
        module.main()
