"""k2d.storage on real Iceberg tables (SQLite catalog + local warehouse) in tmp dirs."""

from __future__ import annotations

import os
import random
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.io.pyarrow import _dataframe_to_data_files
from pyiceberg.transforms import DayTransform, IdentityTransform

from k2d.columns import QUOTE_COLUMNS, TRADE_COLUMNS
from k2d.config import StorageConfig, WriterConfig
from k2d.messages import SequencedBatch, Watermark
from k2d.model import DeadLetter, Quote, SequenceEvent, Trade
from k2d.storage import (
    FLUSH,
    LOG_POSITION,
    ROW_GROUP_ROWS,
    TABLE_NAMES,
    TABLES,
    WATERMARKS,
    Warehouse,
    batch_columns,
    columns_to_table,
    dead_letters_to_arrow,
    events_to_arrow,
    flush_properties,
    quotes_to_arrow,
    trades_to_arrow,
)
from k2d.storage._warehouse import sorted_rows, write_data_files

T0 = 1_700_000_000_000_000  # 2023-11-14T22:13:20Z in µs


def trade(
    i: int,
    *,
    symbol: str = "BTCUSDT",
    exchange: str = "BINANCE",
    ts: int | None = None,
    seq: int | None = None,
    price: str = "43250.12000000",
    conditions: tuple[str, ...] | None = None,
) -> Trade:
    return Trade(
        message_id=f"{exchange}:{symbol}:trade:{i}",
        trade_id=str(i),
        symbol=symbol,
        exchange=exchange,
        asset_class="crypto",
        timestamp=T0 + i if ts is None else ts,
        price=price,
        quantity="0.00120000",
        currency="USDT",
        side="BUY" if i % 2 else "SELL",
        trade_conditions=conditions,
        source_sequence=i if seq is None else seq,
        ingestion_timestamp=T0 + i + 5,
        platform_sequence=i,
        provenance="live",
    )


def quote(i: int, *, bid: str | None = "1.00000000", ask: str | None = "1.10000000") -> Quote:
    return Quote(
        message_id=f"BINANCE:BTCUSDT:quote:{i}",
        symbol="BTCUSDT",
        exchange="BINANCE",
        asset_class="crypto",
        timestamp=T0 + i,
        bid_price=bid,
        bid_quantity=None if bid is None else "2.5",
        ask_price=ask,
        ask_quantity=None if ask is None else "3",
        currency="USDT",
        source_sequence=i,
        ingestion_timestamp=T0 + i,
        platform_sequence=i,
    )


def props(
    flush: int,
    tables: tuple[str, ...],
    watermarks: dict[str, Watermark] | None = None,
    position: Mapping[str, object] | None = None,
) -> dict[str, str]:
    return flush_properties(
        flush=flush,
        tables=tables,
        watermarks=watermarks or {},
        log_position=position or {},
        batch_ids=[flush],
    )


def wm(seq: int) -> Watermark:
    return Watermark(last_sequence=seq, platform_sequence=seq, last_seen_us=T0 + seq)


def local_path(uri: str) -> str:
    return uri.removeprefix("file://")


@pytest.fixture
def cfg(tmp_path: Path) -> StorageConfig:
    return StorageConfig(data_dir=str(tmp_path), sqlite_busy_timeout_ms=4321)


@pytest.fixture
def wh(cfg: StorageConfig) -> Iterator[Warehouse]:
    with Warehouse(cfg) as w:
        w.ensure_tables()
        yield w


def rows_in(w: Warehouse, table: str) -> int:
    return int(w.load_table(table).scan().to_arrow().num_rows)


# --- catalog and tables -----------------------------------------------------------------


def test_ensure_tables_is_idempotent_across_instances(cfg: StorageConfig) -> None:
    with Warehouse(cfg) as a, Warehouse(cfg) as b:
        a.ensure_tables()
        a.ensure_tables()
        b.ensure_tables()
        names = sorted(t for _, t in a.catalog.list_tables("market"))
        assert names == sorted(TABLE_NAMES)
        for name in TABLE_NAMES:
            metadata_dir = Path(cfg.data_dir, "warehouse", "market", name, "metadata")
            assert len(list(metadata_dir.glob("*.metadata.json"))) == 1


