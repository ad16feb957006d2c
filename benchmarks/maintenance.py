"""A day of streaming into market.trades, with and without the Maintainer: files, manifests,
snapshots, commit latency and query latency over time, next to the same queries on a
freshly compacted copy of the same rows (the reference the Maintainer is held to).

The stream covers 30 hours of event time (day D-1 00:00 to day D 06:00) in --commits
commits of --rows trades each, like the writer's flushes (each carries k2 state for every
symbol). With the Maintainer, as in the daemon: a full round (compaction of closed
partitions, manifest merge, expiry with thinning; retention and orphan sweep off) every
simulated hour, and between rounds, every --open-minutes of simulated time, expiry and the
size-tiered compaction of the partitions still open; day D-1 closes at D 01:00. Snapshot
ages are wall-clock, so the snapshot settings are scaled: "full history" is the wall time of
the last simulated hour and the thinning interval the wall time of one simulated hour; and
open_file_age is 0 (every committed file has settled).

Queries find their files as the daemon does (--planner index: the QueryPool's file index,
planned once per checkpoint, picks files by per-symbol time range; or --planner pyiceberg:
a pyiceberg scan planned per query) and DuckDB runs them over those Parquet files:
  (a) window: one symbol, a random 10-minute window of the data so far;
  (b) ohlcv:  one symbol, 1-minute OHLCV over the whole of day D-1 (the part streamed so far).
At each checkpoint the same queries run on the reference: the rows so far, sorted as
compaction sorts them, committed at once into a fresh table (one file per partition).

    python benchmarks/maintenance.py --commits 1500 --rows 2000
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pyarrow as pa

from k2d.config import MaintenanceConfig, StorageConfig
from k2d.messages import Watermark
from k2d.query import FileIndex
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
class Latency:
    window_p50: float
    window_p99: float
    ohlcv_p50: float
    ohlcv_p99: float
    ohlcv_files: int


@dataclass
class Checkpoint:
    sim_hour: float
    files: int
    manifests: int
    snapshots: int
    commit_p50: float
    commit_p99: float
    refresh: float
    q: Latency
    ref: Latency | None


@dataclass
class Run:
    label: str
    checkpoints: list[Checkpoint] = field(default_factory=list)
    rounds: list[tuple[float, float, int, int]] = field(default_factory=list)
    wall: float = 0.0


@dataclass(frozen=True)
class Queries:
    """The sampled queries of one checkpoint, run alike on the table and the reference."""

    windows: list[tuple[str, int, int]]
    ohlcv: list[tuple[str, int, int]]


def draw(rng: random.Random, start_us: int, now_us: int, samples: tuple[int, int]) -> Queries:
    windows = []
    for _ in range(samples[0]):
        lo = rng.randrange(start_us, max(start_us + 1, now_us - 600_000_000))
        windows.append((rng.choice(SYMBOLS), lo, lo + 600_000_000))
    day_hi = min(now_us, start_us + DAY_US)
    ohlcv = [(rng.choice(SYMBOLS), start_us, day_hi) for _ in range(samples[1])]
    return Queries(windows, ohlcv)


Paths = Callable[[str, int, int], list[str]]


def index_paths(wh: Warehouse, con: duckdb.DuckDBPyConnection) -> Paths:
    """The daemon's way: the QueryPool's file index, planned once per snapshot, picks the
    files whose per-symbol time ranges meet the window."""
    index = FileIndex(wh, 4)
    index.bootstrap(con)
    files = index.current(TRADES)

    def paths(symbol: str, lo: int, hi: int) -> list[str]:
        return [e.path for e in files.select(lo, hi, keys={("BINANCE", symbol)})]

    return paths


def pyiceberg_paths(wh: Warehouse, con: duckdb.DuckDBPyConnection) -> Paths:
    """A generic Iceberg reader's way: pyiceberg plans every query (manifests included)."""
    table = wh.load_table(TRADES)

    def paths(symbol: str, lo: int, hi: int) -> list[str]:
        flt = f"symbol = '{symbol}' AND timestamp >= '{iso(lo)}' AND timestamp < '{iso(hi)}'"
        return [t.file.file_path.removeprefix("file://") for t in table.scan(flt).plan_files()]

    return paths


PLANNERS = {"index": index_paths, "pyiceberg": pyiceberg_paths}


def window_query(plan: Paths, con: duckdb.DuckDBPyConnection, q: tuple[str, int, int]) -> float:
    symbol, lo, hi = q
    t0 = time.perf_counter()
    paths = plan(symbol, lo, hi)
    if paths:
        con.execute(
            "SELECT count(*), sum(quantity), min(price), max(price) FROM read_parquet($1) "
            "WHERE symbol = $2 AND timestamp >= make_timestamptz($3) "
            "AND timestamp < make_timestamptz($4)",
            [paths, symbol, lo, hi],
        ).fetchall()
    return time.perf_counter() - t0


