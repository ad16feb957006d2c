"""Table maintenance on a Warehouse: compaction, snapshot expiry, manifest rewrite, retention.

Blocking throughout (pyiceberg, DuckDB, Parquet): callers run it in a worker thread.

Every commit here is one snapshot that copies the k2.* properties of the newest snapshot
carrying them (read again on every attempt), so the resume state survives maintenance. A
commit conflict (the writer appended meanwhile) is retried on fresh metadata with backoff.
Compaction removes exactly the files it read and adds files holding exactly their rows,
checked by row count and checksums before the commit; rows appended meanwhile, even to the
same partition, are left alone. Replaced files stay on disk until the snapshots that list
them expire, so a query planned on an older snapshot still reads its files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import shutil
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Container, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from opentelemetry import trace
from pyarrow.fs import FileSelector, FileSystem, FileType
from pyiceberg.exceptions import CommitFailedException, ValidationException
from pyiceberg.io import FileIO

# Private pyiceberg API: 0.12 has neither a public rewrite (compaction) operation nor a
# file writer that rolls over at a size. An overwrite that names the files it removes, its
# snapshot marked "replace", is exactly a rewrite; the Parquet writing mirrors write_file.
from pyiceberg.io.pyarrow import (
    PyArrowFileIO,
    _get_parquet_writer_kwargs,
    compute_statistics_plan,
    data_file_statistics_from_parquet_metadata,
    parquet_path_to_id_mapping,
    schema_to_pyarrow,
)
from pyiceberg.manifest import (
    DataFile,
    DataFileContent,
    FileFormat,
    ManifestContent,
    ManifestFile,
)
from pyiceberg.partitioning import PartitionFieldValue, PartitionKey
from pyiceberg.table import Table, TableProperties, Transaction
from pyiceberg.table.snapshots import Operation, Snapshot, Summary, ancestors_of
from pyiceberg.table.update.snapshot import (
    _ManifestMergeManager,
    _OverwriteFiles,
    _SnapshotProducer,
)
from pyiceberg.transforms import DayTransform
from pyiceberg.typedef import EMPTY_DICT, Record
from pyiceberg.utils.properties import property_as_int

from k2d.allocators import give_back_memory
from k2d.config import MaintenanceConfig
from k2d.messages import DataFileInfo
from k2d.model import now_us
from k2d.runtime import Backoff
from k2d.storage._schemas import (
    DEAD_LETTERS,
    ROW_GROUP_ROWS,
    SEQUENCE_EVENTS,
    TABLE_NAMES,
    TABLES,
)
from k2d.storage._state import FLUSH, LOG_POSITION, WATERMARKS
from k2d.storage._warehouse import (
    MAINTENANCE_PROPERTY,
    UNDONE_FLUSH,
    MemoTransaction,
    Warehouse,
    _file_info,
    _own_snapshot,
    lane_states,
)

__all__ = [
    "MAINTENANCE",
    "Compaction",
    "CompactionAborted",
    "Expiry",
    "FilesReplaced",
    "MaintenanceReport",
    "ManifestMemo",
    "Retention",
    "TableMaintenance",
    "TableStats",
]

log = logging.getLogger(__name__)

# Snapshot property naming the maintenance operation that wrote a snapshot.
MAINTENANCE = MAINTENANCE_PROPERTY
_DAY_US = 86_400_000_000
_DAY_MS = 86_400_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A file at least this share of target_file_bytes is not small: compaction leaves it alone.
_SMALL_FILE_SHARE = 0.75
# Row groups of the temporary sorted files (_clustered): small, so a range skips the others.
_CLUSTER_ROW_GROUP = 4_096
# The column whose checksum proves a rewrite kept every row (besides a whole-row checksum).
_KEY_COLUMN = {SEQUENCE_EVENTS: "event_id", DEAD_LETTERS: "received_at"}


class FilesReplaced(msgspec.Struct, frozen=True, kw_only=True):
    """Maintenance committed `snapshot_id` of `table`: `removed` files left the table and
    `added` ones joined it. operation "replace" keeps the rows (compaction); "delete"
    drops them (retention). Removed files stay readable until their snapshots expire."""

    table: str
    snapshot_id: int
    operation: str
    removed: tuple[DataFileInfo, ...]
    added: tuple[DataFileInfo, ...]
    committed_at: int


class CompactionAborted(Exception):
    """A rewrite would not have kept the partition's rows (or the files changed): no commit."""


@dataclass(frozen=True)
class Compaction:
    """One partition rewritten in one replace commit."""

    table: str
    partition: dict[str, Any]
    snapshot_id: int
    files_before: int
    files_after: int
    bytes_before: int
    bytes_after: int
    rows: int
    seconds: float
    retries: int


@dataclass(frozen=True)
class Expiry:
    """Snapshots expired from one table and the files only they referenced, now deleted."""

    table: str
    snapshots_expired: int
    snapshots_left: int
    data_files_deleted: int
    manifests_deleted: int
    manifest_lists_deleted: int
    orphans_deleted: int
    seconds: float


@dataclass(frozen=True)
class Retention:
    """Partitions older than the table's data retention, dropped in one commit."""

    table: str
    snapshot_id: int
    partitions: int
    files: int
    rows: int


@dataclass(frozen=True)
class TableStats:
    """What planning a query on the current snapshot has to go through."""

    table: str
    data_files: int
    data_bytes: int
    records: int
    manifests: int
    snapshots: int


@dataclass
class MaintenanceReport:
    """What one maintenance round did, per table; errors are per operation and table."""

    compactions: list[Compaction] = field(default_factory=list)
    expiries: list[Expiry] = field(default_factory=list)
    retentions: list[Retention] = field(default_factory=list)
    manifest_rewrites: dict[str, tuple[int, int]] = field(default_factory=dict)
    stats: list[TableStats] = field(default_factory=list)
    # (operation, table, what went wrong)
    errors: list[tuple[str, str, str]] = field(default_factory=list)
    # (operation, table) -> seconds the operation took in this round.
    durations: dict[tuple[str, str], float] = field(default_factory=dict)
    aborted: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-able, for an admin endpoint."""
        return {
            "compactions": [dataclasses.asdict(c) for c in self.compactions],
            "expiries": [dataclasses.asdict(e) for e in self.expiries],
            "retentions": [dataclasses.asdict(r) for r in self.retentions],
            "manifest_rewrites": {t: list(v) for t, v in self.manifest_rewrites.items()},
            "stats": [dataclasses.asdict(s) for s in self.stats],
            "errors": [{"operation": o, "table": t, "detail": d} for o, t, d in self.errors],
            "durations": [
                {"operation": o, "table": t, "seconds": v} for (o, t), v in self.durations.items()
            ],
            "aborted": self.aborted,
        }

    def lines(self) -> list[str]:
        """A human account, one line per thing done."""
        out = []
        for r in self.retentions:
            out.append(
                f"{r.table}: retention dropped {r.partitions} partitions "
                f"({r.files} files, {r.rows} rows), snapshot {r.snapshot_id}"
            )
        for c in self.compactions:
            part = " ".join(f"{k}={v}" for k, v in c.partition.items())
            out.append(
                f"{c.table} {part}: {c.files_before} files ({_mb(c.bytes_before)}) -> "
                f"{c.files_after} ({_mb(c.bytes_after)}), {c.rows} rows, "
                f"snapshot {c.snapshot_id}, {c.seconds:.2f}s"
            )
        for table, (before, after) in self.manifest_rewrites.items():
            out.append(f"{table}: manifests {before} -> {after}")
        for e in self.expiries:
            if not (e.snapshots_expired or e.orphans_deleted):
                continue
            out.append(
                f"{e.table}: expired {e.snapshots_expired} snapshots ({e.snapshots_left} left); "
                f"deleted {e.data_files_deleted} data files, {e.manifests_deleted} manifests, "
                f"{e.manifest_lists_deleted} manifest lists, {e.orphans_deleted} orphans"
            )
        for s in self.stats:
            out.append(
                f"{s.table}: {s.records} rows in {s.data_files} files ({_mb(s.data_bytes)}), "
                f"{s.manifests} manifests, {s.snapshots} snapshots"
            )
        out.extend(f"error: {table} {op}: {detail}" for op, table, detail in self.errors)
        if self.aborted:
            out.append("stopped before the round was complete")
        return out


def _mb(n: int) -> str:
    return f"{n / 1_048_576:.1f} MB"


@dataclass(frozen=True)
class _PartitionFiles:
    """The live files of one partition of a table's current snapshot."""

    spec_id: int
    partition: Record
    day: int
    files: tuple[DataFile, ...]