def test_catalog_runs_sqlite_in_wal_mode_with_busy_timeout(
    wh: Warehouse, cfg: StorageConfig
) -> None:
    with sqlite3.connect(Path(cfg.data_dir) / "catalog.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with wh.catalog.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 4321
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


EXPECTED_COLUMNS = {
    "trades": [
        ("message_id", "string", True),
        ("trade_id", "string", True),
        ("symbol", "string", True),
        ("exchange", "string", True),
        ("asset_class", "string", True),
        ("timestamp", "timestamptz", True),
        ("price", "decimal(18, 8)", True),
        ("quantity", "decimal(18, 8)", True),
        ("currency", "string", True),
        ("side", "string", True),
        ("trade_conditions", "list<string>", False),
        ("source_sequence", "long", False),
        ("ingestion_timestamp", "timestamptz", True),
        ("platform_sequence", "long", True),
        ("vendor_data", "string", False),
        ("provenance", "string", True),
    ],
    "quotes": [
        ("message_id", "string", True),
        ("symbol", "string", True),
        ("exchange", "string", True),
        ("asset_class", "string", True),
        ("timestamp", "timestamptz", True),
        ("bid_price", "decimal(18, 8)", False),
        ("bid_quantity", "decimal(18, 8)", False),
        ("ask_price", "decimal(18, 8)", False),
        ("ask_quantity", "decimal(18, 8)", False),
        ("currency", "string", True),
        ("source_sequence", "long", False),
        ("ingestion_timestamp", "timestamptz", True),
        ("platform_sequence", "long", True),
        ("vendor_data", "string", False),
        ("provenance", "string", True),
    ],
    "sequence_events": [
        ("event_id", "string", True),
        ("exchange", "string", True),
        ("symbol", "string", True),
        ("stream", "string", True),
        ("partition", "int", True),
        ("kind", "string", True),
        ("status", "string", True),
        ("first_missing", "long", False),
        ("last_missing", "long", False),
        ("missing_count", "long", True),
        ("detected_at", "timestamptz", True),
        ("resolved_at", "timestamptz", False),
        ("window_start", "timestamptz", False),
        ("window_end", "timestamptz", False),
        ("detail", "string", True),
        ("recorded_at", "timestamptz", True),
    ],
    "dead_letters": [
        ("received_at", "timestamptz", True),
        ("source", "string", True),
        ("exchange", "string", True),
        ("reason", "string", True),
        ("raw", "binary", True),
        ("line", "long", False),
        ("detail", "string", True),
    ],
}


@pytest.mark.parametrize("name", TABLE_NAMES)
def test_table_schema_is_as_specified(wh: Warehouse, name: str) -> None:
    schema = wh.load_table(name).schema()
    actual = [(f.name, str(f.field_type), f.required) for f in schema.fields]
    assert actual == EXPECTED_COLUMNS[name]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("trades", [("timestamp", DayTransform()), ("exchange", IdentityTransform())]),
        ("quotes", [("timestamp", DayTransform()), ("exchange", IdentityTransform())]),
        ("sequence_events", [("detected_at", DayTransform())]),
        ("dead_letters", [("received_at", DayTransform())]),
    ],
)
def test_partition_spec_and_properties(wh: Warehouse, name: str, expected: list[object]) -> None:
    table = wh.load_table(name)
    schema = table.schema()
    spec = [(schema.find_column_name(f.source_id), f.transform) for f in table.spec().fields]
    assert spec == expected
    assert table.properties["commit.manifest-merge.enabled"] == "true"
    assert table.properties["write.parquet.compression-codec"] == "zstd"


@pytest.mark.parametrize("name", TABLE_NAMES)
def test_tables_are_written_in_small_row_groups(wh: Warehouse, name: str) -> None:
    props = wh.load_table(name).properties
    assert props["write.parquet.row-group-limit"] == str(ROW_GROUP_ROWS) == "32768"
    assert props["write.parquet.page-size-bytes"] == "16384"
    assert props["write.parquet.page-row-limit"] == "4096"
    assert props["write.parquet.dict-size-bytes"] == "32768"


