"""LiveHub: the last N minutes of trades and quotes per symbol in memory, committed or not,
and Fanout: the stream subscribers every round's hub publishes to.

Recent queries merge these rows with committed ones (deduplicated by message_id) so that
"the last 15 minutes" includes the last second; the streaming API (/v1/stream) subscribes
to the Fanout. Memory is bounded per symbol by row count and by age, and the rows are held
as Arrow columns (a few dozen bytes a row), not as a Python object each.

A capture round that fails takes its hub along (pipeline.py), but not the Fanout: it is
made once per process, so stream clients stay connected through a recovery; they see the
outage as the ledger records it, and live rows resume from the next round's hub. What a
hub publishes: live rows as they arrive (a row replayed from the journal after a recovery
is not published again); rows filled in by backfill, which arrive out of order, once their
commit lands; ledger rows (gaps and outages) once committed, so a `backfilled` marker never
precedes the rows that filled the gap.
"""

from __future__ import annotations

import bisect
import logging
from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc
from anyio.streams.memory import MemoryObjectReceiveStream
from opentelemetry import trace

from k2d.columns import by_stream, columns_to_records
from k2d.config import LiveConfig
from k2d.messages import Committed, SequencedBatch
from k2d.model import Quote, SequenceEvent, Trade, now_us
from k2d.runtime import Actor, Outbox
from k2d.storage import batch_columns
from k2d.telemetry.metrics import Metrics

__all__ = ["Fanout", "LiveHub", "Published", "Subscriber"]

log = logging.getLogger(__name__)

_Key = tuple[str, str]
# Uncommitted batch ids checked against the rows still held once there are this many.
_PRUNE_AT = 1_024


