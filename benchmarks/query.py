"""Query latency through HTTP, next to the same SQL run by DuckDB directly (the floor).

Builds a trades table of --days days x --symbols symbols (10M+ rows by default) through
Warehouse.append, one big batch per day, then serves it with the QueryPool and the API in a
subprocess (so the HTTP client does not share a GIL with the server) and measures, each over
--runs runs with a random symbol and window:

  trades 10m   one symbol, a 10-minute window, JSON          (target p99 <= 20 ms)
  ohlcv 1m     one symbol, one day of 1-minute bars with VWAP (target p99 <= 40 ms)
  mixed x16    16 concurrent clients alternating both         (target: no errors, at least
               150 requests/s, p99 within 4x the single-client p99)

The 16 clients run twice. First each sends its next request as soon as it has the answer to
the last one: the most the server answers (requests/s); latency there is mostly waiting,
since 16 clients in a closed loop queue behind each other (mean latency = 16 / throughput,
Little's law). Then they offer --paced-requests requests at --paced-rate requests/s in all
(150, the target's rate) at random (Poisson) times: the latency a client sees when the
server carries that load, counted from when each request was due, so a backlog is not
hidden.

The floor runs the SQL the plan builds (same files, same parameters) on a DuckDB cursor with
the pool's settings, fetching all rows as Arrow; for OHLCV, the SQL that aggregates the
trades. The pool remembers each data file's minute bars once a request has aggregated them,
and computes the newest files' bars ahead of requests (`query.minute_bars_ahead`; the
clients start once it has, as they would on a daemon that has run a while), so OHLCV over
HTTP is printed whole, then for the first ask of a symbol-day and for later asks apart.
"DuckDB tables" runs that SQL on the same files loaded into DuckDB's own tables first:
what a hot tier inside the engine could save, beside the memory it would hold. The server
holds the newest data files in memory as Arrow (`query.hot_bytes`, --hot-bytes; the clients
start once it has loaded them), and answers a window over files all held from there. Under
16 clients the server's CPU per request is split between the query workers and the event loop, with
the client's own CPU beside it: on a box of a few cores the clients and the server share,
that is the throughput's ceiling.

With --commits N the last day arrives in N commits, as the writer streams it, and its
queries are measured before and after the Maintainer's compaction of that day (target: flat,
as on the days written whole). Prints figures, with the server's CPU time per request beside
the HTTP ones (steadier than latency on a shared box); never fails on a timing.

    python benchmarks/query.py
    python benchmarks/query.py --data-dir /tmp/k2d-bench --keep   # reuse the table next time
    python benchmarks/query.py --commits 200                      # a day of commits too
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Collection, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

# k2d before pyarrow: importing k2d chooses Arrow's memory pool (k2d.allocators), which
# pyarrow reads once, when it loads; the daemon and `k2d load` run on that pool.
import k2d  # noqa: F401

# isort: split
import anyio
import msgspec
import pyarrow as pa
import pyarrow.compute as pc

from k2d.allocators import freeze_start_up_objects
from k2d.config import ApiConfig, MaintenanceConfig, QueryConfig, StorageConfig, TelemetryConfig
from k2d.query import (
    INTERVALS,
    Format,
    HotFile,
    OhlcvPlan,
    PlanContext,
    RowsPlan,
    Statements,
    Window,
    open_database,
    open_result,
)
from k2d.query._execute import _outer
from k2d.query._files import local_path
from k2d.query._index import FileIndex
from k2d.query._plans import _SRC, TABLE_COLUMNS
from k2d.storage import (
    QUOTES,
    ROW_GROUP_ROWS,
    TABLES,
    TRADES,
    TableMaintenance,
    Warehouse,
    flush_properties,
)

# The pool's way of reading a result (bound once), which DuckDB says copies it once more.
warnings.filterwarnings("ignore", message="Arrow output on a DB-API result", category=UserWarning)
DAY_US = 86_400_000_000
KEYS = [f"bench-client-{n}" for n in range(64)]
# DuckDB's memory limit for the in-memory floor, which loads every file it is asked about.
HOT_MEMORY = "8GB"
T0 = 1_704_067_200_000_000  # 2024-01-01T00:00:00Z
_E8 = pa.scalar(Decimal("0.00000001"), pa.decimal128(9, 8))


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def machine() -> str:
    import duckdb

    return (
        f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
        f"python {platform.python_version()}, duckdb {duckdb.__version__}"
    )


# -- the table ----------------------------------------------------------------------------


def _mix(i: pa.Array, mul: int, mask: int) -> pa.Array:
    return pc.bit_wise_and(pc.multiply(i, mul), mask)


def _decimal(units: pa.Array) -> pa.Array:
    """int64 counts of 1e-8 as decimal128(18, 8), exactly."""
    return pc.multiply(pc.cast(units, pa.decimal128(28, 0)), _E8).cast(pa.decimal128(18, 8))


def symbol_day(symbol: str, day: int, n: int, first_id: int) -> pa.Table:
    """One symbol's trades of one day: contiguous ids, spread over the day, a random walk."""
    schema = TABLES[TRADES].arrow_schema
    i = pa.array(range(first_id, first_id + n), pa.int64())
    step = DAY_US // n
    ts = pc.add(
        pc.add(pc.multiply(pc.subtract(i, first_id), step), T0 + day * DAY_US),
        _mix(i, 40_503, 1_023),
    )
    price = pc.add(pc.cumulative_sum(pc.subtract(_mix(i, 2_654_435_761, 2_047), 1_023)), 10**11)
    qty = pc.add(_mix(i, 2_246_822_519, (1 << 30) - 1), 1)
    ids = pc.cast(i, pa.string())

    def const(v: str) -> pa.Array:
        return pa.array([v] * n, pa.string())

    return pa.table(
        {
            "message_id": pc.binary_join_element_wise(f"BINANCE:{symbol}:trade:", ids, ""),
            "trade_id": ids,
            "symbol": const(symbol),
            "exchange": const("BINANCE"),
            "asset_class": const("crypto"),
            "timestamp": pc.cast(ts, pa.timestamp("us", tz="UTC")),
            "price": _decimal(price),
            "quantity": _decimal(qty),
            "currency": const("USDT"),
            "side": pc.if_else(pc.equal(_mix(i, 7_919, 1), 1), "BUY", "SELL"),
            "trade_conditions": pa.nulls(n, schema.field("trade_conditions").type),
            "source_sequence": i,
            "ingestion_timestamp": pc.cast(pc.add(ts, 1_000), pa.timestamp("us", tz="UTC")),
            "platform_sequence": i,
            "vendor_data": pa.nulls(n, pa.string()),
            "provenance": const("live"),
        },
        schema=schema,
    )


