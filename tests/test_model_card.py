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


def test_the_command_on_the_card_repeats_the_run_and_parses(tmp_path):
    """The card's command carries every setting that changed the result (probe, refit), and
    the command line accepts it."""
    import shlex

    from prunenet.cli import build_parser

    model = tmp_path / "m"
    make_tiny_model("llama").save_pretrained(model)
    assert main(["-q", "compress", str(model), "--ratio", "0.25", "--out", str(tmp_path / "out"),
                 "--probe-tokens", "128", "--probe-temperature", "0.9", "--ridge", "0.5"]) == 0
    text = (tmp_path / "out" / "README.md").read_text()
    command = text.split("```bash\n")[1].split("\n```")[0]
    assert command == (f"prunenet compress {model} --ratio 0.25 --method self-generated --seed 42"
                       " --probe-tokens 128 --probe-length 64 --probe-temperature 0.9"
                       " --reconstruct ls --ridge 0.5 --out OUT")
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert (args.probe_tokens, args.probe_temperature, args.ridge) == (128, 0.9, 0.5)


def test_a_rounded_kept_count_is_what_the_card_says_and_repeats():
    """With --round-to the card states the share actually removed and its command repeats the
    rounding and the GGUF type asked for."""
    from prunenet.io.model_card import render_card

    record = {"method": "random", "ratio": 0.3, "seed": 1, "ffn_width_before": 1536,
              "ffn_width_after": 1088, "round_to": 32, "prunenet_version": "0",
              "parameters_before": 10, "parameters_after": 8, "parameter_reduction": 0.2,
              "source": "/m/x.gguf",
              "gguf": {"file": "model.gguf", "sliced": {"a": "Q4_1"},
                       "requantized": {"b": "Q5_0"}, "down_type": "Q5_0"}}
    card = render_card(record, files={"model.gguf", "config.json", "model.safetensors"})
    assert ("29.2% (ratio 0.3, rounded to a multiple of 32 kept neurons) of the FFN neurons of "
            "every layer were removed (FFN width 1536 -> 1088)") in card
    assert "--format both --gguf-down-type Q5_0 --round-to 32 --out OUT" in card
    exact = render_card({**record, "round_to": 1, "ffn_width_after": 1075,
                         "gguf": {**record["gguf"], "down_type": "auto"}},
                        files={"model.gguf", "config.json", "model.safetensors"})
    assert "30% of the FFN neurons" in exact and "--round-to" not in exact
    assert "--format both --out OUT" in exact


def test_the_card_says_what_the_folder_holds_and_what_recovered_it():
    from prunenet.io.model_card import render_card

    record = {"method": "random", "ratio": 0.3, "seed": 1, "ffn_width_before": 64,
              "ffn_width_after": 45, "prunenet_version": "0", "parameters_before": 10,
              "parameters_after": 8, "parameter_reduction": 0.2, "source": "/m/x.gguf",
              "gguf": {"file": "model.gguf", "sliced": {"a": "Q4_0"}, "requantized": {"b": "Q8_0"}}}
    only_gguf = render_card(record, files={"model.gguf"})
    assert "holds the GGUF file only" in only_gguf and "from_pretrained" not in only_gguf
    assert "Also `model.gguf`" not in only_gguf and "--format gguf --out" in only_gguf
    both = render_card(record, files={"model.gguf", "config.json", "model.safetensors"})
    assert "from_pretrained" in both and "Also `model.gguf`" in both
    assert "--format both --out" in both
    tune = {"trained": "LoRA adapters", "steps_run": 60, "eval_kl_before": 0.6,
            "eval_kl_after": 0.5, "settings": {"data": "self-generated", "steps": 60},
            "distillation": {"teacher": "/m/dense"}}
    distilled = render_card({**record, "gguf": None, "finetune": tune},
                            files={"config.json", "model.safetensors"})
    assert ("Recovered without data by self-distillation from `/m/dense`" in distilled
            and "training LoRA adapters for 60 steps: held-out KL to the teacher 0.6 -> 0.5"
            in distilled and "--data self-generated --teacher /m/dense --steps 60" in distilled)
    assert "LoRA fine-tuning" not in distilled
    # A model prunenet fine-tuned but never pruned: no pruning claimed, no compress command.
    plain = render_card({"source": "/m/dense", "prunenet_version": "0",
                         "finetune": {**tune, "distillation": None,
                                      "settings": {"data": "wiki", "steps": 5}}},
                        files={"config.json", "model.safetensors"})
    assert "fine-tuned with prunenet" in plain and "FFN-pruned" not in plain
    assert "prunenet compress" not in plain and "prunenet finetune OUT --data wiki" in plain
