"""Every output folder carries a model card the Hub reads: YAML front matter and a short body."""

from __future__ import annotations

import html
import re

import pytest
import torch
from gguf import GGMLQuantizationType

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
    card = (out / "README.md").read_text()
    assert f"perplexity {measured['value']:.2f} on the first 1 evaluation" in card
    # the command the card names measures the same number again (eval's default, 16 windows,
    # measures another)
    again = re.search(r"\(`prunenet eval ([^`]*)` of this folder reproduces it\)", card)
    assert again is not None, card
    assert main(["-q", "eval", str(out), *again.group(1).split(),
                 "--json", str(tmp_path / "again.json")]) == 0
    repeated = json.loads((tmp_path / "again.json").read_text())
    assert repeated["perplexity"]["value"] == measured["value"]


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
                       " --probe-sampler inverse-cdf --reconstruct ls --ridge 0.5"
                       " --format safetensors --round-to 1 --out OUT")
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert (args.probe_tokens, args.probe_temperature, args.ridge) == (128, 0.9, 0.5)


def test_a_rounded_kept_count_is_what_the_card_says_and_repeats():
    """With --round-to, or where whole neurons cannot make the ratio (a narrow layer), the card
    states the share actually removed; its command repeats the rounding and the GGUF type
    asked for."""
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
    assert "30% of the FFN neurons" in exact  # 461 of 1536: 30.0%
    narrow = render_card({**record, "round_to": 1, "ffn_width_before": 48,
                          "ffn_width_after": 33})  # 15 of 48: 31.25%
    assert ("31.2% (ratio 0.3, the kept count rounded down to whole neurons) of the FFN "
            "neurons of every layer were removed (FFN width 48 -> 33)") in narrow
    assert "--format both --gguf-down-type auto --round-to 1 --out OUT" in exact


def test_the_card_says_what_the_folder_holds_and_what_recovered_it():
    from prunenet.io.model_card import render_card

    record = {"method": "random", "ratio": 0.3, "seed": 1, "ffn_width_before": 64,
              "ffn_width_after": 45, "prunenet_version": "0", "parameters_before": 10,
              "parameters_after": 8, "parameter_reduction": 0.2, "source": "/m/x.gguf",
              "gguf": {"file": "model.gguf", "sliced": {"a": "Q4_0"}, "requantized": {"b": "Q8_0"}}}
    only_gguf = render_card(record, files={"model.gguf"})
    assert "holds the GGUF file only" in only_gguf and "from_pretrained" not in only_gguf
    assert "Also `model.gguf`" not in only_gguf and "--format gguf --gguf-down-type" in only_gguf
    both = render_card(record, files={"model.gguf", "config.json", "model.safetensors"})
    assert "from_pretrained" in both and "Also `model.gguf`" in both
    assert "--format both --gguf-down-type" in both
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


def card_commands(card: str) -> list[list[str]]:
    """The "Made with" commands of a card, each split as a shell splits it."""
    import shlex

    return [shlex.split(line) for line in card.split("```bash\n")[1].split("\n```")[0].splitlines()]


def parsed_compression(command: list[str]):
    """The options the command line builds from a card's compress/prune command."""
    from prunenet.cli import _compress_options, build_parser
    from prunenet.pipeline import CompressOptions

    args = build_parser().parse_args(command[1:])
    return args, CompressOptions.from_keywords(args.ratio, **_compress_options(args))