def test_ensure_tables_gives_an_older_table_todays_row_group_limit(wh: Warehouse) -> None:
    with wh.load_table("trades").transaction() as tx:
        tx.set_properties({"write.parquet.row-group-limit": "131072"})  # k2d before issue 14
    wh.ensure_tables()
    assert wh.load_table("trades").properties["write.parquet.row-group-limit"] == "32768"


@pytest.mark.parametrize("name", ["trades", "quotes"])
def test_sort_order_is_symbol_timestamp_source_sequence(wh: Warehouse, name: str) -> None:
    table = wh.load_table(name)
    schema = table.schema()
    cols = [schema.find_column_name(f.source_id) for f in table.sort_order().fields]
    assert cols == ["symbol", "timestamp", "source_sequence"]


# --- Arrow builders ---------------------------------------------------------------------


def test_builders_produce_the_iceberg_arrow_schema() -> None:
    built = {
        "trades": trades_to_arrow([trade(1)]),
        "quotes": quotes_to_arrow([quote(1)]),
        "sequence_events": events_to_arrow([]),
        "dead_letters": dead_letters_to_arrow([]),
    }
    for name, table in built.items():
        assert table.schema == TABLES[name].arrow_schema


def _batch(trades: list[Trade], quotes: list[Quote]) -> SequencedBatch:
    return SequencedBatch(
        batch_id=1,
        partition=0,
        trades=trades,
        quotes=quotes,
        events=[],
        dead_letters=[],
        watermarks={},
    )


def test_a_batchs_columns_become_exactly_what_the_row_builders_make() -> None:
    trades = [
        trade(1, conditions=("A", "B")),
        trade(2, seq=None, price="0.00000001"),
        trade(3, symbol="ETHUSDT", price="9999999999.99999999"),
        *(trade(i) for i in range(4, 40)),
    ]
    trades[1] = Trade(
        **{
            **{f: getattr(trades[1], f) for f in Trade.__struct_fields__},
            "source_sequence": None,
            "vendor_data": '{"E":1}',
        }
    )
    quotes = [quote(1), quote(2, bid=None), quote(3, ask=None)]
    batch = _batch(trades, quotes)
    for name, rows, build in (
        ("trades", trades, trades_to_arrow),
        ("quotes", quotes, quotes_to_arrow),
    ):
        made = columns_to_table(batch_columns(batch, name), name)
        expected = build(rows)
        assert made.schema == expected.schema == TABLES[name].arrow_schema
        assert made.equals(expected)
        # Gathered once: the hub and the writer read the same columns.
        assert batch_columns(batch, name) is batch_columns(batch, name)
    no_conditions = _batch([trade(1), trade(2)], [])
    made = columns_to_table(batch_columns(no_conditions, "trades"), "trades")
    assert made.equals(trades_to_arrow(no_conditions.trades))


def test_a_batchs_too_precise_price_is_refused_as_the_row_builder_refuses_it() -> None:
    batch = _batch([trade(1, price="1.000000001")], [])
    with pytest.raises(pa.ArrowInvalid):
        columns_to_table(batch_columns(batch, "trades"), "trades")


def test_decimals_are_exact_at_both_ends_of_decimal_18_8(wh: Warehouse) -> None:
    rows = [trade(1, price="0.00000001"), trade(2, price="9999999999.99999999")]
    table = trades_to_arrow(rows)
    assert table.column("price").to_pylist() == [
        Decimal("0.00000001"),
        Decimal("9999999999.99999999"),
    ]
    wh.append("trades", table, props(1, ("trades",)))
    back = wh.load_table("trades").scan().to_arrow().sort_by("trade_id")
    assert back.column("price").to_pylist() == [
        Decimal("0.00000001"),
        Decimal("9999999999.99999999"),
    ]


def test_a_price_with_more_than_8_decimals_is_refused_not_rounded() -> None:
    with pytest.raises(pa.ArrowInvalid):
        trades_to_arrow([trade(1, price="1.000000001")])


def test_timestamps_are_utc_microseconds() -> None:
    table = trades_to_arrow([trade(0, ts=T0 + 1)])
    assert table.schema.field("timestamp").type == pa.timestamp("us", tz="UTC")
    assert table.column("timestamp")[0].as_py() == datetime(2023, 11, 14, 22, 13, 20, 1, tzinfo=UTC)


