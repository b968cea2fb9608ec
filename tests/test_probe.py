"""The self-generated probe: reproducible, no global RNG side effect, split to the model's
positions, degenerate samples dropped."""

from __future__ import annotations

import pytest
import torch

from conftest import VOCAB, make_tiny_model
from prunenet.errors import InputError
from prunenet.probe import (
    Probe,
    ProbeRecipe,
    distinct_4gram_fraction,
    generate_probe,
    main_script,
)

SHORT = ProbeRecipe(sequence_length=16, batch_size=3)


class _AlwaysThree(torch.nn.Module):
    """A language-model head that always predicts token 3."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*hidden.shape[:-1], VOCAB)
        logits[..., 3] = 100.0
        return logits


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return make_tiny_model("llama")


def test_same_seed_same_tokens_and_different_seeds_differ(model):
    first = generate_probe(model, None, 80, seed=5, recipe=SHORT, progress=False)
    again = generate_probe(model, None, 80, seed=5, recipe=SHORT, progress=False)
    other = generate_probe(model, None, 80, seed=6, recipe=SHORT, progress=False)
    assert first.shape == (5, 16) and first.dtype == torch.long  # 80 tokens in 16-token rows
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert (first[:, 0] == model.config.bos_token_id).all()  # each sample starts at BOS
    assert int(first.min()) >= 0 and int(first.max()) < VOCAB


def test_the_global_random_state_is_untouched(model):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate_probe(model, None, 32, seed=1, recipe=SHORT, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_sequences_are_split_to_the_model_positions(model):
    long = ProbeRecipe(sequence_length=10_000, batch_size=2)
    tokens = generate_probe(model, None, 130, seed=0, recipe=long, progress=False)
    assert tokens.shape == (3, 64)  # max_position_embeddings 64: 130 tokens -> 3 rows


def test_recipe_knobs(model):
    recipe = ProbeRecipe(sequence_length=12, batch_size=4, first_token="random", top_p=0.9,
                         start_temperature=0.2, warmup_tokens=4, temperature=1.5)
    tokens = generate_probe(model, None, 48, seed=2, recipe=recipe, progress=False)
    assert tokens.shape == (4, 12)
    assert len(set(tokens[:, 0].tolist())) > 1  # random first tokens
    with pytest.raises(InputError):
        generate_probe(model, None, 0, seed=0, recipe=recipe, progress=False)


class _Words:
    """A tokenizer stand-in: one id per word (5 + its length)."""

    def __call__(self, text, add_special_tokens=True):
        assert not add_special_tokens  # the probe adds BOS itself
        return {"input_ids": [5 + len(word) for word in text.split()]}


def test_a_prompt_follows_bos_in_every_sequence_of_the_same_length(model):
    recipe = ProbeRecipe(sequence_length=16, batch_size=3, prompt="The old harbour")
    tokens = generate_probe(model, _Words(), 80, seed=5, recipe=recipe, progress=False)
    again = generate_probe(model, _Words(), 80, seed=5, recipe=recipe, progress=False)
    plain = generate_probe(model, _Words(), 80, seed=5, recipe=SHORT, progress=False)
    assert tokens.shape == plain.shape == (5, 16)  # the prompt counts in the length
    assert (tokens[:, 0] == model.config.bos_token_id).all()
    assert (tokens[:, 1:4] == torch.tensor([8, 8, 12])).all()
    assert torch.equal(tokens, again)
    assert not torch.equal(tokens[:, 4:], plain[:, 4:])  # the text continues the prompt


def test_a_prompt_too_long_for_the_sequences_or_without_a_tokenizer_is_refused(model):
    with pytest.raises(InputError, match="the probe prompt takes 15 tokens, too many for "
                                         "probe sequences of 16"):
        generate_probe(model, _Words(), 32, seed=0, progress=False,
                       recipe=ProbeRecipe(sequence_length=16, prompt="a " * 15))
    with pytest.raises(InputError, match="needs the model's tokenizer"):
        generate_probe(model, None, 32, seed=0, progress=False,
                       recipe=ProbeRecipe(sequence_length=16, prompt="a"))


def test_the_prompt_keys_the_cache_and_is_recorded(model):
    def probe(prompt):
        return Probe(model, _Words(), 64, 0, ProbeRecipe(sequence_length=16, prompt=prompt))

    assert probe("The").key() == probe("The").key() != probe("A").key() != probe("").key()
    assert probe("The").record()["prompt"] == "The"
    assert "prompt" not in probe("").record()  # a plain probe's record is as it was


class _TwoScripts:
    """A tokenizer stand-in that decodes every third id to a Cyrillic letter, the others to a
    Latin one, so a sequence's main script depends on the ids sampled."""

    @staticmethod
    def letters(row) -> str:
        return "".join("ж" if int(i) % 3 == 0 else "a" for i in row)

    def batch_decode(self, rows, skip_special_tokens=True):
        return [self.letters(row) for row in rows]


def test_main_script_of_a_text():
    assert main_script("Hello, world 42") == "LATIN"
    assert main_script("Привет, world") == "CYRILLIC"
    assert main_script("東京 is") == "CJK"
    assert main_script("12 + 3 = 15") is None  # no letters


