"""FeedHandler: one Binance combined-stream connection -> RecordBatches of Trades and Quotes.

Reconnects with exponential backoff and jitter; the backoff starts over only once a
connection has delivered market data for `stable_after` seconds. The venue cuts every
connection after its lifetime (24 h) and announces planned closes with `serverShutdown`; in
both cases a replacement connection is opened first and the old one closed once the new one
delivers, with records seen on both dropped during the overlap. A serverShutdown that comes
soon after connecting is backed off before the replacement opens, so a venue that shuts every
new connection is not reconnected in a tight loop.
"""

from __future__ import annotations

import itertools
import logging
import operator
import time
from collections import OrderedDict

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream
from opentelemetry import trace
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from k2d.config import BinanceFeedConfig, PipelineConfig
from k2d.journal import Journal, JournalPosition
from k2d.journal import scan as journal_scan
from k2d.messages import Outage, RecordBatch
from k2d.model import now_us
from k2d.runtime import Actor, Backoff, Outbox
from k2d.telemetry.metrics import Metrics
from k2d.venues.binance import EXCHANGE, BinanceParser, ParsedFrames, combined_stream_url

__all__ = ["FeedHandler", "finish_batch"]

log = logging.getLogger(__name__)

_REPLAY_CHUNK = 5_000  # frames read from the journal per worker-thread call
# A batch of at least this many market frames is finished (scanned, made Arrow) in a worker
# thread: the C scanner lets go of the GIL, so the stages after the feed go on meanwhile.
# A smaller one (a live 10 ms batch holds tens) costs less than the thread's hop.
_FINISH_IN_THREAD = 1_024
# A journal record that is not a venue frame: the outage a capture start or reconnect found.
# No venue frame starts with a NUL byte.
_OUTAGE_MARK = b"\x00k2d-outage "
_IS_OUTAGE = operator.methodcaller("startswith", _OUTAGE_MARK)
_outage_codec = msgspec.json.Encoder()
_outage_decoder = msgspec.json.Decoder(Outage)
_OVERLAP_IDS = 200_000  # message ids remembered while two connections overlap
_OVERLAP_GRACE = 10.0  # seconds after a handover during which repeats are still dropped


