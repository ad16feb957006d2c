"""`k2d load asx` on real Iceberg tables: rows, UTC, dead letters, idempotency, instruments,
the daemon's resume state, a live writer committing beside the load, and OHLCV via DuckDB."""

from __future__ import annotations

import argparse
import csv
import fcntl
import io
import json
import shutil
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet
import pytest

from k2d import batchload
from k2d.batchload import BATCH_FILES, LoadError, LoadOptions, LoadSummary, Progress, load_asx
from k2d.config import Config, StorageConfig, WriterConfig
from k2d.messages import Watermark
from k2d.model import Trade
from k2d.storage import (
    INSTRUMENTS,
    LOG_POSITION,
    WATERMARKS,
    Warehouse,
    flush_properties,
    trades_to_arrow,
)
from k2d.venues.asx import TIMEZONE

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "asx"
# Good rows in the fixtures: BHP trades lines 1-10 and 15, CBA trades 1-2; BHP quotes 1-6.
BHP_TRADE_LINES = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15]
N_TRADES = len(BHP_TRADE_LINES) + 2
N_QUOTES = 6
N_DEAD = 4 + 2


@pytest.fixture
def vendor(tmp_path: Path) -> Path:
    """A private copy of the fixture files (some tests change them)."""
    root = tmp_path / "vendor"
    shutil.copytree(FIXTURES, root)
    return root


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return Config(
        storage=StorageConfig(data_dir=str(tmp_path / "data")),
        writer=WriterConfig(commit_backoff_initial=0.01, commit_backoff_max=0.1),
    )


@pytest.fixture
def wh(cfg: Config) -> Iterator[Warehouse]:
    with Warehouse(cfg.storage, cfg.writer) as w:
        w.ensure_tables()
        yield w


def load(cfg: Config, vendor: Path, **kw: Any) -> LoadSummary:
    kw.setdefault("trades", [vendor / "trades"])
    kw.setdefault("quotes", [vendor / "quotes"])
    return load_asx(cfg, company_info=vendor / "company_info.csv", **kw)


