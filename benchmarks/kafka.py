"""Kafka mode end to end: the simulator -> k2d (feed, journal, producer) -> Kafka -> k2d
(consumer, trackers, writer) -> Iceberg, against the same run in embedded mode as the
baseline (same simulator rate, same machine, one after the other).

Figures: committed trades/s over the steady window (from k2d_rows_committed_total), the
daemon's CPU share, and, after the simulator's market closes, how long until the
consumer's lag is zero and every trade the simulator sent is committed. A broker is
started by tests/kafka/broker.sh (Java 17 and Maven, jars cached in .ci/cache/kafka).
Never part of the pass/fail suite.

    python benchmarks/kafka.py                      # 60 s at 60,000 trades/s
    python benchmarks/kafka.py --rate 20000 --seconds 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BROKER_SH = ROOT / "tests" / "kafka" / "broker.sh"
SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT"]


def machine() -> str:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{model}, {os.cpu_count()} cpus, python {platform.python_version()}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(port: int, name: str, label: str = "") -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if (line.startswith(name + " ") or line.startswith(name + "{")) and label in line
    )


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(args: argparse.Namespace, work: Path, kafka: str | None) -> dict[str, float]:
    """One run; `kafka` is the bootstrap address for Kafka mode, None for embedded."""
    tag = "kafka" if kafka else "embedded"
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "k2d",
            "simulate",
            "--port",
            "0",
            "--symbols",
            ",".join(SYMBOLS),
            "--rate",
            str(args.rate),
            "--seed",
            "7",
            "--manifest",
            str(work / f"{tag}-manifest.json"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    assert sim.stdout is not None
    sim_port = int(sim.stdout.readline().rsplit(":", 1)[1])
    port = free_port()
    run_id = f"{os.getpid()}-{int(time.time())}"
    section = (
        f"""
[kafka]
enabled = true
bootstrap_servers = "{kafka}"
trades_topic = "bench.{run_id}.trades"
quotes_topic = "bench.{run_id}.quotes"
partitions = {args.partitions}
group_id = "bench-{run_id}"
"""
        if kafka
        else ""
    )
    cfg = work / f"{tag}.toml"
    cfg.write_text(
        f"""
[storage]
data_dir = "{work / tag}"
[api]
port = {port}
rate_limit = 0.0
[telemetry]
log_level = "WARNING"
[feeds.binance]
ws_url = "ws://127.0.0.1:{sim_port}"
rest_url = "http://127.0.0.1:{sim_port}"
symbols = {json.dumps(SYMBOLS)}
{section}"""
    )
    log = (work / f"{tag}.log").open("w")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "k2d", "run", "--config", str(cfg)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if metric(port, "k2d_rows_committed_total", 'table="trades"') > 0:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{tag}: nothing committed in 120 s (see {log.name})")
            time.sleep(0.5)
        time.sleep(args.warmup)
        rows0 = metric(port, "k2d_rows_committed_total", 'table="trades"')
        cpu0, t0 = cpu_seconds(daemon.pid), time.monotonic()
        time.sleep(args.seconds)
        rows1 = metric(port, "k2d_rows_committed_total", 'table="trades"')
        cpu1, t1 = cpu_seconds(daemon.pid), time.monotonic()
        sim.send_signal(signal.SIGUSR1)  # close the market: the last trades, then silence
        closed = time.monotonic()
        while "market closed" not in (sim.stdout.readline() or "market closed"):
            pass
        manifest = json.loads((work / f"{tag}-manifest.json").read_text())
        sent = sum(
            s["last_trade_id"] - s["first_trade_id"] + 1 - len(s["dropped"])
            for s in manifest["symbols"].values()
        )
        # Until the consumer is at the end of every partition (Kafka mode) and the rows
        # committed stop growing: the pipeline has drained what the venue sent.
        lag_zero = None
        last, still = -1.0, 0
        while time.monotonic() - closed < 120 and still < 3:
            if kafka and lag_zero is None and metric(port, "k2d_kafka_lag_records") == 0:
                lag_zero = time.monotonic() - closed
            now = metric(port, "k2d_rows_committed_total", 'table="trades"')
            still = still + 1 if now == last else 0
            last = now
            time.sleep(0.25)
        return {
            "rate": (rows1 - rows0) / (t1 - t0),
            "cpu": (cpu1 - cpu0) / (t1 - t0),
            "lag_zero": lag_zero if lag_zero is not None else float("nan"),
            "sent": float(sent),
            "committed": last,
        }
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=120)
        except subprocess.TimeoutExpired:
            daemon.kill()
        sim.kill()
        sim.wait()
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rate", type=float, default=60_000.0, help="simulated trades/s in total")
    ap.add_argument("--seconds", type=float, default=60.0, help="measured window")
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--partitions", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="k2d-kafkabench-") as tmp:
        work = Path(tmp)
        started = subprocess.run(
            [str(BROKER_SH), "start", str(work / "broker")],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        bootstrap = started.stdout.strip().splitlines()[-1].removeprefix("bootstrap=")
        try:
            embedded = run(args, work, None)
            kafka = run(args, work, bootstrap)
        finally:
            subprocess.run([str(BROKER_SH), "stop", str(work / "broker")], capture_output=True)
    print(f"machine: {machine()}")
    print(
        f"setup: simulator {args.rate:,.0f} trades/s (and as many quotes) on {len(SYMBOLS)} "
        f"symbols, {args.seconds:.0f} s measured after {args.warmup:.0f} s; "
        f"{args.partitions} partitions; Kafka 4.1.0 single node on loopback"
    )
    for name, r in (("embedded (baseline)", embedded), ("kafka", kafka)):
        print(
            f"{name:>20}: {r['rate']:>9,.0f} trades/s committed | daemon CPU "
            f"{r['cpu'] * 100:.0f}% of a core | {r['committed']:,.0f} of {r['sent']:,.0f} "
            "sent trades committed after the close"
            + (f" | lag zero {r['lag_zero']:.1f} s after the close" if name == "kafka" else "")
        )
    print(f"kafka / embedded: {kafka['rate'] / embedded['rate']:.2f}x the trades/s")


if __name__ == "__main__":
    main()