class _ReplaceFiles(_OverwriteFiles):
    """An overwrite of named files whose snapshot says `replace`: same rows, other files."""

    def _summary(self, snapshot_properties: dict[str, str] = EMPTY_DICT) -> Summary:
        # pyiceberg computes totals for append/overwrite/delete only; they are the same here.
        summary = super()._summary(snapshot_properties)
        return Summary(operation=Operation.REPLACE, **summary.additional_properties)


class _RewriteManifests(_SnapshotProducer["_RewriteManifests"]):
    """A `replace` snapshot with the same files, its data manifests merged into few."""

    def _deleted_entries(self) -> list[Any]:
        return []

    def _existing_manifests(self) -> list[ManifestFile]:
        parent = self._transaction.table_metadata.snapshot_by_id(self._parent_snapshot_id or -1)
        if parent is None:
            return []
        return [
            m
            for m in parent.manifests(io=self._io)
            if m.has_added_files() or m.has_existing_files()
        ]

    def _process_manifests(self, manifests: list[ManifestFile]) -> list[ManifestFile]:
        data = [m for m in manifests if m.content == ManifestContent.DATA]
        deletes = [m for m in manifests if m.content != ManifestContent.DATA]
        merger = _ManifestMergeManager(
            target_size_bytes=8 * 1024 * 1024,
            min_count_to_merge=2,
            merge_enabled=True,
            snapshot_producer=self,
        )
        return merger.merge_manifests(data) + deletes

    def _summary(self, snapshot_properties: dict[str, str] = EMPTY_DICT) -> Summary:
        summary = super()._summary(snapshot_properties)
        return Summary(operation=Operation.REPLACE, **summary.additional_properties)


def _state_snapshots(table: Table) -> Iterator[tuple[Snapshot, dict[str, str]]]:
    """Ancestors of the current snapshot whose k2 state the reader would use, newest first
    (as Warehouse._latest_state: a flush undone by a later snapshot does not count)."""
    undone: set[str] = set()
    for snapshot in ancestors_of(table.current_snapshot(), table.metadata):
        props = snapshot.summary.additional_properties if snapshot.summary else {}
        if UNDONE_FLUSH in props:
            undone.add(props[UNDONE_FLUSH])
            continue
        if (WATERMARKS in props or LOG_POSITION in props) and props.get(FLUSH, "0") not in undone:
            yield snapshot, props


def carried_properties(table: Table) -> dict[str, str]:
    """The k2.* properties of the newest snapshot with k2 state: a maintenance commit copies
    them, so the resume state stays on the table's newest snapshots."""
    for _, props in _state_snapshots(table):
        return {
            k: v
            for k, v in props.items()
            if k.startswith("k2.") and k not in (MAINTENANCE, UNDONE_FLUSH)
        }
    return {}


def _state_chain(table: Table) -> list[int]:
    """The current snapshot's ancestors down to the oldest of the snapshots in which each
    lane (each member sharing the table) committed its newest state, and its parent: what
    reading (or undoing) the resume state walks through.

    Expiring one of them would cut the chain (pyiceberg clears the parent id of a snapshot
    whose parent it removes), and the state, or the commit a crash cut short, would be out
    of reach. A table without k2 state needs only its current snapshot."""
    name = table.name()[-1]
    pending: set[int] = set()
    for member, (state, snap) in lane_states(table, name).items():
        snap = snap or _own_snapshot(table, member, state.flush)
        if snap is not None:
            pending.add(snap.snapshot_id)
    if not pending:
        current = table.current_snapshot()
        return [current.snapshot_id] if current is not None else []
    chain: list[int] = []
    for snapshot in ancestors_of(table.current_snapshot(), table.metadata):
        chain.append(snapshot.snapshot_id)
        if not pending:
            break  # the parent of the oldest
        pending.discard(snapshot.snapshot_id)
    return chain


def _day_index(table: Table, spec_id: int) -> int | None:
    spec = table.metadata.specs()[spec_id]
    for i, f in enumerate(spec.fields):
        if isinstance(f.transform, DayTransform):
            return i
    return None


