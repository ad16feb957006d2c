"""Soak: a real `k2d run` against the simulator at a steady rate, with faults, for a long
time; every minute, the daemon's RSS, open files and the sizes of the structures that could
grow with time (the live hub's uncommitted batches, the query side's ledger and span cache,
open gaps, stream depths). Nothing here should grow once the warm-up (the live window, the
first maintenance round) is over: the summary prints each figure's first value after the
warm-up beside its last and its maximum.

Faults: the simulator drops, duplicates and reorders trades, sends malformed frames and
disconnects every --disconnect-every seconds; inside the daemon, a tracker raises every
--crash-every batches (the capture chain goes back through recovery).

    python benchmarks/soak.py --minutes 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

SAMPLES = (
    ("k2d_live_rows", "live rows"),
    ("k2d_live_uncommitted_batches", "uncommitted"),
    ("k2d_query_ledger_events", "ledger events"),
    ("k2d_query_ledger_spans", "ledger spans"),
    ("k2d_open_gaps", "open gaps"),
    ("k2d_stream_depth", "stream depth"),
    ("k2d_actor_restarts", "restarts"),
)


def machine() -> str:
    return (
        f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
        f"python {platform.python_version()}"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name = re.split(r"[{ ]", line, maxsplit=1)[0]
        out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def proc_figures(pid: int) -> tuple[float, int]:
    """(RSS in MB, open file descriptors) of process `pid`."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=2000.0, help="simulated trades/s in total")
    ap.add_argument("--symbols", default="BTCUSDT,ETHUSDT,SOLUSDT")
    ap.add_argument("--warmup-minutes", type=float, default=16.0)
    ap.add_argument("--sample-seconds", type=float, default=60.0)
    ap.add_argument("--disconnect-every", type=float, default=300.0)
    ap.add_argument("--crash-every", type=int, default=20_000, help="tracker batches")
    ap.add_argument("--data-dir", type=Path, default=None)
    args = ap.parse_args()
    print(f"soak on {machine()}: {args.minutes:g} min at {args.rate:g} trades/s")
    work = args.data_dir or Path(tempfile.mkdtemp(prefix="k2d-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    faults = (
        f"drop=0.0005,dup=0.002,reorder=0.002,malformed=0.001,"
        f"disconnect_every={args.disconnect_every:g}"
    )
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "k2d",
            "simulate",
            "--port",
            "0",
            "--symbols",
            args.symbols,
            "--rate",
            str(args.rate),
            "--faults",
            faults,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sim.stdout is not None
    line = sim.stdout.readline()
    m = re.search(r"ws://[\d.]+:(\d+)", line)
    if m is None:
        sim.kill()
        raise SystemExit(f"simulator did not start: {line!r}")
    sim_port = int(m.group(1))
    port = free_port()
    cfg = work / "soak.toml"
    symbols = json.dumps(args.symbols.split(","))
    cfg.write_text(
        f"""
[storage]
data_dir = "{work / "data"}"
[api]
port = {port}
[feeds.binance]
ws_url = "ws://127.0.0.1:{sim_port}"
rest_url = "http://127.0.0.1:{sim_port}"
symbols = {symbols}
[maintenance]
first_round_after = 600.0
interval = 600.0
"""
    )
    log = (work / "daemon.log").open("w")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "k2d", "run", "--config", str(cfg)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "K2D_FAILPOINTS": f"tracker.process=*{args.crash_every}:raise"},
    )
    rows: list[dict[str, float]] = []
    try:
        time.sleep(5)
        header = (
            f"{'min':>5} {'rss MB':>7} {'fds':>5} "
            + " ".join(f"{label:>13}" for _, label in SAMPLES)
            + f" {'trades':>11}"
        )
        print(header)
        start = time.monotonic()
        while time.monotonic() - start < args.minutes * 60:
            time.sleep(args.sample_seconds)
            if daemon.poll() is not None:
                raise SystemExit(f"the daemon exited with {daemon.returncode}; see {log.name}")
            rss, fds = proc_figures(daemon.pid)
            m2 = metrics(port)
            row = {"min": (time.monotonic() - start) / 60, "rss": rss, "fds": fds}
            row |= {name: m2.get(name, 0.0) for name, _ in SAMPLES}
            row["trades"] = m2.get("k2d_rows_committed_total", 0.0)
            rows.append(row)
            print(
                f"{row['min']:5.1f} {rss:7.0f} {fds:5d} "
                + " ".join(f"{row[name]:13.0f}" for name, _ in SAMPLES)
                + f" {row['trades']:11.0f}",
                flush=True,
            )
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
        sim.send_signal(signal.SIGTERM)
        sim.wait(timeout=30)
    settled = [r for r in rows if r["min"] >= args.warmup_minutes] or rows[-1:]
    print(f"\nafter the {args.warmup_minutes:g}-minute warm-up (first, last, max):")
    for key, label in (("rss", "rss MB"), ("fds", "open files"), *SAMPLES):
        values = [r[key] for r in settled]
        print(f"  {label:>14}: {values[0]:10.0f} {values[-1]:10.0f} {max(values):10.0f}")
    print(f"daemon exit code {daemon.returncode}; data and log under {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