class _Recent:
    """Rows of one (exchange, symbol) and table, oldest first, with the batch each came in.

    The newest rows wait in `tail_columns`, the tracker's Arrow columns as they came; once
    there are _SEAL_ROWS of them, they become a sealed _Chunk. Rows leave from the front, by
    age or by count, as a deque's.
    """

    def __init__(
        self,
        key: _Key,
        max_rows: int,
        cls: type[Trade] | type[Quote],
        seal_rows: int,
        tail_pieces: int,
        seal_min_rows: int,
    ) -> None:
        self.key = key  # every row's (exchange, symbol)
        self.max_rows = max_rows
        self.cls = cls
        self.seal_rows = seal_rows
        self.tail_pieces = tail_pieces
        # A tail in tail_pieces pieces is sealed if it holds this many rows, else merged.
        self.seal_min_rows = seal_min_rows
        self.chunks: deque[_Chunk] = deque()
        self.tail_rows = 0
        self.tail_columns: list[pa.Table] = []
        # The batch of the tail's rows, as runs: [batch_id, rows], oldest first.
        self.tail_runs: deque[list[int]] = deque()
        # The tail's first timestamp, once trim has looked (None: not known).
        self.tail_head_ts: int | None = None
        self.sealed_rows = 0

    def __len__(self) -> int:
        return self.sealed_rows + self.tail_rows

    def append(self, batch_id: int, columns: pa.Table) -> None:
        """Add one batch's rows of this symbol."""
        if not self.tail_rows:
            self.tail_head_ts = None
        self.tail_columns.append(columns)
        self.tail_rows += columns.num_rows
        self.tail_runs.append([batch_id, columns.num_rows])
        seal = self.seal_rows
        # A quiet symbol's tail is many small batches, each an Arrow table with its own
        # buffers and objects: once it is in tail_pieces pieces, they are sealed if they
        # hold enough rows to be worth a chunk, else merged into one piece.
        scattered = len(self.tail_columns) >= self.tail_pieces
        if self.tail_rows >= seal or (scattered and self.tail_rows >= self.seal_min_rows):
            if self.tail_rows < 2 * seal:
                # The whole tail becomes one chunk, of up to twice seal_rows: cutting it at
                # seal_rows took two slices of every column and left a table over. This and
                # not checking exchange and symbol took 8.5% off the hub's instructions
                # (callgrind, 320,000 trades of 10 symbols).
                runs = [(b, n) for b, n in self.tail_runs]
                self.tail_runs.clear()
                self._seal(pa.concat_tables(self.tail_columns), runs)
                self.tail_columns = []
                self.tail_rows = 0
            else:
                waiting = pa.concat_tables(self.tail_columns)
                while self.tail_rows >= seal:
                    self._seal(waiting.slice(0, seal), _take_runs(self.tail_runs, seal))
                    self.tail_rows -= seal
                    waiting = waiting.slice(seal)
                self.tail_columns = [waiting] if waiting.num_rows else []
            self.tail_head_ts = None
        elif scattered:
            self.tail_columns = [pa.concat_tables(self.tail_columns).combine_chunks()]
        excess = len(self) - self.max_rows
        if excess > 0:
            self._drop(excess)

    def _seal(self, columns: pa.Table, runs: list[tuple[int, int]]) -> None:
        """Seal `columns`, the oldest tail rows, whose batches `runs` gives, into a chunk."""
        chunk = _Chunk(self.cls, columns, runs, self.key)
        self.chunks.append(chunk)
        self.sealed_rows += len(chunk)

    def trim(self, oldest_us: int) -> None:
        """Drop rows from the front while they are older than oldest_us."""
        while self.chunks:
            chunk = self.chunks[0]
            if chunk.first_ts >= oldest_us:
                return
            keep = chunk.first_at_or_after(oldest_us)
            if keep is not None:
                self._drop(keep - chunk.start)
                return
            self._drop(len(chunk))
        if not self.tail_rows:
            return
        # Most batches trim nothing: the tail's first row, not older, says so without
        # looking at the rest.
        if self.tail_head_ts is None:
            head = next(t for t in self.tail_columns if t.num_rows)
            self.tail_head_ts = head.column("timestamp")[0].as_py()
        if self.tail_head_ts >= oldest_us:
            return
        stamps = pa.chunked_array(
            [c for t in self.tail_columns for c in t.column("timestamp").chunks], pa.int64()
        )
        older = pc.less(stamps, oldest_us)
        first_kept = pc.index(older, False).as_py()
        n = self.tail_rows if first_kept < 0 else first_kept
        if n:
            self._drop(n)

    def _drop(self, n: int) -> None:
        """Drop the n oldest rows."""
        while n and self.chunks:
            chunk = self.chunks[0]
            if n < len(chunk):
                chunk.advance(n)
                self.sealed_rows -= n
                return
            n -= len(chunk)
            self.sealed_rows -= len(chunk)
            self.chunks.popleft()
        if n:
            self.tail_rows -= n
            rest = pa.concat_tables(self.tail_columns).slice(n)
            self.tail_columns = [rest] if rest.num_rows else []
            self.tail_head_ts = None
            _take_runs(self.tail_runs, n)

    def oldest_batch(self) -> int | None:
        if self.chunks:
            return self.chunks[0].batch_at(self.chunks[0].start)
        return self.tail_runs[0][0] if self.tail_runs else None

    def read(self, since_us: int, pending: set[int] | None) -> list[Any]:
        """Rows at or after since_us, in order; only those of `pending` batches if given."""
        out: list[Any] = []
        floor = min(pending) if pending else None
        for chunk in self.chunks:
            if pending is not None and (floor is None or chunk.last_batch < floor):
                continue  # every batch of this chunk is committed
            out.extend(chunk.rows(since_us, pending))
        if not self.tail_rows:
            return out
        tail = pa.concat_tables(self.tail_columns)
        i = 0
        for batch_id, count in self.tail_runs:
            if pending is None or batch_id in pending:
                rows = columns_to_records(tail.slice(i, count), self.cls)
                out.extend(r for r in rows if r.timestamp >= since_us)
            i += count
        return out


def _take_runs(runs: deque[list[int]], n: int) -> list[tuple[int, int]]:
    """The runs of the first n rows, taken off `runs` (a run may be split)."""
    out: list[tuple[int, int]] = []
    while n:
        run = runs[0]
        if run[1] <= n:
            runs.popleft()
            out.append((run[0], run[1]))
            n -= run[1]
        else:
            out.append((run[0], n))
            run[1] -= n
            n = 0
    return out