def _day_label(day: int) -> str:
    return (date(1970, 1, 1) + timedelta(days=day)).isoformat()


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class TableMaintenance:
    """Compaction, expiry, manifest rewrite and retention for the tables of a Warehouse.

    `clock` (seconds since the epoch) decides which partitions are closed and which
    snapshots are old; `abort`, once set, stops work at the next safe point (no commit).
    Each rewrite (compaction, retention, manifest merge) and each expiry is a span.
    """

    def __init__(
        self,
        warehouse: Warehouse,
        cfg: MaintenanceConfig,
        *,
        clock: Callable[[], float] = time.time,
        abort: threading.Event | None = None,
        tracer: trace.Tracer | None = None,
        manifests: ManifestMemo | None = None,
    ) -> None:
        """`manifests` outlives this object when its owner runs round after round (the
        Maintainer): what it remembers spares each round reading the same manifests."""
        self._wh = warehouse
        self._cfg = cfg
        self._clock = clock
        self._abort = abort or threading.Event()
        self._tracer = tracer or trace.get_tracer("k2d")
        self._manifests = (
            manifests if manifests is not None else ManifestMemo(cfg.remembered_manifests)
        )

    def run(
        self,
        tables: Sequence[str] = TABLE_NAMES,
        *,
        before: date | None = None,
        on_replace: Callable[[FilesReplaced], None] | None = None,
        compact: bool = True,
        compact_open: bool = False,
        expire: bool = True,
        sweep_orphans: bool = True,
    ) -> MaintenanceReport:
        """One round over `tables`: retention, compaction, manifest rewrite, expiry, stats.
        `compact` covers closed partitions, `compact_open` the size tiers of open ones.

        A failing operation is logged and reported; the round goes on with the next one.
        """
        report = MaintenanceReport()
        for name in tables:
            steps: list[tuple[str, Callable[[str, MaintenanceReport], None]]] = []
            if compact:
                steps.append(("retention", lambda n, r: self._retention_step(n, r, on_replace)))
            if compact or compact_open:
                steps.append(
                    (
                        "compaction",
                        lambda n, r: self._compaction_step(
                            n, r, before, on_replace, closed=compact, open_partitions=compact_open
                        ),
                    )
                )
                steps.append(("manifests", self._manifest_step))
            if expire:
                steps.append(
                    ("expiry", lambda n, r: r.expiries.append(self.expire(n, sweep_orphans)))
                )
            for op, step in steps:
                if self._abort.is_set():
                    report.aborted = True
                    return report
                start = time.perf_counter()
                try:
                    step(name, report)
                except CompactionAborted as exc:
                    if self._abort.is_set():
                        report.aborted = True
                        return report
                    report.errors.append((op, name, str(exc)))
                    log.error("%s: %s aborted: %s", name, op, exc)
                except Exception as exc:
                    report.errors.append((op, name, repr(exc)))
                    log.exception("%s: %s failed", name, op)
                report.durations[(op, name)] = time.perf_counter() - start
            try:
                report.stats.append(self.stats(name))
            except Exception as exc:
                report.errors.append(("stats", name, repr(exc)))
                log.exception("%s: stats failed", name)
        if report.compactions or report.retentions:
            give_back_memory()
        return report

    def _retention_step(
        self,
        name: str,
        report: MaintenanceReport,
        on_replace: Callable[[FilesReplaced], None] | None,
    ) -> None:
        days = self._cfg.data_retention_days.get(name, 0.0)
        if days > 0:
            done = self.drop_old_partitions(name, days, on_replace)
            if done is not None:
                report.retentions.append(done)

    def _compaction_step(
        self,
        name: str,
        report: MaintenanceReport,
        before: date | None,
        on_replace: Callable[[FilesReplaced], None] | None,
        *,
        closed: bool = True,
        open_partitions: bool = False,
    ) -> None:
        plans = self.plan_compaction(
            name, before=before, closed=closed, open_partitions=open_partitions
        )
        for part in plans:
            if self._abort.is_set():
                report.aborted = True
                return
            try:
                report.compactions.append(self.compact_partition(name, part, on_replace))
            except CompactionAborted as exc:
                if self._abort.is_set():
                    report.aborted = True
                    return
                # One partition's failed check does not stop the others.
                report.errors.append(("compaction", name, str(exc)))
                log.error("%s: compaction of day %s aborted: %s", name, _day_label(part.day), exc)

    def _manifest_step(self, name: str, report: MaintenanceReport) -> None:
        done = self.rewrite_manifests(name)
        if done is not None:
            report.manifest_rewrites[name] = done

    # Commits

    def _commit(
        self, name: str, operation: str, build: Callable[[Transaction, dict[str, str]], None]
    ) -> tuple[Table, int]:
        """Commit what `build` stages, with the k2 properties of the moment; retry conflicts
        on fresh metadata. Returns the committed table and the conflicts retried."""
        cfg = self._cfg
        backoff = Backoff(cfg.commit_backoff_initial, cfg.commit_backoff_max)
        while True:
            with self._exclusive(name):
                table = self._wh.load_table(name)
                props = carried_properties(table) | {MAINTENANCE: operation}
                try:
                    tx = MemoTransaction(table)
                    build(tx, props)
                    tx.commit_transaction()
                    return table, backoff.attempt
                except CommitFailedException as exc:
                    if backoff.attempt >= cfg.commit_retries:
                        raise
                    failure = exc
            delay = backoff.next_delay()
            log.info("%s: %s conflicted (%s), retry in %.2fs", name, operation, failure, delay)
            time.sleep(delay)
            if self._abort.is_set():
                raise CompactionAborted("stopped while retrying a commit")

    @contextlib.contextmanager
    def _exclusive(self, name: str) -> Iterator[None]:
        """Hold the Warehouse's commit lock of `name` while a maintenance commit is built and
        made: the writer of this process waits for it instead of racing it (a writer that
        commits back to back would otherwise win every time). Other processes are met by
        conflict retries. The writer's cached table is dropped, so it reloads instead of
        running into a conflict."""
        # Package-private: the lock and the cache belong to Warehouse.append.
        lock = self._wh._locks.get(name)
        with lock if lock is not None else contextlib.nullcontext():
            try:
                with self._wh.commit_turn(name):
                    yield
            finally:
                self._wh._tables.pop(name, None)

    def _replace(
        self,
        name: str,
        operation: Operation,
        removed: Sequence[DataFile],
        added: Sequence[DataFile],
    ) -> tuple[Table, int]:
        def build(tx: Transaction, props: dict[str, str]) -> None:
            producer_type = _ReplaceFiles if operation is Operation.REPLACE else _OverwriteFiles
            producer = producer_type(
                operation=Operation.OVERWRITE if operation is Operation.REPLACE else operation,
                transaction=tx,
                io=tx._table.io,
                snapshot_properties=props,
            )
            with producer:
                for f in removed:
                    producer.delete_data_file(f)
                for f in added:
                    producer.append_data_file(f)

        return self._commit(name, operation.value, build)

    # Compaction

    def plan_compaction(
        self,
        name: str,
        *,
        before: date | None = None,
        closed: bool = True,
        open_partitions: bool = False,
    ) -> list[_PartitionFiles]:
        """Partitions of `name` worth rewriting: closed (or before `before`, today included
        when `before` is later), with at least min_files_to_compact small files. With
        `open_partitions`, also the full size tiers of the partitions not closed (those
        still being written; see `_open_tiers`)."""
        table = self._wh.load_table(name)
        snapshot = table.current_snapshot()
        if snapshot is None:
            return []
        small_below = self._cfg.target_file_bytes * _SMALL_FILE_SHARE
        if before is not None:
            limit_day = (before - date(1970, 1, 1)).days
        else:
            closed_before_us = int((self._clock() - self._cfg.closed_partition_age) * 1e6)
            # Day d is closed when it ended ((d + 1) days after the epoch) before that.
            limit_day = closed_before_us // _DAY_US
        manifests = snapshot.manifests(table.io)
        if any(m.content != ManifestContent.DATA for m in manifests):
            # Rows deleted by delete files would come back in rewritten files. k2d's
            # committers never write delete files; whoever did, compaction stays away.
            log.warning("%s: has delete files; not compacted", name)
            return []
        groups: dict[tuple[int, Record], list[tuple[DataFile, int | None]]] = {}
        for manifest in manifests:
            for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
                f = entry.data_file
                if f.content == DataFileContent.DATA and f.file_size_in_bytes < small_below:
                    groups.setdefault((f.spec_id, f.partition), []).append((f, entry.snapshot_id))
        plans = []
        for (spec_id, partition), entries in groups.items():
            index = _day_index(table, spec_id)
            if index is None or partition[index] is None:
                continue
            day = int(partition[index])
            if day < limit_day:
                if closed and len(entries) >= self._cfg.min_files_to_compact:
                    files = tuple(f for f, _ in entries)
                    plans.append(_PartitionFiles(spec_id, partition, day, files))
            elif open_partitions:
                for files in self._open_tiers(table, entries):
                    plans.append(_PartitionFiles(spec_id, partition, day, files))
        plans.sort(key=lambda p: p.day)
        return plans

    def _open_tiers(
        self, table: Table, entries: list[tuple[DataFile, int | None]]
    ) -> list[tuple[DataFile, ...]]:
        """Size-tiered compaction of a partition still being written (today's), so that its
        file count stays small all day instead of growing by a file per flush. Files
        committed at least open_file_age ago are put in tiers by size (each tier
        open_tier_fanout times the one below, from open_tier_base_bytes); a tier holding
        at least open_tier_fanout files is merged into one file, which lands in a higher
        tier. A day's rows are thus rewritten about log(files) times, and the partition
        holds about fanout - 1 files per tier plus the files of the last open_file_age.
        The newest flushes are left alone: they are what a restart after a crash may still
        roll back, and rewriting seconds-old files every pass would be churn."""
        cfg = self._cfg
        fanout = cfg.open_tier_fanout
        settled_before_ms = int((self._clock() - cfg.open_file_age) * 1000)
        tiers: dict[int, list[DataFile]] = {}
        for f, snapshot_id in entries:
            added = table.metadata.snapshot_by_id(snapshot_id) if snapshot_id else None
            # A file whose snapshot has expired is older than any age that matters here.
            if added is not None and added.timestamp_ms > settled_before_ms:
                continue
            tier, bound = 0, cfg.open_tier_base_bytes
            while f.file_size_in_bytes >= bound:
                tier, bound = tier + 1, bound * fanout
            tiers.setdefault(tier, []).append(f)
        return [tuple(files) for _, files in sorted(tiers.items()) if len(files) >= fanout]

    def compact_partition(
        self,
        name: str,
        part: _PartitionFiles,
        on_replace: Callable[[FilesReplaced], None] | None = None,
    ) -> Compaction:
        """Rewrite one partition's files sorted into files near target_file_bytes, and
        commit the swap once row count and checksums of old and new files agree."""
        attributes: dict[str, str | int] = {
            "db.system": "iceberg",
            "k2d.table": name,
            "k2d.partition.day": _day_label(part.day),
            "k2d.files_before": len(part.files),
            "k2d.bytes_before": sum(f.file_size_in_bytes for f in part.files),
        }
        with self._tracer.start_as_current_span(
            "maintenance.compact", attributes=attributes
        ) as span:
            result = self._compact_partition(name, part, on_replace)
            span.set_attributes(
                {
                    "k2d.files_after": result.files_after,
                    "k2d.bytes_after": result.bytes_after,
                    "k2d.rows": result.rows,
                    "k2d.snapshot_id": result.snapshot_id,
                    "k2d.retries": result.retries,
                }
            )
            return result

    def _compact_partition(
        self,
        name: str,
        part: _PartitionFiles,
        on_replace: Callable[[FilesReplaced], None] | None,
    ) -> Compaction:
        start = time.perf_counter()
        table = self._wh.load_table(name)
        io = table.io
        written: list[DataFile] = []
        try:
            with self._duckdb() as con:
                before = self._checksum(con, name, table, part.files)
                written = self._write_sorted(con, name, table, part)
                after = self._checksum(con, name, table, written)
            if before != after:
                raise CompactionAborted(
                    f"{name} day {_day_label(part.day)}: rows/checksums {before} before, "
                    f"{after} after the rewrite; nothing committed"
                )
            if self._abort.is_set():
                raise CompactionAborted("stopped before the commit")
            table, retries = self._replace(name, Operation.REPLACE, part.files, written)
        except (CompactionAborted, CommitFailedException, ValidationException) as exc:
            # Certainly not committed: the new files are nobody's.
            for f in written:
                _delete_quietly(io, f.file_path)
            if isinstance(exc, ValidationException):
                # A file we read left the table meanwhile (another maintainer, retention).
                raise CompactionAborted(f"{name}: files changed under compaction: {exc}") from exc
            raise
        # Any other failure may have happened after the commit landed: the new files are
        # left in place (the orphan sweep removes them if no snapshot took them).
        snapshot = table.current_snapshot()
        assert snapshot is not None
        removed = tuple(_file_info(table, f) for f in part.files)
        added = tuple(_file_info(table, f) for f in written)
        if on_replace is not None:
            on_replace(
                FilesReplaced(
                    table=name,
                    snapshot_id=snapshot.snapshot_id,
                    operation=Operation.REPLACE.value,
                    removed=removed,
                    added=added,
                    committed_at=now_us(),
                )
            )
        result = Compaction(
            table=name,
            partition=removed[0].partition,
            snapshot_id=snapshot.snapshot_id,
            files_before=len(part.files),
            files_after=len(written),
            bytes_before=sum(f.file_size_in_bytes for f in part.files),
            bytes_after=sum(f.file_size_in_bytes for f in written),
            rows=before[0],
            seconds=time.perf_counter() - start,
            retries=retries,
        )
        log.info(
            "%s: compacted day %s: %d files -> %d, %d rows, %.2fs",
            name,
            _day_label(part.day),
            result.files_before,
            result.files_after,
            result.rows,
            result.seconds,
        )
        return result

    def _duckdb(self) -> duckdb.DuckDBPyConnection:
        tmp = self._wh.cfg.data_path() / "tmp" / "maintenance"
        tmp.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(
            config={
                "threads": max(1, self._cfg.sort_threads),
                # The sort spills to temp_directory beyond this: memory stays bounded.
                "memory_limit": f"{max(128, self._cfg.sort_memory_mb)}MB",
                "temp_directory": str(tmp),
                "preserve_insertion_order": False,
            }
        )
        con.execute("SET TimeZone = 'UTC'")
        return con

    @contextlib.contextmanager
    def _rows(
        self, con: duckdb.DuckDBPyConnection, name: str, table: Table, files: Iterable[DataFile]
    ) -> Iterator[None]:
        """`files` as the view `rows` of `con`. Local files are scanned by DuckDB itself, so
        the scan counts against its memory limit (through an Arrow dataset, the scan's read
        ahead comes on top: ~600 MB for a day of 1.8M trades); other filesystems go through
        an Arrow dataset, which DuckDB cannot reach here."""
        # Columns are matched by name: k2d's schemas have never been evolved.
        paths, fs = _paths(table, files)
        if fs is None:
            con.read_parquet(paths).create_view("rows")
            try:
                yield
            finally:
                con.execute("DROP VIEW rows")
            return
        dataset = pads.dataset(
            paths, schema=TABLES[name].arrow_schema, format="parquet", filesystem=fs
        )
        con.register("rows", dataset)
        try:
            yield
        finally:
            con.unregister("rows")

    def _checksum(
        self, con: duckdb.DuckDBPyConnection, name: str, table: Table, files: Sequence[DataFile]
    ) -> tuple[int, int, int]:
        """(rows, sum of key hashes, sum of whole-row hashes) of `files`, order-free."""
        key = _quote(_KEY_COLUMN.get(name, "message_id"))
        with self._rows(con, name, table, files):
            (found,) = con.execute(
                f"SELECT count(*), coalesce(sum(hash({key})), 0), "
                "coalesce(sum(hash(*COLUMNS(*))), 0) FROM rows"
            ).fetchall()
        return int(found[0]), int(found[1]), int(found[2])

    def _write_sorted(
        self, con: duckdb.DuckDBPyConnection, name: str, table: Table, part: _PartitionFiles
    ) -> list[DataFile]:
        """Write the partition's rows sorted, in files that roll over at target_file_bytes.
        The sort runs one key range at a time (see _sort_ranges), in the ranges' order."""
        d = TABLES[name]
        order = d.sort_columns or (d.time_column,)
        keys = ", ".join(f"{_quote(c)} ASC NULLS FIRST" for c in order)
        # Row groups of the table's limit, as the writer's own files have them.
        rows = _row_group_rows(table)
        sort_order_id = table.sort_order().order_id if d.sort_columns else None
        with (
            self._rows(con, name, table, part.files),
            self._clustered(con, table, part, order, d.time_column, keys, rows) as source,
        ):
            ranges = self._sort_ranges(con, source, table, order, d.time_column)

            def batches() -> Generator[pa.RecordBatch]:
                for where, values in ranges:
                    query = f"SELECT * FROM {source} WHERE {where} ORDER BY {keys}"
                    reader = con.sql(query, params=values).to_arrow_reader(rows)
                    assert reader is not None
                    with contextlib.closing(reader):
                        yield from reader

            with contextlib.closing(batches()) as sorted_batches:
                return self._write_files(sorted_batches, table, part, sort_order_id, rows)

    @contextlib.contextmanager
    def _clustered(
        self,
        con: duckdb.DuckDBPyConnection,
        table: Table,
        part: _PartitionFiles,
        order: Sequence[str],
        time_column: str,
        keys: str,
        row_group_rows: int,
    ) -> Iterator[str]:
        """The view to cut into ranges: `rows`, with the partition's small files sorted first.

        Each data file is sorted, so DuckDB skips the row groups of a big file that hold
        other symbols; but a file of one row group (a flush) holds every symbol, and each
        range would read all of it again: a day of 500 such files was read about 80 times.
        Here the small files are sorted in batches of about 4 ranges' rows into temporary
        files of small row groups, read once each; ranges then read mostly their own rows.
        A table sorted by time alone needs none of it: its flushes hold separate times."""
        paths, fs = _paths(table, part.files)
        small = [f.record_count <= row_group_rows for f in part.files]
        if fs is not None or sum(small) < 2 or order[0] == time_column:
            yield "rows"
            return
        big: list[str] = []
        batches: list[list[str]] = [[]]
        held, limit = 0, self._cfg.sort_chunk_rows * 4
        for f, path, is_small in zip(part.files, paths, small, strict=True):
            if not is_small:
                big.append(path)
                continue
            if held and held + f.record_count > limit:
                batches.append([])
                held = 0
            batches[-1].append(path)
            held += f.record_count
        tmp = self._wh.cfg.data_path() / "tmp" / "maintenance"
        _sweep_clustered(tmp)
        own = tmp / f"clustered-{os.getpid()}"
        own.mkdir(parents=True, exist_ok=True)
        written: list[str] = []
        try:
            for batch in batches:
                if self._abort.is_set():
                    raise CompactionAborted("stopped while sorting")
                written.append(str(own / f"{uuid.uuid4()}.parquet"))
                con.read_parquet(batch).order(keys).write_parquet(
                    written[-1], row_group_size=_CLUSTER_ROW_GROUP, compression="lz4"
                )
            con.read_parquet([*big, *written]).create_view("clustered")
            try:
                yield "clustered"
            finally:
                con.execute("DROP VIEW clustered")
        finally:
            for path in written:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            with contextlib.suppress(OSError):  # another compaction of this process may use it
                own.rmdir()

    def _sort_ranges(
        self,
        con: duckdb.DuckDBPyConnection,
        source: str,
        table: Table,
        order: Sequence[str],
        time_column: str,
    ) -> list[tuple[str, list[Any]]]:
        """Conditions (SQL, values) cutting the view `source` into ranges of the sort order,
        in order, of about sort_chunk_rows rows: each value of the sort columns before the
        time column (a symbol), cut into time ranges. Sorting a whole partition at once took all of
        sort_memory_mb and ~80 MB outside it (900K trades); a range takes what its rows need."""
        if time_column not in order:
            return [("TRUE", [])]
        lead = list(order[: order.index(time_column)])
        schema = table.schema()
        if not all(schema.find_field(c).required for c in [*lead, time_column]):
            return [("TRUE", [])]  # a NULL would fall outside every range
        time = _quote(time_column)
        chunk = self._cfg.sort_chunk_rows
        select = "".join(f"{_quote(c)}, " for c in lead)
        groups = con.execute(
            f"SELECT {select}count(*), epoch_us(min({time})), epoch_us(max({time})) "
            f"FROM {source} GROUP BY ALL ORDER BY ALL"
        ).fetchall()
        ranges: list[tuple[str, list[Any]]] = []
        for *values, count, first_us, last_us in groups:
            equal = [f"{_quote(c)} = ?" for c in lead]
            cuts: list[int] = []
            if count > chunk:
                group = " AND ".join(equal) or "TRUE"
                cuts = _time_cuts(con, source, group, values, time, count, first_us, last_us, chunk)
            bounds: list[int | None] = [None, *cuts, None]
            for start, end in itertools.pairwise(bounds):
                where, params = list(equal), list(values)
                if start is not None:
                    where.append(f"{time} >= ?")
                    params.append(_EPOCH + timedelta(microseconds=start))
                if end is not None:
                    where.append(f"{time} < ?")
                    params.append(_EPOCH + timedelta(microseconds=end))
                ranges.append((" AND ".join(where) or "TRUE", params))
        return ranges

    def _write_files(
        self,
        batches: Iterable[pa.RecordBatch],
        table: Table,
        part: _PartitionFiles,
        sort_order_id: int | None,
        row_group_rows: int,
    ) -> list[DataFile]:
        iceberg_schema = table.schema()
        arrow_schema = schema_to_pyarrow(iceberg_schema, include_field_ids=True)
        spec = table.metadata.specs()[part.spec_id]
        key = PartitionKey(
            field_values=[
                PartitionFieldValue(field=f, value=part.partition[i])
                for i, f in enumerate(spec.fields)
            ],
            partition_spec=spec,
            schema=iceberg_schema,
        )
        written: list[DataFile] = []
        file: _RollingFile | None = None
        try:
            for group in _row_groups(batches, row_group_rows):
                if self._abort.is_set():
                    raise CompactionAborted("stopped while rewriting")
                if file is None:
                    path = table.location_provider().new_data_location(
                        data_file_name=f"compact-{uuid.uuid4()}.parquet", partition_key=key
                    )
                    file = _RollingFile(table, path, arrow_schema, row_group_rows)
                file.write(group.cast(arrow_schema))
                if file.bytes_written() >= self._cfg.target_file_bytes:
                    written.append(file.close(part.partition, part.spec_id, sort_order_id))
                    file = None
            if file is not None:
                written.append(file.close(part.partition, part.spec_id, sort_order_id))
                file = None
        except BaseException:
            if file is not None:
                file.discard()
            for f in written:
                _delete_quietly(table.io, f.file_path)
            raise
        return written

    # Manifests

    def rewrite_manifests(self, name: str) -> tuple[int, int] | None:
        """Merge the current snapshot's data manifests when there are more than max_manifests;
        returns (before, after)."""
        with self._tracer.start_as_current_span(
            "maintenance.rewrite_manifests",
            attributes={"db.system": "iceberg", "k2d.table": name},
        ) as span:
            done = self._rewrite_manifests(name)
            if done is not None:
                span.set_attributes(
                    {"k2d.manifests_before": done[0], "k2d.manifests_after": done[1]}
                )
            return done

    def _rewrite_manifests(self, name: str) -> tuple[int, int] | None:
        table = self._wh.load_table(name)
        snapshot = table.current_snapshot()
        if snapshot is None:
            return None
        before = sum(1 for m in snapshot.manifests(table.io) if m.content == ManifestContent.DATA)
        if before <= self._cfg.max_manifests:
            return None

        def build(tx: Transaction, props: dict[str, str]) -> None:
            with _RewriteManifests(
                operation=Operation.OVERWRITE,
                transaction=tx,
                io=tx._table.io,
                snapshot_properties=props,
            ):
                pass

        table, _ = self._commit(name, "rewrite_manifests", build)
        current = table.current_snapshot()
        assert current is not None
        after = sum(1 for m in current.manifests(table.io) if m.content == ManifestContent.DATA)
        log.info("%s: manifests %d -> %d", name, before, after)
        return before, after

    # Retention

    def drop_old_partitions(
        self,
        name: str,
        days: float,
        on_replace: Callable[[FilesReplaced], None] | None = None,
    ) -> Retention | None:
        """Drop, in one delete commit, the partitions whose day ended `days` days ago."""
        with self._tracer.start_as_current_span(
            "maintenance.retention",
            attributes={"db.system": "iceberg", "k2d.table": name, "k2d.retention_days": days},
        ) as span:
            done = self._drop_old_partitions(name, days, on_replace)
            if done is not None:
                span.set_attributes(
                    {
                        "k2d.partitions": done.partitions,
                        "k2d.files": done.files,
                        "k2d.rows": done.rows,
                        "k2d.snapshot_id": done.snapshot_id,
                    }
                )
            return done

    def _drop_old_partitions(
        self, name: str, days: float, on_replace: Callable[[FilesReplaced], None] | None
    ) -> Retention | None:
        table = self._wh.load_table(name)
        snapshot = table.current_snapshot()
        if snapshot is None:
            return None
        cutoff_day = int((self._clock() - days * 86_400) * 1e6) // _DAY_US
        doomed: list[DataFile] = []
        partitions: set[tuple[int, Record]] = set()
        for manifest in snapshot.manifests(table.io):
            if manifest.content != ManifestContent.DATA:
                continue
            for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
                f = entry.data_file
                index = _day_index(table, f.spec_id)
                if index is None or f.partition[index] is None:
                    continue
                # Day d ended at d + 1: dropped once that is `days` old.
                if int(f.partition[index]) + 1 <= cutoff_day:
                    doomed.append(f)
                    partitions.add((f.spec_id, f.partition))
        if not doomed:
            return None
        try:
            table, _ = self._replace(name, Operation.DELETE, doomed, ())
        except ValidationException as exc:
            raise CompactionAborted(f"{name}: files changed under retention: {exc}") from exc
        current = table.current_snapshot()
        assert current is not None
        if on_replace is not None:
            on_replace(
                FilesReplaced(
                    table=name,
                    snapshot_id=current.snapshot_id,
                    operation=Operation.DELETE.value,
                    removed=tuple(_file_info(table, f) for f in doomed),
                    added=(),
                    committed_at=now_us(),
                )
            )
        rows = sum(f.record_count for f in doomed)
        log.info("%s: retention dropped %d partitions, %d rows", name, len(partitions), rows)
        return Retention(name, current.snapshot_id, len(partitions), len(doomed), rows)

    # Expiry

    def expirable(self, table: Table) -> set[int]:
        """Snapshot ids to expire: older than snapshot_retention_days, or thinned out to the
        newest per snapshot_thin_interval once older than snapshot_full_history; never the
        newest min_snapshots_to_keep ancestors of the current one, a branch or tag head, or
        a snapshot on the way to the resume state (see _state_chain)."""
        cfg = self._cfg
        metadata = table.metadata
        now_ms = int(self._clock() * 1000)
        keep = {ref.snapshot_id for ref in metadata.refs.values()}
        newest = ancestors_of(table.current_snapshot(), metadata)
        keep.update(
            s.snapshot_id for s in itertools.islice(newest, max(1, cfg.min_snapshots_to_keep))
        )
        keep.update(_state_chain(table))
        retain_from = now_ms - int(cfg.snapshot_retention_days * _DAY_MS)
        full_from = now_ms - int(cfg.snapshot_full_history * 1000)
        interval_ms = int(cfg.snapshot_thin_interval * 1000)
        newest_in_bucket: dict[int, Snapshot] = {}
        for s in metadata.snapshots:
            if s.timestamp_ms >= full_from:
                keep.add(s.snapshot_id)
            elif s.timestamp_ms >= retain_from:
                if interval_ms <= 0:
                    keep.add(s.snapshot_id)
                    continue
                bucket = s.timestamp_ms // interval_ms
                held = newest_in_bucket.get(bucket)
                if held is None or s.timestamp_ms > held.timestamp_ms:
                    newest_in_bucket[bucket] = s
        keep.update(s.snapshot_id for s in newest_in_bucket.values())
        return {s.snapshot_id for s in metadata.snapshots} - keep

    def expire(self, name: str, sweep_orphans: bool = True) -> Expiry:
        """Expire old snapshots of `name`, then delete the files no remaining snapshot
        references (and, with `sweep_orphans`, files older than orphan_file_age that no
        snapshot references, such as those of a commit a crash cut short)."""
        with self._tracer.start_as_current_span(
            "maintenance.expire", attributes={"db.system": "iceberg", "k2d.table": name}
        ) as span:
            result = self._expire(name, sweep_orphans)
            span.set_attributes(
                {
                    "k2d.snapshots_expired": result.snapshots_expired,
                    "k2d.snapshots_left": result.snapshots_left,
                    "k2d.data_files_deleted": result.data_files_deleted,
                    "k2d.orphans_deleted": result.orphans_deleted,
                }
            )
            return result

    def _expire(self, name: str, sweep_orphans: bool) -> Expiry:
        start = time.perf_counter()
        cfg = self._cfg
        backoff = Backoff(cfg.commit_backoff_initial, cfg.commit_backoff_max)
        doomed: list[Snapshot] = []
        while True:
            try:
                with self._exclusive(name):
                    table = self._wh.load_table(name)
                    doomed_ids = self.expirable(table)
                    doomed = [s for s in table.metadata.snapshots if s.snapshot_id in doomed_ids]
                    if doomed:
                        _expire_snapshots(table, doomed_ids)
                break
            except CommitFailedException:
                if backoff.attempt >= cfg.commit_retries:
                    raise
                time.sleep(backoff.next_delay())
        table = self._wh.load_table(name)
        remaining = table.metadata.snapshots
        sweep = sweep_orphans and cfg.orphan_file_age > 0
        # Reading the remaining snapshots' manifests (those not remembered) is the cost:
        # only when needed.
        files = _Reachable(table, remaining, self._manifests) if doomed or sweep else None
        io = table.io
        data_deleted = manifests_deleted = lists_deleted = orphans = 0
        if doomed and files is not None:
            gone_lists = {s.manifest_list for s in doomed} - files.manifest_lists
            gone_manifests: dict[str, ManifestFile] = {}
            for s in doomed:
                if files.manifests.issuperset(self._manifests.listed(io, s)):
                    continue
                for m in s.manifests(io):
                    if m.manifest_path not in files.manifests:
                        gone_manifests[m.manifest_path] = m
            gone_data: set[str] = set()
            for m in gone_manifests.values():
                for entry in m.fetch_manifest_entry(io, discard_deleted=False):
                    if entry.data_file.file_path not in files.data:
                        gone_data.add(entry.data_file.file_path)
            # Data first, then manifests, then manifest lists: a crash in between leaves
            # only unreferenced files behind, which the orphan sweep finds later.
            data_deleted = sum(_delete_quietly(io, p) for p in sorted(gone_data))
            manifests_deleted = sum(_delete_quietly(io, p) for p in sorted(gone_manifests))
            lists_deleted = sum(_delete_quietly(io, p) for p in sorted(gone_lists))
            self._manifests.forget(itertools.chain(gone_manifests, gone_lists))
        if sweep and files is not None:
            orphans = self._sweep_orphans(table, files)
        result = Expiry(
            table=name,
            snapshots_expired=len(doomed),
            snapshots_left=len(remaining),
            data_files_deleted=data_deleted,
            manifests_deleted=manifests_deleted,
            manifest_lists_deleted=lists_deleted,
            orphans_deleted=orphans,
            seconds=time.perf_counter() - start,
        )
        if doomed or orphans:
            log.info(
                "%s: expired %d snapshots; deleted %d data files, %d manifests, %d lists, "
                "%d orphans",
                name,
                len(doomed),
                data_deleted,
                manifests_deleted,
                lists_deleted,
                orphans,
            )
        return result

    def _sweep_orphans(self, table: Table, files: _Reachable) -> int:
        """Delete data and manifest files under the table that no snapshot references and
        that are older than orphan_file_age (younger ones may belong to a commit in flight)."""
        io = table.io
        if not isinstance(io, PyArrowFileIO):
            return 0
        referenced = {
            io.parse_location(p, io.properties)[2]
            for p in itertools.chain(files.data, files.manifests, files.manifest_lists)
        }
        older_than = datetime.fromtimestamp(self._clock() - self._cfg.orphan_file_age, UTC)
        deleted = 0
        for sub, suffix in (("data", ".parquet"), ("metadata", ".avro")):
            scheme, netloc, root = io.parse_location(f"{table.location()}/{sub}", io.properties)
            fs = io.fs_by_scheme(scheme, netloc)
            selector = FileSelector(root, recursive=True, allow_not_found=True)
            for info in fs.get_file_info(selector):
                if info.type != FileType.File or not info.path.endswith(suffix):
                    continue
                if info.path in referenced or info.mtime is None:
                    continue
                mtime = info.mtime if info.mtime.tzinfo else info.mtime.replace(tzinfo=UTC)
                if mtime < older_than:
                    try:
                        fs.delete_file(info.path)
                        deleted += 1
                    except FileNotFoundError:
                        pass
        return deleted

    # Stats

    def stats(self, name: str) -> TableStats:
        """Files, bytes, rows and manifests of the current snapshot; snapshots kept."""
        table = self._wh.load_table(name)
        snapshot = table.current_snapshot()
        props = snapshot.summary.additional_properties if snapshot and snapshot.summary else {}
        manifests = len(self._manifests.listed(table.io, snapshot)) if snapshot is not None else 0
        return TableStats(
            table=name,
            data_files=int(props.get("total-data-files", 0)),
            data_bytes=int(props.get("total-files-size", 0)),
            records=int(props.get("total-records", 0)),
            manifests=manifests,
            snapshots=len(table.metadata.snapshots),
        )


