"""Running a prepared query on one DuckDB cursor and turning it into bytes, batch by batch.

A plan (one per endpoint) prepares a core SELECT over the files of the snapshot it reads; the
executor wraps it as `WITH q AS (core) SELECT <rendered columns> FROM q ORDER BY <key>
LIMIT n`, streams Arrow record batches out of DuckDB and renders each into the response
format, so memory stays bounded by a batch whatever the page size. Pages are keyset pages:
the key of the last row returned is the next cursor.

A first page in JSON whose rows a plan can give from memory (a window over files the hot
tier holds, k2d/query/_hot.py; minute bars the pool keeps) is answered without DuckDB: the
same rows, sorted, cut and rendered by Arrow into the same bytes. DuckDB costs 3-6 ms a
query here however few the rows; Arrow a millisecond or two for a page.

JSON asks for one row more than the page and writes its meta (truncated, next_cursor) after
the rows; the other formats put the meta in headers, so they first peek at the row after the
page. Everything here blocks: the QueryPool runs it in its worker threads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from k2d.query._cursor import TIMESTAMP_US, KeyBounds, decode_cursor, encode_cursor
from k2d.query._errors import QueryError
from k2d.query._params import MEDIA_TYPES, Format, SnapshotSel
from k2d.query._render import (
    JSON_ROW,
    Column,
    Kind,
    column_expr,
    ident,
    json_row_expr,
    json_rows,
    new_writer,
)

if TYPE_CHECKING:
    import duckdb

    from k2d.config import QueryConfig
    from k2d.query._duckdb import Statements
    from k2d.query._files import TableFiles
    from k2d.query._index import FileIndex
    from k2d.query._ledger import Ledger

__all__ = [
    "Head",
    "Key",
    "Opened",
    "Plan",
    "PlanContext",
    "Prepared",
    "keyset",
    "open_result",
]

log = logging.getLogger(__name__)

_BATCH_ROWS = 8_192
# The statement in a span: long enough for any plan's SQL (file lists are bound, not inlined).
_MAX_QUERY_TEXT = 4_096
_DEDUPE = "__dedupe"
SNAPSHOT_HEADER = "X-K2D-Snapshot-Id"
TRUNCATED_HEADER = "X-K2D-Truncated"
CURSOR_HEADER = "X-K2D-Next-Cursor"


@dataclass(frozen=True, slots=True)
class Key:
    """One column of a page key. Timestamps travel in cursors as epoch microseconds."""

    name: str
    kind: Kind

    @property
    def py_type(self) -> type:
        return str if self.kind is Kind.STRING else int

    @property
    def bounds(self) -> KeyBounds:
        """The type and range a cursor's value for this column must have."""
        return self.py_type, TIMESTAMP_US if self.kind is Kind.TIMESTAMP else None

    def select(self) -> str:
        ref = ident(self.name)
        return f"epoch_us({ref})" if self.kind is Kind.TIMESTAMP else ref

    def param(self) -> str:
        return "make_timestamptz(?)" if self.kind is Kind.TIMESTAMP else "?"


def keyset(
    exprs: Sequence[str], keys: Sequence[Key], values: Sequence[int | str], desc: bool
) -> tuple[str, list[Any]]:
    """`(a, b, ...) > (?, ?, ...)` (or `<` descending): rows strictly after a cursor."""
    lhs = ", ".join(exprs)
    rhs = ", ".join(k.param() for k in keys)
    return f"({lhs}) {'<' if desc else '>'} ({rhs})", list(values)


@dataclass(frozen=True)
class Prepared:
    """A plan's core query and how to page and render it."""

    sql: str
    params: Sequence[Any]
    columns: tuple[Column, ...]
    keys: tuple[Key, ...]
    limit: int
    desc: bool = False
    relations: Mapping[str, pa.Table] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    # Cursors: the query's fingerprint (None: no cursors) and the snapshots they pin.
    fingerprint: str | None = None
    snapshots: Mapping[str, int] = field(default_factory=dict)
    # A column (of q) whose repeats in adjacent rows are duplicates to drop (message_id).
    dedupe: str | None = None
    filename: str = "result"
    # The core query's rows from memory (its columns, in any order), or None when they are
    # not all there: then, for JSON, they stand in for DuckDB's.
    in_memory: Callable[[], pa.Table | None] | None = None


