"""Console output that never stops the work: the lines and progress bars dinokit prints to stderr go nowhere,
without an error, when stderr is closed (``2>&-``), gone (a ``| head`` or ``| tee`` that ended, a dropped ssh
session: ``BrokenPipeError``) or not a terminal (progress bars off). Losing the console must not end a run."""

from __future__ import annotations

import sys

__all__ = ["eprint", "stderr_is_tty"]


def stderr_is_tty() -> bool:
    """Whether stderr is an open terminal (progress bars are drawn only then)."""
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (OSError, ValueError):  # closed
        return False


def eprint(*args, **kwargs) -> None:
    """``print(..., file=sys.stderr, flush=True)``, or nothing when stderr cannot take it."""
    if sys.stderr is None:
        return
    try:
        print(*args, file=sys.stderr, flush=True, **kwargs)
    except (OSError, ValueError):  # BrokenPipeError, a closed file
        pass
