"""Output columns and formats: how each kind of column is rendered, and the byte writers.

JSON rows are rendered by DuckDB itself (`json_object`, vectorised): decimals become exact
strings, timestamps ISO-8601 with microseconds and `Z`. Rows served from memory (the hot
tier) are rendered into the same bytes by Arrow's kernels (`json_rows`). CSV carries the same
text renderings; Parquet and Arrow IPC carry the native types (decimal128(18,8),
timestamp[us, UTC]).
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
import pyarrow.compute as pc
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
    "json_rows",
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


# Text that DuckDB's JSON writer copies as it is: printable ASCII but the quote and the
# backslash, which it escapes with a backslash; anything else (control characters,
# non-ASCII) is left to DuckDB.
_PLAIN_TEXT = r"^[ !#-\[\]-~]*$"
_ASCII_TEXT = r"^[ -~]*$"
_NULL_TEXT = pa.scalar(None, pa.string())
# Event times DuckDB's strftime and Arrow's cast print alike: four-digit years from 1970.
_LAST_US = 253_402_300_800_000_000  # 10000-01-01T00:00:00Z


@dataclass(slots=True)
class _Rendered:
    """One column's JSON values: `text` (null where null), what goes before and after
    each, and whether it is a string column's own text (which may need escapes)."""

    text: pa.Array
    before: str = ""
    after: str = ""
    string: bool = False


def json_rows(table: pa.Table, columns: Sequence[Column]) -> pa.Array | None:
    """The JSON object of each row of `table`, byte for byte as `json_row_expr` has DuckDB
    render it; None when a value is one whose rendering is left to DuckDB (control or
    non-ASCII characters, a kind not rendered here). Few kernels a column: each call costs
    more than the rows of a page do, so quotes travel in the literal text between values,
    and text is checked for escapes all columns at once."""
    if not columns:
        return pa.array(["{}"] * table.num_rows, pa.string())
    names: list[str] = []
    rendered: list[_Rendered | None] = []  # None: every value null
    checks: list[pa.Array] = []  # text DuckDB may escape
    for i, column in enumerate(columns):
        values = table.column(column.name).combine_chunks()
        names.append(("{" if i == 0 else ",") + f'"{column.name}":')
        if values.null_count == len(values):
            rendered.append(None)
            continue
        one = _json_text(values, column.kind, checks)
        if one is None:
            return None
        rendered.append(one)
    if checks and not _matches(pc.binary_join_element_wise(*checks, ""), _PLAIN_TEXT):
        for one in rendered:
            if one is not None and one.string:
                escaped = _escaped(one.text)
                if escaped is None:
                    return None
                one.text = escaped
    pieces: list[pa.Array | str] = []
    literal = ""
    for name, one in zip(names, rendered, strict=True):
        literal += name
        if one is None:
            literal += "null"
            continue
        text, before, after = one.text, one.before, one.after
        if text.null_count:
            text = pc.fill_null(pc.binary_join_element_wise(before, text, after, ""), "null")
            before = after = ""
        pieces += [literal + before, text]
        literal = after
    pieces.append(literal + "}")
    return pc.binary_join_element_wise(*pieces, "")


def _json_text(values: pa.Array, kind: Kind, checks: list[pa.Array]) -> _Rendered | None:
    if kind is Kind.STRING:
        checks.append(pc.fill_null(values, "") if values.null_count else values)
        return _Rendered(values, '"', '"', string=True)
    if kind is Kind.INT:
        return _Rendered(pc.cast(values, pa.string()))
    if kind is Kind.DECIMAL:
        text = _decimal_text(values)
        return None if text is None else _Rendered(text, '"', '"')
    if kind is Kind.TIMESTAMP:
        lo, hi = pc.min_max(values.cast(pa.int64())).values()
        if lo.as_py() < 0 or hi.as_py() >= _LAST_US:
            return None
        # Through a naive timestamp, whose cast to text is 20x faster than a zoned one's:
        # "YYYY-MM-DD HH:MM:SS.ffffff"; strftime's has a T.
        text = pc.cast(values.cast(pa.timestamp(values.type.unit)), pa.string())
        return _Rendered(pc.replace_substring(text, " ", "T", max_replacements=1), '"', 'Z"')
    if kind is Kind.LIST and pa.types.is_string(values.type.value_type):
        lists = values.cast(pa.list_(pa.string()))
        if not _matches(pc.list_flatten(lists), _PLAIN_TEXT):
            return None  # an element DuckDB would escape: rare enough to leave to it
        joined = pc.binary_join(lists, '","')
        text = pc.binary_join_element_wise('["', joined, '"]', "")
        return _Rendered(pc.if_else(pc.equal(pc.list_value_length(values), 0), "[]", text))
    return None


def _matches(text: pa.Array, pattern: str) -> bool:
    return len(text) == 0 or bool(pc.all(pc.match_substring_regex(text, pattern)).as_py())


def _escaped(text: pa.Array) -> pa.Array | None:
    """Text with the quote and the backslash escaped as DuckDB's JSON writer does; None if
    it holds a character escaped otherwise (or not ASCII)."""
    if not _matches(pc.fill_null(text, ""), _ASCII_TEXT):
        return None
    if pc.any(pc.match_substring(text, "\\")).as_py():
        text = pc.replace_substring(text, "\\", "\\\\")
    if pc.any(pc.match_substring(text, '"')).as_py():
        text = pc.replace_substring(text, '"', '\\"')
    return text


def _decimal_text(values: pa.Array) -> pa.Array | None:
    """Every digit of the scale and no exponent, as DuckDB casts a decimal to text. Arrow's
    own cast agrees but below 1E-6 (it writes 5E-7): then from the unscaled integer, the low
    word of each decimal128, whole for precision up to 18."""
    text = pc.cast(values, pa.string())
    typ = values.type
    if not pc.any(pc.match_substring(text, "E")).as_py():
        return text
    if not pa.types.is_decimal128(typ) or typ.precision > 18:
        return None  # sums in decimal(38, 8): one word does not hold them
    words = pa.Array.from_buffers(
        pa.int64(), 2 * (len(values) + values.offset), [None, values.buffers()[1]]
    )
    pairs = pa.Array.from_buffers(
        pa.list_(pa.int64(), 2), len(values), [None], children=[words], offset=values.offset
    )
    units = pc.list_element(pairs, 0)
    size = pa.scalar(10**typ.scale, pa.int64())
    magnitude = pc.abs(units)
    whole = pc.divide(magnitude, size)
    text = pc.cast(whole, pa.string())
    if typ.scale:
        fraction = pc.cast(pc.subtract(magnitude, pc.multiply(whole, size)), pa.string())
        text = pc.binary_join_element_wise(text, pc.utf8_lpad(fraction, typ.scale, "0"), ".")
    text = pc.if_else(pc.less(units, 0), pc.binary_join_element_wise("-", text, ""), text)
    if values.null_count:
        text = pc.if_else(pc.is_valid(values), text, _NULL_TEXT)
    return text


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
