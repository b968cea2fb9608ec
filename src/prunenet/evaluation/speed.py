"""Measured generation speed: prefill and decode tokens per second on the model's device.

Protocol: a fixed random prompt of ``prompt_tokens`` tokens per sequence (seeded), ``batch_size``
sequences. Prefill = one forward pass over the whole prompt building the KV cache; decode =
``new_tokens`` greedy single-token steps on that cache. Each is timed ``repeats`` times after
``warmup`` untimed runs, and the median is reported (tokens/s counts every sequence of the batch).
"""

from __future__ import annotations

import inspect
import logging
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from ..arithmetic import check_seed
from ..errors import InputError
from ..families import context_length

log = logging.getLogger(__name__)
DEFAULT_PROMPT_TOKENS = 128
DEFAULT_NEW_TOKENS = 32


@dataclass(frozen=True)
class SpeedProtocol:
    """What one speed measurement runs; stored with its numbers."""

    batch_size: int = 1
    prompt_tokens: int | None = None  # None: DEFAULT_PROMPT_TOKENS, cut to fit the model
    new_tokens: int | None = None  # None: DEFAULT_NEW_TOKENS, cut to fit the model
    repeats: int = 5
    warmup: int = 1
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`InputError` for a field that is not an integer in its range (True is
        not a count: it had run and been recorded as given)."""
        for name, value in asdict(self).items():
            if name in ("prompt_tokens", "new_tokens") and value is None:
                continue
            whole = isinstance(value, int) and not isinstance(value, bool)
            if name == "seed":
                check_seed(value, "speed seed")
            elif name == "warmup":
                if not whole or value < 0:
                    raise InputError(f"speed warmup must be 0 or a positive integer, got {value!r}")
            elif not whole or value < 1:
                raise InputError(f"speed {name} must be a positive integer, got {value!r}")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_argument(model: nn.Module) -> str:
    """The forward keyword of the KV cache: ``cache`` (transformers >= 5.2x) or the older name."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _last_logits_only(model: nn.Module) -> dict[str, int]:
    """The forward keyword that computes logits at the last position only, as ``generate``'s
    prefill does (``logits_to_keep``, or its older name); empty where the model takes none."""
    parameters = inspect.signature(model.forward).parameters
    name = next((name for name in ("logits_to_keep", "num_logits_to_keep")
                 if name in parameters), None)
    return {name: 1} if name is not None else {}