# Rows of a symbol that wait in the tail before they are sealed into a chunk (of up to
# twice as many: the whole tail is sealed, without cutting it). A chunk costs
# a few dozen Arrow calls whatever its size: at 1,024 rows they took 2.4 us a row, at
# 4,096 1.0 us, for the same 17 bytes a row.
_SEAL_ROWS = 4_096
# Batches a symbol's tail holds at most before it is sealed or merged into one piece: at 20
# symbols and 3,000 trades/s a tail of 4,096 rows was ~600 batches, ~100 MB over 40 tails
# (benchmarks/memory.py).
_TAIL_PIECES = 64
# Rows a tail in _TAIL_PIECES pieces needs to be sealed; fewer are merged into one piece
# instead. A chunk of 128 rows cost 4.2 us a row to seal (most of it fixed: a zstd buffer
# and a few calls a column), of 640 rows 0.9 us: at 20 symbols (two rows of each in a
# 10 ms batch) sealing was half the hub's CPU (/tmp/s13/hub.py, /tmp/s13/chunk.py).
_SEAL_MIN_ROWS = 1_024
_FIELDS = {Trade: Trade.__struct_fields__, Quote: Quote.__struct_fields__}
# The list-typed field, read back as a tuple.
_TUPLES = frozenset({"trade_conditions"})
# Ids the venues derive from another column (model.trade_message_id and the like).
_DERIVED = {"message_id": ("trade_id", "source_sequence"), "trade_id": ("source_sequence",)}
_PACK = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=1))


class _Chunk:
    """Sealed rows as Arrow columns, compressed: a column with one value for every row is
    that value, an id derived from another column (as the venues make them) is its
    prefix, and the other columns are one zstd-compressed Arrow IPC buffer, opened when
    rows are read. Rows before `start` are dropped (their memory goes with the chunk's)."""

    __slots__ = (
        "cls",
        "fixed",
        "last_batch",
        "n",
        "packed",
        "run_ends",
        "run_ids",
        "start",
        "ts",
        "ts_base",
        "ts_sorted",
    )

    def __init__(
        self,
        cls: type[Trade] | type[Quote],
        columns: pa.Table,
        runs: list[tuple[int, int]],
        key: _Key,
    ) -> None:
        self.cls = cls
        self.n: int = columns.num_rows
        self.start = 0
        arrays = {
            name: columns.column(name).combine_chunks()
            for name in _FIELDS[cls]
            if name != "timestamp"
        }
        # Timestamps apart, as a plain array: trimming and reading scan them often.
        stamps = columns.column("timestamp").combine_chunks()
        bounds = pc.min_max(stamps)
        low: int = bounds["min"].as_py()
        high: int = bounds["max"].as_py()
        wide = high - low >= 2**31
        self.ts_base = 0 if wide else low
        self.ts: array[int]
        if wide:
            self.ts = _int_array("q", stamps)
        else:
            self.ts = _int_array("i", pc.subtract(stamps, low).cast(pa.int32()))
        self.ts_sorted = (
            self.n < 2
            or pc.all(pc.greater_equal(stamps.slice(1), stamps.slice(0, self.n - 1))).as_py()
        )
        # by_stream gave the rows of one (exchange, symbol): no need to look.
        self.fixed: dict[str, _Const | _Derived] = {
            "exchange": _Const(key[0]),
            "symbol": _Const(key[1]),
        }
        del arrays["exchange"], arrays["symbol"]
        for name in list(arrays):
            fixed = _fixed(name, arrays)
            if fixed is not None:
                self.fixed[name] = fixed
                del arrays[name]
        self.packed: pa.Buffer | None = None
        if arrays:
            table = pa.table(arrays)
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema, options=_PACK) as out:
                out.write_table(table)
            self.packed = sink.getvalue()
        # The batch of each row, as runs: rows before run_ends[k] and after the run before
        # it came in batch run_ids[k].
        ends, run_ids, end = array("q"), array("q"), 0
        for batch_id, count in runs:
            end += count
            run_ids.append(batch_id)
            ends.append(end)
        self.run_ends, self.run_ids = ends, run_ids
        self.last_batch = max(run_ids)

    def __len__(self) -> int:
        return self.n - self.start

    @property
    def first_ts(self) -> int:
        return self.ts[self.start] + self.ts_base

    def advance(self, n: int) -> None:
        self.start += n

    def batch_at(self, i: int) -> int:
        return self.run_ids[bisect.bisect_right(self.run_ends, i)]

    def first_at_or_after(self, oldest_us: int) -> int | None:
        """Index of the first row from `start` on whose timestamp is not below oldest_us."""
        ts, target = self.ts, oldest_us - self.ts_base
        if self.ts_sorted:
            i = bisect.bisect_left(ts, target, lo=self.start)
            return i if i < self.n else None
        return next((i for i in range(self.start, self.n) if ts[i] >= target), None)

    def rows(self, since_us: int, pending: set[int] | None) -> list[Any]:
        keep: list[int] = []
        ts, target = self.ts, since_us - self.ts_base
        ends, run_ids = self.run_ends, self.run_ids
        run = bisect.bisect_right(ends, self.start)
        for i in range(self.start, self.n):
            while i >= ends[run]:
                run += 1
            if ts[i] >= target and (pending is None or run_ids[run] in pending):
                keep.append(i)
        if not keep:
            return []
        lo, hi = keep[0], keep[-1] + 1
        packed = pa.ipc.open_stream(self.packed).read_all() if self.packed is not None else None
        names = _FIELDS[self.cls]
        cols = [self._column(name, lo, hi, packed) for name in names]
        make = self.cls
        rows = [make(**dict(zip(names, vals, strict=True))) for vals in zip(*cols, strict=True)]
        if len(keep) == hi - lo:
            return rows
        return [rows[i - lo] for i in keep]

    def _column(self, name: str, lo: int, hi: int, packed: pa.Table | None) -> list[Any]:
        if name == "timestamp":
            base = self.ts_base
            return [t + base for t in self.ts[lo:hi]]
        fixed = self.fixed.get(name)
        if isinstance(fixed, _Const):
            return [fixed.value] * (hi - lo)
        if isinstance(fixed, _Derived):
            source = self._column(fixed.source, lo, hi, packed)
            return [f"{fixed.prefix}{v}" for v in source]
        assert packed is not None
        values: list[Any] = packed.column(name).slice(lo, hi - lo).to_pylist()
        if name in _TUPLES:
            return [None if v is None else tuple(v) for v in values]
        return values