def test_one_script_keeps_only_sequences_in_the_first_batchs_main_script(model):
    """Without the filter some short sequences are mostly Cyrillic; with it every kept sequence
    is mostly Latin (the first batch's main script), with as many tokens, reproducibly."""
    plain = ProbeRecipe(sequence_length=8, batch_size=6, temperature=2.0)
    kept = ProbeRecipe(sequence_length=8, batch_size=6, temperature=2.0, one_script=True)
    before = generate_probe(model, _TwoScripts(), 96, seed=3, recipe=plain, progress=False)
    after = generate_probe(model, _TwoScripts(), 96, seed=3, recipe=kept, progress=False)
    again = generate_probe(model, _TwoScripts(), 96, seed=3, recipe=kept, progress=False)
    scripts = [main_script(_TwoScripts.letters(row[1:])) for row in before]
    assert "CYRILLIC" in scripts and scripts.count("LATIN") > len(scripts) / 2
    assert after.shape == before.shape == (12, 8)
    assert {main_script(_TwoScripts.letters(row[1:])) for row in after} == {"LATIN"}
    assert torch.equal(after, again)
    with pytest.raises(InputError, match="needs the model's tokenizer"):
        generate_probe(model, None, 32, seed=0, recipe=kept, progress=False)
    assert Probe(model, None, 64, 0, kept).key() != Probe(model, None, 64, 0, plain).key()
    assert Probe(model, None, 64, 0, kept).record()["one_script"] is True
    assert "one_script" not in Probe(model, None, 64, 0, plain).record()


def test_min_p_one_keeps_only_the_most_likely_token(model):
    """min-p 1 leaves only the argmax at every step, whatever the temperature: greedy decoding."""
    recipe = ProbeRecipe(sequence_length=12, batch_size=3, min_p=1.0, temperature=1.5)
    tokens = generate_probe(model, None, 36, seed=4, recipe=recipe, progress=False)
    prompt = tokens[:, :1]
    greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                            max_new_tokens=11, min_new_tokens=11, pad_token_id=0)
    assert torch.equal(tokens, greedy)
    sampled = generate_probe(model, None, 36, seed=4, recipe=ProbeRecipe(
        sequence_length=12, batch_size=3, temperature=1.5), progress=False)
    assert not torch.equal(tokens, sampled)


def test_degenerate_samples_are_dropped():
    assert distinct_4gram_fraction(torch.tensor([7] * 20)) == pytest.approx(1 / 17)
    assert distinct_4gram_fraction(torch.arange(20)) == 1.0
    model = make_tiny_model("llama")
    model.lm_head = _AlwaysThree()  # every sample repeats one token
    recipe = ProbeRecipe(sequence_length=12, batch_size=2, min_distinct_4grams=0.5)
    with pytest.raises(InputError, match="degenerate"):
        generate_probe(model, None, 24, seed=0, recipe=recipe, progress=False)


@pytest.mark.parametrize("family", sorted(__import__("conftest").TINY_CONFIGS))
def test_activation_passes_skip_the_head_and_read_the_same_values(family):
    """The statistics passes run the decoder stack only; the FFN activations they read are the
    full model's, bit for bit."""
    from prunenet.ffn_statistics import collect_ffn_statistics
    from prunenet.model_view import FFNView, squared_activation_sums

    tiny = make_tiny_model(family)
    tokens = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    view = FFNView(tiny)
    seen: list[list[torch.Tensor]] = [[] for _ in range(view.num_layers)]
    handles = [view.second_matrix_module(i).register_forward_pre_hook(
        lambda _m, inputs, i=i: seen[i].append(inputs[0].reshape(-1, inputs[0].shape[-1])))
        for i in range(view.num_layers)]
    with torch.no_grad():
        for sequence in tokens:
            tiny(sequence.unsqueeze(0))
    for handle in handles:
        handle.remove()
    expected = [sum(part.pow(2).sum(0) for part in parts) for parts in seen]  # per sequence
    sums = squared_activation_sums(tiny, tokens, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(sums, expected, strict=True))
    stats = collect_ffn_statistics(tiny, tokens, batch_size=3)
    assert all(s.count == tokens.numel() for s in stats)
    assert all(torch.allclose(s.mean_square, e.double() / tokens.numel(), rtol=1e-5)
               for s, e in zip(stats, expected, strict=True))


def test_the_record_says_what_was_generated(model):
    """Asked for 130 tokens of 256-token sequences from a model with 64 positions: the record
    keeps the ask (130 tokens) and says what ran (3 sequences of 64)."""
    probe = Probe(model, None, 130, 0, ProbeRecipe(sequence_length=256, batch_size=4))
    assert probe.record()["sequence_length"] == 64 and "shape" not in probe.record()
    ids = probe.ids()
    record = probe.record()
    assert record["tokens"] == 130 and record["sequence_length"] == 64
    assert record["shape"] == [3, 64] == list(ids.shape)


def test_models_differing_only_in_deeper_layers_never_share_a_probe(model):
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[-1].mlp.down_proj.weight.mul_(1.5)
    assert Probe(model, None, 64, 0).key() != Probe(other, None, 64, 0).key()
    assert Probe(model, None, 64, 0).key() == Probe(copy.deepcopy(model), None, 64, 0).key()