@torch.no_grad()
def _one_run(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Seconds for the prefill (next-token logits at the prompt's last position only) and for
    ``new_tokens`` decode steps."""
    device = prompt.device
    cache_argument = _cache_argument(model)
    _synchronize(device)
    start = time.perf_counter()
    output = model(input_ids=prompt, use_cache=True, **_last_logits_only(model))
    _synchronize(device)
    prefill = time.perf_counter() - start
    cache = getattr(output, cache_argument)
    next_tokens = output.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        output = model(input_ids=next_tokens, use_cache=True, **{cache_argument: cache})
        cache = getattr(output, cache_argument)
        next_tokens = output.logits[:, -1:].argmax(-1)
    _synchronize(device)
    return prefill, time.perf_counter() - start


def fitted_protocol(config: Any, protocol: SpeedProtocol, quiet: bool = False
                    ) -> SpeedProtocol:
    """``protocol`` for the model ``config`` describes: the default prompt and generation
    lengths (those left None) shortened to fit its context, said in the log unless ``quiet``.
    Raises :class:`InputError` for lengths the user gave that exceed the context."""
    protocol.validate()
    context = context_length(config)
    prompt, new = protocol.prompt_tokens, protocol.new_tokens
    if context is not None:  # lengths given: kept, or refused naming what was given
        for option, value in (("--speed-prompt", prompt), ("--speed-new-tokens", new)):
            if value is not None and value >= context:
                raise InputError(f"{option} {value} leaves no room in the model's context of "
                                 f"{context} tokens; give at most {context - 1}")
        if prompt is not None and new is not None and prompt + new > context:
            raise InputError(f"--speed-prompt {prompt} + --speed-new-tokens {new} exceed the "
                             f"model's context of {context} tokens")
    fitted_prompt, fitted_new = prompt or DEFAULT_PROMPT_TOKENS, new or DEFAULT_NEW_TOKENS
    if context is not None and fitted_prompt + fitted_new > context:
        if new is None:  # a quarter of the context, or what a given prompt leaves
            fitted_new = max(1, min(fitted_new, context // 4 if prompt is None
                                    else context - prompt))
        if prompt is None:
            fitted_prompt = context - fitted_new
        if not quiet:
            log.warning("speed: a prompt of %d tokens and %d new tokens, to fit the "
                        "model's context of %d", fitted_prompt, fitted_new, context)
    return replace(protocol, prompt_tokens=fitted_prompt, new_tokens=fitted_new)


def speed_memory(model: nn.Module, protocol: SpeedProtocol) -> int:
    """Bytes a measurement under ``protocol`` (fitted) needs beside the model, at its peak: the
    prompt, the KV cache of every layer for the prompt and the new tokens, one layer's
    activations over the prompt (its FFN's hidden states, a few residual-width tensors, eager
    attention's scores), and the next-token logits in float32."""
    from ..model_view import FFNView

    config = model.config
    width = next(model.parameters()).element_size()
    batch, prompt = protocol.batch_size, protocol.prompt_tokens
    tokens = prompt + protocol.new_tokens
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_width = getattr(config, "head_dim", None) or hidden // heads
    kv_width = 2 * (getattr(config, "num_key_value_heads", None) or heads) * head_width
    cache = batch * tokens * config.num_hidden_layers * kv_width * width
    layer = batch * prompt * (3 * FFNView(model).d_ff + 6 * hidden + heads * prompt) * width
    logits = 2 * batch * config.vocab_size * 4
    return 8 * batch * prompt + cache + layer + logits


def check_speed_memory(model: nn.Module, protocol: SpeedProtocol) -> None:
    """Refuse a ``protocol`` (fitted) whose :func:`speed_memory` exceeds the memory free on the
    model's device now, before anything is allocated: a batch that does not fit would fill the
    memory until the system stops the process, not fail at once."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        available = psutil.virtual_memory().available
    need = speed_memory(model, protocol)
    if need > available:
        from ..io.streaming import format_bytes

        raise InputError(f"speed: a batch of {protocol.batch_size} x {protocol.prompt_tokens} "
                         f"tokens does not fit in memory: it needs about {format_bytes(need)} "
                         f"(KV cache, activations, logits) and {format_bytes(available)} is "
                         f"free on {device.type}; lower --speed-batch or --speed-prompt")


def measure_speed(model: nn.Module, protocol: SpeedProtocol | None = None) -> dict[str, Any]:
    """Median prefill and decode throughput of ``model`` under ``protocol``.

    Returns the protocol's fields plus ``device``, ``threads``, ``prefill_tokens_per_s`` and
    ``decode_tokens_per_s``. Raises :class:`InputError` for a protocol that does not fit the
    model (a prompt plus generation longer than its context window).
    """
    protocol = fitted_protocol(model.config, protocol or SpeedProtocol())
    check_speed_memory(model, protocol)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(protocol.seed)
    shape = (protocol.batch_size, protocol.prompt_tokens)
    prompt = torch.randint(0, model.config.vocab_size, shape, generator=generator).to(device)
    try:
        for _ in range(protocol.warmup):
            _one_run(model, prompt, protocol.new_tokens)
        runs = [_one_run(model, prompt, protocol.new_tokens) for _ in range(protocol.repeats)]
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if "memory" not in str(error).lower():
            raise
        raise InputError(f"speed: a batch of {protocol.batch_size} x {protocol.prompt_tokens} "
                         "tokens does not fit in memory; lower --speed-batch or --speed-prompt"
                         ) from None
    prefill = statistics.median(run[0] for run in runs)
    decode = statistics.median(run[1] for run in runs)
    return {
        **asdict(protocol),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "prefill_tokens_per_s": protocol.batch_size * protocol.prompt_tokens / prefill,
        "decode_tokens_per_s": protocol.batch_size * protocol.new_tokens / decode,
    }
