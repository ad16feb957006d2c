"""k2d.query without HTTP: parameter checks, allow-listed identifiers, bound values, cursors,
file pruning, the ledger, and rendering."""

from __future__ import annotations

import io
import json
import random
import re
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2d.config import QueryConfig
from k2d.model import Trade
from k2d.query import (
    DATE_PATTERN,
    INTERVALS,
    MAX_US,
    TIME_PATTERN,
    Column,
    FileEntry,
    Format,
    Head,
    Kind,
    Ledger,
    LedgerEvent,
    OhlcvPlan,
    Opened,
    PlanContext,
    Prepared,
    QueryError,
    RowsPlan,
    SnapshotSel,
    Statements,
    SymbolStats,
    TableFiles,
    Window,
    decode_cursor,
    duration_pattern,
    encode_cursor,
    int_range_pattern,
    negotiate_format,
    open_database,
    open_result,
    parse_columns,
    parse_date,
    parse_duration,
    parse_integer,
    parse_limit,
    parse_order,
    parse_symbols,
    parse_time,
    parse_timezone,
    parse_window,
    timezones,
    trading_day,
)
from k2d.query._bars import MinuteBars
from k2d.query._cursor import TIMESTAMP_US
from k2d.query._hot import HotFiles
from k2d.query._plans import TABLE_COLUMNS, _needs_dedupe
from k2d.query._render import column_expr, ident, json_row_expr, new_writer
from k2d.storage import trades_to_arrow

T0 = 1_709_251_200_000_000  # 2024-03-01T00:00:00Z
S = 1_000_000
DAY_US = 86_400 * S


def code_of(fn: Any, *args: Any, status: int = 400, **kw: Any) -> str:
    with pytest.raises(QueryError) as info:
        fn(*args, **kw)
    assert info.value.status == status
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
    assert code_of(parse_symbols, ["A,B,C"], 2) == "too_many_symbols"
    # Repeats count too (the OpenAPI document bounds them), even empty ones.
    assert code_of(parse_symbols, [""] * 3, 2) == "too_many_symbols"
    assert code_of(parse_symbols, ["BTC' OR 1=1"], 2) == "invalid_symbol"
    assert code_of(parse_symbols, ["\u00df"], 2) == "invalid_symbol"  # upper() would be "SS"
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
    assert negotiate_format("csv", "application/json") is Format.CSV
    # The names exactly, as the OpenAPI document lists them.
    assert code_of(negotiate_format, "CSV", None) == "unknown_format"
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
    assert code_of(trading_day, "NYSE", date(2024, 3, 1), status=404) == "unknown_exchange"
    # The first Sydney day starts before 1970: its window starts at 1970.
    assert trading_day("ASX", date(1970, 1, 1))[1] == Window(0, 14 * 3600 * S)  # AEST


# -- the syntax the OpenAPI document states -----------------------------------------------


def test_int_range_patterns_match_exactly_the_range() -> None:
    rng = random.Random(7)
    for _ in range(400):
        lo = rng.choice([0, rng.randrange(1_000), rng.randrange(10 ** rng.randint(1, 15))])
        hi = lo + rng.choice([0, 1, rng.randrange(10 ** rng.randint(1, 15))])
        pattern = re.compile(int_range_pattern(lo, hi))
        probes = {lo, hi, lo - 1, hi + 1, 0, *(rng.randint(lo - 50, hi + 50) for _ in range(40))}
        for n in (p for p in probes if p >= 0):
            assert bool(pattern.fullmatch(str(n))) == (lo <= n <= hi), (lo, hi, n)
            assert not pattern.fullmatch(f"0{n}"), "no leading zeros"


