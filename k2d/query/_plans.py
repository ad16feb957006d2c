"""One plan per endpoint: validated parameters in, a core SQL query over the right files out.

Identifiers in the SQL come from this module's constants and the tables' schemas; every
value (symbols, times, file lists, cursor keys) is a bound parameter; the number of
placeholders depends only on how many values were given, never on their text.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.compute as pc

from k2d.model import Quote, Trade
from k2d.query._bars import MINUTE_US, ORDER_KEY, TURNOVER, VOLUME, partials_sql, units, vwap
from k2d.query._cursor import fingerprint
from k2d.query._errors import QueryError
from k2d.query._execute import Key, PlanContext, Prepared, keyset
from k2d.query._files import DAY_US, FileEntry, SymbolKey, TableFiles, overlap
from k2d.query._hot import HotFiles, HotScan
from k2d.query._ledger import LedgerEvent
from k2d.query._params import Interval, SnapshotSel, Window
from k2d.query._render import Column, Kind, ident
from k2d.storage import QUOTES, TABLE_NAMES, TABLES, TRADES, quotes_to_arrow, trades_to_arrow

__all__ = [
    "COMPLETENESS_COLUMNS",
    "GAP_COLUMNS",
    "GAP_STATUSES",
    "OHLCV_COLUMNS",
    "SNAPSHOT_COLUMNS",
    "SUMMARY_COLUMNS",
    "SYMBOL_COLUMNS",
    "TABLE_COLUMNS",
    "CompletenessPlan",
    "GapsPlan",
    "OhlcvPlan",
    "RecentPlan",
    "RowsPlan",
    "SnapshotsPlan",
    "SummaryPlan",
    "SymbolsPlan",
    "WindowPlan",
    "iso",
]

_SRC = "read_parquet(?, hive_partitioning = false)"
_CURRENT = SnapshotSel()
_ROW_KEYS = (
    Key("timestamp", Kind.TIMESTAMP),
    Key("symbol", Kind.STRING),
    Key("k_seq", Kind.INT),
    Key("message_id", Kind.STRING),
)
# The row order: event time, then symbol, then venue sequence (absent: first), then id.
_ROW_KEY_EXPRS = ('"timestamp"', '"symbol"', "coalesce(source_sequence, -1)", '"message_id"')
_STREAM_OF = {TRADES: "trade", QUOTES: "quote"}
_LIVE_ARROW: dict[str, Callable[[Any], pa.Table]] = {
    TRADES: trades_to_arrow,
    QUOTES: quotes_to_arrow,
}
_MAX_META_GAPS = 1_000


def _kind(typ: pa.DataType) -> Kind:
    if pa.types.is_decimal(typ):
        return Kind.DECIMAL
    if pa.types.is_timestamp(typ):
        return Kind.TIMESTAMP
    if pa.types.is_integer(typ):
        return Kind.INT
    if pa.types.is_list(typ):
        return Kind.LIST
    return Kind.STRING


TABLE_COLUMNS: dict[str, dict[str, Column]] = {
    name: {f.name: Column(f.name, _kind(f.type)) for f in TABLES[name].arrow_schema}
    for name in (TRADES, QUOTES)
}


def iso(us: int | None) -> str | None:
    if us is None:
        return None
    seconds, micros = divmod(us, 1_000_000)
    when = datetime.fromtimestamp(seconds, UTC).replace(microsecond=micros)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _placeholders(n: int) -> str:
    return ", ".join("?" * n)


def _source(
    table: str, entries: Sequence[FileEntry], relations: dict[str, pa.Table]
) -> tuple[str, list[Any]]:
    """The FROM item for some data files of `table` (an empty relation when there are none)."""
    if entries:
        return _SRC, [[e.path for e in entries]]
    name = f"__empty_{table}"
    relations[name] = TABLES[table].arrow_schema.empty_table()
    return ident(name), []


def _known_keys(
    ctx: PlanContext,
    table: str,
    files: TableFiles,
    exchanges: Sequence[str],
    symbols: Sequence[str],
    extra: Iterable[SymbolKey] = (),
) -> list[SymbolKey] | None:
    """The (exchange, symbol) pairs asked for (None: all); one not stored is 404."""
    current = ctx.index.current(table)
    known = set(files.symbol_stats) | set(current.symbol_stats) | set(extra)
    known_exchanges = {k[0] for k in known}
    for ex in exchanges:
        if ex not in known_exchanges:
            raise QueryError(404, "unknown_exchange", f"no {table} from exchange {ex!r}")
    if not symbols:
        return None
    out = []
    for s in symbols:
        matches = [k for k in known if k[1] == s and (not exchanges or k[0] in exchanges)]
        if not matches:
            where = f" on {', '.join(exchanges)}" if exchanges else ""
            raise QueryError(404, "unknown_symbol", f"unknown symbol {s!r}{where}")
        out.extend(matches)
    return out


def _needs_dedupe(entries: Sequence[FileEntry], keys: Iterable[SymbolKey] | None) -> bool:
    """Could two files hold the same row? Only if their sequence ranges overlap for a key
    (a replay after a crash); rows without sequence numbers cannot be told apart cheaply."""
    ranges: dict[SymbolKey, list[tuple[int, int]]] = {}
    wanted = set(keys) if keys is not None else None
    for e in entries:
        for k, st in e.symbols.items():
            if wanted is not None and k not in wanted:
                continue
            if st.min_seq is None or st.max_seq is None:
                return True
            ranges.setdefault(k, []).append((st.min_seq, st.max_seq))
    return overlap(ranges)


def _time_filter(window: Window) -> tuple[str, list[Any]]:
    return (
        '"timestamp" >= make_timestamptz(?) AND "timestamp" < make_timestamptz(?)',
        [window.start, window.end],
    )


def _in(column: str, values: Sequence[str]) -> tuple[str, list[Any]]:
    return f"{ident(column)} IN ({_placeholders(len(values))})", list(values)


def _gap_dict(e: LedgerEvent, span: tuple[int, int]) -> dict[str, Any]:
    return {
        "event_id": e.event_id,
        "exchange": e.exchange,
        "symbol": e.symbol,
        "stream": e.stream,
        "kind": e.kind,
        "status": e.status,
        "first_missing": e.first_missing,
        "last_missing": e.last_missing,
        "missing_count": e.missing_count,
        "start": iso(span[0]),
        "end": iso(span[1]),
        "detected_at": iso(e.detected_at),
    }


def _meta_gaps(
    ctx: PlanContext,
    stream: str,
    keys: Sequence[SymbolKey] | None,
    exchanges: Sequence[str],
    window: Window,
) -> dict[str, Any]:
    """The ledger's gaps and outages meeting the window, for the meta of a response."""
    ledger = ctx.ledger
    if keys is not None:
        events = [
            e
            for ex, sym in keys
            for e in ledger.select(exchanges=[ex], symbols=[sym], streams=[stream])
        ]
    else:
        events = ledger.select(exchanges=exchanges or None, streams=[stream])
    if not events:
        return {"gaps": []}
    trades = ctx.index.current(TRADES)
    hits = ledger.overlapping(events, window.start, window.end, cursor=ctx.cursor, trades=trades)
    hits.sort(key=lambda e: (e.detected_at, e.event_id))
    out: dict[str, Any] = {"gaps": [_gap_dict(e, ledger.span(e)) for e in hits[:_MAX_META_GAPS]]}
    if len(hits) > _MAX_META_GAPS:
        out["gaps_total"] = len(hits)
    return out


