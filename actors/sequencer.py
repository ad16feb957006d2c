"""SequenceTracker: one per (exchange, partition). Checks every record's venue sequence.

Trade ids are contiguous per symbol, so a jump opens a gap (written to the ledger once it
has outlived `gap_grace`, so ordinary reordering never shows up), a late arrival fills it,
and anything at or below the high-water mark outside a gap is a duplicate and dropped.
bookTicker ids only grow: an id at or below the last is dropped as a duplicate or stale.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from opentelemetry import trace

from k2d.config import SequencerConfig
from k2d.messages import GapRequest, GapResolution, Outage, RecordBatch, SequencedBatch, Watermark
from k2d.model import Quote, SequenceEvent, StreamKey, Trade, now_us
from k2d.runtime import Actor, Outbox
from k2d.telemetry.metrics import Metrics

__all__ = ["OpenGap", "SequenceTracker", "StreamBook", "TrackerState", "stream_key"]

log = logging.getLogger(__name__)
# Trade ids one backfill request may span: the venue's largest history page.
_REQUEST_SPAN = 1_000


def stream_key(key: StreamKey) -> str:
    return f"{key[0]}:{key[1]}:{key[2]}"


@dataclass
class OpenGap:
    event_id: str
    first: int
    last: int
    detected_at: int
    emitted: bool = False
    dirty: bool = False
    filled_by: set[str] = field(default_factory=set)
    requested_at: int = 0  # when a backfill was last asked for (0 = never)
    partition: int | None = None  # the tracker that owns it, when restored from the ledger


@dataclass
class OpenOutage:
    """An interval a feed captured nothing. For trades, the ids it hid are known once the
    next live trade arrives; the outage closes when no open gap is left in that range."""

    event_id: str
    start_us: int
    end_us: int
    detected_at: int
    reason: str
    after: int | None  # the high-water mark when the outage began
    first: int | None = None
    last: int | None = None
    unrecoverable: str = ""  # reason, once part of the range was declared unrecoverable


@dataclass
class TrackerState:
    """What a tracker resumes from: committed watermarks and the ledger's open entries."""

    watermarks: dict[str, Watermark] = field(default_factory=dict)
    open_gaps: dict[str, list[OpenGap]] = field(default_factory=dict)
    open_outages: dict[str, list[OpenOutage]] = field(default_factory=dict)
    log_position: dict[str, Any] = field(default_factory=dict)


