"""Policy files: a trained PruneNet policy as safetensors, its metadata and checksum in the
header. Pickles are never read; a file whose checksum is missing or wrong is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import InputError, NumericalError, OutputError, PolicyMismatchError
from ..selection.prunenet.policy import PrunePolicy, policy_checksum
from .files import atomic_file

POLICY_FORMAT = "prunenet-policy/1"
POLICY_HEADER_KEY = "prunenet"


def save_policy(policy: PrunePolicy, path: str | os.PathLike, metadata: dict[str, Any],
                overwrite: bool = False) -> Path:
    """Save a policy as safetensors; ``metadata`` (JSON-able) goes into the header. Atomic; an
    existing file is replaced only with ``overwrite`` and only if it is a policy file. A
    symlink is written through: the file it names is the output (as the output checks judged
    it), and the link stays. A policy holding NaN or Inf is refused (:class:`NumericalError`),
    as loading it would be."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        raise OutputError(
            f"policy output {path} is a folder; give a file name (e.g. policy.safetensors)"
        )
    # One header key: safetensors writes several in a random order, breaking byte-identity.
    header = {POLICY_HEADER_KEY: json.dumps({
        "format": POLICY_FORMAT,
        "d_model": policy.d_model,
        "d_ff": policy.d_ff,
        "checksum": policy_checksum(policy),
        "metadata": metadata,
    }, sort_keys=True)}
    tensors = {
        name: tensor.detach().cpu().contiguous() for name, tensor in policy.state_dict().items()
    }
    for name, tensor in tensors.items():  # a file load_policy would refuse is never written
        if not torch.isfinite(tensor).all():
            raise NumericalError(f"the policy's {name} holds NaN or Inf; {path} was not "
                                 "written. Train it again with a lower --lr")
    with atomic_file(path, overwrite=overwrite, ours=is_policy_file) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def is_policy_file(path: Path) -> bool:
    """Whether ``path`` is a policy file prunenet wrote (safetensors with its header)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = json.loads((handle.metadata() or {})[POLICY_HEADER_KEY])
    except (SafetensorError, OSError, KeyError, ValueError, TypeError):
        return False
    return isinstance(header, dict) and header.get("format") == POLICY_FORMAT


def check_policy_name(path: str | os.PathLike, option: str) -> None:
    """Refuse a policy file name that does not say what it holds: a policy is a safetensors
    file (a name such as ``policy.pt`` promises a pickle, which prunenet never writes)."""
    if not str(path).lower().endswith(".safetensors"):
        raise InputError(f"{option} {path}: a policy is written as safetensors; give a name "
                         "ending in .safetensors")


def load_policy(path: str | os.PathLike) -> tuple[PrunePolicy, dict[str, Any]]:
    """Load a policy saved by :func:`save_policy`; returns ``(policy, metadata)``.

    Raises :class:`InputError` for a missing, corrupted or non-safetensors file (pickles are never
    loaded) and :class:`PolicyMismatchError` when its tensors do not match its declared shapes.
    """
    from safetensors import safe_open

    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"policy file {path} is a folder; give the .safetensors file "
                         "`prunenet train-policy` wrote")
    if not path.is_file():
        raise InputError(f"policy file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise InputError(
            f"{path} is not a readable safetensors policy file ({error}); "
            "policies are saved by `prunenet train-policy`"
        ) from error
    try:
        header = json.loads(header[POLICY_HEADER_KEY])
        is_policy = header.get("format") == POLICY_FORMAT
    except (KeyError, ValueError, AttributeError):
        is_policy = False
    if not is_policy:
        raise InputError(f"{path} is a safetensors file but not a prunenet policy (no format tag)")
    try:
        d_model, d_ff = int(header["d_model"]), int(header["d_ff"])
        metadata = dict(header.get("metadata", {}))
    except (KeyError, ValueError, TypeError) as error:
        raise InputError(f"{path}: damaged policy header ({error})") from error
    expected = {"projection": (d_ff, d_model), "bias": (d_ff,), "row_weights": (d_ff,)}
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    if shapes != expected:
        raise PolicyMismatchError(f"{path}: tensors {shapes} do not match the header {expected}")
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise InputError(f"{path}: policy tensor {name} holds NaN or Inf")
    policy = PrunePolicy.from_tensors(tensors)
    checksum = header.get("checksum")
    if not checksum:
        raise InputError(f"{path}: the policy header has no checksum, so its values cannot be "
                         "trusted; save policies with `prunenet train-policy`")
    if checksum != policy_checksum(policy):
        raise InputError(f"{path}: checksum mismatch; the policy file is corrupted")
    return policy, metadata