def test_trade_conditions_keep_values_and_nulls() -> None:
    none = trades_to_arrow([trade(1), trade(2)])
    assert none.column("trade_conditions").null_count == 2
    mixed = trades_to_arrow([trade(1, conditions=("A", "B")), trade(2)])
    assert mixed.column("trade_conditions").to_pylist() == [["A", "B"], None]


def test_quotes_keep_absent_sides_null(wh: Warehouse) -> None:
    table = quotes_to_arrow([quote(1, bid=None), quote(2, ask=None)])
    wh.append("quotes", table, props(1, ("quotes",)))
    back = wh.load_table("quotes").scan().to_arrow().sort_by("platform_sequence").to_pylist()
    assert (back[0]["bid_price"], back[0]["bid_quantity"]) == (None, None)
    assert back[0]["ask_price"] == Decimal("1.1")
    assert (back[1]["ask_price"], back[1]["bid_price"]) == (None, Decimal("1"))


def test_events_and_dead_letters_round_trip(wh: Warehouse) -> None:
    event = SequenceEvent(
        event_id="gap-1",
        exchange="BINANCE",
        symbol="BTCUSDT",
        stream="trade",
        partition=1,
        kind="gap",
        status="open",
        first_missing=5,
        last_missing=9,
        missing_count=5,
        detected_at=T0,
        detail="",
    )
    dead = DeadLetter(
        received_at=T0,
        source="binance",
        exchange="BINANCE",
        reason="parse",
        raw=b"\x00\xffnot json",
    )
    wh.append("sequence_events", events_to_arrow([event]), props(1, ("sequence_events",)))
    wh.append("dead_letters", dead_letters_to_arrow([dead]), props(2, ("dead_letters",)))
    (e,) = wh.load_table("sequence_events").scan().to_arrow().to_pylist()
    assert (e["event_id"], e["first_missing"], e["resolved_at"]) == ("gap-1", 5, None)
    (d,) = wh.load_table("dead_letters").scan().to_arrow().to_pylist()
    assert d["raw"] == b"\x00\xffnot json"
    assert d["line"] is None


# --- append -----------------------------------------------------------------------------


def test_append_reports_the_data_files_it_added(wh: Warehouse) -> None:
    rows = [trade(i, exchange="BINANCE") for i in range(10)]
    rows += [trade(i, exchange="ASX", symbol="BHP", ts=T0 + 86_400_000_000 + i) for i in range(5)]
    result = wh.append("trades", trades_to_arrow(rows), props(1, ("trades",)))
    assert result.rows == 15
    assert result.retries == 0
    assert result.snapshot_id == wh.load_table("trades").current_snapshot().snapshot_id
    by_exchange = {f.partition["exchange"]: f for f in result.files}
    assert set(by_exchange) == {"BINANCE", "ASX"}
    binance, asx = by_exchange["BINANCE"], by_exchange["ASX"]
    assert (binance.record_count, asx.record_count) == (10, 5)
    assert binance.partition["timestamp_day"] == "2023-11-14"
    assert asx.partition["timestamp_day"] == "2023-11-15"
    assert (binance.min_timestamp, binance.max_timestamp) == (T0, T0 + 9)
    for f in result.files:
        assert Path(local_path(f.path)).stat().st_size == f.size_bytes


