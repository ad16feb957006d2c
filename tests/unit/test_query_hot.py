"""The hot tier: files held in memory give the rows DuckDB reads from them, and Arrow renders
JSON rows into the bytes DuckDB's json_object gives."""

from __future__ import annotations

import random
from decimal import Decimal
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from k2d.model import Trade
from k2d.query import FileEntry, HotFile, HotFiles, SymbolStats, Window
from k2d.query._plans import TABLE_COLUMNS
from k2d.query._render import Column, Kind, json_row_expr, json_rows
from k2d.storage import TRADES, trades_to_arrow

T0 = 1_709_251_200_000_000
S = 1_000_000
KINDS = [
    Column("s", Kind.STRING),
    Column("i", Kind.INT),
    Column("d", Kind.DECIMAL),
    Column("ts", Kind.TIMESTAMP),
    Column("l", Kind.LIST),
]


def duckdb_rows(table: pa.Table, columns: list[Column]) -> list[str]:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.register("t", table)
    return [r[0] for r in con.execute(f"SELECT {json_row_expr(columns)} FROM t").fetchall()]


def edge_table(n: int, seed: int) -> pa.Table:
    rng = random.Random(seed)

    def decimal() -> Decimal | None:
        r = rng.random()
        if r < 0.1:
            return None
        if r < 0.4:  # below 1E-6, where Arrow's own text has an exponent
            return Decimal(rng.randrange(-150, 150)) / 10**8
        return Decimal(rng.randrange(-(10**17), 10**17)) / 10**8

    return pa.table(
        {
            "s": [rng.choice(["a", "BTCUSDT", "", "x/y", None, "~ !#[]{}"]) for _ in range(n)],
            "i": pa.array(
                [
                    rng.choice([None, 0, -5, 2**62, rng.randrange(-(10**12), 10**12)])
                    for _ in range(n)
                ],
                pa.int64(),
            ),
            "d": pa.array([decimal() for _ in range(n)], pa.decimal128(18, 8)),
            "ts": pa.array(
                [rng.choice([None, 0, 1, rng.randrange(0, 7_258_118_400 * S)]) for _ in range(n)],
                pa.timestamp("us", "UTC"),
            ),
            "l": pa.array(
                [rng.choice([None, [], ["a"], ["x", "y", "z"], [""]]) for _ in range(n)],
                pa.list_(pa.field("element", pa.string(), nullable=False)),
            ),
        }
    )


@pytest.mark.parametrize(("offset", "length"), [(0, 2_000), (7, 1_500), (1_999, 1)])
def test_json_rows_are_the_bytes_duckdb_renders(offset: int, length: int) -> None:
    table = edge_table(2_000, seed=offset).slice(offset, length)
    rendered = json_rows(table, KINDS)
    assert rendered is not None
    assert rendered.to_pylist() == duckdb_rows(table, KINDS)


def test_json_rows_of_a_stored_trade_page_are_duckdbs() -> None:
    trades = [
        Trade(
            message_id=f"BINANCE:BTCUSDT:trade:{i}",
            trade_id=str(i),
            symbol="BTCUSDT",
            exchange="BINANCE",
            asset_class="crypto",
            timestamp=T0 + i * S + i,
            price=f"{i}.0000000{i % 10}",
            quantity="0.00000050" if i % 3 else "12",
            currency="USDT",
            side="BUY",
            trade_conditions=("x", "y") if i % 4 == 0 else (() if i % 4 == 1 else None),
            source_sequence=i if i % 5 else None,
            ingestion_timestamp=T0 + i * S + 7,
            platform_sequence=i,
            vendor_data='{"M":true}' if i % 2 else None,
        )
        for i in range(1, 60)
    ]
    table = trades_to_arrow(trades)
    columns = list(TABLE_COLUMNS[TRADES].values())
    rendered = json_rows(table, columns)
    assert rendered is not None
    assert rendered.to_pylist() == duckdb_rows(table, columns)


@pytest.mark.parametrize("text", ['say "hi"', "back\\slash", '{"M":true}', '\\"'])
def test_json_rows_escape_quotes_and_backslashes_as_duckdb_does(text: str) -> None:
    table = pa.table({"s": ["a", text, None], "t": [text, "b", "c"]})
    columns = [Column("s", Kind.STRING), Column("t", Kind.STRING)]
    rendered = json_rows(table, columns)
    assert rendered is not None
    assert rendered.to_pylist() == duckdb_rows(table, columns)


@pytest.mark.parametrize("text", ["line\nbreak", "tab\t", "\x01", "\x7f", "é"])
def test_json_rows_leave_other_escapes_and_non_ascii_to_duckdb(text: str) -> None:
    plain = pa.table({"s": ["a", "b"], "l": pa.array([["c"], []], pa.list_(pa.string()))})
    in_string = plain.set_column(0, "s", pa.array(["a", text]))
    in_list = plain.set_column(1, "l", pa.array([["c"], [text]], pa.list_(pa.string())))
    quoted_in_list = plain.set_column(1, "l", pa.array([["c"], ['"']], pa.list_(pa.string())))
    columns = [Column("s", Kind.STRING), Column("l", Kind.LIST)]
    assert json_rows(plain, columns) is not None
    assert json_rows(in_string, columns) is None
    assert json_rows(in_list, columns) is None
    assert json_rows(quoted_in_list, columns) is None


