"""The query API end to end: a real uvicorn server on 127.0.0.1, the QueryPool with its
DuckDB workers, and real Iceberg tables in tmp_path written through Warehouse.append."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import duckdb
import httpx
import msgspec
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest
from anyio.streams.memory import MemoryObjectSendStream
from litestar import Request, get
from litestar.di import NamedDependency
from litestar.response import Stream

from actors.live_hub import LiveHub
from actors.query_pool import QueryPool
from k2d.api import ApiError, ApiServer, ApiState, create_app, serve
from k2d.api._access import client_key
from k2d.config import ApiConfig, LiveConfig, MaintenanceConfig, QueryConfig, StorageConfig
from k2d.messages import Committed, SequencedBatch
from k2d.model import Quote, SequenceEvent, Trade, now_us
from k2d.query import (
    Column,
    FileEntry,
    Format,
    HotFile,
    Kind,
    PlanContext,
    Prepared,
    QueryError,
)
from k2d.query import _execute as execute
from k2d.query._bars import MinuteBars
from k2d.runtime import Registry
from k2d.storage import (
    QUOTES,
    SEQUENCE_EVENTS,
    TRADES,
    TableMaintenance,
    Warehouse,
    events_to_arrow,
    quotes_to_arrow,
    trades_to_arrow,
)
from k2d.telemetry.metrics import Metrics

T0 = 1_709_251_200_000_000  # 2024-03-01T00:00:00Z
S = 1_000_000
DAY = "start=2024-03-01T00:00:00Z&end=2024-03-02T00:00:00Z"
W = f"start={T0}&end={T0 + 400 * S}"
GAP_IDS = (150, 152)


def trade(symbol: str, i: int, ts: int, *, provenance: str = "live") -> Trade:
    return Trade(
        message_id=f"BINANCE:{symbol}:trade:{i}",
        trade_id=str(i),
        symbol=symbol,
        exchange="BINANCE",
        asset_class="crypto",
        timestamp=ts,
        price=f"{100 + i % 7}.{i % 10}5",
        quantity=f"0.{i % 9 + 1}",
        currency="USDT",
        side="BUY" if i % 2 else "SELL",
        trade_conditions=("x",) if i % 50 == 0 else None,
        source_sequence=i,
        ingestion_timestamp=ts + 5,
        platform_sequence=i,
        provenance=provenance,
    )


def btc(ids: Sequence[int]) -> list[Trade]:
    return [trade("BTCUSDT", i, T0 + i * S) for i in ids]


def eth(ids: Sequence[int]) -> list[Trade]:
    return [trade("ETHUSDT", i, T0 + i * 2 * S + S // 2) for i in ids]


def quote(i: int, bid: str | None, ask: str | None) -> Quote:
    return Quote(
        message_id=f"BINANCE:BTCUSDT:quote:{i}",
        symbol="BTCUSDT",
        exchange="BINANCE",
        asset_class="crypto",
        timestamp=T0 + i * S,
        bid_price=bid,
        bid_quantity="1" if bid else None,
        ask_price=ask,
        ask_quantity="2" if ask else None,
        currency="USDT",
        source_sequence=i,
        ingestion_timestamp=T0 + i * S,
        platform_sequence=i,
    )


def ledger_rows() -> list[SequenceEvent]:
    first, last = GAP_IDS
    gap = SequenceEvent(
        event_id="gap-1",
        exchange="BINANCE",
        symbol="BTCUSDT",
        stream="trade",
        partition=0,
        kind="gap",
        status="open",
        first_missing=first,
        last_missing=last,
        missing_count=last - first + 1,
        detected_at=T0 + (last + 2) * S,
        recorded_at=T0 + (last + 2) * S,
    )
    closed = msgspec.structs.replace(gap, event_id="gap-0", first_missing=20, last_missing=20)
    closed_later = msgspec.structs.replace(
        closed, status="unrecoverable", recorded_at=closed.recorded_at + S
    )
    outage = SequenceEvent(
        event_id="outage-1",
        exchange="BINANCE",
        symbol="BTCUSDT",
        stream="trade",
        partition=0,
        kind="outage",
        status="open",
        detected_at=T0 + 3_700 * S,
        window_start=T0 + 3_600 * S,
        window_end=T0 + 3_630 * S,
        recorded_at=T0 + 3_700 * S,
    )
    return [gap, closed, closed_later, outage]


@dataclass
class Stack:
    wh: Warehouse
    pool: QueryPool
    hub: LiveHub
    state: ApiState
    metrics: Metrics
    client: httpx.AsyncClient
    server: ApiServer
    inbox: MemoryObjectSendStream[Committed]

    async def append(self, table: str, rows: Sequence[Any]) -> Committed:
        """Commit rows as the writer would, and announce them to the pool and the hub."""
        build = {TRADES: trades_to_arrow, QUOTES: quotes_to_arrow, SEQUENCE_EVENTS: events_to_arrow}
        result = await anyio.to_thread.run_sync(self.wh.append, table, build[table](rows), {})
        msg = Committed(
            table=table,
            snapshot_id=result.snapshot_id,
            files=result.files,
            batch_ids=tuple(sorted({getattr(r, "_batch", 0) for r in rows})),
            rows=result.rows,
            committed_at=now_us(),
        )
        await self.inbox.send(msg)
        self.hub.committed(msg)
        await self.pool.catch_up()
        return msg

    async def seed(self) -> None:
        first, last = GAP_IDS
        await self.append(TRADES, btc(range(1, 101)) + eth(range(1, 101)))
        await self.append(TRADES, btc([i for i in range(101, 201) if not first <= i <= last]))
        await self.append(TRADES, btc(range(201, 301)))
        quotes = [quote(i, "100.1", "100.3") for i in range(1, 41)]
        quotes += [
            quote(41, None, "100.3"),
            quote(42, "100.5", "100.4"),
            quote(43, "100.2", "100.2"),
        ]
        await self.append(QUOTES, quotes)
        await self.append(SEQUENCE_EVENTS, ledger_rows())


@asynccontextmanager
async def running(
    tmp_path: Path,
    *,
    query: QueryConfig | None = None,
    api: ApiConfig | None = None,
    routes: Sequence[Any] = (),
    seed: bool = True,
) -> AsyncIterator[Stack]:
    storage = StorageConfig(data_dir=str(tmp_path / "data"))
    wh = await anyio.to_thread.run_sync(Warehouse, storage)
    await anyio.to_thread.run_sync(wh.ensure_tables)
    registry = Registry()
    metrics = Metrics(registry)
    pool = QueryPool(wh, query or QueryConfig(timeout=10.0), metrics)
    hub = LiveHub(LiveConfig(), metrics)
    api_cfg = api or ApiConfig(port=0, rate_limit=0)
    state = ApiState(
        registry=registry,
        metrics=metrics,
        stats=_no_stats,
        config=api_cfg,
        query_pool=pool,
        live_hub=hub,
    )
    server = serve(create_app(state, route_handlers=list(routes)), api_cfg)
    send, recv = anyio.create_memory_object_stream[Committed](16)
    await pool.on_start()
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.run, recv, None)
        await tg.start(server.run)
        async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as client:
            stack = Stack(wh, pool, hub, state, metrics, client, server, send)
            if seed:
                await stack.seed()
            try:
                yield stack
            finally:
                await server.stop()
                send.close()
    wh.close()


async def _no_stats() -> dict[str, Any]:
    return {}


async def get_json(client: httpx.AsyncClient, url: str, **kw: Any) -> dict[str, Any]:
    r = await client.get(url, **kw)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def ids(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [r["message_id"] for r in rows]


async def test_trades_json_rows_meta_and_gaps(tmp_path: Path) -> None:
    async with running(tmp_path) as s:
        body = await get_json(
            s.client, f"/v1/trades?symbol=BTCUSDT&start={T0 + 140 * S}&end={T0 + 160 * S}"
        )
        current = s.pool.index.current(TRADES).snapshot_id
    rows = body["data"]
    assert ids(rows) == [
        f"BINANCE:BTCUSDT:trade:{i}" for i in range(140, 160) if not 150 <= i <= 152
    ]
    first = rows[0]
    assert first["price"] == "100.05000000"  # exact decimal string at scale 8
    assert first["timestamp"] == "2024-03-01T00:02:20.000000Z"
    assert first["trade_conditions"] is None and first["source_sequence"] == 140
    meta = body["meta"]
    assert meta["snapshot_id"] == current
    assert (meta["rows"], meta["truncated"], meta["next_cursor"]) == (17, False, None)
    assert [g["event_id"] for g in meta["gaps"]] == ["gap-1"]
    assert meta["gaps"][0]["start"] == "2024-03-01T00:02:29.000000Z"  # trade 149
    assert meta["gaps"][0]["end"] == "2024-03-01T00:02:33.000000Z"  # trade 153


async def test_every_format_carries_the_same_rows(tmp_path: Path) -> None:
    url = f"/v1/trades?symbol=BTCUSDT,ETHUSDT&start={T0}&end={T0 + 60 * S}&limit=40"
    async with running(tmp_path) as s:
        js = await get_json(s.client, url)
        csv_r = await s.client.get(url + "&format=csv")
        pq_r = await s.client.get(url, headers={"Accept": "application/vnd.apache.parquet"})
        arrow_r = await s.client.get(url + "&format=arrow")
    expected = ids(js["data"])
    assert len(expected) == 40 and js["meta"]["truncated"] is True
    assert csv_r.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(csv_r.text)))
    assert [r["message_id"] for r in table] == expected
    assert table[0]["price"] == js["data"][0]["price"]
    assert pq_r.headers["content-type"] == "application/vnd.apache.parquet"
    parquet = pq.read_table(io.BytesIO(pq_r.content))
    assert parquet.column("message_id").to_pylist() == expected
    assert parquet.schema.field("price").type == pa.decimal128(18, 8)
    assert parquet.column("price")[0].as_py() == Decimal(js["data"][0]["price"])
    arrow = pa.ipc.open_stream(arrow_r.content).read_all()
    assert arrow.column("message_id").to_pylist() == expected
    assert arrow.schema.names == list(js["data"][0])
    for r in (csv_r, pq_r, arrow_r):
        assert r.headers["x-k2d-truncated"] == "true"
        assert r.headers["x-k2d-snapshot-id"] == str(js["meta"]["snapshot_id"])
        # The header cursor continues where the JSON page's does.
        assert r.headers["x-k2d-next-cursor"] == js["meta"]["next_cursor"]


async def test_pagination_returns_every_row_once_while_commits_land(tmp_path: Path) -> None:
    base = f"/v1/trades?symbol=BTCUSDT&symbol=ETHUSDT&start={T0}&end={T0 + 400 * S}&limit=37"
    async with running(tmp_path) as s:
        everything = await get_json(s.client, base + "&limit=1000")
        seen: list[str] = []
        url, pages = base, 0
        while True:
            page = await get_json(s.client, url)
            seen.extend(ids(page["data"]))
            pages += 1
            if pages == 2:
                # New rows inside the window: the cursor keeps reading the first snapshot.
                await s.append(TRADES, btc(range(301, 320)))
            if not page["meta"]["truncated"]:
                break
            url = f"{base}&cursor={page['meta']['next_cursor']}"
        desc = await get_json(s.client, base + "&order=desc&limit=1000")
        after = await get_json(s.client, base + "&limit=1000")
    assert len(seen) == len(set(seen)) == everything["meta"]["rows"] == 297 + 100
    assert seen == ids(everything["data"])
    assert ids(desc["data"]) == list(reversed(ids(after["data"])))
    assert after["meta"]["rows"] == len(seen) + 19


async def test_as_of_and_snapshot_id_read_the_older_state(tmp_path: Path) -> None:
    window = f"symbol=BTCUSDT&start={T0}&end={T0 + 400 * S}&limit=1000"
    async with running(tmp_path) as s:
        before = await get_json(s.client, f"/v1/trades?{window}")
        await anyio.sleep(0.01)
        mark = now_us()
        await anyio.sleep(0.01)
        await s.append(TRADES, btc(range(301, 321)))
        now = await get_json(s.client, f"/v1/trades?{window}")
        as_of = await get_json(s.client, f"/v1/trades?{window}&as_of={mark}")
        by_id = await get_json(
            s.client, f"/v1/trades?{window}&snapshot_id={before['meta']['snapshot_id']}"
        )
        unknown = await s.client.get(f"/v1/trades?{window}&snapshot_id=42")
        both = await s.client.get(f"/v1/trades?{window}&snapshot_id=42&as_of={mark}")
        bars = await get_json(s.client, f"/v1/ohlcv/1h?{window}&as_of={mark}")
    assert now["meta"]["rows"] == before["meta"]["rows"] + 20
    for older in (as_of, by_id):
        assert ids(older["data"]) == ids(before["data"])
        assert older["meta"]["snapshot_id"] == before["meta"]["snapshot_id"]
    assert bars["data"][0]["trade_count"] == before["meta"]["rows"]
    assert (unknown.status_code, unknown.json()["code"]) == (404, "unknown_snapshot")
    assert (both.status_code, both.json()["code"]) == (400, "conflicting_parameters")


async def test_columns_are_allow_listed(tmp_path: Path) -> None:
    async with running(tmp_path) as s:
        body = await get_json(
            s.client,
            f"/v1/trades?symbol=BTCUSDT&start={T0}&end={T0 + 5 * S}&columns=price,message_id",
        )
        bad = await s.client.get(f"/v1/trades?symbol=BTCUSDT&{W}&columns=price,1;drop")
    assert body["data"][0] == {"price": "101.15000000", "message_id": "BINANCE:BTCUSDT:trade:1"}
    assert (bad.status_code, bad.json()["code"]) == (400, "unknown_column")


async def test_quotes(tmp_path: Path) -> None:
    async with running(tmp_path) as s:
        body = await get_json(s.client, f"/v1/quotes?symbol=BTCUSDT&start={T0}&end={T0 + 100 * S}")
    assert body["meta"]["rows"] == 43
    one_sided = body["data"][40]
    assert (one_sided["bid_price"], one_sided["ask_price"]) == (None, "100.30000000")


async def test_trades_query_body_takes_several_symbols(tmp_path: Path) -> None:
    async with running(tmp_path) as s:
        r = await s.client.post(
            "/v1/trades/query",
            json={
                "symbols": ["BTCUSDT", "ETHUSDT"],
                "exchanges": ["BINANCE"],
                "start": "2024-03-01T00:00:00Z",
                "end": T0 + 10 * S,
                "limit": 100,
                "columns": ["symbol", "trade_id"],
                "format": "csv",
            },
        )
        wrong = await s.client.post("/v1/trades/query", json={"symbols": "BTCUSDT", "nope": 1})
        big = await s.client.post("/v1/trades/query", content=b" " * (65 * 1024))
    assert r.status_code == 200, r.text
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert {row["symbol"] for row in rows} == {"BTCUSDT", "ETHUSDT"}
    assert len(rows) == 9 + 4
    assert wrong.status_code == 400
    assert (big.status_code, big.json()["code"]) == (413, "body_too_large")


async def bars_ahead_done(s: Stack) -> None:
    """Wait until the pool holds the bars of every file due ahead of requests."""
    with anyio.fail_after(20):
        while (
            s.pool.index.bars.due(
                s.pool.index.current(TRADES).entries, s.pool.cfg.minute_bars_ahead
            )
            or s.metrics.registry.get_sample_value("k2d_query_minute_bars_due_files") != 0
        ):
            await anyio.sleep(0.01)


async def test_minute_bars_of_committed_trade_files_are_computed_before_any_request(
    tmp_path: Path,
) -> None:
    async with running(tmp_path) as s:
        # Three trade files: BTC and ETH, then BTC, then BTC.
        await bars_ahead_done(s)
        held = s.pool.index.bars.rows
        body = await get_json(
            s.client, f"/v1/ohlcv/1m?symbol=BTCUSDT&start={T0}&end={T0 + 600 * S}"
        )
        eth_body = await get_json(
            s.client, f"/v1/ohlcv/1m?symbol=ETHUSDT&start={T0}&end={T0 + 600 * S}"
        )
        computed = s.pool.index.bars.computed
    # Each (file, pair) was aggregated once, ahead: the first requests merged those bars.
    assert computed == 4
    assert held == s.pool.index.bars.rows > 0
    minute = btc(range(1, 60))
    first = body["data"][0]
    assert first["open"] == f"{Decimal(minute[0].price):.8f}"
    assert first["close"] == f"{Decimal(minute[-1].price):.8f}"
    assert first["trade_count"] == 59
    assert sum(b["trade_count"] for b in body["data"]) == 297
    assert sum(b["trade_count"] for b in eth_body["data"]) == 100


async def test_minute_bars_ahead_cover_the_newest_files_within_their_bound(
    tmp_path: Path,
) -> None:
    # Each BTC file spans under two minutes: at most 3 bars. 4 hold the newest file's only.
    async with running(tmp_path, query=QueryConfig(timeout=10.0, minute_bars_ahead=4)) as s:

        async def computed_by(url: str) -> int:
            before = s.pool.index.bars.computed
            await get_json(s.client, url)
            return s.pool.index.bars.computed - before

        await bars_ahead_done(s)
        newest = await computed_by(
            f"/v1/ohlcv/1m?symbol=BTCUSDT&start={T0 + 201 * S}&end={T0 + 301 * S}"
        )
        oldest = await computed_by(f"/v1/ohlcv/1m?symbol=BTCUSDT&start={T0}&end={T0 + 100 * S}")
        # A new file is newer than all: its bars are computed ahead in turn.
        await s.append(TRADES, btc(range(301, 361)))
        await bars_ahead_done(s)
        new = await computed_by(
            f"/v1/ohlcv/1m?symbol=BTCUSDT&start={T0 + 301 * S}&end={T0 + 361 * S}"
        )
    assert (newest, oldest, new) == (0, 1, 0)


async def test_a_file_whose_bars_cannot_be_computed_ahead_is_left_to_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tried: list[list[str]] = []
    compute = MinuteBars.ahead

    def unreadable_first(self: MinuteBars, cursor: Any, entries: Sequence[FileEntry]) -> None:
        tried.append([e.path for e in entries])
        if len(tried) == 1:
            raise duckdb.IOException("IO Error: the first file cannot be read")
        compute(self, cursor, entries)

    monkeypatch.setattr(MinuteBars, "ahead", unreadable_first)
    async with running(tmp_path, seed=False) as s:
        due = "k2d_query_minute_bars_due_files"
        for n, ids in enumerate((range(1, 101), range(101, 201)), 1):
            committed = await s.append(TRADES, btc(ids))
            with anyio.fail_after(20):
                while len(tried) < n or s.metrics.registry.get_sample_value(due):
                    await anyio.sleep(0.01)
        held = s.pool.index.bars.rows
        first_file = await get_json(
            s.client, f"/v1/ohlcv/1m?symbol=BTCUSDT&start={T0}&end={T0 + 100 * S}"
        )
    # The failed file was not tried again; the next one was computed ahead, and a request
    # over the first aggregated its trades itself.
    assert tried[1:] == [[f.path.removeprefix("file://") for f in committed.files]]
    assert held > 0
    assert sum(b["trade_count"] for b in first_file["data"]) == 99


async def test_a_shutdown_interrupts_the_bars_ahead_in_flight_quietly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    started = threading.Event()

    def endless(self: MinuteBars, cursor: Any, entries: Sequence[FileEntry]) -> None:
        started.set()
        until = time.monotonic() + 30  # bounded, should the interrupt never come
        while time.monotonic() < until:
            cursor.execute("SELECT count(*) FROM range(300000000) t(i) WHERE i % 7 = 3")

    monkeypatch.setattr(MinuteBars, "ahead", endless)
    with anyio.fail_after(20):
        async with running(tmp_path):
            while not started.is_set():
                await anyio.sleep(0.01)
            began = time.monotonic()
        stopped_in = time.monotonic() - began
    assert stopped_in < 5  # uninterrupted, the batch would have run for 30 s
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


async def test_ohlcv_bars_are_deterministic_with_exact_vwap(tmp_path: Path) -> None:
    # Bars computed only when asked, so that the first request is the one that keeps them.
    async with running(tmp_path, query=QueryConfig(timeout=10.0, minute_bars_ahead=0)) as s:
        held_before = s.metrics.registry.get_sample_value("k2d_query_minute_bars")
        body = await get_json(
            s.client, f"/v1/ohlcv/1m?symbol=BTCUSDT&start={T0}&end={T0 + 600 * S}"
        )
        held = s.metrics.registry.get_sample_value("k2d_query_minute_bars")
        again = await get_json(
            s.client, f"/v1/ohlcv/1m?symbol=BTCUSDT&start={T0}&end={T0 + 600 * S}"
        )
        sydney = await get_json(
            s.client,
            "/v1/ohlcv/1d?symbol=BTCUSDT&start=2024-02-29T00:00:00Z&end=2024-03-02T00:00:00Z"
            "&tz=Australia/Sydney",
        )
        bad = await s.client.get(f"/v1/ohlcv/7m?symbol=BTCUSDT&{W}")
        bad_tz = await s.client.get(f"/v1/ohlcv/1m?symbol=BTCUSDT&{W}&tz=Mars/Base")
    # The first request kept the files' minute bars; the second read them, with the same
    # answer.
    assert held_before == 0
    assert held is not None and held >= len(body["data"])
    assert again["data"] == body["data"]
    first = body["data"][0]
    minute = btc(range(1, 60))
    pq_sum = sum(Decimal(t.price) * Decimal(t.quantity) for t in minute)
    volume = sum(Decimal(t.quantity) for t in minute)
    assert first["bar_start"] == "2024-03-01T00:00:00.000000Z"
    assert first["open"] == f"{Decimal(minute[0].price):.8f}"
    assert first["close"] == f"{Decimal(minute[-1].price):.8f}"
    assert first["high"] == f"{max(Decimal(t.price) for t in minute):.8f}"
    assert first["volume"] == f"{volume:.8f}"
    assert first["vwap"] == f"{(pq_sum / volume).quantize(Decimal('1e-8'), ROUND_HALF_UP):.8f}"
    assert first["trade_count"] == 59
    assert sum(b["trade_count"] for b in body["data"]) == 297
    # Sydney midnight of 1 March is 13:00 UTC on 29 February (daylight saving time).
    assert [b["bar_start"] for b in sydney["data"]] == ["2024-02-29T13:00:00.000000Z"]
    assert (bad.status_code, bad.json()["code"]) == (400, "unknown_interval")
    assert (bad_tz.status_code, bad_tz.json()["code"]) == (400, "unknown_timezone")


async def test_summary_of_a_trading_day(tmp_path: Path) -> None:
    async with running(tmp_path) as s:
        body = await get_json(s.client, "/v1/summary/BINANCE/BTCUSDT/2024-03-01")
        asx = await s.client.get("/v1/summary/ASX/BHP/2024-03-01")
        nyse = await s.client.get("/v1/summary/NYSE/BTCUSDT/2024-03-01")
        bad_day = await s.client.get("/v1/summary/BINANCE/BTCUSDT/2024-13-01")
    (row,) = body["data"]
    assert row["trade_count"] == 297 and row["timezone"] == "UTC"
    assert row["session_start"] == "2024-03-01T00:00:00.000000Z"
    assert (row["quote_count"], row["two_sided_quotes"]) == (43, 41)
    assert (row["one_sided_quotes"], row["crossed_quotes"]) == (1, 1)
    # 40 quotes 0.2 wide and one locked (0 wide); the crossed and one-sided ones stay out.
    assert row["spread_mean"] == f"{Decimal('8') / 41:.8f}"
    assert row["spread_min"] == "0.00000000" and row["spread_max"] == "0.20000000"
    assert (asx.status_code, asx.json()["code"]) == (404, "unknown_symbol")
    assert (nyse.status_code, nyse.json()["code"]) == (404, "unknown_exchange")
    assert (bad_day.status_code, bad_day.json()["code"]) == (400, "invalid_date")


async def test_symbols_snapshots_gaps_and_completeness(tmp_path: Path) -> None:
    async with running(tmp_path) as s:
        symbols = await get_json(s.client, "/v1/symbols")
        snaps = await get_json(s.client, "/v1/snapshots?table=trades&limit=2")
        snaps_csv = await s.client.get("/v1/snapshots?table=trades&format=csv")
        gaps = await get_json(s.client, "/v1/gaps?symbol=BTCUSDT")
        open_gaps = await get_json(s.client, f"/v1/gaps?status=open&kind=gap&{DAY}")
        comp = await get_json(s.client, f"/v1/completeness?symbol=BTCUSDT&{DAY}&bucket=1h")
        comp_day = await s.client.get(
            f"/v1/completeness?symbol=BTCUSDT&{DAY}&bucket=1d&format=arrow"
        )
    by_symbol = {r["symbol"]: r for r in symbols["data"]}
    assert by_symbol["BTCUSDT"]["trade_count"] == 297
    assert by_symbol["BTCUSDT"]["quote_count"] == 43
    assert by_symbol["ETHUSDT"]["first_trade"] == "2024-03-01T00:00:02.500000Z"
    assert len(snaps["data"]) == 2 and snaps["meta"]["truncated"] is True
    assert snaps["data"][0]["added_records"] == 100
    assert snaps["data"][0]["snapshot_id"] == snaps["meta"]["snapshot_id"]
    assert len(list(csv.DictReader(io.StringIO(snaps_csv.text)))) == 3
    statuses = {g["event_id"]: g["status"] for g in gaps["data"]}
    assert statuses == {"gap-0": "unrecoverable", "gap-1": "open", "outage-1": "open"}
    assert [g["event_id"] for g in open_gaps["data"]] == ["gap-1"]
    hours = comp["data"]
    assert len(hours) == 24
    first = hours[0]
    assert (first["expected"], first["stored"], first["missing"], first["open_gaps"]) == (
        300,
        297,
        3,
        1,
    )
    assert first["coverage"] == pytest.approx(297 / 300)
    assert hours[1]["outage_seconds"] == 30.0
    assert hours[1]["coverage"] is None
    daily = pa.ipc.open_stream(comp_day.content).read_all()
    assert daily.column("stored").to_pylist() == [297]


async def test_recent_merges_uncommitted_rows_without_duplicates(tmp_path: Path) -> None:
    now = now_us()
    fresh = [trade("BTCUSDT", 10_000 + i, now - (200 - 10 * i) * S) for i in range(20)]
    async with running(tmp_path) as s:
        await s.append(TRADES, fresh[:5])
        batch = SequencedBatch(
            batch_id=7,
            partition=0,
            trades=fresh[5:],
            quotes=[],
            events=[],
            dead_letters=[],
            watermarks={},
        )
        s.hub.add(batch)
        before = await get_json(s.client, "/v1/trades/recent?symbol=BTCUSDT&window=5m")
        # The writer commits batch 7: the rows move from the hub's pending set to the table.
        result = await anyio.to_thread.run_sync(s.wh.append, TRADES, trades_to_arrow(fresh[5:]), {})
        committed = Committed(
            table=TRADES,
            snapshot_id=result.snapshot_id,
            files=result.files,
            batch_ids=(7,),
            rows=result.rows,
            committed_at=now_us(),
        )
        await s.inbox.send(committed)
        s.hub.committed(committed)
        after = await get_json(s.client, "/v1/trades/recent?symbol=BTCUSDT&window=5m")
        old = await get_json(s.client, "/v1/trades/recent?symbol=BTCUSDT&window=105s")
        missing = await s.client.get("/v1/trades/recent?window=5m")
    expected = [t.message_id for t in fresh]
    assert ids(before["data"]) == expected
    assert before["meta"]["live_rows"] == 15
    assert ids(after["data"]) == expected
    assert after["meta"]["live_rows"] == 0
    assert ids(old["data"]) == expected[-10:]
    assert (missing.status_code, missing.json()["code"]) == (400, "missing_symbol")


INJECTIONS = [
    "BTCUSDT' OR '1'='1",
    "BTCUSDT; DROP TABLE trades; --",
    "') UNION SELECT * FROM read_csv('/etc/passwd') --",
    "$(rm -rf /)",
    "'; COPY (SELECT 1) TO '/tmp/x.csv'; --",
]


@pytest.mark.parametrize("attack", INJECTIONS)
async def test_injection_in_any_parameter_is_refused_and_changes_nothing(
    tmp_path: Path, attack: str
) -> None:
    window = f"start={T0}&end={T0 + 400 * S}"
    urls = [
        ("/v1/trades", {"symbol": attack}),
        ("/v1/trades", {"symbol": "BTCUSDT", "exchange": attack}),
        ("/v1/trades", {"symbol": "BTCUSDT", "columns": attack}),
        ("/v1/trades", {"symbol": "BTCUSDT", "order": attack}),
        ("/v1/trades", {"symbol": "BTCUSDT", "cursor": attack}),
        ("/v1/trades", {"symbol": "BTCUSDT", "format": attack}),
        ("/v1/trades", {"symbol": "BTCUSDT", "as_of": attack}),
        ("/v1/trades", {"symbol": "BTCUSDT", "start": attack}),
        ("/v1/trades", {"symbol": "BTCUSDT", "limit": attack}),
        ("/v1/quotes", {"symbol": attack}),
        ("/v1/ohlcv/1m", {"symbol": attack}),
        ("/v1/ohlcv/1m", {"symbol": "BTCUSDT", "tz": attack}),
        (f"/v1/ohlcv/{attack}", {"symbol": "BTCUSDT"}),
        ("/v1/trades/recent", {"symbol": attack}),
        ("/v1/trades/recent", {"symbol": "BTCUSDT", "window": attack}),
        ("/v1/snapshots", {"table": attack}),
        ("/v1/gaps", {"status": attack}),
        ("/v1/gaps", {"kind": attack}),
        ("/v1/completeness", {"symbol": attack}),
        ("/v1/completeness", {"symbol": "BTCUSDT", "bucket": attack}),
        (f"/v1/summary/BINANCE/{attack}/2024-03-01", {}),
        (f"/v1/summary/BINANCE/BTCUSDT/{attack}", {}),
    ]
    async with running(tmp_path) as s:
        reference = await get_json(s.client, f"/v1/trades?symbol=BTCUSDT&{window}&limit=1000")
        for path, params in urls:
            r = await s.client.get(path + f"?{window}", params=params)
            assert r.status_code in (400, 404), (path, params, r.status_code, r.text)
            assert set(r.json()) == {"code", "detail"}
        body = await s.client.post(
            "/v1/trades/query", json={"symbols": ["BTCUSDT"], "columns": [attack]}
        )
        assert (body.status_code, body.json()["code"]) == (400, "unknown_column")
        again = await get_json(s.client, f"/v1/trades?symbol=BTCUSDT&{window}&limit=1000")
    assert again["data"] == reference["data"]
    assert not await anyio.Path("/tmp/x.csv").exists()


@pytest.mark.parametrize(
    ("query", "code"),
    [
        (f"symbol=BTCUSDT&{W}&limit=100001", "limit_too_large"),
        (f"symbol=BTCUSDT&{W}&limit=0", "invalid_limit"),
        ("symbol=BTCUSDT&start=2024-01-01&end=2024-03-01", "window_too_large"),
        (f"symbol=BTCUSDT&start={T0}&end={T0}", "empty_window"),
        (f"symbol=BTCUSDT&start={T0 + S}&end={T0}", "reversed_window"),
        ("symbol=BTCUSDT&start=yesterday", "invalid_time"),
        ("symbol=BTCUSDT&start=1e9", "invalid_time"),
        ("symbol=BTC%20USDT", "invalid_symbol"),
        ("symbol=BTCUSDT&exchange=K-RAKEN", "invalid_exchange"),
        ("symbol=BTCUSDT&columns=password", "unknown_column"),
        ("symbol=BTCUSDT&format=xml", "unknown_format"),
        ("symbol=BTCUSDT&cursor=abc", "invalid_cursor"),
        ("symbol=BTCUSDT&order=sideways", "invalid_order"),
    ],
)
async def test_guardrails_answer_400_with_a_stable_code(
    tmp_path: Path, query: str, code: str
) -> None:
    async with running(tmp_path) as s:
        r = await s.client.get(f"/v1/trades?{query}")
    assert r.status_code == 400, r.text
    assert r.json()["code"] == code


async def test_a_cursor_belongs_to_its_query(tmp_path: Path) -> None:
    async with running(tmp_path) as s:
        page = await get_json(s.client, f"/v1/trades?symbol=BTCUSDT&{W}&limit=5")
        cursor = page["meta"]["next_cursor"]
        other = await s.client.get(f"/v1/trades?symbol=ETHUSDT&{W}&cursor={cursor}")
    assert (other.status_code, other.json()["code"]) == (400, "invalid_cursor")


class SlowPlan:
    """A cross join on a big generated range: minutes of work for DuckDB."""

    endpoint = "test.slow"

    def prepare(self, ctx: PlanContext) -> Prepared:
        return Prepared(
            # Streams through a cross product of 10^11 pairs in constant memory.
            sql="SELECT count(*) AS n FROM range(1000000) a CROSS JOIN range(100000) b "
            "WHERE (a.range * b.range) % 7 = ?",
            params=[3],
            columns=(Column("n", Kind.INT),),
            keys=(),
            limit=1,
        )


@get("/test/slow")
async def slow_route(api: NamedDependency[ApiState], request: Request[Any, Any, Any]) -> Stream:
    """Outside /v1 (no AccessControl): the client is X-Test-Client when given."""
    assert api.query_pool is not None
    key = request.headers.get("x-test-client") or client_key(request.scope)
    try:
        result = await api.query_pool.execute(key, SlowPlan(), Format.JSON)
    except QueryError as exc:
        raise ApiError(exc.status, exc.code, exc.detail, exc.headers) from None
    return Stream(result, media_type=result.head.media_type)


async def test_a_small_page_is_one_body_and_a_large_one_streams(tmp_path: Path) -> None:
    async with running(tmp_path, seed=False) as s:
        await s.append(TRADES, btc(range(1, 6_001)))  # ~1.6 MB of JSON: more than one read
        window = f"symbol=BTCUSDT&start={T0}&end={T0 + 7_000 * S}"
        small = await s.client.get(f"/v1/trades?{window}&limit=10")
        large = await s.client.get(f"/v1/trades?{window}&limit=6000")
    assert small.status_code == large.status_code == 200
    assert small.headers["content-length"] == str(len(small.content))
    assert large.headers["transfer-encoding"] == "chunked"
    assert len(large.content) > 1 << 20
    whole, page = large.json(), small.json()
    assert ids(whole["data"]) == [f"BINANCE:BTCUSDT:trade:{i}" for i in range(1, 6_001)]
    assert page["data"] == whole["data"][:10]
    assert (page["meta"]["truncated"], whole["meta"]["truncated"]) == (True, False)


async def test_a_query_past_its_timeout_is_504_and_the_worker_carries_on(tmp_path: Path) -> None:
    cfg = QueryConfig(timeout=0.5, workers=1)
    async with running(tmp_path, query=cfg, routes=[slow_route]) as s:
        started = time.monotonic()
        slow = await s.client.get("/test/slow")
        took = time.monotonic() - started
        after = await s.client.get(f"/v1/trades?symbol=BTCUSDT&{W}&limit=3")
        sample = s.metrics.registry.get_sample_value
        timeouts = sample("k2d_queries_total", {"endpoint": "test.slow", "outcome": "timeout"})
    assert (slow.status_code, slow.json()["code"]) == (504, "query_timeout")
    assert took < 3.0
    assert after.status_code == 200 and len(after.json()["data"]) == 3
    assert timeouts == 1.0


async def _wait_in_flight(s: Stack, n: int) -> None:
    with anyio.fail_after(5):
        while s.metrics.registry.get_sample_value("k2d_query_in_flight") != n:
            await anyio.sleep(0.01)


async def test_per_key_concurrency_and_a_full_queue(tmp_path: Path) -> None:
    # per_key_concurrency defaults to 2, below the 3 workers: one client cannot hold them all.
    cfg = QueryConfig(timeout=1.5, workers=3, queue_size=1)
    api = ApiConfig(port=0, rate_limit=0, trusted_proxies=("127.0.0.1",))
    b, c = {"X-Forwarded-For": "10.0.0.2"}, {"X-Forwarded-For": "10.0.0.3"}
    async with running(tmp_path, query=cfg, api=api, routes=[slow_route]) as s:
        results: dict[str, httpx.Response] = {}

        async def call(name: str, client: str) -> None:
            results[name] = await s.client.get("/test/slow", headers={"X-Test-Client": client})

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "a1", "addr:127.0.0.1")
            tg.start_soon(call, "a2", "addr:127.0.0.1")
            await _wait_in_flight(s, 2)
            same_key = await s.client.get(f"/v1/trades?symbol=BTCUSDT&{W}")
            other_key = await s.client.get(f"/v1/trades?symbol=BTCUSDT&{W}", headers=b)
            tg.start_soon(call, "b1", "addr:10.0.0.2")
            await _wait_in_flight(s, 3)
            tg.start_soon(call, "c1", "addr:10.0.0.3")
            await _wait_in_flight(s, 4)  # every worker busy, one query queued
            full = await s.client.get(f"/v1/trades?symbol=BTCUSDT&{W}", headers=c)
    assert (same_key.status_code, same_key.json()["code"]) == (429, "too_many_concurrent_queries")
    assert same_key.headers["retry-after"] == "1"
    assert other_key.status_code == 200, other_key.text
    assert (full.status_code, full.json()["code"]) == (503, "busy")
    assert results["a1"].status_code == 504, results["a1"].text


async def test_api_keys_rate_limits_and_cors(tmp_path: Path) -> None:
    secret = "s3cret-key"
    api = ApiConfig(
        port=0,
        api_keys=(hashlib.sha256(secret.encode()).hexdigest(),),
        rate_limit=1.0,
        rate_burst=2,
        cors_origins=("https://notebook.example",),
    )
    url = f"/v1/trades?symbol=BTCUSDT&{W}&limit=1"
    origin = {"Origin": "https://notebook.example"}
    async with running(tmp_path, api=api) as s:
        missing = await s.client.get(url)
        in_query = await s.client.get(url + f"&api_key={secret}")
        # Refused keys take from the address's bucket (burst 2): the third guess is 429.
        wrong = await s.client.get(url, headers={"X-API-Key": "guess"})
        ok = await s.client.get(url, headers={"X-API-Key": secret, **origin})
        ok2 = await s.client.get(url, headers={"X-API-Key": secret})
        limited = await s.client.get(url, headers={"X-API-Key": secret, **origin})
        preflight = await s.client.options(
            url,
            headers={
                **origin,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "X-API-Key",
            },
        )
        foreign = await s.client.options(
            url, headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
        )
        health = await s.client.get("/health")
    for r in (missing, in_query):
        assert (r.status_code, r.json()["code"]) == (401, "unauthorized")
    assert (wrong.status_code, wrong.json()["code"]) == (429, "rate_limited")
    assert ok.status_code == 200 and ok2.status_code == 200
    assert ok.headers["access-control-allow-origin"] == "https://notebook.example"
    assert "X-K2D-Snapshot-Id" in ok.headers["access-control-expose-headers"]
    assert (limited.status_code, limited.json()["code"]) == (429, "rate_limited")
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.headers["access-control-allow-origin"] == "https://notebook.example"
    assert preflight.status_code == 204
    assert "X-API-Key" in preflight.headers["access-control-allow-headers"]
    assert foreign.status_code == 403
    assert "access-control-allow-origin" not in foreign.headers
    assert health.status_code == 200


async def test_forwarded_for_is_believed_only_from_trusted_proxies(tmp_path: Path) -> None:
    url = f"/v1/trades?symbol=BTCUSDT&{W}&limit=1"
    trusting = ApiConfig(port=0, rate_limit=0.001, rate_burst=1, trusted_proxies=("127.0.0.1",))
    async with running(tmp_path, api=trusting) as s:
        first = await s.client.get(url, headers={"X-Forwarded-For": "10.0.0.1"})
        other_client = await s.client.get(url, headers={"X-Forwarded-For": "10.0.0.2"})
        same_client = await s.client.get(url, headers={"X-Forwarded-For": "10.0.0.1"})
    assert [first.status_code, other_client.status_code, same_client.status_code] == [200, 200, 429]
    distrusting = ApiConfig(port=0, rate_limit=0.001, rate_burst=1)
    async with running(tmp_path / "b", api=distrusting) as s:
        first = await s.client.get(url, headers={"X-Forwarded-For": "10.0.0.1"})
        spoofed = await s.client.get(url, headers={"X-Forwarded-For": "10.0.0.2"})
    assert [first.status_code, spoofed.status_code] == [200, 429], spoofed.text


async def announce_replace(s: Stack, rows: int) -> int:
    """Tell the pool of the trades table's current snapshot, a replace, as the daemon does
    (a Committed with no files of its own), wait until its index has it; its id."""
    table = await anyio.to_thread.run_sync(s.wh.load_table, TRADES)
    snapshot = table.current_snapshot()
    assert snapshot is not None
    await s.inbox.send(
        Committed(
            table=TRADES,
            snapshot_id=snapshot.snapshot_id,
            files=(),
            batch_ids=(),
            rows=rows,
            committed_at=now_us(),
        )
    )
    await s.pool.catch_up()
    return snapshot.snapshot_id


async def test_a_replace_commit_makes_the_index_replan(tmp_path: Path) -> None:
    async with running(tmp_path) as s:
        window = f"/v1/trades?symbol=BTCUSDT&start={T0}&end={T0 + 400 * S}&limit=1000"
        before = await get_json(s.client, window)
        table = await anyio.to_thread.run_sync(s.wh.load_table, TRADES)
        keep = trades_to_arrow(btc(range(1, 11)))
        # An overwrite (what a rewrite does): the old files leave the table.
        await anyio.to_thread.run_sync(lambda: table.overwrite(keep))
        snapshot_id = await announce_replace(s, rows=10)
        after = await get_json(s.client, window)
        replans = s.metrics.registry.get_sample_value("k2d_query_index_replans_total")
    assert before["meta"]["rows"] == 297
    assert ids(after["data"]) == [f"BINANCE:BTCUSDT:trade:{i}" for i in range(1, 11)]
    assert after["meta"]["snapshot_id"] == snapshot_id
    assert replans is not None and replans >= 1


async def test_empty_tables_answer_empty_pages(tmp_path: Path) -> None:
    async with running(tmp_path, seed=False) as s:
        symbols = await get_json(s.client, "/v1/symbols")
        unknown = await s.client.get("/v1/trades?symbol=BTCUSDT")
        everything = await get_json(s.client, "/v1/trades?format=json")
        gaps = await get_json(s.client, "/v1/gaps")
    assert symbols["data"] == [] and gaps["data"] == []
    assert (unknown.status_code, unknown.json()["code"]) == (404, "unknown_symbol")
    assert everything["data"] == [] and everything["meta"]["snapshot_id"] is None


async def test_the_openapi_document_covers_every_query_route(tmp_path: Path) -> None:
    async with running(tmp_path, seed=False) as s:
        doc = await get_json(s.client, "/schema/openapi.json")
    paths = doc["paths"]
    for path in (
        "/v1/trades",
        "/v1/quotes",
        "/v1/trades/query",
        "/v1/trades/recent",
        "/v1/ohlcv/{interval}",
        "/v1/symbols",
        "/v1/snapshots",
        "/v1/summary/{exchange}/{symbol}/{date}",
        "/v1/gaps",
        "/v1/completeness",
    ):
        op = paths[path].get("get") or paths[path].get("post")
        ok = op["responses"]["200"]["content"]
        assert {
            "application/json",
            "text/csv; charset=utf-8",
            "application/vnd.apache.parquet",
        } <= set(ok)
        assert ok["application/json"]["examples"]
        for status in ("400", "429", "503", "504"):
            assert op["responses"][status]["content"]["application/json"]["examples"], (
                path,
                status,
            )


def test_duckdb_reads_nothing_outside_the_warehouse(tmp_path: Path) -> None:
    from k2d.query import open_database

    inside, outside = tmp_path / "warehouse", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    table = pa.table({"a": [1, 2, 3]})
    pq.write_table(table, inside / "ok.parquet")
    pq.write_table(table, outside / "secret.parquet")
    db, (cursor,) = open_database(QueryConfig(), [str(inside)], 1)
    try:
        ok = cursor.execute("SELECT sum(a) FROM read_parquet(?)", [str(inside / "ok.parquet")])
        assert ok.fetchall() == [(6,)]
        for sql in (
            f"SELECT * FROM read_parquet('{outside / 'secret.parquet'}')",
            f"SELECT * FROM read_parquet('{inside}/../elsewhere/secret.parquet')",
            "SELECT * FROM read_csv('/etc/passwd')",
            "SET enable_external_access = true",
            "INSTALL httpfs",
        ):
            with pytest.raises(Exception, match=r"(?i)permission|locked|disabled"):
                cursor.execute(sql).fetchall()
    finally:
        cursor.close()
        db.close()


async def hot_loaded(s: Stack) -> None:
    """Wait until the hot tier holds every file due."""
    with anyio.fail_after(20):
        while s.pool.hot_due() or s.metrics.registry.get_sample_value("k2d_query_hot_due_files"):
            await anyio.sleep(0.01)


# A hot tier that holds every file these tests write (off by default).
HOT = QueryConfig(timeout=10.0, hot_bytes=64 * 1024 * 1024)


def hot_reads(s: Stack) -> float:
    """Pages answered from memory so far."""
    return s.metrics.registry.get_sample_value("k2d_query_pages_from_memory_total") or 0.0


async def test_first_pages_over_files_held_in_memory_are_the_pages_duckdb_gives(
    tmp_path: Path,
) -> None:
    urls = [
        f"/v1/trades?symbol=BTCUSDT&start={T0 + 140 * S}&end={T0 + 160 * S}",
        f"/v1/trades?symbol=BTCUSDT,ETHUSDT&start={T0}&end={T0 + 400 * S}&limit=37",
        f"/v1/trades?start={T0 + 10 * S}&end={T0 + 390 * S}&order=desc&limit=150",
        f"/v1/trades?symbol=BTCUSDT&{W}&columns=trade_conditions,price,message_id",
        f"/v1/trades?exchange=BINANCE&start={T0 + 99 * S}&end={T0 + 101 * S + 1}",
        f"/v1/quotes?symbol=BTCUSDT&start={T0}&end={T0 + 100 * S}",
        # No file holds this window: DuckDB answers it over an empty relation.
        f"/v1/trades?symbol=ETHUSDT&start={T0 + 500 * S}&end={T0 + 600 * S}",
    ]
    async with running(tmp_path, query=HOT) as s:
        await hot_loaded(s)
        held = s.pool.index.hot.files
        before = hot_reads(s)
        from_memory = [await s.client.get(u) for u in urls]
        served = hot_reads(s) - before
        cursor = from_memory[1].json()["meta"]["next_cursor"]
        second = await s.client.get(f"{urls[1]}&cursor={cursor}")
        after_second = hot_reads(s) - before
        # The same requests with nothing held: DuckDB reads the files.
        s.pool.index.hot.max_bytes = 0
        s.pool.index.hot.plan({})
        assert s.pool.index.hot.files == 0
        from_files = [await s.client.get(u) for u in urls]
        second_again = await s.client.get(f"{urls[1]}&cursor={cursor}")
        after_all = hot_reads(s) - before
    assert held == 4  # three trade files and one quote file
    assert all(r.status_code == 200 for r in from_memory + from_files)
    assert served == len(urls) - 1 == after_second == after_all
    assert [r.content for r in from_memory] == [r.content for r in from_files]
    assert second.content == second_again.content
    pages = [r.json() for r in from_memory]
    assert [len(p["data"]) for p in pages] == [17, 37, 150, 297, 4, 43, 0]
    assert pages[3]["data"][49]["trade_conditions"] == ["x"]  # trade 50


async def test_the_hot_tier_holds_the_newest_files_that_fit_its_bytes(tmp_path: Path) -> None:
    # A file of 100 trades takes about 16 KB in memory: two fit, three do not.
    budget = 40_000
    query = QueryConfig(timeout=10.0, hot_bytes=budget)
    async with running(tmp_path, query=query, seed=False) as s:
        files = []
        for trade_ids in (range(1, 101), range(101, 201), range(201, 301)):
            committed = await s.append(TRADES, btc(trade_ids))
            files.extend(f.path.removeprefix("file://") for f in committed.files)
            await hot_loaded(s)
        held = sorted(s.pool.index.hot.paths)
        held_bytes = s.metrics.registry.get_sample_value("k2d_query_hot_bytes")
        before = hot_reads(s)
        newest = await get_json(
            s.client, f"/v1/trades?symbol=BTCUSDT&start={T0 + 250 * S}&end={T0 + 400 * S}"
        )
        newest_reads = hot_reads(s) - before
        oldest = await get_json(s.client, f"/v1/trades?symbol=BTCUSDT&start={T0}&end={T0 + 50 * S}")
        oldest_reads = hot_reads(s) - before - newest_reads
    assert held == sorted(files[1:])
    assert held_bytes is not None and 0 < held_bytes <= budget
    assert (newest_reads, oldest_reads) == (1, 0)
    assert ids(newest["data"]) == [f"BINANCE:BTCUSDT:trade:{i}" for i in range(250, 301)]
    assert ids(oldest["data"]) == [f"BINANCE:BTCUSDT:trade:{i}" for i in range(1, 50)]


async def test_a_file_that_cannot_be_loaded_into_memory_is_left_to_duckdb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tried: list[str] = []
    read = HotFile.read

    def unreadable_first(path: str, table: str) -> HotFile:
        tried.append(path)
        if len(tried) == 1:
            raise OSError("the first file cannot be read")
        return read(path, table)

    monkeypatch.setattr(HotFile, "read", staticmethod(unreadable_first))
    async with running(tmp_path, query=HOT, seed=False) as s:
        for trade_ids in (range(1, 101), range(101, 201)):
            await s.append(TRADES, btc(trade_ids))
            await hot_loaded(s)
        before = hot_reads(s)
        first = await get_json(s.client, f"/v1/trades?symbol=BTCUSDT&start={T0}&end={T0 + 100 * S}")
        reads = hot_reads(s) - before
    # The failed file was not tried again; the next one is held, and DuckDB read the first.
    assert len(tried) == 2 and tried[0] != tried[1]
    assert reads == 0
    assert ids(first["data"]) == [f"BINANCE:BTCUSDT:trade:{i}" for i in range(1, 100)]
    assert "could not be loaded into memory" in caplog.text


async def test_minute_bars_kept_in_memory_answer_as_duckdb_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ETH's trades are all in the first file: its minute bars are whole there. BTC's minute
    # 1 is cut by the files (trades 100 and 101), so its bars are merged by DuckDB.
    day = f"start={T0}&end={T0 + 600 * S}"
    urls = [
        f"/v1/ohlcv/1m?symbol=ETHUSDT&{day}",
        f"/v1/ohlcv/1m?symbol=ETHUSDT&{day}&limit=2",
        f"/v1/ohlcv/1m?symbol=BTCUSDT&{day}",
        f"/v1/ohlcv/1m?symbol=ETHUSDT&start={T0 + 30 * S}&end={T0 + 600 * S}",  # a cut minute
        f"/v1/ohlcv/5m?symbol=ETHUSDT&{day}",
    ]
    async with running(tmp_path) as s:
        await bars_ahead_done(s)
        before = hot_reads(s)
        from_memory = [await s.client.get(u) for u in urls]
        served = hot_reads(s) - before
        monkeypatch.setattr(execute, "_from_memory", lambda p: None)
        by_duckdb = [await s.client.get(u) for u in urls]
    assert served == 2
    assert all(r.status_code == 200 for r in from_memory + by_duckdb)
    assert [r.content for r in from_memory] == [r.content for r in by_duckdb]
    eth = from_memory[0].json()
    assert [b["trade_count"] for b in eth["data"]] == [29, 30, 30, 11]
    assert eth["data"][0]["bar_start"] == "2024-03-01T00:00:00.000000Z"
    assert from_memory[1].json()["meta"]["truncated"] is True


async def test_the_hot_tier_follows_a_compaction(tmp_path: Path) -> None:
    url = f"/v1/trades?symbol=BTCUSDT,ETHUSDT&start={T0}&end={T0 + 400 * S}&limit=1000"
    async with running(tmp_path, query=HOT) as s:
        await hot_loaded(s)
        quote_files = {e.path for e in s.pool.index.current(QUOTES).entries}
        held_before = s.pool.index.hot.paths
        before = await get_json(s.client, url)
        report = await anyio.to_thread.run_sync(
            lambda: TableMaintenance(s.wh, MaintenanceConfig(min_files_to_compact=2)).run(
                [TRADES], expire=False
            )
        )
        await announce_replace(s, rows=0)  # the Maintainer's
        await hot_loaded(s)
        compacted = {e.path for e in s.pool.index.current(TRADES).entries}
        held_after = s.pool.index.hot.paths
        reads = hot_reads(s)
        after = await get_json(s.client, url)
        served = hot_reads(s) - reads
    assert [(c.files_before, c.files_after) for c in report.compactions] == [(3, 1)]
    assert quote_files <= held_before and len(held_before) == 4
    assert held_after == compacted | quote_files and not compacted & held_before
    assert served == 1
    assert after["data"] == before["data"]


async def test_a_page_from_memory_that_fails_is_answered_by_duckdb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"/v1/ohlcv/1m?symbol=ETHUSDT&start={T0}&end={T0 + 600 * S}"
    async with running(tmp_path) as s:
        await bars_ahead_done(s)
        from_memory = await s.client.get(url)

        def broken(*args: Any) -> None:
            raise RuntimeError("a bug in the shortcut")

        monkeypatch.setattr(execute, "json_rows", broken)
        before = hot_reads(s)
        answered = await s.client.get(url)
        served = hot_reads(s) - before
    assert answered.status_code == 200
    assert answered.content == from_memory.content
    assert served == 0
    assert "a page from memory failed" in caplog.text
