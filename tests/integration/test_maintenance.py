"""Maintenance on real Iceberg tables: compaction, expiry, retention, the Maintainer actor."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import duckdb
import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyiceberg.io.pyarrow import PyArrowFileIO

from actors.maintenance import Maintainer
from k2d.config import MaintenanceConfig, StorageConfig
from k2d.messages import Committed, Watermark
from k2d.model import SequenceEvent, Trade
from k2d.runtime import Outbox
from k2d.storage import (
    MAINTENANCE,
    FilesReplaced,
    ManifestMemo,
    TableMaintenance,
    Warehouse,
    events_to_arrow,
    flush_properties,
    trades_to_arrow,
)
from k2d.telemetry.metrics import Metrics

DAY_US = 86_400_000_000
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
POSITION_KEY = "journal:feed-binance@0"


def day_start_us(days_ago: int) -> int:
    today = datetime.now(UTC).date() - timedelta(days=days_ago)
    return int(datetime(today.year, today.month, today.day, tzinfo=UTC).timestamp()) * 1_000_000


def trades(first: int, n: int, day_us: int, rng: random.Random) -> list[Trade]:
    out = []
    for i in range(first, first + n):
        symbol = SYMBOLS[i % len(SYMBOLS)]
        out.append(
            Trade(
                message_id=f"BINANCE:{symbol}:trade:{i}",
                trade_id=str(i),
                symbol=symbol,
                exchange="BINANCE",
                asset_class="crypto",
                # Spread over the day, out of order across commits: compaction must sort.
                timestamp=day_us + rng.randrange(DAY_US - 1),
                price=f"{100 + rng.randrange(10_000) / 100:.2f}",
                quantity=f"{rng.randrange(1, 1_000) / 1_000:.3f}",
                currency="USDT",
                side="BUY" if i % 2 else "SELL",
                trade_conditions=("x",) if i % 5 == 0 else None,
                source_sequence=i,
                ingestion_timestamp=day_us + i,
                platform_sequence=i,
            )
        )
    return out


def state_props(flush: int) -> dict[str, str]:
    return flush_properties(
        flush=flush,
        tables=["trades"],
        watermarks={
            "BINANCE:BTCUSDT:trade": Watermark(
                last_sequence=flush * 10, platform_sequence=flush * 10, last_seen_us=flush
            )
        },
        log_position={POSITION_KEY: {"segment": 3, "offset": flush * 1_000}},
        batch_ids=[flush],
    )


class Feeder:
    """Appends trades like the writer does: one commit per flush, with k2 state."""

    def __init__(self, wh: Warehouse, seed: int = 7) -> None:
        self.wh = wh
        self.rng = random.Random(seed)
        self.next_id = 0
        self.flush = 0

    def append(self, days_ago: int, rows: int) -> None:
        self.flush += 1
        data = trades_to_arrow(trades(self.next_id, rows, day_start_us(days_ago), self.rng))
        self.next_id += rows
        self.wh.append("trades", data, state_props(self.flush))

    def fill(self, commits: int = 40, rows: int = 300, days: Iterable[int] = (3, 2)) -> None:
        cycle = list(days)
        for k in range(commits):
            self.append(cycle[k % len(cycle)], rows)


@pytest.fixture
def storage(tmp_path: Path) -> StorageConfig:
    return StorageConfig(data_dir=str(tmp_path), sqlite_busy_timeout_ms=20_000)


@pytest.fixture
def wh(storage: StorageConfig) -> Iterator[Warehouse]:
    with Warehouse(storage) as w:
        w.ensure_tables()
        yield w


def maintenance_cfg(**kw: Any) -> MaintenanceConfig:
    return msgspec.convert({"orphan_file_age": 0.0} | kw, MaintenanceConfig)


def message_ids(wh: Warehouse, snapshot_id: int | None = None) -> list[str]:
    scan = wh.load_table("trades").scan(selected_fields=("message_id",), snapshot_id=snapshot_id)
    return sorted(scan.to_arrow().column("message_id").to_pylist())


def live_files(wh: Warehouse, name: str = "trades") -> dict[str, list[str]]:
    """Data file paths of the current snapshot, by partition path."""
    out: dict[str, list[str]] = {}
    for task in wh.load_table(name).scan().plan_files():
        path = task.file.file_path.removeprefix("file://")
        out.setdefault("/".join(Path(path).parts[-3:-1]), []).append(path)
    return out


def planned_paths(wh: Warehouse, snapshot_id: int | None = None) -> list[str]:
    scan = wh.load_table("trades").scan(snapshot_id=snapshot_id)
    return [t.file.file_path.removeprefix("file://") for t in scan.plan_files()]


def ohlcv(paths: list[str]) -> list[tuple[Any, ...]]:
    """What a query reading a snapshot's planned files answers."""
    with duckdb.connect() as con:
        return con.execute(
            "SELECT symbol, count(*), min(price), max(price), "
            "sum(CAST(price AS DECIMAL(38, 8)) * quantity), min(timestamp), max(timestamp) "
            "FROM read_parquet($1) GROUP BY symbol ORDER BY symbol",
            [paths],
        ).fetchall()


