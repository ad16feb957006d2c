"""/v1/stream: live rows and replay over one WebSocket protocol, and GET /v1/replay (NDJSON).

A connection subscribes to channels (`trades:BINANCE:BTCUSDT`) in the process's Fanout
(actors/live_hub.py), which hands it each batch as published; the batch is encoded once per
channel and encoding and the same bytes are queued for every subscriber. Each connection
sends from its own queue in its own task: a row goes out at once when the connection is
idle, and what arrives while a send is in flight goes out joined into the next message. The
queue is bounded in messages and bytes (stream.queue_*): a client past either bound is
dropped from the Fanout at once, told `slow_consumer` and closed with 4408, so the ingest
path and the other clients never wait for it. The protocol: k2d/api/_stream_protocol.py,
docs/stream-protocol.md, /schema/asyncapi.json.

Joining history to live (`since`): the subscription is registered first with its live
batches held aside (bounded: stream.join_buffer_bytes), the live hub's uncommitted rows are
taken at that same instant, then the stored rows of the window are read through the query
pool in pages, merged with those uncommitted rows (each message_id once), and sent; rows
that went live after the subscription are skipped there (they are in the held batches),
then the held batches follow. So every row is sent once, and no row published before or
after the join is missed, whatever commits happen meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, cast

import anyio
import msgspec
from litestar import Request, get, websocket
from litestar.connection import WebSocket
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import Example
from litestar.params import Parameter
from litestar.response import Stream
from opentelemetry import trace

from k2d.api._access import CLIENT_KEY, AccessControl, access_responses, client_key
from k2d.api._errors import ApiError, ErrorBody
from k2d.api._state import ApiState, Published
from k2d.api._stream_protocol import (
    CLIENT_DECODER,
    CLOSE_CONNECTIONS,
    CLOSE_FULL,
    CLOSE_SLOW,
    CLOSE_SUBSCRIPTIONS,
    CLOSE_TOO_LARGE,
    CLOSE_UNAUTHORIZED,
    SPEEDS,
    Ack,
    Channel,
    Encoded,
    Encoding,
    End,
    Error,
    Gap,
    Pause,
    Ping,
    Pong,
    QuoteRow,
    Replay,
    Resume,
    Seek,
    ServerMessage,
    Subscribe,
    TradeRow,
    Unsubscribe,
    encode_gap,
    encode_message,
    encode_rows,
    gap_message,
    iso_us,
    join_frames,
    order_for_joining,
    parse_channel,
    parse_since,
    quote_row,
    trade_row,
)
from k2d.model import Quote, SequenceEvent, Trade, now_us
from k2d.query import (
    EXCHANGE_SYNTAX,
    SYMBOL_SYNTAX,
    Format,
    QueryError,
    QueryService,
    Window,
    WindowPlan,
    check_window,
    parse_time,
)

if TYPE_CHECKING:
    from anyio.abc import TaskGroup
    from litestar.types.asgi_types import WebSocketSendEvent

    from k2d.config import StreamConfig

__all__ = ["StreamService", "stream_handlers"]

log = logging.getLogger("k2d.api.stream")

_FUTURE_SLACK_US = 60_000_000
# Rows per encoded part of history and replay, and the rows bytes one message may carry
# (clients default to 1 MiB messages; `websockets` does).
_PART_ROWS = 100
_MAX_FRAME_BYTES = 256 * 1024
# A replay sends what is due within this tick of wall time together.
_TICK = 0.002
_END = 2**63 - 1
# The `channel` parameter of GET /v1/replay; stream_handlers() gives Litestar the one with
# the configured bound (signature_namespace), for the OpenAPI document.
_Channels = list[str]
_RETRY = (429, 503)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)


def parse_iso_us(text: str) -> int:
    """The inverse of iso_us (rows rendered by the server)."""
    return (datetime.fromisoformat(text) - _EPOCH) // _MICRO


class _PageMeta(msgspec.Struct):
    truncated: bool
    gaps: list[dict[str, Any]] = msgspec.field(default_factory=list)


class _TradesPage(msgspec.Struct):
    data: list[TradeRow]
    meta: _PageMeta


class _QuotesPage(msgspec.Struct):
    data: list[QuoteRow]
    meta: _PageMeta


_PAGES: dict[str, msgspec.json.Decoder[Any]] = {
    "trades": msgspec.json.Decoder(_TradesPage),
    "quotes": msgspec.json.Decoder(_QuotesPage),
}
Row = TradeRow | QuoteRow


def _gap_from_meta(g: dict[str, Any]) -> Gap:
    stream = g.get("stream", "trade")
    table = "quotes" if stream == "quote" else "trades"
    return Gap(
        channel=f"{table}:{g['exchange']}:{g['symbol']}",
        event_id=g["event_id"],
        kind=g["kind"],
        status=g["status"],
        first_missing=g.get("first_missing"),
        last_missing=g.get("last_missing"),
        missing_count=g.get("missing_count", 0),
        start=g.get("start"),
        end=g.get("end"),
        detected_at=g["detected_at"],
        resolved_at=None,
        detail="",
    )


class StreamService:
    """What every connection shares: the daemon's state, the access layer, the counts
    behind the connection limits, and how a published batch becomes bytes."""

    def __init__(self, state: ApiState, access: AccessControl | None) -> None:
        self.state = state
        self.cfg: StreamConfig = state.stream
        self.access = access
        self.metrics = state.metrics
        self.tracer: trace.Tracer = (
            state.tracing.tracer if state.tracing is not None else trace.NoOpTracer()
        )
        self.connections = 0
        self.per_key: dict[str, int] = {}
        self._messages = {
            t: state.metrics.ws_messages.labels(t)
            for t in ("trades", "quotes", "gap", "ack", "error", "pong", "end")
        }
        self._rows = {s: state.metrics.ws_rows.labels(s) for s in ("live", "history", "replay")}
        self._encoded = {e: state.metrics.ws_encoded.labels(e) for e in ("json", "msgpack")}

    def count_sent(self, kind: str, size: int) -> None:
        counter = self._messages.get(kind)
        if counter is not None:
            counter.inc()
        self.metrics.ws_bytes.inc(size)

    def count_rows(self, source: str, n: int) -> None:
        if n:
            self._rows[source].inc(n)

    def encode(self, item: Published, encoding: Encoding) -> list[Encoded]:
        """A published batch's parts in `encoding`, made once per batch and encoding."""
        parts: list[Encoded] | None = item.encoded.get(encoding)
        if parts is not None:
            return parts
        ctx = item.span_context
        if item.kind == "gap":
            parts = [
                encode_gap(gap_message(e, item.channel), encoding, span_context=ctx)
                for e in cast(Sequence[SequenceEvent], item.rows)
            ]
        else:
            rows: list[Any] | None = item.encoded.get("rows")
            if rows is None:
                if item.kind == "trades":
                    rows = [trade_row(t) for t in cast(Sequence[Trade], item.rows)]
                else:
                    rows = [quote_row(q) for q in cast(Sequence[Quote], item.rows)]
                item.encoded["rows"] = rows
            parts = [
                encode_rows(
                    item.kind, item.channel, rows[i : i + _PART_ROWS], encoding, span_context=ctx
                )
                for i in range(0, len(rows), _PART_ROWS)
            ]
        item.encoded[encoding] = parts
        self._encoded[encoding].inc()
        return parts

    def pool(self) -> QueryService:
        pool = self.state.query_pool
        if pool is None:
            raise QueryError(503, "query_unavailable", "the query pool is not running")
        return pool

    async def pages(
        self,
        key: str,
        table: str,
        keys: Sequence[tuple[str, str]],
        window: Window,
        live: Sequence[Trade] | Sequence[Quote] = (),
    ) -> AsyncGenerator[tuple[list[Row], list[dict[str, Any]]], None]:
        """Pages of `table` rows of `keys` in `window`, in (timestamp, symbol, sequence)
        order, through the query pool: (rows, the ledger's gaps meeting the window (first
        page only))."""
        pool = self.pool()
        after: tuple[int, str, int, str] | None = None
        decoder = _PAGES[table]
        while True:
            plan = WindowPlan(
                endpoint=f"stream.{table}",
                table=table,
                keys=tuple(keys),
                window=window,
                limit=self.cfg.page_rows,
                after=after,
                live=tuple(live),  # type: ignore[arg-type]
            )
            body = await self._execute(pool, key, plan)
            page = decoder.decode(body)
            rows: list[Row] = page.data
            yield rows, page.meta.gaps
            if not page.meta.truncated or not rows:
                return
            last = rows[-1]
            seq = last.source_sequence if last.source_sequence is not None else -1
            after = (parse_iso_us(last.timestamp), last.symbol, seq, last.message_id)

    async def _execute(self, pool: QueryService, key: str, plan: WindowPlan) -> bytes:
        """One page; a busy pool (429 for this key's concurrency, 503) is waited for, up
        to query.timeout."""
        deadline = time.monotonic() + pool.cfg.timeout
        delay = 0.02
        while True:
            try:
                result = await pool.execute(key, plan, Format.JSON)
                return await result.read_all()
            except QueryError as exc:
                if exc.status not in _RETRY or time.monotonic() + delay > deadline:
                    raise
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.5)