def test_json_rows_leave_times_before_1970_and_other_kinds_to_duckdb() -> None:
    before = pa.table({"ts": pa.array([-1], pa.timestamp("us", "UTC"))})
    floats = pa.table({"f": [1.5]})
    assert json_rows(before, [Column("ts", Kind.TIMESTAMP)]) is None
    assert json_rows(floats, [Column("f", Kind.FLOAT)]) is None
    nulls = pa.table({"f": pa.array([None], pa.float64()), "s": ["a"]})
    assert json_rows(nulls, [Column("f", Kind.FLOAT), Column("s", Kind.STRING)]).to_pylist() == [
        '{"f":null,"s":"a"}'
    ]


def trade(symbol: str, exchange: str, i: int, ts: int) -> Trade:
    return Trade(
        message_id=f"{exchange}:{symbol}:trade:{i}",
        trade_id=str(i),
        symbol=symbol,
        exchange=exchange,
        asset_class="crypto",
        timestamp=ts,
        price="1.5",
        quantity="2",
        currency="USDT",
        side="SELL",
        source_sequence=i,
        ingestion_timestamp=ts,
        platform_sequence=i,
    )


def data_file(path: Path, trades: list[Trade]) -> FileEntry:
    """A Parquet file of `trades`, in the order given, and its index entry."""
    pq.write_table(trades_to_arrow(trades), path)
    stats: dict[tuple[str, str], SymbolStats] = {}
    for t in trades:
        one = SymbolStats(1, t.timestamp, t.timestamp, t.source_sequence, t.source_sequence)
        key = (t.exchange, t.symbol)
        stats[key] = stats[key].merge(one) if key in stats else one
    times = [t.timestamp for t in trades]
    return FileEntry(
        str(path), len(trades), path.stat().st_size, None, None, min(times), max(times), stats
    )


def test_held_files_give_the_rows_of_a_window_pair_and_exchange(tmp_path: Path) -> None:
    rng = random.Random(3)
    trades = [
        trade(rng.choice(["BTCUSDT", "ETHUSDT", "SOLUSDT"]), rng.choice(["BINANCE", "ASX"]), i, ts)
        for i, ts in enumerate(sorted(rng.randrange(T0, T0 + 600 * S) for _ in range(3_000)))
    ]
    rng.shuffle(trades)  # a file written by another engine need not be sorted
    entries = [
        data_file(tmp_path / f"{k}.parquet", trades[k * 1_000 : (k + 1) * 1_000]) for k in range(3)
    ]
    hot = HotFiles(10**9)
    due = hot.plan({TRADES: entries})
    assert {e.path for _, e in due} == {e.path for e in entries}
    assert hot.rows(entries, Window(T0, T0 + 600 * S), (), ()) is None  # nothing held yet
    for table, entry in due:
        assert hot.add(table, entry, HotFile.read(entry.path, table))
    everything = pa.concat_tables(pq.read_table(e.path) for e in entries)
    for k in range(40):
        lo = T0 + rng.randrange(-60, 600) * S + rng.randrange(S)
        window = Window(lo, lo + rng.randrange(1, 200) * S)
        symbols = tuple(rng.sample(["BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT"], k % 3))
        exchanges = ("ASX",) if k % 4 == 0 else ()
        got = hot.rows(entries, window, exchanges, symbols)
        assert got is not None
        ts = everything.column("timestamp").cast(pa.int64())
        mask = pc.and_(pc.greater_equal(ts, window.start), pc.less(ts, window.end))
        if symbols:
            mask = pc.and_(mask, pc.is_in(everything.column("symbol"), pa.array(symbols)))
        if exchanges:
            mask = pc.and_(mask, pc.is_in(everything.column("exchange"), pa.array(exchanges)))
        want = everything.filter(mask)
        assert sorted(got.column("message_id").to_pylist()) == sorted(
            want.column("message_id").to_pylist()
        )


def test_the_newest_files_that_fit_are_held_and_the_rest_dropped(tmp_path: Path) -> None:
    entries = [
        data_file(
            tmp_path / f"{k}.parquet",
            [trade("BTCUSDT", "BINANCE", k * 100 + i, T0 + (k * 100 + i) * S) for i in range(100)],
        )
        for k in range(4)
    ]
    one = HotFile.read(entries[0].path, TRADES).nbytes
    hot = HotFiles(int(2.5 * one))
    for table, entry in hot.plan({TRADES: entries[:2]}):
        assert hot.add(table, entry, HotFile.read(entry.path, table))
    assert hot.files == 2
    # Two newer files: they are due, newest first, and the older two make room.
    due = hot.plan({TRADES: entries})
    assert [e.path for _, e in due] == [entries[3].path, entries[2].path]
    assert hot.files == 0
    for table, entry in due:
        assert hot.add(table, entry, HotFile.read(entry.path, table))
    assert hot.files == 2 and hot.bytes <= hot.max_bytes
    # Full: a file that does not fit is refused, whatever was guessed.
    assert not hot.add(TRADES, entries[0], HotFile.read(entries[0].path, TRADES))
    # A held file that leaves the index (compacted away) is dropped; one that cannot be
    # read is skipped.
    assert hot.plan({TRADES: entries[2:3]}, skip={entries[2].path}) == []
    assert hot.files == 1
    assert hot.due({TRADES: entries[1:3]}, skip={entries[1].path}) == []
    assert hot.plan({TRADES: entries[1:3]}) == [(TRADES, entries[1])]
