"""How every benchmark script runs its ``main``: an error prunenet raises on purpose (a model
or asset not fetched, a path that does not exist) ends the script with the one line the
command line prints, not a traceback from deep inside the library."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from prunenet.errors import PruneNetError


def run_script(main: Callable[[], int | None]) -> None:
    """Call ``main`` and exit with its status; a :class:`PruneNetError` exits with status 1 and
    ``SCRIPT: error: MESSAGE`` on stderr."""
    try:
        status = main()
    except PruneNetError as error:
        raise SystemExit(f"{Path(sys.argv[0]).name}: error: {error}") from None
    raise SystemExit(status)
