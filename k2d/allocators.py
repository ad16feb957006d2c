"""The process's allocators: the pool Arrow allocates from, glibc's malloc arenas, giving
freed pages back to the OS, and what the cycle collector walks. Nothing here imports pyarrow
at import time: the pool must be chosen before pyarrow is first imported (see
default_arrow_pool)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
from collections.abc import Callable, MutableMapping
from typing import cast

__all__ = [
    "ARROW_POOL",
    "ARROW_POOL_VAR",
    "MALLOC_ARENAS",
    "default_arrow_pool",
    "freeze_start_up_objects",
    "give_back_memory",
    "limit_malloc_arenas",
    "use_arrow_pool",
]

# Arrow's memory pool for k2d's processes, unless ARROW_DEFAULT_MEMORY_POOL names one.
# Measured with benchmarks/memory.py (3 symbols, 3,000 trades/s plus quotes, the Maintainer
# on): Arrow's default, mimalloc, held 90-100 MB more than the system allocator or jemalloc
# (whose pages go back after 1 s, the decay Arrow sets), and peaked 100 MB higher in the
# Maintainer's rounds. Those runs set the pool with pa.set_memory_pool, which left Arrow's
# C++ on mimalloc; with the whole of Arrow on the pool (8 minutes, side by side), system
# peaked at 379 MB and jemalloc at 388 MB. See README "Memory".
ARROW_POOL = "system"
ARROW_POOL_VAR = "ARROW_DEFAULT_MEMORY_POOL"

# glibc's malloc arenas for the daemon, unless MALLOC_ARENA_MAX is set (its default is 8 per
# core: each thread that allocates, of the many pyiceberg, DuckDB and anyio run, may take
# its own). Measured with benchmarks/memory.py (3 symbols, 8 minutes, two runs side by side):
# 2 arenas peaked at 432 MB against 476 MB and held about 20 MB less between the
# Maintainer's rounds, at the same CPU.
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt's parameter, from glibc's malloc.h
# glibc's mmap threshold is left as glibc has it. Fixed at 1 MiB (mallopt M_MMAP_THRESHOLD),
# the heap held 100-270 MB less free between writer flushes in benchmarks/ingest.py, whose
# peak RSS went from 494-558 to 478-527 MB; but trades/s fell 10-20% there and 18% in
# benchmarks/peers.py's capture rows (each large buffer's pages faulted in afresh), and the
# running daemon of benchmarks/memory.py peaked the same (3 symbols 403 against 399 MB, 20
# symbols 665 against 657). Measured 2026-12-01, alternating with the code without it.


def default_arrow_pool(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Make ARROW_POOL the pool of all of Arrow, unless the environment names one; True when
    pyarrow is not loaded yet, so that the variable (k2d's or the environment's) will rule
    all of Arrow. Arrow's C++ (the Parquet reader and writer, compute kernels, IPC) reads
    ARROW_DEFAULT_MEMORY_POOL once, when pyarrow is imported; pa.set_memory_pool after that
    moves only the allocations of pyarrow's own Python calls, about a third of them."""
    if "pyarrow" in sys.modules:
        return False
    environ.setdefault(ARROW_POOL_VAR, ARROW_POOL)
    return True


def use_arrow_pool(environ: MutableMapping[str, str] = os.environ) -> str:
    """The pool Arrow allocates from; when pyarrow was imported before k2d chose one (a
    process that imported pyarrow first), at least pyarrow's Python calls move to ARROW_POOL."""
    import pyarrow as pa

    pools: dict[str, Callable[[], pa.MemoryPool]] = {
        "system": pa.system_memory_pool,
        "jemalloc": pa.jemalloc_memory_pool,
        "mimalloc": pa.mimalloc_memory_pool,
    }
    if not environ.get(ARROW_POOL_VAR):
        pa.set_memory_pool(pools[ARROW_POOL]())
    name: str = pa.default_memory_pool().backend_name
    return name


def _libc(name: str) -> Callable[..., int] | None:
    libc = ctypes.util.find_library("c")
    fn = getattr(ctypes.CDLL(libc), name, None) if libc else None
    return cast("Callable[..., int] | None", fn)


def limit_malloc_arenas(environ: MutableMapping[str, str] = os.environ) -> int | None:
    """Cap glibc's malloc arenas at MALLOC_ARENAS unless the environment set a cap (glibc
    read it at start); returns the cap set, or None when none was (set by the environment,
    or a libc without mallopt)."""
    if environ.get("MALLOC_ARENA_MAX"):
        return None
    mallopt = _libc("mallopt")
    if mallopt is None or mallopt(_M_ARENA_MAX, MALLOC_ARENAS) != 1:
        return None
    return MALLOC_ARENAS


_MALLOC_TRIM = _libc("malloc_trim")


def give_back_memory() -> None:
    """Return the pages a rewrite freed to the OS. Arrow's pool and glibc's heap keep freed
    memory for reuse, so without this a daemon stays at its compaction peak for good."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    if _MALLOC_TRIM is not None:  # glibc only
        _MALLOC_TRIM(0)


def freeze_start_up_objects() -> None:
    """Take every object alive after start-up (modules, classes, the config, the app) out of
    the cycle collector's sight: they live as long as the process, and each full collection
    walked all of them, pausing the event loop up to 120 ms every 15 s or so in the demo.
    Garbage made so far is collected first, so none of it is kept for good; frozen objects
    are still freed when nothing refers to them."""
    gc.collect()
    gc.freeze()
