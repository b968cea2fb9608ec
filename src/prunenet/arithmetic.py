"""The arithmetic a training run computes in: float32, or bfloat16 autocast over float32 weights
where the hardware computes bfloat16 natively. Recovery (:mod:`prunenet.finetune`) and the
teacher of self-distillation (:mod:`prunenet.distillation`) read it from here; and the devices
whose random state a seeded block restores (:func:`cuda_devices`), and that block
(:func:`global_generators_kept`); the seeds every run's generators take (:func:`check_seed`)."""

from __future__ import annotations

import contextlib
import math
import numbers
import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy
import torch

from .errors import InputError

PRECISIONS = ("float32", "bfloat16")


def check_seed(seed: object, what: str = "seed") -> int:
    """``seed`` as an int; :class:`InputError` unless it is an integer in [0, 2**63), the
    seeds torch's generators take and ``--seed`` reads: a fraction, a string or a negative
    number would run as another seed (``int`` of it, or its two's complement) than the record
    and the card's command name. ``what`` names it in the message."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) \
            or not 0 <= seed < 2**63:
        raise InputError(f"{what} must be an integer in [0, 2**63), got {seed!r}")
    return int(seed)


def cuda_devices() -> list[int]:
    """Every CUDA device's index (none without CUDA): what ``torch.random.fork_rng`` must
    restore around ``torch.manual_seed`` or a library that seeds, since those seed every CUDA
    device wherever the model is."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


@contextlib.contextmanager
def global_generators_kept() -> Iterator[None]:
    """Python's, numpy's and torch's global generators (CPU and every CUDA device) as they were
    before the block: libraries that seed them (lm-eval, the transformers Trainer) must not
    make the caller's later draws repeat."""
    python_state, numpy_state = random.getstate(), numpy.random.get_state()
    with torch.random.fork_rng(devices=cuda_devices()):
        try:
            yield
        finally:
            random.setstate(python_state)
            numpy.random.set_state(numpy_state)


def default_precision(device: str) -> str:
    """"bfloat16" where ``device`` ("auto", "cpu", "cuda"...) computes it natively (a CUDA GPU
    with bfloat16 support; a CPU with AVX512-BF16 or AMX), otherwise "float32"."""
    if device != "cpu" and torch.cuda.is_available():  # emulation (V100, T4) is not native
        return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float32"
    native = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported",
                                                          "_is_amx_tile_supported")]
    return "bfloat16" if any(check is not None and check() for check in native) else "float32"


def autocast(device: torch.device | str, precision: str) -> torch.autocast:
    """The autocast context of ``precision`` on ``device`` (disabled for float32)."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bfloat16")


def accelerator_available() -> bool:
    """Whether torch sees an accelerator (CUDA, MPS, XPU...) that a Trainer would train on."""
    return bool(getattr(torch, "accelerator", None) and torch.accelerator.is_available())


def check_precision(device: str, precision: str) -> None:
    """Refuse bfloat16 on a CUDA GPU that cannot compute it at all (:class:`InputError`, before
    any work), where the Trainer would refuse it only after the teacher's text is sampled."""
    if (precision == "bfloat16" and device != "cpu" and torch.cuda.is_available()
            and not torch.cuda.is_bf16_supported()):
        raise InputError(f"this GPU ({torch.cuda.get_device_name()}) cannot compute bfloat16; "
                         "use --precision float32")


def exp_or_inf(loss: float) -> float:
    """``exp(loss)``, a perplexity, or Inf where it exceeds the largest float (a diverged
    fine-tune, which is then refused as one) instead of an OverflowError."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def hash_tensors(digest: Any, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Add named tensors to a hashlib ``digest``: each one's name, dtype and shape, then its
    bytes, so that two sets of the same shapes (a model pruned by two methods) hash apart."""
    for name, tensor in tensors:
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(memoryview(tensor.detach().cpu().contiguous().view(-1)
                                 .view(torch.uint8).numpy()))