def rows(wh: Warehouse, table: str, order: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    data = wh.catalog.load_table((wh.namespace, table)).scan().to_arrow()
    if order:
        data = data.sort_by([(c, "ascending") for c in order])
    return list(data.to_pylist())


def us(ts: datetime) -> int:
    return (ts - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def snapshot_ids(wh: Warehouse) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for name in ("trades", "quotes", "dead_letters", INSTRUMENTS):
        snap = wh.catalog.load_table((wh.namespace, name)).current_snapshot()
        out[name] = None if snap is None else snap.snapshot_id
    return out


def live_trades(start: int, n: int) -> pa.Table:
    t0 = 1_700_000_000_000_000
    return trades_to_arrow(
        [
            Trade(
                message_id=f"BINANCE:BTCUSDT:trade:{i}",
                trade_id=str(i),
                symbol="BTCUSDT",
                exchange="BINANCE",
                asset_class="crypto",
                timestamp=t0 + i,
                price="100.5",
                quantity="0.25",
                currency="USDT",
                side="BUY",
                source_sequence=i,
                ingestion_timestamp=t0 + i,
                platform_sequence=i,
            )
            for i in range(start, start + n)
        ]
    )


def live_props(flush: int, seq: int) -> dict[str, str]:
    wm = Watermark(last_sequence=seq, platform_sequence=seq, last_seen_us=seq)
    return flush_properties(
        flush=flush,
        tables=["trades"],
        watermarks={"BINANCE:BTCUSDT:trade": wm},
        log_position={"binance": {"segment": 1, "offset": seq}},
        batch_ids=[flush],
    )


# --- rows --------------------------------------------------------------------------------


def test_a_load_writes_trades_in_utc_with_vendor_fields(
    cfg: Config, vendor: Path, wh: Warehouse
) -> None:
    summary = load(cfg, vendor)

    assert summary.ok
    assert summary.count("loaded") == 3
    assert summary.rows == {"trades": N_TRADES, "quotes": N_QUOTES, "dead_letters": N_DEAD}
    bhp = [r for r in rows(wh, "trades", ("platform_sequence",)) if r["symbol"] == "BHP"]
    assert [r["platform_sequence"] for r in bhp] == BHP_TRADE_LINES
    assert [us(r["timestamp"]) for r in bhp] == [
        1_394_395_211_938_000,  # 03/10/2014 07:00:11.938 AEDT (pre-open)
        1_394_406_344_516_000,  # 03/10/2014 10:05:44.516 AEDT
        1_394_406_344_516_000,
        1_394_406_359_999_000,
        1_394_406_360_000_000,
        1_394_406_390_250_000,
        1_396_587_599_001_000,  # 04/04/2014 15:59:59.001 AEDT = 04:59:59.001Z
        1_396_828_801_500_000,  # 04/07/2014 10:00:01.500 AEST = 00:00:01.5Z
        1_412_316_600_000_000,  # 10/03/2014 16:10 AEST = 06:10Z
        1_412_550_900_000_000,  # 10/06/2014 10:15 AEDT = 10/05 23:15Z
        1_394_406_421_000_000,
    ]
    first = bhp[0]
    digest16 = first["trade_id"].split(":")[0]
    assert first["message_id"] == f"ASX:BHP:trade:{digest16}:1"
    assert first["trade_id"] == f"{digest16}:1"
    assert (first["exchange"], first["asset_class"], first["currency"]) == (
        "ASX",
        "equities",
        "AUD",
    )
    assert (first["side"], first["provenance"], first["source_sequence"]) == (
        "UNKNOWN",
        "batch",
        None,
    )
    assert first["trade_conditions"] == ["3"]
    assert first["price"] == Decimal("37.70") and first["quantity"] == Decimal(500)
    assert first["vendor_data"] == '{"company_id":"7078","venue":"X","qualifiers":"3"}'
    assert bhp[2]["vendor_data"] == '{"company_id":"7078","venue":"X","buyer_id":"1234"}'
    cba = [r for r in rows(wh, "trades") if r["symbol"] == "CBA"]
    assert len(cba) == 2


def test_absent_quote_sides_are_null(cfg: Config, vendor: Path, wh: Warehouse) -> None:
    load(cfg, vendor)

    quotes = rows(wh, "quotes", ("platform_sequence",))
    sides = [
        (
            r["platform_sequence"],
            r["bid_price"],
            r["bid_quantity"],
            r["ask_price"],
            r["ask_quantity"],
        )
        for r in quotes
    ]
    assert sides[:3] == [
        (1, Decimal("37.73"), Decimal(19), Decimal("37.73"), Decimal(600)),
        (2, None, None, Decimal("37.80"), Decimal(600)),
        (3, Decimal("37.50"), Decimal(100), None, None),
    ]
    assert [us(r["timestamp"]) for r in quotes][3:] == [
        1_396_587_600_000_000,  # 04/04/2014 16:00 AEDT
        1_396_828_799_999_000,  # 04/07/2014 09:59:59.999 AEST
        1_412_550_000_000_000,  # 10/06/2014 10:00 AEDT
    ]


def test_bad_rows_are_dead_letters_with_file_line_and_reason(
    cfg: Config, vendor: Path, wh: Warehouse
) -> None:
    summary = load(cfg, vendor)

    trades_file = str((vendor / "trades" / "7078.csv").resolve())
    quotes_file = str((vendor / "quotes" / "7078.csv").resolve())
    dead = rows(wh, "dead_letters", ("source", "line"))
    assert [(d["source"], d["line"], d["reason"]) for d in dead] == [
        (quotes_file, 7, "field_count"),
        (quotes_file, 8, "non_positive"),
        (trades_file, 11, "field_count"),
        (trades_file, 12, "invalid_number"),
        (trades_file, 13, "bad_date"),
        (trades_file, 14, "negative_price"),
    ]
    assert dead[3]["raw"] == b"03/10/2014,10:07:00.000,37.5x,100,,X,"
    assert {d["exchange"] for d in dead} == {"ASX"}
    bhp = next(f for f in summary.files if f.path.name == "7078.csv" and f.kind == "trades")
    assert (bhp.rows, bhp.dead_letters) == (len(BHP_TRADE_LINES), 4)


# --- idempotency ------------------------------------------------------------------------


def test_loading_the_same_files_again_adds_nothing_and_says_so(
    cfg: Config, vendor: Path, wh: Warehouse
) -> None:
    load(cfg, vendor)
    before = snapshot_ids(wh)
    (vendor / "trades" / "copy").mkdir()
    shutil.copy(vendor / "trades" / "1500.csv", vendor / "trades" / "copy" / "1500.csv")

    again = load(cfg, vendor)

    assert again.ok
    assert again.count("loaded") == 0 and again.count("skipped") == 4
    assert again.rows == {"trades": 0, "quotes": 0, "dead_letters": 0}
    assert snapshot_ids(wh) == before
    assert len(rows(wh, "trades")) == N_TRADES
    assert len(rows(wh, "quotes")) == N_QUOTES
    assert len(rows(wh, "dead_letters")) == N_DEAD
    text = again.format()
    assert "4 skipped (already loaded)" in text
    assert "loaded as " + str((vendor / "trades" / "7078.csv").resolve()) in text


def test_each_batch_commit_records_its_files_by_content_hash(
    cfg: Config, vendor: Path, wh: Warehouse
) -> None:
    load(cfg, vendor, quotes=[])

    props = wh.snapshot_properties("trades")
    assert sorted(json.loads(props[BATCH_FILES]).values()) == sorted(
        str((vendor / "trades" / name).resolve()) for name in ("1500.csv", "7078.csv")
    )


def test_a_crash_between_dead_letters_and_rows_reloads_exactly_once(
    cfg: Config, vendor: Path, wh: Warehouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_append_files = Warehouse.append_files

    def crash_on_trades(self: Warehouse, table: str, *args: Any) -> Any:
        if table == "trades":
            raise OSError("disk gone")
        return real_append_files(self, table, *args)

    # Dead letters commit through Warehouse.append, the rows' data files through this.
    monkeypatch.setattr(Warehouse, "append_files", crash_on_trades)
    first = load(cfg, vendor)
    monkeypatch.undo()

    assert not first.ok
    assert {f.status for f in first.files} == {"failed"}
    assert "commit failed: OSError: disk gone" in first.format()
    assert len(rows(wh, "dead_letters")) == 4
    again = load(cfg, vendor)
    assert again.ok and again.count("loaded") == 3
    assert len(rows(wh, "trades")) == N_TRADES
    assert len(rows(wh, "dead_letters")) == N_DEAD


def test_a_history_cut_by_snapshot_expiry_still_finds_loaded_files(
    cfg: Config, vendor: Path, wh: Warehouse
) -> None:
    load(cfg, vendor, quotes=[])
    table = wh.load_table("trades")
    batch_snapshot = table.current_snapshot()
    assert batch_snapshot is not None
    wh.append("trades", live_trades(1, 3), live_props(1, 3))
    wh.load_table("trades").maintenance.expire_snapshots().by_id(
        batch_snapshot.snapshot_id
    ).commit()

    again = load(cfg, vendor, quotes=[])

    assert again.count("skipped") == 2
    assert all("rows already in table" in f.detail for f in again.files)
    assert len(rows(wh, "trades")) == N_TRADES + 3


def test_a_file_of_only_bad_rows_is_loaded_once_and_an_empty_one_is_reported(
    cfg: Config, vendor: Path, wh: Warehouse
) -> None:
    odd = vendor / "odd"
    odd.mkdir()
    (odd / "7078.csv").write_text(
        "03/10/2014,10:00:00.000,x,1,,,\n02/30/2014,10:00:00.000,1,1,,,\n"
    )
    (odd / "1500.csv").write_text("\n")

    first = load(cfg, vendor, trades=[odd], quotes=[])
    again = load(cfg, vendor, trades=[odd], quotes=[])

    assert [(f.path.name, f.status, f.rows, f.dead_letters) for f in first.files] == [
        ("1500.csv", "empty", 0, 0),
        ("7078.csv", "loaded", 0, 2),
    ]
    assert [(f.path.name, f.status) for f in again.files] == [
        ("1500.csv", "empty"),
        ("7078.csv", "skipped"),
    ]
    assert [d["reason"] for d in rows(wh, "dead_letters", ("line",))] == [
        "invalid_number",
        "bad_date",
    ]
    assert rows(wh, "trades") == []


def test_files_over_the_size_limit_or_of_the_wrong_kind_fail_alone(
    cfg: Config, vendor: Path, wh: Warehouse
) -> None:
    summary = load(
        cfg,
        vendor,
        trades=[vendor / "trades" / "7078.csv", vendor / "quotes" / "7078.csv"],
        quotes=[],
        options=LoadOptions(max_file_bytes=500, max_bad_rows=3),
    )

    assert [(f.path.parent.name, f.status) for f in summary.files] == [
        ("trades", "failed"),
        ("quotes", "failed"),
    ]
    assert "more than the limit of 500" in summary.files[0].detail
    assert "more than 3 rows with the wrong field count" in summary.files[1].detail
    assert rows(wh, "trades") == [] and rows(wh, "dead_letters") == []


# --- a file read in slices ---------------------------------------------------------------


def long_trades_file(path: Path, n: int, bad: dict[int, str]) -> None:
    """n lines of BHP trades over three days, in time order; `bad` replaces some lines."""
    lines = []
    for i in range(1, n + 1):
        day, minute = 10 + i * 3 // (n + 1), i % 360
        line = f"03/{day:02d}/2014,{10 + minute // 60:02d}:{minute % 60:02d}:00.000,{i},1,,X,"
        lines.append(bad.get(i, line))
    path.write_text("\n".join(lines) + "\n")


def parquet_files(cfg: Config, table: str) -> list[Path]:
    return [p for p in cfg.storage.data_path().rglob("*.parquet") if f"/{table}/" in str(p)]


def test_a_file_read_in_slices_loads_what_it_holds_in_sorted_files_of_one_day(
    cfg: Config, vendor: Path, wh: Warehouse
) -> None:
    big = vendor / "big"
    big.mkdir()
    long_trades_file(
        big / "7078.csv", 3000, {7: "03/10/2014,x", 2500: "03/12/2014,10:00:00,0,1,,,"}
    )
    whole = batchload.asx.parse_trades(
        (big / "7078.csv").read_bytes(),
        symbol="BHP",
        company_id="7078",
        digest="0" * 64,
        source="x",
        ingested_at=0,
    )

    summary = load(
        cfg, vendor, trades=[big], quotes=[], options=LoadOptions(slice_bytes=4096, write_rows=500)
    )

    assert summary.ok and summary.rows == {"trades": 2998, "quotes": 0, "dead_letters": 2}
    loaded = rows(wh, "trades", ("platform_sequence",))
    assert [r["platform_sequence"] for r in loaded] == whole.table.column(
        "platform_sequence"
    ).to_pylist()
    assert [r["price"] for r in loaded] == whole.table.column("price").to_pylist()
    assert [(d["line"], d["reason"]) for d in rows(wh, "dead_letters", ("line",))] == [
        (7, "field_count"),
        (2500, "non_positive"),
    ]
    days = set()
    for f in parquet_files(cfg, "trades"):
        data = pa.parquet.read_table(f)
        stamps = data.column("timestamp").to_pylist()
        assert stamps == sorted(stamps)
        assert len({t.date() for t in stamps}) == 1
        days |= {t.date() for t in stamps}
    # Partitions are UTC days: a Sydney trading day (10:00-16:00 AEDT) spans two of them.
    assert len(days) == 4


def test_a_file_refused_after_rows_were_written_leaves_no_data_file(
    cfg: Config, vendor: Path, wh: Warehouse
) -> None:
    big = vendor / "big"
    big.mkdir()
    bad = dict.fromkeys(range(2990, 3001), "03/10/2014,10:00:00.000,1")
    long_trades_file(big / "7078.csv", 3000, bad)

    summary = load(
        cfg,
        vendor,
        trades=[big],
        quotes=[],
        options=LoadOptions(slice_bytes=4096, write_rows=500, max_bad_rows=10),
    )

    assert [f.status for f in summary.files] == ["failed"]
    assert "more than 10 rows with the wrong field count" in summary.files[0].detail
    assert rows(wh, "trades") == []
    assert parquet_files(cfg, "trades") == []


def test_a_file_that_changes_while_it_is_read_fails_and_leaves_nothing(
    cfg: Config, vendor: Path, wh: Warehouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = vendor / "big"
    big.mkdir()
    path = big / "7078.csv"
    long_trades_file(path, 3000, {})
    real_slices = batchload.asx.slices

    def slices_while_appending(fh: Any, size: int) -> Iterator[bytes]:
        for i, piece in enumerate(real_slices(fh, size)):
            if i == 1:
                with path.open("a") as f:
                    f.write("03/13/2014,10:00:00.000,1,1,,,\n")
            yield piece

    monkeypatch.setattr(batchload.asx, "slices", slices_while_appending)
    summary = load(
        cfg, vendor, trades=[big], quotes=[], options=LoadOptions(slice_bytes=4096, write_rows=500)
    )

    assert [(f.status, f.detail) for f in summary.files] == [
        ("failed", "the file changed while it was read")
    ]
    assert rows(wh, "trades") == []
    assert parquet_files(cfg, "trades") == []


# --- beside the daemon -------------------------------------------------------------------


def test_batch_commits_leave_the_daemons_resume_state_alone(
    cfg: Config, vendor: Path, wh: Warehouse
) -> None:
    wh.append("trades", live_trades(1, 5), live_props(1, 5))
    before = wh.k2_state()

    load(cfg, vendor)

    assert wh.k2_state() == before
    props = wh.snapshot_properties("trades")
    assert BATCH_FILES in props
    assert WATERMARKS not in props and LOG_POSITION not in props


def test_a_load_beside_a_live_writer_loses_no_commit(
    cfg: Config, vendor: Path, wh: Warehouse
) -> None:
    (vendor / "trades" / "copy").mkdir()
    for i in range(10):
        (vendor / "trades" / "copy" / f"{i}.csv").write_text(
            f"03/10/2014,10:00:00.000,{i + 1},1,,,\n"
        )
    with (vendor / "company_info.csv").open("a") as f:
        f.writelines(f"{i},S{i},Company {i},,,\n" for i in range(10))
    stop = threading.Event()
    flushes: list[int] = []
    errors: list[BaseException] = []

    def live_writer() -> None:
        # A daemon flushing every 20 ms, far more often than its default 2 s.
        try:
            with Warehouse(cfg.storage, cfg.writer) as live:
                while not stop.is_set() or len(flushes) < 10:
                    flush = len(flushes) + 1
                    batch = live_trades(flush * 10, 10)
                    # The daemon's writer retries a conflicting commit until it lands.
                    live.append("trades", batch, live_props(flush, flush * 10 + 9), retries=None)
                    flushes.append(flush)
                    time.sleep(0.02)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=live_writer)
    thread.start()
    try:
        summary = load(cfg, vendor, options=LoadOptions(commit_rows=1))
    finally:
        stop.set()
        thread.join(timeout=60)

    assert errors == []
    assert summary.ok and summary.count("loaded") == 13
    trades = rows(wh, "trades")
    assert sum(1 for r in trades if r["exchange"] == "ASX") == N_TRADES + 10
    assert sum(1 for r in trades if r["exchange"] == "BINANCE") == 10 * len(flushes)
    state = wh.k2_state()
    assert state.flush == flushes[-1]
    assert state.watermarks["BINANCE:BTCUSDT:trade"].last_sequence == flushes[-1] * 10 + 9


def test_two_loads_on_one_data_dir_do_not_run_at_once(cfg: Config, vendor: Path) -> None:
    lock = cfg.storage.data_path() / "load.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(LoadError, match="another k2d load is running"):
            load(cfg, vendor)


# --- instruments -------------------------------------------------------------------------


def test_instruments_are_upserted_by_company_id(cfg: Config, vendor: Path, wh: Warehouse) -> None:
    first = load(cfg, vendor, trades=[], quotes=[])
    info = vendor / "company_info.csv"
    info.write_text(
        info.read_text().replace("Commonwealth Bank of Australia, Ltd", "CBA Ltd")
        + "2222,WBC,Westpac Banking Corporation,AU000000WBC1,2000-01-04,2020-06-30\n"
    )

    second = load(cfg, vendor, trades=[], quotes=[])
    snapshot = snapshot_ids(wh)[INSTRUMENTS]
    third = load(cfg, vendor, trades=[], quotes=[])

    assert first.instruments_changed and second.instruments_changed
    assert not third.instruments_changed
    assert snapshot_ids(wh)[INSTRUMENTS] == snapshot
    got = [
        (r["company_id"], r["symbol"], r["name"], r["isin"], r["valid_from"], r["valid_to"])
        for r in rows(wh, INSTRUMENTS, ("company_id",))
    ]
    assert [(g[0], g[1], g[2]) for g in got] == [
        ("1500", "CBA", "CBA Ltd"),
        ("2222", "WBC", "Westpac Banking Corporation"),
        ("7078", "BHP", "BHP Billiton Limited"),
    ]
    assert got[1][3:] == ("AU000000WBC1", datetime(2000, 1, 4).date(), datetime(2020, 6, 30).date())
    assert got[2][4:] == (datetime(2000, 1, 2).date(), None)
    assert {r["exchange"] for r in rows(wh, INSTRUMENTS)} == {"ASX"}


# --- command line ------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="k2d load asx")
    batchload.add_arguments(parser)
    return batchload.run_from_args(parser.parse_args(argv))


def test_an_unknown_company_fails_its_file_and_the_others_load(
    cfg: Config, vendor: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\ndata_dir = "{cfg.storage.data_dir}"\n')

    code = run_cli(
        [
            "--config",
            str(config),
            "--trades",
            str(vendor / "unknown"),
            str(vendor / "trades"),
            "--quotes",
            str(vendor / "quotes"),
            "--company-info",
            str(vendor / "company_info.csv"),
        ]
    )

    out, err = capsys.readouterr()
    assert code == 1
    assert "3 files loaded, 0 skipped (already loaded), 0 empty, 1 failed" in out
    assert f"failed: trades {vendor / 'unknown' / '9999.csv'}: unknown company id '9999'" in out
    assert err == ""  # no progress line when stderr is not a terminal
    with Warehouse(cfg.storage) as w:
        assert len(rows(w, "trades")) == N_TRADES


def test_a_missing_path_is_a_usage_error(
    vendor: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n')

    code = run_cli(
        [
            "--config",
            str(config),
            "--trades",
            str(vendor / "nope"),
            "--company-info",
            str(vendor / "company_info.csv"),
        ]
    )

    assert code == 2
    assert "nope: no such file or directory" in capsys.readouterr().err


def test_progress_shows_files_rows_and_rate() -> None:
    stream = io.StringIO()
    progress = Progress(4, stream)

    progress.advance(files=1, rows=1_500)
    progress.close()

    lines = stream.getvalue().split("\r")
    assert lines[1].startswith("1/4 files  1,500 rows  ")
    assert "rows/s" in lines[1] and stream.getvalue().endswith("\n")


# --- OHLCV: pure Python over the CSV == DuckDB over the table's Parquet files -------------


Bar = tuple[Decimal, Decimal, Decimal, Decimal, Decimal, int]


def ohlcv_from_csv(path: Path) -> dict[int, Bar]:
    """1-minute bars straight from a vendor trades file, skipping the rows a loader rejects."""
    events: list[tuple[int, int, Decimal, Decimal]] = []
    with path.open(newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if len(row) != 7:
                continue
            try:
                local = datetime.strptime(f"{row[0]} {row[1]}", "%m/%d/%Y %H:%M:%S.%f")
                price, qty = Decimal(row[2]), Decimal(row[3])
            except (ValueError, InvalidOperation):
                continue
            if price <= 0 or qty <= 0:
                continue
            events.append((us(local.replace(tzinfo=TIMEZONE)), line, price, qty))
    bars: dict[int, list[tuple[int, int, Decimal, Decimal]]] = {}
    for ev in sorted(events):
        bars.setdefault(ev[0] // 60_000_000 * 60_000_000, []).append(ev)
    return {
        minute: (
            evs[0][2],
            max(e[2] for e in evs),
            min(e[2] for e in evs),
            evs[-1][2],
            sum((e[3] for e in evs), Decimal(0)),
            len(evs),
        )
        for minute, evs in bars.items()
    }


def ohlcv_from_duckdb(wh: Warehouse, symbol: str) -> dict[int, Bar]:
    files = [
        t.file.file_path.removeprefix("file://")
        for t in wh.load_table("trades").scan().plan_files()
    ]
    sql = """
        SELECT epoch_us("timestamp") // 60000000 * 60000000 AS minute,
               first(price ORDER BY "timestamp", platform_sequence),
               max(price), min(price),
               last(price ORDER BY "timestamp", platform_sequence),
               sum(CAST(quantity AS DECIMAL(38, 8))), count(*)
        FROM read_parquet(?) WHERE symbol = ? GROUP BY minute ORDER BY minute
    """
    with duckdb.connect() as con:
        result = con.execute(sql, [files, symbol]).fetchall()
    return {r[0]: (r[1], r[2], r[3], r[4], r[5], r[6]) for r in result}


def test_one_minute_ohlcv_from_the_csv_matches_duckdb_over_the_loaded_table(
    cfg: Config, vendor: Path, wh: Warehouse
) -> None:
    load(cfg, vendor)

    for company, symbol in (("7078", "BHP"), ("1500", "CBA")):
        expected = ohlcv_from_csv(vendor / "trades" / f"{company}.csv")
        assert ohlcv_from_duckdb(wh, symbol) == expected
    # The 10:05 bar of 03/10/2014 holds three trades, two in the same millisecond: the
    # open is the first in file order.
    bar = ohlcv_from_duckdb(wh, "BHP")[1_394_406_300_000_000]
    assert bar == (
        Decimal("37.51"),
        Decimal("37.52"),
        Decimal("37.49"),
        Decimal("37.49"),
        Decimal(41250),
        3,
    )
