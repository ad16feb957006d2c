"""FileIndex: the data files of the current snapshot of each queried table, kept up to date
by the writer's Committed messages, plus pyiceberg planning (LRU-cached) for older snapshots.

A Committed whose snapshot is an append on top of the indexed one adds its files; anything
else (a compaction's replace, an append whose parent the index never saw, a gap in the
messages) re-plans the table from its current snapshot. Blocking code: the QueryPool runs
`bootstrap` and `apply` in one maintenance thread at a time and `files` in query workers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from pyiceberg.table.snapshots import Operation

from k2d.query._bars import MinuteBars
from k2d.query._errors import QueryError
from k2d.query._files import (
    SymbolKey,
    SymbolStats,
    TableFiles,
    entry_from_data_file,
    entry_from_info,
    local_path,
    summarize,
)
from k2d.query._hot import HotFiles
from k2d.query._ledger import Ledger, read_events
from k2d.query._params import SnapshotSel
from k2d.storage import QUOTES, SEQUENCE_EVENTS, TRADES

if TYPE_CHECKING:
    import duckdb
    from pyiceberg.table import Table
    from pyiceberg.table.snapshots import Snapshot

    from k2d.messages import Committed
    from k2d.storage import Warehouse

__all__ = ["INDEXED_TABLES", "FileIndex"]

log = logging.getLogger(__name__)

INDEXED_TABLES = (TRADES, QUOTES, SEQUENCE_EVENTS)
_WITH_SYMBOLS = frozenset({TRADES, QUOTES})


class FileIndex:
    def __init__(
        self,
        warehouse: Warehouse,
        cache_size: int,
        max_ledger_events: int = 200_000,
        minute_bars: int = 200_000,
        hot_bytes: int = 0,
    ):
        self._wh = warehouse
        self._cache_size = max(1, cache_size)
        self._current: dict[str, TableFiles] = {}
        self._planned: OrderedDict[tuple[str, int], TableFiles] = OrderedDict()
        self._lock = threading.Lock()
        self.ledger = Ledger(max_events=max_ledger_events)
        self.bars = MinuteBars(minute_bars)
        self.hot = HotFiles(hot_bytes)
        self.replans = 0
        # Per table, a snapshot seen ahead of the index at the last refresh (see `refresh`).
        self._ahead: dict[str, int] = {}

    # -- maintenance (one thread at a time) ------------------------------------------------

    def bootstrap(self, cursor: duckdb.DuckDBPyConnection) -> None:
        """Plan the current snapshot of every indexed table and load the ledger."""
        for name in INDEXED_TABLES:
            self._replan(name, self._wh.load_table(name), cursor)

    def apply(self, msg: Committed, cursor: duckdb.DuckDBPyConnection) -> bool:
        """Fold one commit into the index; False when it was already included."""
        if msg.table not in INDEXED_TABLES:
            return False
        current = self._current.get(msg.table)
        if current is None:
            self._replan(msg.table, self._wh.load_table(msg.table), cursor)
            return True
        metadata = self._wh.load_table(msg.table)
        snapshot = metadata.metadata.snapshot_by_id(msg.snapshot_id)
        if snapshot is not None and _includes(current, snapshot):
            return False
        if (
            snapshot is not None
            and snapshot.parent_snapshot_id == current.snapshot_id
            and _operation(snapshot) == Operation.APPEND
        ):
            self._append(msg, snapshot, metadata, current, cursor)
        else:
            log.info(
                "%s: snapshot %d does not extend the indexed %s; re-planning",
                msg.table,
                msg.snapshot_id,
                current.snapshot_id,
            )
            self._replan(msg.table, metadata, cursor)
        return True

    def refresh(self, cursor: duckdb.DuckDBPyConnection) -> list[str]:
        """Re-plan the tables whose catalog moved on without a Committed saying so: commits
        by other processes (`k2d load`, `k2d compact`). A snapshot ahead of the index is
        given one refresh interval to arrive as a Committed (the writer's commit in flight)
        before its table is re-planned. Returns the tables re-planned."""
        replanned = []
        for name in INDEXED_TABLES:
            indexed = self._current.get(name)
            if indexed is None:
                continue
            metadata = self._wh.load_table(name)
            snapshot = metadata.current_snapshot()
            if snapshot is None or _includes(indexed, snapshot):
                self._ahead.pop(name, None)
                continue
            seen = self._ahead.get(name)
            earlier = metadata.metadata.snapshot_by_id(seen) if seen is not None else None
            if earlier is not None and not _includes(indexed, earlier):
                log.info(
                    "%s: snapshot %d was committed elsewhere; re-planning",
                    name,
                    snapshot.snapshot_id,
                )
                self._replan(name, metadata, cursor)
                self._ahead.pop(name, None)
                replanned.append(name)
            else:
                self._ahead[name] = snapshot.snapshot_id
        return replanned

    def _append(
        self,
        msg: Committed,
        snapshot: Snapshot,
        metadata: Table,
        current: TableFiles,
        cursor: duckdb.DuckDBPyConnection,
    ) -> None:
        paths = [local_path(f.path) for f in msg.files]
        summaries = summarize(cursor, paths) if msg.table in _WITH_SYMBOLS else {}
        entries = [
            entry_from_info(msg.table, f, summaries.get(p, {}))
            for f, p in zip(msg.files, paths, strict=True)
        ]
        self._publish(
            current.extended(snapshot.snapshot_id, snapshot.sequence_number, entries, metadata)
        )
        if msg.table == SEQUENCE_EVENTS:
            self.ledger = self.ledger.merged(read_events(cursor, paths))

    def _replan(self, name: str, metadata: Table, cursor: duckdb.DuckDBPyConnection) -> None:
        self.replans += 1
        files = self._plan(name, metadata, metadata.current_snapshot(), cursor)
        self._publish(files)
        if name == SEQUENCE_EVENTS:
            events = read_events(cursor, [e.path for e in files.entries])
            self.ledger = Ledger(max_events=self.ledger.max_events).merged(events)

    def _publish(self, files: TableFiles) -> None:
        with self._lock:
            self._current[files.table] = files
            if files.snapshot_id is not None:
                self._remember(files)

    # -- reads (any thread) ---------------------------------------------------------------

    def load_table(self, name: str) -> Table:
        """Fresh table metadata from the catalog (any table, indexed or not)."""
        return self._wh.load_table(name)

    def current(self, table: str) -> TableFiles:
        with self._lock:
            files = self._current.get(table)
        if files is None:
            raise QueryError(503, "not_ready", "the query index is not loaded yet")
        return files

    def files(self, table: str, sel: SnapshotSel, cursor: duckdb.DuckDBPyConnection) -> TableFiles:
        """The files of the selected snapshot of `table` (planned and cached if not current)."""
        current = self.current(table)
        if sel.current:
            return current
        metadata = current.metadata
        snapshot: Snapshot | None = None
        if sel.snapshot_id is not None:
            if metadata is not None:
                snapshot = metadata.metadata.snapshot_by_id(sel.snapshot_id)
            if snapshot is None:
                raise QueryError(
                    404, "unknown_snapshot", f"{table} has no snapshot {sel.snapshot_id}"
                )
        else:
            assert sel.as_of_us is not None
            if metadata is not None:
                snapshot = metadata.snapshot_as_of_timestamp(sel.as_of_us // 1_000)
            if snapshot is None:
                # Before the first commit the table was empty: that is the answer.
                return TableFiles(table, None, None, (), metadata)
        if snapshot.snapshot_id == current.snapshot_id:
            return current
        assert metadata is not None
        key = (table, snapshot.snapshot_id)
        with self._lock:
            cached = self._planned.get(key)
            if cached is not None:
                self._planned.move_to_end(key)
                return cached
        files = self._plan(table, metadata, snapshot, cursor)
        with self._lock:
            self._remember(files)
        return files

    def _remember(self, files: TableFiles) -> None:
        """Cache a snapshot's files without its table metadata: only the current snapshot's
        is read, and a full copy per commit (up to snapshot_cache_size, ~1 MB each at a few
        hundred snapshots) was what made a running daemon's RSS creep."""
        assert files.snapshot_id is not None
        key = (files.table, files.snapshot_id)
        self._planned[key] = files.without_metadata()
        self._planned.move_to_end(key)
        while len(self._planned) > self._cache_size:
            self._planned.popitem(last=False)

    def _plan(
        self,
        name: str,
        metadata: Table,
        snapshot: Snapshot | None,
        cursor: duckdb.DuckDBPyConnection,
    ) -> TableFiles:
        if snapshot is None:
            return TableFiles(name, None, None, (), metadata)
        started = time.perf_counter()
        tasks = list(metadata.scan(snapshot_id=snapshot.snapshot_id).plan_files())
        if any(t.delete_files for t in tasks):
            # Delete files would need merge-on-read; k2d's committers only append and replace.
            raise QueryError(
                501, "unsupported_snapshot", f"{name} snapshot {snapshot.snapshot_id} has deletes"
            )
        with self._lock:
            current = self._current.get(name)
        known = current.by_path() if current is not None else {}
        paths = [local_path(t.file.file_path) for t in tasks]
        summaries: dict[str, dict[SymbolKey, SymbolStats]] = {}
        if name in _WITH_SYMBOLS:
            summaries = summarize(cursor, [p for p in paths if p not in known])
        entries = []
        for t, p in zip(tasks, paths, strict=True):
            old = known.get(p)
            if old is not None:
                entries.append(old)
            else:
                entries.append(entry_from_data_file(name, metadata, t.file, summaries.get(p, {})))
        log.debug(
            "%s: planned snapshot %d (%d files) in %.3fs",
            name,
            snapshot.snapshot_id,
            len(entries),
            time.perf_counter() - started,
        )
        return TableFiles(name, snapshot.snapshot_id, snapshot.sequence_number, entries, metadata)


def _includes(indexed: TableFiles, snapshot: Snapshot) -> bool:
    """Whether the indexed state already contains `snapshot` (it, or a later one)."""
    if snapshot.snapshot_id == indexed.snapshot_id:
        return True
    return (
        indexed.sequence_number is not None
        and snapshot.sequence_number is not None
        and snapshot.sequence_number <= indexed.sequence_number
    )


def _operation(snapshot: Snapshot) -> Operation | None:
    return snapshot.summary.operation if snapshot.summary is not None else None
