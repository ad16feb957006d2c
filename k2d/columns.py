"""Trades and quotes as Arrow columns of the records' own types: decimals as the venue's
text, times as integer microseconds. The ingest path carries rows this way, a few bytes a
row instead of an object; the writer casts the columns to the tables' types.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from k2d.model import Quote, Trade

__all__ = [
    "QUOTE_COLUMNS",
    "SMALL_BATCH_ROWS",
    "TRADE_COLUMNS",
    "Streams",
    "by_stream",
    "columns_to_records",
]

# Up to this many rows, a batch's per-row checks cost less in Python than in Arrow calls,
# whose fixed cost (5-20 us each, whatever the rows) is most of a small batch's price; a
# feed's 10 ms batch holds tens. The parser, the trackers and the writer use it.
SMALL_BATCH_ROWS = 256

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


class Streams(NamedTuple):
    """A batch's rows with each (exchange, symbol)'s rows together, and where each lies."""

    columns: pa.Table
    keys: list[tuple[str, str]]  # in the order each first comes in the batch
    starts: list[int]
    counts: list[int]

    def parts(self) -> list[tuple[tuple[str, str], pa.Table]]:
        return [
            (key, self.columns.slice(start, count))
            for key, start, count in zip(self.keys, self.starts, self.counts, strict=True)
        ]


def _grouped(columns: pa.Table, exchange: str) -> Streams | None:
    """The common case in two Arrow calls, the runs of equal symbols, when each symbol's rows
    are together (None otherwise). The general way below takes a dozen calls a batch, four
    times a batch: ~10% of the daemon's CPU at 6,000 records/s in 10 ms batches."""
    runs = pc.run_end_encode(columns.column("symbol").combine_chunks())
    symbols: list[str] = runs.values.to_pylist()
    if len(set(symbols)) != len(symbols):
        return None
    ends: list[int] = runs.run_ends.to_pylist()
    starts = [0, *ends[:-1]]
    counts = [end - start for start, end in zip(starts, ends, strict=True)]
    return Streams(columns, [(exchange, s) for s in symbols], starts, counts)


def by_stream(columns: pa.Table) -> Streams:
    """The rows of each (exchange, symbol) of a batch, each in batch order. The parser leaves
    its batches so (one symbol's rows together), and then this costs a few Arrow calls and
    no copy; otherwise the rows are reordered by a stable sort."""
    n = columns.num_rows
    if n == 0:
        return Streams(columns, [], [], [])
    exchange, symbol = columns.column("exchange"), columns.column("symbol")
    exchanges = pc.run_end_encode(exchange.combine_chunks()).values
    one_exchange = len(exchanges) == 1
    if one_exchange and (grouped := _grouped(columns, exchanges[0].as_py())) is not None:
        return grouped
    key = symbol if one_exchange else pc.binary_join_element_wise(exchange, symbol, "\x1f")
    # Codes count up from 0 in the order each key first comes.
    codes = pc.dictionary_encode(key).combine_chunks().indices
    if not pc.all(pc.greater_equal(codes.slice(1), codes.slice(0, n - 1))).as_py():
        order = pc.sort_indices(codes)  # stable: a stream's rows keep their order
        columns, codes = columns.take(order), codes.take(order)
    counts: list[int] = pc.value_counts(codes).field("counts").to_pylist()
    starts, at = [], 0
    for count in counts:
        starts.append(at)
        at += count
    at_starts = pa.array(starts, pa.int64())
    venues = columns.column("exchange").take(at_starts).to_pylist()
    symbols = columns.column("symbol").take(at_starts).to_pylist()
    return Streams(columns, list(zip(venues, symbols, strict=True)), starts, counts)
