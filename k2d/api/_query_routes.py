"""The query routes under /v1: trades, quotes, recent trades, OHLCV bars, a day's summary,
symbols, snapshots, the gap ledger and completeness.

Handlers validate their parameters (k2d.query raises QueryError with a stable code), build a
plan, and hand it to the QueryPool, which answers with a stream of bytes in the format asked
for (`format=` or Accept): JSON `{"data": [...], "meta": {...}}`, CSV, Parquet or Arrow IPC.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import anyio
from litestar import Request, Router, get, post
from litestar.di import NamedDependency
from litestar.openapi.spec import Example
from litestar.params import JSONBody, Parameter, QueryParameter
from litestar.response import Response, Stream

from k2d.api._access import client_key
from k2d.api._errors import ApiError
from k2d.api._query_docs import (
    CompletenessPage,
    GapsPage,
    OhlcvPage,
    QuotesPage,
    SnapshotsPage,
    SummaryPage,
    SymbolsPage,
    TabularOperation,
    TradesPage,
    TradesQuery,
    responses,
)
from k2d.api._state import ApiState
from k2d.model import now_us
from k2d.query import (
    BUCKETS,
    GAP_KINDS,
    GAP_STATUSES,
    INTERVALS,
    TABLE_COLUMNS,
    CompletenessPlan,
    GapsPlan,
    OhlcvPlan,
    Plan,
    QueryError,
    QueryService,
    RecentPlan,
    RowsPlan,
    SnapshotsPlan,
    SummaryPlan,
    SymbolsPlan,
    Window,
    negotiate_format,
    parse_columns,
    parse_date,
    parse_duration,
    parse_exchange,
    parse_exchanges,
    parse_integer,
    parse_interval,
    parse_limit,
    parse_order,
    parse_snapshot,
    parse_symbol,
    parse_symbols,
    parse_timezone,
    parse_window,
    split_values,
    trading_day,
)
from k2d.storage import QUOTES, TRADES

__all__ = ["QUERY_HANDLERS", "query_router"]

_DEFAULT_SPAN = 3_600.0
_DEFAULT_COMPLETENESS_SPAN = 86_400.0
_FUTURE_SLACK_US = 60_000_000

Symbols = Annotated[
    list[str] | None,
    Parameter(
        description="Symbol(s): repeat the parameter (one symbol each; a comma-separated list "
        "in one value is read too), at most query.max_symbols. Case-insensitive.",
        examples=[Example(summary="one symbol", value=["BTCUSDT"])],
    ),
]
RequiredSymbols = Annotated[
    list[str] | None,
    Parameter(
        description="Symbol(s), required: repeat the parameter (one symbol each), at most "
        "query.max_symbols. Case-insensitive.",
        examples=[Example(summary="one symbol", value=["BTCUSDT"])],
        required=True,
    ),
]
Exchanges = Annotated[
    list[str] | None,
    Parameter(
        description="Exchange(s), e.g. BINANCE: repeat the parameter (default: all)",
        examples=[Example(summary="Binance", value=["BINANCE"])],
    ),
]
Start = Annotated[
    str | None,
    Parameter(
        description="Window start, inclusive: ISO-8601 (a date, or a date and time with an "
        "optional offset; naive = UTC) or epoch milliseconds (below 10^14) or microseconds, "
        "from 1970 to 2200. Default: an hour before `end`. The window [start, end) must not "
        "be empty or reversed, nor longer than query.max_window_seconds (400).",
        examples=[Example(summary="ISO-8601", value="2024-03-01T12:00:00Z")],
    ),
]
End = Annotated[
    str | None,
    Parameter(
        description="Window end, exclusive, in the same forms as `start`. Default: now.",
        examples=[Example(summary="epoch milliseconds", value="1709298000000")],
    ),
]
# Integers are read as str and parsed by k2d.query (parse_integer): Litestar would take
# `null`, `5.0` or `1e3` for one.
Limit = Annotated[
    str | None,
    Parameter(
        description="Rows per page (default query.default_limit, at most query.max_rows)",
        examples=[Example(summary="a page of 500", value=500)],
    ),
]
Cursor = Annotated[
    str | None,
    Parameter(
        description="`meta.next_cursor` (or X-K2D-Next-Cursor) of the previous page of the "
        "same query; it pins the snapshot the first page read. Any other value, or one whose "
        "snapshot has since expired, is 400 invalid_cursor.",
    ),
]
Order = Annotated[
    str | None,
    Parameter(
        description="asc (default) or desc",
        examples=[Example(summary="newest first", value="desc")],
    ),
]
AsOf = Annotated[
    str | None,
    Parameter(
        description="Read the snapshot that was current at this time (same forms as `start`; "
        "before the table's first snapshot it was empty, and so is the answer). Not with "
        "`snapshot_id`.",
        examples=[Example(summary="time travel", value="2024-03-01T00:00:00Z")],
    ),
]
SnapshotId = Annotated[
    str | None,
    Parameter(description="Read this Iceberg snapshot (see /v1/snapshots); 404 if unknown"),
]
Fmt = Annotated[
    str | None,
    QueryParameter(
        name="format",
        description="json (default), csv, parquet or arrow (Arrow IPC stream); overrides Accept",
        examples=[Example(summary="CSV", value="csv")],
    ),
]

_ROWS_400 = [
    ("invalid_symbol", "'BTC USDT' cannot be a symbol"),
    ("unknown_column", "unknown column 'nope'; expected some of message_id, ..."),
    ("limit_too_large", "limit 1000000 is above the maximum 100000"),
    ("window_too_large", "the window is 3e+06s; at most 2.6784e+06s may be asked for at once"),
    ("invalid_time", "start: 'yesterday' is not ISO-8601 or epoch milliseconds/microseconds"),
    ("empty_window", "start equals end: the window holds no time"),
    ("reversed_window", "start is after end"),
    ("invalid_cursor", "cursor is malformed or belongs to another query"),
    ("unknown_format", "unknown format 'xml'; expected one of json, csv, parquet, arrow"),
    ("conflicting_parameters", "give as_of or snapshot_id, not both"),
    ("invalid_snapshot", "snapshot_id 99999999999999999999 is not a 64-bit integer"),
    ("invalid_parameter", "query parameter 'limit': expected an integer, got '5.0'"),
]
_ROWS_404 = [
    ("unknown_symbol", "unknown symbol 'NOPE'"),
    ("unknown_exchange", "no trades from exchange 'KRAKEN'"),
    ("unknown_snapshot", "trades has no snapshot 42"),
]
_GAP_EXAMPLE = {
    "event_id": "BINANCE:BTCUSDT:trade:gap:1001:1709294400000000",
    "exchange": "BINANCE",
    "symbol": "BTCUSDT",
    "stream": "trade",
    "kind": "gap",
    "status": "open",
    "first_missing": 1001,
    "last_missing": 1003,
    "missing_count": 3,
    "start": "2024-03-01T12:00:01.000000Z",
    "end": "2024-03-01T12:00:02.000000Z",
    "detected_at": "2024-03-01T12:00:03.000000Z",
}
_TRADE_EXAMPLE = {
    "message_id": "BINANCE:BTCUSDT:trade:1000",
    "trade_id": "1000",
    "symbol": "BTCUSDT",
    "exchange": "BINANCE",
    "asset_class": "crypto",
    "timestamp": "2024-03-01T12:00:00.123000Z",
    "price": "61234.50000000",
    "quantity": "0.01200000",
    "currency": "USDT",
    "side": "BUY",
    "trade_conditions": None,
    "source_sequence": 1000,
    "ingestion_timestamp": "2024-03-01T12:00:00.125301Z",
    "platform_sequence": 88,
    "vendor_data": None,
    "provenance": "live",
}


def _meta_example(**extra: Any) -> dict[str, Any]:
    return {
        "table": "trades",
        "snapshot_id": 3055729675574597004,
        "window": {"start": "2024-03-01T12:00:00.000000Z", "end": "2024-03-01T13:00:00.000000Z"},
        "gaps": [_GAP_EXAMPLE],
        "rows": 1,
        "truncated": True,
        "next_cursor": "WzEsImQ0ZjJhYjE5Y2E3YzAxZTMiLHsidHJhZGVzIjoxfSxbMSwiQSIsMSwiQSJdXQ",
        **extra,
    }


@contextmanager
def _as_api_errors() -> Iterator[None]:
    try:
        yield
    except QueryError as exc:
        raise ApiError(exc.status, exc.code, exc.detail, exc.headers) from None


def _int(value: int | str | None, name: str) -> int | None:
    """A query parameter's integer (a JSON body's is one already)."""
    return parse_integer(value, name) if isinstance(value, str) else value


def _pool(api: ApiState) -> QueryService:
    if api.query_pool is None:
        raise ApiError(503, "query_unavailable", "the query pool is not running")
    return api.query_pool


async def _answer(
    api: ApiState, request: Request[Any, Any, Any], plan: Plan, fmt: Any
) -> Response[Any]:
    """The query's answer: one body when it was read whole before the head (a page that
    fits a read), else streamed as the worker reads it."""
    pool = _pool(api)
    with _as_api_errors():
        result = await pool.execute(client_key(request.scope), plan, fmt)
    head = result.head
    if head.body is not None:
        return Response(head.body, media_type=head.media_type, headers=head.headers)
    return Stream(result, media_type=head.media_type, headers=head.headers)


def _rows_plan(
    api: ApiState,
    endpoint: str,
    table: str,
    *,
    symbols: Any,
    exchanges: Any,
    start: str | None,
    end: str | None,
    limit: int | str | None,
    cursor: str | None,
    order: str | None,
    columns: Any,
    as_of: str | None,
    snapshot_id: int | str | None,
) -> RowsPlan:
    cfg = _pool(api).cfg
    return RowsPlan(
        endpoint=endpoint,
        table=table,
        symbols=parse_symbols(symbols, cfg.max_symbols),
        exchanges=parse_exchanges(exchanges, cfg.max_symbols),
        window=parse_window(
            start,
            end,
            now_us=now_us(),
            default_seconds=_DEFAULT_SPAN,
            max_seconds=cfg.max_window_seconds,
        ),
        limit=parse_limit(_int(limit, "limit"), cfg.default_limit, cfg.max_rows),
        desc=parse_order(order),
        columns=parse_columns(columns, list(TABLE_COLUMNS[table])),
        snapshot=parse_snapshot(as_of, _int(snapshot_id, "snapshot_id")),
        cursor=cursor,
    )


@get(
    "/trades",
    operation_class=TabularOperation,
    responses=responses(
        TradesPage,
        {"data": [_TRADE_EXAMPLE], "meta": _meta_example()},
        _ROWS_400,
        not_found=_ROWS_404,
    ),
)
async def trades(
    api: NamedDependency[ApiState],
    request: Request[Any, Any, Any],
    symbol: Symbols = None,
    exchange: Exchanges = None,
    start: Start = None,
    end: End = None,
    limit: Limit = None,
    cursor: Cursor = None,
    order: Order = None,
    columns: Annotated[
        list[str] | None,
        Parameter(
            description="Columns to return (allow-listed; default all), repeat or comma-separate"
        ),
    ] = None,
    as_of: AsOf = None,
    snapshot_id: SnapshotId = None,
    fmt: Fmt = None,
) -> Response[Any]:
    """Trades in a time window, ordered by (timestamp, symbol, source_sequence, message_id),
    in keyset pages. `meta` says which snapshot was read and which known gaps meet the window."""
    with _as_api_errors():
        out = negotiate_format(fmt, request.headers.get("accept"))
        plan = _rows_plan(
            api,
            "trades",
            TRADES,
            symbols=symbol,
            exchanges=exchange,
            start=start,
            end=end,
            limit=limit,
            cursor=cursor,
            order=order,
            columns=columns,
            as_of=as_of,
            snapshot_id=snapshot_id,
        )
    return await _answer(api, request, plan, out)


@get(
    "/quotes",
    operation_class=TabularOperation,
    responses=responses(
        QuotesPage,
        {
            "data": [
                {
                    "message_id": "BINANCE:BTCUSDT:quote:5001",
                    "symbol": "BTCUSDT",
                    "exchange": "BINANCE",
                    "asset_class": "crypto",
                    "timestamp": "2024-03-01T12:00:00.120000Z",
                    "bid_price": "61234.40000000",
                    "bid_quantity": "1.50000000",
                    "ask_price": "61234.50000000",
                    "ask_quantity": "0.30000000",
                    "currency": "USDT",
                    "source_sequence": 5001,
                    "ingestion_timestamp": "2024-03-01T12:00:00.121000Z",
                    "platform_sequence": 91,
                    "vendor_data": None,
                    "provenance": "live",
                }
            ],
            "meta": _meta_example(table="quotes", gaps=[]),
        },
        _ROWS_400,
        not_found=_ROWS_404,
    ),
)
async def quotes(
    api: NamedDependency[ApiState],
    request: Request[Any, Any, Any],
    symbol: Symbols = None,
    exchange: Exchanges = None,
    start: Start = None,
    end: End = None,
    limit: Limit = None,
    cursor: Cursor = None,
    order: Order = None,
    columns: Annotated[
        list[str] | None,
        Parameter(
            description="Columns to return (allow-listed; default all), repeat or comma-separate"
        ),
    ] = None,
    as_of: AsOf = None,
    snapshot_id: SnapshotId = None,
    fmt: Fmt = None,
) -> Response[Any]:
    """Best bid/ask quotes in a time window, paged like /v1/trades."""
    with _as_api_errors():
        out = negotiate_format(fmt, request.headers.get("accept"))
        plan = _rows_plan(
            api,
            "quotes",
            QUOTES,
            symbols=symbol,
            exchanges=exchange,
            start=start,
            end=end,
            limit=limit,
            cursor=cursor,
            order=order,
            columns=columns,
            as_of=as_of,
            snapshot_id=snapshot_id,
        )
    return await _answer(api, request, plan, out)


@post(
    "/trades/query",
    status_code=200,
    operation_class=TabularOperation,
    responses=responses(
        TradesPage,
        {"data": [_TRADE_EXAMPLE], "meta": _meta_example()},
        _ROWS_400,
        not_found=_ROWS_404,
        body=True,
    ),
)
async def trades_query(
    api: NamedDependency[ApiState], request: Request[Any, Any, Any], data: JSONBody[TradesQuery]
) -> Response[Any]:
    """Trades of several symbols and exchanges in one query: the parameters of GET /v1/trades
    as a JSON body (`symbols`, `exchanges`, `columns` as lists)."""

    def text(value: str | int | None) -> str | None:
        return None if value is None else str(value)

    with _as_api_errors():
        out = negotiate_format(data.format, request.headers.get("accept"))
        plan = _rows_plan(
            api,
            "trades.query",
            TRADES,
            symbols=data.symbols,
            exchanges=data.exchanges,
            start=text(data.start),
            end=text(data.end),
            limit=data.limit,
            cursor=data.cursor,
            order=data.order,
            columns=data.columns,
            as_of=text(data.as_of),
            snapshot_id=data.snapshot_id,
        )
    return await _answer(api, request, plan, out)


@get(
    "/trades/recent",
    operation_class=TabularOperation,
    responses=responses(
        TradesPage,
        {
            "data": [_TRADE_EXAMPLE],
            "meta": _meta_example(live_rows=12, truncated=False, next_cursor=None),
        },
        [
            ("missing_symbol", "symbol is required"),
            ("invalid_window", "window must look like 30s, 15m, 2h or 1d, got 'soon'"),
            ("window_too_large", "window 40d is longer than 2.6784e+06s"),
            *_ROWS_400[:3],
        ],
        not_found=_ROWS_404[:2],
    ),
)
async def recent_trades(
    api: NamedDependency[ApiState],
    request: Request[Any, Any, Any],
    symbol: RequiredSymbols = None,
    exchange: Exchanges = None,
    window: Annotated[
        str | None,
        Parameter(
            description="How far back from now: 30s, 15m (default), 2h, 1d; at most "
            "query.max_window_seconds",
            examples=[Example(summary="15 minutes", value="15m")],
        ),
    ] = None,
    limit: Limit = None,
    order: Order = None,
    columns: Annotated[
        list[str] | None,
        Parameter(description="Columns to return (allow-listed; default all)"),
    ] = None,
    fmt: Fmt = None,
) -> Response[Any]:
    """The last minutes of trades: committed rows merged with the ones the live hub holds
    but the writer has not committed yet, each message_id once."""
    return await _recent(
        api,
        request,
        TRADES,
        symbol=symbol,
        exchange=exchange,
        window=window,
        limit=limit,
        order=order,
        columns=columns,
        fmt=fmt,
    )


_QUOTE_EXAMPLE = {
    "message_id": "BINANCE:BTCUSDT:quote:5001",
    "symbol": "BTCUSDT",
    "exchange": "BINANCE",
    "asset_class": "crypto",
    "timestamp": "2024-03-01T12:00:00.120000Z",
    "bid_price": "61234.40000000",
    "bid_quantity": "1.50000000",
    "ask_price": "61234.50000000",
    "ask_quantity": "0.30000000",
    "currency": "USDT",
    "source_sequence": 5001,
    "ingestion_timestamp": "2024-03-01T12:00:00.121000Z",
    "platform_sequence": 91,
    "vendor_data": None,
    "provenance": "live",
}


@get(
    "/quotes/recent",
    operation_class=TabularOperation,
    responses=responses(
        QuotesPage,
        {
            "data": [_QUOTE_EXAMPLE],
            "meta": _meta_example(
                table="quotes", gaps=[], live_rows=12, truncated=False, next_cursor=None
            ),
        },
        [
            ("missing_symbol", "symbol is required"),
            ("invalid_window", "window must look like 30s, 15m, 2h or 1d, got 'soon'"),
            ("window_too_large", "window 40d is longer than 2.6784e+06s"),
            *_ROWS_400[:3],
        ],
        not_found=_ROWS_404[:2],
    ),
)
async def recent_quotes(
    api: NamedDependency[ApiState],
    request: Request[Any, Any, Any],
    symbol: RequiredSymbols = None,
    exchange: Exchanges = None,
    window: Annotated[
        str | None,
        Parameter(
            description="How far back from now: 30s, 15m (default), 2h, 1d; at most "
            "query.max_window_seconds",
            examples=[Example(summary="15 minutes", value="15m")],
        ),
    ] = None,
    limit: Limit = None,
    order: Order = None,
    columns: Annotated[
        list[str] | None,
        Parameter(description="Columns to return (allow-listed; default all)"),
    ] = None,
    fmt: Fmt = None,
) -> Response[Any]:
    """The last minutes of quotes, merged with the live hub's uncommitted ones as
    /v1/trades/recent does for trades."""
    return await _recent(
        api,
        request,
        QUOTES,
        symbol=symbol,
        exchange=exchange,
        window=window,
        limit=limit,
        order=order,
        columns=columns,
        fmt=fmt,
    )


async def _recent(
    api: ApiState,
    request: Request[Any, Any, Any],
    table: str,
    *,
    symbol: Any,
    exchange: Any,
    window: str | None,
    limit: str | None,
    order: str | None,
    columns: Any,
    fmt: str | None,
) -> Response[Any]:
    pool = _pool(api)
    cfg = pool.cfg
    with _as_api_errors():
        out = negotiate_format(fmt, request.headers.get("accept"))
        symbols = parse_symbols(symbol, cfg.max_symbols)
        if not symbols:
            raise QueryError(400, "missing_symbol", "symbol is required")
        exchanges = parse_exchanges(exchange, cfg.max_symbols)
        span = parse_duration(window or "15m", cfg.max_window_seconds)
        limit_rows = parse_limit(_int(limit, "limit"), cfg.default_limit, cfg.max_rows)
        desc = parse_order(order)
        cols = parse_columns(columns, list(TABLE_COLUMNS[table]))
        try:
            with anyio.fail_after(cfg.timeout):
                # Everything the live hub counts as committed is in the index after this.
                await pool.catch_up()
        except TimeoutError:
            raise QueryError(
                504, "query_timeout", "the file index did not catch up in time"
            ) from None
        now = now_us()
        hub = api.live_hub
        live: list[Any] = []
        live_keys: set[tuple[str, str]] = set()
        if hub is not None:
            live_keys = {
                k for k in hub.symbols() if k[1] in symbols and (not exchanges or k[0] in exchanges)
            }
            read = hub.recent_trades if table == TRADES else hub.recent_quotes
            for ex, sym in sorted(live_keys):
                live.extend(read(ex, sym, now - span, uncommitted_only=True))
        plan = RecentPlan(
            endpoint=f"{table}.recent",
            symbols=symbols,
            exchanges=exchanges,
            window=Window(now - span, now + _FUTURE_SLACK_US),
            limit=limit_rows,
            desc=desc,
            columns=cols,
            live=tuple(live),
            live_keys=frozenset(live_keys),
            table=table,
        )
    return await _answer(api, request, plan, out)


@get(
    "/ohlcv/{interval:str}",
    operation_class=TabularOperation,
    responses=responses(
        OhlcvPage,
        {
            "data": [
                {
                    "bar_start": "2024-03-01T12:00:00.000000Z",
                    "exchange": "BINANCE",
                    "symbol": "BTCUSDT",
                    "open": "61234.50000000",
                    "high": "61240.00000000",
                    "low": "61230.10000000",
                    "close": "61238.00000000",
                    "volume": "12.34500000",
                    "vwap": "61236.21803412",
                    "trade_count": 523,
                }
            ],
            "meta": _meta_example(interval="1m", tz="UTC", truncated=False, next_cursor=None),
        },
        [
            ("unknown_interval", "unknown interval '2m'; expected one of 1s, 1m, 5m, 15m, 1h, 1d"),
            ("unknown_timezone", "unknown time zone 'Mars/Olympus'"),
            ("missing_symbol", "symbol is required"),
            *_ROWS_400,
        ],
        not_found=_ROWS_404,
    ),
)
async def ohlcv(
    api: NamedDependency[ApiState],
    request: Request[Any, Any, Any],
    interval: Annotated[
        str,
        Parameter(
            description="Bar width: 1s, 1m, 5m, 15m, 1h or 1d",
        ),
    ],
    symbol: RequiredSymbols = None,
    exchange: Exchanges = None,
    start: Start = None,
    end: End = None,
    tz: Annotated[
        str | None,
        Parameter(
            description="Align bars to this time zone's clock (default UTC): with "
            "Australia/Sydney, 1d bars are Sydney calendar days. An IANA zone that both "
            "Python's zoneinfo and DuckDB know; not the pseudo-zones Factory and localtime.",
            examples=[Example(summary="Sydney days", value="Australia/Sydney")],
        ),
    ] = None,
    limit: Limit = None,
    cursor: Cursor = None,
    as_of: AsOf = None,
    snapshot_id: SnapshotId = None,
    fmt: Fmt = None,
) -> Response[Any]:
    """OHLCV bars with VWAP and trade count. Open and close are the first and last trade by
    (timestamp, source_sequence, platform_sequence); bars without trades are left out; bars
    at the window's edges cover only the part inside it."""
    cfg = _pool(api).cfg
    with _as_api_errors():
        out = negotiate_format(fmt, request.headers.get("accept"))
        bar = parse_interval(interval, INTERVALS)
        symbols = parse_symbols(symbol, cfg.max_symbols)
        if not symbols:
            raise QueryError(400, "missing_symbol", "symbol is required")
        plan = OhlcvPlan(
            endpoint="ohlcv",
            interval=bar,
            symbols=symbols,
            exchanges=parse_exchanges(exchange, cfg.max_symbols),
            window=parse_window(
                start,
                end,
                now_us=now_us(),
                default_seconds=_DEFAULT_SPAN,
                max_seconds=cfg.max_window_seconds,
            ),
            tz=parse_timezone(tz),
            limit=parse_limit(_int(limit, "limit"), cfg.default_limit, cfg.max_rows),
            snapshot=parse_snapshot(as_of, _int(snapshot_id, "snapshot_id")),
            cursor=cursor,
        )
    return await _answer(api, request, plan, out)


