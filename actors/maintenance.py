"""Maintainer: compaction of closed partitions, snapshot expiry, manifest merging, retention.

Runs a round every `maintenance.interval` seconds (the first `first_round_after` seconds
after start) and on demand (`run_now`, for an admin endpoint); between rounds, snapshot
expiry and the size-tiered compaction of today's partitions every `expiry_interval`.
A round runs in a worker thread, one table and one operation at a time; a failing
operation is logged, counted and reported, never a crash of the daemon. Each replace or
delete commit is announced on the outbox as a Committed with no batch ids (its
snapshot's operation is "replace" or "delete", not "append"), so a file index re-plans
the table; the replaced files stay on disk until the snapshots listing them expire, so
queries planned earlier still read. Stopping (the `stop` event, or cancellation)
interrupts a round at its next safe point, before any commit.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import date
from typing import TYPE_CHECKING

import anyio
import anyio.from_thread
import anyio.to_thread
from opentelemetry import trace
from pyiceberg.exceptions import NoSuchTableError

from k2d.messages import Committed
from k2d.runtime import Actor, Outbox
from k2d.storage import (
    TABLE_NAMES,
    FilesReplaced,
    MaintenanceReport,
    ManifestMemo,
    TableMaintenance,
)

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectReceiveStream

    from k2d.config import MaintenanceConfig
    from k2d.storage import Warehouse
    from k2d.telemetry.metrics import Metrics

__all__ = ["Maintainer"]

log = logging.getLogger(__name__)


class Maintainer(Actor[None, Committed]):
    """Owns table maintenance; one round at a time, scheduled or asked for."""

    name = "maintainer"

    def __init__(
        self,
        warehouse: Warehouse,
        cfg: MaintenanceConfig,
        metrics: Metrics,
        *,
        tables: Sequence[str] = TABLE_NAMES,
        stop: anyio.Event | None = None,
        clock: Callable[[], float] = time.time,
        lock: anyio.Lock | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        """`lock` is held for each round; the capture chain's recovery holds it too, so a
        round never rewrites the files of a flush that recovery is about to undo. Each
        round is a span, with a child per rewrite and expiry."""
        self._wh = warehouse
        self._cfg = cfg
        self._metrics = metrics
        self._tables = tuple(tables)
        self._stop = stop
        self._clock = clock
        self._lock = lock or anyio.Lock()
        self._tracer = tracer or trace.get_tracer("k2d")
        self._outbox: Outbox[Committed] | None = None
        self.last_report: MaintenanceReport | None = None
        # Outlives the rounds: each expiry reads only the manifests new since the last.
        self._manifests = ManifestMemo(cfg.remembered_manifests)

    async def run(
        self, inbox: MemoryObjectReceiveStream[None] | None, outbox: Outbox[Committed]
    ) -> None:
        """Rounds on the schedule until `stop` is set (forever without one): a full round
        every `interval`, and between them, every `expiry_interval`, expiry (each commit
        adds a snapshot, and commit latency grows with their number) and the tiered
        compaction of today's partitions (each flush adds a file to them)."""
        self._outbox = outbox
        cfg = self._cfg
        await self._refresh_stats()
        next_full = next_expiry = time.monotonic() + cfg.first_round_after
        while True:
            due = min(next_full, next_expiry) if cfg.enabled else float("inf")
            with anyio.move_on_after(max(0.0, due - time.monotonic())):
                if self._stop is not None:
                    await self._stop.wait()
                else:
                    await anyio.sleep_forever()
            if self._stop is not None and self._stop.is_set():
                return
            if time.monotonic() >= next_full:
                await self.run_now()
                next_full = time.monotonic() + cfg.interval
            else:
                await self._round(self._tables, None, full=False)
            next_expiry = time.monotonic() + max(0.1, cfg.expiry_interval)

    async def run_now(
        self, table: str | None = None, before: date | None = None
    ) -> MaintenanceReport:
        """One round now (after any round in progress): all tables, or `table`; `before`
        also admits partitions of days before that date that are still open."""
        if table is not None and table not in TABLE_NAMES:
            raise ValueError(f"unknown table {table!r}; expected one of {', '.join(TABLE_NAMES)}")
        tables = (table,) if table is not None else self._tables
        return await self._round(tables, before, full=True)

    async def _round(
        self, tables: Sequence[str], before: date | None, *, full: bool
    ) -> MaintenanceReport:
        async with self._lock:
            abort = threading.Event()
            maintenance = TableMaintenance(
                self._wh,
                self._cfg,
                clock=self._clock,
                abort=abort,
                tracer=self._tracer,
                manifests=self._manifests,
            )
            attributes: dict[str, bool | list[str]] = {"k2d.full": full, "k2d.tables": list(tables)}
            # The worker thread runs in a copy of this context: its spans are children.
            with self._tracer.start_as_current_span("maintenance.round", attributes=attributes):
                report = await self._in_thread(
                    lambda: maintenance.run(
                        tables,
                        before=before,
                        on_replace=self._announce,
                        compact=full,
                        compact_open=self._cfg.compact_open_partitions,
                        sweep_orphans=full,
                    ),
                    abort,
                )
        self._record(report)
        if full:
            self.last_report = report
        return report

    async def _refresh_stats(self) -> None:
        """Table gauges from the start, before the first round."""

        def read() -> MaintenanceReport:
            report = MaintenanceReport()
            maintenance = TableMaintenance(
                self._wh, self._cfg, clock=self._clock, manifests=self._manifests
            )
            for name in self._tables:
                with contextlib.suppress(NoSuchTableError):  # not created yet
                    report.stats.append(maintenance.stats(name))
            return report

        self._record(await anyio.to_thread.run_sync(read))

    async def _in_thread(
        self, work: Callable[[], MaintenanceReport], abort: threading.Event
    ) -> MaintenanceReport:
        """Run `work` in a worker thread; `stop` or a cancellation sets `abort`, which the
        work honours at its next safe point (the thread is waited for, never abandoned)."""

        async def watch() -> None:
            try:
                if self._stop is not None:
                    await self._stop.wait()
                else:
                    await anyio.sleep_forever()
            finally:
                abort.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            try:
                report = await anyio.to_thread.run_sync(work)
            finally:
                tg.cancel_scope.cancel()
        return report

    def _announce(self, msg: FilesReplaced) -> None:
        """Worker thread: hand a commit's file changes to the outbox (waits when it is full)."""
        outbox = self._outbox
        if outbox is None:
            return
        committed = Committed(
            table=msg.table,
            snapshot_id=msg.snapshot_id,
            files=msg.added,
            batch_ids=(),
            rows=sum(f.record_count for f in msg.added),
            committed_at=msg.committed_at,
        )
        try:
            anyio.from_thread.run(outbox.send, committed)
        except Exception as exc:
            # The commit stands; a file index that missed it still reads valid (older) files
            # until they expire.
            log.warning("%s: could not announce snapshot %d: %r", msg.table, msg.snapshot_id, exc)

    def _record(self, report: MaintenanceReport) -> None:
        m = self._metrics
        now = self._clock()
        for (op, table), seconds in report.durations.items():
            m.maintenance_last_run.labels(op, table).set(now)
            m.maintenance_last_duration.labels(op, table).set(seconds)
        for c in report.compactions:
            m.maintenance_rows_rewritten.labels(c.table).inc(c.rows)
            m.maintenance_files_compacted.labels(c.table).inc(c.files_before)
        for e in report.expiries:
            m.maintenance_snapshots_expired.labels(e.table).inc(e.snapshots_expired)
            for kind, n in (
                ("data", e.data_files_deleted),
                ("manifest", e.manifests_deleted),
                ("manifest_list", e.manifest_lists_deleted),
                ("orphan", e.orphans_deleted),
            ):
                m.maintenance_files_deleted.labels(e.table, kind).inc(n)
        for s in report.stats:
            m.table_data_files.labels(s.table).set(s.data_files)
            m.table_data_bytes.labels(s.table).set(s.data_bytes)
            m.table_manifests.labels(s.table).set(s.manifests)
            m.table_snapshots.labels(s.table).set(s.snapshots)
        for op, _table, _detail in report.errors:
            m.maintenance_errors.labels(op).inc()
        if report.compactions or report.expiries or report.errors:
            log.info(
                "maintenance round: %d partitions compacted, %d snapshots expired, %d errors",
                len(report.compactions),
                sum(e.snapshots_expired for e in report.expiries),
                len(report.errors),
            )
