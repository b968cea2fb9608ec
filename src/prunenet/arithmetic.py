"""The arithmetic a training run computes in: float32, or bfloat16 autocast over float32 weights
where the hardware computes bfloat16 natively. Recovery (:mod:`prunenet.finetune`) and the
teacher of self-distillation (:mod:`prunenet.distillation`) read it from here."""

from __future__ import annotations

import torch

PRECISIONS = ("float32", "bfloat16")


def default_precision(device: str) -> str:
    """"bfloat16" where ``device`` ("auto", "cpu", "cuda"...) computes it natively (a CUDA GPU
    with bfloat16 support; a CPU with AVX512-BF16 or AMX), otherwise "float32"."""
    if device != "cpu" and torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    native = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported",
                                                          "_is_amx_tile_supported")]
    return "bfloat16" if any(check is not None and check() for check in native) else "float32"


def autocast(device: torch.device | str, precision: str) -> torch.autocast:
    """The autocast context of ``precision`` on ``device`` (disabled for float32)."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bfloat16")
