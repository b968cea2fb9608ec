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
    draw_tokens,
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


class _Fixed(torch.nn.Module):
    """A language-model head with the same next-token distribution everywhere."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*hidden.shape[:-1], VOCAB).clone()


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


def test_the_random_state_of_every_cuda_device_is_restored(model, monkeypatch):
    """The probe seeds the global generators, CUDA's included (torch.manual_seed seeds every
    device), so it restores every CUDA device's state, also for a model on the CPU; it had
    restored only the model's own CUDA device. Checked without a GPU by what fork_rng is asked
    to restore on a machine that reports two devices."""
    import contextlib

    asked = []

    @contextlib.contextmanager
    def recording_fork_rng(devices=None, **kwargs):
        asked.append(list(devices))
        yield

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: None)  # no GPU to seed
    monkeypatch.setattr(torch.random, "fork_rng", recording_fork_rng)
    generate_probe(model, None, 16, seed=1, recipe=SHORT, progress=False)
    assert asked == [[0, 1]]


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


def test_a_prompt_too_long_for_the_models_context_is_not_told_to_raise_the_probe_length(model):
    """Sequences of 256 asked, cut to the model's 64 positions: a longer --probe-length would
    not make room, and the message had said to raise it."""
    message = ("the probe prompt takes 70 tokens, too many for probe sequences of 64; shorten "
               "it: the probe sequences are cut to the model's context")
    with pytest.raises(InputError) as error:
        generate_probe(model, _Words(), 128, seed=0, progress=False,
                       recipe=ProbeRecipe(sequence_length=256, prompt="a " * 70))
    assert str(error.value) == message


def test_the_prompt_keys_the_cache_and_is_recorded(model):
    def probe(prompt):
        return Probe(model, _Words(), 64, 0, ProbeRecipe(sequence_length=16, prompt=prompt))

    assert probe("The").key() == probe("The").key() != probe("A").key() != probe("").key()
    assert probe("The").record()["prompt"] == "The"
    assert "prompt" not in probe("").record()  # a plain probe's record is as it was


class _Letters:
    """A tokenizer stand-in that reads the same words as :class:`_Words` into other ids: one
    per letter."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [5 + ord(letter) % 50 for letter in text if letter.isalpha()]}


def test_a_prompt_read_into_other_ids_keys_another_cache_entry(model):
    """The probe starts from the prompt's token ids: the same words read by another tokenizer
    (an updated tokenizer.json beside unchanged weights) make another probe, which a cache
    never serves from the first."""
    recipe = ProbeRecipe(sequence_length=16, batch_size=3, prompt="The old harbour")
    ids = {tokenizer: generate_probe(model, tokenizer(), 48, seed=2, recipe=recipe,
                                     progress=False) for tokenizer in (_Words, _Letters)}
    assert not torch.equal(ids[_Words], ids[_Letters])
    assert (Probe(model, _Words(), 48, 2, recipe).key()
            != Probe(model, _Letters(), 48, 2, recipe).key())
    assert Probe(model, _Words(), 48, 2, recipe).key() == Probe(model, _Words(), 48, 2,
                                                               recipe).key()


def test_lengths_beyond_the_models_positions_share_one_cache_entry(model):
    """A --probe-length the model's positions cap generates the capped probe, whatever was
    asked: one key for them all (the card records the capped length), another for a length
    below the cap."""
    positions = model.config.max_position_embeddings
    keys = {length: Probe(model, None, 256, 0, ProbeRecipe(sequence_length=length)).key()
            for length in (positions, positions + 1, 4 * positions, positions - 1)}
    assert keys[positions] == keys[positions + 1] == keys[4 * positions]
    assert keys[positions - 1] != keys[positions]
    long = ProbeRecipe(sequence_length=4 * positions, batch_size=2)
    capped = ProbeRecipe(sequence_length=positions, batch_size=2)
    assert torch.equal(generate_probe(model, None, 2 * positions, 3, long, progress=False),
                       generate_probe(model, None, 2 * positions, 3, capped, progress=False))


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


