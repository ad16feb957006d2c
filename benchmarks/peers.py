"""k2d beside its peers, on the same generated data in one run; writes BENCHMARKS.md.

  capture   k2d's pipeline (parse, sequence check, commit; the in-process path that
            benchmarks/ingest.py measures) on Binance combined-stream trade frames, vs
            cryptofeed's Binance handler (its message_handler driven directly, no network)
            feeding ArcticDB appends, vs msgspec decode alone (the ceiling)
  storage   Warehouse.append of Arrow tables (as the IcebergWriter commits them) vs
            ArcticDB append (LMDB) vs one pyarrow.parquet write (the floor)
  queries   one symbol's 10-minute window and one day of 1-minute OHLCV with VWAP: k2d over
            HTTP and in-process, ArcticDB (date_range, QueryBuilder resample), DuckDB on one
            sorted Parquet file; median and p99 over --runs runs. k2d's server is timed
            once it has computed the newest files' minute bars ahead of requests, as a
            daemon that has run a while has them; one more row gives the first ask of a
            day whose bars were not computed ahead
  commits   the same queries after the day arrived in --commits small appends, and again
            after a compaction round (k2d: TableMaintenance; ArcticDB: compact_data)

The peers come from the optional extra: pip install -e '.[peers]'. A peer that is not
installed gets "not installed: <why>" in its rows; nothing is estimated. Prints figures and
the machine; never fails on a timing. Only 127.0.0.1 is used.

    python benchmarks/peers.py                   # 2M trades, 20 symbols, writes BENCHMARKS.md
    python benchmarks/peers.py --trades 200000 --out /tmp/peers.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import itertools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import anyio
import duckdb
import ingest
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import query

from k2d.config import MaintenanceConfig, QueryConfig, StorageConfig, load_config
from k2d.storage import ROW_GROUP_ROWS, TRADES, TableMaintenance, Warehouse, flush_properties

HERE = Path(__file__).resolve().parent
# The hot tier of the rows that hold the whole day in memory (2M trades take ~330 MB).
HOT_BYTES = 1 << 30
HOT_LABEL = "the day held in memory (query.hot_bytes 1 GiB)"
MS = 1_000.0


# -- the peers, if installed ------------------------------------------------------------------


def missing(module: str) -> str | None:
    """None if `module` imports here, else why not (shown in the rows instead of a figure)."""
    try:
        __import__(module)
    except Exception as exc:
        return f"not installed: {type(exc).__name__}: {exc}"
    return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in (
        "k2d",
        "pyarrow",
        "pyiceberg",
        "duckdb",
        "msgspec",
        "litestar",
        "arcticdb",
        "cryptofeed",
        "pandas",
        "numpy",
    ):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for ln in f:
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    ram = "unknown"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for ln in f:
            if ln.startswith("MemTotal"):
                ram = f"{int(ln.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": ram,
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the data -----------------------------------------------------------------------------------


def capture_symbols(n: int) -> list[str]:
    return [f"SYM{i}USDT" for i in range(n)]


def day_table(trades: int, symbols: int) -> pa.Table:
    """One day of `trades` trades over `symbols` symbols (query.py's generator), sorted by
    (symbol, timestamp) as it comes out of it."""
    per = trades // symbols
    return pa.concat_tables(query.symbol_day(s, 0, per, 1) for s in query.symbols_of(symbols))


def time_slices(table: pa.Table, parts: int) -> list[pa.Table]:
    """The day as a stream delivers it: in time order, cut into `parts` appends."""
    ordered = table.sort_by("timestamp")
    step = -(-ordered.num_rows // parts)
    return [ordered.slice(k * step, step) for k in range(parts) if k * step < ordered.num_rows]


def arctic_frames(table: pa.Table) -> dict[str, Any]:
    """Per-symbol pandas frames, ArcticDB's input: timestamp index; decimals as float64
    (ArcticDB has no decimal type); the list column trade_conditions (no list type) and the
    all-null vendor_data dropped."""
    cols = [
        c
        for c in table.column_names
        if c != "trade_conditions" and table[c].null_count < table.num_rows
    ]
    t = table.select(cols)
    for name in ("price", "quantity"):
        t = t.set_column(t.column_names.index(name), name, pc.cast(t[name], pa.float64()))
    out = {}
    for sym in pc.unique(t["symbol"]).to_pylist():
        df = t.filter(pc.equal(t["symbol"], sym)).to_pandas()
        out[sym] = df.set_index("timestamp")
    return out


def open_arctic(path: Path) -> Any:
    import arcticdb

    ac = arcticdb.Arctic(f"lmdb://{path}?map_size=8GB")
    return ac.get_library("trades", create_if_missing=True)


# -- capture (each measured in its own process: peak RSS is its own) ---------------------------


def part_capture_k2d(
    args: argparse.Namespace, work: Path, *, frame_at_a_time: bool = True
) -> dict[str, Any]:
    """One frame a parser call, as frames come off a socket (and as cryptofeed's handler
    takes them), unless not `frame_at_a_time`: a batch's frames a call, as the FeedHandler
    replays its journal."""
    cfg = load_config(
        environ={},
        overrides={
            "storage": {"data_dir": str(work / "capture-k2d")},
            "feeds": {"binance": {"enabled": False}},
            "telemetry": {"log_level": "WARNING"},
            # As benchmarks/ingest.py: the live hub at its default bound, maintenance off.
            "writer": {"flush_rows": args.flush_rows},
            "maintenance": {"enabled": False},
        },
    )
    symbols = capture_symbols(args.symbols)
    res = anyio.run(
        ingest.run_pipeline, cfg, work / "frames.bin", symbols, 1e9, None, frame_at_a_time
    )
    shutil.rmtree(work / "capture-k2d", ignore_errors=True)
    return {
        "rows": res["trades_committed"],
        "seconds": res["seconds"],
        "rate": res["trades_per_s"],
        "cpu": res["cpu_share"],
        "rss": res["peak_rss_mb"],
        "note": f"{res['commits']} commits",
    }


def part_capture_k2d_batched(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    return part_capture_k2d(args, work, frame_at_a_time=False)


def aggtrade_frames(path: Path) -> Iterator[bytes]:
    """The same frames as the @aggTrade stream, the only Binance trade stream cryptofeed's
    handler parses ('e' is 'aggTrade', the id is 'a'); same bytes otherwise."""
    for f in itertools.chain.from_iterable(ingest.read_frames(path)):
        yield (
            f.replace(b'@trade"', b'@aggTrade"', 1)
            .replace(b'"e":"trade"', b'"e":"aggTrade"', 1)
            .replace(b',"t":', b',"a":', 1)
        )


def part_capture_cryptofeed(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import pandas as pd
    from arcticdb import WritePayload
    from cryptofeed.defines import TRADES as CF_TRADES
    from cryptofeed.exchanges import Binance
    from cryptofeed.symbols import Symbols

    symbols = capture_symbols(args.symbols)
    # Binance's exchangeInfo, for our symbols, as cryptofeed would fetch it at start-up.
    info = {
        "symbols": [
            {
                "symbol": s,
                "baseAsset": s[:-4],
                "quoteAsset": "USDT",
                "status": "TRADING",
                "filters": [{"tickSize": "0.00000001"}],
            }
            for s in symbols
        ]
    }
    mapping, extra = Binance._parse_symbol_data(info)
    Symbols.set(Binance.id, mapping, extra)
    frames = list(aggtrade_frames(work / "frames.bin"))
    lib = open_arctic(work / "capture-arctic")
    cols: dict[str, list[Any]] = {
        k: [] for k in ("symbol", "side", "amount", "price", "id", "timestamp", "receipt_timestamp")
    }
    appended = 0

    async def on_trade(t: Any, receipt: float) -> None:
        # What cryptofeed's backends take from a Trade (numeric_type=float, as they do).
        cols["symbol"].append(t.symbol)
        cols["side"].append(t.side)
        cols["amount"].append(float(t.amount))
        cols["price"].append(float(t.price))
        cols["id"].append(t.id)
        cols["timestamp"].append(t.timestamp)
        cols["receipt_timestamp"].append(receipt)

    def flush() -> None:
        # One append per symbol per flush (every --flush-rows trades, as k2d's writer).
        nonlocal appended
        df = pd.DataFrame(cols)
        df.index = pd.to_datetime(df.pop("timestamp"), unit="s", utc=True)
        payloads = [WritePayload(str(s), g.drop(columns="symbol")) for s, g in df.groupby("symbol")]
        lib.append_batch(payloads)
        appended += len(df)
        for v in cols.values():
            v.clear()

    feed = Binance(
        symbols=[f"{s[:-4]}-USDT" for s in symbols],
        channels=[CF_TRADES],
        callbacks={CF_TRADES: on_trade},
    )

    async def drive() -> None:
        handler = feed.message_handler
        for f in frames:
            await handler(f, None, time.time())
            if len(cols["id"]) >= args.flush_rows:
                flush()
        if cols["id"]:
            flush()

    cpu0, t0 = os.times(), time.perf_counter()
    asyncio.run(drive())
    elapsed = time.perf_counter() - t0
    cpu1 = os.times()
    stored = sum(lib.get_description(s).row_count for s in lib.list_symbols())
    shutil.rmtree(work / "capture-arctic", ignore_errors=True)
    return {
        "rows": stored,
        "seconds": elapsed,
        "rate": appended / elapsed,
        "cpu": ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / elapsed,
        "rss": peak_rss_mb(),
        "note": f"{appended:,} trades appended in batches of {args.flush_rows:,}; "
        "no sequence check",
    }


def part_capture_ceiling(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rate = ingest.decode_ceiling(work / "frames.bin", args.trades)
    return {
        "rows": args.trades,
        "seconds": args.trades / rate,
        "rate": rate,
        "cpu": 1.0,
        "rss": peak_rss_mb(),
        "note": "decode into typed Structs, no storage",
    }


# -- storage ----------------------------------------------------------------------------------


def part_storage_k2d(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    data = day_table(args.trades, args.symbols)
    slices = time_slices(data, max(1, -(-data.num_rows // args.flush_rows)))
    out: dict[str, Any] = {}
    # Warm-up: the first append in a process pays imports and metadata set-up; not measured.
    with Warehouse(StorageConfig(data_dir=str(work / "storage-k2d-warm"))) as wh:
        wh.ensure_tables()
        wh.append(TRADES, data.slice(0, 1_000), {})
    shutil.rmtree(work / "storage-k2d-warm", ignore_errors=True)
    for label, parts in (("flushes", slices), ("one", [data])):
        root = work / f"storage-k2d-{label}"
        wh = Warehouse(StorageConfig(data_dir=str(root)))
        wh.ensure_tables()
        commits = []
        t0 = time.perf_counter()
        for k, part in enumerate(parts):
            props = flush_properties(
                flush=k + 1, tables=[TRADES], watermarks={}, log_position={}, batch_ids=[k + 1]
            )
            c0 = time.perf_counter()
            wh.append(TRADES, part, props)
            commits.append(time.perf_counter() - c0)
        elapsed = time.perf_counter() - t0
        wh.close()
        out[label] = {
            "rows": data.num_rows,
            "seconds": elapsed,
            "appends": len(parts),
            "append_median_ms": statistics.median(commits) * MS,
        }
        shutil.rmtree(root, ignore_errors=True)
    out["rss"] = peak_rss_mb()
    return out


def part_storage_arcticdb(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from arcticdb import WritePayload

    data = day_table(args.trades, args.symbols)
    parts = time_slices(data, max(1, -(-data.num_rows // args.flush_rows)))
    out: dict[str, Any] = {}
    warm = open_arctic(work / "storage-arctic-warm")  # as for k2d: the first append, unmeasured
    warm_frames = arctic_frames(data.slice(0, 1_000))
    warm.append_batch([WritePayload(s, df) for s, df in warm_frames.items()])
    del warm
    shutil.rmtree(work / "storage-arctic-warm", ignore_errors=True)
    for label, pieces in (("flushes", parts), ("one", [data])):
        # pandas frames built before the clock starts: ArcticDB's own input format.
        frames = [arctic_frames(p) for p in pieces]
        root = work / f"storage-arctic-{label}"
        lib = open_arctic(root)
        appends = []
        t0 = time.perf_counter()
        for per_symbol in frames:
            a0 = time.perf_counter()
            lib.append_batch([WritePayload(s, df) for s, df in per_symbol.items()])
            appends.append(time.perf_counter() - a0)
        elapsed = time.perf_counter() - t0
        out[label] = {
            "rows": data.num_rows,
            "seconds": elapsed,
            "appends": len(pieces),
            "append_median_ms": statistics.median(appends) * MS,
        }
        del lib
        shutil.rmtree(root, ignore_errors=True)
    out["rss"] = peak_rss_mb()
    return out


def part_storage_parquet(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    data = day_table(args.trades, args.symbols)
    path = work / "floor.parquet"
    t0 = time.perf_counter()
    pq.write_table(data, path, row_group_size=ROW_GROUP_ROWS)
    elapsed = time.perf_counter() - t0
    size = path.stat().st_size
    path.unlink()
    return {
        "one": {
            "rows": data.num_rows,
            "seconds": elapsed,
            "appends": 1,
            "append_median_ms": elapsed * MS,
            "bytes": size,
        },
        "rss": peak_rss_mb(),
    }


PARTS: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "capture-k2d": part_capture_k2d,
    "capture-k2d-batched": part_capture_k2d_batched,
    "capture-cryptofeed": part_capture_cryptofeed,
    "capture-ceiling": part_capture_ceiling,
    "storage-k2d": part_storage_k2d,
    "storage-arcticdb": part_storage_arcticdb,
    "storage-parquet": part_storage_parquet,
}
NEEDS = {
    "capture-cryptofeed": ("cryptofeed", "arcticdb", "pandas"),
    "storage-arcticdb": ("arcticdb", "pandas"),
}


def run_part(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Runs one part in a child process (its own peak RSS, nothing left over in the heap)."""
    for module in NEEDS.get(name, ()):
        if (why := missing(module)) is not None:
            return {"error": why}
    cmd = [
        sys.executable,
        __file__,
        "--part",
        name,
        "--work",
        str(work),
        "--trades",
        str(args.trades),
        "--symbols",
        str(args.symbols),
        "--flush-rows",
        str(args.flush_rows),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"error": f"failed: {tail[0][:200]}"}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# -- queries ----------------------------------------------------------------------------------


def stats(ms: list[float]) -> dict[str, float]:
    return {"median": statistics.median(ms), "p99": query.pct(ms, 0.99), "n": len(ms)}


def timed(
    fn: Callable[[tuple[str, int, int]], int], draws: list[tuple[str, int, int]], warmup: int
) -> tuple[list[float], int]:
    """Milliseconds per call over `draws` (the first `warmup` not kept); rows of the last.
    The collector is held off while timing, as benchmarks/maintenance.py does."""
    out, rows = [], 0
    gc.collect()
    gc.disable()
    try:
        for i, d in enumerate(draws):
            t0 = time.perf_counter()
            rows = fn(d)
            if i >= warmup:
                out.append((time.perf_counter() - t0) * MS)
    finally:
        gc.enable()
    return out, rows


def draws(kind: str, args: argparse.Namespace, seed: int) -> list[tuple[str, int, int]]:
    w = query.Workload(1, args.symbols, seed=seed)
    make = w.trades if kind == "window" else w.ohlcv
    return [make() for _ in range(args.warmup + args.runs)]


class Server:
    """The daemon's QueryPool and API in a child process, as benchmarks/query.py runs them;
    `hot_bytes`: its query.hot_bytes (None: the daemon's default)."""

    def __init__(self, data_dir: Path, hot_bytes: int | None = None) -> None:
        extra = [] if hot_bytes is None else ["--hot-bytes", str(hot_bytes)]
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "query.py"), "--serve", str(data_dir), *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.base = f"http://127.0.0.1:{int(self.proc.stdout.readline())}"
        # As on a daemon that has run a while: the newest files' minute bars computed and
        # the hot tier loaded.
        self.ahead = anyio.run(query.worked_ahead, self.base)
        self.held_mb, self.held_files = anyio.run(query.hot_held, self.base)

    def note(self, label: str) -> str:
        return (
            f"k2d ({label}): ahead of requests, the server computed the minute bars due and "
            f"loaded {self.held_mb:,.0f} MB of data files ({self.held_files} files) into its "
            f"hot tier in {self.ahead:.1f} s after it started; the HTTP clients began after that"
        )

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def k2d_http(server: Server, kind: str, d: list[tuple[str, int, int]], warmup: int) -> list[float]:
    it = iter(d)
    url = query.trades_url if kind == "window" else query.ohlcv_url
    ms, errors, _ = anyio.run(
        query.http_runs, server.base, lambda: url(*next(it)), len(d) - warmup, warmup
    )
    if errors:
        print(f"    {errors} HTTP errors")
    return ms