def symbols_of(n: int) -> list[str]:
    return [f"SYM{s:02d}USDT" for s in range(n)]


def build(
    storage: StorageConfig, days: int, symbols: int, rows: int, row_group: int, commits: int
) -> None:
    per_symbol_day = rows // (days * symbols) + 1
    with Warehouse(storage) as wh:
        wh.ensure_tables()
        if row_group:
            table = wh.load_table(TRADES)
            with table.transaction() as tx:
                tx.set_properties({"write.parquet.row-group-limit": str(row_group)})
        total = flush = 0
        for day in range(days):
            started = time.perf_counter()
            batch = pa.concat_tables(
                symbol_day(s, day, per_symbol_day, 1 + day * per_symbol_day)
                for s in symbols_of(symbols)
            )
            # The last day as the writer streams it: slices of time, one commit each.
            parts = commits if day == days - 1 and commits > 1 else 1
            if parts > 1:
                batch = batch.sort_by("timestamp")
            step = -(-batch.num_rows // parts)
            for k in range(parts):
                flush += 1
                props = flush_properties(
                    flush=flush, tables=[TRADES], watermarks={}, log_position={}, batch_ids=[flush]
                )
                wh.append(TRADES, batch.slice(k * step, step), props)
            total += batch.num_rows
            print(
                f"  day {day + 1}/{days}: {batch.num_rows:,} trades committed in {parts} "
                f"commit(s) in {time.perf_counter() - started:.1f}s",
                flush=True,
            )
        limit = int(wh.load_table(TRADES).properties["write.parquet.row-group-limit"])
    print(f"  table: {total:,} trades, {symbols} symbols, {days} days, {limit:,}-row row groups")


# -- the server (a subprocess) ------------------------------------------------------------


def serve(data_dir: str, query: QueryConfig, traced: bool) -> None:
    """Run the QueryPool and the API until stdin closes; print the port. `traced`: with the
    daemon's default tracing, every request's spans kept in the trace store under the data
    dir, as `k2d run` keeps them."""
    from actors.query_pool import QueryPool
    from k2d.api import ApiState, create_app
    from k2d.api import serve as serve_api
    from k2d.runtime import Registry
    from k2d.telemetry.metrics import Metrics
    from k2d.telemetry.tracing import setup_tracing

    async def main() -> None:
        storage = StorageConfig(data_dir=data_dir)
        wh = Warehouse(storage)
        registry = Registry()
        metrics = Metrics(registry)
        tracing = None
        if traced:
            telemetry = TelemetryConfig()
            store = telemetry.trace_path(storage)
            tracing = setup_tracing(telemetry, store_dir=store, metrics=metrics)
        pool = QueryPool(wh, query, metrics, tracing.tracer if tracing is not None else None)
        await pool.on_start()
        # One API key per benchmark client, so each is its own client for the limits.
        api_cfg = ApiConfig(port=0, rate_limit=0, api_keys=tuple(_digest(k) for k in KEYS))

        async def stats() -> dict[str, Any]:
            return {}

        state = ApiState(
            registry=registry,
            metrics=metrics,
            tracing=tracing,
            stats=stats,
            config=api_cfg,
            query_pool=pool,
        )
        server = serve_api(create_app(state), api_cfg)
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.run, None, None)
            await tg.start(server.run)
            # As the daemon does once it serves (k2d.app): start-up objects out of the cycle
            # collector's sight, else each full collection pauses the server 50-100 ms here.
            freeze_start_up_objects()
            print(server.port, flush=True)
            await anyio.to_thread.run_sync(sys.stdin.read)
            await server.stop()
            tg.cancel_scope.cancel()
        if tracing is not None:
            tracing.shutdown()

    anyio.run(main)


