"""Root task group: the supervisor tree plus the HTTP server, and the order they stop in.

Shutdown (SIGTERM, SIGINT, or --exit-after): /ready turns 503, feeds stop reading, the
pipeline drains stage by stage (see pipeline.py) under one deadline
(`shutdown.drain_timeout`), and the HTTP server stops last.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import anyio
from anyio.abc import TaskStatus

from actors.sequencer import OpenGap, OpenOutage, TrackerState
from k2d.api import ApiState, create_app, serve
from k2d.config import Config
from k2d.journal import Journal, JournalOptions, JournalPosition, last_record
from k2d.model import partition_of
from k2d.pipeline import FeedJournal, Pipeline, build_pipeline
from k2d.runtime import EscalationError, Registry
from k2d.storage import Warehouse
from k2d.telemetry.logs import setup_logging
from k2d.telemetry.metrics import Metrics
from k2d.telemetry.tracing import Tracing, setup_tracing

__all__ = ["EXIT_ESCALATED", "Daemon", "exit_code_of", "run_daemon"]

log = logging.getLogger(__name__)
EXIT_ESCALATED = 70  # EX_SOFTWARE: systemd's Restart=on-failure brings the process back


@dataclass
class Daemon:
    """Handles that tests, the demo and the API read while the daemon runs."""

    cfg: Config
    registry: Registry
    metrics: Metrics
    tracing: Tracing
    warehouse: Warehouse
    pipeline: Pipeline
    api: ApiState
    api_port: int = 0
    stopping: anyio.Event | None = None

    def request_stop(self) -> None:
        if self.stopping is not None:
            self.stopping.set()


async def _stats(d: Daemon) -> dict[str, Any]:
    tables = await anyio.to_thread.run_sync(d.warehouse.stats)
    watermarks, log_position = await anyio.to_thread.run_sync(d.warehouse.latest_k2_state)
    return {
        "tables": tables,
        "watermarks": {
            k: {"last_sequence": w.last_sequence, "platform_sequence": w.platform_sequence}
            for k, w in sorted(watermarks.items())
        },
        "log_position": log_position,
        "live_rows": d.pipeline.live_hub.row_count(),
    }


async def run_daemon(
    cfg: Config,
    *,
    exit_after: float | None = None,
    on_started: Callable[[Daemon], None] | None = None,
    install_signals: bool = True,
    configure_logging: bool = True,
    task_status: TaskStatus[Daemon] = anyio.TASK_STATUS_IGNORED,
) -> int:
    """Run until a signal, `exit_after` seconds, or Daemon.request_stop(); return the exit code."""
    if configure_logging:
        setup_logging(cfg.telemetry.log_level)
    registry = Registry()
    metrics = Metrics(registry)
    tracing = setup_tracing(cfg.telemetry)
    cfg.storage.data_path().mkdir(parents=True, exist_ok=True)
    warehouse = Warehouse(cfg.storage, cfg.writer)
    await anyio.to_thread.run_sync(warehouse.ensure_tables)

    async def restore() -> TrackerState:
        return await anyio.to_thread.run_sync(tracker_state, warehouse, cfg.pipeline.partitions)

    feed_journal = await anyio.to_thread.run_sync(open_journal, cfg, warehouse)
    if feed_journal is not None:
        metrics.watch_journal(feed_journal.journal.feed, feed_journal.journal)
    pipeline = build_pipeline(
        cfg, warehouse, metrics, registry, tracing.tracer, restore, journal=feed_journal
    )
    daemon = Daemon(
        cfg,
        registry,
        metrics,
        tracing,
        warehouse,
        pipeline,
        ApiState(
            registry=registry,
            metrics=metrics,
            tracing=tracing,
            stats=lambda: _stats(daemon),
            expected_actors=set(pipeline.actor_names),
            query_pool=pipeline.query_pool,
            live_hub=pipeline.live_hub,
            run_maintenance=_maintenance_runner(pipeline),
            config=cfg.api,
        ),
        stopping=anyio.Event(),
    )
    assert daemon.stopping is not None
    exit_code = 0
    try:
        async with anyio.create_task_group() as tg:
            server = None
            if cfg.api.enabled:
                server = serve(create_app(daemon.api), cfg.api)
                await tg.start(server.run)
                daemon.api_port = server.port
                log.info("API listening on http://%s:%d", cfg.api.host, server.port)
            if install_signals:
                tg.start_soon(_watch_signals, daemon.stopping)
            if exit_after is not None:
                tg.start_soon(_stop_after, daemon.stopping, exit_after)
            pipeline_done = anyio.Event()
            if feed_journal is not None:
                tg.start_soon(feed_journal.journal.run_syncer)
                tg.start_soon(_journal_retention, cfg, warehouse, feed_journal)
            tg.start_soon(_run_pipeline, pipeline, pipeline_done)
            daemon.api.mark_ready()
            task_status.started(daemon)
            if on_started is not None:
                on_started(daemon)
            with anyio.CancelScope() as wait_scope:
                tg.start_soon(_cancel_when, pipeline_done, wait_scope)
                await daemon.stopping.wait()
            log.info("stopping: draining the pipeline (deadline %.1fs)", cfg.shutdown.drain_timeout)
            daemon.api.mark_draining()
            pipeline.feeds_stop.set()
            with anyio.move_on_after(cfg.shutdown.drain_timeout) as drain:
                await pipeline_done.wait()
            if drain.cancelled_caught:
                log.error("drain deadline of %.1fs passed; cancelling", cfg.shutdown.drain_timeout)
                exit_code = 1
            if server is not None:
                await server.stop()
            tg.cancel_scope.cancel()
    except* EscalationError as eg:
        for e in eg.exceptions:
            log.critical("escalation: %s", e)
        exit_code = EXIT_ESCALATED
    finally:
        if feed_journal is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(feed_journal.journal.close)
        tracing.shutdown()
    log.info("stopped with exit code %d", exit_code)
    return exit_code


def open_journal(cfg: Config, warehouse: Warehouse) -> FeedJournal | None:
    """Open the feed's journal and decide where its replay starts (blocking: a thread)."""
    if not (cfg.journal.enabled and cfg.feeds.binance.enabled):
        return None
    # The journal can write a flush again, so a flush cut short by a crash is undone first.
    warehouse.roll_back_incomplete_flush()
    _, log_position = warehouse.latest_k2_state()
    feed = "feed-binance"
    committed = committed_position(log_position, f"journal:{feed}")
    directory = cfg.journal.path(cfg.storage)
    last = last_record(directory, feed)
    jc = cfg.journal
    journal = Journal(
        directory,
        feed,
        JournalOptions(
            segment_bytes=jc.segment_bytes,
            buffer_bytes=jc.buffer_bytes,
            fsync_interval=jc.fsync_interval,
            max_frame_bytes=jc.max_frame_bytes,
        ),
    )
    journal.open(committed=committed)
    log.info("journal %s: replay after %s", journal.path, committed)
    return FeedJournal(journal, committed, last[1] if last else None)