def first_asks(
    d: list[tuple[str, int, int]], warmup: int, ms: list[float]
) -> tuple[list[float], list[float]]:
    """The timed `ms` of draws `d` (after `warmup`), split: first asks, then asked before."""
    seen = set(d[:warmup])
    first, later = [], []
    for draw, took in zip(d[warmup:], ms, strict=True):
        (later if draw in seen else first).append(took)
        seen.add(draw)
    return first, later


def k2d_inprocess(
    storage: StorageConfig,
    kind: str,
    d: list[tuple[str, int, int]],
    warmup: int,
    cfg: QueryConfig | None = None,
) -> list[float]:
    it = iter(d)
    cfg = cfg or QueryConfig()
    if kind == "window":
        return query.in_process(
            storage, cfg, lambda: query.trades_plan(*next(it)), len(d) - warmup, warmup
        )
    return query.in_process(
        storage,
        cfg,
        lambda: query.ohlcv_plan(*next(it), use_bars=True),
        len(d) - warmup,
        warmup,
    )


def arctic_query(lib: Any, kind: str) -> Callable[[tuple[str, int, int]], int]:
    import pandas as pd
    from arcticdb import QueryBuilder

    def ts(us: int) -> Any:
        return pd.Timestamp(us, unit="us", tz="UTC")

    def window(d: tuple[str, int, int]) -> int:
        sym, lo, hi = d
        # date_range is inclusive at both ends; the window is [lo, hi).
        return len(lib.read(sym, date_range=(ts(lo), ts(hi - 1))).data)

    def ohlcv(d: tuple[str, int, int]) -> int:
        sym, lo, hi = d
        q = QueryBuilder()
        q = q.apply("notional", q["price"] * q["quantity"])
        q = q.resample("1min").agg(
            {
                "open": ("price", "first"),
                "high": ("price", "max"),
                "low": ("price", "min"),
                "close": ("price", "last"),
                "volume": ("quantity", "sum"),
                "notional": ("notional", "sum"),
                "trades": ("price", "count"),
            }
        )
        df = lib.read(sym, date_range=(ts(lo), ts(hi - 1)), query_builder=q).data
        df["vwap"] = df["notional"] / df["volume"]
        return len(df)

    return window if kind == "window" else ohlcv


