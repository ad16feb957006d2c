"""/v1/stream and /v1/replay end to end: a real uvicorn server on 127.0.0.1, the QueryPool over
real Iceberg tables in tmp_path, the LiveHub and Fanout in process (fed as the trackers and
the writer feed them), and clients written with the `websockets` library, whose every
message is decoded strictly with the protocol's Structs."""

from __future__ import annotations

import hashlib
import itertools
import json
import socket
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
import websockets
from anyio.streams.memory import MemoryObjectSendStream
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from actors.live_hub import Fanout, LiveHub
from actors.query_pool import QueryPool
from k2d.api import ApiServer, ApiState, create_app, serve
from k2d.api._stream_protocol import (
    Ack,
    End,
    Error,
    Gap,
    Pong,
    Quotes,
    ServerMessage,
    Trades,
    decode_server,
)
from k2d.config import (
    ApiConfig,
    LiveConfig,
    QueryConfig,
    StorageConfig,
    StreamConfig,
    TelemetryConfig,
)
from k2d.messages import Committed, SequencedBatch
from k2d.model import Quote, SequenceEvent, Trade, now_us
from k2d.runtime import Registry
from k2d.storage import (
    QUOTES,
    SEQUENCE_EVENTS,
    TRADES,
    Warehouse,
    events_to_arrow,
    quotes_to_arrow,
    trades_to_arrow,
)
from k2d.telemetry.metrics import Metrics
from k2d.telemetry.tracing import Tracing, setup_tracing

S = 1_000_000
BTC = "trades:BINANCE:BTCUSDT"
ETH = "trades:BINANCE:ETHUSDT"
QBTC = "quotes:BINANCE:BTCUSDT"
_BUILD = {TRADES: trades_to_arrow, QUOTES: quotes_to_arrow, SEQUENCE_EVENTS: events_to_arrow}


def trade(i: int, ts: int, symbol: str = "BTCUSDT", provenance: str = "live") -> Trade:
    return Trade(
        message_id=f"BINANCE:{symbol}:trade:{i}",
        trade_id=str(i),
        symbol=symbol,
        exchange="BINANCE",
        asset_class="crypto",
        timestamp=ts,
        price=f"{100 + i % 7}.{i % 10}5000000",
        quantity="0.50000000",
        currency="USDT",
        side="BUY" if i % 2 else "SELL",
        source_sequence=i,
        ingestion_timestamp=ts + 5,
        platform_sequence=i,
        provenance=provenance,
    )


def quote(i: int, ts: int) -> Quote:
    return Quote(
        message_id=f"BINANCE:BTCUSDT:quote:{i}",
        symbol="BTCUSDT",
        exchange="BINANCE",
        asset_class="crypto",
        timestamp=ts,
        bid_price="100.10000000",
        bid_quantity="1.00000000",
        ask_price="100.30000000",
        ask_quantity="2.00000000",
        currency="USDT",
        source_sequence=i,
        ingestion_timestamp=ts,
        platform_sequence=i,
    )


def gap_event(first: int, last: int, status: str, at: int) -> SequenceEvent:
    return SequenceEvent(
        event_id=f"BINANCE:BTCUSDT:trade:gap:{first}",
        exchange="BINANCE",
        symbol="BTCUSDT",
        stream="trade",
        partition=0,
        kind="gap",
        status=status,
        first_missing=first,
        last_missing=last,
        missing_count=last - first + 1,
        detected_at=at,
        resolved_at=at if status != "open" else None,
        recorded_at=at,
    )


