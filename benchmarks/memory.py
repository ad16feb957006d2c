"""Memory of the running daemon: the demo's setup (the venue simulator, with the demo's fault
mix, and a real `k2d run` pointed at it) at a steady rate, with 3 and with 20 symbols.

Prints the daemon's RSS each minute (now, the minute's maximum sampled every second, and the
peak so far as the kernel counts it, VmHWM, which catches what sampling misses), the live
hub's rows, the rates actually captured, the daemon's CPU (a share of one core) and the
Maintainer operations finished in the minute; then the peak RSS (Maintainer rounds
included) and whether RSS stayed flat once the live window was full. The allocator is
k2d's (k2d.allocators.ARROW_POOL) unless ARROW_DEFAULT_MEMORY_POOL says otherwise (it is
passed on to the daemon), and is printed.

    python benchmarks/memory.py                         # 15 minutes with 3, then with 20
    python benchmarks/memory.py --minutes 4 --symbols 3 --first-round-after 120

The daemon is `python -m k2d` of the interpreter running this script, so another checkout's
daemon is measured by running the script with that checkout's environment (its venv, or
PYTHONPATH pointing at it).

The Maintainer's first round comes `maintenance.first_round_after` (300 s) after start; a
run shorter than that includes one only with --first-round-after. Targets (issue 14):
under 500 MB with 3 symbols and under 700 MB with 20, at 3,000 trades/s plus 3,000
quotes/s with the default 900 s live window.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# As `k2d demo` (k2d/cli.py): the demo's default fault mix.
DEMO_FAULTS = "drop=0.0005,dup=0.002,reorder=0.002,malformed=0.001"
SYMBOLS = [
    *("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT", "ADAUSDT", "DOGEUSDT"),
    *("AVAXUSDT", "DOTUSDT", "LINKUSDT", "LTCUSDT", "TRXUSDT", "ATOMUSDT", "UNIUSDT"),
    *("ETCUSDT", "XLMUSDT", "NEARUSDT", "APTUSDT", "FILUSDT", "ARBUSDT"),
]
TARGET_MB = {3: 500, 20: 700}


def machine() -> str:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
    return (
        f"{platform.node()} {platform.machine()} {cpu}, {os.cpu_count()} cpus, "
        f"{mem_kb / 2**20:.0f} GB, python {platform.python_version()}"
    )


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metrics(port: int) -> dict[str, float]:
    """Samples by name and labels, e.g. 'k2d_feed_records_total{feed="binance",stream="trade"}'."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, value = line.rsplit(" ", 1)
        out[key] = float(value)
    return out


def total(sample: dict[str, float], name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        v
        for k, v in sample.items()
        if (k == name or k.startswith(name + "{")) and all(w in k for w in want)
    )


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) process `pid` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of process `pid` in MB: now, and the peak since it started."""
    status = Path(f"/proc/{pid}/status").read_text()
    now = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    peak = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return now / 1024, peak / 1024


@dataclass
class Minute:
    minute: int
    rss: float
    rss_max: float
    peak: float
    live_rows: float
    trades_per_s: float
    quotes_per_s: float
    cpu: float  # the daemon's CPU in the minute, as a share of one core
    maintenance: list[str] = field(default_factory=list)


def start_simulator(
    symbols: list[str], rate: float, seed: int, cwd: Path
) -> tuple[subprocess.Popen[str], int]:
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "k2d",
            "simulate",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--symbols",
            ",".join(symbols),
            "--rate",
            str(rate),
            "--seed",
            str(seed),
            "--faults",
            DEMO_FAULTS,
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=cwd,
    )
    assert sim.stdout is not None
    line = sim.stdout.readline()
    m = re.search(r"ws://[\d.]+:(\d+)", line)
    if m is None:
        sim.kill()
        raise SystemExit(f"the simulator did not start: {line!r}")
    return sim, int(m.group(1))


def stop(proc: subprocess.Popen[str], timeout: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_one(args: argparse.Namespace, n_symbols: int, work: Path) -> tuple[list[Minute], float]:
    """One run of the daemon; the minutes and the peak RSS (VmHWM) in MB."""
    symbols = SYMBOLS[:n_symbols]
    sim, sim_port = start_simulator(symbols, args.rate, args.seed, work)
    port = free_port()
    cfg = work / "memory.toml"
    cfg.write_text(
        f"""