WINDOW_SQL = (
    "SELECT * FROM read_parquet($files) WHERE symbol = $sym AND exchange = 'BINANCE' "
    "AND timestamp >= make_timestamptz($lo) AND timestamp < make_timestamptz($hi) "
    "ORDER BY timestamp, source_sequence LIMIT 1001"
)
OHLCV_SQL = (
    "SELECT time_bucket(INTERVAL 1 minute, timestamp) AS minute, "
    "arg_min(price, timestamp) AS open, max(price) AS high, min(price) AS low, "
    "arg_max(price, timestamp) AS close, sum(quantity) AS volume, "
    "sum(price::DECIMAL(38, 8) * quantity) / sum(quantity) AS vwap, count(*) AS trades "
    "FROM read_parquet($files) WHERE symbol = $sym AND exchange = 'BINANCE' "
    "AND timestamp >= make_timestamptz($lo) AND timestamp < make_timestamptz($hi) "
    "GROUP BY minute ORDER BY minute LIMIT 1441"
)


def duckdb_query(files: list[str], kind: str) -> Callable[[tuple[str, int, int]], int]:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    sql = WINDOW_SQL if kind == "window" else OHLCV_SQL

    def run(d: tuple[str, int, int]) -> int:
        sym, lo, hi = d
        con.execute(sql, {"files": files, "sym": sym, "lo": lo, "hi": hi})
        reader = con.to_arrow_reader(8_192)
        return int(reader.read_all().num_rows)

    return run