@get(
    "/symbols",
    operation_class=TabularOperation,
    responses=responses(
        SymbolsPage,
        {
            "data": [
                {
                    "exchange": "BINANCE",
                    "symbol": "BTCUSDT",
                    "trade_count": 1532211,
                    "first_trade": "2024-02-01T00:00:00.021000Z",
                    "last_trade": "2024-03-01T12:00:00.123000Z",
                    "quote_count": 9120044,
                    "first_quote": "2024-02-01T00:00:00.003000Z",
                    "last_quote": "2024-03-01T12:00:00.120000Z",
                }
            ],
            "meta": {
                "snapshot_id": 3055729675574597004,
                "rows": 1,
                "truncated": False,
                "next_cursor": None,
            },
        },
        [
            ("invalid_exchange", "'??' cannot be an exchange"),
            ("limit_too_large", "limit 1000000 is above the maximum 100000"),
            *_ROWS_400[7:9],
        ],
    ),
)
async def symbols(
    api: NamedDependency[ApiState],
    request: Request[Any, Any, Any],
    exchange: Exchanges = None,
    limit: Limit = None,
    cursor: Cursor = None,
    fmt: Fmt = None,
) -> Response[Any]:
    """Every (exchange, symbol) stored: trade and quote counts, first and last times."""
    cfg = _pool(api).cfg
    with _as_api_errors():
        out = negotiate_format(fmt, request.headers.get("accept"))
        plan = SymbolsPlan(
            endpoint="symbols",
            exchanges=parse_exchanges(exchange, cfg.max_symbols),
            limit=parse_limit(_int(limit, "limit"), cfg.default_limit, cfg.max_rows),
            cursor=cursor,
        )
    return await _answer(api, request, plan, out)