def test_the_date_pattern_is_the_calendar_from_1970_to_2199() -> None:
    pattern = re.compile(DATE_PATTERN)
    day = date(1968, 1, 1)
    while day < date(2202, 1, 1):
        inside = date(1970, 1, 1) <= day <= date(2199, 12, 31)
        assert bool(pattern.fullmatch(day.isoformat())) == inside, day
        day += timedelta(days=1)
    for text in ("2023-02-29", "2100-02-29", "2024-02-30", "2024-04-31", "2024-13-01", "2024-3-1"):
        assert not pattern.fullmatch(text), text
        assert code_of(parse_date, text) == "invalid_date"
    assert parse_date("2000-02-29") == date(2000, 2, 29)


@settings(max_examples=300, deadline=None)
@given(text=st.from_regex(TIME_PATTERN, fullmatch=True))
def test_every_time_the_pattern_admits_is_parsed_within_range(text: str) -> None:
    assert 0 <= parse_time(text, "start") < MAX_US


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=30))
def test_a_time_the_pattern_refuses_is_invalid_time(text: str) -> None:
    if re.fullmatch(TIME_PATTERN, text):
        return
    assert code_of(parse_time, text, "start") == "invalid_time"


def test_times_just_past_either_end_are_clamped_not_refused() -> None:
    assert parse_time("1970-01-01T00:30+01:00", "start") == 0
    assert parse_time("2199-12-31T23:30-01:00", "end") == MAX_US - 1
    for text in ("2024-03-01\n", "1709251200000\n", " 2024-03-01T00:00:00Z\t"):
        assert code_of(parse_time, text, "start") == "invalid_time"


@pytest.mark.parametrize("max_seconds", [3_600, 2_678_400.0, 90.5, 1e9])
def test_the_duration_pattern_admits_what_parse_duration_accepts(max_seconds: float) -> None:
    pattern = re.compile(duration_pattern(max_seconds))
    values = [f"{n}{u}" for n in (1, 2, 59, 60, 61, 90, 91, 1_440, 44_640, 44_641) for u in "smhd"]
    for text in [*values, "0s", "01m", "15 m", "15m\n", "1w", "99999999s"]:
        try:
            parse_duration(text, max_seconds)
            accepted = True
        except QueryError:
            accepted = False
        assert bool(pattern.fullmatch(text)) == accepted, (max_seconds, text)


def test_integers_are_written_as_json_writes_them() -> None:
    assert parse_integer("42", "limit") == 42 and parse_integer("-7", "limit") == -7
    assert parse_integer(None, "limit") is None
    for text in ("null", "5.0", "1e3", "05", "+5", " 5", "", "9" * 30):
        assert code_of(parse_integer, text, "limit") == "invalid_parameter", text


def test_time_zones_are_the_ones_duckdb_can_align_to() -> None:
    zones = timezones()
    assert "Australia/Sydney" in zones and "UTC" in zones
    # Pseudo-zones: Factory means "no zone set"; localtime is the host's and DuckDB has none.
    for odd in ("Factory", "localtime", "posixrules", "right/UTC", "Mars/Olympus"):
        assert odd not in zones
        assert code_of(parse_timezone, odd) == "unknown_timezone"
    db, (cursor,) = open_database(QueryConfig(), [], 1)
    try:
        for zone in zones:
            cursor.execute(
                "SELECT time_bucket(INTERVAL 1 DAY, TIMESTAMPTZ '2024-03-01 12:00:00+00', ?)",
                [zone],
            ).fetchall()
    finally:
        cursor.close()
        db.close()


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


