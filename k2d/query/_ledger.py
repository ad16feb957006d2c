"""The gap ledger as the query side sees it: the current status of every gap and outage.

`market.sequence_events` is append-only; the latest row per event_id (by recorded_at) is the
event's status. The ledger is small (gaps are rare), so it is kept in memory, updated from
the files of each commit, and bounded: past `max_events` the oldest closed events go first.

A gap is known by trade ids (first_missing..last_missing); its time span is that of the
stored trades around it (ids first_missing-1 and last_missing+1), looked up once in the trade
files and cached. Until both are stored, detected_at stands in: a gap is always detected
after the trades it hides, so detected_at bounds its span from above.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import duckdb

    from k2d.query._files import TableFiles

__all__ = ["GAP_KINDS", "Ledger", "LedgerEvent", "read_events"]

log = logging.getLogger(__name__)

GAP_KINDS = ("gap", "outage")
# Venue clocks and ours may disagree: a gap detected this long before a window's start may
# still hide trades inside it.
CLOCK_SLACK_US = 300_000_000
_SPAN_QUERY_CHUNK = 64


@dataclass(frozen=True, slots=True)
class LedgerEvent:
    event_id: str
    exchange: str
    symbol: str
    stream: str
    kind: str
    status: str
    first_missing: int | None
    last_missing: int | None
    missing_count: int
    detected_at: int
    resolved_at: int | None
    window_start: int | None
    window_end: int | None
    detail: str
    recorded_at: int


_EVENTS_SQL = """
SELECT event_id, exchange, symbol, stream, kind, status, first_missing, last_missing,
       missing_count, epoch_us(detected_at), epoch_us(resolved_at), epoch_us(window_start),
       epoch_us(window_end), detail, epoch_us(recorded_at)
