"""QueryPool: N DuckDB cursors behind a bounded request queue, and the Parquet file index.

Requests are admitted (per-key concurrency limit, then a bounded queue: full means 503 busy)
and served by N worker tasks, each owning one DuckDB cursor and running all blocking work in
a worker thread. A request's deadline (QueryConfig.timeout from admission) covers queueing,
planning, the query and streaming the answer: when it passes, the cursor is interrupted
(`interrupt()`), the client gets 504, and the worker takes the next request.

The inbox is the stream of Committed messages (writer appends, maintenance replaces): each
is folded into the file index in a thread on a cursor of its own, so index updates never
wait behind queries. The start, and each change of the trades or quotes table's index, wakes
a task that works ahead of requests: it computes the newest trade files' minute bars on a
third cursor (`minute_bars_ahead`), and loads the newest trade and quote files into the hot
tier (`hot_bytes`), whose windows are then sliced from memory.

Each request is one `query.execute` span with OpenTelemetry's database attributes, a child of
the span that was current when the request was admitted (the HTTP request's server span, a
stream's join or replay): its context travels with the request to the worker, whose task
outlives any one request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread
import duckdb
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from k2d.messages import Committed
from k2d.query import (
    INDEXED_TABLES,
    FileEntry,
    FileIndex,
    Format,
    Head,
    HotFile,
    Opened,
    Plan,
    PlanContext,
    QueryError,
    ResultStream,
    Statements,
    open_database,
    open_result,
)
from k2d.query._files import local_path
from k2d.runtime import Actor, Outbox
from k2d.storage import QUOTES, TRADES

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

    from k2d.config import QueryConfig
    from k2d.storage import Warehouse
    from k2d.telemetry.metrics import Metrics

__all__ = ["QueryPool"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Extra time the admitting handler waits for the head beyond the deadline: the worker
# answers 504 itself at the deadline, this only guards against a worker that vanished.
_HEAD_GRACE = 2.0
# A stream's last message (its end, or the error that ended it) may arrive this late.
_END_GRACE = 1.0
# Bytes a worker reads ahead in one hop to its thread: a small page's whole answer, so the
# event loop pays for two hops a request (open, read), not one per chunk.
_CHUNK_BYTES = 1 << 20
_RETRY_AFTER = {"Retry-After": "1"}
# Rows of trade files whose minute bars are computed ahead in one trip to a thread (a file
# is never split): about 0.1 s of one core here, so a start with many files due does not
# hold the thread, or the shutdown, for long.
_AHEAD_ROWS = 500_000
# The tables whose files the hot tier holds; a change of either wakes the task ahead.
_HOT_TABLES = frozenset({TRADES, QUOTES})
_OUTCOMES = {400: "invalid", 429: "too_many", 504: "timeout"}
# Outcomes that mark the span as failed (a refused or invalid request did not fail).
_FAILED = frozenset({"timeout", "error"})

_Msg = Head | bytes | QueryError | None
# What Opened.read hands back: (bytes, ended, the error that stopped it).
_Read = tuple[bytes, bool, Exception | None]


@dataclass(eq=False)
class _Job:
    key: str
    plan: Plan
    fmt: Format
    deadline: float
    send: MemoryObjectSendStream[_Msg]
    admitted: float = field(default_factory=time.perf_counter)
    # The context of the admitting handler: its span is the parent of query.execute.
    context: otel_context.Context = field(default_factory=otel_context.get_current)
    outcome: str = "ok"
    released: bool = False
    error: QueryError | None = None
    opened: Opened | None = None


@dataclass(eq=False)
class _Worker:
    cursor: duckdb.DuckDBPyConnection
    # Whether the last call's deadline interrupted the cursor (a timeout, not a shutdown).
    timed_out: bool = False


class QueryPool(Actor[Committed, None]):
    """Owns the DuckDB database, its cursors and the file index; serves `execute`."""

    name = "query_pool"

    def __init__(
        self,
        warehouse: Warehouse,
        cfg: QueryConfig,
        metrics: Metrics,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.cfg = cfg
        self._wh = warehouse
        self._metrics = metrics
        self._tracer = tracer or trace.get_tracer("k2d.query")
        self.index = self._new_index()
        metrics.query_minute_bars.set_function(lambda: self.index.bars.rows)
        metrics.query_hot_bytes.set_function(lambda: self.index.hot.bytes)
        metrics.query_hot_files.set_function(lambda: self.index.hot.files)
        self._db: duckdb.DuckDBPyConnection | None = None
        self._maintenance: duckdb.DuckDBPyConnection | None = None
        self._ahead: duckdb.DuckDBPyConnection | None = None
        # Files whose bars could not be computed ahead (unreadable): not tried again while
        # they are in the index; a request that needs them aggregates them itself.
        self._ahead_failed: set[str] = set()
        # Files that could not be loaded into the hot tier: likewise left to DuckDB.
        self._hot_failed: set[str] = set()
        self._ahead_wake: anyio.Event | None = None
        self._workers: list[_Worker] = []
        # Parse trees only, of no database: they outlive a reopened one.
        self._statements = Statements(cfg.parsed_statements)
        self._requests: MemoryObjectSendStream[_Job] | None = None
        self._per_key: dict[str, int] = {}
        self._inbox: MemoryObjectReceiveStream[Committed] | None = None
        self._applying = False
        self._applied: anyio.Event | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        # The index is updated by one thread at a time: a Committed, or a refresh.
        self._index_lock = anyio.Lock()

    # -- lifecycle ------------------------------------------------------------------------

    async def on_start(self) -> None:
        """Open the database and plan the current snapshot of every queried table."""
        await anyio.to_thread.run_sync(self._open)

    def _open(self) -> None:
        self._close()
        warehouse_dir = local_path(self._wh.cfg.warehouse_url())
        db, cursors = open_database(self.cfg, [warehouse_dir], self.cfg.workers + 2)
        self._db, self._maintenance, self._ahead = db, cursors[0], cursors[1]
        self._workers = [_Worker(c) for c in cursors[2:]]
        self.index = self._new_index()
        started = time.perf_counter()
        self.index.bootstrap(cursors[0])
        self._count_index()
        # Due from the start, so that a reader of the gauge never sees 0 before the task ran.
        self._metrics.query_minute_bars_due.set(len(self._bars_due()))
        self._metrics.query_hot_due.set(len(self._hot_due()))
        log.info(
            "query index loaded in %.2fs: %s",
            time.perf_counter() - started,
            ", ".join(f"{t} {len(self.index.current(t).entries)} files" for t in INDEXED_TABLES),
        )

    def _new_index(self) -> FileIndex:
        cfg = self.cfg
        return FileIndex(
            self._wh,
            cfg.snapshot_cache_size,
            cfg.max_ledger_events,
            cfg.minute_bars,
            cfg.hot_bytes,
        )

    def _close(self) -> None:
        for w in self._workers:
            w.cursor.close()
        for c in (self._maintenance, self._ahead, self._db):
            if c is not None:
                c.close()
        self._workers, self._maintenance, self._ahead, self._db = [], None, None, None

    async def run(
        self, inbox: MemoryObjectReceiveStream[Committed] | None, outbox: Outbox[None]
    ) -> None:
        if self._db is None:
            await self.on_start()
        send, recv = anyio.create_memory_object_stream[_Job](self.cfg.queue_size)
        self._limiter = anyio.CapacityLimiter(len(self._workers) + 1)
        self._applied = anyio.Event()
        self._inbox = inbox
        try:
            async with anyio.create_task_group() as tg:
                for w in self._workers:
                    tg.start_soon(self._work, w, recv.clone())
                recv.close()
                self._requests = send
                refreshing = anyio.CancelScope()
                if self.cfg.refresh_interval > 0:
                    tg.start_soon(self._refresh_loop, refreshing)
                ahead = anyio.CancelScope()
                if self.cfg.minute_bars_ahead > 0 or self.cfg.hot_bytes > 0:
                    self._ahead_wake = anyio.Event()
                    self._ahead_wake.set()
                    tg.start_soon(self._ahead_loop, ahead)
                try:
                    if inbox is None:
                        await anyio.sleep_forever()
                    else:
                        async for msg in inbox:
                            await self.apply(msg)
                finally:
                    # No new requests; the workers finish the queued ones, then end.
                    self._requests = None
                    send.close()
                    refreshing.cancel()
                    ahead.cancel()
                    if self._ahead is not None:
                        self._ahead.interrupt()  # the batch in its thread, if any
        finally:
            self._inbox = None
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._close)

    # -- the file index -------------------------------------------------------------------

    async def apply(self, msg: Committed) -> None:
        """Fold one Committed into the file index (in a thread, on the maintenance cursor)."""
        self._applying = True
        try:
            async with self._index_lock:
                changed = await anyio.to_thread.run_sync(self._apply, msg, limiter=self._limiter)
                if changed and msg.table in _HOT_TABLES:
                    self._wake_ahead()
        finally:
            self._applying = False
            if self._applied is not None:
                self._applied.set()
                self._applied = anyio.Event()

    def _apply(self, msg: Committed) -> bool:
        assert self._maintenance is not None, "the query pool is not started"
        replans = self.index.replans
        if not self.index.apply(msg, self._maintenance):
            return False
        self._count_index()
        if self.index.replans != replans:
            self._metrics.query_index_replans.inc(self.index.replans - replans)
        return True

    async def _refresh_loop(self, scope: anyio.CancelScope) -> None:
        """Every refresh_interval, pick up commits made by other processes."""
        with scope:
            while True:
                await anyio.sleep(self.cfg.refresh_interval)
                try:
                    async with self._index_lock:
                        replanned = await anyio.to_thread.run_sync(
                            self._refresh, limiter=self._limiter
                        )
                        if _HOT_TABLES.intersection(replanned):
                            self._wake_ahead()
                except Exception:
                    # The catalog may be busy (another process committing): next round.
                    log.exception("query index refresh failed; trying again later")

    def _refresh(self) -> list[str]:
        assert self._maintenance is not None, "the query pool is not started"
        replanned = self.index.refresh(self._maintenance)
        if replanned:
            self._metrics.query_index_replans.inc(len(replanned))
            self._count_index()
        return replanned

    # -- minute bars ahead of requests ----------------------------------------------------

    def _wake_ahead(self) -> None:
        if self._ahead_wake is not None:
            self._ahead_wake.set()

    async def _ahead_loop(self, scope: anyio.CancelScope) -> None:
        """Ahead of requests, once at start, then after each change of the trades or quotes
        table's index: compute the minute bars of the newest trade files, and load the
        newest data files into the hot tier."""
        with scope:
            while True:
                assert self._ahead_wake is not None
                await self._ahead_wake.wait()
                self._ahead_wake = anyio.Event()
                if not await self._bars_round(scope) or not await self._hot_round(scope):
                    return

    async def _bars_round(self, scope: anyio.CancelScope) -> bool:
        """Compute the bars due, a batch of files per trip to a thread; False when the
        shutdown interrupted it."""
        due = await anyio.to_thread.run_sync(self._bars_due)
        left = len(due)
        self._metrics.query_minute_bars_due.set(left)
        for batch in _batches(due, _AHEAD_ROWS):
            try:
                await anyio.to_thread.run_sync(self._bars_ahead, batch)
            except Exception:
                if scope.cancel_called:
                    return False  # the shutdown interrupted the batch: not a failure
                log.warning(
                    "minute bars of %d files could not be computed ahead; requests "
                    "will aggregate them",
                    len(batch),
                    exc_info=True,
                )
                self._ahead_failed.update(e.path for e in batch)
            left -= len(batch)
            self._metrics.query_minute_bars_due.set(left)
        return True

    async def _hot_round(self, scope: anyio.CancelScope) -> bool:
        """Load the files due into the hot tier, one per trip to a thread; False when the
        shutdown came meanwhile."""
        due = await anyio.to_thread.run_sync(self._hot_due)
        self._metrics.query_hot_due.set(len(due))
        for n, (table, entry) in enumerate(due, 1):
            try:
                hot = await anyio.to_thread.run_sync(HotFile.read, entry.path, table)
            except Exception:
                if scope.cancel_called:
                    return False
                log.warning(
                    "%s file %s could not be loaded into memory; DuckDB will read it",
                    table,
                    entry.path,
                    exc_info=True,
                )
                self._hot_failed.add(entry.path)
                continue
            finally:
                self._metrics.query_hot_due.set(len(due) - n)
            if not self.index.hot.add(table, entry, hot):
                self._metrics.query_hot_due.set(0)
                break  # bigger than guessed: the files after it do not fit either
        return True

    def _hot_due(self, drop: bool = True) -> list[tuple[str, FileEntry]]:
        """The files to load into the hot tier; with `drop`, the held ones no longer wanted
        are dropped (only the task ahead does that)."""
        tables = {t: self.index.current(t).entries for t in _HOT_TABLES}
        if self._hot_failed:
            self._hot_failed &= {e.path for entries in tables.values() for e in entries}
        hot = self.index.hot
        return hot.plan(tables, self._hot_failed) if drop else hot.due(tables, self._hot_failed)

    def hot_due(self) -> int:
        """Files waiting to be loaded into the hot tier (as the gauge counts them, but
        current even before the task ahead has woken)."""
        return len(self._hot_due(drop=False))

    def _bars_due(self) -> list[FileEntry]:
        if self.cfg.minute_bars_ahead <= 0:
            return []
        entries = self.index.current(TRADES).entries
        if self._ahead_failed:
            self._ahead_failed &= {e.path for e in entries}
        due = self.index.bars.due(entries, self.cfg.minute_bars_ahead)
        return [e for e in due if e.path not in self._ahead_failed]

    def _bars_ahead(self, batch: list[FileEntry]) -> None:
        assert self._ahead is not None, "the query pool is not started"
        self.index.bars.ahead(self._ahead, batch)

    def _count_index(self) -> None:
        for t in INDEXED_TABLES:
            self._metrics.query_index_files.labels(t).set(len(self.index.current(t).entries))
        ledger = self.index.ledger
        self._metrics.query_ledger_events.set(len(ledger.events))
        self._metrics.query_ledger_spans.set(ledger.cached_spans)

    async def catch_up(self) -> None:
        """Return once every Committed already sent to the inbox is in the index."""
        while not self._caught_up():
            applied = self._applied
            if self._applying and applied is not None:
                await applied.wait()
            else:
                # A message handed to the waiting loop: let it run and start applying.
                await anyio.lowlevel.checkpoint()

    def _caught_up(self) -> bool:
        if self._applying:
            return False
        inbox = self._inbox
        if inbox is None:
            return True
        stats = inbox.statistics()
        if stats.current_buffer_used or stats.tasks_waiting_send:
            return False
        # A message handed straight to the waiting loop is in neither count until the loop
        # runs: only a loop parked in receive() (or an inbox with no senders left) is idle.
        return stats.tasks_waiting_receive > 0 or stats.open_send_streams == 0

    # -- requests -------------------------------------------------------------------------

    async def execute(self, key: str, plan: Plan, fmt: Format) -> ResultStream:
        """Admit, queue and start `plan`; return once its head is known (see QueryService)."""
        endpoint = plan.endpoint
        requests = self._requests
        if requests is None:
            self._metrics.queries.labels(endpoint, "busy").inc()
            raise QueryError(503, "not_ready", "the query pool is not running", _RETRY_AFTER)
        running = self._per_key.get(key, 0)
        if running >= self.cfg.per_key_concurrency:
            self._metrics.queries.labels(endpoint, "too_many").inc()
            raise QueryError(
                429,
                "too_many_concurrent_queries",
                f"at most {self.cfg.per_key_concurrency} queries at once per client",
                _RETRY_AFTER,
            )
        send, recv = anyio.create_memory_object_stream[_Msg](2)
        job = _Job(key, plan, fmt, time.monotonic() + self.cfg.timeout, send)
        try:
            requests.send_nowait(job)
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            send.close()
            recv.close()
            self._metrics.queries.labels(endpoint, "busy").inc()
            raise QueryError(
                503, "busy", "the query queue is full; retry shortly", _RETRY_AFTER
            ) from None
        self._per_key[key] = running + 1
        self._metrics.query_in_flight.inc()
        try:
            with anyio.fail_after(max(0.0, job.deadline - time.monotonic()) + _HEAD_GRACE):
                first = await recv.receive()
        except (TimeoutError, anyio.EndOfStream):
            recv.close()
            raise QueryError(504, "query_timeout", "the query ran past its time limit") from None
        except BaseException:
            recv.close()
            raise
        if isinstance(first, QueryError):
            recv.close()
            raise first
        assert isinstance(first, Head)
        if first.body is not None:
            recv.close()  # the whole answer came with the head
        return ResultStream(first, recv)  # type: ignore[arg-type]

    async def _work(self, worker: _Worker, jobs: MemoryObjectReceiveStream[_Job]) -> None:
        async with jobs:
            async for job in jobs:
                try:
                    with self._tracer.start_as_current_span(
                        "query.execute",
                        context=job.context,
                        kind=SpanKind.CLIENT,
                        attributes={
                            "db.system": "duckdb",  # the name before semconv 1.30
                            "db.system.name": "duckdb",
                            "db.operation.name": "SELECT",
                            "k2d.endpoint": job.plan.endpoint,
                            "k2d.format": job.fmt.value,
                        },
                    ) as span:
                        try:
                            await self._serve(worker, job)
                        finally:
                            _annotate(span, job)
                finally:
                    self._release(job)

    def _release_key(self, job: _Job) -> None:
        if job.released:
            return
        job.released = True
        left = self._per_key.get(job.key, 1) - 1
        if left > 0:
            self._per_key[job.key] = left
        else:
            self._per_key.pop(job.key, None)

    def _release(self, job: _Job) -> None:
        self._release_key(job)
        endpoint = job.plan.endpoint
        self._metrics.query_in_flight.dec()
        self._metrics.queries.labels(endpoint, job.outcome).inc()
        self._metrics.query_seconds.labels(endpoint).observe(time.perf_counter() - job.admitted)

    async def _serve(self, worker: _Worker, job: _Job) -> None:
        with job.send:
            if job.send.statistics().open_receive_streams == 0:
                job.outcome = "gone"  # the client left while the request was queued
                return
            if time.monotonic() >= job.deadline:
                self._fail(
                    job, QueryError(504, "query_timeout", "the query waited past its time limit")
                )
                return
            ctx = PlanContext(self.index, worker.cursor, self.cfg, job.deadline, self._statements)
            try:
                opened, first = await self._call(
                    worker, job.deadline, _open, ctx, job.plan, job.fmt
                )
            except QueryError as exc:
                self._fail(job, exc)
                return
            job.opened = opened
            if opened.in_memory:
                self._metrics.query_pages_from_memory.inc()
            try:
                chunk, done, failed = first
                if done and failed is None:
                    # The whole answer in one read: it goes with the head, as one body.
                    self._release_key(job)
                    await self._deliver(job, replace(opened.head, body=chunk))
                    return
                if not await self._deliver(job, opened.head):
                    return
                await self._stream(worker, job, opened, first)
            finally:
                if not opened.closed:
                    await self._call(worker, None, opened.close)

    async def _stream(self, worker: _Worker, job: _Job, opened: Opened, first: _Read) -> None:
        read: _Read | None = first
        while True:
            try:
                if read is None:
                    read = await self._call(worker, job.deadline, opened.read, _CHUNK_BYTES)
                (chunk, done, failed), read = read, None
                if failed is not None:
                    # The chunks read before the failure go out first, as one by one they
                    # would have gone before it.
                    if chunk and not await self._deliver(job, chunk, _END_GRACE):
                        return
                    raise _query_error(failed, worker.timed_out) from failed
            except QueryError as exc:
                job.outcome = _OUTCOMES.get(exc.status, "error")
                job.error = exc
                tail = opened.abort(exc.code, exc.detail)
                if tail:
                    # JSON closes its document with the error in it and ends cleanly.
                    if await self._deliver(job, tail, _END_GRACE):
                        await self._deliver(job, None, _END_GRACE)
                else:
                    # Other formats cannot say it in-band: the connection is cut.
                    await self._deliver(job, exc, _END_GRACE)
                return
            if done:
                # The client may ask again as soon as it has the last byte: free its slot first.
                self._release_key(job)
                if chunk and not await self._deliver(job, chunk):
                    return
                await self._deliver(job, None, _END_GRACE)
                return
            if not await self._deliver(job, chunk):
                return

    def _fail(self, job: _Job, exc: QueryError) -> None:
        job.outcome = _OUTCOMES.get(exc.status, "error")
        job.error = exc
        self._release_key(job)
        # The stream is empty before the head: this never blocks.
        with contextlib.suppress(
            anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError
        ):
            job.send.send_nowait(exc)

    async def _deliver(self, job: _Job, msg: _Msg, grace: float = 0.0) -> bool:
        """Hand a message to the client's handler; False once it is gone or too slow."""
        with anyio.move_on_at(job.deadline + grace):
            try:
                await job.send.send(msg)
                return True
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                job.outcome = "gone"
                return False
        job.outcome = "timeout"
        return False

    async def _call(
        self, worker: _Worker, deadline: float | None, fn: Callable[..., T], *args: Any
    ) -> T:
        """Run `fn(*args)` in a thread; past `deadline`, interrupt the worker's cursor."""
        # A timer on the loop, not a watchdog task: a task group, a task and a cancel per
        # call (anyio formats the task's repr on every cancel) were a fifth of the event
        # loop's time with 16 clients.
        worker.timed_out = False
        timer = None
        if deadline is not None:
            delay = max(0.0, deadline - time.monotonic())
            timer = asyncio.get_running_loop().call_later(delay, _interrupt, worker)
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except Exception as exc:
            raise _query_error(exc, worker.timed_out) from exc
        finally:
            if timer is not None:
                timer.cancel()