TRAINED = {"method": "prunenet", "ratio": 0.123456789, "seed": 7, "device": "cuda",
           "selection": "topk",
           "ffn_width_before": 64, "ffn_width_after": 56, "round_to": 8,
           "prunenet_version": "0", "parameters_before": 10, "parameters_after": 8,
           "parameter_reduction": 0.2, "source": "/m/dense", "policy_sha256": "ab",
           "training": {"ratio": 0.123456789, "episodes": 3, "lr": 0.0001234567, "seed": 7,
                        "gamma": 0.912345678, "reward": "penalty", "reward_to_go": True,
                        "baseline": "mean", "kld": True, "clip_norm": 1.0, "spectral": "gram",
                        "precision": "float64", "best_episode": 1},
           "probe": {"tokens": 96, "seed": 7, "sequence_length": 24,
                     "temperature": 0.912345678, "sampler": "multinomial",
                     "prompt": "Il était une fois"},
           "reconstruct": {"mode": "ls", "ridge": 0.0123456789},
           "evaluation": {"perplexity": {"value": 3.0, "windows": 3, "seqlen": 8,
                                         "corpus": "wiki"}}}


def test_the_card_command_parses_back_to_every_recorded_compression_setting():
    """Split as a shell splits it and parsed by the command line's own parser, the card's
    command gives the settings the record holds, every float to its last digit: the policy
    training's and the device it ran on, the probe's, the refit's, the rounding and the
    measurement."""
    from prunenet.io.model_card import render_card

    command, = card_commands(render_card(TRAINED, files={"config.json", "model.safetensors"}))
    assert command[:3] == ["prunenet", "compress", "/m/dense"]
    args, options = parsed_compression(command)
    training = {key: getattr(options.training, key) for key in TRAINED["training"]
                if key != "best_episode"}
    assert training == {key: value for key, value in TRAINED["training"].items()
                        if key != "best_episode"}
    probe = TRAINED["probe"]
    assert (options.probe_tokens, options.probe_length, options.probe_temperature,
            options.probe_prompt, options.probe_sampler) == (
        probe["tokens"], probe["sequence_length"], probe["temperature"], probe["prompt"],
        probe["sampler"])
    assert (options.method, options.seed, options.device, options.selection,
            options.reconstruct, options.ridge, options.round_to, options.evaluate_windows,
            options.format) == ("prunenet", 7, "cuda", "topk", "ls", 0.0123456789, 8, 3,
                                "safetensors")
    assert args.ratio == TRAINED["ratio"]


def test_the_card_command_names_no_option_the_run_did_not_use():
    """The command line refuses an option a run would not use: a refit without a ridge, a
    method without a probe or a policy, singular values taken directly (no Gram float type),
    a calibration for activation only, a seed where nothing was drawn (no probe, no random or
    sampled rows), a device where no policy ran; a saved policy's run is `prune --policy`."""
    from prunenet.io.model_card import render_card

    base = {key: value for key, value in TRAINED.items()
            if key not in ("training", "probe", "policy_sha256", "selection", "evaluation")}
    activation, = card_commands(render_card(
        {**base, "method": "activation", "device": None, "reconstruct": {"mode": "none"},
         "calibration": {"corpus": "book.txt", "windows": 5, "seqlen": 1024}}))
    args, options = parsed_compression(activation)
    assert not {"--ridge", "--probe-tokens", "--probe-sampler", "--selection", "--episodes",
                "--eval", "--seed", "--device"} & set(activation)
    assert (options.reconstruct, options.calibration.corpus, options.calibration.windows) == (
        "none", "book.txt", 5)
    svd, = card_commands(render_card(
        {**TRAINED, "training": {**TRAINED["training"], "spectral": "svd"}}))
    assert "--spectral" in svd and "--spectral-precision" not in svd
    reused, = card_commands(render_card(
        {**TRAINED, "training": None, "reconstruct": {"mode": "bias"}}))
    assert reused[:5] == ["prunenet", "prune", "/m/dense", "--policy", "POLICY.safetensors"]
    assert not {"--episodes", "--lr", "--gamma", "--kld", "--ridge"} & set(reused)
    assert parsed_compression(reused)[1].reconstruct == "bias"
    assert reused[reused.index("--seed") + 1] == "7"  # the refit's probe was sampled from it
    top_rows, = card_commands(render_card(
        {**TRAINED, "training": None, "probe": None, "reconstruct": {"mode": "none"}}))
    assert "--seed" not in top_rows and "--selection" in top_rows
    sampled, = card_commands(render_card(
        {**TRAINED, "training": None, "probe": None, "selection": "sample",
         "reconstruct": {"mode": "none"}}))
    assert sampled[sampled.index("--seed") + 1] == "7"