def _window_meta(window: Window) -> dict[str, Any]:
    return {"start": iso(window.start), "end": iso(window.end)}


@dataclass(frozen=True)
class RowsPlan:
    """Trades or quotes in a window: GET /v1/trades, /v1/quotes, POST /v1/trades/query."""

    endpoint: str
    table: str
    symbols: tuple[str, ...]
    exchanges: tuple[str, ...]
    window: Window
    limit: int
    desc: bool
    columns: tuple[str, ...]
    snapshot: SnapshotSel = _CURRENT
    cursor: str | None = None

    def fingerprint(self) -> str:
        return fingerprint(
            self.table,
            sorted(self.symbols),
            sorted(self.exchanges),
            self.window.start,
            self.window.end,
            self.desc,
            self.snapshot.snapshot_id,
            self.snapshot.as_of_us,
        )

    def prepare(self, ctx: PlanContext) -> Prepared:
        fp = self.fingerprint()
        pinned, after = ctx.decode_cursor(self.cursor, fp, _ROW_KEYS)
        files = ctx.files(self.table, self.snapshot, pinned)
        keys = _known_keys(ctx, self.table, files, self.exchanges, self.symbols)
        entries = files.select(
            self.window.start, self.window.end, exchanges=self.exchanges, keys=keys
        )
        relations: dict[str, pa.Table] = {}
        source, params = _source(self.table, entries, relations)
        where, values = _time_filter(self.window)
        clauses, params = [where], [*params, *values]
        for column, given in (("exchange", self.exchanges), ("symbol", self.symbols)):
            if given:
                clause, values = _in(column, given)
                clauses.append(clause)
                params.extend(values)
        if after is not None:
            # The plain bound lets DuckDB skip row groups; the row comparison is exact.
            bound = (
                '"timestamp" <= make_timestamptz(?)'
                if self.desc
                else '"timestamp" >= make_timestamptz(?)'
            )
            clauses.append(bound)
            params.append(after[0])
            clause, values = keyset(_ROW_KEY_EXPRS, _ROW_KEYS, after, self.desc)
            clauses.append(clause)
            params.extend(values)
        allowed = TABLE_COLUMNS[self.table]
        needed = dict.fromkeys([*self.columns, "timestamp", "symbol", "message_id"])
        select = ", ".join(ident(c) for c in needed)
        sql = (
            f"SELECT {select}, coalesce(source_sequence, -1) AS k_seq "
            f"FROM {source} WHERE {' AND '.join(clauses)}"
        )
        stream = _STREAM_OF[self.table]
        meta: dict[str, Any] = {
            "table": self.table,
            "snapshot_id": files.snapshot_id,
            "window": _window_meta(self.window),
            **_meta_gaps(ctx, stream, keys, self.exchanges, self.window),
        }
        snapshots = {self.table: files.snapshot_id} if files.snapshot_id is not None else {}
        scan = HotScan(tuple(entries), self.window, self.exchanges, self.symbols)
        return Prepared(
            sql=sql,
            params=params,
            columns=tuple(allowed[c] for c in self.columns),
            keys=_ROW_KEYS,
            limit=self.limit,
            desc=self.desc,
            relations=relations,
            meta=meta,
            fingerprint=fp if files.snapshot_id is not None else None,
            snapshots=snapshots,
            dedupe="message_id",
            filename=self.table,
            in_memory=functools.partial(_held_rows, ctx.index.hot, scan) if after is None else None,
        )


def _held_rows(hot: HotFiles, scan: HotScan) -> pa.Table | None:
    """A window's rows from the hot tier, with the row key's `k_seq` (None: not all held)."""
    rows = hot.rows(scan.entries, scan.window, scan.exchanges, scan.symbols)
    if rows is None:
        return None
    return rows.append_column("k_seq", pc.fill_null(rows.column("source_sequence"), -1))