@dataclass
class _Batch:
    """A held batch less the rows the history already sent (a Published of our own)."""

    channel: str
    kind: str
    rows: Sequence[Any]
    span_context: Any = None
    encoded: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Hold:
    """Live batches of a channel held while its history is sent, and their message ids."""

    items: list[Published] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    size: int = 0


class _Closed(Exception):
    """The connection is closing: stop what you were doing."""


class Connection:
    """One stream client: its subscriptions, send queue, sender task and replay."""

    def __init__(self, service: StreamService, socket: WebSocket[Any, Any, Any], key: str) -> None:
        self.service = service
        self.cfg = service.cfg
        self.socket = socket
        self.key = key
        self.encoding: Encoding = "json"
        self.channels: dict[str, Channel] = {}
        self._held: dict[str, _Hold] = {}
        self._held_bytes = 0
        self._queue: deque[Encoded] = deque()
        self._queued_bytes = 0
        self._wake = anyio.Event()
        self._drained = anyio.Event()
        self._closing = anyio.Event()
        self._close: tuple[int, str] | None = None
        self._inflight = False
        self._queued_at = 0.0
        self._subscriptions = 0
        self.dead = False
        self._replay: _ReplaySession | None = None
        self._tasks: TaskGroup | None = None

    # -- the Fanout's side (runs on the ingest path: never waits) ---------------------------

    def deliver(self, item: Published) -> None:
        if self.dead:
            return
        parts = self.service.encode(item, self.encoding)
        hold = self._held.get(item.channel)
        if hold is not None:
            hold.items.append(item)
            if item.kind != "gap":
                hold.ids.update(r.message_id for r in item.rows)
            size = sum(len(p.message) for p in parts)
            hold.size += size
            self._held_bytes += size
            if self._held_bytes > self.cfg.join_buffer_bytes:
                self.fail(
                    CLOSE_SLOW,
                    "slow_consumer",
                    "live rows held while the history was sent passed stream.join_buffer_bytes",
                )
            return
        for p in parts:
            self._push(p)

    def push(self, part: Encoded) -> None:
        self._push(part)

    def _push(self, part: Encoded) -> None:
        if not self._queue:
            self._queued_at = time.monotonic()
        self._queue.append(part)
        self._queued_bytes += len(part.message)
        if len(self._queue) > self.cfg.queue_messages or self._queued_bytes > self.cfg.queue_bytes:
            self.fail(CLOSE_SLOW, "slow_consumer", "the client fell behind its send queue")
            return
        self._wake.set()

    def fail(self, code: int, error: str, detail: str) -> None:
        """Close with `code` after an `error` message; a slow consumer's queue is dropped
        and it leaves the Fanout at once."""
        if self.dead:
            return
        if code == CLOSE_SLOW:
            self.service.metrics.ws_slow_closed.inc()
            self._queue.clear()
            self._queued_bytes = 0
            self._leave_fanout()
            self.dead = True
        else:
            self.service.metrics.ws_refused.labels(error).inc()
        self._control(Error(code=error, detail=detail))
        self._close = (code, detail[:120])
        self._closing.set()

    # -- the connection's side ---------------------------------------------------------------

    def _control(self, msg: ServerMessage) -> None:
        kind = msg.__struct_config__.tag
        data = encode_message(msg, self.encoding)
        if not self._queue:
            self._queued_at = time.monotonic()
        self._queue.append(Encoded(str(kind), "", data, b"", 0))
        self._queued_bytes += len(data)
        self._wake.set()

    def send(self, msg: ServerMessage) -> None:
        if not self.dead:
            self._control(msg)

    async def feed(self, parts: Iterable[Encoded]) -> None:
        """Queue parts of history or replay, each once the queue is at most half full:
        such a producer never pushes the client past its bounds by itself."""
        for p in parts:
            await self.room()
            self._push(p)

    async def _wait_drained(self) -> None:
        """Wait for the sender's next batch to be sent (or for it to end)."""
        if self._drained.is_set():
            self._drained = anyio.Event()
        await self._drained.wait()

    async def room(self) -> None:
        """Wait until the send queue is at most half full (history and replay wait here:
        they never push a client past its bounds by themselves)."""
        while not self.dead and (
            self._queued_bytes > self.cfg.queue_bytes // 2
            or len(self._queue) > self.cfg.queue_messages // 2
        ):
            await self._wait_drained()
        if self.dead:
            raise _Closed

    async def run(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tasks = tg
                tg.start_soon(self._sender)
                tg.start_soon(self._reader)
                await self._closing.wait()
                if self._close is not None and not self.dead:
                    # The queue (the error last) goes out before the close frame.
                    with anyio.move_on_after(self.cfg.close_timeout):
                        while self._queue or self._inflight:
                            await self._wait_drained()
                tg.cancel_scope.cancel()
            if self._close is not None:
                await self._send_close(*self._close)
        finally:
            self.dead = True
            self._leave_fanout()

    async def _send_close(self, code: int, reason: str) -> None:
        """The close frame, after what is still queued (a slow consumer's: just its error).
        A peer that reads nothing cannot take either: given up on after close_timeout."""
        with anyio.move_on_after(self.cfg.close_timeout):
            try:
                for data, kind, _, _ in join_frames(list(self._queue), self.encoding):
                    await self._send_frame(data, kind)
                self._queue.clear()
                await self.socket.close(code, reason)
            except Exception as exc:  # the peer is gone already
                log.debug("stream close: %s", exc)

    async def _send_frame(self, data: bytes, kind: str) -> None:
        event: WebSocketSendEvent
        if self.encoding == "json":
            event = {"type": "websocket.send", "text": data.decode(), "bytes": None}
        else:
            event = {"type": "websocket.send", "bytes": data, "text": None}
        await self.socket.send(event)
        self.service.count_sent(kind, len(data))

    async def _sender(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                if self.dead:
                    return
                parts = list(self._queue)
                self._queue.clear()
                self._queued_bytes = 0
                self._inflight = True
                queued_at = self._queued_at
                for data, kind, rows, _ in join_frames(
                    order_for_joining(parts), self.encoding, _MAX_FRAME_BYTES
                ):
                    try:
                        await self._send_frame(data, kind)
                    except Exception:
                        self.dead = True  # the client is gone
                        self._closing.set()
                        return
                    for source, n in rows.items():
                        self.service.count_rows(source, n)
                self.service.metrics.ws_queue_seconds.observe(time.monotonic() - queued_at)
                self._inflight = False
                self._drained.set()
        finally:
            self._inflight = False
            self._drained.set()

    async def _reader(self) -> None:
        limit = self.cfg.max_message_bytes
        while True:
            event = await self.socket.receive()
            if event["type"] == "websocket.disconnect":
                self.dead = True
                self._closing.set()
                return
            data: str | bytes | None = event.get("text")  # type: ignore[assignment]
            if data is None:
                data = event.get("bytes") or b""  # type: ignore[assignment]
            assert data is not None
            if len(data) > limit:
                self.fail(
                    CLOSE_TOO_LARGE,
                    "message_too_large",
                    f"a client message may hold at most {limit} bytes",
                )
                return
            try:
                msg = CLIENT_DECODER.decode(data)
            except msgspec.DecodeError as exc:
                self.send(Error(code="invalid_message", detail=str(exc)[:300]))
                continue
            try:
                await self._handle(msg)
            except QueryError as exc:
                self.send(Error(code=exc.code, detail=exc.detail, id=msg.id))
            if self._closing.is_set():
                return

    async def _handle(self, msg: Any) -> None:
        if isinstance(msg, Ping):
            self.send(Pong(id=msg.id, time=iso_us(now_us())))
        elif isinstance(msg, Subscribe):
            await self._subscribe(msg)
        elif isinstance(msg, Unsubscribe):
            self._unsubscribe(msg)
        elif isinstance(msg, Replay):
            self._start_replay(msg)
        elif isinstance(msg, Pause | Resume | Seek):
            session = self._replay
            if session is None or session.done:
                raise QueryError(400, "no_replay", "no replay is running on this connection")
            session.control(msg)

    def _channels(self, names: Sequence[str], extra: int = 0) -> list[Channel] | None:
        channels = list({c.name: c for c in map(parse_channel, names)}.values())
        if not channels:
            raise QueryError(400, "missing_channels", "name at least one channel")
        total = len(set(self.channels) | {c.name for c in channels}) + extra
        if total > self.cfg.max_subscriptions:
            self.fail(
                CLOSE_SUBSCRIPTIONS,
                "too_many_subscriptions",
                f"a connection may subscribe to at most {self.cfg.max_subscriptions} channels",
            )
            return None
        return channels

    def _set_encoding(self, encoding: Encoding | None) -> None:
        if encoding is None or encoding == self.encoding:
            return
        if self.channels or (self._replay is not None and not self._replay.done):
            raise QueryError(
                400,
                "encoding_locked",
                "the encoding can change only while nothing is subscribed or replaying",
            )
        self.encoding = encoding

    async def _subscribe(self, msg: Subscribe) -> None:
        if self._replay is not None and not self._replay.done:
            raise QueryError(
                409, "replay_active", "stop the replay first (or open another connection)"
            )
        channels = self._channels(msg.channels)
        if channels is None:
            return
        self._set_encoding(msg.encoding)
        fresh = [c for c in channels if c.name not in self.channels]
        fanout = self.service.state.fanout
        if msg.since is None or not fresh:
            for c in fresh:
                self.channels[c.name] = c
                if fanout is not None:
                    fanout.subscribe(c.name, self)
            self._count_subscriptions()
            self.send(
                Ack(
                    op="subscribe",
                    id=msg.id,
                    channels=[c.name for c in channels],
                    encoding=self.encoding,
                )
            )
            return
        now = now_us()
        since = parse_since(msg.since, now, self.cfg.max_since_seconds)
        pool = self.service.pool()
        try:
            with anyio.fail_after(pool.cfg.timeout):
                # Everything the live hub counts as committed is in the index after this.
                await pool.catch_up()
        except TimeoutError:
            raise QueryError(
                504, "query_timeout", "the file index did not catch up in time"
            ) from None
        # From here to the hold, nothing awaits: the rows published before this instant
        # are stored or in the hub's uncommitted set, the ones after it are held.
        live = self._join(fresh, since)
        self.send(
            Ack(
                op="subscribe",
                id=msg.id,
                channels=[c.name for c in channels],
                since=iso_us(since),
                encoding=self.encoding,
            )
        )
        assert self._tasks is not None
        self._tasks.start_soon(self._catch_up, fresh, since, live, msg.id)

    def _join(self, channels: list[Channel], since: int) -> dict[str, list[Any]]:
        fanout = self.service.state.fanout
        hub = self.service.state.live_hub
        live: dict[str, list[Any]] = {"trades": [], "quotes": []}
        for c in channels:
            self.channels[c.name] = c
            self._held[c.name] = _Hold()
            if fanout is not None:
                fanout.subscribe(c.name, self)
            if hub is not None:
                read = hub.recent_trades if c.table == "trades" else hub.recent_quotes
                rows = read(c.exchange, c.symbol, since, uncommitted_only=True)
                # Backfilled rows are published when they commit: they come held.
                live[c.table].extend(r for r in rows if r.provenance != "backfill")
        self._count_subscriptions()
        return live

    async def _catch_up(
        self, channels: list[Channel], since: int, live: dict[str, list[Any]], req: Any
    ) -> None:
        with self.service.tracer.start_as_current_span("ws.join") as span:
            span.set_attribute("k2d.ws.channels", [c.name for c in channels])
            span.set_attribute("k2d.ws.since_us", since)
            await self._join_history(channels, since, live, req)

    async def _join_history(
        self, channels: list[Channel], since: int, live: dict[str, list[Any]], req: Any
    ) -> None:
        sent_backfill: set[str] = set()
        window = Window(since, now_us() + _FUTURE_SLACK_US)
        try:
            for table in ("trades", "quotes"):
                keys = [c.key for c in channels if c.table == table]
                if not keys:
                    continue
                async for rows, gaps in self.service.pages(
                    self.key, table, keys, window, live[table]
                ):
                    for g in gaps:
                        gap = _gap_from_meta(g)
                        if gap.channel in self._held:
                            await self.feed([encode_gap(gap, self.encoding)])
                    fresh = []
                    for r in rows:
                        hold = self._held.get(f"{table}:{r.exchange}:{r.symbol}")
                        if hold is None or r.message_id in hold.ids:
                            continue  # unsubscribed meanwhile, or held (it went live since)
                        if r.provenance == "backfill":
                            sent_backfill.add(r.message_id)
                        fresh.append(r)
                    await self.feed(self._history_parts(table, fresh, "history"))
        except _Closed:
            return
        except QueryError as exc:
            self.send(Error(code=exc.code, detail=f"catch-up failed: {exc.detail}", id=req))
            for c in channels:
                self._drop(c.name)
            self._count_subscriptions()
            return
        # The held batches go out in order, then live: deliveries meanwhile join the hold,
        # which is let go only once empty (no await between that check and letting go).
        try:
            for c in channels:
                await self._release(c.name, sent_backfill)
        except _Closed:
            return

    async def _release(self, name: str, sent_backfill: set[str]) -> None:
        while True:
            hold = self._held.get(name)
            if hold is None:
                return
            if not hold.items:
                del self._held[name]
                return
            item = hold.items.pop(0)
            parts = self.service.encode(item, self.encoding)
            size = sum(len(p.message) for p in parts)
            hold.size -= size
            self._held_bytes -= size
            if item.kind != "gap" and any(r.message_id in sent_backfill for r in item.rows):
                rows = [r for r in item.rows if r.message_id not in sent_backfill]
                if not rows:
                    continue
                parts = self.service.encode(
                    _Batch(item.channel, item.kind, rows, item.span_context), self.encoding
                )
            await self.feed(parts)

    def _history_parts(self, table: str, rows: Sequence[Row], source: str) -> list[Encoded]:
        """Rows in order, one part per run of a channel (at most _PART_ROWS rows each)."""
        parts: list[Encoded] = []
        run: list[Any] = []
        channel = ""
        for r in rows:
            name = f"{table}:{r.exchange}:{r.symbol}"
            if name != channel or len(run) >= _PART_ROWS:
                if run:
                    parts.append(encode_rows(table, channel, run, self.encoding, source=source))
                run, channel = [], name
            run.append(r)
        if run:
            parts.append(encode_rows(table, channel, run, self.encoding, source=source))
        return parts

    def _drop(self, name: str) -> None:
        self.channels.pop(name, None)
        hold = self._held.pop(name, None)
        if hold is not None:
            self._held_bytes -= hold.size
        fanout = self.service.state.fanout
        if fanout is not None:
            fanout.unsubscribe(name, self)

    def _unsubscribe(self, msg: Unsubscribe) -> None:
        names = [parse_channel(n).name for n in msg.channels]
        gone = [n for n in dict.fromkeys(names) if n in self.channels]
        for n in gone:
            self._drop(n)
        self._count_subscriptions()
        self.send(Ack(op="unsubscribe", id=msg.id, channels=gone, encoding=self.encoding))

    def _leave_fanout(self) -> None:
        for name in list(self.channels):
            self._drop(name)
        self._count_subscriptions()

    def _count_subscriptions(self) -> None:
        now = len(self.channels)
        if now != self._subscriptions:
            self.service.metrics.ws_subscriptions.inc(now - self._subscriptions)
            self._subscriptions = now

    # -- replay -----------------------------------------------------------------------------

    def _start_replay(self, msg: Replay) -> None:
        if self.channels:
            raise QueryError(
                409, "subscriptions_active", "unsubscribe first (or open another connection)"
            )
        channels = self._channels(msg.channels)
        if channels is None:
            return
        speed = str(msg.speed)
        if speed not in SPEEDS:
            raise QueryError(400, "invalid_speed", f"speed must be one of {', '.join(SPEEDS)}")
        start = parse_time(str(msg.start), "start")
        end = parse_time(str(msg.end), "end")
        check_window(Window(start, end), self.service.pool().cfg.max_window_seconds)
        if self._replay is not None:
            self._replay.scope.cancel()
        self._set_encoding(msg.encoding)
        session = _ReplaySession(self, channels, Window(start, end), speed, msg.id)
        self._replay = session
        self.send(
            Ack(
                op="replay",
                id=msg.id,
                channels=[c.name for c in channels],
                start=iso_us(start),
                end=iso_us(end),
                speed=speed,
                encoding=self.encoding,
            )
        )
        assert self._tasks is not None
        self._tasks.start_soon(session.run)


class Pacer:
    """The replay's clock: virtual time (UTC us) runs at `speed` times wall time from the
    position it was started at, stands still while paused, and jumps on a seek."""

    def __init__(self, speed: str, start: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = None if speed == "max" else float(speed)
        self._clock = clock
        self._virt0 = start
        self._wall0 = clock()
        self.paused = False
        self._changed = anyio.Event()

    def now(self) -> int:
        if self.rate is None or self.paused:
            return self._virt0
        return self._virt0 + round((self._clock() - self._wall0) * self.rate * 1_000_000)

    def pause(self) -> None:
        if not self.paused:
            self._virt0 = self.now()
            self.paused = True
            self._kick()

    def resume(self) -> None:
        if self.paused:
            self._wall0 = self._clock()
            self.paused = False
            self._kick()

    def restart(self, at: int) -> None:
        self._virt0 = at
        self._wall0 = self._clock()
        self._kick()

    def _kick(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def running(self) -> None:
        """Return at once unless paused; else once resumed."""
        while self.paused:
            await self._changed.wait()

    async def until(self, ts: int) -> None:
        """Return once virtual time reaches `ts` (at once at speed max, unless paused)."""
        while True:
            changed = self._changed
            if self.paused:
                await changed.wait()
                continue
            if self.rate is None:
                if ts > self._virt0:
                    self._virt0 = ts
                return
            wait = (ts - self.now()) / 1_000_000 / self.rate
            if wait <= 0:
                return
            with anyio.move_on_after(wait):
                await changed.wait()


async def replay_parts(
    service: StreamService,
    key: str,
    channels: Sequence[Channel],
    window: Window,
    pacer: Pacer,
    encoding: Encoding,
) -> AsyncGenerator[list[Encoded], None]:
    """The replay of `window`: rows across channels in (timestamp, symbol, sequence) order,
    each group of them once the pacer's clock reaches them, gaps at their start, as parts
    in order (one per run of a channel)."""
    pagers: dict[str, AsyncGenerator[tuple[list[Row], list[dict[str, Any]]], None]] = {}
    for table in ("trades", "quotes"):
        keys = [c.key for c in channels if c.table == table]
        if keys:
            pagers[table] = service.pages(key, table, keys, window)
    wanted = {c.name for c in channels}
    buffers: dict[str, deque[tuple[int, Row]]] = {t: deque() for t in pagers}
    gaps: list[tuple[int, Gap]] = []
    try:
        while True:
            for table, pager in list(pagers.items()):
                if buffers[table]:
                    continue
                try:
                    rows, page_gaps = await pager.__anext__()
                except StopAsyncIteration:
                    del pagers[table]
                    continue
                buffers[table].extend((parse_iso_us(r.timestamp), r) for r in rows)
                for g in page_gaps:
                    gap = _gap_from_meta(g)
                    if gap.channel in wanted:
                        at = parse_iso_us(gap.start) if gap.start else window.start
                        gaps.append((max(at, window.start), gap))
                gaps.sort(key=lambda x: x[0])
                if not buffers[table] and table in pagers:
                    del pagers[table]
            heads = [b[0][0] for b in buffers.values() if b]
            if not heads and not gaps:
                return
            await pacer.until(min(heads + [g[0] for g in gaps[:1]]))
            if pacer.rate is None:
                # As far as every table still being read has rows buffered (their next
                # pages start later), so the tables stay merged.
                ends = [b[-1][0] for t, b in buffers.items() if b and t in pagers]
                limit = min(ends) if ends else _END
            else:
                # What the clock has passed, and what it passes in the next tick.
                limit = pacer.now() + int(_TICK * pacer.rate * 1_000_000)
            # A gap's start is the time of the last row before it: it sorts after that row.
            due: list[tuple[tuple[int, int, str, int, str], str, Row | Gap]] = []
            for table, buf in buffers.items():
                while buf and buf[0][0] <= limit:
                    ts, r = buf.popleft()
                    seq = r.source_sequence if r.source_sequence is not None else -1
                    due.append(((ts, 0, r.symbol, seq, r.message_id), table, r))
            while gaps and gaps[0][0] <= limit:
                ts, gap = gaps.pop(0)
                due.append(((ts, 1, "", 0, gap.event_id), "gap", gap))
            due.sort(key=lambda d: d[0])
            yield _runs(due, encoding)
    finally:
        for pager in pagers.values():
            await pager.aclose()


def _runs(
    due: Sequence[tuple[tuple[int, int, str, int, str], str, Row | Gap]], encoding: Encoding
) -> list[Encoded]:
    parts: list[Encoded] = []
    run: list[Any] = []
    run_table = ""
    channel = ""

    def flush() -> None:
        if run:
            parts.append(encode_rows(run_table, channel, run, encoding, source="replay"))
            run.clear()

    for _, table, item in due:
        if isinstance(item, Gap):
            flush()
            parts.append(encode_gap(item, encoding))
            channel = ""
            continue
        name = f"{table}:{item.exchange}:{item.symbol}"
        if name != channel or len(run) >= _PART_ROWS:
            flush()
            channel, run_table = name, table
        run.append(item)
    flush()
    return parts


class _ReplaySession:
    """One replay on a connection: its pacer, and the task reading and sending it."""

    def __init__(
        self,
        conn: Connection,
        channels: list[Channel],
        window: Window,
        speed: str,
        req: Any,
    ) -> None:
        self.conn = conn
        self.channels = channels
        self.window = window
        self.req = req
        self.pacer = Pacer(speed, window.start)
        self.scope = anyio.CancelScope()
        self.done = False
        self._seek: int | None = None
        self._reading = anyio.CancelScope()

    def control(self, msg: Pause | Resume | Seek) -> None:
        conn = self.conn
        if isinstance(msg, Pause):
            self.pacer.pause()
            conn.send(
                Ack(op="pause", id=msg.id, at=iso_us(self.pacer.now()), encoding=conn.encoding)
            )
        elif isinstance(msg, Resume):
            self.pacer.resume()
            conn.send(
                Ack(op="resume", id=msg.id, at=iso_us(self.pacer.now()), encoding=conn.encoding)
            )
        else:
            to = parse_time(str(msg.to), "to")
            if not self.window.start <= to < self.window.end:
                raise QueryError(400, "invalid_seek", "seek to a time inside the replay's window")
            self._seek = to
            self._reading.cancel()
            conn.send(Ack(op="seek", id=msg.id, at=iso_us(to), encoding=conn.encoding))

    async def _send(self, parts: list[Encoded]) -> bool:
        """Queue `parts` unless a seek came (False); wait while paused. Checked before each
        part: a pause or seek may come while this task has nothing to await, and nothing
        of the old position may follow its ack."""
        for p in parts:
            while True:
                await self.pacer.running()
                await self.conn.room()
                if self._reading.cancel_called:
                    return False
                if not self.pacer.paused:
                    break
            self.conn.push(p)
        return True

    async def run(self) -> None:
        with self.conn.service.tracer.start_as_current_span("ws.replay") as span:
            span.set_attribute("k2d.ws.channels", [c.name for c in self.channels])
            span.set_attribute("k2d.ws.speed", self.pacer.rate or 0.0)
            await self._run()

    async def _run(self) -> None:
        conn = self.conn
        position = self.window.start
        with self.scope:
            try:
                while True:
                    self._reading = anyio.CancelScope()
                    self._seek = None
                    with self._reading:
                        self.pacer.restart(position)
                        window = Window(position, self.window.end)
                        parts_of = replay_parts(
                            conn.service, conn.key, self.channels, window, self.pacer, conn.encoding
                        )
                        async with contextlib.aclosing(parts_of) as replaying:
                            async for parts in replaying:
                                if not await self._send(parts):
                                    break
                    if self._seek is None:
                        break
                    position = self._seek
            except _Closed:
                return
            except QueryError as exc:
                conn.send(Error(code=exc.code, detail=f"replay failed: {exc.detail}", id=self.req))
                self.done = True
                return
            self.done = True
            conn.send(End(reason="replay_done", id=self.req))


# -- the routes -----------------------------------------------------------------------------


def stream_handlers(state: ApiState, access: AccessControl | None) -> list[Any]:
    """The /v1/stream WebSocket route and GET /v1/replay, to be mounted under /v1 (the key
    check of the stream happens here, at the handshake: AccessControl handles HTTP only)."""
    service = StreamService(state, access)
    channels_param = Annotated[
        list[str],
        Parameter(
            description="Channels, e.g. trades:BINANCE:BTCUSDT, quotes:BINANCE:ETHUSDT "
            "(repeat the parameter), at most stream.max_subscriptions",
            min_items=1,
            max_items=state.stream.max_subscriptions,
            schema_extra={
                "items": {
                    "type": "string",
                    "pattern": f"^(trades|quotes):{EXCHANGE_SYNTAX}:{SYMBOL_SYNTAX}$",
                }
            },
        ),
    ]

    @websocket("/stream", name="stream")
    async def stream(socket: WebSocket[Any, Any, Any]) -> None:
        await _serve(service, socket)

    @get(
        "/replay",
        summary="Replay a stored window as NDJSON",
        description=(
            "The messages of a /v1/stream replay, one JSON object per line (`trades`, "
            "`quotes`, `gap`, then `end`): rows of the channels in [start, end) across "
            "channels in time order, paced at `speed` times the recorded pace (default "
            "`max`: as fast as the client reads). Read through the query pool in pages; "
            "docs/stream-protocol.md has the messages."
        ),
        media_type="application/x-ndjson",
        responses={
            400: ResponseSpec(
                data_container=ErrorBody,
                description="Invalid parameters",
                examples=[
                    Example(
                        id="invalid_channel",
                        summary="invalid_channel",
                        value={"code": "invalid_channel", "detail": "'x' is not a channel"},
                    )
                ],
                generate_examples=False,
            ),
            **access_responses(),
        },
        tags=["stream"],
        signature_namespace={"_Channels": channels_param},
    )
    async def replay(
        request: Request[Any, Any, Any],
        channel: _Channels,
        start: Annotated[str, Parameter(description="Window start (same forms as /v1/trades)")],
        end: Annotated[str, Parameter(description="Window end, exclusive")],
        speed: Annotated[
            str,
            Parameter(
                description="1, 10, 100 or max (default)",
                schema_extra={"enum": list(SPEEDS)},
            ),
        ] = "max",
    ) -> Stream:
        try:
            channels = list({c.name: c for c in map(parse_channel, channel)}.values())
            if not channels:
                raise QueryError(400, "missing_channels", "name at least one channel")
            if len(channels) > state.stream.max_subscriptions:
                raise QueryError(
                    400,
                    "too_many_subscriptions",
                    f"at most {state.stream.max_subscriptions} channels",
                )
            if speed not in SPEEDS:
                raise QueryError(400, "invalid_speed", f"speed must be one of {', '.join(SPEEDS)}")
            window = Window(parse_time(start, "start"), parse_time(end, "end"))
            check_window(window, service.pool().cfg.max_window_seconds)
        except QueryError as exc:
            raise ApiError(exc.status, exc.code, exc.detail) from None
        key = client_key(request.scope)
        return Stream(
            _ndjson(service, key, channels, window, speed), media_type="application/x-ndjson"
        )

    return [stream, replay]


async def _ndjson(
    service: StreamService, key: str, channels: list[Channel], window: Window, speed: str
) -> AsyncIterator[bytes]:
    pacer = Pacer(speed, window.start)
    try:
        async for parts in replay_parts(service, key, channels, window, pacer, "json"):
            for data, kind, rows, _ in join_frames(
                order_for_joining(parts), "json", _MAX_FRAME_BYTES
            ):
                service.count_sent(kind, len(data) + 1)
                for source, n in rows.items():
                    service.count_rows(source, n)
                yield data + b"\n"
    except QueryError as exc:
        yield encode_message(Error(code=exc.code, detail=exc.detail)) + b"\n"
        return
    yield encode_message(End(reason="replay_done")) + b"\n"


async def _serve(service: StreamService, socket: WebSocket[Any, Any, Any]) -> None:
    """Admit (key, rate limit, connection limits), then run the connection."""
    scope = socket.scope
    cfg = service.cfg
    await socket.accept()
    key = client_key(cast(Any, scope))
    refusal: tuple[int, str, str] | None = None
    if service.access is not None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key, _, refused = service.access._admit(cast(Any, scope), headers)
        if refused is not None:
            status, code, detail, _ = refused
            close = CLOSE_UNAUTHORIZED if status == 401 else CLOSE_CONNECTIONS
            refusal = (close, code, detail)
    if refusal is None and service.connections >= cfg.max_connections:
        refusal = (CLOSE_FULL, "server_full", f"{cfg.max_connections} stream connections are open")
    if refusal is None and service.per_key.get(key, 0) >= cfg.max_connections_per_key:
        refusal = (
            CLOSE_CONNECTIONS,
            "too_many_connections",
            f"at most {cfg.max_connections_per_key} stream connections per client",
        )
    if refusal is not None:
        close, code, detail = refusal
        service.metrics.ws_refused.labels(code).inc()
        with anyio.move_on_after(cfg.close_timeout):
            with contextlib.suppress(Exception):
                await socket.send_text(encode_message(Error(code=code, detail=detail)).decode())
                await socket.close(close, detail[:120])
        return
    scope.setdefault("state", {})[CLIENT_KEY] = key
    service.connections += 1
    service.per_key[key] = service.per_key.get(key, 0) + 1
    service.metrics.ws_clients.inc()
    conn = Connection(service, socket, key)
    try:
        await conn.run()
    finally:
        service.connections -= 1
        left = service.per_key.get(key, 1) - 1
        if left > 0:
            service.per_key[key] = left
        else:
            service.per_key.pop(key, None)
        service.metrics.ws_clients.dec()
