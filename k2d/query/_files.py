"""The data files of one table snapshot, with what each holds, so that a query opens only the
files its time window and symbols can touch.

Per file: partition day and exchange, row count, min/max event time, and per (exchange,
symbol) the rows, time range and sequence range (scanned once by DuckDB when the file enters
the index; data files are immutable). Blocking code: callers run it in worker threads.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Any

from pyiceberg.conversions import from_bytes
from pyiceberg.types import TimestamptzType

from k2d.messages import DataFileInfo
from k2d.storage import TABLES

if TYPE_CHECKING:
    import duckdb
    from pyiceberg.manifest import DataFile
    from pyiceberg.table import Table

__all__ = [
    "FileEntry",
    "SymbolKey",
    "SymbolStats",
    "TableFiles",
    "entry_from_data_file",
    "entry_from_info",
    "local_path",
    "overlap",
    "summarize",
]

DAY_US = 86_400_000_000
_EPOCH_DAY = date(1970, 1, 1)
_SUMMARY_CHUNK = 512
SymbolKey = tuple[str, str]
"""(exchange, symbol)"""


def overlap(spans: Mapping[SymbolKey, list[tuple[int, int]]]) -> bool:
    """Do two of a pair's (low, high) spans, both ends included, meet?"""
    for pair_spans in spans.values():
        for (_, hi), (lo, _) in itertools.pairwise(sorted(pair_spans)):
            if lo <= hi:
                return True
    return False


@dataclass(frozen=True, slots=True)
class SymbolStats:
    rows: int
    min_ts: int
    max_ts: int
    min_seq: int | None = None
    max_seq: int | None = None

    def merge(self, other: SymbolStats) -> SymbolStats:
        return SymbolStats(
            rows=self.rows + other.rows,
            min_ts=min(self.min_ts, other.min_ts),
            max_ts=max(self.max_ts, other.max_ts),
            min_seq=_opt(min, self.min_seq, other.min_seq),
            max_seq=_opt(max, self.max_seq, other.max_seq),
        )