class FeedHandler(Actor[None, RecordBatch]):
    def __init__(
        self,
        name: str,
        cfg: BinanceFeedConfig,
        pipeline: PipelineConfig,
        metrics: Metrics,
        stop: anyio.Event,
        tracer: trace.Tracer | None = None,
        journal: Journal | None = None,
        replay_after: JournalPosition | None = None,
        last_capture_us: int | None = None,
        replay: bool = True,
        down_reason: str = "daemon down",
    ) -> None:
        """With a `journal`, every frame is appended to it before it is parsed, and frames
        journaled after `replay_after` (the last committed position) but before this start
        are replayed first. `last_capture_us` is the receive time of the last frame captured
        before this start: the silence since then is recorded as an outage, for
        `down_reason`."""
        self.name = name
        self.cfg = cfg
        self.pipeline = pipeline
        self.metrics = metrics
        self.stop = stop
        self.url = combined_stream_url(cfg.ws_url, cfg.symbols)
        self.parser = BinanceParser(
            cfg.symbols,
            source=name,
            max_clock_skew_s=cfg.max_clock_skew,
            max_frame_bytes=cfg.max_frame_bytes,
        )
        self._tracer = tracer or trace.get_tracer("k2d")
        self._journal = journal
        self._replay_after = replay_after
        self._replay_until = journal.position if journal is not None and replay else None
        self._position: JournalPosition | None = None
        self._log_key = f"journal:{name}"
        self._active = self.parser
        self._pending = ParsedFrames()
        self._pending_since = 0.0
        self._batch_started = anyio.Event()  # set when a frame starts an empty batch
        self._lock = anyio.Lock()
        self._outbox: Outbox[RecordBatch] | None = None
        self._sockets: set[ClientConnection] = set()
        self._overlap_until = 0.0
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._shutdown_announced = anyio.Event()
        self._frames = metrics.frames.labels(name)
        self._lag = metrics.feed_lag.labels(name)
        self.backoff = Backoff(cfg.reconnect_initial, cfg.reconnect_max)
        self._retry_at = 0.0  # monotonic time before which no new connection opens
        self._opened: dict[ClientConnection, float] = {}  # monotonic time each one opened
        self._stable_at_us: int | None = None  # receive time from which data resets backoff
        self._stable_us = int(cfg.stable_after * 1_000_000)
        self._last_frame_us = last_capture_us
        self._outage_since = last_capture_us
        self._outage_reason = down_reason
        self._outages: list[Outage] = []
        # Journal appends since the last batch went out, for its journal.append span.
        self._journaled = 0
        self._journaled_bytes = 0
        self._journal_ns = 0  # time spent inside Journal.append
        self._journal_since_ns = 0  # wall clock at the first of them
        self._journal_from: JournalPosition | None = None

    async def run(
        self, inbox: MemoryObjectReceiveStream[None] | None, outbox: Outbox[RecordBatch]
    ) -> None:
        self._outbox = outbox
        self._closing = anyio.Event()
        if self._journal is not None and self._replay_until is not None:
            await self._replay(self._journal, self._replay_until)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._flush_by_age)
            tg.start_soon(self._close_on_stop)
            await self._connections()
            # No cancel here: a cancelled send would lose the batch it carried.
            self._closing.set()
            self._batch_started.set()
        await self._emit()

    async def _replay(self, journal: Journal, until: JournalPosition) -> None:
        """Frames captured but not committed before the last stop, through the same parser."""
        self._active = BinanceParser(
            self.cfg.symbols,
            source=self.name,
            max_clock_skew_s=self.cfg.max_clock_skew,
            max_frame_bytes=self.cfg.max_frame_bytes,
            provenance="replay",
        )
        records = journal_scan(journal.directory, journal.feed, self._replay_after, until)
        replayed = 0
        while chunk := await anyio.to_thread.run_sync(
            lambda: list(itertools.islice(records, _REPLAY_CHUNK))
        ):
            replayed += len(chunk)
            done = 0
            while done < len(chunk):
                # Up to what the batch has room for, handed to the parser in one call; a part
                # with an outage record (rare) frame by frame.
                room = max(1, self.pipeline.batch_max_records - len(self._pending))
                part = chunk[done : done + room]
                done += len(part)
                positions, received, frames = map(list, zip(*part, strict=True))
                if any(map(_IS_OUTAGE, frames)):
                    for position, at, frame in part:
                        self._position = position
                        if frame.startswith(_OUTAGE_MARK):
                            outage = _outage_decoder.decode(frame[len(_OUTAGE_MARK) :])
                            self._outages.append(outage)
                        else:
                            self._active.parse(frame, at, self._pending)
                else:
                    self._active.parse_many(frames, received, self._pending)
                    self._position = positions[-1]
                if len(self._pending) >= self.pipeline.batch_max_records:
                    await self._emit()
        await self._emit()
        self._replay_after = until  # a restart of this actor replays nothing twice
        self._replay_until = None
        self._active = self.parser
        self.metrics.journal_replayed.labels(self.name).inc(replayed)
        if replayed:
            log.info("%s: replayed %d journaled frames", self.name, replayed)

    def connections(self) -> int:
        """Open venue connections (two while a replacement takes over)."""
        return len(self._sockets)

    async def _close_on_stop(self) -> None:
        await self.stop.wait()
        for ws in list(self._sockets):
            await ws.close()

    async def _connections(self) -> None:
        ws: ClientConnection | None = None
        while not self.stop.is_set():
            if ws is None:
                self._shutdown_announced = anyio.Event()
                ws = await self._connect()
                if ws is None:
                    await self._back_off()
                    continue
            ws = await self._read(ws)
            if ws is None and not self.stop.is_set():
                await self._back_off()

    async def _back_off(self) -> None:
        """Wait out the current backoff delay, drawing the next one if none is running (the
        replacement task may have drawn it before the old connection died)."""
        now = time.monotonic()
        if self._retry_at <= now:
            self._retry_at = now + self.backoff.next_delay()
        await self._sleep(self._retry_at - now)

    async def _connect(self) -> ClientConnection | None:
        try:
            ws = await connect(
                self.url,
                max_size=(
                    self._journal.options.max_frame_bytes
                    if self._journal is not None
                    else self.cfg.max_frame_bytes * 16
                ),
                open_timeout=10,
                ping_interval=20,
                ping_timeout=60,
                close_timeout=2,
                compression=None,
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as e:
            log.warning("%s: connect to %s failed: %r", self.name, self.url, e)
            return None
        self.metrics.feed_connects.labels(self.name).inc()
        self._sockets.add(ws)
        self._opened[ws] = time.monotonic()
        log.info("%s: connected to %s", self.name, self.url)
        return ws

    async def _read(self, ws: ClientConnection) -> ClientConnection | None:
        """Read `ws` until it closes; return the successor if one took over."""
        successor: list[tuple[ClientConnection, bytes]] = []
        # Market data from this connection resets the backoff once it has been up a while.
        self._stable_at_us = now_us() + self._stable_us - int(self._uptime(ws) * 1e6)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._replace_when_due, ws, successor)
            try:
                while True:
                    frame = await ws.recv(decode=False)
                    await self._handle(frame)
            except ConnectionClosed as e:
                if not successor:
                    log.warning("%s: connection closed: %s", self.name, e)
                    if self._outage_since is None and self._last_frame_us is not None:
                        self._outage_since = self._last_frame_us
                        self._outage_reason = f"disconnected: {e}"
            if not successor:
                tg.cancel_scope.cancel()  # the replacement task is only connecting or waiting
        self._sockets.discard(ws)
        self._opened.pop(ws, None)
        if not successor:
            return None
        new, first = successor[0]
        # The successor's own announcement (even in its first frame) must not be lost.
        self._shutdown_announced = anyio.Event()
        self._stable_at_us = None
        await self._handle(first)
        log.info("%s: replacement connection took over", self.name)
        return new

    def _uptime(self, ws: ClientConnection) -> float:
        opened = self._opened.get(ws)
        return 0.0 if opened is None else time.monotonic() - opened

    async def _replace_when_due(
        self, old: ClientConnection, successor: list[tuple[ClientConnection, bytes]]
    ) -> None:
        """Open the next connection before the venue's lifetime cut or after serverShutdown,
        then close `old` once the new one delivers its first frame."""
        with anyio.move_on_after(self.cfg.connection_lifetime - self.cfg.replace_before):
            await self._shutdown_announced.wait()
        if self._shutdown_announced.is_set() and self._uptime(old) < self.cfg.stable_after:
            # Shut soon after it opened: the venue may do that to every new connection.
            log.warning(
                "%s: venue announced shutdown %.1fs after connecting; backing off",
                self.name,
                self._uptime(old),
            )
            await self._back_off()
        # Repeats are dropped from before the handshake on: the venue sends on the new
        # connection from its subscription, and the old one may deliver the same records
        # while the handshake is still being answered here.
        self._overlap_until = float("inf")
        new: ClientConnection | None = None
        try:
            while new is None and not self.stop.is_set():
                new = await self._connect()
                if new is None:
                    await self._back_off()
            if new is None:
                self._overlap_until = 0.0
                return
            first = await new.recv(decode=False)
        except ConnectionClosed:
            if new is not None:
                self._sockets.discard(new)
                self._opened.pop(new, None)
            self._overlap_until = 0.0
            return
        except BaseException:
            # The old connection died first (we are cancelled) or the new one failed.
            if new is not None:
                self._sockets.discard(new)
                self._opened.pop(new, None)
                with anyio.CancelScope(shield=True):
                    await new.close()
            if self._overlap_until == float("inf"):
                self._overlap_until = 0.0
            raise
        successor.append((new, first))
        self._overlap_until = time.monotonic() + _OVERLAP_GRACE
        await old.close()

    async def _handle(self, frame: bytes) -> None:
        received = now_us()
        if self._outage_since is not None:
            outage = Outage(
                source=self.name,
                exchange=EXCHANGE,
                symbols=self.cfg.symbols,
                streams=("trade", "quote"),
                start_us=self._outage_since,
                end_us=received,
                reason=self._outage_reason,
            )
            self._outages.append(outage)
            self._outage_since = None
            if self._journal is not None:
                # Journaled too: should this process die before the outage row commits, the
                # replay after the next start finds it here (the silence it describes has
                # no frames of its own to be found by).
                self._journal.append(received, _OUTAGE_MARK + _outage_codec.encode(outage))
        if self._journal is not None:
            if not self._journaled:
                self._journal_since_ns = time.time_ns()
                self._journal_from = self._position
            t0 = time.perf_counter_ns()
            self._position = self._journal.append(received, frame)
            self._journal_ns += time.perf_counter_ns() - t0
            self._journaled += 1
            self._journaled_bytes += len(frame)
        self._last_frame_us = received
        self._frames.inc()
        p = self._pending
        if not p:
            self._pending_since = time.monotonic()
            self._batch_started.set()
        # Market frames wait to be parsed together; where this frame's rows matter at once
        # (the first data after a reconnect, repeats while two connections overlap), the
        # batch is parsed up to it before and after.
        stable = self._stable_at_us is not None and received >= self._stable_at_us
        exact = stable or bool(self._overlap_until)
        if exact:
            self.parser.settle(p)
        nt, nq = p.trade_count, p.quote_count
        ctl = self.parser.parse(frame, received, p)
        if exact:
            self.parser.settle(p)
        if ctl is not None and ctl.kind == "server_shutdown":
            log.warning("%s: venue announced shutdown; opening a replacement", self.name)
            self._shutdown_announced.set()
        elif stable and (nt < p.trade_count or nq < p.quote_count):
            self.backoff.reset()
            self._stable_at_us = None
        if self._overlap_until and (nt < p.trade_count or nq < p.quote_count):
            self._drop_overlap_repeats(nt, nq)
        if len(p) >= self.pipeline.batch_max_records:
            await self._emit()

    def _drop_overlap_repeats(self, nt: int, nq: int) -> None:
        if time.monotonic() > self._overlap_until:
            self._overlap_until = 0.0
            self._seen.clear()
            return
        p, seen = self._pending, self._seen
        for table, start in (("trades", nt), ("quotes", nq)):
            repeats = set()
            for i, message_id in enumerate(p.message_ids(table, start), start):
                if message_id in seen:
                    repeats.add(i)
                else:
                    seen[message_id] = None
            if repeats:
                p.drop(table, repeats)
        while len(seen) > _OVERLAP_IDS:
            seen.popitem(last=False)

    async def _flush_by_age(self) -> None:
        """Emits a batch batch_max_age after its first frame, to the millisecond: this delay
        is most of a row's way from the socket to a stream subscriber."""
        age = self.pipeline.batch_max_age
        while not self._closing.is_set():
            await self._batch_started.wait()
            self._batch_started = anyio.Event()
            if not self._pending:
                continue
            started = self._pending_since
            await anyio.sleep(max(0.0, started + age - time.monotonic()))
            if self._pending and self._pending_since == started:
                await self._emit()

    async def _emit(self) -> None:
        async with self._lock:
            p = self._pending
            if (not p and not self._outages) or self._outbox is None:
                return
            outages, self._outages = self._outages, []
            self._pending = ParsedFrames()
            # What the batch says of the journal is taken before the batch is finished: a
            # large one is finished in a worker thread, and frames that come meanwhile (and
            # move the position on) belong to the next batch.
            position = self._position
            started = self._journal_since_ns if self._journaled else None
            journaled = self._journal_attributes() if self._journaled else None
            await finish_batch(self._active, p)
            received = now_us()
            # With a journal, the batch's span starts at its first frame's append.
            with self._tracer.start_as_current_span("feed.receive", start_time=started) as span:
                if journaled is not None:
                    self._tracer.start_span(
                        "journal.append", start_time=started, attributes=journaled
                    ).end()
                span.set_attribute("k2d.feed", self.name)
                span.set_attribute("k2d.trades", p.trade_count)
                span.set_attribute("k2d.quotes", p.quote_count)
                span.set_attribute("k2d.dead_letters", len(p.dead_letters))
                batch = RecordBatch(
                    source=self.name,
                    columns=p.columns,
                    dead_letters=p.dead_letters,
                    outages=outages,
                    log_position=({self._log_key: position.to_json()} if position else None),
                    received_at=received,
                    span_context=span.get_span_context(),
                )
            if p.trade_count:
                self.metrics.records.labels(self.name, "trade").inc(p.trade_count)
            if p.quote_count:
                self.metrics.records.labels(self.name, "quote").inc(p.quote_count)
            for d in p.dead_letters:
                self.metrics.dead_letters.labels(self.name, d.reason).inc()
            if p.max_event_us:
                self._lag.set((received - p.max_event_us) / 1e6)
            await self._outbox.send(batch)

    def _journal_attributes(self) -> dict[str, str | int | float]:
        """The batch's journal.append span (one per batch: a span per frame would cost more
        than the append), from the first frame's append to now, with the time spent
        appending; the counts start over for the next batch."""
        attributes: dict[str, str | int | float] = {
            "k2d.feed": self.name,
            "k2d.journal.frames": self._journaled,
            "k2d.journal.bytes": self._journaled_bytes,
            "k2d.journal.append_ms": self._journal_ns / 1e6,
            # Log positions as segment:offset, after the last record before / in the batch.
            "k2d.journal.from": _position_text(self._journal_from),
            "k2d.journal.to": _position_text(self._position),
        }
        self._journaled = self._journaled_bytes = self._journal_ns = 0
        self._journal_from = None
        return attributes

    async def _sleep(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await self.stop.wait()


def _position_text(position: JournalPosition | None) -> str:
    return "-" if position is None else f"{position.segment}:{position.offset}"


async def finish_batch(parser: BinanceParser, out: ParsedFrames) -> None:
    """parser.finish(out), in a worker thread when the batch is large (_FINISH_IN_THREAD).
    The parser holds no state of its own, so it goes on parsing the next batch meanwhile."""
    if len(out.deferred) >= _FINISH_IN_THREAD:
        await anyio.to_thread.run_sync(parser.finish, out)
    else:
        parser.finish(out)