def test_the_progress_bar_counts_the_sampled_tokens_and_ends_at_its_total(model, monkeypatch):
    """The bar ticks once per sampled token; BOS and the prompt are given, not sampled, so its
    total leaves them out, also for sequences dropped and sampled again. It had counted every
    sequence's full length, and so ended short of its total (10 of 16 tokens per sequence with
    a 5-word prompt) with a wrong time left."""
    from prunenet import probe as probe_module

    ended = []  # per bar, its count and total when it closed

    class Recording(probe_module.tqdm):
        def close(self):
            if not getattr(self, "recorded", False):  # tqdm closes a bar twice
                self.recorded = True
                ended.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(probe_module, "tqdm", Recording)
    generate_probe(model, None, 80, seed=5, recipe=SHORT, progress=True)
    prompted = ProbeRecipe(sequence_length=16, batch_size=3, prompt="a b c d e")
    generate_probe(model, _Words(), 80, seed=5, recipe=prompted, progress=True)
    one_script = ProbeRecipe(sequence_length=8, batch_size=6, temperature=2.0, one_script=True)
    generate_probe(model, _TwoScripts(), 96, seed=3, recipe=one_script, progress=True)
    assert ended[0] == (5 * 15, 5 * 15)  # 5 sequences of 16 tokens, BOS given
    assert ended[1] == (5 * 10, 5 * 10)  # BOS and 5 prompt tokens given
    # 12 sequences kept of more sampled (the test above: some are in another script)
    assert ended[2][0] == ended[2][1] > 12 * 7 and ended[2][0] % 7 == 0


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


def test_a_model_on_an_accelerator_keys_another_probe(model, monkeypatch):
    """An accelerator rounds the logits otherwise than the CPU, which changes some drawn
    tokens: a probe generated there is not the CPU's, and the cache keeps them apart."""
    from prunenet import probe as probe_module

    on_cpu = Probe(model, None, 64, 0).key()
    monkeypatch.setattr(probe_module, "input_device", lambda _model: torch.device("cuda"))
    assert Probe(model, None, 64, 0).key() != on_cpu


def _frequencies_match(probabilities: torch.Tensor, draws: torch.Tensor) -> None:
    """Every entry drawn as often as its probability says, within five standard deviations of
    the binomial count, and no entry of probability zero drawn at all."""
    expected = probabilities / probabilities.sum() * len(draws)
    counts = torch.bincount(draws, minlength=len(probabilities)).double()
    assert counts[probabilities == 0].sum() == 0
    spread = (expected * (1 - expected / len(draws))).sqrt()
    assert ((counts - expected).abs() <= 5 * spread + 1e-9).all(), (counts, expected)


def test_draw_tokens_follows_the_distribution_across_blocks():
    """Mass in the first block, on both sides of a block boundary and in the shorter last block
    (3,000 entries: two whole blocks of 1,024 and one of 952), unnormalised, zeros between."""
    probabilities = torch.zeros(3000)
    probabilities[[1, 3, 1023, 1024, 2047, 2048, 2999]] = torch.tensor(
        [0.5, 2.0, 1.0, 0.25, 3.0, 0.75, 1.5])
    generator = torch.Generator().manual_seed(0)
    draws = draw_tokens(probabilities.expand(200_000, -1), generator)
    assert draws.shape == (200_000,) and draws.dtype == torch.long
    _frequencies_match(probabilities, draws)


def test_draw_tokens_follows_a_softmax_over_a_large_vocabulary():
    logits = torch.randn(1, 50_000, generator=torch.Generator().manual_seed(1)) * 4
    probabilities = torch.softmax(logits, dim=-1)[0]
    probabilities[probabilities < probabilities.sort().values[-40]] = 0  # 40 entries with mass
    draws = draw_tokens(probabilities.expand(100_000, -1), torch.Generator().manual_seed(2))
    _frequencies_match(probabilities, draws)