def referenced_files(wh: Warehouse, name: str = "trades") -> set[str]:
    """Every manifest list, manifest and live data file of every snapshot left."""
    table = wh.load_table(name)
    found: set[str] = set()
    for s in table.metadata.snapshots:
        found.add(s.manifest_list)
        for m in s.manifests(table.io):
            found.add(m.manifest_path)
            for e in m.fetch_manifest_entry(table.io, discard_deleted=True):
                found.add(e.data_file.file_path)
    return {p.removeprefix("file://") for p in found}


def files_on_disk(tmp_path: Path, name: str = "trades") -> set[str]:
    root = tmp_path / "warehouse" / "market" / name
    return {
        str(p)
        for p in root.rglob("*")
        if p.is_file() and (p.suffix == ".parquet" or p.suffix == ".avro")
    }


def test_compaction_keeps_every_row_in_fewer_sorted_files(wh: Warehouse) -> None:
    feeder = Feeder(wh)
    feeder.fill(commits=40, rows=300, days=(3, 2))
    feeder.fill(commits=5, rows=50, days=(0,))  # today's partition: the writer's, left alone
    ids_before = message_ids(wh)
    files_before = live_files(wh)
    announced: list[FilesReplaced] = []

    report = TableMaintenance(wh, maintenance_cfg()).run(
        ["trades"], on_replace=announced.append, expire=False
    )

    assert report.errors == []
    assert message_ids(wh) == ids_before
    assert len(ids_before) == 40 * 300 + 5 * 50
    files_after = live_files(wh)
    today = (datetime.now(UTC).date()).isoformat()
    for part, paths in files_after.items():
        if today in part:
            assert sorted(paths) == sorted(files_before[part])
        else:
            assert len(files_before[part]) == 20
            assert len(paths) == 1
            rows = pq.read_table(paths[0])
            keys = list(
                zip(
                    rows.column("symbol").to_pylist(),
                    rows.column("timestamp").to_pylist(),
                    rows.column("source_sequence").to_pylist(),
                    strict=True,
                )
            )
            assert keys == sorted(keys)
    assert [(c.files_before, c.files_after, c.rows) for c in report.compactions] == [
        (20, 1, 6_000),
        (20, 1, 6_000),
    ]
    assert [(m.operation, len(m.removed), len(m.added)) for m in announced] == [
        ("replace", 20, 1),
        ("replace", 20, 1),
    ]
    summaries = [s.summary for s in wh.load_table("trades").snapshots()[-2:]]
    assert [s.operation.value for s in summaries if s] == ["replace", "replace"]
    assert all(s.additional_properties[MAINTENANCE] == "replace" for s in summaries if s)


def test_compaction_writes_row_groups_of_the_tables_row_group_limit(wh: Warehouse) -> None:
    with wh.load_table("trades").transaction() as tx:
        tx.set_properties({"write.parquet.row-group-limit": "1000"})
    Feeder(wh).fill(commits=20, rows=300, days=(3,))

    report = TableMaintenance(wh, maintenance_cfg()).run(["trades"], expire=False)

    assert [(c.files_after, c.rows) for c in report.compactions] == [(1, 6_000)]
    ((path,),) = live_files(wh).values()
    meta = pq.ParquetFile(path).metadata
    groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert groups == [1_000] * 6