# -- measuring ----------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread of a process, keyed by thread id."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[task.name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def where_time_goes(pid: int, before: dict[str, float], requests: int, client_cpu: float) -> str:
    """The server's CPU per request split between its event loop (HTTP, JSON framing) and
    the other threads (the pool's DuckDB workers), beside the client's own CPU."""
    after = thread_cpu(pid)
    spent = {t: after[t] - before.get(t, 0.0) for t in after}
    loop = spent.pop(str(pid), 0.0)
    workers = sum(spent.values())
    return (
        f"server CPU per request: {workers * 1_000 / requests:.1f} ms in the query workers' "
        f"threads, {loop * 1_000 / requests:.1f} ms on the event loop; this client "
        f"{client_cpu * 1_000 / requests:.1f} ms (same box)"
    )


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used: what a request costs the
    server, which a loaded shared box changes far less than it changes latency."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def line(name: str, ms: Sequence[float], extra: str = "") -> tuple[float, float]:
    med, p99 = statistics.median(ms), pct(ms, 0.99)
    load = os.getloadavg()[0]
    print(
        f"  {name:<30} median {med:7.1f} ms   p99 {p99:7.1f} ms   n={len(ms)} "
        f"(load {load:.2f}) {extra}"
    )
    return med, p99


class Workload:
    """Random requests, the same for HTTP and for the floor."""

    def __init__(self, days: int, symbols: int, seed: int = 7, first_day: int = 0) -> None:
        self.days = days
        self.first_day = first_day
        self.symbols = symbols_of(symbols)
        self.rng = random.Random(seed)

    def trades(self) -> tuple[str, int, int]:
        start = T0 + self.rng.randrange(self.first_day * DAY_US, self.days * DAY_US - 600_000_000)
        return self.rng.choice(self.symbols), start, start + 600_000_000

    def ohlcv(self) -> tuple[str, int, int]:
        start = T0 + self.rng.randrange(self.first_day, self.days) * DAY_US
        return self.rng.choice(self.symbols), start, start + DAY_US


def trades_url(symbol: str, start: int, end: int) -> str:
    return f"/v1/trades?symbol={symbol}&exchange=BINANCE&start={start}&end={end}&limit=1000"


def ohlcv_url(symbol: str, start: int, end: int) -> str:
    return f"/v1/ohlcv/1m?symbol={symbol}&exchange=BINANCE&start={start}&end={end}&limit=1440"


def trades_plan(symbol: str, start: int, end: int) -> RowsPlan:
    return RowsPlan(
        endpoint="trades",
        table=TRADES,
        symbols=(symbol,),
        exchanges=("BINANCE",),
        window=Window(start, end),
        limit=1000,
        desc=False,
        columns=tuple(TABLE_COLUMNS[TRADES]),
    )


def ohlcv_plan(symbol: str, start: int, end: int, use_bars: bool = False) -> OhlcvPlan:
    """The bars; by default aggregated from the trades, as DuckDB alone would (the floor),
    not merged from the pool's remembered minute bars."""
    return OhlcvPlan(
        endpoint="ohlcv",
        interval=INTERVALS["1m"],
        symbols=(symbol,),
        exchanges=("BINANCE",),
        window=Window(start, end),
        tz="UTC",
        limit=1440,
        use_bars=use_bars,
    )


