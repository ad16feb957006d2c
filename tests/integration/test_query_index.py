"""The query side's file index follows commits made by other processes (k2d load, k2d
compact), which send it no Committed message."""

from __future__ import annotations

import random
from pathlib import Path

import duckdb

from k2d.config import StorageConfig
from k2d.query import FileIndex
from k2d.storage import Warehouse, trades_to_arrow
from tests.integration.test_maintenance import day_start_us, state_props, trades


def test_a_commit_from_elsewhere_is_indexed_at_the_second_refresh(tmp_path: Path) -> None:
    storage = StorageConfig(data_dir=str(tmp_path))
    with Warehouse(storage) as ours, Warehouse(storage) as theirs, duckdb.connect() as cursor:
        ours.ensure_tables()
        index = FileIndex(ours, cache_size=4)
        index.bootstrap(cursor)
        assert index.refresh(cursor) == []
        assert index.current("trades").rows == 0

        rows = trades(0, 500, day_start_us(1), random.Random(1))
        theirs.append("trades", trades_to_arrow(rows), state_props(1))

        # First sight: it may be this process's own writer, whose Committed is on its way.
        assert index.refresh(cursor) == []
        assert index.current("trades").rows == 0
        # Still not in the index one interval later: committed elsewhere, so re-planned.
        assert index.refresh(cursor) == ["trades"]
        assert index.current("trades").rows == 500
        assert index.refresh(cursor) == []
