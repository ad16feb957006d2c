"""WebSocket fan-out: a real `k2d run` against the simulator sending --rate trades/s (and as
many quotes), and --clients `websockets` clients subscribed to the trades of two symbols.

Figures: latency from the feed handler receiving a frame (the row's ingestion_timestamp) to
a client receiving the row, p50/p99 over every row of the clients that decode (every
--decode-every'th client by subscription order; the others receive every frame and skip
decoding, so that the clients' own CPU does not swamp a small machine), rows/s per client,
the daemon's CPU share and RSS. Then --stall clients stop reading: how long until the server
closes each (k2d_ws_slow_closed_total), and the others' latency meanwhile.

Clients do not negotiate permessage-deflate (uvicorn would compress every message once per
client). Never part of the pass/fail suite.

    python benchmarks/ws_fanout.py                       # 100 clients, 5,000 trades/s
    python benchmarks/ws_fanout.py --batch-max-age 0.002 # the feed's batching at 2 ms
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
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
from array import array
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from k2d.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[1]
CHANNELS = ["trades:BINANCE:BTCUSDT", "trades:BINANCE:ETHUSDT"]


def machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cpus, python {platform.python_version()}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


def buckets(port: int, name: str) -> dict[float, float]:
    """A histogram's cumulative bucket counts by upper bound."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[float, float] = {}
    for line in text.splitlines():
        m = re.match(rf'{name}_bucket{{le="([^"]+)"}} (\S+)', line)
        if m:
            out[float(m.group(1))] = float(m.group(2))
    return out


def quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The q-quantile (ms) of what a histogram observed between two reads, interpolated
    within its buckets."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return math.nan
    lo, prev = 0.0, 0.0
    for bound, cum in zip(bounds, counts, strict=True):
        if cum >= q * total:
            if math.isinf(bound):
                return lo * 1_000
            inside = cum - prev
            return (lo + (bound - lo) * ((q * total - prev) / inside if inside else 1.0)) * 1_000
        lo, prev = bound, cum
    return math.nan


def _share(
    before: tuple[float, float, float], after: tuple[float, float, float]
) -> tuple[float, float]:
    total = max(1.0, after[2] - before[2])
    return (after[0] - before[0]) / total, (after[1] - before[1]) / total


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float, float]:
    """(busy, steal, total) jiffies of all cpus, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    steal = fields[7] if len(fields) > 7 else 0
    total = sum(fields[:8])
    return total - idle - steal, steal, total


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


def pct(values: array[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the clients (in processes of their own) ------------------------------------------------


class _Row(msgspec.Struct):
    ingestion_timestamp: str


class _Msg(msgspec.Struct):
    """Only what the latency needs of a server message (the rest is skipped, not built)."""

    type: str
    rows: list[_Row] = []


def _client_process(
    url: str,
    first: int,
    count: int,
    decode_every: int,
    stall: list[int],
    phases: list[float],
    out: Any,
) -> None:
    """Clients first..first+count-1; those in `stall` stop reading at phases[1]. Sends back
    per phase the latencies (ms) of the decoding clients and rows received."""
    import websockets

    decoder = msgspec.json.Decoder(_Msg)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    seconds: dict[str, int] = {}

    def us(text: str) -> int:
        head = text[:19]
        base = seconds.get(head)
        if base is None:
            if len(seconds) > 1000:
                seconds.clear()
            base = seconds[head] = int(
                (datetime.fromisoformat(head + "+00:00") - epoch).total_seconds()
            )
        return base * 1_000_000 + int(text[20:26])

    latencies = [array("d"), array("d")]
    rows = [0, 0]
    closed: dict[int, float] = {}

    async def one(i: int) -> None:
        decodes = i % decode_every == 0
        async with websockets.connect(url, proxy=None, compression=None, max_size=None) as ws:
            await ws.send(json.dumps({"op": "subscribe", "channels": CHANNELS}))
            await ws.recv()
            while True:
                now = time.time()
                if now >= phases[2]:
                    return
                phase = 0 if now < phases[1] else 1
                if phase == 1 and i in stall:
                    # Stop reading; see when the server gives up on this client.
                    try:
                        await asyncio.wait_for(ws.wait_closed(), timeout=phases[2] - now)
                        closed[i] = time.time() - phases[1]
                    except TimeoutError:
                        pass
                    return
                try:
                    data = await asyncio.wait_for(ws.recv(), timeout=max(0.01, phases[2] - now))
                except TimeoutError:
                    return
                if now < phases[0] or not decodes:
                    continue
                received = time.time_ns() // 1_000
                msg = decoder.decode(data)
                lat = latencies[phase]
                for r in msg.rows:
                    lat.append((received - us(r.ingestion_timestamp)) / 1_000)
                rows[phase] += len(msg.rows)

    async def main() -> None:
        tasks = []
        for i in range(first, first + count):
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(0.005)
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    out.send(
        {
            "lat": [list(latencies[0]), list(latencies[1])],
            "rows": rows,
            "closed": closed,
        }
    )
    out.close()


# -- the run --------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--rate", type=float, default=5_000.0, help="simulated trades/s in total")
    ap.add_argument("--stall", type=int, default=5)
    ap.add_argument("--decode-every", type=int, default=10)
    ap.add_argument("--processes", type=int, default=2, help="client processes")
    ap.add_argument("--warmup", type=float, default=8.0)
    ap.add_argument("--seconds", type=float, default=15.0, help="each phase")
    ap.add_argument("--batch-max-age", type=float, default=None, help="pipeline.batch_max_age")
    ap.add_argument("--queue-bytes", type=int, default=None, help="stream.queue_bytes")
    ap.add_argument("--daemon-log", type=Path, default=None, help="keep the daemon's log here")
    args = ap.parse_args()

    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="k2d-wsbench-") as tmp_dir:
        tmp = Path(tmp_dir)
        sim = subprocess.Popen(
            [
                py,
                "-m",
                "k2d",
                "simulate",
                "--port",
                "0",
                "--symbols",
                "BTCUSDT,ETHUSDT",
                "--rate",
                str(args.rate),
                "--seed",
                "3",
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert sim.stdout is not None
        sim_port = None
        for _ in range(50):
            m = re.search(r"listening on ws://[\d.]+:(\d+)", sim.stdout.readline())
            if m:
                sim_port = int(m.group(1))
                break
        assert sim_port is not None, "the simulator did not start"
        port = free_port()
        extra = ""
        if args.batch_max_age is not None:
            extra += f"[pipeline]\nbatch_max_age = {args.batch_max_age}\n"
        extra += f"[stream]\nmax_connections_per_key = {args.clients + 10}\n"
        if args.queue_bytes is not None:
            extra += f"queue_bytes = {args.queue_bytes}\n"
        cfg = tmp / "k2d.toml"
        cfg.write_text(
            f"""