@dataclass
class Rig:
    """The daemon's query and live side, fed by hand: `ingest` is a tracker's batch reaching
    the hub, `commit` the writer's commit of some batches reaching the pool, then the hub."""

    wh: Warehouse
    pool: QueryPool
    hub: LiveHub
    fanout: Fanout
    state: ApiState
    metrics: Metrics
    server: ApiServer
    inbox: MemoryObjectSendStream[Committed]
    batches: dict[int, SequencedBatch] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def url(self) -> str:
        return self.server.url.replace("http://", "ws://") + "/v1/stream"

    def ingest(
        self,
        trades: Sequence[Trade] = (),
        quotes: Sequence[Quote] = (),
        events: Sequence[SequenceEvent] = (),
    ) -> int:
        b = SequencedBatch(
            batch_id=next(self.ids),
            partition=0,
            trades=list(trades),
            quotes=list(quotes),
            events=list(events),
            dead_letters=[],
            watermarks={},
        )
        self.batches[b.batch_id] = b
        self.hub.add(b)
        return b.batch_id

    async def commit(self, *batch_ids: int) -> None:
        """One flush: every table with rows, the ledger last, as the writer commits."""
        batches = [self.batches.pop(i) for i in batch_ids]
        for table, rows in (
            (QUOTES, [q for b in batches for q in b.quotes]),
            (TRADES, [t for b in batches for t in b.trades]),
            (SEQUENCE_EVENTS, [e for b in batches for e in b.events]),
        ):
            if not rows:
                continue
            result = await anyio.to_thread.run_sync(self.wh.append, table, _BUILD[table](rows), {})
            msg = Committed(
                table=table,
                snapshot_id=result.snapshot_id,
                files=result.files,
                batch_ids=tuple(batch_ids),
                rows=result.rows,
                committed_at=now_us(),
            )
            await self.inbox.send(msg)  # the pool hears first, as from the writer's outbox
            await self.pool.catch_up()
            self.hub.committed(msg)

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels or None)
        return float(value or 0.0)


@asynccontextmanager
async def streaming(
    tmp_path: Path,
    *,
    stream: StreamConfig | None = None,
    api: ApiConfig | None = None,
    tracing: Tracing | None = None,
) -> AsyncIterator[Rig]:
    wh = await anyio.to_thread.run_sync(Warehouse, StorageConfig(data_dir=str(tmp_path / "data")))
    await anyio.to_thread.run_sync(wh.ensure_tables)
    registry = Registry()
    metrics = Metrics(registry)
    pool = QueryPool(wh, QueryConfig(timeout=10.0), metrics)
    fanout = Fanout(tracing.tracer if tracing is not None else None)
    hub = LiveHub(LiveConfig(), metrics, fanout)
    api_cfg = api or ApiConfig(port=0, rate_limit=0)
    state = ApiState(
        registry=registry,
        metrics=metrics,
        stats=_no_stats,
        config=api_cfg,
        query_pool=pool,
        live_hub=hub,
        fanout=fanout,
        stream=stream or StreamConfig(),
        tracing=tracing,
    )
    server = serve(create_app(state), api_cfg)
    send, recv = anyio.create_memory_object_stream[Committed](64)
    await pool.on_start()
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.run, recv, None)
        await tg.start(server.run)
        try:
            yield Rig(wh, pool, hub, fanout, state, metrics, server, send)
        finally:
            await server.stop()
            send.close()
    wh.close()


async def _no_stats() -> dict[str, Any]:
    return {}