def test_a_forged_cursor_is_invalid_whatever_it_carries() -> None:
    """The fingerprint is no secret: a cursor with the right one may carry anything."""
    keys: list[Any] = [(int, TIMESTAMP_US), str, int, str]
    good = [T0, "BTCUSDT", 7, "m"]
    assert decode_cursor(encode_cursor("fp", {"trades": 1}, good), "fp", keys).key == good
    forged: list[tuple[dict[str, int], list[Any]]] = [
        ({"trades": 1}, [2**63, "BTCUSDT", 7, "m"]),  # past what make_timestamptz takes
        ({"trades": 1}, [TIMESTAMP_US[1] + 1, "BTCUSDT", 7, "m"]),
        ({"trades": 1}, [-(2**63), "BTCUSDT", 7, "m"]),
        ({"trades": 1}, [T0, "BTCUSDT", 2**64, "m"]),
        ({"trades": 1}, [T0, "BTCUSDT", -(2**63) - 1, "m"]),
        ({"trades": 2**63}, good),
        ({"trades": -(2**70)}, good),
    ]
    for snapshots, key in forged:
        text = encode_cursor("fp", snapshots, key)
        assert code_of(decode_cursor, text, "fp", keys) == "invalid_cursor", key
    text = encode_cursor("fp", {"trades": 1}, good)
    for bad in (text + "$", text + "=", "+" + text, "", "a" * 3000):
        assert code_of(decode_cursor, bad, "fp", keys) == "invalid_cursor", bad


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
    """What plans read from the index: snapshots of tables, the ledger, minute bars, the
    hot tier (holding nothing: these files are not on disk)."""

    def __init__(self, tables: dict[str, TableFiles]) -> None:
        self.tables = tables
        self.ledger = Ledger()
        self.bars = MinuteBars(10_000)
        self.hot = HotFiles(0)

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


def test_unknown_symbols_and_exchanges_are_not_found_by_the_index() -> None:
    for plan, code in (
        (rows_plan(symbols=("DOGEUSDT",)), "unknown_symbol"),
        (rows_plan(exchanges=("KRAKEN",)), "unknown_exchange"),
        (rows_plan(symbols=("BHP",), exchanges=("BINANCE",)), "unknown_symbol"),
    ):
        with pytest.raises(QueryError) as info:
            plan.prepare(ctx())
        assert (info.value.status, info.value.code) == (404, code)


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


def _trade(n: int, ts: int, price: str, seq: int | None, pseq: int) -> Trade:
    return Trade(
        message_id=f"BINANCE:BTCUSDT:trade:{n}",
        trade_id=str(n),
        symbol="BTCUSDT",
        exchange="BINANCE",
        asset_class="crypto",
        timestamp=ts,
        price=price,
        quantity="1",
        currency="USDT",
        side="BUY",
        source_sequence=seq,
        ingestion_timestamp=ts,
        platform_sequence=pseq,
    )


@pytest.mark.parametrize("interval", ["1s", "1m", "5m", "1h", "1d"])
def test_utc_bars_are_the_bars_time_bucket_makes_opened_and_closed_in_trade_order(
    tmp_path: Path, interval: str
) -> None:
    # Ties at the first and the last instant are settled by venue, then platform sequence.
    rows = [
        _trade(1, T0, "10", 5, 1),
        _trade(2, T0, "20", 4, 2),  # the open: same time, lower venue sequence
        _trade(3, T0 + 59 * S + 999_999, "30", None, 9),  # the close: no venue sequence ...
        _trade(4, T0 + 59 * S + 999_999, "40", None, 8),  # ... then platform sequence
        _trade(5, T0 + 60 * S, "50", 7, 3),
        *(_trade(10 + i, T0 + i * 1_999 * S, f"{60 + i}", 100 + i, 100 + i) for i in range(40)),
    ]
    path = str(tmp_path / "t.parquet")
    pq.write_table(trades_to_arrow(rows), path)
    bounds = {BTC: stats(len(rows), T0, T0 + 40 * 1_999 * S, 1, 200)}
    tables = {"trades": TableFiles("trades", 1, 1, [entry(path, T0, T0 + DAY_US, bounds)], None)}
    db, (cursor,) = open_database(QueryConfig(), [str(tmp_path)], 1)

    def bars(tz: str) -> list[dict[str, Any]]:
        plan = OhlcvPlan(
            endpoint="ohlcv",
            interval=INTERVALS[interval],
            symbols=("BTCUSDT",),
            exchanges=(),
            window=Window(T0, T0 + DAY_US),
            tz=tz,
            limit=10_000,
        )
        index = FakeIndex(tables)
        c = PlanContext(index, cursor, QueryConfig(), time.monotonic() + 60)  # type: ignore[arg-type]
        body, done, _ = open_result(c, plan, Format.JSON).read(1 << 24)
        assert done
        data: list[dict[str, Any]] = json.loads(body)["data"]
        return data

    try:
        utc = bars("UTC")
        via_time_bucket = bars("Etc/UTC")  # the same zone, aligned by time_bucket
    finally:
        cursor.close()
        db.close()

    assert utc == via_time_bucket
    assert sum(b["trade_count"] for b in utc) == len(rows)
    if interval == "1m":
        assert utc[0]["bar_start"] == "2024-03-01T00:00:00.000000Z"
        assert (utc[0]["open"], utc[0]["close"]) == ("20.00000000", "30.00000000")
        assert (utc[1]["bar_start"], utc[1]["open"]) == (
            "2024-03-01T00:01:00.000000Z",
            "50.00000000",
        )