def committed_position(log_position: dict[str, Any], key: str) -> JournalPosition | None:
    """The journal position every tracker has committed: the least of the per-partition ones."""
    found = [
        JournalPosition.from_json(v)
        for k, v in log_position.items()
        if k.startswith(key + "@") and isinstance(v, dict)
    ]
    return min(found) if found else None


async def _journal_retention(cfg: Config, warehouse: Warehouse, fj: FeedJournal) -> None:
    jc = cfg.journal
    while True:
        await anyio.sleep(jc.retention_interval)
        _, log_position = await anyio.to_thread.run_sync(warehouse.latest_k2_state)
        keep_after = committed_position(log_position, f"journal:{fj.journal.feed}")
        deleted = await anyio.to_thread.run_sync(
            fj.journal.enforce_retention,
            jc.retention_days * 86_400,
            jc.max_total_bytes,
            keep_after,
        )
        if deleted:
            log.info("journal retention deleted %d segments", len(deleted))


def _maintenance_runner(
    pipeline: Pipeline,
) -> Callable[[str | None, date | None], Awaitable[dict[str, Any]]] | None:
    maintainer = pipeline.maintainer
    if maintainer is None:
        return None

    async def run(table: str | None, before: date | None) -> dict[str, Any]:
        report = await maintainer.run_now(table=table, before=before)
        return report.as_dict()

    return run


def tracker_state(warehouse: Warehouse, partitions: int = 1) -> TrackerState:
    """Committed watermarks plus the ledger's open gaps and outages, for the trackers."""
    watermarks, log_position = warehouse.latest_k2_state()
    state = TrackerState(watermarks=watermarks, log_position=log_position)
    for row in warehouse.open_ledger_rows():
        key = f"{row['exchange']}:{row['symbol']}:{row['stream']}"
        detected = _us(row["detected_at"])
        if row["kind"] == "gap" and row["first_missing"] is not None:
            state.open_gaps.setdefault(key, []).append(
                OpenGap(
                    row["event_id"],
                    row["first_missing"],
                    row["last_missing"],
                    detected,
                    emitted=True,
                    partition=partition_of(row["exchange"], row["symbol"], partitions),
                )
            )
        elif row["kind"] == "outage":
            first, last = row["first_missing"], row["last_missing"]
            state.open_outages.setdefault(key, []).append(
                OpenOutage(
                    row["event_id"],
                    _us(row["window_start"]),
                    _us(row["window_end"]),
                    detected,
                    row["detail"],
                    after=None if first is None else first - 1,
                    first=first,
                    last=last,
                )
            )
    return state


def _us(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, datetime):
        return int(value.timestamp() * 1_000_000)
    return int(value)


async def exit_code_of(main: Awaitable[None]) -> int:
    """Run `main`; an escalation anywhere below becomes EXIT_ESCALATED, not a traceback."""
    code = 0
    try:
        await main
    except* EscalationError as eg:
        for e in eg.exceptions:
            log.critical("escalation: %s", e)
        code = EXIT_ESCALATED
    return code


async def _run_pipeline(pipeline: Pipeline, done: anyio.Event) -> None:
    try:
        await pipeline.supervisor.run()
    finally:
        done.set()


async def _cancel_when(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _watch_signals(stopping: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            stopping.set()


async def _stop_after(stopping: anyio.Event, seconds: float) -> None:
    await anyio.sleep(seconds)
    stopping.set()
