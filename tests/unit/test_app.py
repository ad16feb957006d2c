"""The daemon's process set-up: the Arrow memory pool it allocates from."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pytest

from k2d.app import ARROW_POOL, use_arrow_pool


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