FROM read_parquet(?, hive_partitioning = false)
WHERE kind IN ('gap', 'outage')
"""


def read_events(cursor: duckdb.DuckDBPyConnection, paths: Sequence[str]) -> list[LedgerEvent]:
    """Gap and outage rows of some sequence_events data files."""
    if not paths:
        return []
    return [LedgerEvent(*row) for row in cursor.execute(_EVENTS_SQL, [list(paths)]).fetchall()]


class Ledger:
    """Latest row per gap/outage event. Immutable; `merged` builds the next version. The span
    cache is shared between versions and safe to use from several threads; it holds spans of
    the latest version's events only (and of events a query on an older version resolves
    meanwhile, until the next merge), so it is bounded as the ledger is."""

    def __init__(
        self,
        events: Mapping[str, LedgerEvent] | None = None,
        max_events: int = 200_000,
        *,
        spans: dict[str, tuple[int, int]] | None = None,
        spans_lock: threading.Lock | None = None,
    ) -> None:
        self.events: dict[str, LedgerEvent] = dict(events or {})
        self.max_events = max_events
        self._spans = spans if spans is not None else {}
        self._spans_lock = spans_lock or threading.Lock()
        self._by_key: dict[tuple[str, str], list[LedgerEvent]] = {}
        for e in self.events.values():
            self._by_key.setdefault((e.exchange, e.symbol), []).append(e)

    def merged(self, rows: Iterable[LedgerEvent]) -> Ledger:
        events = dict(self.events)
        for row in rows:
            old = events.get(row.event_id)
            if old is None or row.recorded_at >= old.recorded_at:
                events[row.event_id] = row
        if len(events) > self.max_events:
            # Closed events first, oldest first; open ones only if nothing else is left.
            order = sorted(events.values(), key=lambda e: (e.status == "open", e.recorded_at))
            drop = len(events) - self.max_events
            log.warning("ledger over %d events: forgetting the %d oldest", self.max_events, drop)
            with self._spans_lock:
                for e in order[:drop]:
                    del events[e.event_id]
                    self._spans.pop(e.event_id, None)
        with self._spans_lock:
            # Spans are cached for events only, so more spans than events means some belong
            # to events forgotten while a query on an older version resolved them.
            if len(self._spans) > len(events):
                for event_id in [k for k in self._spans if k not in events]:
                    del self._spans[event_id]
        return Ledger(events, self.max_events, spans=self._spans, spans_lock=self._spans_lock)

    @property
    def cached_spans(self) -> int:
        """How many gap spans the cache holds."""
        with self._spans_lock:
            return len(self._spans)

    def select(
        self,
        *,
        exchanges: Collection[str] | None = None,
        symbols: Collection[str] | None = None,
        streams: Collection[str] | None = None,
        kinds: Collection[str] | None = None,
        statuses: Collection[str] | None = None,
    ) -> list[LedgerEvent]:
        if exchanges and symbols:
            pool: Iterable[LedgerEvent] = (
                e for ex in exchanges for s in symbols for e in self._by_key.get((ex, s), ())
            )
        else:
            pool = self.events.values()
        return [
            e
            for e in pool
            if (not exchanges or e.exchange in exchanges)
            and (not symbols or e.symbol in symbols)
            and (not streams or e.stream in streams)
            and (not kinds or e.kind in kinds)
            and (not statuses or e.status in statuses)
        ]

    def span(self, e: LedgerEvent) -> tuple[int, int]:
        """The event's time span: an outage's window, a gap's surrounding trades."""
        if e.kind == "outage" and e.window_start is not None and e.window_end is not None:
            return e.window_start, e.window_end
        with self._spans_lock:
            cached = self._spans.get(e.event_id)
        return cached if cached is not None else (e.detected_at, e.detected_at)

    def overlapping(
        self,
        events: Iterable[LedgerEvent],
        start: int,
        end: int,
        *,
        cursor: duckdb.DuckDBPyConnection | None = None,
        trades: TableFiles | None = None,
    ) -> list[LedgerEvent]:
        """Events whose span meets [start, end), gap spans resolved from the trade files."""
        candidates = [
            e for e in events if not (e.kind == "gap" and e.detected_at < start - CLOCK_SLACK_US)
        ]
        if cursor is not None and trades is not None:
            self.resolve_spans(cursor, trades, candidates)
        out = []
        for e in candidates:
            lo, hi = self.span(e)
            if e.kind == "gap":
                # Unresolved ends: the gap lies somewhere before detected_at.
                if lo <= hi and lo < end and hi >= start:
                    out.append(e)
            elif lo < end and hi > start:
                out.append(e)
        return out

    def resolve_spans(
        self,
        cursor: duckdb.DuckDBPyConnection,
        trades: TableFiles,
        events: Iterable[LedgerEvent],
    ) -> None:
        """Look up, once, the times of the trades just before and after each gap."""
        todo = []
        with self._spans_lock:
            for e in events:
                if (
                    e.kind == "gap"
                    and e.event_id not in self._spans
                    and e.first_missing is not None
                    and e.last_missing is not None
                ):
                    todo.append(e)
        for i in range(0, len(todo), _SPAN_QUERY_CHUNK):
            self._resolve(cursor, trades, todo[i : i + _SPAN_QUERY_CHUNK])

    def _resolve(
        self, cursor: duckdb.DuckDBPyConnection, trades: TableFiles, gaps: list[LedgerEvent]
    ) -> None:
        wanted: dict[tuple[str, str, int], None] = {}
        for g in gaps:
            assert g.first_missing is not None and g.last_missing is not None
            wanted[(g.exchange, g.symbol, g.first_missing - 1)] = None
            wanted[(g.exchange, g.symbol, g.last_missing + 1)] = None
        paths = [
            e.path
            for e in trades.entries
            if any(_holds(e.symbols.get((ex, sym)), seq) for ex, sym, seq in wanted)
        ]
        found: dict[tuple[str, str, int], int] = {}
        if paths:
            clause = " OR ".join(
                "(exchange = ? AND symbol = ? AND source_sequence = ?)" for _ in wanted
            )
            params: list[Any] = [paths]
            for key in wanted:
                params.extend(key)
            sql = (
                "SELECT exchange, symbol, source_sequence, epoch_us(min(timestamp)) "
                "FROM read_parquet(?, hive_partitioning = false) "
                f"WHERE {clause} GROUP BY ALL"
            )
            for ex, sym, seq, ts in cursor.execute(sql, params).fetchall():
                found[(ex, sym, seq)] = ts
        with self._spans_lock:
            for g in gaps:
                assert g.first_missing is not None and g.last_missing is not None
                before = found.get((g.exchange, g.symbol, g.first_missing - 1))
                after = found.get((g.exchange, g.symbol, g.last_missing + 1))
                if before is not None and after is not None:
                    self._spans[g.event_id] = (before, after)


def _holds(stats: Any, seq: int) -> bool:
    if stats is None or stats.min_seq is None or stats.max_seq is None:
        return False
    return bool(stats.min_seq <= seq <= stats.max_seq)