def test_a_record_made_before_a_setting_was_recorded_repeats_what_ran_then():
    """Records written before the refit, the rounding and the probe's sampler were recorded
    ran with no refit, the exact kept count and torch.multinomial's draws: the card's command
    names those, not today's defaults (ls, rounding to GGUF blocks, inverse-CDF draws)."""
    from prunenet.io.model_card import render_card

    old = {key: value for key, value in TRAINED.items()
           if key not in ("training", "policy_sha256", "selection", "evaluation", "reconstruct",
                          "round_to")}
    old = {**old, "method": "self-generated",
           "probe": {key: value for key, value in TRAINED["probe"].items()
                     if key != "sampler"}}
    command, = card_commands(render_card(old, files={"config.json", "model.safetensors"}))
    _, options = parsed_compression(command)
    assert (options.method, options.reconstruct, options.round_to, options.probe_sampler) == (
        "self-generated", "none", 1, "multinomial")
    assert "--ridge" not in command
    # the self-generated selection sampled its text from the seed before the probe was recorded
    older = {key: value for key, value in old.items() if key != "probe"}
    command, = card_commands(render_card(older, files={"config.json", "model.safetensors"}))
    assert command[command.index("--seed") + 1] == str(old["seed"]) != "42"
    assert parsed_compression(command)[1].seed == old["seed"]


