"""Domain records that flow through the pipeline: Trade, Quote, SequenceEvent, DeadLetter.

Prices and quantities stay exact decimal strings until the writer casts whole columns to
decimal(18,8); timestamps are UTC microseconds since the epoch.
"""

from __future__ import annotations

import time
import zlib
from typing import Literal

import msgspec

__all__ = [
    "DeadLetter",
    "EventKind",
    "EventStatus",
    "Provenance",
    "Quote",
    "SequenceEvent",
    "StreamKey",
    "Trade",
    "now_us",
    "partition_of",
    "quote_message_id",
    "trade_message_id",
]

Provenance = Literal["live", "backfill", "batch", "replay"]
EventKind = Literal["gap", "duplicate", "out_of_order", "session_reset", "outage"]
EventStatus = Literal["open", "backfilled", "unrecoverable", "info"]
StreamKey = tuple[str, str, str]
"""(exchange, symbol, stream), e.g. ("BINANCE", "BTCUSDT", "trade")."""


class Trade(msgspec.Struct, gc=False, kw_only=True):
    message_id: str
    trade_id: str
    symbol: str
    exchange: str
    asset_class: str
    timestamp: int
    price: str
    quantity: str
    currency: str
    side: str
    trade_conditions: tuple[str, ...] | None = None
    source_sequence: int | None = None
    ingestion_timestamp: int
    platform_sequence: int = 0
    vendor_data: str | None = None
    provenance: str = "live"


class Quote(msgspec.Struct, gc=False, kw_only=True):
    message_id: str
    symbol: str
    exchange: str
    asset_class: str
    timestamp: int
    bid_price: str | None
    bid_quantity: str | None
    ask_price: str | None
    ask_quantity: str | None
    currency: str
    source_sequence: int | None = None
    ingestion_timestamp: int
    platform_sequence: int = 0
    vendor_data: str | None = None
    provenance: str = "live"


class SequenceEvent(msgspec.Struct, kw_only=True):
    """One row of the append-only gap ledger; the latest row per event_id is its status."""

    event_id: str
    exchange: str
    symbol: str
    stream: str
    partition: int
    kind: str
    status: str
    first_missing: int | None = None
    last_missing: int | None = None
    missing_count: int = 0
    detected_at: int
    resolved_at: int | None = None
    window_start: int | None = None
    window_end: int | None = None
    detail: str = ""
    # When this row was written: the latest recorded_at per event_id is the event's status.
    recorded_at: int = 0


class DeadLetter(msgspec.Struct, kw_only=True):
    """Input that could not become a record, kept with its bytes and the reason."""

    received_at: int
    source: str
    exchange: str
    reason: str
    raw: bytes
    line: int | None = None
    detail: str = ""


def now_us() -> int:
    return time.time_ns() // 1_000


def trade_message_id(exchange: str, symbol: str, venue_id: int | str) -> str:
    """Deterministic id: a replay or backfill of the same venue trade gets the same id."""
    return f"{exchange}:{symbol}:trade:{venue_id}"


def quote_message_id(exchange: str, symbol: str, venue_id: int | str) -> str:
    return f"{exchange}:{symbol}:quote:{venue_id}"


def partition_of(exchange: str, symbol: str, partitions: int) -> int:
    """Stable across processes (unlike hash()), so a symbol always lands on one tracker."""
    return zlib.crc32(f"{exchange}:{symbol}".encode()) % partitions
