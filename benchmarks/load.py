"""Batch load throughput: generated ASX vendor files -> `k2d load asx` -> Iceberg.

Writes --rows rows (a third trades, two thirds quotes) as per-company files in the vendor's
format into a temp dir, loads them into a fresh warehouse, and prints rows/s, then the time
of a second load of the same files (every file skipped), with the machine it ran on.

    python benchmarks/load.py --rows 3000000
    python benchmarks/load.py --rows 3000000 --one-file trades   # one 3M-row file

Files are written a slice at a time, so the peak RSS printed is the load's, not the
generator's.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

# k2d before pyarrow: importing k2d chooses Arrow's memory pool (k2d.allocators), which
# pyarrow reads once, when it loads; the daemon and `k2d load` run on that pool.
import k2d  # noqa: F401

# isort: split
import pyarrow as pa

from k2d.batchload import LoadOptions, Progress, load_asx
from k2d.config import load_config


def machine() -> str:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{platform.node()} {platform.machine()} {cpu} {os.cpu_count()} cpus, "
        f"python {platform.python_version()}"
    )


def generate(
    root: Path, rows: int, companies: int, days: int, seed: int, one_file: str | None = None
) -> tuple[int, int]:
    """Vendor files under root/trades, root/quotes and root/company_info.csv.

    With `one_file` ("trades" or "quotes"), one company and all rows in one file of that kind.
    """
    rnd = random.Random(seed)
    (root / "trades").mkdir(parents=True)
    (root / "quotes").mkdir()
    info = ["company_id,symbol,company_name,ISIN,start_date,end_date"]
    if one_file is not None:
        companies = 1
    per_company = rows // companies
    n_trades = n_quotes = 0
    for c in range(companies):
        company_id = 7000 + c
        symbol = f"S{c:03d}"
        info.append(f"{company_id},{symbol},Company {c},AU000000{c:04d},01/02/2000,")
        trades = per_company // 3
        quotes = per_company - trades
        if one_file is not None:
            trades, quotes = (per_company, 0) if one_file == "trades" else (0, per_company)
        for kind, count in (("trades", trades), ("quotes", quotes)):
            if count == 0:
                continue
            price = 10.0 + rnd.random() * 50
            per_day = count // days + 1
            with open(root / kind / f"{company_id}.csv", "w") as out:
                lines = []
                for i in range(count):
                    # In time order, as vendors write them. March 2014: AEDT, daylight saving.
                    day = 3 + i // per_day
                    ms = 36_000_000 + (i % per_day) * 21_600_000 // per_day
                    hh, rest = divmod(ms, 3_600_000)
                    mm, rest = divmod(rest, 60_000)
                    ss, ms3 = divmod(rest, 1000)
                    price = max(0.01, price + rnd.choice((-0.01, 0, 0.01)))
                    stamp = f"03/{day:02d}/2014,{hh:02d}:{mm:02d}:{ss:02d}.{ms3:03d}"
                    if kind == "trades":
                        buyer = rnd.choice(("", "", "", "1234", "5678"))
                        qual = rnd.choice(("", "3", "XT"))
                        lines.append(
                            f"{stamp},{price:.2f},{rnd.randint(1, 50_000)},{qual},X,{buyer}"
                        )
                    else:
                        ask = price + 0.01
                        lines.append(
                            f"{stamp},{price:.2f},{ask:.2f},"
                            f"{rnd.randint(1, 900)},{rnd.randint(1, 900)}"
                        )
                    if len(lines) == 50_000:
                        out.write("\n".join(lines) + "\n")
                        lines.clear()
                if lines:
                    out.write("\n".join(lines) + "\n")
        n_trades += trades
        n_quotes += quotes
    (root / "company_info.csv").write_text("\n".join(info) + "\n")
    return n_trades, n_quotes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--companies", type=int, default=30)
    parser.add_argument("--days", type=int, default=20)
    parser.add_argument("--commit-rows", type=int, default=LoadOptions().commit_rows)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--one-file",
        choices=("trades", "quotes"),
        default=None,
        help="all --rows rows in one file of this kind (one company)",
    )
    args = parser.parse_args()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="k2d-load-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        n_trades, n_quotes = generate(
            root / "in", args.rows, args.companies, args.days, args.seed, args.one_file
        )
        inputs = [f for f in (root / "in").rglob("*.csv") if f.name != "company_info.csv"]
        size = sum(f.stat().st_size for f in inputs)
        n_files = len(inputs)
        print(
            f"generated {n_trades:,} trades + {n_quotes:,} quotes in {n_files} files, "
            f"{size / 1e6:.0f} MB, in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        cfg = load_config(overrides={"storage": {"data_dir": str(root / "data")}})
        runs = []
        for label in ("first load", "reload"):
            progress = Progress(0, sys.stderr if sys.stderr.isatty() else None)
            cpu0 = os.times()
            summary = load_asx(
                cfg,
                trades=[root / "in" / "trades"],
                quotes=[root / "in" / "quotes"],
                company_info=root / "in" / "company_info.csv",
                options=LoadOptions(commit_rows=args.commit_rows),
                progress=progress,
            )
            cpu1 = os.times()
            cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
            rows = summary.rows["trades"] + summary.rows["quotes"]
            runs.append((label, summary.seconds, rows, cpu))
            assert summary.ok, summary.format()
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        data_files = sum(1 for _ in (root / "data").rglob("*.parquet"))
    print(f"machine: {machine()}; load average before {load_before}")
    print(f"pyarrow {pa.__version__}, memory pool {pa.default_memory_pool().backend_name}")
    for label, seconds, rows, cpu in runs:
        rate = rows / seconds if rows else 0.0
        print(
            f"{label:>10}: {rows:,} rows in {seconds:.2f} s = {rate:,.0f} rows/s "
            f"(CPU {cpu / seconds:.0%} of one core, {rows / max(cpu, 1e-9):,.0f} rows per CPU-s)"
        )
    print(f"peak RSS {peak_mb:,.0f} MB; {data_files} data files in the warehouse")
    return 0


if __name__ == "__main__":
    sys.exit(main())
