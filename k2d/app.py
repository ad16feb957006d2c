"""Root task group: the supervisor tree plus the HTTP server, and the order they stop in.

Shutdown (SIGTERM, SIGINT, or --exit-after): /ready turns 503, feeds stop reading, the
pipeline drains stage by stage (see pipeline.py) under one deadline
(`shutdown.drain_timeout`), and the HTTP server stops last.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

from k2d.allocators import freeze_start_up_objects, limit_malloc_arenas, use_arrow_pool
from k2d.api import ApiState, create_app, serve
from k2d.config import Config
from k2d.pipeline import Pipeline, build_pipeline
from k2d.preflight import StartupError, check_directories, open_warehouse
from k2d.runtime import ActorState, EscalationError, Registry
from k2d.storage import Warehouse
from k2d.systemd import Notifier
from k2d.telemetry.logs import setup_logging
from k2d.telemetry.metrics import Metrics
from k2d.telemetry.tracing import Tracing, setup_tracing

__all__ = [
    "EXIT_ESCALATED",
    "Daemon",
    "exit_code_of",
    "run_daemon",
]

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
    """From the writer's own record of its commits: no catalog load per request."""
    commits = d.pipeline.commits
    return {
        "tables": dict(sorted(commits.tables.items())),
        "watermarks": {
            k: {"last_sequence": w.last_sequence, "platform_sequence": w.platform_sequence}
            for k, w in sorted(commits.watermarks.items())
        },
        "log_position": commits.log_position,
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
    """Run until a signal, `exit_after` seconds, or Daemon.request_stop(); return the exit code.
    A start the machine refuses (see k2d/preflight.py) returns 73 or 78 after one log line."""
    if configure_logging:
        setup_logging(cfg.telemetry.log_level)
    log.info("Arrow memory pool: %s", use_arrow_pool())
    log.info("malloc arenas: %s", limit_malloc_arenas() or "as the environment or libc has it")
    try:
        await anyio.to_thread.run_sync(check_directories, cfg)
        warehouse = await anyio.to_thread.run_sync(open_warehouse, cfg)
    except StartupError as refused:
        log.critical("cannot start: %s", refused)
        return refused.code
    registry = Registry()
    metrics = Metrics(registry)
    metrics.watch_data_dir(cfg.storage.data_path())
    journal_dir = cfg.journal.path(cfg.storage)
    if cfg.journal.directory and not _same_filesystem(journal_dir, cfg.storage.data_path()):
        metrics.watch_data_dir(journal_dir)
    tracing = setup_tracing(
        cfg.telemetry, store_dir=cfg.telemetry.trace_path(cfg.storage), metrics=metrics
    )
    pipeline = build_pipeline(cfg, warehouse, metrics, registry, tracing.tracer)
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
            fanout=pipeline.live_hub.fanout,
            stream=cfg.stream,
            run_maintenance=_maintenance_runner(pipeline) if cfg.maintenance.enabled else None,
            config=cfg.api,
        ),
        stopping=anyio.Event(),
    )
    assert daemon.stopping is not None
    notifier = Notifier()
    exit_code = 0
    try:
        async with anyio.create_task_group() as tg:
            server = None
            if cfg.api.enabled:
                heartbeat = (cfg.stream.heartbeat_interval, cfg.stream.heartbeat_timeout)
                server = serve(create_app(daemon.api), cfg.api, heartbeat)
                await tg.start(server.run)
                daemon.api_port = server.port
                log.info("API listening on http://%s:%d", cfg.api.host, server.port)
            if install_signals:
                tg.start_soon(_watch_signals, daemon.stopping)
            if exit_after is not None:
                tg.start_soon(_stop_after, daemon.stopping, exit_after)
            pipeline_done = anyio.Event()
            tg.start_soon(_run_pipeline, pipeline, pipeline_done)
            daemon.api.mark_ready()
            tg.start_soon(_freeze_once_serving, daemon)
            if notifier.enabled:
                tg.start_soon(_notify_systemd, daemon, notifier)
            task_status.started(daemon)
            if on_started is not None:
                on_started(daemon)
            with anyio.CancelScope() as wait_scope:
                tg.start_soon(_cancel_when, pipeline_done, wait_scope)
                await daemon.stopping.wait()
            log.info("stopping: draining the pipeline (deadline %.1fs)", cfg.shutdown.drain_timeout)
            notifier.send("STOPPING=1", "STATUS=draining")
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
        notifier.close()
        tracing.shutdown()
    log.info("stopped with exit code %d", exit_code)
    return exit_code


async def _notify_systemd(daemon: Daemon, notifier: Notifier) -> None:
    """READY=1 once every actor runs (the pipeline and the API are up); then every few
    seconds a STATUS line and, while every actor is running or degraded, WATCHDOG=1. This
    task runs on the event loop: a wedged loop sends nothing, and systemd restarts us."""
    interval = min(5.0, notifier.watchdog_interval or 5.0)
    ready = False
    last_rows, last_at = _rows_committed(daemon.metrics), time.monotonic()
    while True:
        healthy = daemon.api.readiness() == "ready"
        rows, now = _rows_committed(daemon.metrics), time.monotonic()
        rate = (rows - last_rows) / max(now - last_at, 1e-3)
        last_rows, last_at = rows, now
        degraded = sorted(
            name for name, st in daemon.registry.states.items() if st is ActorState.DEGRADED
        )
        status = f"STATUS={rate:,.0f} rows/s committed, {_open_gaps(daemon.metrics):.0f} gaps open"
        if degraded:
            status += f"; degraded: {', '.join(degraded)}"
        lines = [status]
        if healthy and not ready:
            lines.insert(0, "READY=1")
            ready = True
        if healthy and notifier.watchdog_interval is not None:
            lines.append("WATCHDOG=1")
        notifier.send(*lines)
        await anyio.sleep(interval if ready else 0.2)


def _rows_committed(metrics: Metrics) -> float:
    return float(sum(s.value for s in _samples(metrics, "k2d_rows_committed")))


def _open_gaps(metrics: Metrics) -> float:
    return float(sum(s.value for s in _samples(metrics, "k2d_open_gaps")))


def _samples(metrics: Metrics, family: str) -> list[Any]:
    for metric in metrics.registry.collect():
        if metric.name == family:
            return [s for s in metric.samples if s.name in (family, family + "_total")]
    return []


def _same_filesystem(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_dev == b.stat().st_dev
    except OSError:
        return False


def _maintenance_runner(
    pipeline: Pipeline,
) -> Callable[[str | None, date | None], Awaitable[dict[str, Any]]]:
    async def run(table: str | None, before: date | None) -> dict[str, Any]:
        maintainer = pipeline.maintainer()
        if maintainer is None:
            raise RuntimeError("the maintainer is not running")
        report = await maintainer.run_now(table=table, before=before)
        return report.as_dict()

    return run


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


async def _freeze_once_serving(daemon: Daemon) -> None:
    """Freeze the objects made so far (k2d.allocators.freeze_start_up_objects) once every
    actor serves: their start-up state (the tables' metadata, restored trackers) stays."""
    # Readiness is worked out from the actors' states when asked; no event marks it.
    while daemon.api.readiness() not in ("ready", "draining"):  # noqa: ASYNC110
        await anyio.sleep(0.2)
    freeze_start_up_objects()


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