@get(
    "/snapshots",
    operation_class=TabularOperation,
    responses=responses(
        SnapshotsPage,
        {
            "data": [
                {
                    "snapshot_id": 3055729675574597004,
                    "parent_id": 7723117406316823390,
                    "committed_at": "2024-03-01T12:00:02.311000Z",
                    "operation": "append",
                    "added_records": 2500,
                    "added_files": 1,
                    "total_records": 1532211,
                    "k2": {"k2.flush": 812, "k2.log_position": {"journal:binance": 912345}},
                }
            ],
            "meta": {
                "table": "trades",
                "snapshot_id": 3055729675574597004,
                "snapshot_count": 1,
                "rows": 1,
                "truncated": False,
                "next_cursor": None,
            },
        },
        [
            (
                "unknown_table",
                "unknown table 'nope'; expected one of trades, quotes, sequence_events, ...",
            ),
            *_ROWS_400[2:3],
            *_ROWS_400[7:9],
        ],
    ),
)
async def snapshots(
    api: NamedDependency[ApiState],
    request: Request[Any, Any, Any],
    table: Annotated[
        str,
        Parameter(
            description="trades, quotes, sequence_events or dead_letters",
            examples=[Example(summary="trades", value="trades")],
        ),
    ] = TRADES,
    limit: Limit = None,
    cursor: Cursor = None,
    fmt: Fmt = None,
) -> Response[Any]:
    """A table's snapshots, newest first: id, time, operation, rows added, and the k2.*
    properties (watermarks, log position, flush) each commit carries."""
    cfg = _pool(api).cfg
    with _as_api_errors():
        out = negotiate_format(fmt, request.headers.get("accept"))
        plan = SnapshotsPlan(
            endpoint="snapshots",
            table=table,
            limit=parse_limit(_int(limit, "limit"), cfg.default_limit, cfg.max_rows),
            cursor=cursor,
        )
    return await _answer(api, request, plan, out)