Row = dict[str, Any]


def query_rows(
    label: str,
    args: argparse.Namespace,
    storage: StorageConfig,
    arctic: Any,
    duck_files: dict[str, list[str]],
    notes: list[str],
) -> list[Row]:
    """Every engine on the same draws; one row per (query, engine)."""
    rows: list[Row] = []
    server = Server(Path(storage.data_dir))
    notes.append(server.note(label))
    print(f"  {notes[-1]}")
    try:
        for kind, seed in (("window", 7), ("ohlcv", 11)):
            d = draws(kind, args, seed)
            name = "10-minute window" if kind == "window" else "1-day 1-minute OHLCV + VWAP"

            def add(
                engine: str,
                ms: list[float] | None,
                rows_out: int | None = None,
                why: str = "",
                kind: str = kind,
                name: str = name,
            ) -> None:
                row = {"section": label, "query": name, "kind": kind, "engine": engine}
                if ms is None:
                    row["error"] = why
                    print(f"  {name:<28} {engine:<44} {why}")
                else:
                    row |= stats(ms)
                    row["rows"] = "" if rows_out is None else rows_out
                    print(
                        f"  {name:<28} {engine:<44} median {row['median']:7.2f} ms   "
                        f"p99 {row['p99']:7.2f} ms   rows {row['rows']}"
                    )
                rows.append(row)

            http_ms = k2d_http(server, kind, d, args.warmup)
            add("k2d HTTP (JSON)", http_ms)
            if kind == "ohlcv":
                # The pool keeps each file's minute bars once computed (ahead of requests
                # here): the first ask of a symbol-day and the later ones, apart.
                first, later = first_asks(d, args.warmup, http_ms)
                if first:
                    add("k2d HTTP (JSON), first ask of a symbol-day", first)
                if later:
                    add("k2d HTTP (JSON), symbol-day asked before", later)
            add("k2d in-process (query layer)", k2d_inprocess(storage, kind, d, args.warmup))
            if kind == "window":
                # The day held in memory: the hot tier with room for it (off by default).
                roomy = Server(Path(storage.data_dir), HOT_BYTES)
                notes.append(roomy.note(f"{label}, {HOT_LABEL}"))
                print(f"  {notes[-1]}")
                try:
                    add(f"k2d HTTP (JSON), {HOT_LABEL}", k2d_http(roomy, kind, d, args.warmup))
                finally:
                    roomy.close()
                hot = QueryConfig(hot_bytes=HOT_BYTES)
                add(
                    f"k2d in-process, {HOT_LABEL}",
                    k2d_inprocess(storage, kind, d, args.warmup, hot),
                )
            if kind == "ohlcv":
                # A day whose bars were not computed ahead (older than minute_bars_ahead
                # covers): its first ask aggregates the trades.
                cold = k2d_inprocess(
                    storage, kind, d, args.warmup, QueryConfig(minute_bars_ahead=0)
                )
                first, _ = first_asks(d, args.warmup, cold)
                add("k2d in-process, first ask of a day without bars ahead", first)
            if isinstance(arctic, str):
                add("ArcticDB (LMDB)", None, why=arctic)
            else:
                ms, n = timed(arctic_query(arctic, kind), d, args.warmup)
                add("ArcticDB (LMDB)", ms, n)
            for engine, files in duck_files.items():
                ms, n = timed(duckdb_query(files, kind), d, args.warmup)
                add(engine, ms, n)
    finally:
        server.close()
    return rows


