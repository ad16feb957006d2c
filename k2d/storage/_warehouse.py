"""Warehouse: the Iceberg catalog, the `market` tables, and atomic appends with k2 state.

Blocking throughout (pyiceberg, SQLite, Parquet): callers run it via `anyio.to_thread`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.catalog import Catalog
from pyiceberg.catalog.sql import IcebergTables, SqlCatalog
from pyiceberg.conversions import from_bytes
from pyiceberg.exceptions import (
    CommitFailedException,
    NamespaceAlreadyExistsError,
    TableAlreadyExistsError,
)

# Private pyiceberg API, used so that a commit retried after a conflict reuses the data
# files already written instead of writing the Parquet again (and leaving orphans).
from pyiceberg.io.pyarrow import (
    _check_pyarrow_schema_compatible,
    _dataframe_to_data_files,
    bin_pack_arrow_table,
    pyarrow_to_schema,
    write_file,
)
from pyiceberg.manifest import DataFile, ManifestEntryStatus
from pyiceberg.partitioning import PartitionFieldValue, PartitionKey
from pyiceberg.table import (
    CommitTableResponse,
    StagedTable,
    Table,
    TableProperties,
    Transaction,
    WriteTask,
)
from pyiceberg.table.locations import load_location_provider
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.table.snapshots import Snapshot, ancestors_of

# Private too: update_table_metadata's steps, run without its closing deep copy.
from pyiceberg.table.update import (
    TableRequirement,
    TableUpdate,
    _apply_table_update,
    _TableMetadataUpdateContext,
    _update_table_metadata_log,
)
from pyiceberg.typedef import Identifier
from pyiceberg.types import TimestamptzType
from pyiceberg.utils.concurrent import ExecutorFactory
from pyiceberg.utils.datetime import datetime_to_millis
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError

from k2d.config import StorageConfig, WriterConfig
from k2d.messages import DataFileInfo, Watermark
from k2d.model import partition_of
from k2d.runtime import Backoff
from k2d.storage._schemas import TABLE_NAMES, TABLE_PROPERTIES, TABLES
from k2d.storage._state import (
    FLUSH,
    LOG_POSITION,
    MEMBER,
    WATERMARKS,
    K2State,
    TableState,
    lanes_property,
    merge_lanes,
    merge_states,
    table_states,
)

# On a snapshot that undid a flush cut short by a crash: the number of that flush.
UNDONE_FLUSH = "k2.undone_flush"
# On a maintenance commit (compaction, expiry, retention), which copies the k2 state forward.
MAINTENANCE_PROPERTY = "k2.maintenance"

__all__ = ["CommitResult", "Warehouse"]

log = logging.getLogger(__name__)


def apply_updates(
    base: TableMetadata, updates: tuple[TableUpdate, ...], metadata_location: str | None = None
) -> TableMetadata:
    """pyiceberg's update_table_metadata without its closing deep copy of the result.

    The models are frozen and pyiceberg builds new ones rather than change them, so the new
    metadata may share what did not change with `base`; the copy was a third of a commit's
    CPU at a few hundred snapshots, twice a commit (the transaction, then the catalog)."""
    context = _TableMetadataUpdateContext()
    new = base
    for update in updates:
        new = _apply_table_update(update, new, context)
    if context.has_changes():
        if metadata_location:
            new = _update_table_metadata_log(new, metadata_location, base.last_updated_ms)
        if base.last_updated_ms == new.last_updated_ms:
            now = datetime_to_millis(datetime.now().astimezone())
            new = new.model_copy(update={"last_updated_ms": now})
    new.spec().check_compatible(new.schema())
    new.sort_order().check_compatible(new.schema())
    return new


class MemoTransaction(Transaction):
    """pyiceberg's Transaction, applying its staged changes to the table's metadata once per
    change instead of once per read.

    Every read of Transaction.table_metadata deep-copies the whole metadata, and one append
    reads it about sixteen times: with the few hundred snapshots a table keeps for
    maintenance.snapshot_full_history, that was about a third of the running daemon's CPU
    (229 -> 77 ms a commit at 300 snapshots). The models are frozen and pyiceberg builds new
    ones rather than change them, so the readers of one state can share one copy (made
    without a deep copy either: apply_updates).
    """

    _memo: tuple[TableMetadata, tuple[TableUpdate, ...], TableMetadata] | None = None

    @property
    def table_metadata(self) -> TableMetadata:
        base, updates = self._table.metadata, self._updates
        memo = self._memo
        if memo is None or memo[0] is not base or memo[1] is not updates:
            memo = self._memo = (base, updates, apply_updates(base, updates))
        return memo[2]


class RememberingCatalog(SqlCatalog):
    """pyiceberg's SqlCatalog, keeping each table's metadata it last wrote or read.

    A metadata file is written once and never changed, so its location names one metadata
    for good. pyiceberg reads and parses the file at every load_table, and once more inside
    every commit (to check it against the catalog row): in the running daemon the writer,
    the query index and the Maintainer each did so after every commit, on metadata that
    grows with the snapshots a table keeps. Here the newest location of each table this
    process has seen is not read again (the writer and the index hold that metadata anyway).
    """

    def __init__(self, name: str, **properties: str) -> None:
        super().__init__(name, **properties)
        self._newest: dict[tuple[str, ...], tuple[str, TableMetadata]] = {}
        self._newest_lock = threading.Lock()

    def _remember(self, table: tuple[str, ...], location: str, metadata: TableMetadata) -> None:
        with self._newest_lock:
            self._newest[table] = (location, metadata)

    def _convert_orm_to_iceberg(self, orm_table: IcebergTables) -> Table:
        location, namespace, name = (
            orm_table.metadata_location,
            orm_table.table_namespace,
            orm_table.table_name,
        )
        if not location or not namespace or not name:
            return super()._convert_orm_to_iceberg(orm_table)  # it raises the error
        identifier = (*Catalog.identifier_to_tuple(namespace), name)
        with self._newest_lock:
            seen, metadata = self._newest.get(identifier, ("", None))
        if metadata is None or seen != location:
            table = super()._convert_orm_to_iceberg(orm_table)
            self._remember(identifier, location, table.metadata)
            return table
        return Table(
            identifier=identifier,
            metadata=metadata,
            metadata_location=location,
            io=self._load_file_io(metadata.properties, location),
            catalog=self,
        )

    def _update_and_stage_table(
        self,
        current_table: Table | None,
        table_identifier: Identifier,
        requirements: tuple[TableRequirement, ...],
        updates: tuple[TableUpdate, ...],
    ) -> StagedTable:
        """pyiceberg's, with apply_updates (no deep copy) for a table that exists."""
        if current_table is None:
            return super()._update_and_stage_table(
                current_table, table_identifier, requirements, updates
            )
        for requirement in requirements:
            requirement.validate(current_table.metadata)
        metadata = apply_updates(current_table.metadata, updates, current_table.metadata_location)
        version = self._parse_metadata_version(current_table.metadata_location) + 1
        provider = load_location_provider(metadata.location, metadata.properties)
        location = provider.new_table_metadata_file_location(version)
        return StagedTable(
            identifier=table_identifier,
            metadata=metadata,
            metadata_location=location,
            io=self._load_file_io(properties=metadata.properties, location=location),
            catalog=self,
        )

    def commit_table(
        self,
        table: Table,
        requirements: tuple[TableRequirement, ...],
        updates: tuple[TableUpdate, ...],
    ) -> CommitTableResponse:
        response = super().commit_table(table, requirements, updates)
        self._remember(table.name(), response.metadata_location, response.metadata)
        return response


