"""Iceberg adapter: the catalog, the `market` tables, Arrow builders, commits with k2 state."""

from k2d.storage._arrow import (
    dead_letters_to_arrow,
    events_to_arrow,
    quotes_to_arrow,
    trades_to_arrow,
)
from k2d.storage._schemas import (
    DEAD_LETTERS,
    QUOTES,
    SEQUENCE_EVENTS,
    TABLE_NAMES,
    TABLE_PROPERTIES,
    TABLES,
    TRADES,
    TableDef,
)
from k2d.storage._state import (
    BATCH_IDS,
    FLUSH,
    FLUSH_TABLES,
    LOG_POSITION,
    WATERMARKS,
    K2State,
    flush_properties,
)
from k2d.storage._warehouse import CommitResult, Warehouse

__all__ = [
    "BATCH_IDS",
    "DEAD_LETTERS",
    "FLUSH",
    "FLUSH_TABLES",
    "LOG_POSITION",
    "QUOTES",
    "SEQUENCE_EVENTS",
    "TABLES",
    "TABLE_NAMES",
    "TABLE_PROPERTIES",
    "TRADES",
    "WATERMARKS",
    "CommitResult",
    "K2State",
    "TableDef",
    "Warehouse",
    "dead_letters_to_arrow",
    "events_to_arrow",
    "flush_properties",
    "quotes_to_arrow",
    "trades_to_arrow",
]