def _batches(entries: list[FileEntry], rows: int) -> list[list[FileEntry]]:
    """`entries` in order, cut into runs of about `rows` rows (a file is never split)."""
    out: list[list[FileEntry]] = []
    run: list[FileEntry] = []
    held = 0
    for e in entries:
        if run and held + e.rows > rows:
            out.append(run)
            run, held = [], 0
        run.append(e)
        held += e.rows
    if run:
        out.append(run)
    return out


def _open(ctx: PlanContext, plan: Plan, fmt: Format) -> tuple[Opened, _Read]:
    """Start the query and read its first chunks, in one trip to a worker thread: a small
    page's whole answer (each trip costs the event loop more than the bytes do)."""
    opened = open_result(ctx, plan, fmt)
    try:
        return opened, opened.read(_CHUNK_BYTES)
    except BaseException:
        opened.close()
        raise


def _interrupt(worker: _Worker) -> None:
    worker.timed_out = True
    worker.cursor.interrupt()


def _annotate(span: trace.Span, job: _Job) -> None:
    """What the query did, on its span; a timeout or failure sets the error status, so the
    tail sampler keeps the span whatever the sample ratio."""
    span.set_attribute("k2d.outcome", job.outcome)
    if job.opened is not None:
        span.set_attributes(job.opened.span_attributes())
    if job.outcome in _FAILED:
        # Without an error, the deadline passed while the client was still taking the answer.
        code, detail = (
            (job.error.code, job.error.detail)
            if job.error is not None
            else ("query_timeout", "the answer was not taken before the time limit")
        )
        span.set_attribute("error.type", code)
        span.set_status(Status(StatusCode.ERROR, detail))


def _query_error(exc: Exception, timed_out: bool) -> QueryError:
    if isinstance(exc, QueryError):
        return exc
    # Read through Arrow's C stream, DuckDB's errors arrive as OSError with DuckDB's message.
    message = str(exc)
    if isinstance(exc, duckdb.InterruptException) or (
        isinstance(exc, OSError) and message.startswith("INTERRUPT Error")
    ):
        if timed_out:
            return QueryError(504, "query_timeout", "the query ran past its time limit")
        return QueryError(503, "interrupted", "the query was interrupted", _RETRY_AFTER)
    if isinstance(exc, duckdb.OutOfMemoryException) or (
        isinstance(exc, OSError) and message.startswith("Out of Memory Error")
    ):
        return QueryError(
            503, "insufficient_memory", "the query needs more memory than the pool may use"
        )
    if isinstance(exc, duckdb.IOException):
        log.warning("query could not read a data file: %s", exc)
        return QueryError(
            503,
            "storage_unavailable",
            "a data file could not be read (an old snapshot may have expired)",
            _RETRY_AFTER,
        )
    log.error("query failed", exc_info=exc)
    return QueryError(500, "internal_error", "the query failed")