def ohlcv_query(
    plan: Paths, con: duckdb.DuckDBPyConnection, q: tuple[str, int, int]
) -> tuple[float, int]:
    symbol, lo, hi = q
    t0 = time.perf_counter()
    paths = plan(symbol, lo, hi)
    con.execute(
        "SELECT time_bucket(INTERVAL 1 minute, timestamp) AS minute, "
        "arg_min(price, timestamp), max(price), min(price), arg_max(price, timestamp), "
        "sum(quantity) FROM read_parquet($1) "
        "WHERE symbol = $2 AND timestamp >= make_timestamptz($3) "
        "AND timestamp < make_timestamptz($4) GROUP BY minute ORDER BY minute",
        [paths, symbol, lo, hi],
    ).fetchall()
    return time.perf_counter() - t0, len(paths)


def measure(
    warehouses: list[Warehouse], con: duckdb.DuckDBPyConnection, queries: Queries, planner: str
) -> tuple[float, list[Latency]]:
    """(first table's planning seconds, latencies per warehouse). Each query runs on every
    table in turn, so that a hiccup of the machine does not favour one of them."""
    t0 = time.perf_counter()
    plans = [PLANNERS[planner](wh, con) for wh in warehouses[:1]]
    refresh = time.perf_counter() - t0
    plans += [PLANNERS[planner](wh, con) for wh in warehouses[1:]]
    # The collector's full passes over this process's heap (the stream generator, pyiceberg
    # metadata) pause it for 50-100 ms at random: they would decide every p99 here, for
    # whichever table they hit. They are held off while timing, and run in between.
    gc.collect()
    gc.disable()
    try:
        return refresh, _measure(plans, con, queries)
    finally:
        gc.enable()


def _measure(plans: list[Paths], con: duckdb.DuckDBPyConnection, queries: Queries) -> list[Latency]:
    window: list[list[float]] = [[] for _ in plans]
    ohlcv: list[list[float]] = [[] for _ in plans]
    files = [0 for _ in plans]
    for plan in plans:  # warm: the first read of a file's footer is not what we measure
        window_query(plan, con, queries.windows[0])
        ohlcv_query(plan, con, queries.ohlcv[0])
    for q in queries.windows:
        for i, plan in enumerate(plans):
            window[i].append(window_query(plan, con, q))
    for q in queries.ohlcv:
        for i, plan in enumerate(plans):
            seconds, files[i] = ohlcv_query(plan, con, q)
            ohlcv[i].append(seconds)
    return [
        Latency(p(w, 0.5), p(w, 0.99), p(o, 0.5), p(o, 0.99), n)
        for w, o, n in zip(window, ohlcv, files, strict=True)
    ]


def reference(wh: Warehouse, workdir: Path, n: int) -> Warehouse:
    """A fresh table holding the rows of `wh` sorted as compaction sorts them, in one commit."""
    rows = wh.load_table(TRADES).scan().to_arrow()
    rows = rows.sort_by([("symbol", "ascending"), ("timestamp", "ascending")])
    ref = Warehouse(StorageConfig(data_dir=str(workdir / f"reference-{n}")))
    ref.ensure_tables()
    ref.append(TRADES, rows.cast(TABLES[TRADES].arrow_schema), {})
    return ref


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
    open_every = max(1, round(per_hour * args.open_minutes / 60))
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
                run.rounds.append(maintenance_round(wh, hour_walls, sim_now, hour, full=True))
        elif maintain and (k + 1) % open_every == 0:
            maintenance_round(wh, hour_walls, sim_now, hour, full=False)
        if (k + 1) % checkpoint_every == 0 or k + 1 == args.commits:
            queries = draw(rng, start_us, sim_now, (args.window_samples, args.ohlcv_samples))
            ref = None
            if maintain:
                with reference(wh, workdir, k) as fresh:
                    refresh, (q, ref) = measure([wh, fresh], con, queries, args.planner)
                shutil.rmtree(workdir / f"reference-{k}")
            else:
                refresh, (q,) = measure([wh], con, queries, args.planner)
            stats = TableMaintenance(wh, MaintenanceConfig()).stats(TRADES)
            cp = Checkpoint(
                sim_hour=(sim_now - start_us) / HOUR_US,
                files=stats.data_files,
                manifests=stats.manifests,
                snapshots=stats.snapshots,
                commit_p50=p(latencies, 0.5),
                commit_p99=p(latencies, 0.99),
                refresh=refresh,
                q=q,
                ref=ref,
            )
            run.checkpoints.append(cp)
            latencies = []
            print(f"  [{run.label}] {row(cp)}", flush=True)
    run.wall = time.perf_counter() - began
    wh.close()
    return run