def _bar_files(tmp_path: Path, overlap: bool = False) -> TableFiles:
    """Three files of BTC and ETH trades, 3 hours in time order (prices and quantities
    vary, several trades share an instant); with `overlap` the last file repeats the
    first one's rows (a replay), so files may share rows."""
    rng = random.Random(5)
    trades: list[Trade] = []
    ts = T0 + 7 * S + 123
    for n in range(3_000):
        ts += rng.choice((0, 0, 1, 999_999, 3 * S + 17, 11 * S))
        sym = rng.choice(("BTCUSDT", "ETHUSDT"))
        trades.append(
            msgspec.structs.replace(
                _trade(n, ts, f"{rng.randrange(1, 10**6)}.{rng.randrange(10**8):08d}", n, n),
                symbol=sym,
                message_id=f"BINANCE:{sym}:trade:{n}",
                quantity=f"0.{rng.randrange(1, 10**8):08d}",
            )
        )
    parts = [trades[:1_000], trades[1_000:2_200], trades[2_200:]]
    if overlap:
        parts.append(trades[:300])
    entries = []
    for i, part in enumerate(parts):
        path = str(tmp_path / f"f{i}.parquet")
        pq.write_table(trades_to_arrow(part), path)
        bounds = {}
        for key in (BTC, ETH):
            mine = [t for t in part if (t.exchange, t.symbol) == key]
            bounds[key] = stats(
                len(mine),
                min(t.timestamp for t in mine),
                max(t.timestamp for t in mine),
                min(t.source_sequence or 0 for t in mine),
                max(t.source_sequence or 0 for t in mine),
            )
        lo = min(t.timestamp for t in part)
        entries.append(entry(path, lo, max(t.timestamp for t in part), bounds))
    return TableFiles("trades", 1, 1, entries, None)


def _ohlcv(
    c: PlanContext, interval: str, window: Window, symbols: tuple[str, ...], use_bars: bool
) -> list[dict[str, Any]]:
    plan = OhlcvPlan(
        endpoint="ohlcv",
        interval=INTERVALS[interval],
        symbols=symbols,
        exchanges=(),
        window=window,
        tz="UTC",
        limit=100_000,
        use_bars=use_bars,
    )
    body, done, _ = open_result(c, plan, Format.JSON).read(1 << 26)
    assert done
    data: list[dict[str, Any]] = json.loads(body)["data"]
    return data


