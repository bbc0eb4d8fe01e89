"""The one way the core compiles its per-ping loops: numba, cached on disk.

The rules walk a batch ping by ping, because each ping's meaning depends on the one before it.
Interpreted, over objects, that walk cost about 4 µs a ping; compiled, over arrays, about
0.3 µs. `NUMBA_DISABLE_JIT=1` runs the very same functions as plain Python (slow, but
every line visible to a debugger and to coverage).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba

F = TypeVar("F", bound=Callable[..., Any])


def compiled(fn: F) -> F:
    """Compile `fn` in nopython mode, on its first call. The machine code is cached beside the
    module (or in NUMBA_CACHE_DIR), so only the first process after a change pays for it:
    11–12 s for the whole core on this project's machine, against 0.3–0.9 s to load it (see
    `warmup.py`). Where nothing is writable (a read-only root filesystem and no cache
    directory mounted) each process compiles for itself instead of failing."""
    try:
        return cast(F, numba.njit(cache=True, nogil=True)(fn))
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return cast(F, numba.njit(nogil=True)(fn))


def inlined(fn: F) -> F:
    """`compiled`, and copied into each compiled caller rather than called. For small helpers
    that take arrays: a call passes each array with its reference count raised and lowered
    again, atomically, which for a few lines of work costs more than the work."""
    return cast(F, numba.njit(nogil=True, inline="always")(fn))