class PlanContext:
    """What a plan may use while it prepares, inside a worker thread before the deadline."""

    def __init__(
        self,
        index: FileIndex,
        cursor: duckdb.DuckDBPyConnection,
        cfg: QueryConfig,
        deadline: float,
        statements: Statements | None = None,
    ) -> None:
        self.index = index
        self.cursor = cursor
        self.cfg = cfg
        self.deadline = deadline
        # Parsed SQL shared by the pool's workers (None: each query parsed anew).
        self.statements = statements

    def execute(self, sql: str, params: Sequence[Any]) -> duckdb.DuckDBPyConnection:
        """Run `sql` on the cursor, parsed once while the pool keeps its shape."""
        query = sql if self.statements is None else self.statements.parsed(self.cursor, sql)
        return self.cursor.execute(query, params)

    @property
    def ledger(self) -> Ledger:
        return self.index.ledger

    def check_deadline(self) -> None:
        if time.monotonic() >= self.deadline:
            raise QueryError(504, "query_timeout", "the query ran past its time limit")

    def files(
        self, table: str, sel: SnapshotSel, pinned: Mapping[str, int] | None = None
    ) -> TableFiles:
        """The files of the snapshot to read: the one a cursor pinned, else the selected."""
        self.check_deadline()
        if pinned and table in pinned:
            try:
                return self.index.files(table, SnapshotSel(snapshot_id=pinned[table]), self.cursor)
            except QueryError as exc:
                if exc.code != "unknown_snapshot":
                    raise
                # Forged, or expired by maintenance since the first page was read.
                raise QueryError(
                    400,
                    "invalid_cursor",
                    f"the {table} snapshot this cursor pinned is not there (expired?); "
                    "start again without a cursor",
                ) from None
        return self.index.files(table, sel, self.cursor)

    def decode_cursor(
        self, text: str | None, fp: str, keys: Sequence[Key]
    ) -> tuple[dict[str, int], list[int | str] | None]:
        """(pinned snapshots, key values) of a cursor; empty for the first page."""
        if text is None:
            return {}, None
        data = decode_cursor(text, fp, [k.bounds for k in keys])
        return data.snapshots, data.key


class Plan(Protocol):
    """One endpoint's request, validated; prepare() runs in a worker thread."""

    @property
    def endpoint(self) -> str: ...

    def prepare(self, ctx: PlanContext) -> Prepared: ...


@dataclass(frozen=True)
class Head:
    """What is known before the first byte: the media type and headers; and the whole body
    when the first read reached the end (most pages), so it goes out as one response."""

    media_type: str
    headers: dict[str, str]
    body: bytes | None = None


