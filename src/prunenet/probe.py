"""Probe text the model writes itself: token ids for calibration-free statistics.

:func:`generate_probe` samples ``tokens`` token ids in batches with the KV cache, each token drawn
by inverse CDF from one uniform number per sequence (:func:`draw_tokens`) of a generator seeded
for the probe (no effect on the caller's random state), so the same seed gives the same ids. The
recipe knobs: how sequences start (the BOS token or a token drawn uniformly from the
vocabulary), the temperature (optionally rising linearly over the first tokens, as in
self-calibration, arXiv 2410.17170), top-p and min-p truncation (applied after the temperature),
and dropping degenerate samples (few distinct 4-grams) or, optionally, samples written mostly
in another script than the probe's main one, before they reach the statistics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import unicodedata
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .arithmetic import cuda_devices, hash_tensors
from .errors import InputError, first_line
from .families import context_length
from .model_view import input_device, parameters_in_memory

log = logging.getLogger(__name__)

# What a cache file says of itself (safetensors metadata): the key it was written under, and
# the sha256 of its ids as written. A file without them (an earlier prunenet's, or not
# prunenet's) cannot be vouched for and is generated again.
_KEY_FIELD, _SHA_FIELD = "prunenet_probe_key", "ids_sha256"

# How a token is drawn from the sampling distribution (named in cache keys and records):
# inverse CDF, one uniform draw per sequence (torch.multinomial, which draws one exponential per
# vocabulary entry, took 36 ms of every decoding step of 32 sequences over SmolLM2's 49,152
# tokens and 236 ms over Gemma 3's 262,144 here; this takes 0.5 ms and 1.8 ms).
SAMPLER = "inverse-cdf"
# "multinomial": the earlier sampler (transformers' sampling with torch.multinomial on the
# seeded global generator, the model's generation config applied), to repeat earlier probes.
SAMPLERS = (SAMPLER, "multinomial")


@dataclass(frozen=True)
class ProbeRecipe:
    """How the probe is sampled; the defaults are the measured choice
    (benchmarks/quality_reconstruct.md)."""

    sequence_length: int = 256
    batch_size: int = 32
    first_token: str = "bos"  # "bos" or "random" (a uniform token of the vocabulary per sequence)
    # Measured: 0.8, 1.5, top-p 0.9 and min-p 0.05-0.1 worse; 1.2 better than 1.0; a warm-up
    # from 0.6 over 32 tokens no better: cutting the sampling tail hurts the refit.
    temperature: float = 1.2
    start_temperature: float | None = None  # rises linearly to ``temperature`` ...
    warmup_tokens: int = 0  # ... over this many first generated tokens
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens below this fraction of the most likely one's probability
    min_distinct_4grams: float = 0.0  # drop samples with a smaller fraction of distinct 4-grams
    # Text every sequence starts with after the first token (BOS): a few words that steer the
    # model's own text towards a language or style, no corpus. Empty: BOS alone (the default).
    # Left out of the repr, so probes cached before it existed keep their keys; cache keys
    # add it through cache_suffix.
    prompt: str = field(default="", repr=False)
    # Keep only sequences written mostly in the probe's main script (the one most sequences of
    # the first batch are written in): a multilingual model's probe stays in one writing
    # system without anyone naming a language. Needs the tokenizer. Out of the repr like prompt.
    one_script: bool = field(default=False, repr=False)
    # How each token is drawn (SAMPLERS). Out of the repr like prompt; cache keys add it.
    sampler: str = field(default=SAMPLER, repr=False)

    def cache_suffix(self) -> str:
        """What a cache key adds to the repr: the prompt and the script filter, when set, and
        the sampler."""
        return ((f" prompt={self.prompt!r}" if self.prompt else "")
                + (" one_script=True" if self.one_script else "")
                + f" sampler={self.sampler}")


_BLOCK = 1024  # vocabulary entries per block of the two-level search
# The lowest temperature a probe samples at (lower ones are refused): logits divided by less
# may overflow, and at it sampling already keeps the likeliest token.
MIN_TEMPERATURE = 1e-4


def check_sampler(sampler: Any) -> None:
    """Raise :class:`InputError` unless ``sampler`` names one of :data:`SAMPLERS`."""
    if sampler not in SAMPLERS:
        raise InputError(f"unknown probe sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")


def check_probe_tokens(tokens: Any) -> None:
    """Raise :class:`InputError` unless ``tokens`` (the probe's size) is a positive integer."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise InputError(f"--probe-tokens must be a positive integer, got {tokens!r}")


def check_probe_prompt(prompt: Any) -> None:
    """Raise :class:`InputError` unless ``prompt`` is text (None or empty: no prompt)."""
    if prompt is not None and not isinstance(prompt, str):
        raise InputError(f"--probe-prompt must be text, got {prompt!r}; give the words every "
                         "probe sequence starts with as one string")


def draw_tokens(probabilities: Tensor, generator: torch.Generator) -> Tensor:
    """One index per row of ``probabilities`` (rows x vocabulary, non-negative, every row with
    positive mass; not necessarily normalised), each drawn with probability proportional to
    its entry, from ``generator`` (one uniform draw per row).

    Inverse CDF in two levels, so that no running sum spans the vocabulary: the blocks of
    :data:`_BLOCK` entries (the last one shorter) are summed, a float64 cumulative sum over
    them picks the block, a float64 cumulative sum inside it the entry. An entry of zero
    probability is never drawn."""
    rows, vocabulary = probabilities.shape
    whole = vocabulary // _BLOCK * _BLOCK
    masses = [probabilities[:, :whole].reshape(rows, -1, _BLOCK).sum(-1)]
    if whole < vocabulary:
        masses.append(probabilities[:, whole:].sum(-1, keepdim=True))
    block_mass = torch.cat(masses, dim=1).double()  # rows x blocks
    cumulative = block_mass.cumsum(-1)
    uniform = torch.rand(rows, 1, generator=generator, dtype=torch.float64)
    target = uniform.to(cumulative.device) * cumulative[:, -1:]
    # the first block whose cumulative mass exceeds the target (it has mass: it raised the
    # sum); a target rounded up to the total takes the last block with mass
    last_block = (torch.arange(block_mass.shape[1], device=cumulative.device)
                  * (block_mass > 0)).amax(-1, keepdim=True)
    block = torch.minimum(torch.searchsorted(cumulative, target, right=True), last_block)
    before = torch.where(block > 0, cumulative.gather(1, (block - 1).clamp(min=0)), 0.0)
    columns = block * _BLOCK + torch.arange(_BLOCK, device=block.device)  # rows x _BLOCK
    inside = probabilities.gather(1, columns.clamp(max=vocabulary - 1))
    inside = inside * (columns < vocabulary)  # the last block's columns past the vocabulary
    index = torch.searchsorted(inside.double().cumsum(-1), target - before, right=True)
    # rounding may put the target at or past the block's last mass: take its last entry with any
    last = (torch.arange(_BLOCK, device=inside.device) * (inside > 0)).amax(-1, keepdim=True)
    return (block * _BLOCK + torch.minimum(index, last)).squeeze(1)


class _Sampling:
    """A logits processor that draws the next token itself: the temperature schedule, top-p
    and min-p where the recipe asks, the draw (:func:`draw_tokens`), and one progress tick per
    decoding step. It returns scores that are -inf everywhere but the drawn token, for greedy
    decoding to pick."""

    def __init__(self, recipe: ProbeRecipe, prompt_length: int, bar: tqdm,
                 generator: torch.Generator | None) -> None:
        from transformers import MinPLogitsWarper, TopPLogitsWarper

        self.recipe, self.prompt_length, self.bar = recipe, prompt_length, bar
        self.generator = generator  # None: only the temperature (transformers draws)
        self.warpers = ([TopPLogitsWarper(recipe.top_p)] if recipe.top_p < 1.0 else []) + (
            [MinPLogitsWarper(recipe.min_p)] if recipe.min_p > 0 else [])

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self.bar.update(input_ids.shape[0])
        step = input_ids.shape[1] - self.prompt_length
        recipe = self.recipe
        temperature = recipe.temperature
        if recipe.start_temperature is not None and step < recipe.warmup_tokens:
            fraction = step / max(recipe.warmup_tokens, 1)
            temperature = recipe.start_temperature + fraction * (
                recipe.temperature - recipe.start_temperature)
        scores = scores / max(temperature, MIN_TEMPERATURE)
        if self.generator is None:
            return scores
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        drawn = draw_tokens(torch.softmax(scores, dim=-1), self.generator)
        picked = torch.full_like(scores, float("-inf"))
        picked[torch.arange(len(drawn), device=scores.device), drawn] = 0.0
        return picked


@contextmanager
def _own_distribution(model: nn.Module) -> Iterator[None]:
    """For the block, a generation config that names only the model's special tokens: the
    probe samples the model's own distribution, which a checkpoint's generation_config.json
    (a repetition penalty, beams, top-k, banned words) would otherwise reshape, since
    transformers fills every setting a call leaves unset from it."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=saved.bos_token_id, eos_token_id=saved.eos_token_id,
        pad_token_id=saved.pad_token_id)
    try:
        yield
    finally:
        model.generation_config = saved


def distinct_4gram_fraction(sequence: Tensor) -> float:
    """Fraction of a 1-D token sequence's 4-grams that are distinct (1.0: no repetition)."""
    grams = sequence.unfold(0, 4, 1) if sequence.numel() >= 4 else sequence.view(1, -1)
    return torch.unique(grams, dim=0).shape[0] / grams.shape[0]


def main_script(text: str) -> str | None:
    """The writing system most of ``text``'s letters belong to (the first word of their Unicode
    names: ``LATIN``, ``CYRILLIC``, ``CJK``, ``ARABIC``, ...), or None without letters."""
    counts = Counter(unicodedata.name(ch, "?").split()[0] for ch in text if ch.isalpha())
    return counts.most_common(1)[0][0] if counts else None


def probe_sequence_length(model: nn.Module, recipe: ProbeRecipe) -> int:
    """The length of the probe's sequences: the recipe's, capped by the model's positions."""
    return sequence_length_for(model.config, recipe.sequence_length)


def sequence_length_for(config: Any, wanted: int) -> int:
    """``wanted`` capped by the positions a model of ``config`` has (longer probes become more
    sequences), and at least 2."""
    positions = context_length(config)
    return max(2, min(wanted, positions) if positions else wanted)


def prompt_ids(tokenizer, recipe: ProbeRecipe) -> list[int]:
    """The token ids of ``recipe.prompt`` (none for an empty prompt)."""
    check_probe_prompt(recipe.prompt)
    if not recipe.prompt:
        return []
    if tokenizer is None:
        raise InputError("a probe prompt needs the model's tokenizer, and there is none: save "
                         "one beside the model (or load it with the model), or drop the prompt")
    return list(tokenizer(recipe.prompt, add_special_tokens=False)["input_ids"])


def checked_prompt_ids(tokenizer, recipe: ProbeRecipe, length: int) -> list[int]:
    """:func:`prompt_ids`, refused where the prompt leaves no room in sequences of ``length``
    tokens (BOS first) for a generated token. ``length`` below ``recipe.sequence_length`` is
    the model's context, which a longer --probe-length would not raise."""
    words = prompt_ids(tokenizer, recipe)
    if 1 + len(words) >= length:
        advice = ("shorten it: the probe sequences are cut to the model's context"
                  if length < recipe.sequence_length else "shorten it or raise --probe-length")
        raise InputError(f"the probe prompt takes {len(words)} tokens, too many for probe "
                         f"sequences of {length}; {advice}")
    return words


def starts_from_bos(model: nn.Module, recipe: ProbeRecipe) -> bool:
    """Whether the probe's sequences start with the model's BOS token (the recipe asks for it
    and the config names one inside the vocabulary); otherwise a uniformly drawn token."""
    vocab = model.get_input_embeddings().weight.shape[0]
    bos = getattr(model.config, "bos_token_id", None)
    return recipe.first_token == "bos" and isinstance(bos, int) and 0 <= bos < vocab


def _first_tokens(model: nn.Module, recipe: ProbeRecipe, prompt: list[int], count: int,
                  generator: torch.Generator) -> Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    if recipe.first_token not in ("bos", "random"):
        raise InputError(f"unknown first_token {recipe.first_token!r}; use 'bos' or 'random'")
    if starts_from_bos(model, recipe):
        first = torch.full((count, 1), model.config.bos_token_id, dtype=torch.long)
    else:
        first = torch.randint(0, vocab, (count, 1), generator=generator)  # uniform over vocab
    return torch.cat([first, torch.tensor(prompt, dtype=torch.long).expand(count, -1)], dim=1)


@torch.no_grad()
def generate_probe(model: nn.Module, tokenizer, tokens: int, seed: int,
                   recipe: ProbeRecipe | None = None, progress: bool = True,
                   label: str = "probe") -> Tensor:
    """About ``tokens`` token ids (sequences x length, rounded up to whole sequences) of the
    model's own sampled text, reproducible from ``seed``.

    The length is ``recipe.sequence_length`` capped by the model's positions (more, shorter
    sequences then), ``recipe.prompt`` included. ``tokenizer`` may be None unless there is a
    prompt. ``label`` names the progress bar. Raises :class:`InputError` for a
    non-positive ``tokens``.
    """
    recipe = recipe or ProbeRecipe()
    check_sampler(recipe.sampler)
    if tokens < 1:
        raise InputError(f"the probe needs at least 1 token, got {tokens}")
    length = probe_sequence_length(model, recipe)
    words = checked_prompt_ids(tokenizer, recipe, length)
    wanted = math.ceil(tokens / length)
    device = input_device(model)
    kept: list[Tensor] = []
    dropped = 0
    script: str | None = None  # the probe's main script, from the first batch (one_script)
    if recipe.one_script and tokenizer is None:
        raise InputError("a probe kept in one script needs the model's tokenizer; load the "
                         "model with it")
    # the bar counts the tokens sampled (BOS and the prompt are given, not generated), so it
    # ends at its total and its rate is the generation's
    new_tokens = length - 1 - len(words)
    with torch.random.fork_rng(devices=cuda_devices()), tqdm(
            total=wanted * new_tokens, unit="tok", desc=label, disable=not progress,
            leave=False) as bar:
        torch.manual_seed(int(seed))
        generator = torch.Generator().manual_seed(int(seed))
        while len(kept) < wanted:
            if dropped > 4 * wanted:
                why = ("degenerate or in another script; lower min_distinct_4grams, raise "
                       "the temperature or keep every script" if recipe.one_script else
                       "degenerate; lower min_distinct_4grams or raise the temperature")
                raise InputError(f"{dropped} probe samples were {why}")
            count = min(recipe.batch_size, wanted - len(kept))
            prompt = _first_tokens(model, recipe, words, count, generator).to(device)
            if recipe.sampler == "multinomial":  # as earlier versions drew, to repeat them
                output = model.generate(
                    prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0,
                    top_p=recipe.top_p, min_p=recipe.min_p or None, temperature=1.0,
                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                    logits_processor=[_Sampling(recipe, prompt.shape[1], bar, None)]).cpu()
            else:
                with _own_distribution(model):
                    output = model.generate(
                        prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                        num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                        pad_token_id=0,
                        logits_processor=[_Sampling(recipe, prompt.shape[1], bar, generator)]
                    ).cpu()
            scripts = [None] * len(output)
            if recipe.one_script:
                scripts = [main_script(text) for text in tokenizer.batch_decode(
                    output[:, prompt.shape[1]:], skip_special_tokens=True)]
                if not kept and not dropped:  # the first batch decides, even if it is None
                    script = Counter(scripts).most_common(1)[0][0]
            for sequence, written in zip(output, scripts, strict=True):
                if (distinct_4gram_fraction(sequence) >= recipe.min_distinct_4grams
                        and written == script):
                    kept.append(sequence)
                else:
                    dropped += 1
                    bar.total += new_tokens
    return torch.stack(kept[:wanted])


def _ids_sha256(ids: Tensor) -> str:
    """The sha256 of a probe's ids as a cache file stores them (int64, row after row)."""
    return hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()


class Probe:
    """The calibration-free probe of one run: ``tokens`` of ``model``'s own text from ``seed``,
    generated once when first asked for and shared by every stage that reads it (selection,
    refit). With ``cache`` (a folder) a probe made before for the same model, seed, size and
    recipe is read back instead of generated; ``compare`` reuses it across ratios and methods in
    one process as well. ``generated`` counts generations (0 when a cache served it)."""

    _memory: dict[str, Tensor] = {}

    def __init__(self, model: nn.Module, tokenizer, tokens: int, seed: int,
                 recipe: ProbeRecipe | None = None, cache: str | os.PathLike | None = None,
                 progress: bool = True) -> None:
        check_probe_tokens(tokens)
        self.model, self.tokenizer, self.tokens, self.seed = model, tokenizer, tokens, seed
        self.recipe = recipe or ProbeRecipe()
        self.cache = Path(cache) if cache is not None else None
        self.progress = progress
        self.generated = 0
        self._ids: Tensor | None = None

    def key(self) -> str:
        """What the probe depends on: the model (its config, not the folder it was read from;
        its generation config where that says more than the config; and every weight, so two
        models that share a config and embeddings but not their layers never share a probe),
        the seed, the size, the recipe, its sampler, its prompt's token ids and the device the
        model runs on where it is not the CPU."""
        config = json.loads(self.model.config.to_json_string(use_diff=False))
        # where the model was read from is no part of it: a model moved or copied to another
        # folder, or a GGUF converted into a new scratch folder each run, writes the same probe
        config.pop("_name_or_path", None)
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
        hash_tensors(digest, parameters_in_memory(self.model))
        # the prompt as the tokenizer reads it: the same words may be other ids
        words = f" prompt_ids={prompt_ids(self.tokenizer, self.recipe)}" if self.recipe.prompt \
            else ""
        # the sequences as generated: a length beyond the model's positions is capped, and
        # every length capped alike generates the same probe
        recipe = replace(self.recipe, sequence_length=probe_sequence_length(self.model,
                                                                            self.recipe))
        digest.update((repr((self.seed, self.tokens, recipe)) + self.recipe.cache_suffix()
                       + words + self._generation_suffix() + self._device_suffix()).encode())
        return digest.hexdigest()[:32]

    def _device_suffix(self) -> str:
        """The devices other than the CPU the model generates on (its inputs' and its
        weights'), empty on the CPU alone (keys made before it was keyed on stay valid): an
        accelerator rounds the logits otherwise, which changes some of the drawn tokens."""
        kinds = {parameter.device.type for parameter in self.model.parameters()}
        kinds = sorted((kinds | {input_device(self.model).type}) - {"cpu", "meta"})
        return f" devices={','.join(kinds)}" if kinds else ""

    def _generation_suffix(self) -> str:
        """What generation reads of the model's generation config (the default sampler: its
        special tokens, the end-of-sequence ids held back until the last token; multinomial:
        every setting) where it differs from what the config alone gives; empty otherwise, so
        that keys made before it was keyed on stay valid."""
        from transformers import GenerationConfig

        def read(generation: GenerationConfig) -> dict[str, Any]:
            settings = generation.to_diff_dict()
            if self.recipe.sampler == SAMPLER:
                return {name: settings.get(name)
                        for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
            return {name: value for name, value in settings.items()
                    if name not in ("transformers_version", "_from_model_config")}

        own = getattr(self.model, "generation_config", None)
        if own is None:
            return ""
        settings = read(own)
        if settings == read(GenerationConfig.from_model_config(self.model.config)):
            return ""
        return f" generation={json.dumps(settings, sort_keys=True)}"

    def ids(self) -> Tensor:
        """The probe's token ids (sequences x length)."""
        if self._ids is not None:
            return self._ids
        key = self.key()
        path = None if self.cache is None else self.cache / f"probe-{key}.safetensors"
        stale = False  # a cache file that cannot be vouched for: replaced by the new probe
        if key in Probe._memory:
            self._ids = Probe._memory[key]
        elif path is not None and path.is_file():
            self._ids = self._cached(path, key)
            stale = self._ids is None
        if self._ids is None:
            self._ids = generate_probe(self.model, self.tokenizer, self.tokens, self.seed,
                                       self.recipe, self.progress)
            self.generated += 1
        Probe._memory[key] = self._ids
        if path is not None and (stale or not path.is_file()):
            from safetensors.torch import save_file

            from .io.files import atomic_file

            path.parent.mkdir(parents=True, exist_ok=True)
            ids = self._ids.contiguous()
            with atomic_file(path) as tmp:
                save_file({"ids": ids}, str(tmp),
                          metadata={_KEY_FIELD: key, _SHA_FIELD: _ids_sha256(ids)})
        return self._ids

    def _cached(self, path: Path, key: str) -> Tensor | None:
        """The ids a cache file holds, refused unless they are what this probe would generate:
        token ids of the model's vocabulary, in the probe's own shape, written under ``key``
        and unchanged since (their sha256 is the one written with them). None for a file that
        does not say which key it was written under and what it held (an earlier prunenet's):
        it is generated again."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        length = probe_sequence_length(self.model, self.recipe)
        shape = (math.ceil(self.tokens / length), length)
        vocabulary = self.model.get_input_embeddings().num_embeddings
        metadata: dict[str, str] = {}
        try:
            ids = load_file(str(path)).get("ids")
            with safe_open(str(path), framework="pt") as opened:
                metadata = opened.metadata() or {}
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            why = first_line(error)
        else:
            why = ("it holds no tensor 'ids'" if ids is None
                   else f"its ids are {str(ids.dtype).removeprefix('torch.')}, not int64"
                   if ids.dtype != torch.int64
                   else f"its ids have shape {list(ids.shape)}, not {list(shape)}"
                   if tuple(ids.shape) != shape
                   else f"its ids leave the model's vocabulary of {vocabulary}"
                   if ids.numel() and (ids.min() < 0 or ids.max() >= vocabulary) else None)
        if why is None and (_KEY_FIELD not in metadata or _SHA_FIELD not in metadata):
            log.info("the cached probe %s does not say which probe it holds (written by an "
                     "earlier prunenet); generating it again", path)
            return None
        if why is None and metadata[_KEY_FIELD] != key:
            why = (f"it holds the probe of key {metadata[_KEY_FIELD]}, not {key}: a probe "
                   "file copied or renamed")
        elif why is None and metadata[_SHA_FIELD] != _ids_sha256(ids):
            why = "its ids are not those it was written with"
        if why is not None:
            raise InputError(f"the cached probe {path} is damaged ({why}); delete it, and the "
                             "probe is generated again")
        return ids

    def record(self) -> dict:
        """What was asked for and what was made: ``tokens`` as asked (``--probe-tokens``),
        ``sequence_length`` as generated (capped by the model's positions) and, once it was
        made, ``shape``, the generated sequences x length."""
        prompt = {"prompt": self.recipe.prompt} if self.recipe.prompt else {}
        script = {"one_script": True} if self.recipe.one_script else {}
        shape = {"shape": list(self._ids.shape)} if self._ids is not None else {}
        length = probe_sequence_length(self.model, self.recipe)
        return {"tokens": self.tokens, "seed": self.seed, **shape, "sequence_length": length,
                "temperature": self.recipe.temperature, "sampler": self.recipe.sampler,
                "batch_size": self.recipe.batch_size,  # the batch decides the sampled tokens
                **prompt, **script}