[storage]
data_dir = "{work / "data"}"
[api]
port = {port}
[feeds.binance]
ws_url = "ws://127.0.0.1:{sim_port}"
rest_url = "http://127.0.0.1:{sim_port}"
symbols = {json.dumps(symbols)}
[telemetry]
log_level = "WARNING"
[maintenance]
first_round_after = {args.first_round_after}
"""
    )
    log = (work / "daemon.log").open("w")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "k2d", "run", "--config", str(cfg)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=work,
    )
    minutes: list[Minute] = []
    peak = 0.0
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                before = metrics(port)
                break
            except OSError:
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the daemon did not start; see {log.name}") from None
                time.sleep(0.5)
        print(
            f"\n{n_symbols} symbols, {args.rate:,.0f} trades/s + quotes, "
            f"{args.minutes:g} min; load average {load_average()}"
        )
        print(
            f"{'min':>4} {'rss MB':>7} {'max MB':>7} {'peak MB':>8} {'live rows':>10} "
            f"{'trades/s':>9} {'quotes/s':>9} {'cpu':>5}  load average    maintenance finished"
        )
        start = time.monotonic()
        cpu_before = cpu_seconds(daemon.pid)
        done_maint = {k: v for k, v in before.items() if "maintenance_last_run" in k}
        for minute in range(1, int(args.minutes) + 1):
            rss_max = 0.0
            while time.monotonic() - start < minute * 60:
                if daemon.poll() is not None:
                    raise SystemExit(f"the daemon exited with {daemon.returncode}; see {log.name}")
                now_mb, peak = rss_mb(daemon.pid)
                rss_max = max(rss_max, now_mb)
                time.sleep(1.0)
            after = metrics(port)
            ran = []
            for key, value in after.items():
                if "maintenance_last_run" in key and value != done_maint.get(key):
                    op = re.search(r'operation="([^"]+)"', key)
                    ran.append(op.group(1) if op else "?")
                    done_maint[key] = value
            now_mb, peak = rss_mb(daemon.pid)
            cpu_now = cpu_seconds(daemon.pid)
            row = Minute(
                minute=minute,
                rss=now_mb,
                rss_max=max(rss_max, now_mb),
                peak=peak,
                live_rows=total(after, "k2d_live_rows"),
                trades_per_s=(
                    total(after, "k2d_feed_records_total", stream="trade")
                    - total(before, "k2d_feed_records_total", stream="trade")
                )
                / 60,
                quotes_per_s=(
                    total(after, "k2d_feed_records_total", stream="quote")
                    - total(before, "k2d_feed_records_total", stream="quote")
                )
                / 60,
                cpu=(cpu_now - cpu_before) / 60,
                maintenance=sorted(set(ran)),
            )
            before, cpu_before = after, cpu_now
            minutes.append(row)
            print(
                f"{row.minute:4d} {row.rss:7.0f} {row.rss_max:7.0f} {row.peak:8.0f} "
                f"{row.live_rows:10,.0f} "
                f"{row.trades_per_s:9,.0f} {row.quotes_per_s:9,.0f} {row.cpu:5.0%}  "
                f"{load_average():14}  " + (", ".join(row.maintenance) or "-"),
                flush=True,
            )
        peak = max(peak, rss_mb(daemon.pid)[1])
    finally:
        stop(sim, 30)
        stop(daemon, 90)
        log.close()
    return minutes, peak


def summary(n_symbols: int, minutes: list[Minute], peak: float) -> str:
    target = TARGET_MB.get(n_symbols)
    verdict = f", target under {target} MB: {'met' if peak < target else 'NOT met'}"
    lines = [
        f"{n_symbols} symbols: peak RSS {peak:,.0f} MB (VmHWM)" + (verdict if target else ""),
        f"  the daemon's CPU, minute by minute: {sum(m.cpu for m in minutes) / len(minutes):.0%} "
        f"of one core on average, {max(m.cpu for m in minutes):.0%} at most",
    ]
    # The window is full once the hub's row count stops growing (900 s, or the row cap).
    full = next(
        (p for p, m in itertools.pairwise(minutes) if m.live_rows <= p.live_rows * 1.02),
        None,
    )
    if full is None:
        lines.append("  the live window was still filling at the end of the run")
    else:
        after = [m for m in minutes if m.minute >= full.minute]
        lines.append(
            f"  live window full from minute {full.minute} ({full.live_rows:,.0f} rows): "
            f"RSS then {full.rss:,.0f} MB, afterwards {min(m.rss for m in after):,.0f}-"
            f"{max(m.rss_max for m in after):,.0f} MB, at the end {minutes[-1].rss:,.0f} MB"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument(
        "--symbols",
        default="3,20",
        help="symbol counts to run, one after the other (default %(default)s)",
    )
    ap.add_argument("--rate", type=float, default=3000.0, help="trades/s; as many quotes/s")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--first-round-after",
        type=float,
        default=300.0,
        help="seconds before the Maintainer's first round (default %(default)s, as config.toml)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the data dirs and daemon logs")
    args = ap.parse_args()
    counts = [int(c) for c in args.symbols.split(",") if c.strip()]
    if any(not 1 <= c <= len(SYMBOLS) for c in counts):
        ap.error(f"symbol counts go from 1 to {len(SYMBOLS)}")
    import pyarrow as pa

    from k2d.allocators import ARROW_POOL

    # The daemon's pool: the environment's choice, or k2d's own (k2d.allocators).
    pool = os.environ.get("ARROW_DEFAULT_MEMORY_POOL") or f"{ARROW_POOL} (k2d's default)"
    print(f"memory on {machine()}; Arrow memory pool {pool}, pyarrow {pa.__version__}")
    results = []
    for n in counts:
        work = Path(tempfile.mkdtemp(prefix=f"k2d-memory-{n}-"))
        try:
            minutes, peak = run_one(args, n, work)
            results.append((n, minutes, peak))
        finally:
            if args.keep:
                print(f"data and daemon log under {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
    print()
    for n, minutes, peak in results:
        print(summary(n, minutes, peak))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