def _expire_snapshots(table: Table, ids: set[int]) -> None:
    """Expire snapshots `ids` of `table` (from its own metadata) in one commit.

    ExpireSnapshots.by_ids checks each id against two fresh deep copies of the whole table
    metadata: expiring a minute of commits (hundreds of snapshots, each copy holding
    hundreds) was a quarter of the running daemon's CPU. The ids go into the update's set
    directly; its commit still leaves out the protected ones (branch and tag heads).
    """
    update = table.maintenance.expire_snapshots()
    update._snapshot_ids_to_expire |= ids
    update.commit()


class ManifestMemo:
    """What manifest lists and manifests name, remembered: a list's manifests, a manifest's
    live data files. Such a file is never changed once written (a commit writes new ones),
    so what it names holds for as long as it exists. At most `size` files are remembered,
    the least recently used forgotten first."""

    def __init__(self, size: int) -> None:
        self.size = size
        # Keyed by file path: a manifest list's entry holds manifest paths, a manifest's
        # its live data file paths. Locked, as the rounds using it run in worker threads.
        self._named: OrderedDict[str, tuple[str, ...] | frozenset[str]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._named)

    def listed(self, io: FileIO, snapshot: Snapshot) -> tuple[str, ...]:
        """The paths of the manifests `snapshot`'s manifest list names."""
        return self._listed(io, snapshot)[0]

    def live_files(
        self, io: FileIO, snapshot: Snapshot, skip: Container[str] = ()
    ) -> Iterator[tuple[str, frozenset[str]]]:
        """Each manifest of `snapshot` not in `skip` (looked up as they come), with the data
        files its live entries name (`fetch_manifest_entry(discard_deleted=True)`)."""
        paths, manifests = self._listed(io, snapshot)
        for path in paths:
            if path in skip:
                continue
            live = self._get(path)
            if not isinstance(live, frozenset):
                if manifests is None:
                    manifests = {m.manifest_path: m for m in snapshot.manifests(io)}
                entries = manifests[path].fetch_manifest_entry(io, discard_deleted=True)
                live = frozenset(sys.intern(e.data_file.file_path) for e in entries)
                self._put(path, live)
            yield path, live

    def forget(self, paths: Iterable[str]) -> None:
        """Forget `paths`, deleted: what is remembered stays what the tables reference."""
        with self._lock:
            for path in paths:
                self._named.pop(path, None)

    def _listed(
        self, io: FileIO, snapshot: Snapshot
    ) -> tuple[tuple[str, ...], dict[str, ManifestFile] | None]:
        """The manifest paths of `snapshot`, and its ManifestFiles when the list was read."""
        paths = self._get(snapshot.manifest_list)
        if isinstance(paths, tuple):
            return paths, None
        manifests = {m.manifest_path: m for m in snapshot.manifests(io)}
        # Interned: the same paths recur in many lists, and as keys here.
        paths = tuple(sys.intern(p) for p in manifests)
        self._put(snapshot.manifest_list, paths)
        return paths, manifests

    def _get(self, path: str) -> tuple[str, ...] | frozenset[str] | None:
        with self._lock:
            named = self._named.get(path)
            if named is not None:
                self._named.move_to_end(path)
            return named

    def _put(self, path: str, named: tuple[str, ...] | frozenset[str]) -> None:
        with self._lock:
            self._named[path] = named
            while len(self._named) > self.size:
                self._named.popitem(last=False)


