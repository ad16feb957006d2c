"""Records -> Arrow tables with exactly the Iceberg tables' Arrow types.

Column-at-a-time: one C-level `map(attrgetter)` pass per field, then one vectorised
conversion per column (decimal strings are cast by Arrow, never through Python Decimal).
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
from typing import Any

import pyarrow as pa

from k2d.model import DeadLetter, Quote, SequenceEvent, Trade
from k2d.storage._schemas import DEAD_LETTERS, QUOTES, SEQUENCE_EVENTS, TABLES, TRADES

__all__ = ["dead_letters_to_arrow", "events_to_arrow", "quotes_to_arrow", "trades_to_arrow"]


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
