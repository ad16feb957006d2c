"""HotFiles: the newest data files of trades and quotes held in memory as Arrow, within a
byte budget, so that a window over them is a slice instead of a Parquet scan: DuckDB takes
4-6 ms a query here whatever the rows, a slice well under one. kdb+ serves the current day
from memory (its RDB) for the same reason.

Data files are immutable, so a held file never goes stale: it is dropped when it leaves the
index (compacted away) or when newer files need its room. The QueryPool loads files ahead
of requests, one task; query workers read the held set at once, without a lock (it is
replaced whole, never changed in place).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from k2d.query._files import FileEntry, SymbolKey
from k2d.storage import TABLES

if TYPE_CHECKING:
    from k2d.query._params import Window

__all__ = ["HotFile", "HotFiles", "HotScan"]

# Bytes a row is guessed to take in memory before a file of its table has been loaded
# (a trade row here takes about 165).
_FIRST_GUESS = 200.0


@dataclass(frozen=True, slots=True)
class HotFile:
    """One data file's rows, sorted by (exchange, symbol, timestamp), with each pair's rows."""

    table: pa.Table
    spans: dict[SymbolKey, tuple[int, int]]
    nbytes: int

    @staticmethod
    def read(path: str, table: str) -> HotFile:
        """Read and sort a data file (blocking)."""
        schema = TABLES[table].arrow_schema
        rows = pq.read_table(path, columns=schema.names, use_threads=False)
        rows = rows.cast(schema)
        order = pc.sort_indices(
            rows, [("exchange", "ascending"), ("symbol", "ascending"), ("timestamp", "ascending")]
        )
        rows = rows.take(order).combine_chunks()
        counts = rows.group_by(["exchange", "symbol"], use_threads=False).aggregate(
            [([], "count_all")]
        )
        spans: dict[SymbolKey, tuple[int, int]] = {}
        start = 0
        for ex, sym, n in sorted(
            zip(
                counts.column("exchange").to_pylist(),
                counts.column("symbol").to_pylist(),
                counts.column("count_all").to_pylist(),
                strict=True,
            )
        ):
            spans[(ex, sym)] = (start, start + n)
            start += n
        return HotFile(rows, spans, rows.nbytes)

    def pick(
        self,
        entry: FileEntry,
        window: Window,
        exchanges: Collection[str],
        symbols: Collection[str],
    ) -> Iterable[pa.Table]:
        """The rows of the asked pairs in `window`: slices found by binary search on time."""
        for key, (lo, hi) in self.spans.items():
            if (exchanges and key[0] not in exchanges) or (symbols and key[1] not in symbols):
                continue
            st = entry.symbols.get(key)
            if st is None or not (window.start <= st.min_ts and st.max_ts < window.end):
                times = self.table.column("timestamp")
                first = bisect.bisect_left(times, window.start, lo, hi, key=_micros)
                hi = bisect.bisect_left(times, window.end, first, hi, key=_micros)
                lo = first
            if hi > lo:
                yield self.table.slice(lo, hi - lo)


@dataclass(frozen=True, slots=True)
class HotScan:
    """What a window plan reads, for the hot tier to answer instead of DuckDB if it holds
    every file: the rows of `entries` in `window`, of the asked exchanges and symbols (empty:
    all)."""

    entries: tuple[FileEntry, ...]
    window: Window
    exchanges: tuple[str, ...]
    symbols: tuple[str, ...]


def _micros(value: pa.TimestampScalar) -> int:
    return int(value.value)


class HotFiles:
    """The newest files that fit in `max_bytes`, by their newest event time across tables."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._held: dict[str, HotFile] = {}
        self._row_bytes: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def files(self) -> int:
        return len(self._held)

    @property
    def paths(self) -> frozenset[str]:
        """The data files held."""
        return frozenset(self._held)

    @property
    def bytes(self) -> int:
        return sum(h.nbytes for h in self._held.values())

    def plan(
        self, tables: Mapping[str, Sequence[FileEntry]], skip: Collection[str] = ()
    ) -> list[tuple[str, FileEntry]]:
        """Drop the held files that are no longer among the newest that fit, and return the
        (table, file) pairs to load, newest first. `skip`: files not to load (unreadable)."""
        with self._lock:
            self._held, due = self._choose(tables, skip)
        return due

    def due(
        self, tables: Mapping[str, Sequence[FileEntry]], skip: Collection[str] = ()
    ) -> list[tuple[str, FileEntry]]:
        """What `plan` would return, changing nothing."""
        return self._choose(tables, skip)[1]

    def _choose(
        self, tables: Mapping[str, Sequence[FileEntry]], skip: Collection[str]
    ) -> tuple[dict[str, HotFile], list[tuple[str, FileEntry]]]:
        if self.max_bytes <= 0:
            return {}, []
        held = self._held
        newest_first = sorted(
            ((t, e) for t, entries in tables.items() for e in entries),
            key=lambda te: -(2**63) if te[1].max_ts is None else te[1].max_ts,
            reverse=True,
        )
        wanted: dict[str, HotFile] = {}
        due: list[tuple[str, FileEntry]] = []
        total = 0
        for table, e in newest_first:
            hot = held.get(e.path)
            if hot is None and e.path in skip:
                continue
            total += hot.nbytes if hot is not None else self._guess(table, e)
            if total > self.max_bytes:
                break
            if hot is not None:
                wanted[e.path] = hot
            else:
                due.append((table, e))
        return wanted, due

    def add(self, table: str, entry: FileEntry, hot: HotFile) -> bool:
        """Hold a loaded file, if it still fits; False when it does not."""
        with self._lock:
            if entry.rows:
                self._row_bytes[table] = hot.nbytes / entry.rows
            if self.bytes + hot.nbytes > self.max_bytes:
                return False
            self._held = {**self._held, entry.path: hot}
            return True

    def rows(
        self,
        entries: Sequence[FileEntry],
        window: Window,
        exchanges: Collection[str],
        symbols: Collection[str],
    ) -> pa.Table | None:
        """The rows of `entries` in `window` for the asked pairs (empty: all), in no order;
        None unless every one of the files is held."""
        held = self._held
        hot = [held.get(e.path) for e in entries]
        if not entries or any(h is None for h in hot):
            return None
        parts = [
            part
            for h, e in zip(hot, entries, strict=True)
            if h is not None
            for part in h.pick(e, window, exchanges, symbols)
        ]
        if not parts:
            first = next(h for h in hot if h is not None)
            return first.table.schema.empty_table()
        return pa.concat_tables(parts)

    def _guess(self, table: str, e: FileEntry) -> int:
        return int(e.rows * self._row_bytes.get(table, _FIRST_GUESS))
