"""The process's allocators: the Arrow memory pool k2d allocates from, malloc's arenas."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pyarrow as pa
import pytest

from k2d.allocators import (
    ARROW_POOL,
    ARROW_POOL_VAR,
    MALLOC_ARENAS,
    default_arrow_pool,
    limit_malloc_arenas,
    use_arrow_pool,
)


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


# Arrow's C++ (the Parquet writer and reader, a sort) allocates; then which pools it used.
# The file is an Arrow buffer, not a Python BytesIO: the reader's last reference to a Python
# buffer can drop on an Arrow thread while the interpreter exits, which then aborts the
# process ("terminate called without an active exception", about 1 run in 100 here; gdb
# shows ~PyBuffer taking the GIL in finalization; apache/arrow#34314).
_POOLS = """
import sys
if sys.argv[1] == "pyarrow-first":
    import pyarrow
import k2d
import pyarrow as pa, pyarrow.compute as pc, pyarrow.parquet as pq
table = pa.table({"n": range(100_000), "s": [str(i) for i in range(100_000)]})
sink = pa.BufferOutputStream()
pq.write_table(table, sink)
pc.sort_indices(pq.read_table(pa.BufferReader(sink.getvalue())), [("s", "descending")])
print(pa.default_memory_pool().backend_name, pa.mimalloc_memory_pool().max_memory())
"""


def pools(order: str, **env: str) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items() if k != ARROW_POOL_VAR} | env
    run = subprocess.run(
        [sys.executable, "-c", _POOLS, order],
        capture_output=True,
        text=True,
        check=True,
        env=environ,
    )
    name, mimalloc_bytes = run.stdout.split()
    return name, int(mimalloc_bytes)


def test_a_k2d_process_allocates_all_of_arrow_from_its_pool_cxx_included() -> None:
    assert pools("k2d-first") == (ARROW_POOL, 0)


def test_the_environment_still_chooses_the_pool() -> None:
    assert pools("k2d-first", **{ARROW_POOL_VAR: "jemalloc"}) == ("jemalloc", 0)


def test_with_pyarrow_imported_first_only_the_environment_could_have_moved_arrows_cxx() -> None:
    # What default_arrow_pool is for: pyarrow reads the environment at its import, so
    # Arrow's C++ stays on mimalloc, its default, whatever is set later.
    name, mimalloc_bytes = pools("pyarrow-first")
    assert name == "mimalloc"
    assert mimalloc_bytes > 0
    assert default_arrow_pool({}) is False  # pyarrow is loaded here too: too late


# Eight threads allocate at once; glibc's malloc_info then lists one <heap> per arena.
_ARENAS = """
import ctypes, ctypes.util, sys, tempfile, threading
if sys.argv[1] == "capped":
    from k2d.allocators import limit_malloc_arenas
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


# A cycle that is garbage, and one still in use, then the daemon's freeze after start-up.
_FREEZE = """
import gc, weakref
from k2d.allocators import freeze_start_up_objects
class Node:
    pass
dead, alive = Node(), Node()
dead.me, alive.me = dead, alive
gone = weakref.ref(dead)
del dead
gc.disable()  # only the freeze's own collection may collect
freeze_start_up_objects()
print(gone() is None, gc.get_freeze_count() > 1000, gc.is_tracked(alive))
print(any(o is alive for o in gc.get_objects()))
"""


def test_the_freeze_collects_garbage_first_and_hides_the_rest_from_the_collector() -> None:
    run = subprocess.run(
        [sys.executable, "-c", _FREEZE], capture_output=True, text=True, check=True
    )
    collected_first, froze_the_start_up, tracked = run.stdout.split("\n")[0].split()
    assert (collected_first, froze_the_start_up, tracked) == ("True", "True", "True")
    # What full collections walk no longer holds the objects alive at start-up.
    assert run.stdout.split("\n")[1] == "False"
