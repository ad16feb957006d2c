"""Minute bars of each data file's trades, remembered: a data file never changes once
written, so its per-minute open, high, low, close, volume, turnover and count, computed
once, answer every later OHLCV request in whole UTC minutes by merging a few thousand bars
instead of aggregating the file's trades again."""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa

from k2d.query._files import FileEntry, SymbolKey, SymbolStats, overlap

if TYPE_CHECKING:
    import duckdb

__all__ = [
    "MINUTE_US",
    "ORDER_KEY",
    "TURNOVER",
    "VOLUME",
    "MinuteBars",
    "partials_sql",
    "units",
    "vwap",
]

MINUTE_US = 60_000_000
_US = 'epoch_us("timestamp")'
# First and last trade by (time, venue sequence, platform sequence), the order the raw
# path's first()/last() use, carried with their key so that bars of two files merge exactly.
_TRADE = f"{{'t': {_US}, 's': coalesce(source_sequence, -1), 'p': platform_sequence, 'x': price}}"
ORDER_KEY = '"timestamp", coalesce(source_sequence, -1), platform_sequence'


def units(decimal: str) -> str:
    """An exact decimal as the HUGEINT count of its last digit (1e-scale): DuckDB prints the
    full scale, so dropping the point is exact. Per bar, not per row: a cast to text."""
    return f"CAST(replace(CAST({decimal} AS VARCHAR), '.', '') AS HUGEINT)"


def vwap(turnover_units: str, volume_units: str) -> str:
    """VWAP = turnover / volume, exact: in units of 1e-16 over units of 1e-8 gives 1e-8
    units, divided with rounding half up (HUGEINT operands: // on DECIMAL is not integer
    division)."""
    return (
        f"CAST((2 * {turnover_units} + {volume_units}) "
        f"// NULLIF(2 * {volume_units}, 0) AS DECIMAL(38,0)) "
        "* CAST(0.00000001 AS DECIMAL(9,8))"
    )


# decimal(18,8) * decimal(18,8) is decimal(18,16) in DuckDB and overflows: widen first. The
# sum is decimal(38,16), the quantities decimal(38,8).
TURNOVER = "sum(CAST(price AS DECIMAL(38,8)) * CAST(quantity AS DECIMAL(38,8)))"
VOLUME = "sum(quantity)"
_PARTIAL_AGGREGATES = (
    f"{_US} - ({_US} % {MINUTE_US} + {MINUTE_US}) % {MINUTE_US} AS minute, "
    '"exchange", "symbol", '
    f"first({_TRADE} ORDER BY {ORDER_KEY}) AS o, max(price) AS high, min(price) AS low, "
    f"last({_TRADE} ORDER BY {ORDER_KEY}) AS c, {VOLUME} AS volume, count(*) AS n, "
    f"{units(VOLUME)} AS volume_units, {units(TURNOVER)} AS turnover_units"
)


def partials_sql(source: str, where: str, with_filename: bool = False) -> str:
    """Per-minute bars of the trades of `source` that meet `where`: the minute's bar as it
    stands (volume and VWAP as the trades give them), and volume and turnover as integer
    units (1e-8 and 1e-16) for merging with other files' bars of the same minute: those
    add exactly, and the text casts of `units` are paid once, when a file is read."""
    extra = "filename, " if with_filename else ""
    inner = f"SELECT {extra}{_PARTIAL_AGGREGATES} FROM {source} WHERE {where} GROUP BY ALL"
    return f"SELECT *, {vwap('turnover_units', 'volume_units')} AS vwap FROM ({inner})"


@dataclass(frozen=True)
class _Part:
    """One file's minute bars of one pair, ordered by minute, from `lo` to `hi`."""

    table: pa.Table
    lo: int
    hi: int