class Asked:
    """Random OHLCV requests, remembered, so that the first ask of a symbol-day (its files'
    minute bars aggregated from the trades) and later asks (the bars remembered) are
    reported apart."""

    def __init__(self, work: Workload, before: Collection[str] = ()) -> None:
        self.work = work
        self.before = set(before)  # asked of the same files earlier in the run
        self.urls: list[str] = []

    def __call__(self) -> str:
        self.urls.append(ohlcv_url(*self.work.ohlcv()))
        return self.urls[-1]

    def lines(self, label: str, ms: Sequence[float], extra: str = "") -> float:
        """Prints all asks, then first and later asks apart; returns the p99 of all."""
        _, p99 = line(label, ms, extra)
        timed = self.urls[len(self.urls) - len(ms) :]
        seen = self.before | set(self.urls[: len(self.urls) - len(ms)])
        first, later = [], []
        for url, took in zip(timed, ms, strict=True):
            (later if url in seen else first).append(took)
            seen.add(url)
        for name, part in (("first ask", first), ("asked before", later)):
            if part:
                line(f"  {name}", part)
        return p99


def floor(
    storage: StorageConfig,
    query: QueryConfig,
    make: Callable[[], Any],
    runs: int,
    warmup: int,
) -> list[float]:
    """The plan's SQL, run by DuckDB directly on the same files (all rows, as Arrow)."""
    return _timed(storage, query, make, runs, warmup, in_memory=False)[0]


def in_process(
    storage: StorageConfig,
    query: QueryConfig,
    make: Callable[[], Any],
    runs: int,
    warmup: int,
) -> list[float]:
    """The plan prepared and answered as a query worker does it (`open_result`, every byte
    of the JSON read), without HTTP. First, as the pool has them once it has run a while:
    the newest files' minute bars computed and the hot tier loaded, within `query`'s
    bounds."""
    wh = Warehouse(storage)
    db, (maint, cursor) = open_database(query, [local_path(storage.warehouse_url())], 2)
    try:
        index = FileIndex(wh, 4, minute_bars=query.minute_bars, hot_bytes=query.hot_bytes)
        index.bootstrap(maint)
        entries = index.current(TRADES).entries
        index.bars.ahead(maint, index.bars.due(entries, query.minute_bars_ahead))
        load_hot(index)
        statements = Statements(query.parsed_statements)
        freeze_start_up_objects()  # as the daemon's process has them once it serves
        out = []
        for i in range(warmup + runs):
            plan = make()
            started = time.perf_counter()
            ctx = PlanContext(index, cursor, query, time.monotonic() + 60, statements)
            opened = open_result(ctx, plan, Format.JSON)
            _, done, failed = opened.read(1 << 30)
            assert done and failed is None, failed
            if i >= warmup:
                out.append((time.perf_counter() - started) * 1_000)
        return out
    finally:
        cursor.close()
        maint.close()
        db.close()
        wh.close()


def load_hot(index: FileIndex) -> None:
    """Load the files due into the hot tier, as the query pool's task ahead does."""
    hot = index.hot
    for table, entry in hot.plan({t: index.current(t).entries for t in (TRADES, QUOTES)}):
        if not hot.add(table, entry, HotFile.read(entry.path, table)):
            break


def hot_floor(
    storage: StorageConfig,
    query: QueryConfig,
    make: Callable[[], Any],
    runs: int,
    warmup: int,
) -> tuple[list[float], float]:
    """The same SQL on the files loaded into DuckDB's own in-memory tables: the best a hot
    tier inside the pool's engine could do. Loading is not timed. Returns the times and the
    MB the loaded tables hold. The pool's memory limit would not hold the default table
    (7 days, 10M rows) loaded whole: these tables get room of their own."""
    roomy = msgspec.structs.replace(query, memory_limit=HOT_MEMORY)
    return _timed(storage, roomy, make, runs, warmup, in_memory=True)