@get(
    "/summary/{exchange:str}/{symbol:str}/{date:str}",
    operation_class=TabularOperation,
    responses=responses(
        SummaryPage,
        {
            "data": [
                {
                    "date": "2024-03-01",
                    "exchange": "BINANCE",
                    "symbol": "BTCUSDT",
                    "timezone": "UTC",
                    "session_start": "2024-03-01T00:00:00.000000Z",
                    "session_end": "2024-03-02T00:00:00.000000Z",
                    "open": "61000.00000000",
                    "high": "62100.00000000",
                    "low": "60850.50000000",
                    "close": "61990.10000000",
                    "volume": "20411.02300000",
                    "vwap": "61502.77312345",
                    "trade_count": 1532211,
                    "first_trade": "2024-03-01T00:00:00.021000Z",
                    "last_trade": "2024-03-01T23:59:59.998000Z",
                    "quote_count": 9120044,
                    "two_sided_quotes": 9119000,
                    "one_sided_quotes": 1000,
                    "crossed_quotes": 44,
                    "spread_mean": "0.01200000",
                    "spread_median": "0.01000000",
                    "spread_min": "0.01000000",
                    "spread_max": "12.50000000",
                    "spread_bps_mean": 0.0019,
                }
            ],
            "meta": _meta_example(
                gaps=[],
                truncated=False,
                next_cursor=None,
                snapshots={"trades": 3055729675574597004, "quotes": 112233},
            ),
        },
        [
            ("invalid_date", "date must be YYYY-MM-DD between 1970 and 2199, got '2024-3-1'"),
            ("invalid_exchange", "'N-Y' cannot be an exchange"),
            ("invalid_symbol", "'BTC USDT' cannot be a symbol"),
            *_ROWS_400[4:5],
            *_ROWS_400[8:9],
        ],
        not_found=[
            ("unknown_exchange", "no trading calendar for 'NYSE'; known: BINANCE, ASX"),
            ("unknown_symbol", "unknown symbol 'NOPE' on BINANCE"),
        ],
    ),
)
async def summary(
    api: NamedDependency[ApiState],
    request: Request[Any, Any, Any],
    exchange: Annotated[
        str, Parameter(description="BINANCE (UTC days) or ASX (Sydney days); others are 404")
    ],
    symbol: Annotated[str, Parameter(description="The symbol, e.g. BTCUSDT")],
    date: Annotated[
        str, Parameter(description="The exchange's local trading day, YYYY-MM-DD (1970-2199)")
    ],
    as_of: AsOf = None,
    fmt: Fmt = None,
) -> Response[Any]:
    """One trading day of one symbol: OHLC, volume, VWAP and trade count from trades, and
    quoted spread statistics from quotes (one-sided and crossed quotes are counted, not
    averaged in). The day is the exchange's local calendar day."""
    with _as_api_errors():
        out = negotiate_format(fmt, request.headers.get("accept"))
        ex = parse_exchange(exchange)
        sym = parse_symbol(symbol)
        day = parse_date(date)
        tz_name, window = trading_day(ex, day)
        plan = SummaryPlan(
            endpoint="summary",
            exchange=ex,
            symbol=sym,
            day=day,
            tz=tz_name,
            window=window,
            snapshot=parse_snapshot(as_of, None),
        )
    return await _answer(api, request, plan, out)


