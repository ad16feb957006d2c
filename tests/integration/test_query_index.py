"""The query side's file index follows commits made by other processes (k2d load, k2d
compact), which send it no Committed message, and the pool's database reads what it lists."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import duckdb

from k2d.config import QueryConfig, StorageConfig
from k2d.query import (
    INTERVALS,
    FileIndex,
    Format,
    OhlcvPlan,
    PlanContext,
    Window,
    open_database,
    open_result,
)
from k2d.storage import TableMaintenance, Warehouse, trades_to_arrow
from tests.integration.test_maintenance import (
    Feeder,
    day_start_us,
    maintenance_cfg,
    state_props,
    trades,
)


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


def test_the_pools_cached_parquet_metadata_stays_right_through_compaction_and_expiry(
    tmp_path: Path,
) -> None:
    storage = StorageConfig(data_dir=str(tmp_path), sqlite_busy_timeout_ms=20_000)
    with Warehouse(storage) as wh:
        wh.ensure_tables()
        feeder = Feeder(wh)
        feeder.fill(commits=20, rows=200, days=(3, 2))
        db, (maint, cursor) = open_database(QueryConfig(), [str(tmp_path)], 2)
        try:
            index = FileIndex(wh, cache_size=4)
            index.bootstrap(maint)
            plan = OhlcvPlan(
                endpoint="ohlcv",
                interval=INTERVALS["1h"],
                symbols=("BTCUSDT",),
                exchanges=("BINANCE",),
                window=Window(day_start_us(3), day_start_us(1)),
                tz="UTC",
                limit=1_000,
            )

            def answer() -> Any:
                ctx = PlanContext(index, cursor, QueryConfig(), time.monotonic() + 60)
                body, done, _ = open_result(ctx, plan, Format.JSON).read(1 << 24)
                assert done
                return json.loads(body)

            before = answer()  # reads (and caches the metadata of) the 20 small files
            old_paths = [e.path for e in index.current("trades").entries]
            TableMaintenance(wh, maintenance_cfg()).run(["trades"], expire=False)
            feeder.append(0, 10)  # the writer goes on (today, outside the window)
            later = time.time() + 30 * 86_400
            expiry = maintenance_cfg(min_snapshots_to_keep=1, orphan_file_age=86_400.0)
            TableMaintenance(wh, expiry, clock=lambda: later).expire("trades")
            index.refresh(maint)
            assert index.refresh(maint) == ["trades"]
            after = answer()
        finally:
            for c in (maint, cursor):
                c.close()
            db.close()

    assert not any(Path(p).exists() for p in old_paths)  # the files it cached are gone
    assert len(index.current("trades").entries) == 3  # one compacted file a day, today's
    assert before["meta"]["rows"] > 0
    assert after["data"] == before["data"]
    assert after["meta"]["snapshot_id"] != before["meta"]["snapshot_id"]
