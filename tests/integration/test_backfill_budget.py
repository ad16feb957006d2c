"""Backfill throughput inside the venue's weight budget: gaps that share a history page cost
one request, the oldest gaps go first, the budget is a share of the venue's limit, and a ban
the venue imposed outlives a restart (reported on /ready while it lasts)."""

from __future__ import annotations

import asyncio
import datetime
import json
import math
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import anyio
import pytest

from actors.backfill import Backfiller
from k2d.config import BackfillConfig, ConfigError, load_config
from k2d.messages import GapRequest, RecordBatch
from k2d.runtime import Outbox
from k2d.simulator import Faults, Simulator, SimulatorOptions
from k2d.telemetry.metrics import Metrics
from tests.integration.test_backfill import (
    SYMBOL,
    backfill,
    gap,
    rest_history,
    sample,
    trades_of,
)
from tests.unit.test_binance_rest import FIRST_ID, RestVenue

ROOT = Path(__file__).resolve().parents[2]


def history_from_ids(sim: Simulator, since: int) -> list[int]:
    """fromId of each historicalTrades request the simulator answered after `since` requests."""
    return [
        int(parse_qs(query)["fromId"][0])
        for _, path, query, _ in sim.rest_requests[since:]
        if path == "/api/v3/historicalTrades"
    ]


async def quiet_venue(**options: Any) -> tuple[Simulator, int]:
    """A started simulator whose market is closed (history fixed), and its oldest trade id."""
    sim = Simulator(SimulatorOptions(symbols=(SYMBOL,), rate=3_000.0, **options))
    await sim.__aenter__()
    await asyncio.sleep(0.6)
    await sim.close_market()
    oldest = (await rest_history(sim.url, 0, 1))[0]["id"]
    return sim, oldest


async def test_gaps_within_one_history_page_cost_one_request() -> None:
    sim, base = await quiet_venue()
    try:
        gaps = [gap(base + 100 * k + 3, base + 100 * k + 3 + k) for k in range(10)]
        # A range inside one already pending is not fetched again, whatever its event id.
        inside = gap(base + 504, base + 506, event_id="BINANCE:BTCUSDT:trade:gap:other")
        since = len(sim.rest_requests)
        batches, metrics = await backfill(sim.url, [*gaps, inside], page_limit=1000, concurrency=2)
        from_ids = history_from_ids(sim, since)
    finally:
        await sim.stop()

    assert from_ids == [base + 3]
    wanted = [i for g in gaps for i in range(g.first, g.last + 1)]
    # Only the ids asked for come back, not the ids between the gaps.
    assert [t.source_sequence for t in trades_of(batches)] == wanted
    assert len(batches) == 1
    assert sample(metrics, "k2d_backfill_requests_total", status="200") == 1
    assert sample(metrics, "k2d_backfill_gaps_total", result="filled") == 10


async def test_gaps_spread_over_several_pages_are_served_oldest_first() -> None:
    sim, base = await quiet_venue()
    try:
        starts = [base + 300 * k for k in (4, 1, 3, 0, 2)]
        since = len(sim.rest_requests)
        batches, _ = await backfill(
            sim.url, [gap(s, s + 9) for s in starts], page_limit=100, concurrency=1
        )
        from_ids = history_from_ids(sim, since)
    finally:
        await sim.stop()

    assert from_ids == sorted(starts)
    assert [t.source_sequence for t in trades_of(batches)] == [
        i for s in sorted(starts) for i in range(s, s + 10)
    ]


async def test_beyond_max_pending_requests_are_shed_for_the_tracker_to_ask_again() -> None:
    sim, base = await quiet_venue()
    try:
        starts = [base + 300 * k for k in range(6)]
        since = len(sim.rest_requests)
        _, metrics = await backfill(
            sim.url, [gap(s, s + 9) for s in starts], page_limit=100, max_pending=3, concurrency=1
        )
        from_ids = history_from_ids(sim, since)
    finally:
        await sim.stop()

    assert from_ids == starts[:3]
    assert sample(metrics, "k2d_backfill_gaps_total", result="deferred") == 3
    assert sample(metrics, "k2d_backfill_gaps_total", result="filled") == 3


