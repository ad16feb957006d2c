"""Trades and quotes as Arrow columns of the records' own types: decimals as the venue's
text, times as integer microseconds. The ingest path carries rows this way, a few bytes a
row instead of an object; the writer casts the columns to the tables' types.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from k2d.model import Quote, Trade

__all__ = ["QUOTE_COLUMNS", "TRADE_COLUMNS", "columns_to_records"]

_STRING, _INT = pa.string(), pa.int64()
TRADE_COLUMNS = pa.schema(
    [
        ("message_id", _STRING),
        ("trade_id", _STRING),
        ("symbol", _STRING),
        ("exchange", _STRING),
        ("asset_class", _STRING),
        ("timestamp", _INT),
        ("price", _STRING),
        ("quantity", _STRING),
        ("currency", _STRING),
        ("side", _STRING),
        ("trade_conditions", pa.list_(_STRING)),
        ("source_sequence", _INT),
        ("ingestion_timestamp", _INT),
        ("platform_sequence", _INT),
        ("vendor_data", _STRING),
        ("provenance", _STRING),
    ]
)
QUOTE_COLUMNS = pa.schema(
    [
        ("message_id", _STRING),
        ("symbol", _STRING),
        ("exchange", _STRING),
        ("asset_class", _STRING),
        ("timestamp", _INT),
        ("bid_price", _STRING),
        ("bid_quantity", _STRING),
        ("ask_price", _STRING),
        ("ask_quantity", _STRING),
        ("currency", _STRING),
        ("source_sequence", _INT),
        ("ingestion_timestamp", _INT),
        ("platform_sequence", _INT),
        ("vendor_data", _STRING),
        ("provenance", _STRING),
    ]
)

# The list-typed field, a tuple in a record.
_TUPLES = frozenset({"trade_conditions"})


def columns_to_records(columns: pa.Table, cls: type[Trade] | type[Quote]) -> list[Any]:
    """Columns back as records of `cls`, for the readers that want objects (a stream client's
    rows, a Kafka record); equal to the records the columns were gathered from."""
    names = cls.__struct_fields__
    values = []
    for name in names:
        column: list[Any] = columns.column(name).to_pylist()
        if name in _TUPLES:
            column = [None if v is None else tuple(v) for v in column]
        values.append(column)
    return [cls(**dict(zip(names, row, strict=True))) for row in zip(*values, strict=True)]
