"""IcebergWriter: buffers sequenced batches and commits them, one commit per table per flush.

A flush is due when the buffer holds `flush_rows` rows or about `flush_bytes` bytes, or
when its oldest row is `flush_interval` seconds old, and at end of input. The commit runs
in a worker thread while the next buffer fills; at most one flush is in flight, so a full
second buffer waits for it (and the inbox, then the sequencer, wait in turn).

A commit that fails for a reason from outside (a conflict with another committer, disk
full, an I/O error, a locked catalog) is retried with backoff until it lands, holding the
flush meanwhile; past `commit_deadline` the writer reports DEGRADED. Any other failure
ends the actor, and the capture chain goes back through recovery (see k2d/pipeline.py).
The ledger (sequence_events) is always committed last, so a row saying a gap was
backfilled never lands before the rows that filled it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import pyarrow as pa
from opentelemetry import trace
from pyiceberg.exceptions import CommitFailedException

from k2d import failpoints
from k2d.columns import SMALL_BATCH_ROWS
from k2d.messages import Committed, SequencedBatch, Watermark
from k2d.model import now_us
from k2d.runtime import Actor, Backoff, Outbox, outside_fault
from k2d.storage import (
    DEAD_LETTERS,
    QUOTES,
    SEQUENCE_EVENTS,
    TRADES,
    CommitResult,
    Warehouse,
    batch_columns,
    columns_to_table,
    dead_letters_to_arrow,
    events_to_arrow,
    flush_properties,
)

if TYPE_CHECKING:
    from anyio.abc import TaskGroup
    from anyio.streams.memory import MemoryObjectReceiveStream

    from k2d.config import WriterConfig
    from k2d.telemetry.metrics import Metrics

__all__ = ["CommitLog", "IcebergWriter"]

log = logging.getLogger(__name__)

# A commit span links to at most this many batch spans (OTel's default link limit).
_MAX_LINKS = 128
# Ties in commit order: rarely written tables first (see _commit_order). The ledger is not
# among them: it always commits last.
_TIE_ORDER = (DEAD_LETTERS, QUOTES, TRADES)
_TABLES = (*_TIE_ORDER, SEQUENCE_EVENTS)

_BUILDERS: dict[str, Callable[[Any], pa.Table]] = {
    SEQUENCE_EVENTS: events_to_arrow,
    DEAD_LETTERS: dead_letters_to_arrow,
}


@dataclass
class _Buffer:
    """Rows of the batches received since the last flush, and what they carry."""

    # Rows are kept as Arrow as they arrive: ~5x less memory than the records, and the flush
    # only concatenates (and, for trades and quotes, casts to the table's types).
    rows: dict[str, list[pa.Table]] = field(default_factory=lambda: {name: [] for name in _TABLES})
    batch_ids: list[int] = field(default_factory=list)
    # The tracker partitions of the batches ("@P" of their log position keys).
    partitions: set[int] = field(default_factory=set)
    links: list[trace.Link] = field(default_factory=list)
    row_count: int = 0
    est_bytes: int = 0
    # Monotonic time the first row arrived; None while the buffer holds no rows.
    first_row_at: float | None = None

    def add(self, batch: SequencedBatch) -> None:
        self.batch_ids.append(batch.batch_id)
        for key in batch.log_position or ():
            part = key.rpartition("@")[2]
            if part.isdigit():
                self.partitions.add(int(part))
        ctx = batch.span_context
        if ctx is not None and len(self.links) < _MAX_LINKS and ctx.is_valid:
            self.links.append(trace.Link(ctx))
        added = 0
        for name, rows in ((SEQUENCE_EVENTS, batch.events), (DEAD_LETTERS, batch.dead_letters)):
            if rows:
                self._keep(name, _BUILDERS[name](rows))
                added += len(rows)
        for name in (TRADES, QUOTES):
            if batch.count(name):
                # As the tracker or the hub left them: the commit's thread casts them to the
                # table's types, off the event loop.
                table = batch_columns(batch, name)
                self._keep(name, table)
                added += table.num_rows
        if added and self.first_row_at is None:
            self.first_row_at = time.monotonic()
        self.row_count += added

    def _keep(self, name: str, table: pa.Table) -> None:
        self.rows[name].append(table)
        # nbytes, the bytes of the table's rows, costs ~3 us a column however few the rows.
        # A small table's whole buffers cost 2 us to count and are never fewer bytes (a slice
        # is counted as the batch it was cut from, at most a few hundred KB more).
        small = table.num_rows <= SMALL_BATCH_ROWS
        self.est_bytes += table.get_total_buffer_size() if small else table.nbytes


@dataclass
class CommitLog:
    """What the writer's commits say, kept across restarts of the writer: per table the
    latest snapshot (id, rows, data files, snapshots), and the watermarks and log position
    of the last whole flush. /v1/stats reads this instead of loading the catalog."""

    tables: dict[str, dict[str, int | None]] = field(default_factory=dict)
    watermarks: dict[str, Watermark] = field(default_factory=dict)
    log_position: dict[str, Any] = field(default_factory=dict)

    def note(self, table: str, result: CommitResult) -> None:
        self.tables[table] = {
            "rows": result.total_rows,
            "data_files": result.total_files,
            "snapshot_id": result.snapshot_id,
            "snapshots": result.snapshots,
        }


@dataclass(frozen=True)
class _Flush:
    """One flush: its number, its rows per table, and the state after its batches."""

    number: int
    rows: dict[str, list[pa.Table]]
    batch_ids: tuple[int, ...]
    partitions: frozenset[int]
    links: list[trace.Link]
    watermarks: dict[str, Watermark]
    log_position: dict[str, Any]


class IcebergWriter(Actor[SequencedBatch, Committed]):
    """Owns the Iceberg commits: one per table per flush, carrying the k2 resume state."""

    name = "writer"

    def __init__(
        self,
        warehouse: Warehouse,
        cfg: WriterConfig,
        metrics: Metrics,
        tracer: trace.Tracer | None = None,
        *,
        limiter: anyio.CapacityLimiter | None = None,
        log: CommitLog | None = None,
        member: str = "",
        shared_partitions: int = 0,
    ) -> None:
        """`limiter`: the worker threads commits run on (kept apart from the HTTP side's).
        `member`: this daemon's lane when several share the tables (Kafka mode), which own
        `shared_partitions` partitions between them (see k2d.storage._state)."""
        self._wh = warehouse
        self._cfg = cfg
        self._metrics = metrics
        self._tracer = tracer or trace.get_tracer("k2d.writer")
        self._limiter = limiter
        self._member = member
        self._shared = shared_partitions
        self.log = log if log is not None else CommitLog()
        self._buf = _Buffer()
        # Merged over every batch ever received (latest wins per key), seeded from storage.
        self._watermarks: dict[str, Watermark] = {}
        self._log_position: dict[str, Any] = {}
        self._flush_number = 0
        self._table_flushes: dict[str, int] = {}
        self._in_flight: anyio.Event | None = None

    async def on_start(self) -> None:
        """Resume the flush numbering and the merged state where the tables left them."""
        await anyio.to_thread.run_sync(self._wh.ensure_tables, limiter=self._limiter)
        state = await anyio.to_thread.run_sync(
            self._wh.k2_state, self._member, self._shared, limiter=self._limiter
        )
        self._watermarks = dict(state.watermarks)
        self._log_position = dict(state.log_position)
        self._flush_number = state.flush
        self._table_flushes = dict(state.table_flushes)
        if not self.log.tables:
            self.log.tables = await anyio.to_thread.run_sync(self._wh.stats, limiter=self._limiter)
        self.log.watermarks = dict(state.watermarks)
        self.log.log_position = dict(state.log_position)

    async def run(
        self,
        inbox: MemoryObjectReceiveStream[SequencedBatch] | None,
        outbox: Outbox[Committed],
    ) -> None:
        if inbox is None:
            raise ValueError("IcebergWriter needs an inbox")
        async with anyio.create_task_group() as tg:
            while True:
                batch: SequencedBatch | None = None
                try:
                    with anyio.move_on_after(self._time_to_age_flush()):
                        batch = await inbox.receive()
                except anyio.EndOfStream:
                    break
                if batch is not None:
                    self._receive(batch)
                if self._flush_due():
                    await self._start_flush(tg, outbox)
            if self._buf.batch_ids:
                await self._start_flush(tg, outbox)

    def _receive(self, batch: SequencedBatch) -> None:
        self._buf.add(batch)
        self._watermarks.update(batch.watermarks)
        if batch.log_position:
            self._log_position.update(batch.log_position)

    def _time_to_age_flush(self) -> float | None:
        first = self._buf.first_row_at
        if first is None:
            return None
        return max(0.0, first + self._cfg.flush_interval - time.monotonic())

    def _flush_due(self) -> bool:
        buf = self._buf
        if buf.row_count == 0:
            return False
        if buf.row_count >= self._cfg.flush_rows or buf.est_bytes >= self._cfg.flush_bytes:
            return True
        return buf.first_row_at is not None and (
            time.monotonic() - buf.first_row_at >= self._cfg.flush_interval
        )

    async def _start_flush(self, tg: TaskGroup, outbox: Outbox[Committed]) -> None:
        if self._in_flight is not None:
            # At most one flush in flight: the next buffer waits, and so does the inbox.
            await self._in_flight.wait()
            self._in_flight = None
        buf, self._buf = self._buf, _Buffer()
        if buf.row_count == 0:
            return
        self._flush_number += 1
        flush = _Flush(
            number=self._flush_number,
            rows={name: rows for name, rows in buf.rows.items() if rows},
            batch_ids=tuple(buf.batch_ids),
            partitions=frozenset(buf.partitions),
            links=buf.links,
            # Copies: the next buffer's batches keep updating the running state.
            watermarks=dict(self._watermarks),
            log_position=dict(self._log_position),
        )
        done = anyio.Event()
        self._in_flight = done
        tg.start_soon(self._flush, flush, outbox, done)

    def _commit_order(self, tables: Sequence[str]) -> list[str]:
        """Least recently committed table first, so that should a crash land between the
        commits of a flush, the tables left behind are the ones with the freshest state,
        which keeps the replay short (see k2d.storage._state). The ledger goes last: a
        row that closes a gap lands only after the rows that fill it."""
        data = [t for t in tables if t != SEQUENCE_EVENTS]
        order = sorted(data, key=lambda t: (self._table_flushes.get(t, -1), _TIE_ORDER.index(t)))
        return order + [SEQUENCE_EVENTS] * (SEQUENCE_EVENTS in tables)

    async def _flush(self, flush: _Flush, outbox: Outbox[Committed], done: anyio.Event) -> None:
        props = flush_properties(
            flush=flush.number,
            tables=flush.rows,
            watermarks=flush.watermarks,
            log_position=flush.log_position,
            batch_ids=flush.batch_ids,
            member=self._member,
            partitions=flush.partitions,
        )
        for table in self._commit_order(list(flush.rows)):
            rows = flush.rows[table]
            with self._tracer.start_as_current_span(
                "writer.commit",
                links=flush.links,
                attributes={
                    "table": table,
                    "rows": sum(t.num_rows for t in rows),
                    "flush": flush.number,
                },
            ) as span:
                result, seconds = await self._commit_until_landed(table, rows, props, flush.number)
                span.set_attribute("snapshot_id", result.snapshot_id)
                span.set_attribute("retries", result.retries)
            self._table_flushes[table] = flush.number
            self.log.note(table, result)
            self._metrics.commit_seconds.labels(table).observe(seconds)
            self._metrics.commits.labels(table).inc()
            self._metrics.rows_committed.labels(table).inc(result.rows)
            if result.retries:
                self._metrics.commit_conflicts.labels(table).inc(result.retries)
            await outbox.send(
                Committed(
                    table=table,
                    snapshot_id=result.snapshot_id,
                    files=result.files,
                    batch_ids=flush.batch_ids,
                    rows=result.rows,
                    committed_at=now_us(),
                )
            )
        self.log.watermarks = flush.watermarks
        self.log.log_position = flush.log_position
        # Set only on success: after a failed commit no later flush may start, since its
        # state would claim the failed rows as stored. The failure cancels `run`.
        done.set()

    async def _commit_until_landed(
        self, table: str, rows: list[pa.Table], props: dict[str, str], flush: int
    ) -> tuple[CommitResult, float]:
        """Commit, retrying outside faults with backoff until the commit lands."""
        backoff = Backoff(self._cfg.commit_backoff_initial, self._cfg.commit_backoff_max)
        first_failure: float | None = None
        while True:
            try:
                # Not abandoned on cancel: a started commit always finishes or fails.
                result = await anyio.to_thread.run_sync(
                    self._commit, table, rows, props, limiter=self._limiter
                )
            except Exception as exc:
                kind = outside_fault(exc)
                if kind is None:
                    raise
                landed = await self._landed(table, flush)
                if landed is not None:
                    result = (landed, 0.0)
                else:
                    first_failure = first_failure or time.monotonic()
                    self._metrics.commit_failures.labels(table, kind).inc()
                    delay = backoff.next_delay()
                    self.set_degraded(f"{table} commit failing ({kind}): {exc}")
                    log.debug("%s: commit failed (%s), retrying in %.1fs", table, exc, delay)
                    await anyio.sleep(delay)
                    continue
            if first_failure is not None or backoff.attempt:
                self.set_degraded(None)
            return result

    async def _landed(self, table: str, flush: int) -> CommitResult | None:
        """Whether a commit that raised landed all the same (its outcome is unknown)."""
        try:
            return await anyio.to_thread.run_sync(
                self._wh.find_flush, table, flush, self._member, limiter=self._limiter
            )
        except Exception as exc:
            if outside_fault(exc) is None:
                raise
            return None

    def _commit(
        self, table: str, rows: list[pa.Table], props: dict[str, str]
    ) -> tuple[CommitResult, float]:
        """Worker thread: join the Arrow pieces and commit them; returns the commit's seconds.
        A conflict is retried until it lands, DEGRADED once it has taken `commit_deadline`."""
        failpoints.hit(f"writer.commit.{table}")
        data = pa.concat_tables(rows) if len(rows) > 1 else rows[0]
        if table in (TRADES, QUOTES):
            data = columns_to_table(data, table)
        start = time.perf_counter()
        deadline = time.monotonic() + self._cfg.commit_deadline

        def on_conflict(attempt: int, exc: CommitFailedException) -> None:
            self._metrics.commit_failures.labels(table, "conflict").inc()
            if time.monotonic() >= deadline:
                self.set_degraded(f"{table} commit conflicting for {attempt} retries: {exc}")

        result = self._wh.append(table, data, props, retries=None, on_conflict=on_conflict)
        if time.monotonic() >= deadline:
            self.set_degraded(None)
        return result, time.perf_counter() - start