def build_arctic(path: Path, pieces: list[pa.Table]) -> Any:
    if (why := missing("arcticdb")) is not None:
        return why
    from arcticdb import WritePayload

    lib = open_arctic(path)
    for piece in pieces:
        lib.append_batch([WritePayload(s, df) for s, df in arctic_frames(piece).items()])
    return lib


def queries(args: argparse.Namespace, work: Path) -> tuple[list[Row], list[str]]:
    notes: list[str] = []
    data = day_table(args.trades, args.symbols)
    floor_file = work / "day-sorted.parquet"
    pq.write_table(data, floor_file, row_group_size=ROW_GROUP_ROWS)
    one = {"DuckDB, one sorted Parquet file": [str(floor_file)]}

    print("\nqueries: the day in one commit")
    storage = StorageConfig(data_dir=str(work / "q-whole"))
    query.build(storage, 1, args.symbols, args.trades - args.symbols, 0, 1)
    arctic = build_arctic(work / "q-arctic-whole", [data])
    rows = query_rows("whole", args, storage, arctic, one, notes)
    del arctic

    print(f"\nqueries: the day in {args.commits} commits")
    storage = StorageConfig(data_dir=str(work / "q-commits"))
    t0 = time.perf_counter()
    query.build(storage, 1, args.symbols, args.trades - args.symbols, 0, args.commits)
    notes.append(f"k2d: {args.commits} commits took {time.perf_counter() - t0:.1f} s")
    pieces = time_slices(data, args.commits)
    small = work / "small"
    small.mkdir()
    for k, piece in enumerate(pieces):
        pq.write_table(piece, small / f"{k:05d}.parquet")
    t0 = time.perf_counter()
    arctic = build_arctic(work / "q-arctic-commits", pieces)
    if not isinstance(arctic, str):
        notes.append(
            f"ArcticDB: {len(pieces)} append_batch calls took {time.perf_counter() - t0:.1f} s"
        )
    many = {
        f"DuckDB, {len(pieces)} Parquet files (one per commit)": sorted(
            str(p) for p in small.iterdir()
        ),
        "DuckDB, one sorted Parquet file (floor)": [str(floor_file)],
    }
    rows += query_rows("commits", args, storage, arctic, many, notes)

    print("\nqueries: after a compaction round")
    t0 = time.perf_counter()
    with Warehouse(storage) as wh:
        report = TableMaintenance(wh, MaintenanceConfig()).run([TRADES], expire=False)
    for c in report.compactions:
        notes.append(
            f"k2d Maintainer compaction: {c.files_before} files -> {c.files_after}, "
            f"{c.rows:,} rows, {time.perf_counter() - t0:.1f} s"
        )
    if not isinstance(arctic, str):
        t0 = time.perf_counter()
        for sym in arctic.list_symbols():
            arctic.compact_data(sym)
        notes.append(
            f"ArcticDB compact_data on {len(arctic.list_symbols())} symbols: "
            f"{time.perf_counter() - t0:.1f} s"
        )
    rows += query_rows("compacted", args, storage, arctic, many, notes)
    for n in notes:
        print(f"  {n}")
    return rows, notes