class _Const:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class _Derived:
    """A string column that is `prefix` + the text of another column, row by row."""

    __slots__ = ("prefix", "source")

    def __init__(self, prefix: str, source: str) -> None:
        self.prefix = prefix
        self.source = source


def _int_array(typecode: str, values: pa.Array) -> array[int]:
    """A null-free Arrow integer array as a Python array of the same width, from its bytes
    (no Python int a row)."""
    width = values.type.bit_width // 8
    out = array(typecode)
    data = memoryview(values.buffers()[1])
    out.frombytes(data[values.offset * width : (values.offset + len(values)) * width])
    return out


def _fixed(name: str, arrays: dict[str, pa.Array]) -> _Const | _Derived | None:
    """Column `name` as one value, or as derived from another column, if it is."""
    array_ = arrays[name]
    n = len(array_)
    if array_.null_count == n:
        return _Const(None)
    if array_.null_count:
        return None
    if name in _TUPLES:
        values = array_.to_pylist()
        if values.count(values[0]) == n:
            return _Const(tuple(values[0]))
        return None
    first = array_[0].as_py()
    if first == array_[n - 1].as_py() and pc.all(pc.equal(array_, first)).as_py():
        return _Const(first)
    for source in _DERIVED.get(name, ()):
        other = arrays.get(source)
        if other is None or other.null_count:
            continue
        first, text = array_[0].as_py(), str(other[0].as_py())
        if not first.endswith(text):
            continue
        prefix = first[: len(first) - len(text)]
        made = other.cast(pa.string())
        if prefix:
            made = pc.binary_join_element_wise(prefix, made, "")
        if pc.all(pc.equal(made, array_)).as_py():
            return _Derived(prefix, source)
    return None


# Ledger kinds a stream carries; duplicate/out_of_order/session_reset rows are counts.
_STREAMED_KINDS = frozenset({"gap", "outage"})
_TABLE_OF_STREAM = {"trade": "trades", "quote": "quotes"}
# Batches whose backfilled rows or ledger rows wait for their commit, at most (the writer's
# backpressure keeps it far lower; this only bounds a writer that never commits).
_MAX_HELD = 100_000