class MinuteBars:
    """(data file, exchange, symbol) -> that file's minute bars for the pair, least recently
    used forgotten first beyond `max_rows` bars in all (about 220 bytes each). Shared by the
    query workers' threads."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self._parts: OrderedDict[tuple[str, SymbolKey], _Part] = OrderedDict()
        self._rows = 0
        self._lock = threading.Lock()
        self.computed = 0  # (file, pair)s aggregated from Parquet, for tests and metrics

    @property
    def rows(self) -> int:
        return self._rows

    def fits(self, entries: Sequence[FileEntry], keys: Collection[SymbolKey]) -> bool:
        """Would the bars of `keys` in `entries` (at most one a minute each file spans for a
        pair) fit within the bound? Larger requests aggregate the trades inside DuckDB,
        under its memory limit, instead of holding that many bars here."""
        most = 0
        for e in entries:
            for k, st in e.symbols.items():
                if k in keys:
                    most += _most(st)
        return most <= self.max_rows

    def due(self, entries: Sequence[FileEntry], budget: int) -> list[FileEntry]:
        """The newest files whose bars of every pair, together, fit in `budget` bars, less
        those held already: the ones to compute before anyone asks (`ahead`)."""
        out: list[FileEntry] = []
        total = 0
        newest_first = sorted(entries, key=lambda e: -(2**63) if e.max_ts is None else e.max_ts)
        for e in reversed(newest_first):
            total += sum(_most(st) for st in e.symbols.values())
            if total > min(budget, self.max_rows):
                break
            with self._lock:
                held = all((e.path, k) in self._parts for k in e.symbols)
            if not held:
                out.append(e)
        return out

    def ahead(self, cursor: duckdb.DuckDBPyConnection, entries: Sequence[FileEntry]) -> None:
        """Compute and keep the bars of every pair in `entries` not held yet, so that the
        first OHLCV request over these files merges bars instead of aggregating trades."""
        with self._lock:
            missing = [
                (e.path, k) for e in entries for k in e.symbols if (e.path, k) not in self._parts
            ]
        if missing:
            self._compute(cursor, missing)

    def bars(
        self,
        cursor: duckdb.DuckDBPyConnection,
        entries: Sequence[FileEntry],
        keys: Collection[SymbolKey],
    ) -> tuple[pa.Table, bool]:
        """All minute bars of `keys` in `entries`, computing (in one query) the ones not
        held; and whether no minute of a pair has bars in two files (each bar is whole)."""
        wanted = [(e.path, k) for e in entries for k in e.symbols if k in keys]
        found: dict[tuple[str, SymbolKey], _Part] = {}
        with self._lock:
            for key in wanted:
                part = self._parts.get(key)
                if part is not None:
                    self._parts.move_to_end(key)
                    found[key] = part
        missing = [key for key in wanted if key not in found]
        if missing:
            found.update(self._compute(cursor, missing))
        parts = [found[key] for key in wanted]
        if not parts:
            return _EMPTY, True
        return pa.concat_tables([p.table for p in parts]).combine_chunks(), _disjoint(wanted, parts)

    def _compute(
        self, cursor: duckdb.DuckDBPyConnection, missing: Sequence[tuple[str, SymbolKey]]
    ) -> dict[tuple[str, SymbolKey], _Part]:
        paths = sorted({path for path, _ in missing})
        pairs = sorted({k for _, k in missing})
        where = " OR ".join('("exchange" = ? AND "symbol" = ?)' for _ in pairs)
        sql = partials_sql(
            "read_parquet(?, hive_partitioning = false, filename = true)", where, True
        )
        params: list[object] = [paths]
        for ex, sym in pairs:
            params.extend((ex, sym))
        # The SQL is this module's text and placeholders: the paths and pairs are bound.
        cursor.execute(f"SELECT * FROM ({sql}) ORDER BY filename, exchange, symbol, minute", params)
        reader = cursor.to_arrow_reader(65_536)
        assert reader is not None
        table = reader.read_all()
        runs = zip(
            table.column("filename").to_pylist(),
            table.column("exchange").to_pylist(),
            table.column("symbol").to_pylist(),
            strict=True,
        )
        minutes = table.column("minute").to_pylist()
        table = table.drop_columns(["filename"])
        out: dict[tuple[str, SymbolKey], _Part] = {}
        start = 0
        for (path, ex, sym), run in itertools.groupby(runs):
            end = start + sum(1 for _ in run)
            # A copy: a slice would keep the whole result alive while any part is held.
            rows = table.take(pa.array(range(start, end), pa.int64()))
            out[(path, (ex, sym))] = _Part(rows, minutes[start], minutes[end - 1])
            start = end
        for path, pair in missing:
            if (path, pair) not in out:
                # The file index found this pair's rows in this file (k2d.query._files);
                # bars of nothing would be a silently wrong answer.
                raise RuntimeError(f"{path}: no trades of {pair} where the file index has some")
        with self._lock:
            for key, part in out.items():
                self.computed += 1
                if part.table.num_rows > self.max_rows:
                    continue
                old = self._parts.pop(key, None)
                if old is not None:
                    self._rows -= old.table.num_rows
                self._parts[key] = part
                self._rows += part.table.num_rows
            while self._rows > self.max_rows and self._parts:
                _, dropped = self._parts.popitem(last=False)
                self._rows -= dropped.table.num_rows
        return out


def _most(st: SymbolStats) -> int:
    """At most this many minute bars of one pair in one file: a bar a minute it spans."""
    return (st.max_ts - st.min_ts) // MINUTE_US + 2


def _disjoint(keys: Sequence[tuple[str, SymbolKey]], parts: Sequence[_Part]) -> bool:
    """No two files hold bars of the same pair in the same minute."""
    spans: dict[SymbolKey, list[tuple[int, int]]] = {}
    for (_, pair), part in zip(keys, parts, strict=True):
        spans.setdefault(pair, []).append((part.lo, part.hi))
    return not overlap(spans)


_TRADE_TYPE = pa.struct(
    [("t", pa.int64()), ("s", pa.int64()), ("p", pa.int64()), ("x", pa.decimal128(18, 8))]
)
_EMPTY = pa.schema(
    [
        ("minute", pa.int64()),
        ("exchange", pa.string()),
        ("symbol", pa.string()),
        ("o", _TRADE_TYPE),
        ("high", pa.decimal128(18, 8)),
        ("low", pa.decimal128(18, 8)),
        ("c", _TRADE_TYPE),
        ("volume", pa.decimal128(38, 8)),
        ("n", pa.int64()),
        ("volume_units", pa.decimal128(38, 0)),
        ("turnover_units", pa.decimal128(38, 0)),
        ("vwap", pa.decimal128(38, 8)),
    ]
).empty_table()