# -- the report -------------------------------------------------------------------------------


def fmt_rate(r: Row) -> str:
    return r.get("error") or f"{r['rate']:,.0f}"


def capture_table(res: dict[str, Row]) -> list[str]:
    k2d = res["k2d"]
    lines = [
        "| path | trades | seconds | trades/s | CPU (of one core) | peak RSS MB | "
        "k2d/this | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    names = {
        "k2d": "k2d pipeline (parse, sequence check, Iceberg commit), one frame a call",
        "k2d-batched": "k2d pipeline, a batch of frames a call (as the journal is replayed)",
        "cryptofeed": "cryptofeed Binance handler -> ArcticDB append (LMDB)",
        "ceiling": "msgspec decode alone (ceiling)",
    }
    for key, label in names.items():
        r = res[key]
        if "error" in r:
            lines.append(f"| {label} | | | {r['error']} | | | | |")
            continue
        ratio = f"{k2d['rate'] / r['rate']:.2f}" if "rate" in k2d and key[:3] != "k2d" else ""
        lines.append(
            f"| {label} | {r['rows']:,} | {r['seconds']:.1f} | {r['rate']:,.0f} | "
            f"{r['cpu']:.0%} | {r['rss']:.0f} | {ratio} | {r.get('note', '')} |"
        )
    return lines


