"""Checks of the tables against what the simulator sent, shared by the fault tests: every
trade stored exactly once or inside a gap the ledger shows open, no ledger row saying
backfilled for an id that is not stored, every lost quote inside an outage."""

from __future__ import annotations

import bisect
import contextlib
import json
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from tests.e2e.conftest import open_gap_ids, read_table


@dataclass
class Accounting:
    sent: int
    stored: int
    open_gap_ids: int
    lost: int
    duplicated: int
    backfilled: int
    quotes_lost: int
    outages: int


def account(data: Path, manifest: dict[str, Any]) -> Accounting:
    """Assert the fault-model invariants on the tables in `data`; return the counts."""
    trades = read_table(data, "trades")
    quotes = read_table(data, "quotes")
    events = read_table(data, "sequence_events")
    counts = Counter(trades.column("message_id").to_pylist())
    duplicated = sum(n - 1 for n in counts.values() if n > 1)
    assert duplicated == 0, f"{duplicated} duplicated trades"
    sent_total = stored_total = open_total = 0
    for symbol, sent in manifest["symbols"].items():
        rows = trades.filter(pc.equal(trades["symbol"], symbol))
        stored = set(rows.column("source_sequence").to_pylist())
        expected = set(range(sent["first_trade_id"], sent["last_trade_id"] + 1))
        missing = open_gap_ids(events, symbol)
        lost = expected - stored - missing
        assert not lost, f"{symbol}: {len(lost)} sent trades neither stored nor in an open gap"
        assert not (stored - expected), f"{symbol}: ids stored that were never sent"
        sent_total += len(expected)
        stored_total += len(stored)
        open_total += len(missing & expected)
        for row in events.filter(pc.equal(events["symbol"], symbol)).to_pylist():
            if row["kind"] == "gap" and row["status"] == "backfilled":
                first, last = row["first_missing"], row["last_missing"]
                assert first is not None and last is not None, f"{row['event_id']}: no range"
                not_stored = set(range(first, last + 1)) - stored
                assert not not_stored, (
                    f"{row['event_id']} says backfilled but {len(not_stored)} ids are not stored"
                )
    outages = [r for r in events.to_pylist() if r["kind"] == "outage" and r["stream"] == "quote"]
    quotes_lost = _check_quotes(quotes, manifest, outages)
    backfilled = pc.sum(pc.equal(trades["provenance"], "backfill")).as_py() or 0
    return Accounting(
        sent_total,
        stored_total,
        open_total,
        0,
        duplicated,
        backfilled,
        quotes_lost,
        len({r["event_id"] for r in outages}),
    )


def _check_quotes(quotes: Any, manifest: dict[str, Any], outages: list[dict[str, Any]]) -> int:
    """Each quote the simulator sent and the tables lack lies between two stored quotes
    (by update id); the outage rows of its symbol must cover that stretch of time."""
    lost_total = 0
    for symbol, sent in manifest["symbols"].items():
        sent_ids = sent.get("quote_ids")
        assert sent_ids is not None, "the simulator's manifest lists the quotes it sent"
        rows = quotes.filter(pc.equal(quotes["symbol"], symbol))
        stored = sorted(
            zip(
                rows.column("source_sequence").to_pylist(),
                (t.timestamp() * 1e6 for t in rows.column("timestamp").to_pylist()),
                strict=True,
            )
        )
        stored_ids = [u for u, _ in stored]
        have = set(stored_ids)
        windows = [
            (_us(o["window_start"]), _us(o["window_end"])) for o in outages if o["symbol"] == symbol
        ]
        lost = [u for u in sent_ids if u not in have]
        lost_total += len(lost)
        for u in lost:
            i = bisect.bisect_left(stored_ids, u)
            before = stored[i - 1][1] if i > 0 else float("-inf")
            after = stored[i][1] if i < len(stored) else float("inf")
            assert any(lo <= after and hi >= before for lo, hi in windows), (
                f"{symbol}: quote {u} was lost between {before} and {after} with no outage row"
            )
    return lost_total


def _us(value: Any) -> float:
    return float(value.timestamp() * 1e6)


def get_json(port: int, path: str) -> Any:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def metric_sum(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
            text = r.read().decode()
    except OSError:
        return None
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def wait_ready(port: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if get_json(port, "/ready").get("status") == "ready":
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the daemon on port {port} did not become ready")


def wait_capturing(port: int, timeout: float = 90.0) -> None:
    """Until the daemon is ready, connected to the venue and committing trades: before a
    test closes the market, so the last trades are seen live (a gap is only found when a
    later trade arrives)."""
    deadline = time.monotonic() + timeout
    start_rows: float | None = None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            ready = get_json(port, "/ready").get("status") == "ready"
            connected = (metric_sum(port, "k2d_feed_connected") or 0) >= 1
            rows = metric_sum(port, "k2d_rows_committed_total")
            if ready and connected and rows is not None:
                if start_rows is None:
                    start_rows = rows
                elif rows > start_rows:
                    return
        time.sleep(0.2)
    raise AssertionError(f"the daemon on port {port} did not resume capturing")


def wait_gaps_closed(port: int, timeout: float) -> float:
    """Seconds until no gap is open (held for 2 s); AssertionError after `timeout`."""
    start = time.monotonic()
    quiet_since = None
    while time.monotonic() - start < timeout:
        n = metric_sum(port, "k2d_open_gaps")
        if n == 0:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= 2:
                return quiet_since - start
        else:
            quiet_since = None
        time.sleep(0.25)
    raise AssertionError(f"gaps still open {timeout:.0f}s after the market closed")