class Client:
    """A stream client on the `websockets` library; every message decoded strictly."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.raw: list[str | bytes] = []

    async def send(self, **op: Any) -> None:
        await self.ws.send(json.dumps(op))

    async def recv(self, wait: float = 10.0) -> ServerMessage:
        with anyio.fail_after(wait):
            data = await self.ws.recv()
        self.raw.append(data)
        return decode_server(data)

    async def closed(self) -> ConnectionClosed:
        """Read until the server closes; the close (its code in `.rcvd`)."""
        while True:
            try:
                await self.recv()
            except ConnectionClosed as exc:
                return exc

    async def until(self, done: Any, wait: float = 10.0) -> list[ServerMessage]:
        out: list[ServerMessage] = []
        with anyio.fail_after(wait):
            while True:
                msg = await self.recv(wait)
                out.append(msg)
                if done(msg, out):
                    return out


@asynccontextmanager
async def client(
    url: str, *, headers: dict[str, str] | None = None, sock: socket.socket | None = None
) -> AsyncIterator[Client]:
    async with websockets.connect(
        url, additional_headers=headers, proxy=None, compression=None, sock=sock
    ) as ws:
        yield Client(ws)


def rows_of(messages: Sequence[ServerMessage], channel: str | None = None) -> list[Any]:
    return [
        r
        for m in messages
        if isinstance(m, Trades | Quotes) and (channel is None or m.channel == channel)
        for r in m.rows
    ]


def seqs(rows: Sequence[Any]) -> list[int]:
    return [r.source_sequence for r in rows]


async def test_a_subscriber_gets_live_rows_of_its_channels_in_order(tmp_path: Path) -> None:
    async with streaming(tmp_path) as rig, client(rig.url) as c:
        await c.send(op="subscribe", channels=[BTC, QBTC], id=1)
        ack = await c.recv()
        assert ack == Ack(op="subscribe", id=1, channels=[BTC, QBTC])
        now = now_us()
        for n in range(20):
            ids = range(n * 5, n * 5 + 5)
            rig.ingest(
                [trade(i, now + i) for i in ids] + [trade(i, now + i, "ETHUSDT") for i in ids],
                [quote(i, now + i) for i in ids],
            )
            await anyio.sleep(0.005)
        msgs = await c.until(
            lambda m, out: len(rows_of(out, BTC)) >= 100 and len(rows_of(out, QBTC)) >= 100
        )
        assert seqs(rows_of(msgs, BTC)) == list(range(100))
        assert seqs(rows_of(msgs, QBTC)) == list(range(100))
        assert not rows_of(msgs, ETH)
        first = rows_of(msgs, BTC)[0]
        # The REST row's field names and renderings.
        assert first.price == "100.05000000" and first.timestamp.endswith("Z")
        await c.send(op="ping", id="p")
        pong = await c.recv()
        assert isinstance(pong, Pong) and pong.id == "p"
        assert rig.sample("k2d_ws_clients") == 1
        assert rig.sample("k2d_ws_subscriptions") == 2


async def test_since_joins_history_to_live_once_each_while_commits_land(tmp_path: Path) -> None:
    """Stored rows, the hub's uncommitted rows and live rows, with commits and a backfill
    landing during the catch-up: every id exactly once, live rows in sequence order."""
    stream = StreamConfig(page_rows=40)  # many pages: commits land between them
    async with streaming(tmp_path, stream=stream) as rig:
        t0 = now_us() - 60 * S
        missing = {100, 101, 102}
        for lo in range(0, 300, 50):
            b = rig.ingest(
                [trade(i, t0 + i * 1_000) for i in range(lo, lo + 50) if i not in missing]
            )
            await rig.commit(b)
        pending = [rig.ingest([trade(i, t0 + i * 1_000) for i in range(300, 330)])]
        received: list[ServerMessage] = []

        async def writer() -> None:
            # Live batches keep coming and committing; the backfill of the gap commits too.
            for lo in range(330, 600, 10):
                pending.append(rig.ingest([trade(i, t0 + i * 1_000) for i in range(lo, lo + 10)]))
                if lo == 400:
                    backfill = [
                        trade(i, t0 + i * 1_000, provenance="backfill") for i in sorted(missing)
                    ]
                    pending.append(rig.ingest(backfill))
                if len(pending) >= 3:
                    await rig.commit(*pending)
                    pending.clear()
                await anyio.sleep(0.01)
            if pending:
                await rig.commit(*pending)

        async with client(rig.url) as c:
            await c.send(op="subscribe", channels=[BTC], since="-5m", id=9)
            async with anyio.create_task_group() as tg:
                tg.start_soon(writer)
                received = await c.until(lambda m, out: len(rows_of(out, BTC)) >= 600, wait=30)
            with pytest.raises(TimeoutError):
                await c.recv(wait=0.5)  # and nothing more
        ack = received[0]
        assert isinstance(ack, Ack) and ack.since is not None
        rows = rows_of(received, BTC)
        ids = seqs(rows)
        assert sorted(ids) == list(range(600)), "every id, once"
        live = [r.source_sequence for r in rows if r.provenance != "backfill"]
        assert live == sorted(live), "in sequence order"
        assert {r.source_sequence for r in rows if r.provenance == "backfill"} == missing


async def test_gap_markers_come_with_the_rows_that_fill_them(tmp_path: Path) -> None:
    async with streaming(tmp_path) as rig, client(rig.url) as c:
        await c.send(op="subscribe", channels=[BTC])
        await c.recv()
        now = now_us()
        b1 = rig.ingest([trade(1, now), trade(4, now + 3)], events=[gap_event(2, 3, "open", now)])
        await rig.commit(b1)
        b2 = rig.ingest(
            [trade(2, now + 1, provenance="backfill"), trade(3, now + 2, provenance="backfill")]
        )
        b3 = rig.ingest(events=[gap_event(2, 3, "backfilled", now + 10)])
        await rig.commit(b2, b3)
        msgs = await c.until(lambda m, out: isinstance(m, Gap) and m.status == "backfilled")
    kinds = [
        (type(m).__name__, getattr(m, "status", None), seqs(getattr(m, "rows", []))) for m in msgs
    ]
    assert kinds == [
        ("Trades", None, [1, 4]),
        ("Gap", "open", []),
        ("Trades", None, [2, 3]),
        ("Gap", "backfilled", []),
    ]
    assert {r.provenance for r in rows_of(msgs[2:3])} == {"backfill"}
    gap = msgs[1]
    assert isinstance(gap, Gap) and (gap.first_missing, gap.last_missing) == (2, 3)


async def test_messagepack_on_request(tmp_path: Path) -> None:
    async with streaming(tmp_path) as rig, client(rig.url) as c:
        await c.send(op="subscribe", channels=[BTC], encoding="msgpack", id=1)
        ack = await c.recv()
        assert isinstance(c.raw[-1], bytes) and isinstance(ack, Ack) and ack.encoding == "msgpack"
        now = now_us()
        rig.ingest([trade(i, now + i) for i in range(30)])
        msgs = await c.until(lambda m, out: len(rows_of(out)) >= 30)
        assert all(isinstance(r, bytes) for r in c.raw)
        assert seqs(rows_of(msgs)) == list(range(30))


async def test_waiting_batches_are_joined_and_encoded_once_for_all(tmp_path: Path) -> None:
    async with (
        streaming(tmp_path) as rig,
        client(rig.url) as a,
        client(rig.url) as b,
        client(rig.url) as c,
    ):
        for x in (a, b, c):
            await x.send(op="subscribe", channels=[BTC])
            await x.recv()
        now = now_us()
        # Idle: a batch goes out at once, alone.
        started = time.perf_counter()
        rig.ingest([trade(0, now)])
        first = await a.recv()
        assert seqs(rows_of([first])) == [0] and time.perf_counter() - started < 0.5
        await b.recv()
        await c.recv()
        encoded = rig.sample("k2d_ws_encoded_batches_total", encoding="json")
        # 50 batches while the connections are busy: joined into a few messages.
        for n in range(1, 51):
            rig.ingest([trade(n, now + n)])
        got = [await x.until(lambda m, out: len(rows_of(out)) >= 50) for x in (a, b, c)]
        for msgs in got:
            assert seqs(rows_of(msgs)) == list(range(1, 51))
            assert len(msgs) < 10
        # Each batch encoded once, whatever the number of subscribers; same bytes to all.
        assert rig.sample("k2d_ws_encoded_batches_total", encoding="json") - encoded == 50
        assert a.raw == b.raw == c.raw


def _small_buffer_socket(url: str) -> socket.socket:
    """A client socket that buffers little, so a client that stops reading is behind at once."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4_096)
    sock.connect((host, int(port)))
    return sock