class StreamBook:
    """Sequence state of one (exchange, symbol, stream); pure logic, no I/O."""

    def __init__(
        self,
        key: StreamKey,
        partition: int,
        cfg: SequencerConfig,
        *,
        contiguous: bool,
        watermark: Watermark | None = None,
        open_gaps: list[OpenGap] | None = None,
        open_outages: list[OpenOutage] | None = None,
    ) -> None:
        self.key = key
        self.partition = partition
        self.cfg = cfg
        self.contiguous = contiguous
        # hi: highest accepted id. lo: lowest accepted id this session; None when restored
        # from a watermark (everything below hi outside a known gap was already stored).
        self.hi: int | None = watermark.last_sequence if watermark else None
        self.lo: int | None = None
        self.platform_sequence = watermark.platform_sequence if watermark else 0
        self.last_seen_us = watermark.last_seen_us if watermark else 0
        gaps = list(open_gaps or [])
        for g in gaps:
            g.emitted = True
        k = key
        for first, last, detected in watermark.pending_gaps if watermark else ():
            gaps.append(OpenGap(f"{k[0]}:{k[1]}:{k[2]}:gap:{first}", first, last, detected))
        self.gaps: list[OpenGap] = sorted(gaps, key=lambda g: g.first)
        self.outages: list[OpenOutage] = list(open_outages or [])
        # True while an outage waits for the next live id: the tracker's fast path is off.
        self.awaiting = any(o.first is None and o.after is not None for o in self.outages)
        self.duplicates = 0
        self.dropped_out_of_order = 0
        self.filled_out_of_order = 0
        self._dup_range: tuple[int, int] | None = None
        self._dup_since = 0
        self._grace_us = int(cfg.gap_grace * 1_000_000)
        self._quiet_us = int(cfg.reset_quiet_period * 1_000_000)

    # -- classification -------------------------------------------------------------------

    def check(self, seq: int, now: int, provenance: str, events: list[SequenceEvent]) -> bool:
        """Classify `seq`; True when the record is to be stored."""
        if self.awaiting and provenance != "backfill":
            self._link_outages(seq, now, events)
        hi = self.hi
        if hi is None:
            self.hi = self.lo = seq
        elif seq == hi + 1 or (not self.contiguous and seq > hi):
            self.hi = seq
        elif seq > hi:
            self._open_gap(hi + 1, seq - 1, now)
            self.hi = seq
        elif self.contiguous and self.gaps and self._fill(seq, provenance):
            self.filled_out_of_order += 1
        elif self.contiguous and self.lo is not None and seq < self.lo:
            if self.lo - seq > self.cfg.max_reorder:
                return self._reset_or_drop(seq, now, events)
            # Capture started mid-stream and an earlier id arrived late: extend downwards.
            if seq + 1 <= self.lo - 1:
                self._open_gap(seq + 1, self.lo - 1, now)
            self.lo = seq
        else:
            return self._reset_or_drop(seq, now, events)
        self.last_seen_us = now
        return True

    def _reset_or_drop(self, seq: int, now: int, events: list[SequenceEvent]) -> bool:
        assert self.hi is not None
        if self.hi - seq >= self.cfg.reset_min_drop and now - self.last_seen_us >= self._quiet_us:
            self.reset(seq, now, events, f"sequence fell from {self.hi} to {seq} after silence")
            return True
        if seq == self.hi or not self.contiguous or (self.lo is None or seq >= self.lo):
            self.duplicates += 1
        else:
            self.dropped_out_of_order += 1
        if self._dup_range is None:
            self._dup_since = now
        lo, hi = self._dup_range or (seq, seq)
        self._dup_range = (min(lo, seq), max(hi, seq))
        return False

    def reset(self, seq: int, now: int, events: list[SequenceEvent], detail: str) -> None:
        """Start a new session at `seq`; gaps of the old session stay open in the ledger."""
        self.emit_pending(now, events, force=True)
        events.append(self._event("session_reset", "info", now, seq, seq, 0, detail))
        self.gaps.clear()
        self.hi = self.lo = seq
        self.last_seen_us = now

    # -- outages and backfill results -----------------------------------------------------

    def note_outage(self, o: Outage, now: int, events: list[SequenceEvent]) -> None:
        """Record that the feed saw nothing from o.start_us to o.end_us."""
        k = self.key
        out = OpenOutage(
            f"{k[0]}:{k[1]}:{k[2]}:outage:{o.start_us}",
            o.start_us,
            o.end_us,
            now,
            o.reason,
            self.hi,
        )
        if not self.contiguous:
            # Quotes carry no contiguous ids and the venue keeps no quote history.
            events.append(
                self._outage_row(
                    out, "unrecoverable", now, f"{o.reason}; venue has no history for {k[2]}"
                )
            )
            return
        if self.hi is None:
            events.append(
                self._outage_row(
                    out, "unrecoverable", now, f"{o.reason}; no sequence known before it"
                )
            )
            return
        events.append(self._outage_row(out, "open", now, o.reason))
        self.outages.append(out)
        self.awaiting = True

    def _link_outages(self, seq: int, now: int, events: list[SequenceEvent]) -> None:
        for o in self.outages:
            if o.first is None and o.after is not None:
                o.first, o.last = o.after + 1, seq - 1
                if o.first <= o.last:
                    events.append(self._outage_row(o, "open", now, o.reason))
        self.awaiting = False

    def _outage_row(self, o: OpenOutage, status: str, now: int, detail: str) -> SequenceEvent:
        missing = (o.last - o.first + 1) if o.first is not None and o.last is not None else 0
        row = self._event(
            "outage",
            status,
            now,
            o.first,
            o.last,
            max(missing, 0),
            detail,
            event_id=o.event_id,
            detected_at=o.detected_at,
        )
        row.window_start, row.window_end = o.start_us, o.end_us
        return row

    def resolve(self, res: GapResolution, now: int, events: list[SequenceEvent]) -> None:
        """The venue cannot supply ids res.first..res.last: close them as unrecoverable."""
        f, last = res.first, res.last
        keep: list[OpenGap] = []
        k = self.key
        for g in self.gaps:
            if g.last < f or g.first > last or g.first > g.last:
                keep.append(g)
                continue
            lo, hi = max(g.first, f), min(g.last, last)
            whole = lo == g.first and hi == g.last
            eid = g.event_id if whole else f"{k[0]}:{k[1]}:{k[2]}:gap:{lo}:unrecoverable"
            events.append(
                self._event(
                    "gap",
                    "unrecoverable",
                    now,
                    lo,
                    hi,
                    hi - lo + 1,
                    res.reason,
                    event_id=eid,
                    detected_at=g.detected_at,
                )
            )
            if whole:
                continue
            # The first piece that survives keeps the gap's event_id, so its ledger row
            # narrows rather than being left open at the old range.
            pieces = [(a, b) for a, b in ((g.first, lo - 1), (hi + 1, g.last)) if a <= b]
            for n, (a, b) in enumerate(pieces):
                eid = g.event_id if n == 0 else f"{k[0]}:{k[1]}:{k[2]}:gap:{a}"
                keep.append(
                    OpenGap(
                        eid,
                        a,
                        b,
                        g.detected_at,
                        g.emitted and n == 0,
                        g.emitted,
                        set(g.filled_by),
                        g.requested_at,
                    )
                )
        self.gaps = keep
        for o in self.outages:
            if o.first is not None and o.last is not None and o.first <= last and f <= o.last:
                o.unrecoverable = res.reason

    def due_requests(self, now: int, every_us: int) -> list[OpenGap]:
        """Emitted gaps whose backfill was never asked for, or not for `every_us`."""
        return [
            g
            for g in self.gaps
            if g.emitted
            and g.first <= g.last
            and (g.requested_at == 0 or now - g.requested_at >= every_us)
        ]

    def _close_outages(self, now: int, events: list[SequenceEvent]) -> None:
        keep = []
        for o in self.outages:
            if o.first is None:
                keep.append(o)
                continue
            assert o.last is not None
            if o.first <= o.last and any(
                g.first <= o.last and o.first <= g.last and g.first <= g.last for g in self.gaps
            ):
                keep.append(o)
                continue
            if o.first > o.last:
                status, detail = "backfilled", f"{o.reason}; no trades missed"
            elif o.unrecoverable:
                status, detail = "unrecoverable", f"{o.reason}; {o.unrecoverable}"
            else:
                status, detail = "backfilled", f"{o.reason}; missed trades backfilled"
            events.append(self._outage_row(o, status, now, detail))
        self.outages = keep

    def _open_gap(self, first: int, last: int, now: int) -> None:
        k = self.key
        gap = OpenGap(f"{k[0]}:{k[1]}:{k[2]}:gap:{first}", first, last, now)
        if not self.gaps or first > self.gaps[-1].first:
            self.gaps.append(gap)
        else:
            bisect.insort(self.gaps, gap, key=lambda g: g.first)
        if len(self.gaps) > self.cfg.max_open_gaps:
            log.warning(
                "%s: more than %d open gaps; oldest no longer tracked",
                stream_key(k),
                self.cfg.max_open_gaps,
            )
            self.gaps.pop(0)

    def _fill(self, seq: int, provenance: str) -> bool:
        gaps = self.gaps
        i = bisect.bisect_right(gaps, seq, key=lambda g: g.first) - 1
        if i < 0 or gaps[i].last < seq:
            return False
        g = gaps[i]
        g.filled_by.add(provenance)
        if g.first == g.last:
            g.first = seq + 1  # empty: first > last marks it closed
        elif seq == g.first:
            g.first += 1
        elif seq == g.last:
            g.last -= 1
        else:
            k = self.key
            tail = OpenGap(
                f"{k[0]}:{k[1]}:{k[2]}:gap:{seq + 1}",
                seq + 1,
                g.last,
                g.detected_at,
                emitted=False,
                dirty=g.emitted,
                filled_by=set(g.filled_by),
            )
            g.last = seq - 1
            gaps.insert(i + 1, tail)
        g.dirty = g.emitted
        return True

    # -- ledger rows ----------------------------------------------------------------------

    def _event(
        self,
        kind: str,
        status: str,
        now: int,
        first: int | None,
        last: int | None,
        count: int,
        detail: str,
        event_id: str | None = None,
        detected_at: int | None = None,
    ) -> SequenceEvent:
        k = self.key
        return SequenceEvent(
            event_id=event_id or f"{k[0]}:{k[1]}:{k[2]}:{kind}:{first}:{now}",
            exchange=k[0],
            symbol=k[1],
            stream=k[2],
            partition=self.partition,
            kind=kind,
            status=status,
            first_missing=first,
            last_missing=last,
            missing_count=count,
            detected_at=detected_at or now,
            resolved_at=now if status in ("backfilled", "unrecoverable") else None,
            recorded_at=now,
            detail=detail,
        )

    def emit_pending(self, now: int, events: list[SequenceEvent], *, force: bool = False) -> None:
        """Write gaps that outlived the grace period, gaps that changed, and closed gaps."""
        keep: list[OpenGap] = []
        for g in self.gaps:
            closed = g.first > g.last
            if closed:
                if g.emitted:
                    by = "backfill" if "backfill" in g.filled_by else "late arrival"
                    events.append(
                        self._event(
                            "gap",
                            "backfilled",
                            now,
                            None,
                            None,
                            0,
                            f"filled by {by}",
                            event_id=g.event_id,
                            detected_at=g.detected_at,
                        )
                    )
                continue
            if (not g.emitted and (force or now - g.detected_at >= self._grace_us)) or g.dirty:
                events.append(
                    self._event(
                        "gap",
                        "open",
                        now,
                        g.first,
                        g.last,
                        g.last - g.first + 1,
                        "",
                        event_id=g.event_id,
                        detected_at=g.detected_at,
                    )
                )
                g.emitted, g.dirty = True, False
            keep.append(g)
        self.gaps = keep
        if self.outages:
            self._close_outages(now, events)
        if self._dup_range and (force or now - self._dup_since >= 60_000_000):
            lo, hi = self._dup_range
            if self.duplicates:
                events.append(
                    self._event(
                        "duplicate", "info", now, lo, hi, self.duplicates, "dropped duplicates"
                    )
                )
            if self.dropped_out_of_order:
                events.append(
                    self._event(
                        "out_of_order",
                        "info",
                        now,
                        lo,
                        hi,
                        self.dropped_out_of_order,
                        "dropped stale records",
                    )
                )
            self.duplicates = self.dropped_out_of_order = 0
            self._dup_range = None

    def open_gap_ids(self) -> set[int]:
        return {i for g in self.gaps for i in range(g.first, g.last + 1)}

    def watermark(self) -> Watermark:
        return Watermark(
            last_sequence=self.hi,
            platform_sequence=self.platform_sequence,
            last_seen_us=self.last_seen_us,
            pending_gaps=tuple(
                (g.first, g.last, g.detected_at)
                for g in self.gaps
                if not g.emitted and g.first <= g.last
            ),
        )


