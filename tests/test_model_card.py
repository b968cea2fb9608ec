"""Every output folder carries a model card the Hub reads: YAML front matter and a short body."""

from __future__ import annotations

import re

from conftest import make_tiny_model
from prunenet.cli import main
from prunenet.io.model_card import card_fields


def front_matter(text: str) -> list[str]:
    match = re.match(r"\A---\n(.*?)\n---\n", text, re.DOTALL)
    assert match, text[:200]
    return match.group(1).splitlines()


def test_the_card_names_method_ratio_sizes_and_command(tmp_path):
    model = tmp_path / "m"
    make_tiny_model("llama").save_pretrained(model)
    (model / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: org/tiny\n---\nhi\n")
    assert main(["-q", "compress", str(model), "--ratio", "0.25", "--out", str(tmp_path / "out"),
                 "--method", "magnitude"]) == 0
    text = (tmp_path / "out" / "README.md").read_text()
    lines = front_matter(text)
    assert 'base_model: "org/tiny"' in lines and 'license: "apache-2.0"' in lines
    assert lines[lines.index("tags:") + 1: lines.index("tags:") + 4] == [
        "- pruned", "- prunenet", '- "magnitude"']
    assert "pipeline_tag: text-generation" in lines
    assert "FFN width 48 -> 36" in text and "23,712 -> 21,408" in text
    assert f"prunenet compress {model} --ratio 0.25 --method magnitude --seed 42" in text
    assert card_fields(tmp_path / "out") == {"base_model": "org/tiny", "license": "apache-2.0"}


def test_without_an_input_card_nothing_is_invented(tmp_path):
    model = tmp_path / "m"
    make_tiny_model("gpt2").save_pretrained(model)
    assert main(["-q", "compress", str(model), "--ratio", "0.25", "--out", str(tmp_path / "out"),
                 "--method", "prunenet", "--episodes", "1"]) == 0
    text = (tmp_path / "out" / "README.md").read_text()
    lines = front_matter(text)
    assert not any(line.startswith(("license", "base_model")) for line in lines)
    assert "PruneNet policy checksum" in text and "--selection sample" in text


def test_compress_eval_puts_the_measurement_in_record_and_card(tmp_path,
                                                               tiny_llama_real_tokenizer_dir):
    import json

    out = tmp_path / "out"
    assert main(["-q", "compress", str(tiny_llama_real_tokenizer_dir), "--ratio", "0.25",
                 "--out", str(out), "--method", "random", "--reconstruct", "none",
                 "--eval", "1"]) == 0
    measured = json.loads((out / "prunenet.json").read_text())["evaluation"]["perplexity"]
    assert measured["windows"] == 1 and measured["value"] > 1
    assert f"perplexity {measured['value']:.2f} on the first 1 evaluation" in (
        out / "README.md").read_text()