@get(
    "/gaps",
    operation_class=TabularOperation,
    responses=responses(
        GapsPage,
        {
            "data": [
                {
                    **{k: v for k, v in _GAP_EXAMPLE.items() if k not in ("start", "end")},
                    "span_start": "2024-03-01T12:00:01.000000Z",
                    "span_end": "2024-03-01T12:00:02.000000Z",
                    "resolved_at": None,
                    "window_start": None,
                    "window_end": None,
                    "detail": "",
                    "recorded_at": "2024-03-01T12:00:03.000000Z",
                }
            ],
            "meta": {
                "table": "sequence_events",
                "snapshot_id": 1,
                "rows": 1,
                "truncated": False,
                "next_cursor": None,
            },
        },
        [
            ("invalid_status", "status must be some of open, backfilled, unrecoverable"),
            ("invalid_kind", "kind must be gap and/or outage"),
            *_ROWS_400[:1],
            *_ROWS_400[2:9],
        ],
    ),
)
async def gaps(
    api: NamedDependency[ApiState],
    request: Request[Any, Any, Any],
    exchange: Exchanges = None,
    symbol: Symbols = None,
    start: Annotated[
        str | None,
        Parameter(description="Only gaps meeting [start, end) (same forms as /v1/trades)"),
    ] = None,
    end: Annotated[
        str | None, Parameter(description="See start; default now when start is given")
    ] = None,
    status: Annotated[
        list[str] | None,
        Parameter(
            description="open, backfilled, unrecoverable (current status; default all)",
            examples=[Example(summary="open gaps", value=["open"])],
        ),
    ] = None,
    kind: Annotated[
        list[str] | None, Parameter(description="gap and/or outage (default both)")
    ] = None,
    limit: Limit = None,
    cursor: Cursor = None,
    fmt: Fmt = None,
) -> Response[Any]:
    """The gap ledger: gaps (missing trade ids) and outages (time without capture), each
    with its current status (the latest ledger row of its event)."""
    cfg = _pool(api).cfg
    with _as_api_errors():
        out = negotiate_format(fmt, request.headers.get("accept"))
        statuses = tuple(split_values(status))
        for s in statuses:
            if s not in GAP_STATUSES:
                raise QueryError(
                    400, "invalid_status", f"status must be some of {', '.join(GAP_STATUSES)}"
                )
        kinds = tuple(split_values(kind))
        for k in kinds:
            if k not in GAP_KINDS:
                raise QueryError(400, "invalid_kind", "kind must be gap and/or outage")
        window = None
        if start is not None or end is not None:
            window = parse_window(
                start,
                end,
                now_us=now_us(),
                default_seconds=_DEFAULT_COMPLETENESS_SPAN,
                max_seconds=cfg.max_window_seconds,
            )
        plan = GapsPlan(
            endpoint="gaps",
            exchanges=parse_exchanges(exchange, cfg.max_symbols),
            symbols=parse_symbols(symbol, cfg.max_symbols),
            statuses=statuses,
            kinds=kinds,
            window=window,
            limit=parse_limit(_int(limit, "limit"), cfg.default_limit, cfg.max_rows),
            cursor=cursor,
        )
    return await _answer(api, request, plan, out)


