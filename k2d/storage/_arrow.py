"""Records -> Arrow tables with exactly the Iceberg tables' Arrow types.

Column-at-a-time: one C-level `map(attrgetter)` pass per field, then one vectorised
conversion per column (decimal strings are cast by Arrow, never through Python Decimal).
A tracker's batch is gathered into columns once (`batch_columns`): the live hub keeps
those columns as they are, and the writer casts them to the table's types.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
from typing import Any

import pyarrow as pa

from k2d.columns import QUOTE_COLUMNS, TRADE_COLUMNS
from k2d.messages import RecordBatch, SequencedBatch
from k2d.model import DeadLetter, Quote, SequenceEvent, Trade
from k2d.storage._schemas import DEAD_LETTERS, QUOTES, SEQUENCE_EVENTS, TABLES, TRADES

__all__ = [
    "batch_columns",
    "columns_to_table",
    "dead_letters_to_arrow",
    "events_to_arrow",
    "quotes_to_arrow",
    "trades_to_arrow",
]


def _column(values: list[Any], typ: pa.DataType) -> pa.Array:
    if pa.types.is_decimal(typ):
        # Exact: Arrow parses the decimal strings and refuses any loss of digits.
        return pa.array(values, pa.string()).cast(typ)
    if pa.types.is_list(typ):
        if values.count(None) == len(values):
            return pa.nulls(len(values), typ)
        return pa.array(values, typ)
    return pa.array(values, typ)


def _build(rows: Sequence[Any], schema: pa.Schema) -> pa.Table:
    arrays = [_column(list(map(attrgetter(f.name), rows)), f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


_TRADES = TABLES[TRADES].arrow_schema
_QUOTES = TABLES[QUOTES].arrow_schema
_EVENTS = TABLES[SEQUENCE_EVENTS].arrow_schema
_DEAD = TABLES[DEAD_LETTERS].arrow_schema


_RAW = {TRADES: TRADE_COLUMNS, QUOTES: QUOTE_COLUMNS}
_TYPED = {TRADES: _TRADES, QUOTES: _QUOTES}


def batch_columns(batch: RecordBatch | SequencedBatch, table: str) -> pa.Table:
    """The batch's trades or quotes as columns of the records' own types (text decimals,
    integer microseconds, `raw_schema`), gathered on first use and kept on the batch for the
    next reader."""
    got: pa.Table | None = batch.columns.get(table)
    if got is None:
        rows = batch.trades if table == TRADES else batch.quotes
        schema = _RAW[table]
        arrays = [pa.array(list(map(attrgetter(f.name), rows)), f.type) for f in schema]
        got = batch.columns[table] = pa.Table.from_arrays(arrays, schema=schema)
    return got


def raw_schema(table: str) -> pa.Schema:
    """The schema of `batch_columns` for "trades" or "quotes"."""
    return _RAW[table]


def columns_to_table(columns: pa.Table, table: str) -> pa.Table:
    """`batch_columns` output with the table's types: exactly what trades_to_arrow or
    quotes_to_arrow makes of the same records."""
    schema = _TYPED[table]
    arrays = []
    for f, column in zip(schema, columns.itercolumns(), strict=True):
        if pa.types.is_list(f.type) and column.null_count == len(column):
            arrays.append(pa.nulls(len(column), f.type))
        else:
            arrays.append(column.cast(f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def trades_to_arrow(rows: Sequence[Trade]) -> pa.Table:
    """Trades as a `market.trades` Arrow table (row order kept; the writer sorts)."""
    return _build(rows, _TRADES)


def quotes_to_arrow(rows: Sequence[Quote]) -> pa.Table:
    """Quotes as a `market.quotes` Arrow table; absent sides stay null."""
    return _build(rows, _QUOTES)


def events_to_arrow(rows: Sequence[SequenceEvent]) -> pa.Table:
    """Gap-ledger rows as a `market.sequence_events` Arrow table."""
    return _build(rows, _EVENTS)


def dead_letters_to_arrow(rows: Sequence[DeadLetter]) -> pa.Table:
    """Dead letters, raw bytes included, as a `market.dead_letters` Arrow table."""
    return _build(rows, _DEAD)