@dataclass(frozen=True)
class RecentPlan:
    """GET /v1/trades/recent and /v1/quotes/recent: committed rows merged with the live
    hub's uncommitted ones."""

    endpoint: str
    symbols: tuple[str, ...]
    exchanges: tuple[str, ...]
    window: Window
    limit: int
    desc: bool
    columns: tuple[str, ...]
    live: tuple[Trade, ...] | tuple[Quote, ...] = ()
    live_keys: frozenset[SymbolKey] = frozenset()
    table: str = TRADES

    def prepare(self, ctx: PlanContext) -> Prepared:
        table = self.table
        files = ctx.files(table, SnapshotSel())
        keys = _known_keys(ctx, table, files, self.exchanges, self.symbols, self.live_keys)
        entries = files.select(
            self.window.start, self.window.end, exchanges=self.exchanges, keys=keys
        )
        relations: dict[str, pa.Table] = {}
        source, params = _source(table, entries, relations)
        relations["__live"] = _LIVE_ARROW[table](list(self.live))
        clauses, values = _time_filter(self.window)
        where = [clauses]
        filter_params = list(values)
        for column, given in (("exchange", self.exchanges), ("symbol", self.symbols)):
            if given:
                clause, values = _in(column, given)
                where.append(clause)
                filter_params.extend(values)
        cond = " AND ".join(where)
        needed = dict.fromkeys(
            [*self.columns, "timestamp", "symbol", "message_id", "source_sequence"]
        )
        select = ", ".join(ident(c) for c in needed)
        sql = (
            f"SELECT *, coalesce(source_sequence, -1) AS k_seq FROM ("
            f"SELECT {select} FROM {source} WHERE {cond} "
            f"UNION ALL BY NAME SELECT {select} FROM {ident('__live')} WHERE {cond})"
        )
        meta: dict[str, Any] = {
            "table": table,
            "snapshot_id": files.snapshot_id,
            "window": _window_meta(self.window),
            "live_rows": len(self.live),
            **_meta_gaps(ctx, _STREAM_OF[table], keys, self.exchanges, self.window),
        }
        return Prepared(
            sql=sql,
            params=[*params, *filter_params, *filter_params],
            columns=tuple(TABLE_COLUMNS[table][c] for c in self.columns),
            keys=_ROW_KEYS,
            limit=self.limit,
            desc=self.desc,
            relations=relations,
            meta=meta,
            dedupe="message_id",
            filename=table,
        )


RowKey = tuple[int, str, int, str]
"""A row's place in (timestamp us, symbol, source_sequence or -1, message_id) order."""


@dataclass(frozen=True)
class WindowPlan:
    """One page of the trades or quotes of some (exchange, symbol) pairs in a window, in
    (timestamp, symbol, source_sequence, message_id) order, strictly after `after`: the
    history a stream sends (a subscription's `since`, merged with the live hub's
    uncommitted rows, each message_id once) and the pages of a replay. Pairs with nothing
    stored are no error: their pages are empty. The first page (`after` None) carries the
    ledger's gaps and outages meeting the window in its meta."""

    endpoint: str
    table: str
    keys: tuple[SymbolKey, ...]
    window: Window
    limit: int
    after: RowKey | None = None
    live: tuple[Trade, ...] | tuple[Quote, ...] = ()

    def prepare(self, ctx: PlanContext) -> Prepared:
        table = self.table
        files = ctx.files(table, SnapshotSel())
        keys = list(self.keys)
        entries = files.select(self.window.start, self.window.end, keys=keys)
        relations: dict[str, pa.Table] = {}
        source, src_params = _source(table, entries, relations)
        time_clause, values = _time_filter(self.window)
        clauses, params = [time_clause], list(values)
        pairs = " OR ".join('("exchange" = ? AND "symbol" = ?)' for _ in keys)
        clauses.append(f"({pairs})" if keys else "FALSE")
        for ex, sym in keys:
            params.extend((ex, sym))
        if self.after is not None:
            # The plain bound lets DuckDB skip row groups; the row comparison is exact.
            clauses.append('"timestamp" >= make_timestamptz(?)')
            params.append(self.after[0])
            clause, values = keyset(_ROW_KEY_EXPRS, _ROW_KEYS, list(self.after), False)
            clauses.append(clause)
            params.extend(values)
        cond = " AND ".join(clauses)
        columns = list(TABLE_COLUMNS[table])
        select = ", ".join(ident(c) for c in columns)
        sql = f"SELECT {select} FROM {source} WHERE {cond}"
        all_params = [*src_params, *params]
        if self.live:
            relations["__live"] = _LIVE_ARROW[table](list(self.live))
            sql += f" UNION ALL BY NAME SELECT {select} FROM {ident('__live')} WHERE {cond}"
            all_params.extend(params)
        sql = f"SELECT *, coalesce(source_sequence, -1) AS k_seq FROM ({sql})"
        meta: dict[str, Any] = {
            "table": table,
            "snapshot_id": files.snapshot_id,
            "window": _window_meta(self.window),
        }
        if self.after is None:
            meta.update(_meta_gaps(ctx, _STREAM_OF[table], keys, (), self.window))
        return Prepared(
            sql=sql,
            params=all_params,
            columns=tuple(TABLE_COLUMNS[table].values()),
            keys=_ROW_KEYS,
            limit=self.limit,
            relations=relations,
            meta=meta,
            dedupe="message_id",
            filename=table,
        )


_VWAP = vwap(units(TURNOVER), units(VOLUME))
# Open and close: first and last trade by (time, venue sequence, platform sequence). An
# ordered first/last, not arg_min/arg_max on a struct key: the same rows, and struct
# comparisons were the dearest part of a day of 1-minute bars.
_BAR_AGGREGATES = (
    f"first(price ORDER BY {ORDER_KEY}) AS open, max(price) AS high, min(price) AS low, "
    f"last(price ORDER BY {ORDER_KEY}) AS close, {VOLUME} AS volume, {_VWAP} AS vwap, "
    "count(*) AS trade_count"
)
_BAR_COLUMNS = (
    Column("open", Kind.DECIMAL),
    Column("high", Kind.DECIMAL),
    Column("low", Kind.DECIMAL),
    Column("close", Kind.DECIMAL),
    Column("volume", Kind.DECIMAL),
    Column("vwap", Kind.DECIMAL),
    Column("trade_count", Kind.INT),
)
OHLCV_COLUMNS = (
    Column("bar_start", Kind.TIMESTAMP),
    Column("exchange", Kind.STRING),
    Column("symbol", Kind.STRING),
    *_BAR_COLUMNS,
)
_OHLCV_KEYS = (
    Key("bar_start", Kind.TIMESTAMP),
    Key("exchange", Kind.STRING),
    Key("symbol", Kind.STRING),
)
_TRADE_FIELDS = (
    '"exchange", "symbol", "timestamp", price, quantity, source_sequence, platform_sequence'
)


_EPOCH_US = 'epoch_us("timestamp")'


