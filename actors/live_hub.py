"""LiveHub: the last N minutes of trades and quotes per symbol in memory, committed or not,
and Fanout: the stream subscribers every round's hub publishes to.

Recent queries merge these rows with committed ones (deduplicated by message_id) so that
"the last 15 minutes" includes the last second; the streaming API (/v1/stream) subscribes
to the Fanout. Memory is bounded per symbol by row count and by age.

A capture round that fails takes its hub along (pipeline.py), but not the Fanout: it is
made once per process, so stream clients stay connected through a recovery; they see the
outage as the ledger records it, and live rows resume from the next round's hub. What a
hub publishes: live rows as they arrive (a row replayed from the journal after a recovery
is not published again); rows filled in by backfill, which arrive out of order, once their
commit lands; ledger rows (gaps and outages) once committed, so a `backfilled` marker never
precedes the rows that filled the gap.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from anyio.streams.memory import MemoryObjectReceiveStream
from opentelemetry import trace

from k2d.config import LiveConfig
from k2d.messages import Committed, SequencedBatch
from k2d.model import Quote, SequenceEvent, Trade, now_us
from k2d.runtime import Actor, Outbox
from k2d.telemetry.metrics import Metrics

__all__ = ["Fanout", "LiveHub", "Published", "Subscriber"]

log = logging.getLogger(__name__)

_Key = tuple[str, str]
# Uncommitted batch ids checked against the rows still held once there are this many.
_PRUNE_AT = 1_024


class _Recent:
    """Rows of one (exchange, symbol) with the batch each came in, oldest first."""

    def __init__(self, max_rows: int) -> None:
        self.rows: deque[tuple[int, Any]] = deque(maxlen=max_rows)

    def trim(self, oldest_us: int) -> None:
        rows = self.rows
        while rows and rows[0][1].timestamp < oldest_us:
            rows.popleft()


# Ledger kinds a stream carries; duplicate/out_of_order/session_reset rows are counts.
_STREAMED_KINDS = frozenset({"gap", "outage"})
_TABLE_OF_STREAM = {"trade": "trades", "quote": "quotes"}
# Batches whose backfilled rows or ledger rows wait for their commit, at most (the writer's
# backpressure keeps it far lower; this only bounds a writer that never commits).
_MAX_HELD = 100_000


class Published:
    """One channel's share of a batch, handed to every subscriber of the channel. `encoded`
    is for the subscribers: each encoding of it is made once and shared by all of them."""

    __slots__ = ("channel", "encoded", "kind", "rows", "span_context")

    def __init__(
        self, channel: str, kind: str, rows: Sequence[Any], span_context: Any = None
    ) -> None:
        self.channel = channel  # "trades:BINANCE:BTCUSDT", "quotes:...": kind:exchange:symbol
        self.kind = kind  # "trades", "quotes" (rows are Trade/Quote) or "gap" (SequenceEvent)
        self.rows = rows
        self.span_context = span_context
        self.encoded: dict[str, Any] = {}


class Subscriber(Protocol):
    """A stream connection, as the Fanout sees it."""

    def deliver(self, item: Published) -> None:
        """Take `item` without waiting (queue it, or give up on a client that fell behind)."""
        ...


class Fanout:
    """Stream subscribers per channel, for the whole process. `publish` runs on the ingest
    path: it never waits, and a subscriber that fails is dropped, never the batch.

    Each publish of a channel's batch is a `ws.send` span (linked to the tracker's batch
    span): the batch is encoded once there and queued for every subscriber. The writes to
    each client's socket are not spans of their own (a span costs tens of microseconds,
    times every client and message); k2d_ws_queue_seconds measures them."""

    def __init__(self, tracer: trace.Tracer | None = None) -> None:
        self._tracer = tracer or trace.NoOpTracer()
        # Replaced, never mutated, on (un)subscribe: publish iterates a stable list.
        self._subs: dict[str, tuple[Subscriber, ...]] = {}
        # Highest source_sequence published per channel: a row replayed from the journal
        # after a recovery, at or below it, went out before the failure.
        self._last_seq: dict[str, int] = {}
        self._names: dict[tuple[str, str, str], str] = {}

    def subscribe(self, channel: str, sub: Subscriber) -> None:
        subs = self._subs.get(channel, ())
        if sub not in subs:
            self._subs[channel] = (*subs, sub)

    def unsubscribe(self, channel: str, sub: Subscriber) -> None:
        subs = tuple(s for s in self._subs.get(channel, ()) if s is not sub)
        if subs:
            self._subs[channel] = subs
        else:
            self._subs.pop(channel, None)

    def subscribers(self, channel: str) -> int:
        return len(self._subs.get(channel, ()))

    def channel(self, kind: str, exchange: str, symbol: str) -> str:
        key = (kind, exchange, symbol)
        name = self._names.get(key)
        if name is None:
            name = self._names[key] = f"{kind}:{exchange}:{symbol}"
        return name

    def publish(self, item: Published) -> None:
        subs = self._subs.get(item.channel, ())
        if not subs:
            return
        ctx = item.span_context
        links = [trace.Link(ctx)] if ctx is not None and ctx.is_valid else None
        with self._tracer.start_as_current_span("ws.send", links=links) as span:
            span.set_attribute("k2d.ws.channel", item.channel)
            span.set_attribute("k2d.ws.type", item.kind)
            span.set_attribute("k2d.ws.rows", len(item.rows))
            span.set_attribute("k2d.ws.subscribers", len(subs))
            for sub in subs:
                try:
                    sub.deliver(item)
                except Exception:
                    log.exception("stream subscriber failed; dropping it")
                    self.unsubscribe(item.channel, sub)

    def publish_rows(
        self, kind: str, rows: Sequence[Trade] | Sequence[Quote], span_context: Any = None
    ) -> int:
        """Rows of one table, split by (exchange, symbol) into their channels; how many of
        them had a subscriber."""
        if not rows:
            return 0
        groups: dict[str, list[Any]] = {}
        last = self._last_seq
        for r in rows:
            name = self.channel(kind, r.exchange, r.symbol)
            seq = r.source_sequence
            if seq is not None and r.provenance != "backfill":
                top = last.get(name)
                if top is None or seq > top:
                    last[name] = seq
                elif r.provenance == "replay":
                    continue  # sent live before the recovery that replayed it
            group = groups.get(name)
            if group is None:
                group = groups[name] = []
            group.append(r)
        subs = self._subs
        published = 0
        for name, group in groups.items():
            if name in subs:
                self.publish(Published(name, kind, group, span_context))
                published += len(group)
        return published

    def publish_events(self, events: Sequence[SequenceEvent], span_context: Any = None) -> None:
        """Ledger rows of gaps and outages, each to its channel."""
        for e in events:
            table = _TABLE_OF_STREAM.get(e.stream)
            if table is None or e.kind not in _STREAMED_KINDS:
                continue
            name = self.channel(table, e.exchange, e.symbol)
            if name in self._subs:
                self.publish(Published(name, "gap", [e], span_context))


@dataclass
class _Held:
    """What a batch publishes only once committed: backfilled rows and ledger rows."""

    trades: list[Trade] = field(default_factory=list)
    quotes: list[Quote] = field(default_factory=list)
    events: list[SequenceEvent] = field(default_factory=list)
    span_context: Any = None


class LiveHub(Actor[SequencedBatch | Committed, None]):
    name = "live_hub"

    def __init__(self, cfg: LiveConfig, metrics: Metrics, fanout: Fanout | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.fanout = fanout
        self._held: dict[int, _Held] = {}
        self._trades: dict[_Key, _Recent] = {}
        self._quotes: dict[_Key, _Recent] = {}
        # batch ids whose rows of a table are not yet committed, per table
        self._uncommitted: dict[str, set[int]] = {"trades": set(), "quotes": set()}
        self._window_us = int(cfg.window_seconds * 1_000_000)
        self.latest_us = 0

    async def run(
        self,
        inbox: MemoryObjectReceiveStream[SequencedBatch | Committed] | None,
        outbox: Outbox[None],
    ) -> None:
        assert inbox is not None
        async for msg in inbox:
            if isinstance(msg, SequencedBatch):
                self.add(msg)
            else:
                self.committed(msg)

    def add(self, batch: SequencedBatch) -> None:
        for table, rows, store in (
            ("trades", batch.trades, self._trades),
            ("quotes", batch.quotes, self._quotes),
        ):
            if not rows:
                continue
            self._uncommitted[table].add(batch.batch_id)
            for r in rows:
                key = (r.exchange, r.symbol)
                recent = store.get(key)
                if recent is None:
                    recent = store[key] = _Recent(self.cfg.max_rows_per_symbol)
                recent.rows.append((batch.batch_id, r))
                if r.timestamp > self.latest_us:
                    self.latest_us = r.timestamp
        oldest = self.latest_us - self._window_us
        for store in (self._trades, self._quotes):
            for recent in store.values():
                recent.trim(oldest)
        self._forget_trimmed()
        self.metrics.live_rows.set(self.row_count())
        self.metrics.live_uncommitted_batches.set(sum(map(len, self._uncommitted.values())))
        if self.fanout is not None:
            self._publish(batch, self.fanout)

    def _publish(self, batch: SequencedBatch, fanout: Fanout) -> None:
        held = _Held(span_context=batch.span_context)
        for kind, rows, keep in (
            ("trades", batch.trades, held.trades),
            ("quotes", batch.quotes, held.quotes),
        ):
            if not rows:
                continue
            if any(r.provenance == "backfill" for r in rows):
                keep.extend(r for r in rows if r.provenance == "backfill")  # type: ignore[misc]
                rows = [r for r in rows if r.provenance != "backfill"]  # type: ignore[assignment]
            if fanout.publish_rows(kind, rows, batch.span_context) and rows:
                self.metrics.ws_publish_lag.observe(
                    max(0.0, (now_us() - rows[0].ingestion_timestamp) / 1e6)
                )
        held.events = [e for e in batch.events if e.kind in _STREAMED_KINDS]
        if held.trades or held.quotes or held.events:
            self._held[batch.batch_id] = held
            if len(self._held) > _MAX_HELD:
                oldest = min(self._held)
                log.warning("live hub: batch %d never committed; not streaming it", oldest)
                del self._held[oldest]

    def _forget_trimmed(self) -> None:
        """Batch ids older than every row still held have nothing left to mark: drop them,
        so a batch whose commit never comes cannot hold an entry for good."""
        for table, store in (("trades", self._trades), ("quotes", self._quotes)):
            pending = self._uncommitted[table]
            if len(pending) < _PRUNE_AT:
                continue
            held = [r.rows[0][0] for r in store.values() if r.rows]
            floor = min(held, default=None)
            if floor is None:
                pending.clear()
            else:
                pending.difference_update([b for b in pending if b < floor])

    def committed(self, msg: Committed) -> None:
        pending = self._uncommitted.get(msg.table)
        if pending is not None:
            pending.difference_update(msg.batch_ids)
        fanout = self.fanout
        if fanout is None or not self._held:
            return
        for batch_id in sorted(msg.batch_ids):
            held = self._held.get(batch_id)
            if held is None:
                continue
            if msg.table == "trades" and held.trades:
                fanout.publish_rows("trades", held.trades, held.span_context)
                held.trades = []
            elif msg.table == "quotes" and held.quotes:
                fanout.publish_rows("quotes", held.quotes, held.span_context)
                held.quotes = []
            elif msg.table == "sequence_events" and held.events:
                fanout.publish_events(held.events, held.span_context)
                held.events = []
            if not (held.trades or held.quotes or held.events):
                del self._held[batch_id]

    def held_batches(self) -> int:
        """Batches with backfilled or ledger rows waiting for their commit to be streamed."""
        return len(self._held)

    def row_count(self) -> int:
        return sum(len(r.rows) for s in (self._trades, self._quotes) for r in s.values())

    def recent_trades(
        self, exchange: str, symbol: str, since_us: int = 0, *, uncommitted_only: bool = False
    ) -> list[Trade]:
        return self._read(self._trades, "trades", exchange, symbol, since_us, uncommitted_only)

    def recent_quotes(
        self, exchange: str, symbol: str, since_us: int = 0, *, uncommitted_only: bool = False
    ) -> list[Quote]:
        return self._read(self._quotes, "quotes", exchange, symbol, since_us, uncommitted_only)

    def _read(
        self,
        store: dict[_Key, _Recent],
        table: str,
        exchange: str,
        symbol: str,
        since_us: int,
        uncommitted_only: bool,
    ) -> list[Any]:
        recent = store.get((exchange, symbol))
        if recent is None:
            return []
        pending = self._uncommitted[table]
        return [
            r
            for batch_id, r in recent.rows
            if r.timestamp >= since_us and (not uncommitted_only or batch_id in pending)
        ]

    def symbols(self) -> list[_Key]:
        return sorted(set(self._trades) | set(self._quotes))