async def test_a_client_that_stops_reading_is_closed_and_nobody_waits_for_it(
    tmp_path: Path,
) -> None:
    stream = StreamConfig(queue_messages=50, queue_bytes=256 * 1024, close_timeout=3.0)
    async with streaming(tmp_path, stream=stream) as rig:
        async with (
            client(rig.url, sock=_small_buffer_socket(rig.url)) as slow,
            client(rig.url) as fast,
        ):
            for x in (slow, fast):
                await x.send(op="subscribe", channels=[BTC])
                await x.recv()
            now = now_us()
            stalled_at = time.monotonic()
            closed_after: float | None = None
            publish_times: list[float] = []
            received: list[ServerMessage] = []

            async def read_fast() -> None:
                received.extend(
                    await fast.until(lambda m, out: len(rows_of(out)) >= 20_000, wait=30)
                )

            async with anyio.create_task_group() as tg:
                tg.start_soon(read_fast)
                for n in range(200):  # 100 rows every 10 ms for 2 s
                    ids = range(n * 100, n * 100 + 100)
                    t = time.perf_counter()
                    rig.ingest([trade(i, now + i) for i in ids])
                    publish_times.append(time.perf_counter() - t)
                    if closed_after is None and rig.sample("k2d_ws_slow_closed_total") == 1:
                        closed_after = time.monotonic() - stalled_at
                    await anyio.sleep(0.01)
            assert seqs(rows_of(received)) == list(range(20_000)), "the other client got it all"
            assert closed_after is not None and closed_after < 5.0, closed_after
            # Publishing that waited for the stalled client would be slow from the stall until
            # its close (half of the 200 publishes or more); a loaded box may stall the
            # process a couple of times on its own, which this allows.
            slow_publishes = sorted(t for t in publish_times if t >= 0.05)
            assert len(slow_publishes) <= 3, f"publishing waited: {slow_publishes}"
            # The slow client, reading again, finds why it was closed.
            closed = await slow.closed()
            assert closed.rcvd is not None and closed.rcvd.code == 4408
            last = decode_server(slow.raw[-1])
            assert isinstance(last, Error) and last.code == "slow_consumer"
        with anyio.fail_after(5):
            while rig.sample("k2d_ws_clients") != 0:
                await anyio.sleep(0.05)