async def run_backfiller(
    url: str, requests: list[GapRequest], ban_file: Path, drain_timeout: float
) -> tuple[list[RecordBatch], list[str | None]]:
    """One Backfiller instance with `ban_file`, until end of input; its batches and every
    degraded reason it reported (None: healthy again)."""
    cfg = BackfillConfig(page_limit=100, request_timeout=2.0, drain_timeout=drain_timeout)
    backfiller = Backfiller(cfg, url, Metrics(), ban_file=ban_file)
    reports: list[str | None] = []
    backfiller._report = reports.append  # what the supervisor wires to /ready
    send, inbox = anyio.create_memory_object_stream[GapRequest](len(requests))
    out, results = anyio.create_memory_object_stream[RecordBatch](1000)
    for request in requests:
        send.send_nowait(request)
    send.close()
    with anyio.fail_after(30):
        await backfiller.run(inbox, Outbox("backfiller.outbox", out))
    out.close()
    return [batch async for batch in results], reports


async def test_a_venue_ban_outlives_a_restart_and_degrades_the_backfiller(
    tmp_path: Path,
) -> None:
    ban_file = tmp_path / "state" / "binance-rest.json"
    # The venue bans this IP for 8 s at its first request (418, Retry-After: 8).
    async with Simulator(SimulatorOptions(symbols=(SYMBOL,), faults=Faults(rest_ban=8))) as sim:
        _, first_reports = await run_backfiller(sim.url, [gap(1, 10)], ban_file, 0.3)
        [(banned_at, _, _, status)] = sim.rest_requests
    until = json.loads(ban_file.read_text())["blocked_until"]
    iso = datetime.datetime.fromtimestamp(until, datetime.UTC).isoformat(timespec="seconds")

    assert status == 418
    assert 7.0 <= until - time.time() + (time.monotonic() - banned_at) <= 9.5
    assert first_reports == [f"venue ban until {iso}"]
    assert [p.name for p in ban_file.parent.iterdir()] == ["binance-rest.json"]  # no temp left

    # A new instance (a restart) against a venue that would answer at once still waits.
    ban_ends = time.monotonic() + (until - time.time())
    async with RestVenue() as venue:
        batches, reports = await run_backfiller(
            venue.url, [gap(FIRST_ID, FIRST_ID + 9)], ban_file, 30.0
        )

    assert [t.source_sequence for t in trades_of(batches)] == list(range(FIRST_ID, FIRST_ID + 10))
    assert venue.answers[0].at >= ban_ends - 0.05
    assert [a.status for a in venue.answers] == [200]
    assert reports == [f"venue ban until {iso}", None]


def test_the_budget_is_a_share_of_the_venues_limit() -> None:
    cfg = load_config(ROOT / "config.toml", environ={}).backfill

    assert (cfg.venue_weight_per_minute, cfg.weight_share) == (6000, 0.8)
    assert cfg.weight_budget == 4800
    assert cfg.weight_budget // cfg.request_weight == 192  # pages of 1000 trades a minute
    assert "weight_per_minute =" not in (ROOT / "config.toml").read_text().replace(
        "venue_weight_per_minute =", ""
    )


@pytest.mark.parametrize("share", [0.0, -0.5, 1.01, math.nan])
def test_a_share_outside_zero_to_one_is_named(share: float) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"backfill": {"weight_share": share}}, environ={})

    assert any(p.startswith("backfill:") and "weight_share" in p for p in info.value.problems)


def test_the_old_absolute_weight_key_is_an_unknown_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"backfill": {"weight_per_minute": 3000}}, environ={})

    assert info.value.problems == ["backfill.weight_per_minute: unknown key"]
