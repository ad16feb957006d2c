"""Every Struct that crosses a stream between actors. Messages carry batches, not records."""

from __future__ import annotations

from typing import Any

import msgspec

from k2d.columns import columns_to_records
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


class _Rows:
    """The trades and quotes of a batch, held as records, as Arrow columns of the records' own
    types (`columns`, keyed "trades" and "quotes"; see k2d.storage.batch_columns), or as both.
    Either is made from the other on first use; the rows do not change after that. The
    ingest path hands columns on and never asks for records, which cost an object a row."""

    __slots__ = ("_quotes", "_trades", "columns")

    def __init__(
        self,
        trades: list[Trade] | None,
        quotes: list[Quote] | None,
        columns: dict[str, Any] | None,
    ) -> None:
        self.columns: dict[str, Any] = columns if columns is not None else {}
        self._trades = trades if trades is not None or "trades" in self.columns else []
        self._quotes = quotes if quotes is not None or "quotes" in self.columns else []

    @property
    def trades(self) -> list[Trade]:
        if self._trades is None:
            self._trades = columns_to_records(self.columns["trades"], Trade)
        return self._trades

    @trades.setter
    def trades(self, rows: list[Trade]) -> None:
        self._trades = rows
        self.columns.pop("trades", None)

    @property
    def quotes(self) -> list[Quote]:
        if self._quotes is None:
            self._quotes = columns_to_records(self.columns["quotes"], Quote)
        return self._quotes

    @quotes.setter
    def quotes(self, rows: list[Quote]) -> None:
        self._quotes = rows
        self.columns.pop("quotes", None)

    def count(self, table: str) -> int:
        """Rows of `table` ("trades" or "quotes"), without making records of them."""
        rows = self._trades if table == "trades" else self._quotes
        if rows is not None:
            return len(rows)
        return int(self.columns[table].num_rows)


class RecordBatch(_Rows):
    """Parsed records from one feed (or a backfill, or a load), in venue order."""

    __slots__ = (
        "dead_letters",
        "log_position",
        "outages",
        "received_at",
        "resolutions",
        "source",
        "span_context",
    )

    def __init__(
        self,
        *,
        source: str,
        trades: list[Trade] | None = None,
        quotes: list[Quote] | None = None,
        columns: dict[str, Any] | None = None,
        dead_letters: list[DeadLetter] | None = None,
        outages: list[Outage] | None = None,
        resolutions: list[GapResolution] | None = None,
        log_position: dict[str, Any] | None = None,
        received_at: int = 0,
        span_context: Any = None,
    ) -> None:
        super().__init__(trades, quotes, columns)
        self.source = source
        self.dead_letters: list[DeadLetter] = dead_letters if dead_letters is not None else []
        self.outages: list[Outage] = outages if outages is not None else []
        self.resolutions: list[GapResolution] = resolutions if resolutions is not None else []
        # Journal or Kafka position of the last frame in this batch (JSON-able), if any.
        self.log_position = log_position
        self.received_at = received_at
        # OpenTelemetry SpanContext of the span that produced the batch (for links).
        self.span_context = span_context


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


class SequencedBatch(_Rows):
    """A tracker's verdict on a RecordBatch: the rows to store and the ledger rows."""

    __slots__ = (
        "batch_id",
        "dead_letters",
        "events",
        "log_position",
        "partition",
        "span_context",
        "watermarks",
    )

    def __init__(
        self,
        *,
        batch_id: int,
        partition: int,
        trades: list[Trade] | None = None,
        quotes: list[Quote] | None = None,
        columns: dict[str, Any] | None = None,
        events: list[SequenceEvent],
        dead_letters: list[DeadLetter],
        watermarks: dict[str, Watermark],
        log_position: dict[str, Any] | None = None,
        span_context: Any = None,
    ) -> None:
        super().__init__(trades, quotes, columns)
        self.batch_id = batch_id
        self.partition = partition
        self.events = events
        self.dead_letters = dead_letters
        # Watermarks after this batch, keyed "EXCHANGE:SYMBOL:stream".
        self.watermarks = watermarks
        self.log_position = log_position
        self.span_context = span_context

    def row_count(self) -> int:
        return (
            self.count("trades") + self.count("quotes") + len(self.events) + len(self.dead_letters)
        )


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