class _Reachable:
    """Every file the given snapshots reference: manifest lists, manifests, live data files."""

    def __init__(self, table: Table, snapshots: Iterable[Snapshot], memo: ManifestMemo) -> None:
        io = table.io
        self.manifest_lists: set[str] = set()
        self.manifests: set[str] = set()
        self.data: set[str] = set()
        for s in snapshots:
            self.manifest_lists.add(s.manifest_list)
            for path, live in memo.live_files(io, s, skip=self.manifests):
                self.manifests.add(path)
                self.data.update(live)


class _RollingFile:
    """One Parquet data file being written, in row groups, with Iceberg field ids and stats."""

    def __init__(
        self, table: Table, path: str, arrow_schema: pa.Schema, row_group_rows: int
    ) -> None:
        self._table = table
        self.path = path
        self._row_group_rows = row_group_rows
        self._output = table.io.new_output(path)
        self._stream = self._output.create(overwrite=False)
        self._writer = pq.ParquetWriter(
            self._stream,
            schema=arrow_schema,
            store_decimal_as_integer=True,
            **_get_parquet_writer_kwargs(table.properties),
        )

    def write(self, data: pa.Table) -> None:
        self._writer.write_table(data, row_group_size=self._row_group_rows)

    def bytes_written(self) -> int:
        return int(self._stream.tell())

    def close(self, partition: Record, spec_id: int, sort_order_id: int | None) -> DataFile:
        self._writer.close()
        self._stream.close()
        schema = self._table.schema()
        stats = data_file_statistics_from_parquet_metadata(
            parquet_metadata=self._writer.writer.metadata,
            stats_columns=compute_statistics_plan(schema, self._table.properties),
            parquet_column_mapping=parquet_path_to_id_mapping(schema),
        )
        return DataFile.from_args(
            content=DataFileContent.DATA,
            file_path=self.path,
            file_format=FileFormat.PARQUET,
            partition=partition,
            file_size_in_bytes=len(self._table.io.new_input(self.path)),
            sort_order_id=sort_order_id,
            spec_id=spec_id,
            equality_ids=None,
            key_metadata=None,
            **stats.to_serialized_dict(),
        )

    def discard(self) -> None:
        try:
            self._writer.close()
            self._stream.close()
        finally:
            _delete_quietly(self._table.io, self.path)