def _timed(
    storage: StorageConfig,
    query: QueryConfig,
    make: Callable[[], Any],
    runs: int,
    warmup: int,
    in_memory: bool,
) -> tuple[list[float], float]:
    wh = Warehouse(storage)
    db, (maint, cursor) = open_database(query, [local_path(storage.warehouse_url())], 2)
    loaded: dict[str, str] = {}
    try:
        index = FileIndex(wh, 4, minute_bars=query.minute_bars)
        index.bootstrap(maint)
        # The floor is DuckDB given the SQL text, as anyone would give it.
        statements = Statements(0)
        freeze_start_up_objects()  # as the daemon's process has them once it serves
        out = []
        for i in range(warmup + runs):
            plan = make()
            started = time.perf_counter()
            ctx = PlanContext(index, cursor, query, time.monotonic() + 60, statements)
            prepared = plan.prepare(ctx)
            sql = _outer(prepared, Format.JSON)
            params = [*prepared.params, prepared.limit + 1]
            if in_memory:
                files, *params = params
                for path in files:
                    if path not in loaded:
                        loaded[path] = f"hot_{len(loaded)}"
                        cursor.execute(
                            f"CREATE TABLE {loaded[path]} AS SELECT * FROM read_parquet(?)",
                            [[path]],
                        )
                source = " UNION ALL ".join(f"SELECT * FROM {loaded[p]}" for p in files)
                assert sql.count(_SRC) == 1, "the plan reads its files in one place"
                sql = sql.replace(_SRC, f"({source})")
            for name, table in prepared.relations.items():
                cursor.register(name, table)
            started = time.perf_counter()
            # As the pool runs it (k2d.query._execute.open_result): executed, read as Arrow.
            ctx.execute(sql, params)
            reader = cursor.to_arrow_reader(8_192)
            assert reader is not None
            reader.read_all()
            if i >= warmup:
                out.append((time.perf_counter() - started) * 1_000)
        cursor.execute("SELECT sum(memory_usage_bytes) FROM duckdb_memory()")
        (held,) = cursor.fetchone() or (0,)
        return out, int(held or 0) / 2**20
    finally:
        cursor.close()
        maint.close()
        db.close()
        wh.close()


class HttpClient:
    """One keep-alive HTTP/1.1 connection that GETs and reads whole bodies, and little else.

    The clients share the box's two cores with the server, so their CPU caps the
    throughput measured: httpx spent 1.7 ms of CPU a request with one client here and
    3.7 ms with sixteen; this class spends about 0.4 ms with one.
    """

    def __init__(self, base: str, headers: dict[str, str]) -> None:
        host, _, port = base.removeprefix("http://").partition(":")
        self.host, self.port = host, int(port or 80)
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._head = f"Host: {host}\r\n{extra}\r\n".encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> HttpClient:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()

    async def get(self, path: str) -> tuple[int, bytes]:
        """(status, body) of GET `path`."""
        reader, writer = self._reader, self._writer
        assert reader is not None and writer is not None
        writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\n" + self._head)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        if "content-length" in fields:
            return status, await reader.readexactly(int(fields["content-length"]))
        assert fields.get("transfer-encoding") == "chunked", fields
        body = bytearray()
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")  # the end of the (empty) trailer
        return status, bytes(body)


async def worked_ahead(base: str, limit: float = 600.0) -> float:
    """Seconds until the server has nothing due ahead of requests: no data files whose
    minute bars are to be computed, none to be loaded into the hot tier (its
    k2d_query_minute_bars_due_files and k2d_query_hot_due_files gauges at 0)."""
    started = time.perf_counter()
    async with HttpClient(base, {}) as client:
        while True:
            status, body = await client.get("/metrics")
            due = [
                float(x.split()[1])
                for x in body.decode().splitlines()
                if x.startswith(("k2d_query_minute_bars_due_files ", "k2d_query_hot_due_files "))
            ]
            if status == 200 and due == [0.0, 0.0]:
                return time.perf_counter() - started
            if time.perf_counter() - started > limit:
                raise RuntimeError(f"work still due ahead after {limit:.0f} s: {due}")
            await asyncio.sleep(0.05)


async def hot_held(base: str) -> tuple[float, int]:
    """(MB, files) the server's hot tier holds."""
    async with HttpClient(base, {}) as client:
        _, body = await client.get("/metrics")
    values = {
        x.split()[0]: float(x.split()[1])
        for x in body.decode().splitlines()
        if x.startswith(("k2d_query_hot_bytes ", "k2d_query_hot_files "))
    }
    return values["k2d_query_hot_bytes"] / 2**20, int(values["k2d_query_hot_files"])


async def http_runs(
    base: str, urls: Callable[[], str], runs: int, warmup: int
) -> tuple[list[float], int, int]:
    """Latency of `runs` sequential requests: (ms, errors, bytes of the last answer)."""
    out: list[float] = []
    errors = size = 0
    async with HttpClient(base, {"X-API-Key": KEYS[0]}) as client:
        for i in range(warmup + runs):
            url = urls()
            started = time.perf_counter()
            status, body = await client.get(url)
            took = (time.perf_counter() - started) * 1_000
            if status != 200:
                errors += 1
                print(f"    {status} {url}: {body[:200]!r}")
            size = len(body)
            if i >= warmup:
                out.append(took)
    return out, errors, size