def test_running_the_card_command_writes_the_same_record(tmp_path):
    """The card's command, run again, writes a record equal to the first: every setting that
    shaped it (a trained policy's non-default settings, the probe's sampler) was on the card,
    and the command line accepted it (it refuses options a run does not use)."""
    import json

    model = tmp_path / "m"
    make_tiny_model("llama").save_pretrained(model)
    assert main(["-q", "compress", str(model), "--ratio", "0.3", "--out", str(tmp_path / "one"),
                 "--method", "prunenet", "--episodes", "2", "--lr", "0.0001234567",
                 "--gamma", "0.9", "--reward", "penalty", "--reward-to-go", "--baseline", "mean",
                 "--kld", "--spectral", "svd", "--selection", "topk", "--probe-tokens", "64",
                 "--probe-sampler", "multinomial", "--ridge", "0.123456789", "--seed", "3"]) == 0
    command, = card_commands((tmp_path / "one" / "README.md").read_text())
    assert main(["-q", *command[1:-1], str(tmp_path / "two")]) == 0
    first, again = (json.loads((tmp_path / name / "prunenet.json").read_text())
                    for name in ("one", "two"))
    assert first["training"]["lr"] == 0.0001234567 and first["probe"]["sampler"] == "multinomial"
    # where the policy trained and drew: a CPU and a CUDA generator draw differently
    assert first["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert command[command.index("--device") + 1] == first["device"]
    assert again == first


def test_a_run_that_drew_nothing_records_no_seed_and_its_card_repeats_it(tmp_path):
    """A saved policy's top-k rows, or magnitude, with --reconstruct none draw nothing at
    random and sample no probe: the record (prunenet.json and --record's copy) holds seed
    null, as the card's command (no --seed: the command line refuses it there) and compare
    say; the card's command run again writes the same record. A run that drew its rows keeps
    the seed it drew them from."""
    import json

    model = tmp_path / "m"
    make_tiny_model("llama").save_pretrained(model)
    policy = tmp_path / "p.safetensors"
    assert main(["-q", "train-policy", str(model), "--ratio", "0.3", "--episodes", "1",
                 "--device", "cpu", "--out", str(policy)]) == 0
    for name, argv in [
        ("topk", ["prune", str(model), "--policy", str(policy), "--selection", "topk"]),
        ("magnitude", ["compress", str(model), "--method", "magnitude"]),
    ]:
        out = tmp_path / name
        assert main(["-q", *argv, "--ratio", "0.3", "--reconstruct", "none", "--out", str(out),
                     "--record", str(tmp_path / f"{name}-record")]) == 0
        record = json.loads((out / "prunenet.json").read_text())
        assert record["seed"] is None
        assert json.loads((tmp_path / f"{name}-record" / "record.json").read_text())[
            "compression"] == record
        assert main(["-q", "report", str(tmp_path / f"{name}-record")]) == 0
        page = (tmp_path / f"{name}-record" / "report" / "report.md").read_text()
        assert "seed" not in page and f"; method **{record['method']}**" in page
        command, = card_commands((out / "README.md").read_text())
        assert "--seed" not in command
        command = [part.replace("POLICY.safetensors", str(policy)) for part in command]
        assert main(["-q", *command[1:-1], str(tmp_path / f"{name}-again")]) == 0
        assert json.loads((tmp_path / f"{name}-again" / "prunenet.json").read_text()) == record
    assert main(["-q", "compress", str(model), "--method", "random", "--reconstruct", "none",
                 "--seed", "3", "--ratio", "0.3", "--out", str(tmp_path / "random")]) == 0
    assert json.loads((tmp_path / "random" / "prunenet.json").read_text())["seed"] == 3


def parsed_finetune(command: list[str]):
    """The settings the command line gives finetune() from a card's finetune command, as the
    record keeps them."""
    from dataclasses import asdict

    from prunenet.cli import _precision, build_parser
    from prunenet.finetune import FinetuneConfig

    args = build_parser().parse_args(command[1:])
    config = FinetuneConfig(
        data=args.data, steps=args.steps, seqlen=args.seqlen, batch_size=args.batch_size,
        grad_accum=args.grad_accum, train=args.train, lr=args.lr, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, targets=args.targets,
        eval_every=args.eval_every, eval_windows=args.eval_windows,
        generated_windows=args.generated_windows, patience=args.patience or None,
        seed=args.seed, precision=_precision(args.precision))
    return args, {**asdict(config), "targets": list(config.targets)}


LORA_SETTINGS = {"data": "book.txt", "steps": 30, "seqlen": 96, "batch_size": 2,
                 "grad_accum": 3, "train": "lora", "lr": 0.000123456789, "lora_r": 4,
                 "lora_alpha": 16.5, "lora_dropout": 0.125, "targets": ["mlp", "q_proj"],
                 "eval_every": 5, "eval_windows": 3, "generated_windows": None,
                 "patience": None, "seed": 9, "precision": "float32"}


def test_the_card_finetune_command_parses_back_to_every_recorded_setting():
    """The fine-tune's command gives finetune() the settings its record entry holds (the
    evaluation windows that chose the checkpoint kept, the LoRA shape, the seed, no early
    stopping as --patience 0, an unmerged adapter as --no-merge); an FFN run's names no LoRA
    setting and a distillation's its teacher and the number of windows the teacher wrote."""
    from prunenet.io.model_card import render_card

    record = {key: value for key, value in TRAINED.items() if key != "evaluation"}
    tune = {"trained": "LoRA adapters", "steps_run": 30, "merged": False, "device": "cpu",
            "settings": {**LORA_SETTINGS, "target_modules": ["mlp.up_proj", "q_proj"]}}
    _, command = card_commands(render_card({**record, "finetune": tune}))
    args, settings = parsed_finetune(command)
    assert settings == LORA_SETTINGS and args.merge is False
    assert (args.model, args.out) == ("OUT", "OUT2")
    # trained on the CPU: repeated there, where auto would train on a GPU if there is one
    assert args.device == "cpu"
    _, command = card_commands(render_card({**record, "finetune": {**tune, "device": "cuda:0"}}))
    assert "--device" not in command and parsed_finetune(command)[0].device == "auto"
    ffn = {key: value for key, value in LORA_SETTINGS.items()
           if not key.startswith("lora_") and key != "targets"}
    _, command = card_commands(render_card({**record, "finetune": {
        "trained": "FFN weights", "steps_run": 30, "merged": True,
        "settings": {**ffn, "train": "ffn", "patience": 2}}}))
    assert not {"--lora-r", "--targets", "--no-merge"} & set(command)
    assert {key: parsed_finetune(command)[1][key] for key in ffn} == {
        **ffn, "train": "ffn", "patience": 2}
    distil = {**LORA_SETTINGS, "data": "self-generated", "generated_windows": 12}
    _, command = card_commands(render_card({**record, "finetune": {
        "trained": "LoRA adapters", "steps_run": 30, "merged": True, "settings": distil,
        "distillation": {"teacher": "/m/dense"}}}))
    args, settings = parsed_finetune(command)
    assert settings == distil and args.teacher == "/m/dense" and args.merge is True
    # Without --generated-windows the teacher wrote one window per step and process: the
    # command names the count it wrote, so that it repeats the run under any number of them.
    _, command = card_commands(render_card({**record, "finetune": {
        "trained": "LoRA adapters", "steps_run": 30, "merged": True, "world_size": 2,
        "training_windows": 60, "settings": {**distil, "generated_windows": None},
        "distillation": {"teacher": "/m/dense"}}}))
    assert parsed_finetune(command)[1] == {**distil, "generated_windows": 60}


def test_a_card_repeats_every_fine_tune_in_order():
    """A model fine-tuned twice (a LoRA run on text, then FFN weights distilled): its card
    repeats the compression and both fine-tunes, the second reading the first's output."""
    from prunenet.io.model_card import render_card

    record = {key: value for key, value in TRAINED.items() if key != "evaluation"}
    first = {"trained": "LoRA adapters", "steps_run": 30, "merged": True,
             "settings": LORA_SETTINGS}
    ffn = {key: value for key, value in LORA_SETTINGS.items()
           if not key.startswith("lora_") and key != "targets"}
    second = {"trained": "FFN weights", "steps_run": 30, "merged": True,
              "settings": {**ffn, "data": "self-generated", "train": "ffn"},
              "distillation": {"teacher": "/m/dense"}, "previous": first}
    compress, once, twice = card_commands(render_card({**record, "finetune": second}))
    assert compress[:2] == ["prunenet", "compress"] and compress[-2:] == ["--out", "OUT"]
    args, settings = parsed_finetune(once)
    assert (args.model, args.out) == ("OUT", "OUT2") and settings == LORA_SETTINGS
    args, settings = parsed_finetune(twice)
    assert (args.model, args.out, args.teacher) == ("OUT2", "OUT3", "/m/dense")
    assert {key: settings[key] for key in ffn} == {**ffn, "data": "self-generated",
                                                   "train": "ffn"}


def test_a_measurement_beside_a_requantized_gguf_says_what_it_measured(tmp_path):
    """--eval measures the pruned float weights, not model.gguf (its ffn_down requantized
    after): the record says so, and the card promises that `prunenet eval` repeats the number
    only from the checkpoint, never from the GGUF."""
    import json

    from prunenet.assets import asset_path
    from prunenet.errors import MissingAssetError
    from prunenet.io.model_card import render_card

    try:
        source = asset_path("tinycoder-gguf") / "tiny.gguf"
    except MissingAssetError as error:
        pytest.skip(str(error))
    out = tmp_path / "out"
    assert main(["-q", "compress", str(source), "--ratio", "0.25", "--method", "random",
                 "--reconstruct", "none", "--format", "gguf", "--gguf-down-type", "Q4_0",
                 "--eval", "1", "--out", str(out)]) == 0
    record = json.loads((out / "prunenet.json").read_text())
    assert record["evaluation"]["weights"] == "safetensors"
    card = (out / "README.md").read_text()
    value = f"perplexity {record['evaluation']['perplexity']['value']:.2f} on the first 1"
    assert "reproduces it" not in card
    assert (f"on the pruned model's float weights before `model.gguf`'s ffn_down was written as "
            f"Q4_0 (that checkpoint is not kept in this folder): {value}") in card
    assert "`model.gguf` itself was not measured" in card
    both = render_card(record, files={"model.gguf", "config.json", "model.safetensors"})
    again = f"--windows 1 --seqlen {record['evaluation']['perplexity']['seqlen']}"
    assert f"`prunenet eval model.gguf {again}` measures the file as written" in card
    assert (f"on the safetensors checkpoint: {value}" in both and f"`prunenet eval {again}` of "
            "this folder, which reads the checkpoint, reproduces it" in both)
    plain = render_card({**record, "gguf": None},
                        files={"config.json", "model.safetensors"})
    assert f"Measured after pruning: {value}" in plain
    assert f"(`prunenet eval {again}` of this folder reproduces it)." in plain


def test_a_gguf_license_reaches_every_card_made_from_it(tmp_path, monkeypatch):
    """A GGUF's general.license is the license of the cards of what is made from it: a
    compression of the file (in memory and streamed), its conversion, and a compression of
    that conversion. A license value that is no one-line scalar is left out."""
    from test_gguf_convert import SMALL, _conversion_budget, _gguf, _too_large_for_memory
    from test_gguf_out import _asset

    tinycoder = _asset("tinycoder-gguf") / "tiny.gguf"
    source = _gguf(tmp_path / "in", GGMLQuantizationType.Q8_0, tinycoder, license="apache-2.0")
    common = ["-q", "compress", str(source), "--ratio", "0.5", *SMALL]
    assert main([*common, "--out", str(tmp_path / "memory")]) == 0
    assert main(["-q", "convert", str(source), "--out", str(tmp_path / "converted")]) == 0
    assert main(["-q", "compress", str(tmp_path / "converted"), "--ratio", "0.5", *SMALL,
                 "--out", str(tmp_path / "from-converted")]) == 0
    assert main(["-q", "compress", str(tmp_path / "in"), "--ratio", "0.5", *SMALL,
                 "--out", str(tmp_path / "from-folder")]) == 0
    with monkeypatch.context() as patch:
        _too_large_for_memory(patch)
        assert main([*common, "--out", str(tmp_path / "stream"), "--max-memory",
                     str(_conversion_budget(source))]) == 0
    for name in ("memory", "converted", "from-converted", "from-folder", "stream"):
        assert 'license: "apache-2.0"' in front_matter(
            (tmp_path / name / "README.md").read_text()), name
        assert card_fields(tmp_path / name) == {"license": "apache-2.0"}, name
    assert "`model.gguf` dequantized to a float32 safetensors checkpoint" in (
        tmp_path / "converted" / "README.md").read_text()

    odd = _gguf(tmp_path / "odd", GGMLQuantizationType.Q8_0, tinycoder, license="[mit]")
    from prunenet.io.loading import inherited_card_fields

    assert inherited_card_fields(odd) == {}
    assert inherited_card_fields(source) == inherited_card_fields(source.parent) == {
        "license": "apache-2.0"}
    assert main(["-q", "convert", str(odd), "--out", str(tmp_path / "odd-converted")]) == 0
    assert not any(line.startswith("license") for line in front_matter(
        (tmp_path / "odd-converted" / "README.md").read_text()))


def test_a_license_named_other_keeps_its_name_and_link(tmp_path):
    """An input whose license is not one of the Hub's identifiers says ``license: other`` with
    ``license_name`` and ``license_link`` (the Hub's card metadata): the output's card carries
    all three, in a folder's card as in a GGUF's header (``general.license.name``, ``.link``),
    and a compression of that output keeps them; ``license: other`` alone had named no terms."""
    from test_gguf_convert import SMALL, _gguf
    from test_gguf_out import _asset

    from prunenet.io.loading import inherited_card_fields

    terms = {"license": "other", "license_name": "qwen-research",
             "license_link": "https://huggingface.co/Qwen/Qwen2.5-3B/blob/main/LICENSE"}
    model = tmp_path / "m"
    make_tiny_model("llama").save_pretrained(model)
    (model / "README.md").write_text(
        "---\nlicense: other\nlicense_name: qwen-research\n"
        f"license_link: {terms['license_link']}\nbase_model: org/tiny\n---\nhi\n")
    assert main(["-q", "compress", str(model), "--ratio", "0.25", "--method", "magnitude",
                 "--out", str(tmp_path / "out")]) == 0
    lines = front_matter((tmp_path / "out" / "README.md").read_text())
    assert lines[lines.index('license: "other"'):][:3] == [
        'license: "other"', 'license_name: "qwen-research"',
        f'license_link: "{terms["license_link"]}"']
    assert card_fields(tmp_path / "out") == {**terms, "base_model": "org/tiny"}
    assert main(["-q", "compress", str(tmp_path / "out"), "--ratio", "0.25", "--method",
                 "magnitude", "--out", str(tmp_path / "again")]) == 0
    assert card_fields(tmp_path / "again") == {**terms, "base_model": "org/tiny"}

    tinycoder = _asset("tinycoder-gguf") / "tiny.gguf"
    source = _gguf(tmp_path / "in", GGMLQuantizationType.Q8_0, tinycoder, license="other",
                   license_name=terms["license_name"], license_link=terms["license_link"])
    assert inherited_card_fields(source) == terms
    assert main(["-q", "compress", str(source), "--ratio", "0.5", *SMALL,
                 "--out", str(tmp_path / "from-gguf")]) == 0
    assert main(["-q", "convert", str(source), "--out", str(tmp_path / "converted")]) == 0
    for name in ("from-gguf", "converted"):
        assert card_fields(tmp_path / name) == terms, name


def test_the_card_names_transformers_as_its_library_only_beside_a_checkpoint():
    """``library_name: transformers`` makes the Hub offer ``from_pretrained`` on the folder:
    right beside a checkpoint, wrong for a folder holding model.gguf alone, a LoRA adapter
    alone or no weights (the Hub tells a GGUF by its files; the library is left out)."""
    from prunenet.io.model_card import render_card

    record = {"method": "random", "ratio": 0.3, "seed": 1, "ffn_width_before": 64,
              "ffn_width_after": 45, "prunenet_version": "0", "parameters_before": 10,
              "parameters_after": 8, "parameter_reduction": 0.2, "source": "/m/x.gguf",
              "gguf": {"file": "model.gguf", "sliced": {"a": "Q4_0"}, "requantized": {"b": "Q8_0"}}}
    holding = {"checkpoint": {"config.json", "model.safetensors", "model.gguf"},
               "GGUF": {"model.gguf"}, "adapter": {"adapter"}, "nothing": set()}
    for what, files in holding.items():
        lines = front_matter(render_card(record, files=files))
        assert ("library_name: transformers" in lines) == (what == "checkpoint"), what
        assert "pipeline_tag: text-generation" in lines, what
    assert "library_name: transformers" in front_matter(render_card(record))  # a checkpoint


def test_the_card_names_the_gguf_type_the_default_chose(tmp_path):
    """``--gguf-down-type auto`` is resolved per input (Q8_0 for a quantized ffn_down, a float
    one's own type) and has changed before (it was the input's type): the record and the card's
    command name the type it chose, as they name the kept count's rounding, so the command
    repeats the file under any default; a type asked for is named as asked."""
    import json

    from test_gguf_convert import SMALL, _gguf
    from test_gguf_out import _asset

    tinycoder = _asset("tinycoder-gguf") / "tiny.gguf"
    quantized = _gguf(tmp_path / "q", GGMLQuantizationType.Q4_1, tinycoder)
    runs = [("f16", tinycoder, [], "F16"), ("q4_1", quantized, [], "Q8_0"),
            ("asked", quantized, ["--gguf-down-type", "Q5_0"], "Q5_0")]
    for name, source, extra, chosen in runs:
        out = tmp_path / name
        assert main(["-q", "compress", str(source), "--ratio", "0.25", *SMALL, *extra,
                     "--out", str(out)]) == 0
        gguf = json.loads((out / "prunenet.json").read_text())["gguf"]
        assert gguf["down_type"] == chosen and set(gguf["requantized"].values()) == {chosen}
        command, = card_commands((out / "README.md").read_text())
        assert command[command.index("--gguf-down-type") + 1] == chosen, name


def test_the_card_says_which_step_of_a_fine_tune_it_holds():
    """A fine-tune keeps its best evaluated checkpoint: where that is not its last step, the
    card says which step the weights are (it had said only how many steps ran, and the
    perplexity beside it is that step's)."""
    from prunenet.io.model_card import render_card

    tune = {"trained": "LoRA adapters", "steps_run": 60, "best_step": 40,
            "eval_perplexity_before": 30.0, "eval_perplexity_after": 20.0,
            "settings": {"data": "wiki", "steps": 60}}
    record = {"source": "/m/dense", "prunenet_version": "0", "finetune": tune}
    files = {"config.json", "model.safetensors"}
    card = render_card(record, files=files)
    assert ("Recovered by fine-tuning LoRA adapters on `wiki` for 60 steps, keeping the "
            "weights of step 40, its best evaluation: evaluation perplexity 30 -> 20.") in card
    last = render_card({**record, "finetune": {**tune, "best_step": 60}}, files=files)
    assert "for 60 steps: evaluation perplexity 30 -> 20." in last and "keeping" not in last
    older = render_card({**record, "finetune": {**tune, "best_step": None}}, files=files)
    assert "for 60 steps: evaluation perplexity 30 -> 20." in older


def test_user_text_reads_as_written_on_the_card():
    """A source folder, fine-tune data and teacher holding markdown and HTML (bold, code with
    backticks, a tag, a cell bar) read as written on the card, titles and code spans alike, and
    a history sentence too; nothing forms but the card's own code spans."""
    import markdown_it

    from prunenet.io.model_card import render_card

    markup = "a**b**_c_`d` | e\\*f <script>alert(1) $x$ &amp; [l](u)"
    tune = {"trained": "LoRA adapters", "steps_run": 2, "settings": {"data": markup}}
    earlier = {"method": "random", "ratio": 0.25, "ffn_width_before": 48, "ffn_width_after": 36,
               "finetune": tune}
    record = {"method": "random", "ratio": 0.25, "seed": 1, "ffn_width_before": 36,
              "ffn_width_after": 27, "round_to": 1, "prunenet_version": "0",
              "parameters_before": 10, "parameters_after": 8, "parameter_reduction": 0.2,
              "source": f"/m/{markup}", "source_history": earlier,
              "finetune": {**tune, "distillation": {"teacher": f"/t/{markup}"}}}
    rendered = markdown_it.MarkdownIt("commonmark").render(render_card(record))
    shown = html.escape(markup, quote=False)
    assert f"<h1>{shown}, FFN-pruned with prunenet (random)</h1>" in rendered
    assert f"from <code>/t/{shown}</code> (KL" in rendered
    assert f"LoRA fine-tune 2 steps on {shown} (FFN width 48 -&gt; 36)" in rendered
    tuned = render_card({**record, "method": None, "finetune": tune}, files={"adapter"})
    rendered_tuned = markdown_it.MarkdownIt("commonmark").render(tuned)
    assert f"on <code>{shown}</code> for 2 steps" in rendered_tuned
    assert f"for <code>/m/{shown}</code>, not merged" in rendered_tuned
    for page in (rendered, rendered_tuned):
        assert "<strong>" not in page and "<em>" not in page and "<a " not in page
        assert "<script>" not in page
