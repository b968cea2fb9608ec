"""One error hierarchy. Every message says what is wrong and what to do about it.

The CLI prints ``PruneNetError`` messages without a traceback and exits with status 2.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def first_line(error: BaseException) -> str:
    """The first line of a library error's message (its type's name when it has none), with
    the line after it where the first only announces it (ends in a colon)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def refuse_repeats(option: str, values: Sequence[str]) -> None:
    """Refuse a list option naming one value twice: each names one piece of work, run once, so
    a repeat is a typo."""
    repeated = [value for value, count in Counter(values).items() if count > 1]
    if repeated:
        raise InputError(f"{option} names {', '.join(repeated)} more than once; give each once")


class PruneNetError(Exception):
    """Base class of every error prunenet raises on purpose."""


class InputError(PruneNetError, ValueError):
    """A user-supplied argument or file is invalid (bad ratio, missing path, wrong shape...)."""


class UnsupportedModelError(InputError):
    """The model's architecture (config.model_type) has no family entry."""


class PolicyMismatchError(InputError):
    """A saved policy does not fit the model it is applied to."""


class OutputError(PruneNetError, OSError):
    """The output location cannot be written or would clobber something it must not."""


class MissingAssetError(PruneNetError, FileNotFoundError):
    """A model or data file expected in the cache has not been fetched yet."""


class NumericalError(PruneNetError, ArithmeticError):
    """Non-finite values in weights or in the policy that cannot be recovered from."""