async def timed_get(client: HttpClient, url: str, since: float) -> tuple[float, bool]:
    """GET `url`: ms from `since` (perf_counter) to the whole answer, and whether it failed
    (printed)."""
    status, body = await client.get(url)
    took = (time.perf_counter() - since) * 1_000
    if status != 200:
        print(f"    {status}: {body[:200]!r}")
    return took, status != 200


async def mixed(
    base: str, work: Workload, clients: int, per_client: int, asked: Asked
) -> tuple[list[float], list[float], int, float]:
    trades_ms: list[float] = []
    ohlcv_ms: list[float] = []
    errors = 0

    async def client(n: int) -> None:
        nonlocal errors
        async with HttpClient(base, {"X-API-Key": KEYS[n % len(KEYS)]}) as c:
            for i in range(per_client):
                is_trades = (i + n) % 2 == 0
                url = trades_url(*work.trades()) if is_trades else asked()
                took, failed = await timed_get(c, url, time.perf_counter())
                errors += failed
                (trades_ms if is_trades else ohlcv_ms).append(took)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for n in range(clients):
            tg.start_soon(client, n)
    return trades_ms, ohlcv_ms, errors, time.perf_counter() - started


async def paced(
    base: str, work: Workload, clients: int, requests: int, rate: float, asked: Asked
) -> tuple[list[float], list[float], int, float]:
    """The same mix as `mixed`, but offered at `rate` requests/s in all rather than as fast as
    the server answers: requests fall due at Poisson-distributed times (mean gap 1/rate),
    dealt to the clients in turn. Latency counts from the time a request was due, so a
    request that waits behind its client's late previous one (a backlog) is charged the
    wait. Returns the latencies, the errors and the seconds over which requests fell due."""
    trades_ms: list[float] = []
    ohlcv_ms: list[float] = []
    errors = 0
    rng = random.Random(17)
    dues = list(itertools.accumulate(rng.expovariate(rate) for _ in range(requests)))
    t0 = time.perf_counter() + 0.2  # every connection opened before the first is due

    async def client(n: int) -> None:
        nonlocal errors
        async with HttpClient(base, {"X-API-Key": KEYS[n % len(KEYS)]}) as c:
            for i, at in enumerate(dues[n::clients]):
                due = t0 + at
                is_trades = (i + n) % 2 == 0
                url = trades_url(*work.trades()) if is_trades else asked()
                await anyio.sleep(max(0.0, due - time.perf_counter()))
                took, failed = await timed_get(c, url, due)
                errors += failed
                (trades_ms if is_trades else ohlcv_ms).append(took)

    async with anyio.create_task_group() as tg:
        for n in range(clients):
            tg.start_soon(client, n)
    return trades_ms, ohlcv_ms, errors, dues[-1]


