"""k2d.query without HTTP: parameter checks, allow-listed identifiers, bound values, cursors,
file pruning, the ledger, and rendering."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2d.config import QueryConfig
from k2d.query import (
    INTERVALS,
    Column,
    FileEntry,
    Format,
    Kind,
    Ledger,
    LedgerEvent,
    OhlcvPlan,
    PlanContext,
    QueryError,
    RowsPlan,
    SnapshotSel,
    SymbolStats,
    TableFiles,
    Window,
    decode_cursor,
    encode_cursor,
    negotiate_format,
    open_database,
    parse_columns,
    parse_duration,
    parse_limit,
    parse_order,
    parse_symbols,
    parse_time,
    parse_timezone,
    parse_window,
    trading_day,
)
from k2d.query._plans import TABLE_COLUMNS, _needs_dedupe
from k2d.query._render import column_expr, ident, json_row_expr, new_writer

T0 = 1_709_251_200_000_000  # 2024-03-01T00:00:00Z
S = 1_000_000
DAY_US = 86_400 * S


def code_of(fn: Any, *args: Any, **kw: Any) -> str:
    with pytest.raises(QueryError) as info:
        fn(*args, **kw)
    assert info.value.status == 400
    return info.value.code


# -- parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-03-01T00:00:00Z", T0),
        ("2024-03-01T00:00:00", T0),  # naive means UTC
        ("2024-03-01", T0),
        ("2024-03-01T11:00:00+11:00", T0),
        ("2024-03-01T00:00:00.000001Z", T0 + 1),
        ("1709251200000", T0),  # epoch milliseconds
        ("1709251200000000", T0),  # epoch microseconds
        (" 1709251200000 ", T0),
    ],
)
def test_times_in_every_documented_form(text: str, expected: int) -> None:
    assert parse_time(text, "start") == expected


@pytest.mark.parametrize(
    "text",
    ["", "yesterday", "1e9", "-5", "2024-13-01", "1969-12-31T23:59:59Z", "3000-01-01", "x" * 100],
)
def test_bad_times_are_invalid_time(text: str) -> None:
    assert code_of(parse_time, text, "start") == "invalid_time"


def test_windows_default_and_refuse_empty_reversed_and_large() -> None:
    w = parse_window(None, None, now_us=T0, default_seconds=3600, max_seconds=86_400)
    assert w == Window(T0 - 3600 * S, T0)
    kw: dict[str, Any] = {"now_us": T0, "default_seconds": 3600, "max_seconds": 86_400}
    assert code_of(parse_window, str(T0), str(T0), **kw) == "empty_window"
    assert code_of(parse_window, str(T0 + 1), str(T0), **kw) == "reversed_window"
    assert code_of(parse_window, "2024-01-01", "2024-03-01", **kw) == "window_too_large"


def test_lists_limits_orders_and_allow_lists() -> None:
    assert parse_symbols(["btcusdt,ETHUSDT", "BTCUSDT", " "], 10) == ("BTCUSDT", "ETHUSDT")
    assert code_of(parse_symbols, ["A", "B", "C"], 2) == "too_many_symbols"
    assert code_of(parse_symbols, ["BTC' OR 1=1"], 2) == "unknown_symbol"
    allowed = list(TABLE_COLUMNS["trades"])
    assert parse_columns(None, allowed) == tuple(allowed)
    assert parse_columns(["price,symbol"], allowed) == ("price", "symbol")
    assert code_of(parse_columns, ['price"; DROP'], allowed) == "unknown_column"
    assert parse_limit(None, 1000, 5000) == 1000
    assert code_of(parse_limit, 5001, 1000, 5000) == "limit_too_large"
    assert code_of(parse_limit, 0, 1000, 5000) == "invalid_limit"
    assert parse_order("desc") is True and parse_order(None) is False
    assert code_of(parse_order, "up") == "invalid_order"
    assert parse_timezone("Australia/Sydney") == "Australia/Sydney"
    assert code_of(parse_timezone, "Australia/Sydney'; --") == "unknown_timezone"
    assert parse_duration("15m", 3600) == 900 * S
    assert code_of(parse_duration, "2h", 3600) == "window_too_large"
    assert code_of(parse_duration, "15 minutes", 3600) == "invalid_window"


def test_format_from_parameter_then_accept() -> None:
    assert negotiate_format(None, None) is Format.JSON
    assert negotiate_format("CSV", "application/json") is Format.CSV
    assert (
        negotiate_format(None, "text/csv;q=0.5, application/vnd.apache.parquet") is Format.PARQUET
    )
    assert negotiate_format(None, "application/vnd.apache.arrow.stream") is Format.ARROW
    assert negotiate_format(None, "text/html") is Format.JSON
    assert code_of(negotiate_format, "xml", None) == "unknown_format"


def test_trading_days_are_local() -> None:
    from datetime import date

    assert trading_day("BINANCE", date(2024, 3, 1)) == ("UTC", Window(T0, T0 + DAY_US))
    tz, sydney = trading_day("ASX", date(2024, 3, 1))
    assert tz == "Australia/Sydney"
    assert sydney.start == T0 - 11 * 3600 * S  # AEDT, UTC+11
    assert code_of(trading_day, "NYSE", date(2024, 3, 1)) == "unknown_exchange"


# -- cursors ------------------------------------------------------------------------------


def test_cursors_round_trip_and_refuse_tampering() -> None:
    text = encode_cursor("abcd", {"trades": 42}, [T0, "BTCUSDT", 7, "m"])
    data = decode_cursor(text, "abcd", [int, str, int, str])
    assert (data.snapshots, data.key) == ({"trades": 42}, [T0, "BTCUSDT", 7, "m"])
    for bad, fp, types in (
        (text, "other", [int, str, int, str]),
        (text, "abcd", [int, int, int, str]),
        (text, "abcd", [int, str]),
        ("not base64 !!", "abcd", [int]),
        (text[:-4], "abcd", [int, str, int, str]),
        ("x" * 5000, "abcd", [int]),
    ):
        assert code_of(decode_cursor, bad, fp, types) == "invalid_cursor"


# -- identifiers and bound values ---------------------------------------------------------


def test_identifiers_come_from_allow_lists_only() -> None:
    assert ident("price") == '"price"'
    for name in ('price"', "a b", "x;--", "Price", ""):
        with pytest.raises(ValueError, match="allow-listed"):
            ident(name)


def test_renderings_per_format() -> None:
    price = Column("price", Kind.DECIMAL)
    ts = Column("timestamp", Kind.TIMESTAMP)
    assert column_expr(price, Format.JSON) == 'CAST("price" AS VARCHAR)'
    assert column_expr(price, Format.PARQUET) == '"price"'
    assert column_expr(ts, Format.CSV).startswith('strftime("timestamp"')
    assert column_expr(Column("c", Kind.LIST), Format.CSV) == 'CAST(to_json("c") AS VARCHAR)'
    assert (
        json_row_expr([price])
        == "CAST(json_object('price', CAST(\"price\" AS VARCHAR)) AS VARCHAR)"
    )


def stats(
    rows: int, lo: int, hi: int, smin: int | None = None, smax: int | None = None
) -> SymbolStats:
    return SymbolStats(rows, lo, hi, smin, smax)


def entry(
    path: str,
    lo: int,
    hi: int,
    symbols: dict[tuple[str, str], SymbolStats],
    exchange: str = "BINANCE",
) -> FileEntry:
    return FileEntry(path, 10, 100, lo // DAY_US, exchange, lo, hi, symbols)


BTC = ("BINANCE", "BTCUSDT")
ETH = ("BINANCE", "ETHUSDT")
ASX = ("ASX", "BHP")


def files() -> TableFiles:
    return TableFiles(
        "trades",
        1,
        1,
        [
            entry("/w/a", T0, T0 + 60 * S, {BTC: stats(5, T0, T0 + 60 * S, 1, 5)}),
            entry(
                "/w/b",
                T0 + 60 * S,
                T0 + 120 * S,
                {
                    BTC: stats(5, T0 + 60 * S, T0 + 90 * S, 6, 10),
                    ETH: stats(5, T0 + 100 * S, T0 + 120 * S, 1, 5),
                },
            ),
            entry(
                "/w/c",
                T0 + DAY_US,
                T0 + DAY_US + 60 * S,
                {BTC: stats(5, T0 + DAY_US, T0 + DAY_US + 60 * S, 11, 15)},
            ),
            entry("/w/d", T0, T0 + 60 * S, {ASX: stats(5, T0, T0 + 60 * S, 1, 5)}, exchange="ASX"),
        ],
        None,
    )


class FakeIndex:
    """What plans read from the index: snapshots of tables and the ledger."""

    def __init__(self, tables: dict[str, TableFiles]) -> None:
        self.tables = tables
        self.ledger = Ledger()

    def current(self, table: str) -> TableFiles:
        return self.tables[table]

    def files(self, table: str, sel: SnapshotSel, cursor: Any) -> TableFiles:
        return self.tables[table]


def ctx(tables: dict[str, TableFiles] | None = None) -> PlanContext:
    index = FakeIndex(tables or {"trades": files()})
    return PlanContext(index, None, QueryConfig(), time.monotonic() + 60)  # type: ignore[arg-type]


def test_pruning_by_day_time_exchange_and_symbol() -> None:
    f = files()
    paths = lambda es: sorted(e.path for e in es)  # noqa: E731
    assert paths(f.select(T0, T0 + 200 * S)) == ["/w/a", "/w/b", "/w/d"]
    assert paths(f.select(T0, T0 + 200 * S, exchanges=["BINANCE"])) == ["/w/a", "/w/b"]
    assert paths(f.select(T0, T0 + 200 * S, keys=[ETH])) == ["/w/b"]
    # b holds BTC only until +90s: a window after that skips it for BTC.
    assert paths(f.select(T0 + 95 * S, T0 + 200 * S, keys=[BTC])) == []
    assert paths(f.select(T0, T0 + 2 * DAY_US, keys=[BTC])) == ["/w/a", "/w/b", "/w/c"]
    extended = f.extended(
        2,
        2,
        [
            entry(
                "/w/e",
                T0 + 130 * S,
                T0 + 140 * S,
                {ETH: stats(1, T0 + 130 * S, T0 + 140 * S, 6, 6)},
            )
        ],
        None,
    )
    assert paths(extended.select(T0 + 125 * S, T0 + 200 * S, keys=[ETH])) == ["/w/e"]
    assert extended.symbol_stats[ETH].rows == 6 and f.symbol_stats[ETH].rows == 5


def test_dedupe_only_when_sequence_ranges_overlap() -> None:
    f = files()
    assert not _needs_dedupe(f.entries, [BTC])
    replay = entry("/w/r", T0, T0 + 10 * S, {BTC: stats(3, T0, T0 + 10 * S, 4, 6)})
    assert _needs_dedupe([*f.entries, replay], [BTC])
    assert not _needs_dedupe([*f.entries, replay], [ETH])
    unsequenced = entry("/w/u", T0, T0 + 10 * S, {BTC: stats(3, T0, T0 + 10 * S)})
    assert _needs_dedupe([unsequenced], None)


def rows_plan(**kw: Any) -> RowsPlan:
    base: dict[str, Any] = {
        "endpoint": "trades",
        "table": "trades",
        "symbols": ("BTCUSDT",),
        "exchanges": (),
        "window": Window(T0, T0 + 3600 * S),
        "limit": 100,
        "desc": False,
        "columns": tuple(TABLE_COLUMNS["trades"]),
    }
    return RowsPlan(**(base | kw))


def test_unknown_symbols_and_exchanges_are_refused_by_the_index() -> None:
    with pytest.raises(QueryError) as info:
        rows_plan(symbols=("DOGEUSDT",)).prepare(ctx())
    assert info.value.code == "unknown_symbol"
    with pytest.raises(QueryError) as info:
        rows_plan(exchanges=("KRAKEN",)).prepare(ctx())
    assert info.value.code == "unknown_exchange"
    with pytest.raises(QueryError) as info:
        rows_plan(symbols=("BHP",), exchanges=("BINANCE",)).prepare(ctx())
    assert info.value.code == "unknown_symbol"


NAMES = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30
)


@settings(max_examples=60, deadline=None)
@given(symbols=st.lists(NAMES, min_size=1, max_size=4, unique=True), exchange=NAMES)
def test_values_are_bound_never_spliced(symbols: list[str], exchange: str) -> None:
    """The SQL text depends only on how many values there are; the values are parameters."""
    keys = [(exchange, s) for s in symbols]
    table = TableFiles(
        "trades",
        1,
        1,
        [
            entry(
                "/w/x",
                T0,
                T0 + 60 * S,
                {k: stats(1, T0, T0 + 60 * S, 1, 1) for k in keys},
                exchange=exchange,
            )
        ],
        None,
    )
    plain = [f"S{i}" for i in range(len(symbols))]
    plain_table = TableFiles(
        "trades",
        1,
        1,
        [
            entry(
                "/w/x",
                T0,
                T0 + 60 * S,
                {("EX", s): stats(1, T0, T0 + 60 * S, 1, 1) for s in plain},
                exchange="EX",
            )
        ],
        None,
    )
    got = rows_plan(symbols=tuple(symbols), exchanges=(exchange,)).prepare(ctx({"trades": table}))
    ref = rows_plan(symbols=tuple(plain), exchanges=("EX",)).prepare(ctx({"trades": plain_table}))
    assert got.sql == ref.sql
    values = {p for p in got.params if isinstance(p, str)}
    assert set(symbols) <= values
    assert exchange in values


def test_a_cursor_adds_a_bound_keyset_predicate() -> None:
    c = ctx()
    first = rows_plan().prepare(c)
    cursor = encode_cursor(rows_plan().fingerprint(), {"trades": 1}, [T0 + 5, "BTCUSDT", 3, "m3"])
    after = rows_plan(cursor=cursor).prepare(c)
    assert "make_timestamptz(?)" in after.sql and "m3" not in after.sql
    assert after.params[-4:] == [T0 + 5, "BTCUSDT", 3, "m3"]
    assert len(after.params) == len(first.params) + 5
    desc = rows_plan(
        desc=True, cursor=encode_cursor(rows_plan(desc=True).fingerprint(), {}, [T0, "B", 1, "m"])
    ).prepare(c)
    assert ") < (" in desc.sql


def test_intervals_are_sql_constants() -> None:
    plan = OhlcvPlan(
        endpoint="ohlcv",
        interval=INTERVALS["15m"],
        symbols=("BTCUSDT",),
        exchanges=(),
        window=Window(T0, T0 + 3600 * S),
        tz="Australia/Sydney",
        limit=10,
    )
    prepared = plan.prepare(ctx())
    assert "INTERVAL 15 MINUTE" in prepared.sql
    assert "Australia/Sydney" not in prepared.sql and prepared.params[0] == "Australia/Sydney"
    assert "DECIMAL(38,8)" in prepared.sql  # VWAP widened before multiplying


# -- the ledger ---------------------------------------------------------------------------


def event(event_id: str, status: str, recorded_at: int, **kw: Any) -> LedgerEvent:
    base: dict[str, Any] = {
        "event_id": event_id,
        "exchange": "BINANCE",
        "symbol": "BTCUSDT",
        "stream": "trade",
        "kind": "gap",
        "status": status,
        "first_missing": 5,
        "last_missing": 6,
        "missing_count": 2,
        "detected_at": T0 + 10 * S,
        "resolved_at": None,
        "window_start": None,
        "window_end": None,
        "detail": "",
        "recorded_at": recorded_at,
    }
    return LedgerEvent(**(base | kw))


def test_the_latest_row_is_the_status_and_the_ledger_is_bounded() -> None:
    ledger = Ledger(max_events=2).merged(
        [event("a", "backfilled", 2), event("a", "open", 1), event("b", "open", 1)]
    )
    assert ledger.events["a"].status == "backfilled"
    bigger = ledger.merged([event("c", "open", 3)])
    # Past the bound, the oldest closed event goes first.
    assert set(bigger.events) == {"b", "c"}
    outage = event("o", "open", 1, kind="outage", window_start=T0, window_end=T0 + 60 * S)
    assert bigger.merged([outage]).overlapping([outage], T0 + 30 * S, T0 + 90 * S) == [outage]
    assert bigger.overlapping([outage], T0 + 60 * S, T0 + 90 * S) == []


# -- execution and writers ----------------------------------------------------------------


def test_writers_produce_readable_documents() -> None:
    batch = pa.record_batch({"__row": ['{"a":1}', '{"a":2}']})
    w = new_writer(Format.JSON)
    body = w.begin(batch.schema) + w.batch(batch) + w.batch(batch) + w.end({"rows": 4})
    assert json.loads(body) == {
        "data": [{"a": 1}, {"a": 2}, {"a": 1}, {"a": 2}],
        "meta": {"rows": 4},
    }
    cut = new_writer(Format.JSON)
    body = (
        cut.begin(batch.schema)
        + cut.batch(batch)
        + cut.end({}, {"code": "query_timeout", "detail": "x"})
    )
    assert json.loads(body)["error"]["code"] == "query_timeout"
    data = pa.record_batch({"x": pa.array([1, 2], pa.int64())})
    for fmt, read in (
        (Format.PARQUET, lambda b: pq.read_table(io.BytesIO(b))),
        (Format.ARROW, lambda b: pa.ipc.open_stream(b).read_all()),
    ):
        w = new_writer(fmt)
        raw = w.begin(data.schema) + w.batch(data) + w.end({})
        assert read(raw).column("x").to_pylist() == [1, 2]
    w = new_writer(Format.CSV)
    assert (w.begin(data.schema) + w.batch(data)).decode().splitlines() == ['"x"', "1", "2"]


def test_the_database_is_locked_after_setup(tmp_path: Any) -> None:
    db, (cursor,) = open_database(QueryConfig(memory_limit="256MB"), [str(tmp_path)], 1)
    try:
        settings_now = dict(
            cursor.execute(
                "SELECT name, value FROM duckdb_settings() WHERE name IN "
                "('enable_external_access', 'lock_configuration', 'autoload_known_extensions',"
                " 'autoinstall_known_extensions', 'TimeZone')"
            ).fetchall()
        )
        assert settings_now == {
            "enable_external_access": "false",
            "lock_configuration": "true",
            "autoload_known_extensions": "false",
            "autoinstall_known_extensions": "false",
            "TimeZone": "UTC",
        }
        with pytest.raises(Exception, match="locked"):
            cursor.execute("SET memory_limit = '100GB'")
    finally:
        cursor.close()
        db.close()