class Published:
    """One channel's share of a batch, handed to every subscriber of the channel. `encoded`
    is for the subscribers: each encoding of it is made once and shared by all of them."""

    __slots__ = ("channel", "encoded", "kind", "rows", "span_context")

    def __init__(
        self, channel: str, kind: str, rows: Sequence[Any], span_context: Any = None
    ) -> None:
        self.channel = channel  # "trades:BINANCE:BTCUSDT", "quotes:...": kind:exchange:symbol
        self.kind = kind  # "trades", "quotes" (rows are Trade/Quote) or "gap" (SequenceEvent)
        self.rows = rows
        self.span_context = span_context
        self.encoded: dict[str, Any] = {}


class Subscriber(Protocol):
    """A stream connection, as the Fanout sees it."""

    def deliver(self, item: Published) -> None:
        """Take `item` without waiting (queue it, or give up on a client that fell behind)."""
        ...


class Fanout:
    """Stream subscribers per channel, for the whole process. `publish` runs on the ingest
    path: it never waits, and a subscriber that fails is dropped, never the batch.

    Each publish of a channel's batch is a `ws.send` span (linked to the tracker's batch
    span): the batch is encoded once there and queued for every subscriber. The writes to
    each client's socket are not spans of their own (a span costs tens of microseconds,
    times every client and message); k2d_ws_queue_seconds measures them."""

    def __init__(self, tracer: trace.Tracer | None = None) -> None:
        self._tracer = tracer or trace.NoOpTracer()
        # Replaced, never mutated, on (un)subscribe: publish iterates a stable list.
        self._subs: dict[str, tuple[Subscriber, ...]] = {}
        # Highest source_sequence published per channel: a row replayed from the journal
        # after a recovery, at or below it, went out before the failure.
        self._last_seq: dict[str, int] = {}
        self._names: dict[tuple[str, str, str], str] = {}

    def subscribe(self, channel: str, sub: Subscriber) -> None:
        subs = self._subs.get(channel, ())
        if sub not in subs:
            self._subs[channel] = (*subs, sub)

    def unsubscribe(self, channel: str, sub: Subscriber) -> None:
        subs = tuple(s for s in self._subs.get(channel, ()) if s is not sub)
        if subs:
            self._subs[channel] = subs
        else:
            self._subs.pop(channel, None)

    def subscribers(self, channel: str) -> int:
        return len(self._subs.get(channel, ()))

    def channel(self, kind: str, exchange: str, symbol: str) -> str:
        key = (kind, exchange, symbol)
        name = self._names.get(key)
        if name is None:
            name = self._names[key] = f"{kind}:{exchange}:{symbol}"
        return name

    def publish(self, item: Published) -> None:
        subs = self._subs.get(item.channel, ())
        if not subs:
            return
        ctx = item.span_context
        links = [trace.Link(ctx)] if ctx is not None and ctx.is_valid else None
        with self._tracer.start_as_current_span("ws.send", links=links) as span:
            span.set_attribute("k2d.ws.channel", item.channel)
            span.set_attribute("k2d.ws.type", item.kind)
            span.set_attribute("k2d.ws.rows", len(item.rows))
            span.set_attribute("k2d.ws.subscribers", len(subs))
            for sub in subs:
                try:
                    sub.deliver(item)
                except Exception:
                    log.exception("stream subscriber failed; dropping it")
                    self.unsubscribe(item.channel, sub)

    def publish_rows(
        self, kind: str, rows: Sequence[Trade] | Sequence[Quote], span_context: Any = None
    ) -> int:
        """Rows of one table, split by (exchange, symbol) into their channels; how many of
        them had a subscriber."""
        if not rows:
            return 0
        groups: dict[str, list[Any]] = {}
        last = self._last_seq
        for r in rows:
            name = self.channel(kind, r.exchange, r.symbol)
            seq = r.source_sequence
            if seq is not None and r.provenance != "backfill":
                top = last.get(name)
                if top is None or seq > top:
                    last[name] = seq
                elif r.provenance == "replay":
                    continue  # sent live before the recovery that replayed it
            group = groups.get(name)
            if group is None:
                group = groups[name] = []
            group.append(r)
        subs = self._subs
        published = 0
        for name, group in groups.items():
            if name in subs:
                self.publish(Published(name, kind, group, span_context))
                published += len(group)
        return published

    def publish_columns(
        self,
        kind: str,
        parts: list[tuple[_Key, pa.Table]],
        span_context: Any = None,
        *,
        all_live: bool = False,
    ) -> int:
        """`publish_rows` for a batch already split by (exchange, symbol), as columns: records
        are made only for channels with a subscriber. `all_live`: the caller knows every row
        is live, and each part need not be looked at for that."""
        cls = Trade if kind == "trades" else Quote
        last = self._last_seq
        published = 0
        for (exchange, symbol), part in parts:
            if not all_live and not pc.all(pc.equal(part.column("provenance"), "live")).as_py():
                published += self.publish_rows(kind, columns_to_records(part, cls), span_context)
                continue
            name = self.channel(kind, exchange, symbol)
            top_seq = pc.max(part.column("source_sequence")).as_py()
            if top_seq is not None:
                top = last.get(name)
                if top is None or top_seq > top:
                    last[name] = top_seq
            if name in self._subs:
                self.publish(Published(name, kind, columns_to_records(part, cls), span_context))
                published += part.num_rows
        return published

    def publish_events(self, events: Sequence[SequenceEvent], span_context: Any = None) -> None:
        """Ledger rows of gaps and outages, each to its channel."""
        for e in events:
            table = _TABLE_OF_STREAM.get(e.stream)
            if table is None or e.kind not in _STREAMED_KINDS:
                continue
            name = self.channel(table, e.exchange, e.symbol)
            if name in self._subs:
                self.publish(Published(name, "gap", [e], span_context))