def _sweep_clustered(tmp: Path) -> None:
    """Remove the temporary files of compactions whose process is gone (killed mid-way)."""
    for stale in tmp.glob("clustered-*"):
        try:
            os.kill(int(stale.name.removeprefix("clustered-")), 0)
            continue  # still running (or the pid is someone else's now: swept later)
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        shutil.rmtree(stale, ignore_errors=True)


def _paths(table: Table, files: Iterable[DataFile]) -> tuple[list[str], FileSystem | None]:
    """The paths of `files` on their filesystem, and that filesystem unless it is the local
    one (DuckDB reads local files itself)."""
    io = table.io
    if not isinstance(io, PyArrowFileIO):
        raise TypeError(f"compaction needs PyArrowFileIO, the table uses {type(io).__name__}")
    paths = []
    fs: FileSystem | None = None
    local = True
    for f in files:
        scheme, netloc, path = io.parse_location(f.file_path, io.properties)
        fs = fs or io.fs_by_scheme(scheme, netloc)
        local = local and scheme == "file"
        paths.append(path)
    return paths, None if local else fs


def _time_cuts(
    con: duckdb.DuckDBPyConnection,
    source: str,
    where: str,
    values: Sequence[Any],
    time: str,
    count: int,
    first_us: int,
    last_us: int,
    chunk: int,
) -> list[int]:
    """Times (epoch us) cutting the `count` rows of the view `source` matching `where` into
    time ranges of at most about `chunk` rows, from a histogram of ~8 buckets a range (one
    bucket is never cut, so a burst inside one can make a range larger)."""
    width = max(1, (last_us - first_us + 1) * chunk // (count * 8))
    histogram = con.execute(
        f"SELECT (epoch_us({time}) - ?) // ? AS bucket, count(*) FROM {source} WHERE {where} "
        "GROUP BY bucket ORDER BY bucket",
        [first_us, width, *values],
    ).fetchall()
    cuts: list[int] = []
    held = 0
    for bucket, n in histogram:
        if held and held + n > chunk:
            cuts.append(first_us + bucket * width)
            held = 0
        held += n
    return cuts


def _row_groups(batches: Iterable[pa.RecordBatch | pa.Table], rows: int) -> Iterator[pa.Table]:
    """The rows of `batches`, in order, in tables of `rows` rows (the last one fewer): each
    becomes one full row group, wherever the batches (one sorted range after another) end."""
    held: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        held.extend(batch.to_batches() if isinstance(batch, pa.Table) else [batch])
        count += batch.num_rows
        while count >= rows:
            table = pa.Table.from_batches(held)
            yield table.slice(0, rows)
            rest = table.slice(rows)
            held, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(held)


def _row_group_rows(table: Table) -> int:
    """The table's `write.parquet.row-group-limit` (k2d's when a table lacks it)."""
    rows = property_as_int(
        table.properties, TableProperties.PARQUET_ROW_GROUP_LIMIT, ROW_GROUP_ROWS
    )
    return rows or ROW_GROUP_ROWS


def _delete_quietly(io: Any, path: str) -> int:
    """Delete `path`; 1 if deleted, 0 if it was already gone."""
    try:
        io.delete(path)
        return 1
    except FileNotFoundError:
        return 0