def _opt(fn: Any, a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return int(fn(a, b))


@dataclass(frozen=True, slots=True)
class FileEntry:
    path: str
    rows: int
    size: int
    day: int | None
    exchange: str | None
    min_ts: int | None
    max_ts: int | None
    symbols: Mapping[SymbolKey, SymbolStats] = field(default_factory=dict)

    def touches(self, start: int, end: int) -> bool:
        lo = self.min_ts if self.min_ts is not None else -(2**63)
        hi = self.max_ts if self.max_ts is not None else 2**63
        return lo < end and hi >= start


def local_path(uri: str) -> str:
    """The filesystem path DuckDB opens; the query side reads local warehouses only."""
    if uri.startswith("file://"):
        return uri.removeprefix("file://")
    if uri.startswith("/"):
        return uri
    raise RuntimeError(f"the query pool reads local warehouses only, not {uri.split(':')[0]}://")


class _Day:
    """The files of one partition day, ordered by min time, with the longest file span."""

    __slots__ = ("entries", "los", "max_span")

    def __init__(self, entries: Iterable[FileEntry]) -> None:
        ordered = sorted(entries, key=_lo)
        self.entries = ordered
        self.los = [_lo(e) for e in ordered]
        self.max_span = max((_span(e) for e in ordered), default=0)

    def added(self, entries: Sequence[FileEntry]) -> _Day:
        return _Day([*self.entries, *entries])

    def between(self, start: int, end: int) -> Iterator[FileEntry]:
        first = bisect.bisect_left(self.los, start - self.max_span)
        last = bisect.bisect_left(self.los, end)
        for e in self.entries[first:last]:
            if e.touches(start, end):
                yield e


def _lo(e: FileEntry) -> int:
    return e.min_ts if e.min_ts is not None else -(2**63)


def _span(e: FileEntry) -> int:
    if e.min_ts is None or e.max_ts is None:
        return 2**63
    return e.max_ts - e.min_ts


class TableFiles:
    """The files of one snapshot of one table. Immutable: updates build a new instance."""

    def __init__(
        self,
        table: str,
        snapshot_id: int | None,
        sequence_number: int | None,
        entries: Iterable[FileEntry],
        metadata: Table | None,
        *,
        _days: dict[int | None, _Day] | None = None,
        _stats: dict[SymbolKey, SymbolStats] | None = None,
        _entries: tuple[FileEntry, ...] | None = None,
    ) -> None:
        self.table = table
        self.snapshot_id = snapshot_id
        self.sequence_number = sequence_number
        # pyiceberg table metadata as loaded with this snapshot (snapshot log, properties).
        self.metadata = metadata
        if _days is not None and _stats is not None and _entries is not None:
            self.entries = _entries
            self._days = _days
            self.symbol_stats = _stats
            return
        self.entries = tuple(entries)
        by_day: dict[int | None, list[FileEntry]] = {}
        for e in self.entries:
            by_day.setdefault(e.day if e.min_ts is not None else None, []).append(e)
        self._days = {d: _Day(es) for d, es in by_day.items()}
        self.symbol_stats = _aggregate(self.entries, {})

    def extended(
        self,
        snapshot_id: int,
        sequence_number: int | None,
        added: Sequence[FileEntry],
        metadata: Table | None,
    ) -> TableFiles:
        """This snapshot plus the files of an append on top of it."""
        days = dict(self._days)
        by_day: dict[int | None, list[FileEntry]] = {}
        for e in added:
            by_day.setdefault(e.day if e.min_ts is not None else None, []).append(e)
        for d, es in by_day.items():
            old = days.get(d)
            days[d] = old.added(es) if old is not None else _Day(es)
        return TableFiles(
            self.table,
            snapshot_id,
            sequence_number,
            (),
            metadata,
            _days=days,
            _stats=_aggregate(added, self.symbol_stats),
            _entries=self.entries + tuple(added),
        )

    def without_metadata(self) -> TableFiles:
        """The same files, without the table metadata they were loaded with."""
        return TableFiles(
            self.table,
            self.snapshot_id,
            self.sequence_number,
            (),
            None,
            _days=self._days,
            _stats=self.symbol_stats,
            _entries=self.entries,
        )

    @property
    def rows(self) -> int:
        return sum(e.rows for e in self.entries)

    def by_path(self) -> dict[str, FileEntry]:
        return {e.path: e for e in self.entries}

    def symbol_keys(
        self, exchanges: Collection[str] | None, symbols: Collection[str]
    ) -> list[SymbolKey]:
        """The (exchange, symbol) pairs of this snapshot matching the filters."""
        return [
            k for k in self.symbol_stats if k[1] in symbols and (not exchanges or k[0] in exchanges)
        ]

    def exchanges(self) -> set[str]:
        return {k[0] for k in self.symbol_stats}

    def select(
        self,
        start: int,
        end: int,
        *,
        exchanges: Collection[str] | None = None,
        keys: Collection[SymbolKey] | None = None,
    ) -> list[FileEntry]:
        """Files that may hold rows in [start, end) of the given exchanges and (exchange,
        symbol) keys (None: any)."""
        out: list[FileEntry] = []
        days: list[int | None] = [None]
        first_day, last_day = start // DAY_US, (end - 1) // DAY_US
        if last_day - first_day <= len(self._days):
            days.extend(range(first_day, last_day + 1))
        else:
            days.extend(d for d in self._days if d is not None and first_day <= d <= last_day)
        for d in days:
            day = self._days.get(d)
            if day is None:
                continue
            for e in day.between(start, end):
                if exchanges and e.exchange is not None and e.exchange not in exchanges:
                    continue
                if keys is not None and e.symbols is not None and not _has(e, keys, start, end):
                    continue
                out.append(e)
        return out


def _has(e: FileEntry, keys: Collection[SymbolKey], start: int, end: int) -> bool:
    for k in keys:
        st = e.symbols.get(k)
        if st is not None and st.min_ts < end and st.max_ts >= start:
            return True
    return False


def _aggregate(
    entries: Iterable[FileEntry], base: Mapping[SymbolKey, SymbolStats]
) -> dict[SymbolKey, SymbolStats]:
    out = dict(base)
    for e in entries:
        for k, st in e.symbols.items():
            old = out.get(k)
            out[k] = st if old is None else old.merge(st)
    return out


def _day_of(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, date):
        return (value - _EPOCH_DAY).days
    try:
        return (date.fromisoformat(str(value)) - _EPOCH_DAY).days
    except ValueError:
        return None


def entry_from_info(
    table: str, info: DataFileInfo, symbols: Mapping[SymbolKey, SymbolStats]
) -> FileEntry:
    """A file the writer reports in a Committed message."""
    time_part = f"{TABLES[table].time_column}_day"
    exchange = info.partition.get("exchange")
    return FileEntry(
        path=local_path(info.path),
        rows=info.record_count,
        size=info.size_bytes,
        day=_day_of(info.partition.get(time_part)),
        exchange=str(exchange) if exchange is not None else None,
        min_ts=info.min_timestamp,
        max_ts=info.max_timestamp,
        symbols=symbols,
    )


def entry_from_data_file(
    table: str, metadata: Table, f: DataFile, symbols: Mapping[SymbolKey, SymbolStats]
) -> FileEntry:
    """A file listed by pyiceberg planning."""
    spec = metadata.specs().get(f.spec_id, metadata.spec())
    day: int | None = None
    exchange: str | None = None
    time_part = f"{TABLES[table].time_column}_day"
    for i, pf in enumerate(spec.fields):
        value = f.partition[i]
        if pf.name == time_part:
            day = _day_of(value)
        elif pf.name == "exchange" and value is not None:
            exchange = str(value)
    time_id = metadata.schema().find_field(TABLES[table].time_column).field_id
    low = (f.lower_bounds or {}).get(time_id)
    high = (f.upper_bounds or {}).get(time_id)
    ts = TimestamptzType()
    return FileEntry(
        path=local_path(f.file_path),
        rows=f.record_count,
        size=f.file_size_in_bytes,
        day=day,
        exchange=exchange,
        min_ts=int(from_bytes(ts, low)) if low is not None else None,
        max_ts=int(from_bytes(ts, high)) if high is not None else None,
        symbols=symbols,
    )


_SUMMARY_SQL = """
SELECT filename, exchange, symbol, count(*), epoch_us(min("timestamp")),
       epoch_us(max("timestamp")), min(source_sequence), max(source_sequence)
FROM read_parquet(?, filename = true, hive_partitioning = false)
GROUP BY ALL
"""


def summarize(
    cursor: duckdb.DuckDBPyConnection, paths: Sequence[str]
) -> dict[str, dict[SymbolKey, SymbolStats]]:
    """Per file, per (exchange, symbol): rows, time range and sequence range."""
    out: dict[str, dict[SymbolKey, SymbolStats]] = {p: {} for p in paths}
    for i in range(0, len(paths), _SUMMARY_CHUNK):
        chunk = list(paths[i : i + _SUMMARY_CHUNK])
        for path, ex, sym, rows, lo, hi, smin, smax in cursor.execute(
            _SUMMARY_SQL, [chunk]
        ).fetchall():
            out.setdefault(path, {})[(ex, sym)] = SymbolStats(rows, lo, hi, smin, smax)
    return out