@dataclass
class _Held:
    """What a batch publishes only once committed: backfilled rows and ledger rows."""

    trades: list[Trade] = field(default_factory=list)
    quotes: list[Quote] = field(default_factory=list)
    events: list[SequenceEvent] = field(default_factory=list)
    span_context: Any = None


class LiveHub(Actor[SequencedBatch | Committed, None]):
    name = "live_hub"

    def __init__(
        self,
        cfg: LiveConfig,
        metrics: Metrics,
        fanout: Fanout | None = None,
        *,
        seal_rows: int = _SEAL_ROWS,
        tail_pieces: int = _TAIL_PIECES,
        seal_min_rows: int = _SEAL_MIN_ROWS,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.fanout = fanout
        self._seal_rows = seal_rows
        self._tail_pieces = tail_pieces
        self._seal_min_rows = seal_min_rows
        self._held: dict[int, _Held] = {}
        self._trades: dict[_Key, _Recent] = {}
        self._quotes: dict[_Key, _Recent] = {}
        # batch ids whose rows of a table are not yet committed, per table
        self._uncommitted: dict[str, set[int]] = {"trades": set(), "quotes": set()}
        self._window_us = int(cfg.window_seconds * 1_000_000)
        self.latest_us = 0

    async def run(
        self,
        inbox: MemoryObjectReceiveStream[SequencedBatch | Committed] | None,
        outbox: Outbox[None],
    ) -> None:
        assert inbox is not None
        async for msg in inbox:
            if isinstance(msg, SequencedBatch):
                self.add(msg)
            else:
                self.committed(msg)

    def add(self, batch: SequencedBatch) -> None:
        groups: dict[str, list[tuple[_Key, pa.Table]]] = {}
        for table, store in (("trades", self._trades), ("quotes", self._quotes)):
            if not batch.count(table):
                continue
            self._uncommitted[table].add(batch.batch_id)
            cls = Trade if table == "trades" else Quote
            columns = batch_columns(batch, table)
            self.latest_us = max(self.latest_us, pc.max(columns.column("timestamp")).as_py())
            groups[table] = by_stream(columns).parts()
            for key, part in groups[table]:
                recent = store.get(key)
                if recent is None:
                    recent = store[key] = _Recent(
                        key,
                        self.cfg.max_rows_per_symbol,
                        cls,
                        self._seal_rows,
                        self._tail_pieces,
                        self._seal_min_rows,
                    )
                recent.append(batch.batch_id, part)
        oldest = self.latest_us - self._window_us
        for store in (self._trades, self._quotes):
            for recent in store.values():
                recent.trim(oldest)
        self._forget_trimmed()
        self.metrics.live_rows.set(self.row_count())
        self.metrics.live_uncommitted_batches.set(sum(map(len, self._uncommitted.values())))
        if self.fanout is not None:
            self._publish(batch, groups, self.fanout)

    def _publish(
        self, batch: SequencedBatch, groups: dict[str, list[tuple[_Key, pa.Table]]], fanout: Fanout
    ) -> None:
        held = _Held(span_context=batch.span_context)
        for kind, keep in (("trades", held.trades), ("quotes", held.quotes)):
            parts = groups.get(kind)
            if not parts:
                continue
            columns = batch_columns(batch, kind)
            first_at: int = columns.column("ingestion_timestamp")[0].as_py()
            provenance = columns.column("provenance")
            all_live: bool = pc.all(pc.equal(provenance, "live")).as_py()
            if not all_live and pc.any(pc.equal(provenance, "backfill")).as_py():
                rows: list[Any] = batch.trades if kind == "trades" else batch.quotes
                keep.extend(r for r in rows if r.provenance == "backfill")
                rows = [r for r in rows if r.provenance != "backfill"]
                published = fanout.publish_rows(kind, rows, batch.span_context)
                first_at = rows[0].ingestion_timestamp if rows else 0
            else:
                published = fanout.publish_columns(
                    kind, parts, batch.span_context, all_live=all_live
                )
            if published:
                self.metrics.ws_publish_lag.observe(max(0.0, (now_us() - first_at) / 1e6))
        held.events = [e for e in batch.events if e.kind in _STREAMED_KINDS]
        if held.trades or held.quotes or held.events:
            self._held[batch.batch_id] = held
            if len(self._held) > _MAX_HELD:
                oldest = min(self._held)
                log.warning("live hub: batch %d never committed; not streaming it", oldest)
                del self._held[oldest]

    def _forget_trimmed(self) -> None:
        """Batch ids older than every row still held have nothing left to mark: drop them,
        so a batch whose commit never comes cannot hold an entry for good."""
        for table, store in (("trades", self._trades), ("quotes", self._quotes)):
            pending = self._uncommitted[table]
            if len(pending) < _PRUNE_AT:
                continue
            held = [b for r in store.values() if (b := r.oldest_batch()) is not None]
            floor = min(held, default=None)
            if floor is None:
                pending.clear()
            else:
                pending.difference_update([b for b in pending if b < floor])

    def committed(self, msg: Committed) -> None:
        pending = self._uncommitted.get(msg.table)
        if pending is not None:
            pending.difference_update(msg.batch_ids)
        fanout = self.fanout
        if fanout is None or not self._held:
            return
        for batch_id in sorted(msg.batch_ids):
            held = self._held.get(batch_id)
            if held is None:
                continue
            if msg.table == "trades" and held.trades:
                fanout.publish_rows("trades", held.trades, held.span_context)
                held.trades = []
            elif msg.table == "quotes" and held.quotes:
                fanout.publish_rows("quotes", held.quotes, held.span_context)
                held.quotes = []
            elif msg.table == "sequence_events" and held.events:
                fanout.publish_events(held.events, held.span_context)
                held.events = []
            if not (held.trades or held.quotes or held.events):
                del self._held[batch_id]

    def held_batches(self) -> int:
        """Batches with backfilled or ledger rows waiting for their commit to be streamed."""
        return len(self._held)

    def row_count(self) -> int:
        return sum(len(r) for s in (self._trades, self._quotes) for r in s.values())

    def recent_trades(
        self, exchange: str, symbol: str, since_us: int = 0, *, uncommitted_only: bool = False
    ) -> list[Trade]:
        return self._read(self._trades, "trades", exchange, symbol, since_us, uncommitted_only)

    def recent_quotes(
        self, exchange: str, symbol: str, since_us: int = 0, *, uncommitted_only: bool = False
    ) -> list[Quote]:
        return self._read(self._quotes, "quotes", exchange, symbol, since_us, uncommitted_only)

    def _read(
        self,
        store: dict[_Key, _Recent],
        table: str,
        exchange: str,
        symbol: str,
        since_us: int,
        uncommitted_only: bool,
    ) -> list[Any]:
        recent = store.get((exchange, symbol))
        if recent is None:
            return []
        return recent.read(since_us, self._uncommitted[table] if uncommitted_only else None)

    def symbols(self) -> list[_Key]:
        return sorted(set(self._trades) | set(self._quotes))
