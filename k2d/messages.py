"""Every Struct that crosses a stream between actors. Messages carry batches, not records."""

from __future__ import annotations

from typing import Any

import msgspec

from k2d.model import DeadLetter, Quote, SequenceEvent, Trade

__all__ = [
    "Committed",
    "DataFileInfo",
    "GapRequest",
    "GapResolution",
    "Outage",
    "RecordBatch",
    "SequencedBatch",
    "Watermark",
]


class GapRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Tracker -> Backfiller: fetch ids first..last of a stream from the venue's history."""

    event_id: str
    exchange: str
    symbol: str
    stream: str
    partition: int
    first: int
    last: int


class GapResolution(msgspec.Struct, frozen=True, kw_only=True):
    """Backfiller -> Tracker: ids first..last of a gap cannot be recovered, and why.

    Trades that were recovered travel as ordinary rows (provenance "backfill") in the same
    RecordBatch; the tracker closes a gap as `backfilled` once rows fill it."""

    exchange: str
    symbol: str
    stream: str
    first: int
    last: int
    status: str  # "unrecoverable"
    reason: str


class Outage(msgspec.Struct, frozen=True, kw_only=True):
    """A feed captured nothing between start_us and end_us (disconnect, handshake, downtime)."""

    source: str
    exchange: str
    symbols: tuple[str, ...]
    streams: tuple[str, ...]
    start_us: int
    end_us: int
    reason: str


class RecordBatch(msgspec.Struct, kw_only=True):
    """Parsed records from one feed (or a backfill, or a load), in venue order."""

    source: str
    trades: list[Trade] = msgspec.field(default_factory=list)
    quotes: list[Quote] = msgspec.field(default_factory=list)
    dead_letters: list[DeadLetter] = msgspec.field(default_factory=list)
    outages: list[Outage] = msgspec.field(default_factory=list)
    resolutions: list[GapResolution] = msgspec.field(default_factory=list)
    # Journal or Kafka position of the last frame in this batch (JSON-able), if any.
    log_position: dict[str, Any] | None = None
    received_at: int = 0
    # OpenTelemetry SpanContext of the span that produced the batch (for links).
    span_context: Any = None


class Watermark(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Last accepted source sequence and platform sequence of one (exchange, symbol, stream)."""

    last_sequence: int | None
    platform_sequence: int
    last_seen_us: int
    # Gaps (first, last, detected_at) found but not yet in the ledger (inside gap_grace):
    # committed with the rows above them, so a crash cannot forget them.
    pending_gaps: tuple[tuple[int, int, int], ...] = ()
    # detected_at of the oldest gap or outage still open in the ledger (0: none); None when
    # written by a k2d that did not record it. A restart reads the ledger from there on.
    open_since: int | None = None


class SequencedBatch(msgspec.Struct, kw_only=True):
    """A tracker's verdict on a RecordBatch: the rows to store and the ledger rows."""

    batch_id: int
    partition: int
    trades: list[Trade]
    quotes: list[Quote]
    events: list[SequenceEvent]
    dead_letters: list[DeadLetter]
    # Watermarks after this batch, keyed "EXCHANGE:SYMBOL:stream".
    watermarks: dict[str, Watermark]
    log_position: dict[str, Any] | None = None
    span_context: Any = None
    # The trades and quotes as Arrow columns, gathered once by whichever of the live hub and
    # the writer reads them first (k2d.storage.batch_columns); the rows do not change after.
    columns: dict[str, Any] = msgspec.field(default_factory=dict)

    def row_count(self) -> int:
        return len(self.trades) + len(self.quotes) + len(self.events) + len(self.dead_letters)


class DataFileInfo(msgspec.Struct, frozen=True, kw_only=True):
    path: str
    record_count: int
    size_bytes: int
    partition: dict[str, Any]
    min_timestamp: int | None = None
    max_timestamp: int | None = None


class Committed(msgspec.Struct, frozen=True, kw_only=True):
    """The writer committed a snapshot of `table` that holds the rows of `batch_ids`."""

    table: str
    snapshot_id: int
    files: tuple[DataFileInfo, ...]
    batch_ids: tuple[int, ...]
    rows: int
    committed_at: int