def streamed_day(
    base: str,
    storage: StorageConfig,
    args: argparse.Namespace,
    t_p99: float,
    o_p99: float,
    asked_before: Collection[str],
) -> None:
    """The last day's queries on its many small files, then on what compaction made of them.
    `asked_before`: the OHLCV requests already made (the files' minute bars kept)."""
    last = args.days - 1

    def measure(label: str, before: Collection[str]) -> tuple[float, float]:
        work = Workload(args.days, args.symbols, seed=17, first_day=last)
        t, _, _ = anyio.run(
            http_runs, base, lambda: trades_url(*work.trades()), args.runs, args.warmup
        )
        _, tp = line(f"trades 10m JSON  {label}", t)
        asked = Asked(work, before)
        o, _, _ = anyio.run(http_runs, base, asked, args.runs, args.warmup)
        op = asked.lines(f"ohlcv 1m 1 day   {label}", o)
        return tp, op

    print(f"\nthe last day, written in {args.commits} commits (HTTP, single client)")
    measure("(commits)", asked_before)
    started = time.perf_counter()
    with Warehouse(storage) as wh:
        report = TableMaintenance(wh, MaintenanceConfig()).run([TRADES], expire=False)
    for c in report.compactions:
        print(
            f"  compaction: {c.files_before} files -> {c.files_after}, {c.rows:,} rows, "
            f"{time.perf_counter() - started:.1f}s"
        )
    # The pool picks up another process's commits at its refresh interval, and then
    # computes the new files' minute bars ahead of requests.
    time.sleep(QueryConfig().refresh_interval + 1)
    print(f"  minute bars and hot files due ahead done {anyio.run(worked_ahead, base):.1f} s later")
    tp, op = measure("(compacted)", ())
    print(
        f"  p99 compacted / p99 on the days written whole: trades {tp / t_p99:.2f}x, "
        f"ohlcv {op / o_p99:.2f}x (target: flat, about 1x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", help="where the table lives (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep (and reuse) --data-dir")
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--symbols", type=int, default=20)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per-client", type=int, default=50)
    parser.add_argument("--workers", type=int, default=QueryConfig().workers)
    parser.add_argument(
        "--paced-rate",
        type=float,
        default=150.0,
        help="after the clients' run as fast as the server answers, the same clients and "
        "mix offered at this many requests/s in all (0: skip)",
    )
    parser.add_argument(
        "--paced-requests",
        type=int,
        default=2_400,
        help="requests offered in the paced run: at 150/s, 16 s, so that each kind's p99 "
        "rests on a dozen slower requests, not on the four of a 5 s run",
    )
    parser.add_argument(
        "--row-group-rows",
        type=int,
        default=0,
        help="write.parquet.row-group-limit to set on the table (0: leave k2d's own, "
        f"{ROW_GROUP_ROWS:,} rows, which the writer and compaction write)",
    )
    parser.add_argument(
        "--commits",
        type=int,
        default=0,
        help="build the last day in this many commits and measure it before and after "
        "the Maintainer compacts it (0: every day in one commit)",
    )
    parser.add_argument(
        "--parsed-statements",
        type=int,
        default=QueryConfig().parsed_statements,
        help="query.parsed_statements of the server and the in-process rows (0: every query "
        "parsed anew, to measure what keeping them saves)",
    )
    parser.add_argument(
        "--no-tracing",
        action="store_true",
        help="serve without the daemon's tracing (by default every request's spans go to a "
        "trace store, as with `k2d run`), to measure what it costs",
    )
    parser.add_argument(
        "--hot-bytes",
        type=int,
        default=QueryConfig().hot_bytes,
        help="query.hot_bytes of the server: bytes of the newest data files held in memory "
        "(default: the daemon's)",
    )
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    query = QueryConfig(
        workers=args.workers, parsed_statements=args.parsed_statements, hot_bytes=args.hot_bytes
    )
    if args.serve:
        serve(args.serve, query, not args.no_tracing)
        return

    if args.clients > len(KEYS):
        parser.error(f"at most {len(KEYS)} clients")
    print(f"query benchmark on {machine()}")
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="k2d-query-bench-")
    storage = StorageConfig(data_dir=data_dir)
    if not (Path(data_dir) / "catalog.db").exists():
        print(f"building the table in {data_dir}")
        build(storage, args.days, args.symbols, args.rows, args.row_group_rows, args.commits)
    else:
        print(f"reusing the table in {data_dir}")
    server = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve",
            data_dir,
            "--workers",
            str(args.workers),
            "--parsed-statements",
            str(args.parsed_statements),
            "--hot-bytes",
            str(args.hot_bytes),
            *(["--no-tracing"] if args.no_tracing else []),
            "--clients",
            str(args.clients),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        base = f"http://127.0.0.1:{port}"
        print(
            f"server: QueryPool with {query.workers} workers x {query.threads_per_worker} "
            f"thread(s), pid {server.pid}, "
            + ("no tracing" if args.no_tracing else "every request traced to a trace store")
        )
        ahead = anyio.run(worked_ahead, base)
        held, files = anyio.run(hot_held, base)
        print(
            f"  ahead of requests in {ahead:.1f} s: minute bars due computed, hot tier loaded "
            f"({held:,.0f} MB in {files} files, query.hot_bytes {query.hot_bytes / 2**20:,.0f} MB)"
        )

        work = Workload(args.days, args.symbols)
        print("\nsingle client, sequential (HTTP; then the same SQL in DuckDB directly)")
        cpu = cpu_seconds(server.pid)
        t_http, t_err, t_size = anyio.run(
            http_runs, base, lambda: trades_url(*work.trades()), args.runs, args.warmup
        )
        cpu = (cpu_seconds(server.pid) - cpu) * 1_000 / (args.runs + args.warmup)
        _, t_p99 = line(
            "trades 10m JSON  (HTTP)",
            t_http,
            f"errors={t_err}, ~{t_size / 1024:.0f} KiB, server CPU {cpu:.1f} ms/request",
        )
        work = Workload(args.days, args.symbols)
        t_floor = floor(storage, query, lambda: trades_plan(*work.trades()), args.runs, args.warmup)
        _, tf_p99 = line("trades 10m JSON  (DuckDB floor)", t_floor)
        print(f"  {'':<30} p99 ratio HTTP/floor {t_p99 / tf_p99:.2f}x (HTTP p99 target <= 20 ms)")
        work = Workload(args.days, args.symbols)
        t_hot, held = hot_floor(
            storage, query, lambda: trades_plan(*work.trades()), args.runs, args.warmup
        )
        line("trades 10m JSON  (DuckDB tables)", t_hot, f"DuckDB tables of {held:,.0f} MB")

        work = Workload(args.days, args.symbols, seed=11)
        cpu = cpu_seconds(server.pid)
        asked = Asked(work)
        o_http, o_err, o_size = anyio.run(http_runs, base, asked, args.runs, args.warmup)
        cpu = (cpu_seconds(server.pid) - cpu) * 1_000 / (args.runs + args.warmup)
        o_p99 = asked.lines(
            "ohlcv 1m 1 day   (HTTP)",
            o_http,
            f"errors={o_err}, ~{o_size / 1024:.0f} KiB, server CPU {cpu:.1f} ms/request",
        )
        work = Workload(args.days, args.symbols, seed=11)
        o_floor = floor(storage, query, lambda: ohlcv_plan(*work.ohlcv()), args.runs, args.warmup)
        _, of_p99 = line("ohlcv 1m 1 day   (DuckDB floor)", o_floor)
        print(f"  {'':<30} p99 ratio HTTP/floor {o_p99 / of_p99:.2f}x (HTTP p99 target <= 40 ms)")
        work = Workload(args.days, args.symbols, seed=11)
        o_hot, held = hot_floor(
            storage, query, lambda: ohlcv_plan(*work.ohlcv()), args.runs, args.warmup
        )
        line("ohlcv 1m 1 day   (DuckDB tables)", o_hot, f"DuckDB tables of {held:,.0f} MB")

        print(f"\n{args.clients} concurrent clients, alternating trades 10m and ohlcv 1m")
        work = Workload(args.days, args.symbols, seed=13)
        cpu = cpu_seconds(server.pid)
        threads, client_cpu = thread_cpu(server.pid), time.process_time()
        mixed_asks = Asked(work)
        mt, mo, m_err, took = anyio.run(
            mixed, base, work, args.clients, args.per_client, mixed_asks
        )
        client_cpu = time.process_time() - client_cpu
        cpu = (cpu_seconds(server.pid) - cpu) * 1_000 / (args.clients * args.per_client)
        _, mt_p99 = line("trades 10m JSON", mt)
        _, mo_p99 = line("ohlcv 1m 1 day", mo)
        fresh = len(set(mixed_asks.urls) - set(asked.urls))
        print(f"  {fresh} of the {len(mo)} OHLCV asks were the first of their symbol-day")
        total = len(mt) + len(mo)
        print(
            f"  {total} requests in {took:.1f}s ({total / took:.0f}/s, target >= 150/s), "
            f"errors={m_err}, server CPU {cpu:.1f} ms/request"
        )
        print(
            f"  p99 vs single client: trades {mt_p99 / t_p99:.1f}x, ohlcv {mo_p99 / o_p99:.1f}x "
            "(target <= 4x)"
        )
        print(f"  {where_time_goes(server.pid, threads, total, client_cpu)}")
        print(
            f"  CPU-bound ceiling on this box: {os.cpu_count()} cores / (server + client CPU "
            f"per request) = {os.cpu_count() * 1_000 / (cpu + client_cpu * 1_000 / total):.0f} "
            "requests/s"
        )
        if args.paced_rate > 0:
            print(
                f"\n{args.clients} clients offering {args.paced_rate:.0f} requests/s in all "
                "(Poisson arrivals, latency from each request's due time), the same mix"
            )
            work = Workload(args.days, args.symbols, seed=19)
            paced_asks = Asked(work, {*asked.urls, *mixed_asks.urls})
            pt, po, p_err, span = anyio.run(
                paced, base, work, args.clients, args.paced_requests, args.paced_rate, paced_asks
            )
            _, pt_p99 = line("trades 10m JSON", pt)
            _, po_p99 = line("ohlcv 1m 1 day", po)
            fresh = len(set(paced_asks.urls) - set(asked.urls) - set(mixed_asks.urls))
            print(f"  {fresh} of the {len(po)} OHLCV asks were the first of their symbol-day")
            total = len(pt) + len(po)
            print(
                f"  {total} requests due over {span:.1f}s ({total / span:.0f}/s offered), "
                f"errors={p_err}"
            )
            print(
                f"  p99 vs single client: trades {pt_p99 / t_p99:.1f}x, ohlcv "
                f"{po_p99 / o_p99:.1f}x (target <= 4x)"
            )
        if args.commits > 1:
            streamed_day(base, storage, args, t_p99, o_p99, {*asked.urls, *mixed_asks.urls})
    finally:
        if server.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                server.stdin.close()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        if not args.keep and not args.data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
