"""Capture journal throughput: appends with group fsync, then a full replay scan.

Appends run on the event loop the way the FeedHandler calls them (yielding every batch),
while `run_syncer()` flushes and fsyncs every --fsync-interval seconds in a worker thread.

    python benchmarks/journal.py --frames 1000000 --size 170
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import anyio
import anyio.lowlevel

from k2d.journal import Journal, JournalOptions, last_record, scan, segments

FEED = "binance"


def machine() -> str:
    return (
        f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
        f"python {platform.python_version()}"
    )


def frames(n: int, size: int) -> list[bytes]:
    """Binance-like trade frames of `size` bytes; 1000 distinct ones, reused."""
    out = []
    for i in range(min(n, 1_000)):
        body = (
            f'{{"stream":"btcusdt@trade","data":{{"e":"trade","E":1764072000{i:03d},'
            f'"s":"BTCUSDT","t":{4_000_000_000 + i},"p":"91234.{i:02d}","q":"0.00{i}",'
            f'"T":1764072000{i:03d},"m":{"true" if i % 2 else "false"},"M":true}}}}'
        ).encode()
        out.append((body + b" " * size)[:size])
    return out


async def append_run(directory: Path, n: int, size: int, interval: float, batch: int) -> Journal:
    journal = Journal(directory, FEED, JournalOptions(fsync_interval=interval))
    journal.open()
    data = frames(n, size)
    t0 = time.time_ns() // 1_000
    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(journal.run_syncer)
        append = journal.append
        for lo in range(0, n, batch):
            for i in range(lo, min(lo + batch, n)):
                append(t0 + i, data[i % len(data)])
            await anyio.lowlevel.checkpoint()  # let the syncer and the rest of the loop run
        appended = time.perf_counter() - started
        tg.cancel_scope.cancel()
    journal.close()
    total = time.perf_counter() - started
    print(
        f"append    {n:,} frames of {size} B in {appended:.2f} s: {n / appended:,.0f} frames/s, "
        f"{journal.bytes_written / appended / 1e6:.0f} MB/s (fsync every {interval} s)"
    )
    print(
        f"          {journal.fsyncs} fsync rounds, last {journal.last_fsync_seconds * 1e3:.1f} ms; "
        f"with the final close+fsync {total:.2f} s; {len(segments(directory, FEED))} segments"
    )
    return journal


def scan_run(directory: Path, n: int) -> None:
    started = time.perf_counter()
    count = nbytes = 0
    for _, _, frame in scan(directory, FEED):
        count += 1
        nbytes += len(frame)
    elapsed = time.perf_counter() - started
    assert count == n, (count, n)
    print(
        f"scan      {count:,} records in {elapsed:.2f} s: {count / elapsed:,.0f} records/s, "
        f"{nbytes / elapsed / 1e6:.0f} MB/s of frames (page cache warm)"
    )
    started = time.perf_counter()
    last = last_record(directory, FEED)
    print(f"last      {last} in {(time.perf_counter() - started) * 1e3:.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--size", type=int, default=170)
    ap.add_argument("--fsync-interval", type=float, default=0.2)
    ap.add_argument("--batch", type=int, default=200, help="frames appended between yields")
    ap.add_argument("--dir", type=Path, default=None, help="default: a temporary directory")
    args = ap.parse_args()
    print(f"machine   {machine()}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp)
        anyio.run(append_run, directory, args.frames, args.size, args.fsync_interval, args.batch)
        scan_run(directory, args.frames)


if __name__ == "__main__":
    main()