def _bar_start(interval: Interval, tz: str, us: str = _EPOCH_US) -> tuple[str, list[Any]]:
    """The bar a trade (at `us` microseconds) falls in, as `time_bucket(interval,
    "timestamp", tz)` gives it. In UTC by integer arithmetic: every interval divides a day,
    so its bars start at multiples of its length since the epoch (time_bucket's origin,
    2000-01-03, is one of them), and time_bucket's time-zone path costs a calendar
    conversion a row."""
    if tz != "UTC":
        at = '"timestamp"' if us == _EPOCH_US else f"make_timestamptz({us})"
        return f"time_bucket({interval.sql}, {at}, ?)", [tz]
    assert DAY_US % interval.micros == 0, interval
    width = interval.micros
    # Floored, also before 1970: DuckDB's % keeps the dividend's sign.
    return f"make_timestamptz({us} - (({us} % {width}) + {width}) % {width})", []


# Minute bars (k2d.query._bars) merged into bars of whole minutes: the same first and last
# trade, by the same key, as _BAR_AGGREGATES picks from the trades themselves.
_MERGED_AGGREGATES = (
    # min and max of (time, venue sequence, platform sequence, price): the first and the
    # last trade by that key, which no two trades share.
    "min(o).x AS open, max(high) AS high, min(low) AS low, max(c).x AS close, "
    "sum(volume) AS volume, "
    # The units come back from Arrow as DECIMAL(38,0), whose // is not integer division.
    f"{vwap('CAST(sum(turnover_units) AS HUGEINT)', 'CAST(sum(volume_units) AS HUGEINT)')}"
    " AS vwap, "
    "CAST(sum(n) AS BIGINT) AS trade_count"
)


# The same when each minute's bar is in one file: the bars as they stand.
_MINUTE_COLUMNS = "o.x AS open, high, low, c.x AS close, volume, vwap, n AS trade_count"


def _minute_bars_page(bars: pa.Table, first: int, last: int) -> pa.Table:
    """The 1-minute bars from `first` to `last` (UTC minutes) with the columns the SQL of
    whole minute bars gives: each bar from one file, nothing to merge."""
    minute = bars.column("minute")
    rows = bars.filter(pc.and_(pc.greater_equal(minute, first), pc.less(minute, last)))
    return pa.table(
        {
            "bar_start": rows.column("minute").cast(pa.timestamp("us", tz="UTC")),
            "exchange": rows.column("exchange"),
            "symbol": rows.column("symbol"),
            "open": pc.struct_field(rows.column("o"), "x"),
            "high": rows.column("high"),
            "low": rows.column("low"),
            "close": pc.struct_field(rows.column("c"), "x"),
            "volume": rows.column("volume"),
            "vwap": rows.column("vwap"),
            "trade_count": rows.column("n"),
        }
    )


def _pairs_in(entries: Sequence[FileEntry], exchanges: Sequence[str]) -> set[SymbolKey]:
    """The (exchange, symbol) pairs the files hold, on the given exchanges (none: all)."""
    return {k for e in entries for k in e.symbols if not exchanges or k[0] in exchanges}


def _trades_in(source: str, clauses: Sequence[str], dedupe: bool) -> str:
    distinct = "DISTINCT ON (message_id) " if dedupe else ""
    return (
        f"SELECT {distinct}{_TRADE_FIELDS}, provenance FROM {source} WHERE {' AND '.join(clauses)}"
    )