class SequenceTracker(Actor[RecordBatch, SequencedBatch]):
    """Owns the StreamBooks of one partition; emits accepted rows plus ledger rows."""

    def __init__(
        self,
        partition: int,
        cfg: SequencerConfig,
        metrics: Metrics,
        batch_ids: Iterator[int],
        restore: Callable[[], Awaitable[TrackerState]] | None = None,
        tracer: trace.Tracer | None = None,
        clock: Callable[[], int] = now_us,
        gap_requests: MemoryObjectSendStream[GapRequest] | None = None,
        backfill_inbox: MemoryObjectReceiveStream[RecordBatch] | None = None,
    ) -> None:
        self.name = f"sequencer-{partition}"
        # Requests go out with send_nowait: the backfiller also sends to this tracker, so a
        # blocking send here could deadlock the pair. A request that does not fit is retried.
        self._gap_requests = gap_requests
        self._backfill_inbox = backfill_inbox
        self._rerequest_us = int(cfg.rerequest_after * 1_000_000)
        self.partition = partition
        self.cfg = cfg
        self.metrics = metrics
        self._batch_ids = batch_ids
        self._restore = restore
        self._tracer = tracer or trace.get_tracer("k2d")
        self._clock = clock
        self._books: dict[StreamKey, StreamBook] = {}
        self._state = TrackerState()

    async def on_start(self) -> None:
        if self._restore is not None:
            self._state = await self._restore()

    def book(self, key: StreamKey) -> StreamBook:
        b = self._books.get(key)
        if b is None:
            sk = stream_key(key)
            b = StreamBook(
                key,
                self.partition,
                self.cfg,
                contiguous=key[2] == "trade",
                watermark=self._state.watermarks.get(sk),
                open_gaps=self._state.open_gaps.get(sk),
                open_outages=self._state.open_outages.get(sk),
            )
            self._books[key] = b
        return b

    async def run(
        self, inbox: MemoryObjectReceiveStream[RecordBatch] | None, outbox: Outbox[SequencedBatch]
    ) -> None:
        assert inbox is not None
        live_done = anyio.Event()
        async with anyio.create_task_group() as tg:
            if self._backfill_inbox is not None:
                tg.start_soon(self._backfill_results, self._backfill_inbox, outbox)
            tg.start_soon(self._tick, outbox, live_done)
            self._request_restored_gaps()
            async for batch in inbox:
                await outbox.send(self.process(batch))
            live_done.set()
            # Live input has ended: ask for nothing more; the backfiller finishes what it
            # holds, closes its side, and _backfill_results ends with it.
            if self._gap_requests is not None:
                self._gap_requests.close()
        final = self.flush_all()
        if final.events:
            await outbox.send(final)

    async def _tick(self, outbox: Outbox[SequencedBatch], done: anyio.Event) -> None:
        """While a feed is quiet, gaps still outlive their grace period and need asking for."""
        period = max(0.1, self.cfg.gap_grace / 2)
        while not done.is_set():
            with anyio.move_on_after(period):
                await done.wait()
            if done.is_set():
                return
            now = self._clock()
            events: list[SequenceEvent] = []
            for b in self._books.values():
                b.emit_pending(now, events)
            self._send_requests(now)
            if events:
                self._count(events)
                await outbox.send(
                    SequencedBatch(
                        batch_id=next(self._batch_ids),
                        partition=self.partition,
                        trades=[],
                        quotes=[],
                        events=events,
                        dead_letters=[],
                        watermarks={stream_key(k): b.watermark() for k, b in self._books.items()},
                    )
                )

    async def _backfill_results(
        self, inbox: MemoryObjectReceiveStream[RecordBatch], outbox: Outbox[SequencedBatch]
    ) -> None:
        async for batch in inbox:
            await outbox.send(self.process(batch))

    def _request_restored_gaps(self) -> None:
        for sk, gaps in self._state.open_gaps.items():
            exchange, symbol, stream = sk.split(":", 2)
            if gaps and gaps[0].partition in (None, self.partition):
                self.book((exchange, symbol, stream))
        self._send_requests(self._clock())

    def _send_requests(self, now: int) -> None:
        """Ask the backfiller for due gaps. Nearby gaps share one request: the venue's page
        holds up to _REQUEST_SPAN trades for the same request weight, and ids the tracker
        already has are dropped as duplicates when they come back."""
        if self._gap_requests is None:
            return
        for key, b in self._books.items():
            if key[2] != "trade":
                continue
            due = b.due_requests(now, self._rerequest_us)
            i = 0
            while i < len(due):
                j = i
                while j + 1 < len(due) and due[j + 1].last - due[i].first < _REQUEST_SPAN:
                    j += 1
                first, last = due[i], due[j]
                req = GapRequest(
                    event_id=first.event_id,
                    exchange=key[0],
                    symbol=key[1],
                    stream=key[2],
                    partition=self.partition,
                    first=first.first,
                    last=last.last,
                )
                try:
                    self._gap_requests.send_nowait(req)
                except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
                    return  # asked again on a later batch
                for g in due[i : j + 1]:
                    g.requested_at = now
                i = j + 1

    def process(self, batch: RecordBatch) -> SequencedBatch:
        now = self._clock()
        links = [trace.Link(batch.span_context)] if batch.span_context is not None else None
        with self._tracer.start_as_current_span("sequence.check", links=links) as span:
            events: list[SequenceEvent] = []
            touched: set[StreamKey] = set()
            for o in batch.outages:
                for symbol in o.symbols:
                    for stream in o.streams:
                        key = (o.exchange, symbol, stream)
                        self.book(key).note_outage(o, now, events)
                        touched.add(key)
            for res in batch.resolutions:
                key = (res.exchange, res.symbol, res.stream)
                self.book(key).resolve(res, now, events)
                touched.add(key)
            trades = self._check(batch.trades, "trade", now, events, touched)
            quotes = self._check(batch.quotes, "quote", now, events, touched)
            for key in touched:
                self._books[key].emit_pending(now, events)
            self._send_requests(now)
            span.set_attribute("k2d.partition", self.partition)
            span.set_attribute("k2d.records_in", len(batch.trades) + len(batch.quotes))
            span.set_attribute("k2d.records_out", len(trades) + len(quotes))
            out = SequencedBatch(
                batch_id=next(self._batch_ids),
                partition=self.partition,
                trades=trades,
                quotes=quotes,
                events=events,
                dead_letters=self._dead_letters(batch),
                watermarks={stream_key(k): self._books[k].watermark() for k in touched},
                log_position=self._position(batch),
                span_context=span.get_span_context(),
            )
        self._count(events)
        return out

    def _position(self, batch: RecordBatch) -> dict[str, Any] | None:
        """Positions are kept per partition: a feed's batch is split across trackers, and a
        frame is committed only once every tracker's share of it is (resume = the minimum)."""
        if not batch.log_position:
            return None
        return {f"{k}@{self.partition}": v for k, v in batch.log_position.items()}

    def _dead_letters(self, batch: RecordBatch) -> list[Any]:
        """Records replayed from the journal are deduplicated by sequence; dead letters have
        none, so those of frames at or before this tracker's committed position are dropped."""
        if not batch.dead_letters or not batch.log_position:
            return batch.dead_letters
        committed = self._state.log_position
        for key, pos in batch.log_position.items():
            done = committed.get(f"{key}@{self.partition}")
            if (
                isinstance(done, dict)
                and isinstance(pos, dict)
                and (
                    (pos.get("segment", 0), pos.get("offset", 0))
                    <= (done.get("segment", 0), done.get("offset", 0))
                )
            ):
                return []
        return batch.dead_letters

    def _check(
        self,
        records: list[Trade] | list[Quote],
        stream: str,
        now: int,
        events: list[SequenceEvent],
        touched: set[StreamKey],
    ) -> list[Any]:
        out: list[Any] = []
        if not records:
            return out
        books = self._books
        dropped = 0
        for r in records:
            key = (r.exchange, r.symbol, stream)
            b = books.get(key) or self.book(key)
            touched.add(key)
            seq = r.source_sequence
            if seq is not None:
                hi = b.hi
                if hi is not None and seq == hi + 1 and not b.awaiting:  # the common case
                    b.hi = seq
                    b.last_seen_us = now
                elif not b.check(seq, now, r.provenance, events):
                    dropped += 1
                    continue
            b.platform_sequence += 1
            r.platform_sequence = b.platform_sequence
            out.append(r)
        self.metrics.sequence_records.labels(stream, "accepted").inc(len(out))
        if dropped:
            self.metrics.sequence_records.labels(stream, "dropped").inc(dropped)
        return out

    def flush_all(self) -> SequencedBatch:
        """Write every pending ledger row (at end of input)."""
        now = self._clock()
        events: list[SequenceEvent] = []
        for b in self._books.values():
            b.emit_pending(now, events, force=True)
        self._count(events)
        return SequencedBatch(
            batch_id=next(self._batch_ids),
            partition=self.partition,
            trades=[],
            quotes=[],
            events=events,
            dead_letters=[],
            watermarks={stream_key(k): b.watermark() for k, b in self._books.items()},
        )

    def _count(self, events: list[SequenceEvent]) -> None:
        for e in events:
            self.metrics.gaps.labels(e.kind, e.status).inc()
        for key, b in self._books.items():
            if key[2] == "trade":
                self.metrics.open_gaps.labels(stream_key(key)).set(len(b.gaps))
