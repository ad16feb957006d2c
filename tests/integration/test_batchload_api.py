"""ASX history loaded by `k2d load asx`, then read through the REST API like live data."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import anyio

from k2d.batchload import load_asx
from k2d.config import Config, StorageConfig
from tests.integration.test_batchload import FIXTURES, ohlcv_from_csv
from tests.integration.test_query_api import get_json, running


def iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def test_one_minute_ohlcv_through_the_api_equals_the_csv(tmp_path: Path) -> None:
    vendor = tmp_path / "vendor"
    shutil.copytree(FIXTURES, vendor)
    cfg = Config(storage=StorageConfig(data_dir=str(tmp_path / "data")))
    summary = await anyio.to_thread.run_sync(
        lambda: load_asx(
            cfg,
            trades=[vendor / "trades"],
            quotes=[vendor / "quotes"],
            company_info=vendor / "company_info.csv",
        )
    )
    assert summary.ok
    expected = ohlcv_from_csv(vendor / "trades" / "7078.csv")
    day = 86_400_000_000
    days = sorted({minute // day * day for minute in expected})
    assert len(days) > 1, "the fixture spans several days, daylight saving included"

    got: dict[str, tuple[Decimal, Decimal, Decimal, Decimal, Decimal, int]] = {}
    async with running(tmp_path, seed=False) as s:
        for start in days:  # one request per day: windows are limited in length
            body = await get_json(
                s.client,
                f"/v1/ohlcv/1m?symbol=BHP&exchange=ASX&start={iso(start)}"
                f"&end={iso(start + day)}&limit=1000",
            )
            for bar in body["data"]:
                got[bar["bar_start"]] = (
                    Decimal(bar["open"]),
                    Decimal(bar["high"]),
                    Decimal(bar["low"]),
                    Decimal(bar["close"]),
                    Decimal(bar["volume"]),
                    bar["trade_count"],
                )
    assert got == {iso(minute): bar for minute, bar in expected.items()}
