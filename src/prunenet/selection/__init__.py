"""Selection methods, one module each, behind :class:`~prunenet.selection.base.Selector`.

The registry below is the single list of methods: the command line's choices, ``compare``,
streaming support and the docs all read it. Adding a method is one module and one line here.
"""

from __future__ import annotations

from ..errors import InputError
from .activation import Activation
from .base import Selector, Source
from .magnitude import Magnitude, MagnitudeProduct
from .prunenet import PruneNet
from .random import Random
from .self_generated import SelfGenerated

SELECTORS: dict[str, type[Selector]] = {
    SelfGenerated.name: SelfGenerated,
    PruneNet.name: PruneNet,
    Random.name: Random,
    Magnitude.name: Magnitude,
    MagnitudeProduct.name: MagnitudeProduct,
    Activation.name: Activation,
}
DEFAULT_METHOD = SelfGenerated.name


def selector_class(method: str) -> type[Selector]:
    """The registered class of ``method``; :class:`InputError` naming the known ones."""
    try:
        return SELECTORS[method]
    except KeyError:
        raise InputError(f"unknown method {method!r}; known: {', '.join(SELECTORS)}") from None


__all__ = ["DEFAULT_METHOD", "SELECTORS", "Selector", "Source", "selector_class"]