[storage]
data_dir = "{tmp / "data"}"
[api]
port = {port}
rate_limit = 0.0
[feeds.binance]
ws_url = "ws://127.0.0.1:{sim_port}"
rest_url = "http://127.0.0.1:{sim_port}"
symbols = ["BTCUSDT", "ETHUSDT"]
{extra}"""
        )
        log = (args.daemon_log or tmp / "daemon.log").open("w")
        daemon = subprocess.Popen(
            [py, "-m", "k2d", "run", "--config", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if metric(port, "k2d_rows_committed_total") > 0:
                        break
                except OSError:
                    pass
                time.sleep(0.3)
            url = f"ws://127.0.0.1:{port}/v1/stream"
            start = time.time() + 3.0  # connections made by then
            phases = [start + args.warmup, start + args.warmup + args.seconds]
            phases.append(phases[1] + args.seconds)
            stall = set(range(1, args.clients, max(1, args.clients // max(1, args.stall))))
            stall = set(sorted(i for i in stall if i % args.decode_every)[: args.stall])
            per = math.ceil(args.clients / args.processes)
            pipes, procs = [], []
            for p in range(args.processes):
                first = p * per
                count = min(per, args.clients - first)
                recv, send = mp.Pipe(duplex=False)
                proc = mp.Process(
                    target=_client_process,
                    args=(url, first, count, args.decode_every, sorted(stall), phases, send),
                )
                proc.start()
                pipes.append(recv)
                procs.append(proc)
            # Daemon CPU and RSS, and ingest, during each measured phase.
            figures: list[dict[str, Any]] = []
            for phase in range(2):
                t_start = phases[phase] if phase else phases[0]
                while time.time() < t_start:
                    time.sleep(0.05)
                others = [sim.pid, *(p.pid for p in procs if p.pid is not None)]
                other0 = sum(cpu_seconds(pid) for pid in others)
                busy0 = machine_busy()
                cpu0, recs0, t0 = (
                    cpu_seconds(daemon.pid),
                    metric(port, "k2d_feed_records_total"),
                    time.time(),
                )
                sent0 = metric(port, "k2d_ws_bytes_total")
                pub0 = buckets(port, "k2d_ws_publish_lag_seconds")
                queue0 = buckets(port, "k2d_ws_queue_seconds")
                rss_max = 0.0
                slow_closed: list[float] = []
                base_slow = metric(port, "k2d_ws_slow_closed_total")
                while time.time() < phases[phase + 1]:
                    time.sleep(0.25)
                    rss_max = max(rss_max, rss_mb(daemon.pid))
                    if phase == 1:
                        n = metric(port, "k2d_ws_slow_closed_total") - base_slow
                        while len(slow_closed) < n:
                            slow_closed.append(time.time() - phases[1])
                dt = time.time() - t0
                pub1 = buckets(port, "k2d_ws_publish_lag_seconds")
                queue1 = buckets(port, "k2d_ws_queue_seconds")
                figures.append(
                    {
                        "others": (sum(cpu_seconds(pid) for pid in others) - other0) / dt,
                        "busy": _share(busy0, machine_busy()),
                        "pub50": quantile(pub0, pub1, 0.5),
                        "pub99": quantile(pub0, pub1, 0.99),
                        "q50": quantile(queue0, queue1, 0.5),
                        "q99": quantile(queue0, queue1, 0.99),
                        "cpu": (cpu_seconds(daemon.pid) - cpu0) / dt,
                        "records": (metric(port, "k2d_feed_records_total") - recs0) / dt,
                        "sent_mb": (metric(port, "k2d_ws_bytes_total") - sent0) / dt / 1e6,
                        "rss": rss_max,
                        "slow": slow_closed,
                    }
                )
            results = [r.recv() for r in pipes]
            for proc in procs:
                proc.join(timeout=30)
            encoded = metric(port, "k2d_ws_encoded_batches_total")
            messages = metric(port, "k2d_ws_messages_total")
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.kill()
            sim.kill()
            sim.wait()
            log.close()

    lat = [array("d"), array("d")]
    rows = [0, 0]
    closed: dict[int, float] = {}
    for r in results:
        for phase in range(2):
            lat[phase].extend(r["lat"][phase])
            rows[phase] += r["rows"][phase]
        closed.update({int(k): v for k, v in r["closed"].items()})
    decoding = len([i for i in range(args.clients) if i % args.decode_every == 0])
    print(f"machine: {machine()}")
    default_age = f"default ({PipelineConfig().batch_max_age})"
    print(
        f"setup: {args.clients} clients on {', '.join(CHANNELS)}; simulator {args.rate:,.0f} "
        f"trades/s (and quotes); pipeline.batch_max_age "
        f"{args.batch_max_age if args.batch_max_age is not None else default_age}; "
        f"{decoding} decoding clients; {args.processes} client processes"
    )
    for phase, name in enumerate(("all reading", f"{args.stall} stalled")):
        f = figures[phase]
        per_client = rows[phase] / max(1, decoding) / args.seconds
        print(
            f"{name:>12}: latency p50 {pct(lat[phase], 0.50):6.2f} ms  p99 "
            f"{pct(lat[phase], 0.99):6.2f} ms  max {max(lat[phase], default=math.nan):7.1f} ms | "
            f"{per_client:,.0f} rows/s per client | ingest {f['records']:,.0f} records/s | "
            f"sent {f['sent_mb']:.1f} MB/s | daemon CPU {f['cpu'] * 100:.0f}% of a core, "
            f"RSS {f['rss']:.0f} MB (simulator and clients: {f['others'] * 100:.0f}%; machine "
            f"busy {f['busy'][0] * 100:.0f}%, steal {f['busy'][1] * 100:.0f}%)"
        )
        print(
            f"{'':>12}  of which frame -> published to the stream p50 {f['pub50']:.1f} ms "
            f"p99 {f['pub99']:.1f} ms (the pipeline); queued -> written to the client's socket "
            f"p50 {f['q50']:.1f} ms p99 {f['q99']:.1f} ms (the fan-out; server-side histograms)"
        )
    slow = figures[1]["slow"]
    seen = ", ".join(f"{v:.1f}s" for v in sorted(closed.values())) or "-"
    print(
        f"stalled clients closed by the server after: "
        f"{', '.join(f'{s:.1f}s' for s in slow) or 'none'} (from the stall; "
        f"clients saw their close after {seen})"
    )
    if lat[0] and lat[1]:
        print(f"others' p99 with the stalled clients: {pct(lat[1], 0.99) / pct(lat[0], 0.99):.2f}x")
    print(f"batches encoded {encoded:,.0f} for {messages:,.0f} messages sent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