def test_a_compaction_sorting_a_range_at_a_time_writes_the_rows_in_the_tables_order(
    wh: Warehouse,
) -> None:
    with wh.load_table("trades").transaction() as tx:
        tx.set_properties({"write.parquet.row-group-limit": "1000"})
    Feeder(wh).fill(commits=20, rows=300, days=(3,))
    order = [("symbol", "ascending"), ("timestamp", "ascending"), ("source_sequence", "ascending")]
    expected = wh.load_table("trades").scan().to_arrow().sort_by(order).to_pylist()

    # 2,000 rows a symbol: each is sorted in several time ranges of about 300 rows.
    report = TableMaintenance(wh, maintenance_cfg(sort_chunk_rows=300)).run(
        ["trades"], expire=False
    )

    assert report.errors == []
    assert [(c.files_after, c.rows) for c in report.compactions] == [(1, 6_000)]
    ((path,),) = live_files(wh).values()
    written = pq.ParquetFile(path)
    assert written.read().to_pylist() == expected
    meta = written.metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [1_000] * 6
    # The flushes were sorted into temporary files first (_clustered); none is left behind.
    assert list((wh.cfg.data_path() / "tmp" / "maintenance").iterdir()) == []


def test_a_compaction_removes_the_temporary_files_of_one_killed_mid_way(wh: Warehouse) -> None:
    Feeder(wh).fill(commits=4, rows=50, days=(3,))
    tmp = wh.cfg.data_path() / "tmp" / "maintenance"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        for pid in (gone.pid, running.pid):
            (tmp / f"clustered-{pid}").mkdir(parents=True)
            (tmp / f"clustered-{pid}" / "part.parquet").write_bytes(b"PAR1")

        report = TableMaintenance(wh, maintenance_cfg()).run(["trades"], expire=False)

        assert report.errors == []
        assert [c.files_before for c in report.compactions] == [4]
        assert sorted(p.name for p in tmp.iterdir()) == [f"clustered-{running.pid}"]
    finally:
        running.kill()
        running.wait()


def test_compaction_of_a_table_without_message_ids_sorts_by_time(wh: Warehouse) -> None:
    rng = random.Random(3)
    for k in range(8):
        day = day_start_us(3 - k % 2)
        events = [
            SequenceEvent(
                event_id=f"gap-{k}-{i}",
                exchange="BINANCE",
                symbol="BTCUSDT",
                stream="trade",
                partition=0,
                kind="gap",
                status="open",
                first_missing=i,
                last_missing=i,
                missing_count=1,
                detected_at=day + rng.randrange(DAY_US - 1),
                recorded_at=day + i,
            )
            for i in range(25)
        ]
        wh.append("sequence_events", events_to_arrow(events), state_props(k + 1))
    before = wh.load_table("sequence_events").scan().to_arrow()

    report = TableMaintenance(wh, maintenance_cfg()).run(["sequence_events"], expire=False)

    assert report.errors == []
    assert len(report.compactions) == 2
    after = wh.load_table("sequence_events").scan().to_arrow()
    assert sorted(after.column("event_id").to_pylist()) == sorted(
        before.column("event_id").to_pylist()
    )
    for task in wh.load_table("sequence_events").scan().plan_files():
        detected = pq.read_table(task.file.file_path.removeprefix("file://")).column("detected_at")
        assert detected.to_pylist() == sorted(detected.to_pylist())


def test_time_travel_works_until_expiry_which_deletes_only_unreferenced_files(
    wh: Warehouse, tmp_path: Path
) -> None:
    feeder = Feeder(wh)
    feeder.fill(commits=40, rows=300, days=(3, 2))
    old_snapshot = wh.load_table("trades").current_snapshot()
    assert old_snapshot is not None
    old_ids = message_ids(wh)
    old_paths = planned_paths(wh)
    TableMaintenance(wh, maintenance_cfg()).run(["trades"], expire=False)
    feeder.append(0, 10)  # the writer goes on

    # Snapshots are young: an expiry now keeps the old one and its files.
    kept = TableMaintenance(wh, maintenance_cfg()).expire("trades")
    assert kept.snapshots_expired == 0
    assert message_ids(wh, old_snapshot.snapshot_id) == old_ids
    assert all(Path(p).exists() for p in old_paths)

    later = time.time() + 30 * 86_400
    expiry = TableMaintenance(
        wh, maintenance_cfg(min_snapshots_to_keep=1, orphan_file_age=86_400.0), clock=lambda: later
    ).expire("trades")

    table = wh.load_table("trades")
    # The current snapshot, and its parent: where undoing the newest flush would go back to.
    assert len(table.metadata.snapshots) == 2
    assert table.metadata.snapshot_by_id(old_snapshot.snapshot_id) is None
    assert expiry.data_files_deleted == 40
    assert not any(Path(p).exists() for p in old_paths)
    # Every file a remaining snapshot references exists; nothing else is left behind.
    referenced = referenced_files(wh)
    assert all(Path(p).exists() for p in referenced)
    assert files_on_disk(tmp_path) == referenced
    assert len(message_ids(wh)) == len(old_ids) + 10