async def _refused(url: str, code: int, error: str, **kw: Any) -> None:
    async with client(url, **kw) as c:
        closed = await c.closed()
        assert closed.rcvd is not None and closed.rcvd.code == code
        last = decode_server(c.raw[-1])
        assert isinstance(last, Error) and last.code == error


async def test_every_limit_answers_with_an_error_then_its_close_code(tmp_path: Path) -> None:
    stream = StreamConfig(
        max_subscriptions=2, max_message_bytes=256, max_connections_per_key=2, max_connections=3
    )
    async with streaming(tmp_path, stream=stream) as rig:
        async with client(rig.url) as c:
            await c.send(op="subscribe", channels=[BTC, ETH, QBTC])
            closed = await c.closed()
            assert closed.rcvd is not None and closed.rcvd.code == 4422
            assert decode_server(c.raw[-1]).code == "too_many_subscriptions"  # type: ignore[union-attr]
        async with client(rig.url) as c:
            await c.send(op="ping", padding="x" * 300)
            closed = await c.closed()
            assert closed.rcvd is not None and closed.rcvd.code == 4413
            assert decode_server(c.raw[-1]).code == "message_too_large"  # type: ignore[union-attr]
        async with client(rig.url) as c:
            # A malformed message is answered, and the connection stays.
            await c.send(op="subscribe", channels=["nope"])
            err = await c.recv()
            assert isinstance(err, Error) and err.code == "invalid_channel"
            await c.ws.send("{not json")
            err = await c.recv()
            assert isinstance(err, Error) and err.code == "invalid_message"
            await c.send(op="pause")
            err = await c.recv()
            assert isinstance(err, Error) and err.code == "no_replay"
            await c.send(op="ping")
            assert isinstance(await c.recv(), Pong)
            async with client(rig.url) as c2:
                await c2.send(op="ping")
                await c2.recv()
                await _refused(rig.url, 4429, "too_many_connections")
        keyed = ApiConfig(port=0, rate_limit=0, api_keys=(hashlib.sha256(b"k1").hexdigest(),))
    async with streaming(tmp_path / "b", stream=stream, api=keyed) as rig:
        await _refused(rig.url, 4401, "unauthorized")
        await _refused(rig.url, 4401, "unauthorized", headers={"X-API-Key": "wrong"})
        async with client(rig.url, headers={"X-API-Key": "k1"}) as c:
            await c.send(op="ping")
            assert isinstance(await c.recv(), Pong)
    few = StreamConfig(max_connections=2, max_connections_per_key=10)
    async with (
        streaming(tmp_path / "c", stream=few) as rig,
        client(rig.url) as a,
        client(rig.url) as b,
    ):
        for x in (a, b):
            await x.send(op="ping")
            await x.recv()
        await _refused(rig.url, 4503, "server_full")
        assert rig.sample("k2d_ws_refused_total", code="server_full") == 1