def test_bars_from_remembered_minute_bars_equal_bars_from_the_trades(tmp_path: Path) -> None:
    tables = {"trades": _bar_files(tmp_path)}
    db, (cursor,) = open_database(QueryConfig(), [str(tmp_path)], 1)
    index = FakeIndex(tables)
    c = PlanContext(index, cursor, QueryConfig(), time.monotonic() + 60)  # type: ignore[arg-type]
    windows = [
        Window(T0, T0 + DAY_US),  # whole minutes
        Window(T0 + 61 * S + 500, T0 + 3_600 * S),  # the first minute cut
        Window(T0 + 60 * S, T0 + 7_000 * S + 1),  # the last minute cut
        Window(T0 + 90 * S + 3, T0 + 2 * 3_600 * S + 45 * S),  # both
        Window(T0 + 90 * S + 3, T0 + 1_500 * S + 7),  # both, in the first file alone
        Window(T0 + 95 * S, T0 + 179 * S),  # within two minutes, no whole one
        Window(T0 + 125 * S, T0 + 170 * S),  # within one minute
    ]
    try:
        for window in windows:
            for interval in ("1m", "5m", "1h", "1d"):
                for symbols in (("BTCUSDT",), ()):
                    merged = _ohlcv(c, interval, window, symbols, use_bars=True)
                    direct = _ohlcv(c, interval, window, symbols, use_bars=False)
                    assert merged == direct, (window, interval, symbols)
                    assert merged, (window, interval, symbols)
        # The bars came from the memo: each (file, pair) aggregated once, then remembered.
        assert index.bars.computed == 6
        assert index.bars.rows > 0
    finally:
        cursor.close()
        db.close()


def test_parsed_statements_answer_as_fresh_ones_and_stay_bounded(tmp_path: Path) -> None:
    tables = {"trades": _bar_files(tmp_path)}
    db, (cursor,) = open_database(QueryConfig(), [str(tmp_path)], 1)
    statements = Statements(2)
    index: Any = FakeIndex(tables)
    kept = PlanContext(index, cursor, QueryConfig(), time.monotonic() + 60, statements)
    fresh = PlanContext(index, cursor, QueryConfig(), time.monotonic() + 60)

    def rows(c: PlanContext, plan: RowsPlan) -> list[dict[str, Any]]:
        body, done, _ = open_result(c, plan, Format.JSON).read(1 << 24)
        assert done
        data: list[dict[str, Any]] = json.loads(body)["data"]
        return data

    windows = [Window(T0 + i * 600 * S, T0 + (i + 1) * 600 * S) for i in range(6)]
    try:
        for window in windows:
            for symbols in (("BTCUSDT",), ("ETHUSDT",)):
                plan = rows_plan(symbols=symbols, window=window, limit=1_000)
                answer = rows(kept, plan)
                assert answer == rows(fresh, plan), (window, symbols)
                assert {r["symbol"] for r in answer} == set(symbols)
        # One shape of SQL for all twelve: parsed once, run with each one's values.
        assert len(statements) == 1
        window = Window(T0, T0 + DAY_US)
        for symbols in (("BTCUSDT",), ("BTCUSDT", "ETHUSDT")):
            assert _ohlcv(kept, "1h", window, symbols, True) == _ohlcv(
                fresh, "1h", window, symbols, True
            )
        # Three shapes seen, two kept.
        assert len(statements) == 2
        assert Statements(0).parsed(cursor, "SELECT 1") == "SELECT 1"
    finally:
        cursor.close()
        db.close()


