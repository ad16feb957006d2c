"""SequenceTracker: one per (exchange, partition). Checks every record's venue sequence
with one StreamBook (k2d/sequence.py) per stream, asks the Backfiller for gaps, and emits
the accepted rows with their ledger rows and watermarks.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import pyarrow as pa
import pyarrow.compute as pc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from opentelemetry import trace

from k2d import failpoints
from k2d.columns import SMALL_BATCH_ROWS, by_stream
from k2d.config import SequencerConfig
from k2d.messages import GapRequest, RecordBatch, SequencedBatch
from k2d.model import Quote, SequenceEvent, StreamKey, Trade, now_us
from k2d.runtime import Actor, Outbox
from k2d.sequence import StreamBook, TrackerState, stream_key
from k2d.telemetry.metrics import Metrics

__all__ = ["SequenceTracker"]

# 0, 1, 2, ...: a stream's platform_sequence numbers are a slice of it plus the first, one
# Arrow call, where pa.array(range(...)) made a Python int a row.
_COUNTING = pa.array(range(1 << 16), pa.int64())


def _numbers(first: int, count: int) -> pa.Array:
    """first, first + 1, ..., count of them."""
    if count > len(_COUNTING):
        return pa.array(range(first, first + count), pa.int64())
    return pc.add(_COUNTING.slice(0, count), pa.scalar(first, pa.int64()))


log = logging.getLogger(__name__)
# Trade ids one backfill request may span: the venue's largest history page.
_REQUEST_SPAN = 1_000


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
        failpoints.hit("tracker.process")
        now = self._clock()
        links = [trace.Link(batch.span_context)] if batch.span_context is not None else None
        with self._tracer.start_as_current_span("sequence.check", links=links) as span:
            events: list[SequenceEvent] = []
            touched: set[StreamKey] = set()
            replayed_before = self._committed_before(batch)
            for o in () if replayed_before else batch.outages:
                for symbol in o.symbols:
                    for stream in o.streams:
                        key = (o.exchange, symbol, stream)
                        self.book(key).note_outage(o, now, events)
                        touched.add(key)
            for res in batch.resolutions:
                key = (res.exchange, res.symbol, res.stream)
                self.book(key).resolve(res, now, events)
                touched.add(key)
            trades, quotes = [], []
            columns: dict[str, pa.Table] = {}
            for table, stream in (("trades", "trade"), ("quotes", "quote")):
                given = batch.columns.get(table)
                if given is not None:
                    columns[table] = self._check_columns(given, stream, now, events, touched)
                elif table == "trades":
                    trades = self._check(batch.trades, stream, now, events, touched)
                else:
                    quotes = self._check(batch.quotes, stream, now, events, touched)
            for key in touched:
                self._books[key].emit_pending(now, events)
            self._send_requests(now)
            span.set_attribute("k2d.partition", self.partition)
            out = SequencedBatch(
                batch_id=next(self._batch_ids),
                partition=self.partition,
                trades=None if "trades" in columns else trades,
                quotes=None if "quotes" in columns else quotes,
                columns=columns,
                events=events,
                dead_letters=[] if replayed_before else batch.dead_letters,
                watermarks={stream_key(k): self._books[k].watermark() for k in touched},
                log_position=self._position(batch),
                span_context=span.get_span_context(),
            )
            span.set_attribute("k2d.records_in", batch.count("trades") + batch.count("quotes"))
            span.set_attribute("k2d.records_out", out.count("trades") + out.count("quotes"))
        self._count(events)
        return out

    def _position(self, batch: RecordBatch) -> dict[str, Any] | None:
        """Positions are kept per partition: a feed's batch is split across trackers, and a
        frame is committed only once every tracker's share of it is (resume = the minimum)."""
        if not batch.log_position:
            return None
        return {f"{k}@{self.partition}": v for k, v in batch.log_position.items()}

    def _committed_before(self, batch: RecordBatch) -> bool:
        """Whether `batch` was replayed from the journal at or before this tracker's committed
        position. Its records are deduplicated by sequence; its dead letters and outages
        have none, so they are dropped here instead of being stored twice."""
        if not batch.log_position:
            return False
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
                return True
        return False

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

    def _check_columns(
        self,
        table: pa.Table,
        stream: str,
        now: int,
        events: list[SequenceEvent],
        touched: set[StreamKey],
    ) -> pa.Table:
        """`_check` on Arrow columns: the rows to keep, each stream's together and numbered
        by platform_sequence. When every stream of the batch goes on from its high-water
        mark in order (nearly always), ids are checked a column at a time; otherwise row by
        row, as `_check` does."""
        n = table.num_rows
        if not n:
            return table
        streams = by_stream(table)
        table = streams.columns
        seqs = table.column("source_sequence").combine_chunks()
        # A small batch's ids as a list: checked in Python, cheaper than Arrow calls a stream.
        ids = seqs.to_pylist() if n <= SMALL_BATCH_ROWS else None
        books = []
        in_order = True
        for (exchange, symbol), start, count in zip(
            streams.keys, streams.starts, streams.counts, strict=True
        ):
            key = (exchange, symbol, stream)
            b = self._books.get(key) or self.book(key)
            touched.add(key)
            books.append(b)
            part = seqs.slice(start, count) if ids is None else ids[start : start + count]
            in_order = in_order and b.goes_on(part)
        if in_order:
            numbers = []
            for b, start, count in zip(books, streams.starts, streams.counts, strict=True):
                b.hi = seqs[start + count - 1].as_py() if ids is None else ids[start + count - 1]
                b.last_seen_us = now
                first = b.platform_sequence + 1
                b.platform_sequence += count
                numbers.append(_numbers(first, count))
            platform = pa.chunked_array(numbers, pa.int64())
            kept = table
        else:
            keep, platform_list = self._check_rows(table, stream, now, events)
            kept = table.filter(pa.array(keep, pa.bool_()))
            platform = pa.chunked_array([pa.array(platform_list, pa.int64())])
        self.metrics.sequence_records.labels(stream, "accepted").inc(kept.num_rows)
        if kept.num_rows < n:
            self.metrics.sequence_records.labels(stream, "dropped").inc(n - kept.num_rows)
        at = kept.schema.get_field_index("platform_sequence")
        return kept.set_column(at, kept.schema.field(at), platform)

    def _check_rows(
        self, table: pa.Table, stream: str, now: int, events: list[SequenceEvent]
    ) -> tuple[list[bool], list[int]]:
        """Row by row, in the table's order: whether each row is kept, the kept rows' numbers."""
        keep: list[bool] = []
        numbers: list[int] = []
        books = self._books
        for exchange, symbol, seq, provenance in zip(
            table.column("exchange").to_pylist(),
            table.column("symbol").to_pylist(),
            table.column("source_sequence").to_pylist(),
            table.column("provenance").to_pylist(),
            strict=True,
        ):
            b = books[(exchange, symbol, stream)]
            if seq is not None and not b.check(seq, now, provenance, events):
                keep.append(False)
                continue
            b.platform_sequence += 1
            numbers.append(b.platform_sequence)
            keep.append(True)
        return keep, numbers

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