def maintenance_round(
    wh: Warehouse, hour_walls: list[float], sim_now: int, hour: int, *, full: bool
) -> tuple[float, float, int, int]:
    """A Maintainer round at simulated time `sim_now`: full (closed partitions, manifests,
    expiry, and open partitions' tiers) or between rounds (open tiers and expiry).
    Returns (hour, seconds, partitions compacted, snapshots expired)."""
    wall_hour = (hour_walls[-1] - hour_walls[0]) / max(1, len(hour_walls) - 1)
    full_history = hour_walls[-1] - hour_walls[-2] if len(hour_walls) > 1 else wall_hour
    cfg = msgspec.convert(
        {
            "snapshot_full_history": full_history,
            "snapshot_thin_interval": wall_hour,
            "orphan_file_age": 0.0,
            "open_file_age": 0.0,
        },
        MaintenanceConfig,
    )
    # A day is closed once it ended closed_partition_age (1 h) ago in event time.
    closed_until = (sim_now - HOUR_US) // DAY_US
    before = date(1970, 1, 1) + timedelta(days=closed_until)
    t0 = time.perf_counter()
    report = TableMaintenance(wh, cfg).run(
        [TRADES], before=before, compact=full, compact_open=True, sweep_orphans=full
    )
    seconds = time.perf_counter() - t0
    assert not report.errors, report.errors
    expired = sum(e.snapshots_expired for e in report.expiries)
    return hour, seconds, len(report.compactions), expired


def row(cp: Checkpoint) -> str:
    ms = 1000
    q = cp.q
    text = (
        f"h{cp.sim_hour:5.1f} files {cp.files:5d} manifests {cp.manifests:4d} "
        f"snapshots {cp.snapshots:5d} | commit p50 {cp.commit_p50 * ms:5.0f} "
        f"p99 {cp.commit_p99 * ms:5.0f} ms | plan {cp.refresh * ms:4.0f} ms | "
        f"window p50 {q.window_p50 * ms:4.0f} p99 {q.window_p99 * ms:4.0f} ms | "
        f"ohlcv p50 {q.ohlcv_p50 * ms:4.0f} p99 {q.ohlcv_p99 * ms:4.0f} ms "
        f"({q.ohlcv_files} files)"
    )
    if cp.ref is not None:
        r = cp.ref
        text += (
            f" | compacted: window p99 {r.window_p99 * ms:4.0f} ms "
            f"(x{q.window_p99 / r.window_p99:.2f}), ohlcv p99 {r.ohlcv_p99 * ms:4.0f} ms "
            f"(x{q.ohlcv_p99 / r.ohlcv_p99:.2f})"
        )
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commits", type=int, default=1_500, help="commits over the 30 h")
    ap.add_argument("--rows", type=int, default=2_000, help="trades per commit")
    ap.add_argument("--checkpoint-hours", type=float, default=3.0)
    ap.add_argument(
        "--open-minutes",
        type=float,
        default=10.0,
        help="simulated minutes between the Maintainer's between-rounds work",
    )
    ap.add_argument("--window-samples", type=int, default=100)
    ap.add_argument("--ohlcv-samples", type=int, default=30)
    ap.add_argument("--only", choices=["with", "without"], default=None)
    ap.add_argument(
        "--planner",
        choices=sorted(PLANNERS),
        default="index",
        help="how a query finds its files: the daemon's file index, or pyiceberg per query",
    )
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
                f"  full rounds: {len(run.rounds)}, {sum(r[2] for r in run.rounds)} partitions "
                f"compacted, {sum(r[3] for r in run.rounds)} snapshots expired; round "
                f"p50 {statistics.median(secs):.2f} s, max {max(secs):.2f} s"
            )
        worst = [
            (cp.q.window_p99 / cp.ref.window_p99, cp.q.ohlcv_p99 / cp.ref.ohlcv_p99)
            for cp in run.checkpoints
            if cp.ref is not None
        ]
        if worst:
            window, ohlcv = max(w for w, _ in worst), max(o for _, o in worst)
            print(
                f"  worst p99 vs the freshly compacted table: window x{window:.2f}, "
                f"ohlcv x{ohlcv:.2f} (target: at most x1.5 throughout)"
            )


if __name__ == "__main__":
    main()