def test_draw_tokens_is_reproducible_per_generator_and_row():
    probabilities = torch.softmax(torch.randn(6, 2500), dim=-1)
    first = draw_tokens(probabilities, torch.Generator().manual_seed(7))
    again = draw_tokens(probabilities, torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    one_hot = torch.zeros(3, 2500)
    one_hot[0, 0] = one_hot[1, 1023] = one_hot[2, 2499] = 1.0
    assert draw_tokens(one_hot, torch.Generator()).tolist() == [0, 1023, 2499]


def test_a_uniform_draw_at_the_top_of_the_range_stays_on_an_entry_with_mass(monkeypatch):
    """Ten entries of 0.1 (float32) sum to more in the block's float32 sum than in the float64
    running sum inside it, so the largest uniform number below 1 lands past the block's last
    entry: the draw takes that last entry, never a zero or one past the vocabulary."""
    probabilities = torch.zeros(2, 3000)
    probabilities[0, :10] = 0.1
    probabilities[1, 2040:2050] = 0.1
    top = torch.nextafter(torch.tensor(1.0, dtype=torch.float64),
                          torch.tensor(0.0, dtype=torch.float64))
    monkeypatch.setattr(torch, "rand", lambda *shape, **kwargs: top.expand(2, 1).clone())
    assert draw_tokens(probabilities, torch.Generator()).tolist() == [9, 2049]


def test_generated_tokens_follow_the_model_at_the_recipe_temperature():
    """Every generated token is a draw from softmax(logits / T): here a head with one fixed
    distribution over 6 tokens, sampled at T 2 (probabilities proportional to p ** 0.5)."""
    model = make_tiny_model("llama")
    p = torch.zeros(VOCAB)
    p[[4, 9, 20, 64, 100, 127]] = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    model.lm_head = _Fixed(p.log())
    recipe = ProbeRecipe(sequence_length=64, batch_size=64, temperature=2.0)
    tokens = generate_probe(model, None, 64 * 64, seed=3, recipe=recipe, progress=False)
    assert tokens.shape == (64, 64) and (tokens[:, 0] == model.config.bos_token_id).all()
    _frequencies_match(p.sqrt(), tokens[:, 1:].flatten())


def test_the_probe_ignores_the_checkpoints_generation_settings():
    """A generation_config.json that would reshape sampling (beams, a repetition penalty,
    top-k / top-p, a temperature, a banned token) changes neither the probe nor the model's
    own config, which is back in place after the probe."""
    from transformers import GenerationConfig

    model = make_tiny_model("llama")
    plain = generate_probe(model, None, 64, seed=1, recipe=SHORT, progress=False)
    shaped = GenerationConfig(do_sample=True, temperature=0.3, top_p=0.5, top_k=5, num_beams=2,
                              repetition_penalty=1.5, no_repeat_ngram_size=2,
                              bad_words_ids=[[7]], bos_token_id=model.config.bos_token_id,
                              eos_token_id=model.config.eos_token_id)
    model.generation_config = shaped
    assert torch.equal(generate_probe(model, None, 64, seed=1, recipe=SHORT, progress=False),
                       plain)
    assert model.generation_config is shaped


def test_the_earlier_multinomial_sampler_stays_available_and_named(model):
    """--probe-sampler multinomial draws as earlier versions did (their probes repeat token for
    token: tests/test_identity.py against outputs recorded from that code); it is seeded,
    differs from the default's stream, and a probe cache keeps the two apart."""
    earlier = ProbeRecipe(sequence_length=16, batch_size=3, sampler="multinomial")
    first = generate_probe(model, None, 80, seed=5, recipe=earlier, progress=False)
    assert torch.equal(first, generate_probe(model, None, 80, seed=5, recipe=earlier,
                                             progress=False))
    assert not torch.equal(first, generate_probe(model, None, 80, seed=5, recipe=SHORT,
                                                 progress=False))
    assert Probe(model, None, 80, 5, earlier).key() != Probe(model, None, 80, 5, SHORT).key()
    assert Probe(model, None, 80, 5, earlier).record()["sampler"] == "multinomial"
    with pytest.raises(InputError, match="unknown probe sampler 'gumbel'"):
        generate_probe(model, None, 80, seed=5, progress=False,
                       recipe=ProbeRecipe(sampler="gumbel"))


@pytest.mark.parametrize("sampler", ["inverse-cdf", "multinomial"])
def test_a_generation_config_that_changes_the_probe_changes_its_cache_key(sampler):
    """The end-of-sequence ids of generation_config.json are held back until the last token (and
    the multinomial sampler applies every setting of it): a checkpoint whose generation config
    changed, its weights not, samples another probe and never reads the one cached before."""
    import copy

    recipe = ProbeRecipe(sampler=sampler)
    model = make_tiny_model("llama")
    edited = copy.deepcopy(model)
    edited.generation_config.eos_token_id = 5
    edited.generation_config.repetition_penalty = 1.5
    first = generate_probe(model, None, 128, seed=1, recipe=recipe, progress=False)
    assert not torch.equal(first, generate_probe(edited, None, 128, seed=1, recipe=recipe,
                                                 progress=False))
    assert Probe(model, None, 128, 1, recipe).key() != Probe(edited, None, 128, 1, recipe).key()
    # a generation config that says what the config says keys as before
    assert Probe(model, None, 128, 1, recipe).key() == Probe(copy.deepcopy(model), None, 128, 1,
                                                             recipe).key()