_MERGE_ENABLED = "commit.manifest-merge.enabled"


@dataclass(frozen=True, slots=True)
class CommitResult:
    """One committed snapshot: its id, the data files it added, rows, and conflict retries."""

    snapshot_id: int
    files: tuple[DataFileInfo, ...]
    rows: int
    retries: int = 0
    # The table after the commit, from the snapshot summary (no further catalog read).
    total_rows: int = 0
    total_files: int = 0
    snapshots: int = 0


def _sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite") or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).expanduser()


def _open_catalog(cfg: StorageConfig) -> RememberingCatalog:
    url, warehouse = cfg.catalog_url(), cfg.warehouse_url()
    db = _sqlite_path(url)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        # WAL is a property of the database file: set it before any other connection opens.
        timeout = cfg.sqlite_busy_timeout_ms / 1000
        with contextlib.closing(sqlite3.connect(db, timeout=timeout)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
    if warehouse.startswith("file://"):
        Path(warehouse.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        try:
            catalog = RememberingCatalog("k2d", uri=url, warehouse=warehouse)
            break
        except OperationalError:
            # Two processes creating the catalog's own tables at once: the loser retries.
            if attempt == 2:
                raise
            time.sleep(0.1)
    if db is not None:
        # PRAGMA takes no bound parameters; the value is the config's integer, never text.
        busy_ms = int(cfg.sqlite_busy_timeout_ms)

        def on_connect(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout={busy_ms}")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.close()

        event.listen(catalog.engine, "connect", on_connect)
        # Connections opened while the catalog initialised lack the pragmas: start afresh.
        catalog.engine.dispose()
    return catalog


class CommitTurn:
    """A table's commits, one process at a time on this machine: an attempt that holds its
    turn (fcntl lock on `path`) cannot be overtaken by another process's commit, so a slow
    committer (a compaction rewriting manifests) is not starved by a fast one (a writer
    committing every second). A process waits at most `wait` seconds, then goes on without
    its turn: conflict retries keep commits correct either way. Threads of one process are
    kept apart by the Warehouse's own locks, which are held around this."""

    def __init__(self, path: Path, wait: float) -> None:
        self.path = path
        self.wait = wait
        self._fd: int | None = None
        self._depth = 0  # holds inside a hold (a commit made while holding) nest
        self._held = False
        # Whether the last hold had to wait (another process may have committed meanwhile),
        # and how many holds have.
        self.waited = False
        self.waits = 0

    def __enter__(self) -> CommitTurn:
        self._depth += 1
        if self._depth > 1:
            return self
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait
        self.waited = False
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._held = True
                return self
            except BlockingIOError:
                if not self.waited:
                    self.waited = True
                    self.waits += 1
                if time.monotonic() >= deadline:
                    log.warning(
                        "%s: no commit turn after %.0fs; committing anyway", self.path, self.wait
                    )
                    return self
                time.sleep(0.005)

    def __exit__(self, *_exc: object) -> None:
        self._depth -= 1
        if self._depth == 0 and self._held and self._fd is not None:
            self._held = False
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Warehouse:
    """The `market` namespace in an Iceberg SQL catalog. Thread-safe per table."""

    def __init__(self, cfg: StorageConfig, commit: WriterConfig | None = None) -> None:
        self.cfg = cfg
        self._commit = commit or WriterConfig()
        self.namespace = cfg.namespace
        self.catalog = _open_catalog(cfg)
        self._tables: dict[str, Table] = {}
        self._locks = {name: threading.Lock() for name in TABLE_NAMES}
        # Beside a SQLite catalog's file, which every process sharing the catalog can reach.
        db = _sqlite_path(cfg.catalog_url())
        turns = db.with_name(f"{db.name}.turns") if db is not None else cfg.data_path() / "turns"
        self._turns = {
            name: CommitTurn(turns / f"{name}.lock", self._commit.commit_lock_wait)
            for name in TABLE_NAMES
        }

    def close(self) -> None:
        self.catalog.engine.dispose()
        for turn in self._turns.values():
            turn.close()

    def commit_turn(self, table_name: str) -> CommitTurn:
        """This process's turn at `table_name`'s commits; hold it with the table's lock."""
        return self._turns[table_name]

    def __enter__(self) -> Warehouse:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def ensure_tables(self) -> None:
        """Create the namespace and the four tables if missing; safe when processes race."""
        with contextlib.suppress(NamespaceAlreadyExistsError, IntegrityError):
            self.catalog.create_namespace(self.namespace)
        for name, d in TABLES.items():
            ident = (self.namespace, name)
            if not self.catalog.table_exists(ident):
                with contextlib.suppress(TableAlreadyExistsError):
                    self.catalog.create_table(
                        ident,
                        schema=d.schema,
                        partition_spec=d.spec,
                        sort_order=d.sort_order,
                        properties=TABLE_PROPERTIES,
                    )
                continue
            table = self.catalog.load_table(ident)
            stale = {k: v for k, v in TABLE_PROPERTIES.items() if table.properties.get(k) != v}
            if stale:
                # Tables made by an older k2d get today's properties (racing processes agree).
                with contextlib.suppress(CommitFailedException), MemoTransaction(table) as tx:
                    tx.set_properties(stale)

    def load_table(self, name: str) -> Table:
        """A fresh view of table `name` (other processes' commits included)."""
        if name not in TABLES:
            raise ValueError(f"unknown table {name!r}; expected one of {', '.join(TABLE_NAMES)}")
        return self.catalog.load_table((self.namespace, name))

    def append(
        self,
        table_name: str,
        data: pa.Table,
        properties: dict[str, str],
        *,
        retries: int | None = -1,
        on_conflict: Callable[[int, CommitFailedException], None] | None = None,
    ) -> CommitResult:
        """Append `data` to `table_name` as one snapshot carrying `properties`.

        Trades and quotes are sorted by (symbol, timestamp, source_sequence) first. The data
        files are written once; a commit conflict refreshes the table metadata and retries
        the commit with backoff: at most `retries` times (-1: `commit_retries` from config,
        None: until it lands), calling `on_conflict(attempt, error)` before each retry.
        """
        if data.num_rows == 0:
            raise ValueError(f"{table_name}: refusing to commit an empty append")
        d = TABLES[table_name]
        order = sort_order(data, d.sort_columns) if d.sort_columns else None
        limit = self._commit.commit_retries if retries == -1 else retries
        with self._locks[table_name]:
            table = self._tables.get(table_name)
            if table is None:
                table = self._tables[table_name] = self.load_table(table_name)
            _check_pyarrow_schema_compatible(
                table.schema(), provided_schema=data.schema, format_version=table.format_version
            )
            files = write_data_files(
                table, data, self._commit.file_split_rows, os.cpu_count() or 1, order
            )
            try:
                attempts = self._commit_files(table, files, properties, limit, on_conflict)
            except BaseException:
                # Whether the commit landed may be unknown: reload before the next append.
                del self._tables[table_name]
                raise
            snapshot = table.current_snapshot()
            assert snapshot is not None
        infos = tuple(_file_info(table, f) for f in files)
        return _result(table, snapshot, infos, data.num_rows, attempts)

    def append_files(
        self, table_name: str, files: Sequence[DataFile], properties: dict[str, str]
    ) -> None:
        """Commit data files written beforehand (a batch load writes them as it reads) as one
        append snapshot carrying `properties`; conflicts are retried as in `append`."""
        with self._locks[table_name]:
            table = self._tables.pop(table_name, None) or self.load_table(table_name)
            self._commit_files(table, list(files), properties, self._commit.commit_retries, None)
            self._tables[table_name] = table

    def _commit_files(
        self,
        table: Table,
        files: list[DataFile],
        props: dict[str, str],
        retries: int | None,
        on_conflict: Callable[[int, CommitFailedException], None] | None,
    ) -> int:
        """Commit `files` as one append snapshot; return how many conflicts were retried."""
        backoff = Backoff(self._commit.commit_backoff_initial, self._commit.commit_backoff_max)
        merge = table.properties.get(_MERGE_ENABLED, "false").lower() == "true"
        member = props.get(MEMBER)
        if member is not None:
            # Other members commit to these tables too: start from the latest metadata.
            table.refresh()
        turn = self._turns[table.name()[-1]]
        while True:
            try:
                with turn:
                    if backoff.attempt or turn.waited:
                        table.refresh()
                    tx = MemoTransaction(table)
                    carried = props
                    if member is not None:
                        # Every other member's latest state rides along, read from the very
                        # parent this attempt commits on (a conflict re-reads it).
                        lanes = lane_states(table, table.name()[-1]).values()
                        carried = props | lanes_property((st for st, _ in lanes), member)
                    update = tx.update_snapshot(snapshot_properties=carried)
                    with update.merge_append() if merge else update.fast_append() as append:
                        for f in files:
                            append.append_data_file(f)
                    tx.commit_transaction()
                return backoff.attempt
            except CommitFailedException as exc:
                if retries is not None and backoff.attempt >= retries:
                    raise
                delay = backoff.next_delay()
                if on_conflict is not None:
                    on_conflict(backoff.attempt, exc)
                log.warning(
                    "%s: commit conflict (%s), retry %d in %.2fs",
                    table.name(),
                    exc,
                    backoff.attempt,
                    delay,
                )
                time.sleep(delay)

    def find_flush(self, table_name: str, flush: int, member: str = "") -> CommitResult | None:
        """The commit of `member`'s flush number `flush` to `table_name` if it is that lane's
        latest k2 state: for a commit whose outcome is unknown (it raised), whether it landed."""
        table = self.load_table(table_name)
        found = self._latest_state(table, table_name, member)
        if found is None or found[0].flush != flush or found[1] is None:
            return None
        snapshot = found[1]
        added = _added_files(table, snapshot)
        infos = tuple(_file_info(table, f) for f in added)
        return _result(table, snapshot, infos, sum(f.record_count for f in added), 0)

    def snapshot_properties(self, table_name: str) -> dict[str, str]:
        """The current snapshot's summary properties; empty when the table has no snapshot."""
        snapshot = self.load_table(table_name).current_snapshot()
        if snapshot is None or snapshot.summary is None:
            return {}
        return dict(snapshot.summary.additional_properties)

    def _lanes_by_member(self) -> dict[str, list[TableState]]:
        by_member: dict[str, list[TableState]] = {}
        for name in TABLE_NAMES:
            for member, (state, _) in lane_states(self.load_table(name), name).items():
                by_member.setdefault(member, []).append(state)
        return by_member

    def k2_state(self, member: str = "", partitions: int = 0) -> K2State:
        """The position `member` resumes from, merged over the four tables' latest k2 states.

        Per table that is the newest state of the member's lane: a snapshot written by
        another committer (compaction) is passed over in favour of its ancestors. With
        `partitions` (members of a Kafka group sharing the tables), each shared partition's
        watermarks and offsets come from the lane that got furthest in it (merge_lanes).
        """
        by_member = self._lanes_by_member()
        own = merge_states(by_member.get(member, []), TABLE_NAMES)
        if not partitions or set(by_member) <= {member}:
            return own
        lanes = {m: merge_states(states, TABLE_NAMES) for m, states in by_member.items()}
        watermarks, position = merge_lanes(lanes, member, partitions, partition_of)
        return dataclasses.replace(own, watermarks=watermarks, log_position=position)

    def incomplete_lanes(self) -> dict[str, frozenset[int] | None]:
        """Members whose latest flush a crash cut short, with the tracker partitions of that
        flush (None: not recorded, i.e. all)."""
        out: dict[str, frozenset[int] | None] = {}
        for member, states in self._lanes_by_member().items():
            if not merge_states(states, TABLE_NAMES).complete:
                newest = max(states, key=lambda st: st.flush)
                out[member] = newest.partitions
        return out

    @staticmethod
    def _latest_state(
        table: Table, name: str, member: str = ""
    ) -> tuple[TableState, Snapshot | None] | None:
        """`member`'s newest state in `table`, passing over flushes undone since, with the
        snapshot that member committed it in (None if expired)."""
        state = lane_states(table, name).get(member)
        if state is None:
            return None
        if state[1] is not None:
            return state
        return state[0], _own_snapshot(table, member, state[0].flush)

    def roll_back_incomplete_flush(self, member: str = "") -> list[str]:
        """Undo the commits of `member`'s flush that a crash cut short; return the tables
        rolled back.

        Iceberg has no multi-table commit. When a crash lands between the commits of one
        flush, the tables that did commit hold rows the others' state does not cover; with
        a log to replay from (the journal, Kafka), rolling those commits back makes every
        table agree, and the replay then writes the whole flush again, once.
        """
        rolled: list[str] = []
        for _ in range(len(TABLE_NAMES)):
            latest = {}
            for name in TABLE_NAMES:
                found = self._latest_state(self.load_table(name), name, member)
                if found is not None:
                    latest[name] = found
            if not latest:
                return rolled
            newest = max(st.flush for st, _ in latest.values())
            members = next(st.flush_tables for st, _ in latest.values() if st.flush == newest)
            if all(t in latest and latest[t][0].flush == newest for t in members):
                return rolled
            for name, (state, snap) in latest.items():
                if state.flush != newest:
                    continue
                if snap is None:
                    raise RuntimeError(
                        f"{name}: the commit of {member or 'this daemon'}'s flush {newest} to "
                        "undo has expired; restore from a backup"
                    )
                self._undo(self.load_table(name), snap, newest, member)
                log.warning(
                    "undid %s's commit of flush %d%s, cut short by a crash",
                    name,
                    newest,
                    f" of member {member}" if member else "",
                )
                rolled.append(name)
        return rolled

    def roll_back_taken_over(self, member: str, partitions: set[int]) -> list[str]:
        """Undo other members' flushes cut short that hold any of `partitions`, which this
        member now owns: the member that made such a flush lost them (a live member finishes
        its flush before it lets partitions go), so nobody else will complete or undo it."""
        rolled: list[str] = []
        for other, parts in self.incomplete_lanes().items():
            if other != member and (parts is None or parts & partitions):
                rolled += self.roll_back_incomplete_flush(other)
        return rolled

    def _undo(self, table: Table, snap: Snapshot, flush: int, member: str = "") -> None:
        """Remove exactly the files `snap` added, in a new snapshot that says so: commits
        made since (batch loads, compaction) stay."""
        added = _added_files(table, snap)
        props = {UNDONE_FLUSH: str(flush)} | ({MEMBER: member} if member else {})
        with (
            MemoTransaction(table) as tx,
            tx.update_snapshot(snapshot_properties=props).overwrite() as ow,
        ):
            for f in added:
                ow.delete_data_file(f)
        self._tables.pop(table.name()[-1], None)

    def current_snapshot_id(self, table_name: str) -> int:
        snapshot = self.load_table(table_name).current_snapshot()
        return snapshot.snapshot_id if snapshot is not None else 0

    def latest_k2_state(
        self, member: str = "", partitions: int = 0
    ) -> tuple[dict[str, Watermark], dict[str, Any]]:
        """(watermarks by "EXCHANGE:SYMBOL:stream", log position) to resume after."""
        state = self.k2_state(member, partitions)
        return state.watermarks, state.log_position

    def open_ledger_rows(self, since_us: int | None = None) -> list[dict[str, Any]]:
        """Gap and outage entries of market.sequence_events whose latest row is `open`, each
        with `span_first`/`span_last`: the widest range any of its rows spoke of. Only
        entries detected at or after `since_us` are read (every row of an entry carries
        the entry's detected_at, so the day partitions before it are never opened)."""
        table = self.load_table("sequence_events")
        if table.current_snapshot() is None:
            return []
        row_filter = "kind IN ('gap', 'outage')"
        if since_us:
            # An integer literal: microseconds, which Iceberg binds to the timestamptz column.
            row_filter += f" AND detected_at >= {int(since_us)}"
        rows = table.scan(row_filter=row_filter).to_arrow()
        if rows.num_rows == 0:
            return []
        latest: dict[str, dict[str, Any]] = {}
        spans: dict[str, tuple[int, int]] = {}
        for row in rows.sort_by([("recorded_at", "ascending")]).to_pylist():
            eid = row["event_id"]
            latest[eid] = row
            first, last = row["first_missing"], row["last_missing"]
            if first is not None and last is not None:
                lo, hi = spans.get(eid, (first, last))
                spans[eid] = (min(lo, first), max(hi, last))
        out = []
        for eid, row in latest.items():
            if row["status"] == "open":
                row["span_first"], row["span_last"] = spans.get(
                    eid, (row["first_missing"], row["last_missing"])
                )
                out.append(row)
        return out

    def stats(self) -> dict[str, dict[str, int | None]]:
        """Per table: rows, data files, current snapshot id and snapshot count."""
        out: dict[str, dict[str, int | None]] = {}
        for name in TABLE_NAMES:
            table = self.load_table(name)
            snapshot = table.current_snapshot()
            summary = snapshot.summary if snapshot is not None else None
            props = summary.additional_properties if summary is not None else {}
            out[name] = {
                "rows": int(props.get("total-records", 0)),
                "data_files": int(props.get("total-data-files", 0)),
                "snapshot_id": snapshot.snapshot_id if snapshot is not None else None,
                "snapshots": len(table.metadata.snapshots),
            }
        return out


def lane_states(table: Table, name: str) -> dict[str, tuple[TableState, Snapshot | None]]:
    """Each member's newest state in `table`, passing over flushes undone since, with the
    snapshot when it is the member's own commit (None: a copy another member carried).

    The newest snapshot with k2 state names every lane (its own and the `k2.lanes` copies);
    the walk goes further back only for a lane whose newest flush was undone."""
    undone: set[tuple[str, int]] = set()
    found: dict[str, tuple[TableState, Snapshot | None]] = {}
    known: set[str] | None = None
    for snapshot in ancestors_of(table.current_snapshot(), table.metadata):
        props = snapshot.summary.additional_properties if snapshot.summary else {}
        if UNDONE_FLUSH in props:
            undone.add((props.get(MEMBER, ""), int(props[UNDONE_FLUSH])))
            continue
        if MAINTENANCE_PROPERTY in props:
            # A copy of the state: the writer's own snapshot is the one to read and undo.
            continue
        states = table_states(name, props, snapshot.timestamp_ms)
        if not states:
            continue
        for i, state in enumerate(states):
            if state.member not in found and (state.member, state.flush) not in undone:
                own = i == 0 and state.member == props.get(MEMBER, "")
                found[state.member] = (state, snapshot if own else None)
        if known is None:
            known = {state.member for state in states}
        if known <= found.keys():
            break
    return found


def _own_snapshot(table: Table, member: str, flush: int) -> Snapshot | None:
    """The snapshot in which `member` committed its flush `flush` to `table`."""
    for snapshot in ancestors_of(table.current_snapshot(), table.metadata):
        props = snapshot.summary.additional_properties if snapshot.summary else {}
        if UNDONE_FLUSH in props or MAINTENANCE_PROPERTY in props:
            continue
        has_state = WATERMARKS in props or LOG_POSITION in props
        if has_state and props.get(MEMBER, "") == member and int(props.get(FLUSH, "0")) == flush:
            return snapshot
    return None


def _added_files(table: Table, snap: Snapshot) -> list[DataFile]:
    return [
        entry.data_file
        for manifest in snap.manifests(table.io)
        for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True)
        if entry.status == ManifestEntryStatus.ADDED and entry.snapshot_id == snap.snapshot_id
    ]


def _result(
    table: Table, snapshot: Snapshot, infos: tuple[DataFileInfo, ...], rows: int, retries: int
) -> CommitResult:
    props = snapshot.summary.additional_properties if snapshot.summary is not None else {}
    return CommitResult(
        snapshot.snapshot_id,
        infos,
        rows,
        retries,
        total_rows=int(props.get("total-records", 0)),
        total_files=int(props.get("total-data-files", 0)),
        snapshots=len(table.metadata.snapshots),
    )


def sorted_rows(data: pa.Table, columns: Sequence[str]) -> pa.Table:
    """`data.sort_by` on `columns`, ascending, nulls first, ties in input order."""
    return data.take(sort_order(data, columns))


def sort_order(data: pa.Table, columns: Sequence[str]) -> pa.Array:
    """The indices that sort `data` as `data.sort_by` on `columns` would, with each string
    column compared as the rank of its value among the column's distinct values: integers
    sort faster than strings (a flush of 250,000 trades of 20 symbols, by symbol, time and
    sequence: sort_indices 19.9 -> 9.6 ms; /tmp/s13/sort.py)."""
    keys: dict[str, pa.Array | pa.ChunkedArray] = {}
    for name in columns:
        column = data.column(name)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            codes = pc.dictionary_encode(column.combine_chunks())
            rank = pc.rank(codes.dictionary, sort_keys="ascending", tiebreaker="first")
            column = pc.take(rank, codes.indices)  # a null value stays null
        keys[name] = column
    return pc.sort_indices(
        pa.table(keys), sort_keys=[(name, "ascending", "at_start") for name in columns]
    )


def write_data_files(
    table: Table,
    data: pa.Table,
    split_rows: int = 0,
    max_files: int = 1,
    order: pa.Array | None = None,
) -> list[DataFile]:
    """Write `data` as the table's Parquet data files, as pyiceberg's append would. A flush
    is nearly always one partition (a day, one exchange): its rows are written as they are,
    without the copy pyiceberg's split makes of every partition (a flush's size again, at
    the writer's peak). Other data is split by pyiceberg.

    One partition of at least twice `split_rows` rows is cut into up to `max_files` runs of
    at least `split_rows` rows, in order, written at once by pyiceberg's thread pool:
    Parquet writing releases the GIL (2,000,000 trades on 2 cores, 1.29 -> 0.88 s;
    /tmp/s14/split.py). Each file then holds a run of the sorted rows.

    `order`: the rows' order (`sort_order`); each run takes its own rows in a thread of
    that pool, so the copy that sorts them is made on all cores too (2,000,000 trades: a
    take of 160-360 ms on one core)."""
    meta = table.metadata
    key = _only_partition(table, data)
    if key is None:
        if order is not None:
            data = data.take(order)
        return list(_dataframe_to_data_files(table_metadata=meta, df=data, io=table.io))
    target = int(
        meta.properties.get(
            TableProperties.WRITE_TARGET_FILE_SIZE_BYTES,
            TableProperties.WRITE_TARGET_FILE_SIZE_BYTES_DEFAULT,
        )
    )
    schema = pyarrow_to_schema(
        data.schema, name_mapping=meta.schema().name_mapping, format_version=meta.format_version
    )
    ways = max(1, min(max_files, data.num_rows // split_rows)) if split_rows > 0 else 1
    step = -(-data.num_rows // ways)
    starts = range(0, data.num_rows, step)
    runs: Iterable[pa.Table]
    if order is None:
        runs = (data.slice(start, step) for start in starts)
    else:
        taken = order  # a name the closure can see as not None
        runs = ExecutorFactory.get_or_create().map(
            lambda start: data.take(taken.slice(start, step)), starts
        )
    write_uuid = uuid.uuid4()
    tasks = (
        WriteTask(
            write_uuid=write_uuid,
            task_id=n,
            record_batches=batches,
            partition_key=key,
            schema=schema,
        )
        for n, batches in enumerate(b for run in runs for b in bin_pack_arrow_table(run, target))
    )
    return list(write_file(io=table.io, table_metadata=meta, tasks=tasks))


def _only_partition(table: Table, data: pa.Table) -> PartitionKey | None:
    """The partition every row of `data` falls in, or None: the table is not partitioned,
    or the rows span more than one partition (or have nulls in a partition source)."""
    spec, schema = table.spec(), table.schema()
    if spec.is_unpartitioned() or data.num_rows == 0:
        return None
    values = []
    for part in spec.fields:
        name = schema.find_column_name(part.source_id)
        if name is None or name not in data.column_names:
            return None
        source = schema.find_field(part.source_id)
        transformed = part.transform.pyarrow_transform(source.field_type)(data.column(name))
        if transformed.null_count:
            return None
        bounds = pc.min_max(transformed)
        low, high = bounds["min"].as_py(), bounds["max"].as_py()
        if low != high:
            return None
        values.append(PartitionFieldValue(field=part, value=low))
    return PartitionKey(field_values=values, partition_spec=spec, schema=schema)


def _file_info(table: Table, f: DataFile) -> DataFileInfo:
    spec = table.spec()
    schema = table.schema()
    partition: dict[str, Any] = {}
    for i, field in enumerate(spec.fields):
        value = f.partition[i]
        source_type = schema.find_field(field.source_id).field_type
        partition[field.name] = (
            field.transform.to_human_string(source_type, value) if value is not None else None
        )
    time_id = schema.find_field(TABLES[table.name()[-1]].time_column).field_id
    low = (f.lower_bounds or {}).get(time_id)
    high = (f.upper_bounds or {}).get(time_id)
    ts = TimestamptzType()
    return DataFileInfo(
        path=f.file_path,
        record_count=f.record_count,
        size_bytes=f.file_size_in_bytes,
        partition=partition,
        min_timestamp=int(from_bytes(ts, low)) if low is not None else None,
        max_timestamp=int(from_bytes(ts, high)) if high is not None else None,
    )
