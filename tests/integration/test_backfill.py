"""Backfiller against the simulated venue's REST history on 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import socket
import time
from typing import Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect

from actors.backfill import Backfiller
from actors.sequencer import SequenceTracker
from k2d.config import BackfillConfig, SequencerConfig, TelemetryConfig
from k2d.messages import GapRequest, GapResolution, RecordBatch
from k2d.model import Trade, now_us
from k2d.runtime import Outbox
from k2d.simulator import Faults, Simulator, SimulatorOptions
from k2d.telemetry.metrics import Metrics
from k2d.telemetry.tracing import Tracing, setup_tracing
from k2d.venues.binance import HistoricalTrade, trade_from_rest
from tests.unit.test_binance_rest import FIRST_ID, RestVenue

SYMBOL = "BTCUSDT"


def gap(first: int, last: int, stream: str = "trade", **fields: Any) -> GapRequest:
    values: dict[str, Any] = {
        "event_id": f"BINANCE:{SYMBOL}:{stream}:gap:{first}",
        "exchange": "BINANCE",
        "symbol": SYMBOL,
        "stream": stream,
        "partition": 0,
        "first": first,
        "last": last,
        **fields,
    }
    return GapRequest(**values)


async def backfill(
    url: str, requests: list[GapRequest], tracing: Tracing | None = None, **cfg: Any
) -> tuple[list[RecordBatch], Metrics]:
    """Run a Backfiller over `requests` until it returns at end of input; all it sent."""
    metrics = Metrics()
    settings: dict[str, Any] = {"page_limit": 100, "request_timeout": 2.0, **cfg}
    backfiller = Backfiller(
        BackfillConfig(**settings), url, metrics, tracing.tracer if tracing else None
    )
    send, inbox = anyio.create_memory_object_stream[GapRequest](max(1, len(requests)))
    out, results = anyio.create_memory_object_stream[RecordBatch](10_000)
    for request in requests:
        send.send_nowait(request)
    send.close()
    with anyio.fail_after(15):
        await backfiller.run(inbox, Outbox("backfiller.outbox", out))
    out.close()
    return [batch async for batch in results], metrics


def trades_of(batches: list[RecordBatch]) -> list[Trade]:
    return [t for b in batches for t in b.trades]


def resolutions_of(batches: list[RecordBatch]) -> list[GapResolution]:
    return [r for b in batches for r in b.resolutions]


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def rest_history(url: str, from_id: int, limit: int) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url) as http:
        params: dict[str, str | int] = {"symbol": SYMBOL, "fromId": from_id, "limit": limit}
        response = await http.get("/api/v3/historicalTrades", params=params)
    response.raise_for_status()
    items: list[dict[str, Any]] = response.json()
    return items


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


async def test_a_range_comes_back_exactly_as_rest_history_across_pages() -> None:
    tracing = setup_tracing(TelemetryConfig())
    async with Simulator(SimulatorOptions(symbols=(SYMBOL,), rate=2_000.0)) as sim:
        await asyncio.sleep(0.4)
        history = await rest_history(sim.url, 0, 1000)
        first = history[10]["id"]
        expected = history[10:360]
        batches, metrics = await backfill(sim.url, [gap(first, first + 349)], tracing)

    trades = trades_of(batches)
    assert [t.source_sequence for t in trades] == list(range(first, first + 350))
    assert [(t.trade_id, t.price, t.quantity, t.timestamp, t.side) for t in trades] == [
        (
            str(i["id"]),
            i["price"],
            i["qty"],
            i["time"] * 1000,
            "SELL" if i["isBuyerMaker"] else "BUY",
        )
        for i in expected
    ]
    assert {t.provenance for t in trades} == {"backfill"}
    assert [t.message_id for t in trades] == [f"BINANCE:{SYMBOL}:trade:{i['id']}" for i in expected]
    assert [len(b.trades) for b in batches] == [100, 100, 100, 50]
    assert {b.source for b in batches} == {"backfill"}
    assert resolutions_of(batches) == []
    assert sample(metrics, "k2d_backfill_requests_total", status="200") == 4
    assert sample(metrics, "k2d_backfill_rows_total") == 350
    assert sample(metrics, "k2d_backfill_gaps_total", result="filled") == 1
    [span] = [s for s in tracing.recent_spans() if s["name"] == "backfill.fetch"]
    assert span["attributes"]["k2d.rows"] == 350
    assert span["attributes"]["k2d.pages"] == 4


async def test_trades_dropped_on_the_wire_are_recovered() -> None:
    opts = SimulatorOptions(symbols=(SYMBOL,), rate=500.0, seed=7, faults=Faults(drop=0.05))
    async with Simulator(opts) as sim:
        seen: set[int] = set()
        async with connect(f"{sim.ws_url}/ws/btcusdt@trade") as ws:
            with anyio.move_on_after(1.0):
                async for frame in ws:
                    seen.add(json.loads(frame)["t"])
        dropped = set(sim.manifest()["symbols"][SYMBOL]["dropped"])
        missing = sorted(set(range(min(seen), max(seen) + 1)) - seen)
        runs: list[list[int]] = []
        for trade_id in missing:
            if runs and runs[-1][-1] == trade_id - 1:
                runs[-1].append(trade_id)
            else:
                runs.append([trade_id])
        requests = [gap(run[0], run[-1]) for run in runs]
        batches, metrics = await backfill(sim.url, requests, concurrency=3)

    assert len(missing) >= 5
    assert set(missing) <= dropped
    recovered = [t.source_sequence or 0 for t in trades_of(batches)]
    assert sorted(recovered) == missing
    assert resolutions_of(batches) == []
    assert sample(metrics, "k2d_backfill_gaps_total", result="filled") == len(runs)


async def test_rate_limited_backfill_waits_retry_after_and_is_never_banned() -> None:
    async with RestVenue(weight_limit=100, ends_in=3.0, ban_seconds=1.0) as venue:
        requests = [gap(FIRST_ID, FIRST_ID + 29), gap(FIRST_ID + 100, FIRST_ID + 129)]
        started = time.monotonic()
        batches, metrics = await backfill(
            venue.url,
            requests,
            page_limit=10,
            concurrency=2,
            venue_weight_per_minute=10_000,
            weight_share=1.0,
        )
        elapsed = time.monotonic() - started

    ids = sorted(t.source_sequence or 0 for t in trades_of(batches))
    assert ids == [*range(FIRST_ID, FIRST_ID + 30), *range(FIRST_ID + 100, FIRST_ID + 130)]
    statuses = [a.status for a in venue.answers]
    assert 418 not in statuses
    assert sample(metrics, "k2d_backfill_requests_total", status="429") == 1
    assert sample(metrics, "k2d_backfill_requests_total", status="200") == 6
    assert sample(metrics, "k2d_backfill_requests_total", status="418") == 0
    refused = venue.answers[statuses.index(429)]
    later = venue.answers[statuses.index(429) + 1]
    assert refused.retry_after is not None
    assert later.at - refused.at >= refused.retry_after
    assert elapsed >= refused.retry_after
    assert sample(metrics, "k2d_backfill_gaps_total", result="filled") == 2


async def test_ids_older_than_the_venue_history_are_unrecoverable() -> None:
    opts = SimulatorOptions(symbols=(SYMBOL,), rate=100.0, history_size=100)
    async with Simulator(opts) as sim:
        await asyncio.sleep(1.5)  # 150 trades made: the oldest 50 are gone
        oldest = (await rest_history(sim.url, 0, 1))[0]["id"]
        batches, metrics = await backfill(sim.url, [gap(oldest - 40, oldest + 30)])

    [lost] = resolutions_of(batches)
    start = lost.last + 1
    assert oldest <= start <= oldest + 30
    assert lost == GapResolution(
        exchange="BINANCE",
        symbol=SYMBOL,
        stream="trade",
        first=oldest - 40,
        last=start - 1,
        status="unrecoverable",
        reason=f"venue history starts at id {start}",
    )
    assert [t.source_sequence for t in trades_of(batches)] == list(range(start, oldest + 31))
    assert sample(metrics, "k2d_backfill_gaps_total", result="unrecoverable") == 1


async def test_ids_the_venue_never_had_are_unrecoverable() -> None:
    async with Simulator(SimulatorOptions(symbols=(SYMBOL,), rate=0.0)) as sim:
        batches, _ = await backfill(sim.url, [gap(1, 10)])

    assert trades_of(batches) == []
    [lost] = resolutions_of(batches)
    assert (lost.first, lost.last, lost.status) == (1, 10, "unrecoverable")
    assert lost.reason == "venue returned no trades from id 1"


async def test_a_stream_without_history_is_answered_at_once() -> None:
    started = time.monotonic()
    batches, metrics = await backfill(closed_port_url(), [gap(7, 9, stream="quote")])

    assert time.monotonic() - started < 1.0
    [lost] = resolutions_of(batches)
    assert (lost.stream, lost.first, lost.last, lost.status) == ("quote", 7, 9, "unrecoverable")
    assert lost.reason == "venue has no history for stream quote"
    assert sample(metrics, "k2d_backfill_requests_total", status="error") == 0


async def test_a_failing_venue_leaves_the_gap_open_and_the_actor_running(
    caplog: pytest.LogCaptureFixture,
) -> None:
    requests = [gap(1, 10), gap(20, 30, stream="quote")]
    with caplog.at_level(logging.WARNING, logger="actors.backfill"):
        batches, metrics = await backfill(closed_port_url(), requests, max_attempts=2)

    # Only the quote request is answered: nothing is claimed about trades 1..10.
    assert [(r.stream, r.first) for r in resolutions_of(batches)] == [("quote", 20)]
    assert trades_of(batches) == []
    assert sample(metrics, "k2d_backfill_requests_total", status="error") == 2
    assert sample(metrics, "k2d_backfill_gaps_total", result="failed") == 1
    assert any("stays open" in r.getMessage() for r in caplog.records)


async def test_a_request_already_held_is_not_fetched_twice() -> None:
    async with RestVenue() as venue:
        batches, metrics = await backfill(
            venue.url, [gap(FIRST_ID, FIRST_ID + 9), gap(FIRST_ID, FIRST_ID + 9)]
        )

    assert [t.source_sequence for t in trades_of(batches)] == list(range(FIRST_ID, FIRST_ID + 10))
    assert len(venue.answers) == 1
    assert sample(metrics, "k2d_backfill_gaps_total", result="filled") == 1


async def test_end_of_input_is_bounded_by_the_drain_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # take the request, never answer

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="actors.backfill"):
            batches, _ = await backfill(
                url, [gap(1, 10), gap(11, 20)], request_timeout=5.0, drain_timeout=0.3
            )
        elapsed = time.monotonic() - started
    finally:
        server.close()
        await server.wait_closed()

    assert batches == []
    assert elapsed < 1.5
    assert any("2 gaps stay open" in r.getMessage() for r in caplog.records)


# How the simulator's bad_history rows must come back: the reason of their dead letter.
BAD_ROW_REASONS = {
    "non_numeric_price": "invalid_number",
    "zero_price": "non_positive",
    "too_many_digits": "invalid_number",
    "negative_time": "invalid_time",
    "far_time": "invalid_time",
    "huge_id": "invalid_id",
}


async def test_bad_history_rows_are_dead_letters_and_their_ids_are_closed() -> None:
    faults = Faults(bad_history=0.03)
    async with Simulator(SimulatorOptions(symbols=(SYMBOL,), rate=2_000.0, faults=faults)) as sim:
        await asyncio.sleep(0.5)
        await sim.close_market()  # history stays, and stops moving
        first = (await rest_history(sim.url, 0, 1))[0]["id"]
        wanted = range(first + 10, first + 610)
        bad = {i: kind for i, kind in sim.bad_history_rows(SYMBOL).items() if i in wanted}
        batches, metrics = await backfill(sim.url, [gap(wanted[0], wanted[-1])])

    assert len(set(bad.values())) >= 3
    good = [i for i in wanted if i not in bad]
    assert [t.source_sequence for t in trades_of(batches)] == good
    dead = [d for b in batches for d in b.dead_letters]
    assert sorted(d.reason for d in dead) == sorted(BAD_ROW_REASONS[k] for k in bad.values())
    assert all(d.source == "backfill" and json.loads(d.raw)["price"] for d in dead)
    # A bad row travels with the good rows of its page, in one RecordBatch.
    assert all(b.trades for b in batches if b.dead_letters)
    closed = {(r.first, r.last): r.reason for r in resolutions_of(batches)}
    assert set(closed) == {(i, i) for i in bad}
    for trade_id, kind in bad.items():
        expected = "skips ids" if kind == "huge_id" else BAD_ROW_REASONS[kind]
        assert expected in closed[(trade_id, trade_id)]
    assert sample(metrics, "k2d_dead_letters_total", source="backfill", reason="invalid_time") == (
        sum(BAD_ROW_REASONS[k] == "invalid_time" for k in bad.values())
    )

    # The tracker stores the good rows and the dead letters, and closes the whole gap: the
    # bad ids as unrecoverable, so nothing is left to ask the venue again.
    tracker = SequenceTracker(0, SequencerConfig(gap_grace=0.0), Metrics(), itertools.count())
    now_ms = int(time.time() * 1000)
    edges = [
        HistoricalTrade(id=i, price="1.0", qty="1.0", time=now_ms, isBuyerMaker=False)
        for i in (wanted[0] - 1, wanted[-1] + 1)
    ]
    live = [trade_from_rest(item, SYMBOL, now_us(), provenance="live") for item in edges]
    tracker.process(RecordBatch(source="feed", trades=live))
    book = tracker.book(("BINANCE", SYMBOL, "trade"))
    assert [(g.first, g.last) for g in book.gaps] == [(wanted[0], wanted[-1])]
    out = [tracker.process(b) for b in batches]

    assert sum(len(o.trades) for o in out) == len(good)
    assert sum(len(o.dead_letters) for o in out) == len(bad)
    assert book.gaps == []
    assert book.due_requests(now_us() + 10**12, 0) == []
    unrecoverable = {e.first_missing for o in out for e in o.events if e.status == "unrecoverable"}
    assert unrecoverable == set(bad)


async def test_a_gap_reaching_past_the_venues_newest_trade_costs_two_requests() -> None:
    # A forward id jump on the wire (the id_jump fault) opens a gap of a million ids that the
    # venue never had: two pages answer it, not a thousand.
    async with Simulator(SimulatorOptions(symbols=(SYMBOL,), rate=2_000.0)) as sim:
        await asyncio.sleep(0.3)
        await sim.close_market()
        newest = (await rest_history(sim.url, 0, 1000))[-1]["id"]
        before = len(sim.rest_requests)
        batches, metrics = await backfill(
            sim.url, [gap(newest - 4, newest + 1_000_000)], page_limit=1000
        )
        requests = sim.rest_requests[before:]

    assert [t.source_sequence for t in trades_of(batches)] == list(range(newest - 4, newest + 1))
    [lost] = resolutions_of(batches)
    assert (lost.first, lost.last) == (newest + 1, newest + 1_000_000)
    assert lost.reason == f"venue returned no trades from id {newest + 1}"
    assert len(requests) == 2
    assert sample(metrics, "k2d_backfill_gaps_total", result="unrecoverable") == 1
