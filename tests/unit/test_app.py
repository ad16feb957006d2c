"""The daemon's process set-up: the Arrow memory pool it allocates from, malloc's arenas."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pyarrow as pa
import pytest

from k2d.app import ARROW_POOL, MALLOC_ARENAS, limit_malloc_arenas, use_arrow_pool


@pytest.fixture
def restore_pool() -> Iterator[None]:
    pool = pa.default_memory_pool()
    yield
    pa.set_memory_pool(pool)


@pytest.mark.usefixtures("restore_pool")
def test_the_daemon_allocates_from_its_own_pool_unless_the_environment_names_one() -> None:
    pa.set_memory_pool(pa.mimalloc_memory_pool())

    assert use_arrow_pool({}) == ARROW_POOL
    assert pa.default_memory_pool().backend_name == ARROW_POOL
    assert pa.array(["allocated", "from", "it"]).nbytes > 0

    pa.set_memory_pool(pa.mimalloc_memory_pool())
    assert use_arrow_pool({"ARROW_DEFAULT_MEMORY_POOL": "mimalloc"}) == "mimalloc"


# Eight threads allocate at once; glibc's malloc_info then lists one <heap> per arena.
_ARENAS = """
import ctypes, ctypes.util, sys, tempfile, threading
if sys.argv[1] == "capped":
    from k2d.app import limit_malloc_arenas
    limit_malloc_arenas({})
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.fopen.restype = ctypes.c_void_p
started, done = threading.Barrier(8), threading.Barrier(9)
def allocate():
    started.wait()
    for p in [libc.malloc(4096) for _ in range(1000)]:
        libc.free(p)
    done.wait()
threads = [threading.Thread(target=allocate) for _ in range(8)]
for t in threads:
    t.start()
done.wait()
with tempfile.NamedTemporaryFile() as out:
    fp = ctypes.c_void_p(libc.fopen(out.name.encode(), b"w"))
    libc.malloc_info(0, fp)
    libc.fclose(fp)
    print(open(out.name).read().count("<heap nr="))
for t in threads:
    t.join()
"""


def arenas(mode: str) -> int:
    run = subprocess.run(
        [sys.executable, "-c", _ARENAS, mode], capture_output=True, text=True, check=True
    )
    return int(run.stdout)


def test_the_daemon_caps_malloc_arenas_unless_the_environment_did() -> None:
    assert arenas("as-is") > MALLOC_ARENAS  # each thread took its own
    assert arenas("capped") == MALLOC_ARENAS
    assert limit_malloc_arenas({"MALLOC_ARENA_MAX": "4"}) is None