def test_minute_bars_are_computed_once_and_bounded(tmp_path: Path) -> None:
    tables = {"trades": _bar_files(tmp_path)}
    db, (cursor,) = open_database(QueryConfig(), [str(tmp_path)], 1)
    window = Window(T0, T0 + DAY_US)
    try:
        index = FakeIndex(tables)
        c = PlanContext(index, cursor, QueryConfig(), time.monotonic() + 60)  # type: ignore[arg-type]
        first = _ohlcv(c, "1m", window, ("BTCUSDT",), use_bars=True)
        assert index.bars.computed == 3  # three files hold BTC
        held = index.bars.rows
        assert _ohlcv(c, "1m", window, ("BTCUSDT",), use_bars=True) == first
        assert index.bars.computed == 3  # nothing aggregated again
        assert index.bars.rows == held
        # A bound that holds one symbol's bars: ETH's evict BTC's, answers stay right.
        entries = tables["trades"].entries
        bound = max(_most_bars(entries, BTC), _most_bars(entries, ETH))
        small = FakeIndex(tables)
        small.bars = MinuteBars(bound)
        c2 = PlanContext(small, cursor, QueryConfig(), time.monotonic() + 60)  # type: ignore[arg-type]
        assert _ohlcv(c2, "1m", window, ("BTCUSDT",), use_bars=True) == first
        assert small.bars.computed == 3
        eth = _ohlcv(c2, "1m", window, ("ETHUSDT",), use_bars=True)
        assert eth == _ohlcv(c2, "1m", window, ("ETHUSDT",), use_bars=False)
        assert small.bars.computed == 6
        assert 0 < small.bars.rows <= bound
        assert _ohlcv(c2, "1m", window, ("BTCUSDT",), use_bars=True) == first
        assert small.bars.computed > 6  # BTC's forgotten bars were aggregated again
        assert 0 < small.bars.rows <= bound
        # Bars that would not fit at all: the trades are aggregated, nothing is held.
        tiny = FakeIndex(tables)
        tiny.bars = MinuteBars(bound // 4)
        c3 = PlanContext(tiny, cursor, QueryConfig(), time.monotonic() + 60)  # type: ignore[arg-type]
        assert _ohlcv(c3, "1m", window, ("BTCUSDT",), use_bars=True) == first
        assert (tiny.bars.computed, tiny.bars.rows) == (0, 0)
    finally:
        cursor.close()
        db.close()


def _most_bars(entries: list[FileEntry], key: tuple[str, str]) -> int:
    """At most one bar a minute that each file spans for the pair (MinuteBars.fits)."""
    return sum(
        (st.max_ts - st.min_ts) // (60 * S) + 2
        for e in entries
        for k, st in e.symbols.items()
        if k == key
    )


def test_files_that_may_share_rows_are_not_merged_from_minute_bars(tmp_path: Path) -> None:
    # A replay wrote the first 300 trades twice: merging each file's bars would count them
    # twice; the trades are aggregated with their duplicates dropped instead.
    tables = {"trades": _bar_files(tmp_path, overlap=True)}
    db, (cursor,) = open_database(QueryConfig(), [str(tmp_path)], 1)
    index = FakeIndex(tables)
    c = PlanContext(index, cursor, QueryConfig(), time.monotonic() + 60)  # type: ignore[arg-type]
    once_dir = tmp_path / "once"
    once_dir.mkdir()
    try:
        once = FakeIndex({"trades": _bar_files(once_dir)})
        c_once = PlanContext(once, cursor, QueryConfig(), time.monotonic() + 60)  # type: ignore[arg-type]
        window = Window(T0, T0 + DAY_US)
        got = _ohlcv(c, "1m", window, (), use_bars=True)
        assert got == _ohlcv(c_once, "1m", window, (), use_bars=False)
        assert index.bars.computed == 0
    finally:
        cursor.close()
        db.close()


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


def test_the_span_cache_stays_bounded_as_gaps_come_and_go(tmp_path: Path) -> None:
    # Trades with the odd ids 1..401; every even id is a gap between two stored trades.
    ids = list(range(1, 402, 2))
    table = pa.table(
        {
            "exchange": ["BINANCE"] * len(ids),
            "symbol": ["BTCUSDT"] * len(ids),
            "source_sequence": pa.array(ids, pa.int64()),
            "timestamp": pa.array([T0 + i * S for i in ids], pa.timestamp("us", tz="UTC")),
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    path = str(tmp_path / "t.parquet")
    trades = TableFiles(
        "trades",
        1,
        1,
        [entry(path, T0, T0 + 402 * S, {BTC: stats(len(ids), T0, T0 + 402 * S, 1, 401)})],
        None,
    )
    db, (cursor,) = open_database(QueryConfig(), [str(tmp_path)], 1)
    ledger = Ledger(max_events=10)
    try:
        for i in range(1, 201):
            gap = event(f"gap-{i}", "backfilled", i, first_missing=2 * i, last_missing=2 * i)
            ledger = ledger.merged([gap])
            ledger.resolve_spans(cursor, trades, ledger.events.values())
            assert ledger.cached_spans <= ledger.max_events
    finally:
        cursor.close()
        db.close()
    # The cache still serves the events held: the trades around gap 200 (ids 399 and 401).
    assert ledger.span(ledger.events["gap-200"]) == (T0 + 399 * S, T0 + 401 * S)
    assert len(ledger.events) == 10


def test_per_key_concurrency_stays_below_the_workers() -> None:
    assert QueryConfig().per_key_concurrency == 2 < QueryConfig().workers
    assert QueryConfig(workers=4, per_key_concurrency=9).per_key_concurrency == 3
    assert QueryConfig(workers=1).per_key_concurrency == 1
    assert QueryConfig(workers=8, per_key_concurrency=5).per_key_concurrency == 5


def test_minute_bars_ahead_stay_within_the_minute_bars_kept() -> None:
    assert QueryConfig().minute_bars_ahead == 100_000 < QueryConfig().minute_bars
    assert QueryConfig(minute_bars=0).minute_bars_ahead == 0
    assert QueryConfig(minute_bars=500, minute_bars_ahead=900).minute_bars_ahead == 500


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


def _opened(batches: Any, limit: int = 100) -> Opened:
    """A JSON answer over `batches` (an iterable of JSON-row batches), as open_result makes."""
    schema = pa.schema([("__row", pa.string())])
    reader = pa.RecordBatchReader.from_batches(schema, batches)
    prepared = Prepared(sql="", params=(), columns=(Column("a", Kind.INT),), keys=(), limit=limit)
    head = Head("application/json", {})
    return Opened(duckdb.connect(), prepared, Format.JSON, reader, head, (False, None))


def test_read_answers_a_small_page_in_one_call_and_closes_the_query() -> None:
    opened = _opened(iter([pa.record_batch({"__row": ['{"a":1}', '{"a":2}']})]))

    body, done, failed = opened.read(1 << 20)

    assert (done, failed, opened.closed) == (True, None, True)
    assert json.loads(body) == {
        "data": [{"a": 1}, {"a": 2}],
        "meta": {"rows": 2, "truncated": False, "next_cursor": None},
    }


def test_read_hands_back_the_chunks_before_a_failure_with_it() -> None:
    def batches() -> Any:
        yield pa.record_batch({"__row": ['{"a":1}']})
        raise OSError("INTERRUPT Error: Interrupted!")

    opened = _opened(batches())

    body, done, failed = opened.read(1 << 20)

    assert (done, opened.closed) == (False, False)
    assert isinstance(failed, OSError)
    document = json.loads(body + opened.abort("query_timeout", "too slow"))
    assert document["data"] == [{"a": 1}]
    assert document["error"] == {"code": "query_timeout", "detail": "too slow"}
    opened.close()


def test_read_raises_a_failure_that_comes_before_any_chunk() -> None:
    def batches() -> Any:
        yield pa.record_batch({"__row": ['{"a":1}']})
        raise OSError("IO Error: gone")

    opened = _opened(batches())
    opened.read(len(b'{"data":[{"a":1}'))  # takes the rows; the next batch is what fails
    with pytest.raises(OSError, match="gone"):
        opened.read(1 << 20)
    opened.close()


def test_every_cursor_of_the_pool_caches_parquet_metadata(tmp_path: Any) -> None:
    db, cursors = open_database(QueryConfig(), [str(tmp_path)], 2)
    try:
        for cursor in cursors:
            setting = "SELECT current_setting('parquet_metadata_cache')"
            assert cursor.execute(setting).fetchone() == (True,)
    finally:
        for cursor in cursors:
            cursor.close()
        db.close()


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
