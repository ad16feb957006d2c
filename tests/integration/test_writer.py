"""IcebergWriter on real Iceberg tables, and a table surviving SIGKILL mid-commit."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import anyio
import msgspec
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext

from actors.writer import IcebergWriter
from k2d.config import StorageConfig, WriterConfig
from k2d.messages import Committed, SequencedBatch, Watermark
from k2d.model import DeadLetter, Quote, SequenceEvent, Trade
from k2d.runtime import Outbox
from k2d.storage import (
    BATCH_IDS,
    FLUSH,
    LOG_POSITION,
    TABLE_NAMES,
    WATERMARKS,
    Warehouse,
    trades_to_arrow,
)
from k2d.telemetry.metrics import Metrics

T0 = 1_700_000_000_000_000
KEY_T = "BINANCE:BTCUSDT:trade"
KEY_Q = "BINANCE:BTCUSDT:quote"


def trades(start: int, n: int) -> list[Trade]:
    return [
        Trade(
            message_id=f"BINANCE:BTCUSDT:trade:{i}",
            trade_id=str(i),
            symbol="BTCUSDT",
            exchange="BINANCE",
            asset_class="crypto",
            timestamp=T0 + i,
            price="100.5",
            quantity="0.25",
            currency="USDT",
            side="BUY",
            source_sequence=i,
            ingestion_timestamp=T0 + i,
            platform_sequence=i,
        )
        for i in range(start, start + n)
    ]


def quotes(start: int, n: int) -> list[Quote]:
    return [
        Quote(
            message_id=f"BINANCE:BTCUSDT:quote:{i}",
            symbol="BTCUSDT",
            exchange="BINANCE",
            asset_class="crypto",
            timestamp=T0 + i,
            bid_price="100",
            bid_quantity="1",
            ask_price="101",
            ask_quantity="2",
            currency="USDT",
            source_sequence=i,
            ingestion_timestamp=T0 + i,
            platform_sequence=i,
        )
        for i in range(start, start + n)
    ]


def wm(seq: int) -> Watermark:
    return Watermark(last_sequence=seq, platform_sequence=seq, last_seen_us=T0 + seq)


def batch(
    batch_id: int,
    *,
    t: list[Trade] | None = None,
    q: list[Quote] | None = None,
    events: list[SequenceEvent] | None = None,
    dead: list[DeadLetter] | None = None,
    watermarks: dict[str, Watermark] | None = None,
    position: dict[str, object] | None = None,
    span_context: SpanContext | None = None,
) -> SequencedBatch:
    return SequencedBatch(
        batch_id=batch_id,
        partition=0,
        trades=t or [],
        quotes=q or [],
        events=events or [],
        dead_letters=dead or [],
        watermarks=watermarks or {},
        log_position=position,
        span_context=span_context,
    )


@pytest.fixture
def storage(tmp_path: Path) -> StorageConfig:
    return StorageConfig(data_dir=str(tmp_path), sqlite_busy_timeout_ms=20_000)


@pytest.fixture
def wh(storage: StorageConfig) -> Iterator[Warehouse]:
    with Warehouse(storage) as w:
        w.ensure_tables()
        yield w


def writer_cfg(**kw: float) -> WriterConfig:
    base: dict[str, float] = {"flush_rows": 1_000_000, "flush_interval": 60.0}
    return msgspec.convert(base | kw, WriterConfig)


class Harness:
    """A writer with a bounded inbox and a Committed stream, run in a task group."""

    def __init__(self, writer: IcebergWriter, inbox_size: int = 16) -> None:
        self.writer = writer
        self.send, self._recv = anyio.create_memory_object_stream[SequencedBatch](inbox_size)
        self._out_send, self.committed = anyio.create_memory_object_stream[Committed](1_000)
        self.outbox = Outbox[Committed]("writer.outbox", self._out_send)

    async def run(self) -> None:
        await self.writer.on_start()
        try:
            await self.writer.run(self._recv, self.outbox)
        finally:
            self.outbox.close()

    def drained(self) -> list[Committed]:
        out = []
        while True:
            try:
                out.append(self.committed.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream):
                return out


async def run_all(writer: IcebergWriter, batches: Sequence[SequencedBatch]) -> list[Committed]:
    h = Harness(writer)
    async with anyio.create_task_group() as tg:
        tg.start_soon(h.run)
        async with h.send:
            for b in batches:
                await h.send.send(b)
    return h.drained()


def snapshots(w: Warehouse, table: str) -> list[dict[str, str]]:
    return [dict(s.summary.additional_properties) for s in w.load_table(table).snapshots()]


def rows_in(w: Warehouse, table: str) -> int:
    return int(w.load_table(table).scan().to_arrow().num_rows)


async def test_flushes_by_rows_and_at_end_of_input(wh: Warehouse) -> None:
    writer = IcebergWriter(wh, writer_cfg(flush_rows=100), Metrics())
    batches = [batch(i, t=trades(i * 50, 50)) for i in range(1, 4)]
    committed = await run_all(writer, batches)
    assert [(c.table, c.batch_ids, c.rows) for c in committed] == [
        ("trades", (1, 2), 100),
        ("trades", (3,), 50),
    ]
    assert len(snapshots(wh, "trades")) == 2
    assert rows_in(wh, "trades") == 150


@pytest.mark.parametrize("rows", [50, 400])
async def test_flushes_by_bytes_before_rows_or_age(wh: Warehouse, rows: int) -> None:
    """Small tables (a feed's 10 ms batch) and large ones are both counted toward flush_bytes:
    with room for one and a half batches, every second batch flushes."""
    one_batch = trades_to_arrow(trades(0, rows)).nbytes
    writer = IcebergWriter(wh, writer_cfg(flush_bytes=int(one_batch * 1.5)), Metrics())
    batches = [batch(i, t=trades(i * rows, rows)) for i in range(1, 6)]
    committed = await run_all(writer, batches)
    assert [c.batch_ids for c in committed] == [(1, 2), (3, 4), (5,)]
    assert rows_in(wh, "trades") == 5 * rows


async def test_flushes_by_age_while_input_stays_open(wh: Warehouse) -> None:
    writer = IcebergWriter(wh, writer_cfg(flush_interval=0.2), Metrics())
    h = Harness(writer)
    async with anyio.create_task_group() as tg:
        tg.start_soon(h.run)
        started = time.monotonic()
        await h.send.send(batch(7, t=trades(0, 10)))
        with anyio.fail_after(10):
            first = await h.committed.receive()
        waited = time.monotonic() - started
        await h.send.aclose()
    assert (first.table, first.batch_ids, first.rows) == ("trades", (7,), 10)
    assert waited >= 0.2
    assert rows_in(wh, "trades") == 10


async def test_a_flush_is_one_commit_per_table_with_the_merged_state(wh: Warehouse) -> None:
    event = SequenceEvent(
        event_id="g1",
        exchange="BINANCE",
        symbol="BTCUSDT",
        stream="trade",
        partition=0,
        kind="gap",
        status="open",
        first_missing=3,
        last_missing=4,
        missing_count=2,
        detected_at=T0,
    )
    dead = DeadLetter(
        received_at=T0, source="binance", exchange="BINANCE", reason="parse", raw=b"{"
    )
    batches = [
        batch(
            1,
            t=trades(0, 5),
            q=quotes(0, 5),
            watermarks={KEY_T: wm(4), KEY_Q: wm(4)},
            position={"journal:a": 10, "journal:b": 5},
        ),
        batch(
            2, events=[event], dead=[dead], watermarks={KEY_T: wm(9)}, position={"journal:a": 20}
        ),
        batch(3, t=trades(10, 5)),
    ]
    writer = IcebergWriter(wh, writer_cfg(), Metrics())
    committed = await run_all(writer, batches)
    assert sorted(c.table for c in committed) == sorted(TABLE_NAMES)
    assert all(c.batch_ids == (1, 2, 3) for c in committed)
    assert {c.table: c.rows for c in committed} == {
        "trades": 10,
        "quotes": 5,
        "sequence_events": 1,
        "dead_letters": 1,
    }
    expected_wm = {KEY_T: wm(9), KEY_Q: wm(4)}
    for table in TABLE_NAMES:
        (props,) = snapshots(wh, table)
        assert msgspec.json.decode(props[WATERMARKS], type=dict[str, Watermark]) == expected_wm
        assert json.loads(props[LOG_POSITION]) == {"journal:a": 20, "journal:b": 5}
        assert json.loads(props[BATCH_IDS]) == {"count": 3, "min": 1, "max": 3}
        assert props[FLUSH] == "1"
    assert wh.latest_k2_state() == (expected_wm, {"journal:a": 20, "journal:b": 5})


async def test_committed_files_and_metrics(wh: Warehouse) -> None:
    metrics = Metrics()
    writer = IcebergWriter(wh, writer_cfg(), metrics)
    (c,) = await run_all(writer, [batch(1, t=trades(0, 20))])
    assert c.snapshot_id == wh.load_table("trades").current_snapshot().snapshot_id
    assert sum(f.record_count for f in c.files) == 20
    for f in c.files:
        assert await anyio.Path(f.path.removeprefix("file://")).exists()
    sample = metrics.registry.get_sample_value
    assert sample("k2d_commits_total", {"table": "trades"}) == 1
    assert sample("k2d_rows_committed_total", {"table": "trades"}) == 20
    assert sample("k2d_commit_seconds_count", {"table": "trades"}) == 1
    assert sample("k2d_commit_conflicts_total", {"table": "trades"}) is None


async def test_commit_span_links_to_the_batches(wh: Warehouse) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    contexts = []
    for _ in range(2):
        span = tracer.start_span("sequence.check")
        span.end()
        contexts.append(span.get_span_context())
    writer = IcebergWriter(wh, writer_cfg(), Metrics(), tracer)
    batches = [batch(i + 1, t=trades(i * 5, 5), span_context=ctx) for i, ctx in enumerate(contexts)]
    (c,) = await run_all(writer, batches)
    (commit,) = [s for s in exporter.get_finished_spans() if s.name == "writer.commit"]
    assert [link.context for link in commit.links] == contexts
    assert commit.attributes is not None
    assert commit.attributes["table"] == "trades"
    assert commit.attributes["rows"] == 10
    assert commit.attributes["snapshot_id"] == c.snapshot_id


async def test_a_restarted_writer_keeps_the_state_of_the_previous_one(wh: Warehouse) -> None:
    first = [batch(1, t=trades(0, 5), watermarks={KEY_T: wm(4)}, position={"journal:a": 1})]
    await run_all(IcebergWriter(wh, writer_cfg(), Metrics()), first)
    second = [batch(1, q=quotes(0, 5), watermarks={KEY_Q: wm(4)}, position={"journal:b": 2})]
    await run_all(IcebergWriter(wh, writer_cfg(), Metrics()), second)
    assert wh.snapshot_properties("quotes")[FLUSH] == "2"
    assert wh.latest_k2_state() == (
        {KEY_T: wm(4), KEY_Q: wm(4)},
        {"journal:a": 1, "journal:b": 2},
    )


async def test_the_least_recently_committed_table_commits_first(wh: Warehouse) -> None:
    writer = IcebergWriter(wh, writer_cfg(flush_rows=10), Metrics())
    batches = [batch(1, t=trades(0, 10)), batch(2, t=trades(10, 5), q=quotes(0, 5))]
    committed = await run_all(writer, batches)
    # Quotes had never been committed: a crash between the two commits of flush 2 then
    # leaves trades behind, whose state (flush 1) is the recent one.
    assert [(c.table, c.batch_ids) for c in committed] == [
        ("trades", (1,)),
        ("quotes", (2,)),
        ("trades", (2,)),
    ]


async def test_a_busy_writer_blocks_its_sender(wh: Warehouse, storage: StorageConfig) -> None:
    # Hold the catalog's write lock: the writer's first commit waits on SQLite's busy timeout.
    lock = sqlite3.connect(Path(storage.data_dir) / "catalog.db", isolation_level=None)
    writer = IcebergWriter(wh, writer_cfg(flush_rows=1), Metrics())
    h = Harness(writer, inbox_size=1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(h.run)
        lock.execute("BEGIN IMMEDIATE")
        try:
            with anyio.fail_after(10):
                for i in range(1, 4):
                    await h.send.send(batch(i, t=trades(i * 10, 1)))
            # Batch 1 is committing, batch 2 waits for it, batch 3 fills the inbox.
            with anyio.move_on_after(0.5) as blocked:
                await h.send.send(batch(4, t=trades(40, 1)))
            assert blocked.cancelled_caught
            assert h.drained() == []
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        with anyio.fail_after(10):
            await h.send.send(batch(4, t=trades(40, 1)))
        await h.send.aclose()
    assert rows_in(wh, "trades") == 4
    assert [c.batch_ids for c in h.drained()] == [(1,), (2,), (3,), (4,)]


async def test_a_failed_commit_crashes_the_writer_and_sends_nothing(wh: Warehouse) -> None:
    writer = IcebergWriter(wh, writer_cfg(), Metrics())
    h = Harness(writer)
    await writer.on_start()
    wh.catalog.drop_table(("market", "trades"))

    async def feed_one_batch() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run, h._recv, h.outbox)
            async with h.send:
                await h.send.send(batch(1, t=trades(0, 3)))

    with pytest.raises(ExceptionGroup) as info:
        await feed_one_batch()
    assert info.group_contains(Exception, match="trades")
    assert h.drained() == []


CHILD = """
import sys
import threading
from k2d.config import StorageConfig
from k2d.model import Trade
from k2d.storage import Warehouse, flush_properties, trades_to_arrow

T0 = 1_700_000_000_000_000
wh = Warehouse(StorageConfig(data_dir=sys.argv[1]))
wh.ensure_tables()
n = 0
while True:
    n += 1
    rows = [Trade(message_id=f"m{n}-{i}", trade_id=str(i), symbol="BTCUSDT", exchange="BINANCE",
                  asset_class="crypto", timestamp=T0 + n * 1000 + i, price="1", quantity="1",
                  currency="USDT", side="BUY", ingestion_timestamp=T0) for i in range(2000)]
    props = flush_properties(flush=n, tables=["trades"], watermarks={}, log_position={"n": n},
                             batch_ids=[n])
    wh.append("trades", trades_to_arrow(rows), props)
    print(n, flush=True)
"""


def test_sigkill_mid_commit_leaves_a_readable_table(storage: StorageConfig) -> None:
    rng = random.Random()
    reported: list[int] = []
    for _ in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, storage.data_dir],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            for _ in range(3):
                line = proc.stdout.readline()
                assert line, "child exited before committing"
                reported.append(int(line))
            # Land somewhere inside the next commit (each takes tens of milliseconds).
            time.sleep(rng.uniform(0.0, 0.08))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
    with Warehouse(storage) as w:
        w.ensure_tables()
        w.append("trades", trades_to_arrow(trades(0, 10)), {FLUSH: "999"})
        table = w.load_table("trades")
        added = sum(int(s.summary["added-records"]) for s in table.snapshots())
        assert table.scan().to_arrow().num_rows == added
        assert w.stats()["trades"]["rows"] == added
        flushes = [s.summary.additional_properties.get(FLUSH) for s in table.snapshots()]
        # Every commit the child reported is there (each child restarts its numbering at 1).
        assert flushes.count("1") == 2
        assert set(map(str, reported)) <= set(flushes)


def test_a_commit_waits_while_another_committer_has_its_turn(
    wh: Warehouse, storage: StorageConfig
) -> None:
    # Another process sharing the catalog (a Warehouse of its own: its own lock file handle).
    other = Warehouse(storage)
    results: list[int] = []
    thread = threading.Thread(
        target=lambda: results.append(
            other.append("trades", trades_to_arrow(trades(100, 10)), {FLUSH: "2"}).retries
        )
    )
    try:
        with wh.commit_turn("trades"):
            thread.start()
            thread.join(timeout=0.5)
            assert thread.is_alive(), "the other committer did not wait for its turn"
            # Meanwhile this committer's attempt lands on metadata nobody else has moved.
            wh.append("trades", trades_to_arrow(trades(0, 10)), {FLUSH: "1"})
        thread.join(timeout=30)
        assert results == [0], "it waited, so it met no conflict"
    finally:
        other.close()
    assert len(wh.load_table("trades").scan().to_arrow()) == 20


def test_a_turn_not_given_within_commit_lock_wait_is_not_waited_for(
    wh: Warehouse, storage: StorageConfig
) -> None:
    impatient = Warehouse(storage, writer_cfg(commit_lock_wait=0.3))
    try:
        with wh.commit_turn("trades"):
            started = time.monotonic()
            impatient.append("trades", trades_to_arrow(trades(0, 10)), {FLUSH: "1"})
            waited = time.monotonic() - started
    finally:
        impatient.close()
    assert 0.3 <= waited < 10
    assert len(wh.load_table("trades").scan().to_arrow()) == 10