def test_a_one_partition_append_writes_the_data_file_pyicebergs_own_split_would(
    wh: Warehouse,
) -> None:
    # A flush in one day and exchange is written without pyiceberg's partition split (and
    # the copy it makes): the file must come out as that split would have made it.
    rows = [trade(i, symbol=("BTCUSDT", "ETHUSDT")[i % 2], seq=i) for i in range(300)]
    data = trades_to_arrow(rows).sort_by([("symbol", "ascending"), ("timestamp", "ascending")])
    table = wh.load_table("trades")

    (ours,) = write_data_files(table, data)
    (theirs,) = _dataframe_to_data_files(table_metadata=table.metadata, df=data, io=table.io)

    assert ours.partition == theirs.partition
    assert ours.partition[0] is not None and ours.partition[1] == "BINANCE"
    for name in ("record_count", "value_counts", "null_value_counts", "lower_bounds"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.upper_bounds == theirs.upper_bounds
    assert ours.file_path != theirs.file_path
    read = pq.read_table(local_path(ours.file_path))
    assert read.equals(pq.read_table(local_path(theirs.file_path)))
    assert read.num_rows == 300


def test_a_large_one_partition_append_is_written_as_runs_of_its_sorted_rows(
    wh: Warehouse,
) -> None:
    rows = [trade(i, symbol=("BTCUSDT", "ETHUSDT", "SOLUSDT")[i % 3], seq=i) for i in range(350)]
    data = sorted_rows(trades_to_arrow(rows), ("symbol", "timestamp", "source_sequence"))
    table = wh.load_table("trades")

    whole = write_data_files(table, data, 100, 1)
    three = write_data_files(table, data, 100, 8)  # 350 rows: at most 3 runs of 100 or more
    small = write_data_files(table, data.slice(0, 199), 100, 8)
    off = write_data_files(table, data, 0, 8)

    assert [f.record_count for f in whole] == [350]
    assert [f.record_count for f in three] == [117, 117, 116]
    assert [f.record_count for f in small] == [199]
    assert [f.record_count for f in off] == [350]
    runs = [pq.read_table(local_path(f.file_path)) for f in three]
    assert pa.concat_tables(runs).equals(pq.read_table(local_path(whole[0].file_path)))
    # Each file's statistics are its own run's: BTC's first rows, SOL's last.
    assert [f.partition for f in three] == [whole[0].partition] * 3
    assert three[0].lower_bounds != three[2].lower_bounds


def test_a_split_append_commits_every_row_once_in_order(cfg: StorageConfig) -> None:
    rows = [trade(i, symbol=("BTCUSDT", "ETHUSDT")[i % 2], seq=i) for i in range(500)]
    data = trades_to_arrow(rows)  # in time order, the symbols interleaved
    with Warehouse(cfg, WriterConfig(file_split_rows=200)) as w:
        w.ensure_tables()
        result = w.append("trades", data, props(1, ("trades",)))
    files = [pq.read_table(local_path(f.path)) for f in result.files]
    assert len(result.files) == min(os.cpu_count() or 1, 2)
    assert sum(f.record_count for f in result.files) == result.rows == 500
    # The files, in order, are the rows sorted once: each a run of them.
    expected = sorted_rows(data, ("symbol", "timestamp", "source_sequence"))
    assert pa.concat_tables(files).column("message_id").equals(expected.column("message_id"))


def test_a_flush_spanning_days_is_still_split_by_partition(wh: Warehouse) -> None:
    day = 86_400_000_000
    rows = [trade(i, ts=T0 + (i % 3) * day) for i in range(30)]
    result = wh.append("trades", trades_to_arrow(rows), props(1, ("trades",)))
    days = sorted((f.partition["timestamp_day"], f.record_count) for f in result.files)
    assert days == [("2023-11-14", 10), ("2023-11-15", 10), ("2023-11-16", 10)]
    assert rows_in(wh, "trades") == 30


def test_each_data_file_is_sorted_by_symbol_timestamp_source_sequence(wh: Warehouse) -> None:
    rng = random.Random(7)
    rows = [
        trade(
            i,
            symbol=rng.choice(["ETHUSDT", "BTCUSDT", "ADAUSDT"]),
            ts=T0 + rng.randrange(50),
            seq=rng.choice([None, rng.randrange(1000)]),
        )
        for i in range(500)
    ]
    result = wh.append("trades", trades_to_arrow(rows), props(1, ("trades",)))
    (f,) = result.files
    parquet = pq.ParquetFile(local_path(f.path))
    assert parquet.metadata.row_group(0).column(0).compression == "ZSTD"
    data = parquet.read(columns=["symbol", "timestamp", "source_sequence"]).to_pylist()
    keys = [
        (r["symbol"], r["timestamp"], -1 if r["source_sequence"] is None else r["source_sequence"])
        for r in data
    ]
    assert keys == sorted(keys)
    assert len(keys) == 500


def test_a_data_file_holds_row_groups_of_at_most_row_group_rows(wh: Warehouse) -> None:
    n = 2 * ROW_GROUP_ROWS + 100
    data = trades_to_arrow([trade(i, seq=i) for i in range(n)])
    (f,) = wh.append("trades", data, props(1, ("trades",))).files
    meta = pq.ParquetFile(local_path(f.path)).metadata
    groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert groups == [ROW_GROUP_ROWS, ROW_GROUP_ROWS, 100]


def test_snapshot_properties_round_trip(wh: Warehouse) -> None:
    assert wh.snapshot_properties("trades") == {}
    p = props(3, ("trades",), {"BINANCE:BTCUSDT:trade": wm(42)}, {"journal": {"offset": 99}})
    wh.append("trades", trades_to_arrow([trade(1)]), p)
    got = wh.snapshot_properties("trades")
    assert {k: got[k] for k in p} == p
    assert got["added-records"] == "1"


def test_stats_per_table(wh: Warehouse) -> None:
    wh.append("trades", trades_to_arrow([trade(1), trade(2)]), props(1, ("trades",)))
    wh.append("trades", trades_to_arrow([trade(3)]), props(2, ("trades",)))
    stats = wh.stats()
    assert stats["trades"]["rows"] == 3
    assert stats["trades"]["data_files"] == 2
    assert stats["trades"]["snapshots"] == 2
    assert stats["trades"]["snapshot_id"] == wh.load_table("trades").current_snapshot().snapshot_id
    assert stats["quotes"] == {"rows": 0, "data_files": 0, "snapshot_id": None, "snapshots": 0}


# --- k2 state ---------------------------------------------------------------------------

KEY_T = "BINANCE:BTCUSDT:trade"
KEY_Q = "BINANCE:BTCUSDT:quote"


def test_latest_k2_state_is_the_latest_complete_flush(wh: Warehouse) -> None:
    assert wh.latest_k2_state() == ({}, {})
    both = ("quotes", "trades")
    w1, p1 = {KEY_T: wm(10), KEY_Q: wm(20)}, {"journal": 100}
    wh.append("trades", trades_to_arrow([trade(1)]), props(1, both, w1, p1))
    wh.append("quotes", quotes_to_arrow([quote(1)]), props(1, both, w1, p1))
    assert wh.latest_k2_state() == (w1, p1)
    # Flush 2 only had quotes: the trades table keeps flush 1's (older) state.
    w2, p2 = {KEY_T: wm(11), KEY_Q: wm(25)}, {"journal": 200}
    wh.append("quotes", quotes_to_arrow([quote(2)]), props(2, ("quotes",), w2, p2))
    watermarks, position = wh.latest_k2_state()
    assert watermarks == w2
    assert isinstance(watermarks[KEY_T], Watermark)
    assert position == p2
    assert wh.k2_state().table_flushes == {
        "trades": 1,
        "quotes": 2,
        "sequence_events": -1,
        "dead_letters": -1,
    }


def test_a_flush_cut_short_by_a_crash_resumes_before_it(wh: Warehouse) -> None:
    both = ("quotes", "trades")
    w1, p1 = {KEY_T: wm(10), KEY_Q: wm(20)}, {"journal": 100}
    wh.append("trades", trades_to_arrow([trade(1)]), props(1, both, w1, p1))
    wh.append("quotes", quotes_to_arrow([quote(1)]), props(1, both, w1, p1))
    # Flush 2 committed quotes, then the process died before trades.
    w2 = {KEY_T: wm(15), KEY_Q: wm(30), "BINANCE:ETHUSDT:trade": wm(1)}
    wh.append("quotes", quotes_to_arrow([quote(2)]), props(2, both, w2, {"journal": 200}))
    state = wh.k2_state()
    assert not state.complete
    # Trades may only resume after what trades holds: the older state, new keys left out.
    assert (state.watermarks, state.log_position) == (w1, p1)


def test_a_flush_whose_new_table_never_committed_resumes_before_it(wh: Warehouse) -> None:
    w1, p1 = {KEY_T: wm(10)}, {"journal": 100}
    wh.append("trades", trades_to_arrow([trade(1)]), props(1, ("trades",), w1, p1))
    members = ("dead_letters", "sequence_events", "trades")
    dead = DeadLetter(received_at=T0, source="s", exchange="BINANCE", reason="r", raw=b"x")
    w2 = {KEY_T: wm(15)}
    wh.append("dead_letters", dead_letters_to_arrow([dead]), props(2, members, w2, {"journal": 2}))
    assert wh.latest_k2_state() == (w1, p1)


def test_a_snapshot_without_k2_properties_is_passed_over(wh: Warehouse) -> None:
    w1, p1 = {KEY_T: wm(10)}, {"journal": 100}
    wh.append("trades", trades_to_arrow([trade(1)]), props(1, ("trades",), w1, p1))
    # Another committer (say, compaction) writes a snapshot with no k2 state.
    wh.load_table("trades").append(trades_to_arrow([trade(2)]))
    assert WATERMARKS not in wh.snapshot_properties("trades")
    assert wh.latest_k2_state() == (w1, p1)


# --- conflicts --------------------------------------------------------------------------


def test_a_stale_writer_retries_its_commit_after_a_conflict(cfg: StorageConfig) -> None:
    fast = WriterConfig(commit_backoff_initial=0.001, commit_backoff_max=0.01)
    with Warehouse(cfg, fast) as a, Warehouse(cfg, fast) as b:
        a.ensure_tables()
        a.append("trades", trades_to_arrow([trade(1)]), props(1, ("trades",)))
        b.append("trades", trades_to_arrow([trade(2)]), props(2, ("trades",)))
        # `a` still holds the metadata from before b's commit: its commit must conflict.
        result = a.append("trades", trades_to_arrow([trade(3)]), props(3, ("trades",)))
        assert result.retries == 1
        assert rows_in(a, "trades") == 3
        assert a.snapshot_properties("trades")[FLUSH] == "3"


def test_a_conflict_past_the_last_retry_raises_and_commits_nothing(cfg: StorageConfig) -> None:
    with Warehouse(cfg, WriterConfig(commit_retries=0)) as a, Warehouse(cfg) as b:
        a.ensure_tables()
        a.append("trades", trades_to_arrow([trade(1)]), props(1, ("trades",)))
        b.append("trades", trades_to_arrow([trade(2)]), props(2, ("trades",)))
        with pytest.raises(CommitFailedException):
            a.append("trades", trades_to_arrow([trade(3)]), props(3, ("trades",)))
        assert rows_in(b, "trades") == 2
        # The failed writer reloads the table and can commit again.
        a.append("trades", trades_to_arrow([trade(4)]), props(4, ("trades",)))
        assert rows_in(b, "trades") == 3


def test_concurrent_appends_from_two_warehouses_all_land(cfg: StorageConfig) -> None:
    fast = WriterConfig(commit_retries=50, commit_backoff_initial=0.005, commit_backoff_max=0.05)
    errors: list[BaseException] = []
    retries: list[int] = []
    with Warehouse(cfg, fast) as a, Warehouse(cfg, fast) as b:
        a.ensure_tables()

        def worker(w: Warehouse, base: int) -> None:
            try:
                for n in range(6):
                    rows = [trade(base + n * 10 + k) for k in range(10)]
                    r = w.append("trades", trades_to_arrow(rows), props(n, ("trades",)))
                    retries.append(r.retries)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [
            threading.Thread(target=worker, args=(w, base)) for w, base in ((a, 0), (b, 1000))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert errors == []
        assert rows_in(a, "trades") == 120
        table = a.load_table("trades")
        assert len(table.snapshots()) == 12
        assert sum(int(s.summary["added-records"]) for s in table.snapshots()) == 120


def test_the_metadata_a_commit_leaves_in_memory_is_the_metadata_on_disk(
    cfg: StorageConfig,
) -> None:
    with Warehouse(cfg) as wh:
        wh.ensure_tables()
        for n in range(1, 4):
            wh.append("trades", trades_to_arrow([trade(n)]), props(n, ("trades",)))
        in_memory = wh.load_table("trades")
        with Warehouse(cfg) as fresh:
            on_disk = fresh.load_table("trades")

        assert on_disk.metadata_location == in_memory.metadata_location
        assert on_disk.metadata == in_memory.metadata
        assert len(on_disk.metadata.metadata_log) == len(on_disk.snapshots()) == 3


def test_a_warehouse_sees_what_another_committed_after_it_loaded(cfg: StorageConfig) -> None:
    with Warehouse(cfg) as a, Warehouse(cfg) as b:
        a.ensure_tables()
        a.append("trades", trades_to_arrow([trade(1)]), props(1, ("trades",)))
        assert len(b.load_table("trades").snapshots()) == 1

        a.append("trades", trades_to_arrow([trade(2)]), props(2, ("trades",)))

        assert len(b.load_table("trades").snapshots()) == 2
        assert rows_in(b, "trades") == 2


def test_properties_are_json_for_other_readers(wh: Warehouse) -> None:
    p = props(1, ("trades",), {KEY_T: wm(5)}, {"kafka:k2d.trades:0": 17})
    wh.append("trades", trades_to_arrow([trade(1)]), p)
    got = wh.snapshot_properties("trades")
    assert got[WATERMARKS] == (
        '{"BINANCE:BTCUSDT:trade":{"last_sequence":5,"platform_sequence":5,'
        f'"last_seen_us":{T0 + 5}}}}}'
    )
    assert got[LOG_POSITION] == '{"kafka:k2d.trades:0":17}'


def test_ensure_tables_restores_missing_table_properties(wh: Warehouse) -> None:
    with wh.load_table("quotes").transaction() as tx:
        tx.remove_properties("commit.manifest-merge.enabled")
    wh.ensure_tables()
    assert wh.load_table("quotes").properties["commit.manifest-merge.enabled"] == "true"


@pytest.mark.parametrize(
    ("columns", "table", "record"),
    [(TRADE_COLUMNS, "trades", Trade), (QUOTE_COLUMNS, "quotes", Quote)],
)
def test_the_ingest_columns_are_the_tables_columns_before_their_casts(
    columns: pa.Schema, table: str, record: type[Trade] | type[Quote]
) -> None:
    """What the parser and the tracker carry: every column of the table, by name and order
    (the records' fields too), in the type the table's own type is cast from."""
    typed = TABLES[table].arrow_schema

    assert columns.names == typed.names == list(record.__struct_fields__)
    for raw, final in zip(columns, typed, strict=True):
        if pa.types.is_decimal(final.type):
            assert raw.type == pa.string(), raw.name
        elif pa.types.is_timestamp(final.type):
            assert raw.type == pa.int64(), raw.name
        elif pa.types.is_list(final.type):
            assert raw.type == pa.list_(pa.string()), raw.name
        else:
            assert raw.type == final.type, raw.name


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.one_of(
                st.none(), st.sampled_from(("BTCUSDT", "ETHUSDT", "B", "a", "", "é", "Z\x00"))
            ),
            st.integers(-3, 3),
            st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
        ),
        max_size=60,
    ),
    chunk=st.integers(1, 7),
)
def test_an_append_sorts_its_rows_exactly_as_sort_by_would(
    rows: list[tuple[str | None, int, int | None]], chunk: int
) -> None:
    # Arrange: rows in chunks, as a writer's buffer holds them, with ties and nulls; the
    # row number shows where each tie ends up.
    batches = [
        pa.record_batch(
            {
                "symbol": pa.array([r[0] for r in part], pa.string()),
                "timestamp": pa.array([r[1] for r in part], pa.int64()),
                "source_sequence": pa.array([r[2] for r in part], pa.int64()),
                "row": pa.array(range(i, i + len(part)), pa.int64()),
            }
        )
        for i in range(0, len(rows), chunk)
        if (part := rows[i : i + chunk])
    ]
    schema = pa.schema(
        [
            ("symbol", pa.string()),
            ("timestamp", pa.int64()),
            ("source_sequence", pa.int64()),
            ("row", pa.int64()),
        ]
    )
    data = pa.Table.from_batches(batches, schema)
    keys = ("symbol", "timestamp", "source_sequence")

    # Act
    got = sorted_rows(data, keys)

    # Assert
    assert got.to_pylist() == data.sort_by([(k, "ascending", "at_start") for k in keys]).to_pylist()