async def _seed_window(rig: Rig, t0: int, seconds: int) -> None:
    """Trades of two symbols and quotes, 20 per second each, and a gap in the ledger."""
    step = S // 20
    n = seconds * 20
    btc = [trade(i, t0 + i * step) for i in range(n) if i not in (40, 41)]
    eth = [trade(i, t0 + i * step + step // 2, "ETHUSDT") for i in range(n)]
    quotes = [quote(i, t0 + i * step + step // 4) for i in range(n)]
    b = rig.ingest(btc + eth, quotes, [gap_event(40, 41, "open", t0 + 3 * S)])
    await rig.commit(b)


async def test_replay_is_paced_merged_across_channels_and_marks_gaps(tmp_path: Path) -> None:
    async with streaming(tmp_path) as rig, client(rig.url) as c:
        t0 = now_us() - 3_600 * S
        await _seed_window(rig, t0, 5)
        started = time.monotonic()
        await c.send(
            op="replay",
            channels=[BTC, ETH, QBTC],
            start=t0 // 1_000,
            end=(t0 + 5 * S) // 1_000,
            speed=10,
            id="r",
        )
        msgs = await c.until(lambda m, out: isinstance(m, End | Error))
        took = time.monotonic() - started
    assert isinstance(msgs[0], Ack) and msgs[0].speed == "10"
    assert msgs[-1] == End(reason="replay_done", id="r")
    assert 0.3 < took < 2.0, f"5 s of data at speed 10 took {took:.2f}s"
    rows = rows_of(msgs)
    assert len(rows) == 100 * 3 - 2
    stamps = [r.timestamp for r in rows]
    assert stamps == sorted(stamps), "across channels in time order"
    gaps = [m for m in msgs if isinstance(m, Gap)]
    assert [(g.first_missing, g.last_missing, g.status) for g in gaps] == [(40, 41, "open")]
    # The gap's marker comes where the rows stop: after trade 39, before trade 42.
    position = msgs.index(gaps[0])
    before = seqs(rows_of(msgs[:position], BTC))
    assert before[-1] == 39 and seqs(rows_of(msgs[position:], BTC))[0] == 42


async def test_replay_pause_resume_and_seek(tmp_path: Path) -> None:
    async with streaming(tmp_path) as rig, client(rig.url) as c:
        t0 = now_us() - 3_600 * S
        await _seed_window(rig, t0, 20)
        await c.send(
            op="replay", channels=[BTC], start=t0 // 1_000, end=(t0 + 20 * S) // 1_000, speed="10"
        )
        await c.recv()
        await anyio.sleep(0.3)
        await c.send(op="pause", id=1)
        before = await c.until(lambda m, out: isinstance(m, Ack))
        paused_at = before[-1]
        assert isinstance(paused_at, Ack) and paused_at.op == "pause" and paused_at.at is not None
        with pytest.raises(TimeoutError):
            await c.recv(wait=0.6)  # nothing while paused
        await c.send(op="resume", id=2)
        await c.until(lambda m, out: isinstance(m, Ack) and m.op == "resume")
        seek_to = t0 + 15 * S
        await c.send(op="seek", to=seek_to // 1_000, id=3)
        rest = await c.until(lambda m, out: isinstance(m, Ack) and m.op == "seek")
        after = await c.until(lambda m, out: isinstance(m, End))
    played = seqs(rows_of(before))
    assert played and played == sorted(played) and played[-1] < 15 * 20
    resumed = seqs(rows_of(rest))
    assert all(played[-1] < s for s in resumed)
    sought = seqs(rows_of(after))
    assert sought[0] == 15 * 20 and sought[-1] == 20 * 20 - 1
    assert sought == list(range(300, 400))


async def test_replay_over_http_is_ndjson_of_the_same_messages(tmp_path: Path) -> None:
    async with streaming(tmp_path) as rig:
        t0 = now_us() - 3_600 * S
        await _seed_window(rig, t0, 2)
        async with httpx.AsyncClient(base_url=rig.server.url) as http:
            r = await http.get(
                "/v1/replay",
                params={
                    "channel": [BTC, QBTC],
                    "start": str(t0 // 1_000),
                    "end": str((t0 + 2 * S) // 1_000),
                },
            )
            assert r.status_code == 200 and r.headers["content-type"].startswith(
                "application/x-ndjson"
            )
            msgs = [decode_server(line) for line in r.text.splitlines()]
            bad = await http.get("/v1/replay", params={"channel": "x", "start": "0", "end": "1"})
            assert bad.status_code == 400 and bad.json()["code"] == "invalid_channel"
    assert msgs[-1] == End(reason="replay_done")
    assert len(rows_of(msgs, BTC)) == 40 and len(rows_of(msgs, QBTC)) == 40


async def test_recent_quotes_merge_the_uncommitted(tmp_path: Path) -> None:
    async with streaming(tmp_path) as rig:
        now = now_us()
        await rig.commit(rig.ingest(quotes=[quote(i, now - 10 * S + i) for i in range(5)]))
        rig.ingest(quotes=[quote(i, now - 5 * S + i) for i in range(5, 8)])
        async with httpx.AsyncClient(base_url=rig.server.url) as http:
            r = await http.get("/v1/quotes/recent", params={"symbol": "BTCUSDT", "window": "1m"})
        body = r.json()
        assert r.status_code == 200, body
        assert [q["source_sequence"] for q in body["data"]] == list(range(8))
        assert body["meta"]["live_rows"] == 3 and body["meta"]["table"] == "quotes"


async def test_the_protocol_document_is_served_beside_the_openapi(tmp_path: Path) -> None:
    async with streaming(tmp_path) as rig, httpx.AsyncClient(base_url=rig.server.url) as http:
        doc = (await http.get("/schema/asyncapi.json")).json()
    assert doc["asyncapi"].startswith("3.")
    assert doc["channels"]["stream"]["address"] == "/v1/stream"
    messages = set(doc["components"]["messages"])
    assert {"Subscribe", "Replay", "Seek", "Trades", "Quotes", "Gap", "End", "Error"} <= messages
    assert doc["info"]["x-close-codes"]["4408"]["error"] == "slow_consumer"


async def test_each_published_batch_is_a_ws_send_span(tmp_path: Path) -> None:
    tracing = setup_tracing(TelemetryConfig(span_ring_size=256))
    parent = tracing.tracer.start_span("sequence.check")
    parent.end()
    async with (
        streaming(tmp_path, tracing=tracing) as rig,
        client(rig.url) as a,
        client(rig.url) as b,
    ):
        for c in (a, b):
            await c.send(op="subscribe", channels=[BTC])
            await c.recv()
        rig.hub.add(
            SequencedBatch(
                batch_id=99,
                partition=0,
                trades=[trade(1, now_us()), trade(2, now_us())],
                quotes=[],
                events=[],
                dead_letters=[],
                watermarks={},
                span_context=parent.get_span_context(),
            )
        )
        await a.recv()
        await b.recv()
    spans = [s for s in tracing.recent_spans(256) if s["name"] == "ws.send"]
    assert len(spans) == 1, "one span per batch of a channel, whatever the subscribers"
    attrs = spans[0]["attributes"]
    assert (attrs["k2d.ws.rows"], attrs["k2d.ws.subscribers"]) == (2, 2)
    assert spans[0]["links"][0]["span_id"] == format(parent.get_span_context().span_id, "016x")