def storage_table(res: dict[str, Row]) -> list[str]:
    lines = [
        "| writer | appends | rows | seconds | rows/s | median append ms | peak RSS MB | "
        "k2d/this (rows/s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = {
        "k2d": "k2d Warehouse.append (Iceberg)",
        "arcticdb": "ArcticDB append_batch (LMDB)",
        "parquet": "pyarrow.parquet.write_table (floor)",
    }
    k2d = res["k2d"]
    for label in ("flushes", "one"):
        for key, name in names.items():
            r = res[key]
            if "error" in r:
                lines.append(f"| {name} | | | | {r['error']} | | | |")
                continue
            if label not in r:
                continue
            x = r[label]
            rate = x["rows"] / x["seconds"]
            ratio = ""
            if key != "k2d" and "error" not in k2d:
                ratio = f"{(k2d[label]['rows'] / k2d[label]['seconds']) / rate:.2f}"
            lines.append(
                f"| {name} | {x['appends']} | {x['rows']:,} | {x['seconds']:.2f} | "
                f"{rate:,.0f} | {x['append_median_ms']:.1f} | {r['rss']:.0f} | {ratio} |"
            )
    return lines


def query_table(rows: list[Row], section: str) -> list[str]:
    lines = [
        "| query | engine | median ms | p99 ms | rows | k2d HTTP p99 / this | "
        "k2d in-process p99 / this |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for kind in ("window", "ohlcv"):
        sel = [r for r in rows if r["section"] == section and r["kind"] == kind]
        http = next(r for r in sel if r["engine"].startswith("k2d HTTP"))
        inproc = next(r for r in sel if r["engine"].startswith("k2d in-process"))
        for r in sel:
            if "error" in r:
                lines.append(f"| {r['query']} | {r['engine']} | {r['error']} | | | | |")
                continue
            a = "" if r is http else f"{http['p99'] / r['p99']:.2f}"
            b = "" if r is http or r is inproc else f"{inproc['p99'] / r['p99']:.2f}"
            lines.append(
                f"| {r['query']} | {r['engine']} | {r['median']:.2f} | {r['p99']:.2f} | "
                f"{r['rows']} | {a} | {b} |"
            )
    return lines


def verdicts(cap: dict[str, Row], sto: dict[str, Row], rows: list[Row]) -> list[str]:
    """Against the issue's target: k2d ahead of, or within 1.5x of, the best peer."""
    out = []

    def say(what: str, ratio: float, peer: str) -> None:
        state = (
            "ahead"
            if ratio <= 1.0
            else "within 1.5x"
            if ratio <= 1.5
            else "TRAILS (misses the 1.5x target)"
        )
        out.append(f"- {what}: k2d {ratio:.2f}x the time of {peer} -> {state}")

    if "error" not in cap["k2d"] and "error" not in cap["cryptofeed"]:
        say("capture", cap["cryptofeed"]["rate"] / cap["k2d"]["rate"], "cryptofeed -> ArcticDB")
    if "error" not in sto["k2d"] and "error" not in sto["arcticdb"]:
        for label in ("flushes", "one"):
            k, a = sto["k2d"][label], sto["arcticdb"][label]
            say(
                f"storage, {label} ({k['appends']} append(s))",
                k["seconds"] / a["seconds"],
                "ArcticDB",
            )
    for section in ("whole", "commits", "compacted"):
        for kind in ("window", "ohlcv"):
            sel = [
                r
                for r in rows
                if r["section"] == section and r["kind"] == kind and "error" not in r
            ]
            # After the day of commits, the one sorted file is the floor (the day written
            # whole), not a peer in the same state.
            peers = [
                r
                for r in sel
                if not r["engine"].startswith("k2d")
                and (section == "whole" or "one sorted" not in r["engine"])
            ]
            if not peers:
                continue
            best = min(peers, key=lambda r: r["p99"])
            for r in sel:
                if r["engine"].startswith("k2d"):
                    say(
                        f"{section}: {r['query']}, {r['engine']}, p99",
                        r["p99"] / best["p99"],
                        best["engine"],
                    )
    return out


def write_report(
    path: Path,
    args: argparse.Namespace,
    mach: dict[str, str],
    vers: dict[str, str],
    cap: dict[str, Row],
    sto: dict[str, Row],
    qrows: list[Row],
    notes: list[str],
    wall: float,
) -> None:
    lines = [
        "# k2d beside its peers",
        "",
        f"Written by `python benchmarks/peers.py --trades {args.trades}` "
        f"({args.symbols} symbols, {args.runs} runs per query, {args.commits} commits for the "
        f"day of commits) on {mach['date']}, {wall / 60:.1f} min wall. One run; absolute "
        "figures move about 3x between machines of this kind, the ratios less.",
        "",
        "## Machine",
        "",
        f"- CPU: {mach['cpu']}, {mach['cores']} cores (shared with other work: load "
        f"{mach['load']} at the start)",
        f"- RAM: {mach['ram']}; {mach['os']}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()),
        "",
        "## Capture",
        "",
        f"{args.trades:,} Binance combined-stream trade frames, {args.symbols} symbols, "
        f"contiguous ids (benchmarks/ingest.py's recorder). Commits / appends every "
        f"{args.flush_rows:,} trades. k2d/this: k2d's trades/s over this row's.",
        "",
        *capture_table(cap),
        "",
        "## Storage",
        "",
        f"One day of {args.trades:,} trades, {args.symbols} symbols (benchmarks/query.py's "
        "generator, all 16 columns; ArcticDB gets float64 prices and no list column, since it "
        "has neither decimals nor lists, as pandas frames built before the clock starts). "
        f"First in time-ordered appends of {args.flush_rows:,} rows as a writer flushes, then "
        "in one append. k2d/this: k2d's rows/s over this row's.",
        "",
        *storage_table(sto),
        "",
    ]
    titles = {
        "whole": "## Queries: the day in one commit",
        "commits": f"## Queries: the day in {args.commits} commits",
        "compacted": "## Queries: the same, after a compaction round",
    }
    for section, title in titles.items():
        lines += [title, "", *query_table(qrows, section), ""]
    lines += ["Build and maintenance of the query tables:", ""]
    lines += [f"- {n}" for n in notes]
    lines += ["", "## Against the target (k2d ahead of, or within 1.5x of, the best peer)", ""]
    lines += verdicts(cap, sto, qrows)
    lines += [""]
    text = "\n".join(lines) + "\n"
    if path.exists():
        old = path.read_text()
        marker = "<!-- analysis -->"
        if marker in old:
            text += old[old.index(marker) :]
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--trades", type=int, default=2_000_000)
    ap.add_argument("--symbols", type=int, default=20)
    ap.add_argument(
        "--flush-rows",
        type=int,
        default=250_000,
        help="k2d's writer flush size and the peers' append size",
    )
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--commits", type=int, default=500, help="appends of the day of commits")
    ap.add_argument("--out", type=Path, default=HERE.parent / "BENCHMARKS.md")
    ap.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        print(json.dumps(PARTS[args.part](args, args.work)))
        return

    began = time.perf_counter()
    mach, vers = machine(), versions()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in mach.items()))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    with tempfile.TemporaryDirectory(prefix="k2d-peers-") as tmp:
        work = Path(tmp)
        ingest.record_frames(work / "frames.bin", args.trades, capture_symbols(args.symbols))
        print(f"\ncapture: {args.trades:,} frames, {args.symbols} symbols")
        cap = {
            key: run_part(f"capture-{key}", args, work)
            for key in ("k2d", "k2d-batched", "cryptofeed", "ceiling")
        }
        for key, r in cap.items():
            print(
                f"  {key:<12} "
                + (
                    r.get("error")
                    or f"{r['rows']:,} trades in {r['seconds']:.1f}s = {r['rate']:,.0f}/s, "
                    f"CPU {r['cpu']:.0%}, peak RSS {r['rss']:.0f} MB; {r.get('note', '')}"
                )
            )
        (work / "frames.bin").unlink()

        print(f"\nstorage: {args.trades:,} rows")
        sto = {
            key: run_part(f"storage-{key}", args, work) for key in ("k2d", "arcticdb", "parquet")
        }
        for key, r in sto.items():
            if "error" in r:
                print(f"  {key:<12} {r['error']}")
                continue
            for label in ("flushes", "one"):
                if label in r:
                    x = r[label]
                    print(
                        f"  {key:<12} {x['appends']:4d} append(s): {x['seconds']:.2f}s = "
                        f"{x['rows'] / x['seconds']:,.0f} rows/s, median append "
                        f"{x['append_median_ms']:.1f} ms"
                    )
        qrows, notes = queries(args, work)
    wall = time.perf_counter() - began
    write_report(args.out, args, mach, vers, cap, sto, qrows, notes, wall)
    print("\n" + "\n".join(verdicts(cap, sto, qrows)))
    print(f"\nwrote {args.out} ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
