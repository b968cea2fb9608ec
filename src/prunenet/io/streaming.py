"""Out-of-core compression: train, select and slice a safetensors checkpoint one tensor at a time.

PruneNet needs only each layer's first FFN matrix, so a checkpoint larger than memory can be
compressed by reading tensors from its (memory-mapped) shards when they are used: the policy
trains on one layer's matrix at a time, and the output is written shard by shard, one tensor at a
time, with every non-FFN tensor copied through byte for byte. The kept rows, and therefore every
output tensor, are the same as the in-memory path's for the same seed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import InputError, OutputError
from ..families import Cut, family_for, slice_tensor
from ..model_view import check_finite, non_finite_error
from .files import atomic_folder, write_json_atomic
from .loading import (
    FLOAT_TYPES,
    RECORD_NAME,
    check_weights_on_meta,
    copy_terms,
    gguf_header_bytes,
    gguf_parameters,
    is_model_output,
    load_config,
    load_tokenizer,
    prevailing_float_type,
    read_config_json,
    resolve_source,
    validate_gguf,
    validate_safetensors,
    validate_weight_files,
    write_card,
)

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Resident memory of the interpreter with torch, safetensors and prunenet imported (223 MB
# measured), rounded up.
BASE_MEMORY = 250 * 2**20
# What a run of the model adds to that by importing transformers, accelerate and a model class
# (372 MiB in all measured), rounded up.
MODEL_RUN_IMPORTS = 150 * 2**20
# What a run that reads text adds by loading the model's tokenizer and tokenizing a corpus:
# SmolLM2's tokenizer and the wiki sample 384 MiB measured (121 MiB the tokenizer, 263 MiB its
# 458,604 tokens, the fast tokenizer's encoding of the whole text at once), Gemma 3's 509 MiB
# (471 MiB its 262,144-token vocabulary), rounded up. The probe's and --eval's estimates hold
# more than this in their caches and logits; a calibration pass without a refit holds little
# else.
TEXT_MEMORY = 512 * 2**20
# Without --max-memory, stream when the in-memory path would need more than this share of free RAM.
DEFAULT_RAM_SHARE = 0.5
# Converting a GGUF (benchmarks/convert_cost.py on SmolLM2's and Gemma 3's GGUFs, and the
# tests' tiny one): what the imports (transformers, gguf, tokenizers) add to the interpreter,
# and the resident bytes per byte of the GGUF's header while it is parsed twice, as gguf's
# reader and as transformers' config and tokenizer (Gemma 3's 6.2 MiB header: 108 measured),
# rounded up.
CONVERSION_IMPORTS = 300 * 2**20
GGUF_PARSE_FACTOR = 128
_COPY_CHUNK = 4 * 2**20
_M_MMAP_THRESHOLD = -3  # mallopt parameter of glibc's malloc.h
# Allocations of this many bytes or more are served by mmap in a streamed run (bound_heap_growth).
MMAP_THRESHOLD = 2**18
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


def parse_memory(text: str | int) -> int:
    """Bytes from a size as accelerate and transformers read ``max_memory``: ``"2GB"`` is 2 x 10^9
    bytes, ``"2GiB"`` 2 x 2^30, ``"512MB"``, ``"1.5GB"``; a plain integer is bytes. Units are
    read in any case, always as bytes: accelerate reads a lower-case ``b`` as bits (``2gb`` would
    be 2.5 x 10^8 bytes), so the unit is upper-cased before it is passed on. A size with a minus
    sign (``-1GB``) is refused as not positive, as ``0`` is."""
    from accelerate.utils import convert_file_size_to_int

    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise InputError(f"--max-memory must be a size such as 2GB, got {text!r}")
    negative = text.strip().startswith("-") if isinstance(text, str) else text < 0
    size = text.strip().removeprefix("-") if isinstance(text, str) else abs(text)
    # isdigit() alone passes '²', which int() cannot read
    if isinstance(size, str) and size.isascii() and size.isdigit():
        size = int(size)
    try:
        value = convert_file_size_to_int(size.upper() if isinstance(size, str) else size)
    except (ValueError, TypeError, OverflowError):  # OverflowError: infinite, e.g. 1e400GB
        raise InputError(f"--max-memory {text!r} is not understood; write e.g. 2GB (10^9 bytes), "
                         "2GiB (2^30 bytes) or 512MB") from None
    if value <= 0 or negative:
        raise InputError(f"--max-memory must be positive, got {text!r}")
    return int(value)


def format_bytes(count: float) -> str:
    """``count`` bytes in binary units (KiB, MiB, GiB), as --max-memory accepts them back."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f}{unit}"
        count /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its shard, dtype code, shape, absolute byte range and its name
    in the shard (``stored``; the model may name it otherwise: :meth:`StreamedCheckpoint.
    _as_loaded`)."""

    shard: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    stored: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class StreamedCheckpoint:
    """A local safetensors checkpoint seen through its headers; tensors are read on demand.

    Raises :class:`InputError` naming the file for a missing or truncated index or shard, a tensor
    the index promises but its shard lacks, and an FFN tensor whose shape differs from layer 0's.
    ``staged``: ``folder`` is an output this run is staging (as :func:`~prunenet.io.loading.
    resolve_source` reads one).
    """

    def __init__(self, folder: str | os.PathLike, staged: bool = False) -> None:
        self.source = str(folder)  # as the user wrote it, for the compression record
        self.folder = Path(folder).expanduser().resolve()
        if not (self.folder / "config.json").is_file():
            raise InputError(f"{self.folder} is not a model folder: it has no config.json")
        self.config: dict[str, Any] = read_config_json(self.folder)
        self.model_type = self.config.get("model_type")
        self.family = family_for(self.model_type)
        single = (self.folder / SINGLE_NAME).is_file()
        # transformers, too, loads model.safetensors where the folder also holds an index
        self.sharded = not single and (self.folder / INDEX_NAME).exists()
        if not self.sharded and not single:
            raise InputError(
                f"{self.folder} has neither {SINGLE_NAME} nor {INDEX_NAME}; streaming needs "
                "safetensors weights (a missing index file?)"
            )
        validate_weight_files(self.folder)  # missing shards, truncated files, lying headers
        entries = self._read_entries()
        # types and family checked as the in-memory load checks them
        self.model_config = load_config(self.folder, staged=staged)
        self.entries = self._as_loaded(entries)
        self._check_layers()
        self._weights_checked = False

    def check_weights(self) -> None:
        """Refuse missing or unused weights (transformers matches them on the meta device) and
        a tokenizer that cannot be read, as the in-memory load does: the output gets a copy of
        the tokenizer's files. Run once a checkpoint is streamed: one loaded in memory gets
        the load's own checks, so a choice that ends in memory does not pay for them."""
        if not self._weights_checked:
            check_weights_on_meta(self.folder)
            if not self._tokenizer_code():  # code of its own runs only where the user says
                load_tokenizer(self.folder)
            self._weights_checked = True

    def _tokenizer_code(self) -> bool:
        """Whether the checkpoint's tokenizer may be its own code (an ``auto_map`` in its
        config.json or tokenizer_config.json), which a streamed run never runs."""
        try:
            tokenizer_config = json.loads((self.folder / "tokenizer_config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            tokenizer_config = {}  # none, or unreadable: the tokenizer's load says which
        return "auto_map" in self.config or (isinstance(tokenizer_config, dict)
                                             and "auto_map" in tokenizer_config)

    def _read_entries(self) -> dict[str, TensorEntry]:
        if self.sharded:
            weight_map = json.loads((self.folder / INDEX_NAME).read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        else:
            weight_map, shards = None, [SINGLE_NAME]
        entries: dict[str, TensorEntry] = {}
        for shard in shards:
            path = self.folder / shard
            header = validate_safetensors(path)
            with open(path, "rb") as handle:
                data_start = 8 + int.from_bytes(handle.read(8), "little")
            for name, entry in header.items():
                if name == "__metadata__" or (weight_map and weight_map.get(name) != shard):
                    continue
                start, end = entry["data_offsets"]
                entries[name] = TensorEntry(shard, entry["dtype"], tuple(entry["shape"]),
                                            data_start + start, data_start + end, name)
        for name, shard in (weight_map or {}).items():
            if name not in entries:
                raise InputError(
                    f"{self.folder / INDEX_NAME} places {name} in {shard}, which does not hold "
                    "it; the checkpoint is incomplete or its index is stale"
                )
        return entries

    def _as_loaded(self, entries: dict[str, TensorEntry]) -> dict[str, TensorEntry]:
        """``entries`` under the names the loaded model gives them, which the output is written
        under, as the in-memory path saves it:
        - a checkpoint saved from the base model (the Hub's GPT-2: ``h.0.mlp.c_fc.weight``,
          ``wte.weight``) stores its tensors without the base model's prefix
          (``transformer.``), which transformers adds where the model holds a tensor of that
          name;
        - a matrix the model ties (the head to the embedding), stored under one of its names
          only, is named as the model's save names it (the first of its names)."""
        model = self._meta_model
        prefix, known = model.base_model_prefix + ".", set(model.state_dict())
        family = self.family
        if family.tensor_name(0, family.first) not in entries:
            entries = {prefix + name if prefix + name in known else name: entry
                       for name, entry in entries.items()}
        saved_as = self._saved_names
        return {saved_as[name] if name in saved_as and saved_as[name] not in entries else name:
                entry for name, entry in entries.items()}

    @functools.cached_property
    def _saved_names(self) -> dict[str, str]:
        """Each parameter name of the model by the name its matrix is saved under: the first
        of the names a tied matrix has (the embedding's for a tied head), else its own."""
        first: dict[int, str] = {}
        return {name: first.setdefault(id(parameter), name)
                for name, parameter in self._meta_model.named_parameters(remove_duplicate=False)}

    @functools.cached_property
    def _meta_model(self) -> Any:
        """The model of this checkpoint's config on the meta device: its names, how they are
        tied and which stored names it ignores, no data."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(self.model_config, dtype=torch.float32)

    def _check_layers(self) -> None:
        family = self.family
        self.num_layers = 0
        while family.tensor_name(self.num_layers, family.first) in self.entries:
            self.num_layers += 1
        if self.num_layers == 0:
            raise InputError(
                f"{self.folder} holds no {family.tensor_name(0, family.first)}: the model has "
                f"no decoder layers, or is not a {self.model_type} checkpoint prunenet can read"
            )
        first = self.entries[family.tensor_name(0, family.first)]
        self.d_ff = first.shape[family.first.axis] // family.first.blocks
        self.d_model = first.shape[1 - family.first.axis]
        self.dtype = first.dtype
        reference: dict[str, tuple[int, ...]] = {}
        for index in range(self.num_layers):
            for cut in family.cuts:
                name = family.tensor_name(index, cut)
                entry = self.entries.get(name)
                if entry is None:
                    if cut.optional:
                        continue
                    raise InputError(f"{self.folder} lacks the FFN tensor {name}")
                expected = reference.setdefault(cut.name, entry.shape)
                if entry.shape != expected or entry.shape[cut.axis] != self.d_ff * cut.blocks:
                    raise InputError(
                        f"{name} in {entry.shard} has shape {list(entry.shape)}, expected "
                        f"{list(expected)} (d_ff={self.d_ff} along axis {cut.axis}) like layer "
                        "0; the checkpoint is damaged or mixes layer shapes"
                    )

    def __fspath__(self) -> str:
        return str(self.folder)

    def __str__(self) -> str:
        return self.source

    # --- reading --------------------------------------------------------------------------

    def tensor(self, name: str) -> Tensor:
        """One tensor, read from its memory-mapped shard (the shard is unmapped again after)."""
        entry = self.entries[name]
        with safe_open(str(self.folder / entry.shard), framework="pt") as handle:
            return handle.get_tensor(entry.stored)

    def first_matrix(self, layer_index: int, device: torch.device | str | None = None) -> Tensor:
        """Layer ``layer_index``'s first FFN matrix, d_ff x d_model, fp32, as FFNView gives it."""
        name = self.family.tensor_name(layer_index, self.family.first)
        tensor = self.tensor(name)
        check_finite(name, tensor)
        matrix = self.family.first_matrix(tensor, self.d_ff)
        return matrix.to(device=device or "cpu", dtype=torch.float32).contiguous()

    def ffn_cuts(self) -> dict[str, tuple[int, Cut]]:
        """Every FFN tensor present, by name: (layer index, cut)."""
        cuts = {}
        for index in range(self.num_layers):
            for cut in self.family.cuts:
                name = self.family.tensor_name(index, cut)
                if name in self.entries:
                    cuts[name] = (index, cut)
        return cuts

    # --- sizes ----------------------------------------------------------------------------

    @functools.cached_property
    def _unheld(self) -> tuple[frozenset[str], frozenset[str]]:
        """:attr:`tied_copies` and :attr:`ignored`, from the model on the meta device."""
        model = self._meta_model
        copies = set()
        for name, shared in self._saved_names.items():
            # transformers ties two stored tensors only where they hold the same values; a
            # head stored apart from its embedding is kept (tie_word_embeddings notwithstanding)
            if shared != name and shared in self.entries and name in self.entries \
                    and self._same_stored(shared, name):
                copies.add(name)
        held = set(model.state_dict())
        patterns = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()
        ignored = {name for name in self.entries if name not in held
                   and any(re.search(pattern, name) for pattern in patterns)}
        return frozenset(copies), frozenset(ignored)

    def _same_stored(self, first: str, second: str) -> bool:
        """Whether two stored tensors hold the same values: the same type and shape, and the
        same bytes (compared a chunk at a time)."""
        a, b = self.entries[first], self.entries[second]
        if (a.dtype, a.shape) != (b.dtype, b.shape):
            return False
        with open(self.folder / a.shard, "rb") as one, open(self.folder / b.shard, "rb") as two:
            one.seek(a.start)
            two.seek(b.start)
            remaining = a.end - a.start
            while remaining:
                size = min(_COPY_CHUNK, remaining)
                if one.read(size) != two.read(size):
                    return False
                remaining -= size
        return True

    @functools.cached_property
    def tied_copies(self) -> frozenset[str]:
        """Stored tensors that the loaded model ties to another stored one (a tied head saved
        beside the embedding it shares, with its values): the model holds that matrix once."""
        return self._unheld[0]

    @functools.cached_property
    def ignored(self) -> frozenset[str]:
        """Stored tensors that the loaded model does not hold and transformers skips on load
        (GPT-2's causal masks ``h.0.attn.bias``, saved as weights by older versions): neither
        counted nor written, as the in-memory path neither counts nor saves them."""
        return self._unheld[1]

    def parameter_counts(self, kept: int | None = None) -> dict[str, int]:
        """Total and FFN parameter counts, as FFNView counts them (a tied matrix stored twice
        once); after pruning to ``kept``."""
        total = sum(entry.numel for name, entry in self.entries.items()
                    if name not in self.tied_copies | self.ignored)
        ffn = ffn_after = 0
        for name in self.ffn_cuts():
            entry = self.entries[name]
            ffn += entry.numel
            ffn_after += entry.numel // self.d_ff * (kept if kept is not None else self.d_ff)
        return {"total": total - ffn + ffn_after, "ffn": ffn_after}

    @property
    def weight_bytes(self) -> int:
        """The weights' size as stored (on disk)."""
        return sum(entry.end - entry.start for entry in self.entries.values())

    @functools.cached_property
    def stored_float_type(self) -> torch.dtype | None:
        """The float type most of the weights are stored in (None: none is a float), what a
        load keeps them in whatever the config declares."""
        return prevailing_float_type((entry.dtype, entry.numel)
                                     for entry in self.entries.values())

    @functools.cached_property
    def computed_in_float32(self) -> bool:
        """Whether a load computes these weights in float32 although they are stored in a
        narrower float type (float8): :func:`~prunenet.io.loading.load_model_and_tokenizer`
        widens them, so in memory each takes 4 bytes a value, not the 1 it takes on disk."""
        stored = self.stored_float_type or getattr(self.model_config, "dtype", None)
        return (isinstance(stored, torch.dtype) and stored.is_floating_point
                and stored.itemsize < 2)

    def _loaded(self, entry: TensorEntry) -> int:
        """``entry``'s bytes once loaded (:attr:`computed_in_float32`), else as stored."""
        if self.computed_in_float32 and entry.dtype in FLOAT_TYPES:
            return 4 * entry.numel
        return entry.end - entry.start

    @property
    def loaded_bytes(self) -> int:
        """The weights' size in memory once loaded: as stored, or in float32 for float8."""
        return sum(self._loaded(entry) for entry in self.entries.values())

    @property
    def float32_bytes(self) -> int:
        """The weights' size in float32, as a fine-tune or a GGUF's load holds them."""
        return 4 * sum(entry.numel for entry in self.entries.values())

    def streaming_memory(self, training: bool) -> int:
        """Estimated peak resident bytes of streamed work: about one layer plus the policy."""
        matrix = self.d_ff * self.d_model * 4
        # fp32 first matrix, its kept rows in fp32 and fp64 (at most ~3 matrices together at the
        # usual ratios), the Gram matrix and the eigensolver's workspace.
        spectral = 3 * matrix + 2 * self.d_model**2 * 8
        # A tensor read, its slice, and slack (float8 is checked for NaN in float32). A chunk
        # of a tensor copied through and its NaN check's masks (2.25 chunks) stay within the
        # measured imports' slack.
        largest = max(self._loaded(self.entries[name]) for name in self.ffn_cuts())
        writing = 3 * largest
        policy = (self.d_ff * self.d_model + 2 * self.d_ff) * 4
        # Every streamed run imports transformers (reading the config, checking the weights on
        # the meta device): 157 MiB measured (a 263 MB checkpoint under the old minimum of 286
        # MiB peaked at 421 MiB).
        base = BASE_MEMORY + MODEL_RUN_IMPORTS
        if not training:
            return base + policy + max(matrix, writing)
        # Parameters, two AdamW moments, the acting and the best copies; gradients exist only
        # during updates, when no spectrum is being computed. Measured for the LLaMA-2-7B shape:
        # 1.79e9 bytes peak, estimated 1.96e9 without the imports (benchmarks/memory.py).
        return base + 5 * policy + max(spectral, policy + matrix, writing)

    def layer_bytes(self) -> int:
        """The largest decoder layer's weights, as loaded (:attr:`loaded_bytes`)."""
        prefix = self.family.layers + "."
        sizes: dict[str, int] = {}
        for name, entry in self.entries.items():
            if name.startswith(prefix):
                layer = name[len(prefix):].split(".", 1)[0]
                sizes[layer] = sizes.get(layer, 0) + self._loaded(entry)
        return max(sizes.values())

    def run_working_memory(self, probe_tokens: int, batch: int, length: int,
                           gram_budget: int) -> int:
        """Estimated bytes a run of the model needs besides its weights and the interpreter
        (:data:`BASE_MEMORY`): transformers' own imports, then the probe's generation (a
        key-value cache in the weights' float type and the head's logits for ``batch``
        sequences of ``length``), then the statistics pass and the refit (Grams within
        ``gram_budget``, the probe's hidden states; summing a Gram takes one and a half more,
        a layer's refit up to five more: its kept columns, the kept Gram, the identity, the
        regularised system and the solve's factor, in float64)."""
        vocabulary = int(self.config.get("vocab_size") or 0)
        cache = (2 * self.num_layers * batch * length * self._key_value_width()
                 * self._float_size())
        logits = 4 * batch * vocabulary * 4
        grams = max(min(gram_budget, self.num_layers * self.d_ff**2 * 8), self.d_ff**2 * 8)
        hidden = 2 * probe_tokens * self.d_model * 4 + batch * length * self.d_ff * 4
        refit = 5 * self.d_ff**2 * 8  # more than summing a Gram takes (1.5 Grams)
        return MODEL_RUN_IMPORTS + max(cache + logits, grams + hidden + refit)

    def _key_value_width(self) -> int:
        """Keys (or values) cached per token and layer: the key-value heads' width where the
        config names them, else the model width (an upper bound)."""
        config = self.config
        heads, shared = config.get("num_attention_heads"), config.get("num_key_value_heads")
        if not (isinstance(heads, int) and isinstance(shared, int) and heads > 0):
            return self.d_model
        return shared * int(config.get("head_dim") or self.d_model // heads)

    def model_run_memory(self, probe_tokens: int, batch: int, length: int, gram_budget: int
                         ) -> int:
        """Estimated peak resident bytes of running the model offloaded with no layer kept in
        memory: one layer (or the embeddings or head) read at a time, and the run's working
        memory (:meth:`run_working_memory`)."""
        return self.offloaded_memory(
            self.run_working_memory(probe_tokens, batch, length, gram_budget))

    def offloaded_memory(self, working: int) -> int:
        """Estimated peak resident bytes of a pass over the model offloaded with no layer kept
        in memory: the interpreter, two of the largest piece read from disk (a layer, or the
        embeddings or head, and the next one) and ``working`` bytes."""
        return BASE_MEMORY + 2 * max(self.layer_bytes(), self._outside()) + working

    def _outside(self) -> int:
        """The largest tensor outside the decoder layers (the embeddings or the head), as
        loaded."""
        return max((self._loaded(entry) for name, entry in self.entries.items()
                    if not name.startswith(self.family.layers + ".")), default=0)

    def evaluation_memory(self, batch: int, length: int) -> int:
        """Estimated bytes scoring ``batch`` sequences of ``length`` tokens at once (perplexity
        windows, or a batch of zero-shot answers) needs besides the weights and the
        interpreter: transformers' imports, the head's logits in the weights' type, in float32
        and as the loss's log-probabilities, and one layer's activations
        (:meth:`_decoder_memory`)."""
        vocabulary = int(self.config.get("vocab_size") or 0)
        logits = batch * length * vocabulary * (self._float_size() + 4 + 4)
        return MODEL_RUN_IMPORTS + logits + self._decoder_memory(batch, length)

    def calibration_memory(self, length: int) -> int:
        """Estimated bytes method activation's pass over its calibration text needs besides
        the weights and the interpreter: transformers' imports, the tokenizer and the text it
        read (:data:`TEXT_MEMORY`), one window of ``length`` tokens through the decoder
        (:meth:`_decoder_memory`; the pass never computes the head's logits), and each FFN's
        activations taken in float64 and squared."""
        return (MODEL_RUN_IMPORTS + TEXT_MEMORY + self._decoder_memory(1, length)
                + 2 * 8 * length * self.d_ff)

    def _decoder_memory(self, batch: int, length: int) -> int:
        """One decoder layer's activations for ``batch`` sequences of ``length`` tokens: hidden
        states, the FFN's, every head's attention scores (float32)."""
        heads = self.config.get("num_attention_heads")
        heads = heads if isinstance(heads, int) and heads > 0 else 1
        return (4 * batch * length * (4 * self.d_model + 3 * self.d_ff)
                + 2 * 4 * heads * batch * length**2)

    def _float_size(self) -> int:
        """Bytes of one value the model computes with (its caches and logits)."""
        if self.computed_in_float32 or self.dtype not in FLOAT_TYPES:
            return 4
        return FLOAT_TYPES[self.dtype].itemsize

    def in_memory_need(self, training: bool) -> int:
        """Estimated peak resident bytes of the in-memory path (transformers, which loads the
        model, the weights, matrices, Grams). Without the imports, a 263 MB checkpoint given
        its estimate of 603 MiB was kept in memory and peaked at 730 MiB."""
        per_layer = self.d_ff * self.d_model * 4 + self.d_model**2 * 8
        policy = (self.d_ff * self.d_model + 2 * self.d_ff) * 4
        return (BASE_MEMORY + MODEL_RUN_IMPORTS + self.loaded_bytes + self.num_layers * per_layer
                + policy * (6 if training else 1))


class PlannedConversion(StreamedCheckpoint):
    """A GGUF model seen as the float32 checkpoint :func:`prunenet.io.gguf_convert.convert_gguf`
    writes from it, before it is written: its tensors' names and shapes come from the GGUF's
    config on the meta device (one shard per decoder layer, as the conversion writes them), so
    a plan can size a streamed run of it without reading a weight. It holds no tensors; the run
    converts the GGUF and streams the checkpoint it wrote (:func:`prunenet.pipeline.
    run_compression`)."""

    def __init__(self, gguf: str | os.PathLike) -> None:
        from transformers import AutoModelForCausalLM

        self.source = str(gguf)
        self.gguf = self.folder = Path(gguf).expanduser().resolve()
        config = self.model_config = load_config(self.gguf)
        self.config = config.to_dict()
        self.model_type = config.model_type
        self.family = family_for(self.model_type)
        self.sharded = True
        with torch.device("meta"):  # the names and shapes only
            model = AutoModelForCausalLM.from_config(config)
        entries, offset = {}, 0
        for name, parameter in model.named_parameters():  # a tied matrix once, as converted
            layer = name.split(f"{self.family.layers}.", 1)
            shard = f"layer-{layer[1].split('.', 1)[0]}" if len(layer) == 2 else name
            size = 4 * parameter.numel()
            entries[name] = TensorEntry(shard, "F32", tuple(parameter.shape), offset,
                                        offset + size, name)
            offset += size
        self.entries = entries
        self.tied_copies = frozenset()  # named_parameters above gave a tied matrix once
        self.ignored = frozenset()
        self._check_layers()
        self._weights_checked = True  # the conversion writes what the model expects

    def tensor(self, name: str) -> Tensor:
        raise RuntimeError(f"{self.gguf} is not converted yet; stream the converted checkpoint")

    def conversion_memory(self) -> int:
        """Estimated peak resident bytes of converting the GGUF: the interpreter with
        transformers, the GGUF's header parsed into Python objects (the tokenizer's vocabulary
        and merges, and the tokenizer built from them), and three of the largest piece (a
        layer, or the embeddings: dequantized, processed, and held for its shard)."""
        return (BASE_MEMORY + CONVERSION_IMPORTS + 3 * max(self.layer_bytes(), self._outside())
                + GGUF_PARSE_FACTOR * gguf_header_bytes(self.gguf))

    def streaming_memory(self, training: bool) -> int:
        return max(super().streaming_memory(training), self.conversion_memory())

    def in_memory_need(self, training: bool) -> int:
        """The in-memory path's need, plus a second copy of the weights: transformers holds
        every dequantized tensor beside the model while it loads a GGUF (Qwen2.5-Coder-0.5B:
        2.5 GB of float32 weights, 4.6 GB at the load's peak)."""
        return super().in_memory_need(training) + self.weight_bytes


def peak_rss() -> int:
    """This process's peak resident memory in bytes (``VmHWM``; Linux).

    Not ``getrusage().ru_maxrss``: Linux carries the resident size of the process that forked a
    child into the child's ``ru_maxrss`` across exec, so a child of a large process reports the
    parent's size. Falls back to ``ru_maxrss`` where ``/proc`` is missing.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bound_heap_growth() -> None:
    """Serve every allocation of 256 KiB or more by mmap, returned to the system when freed.

    glibc otherwise raises its mmap threshold after each freed large block (up to 32 MiB), so the
    per-layer matrices of a streamed run come from a heap that fragments and grows with the
    number of layers (measured: +15 MB per layer of 4096 x 1024). The bound lies below the
    smallest matrix a layer reads (a key projection of 576 x 192 float32 is 432 KiB): at 1 MiB,
    reading every layer of a model with 512 x 512 attention matrices (exactly 1 MiB) twice left
    3.3 MB per layer in the heap, all of it free. Process-wide: the command line calls it for a
    run that streams; library code never does.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


# The exponent field of each IEEE float type safetensors names: all ones is NaN or Inf. F8_E4M3
# (float8_e4m3fn) has no Inf; its one NaN has every bit but the sign set.
_EXPONENT_MASKS = {"F64": (np.uint64, 0x7FF0000000000000), "F32": (np.uint32, 0x7F800000),
                   "F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80),
                   "F8_E5M2": (np.uint8, 0x7C), "F8_E4M3": (np.uint8, 0x7F)}


def _check_finite_bytes(name: str, dtype: str, data: bytes) -> None:
    """:func:`check_finite` on a tensor's raw little-endian bytes (a whole number of elements),
    for tensors copied without being decoded."""
    if dtype not in _EXPONENT_MASKS:
        return
    kind, mask = _EXPONENT_MASKS[dtype]
    bits = np.frombuffer(data, dtype=np.dtype(kind).newbyteorder("<"))
    if ((bits & kind(mask)) == kind(mask)).any():
        raise non_finite_error(name)


def _resolved(source: Any) -> tuple[str, str | None] | None:
    """``resolve_source(source)`` for a path or name, else (or where it fails) None."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    try:
        return resolve_source(source)
    except InputError:
        return None  # the load names what is wrong


def streamable(source: Any) -> StreamedCheckpoint | None:
    """A :class:`StreamedCheckpoint` when ``source`` is a local safetensors model folder (or a
    model alias, which names one)."""
    resolved = _resolved(source)
    if resolved is None or resolved[1] is not None:
        return None
    folder = Path(resolved[0]).expanduser()
    if not (folder / "config.json").is_file():
        return None
    if not ((folder / INDEX_NAME).exists() or (folder / SINGLE_NAME).exists()):
        return None
    return StreamedCheckpoint(folder)


def unused_budget(source: Any, readable: str = "") -> InputError:
    """The refusal of ``--max-memory`` for a model it cannot bound: one loaded whole (a Hub
    id, or a GGUF where the command does not convert it; ``readable`` adds what it bounds)."""
    hint = ("; to read a GGUF from disk, convert it first (prunenet convert) and give the "
            "folder" if local_gguf(source) is not None else "")
    return InputError(f"--max-memory has no effect here: it bounds local safetensors folders"
                      f"{readable} only, and {source} is loaded whole; drop it{hint}")


def local_gguf(source: Any) -> Path | None:
    """The GGUF file a local MODEL argument names (the file, or a folder holding one)."""
    resolved = _resolved(source)
    if resolved is None or resolved[1] is None:
        return None
    return Path(resolved[0]) / resolved[1]


def check_gguf_fits(source: str | os.PathLike) -> None:
    """Refuse a GGUF input to be loaded whole whose weights alone, dequantized to float32 as
    transformers loads a GGUF, exceed the memory available now (the load itself needs more:
    Qwen2.5-Coder-0.5B's 2.5 GB of weights peaked at 4.6 GB). Other sources pass."""
    folder, gguf_file = resolve_source(source)
    if gguf_file is None:
        return
    import psutil

    path = Path(folder) / gguf_file
    validate_gguf(path)  # a damaged file is refused as such first
    parameters = gguf_parameters(path)
    need, available = 4 * parameters, psutil.virtual_memory().available
    if need > available:
        raise InputError(
            f"{gguf_file} holds {parameters / 1e9:.2f}B parameters: {format_bytes(need)} once "
            f"dequantized to float32, as a GGUF is loaded, and {format_bytes(available)} of "
            "memory is available now. prunenet compress converts and reads it from disk as "
            f"it runs; for other commands convert it first (prunenet convert {path} --out DIR) "
            "and give DIR"
        )


def check_models_fit(sources: Sequence[str | os.PathLike], command: str,
                     float32: bool = False) -> None:
    """Refuse, before any load, models that ``command`` holds in memory together when their
    weights alone (as loaded, or in float32 with ``float32``; a GGUF always in float32: a lower
    bound of what the load takes) exceed the memory available now: such a command cannot read
    a model from disk as it runs. Each GGUF is first checked as :func:`check_gguf_fits` checks
    it; Hub ids pass."""
    sizes = []
    for source in sources:
        check_gguf_fits(source)
        folder, gguf_file = resolve_source(source)
        if gguf_file is not None:
            sizes.append((source, 4 * gguf_parameters(Path(folder) / gguf_file)))
        elif (checkpoint := streamable(folder)) is not None:
            sizes.append((source, checkpoint.float32_bytes if float32
                          else checkpoint.loaded_bytes))
    refuse_over_free_memory(sizes, command, "Use a machine with more memory; prunenet "
                            "compress and prunenet eval read a model this large from disk as it "
                            "runs (--max-memory)")


def refuse_over_free_memory(sizes: Sequence[tuple[Any, int]], command: str, instead: str
                            ) -> None:
    """Refuse ``command``, which holds the models ``sizes`` names ((what, bytes) each) in
    memory together, when they exceed the memory available now, naming each and ``instead``."""
    import psutil

    need, available = sum(size for _, size in sizes), psutil.virtual_memory().available
    if need > available:
        what = " and ".join(f"{source} ({format_bytes(size)})" for source, size in sizes)
        raise InputError(
            f"{command} holds {what} in memory, weights alone, and {format_bytes(available)} "
            f"of memory is available now. {instead}")


class MemoryBudget(int):
    """Bytes a run may use, remembering whether ``--max-memory`` gave them (arithmetic on it
    gives plain ints)."""

    given: bool

    def __new__(cls, count: int, given: bool) -> MemoryBudget:
        budget = super().__new__(cls, count)
        budget.given = given
        return budget


def memory_budget(max_memory: int | str | None) -> MemoryBudget:
    """Bytes a run may use: ``max_memory``, or by default half the RAM available now."""
    if max_memory is not None:
        return MemoryBudget(parse_memory(max_memory), given=True)
    import psutil

    return MemoryBudget(int(psutil.virtual_memory().available * DEFAULT_RAM_SHARE), given=False)


def describe_budget(budget: int) -> str:
    """``--max-memory BUDGET``, or where no --max-memory was given, the default's origin."""
    if getattr(budget, "given", True):
        return f"--max-memory {format_bytes(budget)}"
    return (f"the memory budget {format_bytes(budget)} (by default {DEFAULT_RAM_SHARE:.0%} of "
            "the RAM available now; --max-memory sets it)")


def refuse_below(budget: int, need: int, work: str, why: str, instead: str = "") -> None:
    """Refuse a ``budget`` below ``need``, in one shape: "--max-memory BUDGET is too
    small{work} needs at least NEED ({why}); give at least that{instead}" (the default budget
    named as such where --max-memory was not given)."""
    if need > budget:
        raise InputError(f"{describe_budget(budget)} is too small{work} needs at "
                         f"least {format_bytes(need)} ({why}); give at least that{instead}")


def exceeds(checkpoint: StreamedCheckpoint, budget: int, in_memory: int, minimum: int,
            work: str, why: str, instead: str = "") -> bool:
    """Whether work on ``checkpoint`` needing ``in_memory`` bytes with the model held must read
    it from disk to fit ``budget``; then a budget below ``minimum``, what the work needs that
    way, is refused (:func:`refuse_below`). A broken checkpoint is refused as such first,
    whatever the budget."""
    if in_memory <= budget:
        return False
    checkpoint.check_weights()
    refuse_below(budget, minimum, work, why, instead)
    return True


def choose_streaming(source: Any, max_memory: int | str | None, training: bool,
                     working: Callable[[StreamedCheckpoint], int] | None = None,
                     convert: bool = False) -> StreamedCheckpoint | None:
    """The checkpoint to stream, or None to work in memory.

    Streams when the in-memory path (training a policy or not, as ``training`` says, and
    ``working(checkpoint)`` bytes for running the model or scoring its output where given)
    would need more than ``max_memory`` (default: half the RAM available now). With
    ``convert``, a local GGUF file
    is judged the same way and, to stream, planned for conversion (:class:`PlannedConversion`:
    the caller converts it); without, a GGUF whose weights exceed the free memory is refused.
    Raises :class:`InputError` when even streaming would not fit ``max_memory``, naming the
    minimum.
    """
    if isinstance(source, StreamedCheckpoint):
        source.check_weights()
        return source  # the caller already chose to stream
    checkpoint = streamable(source)
    if checkpoint is None and convert and (gguf := local_gguf(source)) is not None:
        checkpoint = PlannedConversion(gguf)
    if checkpoint is None:
        if max_memory is not None and not isinstance(source, torch.nn.Module):
            raise unused_budget(source, " and GGUF files" if convert else "")
        if isinstance(source, (str, os.PathLike)):
            check_gguf_fits(source)
        return None
    budget = memory_budget(max_memory)
    # a run's working memory counts transformers' imports, which in_memory_need holds already
    need = checkpoint.in_memory_need(training) + (working(checkpoint) - MODEL_RUN_IMPORTS
                                                  if working else 0)
    why = (f"one layer's FFN matrices {checkpoint.d_ff} x {checkpoint.d_model}"
           + (" plus the policy" if training else "")
           + (", and converting it to safetensors one layer at a time first"
              if isinstance(checkpoint, PlannedConversion) else ""))
    if not exceeds(checkpoint, budget, need, checkpoint.streaming_memory(training),
                   f": streaming {checkpoint.folder}", why):
        return None
    log.info("streaming %s (in memory it would need about %s, budget %s)", checkpoint.folder,
             format_bytes(need), format_bytes(budget))
    return checkpoint


# --- writing ------------------------------------------------------------------------------


def _tensor_bytes(tensor: Tensor) -> memoryview:
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


class TensorSpill:
    """Tensors a streamed run computes (refitted second matrices and biases), kept on disk in
    ``folder`` until the streamed write copies them in place of the checkpoint's: one
    safetensors file each, so that none is held in memory meanwhile."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._files: dict[str, Path] = {}

    def put(self, name: str, tensor: Tensor) -> None:
        from safetensors.torch import save_file

        path = self.folder / f"{len(self._files)}.safetensors"
        save_file({"tensor": tensor.contiguous()}, str(path))
        self._files[name] = path

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str) -> Tensor:
        from safetensors.torch import load_file

        return load_file(str(self._files[name]))["tensor"]


def _replacement(spill: TensorSpill, name: str, entry: TensorEntry, shape: list[int]) -> Tensor:
    """The spilled tensor written for ``name``: the output's shape, the checkpoint's dtype."""
    tensor = spill.get(name)
    if list(tensor.shape) != shape or entry.dtype not in FLOAT_TYPES:
        raise ValueError(f"{name}: the replacement has shape {list(tensor.shape)}, the output "
                         f"needs {shape} ({entry.dtype})")
    tensor = tensor.to(FLOAT_TYPES[entry.dtype])
    check_finite(name, tensor)
    return tensor


def _write_shard(checkpoint: StreamedCheckpoint, shard: str, names: list[str],
                 kept_rows: Sequence[Tensor], target: Path,
                 replaced: TensorSpill | None = None) -> dict[str, int]:
    """Write one output shard tensor by tensor, the tensors in ``replaced`` (already cut to the
    kept neurons) in place of the checkpoint's; returns each tensor's byte size."""
    cuts = checkpoint.ffn_cuts()
    kept = int(kept_rows[0].numel())
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    sizes, offset = {}, 0
    for name in names:
        entry = checkpoint.entries[name]
        shape = list(entry.shape)
        size = entry.end - entry.start
        if name in cuts:
            cut = cuts[name][1]
            size = size // shape[cut.axis] * kept * cut.blocks
            shape[cut.axis] = kept * cut.blocks
        header[name] = {"dtype": entry.dtype, "shape": shape,
                        "data_offsets": [offset, offset + size]}
        sizes[name] = size
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data to 8 bytes
    with open(checkpoint.folder / shard, "rb") as source, open(target, "wb") as sink:
        sink.write(len(encoded).to_bytes(8, "little"))
        sink.write(encoded)
        for name in names:
            entry = checkpoint.entries[name]
            if replaced is not None and name in replaced:
                sink.write(_tensor_bytes(_replacement(replaced, name, entry,
                                                      header[name]["shape"])))
                continue
            if name in cuts:
                index, cut = cuts[name]
                tensor = checkpoint.tensor(name)
                check_finite(name, tensor)
                sliced = slice_tensor(tensor, cut, kept_rows[index], checkpoint.d_ff)
                del tensor
                sink.write(_tensor_bytes(sliced))
                del sliced
                continue
            source.seek(entry.start)  # untouched tensors are copied byte for byte
            remaining = entry.end - entry.start
            while remaining:
                chunk = source.read(min(_COPY_CHUNK, remaining))
                if not chunk:
                    raise InputError(f"{checkpoint.folder / shard} ended while copying {name}")
                _check_finite_bytes(name, entry.dtype, chunk)
                sink.write(chunk)
                remaining -= len(chunk)
    return sizes


# Files a model folder's loaders read besides its weights and config.json, by the start and
# the end of the name: the tokenizer's, the generation settings, a chat template. What an
# output written from memory gets from save_pretrained.
_LOADER_PREFIXES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens",
                    "chat_template", "generation_config", "spiece", "sentencepiece")
_LOADER_SUFFIXES = (".jinja", ".tiktoken")


def _model_code(config: dict[str, Any]) -> set[str]:
    """The Python files of a trust_remote_code model that its config's ``auto_map`` names
    ("modeling_x.XForCausalLM" is read from modeling_x.py; "owner/repo--..." from the Hub)."""
    names = set()
    for value in (config.get("auto_map") or {}).values():
        for reference in value if isinstance(value, list) else [value]:
            if isinstance(reference, str) and "--" not in reference and "." in reference:
                names.add(reference.rsplit(".", 1)[0] + ".py")
    return names


def _copy_side_files(source: Path, target: Path, config: dict[str, Any]) -> None:
    """The files of ``source`` its loaders read beside the weights and config (tokenizer,
    generation config, chat template, the model code ``config`` names); a user's other files
    stay where they are, as in an output written from memory."""
    code = _model_code(config)
    for path in sorted(source.iterdir()):
        if path.is_file() and (path.name.startswith(_LOADER_PREFIXES)
                               or path.name.endswith(_LOADER_SUFFIXES) or path.name in code):
            shutil.copy2(path, target / path.name)


def check_disk_space(out: Path, needed: int) -> None:
    """Refuse an output ``out`` of about ``needed`` bytes that its disk cannot hold, before
    anything is written (:class:`OutputError`); folders missing above ``out`` are not made
    (the write makes them): the disk is the one of the nearest folder that exists."""
    existing = next(folder for folder in out.parents if folder.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise OutputError(f"not enough disk space for {out}: about {format_bytes(needed)} "
                          f"needed, {format_bytes(free)} free")


def write_streamed(checkpoint: StreamedCheckpoint, kept_rows: Sequence[Tensor], out: Path,
                   record: dict[str, Any], overwrite: bool = False,
                   progress: bool = True, replaced: TensorSpill | None = None,
                   measure: Callable[[Path], dict[str, Any]] | None = None,
                   source: str | os.PathLike | None = None) -> Path:
    """Write the pruned checkpoint to ``out`` atomically: shards, index, config, side files,
    then ``prunenet.json`` last; the tensors in ``replaced`` (cut to the kept neurons) are
    written instead of the checkpoint's. ``measure`` is called with the staged folder once it
    holds a loadable checkpoint, and what it returns joins ``record`` before the card and the
    record are written. ``source``: what the model card names as the input (default: the
    checkpoint's folder; a GGUF the checkpoint was converted from). A full disk, or a failed
    ``measure``, leaves nothing behind (:class:`OutputError` for the disk)."""
    if len(kept_rows) != checkpoint.num_layers:
        raise ValueError(f"got {len(kept_rows)} index sets for {checkpoint.num_layers} layers")
    kept = int(kept_rows[0].numel())
    if any(int(rows.numel()) != kept for rows in kept_rows):
        raise ValueError("every layer must keep the same number of neurons")
    by_shard: dict[str, list[str]] = {}
    for name, entry in sorted(checkpoint.entries.items(), key=lambda item: item[1].start):
        # the loaded model, and its save, hold a tied matrix once and an ignored tensor not at all
        if name not in checkpoint.tied_copies | checkpoint.ignored:
            by_shard.setdefault(entry.shard, []).append(name)
    check_disk_space(out, checkpoint.weight_bytes)
    earlier = out.is_dir() and any(out.iterdir())  # an output --overwrite replaces, if it can
    writing = "the output folder"  # what the disk filled up writing
    try:
        with atomic_folder(out, overwrite, ours=is_model_output) as staging:
            weight_map, total = {}, 0
            for shard in tqdm(sorted(by_shard), desc="writing shards", disable=not progress):
                writing = shard
                sizes = _write_shard(checkpoint, shard, by_shard[shard], kept_rows,
                                     staging / shard, replaced)
                weight_map.update({name: shard for name in sizes})
                total += sum(sizes.values())
            writing = INDEX_NAME
            if checkpoint.sharded:
                write_json_atomic(staging / INDEX_NAME, {"metadata": {"total_size": total},
                                                         "weight_map": weight_map})
            config = dict(checkpoint.config)
            for field in checkpoint.family.width_fields:
                config[field] = kept
            stored = checkpoint.stored_float_type
            if stored is not None:  # as a save from memory declares it, whatever the source's says
                config.pop("torch_dtype", None)
                config["dtype"] = str(stored).removeprefix("torch.")
            writing = "config.json"
            write_json_atomic(staging / "config.json", config)
            writing = "the tokenizer's files"
            _copy_side_files(checkpoint.folder, staging, config)
            copy_terms(checkpoint.folder if source is None else source, staging)
            if measure is not None:
                writing = "model.gguf"  # what the work writes (--eval: nothing)
                record.update(measure(staging))
            writing = "README.md"  # replaces the input's own card
            write_card(staging, record, checkpoint.folder if source is None else source)
            writing = RECORD_NAME
            write_json_atomic(staging / RECORD_NAME, record)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = (f"the earlier output at {out} is kept as it was" if earlier
                    else f"nothing was left at {out}")
            raise OutputError(f"the disk filled up while writing {writing}; {kept}. "
                              "Free space or choose another --out") from error
        raise
    return out