class Opened:
    """A running query: `next_chunk()` until None (or `read()` until done), then `close()`
    (always; a no-op once `read()` has seen the end)."""

    def __init__(
        self,
        cursor: duckdb.DuckDBPyConnection,
        prepared: Prepared,
        fmt: Format,
        reader: pa.RecordBatchReader,
        head: Head,
        peeked: tuple[bool, str | None],
        sql: str = "",
        in_memory: bool = False,
    ) -> None:
        self._cursor = cursor
        self._sql = sql
        self._in_memory = in_memory
        self._p = prepared
        self._fmt = fmt
        self._reader = reader
        self.head = head
        self._writer = new_writer(fmt)
        visible = [f for f in reader.schema if not f.name.startswith("__") or f.name == JSON_ROW]
        self._visible = [f.name for f in visible]
        self._pending: bytes | None = self._writer.begin(pa.schema(visible))
        # The first batch is read now, in open_result: sorting and aggregating happen before
        # it exists, so their failures (a timeout) still get a proper status code.
        self._first: pa.RecordBatch | None = self._read()
        self._remaining = prepared.limit
        self._rows = 0
        self._truncated, self._next_cursor = peeked
        self._last_key: list[int | str] | None = None
        self._last_dedupe: Any = None
        self._done = False
        self._closed = False

    def span_attributes(self) -> dict[str, str | int]:
        """OpenTelemetry database attributes of the query as it ran: the statement with its
        placeholders (values are bound, never in the text), the tables it read, the rows
        returned so far."""
        attrs: dict[str, str | int] = {
            "db.query.text": self._sql[:_MAX_QUERY_TEXT],
            "db.response.returned_rows": self._rows,
        }
        meta = self._p.meta
        table = meta.get("table")
        tables = [table] if isinstance(table, str) else sorted(meta.get("snapshots") or ())
        if tables:
            attrs["db.query.summary"] = " ".join(["SELECT", *tables])
        if len(tables) == 1:
            attrs["db.collection.name"] = tables[0]
        snapshot = meta.get("snapshot_id")
        if isinstance(snapshot, int):
            attrs["k2d.snapshot_id"] = snapshot
        if self._in_memory:
            attrs["k2d.from_memory"] = True
        return attrs

    def next_chunk(self) -> bytes | None:
        if self._pending is not None:
            chunk, self._pending = self._pending, None
            return chunk
        while not self._done:
            batch, self._first = self._first, None
            if batch is None:
                batch = self._read()
            if batch is None:
                self._done = True
                return self._writer.end(self._meta())
            chunk = self._consume(batch)
            if chunk:
                return chunk
        return None

    def read(self, max_bytes: int) -> tuple[bytes, bool, Exception | None]:
        """The next chunks as one, until about `max_bytes` or the end: (bytes, ended, error).
        At the end the query is closed too. A failure after some chunks comes back with
        them, so they still go out before it; with none, it raises. One call answers a
        small page: each call is a hop to a worker thread and back, which costs the event
        loop more than the bytes do."""
        parts: list[bytes] = []
        size = 0
        while size < max_bytes:
            try:
                chunk = self.next_chunk()
            except Exception as exc:
                if not parts:
                    raise
                return b"".join(parts), False, exc
            if chunk is None:
                self.close()
                return b"".join(parts), True, None
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts), False, None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def in_memory(self) -> bool:
        """Answered from memory (the hot tier, the minute bars kept), not by DuckDB."""
        return self._in_memory

    def _read(self) -> pa.RecordBatch | None:
        try:
            return self._reader.read_next_batch()
        except StopIteration:
            return None

    def abort(self, code: str, detail: str) -> bytes:
        """The closing bytes after a failure mid-stream (JSON only; other formats just stop)."""
        self._done = True
        if self._fmt is not Format.JSON:
            return b""
        return self._writer.end(self._meta(), {"code": code, "detail": detail})

    def close(self) -> None:
        self._done = True
        if self._closed:
            return
        self._closed = True
        try:
            self._reader.close()
        finally:
            for name in self._p.relations:
                self._cursor.unregister(name)

    def _consume(self, batch: pa.RecordBatch) -> bytes:
        n = batch.num_rows
        take = min(n, self._remaining)
        if take < n:
            self._truncated = True
        if take == 0:
            return b""
        self._remaining -= take
        batch = batch.slice(0, take)
        if self._fmt is Format.JSON and self._p.keys:
            self._last_key = [
                batch.column(f"__k{i}")[take - 1].as_py() for i in range(len(self._p.keys))
            ]
        if self._p.dedupe is not None:
            batch = self._dedupe(batch)
        self._rows += batch.num_rows
        return self._writer.batch(batch.select(self._visible))

    def _dedupe(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        col = batch.column(_DEDUPE)
        prev = pa.concat_arrays(
            [pa.array([self._last_dedupe], col.type), col.slice(0, len(col) - 1)]
        )
        keep = pc.fill_null(pc.not_equal(col, prev), True)
        self._last_dedupe = col[len(col) - 1].as_py()
        return batch.filter(keep)

    def _meta(self) -> dict[str, Any]:
        if self._fmt is Format.JSON and self._truncated and self._last_key is not None:
            self._next_cursor = self._cursor_for(self._last_key)
        meta = dict(self._p.meta)
        meta["rows"] = self._rows
        meta["truncated"] = self._truncated
        meta["next_cursor"] = self._next_cursor
        return meta

    def _cursor_for(self, key: Sequence[int | str]) -> str | None:
        if self._p.fingerprint is None:
            return None
        return encode_cursor(self._p.fingerprint, self._p.snapshots, key)


def _outer(p: Prepared, fmt: Format) -> str:
    order = ", ".join(f"{ident(k.name)} {'DESC' if p.desc else 'ASC'}" for k in p.keys)
    if fmt is Format.JSON:
        cols = [f"{json_row_expr(p.columns)} AS {ident(JSON_ROW)}"]
    else:
        cols = [f"{column_expr(c, fmt)} AS {ident(c.name)}" for c in p.columns]
    cols += [f"{k.select()} AS {ident(f'__k{i}')}" for i, k in enumerate(p.keys)]
    if p.dedupe is not None:
        cols.append(f"{ident(p.dedupe)} AS {ident(_DEDUPE)}")
    sql = f"WITH q AS ({p.sql}) SELECT {', '.join(cols)} FROM q"
    if order:
        sql += f" ORDER BY {order}"
    return sql + " LIMIT ?"


def _peek(ctx: PlanContext, p: Prepared) -> tuple[bool, str | None]:
    """For formats whose meta travels in headers: is there a row after the page?"""
    if not p.keys:
        return False, None
    order = ", ".join(f"{ident(k.name)} {'DESC' if p.desc else 'ASC'}" for k in p.keys)
    keys = ", ".join(k.select() for k in p.keys)
    sql = f"WITH q AS ({p.sql}) SELECT {keys} FROM q ORDER BY {order} LIMIT 2 OFFSET ?"
    rows = ctx.execute(sql, [*p.params, p.limit - 1]).fetchall()
    if len(rows) < 2:
        return False, None
    if p.fingerprint is None:
        return True, None
    return True, encode_cursor(p.fingerprint, p.snapshots, list(rows[0]))


def _from_memory(p: Prepared) -> pa.Table | None:
    """The result `_outer` would give for JSON, from the plan's rows in memory; None unless
    it has them all and every value renders."""
    if p.in_memory is None or not p.keys:
        return None
    rows = p.in_memory()
    if rows is None:
        return None
    order = "descending" if p.desc else "ascending"
    sort_keys = [(k.name, order) for k in p.keys]
    wanted = p.limit + 1
    if rows.num_rows > 4 * wanted:
        # A heap of the first rows, not a sort of all: a wide window, a short page.
        rows = rows.take(pc.select_k_unstable(rows, wanted, sort_keys))
    rows = rows.take(pc.sort_indices(rows, sort_keys)[:wanted])
    text = json_rows(rows, p.columns)
    if text is None:
        return None
    out: dict[str, pa.Array | pa.ChunkedArray] = {JSON_ROW: text}
    for i, k in enumerate(p.keys):
        col = rows.column(k.name)
        out[f"__k{i}"] = col.cast(pa.int64()) if k.kind is Kind.TIMESTAMP else col
    if p.dedupe is not None:
        out[_DEDUPE] = rows.column(p.dedupe)
    return pa.table(out)


def open_result(ctx: PlanContext, plan: Plan, fmt: Format) -> Opened:
    """Prepare `plan`, run its query up to the first batch, and return the stream of bytes."""
    prepared = plan.prepare(ctx)
    cursor = ctx.cursor
    headers: dict[str, str] = {}
    snapshot = prepared.meta.get("snapshot_id")
    if snapshot is not None:
        headers[SNAPSHOT_HEADER] = str(snapshot)
    held = None
    if fmt is Format.JSON and prepared.in_memory is not None:
        try:
            held = _from_memory(prepared)
        except Exception:
            # A shortcut's fault must not fail a query DuckDB can answer; it is still a bug.
            log.warning("a page from memory failed; DuckDB answers it instead", exc_info=True)
    if held is not None:
        head = Head(MEDIA_TYPES[fmt], headers)
        rows = held.to_reader(_BATCH_ROWS)
        return Opened(cursor, prepared, fmt, rows, head, (False, None), in_memory=True)
    for name, table in prepared.relations.items():
        cursor.register(name, table)
    reader: pa.RecordBatchReader | None = None
    try:
        ctx.check_deadline()
        peeked = (False, None) if fmt is Format.JSON else _peek(ctx, prepared)
        if fmt is not Format.JSON:
            truncated, next_cursor = peeked
            headers[TRUNCATED_HEADER] = "true" if truncated else "false"
            if next_cursor is not None:
                headers[CURSOR_HEADER] = next_cursor
            ext = {Format.CSV: "csv", Format.PARQUET: "parquet", Format.ARROW: "arrows"}[fmt]
            headers["Content-Disposition"] = f'attachment; filename="{prepared.filename}.{ext}"'
        ctx.check_deadline()
        limit = prepared.limit + 1 if fmt is Format.JSON else prepared.limit
        sql = _outer(prepared, fmt)
        # execute() binds and plans the statement once; cursor.sql(...).to_arrow_reader()
        # binds it twice (the relation, then its run): 6-8 ms of a 20 ms query.
        ctx.execute(sql, [*prepared.params, limit])
        reader = cursor.to_arrow_reader(_BATCH_ROWS)
        assert reader is not None, "a SELECT leaves a result to read"
        head = Head(MEDIA_TYPES[fmt], headers)
        return Opened(cursor, prepared, fmt, reader, head, peeked, sql)
    except BaseException:
        if reader is not None:
            reader.close()
        for name in prepared.relations:
            cursor.unregister(name)
        raise