@get(
    "/completeness",
    operation_class=TabularOperation,
    responses=responses(
        CompletenessPage,
        {
            "data": [
                {
                    "bucket_start": "2024-03-01T12:00:00.000000Z",
                    "expected": 52110,
                    "stored": 52100,
                    "backfilled": 40,
                    "missing": 10,
                    "open_gaps": 1,
                    "outage_seconds": 3.5,
                    "coverage": 0.99981,
                }
            ],
            "meta": _meta_example(
                bucket="1h", exchange="BINANCE", symbol="BTCUSDT", truncated=False, next_cursor=None
            ),
        },
        [
            ("missing_symbol", "symbol is required"),
            ("unknown_bucket", "unknown interval '5m'; expected one of 1h, 1d"),
            ("ambiguous_symbol", "X trades on ASX, BINANCE: give exchange"),
            ("too_many_symbols", "2 symbols asked for; at most 1"),
            *_ROWS_400[:1],
            *_ROWS_400[3:7],
            *_ROWS_400[8:9],
        ],
        not_found=_ROWS_404[:2],
    ),
)
async def completeness(
    api: NamedDependency[ApiState],
    request: Request[Any, Any, Any],
    symbol: Annotated[
        str | None,
        Parameter(
            description="The symbol (one; required)",
            examples=[Example(summary="BTCUSDT", value="BTCUSDT")],
            required=True,
        ),
    ] = None,
    exchange: Annotated[
        str | None, Parameter(description="The exchange (needed when the symbol trades on several)")
    ] = None,
    start: Annotated[
        str | None,
        Parameter(description="Window start (same forms as /v1/trades); default a day before end"),
    ] = None,
    end: End = None,
    bucket: Annotated[
        str,
        Parameter(description="1h (default) or 1d, aligned to UTC"),
    ] = "1h",
    as_of: AsOf = None,
    fmt: Fmt = None,
) -> Response[Any]:
    """Per bucket: trade ids expected (the id range, counting ids missing since the bucket
    before in this one), stored, of which backfilled, missing inside open gaps, open gaps,
    seconds of outage, and coverage = stored / expected."""
    cfg = _pool(api).cfg
    with _as_api_errors():
        out = negotiate_format(fmt, request.headers.get("accept"))
        symbols = parse_symbols(symbol, 1)
        if not symbols:
            raise QueryError(400, "missing_symbol", "symbol is required")
        plan = CompletenessPlan(
            endpoint="completeness",
            exchange=parse_exchange(exchange) if exchange is not None else None,
            symbol=symbols[0],
            window=parse_window(
                start,
                end,
                now_us=now_us(),
                default_seconds=_DEFAULT_COMPLETENESS_SPAN,
                max_seconds=cfg.max_window_seconds,
            ),
            bucket=parse_interval(bucket, BUCKETS, "unknown_bucket"),
            snapshot=parse_snapshot(as_of, None),
        )
    return await _answer(api, request, plan, out)


QUERY_HANDLERS = (
    trades,
    quotes,
    trades_query,
    recent_trades,
    recent_quotes,
    ohlcv,
    symbols,
    snapshots,
    summary,
    gaps,
    completeness,
)


def query_router() -> Router:
    """The query routes, to be mounted under the /v1 router (keys, rate limits, CORS)."""
    return Router("/", route_handlers=list(QUERY_HANDLERS), tags=["query"])