@pytest.mark.parametrize("writer_process", ["same", "other"])
def test_a_writer_appending_during_compaction_loses_nothing(
    wh: Warehouse, storage: StorageConfig, writer_process: str
) -> None:
    Feeder(wh).fill(commits=24, rows=300, days=(3, 2, 0))
    # "same": the daemon's writer (same Warehouse, its own thread, commit lock shared);
    # "other": a writer in another process (its own catalog view), met by conflict retries.
    writer_wh = wh if writer_process == "same" else Warehouse(storage)
    writer = Feeder(writer_wh, seed=11)
    writer.next_id = 1_000_000
    writer.flush = 1_000
    done = threading.Event()
    retries: list[int] = []

    def keep_appending() -> None:
        # Into today's partition, which the compaction below (before=tomorrow) rewrites too;
        # the last append comes after the compaction's commits.
        while True:
            finished = done.is_set()
            rows = trades(writer.next_id, 100, day_start_us(0), writer.rng)
            writer.next_id += 100
            writer.flush += 1
            result = writer_wh.append("trades", trades_to_arrow(rows), state_props(writer.flush))
            retries.append(result.retries)
            if finished and len(retries) >= 10:
                return
            time.sleep(0.05 if writer_process == "same" else 0.2)

    ids_before = message_ids(wh)
    thread = threading.Thread(target=keep_appending)
    thread.start()
    try:
        tomorrow = datetime.now(UTC).date() + timedelta(days=1)
        report = TableMaintenance(wh, maintenance_cfg()).run(
            ["trades"], before=tomorrow, expire=False
        )
    finally:
        done.set()
        thread.join(timeout=60)
        if writer_wh is not wh:
            writer_wh.close()

    assert report.errors == []
    assert len(report.compactions) == 3
    appended = [f"BINANCE:{SYMBOLS[i % 3]}:trade:{i}" for i in range(1_000_000, writer.next_id)]
    assert message_ids(wh) == sorted(ids_before + appended)
    # The rows appended while today's partition was rewritten are still in their own files.
    assert sum(len(p) for p in live_files(wh).values()) > 3
    if writer_process == "other":
        # The two processes met: a commit waited for the other's turn, or, having not
        # waited, found the table moved and retried.
        met = writer_wh.commit_turn("trades").waits + wh.commit_turn("trades").waits
        assert met + sum(retries) + sum(c.retries for c in report.compactions) > 0
    assert wh.k2_state().log_position == {
        POSITION_KEY: {"segment": 3, "offset": writer.flush * 1_000}
    }


def test_expiry_keeps_a_snapshot_someone_tagged_and_expires_the_rest(wh: Warehouse) -> None:
    Feeder(wh).fill(commits=40, rows=50, days=(3,))
    table = wh.load_table("trades")
    tagged = table.metadata.snapshots[5]
    ids_then = message_ids(wh, tagged.snapshot_id)
    # A tag another engine (or a user) put on an old snapshot: the heads of tags and branches
    # are not expired, and the expiry of everything else goes on.
    table.manage_snapshots().create_tag(tagged.snapshot_id, "audit-2024").commit()
    later = time.time() + 30 * 86_400

    expiry = TableMaintenance(
        wh, maintenance_cfg(min_snapshots_to_keep=1), clock=lambda: later
    ).expire("trades")

    left = {s.snapshot_id for s in wh.load_table("trades").metadata.snapshots}
    assert tagged.snapshot_id in left
    assert expiry.snapshots_expired == 40 - len(left)
    assert len(left) <= 3  # the tagged one, the current one and its parent
    assert message_ids(wh, tagged.snapshot_id) == ids_then


# Expiry with nothing kept for its age: every snapshot but the newest few (and the resume
# state's) is expired at once; orphans are left to a sweep a day away.
def expiry_cfg(**kw: Any) -> MaintenanceConfig:
    return maintenance_cfg(
        **{
            "snapshot_retention_days": 0.0,
            "snapshot_full_history": 0.0,
            "min_snapshots_to_keep": 5,
            "orphan_file_age": 86_400.0,
        }
        | kw
    )


