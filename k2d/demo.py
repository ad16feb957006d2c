"""`k2d demo`: the venue simulator in a subprocess and the real daemon pointed at it.

Stop order matters for the demo's promise (every sent trade is stored or inside a gap):
the simulator's market closes first, sending its final trades and serverShutdown; the feed
reads them; then the daemon drains while the venue's REST history still answers (the
backfiller closes the last gaps), and only then does the simulator stop.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from k2d.app import Daemon, run_daemon
from k2d.config import ConfigError, load_config

__all__ = ["run_demo", "status_line"]

log = logging.getLogger(__name__)
_LISTENING = re.compile(r"listening on ws://[\d.]+:(\d+)")


def _start_simulator(args: argparse.Namespace, manifest: Path) -> tuple[subprocess.Popen[str], int]:
    cmd = [
        sys.executable,
        "-m",
        "k2d",
        "simulate",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--symbols",
        args.symbols,
        "--rate",
        str(args.rate),
        "--seed",
        str(args.seed),
        "--manifest",
        str(manifest),
    ]
    if args.faults:
        cmd += ["--faults", args.faults]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1)
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = _LISTENING.search(line)
        if m:
            return proc, int(m.group(1))
    proc.kill()
    raise RuntimeError("the simulator did not start (no 'listening on' line)")


def _value(d: Daemon, name: str, labels: dict[str, str] | None = None) -> float:
    return d.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def _sum(d: Daemon, name: str, match: dict[str, str] | None = None) -> float:
    total = 0.0
    for metric in d.metrics.registry.collect():
        for s in metric.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in (match or {}).items()):
                total += s.value
    return total


def status_line(d: Daemon, elapsed: float, rate: float) -> str:
    trades = _sum(d, "k2d_feed_records_total", {"stream": "trade"})
    quotes = _sum(d, "k2d_feed_records_total", {"stream": "quote"})
    gaps_open = _sum(d, "k2d_open_gaps")
    gaps_closed = _sum(d, "k2d_gaps_total", {"kind": "gap", "status": "backfilled"}) + _sum(
        d, "k2d_gaps_total", {"kind": "gap", "status": "unrecoverable"}
    )
    dead = _sum(d, "k2d_dead_letters_total")
    commits = _sum(d, "k2d_commits_total")
    rows = _sum(d, "k2d_rows_committed_total")
    return (
        f"{elapsed:6.1f}s | {rate:8,.0f} rec/s | trades {trades:,.0f} quotes {quotes:,.0f} | "
        f"gaps open {gaps_open:,.0f} closed {gaps_closed:,.0f} | dead letters {dead:,.0f} | "
        f"commits {commits:,.0f} rows {rows:,.0f}"
    )


def run_demo(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir.resolve()
    (data_dir / "simulator").mkdir(parents=True, exist_ok=True)
    manifest = data_dir / "simulator" / "manifest.json"
    symbols = [s.strip().upper() for s in args.symbols.split(",") if s.strip()]
    proc, port = _start_simulator(args, manifest)
    overrides: dict[str, Any] = {
        "storage": {"data_dir": str(data_dir)},
        "feeds": {
            "binance": {
                "enabled": True,
                "ws_url": f"ws://127.0.0.1:{port}",
                "rest_url": f"http://127.0.0.1:{port}",
                "symbols": symbols,
            }
        },
        "telemetry": {"log_level": "WARNING"},
    }
    if args.api_port is not None:
        overrides["api"] = {"port": args.api_port}
    try:
        cfg = load_config(args.config, overrides=overrides)
    except ConfigError as e:
        proc.terminate()
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 2
    print(f"simulator: ws://127.0.0.1:{port} (manifest {manifest})", flush=True)
    try:
        return anyio.run(_demo, cfg, proc, args.exit_after)
    finally:
        if proc.poll() is None:
            proc.kill()


async def _demo(cfg: Any, proc: subprocess.Popen[str], exit_after: float | None) -> int:
    exit_code = 0

    async def daemon(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        nonlocal exit_code
        exit_code = await run_daemon(cfg, install_signals=False, task_status=task_status)

    async with anyio.create_task_group() as tg:
        d: Daemon = await tg.start(daemon)
        print(
            f"API: http://{cfg.api.host}:{d.api_port}  (data in {cfg.storage.data_dir})", flush=True
        )
        await _until_stop(d, exit_after)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGUSR1)  # the market closes; REST history stays up
        # Let the feed parse the simulator's last frames before the pipeline drains.
        await anyio.sleep(cfg.pipeline.batch_max_age * 4 + 1.0)
        d.request_stop()
    await _stop_simulator(proc)
    print("after drain: " + status_line(d, 0.0, 0.0).split("|", 2)[2].strip(), flush=True)
    return exit_code


async def _until_stop(daemon: Daemon, exit_after: float | None) -> None:
    tty = sys.stdout.isatty()
    start = time.monotonic()
    last_records, last_t = 0.0, start
    last_print = 0.0
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:

            async def on_signal() -> None:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    return

            tg.start_soon(on_signal)
            while exit_after is None or time.monotonic() - start < exit_after:
                await anyio.sleep(1.0)
                now = time.monotonic()
                records = _sum(daemon, "k2d_feed_records_total")
                rate = (records - last_records) / (now - last_t)
                last_records, last_t = records, now
                line = status_line(daemon, now - start, rate)
                if tty:
                    print("\r" + line, end="", flush=True)
                elif now - last_print >= 5.0:
                    print(line, flush=True)
                    last_print = now
            tg.cancel_scope.cancel()
    if tty:
        print()
    print(status_line(daemon, time.monotonic() - start, 0.0), flush=True)


async def _stop_simulator(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        await anyio.to_thread.run_sync(proc.wait, 15)
    except subprocess.TimeoutExpired:
        proc.kill()
