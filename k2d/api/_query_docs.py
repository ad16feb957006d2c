"""OpenAPI documentation of the query routes: the JSON shapes (for the schema only: bodies are
rendered by DuckDB and streamed), examples, the other media types, and the error responses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import Example, OpenAPIMediaType, OpenAPIType, Operation, Schema
from msgspec import UNSET, UnsetType

from k2d.api._access import access_responses
from k2d.api._errors import ErrorBody
from k2d.query import MEDIA_TYPES, Format

__all__ = [
    "CompletenessPage",
    "GapsPage",
    "OhlcvPage",
    "QuotesPage",
    "SnapshotsPage",
    "SummaryPage",
    "SymbolsPage",
    "TabularOperation",
    "TradesPage",
    "TradesQuery",
    "responses",
]

Dec = Annotated[
    str, msgspec.Meta(description="Exact decimal as a string", examples=["43123.45000000"])
]
Ts = Annotated[
    str,
    msgspec.Meta(
        description="UTC, ISO-8601 with microseconds", examples=["2024-03-01T12:00:00.123456Z"]
    ),
]


class GapRef(msgspec.Struct):
    """A ledger gap or outage meeting the window, with its current status."""

    event_id: str
    exchange: str
    symbol: str
    stream: str
    kind: str
    status: str
    first_missing: int | None
    last_missing: int | None
    missing_count: int
    start: Ts | None
    end: Ts | None
    detected_at: Ts | None


class WindowMeta(msgspec.Struct):
    start: Ts | None
    end: Ts | None


class Meta(msgspec.Struct):
    """About the answer: the snapshot read, the page, and the known gaps in the window."""

    rows: int
    truncated: bool
    next_cursor: str | None
    snapshot_id: int | None = None
    table: str | None = None
    window: WindowMeta | None = None
    gaps: list[GapRef] | None = None
    snapshots: dict[str, int | None] | None = None


class TradeRow(msgspec.Struct, kw_only=True):
    """A row; `columns=` selects some fields, so every field may be absent."""

    message_id: str | UnsetType = UNSET
    trade_id: str | UnsetType = UNSET
    symbol: str | UnsetType = UNSET
    exchange: str | UnsetType = UNSET
    asset_class: str | UnsetType = UNSET
    timestamp: Ts | UnsetType = UNSET
    price: Dec | UnsetType = UNSET
    quantity: Dec | UnsetType = UNSET
    currency: str | UnsetType = UNSET
    side: str | UnsetType = UNSET
    trade_conditions: list[str] | UnsetType | None = UNSET
    source_sequence: int | UnsetType | None = UNSET
    ingestion_timestamp: Ts | UnsetType = UNSET
    platform_sequence: int | UnsetType = UNSET
    vendor_data: str | UnsetType | None = UNSET
    provenance: str | UnsetType = UNSET


class QuoteRow(msgspec.Struct, kw_only=True):
    """A row; `columns=` selects some fields, so every field may be absent."""

    message_id: str | UnsetType = UNSET
    symbol: str | UnsetType = UNSET
    exchange: str | UnsetType = UNSET
    asset_class: str | UnsetType = UNSET
    timestamp: Ts | UnsetType = UNSET
    bid_price: Dec | UnsetType | None = UNSET
    bid_quantity: Dec | UnsetType | None = UNSET
    ask_price: Dec | UnsetType | None = UNSET
    ask_quantity: Dec | UnsetType | None = UNSET
    currency: str | UnsetType = UNSET
    source_sequence: int | UnsetType | None = UNSET
    ingestion_timestamp: Ts | UnsetType = UNSET
    platform_sequence: int | UnsetType = UNSET
    vendor_data: str | UnsetType | None = UNSET
    provenance: str | UnsetType = UNSET


class OhlcvBar(msgspec.Struct):
    bar_start: Ts
    exchange: str
    symbol: str
    open: Dec
    high: Dec
    low: Dec
    close: Dec
    volume: Dec
    vwap: Dec | None
    trade_count: int


class SummaryRow(msgspec.Struct):
    date: str
    exchange: str
    symbol: str
    timezone: str
    session_start: Ts
    session_end: Ts
    open: Dec | None
    high: Dec | None
    low: Dec | None
    close: Dec | None
    volume: Dec | None
    vwap: Dec | None
    trade_count: int
    first_trade: Ts | None
    last_trade: Ts | None
    quote_count: int
    two_sided_quotes: int
    one_sided_quotes: int
    crossed_quotes: int
    spread_mean: Dec | None
    spread_median: Dec | None
    spread_min: Dec | None
    spread_max: Dec | None
    spread_bps_mean: float | None


class SymbolRow(msgspec.Struct):
    exchange: str
    symbol: str
    trade_count: int
    first_trade: Ts | None
    last_trade: Ts | None
    quote_count: int
    first_quote: Ts | None
    last_quote: Ts | None


class SnapshotRow(msgspec.Struct):
    snapshot_id: int
    parent_id: int | None
    committed_at: Ts
    operation: str | None
    added_records: int | None
    added_files: int | None
    total_records: int | None
    k2: dict[str, Any]


class GapRow(msgspec.Struct):
    event_id: str
    exchange: str
    symbol: str
    stream: str
    kind: str
    status: str
    first_missing: int | None
    last_missing: int | None
    missing_count: int
    span_start: Ts | None
    span_end: Ts | None
    detected_at: Ts
    resolved_at: Ts | None
    window_start: Ts | None
    window_end: Ts | None
    detail: str
    recorded_at: Ts


class CompletenessRow(msgspec.Struct):
    bucket_start: Ts
    expected: int
    stored: int
    backfilled: int
    missing: int
    open_gaps: int
    outage_seconds: float
    coverage: float | None


class TradesPage(msgspec.Struct):
    data: list[TradeRow]
    meta: Meta


class QuotesPage(msgspec.Struct):
    data: list[QuoteRow]
    meta: Meta


class OhlcvPage(msgspec.Struct):
    data: list[OhlcvBar]
    meta: Meta


class SummaryPage(msgspec.Struct):
    data: list[SummaryRow]
    meta: Meta


class SymbolsPage(msgspec.Struct):
    data: list[SymbolRow]
    meta: Meta


class SnapshotsPage(msgspec.Struct):
    data: list[SnapshotRow]
    meta: Meta


class GapsPage(msgspec.Struct):
    data: list[GapRow]
    meta: Meta


class CompletenessPage(msgspec.Struct):
    data: list[CompletenessRow]
    meta: Meta


Times = Annotated[
    str | int | None,
    msgspec.Meta(
        description="ISO-8601 (naive = UTC) or epoch milliseconds (< 10^14) / microseconds",
        examples=["2024-03-01T12:00:00Z"],
    ),
]


class TradesQuery(msgspec.Struct, forbid_unknown_fields=True):
    """Several symbols and exchanges in one query; the same meaning as GET /v1/trades."""

    symbols: Annotated[list[str], msgspec.Meta(max_length=1_000)] = msgspec.field(
        default_factory=list
    )
    exchanges: Annotated[list[str], msgspec.Meta(max_length=1_000)] = msgspec.field(
        default_factory=list
    )
    start: Times = None
    end: Times = None
    limit: int | None = None
    cursor: str | None = None
    order: str | None = None
    columns: Annotated[list[str], msgspec.Meta(max_length=100)] = msgspec.field(
        default_factory=list
    )
    as_of: Times = None
    snapshot_id: int | None = None
    format: str | None = None


_ERRORS: dict[int, tuple[str, list[tuple[str, str]]]] = {
    413: (
        "Request body over the limit",
        [("body_too_large", "request body is larger than the limit of 65536 bytes")],
    ),
    429: (
        "Too many requests, or too many at once, for this client (see Retry-After)",
        [
            ("rate_limited", "too many requests; slow down"),
            ("too_many_concurrent_queries", "at most 2 queries at once per client"),
        ],
    ),
    503: (
        "The query queue is full or the index is not loaded (see Retry-After)",
        [
            ("busy", "the query queue is full; retry shortly"),
            ("not_ready", "the query index is not loaded yet"),
        ],
    ),
    504: (
        "The query ran past its time limit",
        [("query_timeout", "the query ran past its time limit")],
    ),
}


def _examples(items: list[tuple[str, str]]) -> list[Example]:
    return [
        Example(id=code, summary=code, value={"code": code, "detail": detail})
        for code, detail in items
    ]


def responses(
    page: Any,
    example: dict[str, Any],
    bad_request: list[tuple[str, str]],
    *,
    not_found: list[tuple[str, str]] | None = None,
    body: bool = False,
) -> dict[int, ResponseSpec]:
    """The documented responses of a tabular route: the page (JSON; CSV, Parquet and Arrow
    are added by TabularOperation) and every error with its codes: 400 for a malformed
    request, 404 (`not_found`) for a well-formed name of nothing stored."""
    out = {
        200: ResponseSpec(
            data_container=page,
            description="Rows and meta. `format=` or Accept selects CSV, Parquet or Arrow IPC "
            "stream instead (same columns; meta in X-K2D-* headers).",
            examples=[Example(id="page", summary="A page", value=example)],
            generate_examples=False,
        ),
        400: ResponseSpec(
            data_container=ErrorBody,
            description="Invalid parameters; `code` says which check failed",
            examples=_examples(bad_request),
            generate_examples=False,
        ),
        **access_responses(),
    }
    if not_found:
        out[404] = ResponseSpec(
            data_container=ErrorBody,
            description="A symbol, exchange or snapshot named that is not stored",
            examples=_examples(not_found),
            generate_examples=False,
        )
    for status, (description, items) in _ERRORS.items():
        if status == 413 and not body:
            continue
        out[status] = ResponseSpec(
            data_container=ErrorBody,
            description=description,
            examples=_examples(items),
            generate_examples=False,
        )
    return dict(sorted(out.items()))


_BINARY = Schema(type=OpenAPIType.STRING, format="binary")  # type: ignore[arg-type]


@dataclass
class TabularOperation(Operation):
    """Adds the CSV, Parquet and Arrow IPC media types to a route's 200 response."""

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        content = getattr(ok, "content", None)
        if content is None:
            return
        content[MEDIA_TYPES[Format.CSV]] = OpenAPIMediaType(
            schema=Schema(type=OpenAPIType.STRING, description="CSV with a header row")
        )
        for fmt in (Format.PARQUET, Format.ARROW):
            content[MEDIA_TYPES[fmt]] = OpenAPIMediaType(schema=_BINARY)
