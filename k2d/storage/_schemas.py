"""The four Iceberg tables of namespace `market`: schema, partitioning, sort order, properties.

Field names follow schemas/trade_v2.avsc and quote_v2.avsc plus `provenance`. Each table's
Arrow schema is derived here once, so the builders and the Iceberg schema cannot drift apart.
Reference tables (`instruments`, written by batch loads) are in REFERENCE_TABLES, apart from
the four the pipeline writes and recovers from.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.table.sorting import NullOrder, SortDirection, SortField, SortOrder
from pyiceberg.transforms import DayTransform, IdentityTransform
from pyiceberg.types import (
    BinaryType,
    DateType,
    DecimalType,
    IcebergType,
    IntegerType,
    ListType,
    LongType,
    NestedField,
    StringType,
    TimestamptzType,
)

__all__ = [
    "DEAD_LETTERS",
    "INSTRUMENTS",
    "QUOTES",
    "REFERENCE_TABLES",
    "ROW_GROUP_ROWS",
    "SEQUENCE_EVENTS",
    "TABLES",
    "TABLE_NAMES",
    "TABLE_PROPERTIES",
    "TRADES",
    "TableDef",
]

TRADES = "trades"
QUOTES = "quotes"
SEQUENCE_EVENTS = "sequence_events"
DEAD_LETTERS = "dead_letters"
INSTRUMENTS = "instruments"
TABLE_NAMES = (TRADES, QUOTES, SEQUENCE_EVENTS, DEAD_LETTERS)
# The most rows in one Parquet row group of a data file (the unit DuckDB prunes by stats).
ROW_GROUP_ROWS = 32_768

TABLE_PROPERTIES: dict[str, str] = {
    "format-version": "2",
    # Keeps planning flat: manifests are merged instead of growing by one per commit.
    "commit.manifest-merge.enabled": "true",
    "write.parquet.compression-codec": "zstd",
    "write.parquet.compression-level": "3",
    # The layout a one-symbol window reads fast (a day of 1.43M trades, 20 symbols, 10-minute
    # window, DuckDB median): 128k-row groups of 1 MB pages 31 ms; 32k-row groups of 16 KB
    # pages 14 ms. The pages are what counts: DuckDB skips the pages that hold no row its
    # filter kept, and 128k-row groups of 16 KB pages measured as fast as 16k-row ones.
    # Row groups of 32k rows keep pruning by statistics useful to engines that skip no
    # pages. pyiceberg hands page-row-limit to Arrow as its write batch, and Arrow closes a
    # page only between batches: without it, 16 KB pages would hold 20,000 rows.
    # The writer's files and compaction's both follow these (each reads the table's).
    "write.parquet.row-group-limit": str(ROW_GROUP_ROWS),
    "write.parquet.page-size-bytes": "16384",
    "write.parquet.page-row-limit": "4096",
    # Unique columns (ids, times) compress better plain than dictionary-encoded: a 32 KB
    # dictionary gives up on them early and still holds symbol, side, currency. A day's
    # file came out about 30% smaller and was written about 40% faster than with the 2 MB
    # default.
    "write.parquet.dict-size-bytes": "32768",
    # Every commit writes a new metadata.json; keep a bounded history of them on disk.
    "write.metadata.delete-after-commit.enabled": "true",
    "write.metadata.previous-versions-max": "50",
    # Conflicts are retried by Warehouse.append under WriterConfig's policy and counted in
    # k2d_commit_conflicts_total; pyiceberg's own retry loop would hide them. Any other
    # committer (compaction) retries with its own policy.
    "commit.retry.num-retries": "0",
}

_DECIMAL = DecimalType(18, 8)
_TS = TimestamptzType()


@dataclass(frozen=True)
class TableDef:
    """Everything needed to create a table and build Arrow data for it."""

    name: str
    schema: Schema
    spec: PartitionSpec
    sort_order: SortOrder
    # Rows of each data file are sorted by these columns (matches `sort_order`).
    sort_columns: tuple[str, ...]
    # The event-time column: partitioned by day, reported as a file's min/max timestamp.
    time_column: str
    arrow_schema: pa.Schema


def _schema(*cols: tuple[str, IcebergType, bool], identifier: tuple[str, ...] = ()) -> Schema:
    """Columns as (name, type, required); ids are assigned in order, list elements after."""
    next_id = len(cols) + 1
    fields = []
    for i, (name, typ, required) in enumerate(cols, start=1):
        if isinstance(typ, ListType):
            typ = ListType(element_id=next_id, element=typ.element_type, element_required=True)
            next_id += 1
        fields.append(NestedField(field_id=i, name=name, field_type=typ, required=required))
    ids = [f.field_id for f in fields if f.name in identifier]
    return Schema(*fields, identifier_field_ids=ids)


_ARROW_TYPES: dict[type[IcebergType], pa.DataType] = {
    StringType: pa.string(),
    LongType: pa.int64(),
    IntegerType: pa.int32(),
    TimestamptzType: pa.timestamp("us", tz="UTC"),
    DecimalType: pa.decimal128(18, 8),
    BinaryType: pa.binary(),
    DateType: pa.date32(),
}


def _arrow_schema(schema: Schema) -> pa.Schema:
    fields = []
    for f in schema.fields:
        typ = f.field_type
        if isinstance(typ, ListType):
            element = pa.field("element", _ARROW_TYPES[type(typ.element_type)], nullable=False)
            arrow_type: pa.DataType = pa.list_(element)
        else:
            arrow_type = _ARROW_TYPES[type(typ)]
        fields.append(pa.field(f.name, arrow_type, nullable=not f.required))
    return pa.schema(fields)


def _define(
    name: str,
    schema: Schema,
    time_column: str,
    by_exchange: bool,
    sort_columns: tuple[str, ...] = (),
) -> TableDef:
    time_id = schema.find_field(time_column).field_id
    parts = [
        PartitionField(
            source_id=time_id, field_id=1000, transform=DayTransform(), name=f"{time_column}_day"
        )
    ]
    if by_exchange:
        parts.append(
            PartitionField(
                source_id=schema.find_field("exchange").field_id,
                field_id=1001,
                transform=IdentityTransform(),
                name="exchange",
            )
        )
    sort_order = SortOrder(
        *(
            SortField(
                source_id=schema.find_field(col).field_id,
                transform=IdentityTransform(),
                direction=SortDirection.ASC,
                null_order=NullOrder.NULLS_FIRST,
            )
            for col in sort_columns
        )
    )
    return TableDef(
        name=name,
        schema=schema,
        spec=PartitionSpec(*parts),
        sort_order=sort_order,
        sort_columns=sort_columns,
        time_column=time_column,
        arrow_schema=_arrow_schema(schema),
    )


_ROW_ORDER = ("symbol", "timestamp", "source_sequence")

TABLES: dict[str, TableDef] = {
    TRADES: _define(
        TRADES,
        _schema(
            ("message_id", StringType(), True),
            ("trade_id", StringType(), True),
            ("symbol", StringType(), True),
            ("exchange", StringType(), True),
            ("asset_class", StringType(), True),
            ("timestamp", _TS, True),
            ("price", _DECIMAL, True),
            ("quantity", _DECIMAL, True),
            ("currency", StringType(), True),
            ("side", StringType(), True),
            ("trade_conditions", ListType(element_id=0, element=StringType()), False),
            ("source_sequence", LongType(), False),
            ("ingestion_timestamp", _TS, True),
            ("platform_sequence", LongType(), True),
            ("vendor_data", StringType(), False),
            ("provenance", StringType(), True),
            identifier=("message_id",),
        ),
        time_column="timestamp",
        by_exchange=True,
        sort_columns=_ROW_ORDER,
    ),
    QUOTES: _define(
        QUOTES,
        _schema(
            ("message_id", StringType(), True),
            ("symbol", StringType(), True),
            ("exchange", StringType(), True),
            ("asset_class", StringType(), True),
            ("timestamp", _TS, True),
            ("bid_price", _DECIMAL, False),
            ("bid_quantity", _DECIMAL, False),
            ("ask_price", _DECIMAL, False),
            ("ask_quantity", _DECIMAL, False),
            ("currency", StringType(), True),
            ("source_sequence", LongType(), False),
            ("ingestion_timestamp", _TS, True),
            ("platform_sequence", LongType(), True),
            ("vendor_data", StringType(), False),
            ("provenance", StringType(), True),
            identifier=("message_id",),
        ),
        time_column="timestamp",
        by_exchange=True,
        sort_columns=_ROW_ORDER,
    ),
    SEQUENCE_EVENTS: _define(
        SEQUENCE_EVENTS,
        _schema(
            ("event_id", StringType(), True),
            ("exchange", StringType(), True),
            ("symbol", StringType(), True),
            ("stream", StringType(), True),
            ("partition", IntegerType(), True),
            ("kind", StringType(), True),
            ("status", StringType(), True),
            ("first_missing", LongType(), False),
            ("last_missing", LongType(), False),
            ("missing_count", LongType(), True),
            ("detected_at", _TS, True),
            ("resolved_at", _TS, False),
            ("window_start", _TS, False),
            ("window_end", _TS, False),
            ("detail", StringType(), True),
            ("recorded_at", _TS, True),
        ),
        time_column="detected_at",
        by_exchange=False,
    ),
    DEAD_LETTERS: _define(
        DEAD_LETTERS,
        _schema(
            ("received_at", _TS, True),
            ("source", StringType(), True),
            ("exchange", StringType(), True),
            ("reason", StringType(), True),
            ("raw", BinaryType(), True),
            ("line", LongType(), False),
            ("detail", StringType(), True),
        ),
        time_column="received_at",
        by_exchange=False,
    ),
}

# Small and rewritten whole by each upsert: unpartitioned, one row per listing period.
_INSTRUMENTS_SCHEMA = _schema(
    ("company_id", StringType(), True),
    ("symbol", StringType(), True),
    ("name", StringType(), True),
    ("isin", StringType(), False),
    ("valid_from", DateType(), False),
    ("valid_to", DateType(), False),
    ("exchange", StringType(), True),
)

REFERENCE_TABLES: dict[str, TableDef] = {
    INSTRUMENTS: TableDef(
        name=INSTRUMENTS,
        schema=_INSTRUMENTS_SCHEMA,
        spec=PartitionSpec(),
        sort_order=SortOrder(
            *(
                SortField(
                    source_id=_INSTRUMENTS_SCHEMA.find_field(col).field_id,
                    transform=IdentityTransform(),
                    direction=SortDirection.ASC,
                    null_order=NullOrder.NULLS_FIRST,
                )
                for col in ("exchange", "company_id", "valid_from")
            )
        ),
        sort_columns=("exchange", "company_id", "valid_from"),
        time_column="valid_from",
        arrow_schema=_arrow_schema(_INSTRUMENTS_SCHEMA),
    ),
}
