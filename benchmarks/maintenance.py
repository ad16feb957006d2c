"""A day of streaming into market.trades, with and without the Maintainer: files, manifests,
snapshots, commit latency and query latency over time.

The stream covers 30 hours of event time (day D-1 00:00 to day D 06:00) in --commits
commits of --rows trades each, like the writer's flushes (each carries k2 state for every
symbol). With --maintain the Maintainer's round (retention off, compaction of closed
partitions, manifest merge, expiry with thinning, orphan sweep off) runs every simulated
hour; day D-1 is closed at D 01:00 and compacted then. Snapshot ages are wall-clock, so the
snapshot settings are scaled: "full history" is the wall time of the last simulated hour and
the thinning interval the wall time of one simulated hour.

Queries, each planned through pyiceberg (table loaded once per checkpoint, as a file index
would) then run by DuckDB over the planned Parquet files:
  (a) window: one symbol, a random 10-minute window of the data so far;
  (b) ohlcv:  one symbol, 1-minute OHLCV over the whole of day D-1 (the part streamed so far).

    python benchmarks/maintenance.py --commits 1500 --rows 2000
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pyarrow as pa

from k2d.config import MaintenanceConfig, StorageConfig
from k2d.messages import Watermark
from k2d.storage import TABLES, TRADES, TableMaintenance, Warehouse, flush_properties

HOUR_US = 3_600_000_000
DAY_US = 24 * HOUR_US
SPAN_US = 30 * HOUR_US
SYMBOLS = tuple(f"SYM{i:02d}USDT" for i in range(10))


def machine() -> str:
    return (
        f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
        f"python {platform.python_version()}"
    )


def p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).isoformat()


class Stream:
    """Trades for one commit: symbols round-robin, timestamps spread over its slice."""

    def __init__(self, start_us: int, commits: int, rows: int, seed: int = 1) -> None:
        self.start_us = start_us
        self.slice_us = SPAN_US // commits
        self.rows = rows
        self.rng = random.Random(seed)
        self.next_id = 0
        self.prices = dict.fromkeys(SYMBOLS, 100.0)
        self.watermarks: dict[str, Watermark] = {}

    def batch(self, k: int) -> pa.Table:
        rng, n = self.rng, self.rows
        lo = self.start_us + k * self.slice_us
        ids = range(self.next_id, self.next_id + n)
        self.next_id += n
        symbols = [SYMBOLS[i % len(SYMBOLS)] for i in ids]
        ts = sorted(lo + rng.randrange(self.slice_us) for _ in ids)
        prices = []
        for s in symbols:
            self.prices[s] *= 1 + rng.uniform(-0.0005, 0.0005)
            prices.append(f"{self.prices[s]:.4f}")
        for i, s in zip(ids, symbols, strict=True):
            self.watermarks[f"BINANCE:{s}:trade"] = Watermark(
                last_sequence=i, platform_sequence=i, last_seen_us=ts[-1]
            )
        cols: dict[str, Any] = {
            "message_id": [f"BINANCE:{s}:trade:{i}" for i, s in zip(ids, symbols, strict=True)],
            "trade_id": [str(i) for i in ids],
            "symbol": symbols,
            "exchange": ["BINANCE"] * n,
            "asset_class": ["crypto"] * n,
            "timestamp": ts,
            "price": prices,
            "quantity": [f"{rng.randrange(1, 10_000) / 1_000:.3f}" for _ in ids],
            "currency": ["USDT"] * n,
            "side": ["BUY" if i % 2 else "SELL" for i in ids],
            "trade_conditions": [None] * n,
            "source_sequence": list(ids),
            "ingestion_timestamp": ts,
            "platform_sequence": list(ids),
            "vendor_data": [None] * n,
            "provenance": ["live"] * n,
        }
        schema = TABLES[TRADES].arrow_schema
        arrays = []
        for f in schema:
            values = cols[f.name]
            if pa.types.is_decimal(f.type):
                arrays.append(pa.array(values, pa.string()).cast(f.type))
            else:
                arrays.append(pa.array(values, f.type))
        return pa.Table.from_arrays(arrays, schema=schema)


@dataclass
class Checkpoint:
    sim_hour: float
    files: int
    manifests: int
    snapshots: int
    commit_p50: float
    commit_p99: float
    refresh: float
    window_p50: float
    window_p99: float
    ohlcv_p50: float
    ohlcv_p99: float
    ohlcv_files: int


@dataclass
class Run:
    label: str
    checkpoints: list[Checkpoint] = field(default_factory=list)
    rounds: list[tuple[float, float, int, int]] = field(default_factory=list)
    wall: float = 0.0


def measure(
    wh: Warehouse,
    con: duckdb.DuckDBPyConnection,
    rng: random.Random,
    start_us: int,
    now_us: int,
    samples: tuple[int, int],
) -> tuple[float, list[float], list[float], int]:
    """(table load seconds, window query seconds, ohlcv query seconds, ohlcv files)."""
    t0 = time.perf_counter()
    table = wh.load_table(TRADES)
    refresh = time.perf_counter() - t0
    window: list[float] = []
    for _ in range(samples[0]):
        symbol = rng.choice(SYMBOLS)
        lo = rng.randrange(start_us, max(start_us + 1, now_us - 600_000_000))
        hi = lo + 600_000_000
        t0 = time.perf_counter()
        flt = f"symbol = '{symbol}' AND timestamp >= '{iso(lo)}' AND timestamp < '{iso(hi)}'"
        paths = [t.file.file_path.removeprefix("file://") for t in table.scan(flt).plan_files()]
        if paths:
            con.execute(
                "SELECT count(*), sum(quantity), min(price), max(price) FROM read_parquet($1) "
                "WHERE symbol = $2 AND timestamp >= make_timestamptz($3) "
                "AND timestamp < make_timestamptz($4)",
                [paths, symbol, lo, hi],
            ).fetchall()
        window.append(time.perf_counter() - t0)
    ohlcv: list[float] = []
    day_hi = min(now_us, start_us + DAY_US)
    files = 0
    for _ in range(samples[1]):
        symbol = rng.choice(SYMBOLS)
        t0 = time.perf_counter()
        flt = (
            f"symbol = '{symbol}' AND timestamp >= '{iso(start_us)}' "
            f"AND timestamp < '{iso(day_hi)}'"
        )
        paths = [t.file.file_path.removeprefix("file://") for t in table.scan(flt).plan_files()]
        files = len(paths)
        con.execute(
            "SELECT time_bucket(INTERVAL 1 minute, timestamp) AS minute, "
            "arg_min(price, timestamp), max(price), min(price), arg_max(price, timestamp), "
            "sum(quantity) FROM read_parquet($1) "
            "WHERE symbol = $2 AND timestamp >= make_timestamptz($3) "
            "AND timestamp < make_timestamptz($4) GROUP BY minute ORDER BY minute",
            [paths, symbol, start_us, day_hi],
        ).fetchall()
        ohlcv.append(time.perf_counter() - t0)
    return refresh, window, ohlcv, files


def simulate(args: argparse.Namespace, workdir: Path, maintain: bool) -> Run:
    run = Run("with Maintainer" if maintain else "without")
    wh = Warehouse(StorageConfig(data_dir=str(workdir / ("on" if maintain else "off"))))
    wh.ensure_tables()
    day0 = datetime.now(UTC).date() - timedelta(days=3)
    start_us = int(datetime(day0.year, day0.month, day0.day, tzinfo=UTC).timestamp()) * 10**6
    stream = Stream(start_us, args.commits, args.rows)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    rng = random.Random(5)
    per_hour = args.commits / 30
    checkpoint_every = max(1, round(per_hour * args.checkpoint_hours))
    hour_walls: list[float] = [time.perf_counter()]
    latencies: list[float] = []
    began = time.perf_counter()
    for k in range(args.commits):
        data = stream.batch(k)
        props = flush_properties(
            flush=k + 1,
            tables=[TRADES],
            watermarks=stream.watermarks,
            log_position={"journal:feed-binance@0": {"segment": 1, "offset": k * 1_000}},
            batch_ids=[k + 1],
        )
        t0 = time.perf_counter()
        wh.append(TRADES, data, props)
        latencies.append(time.perf_counter() - t0)
        sim_now = start_us + (k + 1) * stream.slice_us
        hour = int((sim_now - start_us) // HOUR_US)
        if hour >= len(hour_walls):
            hour_walls.append(time.perf_counter())
            if maintain:
                run.rounds.append(maintenance_round(wh, hour_walls, start_us, sim_now, hour))
        if (k + 1) % checkpoint_every == 0 or k + 1 == args.commits:
            refresh, window, ohlcv, files = measure(
                wh, con, rng, start_us, sim_now, (args.window_samples, args.ohlcv_samples)
            )
            stats = TableMaintenance(wh, MaintenanceConfig()).stats(TRADES)
            cp = Checkpoint(
                sim_hour=(sim_now - start_us) / HOUR_US,
                files=stats.data_files,
                manifests=stats.manifests,
                snapshots=stats.snapshots,
                commit_p50=p(latencies, 0.5),
                commit_p99=p(latencies, 0.99),
                refresh=refresh,
                window_p50=p(window, 0.5),
                window_p99=p(window, 0.99),
                ohlcv_p50=p(ohlcv, 0.5),
                ohlcv_p99=p(ohlcv, 0.99),
                ohlcv_files=files,
            )
            run.checkpoints.append(cp)
            latencies = []
            print(f"  [{run.label}] {row(cp)}", flush=True)
    run.wall = time.perf_counter() - began
    wh.close()
    return run


def maintenance_round(
    wh: Warehouse, hour_walls: list[float], start_us: int, sim_now: int, hour: int
) -> tuple[float, float, int, int]:
    """One Maintainer round at simulated hour `hour`: (hour, seconds, compacted, expired)."""
    wall_hour = (hour_walls[-1] - hour_walls[0]) / max(1, len(hour_walls) - 1)
    cfg = msgspec.convert(
        {
            "snapshot_full_history": hour_walls[-1] - hour_walls[-2] if hour > 0 else wall_hour,
            "snapshot_thin_interval": wall_hour,
            "orphan_file_age": 0.0,
        },
        MaintenanceConfig,
    )
    # A day is closed once it ended closed_partition_age (1 h) ago in event time.
    closed_until = (sim_now - HOUR_US) // DAY_US
    before = date(1970, 1, 1) + timedelta(days=closed_until)
    t0 = time.perf_counter()
    report = TableMaintenance(wh, cfg).run([TRADES], before=before)
    seconds = time.perf_counter() - t0
    assert not report.errors, report.errors
    expired = sum(e.snapshots_expired for e in report.expiries)
    return hour, seconds, len(report.compactions), expired


def row(cp: Checkpoint) -> str:
    ms = 1000
    return (
        f"h{cp.sim_hour:5.1f} files {cp.files:5d} manifests {cp.manifests:4d} "
        f"snapshots {cp.snapshots:5d} | commit p50 {cp.commit_p50 * ms:6.0f} "
        f"p99 {cp.commit_p99 * ms:6.0f} ms | load {cp.refresh * ms:5.0f} ms | "
        f"window p50 {cp.window_p50 * ms:5.0f} p99 {cp.window_p99 * ms:5.0f} ms | "
        f"ohlcv p50 {cp.ohlcv_p50 * ms:5.0f} p99 {cp.ohlcv_p99 * ms:5.0f} ms "
        f"({cp.ohlcv_files} files)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commits", type=int, default=1_500, help="commits over the 30 h")
    ap.add_argument("--rows", type=int, default=2_000, help="trades per commit")
    ap.add_argument("--checkpoint-hours", type=float, default=3.0)
    ap.add_argument("--window-samples", type=int, default=40)
    ap.add_argument("--ohlcv-samples", type=int, default=10)
    ap.add_argument("--only", choices=["with", "without"], default=None)
    ap.add_argument("--dir", type=Path, default=None, help="work dir (default: a temp dir)")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    print(
        f"stream: {args.commits} commits x {args.rows} trades = {args.commits * args.rows:,} rows "
        f"over 30 h of event time ({SPAN_US / args.commits / 1e6:.0f} s per commit; the default "
        f"flush_interval of 2 s would make {30 * 1800:,} commits)"
    )
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        runs = []
        for maintain in (False, True):
            if args.only == ("without" if maintain else "with"):
                continue
            runs.append(simulate(args, Path(tmp), maintain))
    for run in runs:
        print(f"\n{run.label}: {run.wall:.0f} s wall")
        for cp in run.checkpoints:
            print("  " + row(cp))
        if run.rounds:
            secs = [r[1] for r in run.rounds]
            print(
                f"  rounds: {len(run.rounds)}, {sum(r[2] for r in run.rounds)} partitions "
                f"compacted, {sum(r[3] for r in run.rounds)} snapshots expired; round "
                f"p50 {statistics.median(secs):.2f} s, max {max(secs):.2f} s"
            )


if __name__ == "__main__":
    main()
