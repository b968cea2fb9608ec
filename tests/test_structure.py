"""The package's shape: no import circle, one registry of methods that everything reads, and a
new method is one class plus one registry entry."""

from __future__ import annotations

import ast
import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import prunenet
from conftest import make_tiny_model
from prunenet.cli import build_parser, main
from prunenet.selection import SELECTORS
from prunenet.selection.base import Selector, Source

PACKAGE = Path(prunenet.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the prunenet modules it imports anywhere in its body (functions included)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "prunenet.pipeline" in graph and graph["prunenet.io.files"] <= {"prunenet.errors"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module", ["prunenet.cli", "prunenet.io.streaming", "prunenet.selection",
                                    "prunenet.recording", "prunenet.assets"])
def test_each_module_imports_first_on_its_own(module):
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)


def _help(command: str) -> str:
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
        build_parser().parse_args([command, "--help"])
    return " ".join(text.getvalue().split())


@pytest.mark.parametrize("command", ["compress", "prune"])
def test_help_lists_exactly_the_registry(command):
    text = _help(command)
    choices = text.split("--method {", 1)[1].split("}", 1)[0].split(",")
    assert choices == list(SELECTORS)
    for cls in SELECTORS.values():
        assert " ".join(cls.summary.split()) in text


@pytest.mark.parametrize("method", sorted(SELECTORS))
def test_every_registered_method_round_trips_to_a_stock_checkpoint(method, tmp_path,
                                                                   tiny_llama_real_tokenizer_dir):
    out = tmp_path / "out"
    text = tmp_path / "text.txt"
    text.write_text("the river runs high in spring and low in autumn " * 300)
    own = {"prunenet": ["--episodes", "1"],
           "activation": ["--calibration-corpus", str(text), "--calibration-windows", "1"]}
    assert main(["-q", "compress", str(tiny_llama_real_tokenizer_dir), "--ratio", "0.25",
                 "--out", str(out), "--method", method, *own.get(method, [])]) == 0
    record = prunenet.io.loading.read_record(out)
    assert record["method"] == method
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.intermediate_size == 36
    assert reloaded.model.layers[0].mlp.gate_proj.weight.shape == (36, 32)


class EveryOther(Selector):
    """A toy method: the even-numbered neurons."""

    name = "every-other"
    summary = "the even-numbered neurons (a test method)"

    def select(self, source: Source, kept: int, seed: int) -> list[torch.Tensor]:
        return [torch.arange(0, 2 * kept, 2) for _ in range(source.weights.num_layers)]


def test_a_new_method_is_one_class_and_one_registry_entry(monkeypatch, tmp_path):
    monkeypatch.setitem(SELECTORS, EveryOther.name, EveryOther)  # the one registry line
    model = make_tiny_model("llama")
    result = prunenet.compress(model, 0.5, method="every-other", out=tmp_path / "out",
                               progress=False)
    assert result.record["method"] == "every-other"
    assert [rows.tolist() for rows in result.kept_rows] == [list(range(0, 48, 2))] * 2
    assert "every-other" in _help("compress")