@pytest.mark.parametrize("remembered", [4, 10_000])
def test_expiry_remembering_manifests_deletes_what_reading_them_all_deletes(
    tmp_path: Path, remembered: int
) -> None:
    # Twin tables fed and maintained alike, round after round: one's expiry reads every
    # manifest each time (0 remembered), the other's remembers them (4: fewer than a round
    # reads, so some are forgotten and read again).
    cfg = expiry_cfg(min_snapshots_to_keep=1, open_file_age=0.0)
    done: dict[int, list[tuple[int, int, int, int]]] = {}
    for size in (0, remembered):
        data_dir = tmp_path / str(size)
        with Warehouse(StorageConfig(data_dir=str(data_dir))) as wh:
            wh.ensure_tables()
            feeder = Feeder(wh)
            memo = ManifestMemo(size)
            done[size] = []
            for round_ in range(4):
                feeder.fill(commits=8, rows=60, days=(3, 2, 0))

                report = TableMaintenance(wh, cfg, manifests=memo).run(
                    ["trades"], compact_open=True
                )

                assert report.errors == []
                if round_ == 1:
                    # A tag on a compaction's snapshot keeps it, and the files it removed
                    # (deleted entries of its manifests) still go once nothing lists them live.
                    table = wh.load_table("trades")
                    tagged = table.current_snapshot()
                    assert tagged is not None and tagged.summary is not None
                    assert tagged.summary.additional_properties[MAINTENANCE] == "replace"
                    table.manage_snapshots().create_tag(tagged.snapshot_id, "audit").commit()
                # Nothing a remaining snapshot references is gone, and nothing else is left.
                assert files_on_disk(data_dir) == referenced_files(wh)
                done[size] += [
                    (
                        e.snapshots_expired,
                        e.data_files_deleted,
                        e.manifests_deleted,
                        e.manifest_lists_deleted,
                    )
                    for e in report.expiries
                ]

    assert done[remembered] == done[0]
    assert sum(d[1] for d in done[0]) > 0  # compaction's inputs, once expired
    assert sum(d[2] for d in done[0]) > 0


