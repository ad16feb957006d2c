"""Output columns and formats: how each kind of column is rendered, and the byte writers.

JSON rows are rendered by DuckDB itself (`json_object`, vectorised): decimals become exact
strings, timestamps ISO-8601 with microseconds and `Z`. CSV carries the same text renderings;
Parquet and Arrow IPC carry the native types (decimal128(18,8), timestamp[us, UTC]).
"""

from __future__ import annotations

import enum
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from k2d.query._params import Format

__all__ = [
    "JSON_ROW",
    "Column",
    "Kind",
    "RowWriter",
    "column_expr",
    "ident",
    "json_row_expr",
    "new_writer",
]

# The hidden column that holds a JSON row rendered by DuckDB.
JSON_ROW = "__row"
TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")


class Kind(enum.StrEnum):
    STRING = "string"
    INT = "int"
    FLOAT = "float"
    DECIMAL = "decimal"
    TIMESTAMP = "timestamp"
    DATE = "date"
    LIST = "list"
    BOOL = "bool"
    JSON = "json"  # text that holds a JSON document, embedded as JSON in JSON output


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    kind: Kind


def ident(name: str) -> str:
    """A quoted identifier. Names come from allow-lists; the check keeps it that way."""
    if not _IDENT.fullmatch(name):
        raise ValueError(f"not an allow-listed identifier: {name!r}")
    return f'"{name}"'


def column_expr(column: Column, fmt: Format) -> str:
    """The SQL rendering of `column` (read from the CTE `q`) for an output format."""
    ref = ident(column.name)
    kind = column.kind
    if fmt in (Format.PARQUET, Format.ARROW):
        return ref
    if kind is Kind.DECIMAL:
        return f"CAST({ref} AS VARCHAR)"
    if kind is Kind.TIMESTAMP:
        return f"strftime({ref}, '{TS_FORMAT}')"
    if kind is Kind.DATE:
        return f"strftime({ref}, '%Y-%m-%d')"
    if kind is Kind.FLOAT:
        # NaN and infinities are not JSON.
        return f"CASE WHEN isfinite({ref}) THEN {ref} END"
    if kind is Kind.LIST and fmt is Format.CSV:
        return f"CAST(to_json({ref}) AS VARCHAR)"
    if kind is Kind.JSON and fmt is Format.JSON:
        return f"json({ref})"
    return ref


def json_row_expr(columns: Sequence[Column]) -> str:
    """One JSON object per row, as text."""
    if not columns:
        return "'{}'"
    pairs = ", ".join(f"'{c.name}', {column_expr(c, Format.JSON)}" for c in columns)
    return f"CAST(json_object({pairs}) AS VARCHAR)"


class _Sink(io.RawIOBase):
    """A write-only file that hands out what was written since the last take()."""

    def __init__(self) -> None:
        super().__init__()
        self._parts: list[bytes] = []
        self._pos = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._parts.append(chunk)
        self._pos += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._pos

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


class RowWriter:
    """Turns Arrow batches into the bytes of one format, chunk by chunk."""

    def begin(self, schema: pa.Schema) -> bytes:
        raise NotImplementedError

    def batch(self, batch: pa.RecordBatch) -> bytes:
        raise NotImplementedError

    def end(self, meta: Mapping[str, Any], error: Mapping[str, str] | None = None) -> bytes:
        raise NotImplementedError


class _JsonWriter(RowWriter):
    """`{"data": [rows...], "meta": {...}}`; meta comes last, once the page is known."""

    def __init__(self) -> None:
        self._first = True

    def begin(self, schema: pa.Schema) -> bytes:
        return b'{"data":['

    def batch(self, batch: pa.RecordBatch) -> bytes:
        if batch.num_rows == 0:
            return b""
        rows = batch.column(JSON_ROW).to_pylist()
        text = ",".join(rows)
        if not self._first:
            text = "," + text
        self._first = False
        return text.encode()

    def end(self, meta: Mapping[str, Any], error: Mapping[str, str] | None = None) -> bytes:
        tail = b'],"meta":' + msgspec.json.encode(meta)
        if error is not None:
            tail += b',"error":' + msgspec.json.encode(error)
        return tail + b"}"


class _CsvWriter(RowWriter):
    def begin(self, schema: pa.Schema) -> bytes:
        out = io.BytesIO()
        pacsv.write_csv(schema.empty_table(), out)
        return out.getvalue()

    def batch(self, batch: pa.RecordBatch) -> bytes:
        if batch.num_rows == 0:
            return b""
        out = io.BytesIO()
        pacsv.write_csv(batch, out, pacsv.WriteOptions(include_header=False))
        return out.getvalue()

    def end(self, meta: Mapping[str, Any], error: Mapping[str, str] | None = None) -> bytes:
        return b""


class _ArrowWriter(RowWriter):
    def __init__(self) -> None:
        self._sink = _Sink()
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None

    def begin(self, schema: pa.Schema) -> bytes:
        self._writer = pa.ipc.new_stream(self._sink, schema)
        return self._sink.take()

    def batch(self, batch: pa.RecordBatch) -> bytes:
        assert self._writer is not None
        if batch.num_rows:
            self._writer.write_batch(batch)
        return self._sink.take()

    def end(self, meta: Mapping[str, Any], error: Mapping[str, str] | None = None) -> bytes:
        assert self._writer is not None
        self._writer.close()
        return self._sink.take()


class _ParquetWriter(RowWriter):
    def __init__(self) -> None:
        self._sink = _Sink()
        self._writer: pq.ParquetWriter | None = None

    def begin(self, schema: pa.Schema) -> bytes:
        self._writer = pq.ParquetWriter(self._sink, schema, compression="zstd")
        return self._sink.take()

    def batch(self, batch: pa.RecordBatch) -> bytes:
        assert self._writer is not None
        if batch.num_rows:
            self._writer.write_batch(batch)
        return self._sink.take()

    def end(self, meta: Mapping[str, Any], error: Mapping[str, str] | None = None) -> bytes:
        assert self._writer is not None
        self._writer.close()
        return self._sink.take()


def new_writer(fmt: Format) -> RowWriter:
    if fmt is Format.JSON:
        return _JsonWriter()
    if fmt is Format.CSV:
        return _CsvWriter()
    if fmt is Format.ARROW:
        return _ArrowWriter()
    return _ParquetWriter()