@dataclass(frozen=True)
class OhlcvPlan:
    """GET /v1/ohlcv/{interval}: bars of trades, aligned in UTC or the given time zone."""

    endpoint: str
    interval: Interval
    symbols: tuple[str, ...]
    exchanges: tuple[str, ...]
    window: Window
    tz: str
    limit: int
    snapshot: SnapshotSel = _CURRENT
    cursor: str | None = None
    # False: aggregate every trade, never the remembered minute bars (a check of them).
    use_bars: bool = True

    def prepare(self, ctx: PlanContext) -> Prepared:
        fp = fingerprint(
            "ohlcv",
            self.interval.name,
            sorted(self.symbols),
            sorted(self.exchanges),
            self.window.start,
            self.window.end,
            self.tz,
            self.snapshot.snapshot_id,
            self.snapshot.as_of_us,
        )
        pinned, after = ctx.decode_cursor(self.cursor, fp, _OHLCV_KEYS)
        files = ctx.files(TRADES, self.snapshot, pinned)
        keys = _known_keys(ctx, TRADES, files, self.exchanges, self.symbols)
        entries = files.select(
            self.window.start, self.window.end, exchanges=self.exchanges, keys=keys
        )
        relations: dict[str, pa.Table] = {}
        in_memory: Callable[[], pa.Table | None] | None = None
        source, src_params = _source(TRADES, entries, relations)
        # Which trades: the exchanges and symbols asked for (the time is added below).
        pair_clauses: list[str] = []
        pair_params: list[Any] = []
        for column, given in (("exchange", self.exchanges), ("symbol", self.symbols)):
            if given:
                clause, values = _in(column, given)
                pair_clauses.append(clause)
                pair_params.extend(values)
        dedupe = _needs_dedupe(entries, keys)
        # Bars in whole UTC minutes merge the files' remembered minute bars, and aggregate
        # trades only in the minutes the window cuts. Files that may share rows (a replay)
        # and other time zones (an offset need not be whole minutes) aggregate every trade.
        # So do requests whose bars would not fit in the memo's bound.
        first = -(-self.window.start // MINUTE_US) * MINUTE_US
        last = self.window.end // MINUTE_US * MINUTE_US
        wanted = set(keys) if keys is not None else _pairs_in(entries, self.exchanges)
        if (
            self.use_bars
            and not dedupe
            and self.tz == "UTC"
            and self.interval.micros % MINUTE_US == 0
            and first < last
            and ctx.index.bars.fits(entries, wanted)
        ):
            relations["__bars"], whole = ctx.index.bars.bars(ctx.cursor, entries, wanted)
            parts = f"SELECT * FROM {ident('__bars')} WHERE minute >= ? AND minute < ?"
            params: list[Any] = [first, last]
            edges = [
                edge
                for edge in ((self.window.start, first), (last, self.window.end))
                if edge[0] < edge[1]
            ]
            if edges:
                cut = " OR ".join(
                    '("timestamp" >= make_timestamptz(?) AND "timestamp" < make_timestamptz(?))'
                    for _ in edges
                )
                parts += " UNION ALL BY NAME " + partials_sql(
                    source, " AND ".join([f"({cut})", *pair_clauses])
                )
                params.extend([*src_params, *itertools.chain(*edges), *pair_params])
            if whole and self.interval.micros == MINUTE_US:
                if not edges and after is None:
                    in_memory = functools.partial(
                        _minute_bars_page, relations["__bars"], first, last
                    )
                # Each minute's bar is in one file (or one cut minute): nothing to merge.
                sql = (
                    'SELECT make_timestamptz(minute) AS bar_start, "exchange", "symbol", '
                    f"{_MINUTE_COLUMNS} FROM ({parts})"
                )
                bar_params: list[Any] = []
            else:
                bar, bar_params = _bar_start(self.interval, self.tz, "minute")
                sql = (
                    f'SELECT {bar} AS bar_start, "exchange", "symbol", {_MERGED_AGGREGATES} '
                    f"FROM ({parts}) GROUP BY ALL"
                )
        else:
            where, values = _time_filter(self.window)
            trades = _trades_in(source, [where, *pair_clauses], dedupe)
            params = [*src_params, *values, *pair_params]
            bar, bar_params = _bar_start(self.interval, self.tz)
            sql = (
                f'SELECT {bar} AS bar_start, "exchange", "symbol", {_BAR_AGGREGATES} '
                f"FROM ({trades}) GROUP BY ALL"
            )
        params = [*bar_params, *params]
        if after is not None:
            clause, values = keyset(
                ["bar_start", '"exchange"', '"symbol"'], _OHLCV_KEYS, after, False
            )
            sql = f"SELECT * FROM ({sql}) WHERE {clause}"
            params.extend(values)
        meta: dict[str, Any] = {
            "table": TRADES,
            "snapshot_id": files.snapshot_id,
            "interval": self.interval.name,
            "tz": self.tz,
            "window": _window_meta(self.window),
            **_meta_gaps(ctx, "trade", keys, self.exchanges, self.window),
        }
        return Prepared(
            sql=sql,
            params=params,
            columns=OHLCV_COLUMNS,
            keys=_OHLCV_KEYS,
            limit=self.limit,
            relations=relations,
            meta=meta,
            fingerprint=fp if files.snapshot_id is not None else None,
            snapshots={TRADES: files.snapshot_id} if files.snapshot_id is not None else {},
            filename=f"ohlcv_{self.interval.name}",
            in_memory=in_memory,
        )


SUMMARY_COLUMNS = (
    Column("date", Kind.DATE),
    Column("exchange", Kind.STRING),
    Column("symbol", Kind.STRING),
    Column("timezone", Kind.STRING),
    Column("session_start", Kind.TIMESTAMP),
    Column("session_end", Kind.TIMESTAMP),
    *_BAR_COLUMNS,
    Column("first_trade", Kind.TIMESTAMP),
    Column("last_trade", Kind.TIMESTAMP),
    Column("quote_count", Kind.INT),
    Column("two_sided_quotes", Kind.INT),
    Column("one_sided_quotes", Kind.INT),
    Column("crossed_quotes", Kind.INT),
    Column("spread_mean", Kind.DECIMAL),
    Column("spread_median", Kind.DECIMAL),
    Column("spread_min", Kind.DECIMAL),
    Column("spread_max", Kind.DECIMAL),
    Column("spread_bps_mean", Kind.FLOAT),
)
# Spread statistics over two-sided, uncrossed quotes; one-sided and crossed ones are counted.
_VALID_QUOTE = "bid_price IS NOT NULL AND ask_price IS NOT NULL AND bid_price <= ask_price"
_SPREAD = "ask_price - bid_price"


def _spread_stat(fn: str, name: str) -> str:
    return f"CAST({fn}({_SPREAD}) FILTER (WHERE {_VALID_QUOTE}) AS DECIMAL(18,8)) AS spread_{name}"


_QUOTE_AGGREGATES = (
    "count(*) AS quote_count, "
    f"count(*) FILTER (WHERE {_VALID_QUOTE}) AS two_sided_quotes, "
    "count(*) FILTER (WHERE bid_price IS NULL OR ask_price IS NULL) AS one_sided_quotes, "
    "count(*) FILTER (WHERE bid_price > ask_price) AS crossed_quotes, "
    f"{_spread_stat('avg', 'mean')}, {_spread_stat('median', 'median')}, "
    f"{_spread_stat('min', 'min')}, {_spread_stat('max', 'max')}, "
    f"avg(CASE WHEN {_VALID_QUOTE} THEN 20000 * CAST(ask_price - bid_price AS DOUBLE) "
    "/ NULLIF(CAST(ask_price + bid_price AS DOUBLE), 0) END) AS spread_bps_mean"
)


@dataclass(frozen=True)
class SummaryPlan:
    """GET /v1/summary/{exchange}/{symbol}/{date}: one trading day of one symbol."""

    endpoint: str
    exchange: str
    symbol: str
    day: date
    tz: str
    window: Window
    snapshot: SnapshotSel = _CURRENT

    def prepare(self, ctx: PlanContext) -> Prepared:
        trades = ctx.files(TRADES, self.snapshot)
        quotes = ctx.files(QUOTES, self.snapshot)
        key = (self.exchange, self.symbol)
        known = (
            set(trades.symbol_stats)
            | set(quotes.symbol_stats)
            | set(ctx.index.current(TRADES).symbol_stats)
            | set(ctx.index.current(QUOTES).symbol_stats)
        )
        if key not in known:
            raise QueryError(
                404, "unknown_symbol", f"unknown symbol {self.symbol!r} on {self.exchange}"
            )
        relations: dict[str, pa.Table] = {}
        where, values = _time_filter(self.window)
        clauses = [where, '"exchange" = ?', '"symbol" = ?']
        filter_params = [*values, self.exchange, self.symbol]
        t_entries = trades.select(self.window.start, self.window.end, keys=[key])
        q_entries = quotes.select(self.window.start, self.window.end, keys=[key])
        t_src, t_params = _source(TRADES, t_entries, relations)
        q_src, q_params = _source(QUOTES, q_entries, relations)
        q_distinct = "DISTINCT ON (message_id) " if _needs_dedupe(q_entries, [key]) else ""
        t_sql = _trades_in(t_src, clauses, _needs_dedupe(t_entries, [key]))
        sql = (
            f"WITH t AS ({t_sql}), "
            f"tq AS (SELECT {q_distinct}bid_price, ask_price FROM {q_src} "
            f"WHERE {' AND '.join(clauses)}), "
            f'ta AS (SELECT {_BAR_AGGREGATES}, min("timestamp") AS first_trade, '
            'max("timestamp") AS last_trade FROM t), '
            f"qa AS (SELECT {_QUOTE_AGGREGATES} FROM tq) "
            "SELECT CAST(? AS DATE) AS date, ? AS exchange, ? AS symbol, ? AS timezone, "
            "make_timestamptz(?) AS session_start, make_timestamptz(?) AS session_end, "
            "ta.*, qa.* FROM ta, qa"
        )
        params = [
            *t_params,
            *filter_params,
            *q_params,
            *filter_params,
            self.day.isoformat(),
            self.exchange,
            self.symbol,
            self.tz,
            self.window.start,
            self.window.end,
        ]
        meta: dict[str, Any] = {
            "snapshot_id": trades.snapshot_id,
            "snapshots": {TRADES: trades.snapshot_id, QUOTES: quotes.snapshot_id},
            "window": _window_meta(self.window),
            **_meta_gaps(ctx, "trade", [key], [self.exchange], self.window),
        }
        return Prepared(
            sql=sql,
            params=params,
            columns=SUMMARY_COLUMNS,
            keys=(),
            limit=1,
            relations=relations,
            meta=meta,
            filename=f"summary_{self.exchange}_{self.symbol}_{self.day.isoformat()}",
        )


SYMBOL_COLUMNS = (
    Column("exchange", Kind.STRING),
    Column("symbol", Kind.STRING),
    Column("trade_count", Kind.INT),
    Column("first_trade", Kind.TIMESTAMP),
    Column("last_trade", Kind.TIMESTAMP),
    Column("quote_count", Kind.INT),
    Column("first_quote", Kind.TIMESTAMP),
    Column("last_quote", Kind.TIMESTAMP),
)
_SYMBOL_KEYS = (Key("exchange", Kind.STRING), Key("symbol", Kind.STRING))
_TS = pa.timestamp("us", tz="UTC")


def _rows_relation(columns: Sequence[Column], rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    types = {
        Kind.STRING: pa.string(),
        Kind.INT: pa.int64(),
        Kind.FLOAT: pa.float64(),
        Kind.TIMESTAMP: _TS,
        Kind.JSON: pa.string(),
    }
    return pa.table(
        {c.name: pa.array([r.get(c.name) for r in rows], types[c.kind]) for c in columns}
    )


def _paged(
    ctx: PlanContext,
    relation: pa.Table,
    columns: tuple[Column, ...],
    keys: tuple[Key, ...],
    exprs: Sequence[str],
    *,
    fp: str,
    cursor: str | None,
    limit: int,
    desc: bool,
    meta: dict[str, Any],
    filename: str,
) -> Prepared:
    """A page of rows computed in Python, rendered and paged like any query."""
    _, after = ctx.decode_cursor(cursor, fp, keys)
    sql = f"SELECT * FROM {ident('__rows')}"
    params: list[Any] = []
    if after is not None:
        clause, params = keyset(exprs, keys, after, desc)
        sql += f" WHERE {clause}"
    return Prepared(
        sql=sql,
        params=params,
        columns=columns,
        keys=keys,
        limit=limit,
        desc=desc,
        relations={"__rows": relation},
        meta=meta,
        fingerprint=fp,
        filename=filename,
    )


@dataclass(frozen=True)
class SymbolsPlan:
    """GET /v1/symbols: every (exchange, symbol) with trade and quote counts and times."""

    endpoint: str
    exchanges: tuple[str, ...]
    limit: int
    cursor: str | None = None

    def prepare(self, ctx: PlanContext) -> Prepared:
        trades = ctx.index.current(TRADES)
        quotes = ctx.index.current(QUOTES)
        rows = []
        for ex, sym in sorted(set(trades.symbol_stats) | set(quotes.symbol_stats)):
            if self.exchanges and ex not in self.exchanges:
                continue
            t = trades.symbol_stats.get((ex, sym))
            q = quotes.symbol_stats.get((ex, sym))
            rows.append(
                {
                    "exchange": ex,
                    "symbol": sym,
                    "trade_count": t.rows if t else 0,
                    "first_trade": t.min_ts if t else None,
                    "last_trade": t.max_ts if t else None,
                    "quote_count": q.rows if q else 0,
                    "first_quote": q.min_ts if q else None,
                    "last_quote": q.max_ts if q else None,
                }
            )
        meta = {
            "snapshot_id": trades.snapshot_id,
            "snapshots": {TRADES: trades.snapshot_id, QUOTES: quotes.snapshot_id},
        }
        return _paged(
            ctx,
            _rows_relation(SYMBOL_COLUMNS, rows),
            SYMBOL_COLUMNS,
            _SYMBOL_KEYS,
            ['"exchange"', '"symbol"'],
            fp=fingerprint("symbols", sorted(self.exchanges)),
            cursor=self.cursor,
            limit=self.limit,
            desc=False,
            meta=meta,
            filename="symbols",
        )


SNAPSHOT_COLUMNS = (
    Column("snapshot_id", Kind.INT),
    Column("parent_id", Kind.INT),
    Column("committed_at", Kind.TIMESTAMP),
    Column("operation", Kind.STRING),
    Column("added_records", Kind.INT),
    Column("added_files", Kind.INT),
    Column("total_records", Kind.INT),
    Column("k2", Kind.JSON),
)
_SNAPSHOT_KEYS = (Key("committed_at", Kind.TIMESTAMP), Key("snapshot_id", Kind.INT))
_json = msgspec.json.Decoder()


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _k2(props: Mapping[str, str]) -> str:
    out: dict[str, Any] = {}
    for k, v in sorted(props.items()):
        if not k.startswith("k2."):
            continue
        try:
            out[k] = _json.decode(v)
        except msgspec.DecodeError:
            out[k] = v
    return msgspec.json.encode(out).decode()


@dataclass(frozen=True)
class SnapshotsPlan:
    """GET /v1/snapshots: a table's snapshots, newest first, with their k2 properties."""

    endpoint: str
    table: str
    limit: int
    cursor: str | None = None

    def prepare(self, ctx: PlanContext) -> Prepared:
        if self.table not in TABLE_NAMES:
            raise QueryError(
                400,
                "unknown_table",
                f"unknown table {self.table!r}; expected one of {', '.join(TABLE_NAMES)}",
            )
        metadata = ctx.index.load_table(self.table)
        rows = []
        for s in metadata.snapshots():
            summary = s.summary
            props: Mapping[str, str] = summary.additional_properties if summary else {}
            rows.append(
                {
                    "snapshot_id": s.snapshot_id,
                    "parent_id": s.parent_snapshot_id,
                    "committed_at": s.timestamp_ms * 1_000,
                    "operation": summary.operation.value if summary else None,
                    "added_records": _int(props.get("added-records")),
                    "added_files": _int(props.get("added-data-files")),
                    "total_records": _int(props.get("total-records")),
                    "k2": _k2(props),
                }
            )
        current = metadata.current_snapshot()
        meta = {
            "table": self.table,
            "snapshot_id": current.snapshot_id if current is not None else None,
            "snapshot_count": len(rows),
        }
        return _paged(
            ctx,
            _rows_relation(SNAPSHOT_COLUMNS, rows),
            SNAPSHOT_COLUMNS,
            _SNAPSHOT_KEYS,
            ['"committed_at"', '"snapshot_id"'],
            fp=fingerprint("snapshots", self.table),
            cursor=self.cursor,
            limit=self.limit,
            desc=True,
            meta=meta,
            filename=f"snapshots_{self.table}",
        )


GAP_COLUMNS = (
    Column("event_id", Kind.STRING),
    Column("exchange", Kind.STRING),
    Column("symbol", Kind.STRING),
    Column("stream", Kind.STRING),
    Column("kind", Kind.STRING),
    Column("status", Kind.STRING),
    Column("first_missing", Kind.INT),
    Column("last_missing", Kind.INT),
    Column("missing_count", Kind.INT),
    Column("span_start", Kind.TIMESTAMP),
    Column("span_end", Kind.TIMESTAMP),
    Column("detected_at", Kind.TIMESTAMP),
    Column("resolved_at", Kind.TIMESTAMP),
    Column("window_start", Kind.TIMESTAMP),
    Column("window_end", Kind.TIMESTAMP),
    Column("detail", Kind.STRING),
    Column("recorded_at", Kind.TIMESTAMP),
)
_GAP_KEYS = (Key("detected_at", Kind.TIMESTAMP), Key("event_id", Kind.STRING))
GAP_STATUSES = ("open", "backfilled", "unrecoverable")


@dataclass(frozen=True)
class GapsPlan:
    """GET /v1/gaps: ledger gaps and outages with their current status."""

    endpoint: str
    exchanges: tuple[str, ...]
    symbols: tuple[str, ...]
    statuses: tuple[str, ...]
    kinds: tuple[str, ...]
    window: Window | None
    limit: int
    cursor: str | None = None

    def prepare(self, ctx: PlanContext) -> Prepared:
        ledger = ctx.ledger
        events = ledger.select(
            exchanges=self.exchanges or None,
            symbols=self.symbols or None,
            kinds=self.kinds or None,
            statuses=self.statuses or None,
        )
        trades = ctx.index.current(TRADES)
        if self.window is not None:
            events = ledger.overlapping(
                events, self.window.start, self.window.end, cursor=ctx.cursor, trades=trades
            )
        else:
            ledger.resolve_spans(ctx.cursor, trades, events)
        rows = []
        for e in events:
            lo, hi = ledger.span(e)
            rows.append(
                {
                    "event_id": e.event_id,
                    "exchange": e.exchange,
                    "symbol": e.symbol,
                    "stream": e.stream,
                    "kind": e.kind,
                    "status": e.status,
                    "first_missing": e.first_missing,
                    "last_missing": e.last_missing,
                    "missing_count": e.missing_count,
                    "span_start": lo,
                    "span_end": hi,
                    "detected_at": e.detected_at,
                    "resolved_at": e.resolved_at,
                    "window_start": e.window_start,
                    "window_end": e.window_end,
                    "detail": e.detail,
                    "recorded_at": e.recorded_at,
                }
            )
        seq = ctx.index.current("sequence_events")
        meta: dict[str, Any] = {"table": "sequence_events", "snapshot_id": seq.snapshot_id}
        if self.window is not None:
            meta["window"] = _window_meta(self.window)
        fp = fingerprint(
            "gaps",
            sorted(self.exchanges),
            sorted(self.symbols),
            sorted(self.statuses),
            sorted(self.kinds),
            None if self.window is None else [self.window.start, self.window.end],
        )
        return _paged(
            ctx,
            _rows_relation(GAP_COLUMNS, rows),
            GAP_COLUMNS,
            _GAP_KEYS,
            ['"detected_at"', '"event_id"'],
            fp=fp,
            cursor=self.cursor,
            limit=self.limit,
            desc=False,
            meta=meta,
            filename="gaps",
        )


COMPLETENESS_COLUMNS = (
    Column("bucket_start", Kind.TIMESTAMP),
    Column("expected", Kind.INT),
    Column("stored", Kind.INT),
    Column("backfilled", Kind.INT),
    Column("missing", Kind.INT),
    Column("open_gaps", Kind.INT),
    Column("outage_seconds", Kind.FLOAT),
    Column("coverage", Kind.FLOAT),
)
_BUCKET_KEYS = (Key("bucket_start", Kind.TIMESTAMP),)
_GAPS_SCHEMA = pa.schema([("first_missing", pa.int64()), ("last_missing", pa.int64())])
_OUTAGES_SCHEMA = pa.schema([("window_start", _TS), ("window_end", _TS)])


@dataclass(frozen=True)
class CompletenessPlan:
    """GET /v1/completeness: per time bucket, trade ids expected, stored, missing, and outages.

    A bucket's ids run from just after the highest id of the buckets before it (within the
    window) to its own highest id, so ids missing between two buckets count in the later one,
    where trading resumed; the first non-empty bucket starts at its lowest id."""

    endpoint: str
    exchange: str | None
    symbol: str
    window: Window
    bucket: Interval
    snapshot: SnapshotSel = _CURRENT

    def prepare(self, ctx: PlanContext) -> Prepared:
        files = ctx.files(TRADES, self.snapshot)
        keys = _known_keys(
            ctx, TRADES, files, [self.exchange] if self.exchange else [], [self.symbol]
        )
        assert keys is not None
        exchanges = sorted({k[0] for k in keys})
        if len(exchanges) > 1:
            raise QueryError(
                400,
                "ambiguous_symbol",
                f"{self.symbol} trades on {', '.join(exchanges)}: give exchange",
            )
        key = keys[0]
        entries = files.select(self.window.start, self.window.end, keys=[key])
        relations: dict[str, pa.Table] = {}
        source, src_params = _source(TRADES, entries, relations)
        ledger = ctx.ledger
        events = ledger.select(exchanges=[key[0]], symbols=[key[1]], streams=["trade"])
        open_gaps = [
            (e.first_missing, e.last_missing)
            for e in events
            if e.kind == "gap"
            and e.status == "open"
            and e.first_missing is not None
            and e.last_missing is not None
        ]
        outages = [
            (e.window_start, e.window_end)
            for e in events
            if e.kind == "outage" and e.window_start is not None and e.window_end is not None
        ]
        relations["__gaps"] = pa.table(
            [
                pa.array([g[0] for g in open_gaps], pa.int64()),
                pa.array([g[1] for g in open_gaps], pa.int64()),
            ],
            schema=_GAPS_SCHEMA,
        )
        relations["__outages"] = pa.table(
            [pa.array([o[0] for o in outages], _TS), pa.array([o[1] for o in outages], _TS)],
            schema=_OUTAGES_SCHEMA,
        )
        b = self.bucket.sql
        distinct = "DISTINCT ON (message_id) " if _needs_dedupe(entries, [key]) else ""
        sql = (
            f'WITH t AS (SELECT {distinct}time_bucket({b}, "timestamp") AS b, '
            "source_sequence AS id, provenance "
            f'FROM {source} WHERE "exchange" = ? AND "symbol" = ? '
            'AND "timestamp" >= make_timestamptz(?) AND "timestamp" < make_timestamptz(?) '
            "AND source_sequence IS NOT NULL), "
            "buckets AS (SELECT unnest(generate_series("
            f"time_bucket({b}, make_timestamptz(?)), "
            f"make_timestamptz(?) - INTERVAL 1 MICROSECOND, {b}"
            ")) AS b), "
            "s AS (SELECT b, count(*) AS stored, "
            "count(*) FILTER (WHERE provenance = 'backfill') AS backfilled, "
            "min(id) AS lo, max(id) AS hi FROM t GROUP BY b), "
            "r AS (SELECT buckets.b, coalesce(s.stored, 0) AS stored, "
            "coalesce(s.backfilled, 0) AS backfilled, s.lo, s.hi, "
            "coalesce(max(s.hi) OVER (ORDER BY buckets.b "
            "ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), s.lo - 1) AS prev_hi "
            "FROM buckets LEFT JOIN s ON s.b = buckets.b), "
            "m AS (SELECT r.b, sum(least(g.last_missing, r.hi) "
            "- greatest(g.first_missing, r.prev_hi + 1) + 1) AS missing, count(*) AS open_gaps "
            f"FROM r JOIN {ident('__gaps')} g "
            "ON g.first_missing <= r.hi AND g.last_missing >= r.prev_hi + 1 GROUP BY r.b), "
            f"o AS (SELECT bk.b, sum(epoch(least(o.window_end, bk.b + {b}) "
            "- greatest(o.window_start, bk.b))) AS outage_seconds "
            f"FROM buckets bk JOIN {ident('__outages')} o "
            f"ON o.window_start < bk.b + {b} AND o.window_end > bk.b GROUP BY bk.b) "
            "SELECT r.b AS bucket_start, "
            "CASE WHEN r.hi IS NULL THEN 0 ELSE r.hi - r.prev_hi END AS expected, "
            "r.stored, r.backfilled, CAST(coalesce(m.missing, 0) AS BIGINT) AS missing, "
            "coalesce(m.open_gaps, 0) AS open_gaps, "
            "CAST(coalesce(o.outage_seconds, 0) AS DOUBLE) AS outage_seconds, "
            "CASE WHEN r.hi IS NULL THEN NULL ELSE r.stored / (r.hi - r.prev_hi) END AS coverage "
            "FROM r LEFT JOIN m ON m.b = r.b LEFT JOIN o ON o.b = r.b"
        )
        params = [
            *src_params,
            key[0],
            key[1],
            self.window.start,
            self.window.end,
            self.window.start,
            self.window.end,
        ]
        n_buckets = math.ceil((self.window.end - self.window.start) / self.bucket.micros) + 1
        meta: dict[str, Any] = {
            "table": TRADES,
            "snapshot_id": files.snapshot_id,
            "exchange": key[0],
            "symbol": key[1],
            "bucket": self.bucket.name,
            "window": _window_meta(self.window),
            **_meta_gaps(ctx, "trade", [key], [key[0]], self.window),
        }
        return Prepared(
            sql=sql,
            params=params,
            columns=COMPLETENESS_COLUMNS,
            keys=_BUCKET_KEYS,
            limit=n_buckets,
            relations=relations,
            meta=meta,
            filename=f"completeness_{key[0]}_{key[1]}",
        )