def test_an_expiry_round_reads_only_the_manifests_new_since_the_last(
    wh: Warehouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    feeder = Feeder(wh)
    feeder.fill(commits=20, rows=50, days=(3, 2))
    TableMaintenance(wh, maintenance_cfg(max_manifests=1)).run(["trades"], expire=False)
    reads: list[str] = []
    new_input = PyArrowFileIO.new_input

    def counted(io: PyArrowFileIO, location: str) -> Any:
        if location.endswith(".avro"):
            reads.append(location.removeprefix("file://"))
        return new_input(io, location)

    monkeypatch.setattr(PyArrowFileIO, "new_input", counted)
    memo = ManifestMemo(10_000)

    def expire(memo: ManifestMemo) -> set[str]:
        reads.clear()
        TableMaintenance(wh, expiry_cfg(), manifests=memo).expire("trades")
        return set(reads)

    first = expire(memo)
    feeder.fill(commits=6, rows=50, days=(2,))
    second = expire(memo)
    third = expire(memo)  # nothing new, nothing to expire; the orphan sweep still asks
    without = expire(ManifestMemo(0))

    snapshots = wh.load_table("trades").metadata.snapshots
    assert {s.manifest_list.removeprefix("file://") for s in snapshots[-5:]} <= second
    # Read again: only the manifests (and their lists) this round deleted, read whole to
    # find the data files only they name.
    assert first & second
    assert not any(Path(p).exists() for p in first & second)
    assert third == set()
    # What is remembered is what the table references: deleted files are forgotten.
    referenced = {p for p in referenced_files(wh) if p.endswith(".avro")}
    assert len(memo) == len(referenced)
    # Forgetting everything, a round reads every list and manifest the table references.
    assert without == referenced


def test_the_manifest_memo_remembers_at_most_its_size(wh: Warehouse) -> None:
    Feeder(wh).fill(commits=20, rows=50, days=(3, 2))
    small, large = ManifestMemo(3), ManifestMemo(10_000)

    for memo in (small, large):
        TableMaintenance(wh, maintenance_cfg(orphan_file_age=86_400.0), manifests=memo).expire(
            "trades"
        )

    assert len(small) == 3
    assert len(large) == len([p for p in referenced_files(wh) if p.endswith(".avro")]) == 40


def test_k2_state_survives_compaction_and_expiry(wh: Warehouse) -> None:
    Feeder(wh).fill(commits=40, rows=100, days=(3, 2))
    before = wh.k2_state()
    assert before.log_position == {POSITION_KEY: {"segment": 3, "offset": 40_000}}

    TableMaintenance(wh, maintenance_cfg(max_manifests=1)).run(["trades"], expire=False)
    after_compaction = wh.k2_state()
    later = time.time() + 30 * 86_400
    TableMaintenance(wh, maintenance_cfg(min_snapshots_to_keep=1), clock=lambda: later).expire(
        "trades"
    )
    after_expiry = wh.k2_state()

    table = wh.load_table("trades")
    current = table.current_snapshot()
    assert current is not None and current.summary is not None
    assert current.summary.additional_properties[MAINTENANCE] == "rewrite_manifests"
    for state in (after_compaction, after_expiry):
        assert state.watermarks == before.watermarks
        assert state.log_position == before.log_position
        assert state.flush == before.flush
        assert state.complete


def test_a_flush_cut_short_is_still_undone_after_compaction_and_expiry(wh: Warehouse) -> None:
    feeder = Feeder(wh)
    feeder.fill(commits=40, rows=50, days=(3, 2))
    ids = message_ids(wh)
    # Flush 41 was for trades and quotes; a crash came before the quotes commit.
    rows = trades(feeder.next_id, 50, day_start_us(0), feeder.rng)
    torn = flush_properties(
        flush=41,
        tables=["trades", "quotes"],
        watermarks={},
        log_position={POSITION_KEY: {"segment": 3, "offset": 41_000}},
        batch_ids=[41],
    )
    wh.append("trades", trades_to_arrow(rows), torn)
    assert not wh.k2_state().complete

    report = TableMaintenance(wh, maintenance_cfg(max_manifests=1)).run(["trades"], expire=False)
    later = time.time() + 30 * 86_400
    TableMaintenance(wh, maintenance_cfg(min_snapshots_to_keep=1), clock=lambda: later).expire(
        "trades"
    )
    rolled = wh.roll_back_incomplete_flush()

    assert len(report.compactions) == 2
    assert rolled == ["trades"]
    state = wh.k2_state()
    assert state.complete
    assert state.log_position == {POSITION_KEY: {"segment": 3, "offset": 40_000}}
    assert message_ids(wh) == ids


def test_a_query_during_compaction_answers_as_before(wh: Warehouse) -> None:
    Feeder(wh).fill(commits=40, rows=300, days=(3, 2))
    paths = planned_paths(wh)
    expected = ohlcv(paths)
    answers: list[list[tuple[Any, ...]]] = []
    result: list[Any] = []

    thread = threading.Thread(
        target=lambda: result.append(
            TableMaintenance(wh, maintenance_cfg()).run(["trades"], expire=False)
        )
    )
    thread.start()
    while thread.is_alive() or not answers:
        answers.append(ohlcv(paths))  # a query planned before the compaction
    thread.join()

    assert result[0].errors == []
    assert len(result[0].compactions) == 2
    assert all(a == expected for a in answers)
    new_paths = planned_paths(wh)
    assert len(new_paths) == 2
    assert ohlcv(new_paths) == expected


def test_a_rewrite_that_loses_a_row_is_not_committed(
    wh: Warehouse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Feeder(wh).fill(commits=8, rows=100, days=(3,))
    snapshot_before = wh.load_table("trades").current_snapshot()
    assert snapshot_before is not None
    original = TableMaintenance._write_files

    def lossy(self: TableMaintenance, batches: Iterable[pa.RecordBatch], *args: Any) -> Any:
        def drop_one() -> Iterator[pa.RecordBatch]:
            it = iter(batches)
            yield next(it).slice(1)
            yield from it

        return original(self, drop_one(), *args)

    monkeypatch.setattr(TableMaintenance, "_write_files", lossy)
    report = TableMaintenance(wh, maintenance_cfg()).run(["trades"], expire=False)

    assert report.compactions == []
    assert [(op, table) for op, table, _ in report.errors] == [("compaction", "trades")]
    assert "checksums" in report.errors[0][2]
    current = wh.load_table("trades").current_snapshot()
    assert current is not None
    assert current.snapshot_id == snapshot_before.snapshot_id
    assert not [p for p in files_on_disk(tmp_path) if "compact-" in p]


def test_retention_drops_old_partitions_and_manifests_are_merged(wh: Warehouse) -> None:
    feeder = Feeder(wh)
    feeder.fill(commits=12, rows=50, days=(3, 2, 0))
    announced: list[FilesReplaced] = []

    report = TableMaintenance(
        wh, maintenance_cfg(data_retention_days={"trades": 1.0}, max_manifests=1)
    ).run(["trades"], on_replace=announced.append, expire=False)

    assert report.errors == []
    assert [(r.partitions, r.files, r.rows) for r in report.retentions] == [(2, 8, 400)]
    assert [(m.operation, len(m.removed), len(m.added)) for m in announced] == [("delete", 8, 0)]
    assert len(message_ids(wh)) == 4 * 50
    assert report.stats[0].manifests == 1
    assert report.manifest_rewrites["trades"][1] == 1


async def test_maintainer_runs_on_schedule_announces_commits_and_stops(wh: Warehouse) -> None:
    Feeder(wh).fill(commits=12, rows=100, days=(3, 2))
    metrics = Metrics()
    stop = anyio.Event()
    maintainer = Maintainer(
        wh, maintenance_cfg(first_round_after=0.0, interval=3_600.0), metrics, stop=stop
    )
    send, receive = anyio.create_memory_object_stream[Committed](16)

    async def run() -> None:
        with anyio.fail_after(30):
            await maintainer.run(None, Outbox("maintainer.outbox", send))
            send.close()

    got: list[Committed] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        with anyio.fail_after(30):
            got.append(await receive.receive())
            got.append(await receive.receive())
            while maintainer.last_report is None:
                await anyio.sleep(0.01)
        stop.set()

    assert [(c.table, c.batch_ids, len(c.files), c.rows) for c in got] == [
        ("trades", (), 1, 600),
        ("trades", (), 1, 600),
    ]
    table = wh.load_table("trades")
    assert got[-1].snapshot_id == table.current_snapshot().snapshot_id  # type: ignore[union-attr]
    sample = metrics.registry.get_sample_value
    assert sample("k2d_table_data_files", {"table": "trades"}) == 2
    assert sample("k2d_maintenance_rows_rewritten_total", {"table": "trades"}) == 1_200
    assert sample("k2d_table_snapshots", {"table": "trades"}) == 14
    assert sample(
        "k2d_maintenance_last_duration_seconds", {"operation": "compaction", "table": "trades"}
    )


async def test_between_rounds_the_maintainer_expires_snapshots(wh: Warehouse) -> None:
    Feeder(wh).fill(commits=12, rows=100, days=(3, 2))
    metrics = Metrics()
    stop = anyio.Event()
    offset = [0.0]
    maintainer = Maintainer(
        wh,
        maintenance_cfg(
            first_round_after=0.0, interval=3_600.0, expiry_interval=0.1, min_snapshots_to_keep=1
        ),
        metrics,
        stop=stop,
        clock=lambda: time.time() + offset[0],
    )
    send, _receive = anyio.create_memory_object_stream[Committed](16)
    sample = metrics.registry.get_sample_value
    async with anyio.create_task_group() as tg:
        tg.start_soon(maintainer.run, None, Outbox("maintainer.outbox", send))
        with anyio.fail_after(30):
            while maintainer.last_report is None:
                await anyio.sleep(0.01)
            assert sample("k2d_table_snapshots", {"table": "trades"}) == 14
            offset[0] = 30 * 86_400.0  # a month later, without another full round
            while sample("k2d_table_snapshots", {"table": "trades"}) == 14:
                await anyio.sleep(0.01)
        stop.set()

    # Left: the two compactions, the writer's last commit (the resume state) and its parent.
    assert sample("k2d_maintenance_snapshots_expired_total", {"table": "trades"}) == 10
    assert sample("k2d_table_snapshots", {"table": "trades"}) == 4
    assert sample("k2d_maintenance_files_compacted_total", {"table": "trades"}) == 12
    assert len(maintainer.last_report.compactions) == 2


async def test_run_now_stops_at_a_safe_point_when_asked(wh: Warehouse) -> None:
    Feeder(wh).fill(commits=8, rows=100, days=(3, 2))
    stop = anyio.Event()
    stop.set()
    maintainer = Maintainer(wh, maintenance_cfg(), Metrics(), stop=stop)

    report = await maintainer.run_now("trades")

    assert report.aborted
    assert report.compactions == []
    assert len(wh.load_table("trades").metadata.snapshots) == 8


def test_k2d_compact_cli_on_a_data_dir(wh: Warehouse, tmp_path: Path) -> None:
    Feeder(wh).fill(commits=10, rows=100, days=(3, 2))
    wh.close()
    workdir = tmp_path / "cwd"
    workdir.mkdir()

    proc = subprocess.run(
        [sys.executable, "-m", "k2d.compact", "--data-dir", str(tmp_path), "--table", "trades"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert proc.returncode == 0, proc.stderr
    assert "2 partitions compacted" in proc.stdout
    assert "5 files" in proc.stdout
    with Warehouse(StorageConfig(data_dir=str(tmp_path))) as again:
        assert sum(len(p) for p in live_files(again).values()) == 2
        assert len(message_ids(again)) == 1_000


def test_k2d_compact_before_admits_todays_partition(wh: Warehouse, tmp_path: Path) -> None:
    Feeder(wh).fill(commits=6, rows=50, days=(0,))
    wh.close()
    tomorrow = (date.today() + timedelta(days=2)).isoformat()

    proc = subprocess.run(
        [sys.executable, "-m", "k2d.compact", "--data-dir", str(tmp_path), "--before", tomorrow],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert proc.returncode == 0, proc.stderr
    assert "1 partitions compacted" in proc.stdout


def partition_files(wh: Warehouse, days_ago: int) -> list[str]:
    day = (datetime.now(UTC).date() - timedelta(days=days_ago)).isoformat()
    return [p for part, paths in live_files(wh).items() if day in part for p in paths]


def test_todays_partition_is_compacted_in_size_tiers_and_keeps_every_row(wh: Warehouse) -> None:
    feeder = Feeder(wh)
    feeder.fill(commits=6, rows=200, days=(2,))  # a closed day: not an open-partition job
    closed_before = sorted(partition_files(wh, 2))
    feeder.append(0, 200)
    flush_file = Path(partition_files(wh, 0)[0]).stat().st_size
    # Tier 0 holds files below twice a flush file; each tier above is 4 times wider.
    cfg = maintenance_cfg(
        open_file_age=0.0, open_tier_fanout=4, open_tier_base_bytes=2 * flush_file
    )
    maintenance = TableMaintenance(wh, cfg)
    counts = []
    for _ in range(12):
        for _ in range(5):
            feeder.append(0, 200)
        report = maintenance.run(["trades"], compact=False, compact_open=True, expire=False)
        assert report.errors == []
        counts.append(len(partition_files(wh, 0)))

    assert len(message_ids(wh)) == len(set(message_ids(wh))) == (6 + 1 + 60) * 200
    assert sorted(partition_files(wh, 2)) == closed_before
    # 61 flushes into today's partition, yet after a round no tier (of the four that 61
    # flush files span) holds more than fanout files: fanout - 1 left, plus a merge's output.
    assert max(counts) <= 4 * 4, counts
    for path in partition_files(wh, 0):
        rows = pq.read_table(path, columns=["symbol", "timestamp", "source_sequence"])
        keys = list(zip(*(rows.column(i).to_pylist() for i in range(3)), strict=True))
        assert keys == sorted(keys)


def test_files_younger_than_open_file_age_are_left_to_the_writer(wh: Warehouse) -> None:
    Feeder(wh).fill(commits=8, rows=100, days=(0,))
    before = sorted(partition_files(wh, 0))
    cfg = maintenance_cfg(open_file_age=600.0)

    report = TableMaintenance(wh, cfg).run(["trades"], compact=False, compact_open=True)
    assert report.compactions == []
    assert sorted(partition_files(wh, 0)) == before

    later = TableMaintenance(wh, cfg, clock=lambda: time.time() + 601.0)
    report = later.run(["trades"], compact=False, compact_open=True, expire=False)
    assert [(c.files_before, c.files_after, c.rows) for c in report.compactions] == [(8, 1, 800)]
    assert len(message_ids(wh)) == 800


async def test_between_rounds_the_maintainer_compacts_todays_partition(wh: Warehouse) -> None:
    stop = anyio.Event()
    maintainer = Maintainer(
        wh,
        maintenance_cfg(
            first_round_after=0.0, interval=3_600.0, expiry_interval=0.1, open_file_age=0.0
        ),
        Metrics(),
        stop=stop,
    )
    send, receive = anyio.create_memory_object_stream[Committed](16)
    async with anyio.create_task_group() as tg:
        tg.start_soon(maintainer.run, None, Outbox("maintainer.outbox", send))
        with anyio.fail_after(30):
            while (
                maintainer.last_report is None
            ):  # the full round is done; the next is an hour away
                await anyio.sleep(0.01)
            await anyio.to_thread.run_sync(lambda: Feeder(wh).fill(commits=8, rows=100, days=(0,)))
            got = await receive.receive()
            while len(partition_files(wh, 0)) >= 4:
                await anyio.sleep(0.05)
        stop.set()

    assert (got.table, got.batch_ids) == ("trades", ())
    assert len(message_ids(wh)) == len(set(message_ids(wh))) == 800
