"""FeedHandler against the simulator over a real loopback WebSocket."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import anyio
import pytest

from actors.feed import FeedHandler
from k2d.config import BinanceFeedConfig, PipelineConfig
from k2d.messages import RecordBatch
from k2d.runtime import Outbox
from k2d.simulator import Faults, Simulator, SimulatorOptions
from k2d.storage import dead_letters_to_arrow, quotes_to_arrow, trades_to_arrow
from k2d.telemetry.metrics import Metrics


async def capture(
    sim: Simulator, seconds: float, *, calm_for: float = 0.0, **feed: Any
) -> tuple[list[RecordBatch], Metrics]:
    settings: dict[str, Any] = {"reconnect_initial": 0.05, "reconnect_max": 0.2, **feed}
    cfg = BinanceFeedConfig(ws_url=sim.ws_url, rest_url=sim.url, symbols=("BTCUSDT",), **settings)
    metrics = Metrics()
    stop = anyio.Event()
    handler = FeedHandler("feed-test", cfg, PipelineConfig(batch_max_age=0.02), metrics, stop)
    send, recv = anyio.create_memory_object_stream[RecordBatch](1000)
    batches: list[RecordBatch] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(handler.run, None, Outbox("test", send))
        await anyio.sleep(seconds)
        if calm_for:
            sim.calm()
            await anyio.sleep(calm_for)
        await sim.stop()  # planned stop: final trade, serverShutdown, close
        await anyio.sleep(0.3)
        stop.set()
    send.close()
    async for b in recv:
        batches.append(b)
    return batches, metrics


def trade_ids(batches: list[RecordBatch]) -> list[int]:
    return [t.source_sequence or 0 for b in batches for t in b.trades]


async def test_replacement_before_the_lifetime_cut_loses_and_repeats_nothing() -> None:
    opts = SimulatorOptions(symbols=("BTCUSDT",), rate=400, seed=3, connection_lifetime=2.0)
    async with Simulator(opts) as sim:
        batches, metrics = await capture(sim, 5.0, connection_lifetime=2.0, replace_before=0.8)
        manifest = sim.manifest()
    ids = trade_ids(batches)
    sent = manifest["symbols"]["BTCUSDT"]
    assert metrics.registry.get_sample_value("k2d_feed_connects_total", {"feed": "feed-test"}) >= 3
    assert [i for i, n in Counter(ids).items() if n > 1] == [], "overlap repeats reached the batch"
    assert sorted(ids) == list(range(sent["first_trade_id"], sent["last_trade_id"] + 1))


async def test_abrupt_resets_are_survived_by_reconnecting() -> None:
    opts = SimulatorOptions(symbols=("BTCUSDT",), rate=300, seed=4, faults=Faults(reset=0.01))
    async with Simulator(opts) as sim:
        # Connections that delivered data for 0.1 s count as healthy here, so the backoff
        # stays short; the faults stop 1.5 s before the planned stop, so the feed is
        # connected again when it comes even if a reset fell just before.
        batches, metrics = await capture(sim, 4.0, calm_for=1.5, stable_after=0.1)
        manifest = sim.manifest()
    assert manifest["disconnects"] >= 1
    connects = metrics.registry.get_sample_value("k2d_feed_connects_total", {"feed": "feed-test"})
    assert connects is not None and connects >= manifest["disconnects"] + 1
    ids = trade_ids(batches)
    assert max(ids) == manifest["symbols"]["BTCUSDT"]["last_trade_id"]
    # Every reconnect after a reset is an outage: from the last frame before to the first after.
    outages = [o for b in batches for o in b.outages]
    assert len(outages) >= 1
    assert all(o.start_us < o.end_us and o.streams == ("trade", "quote") for o in outages)
    assert all(o.reason.startswith("disconnected") for o in outages)


async def test_malformed_frames_are_dead_lettered_and_the_feed_goes_on() -> None:
    opts = SimulatorOptions(symbols=("BTCUSDT",), rate=500, seed=5, faults=Faults(malformed=0.05))
    async with Simulator(opts) as sim:
        batches, _ = await capture(sim, 3.0)
        manifest = sim.manifest()
    dead = [d for b in batches for d in b.dead_letters]
    assert len(dead) == manifest["malformed_frames"] > 0
    assert all(d.raw and d.reason for d in dead)
    ids = trade_ids(batches)
    sent = manifest["symbols"]["BTCUSDT"]
    assert sorted(set(ids)) == list(range(sent["first_trade_id"], sent["last_trade_id"] + 1))


async def test_huge_trade_ids_are_dead_letters_and_every_stored_row_fits_the_tables() -> None:
    opts = SimulatorOptions(symbols=("BTCUSDT",), rate=500, seed=6, faults=Faults(huge_id=0.05))
    async with Simulator(opts) as sim:
        batches, _ = await capture(sim, 2.0)
        manifest = sim.manifest()
    dead = [d for b in batches for d in b.dead_letters]
    assert len(dead) == manifest["malformed_frames"] > 0
    assert {d.reason for d in dead} == {"invalid_id"}
    assert all(b'"t":18446744073709551615' in d.raw for d in dead)
    ids = trade_ids(batches)
    sent = manifest["symbols"]["BTCUSDT"]
    assert sorted(ids) == list(range(sent["first_trade_id"], sent["last_trade_id"] + 1))
    # What the writer does with each batch: an id beyond int64 used to raise OverflowError here.
    for b in batches:
        trades_to_arrow(b.trades)
        quotes_to_arrow(b.quotes)
        dead_letters_to_arrow(b.dead_letters)


@pytest.mark.parametrize("after", [0.0, 0.1], ids=["immediately", "after_first_frames"])
async def test_a_venue_shutting_every_new_connection_is_backed_off(after: float) -> None:
    opts = SimulatorOptions(
        symbols=("BTCUSDT",), rate=400, seed=8, faults=Faults(shutdown_after=after)
    )
    async with Simulator(opts) as sim:
        await capture(sim, 4.0, reconnect_initial=0.05, reconnect_max=5.0)
        opened = sim.connection_times

    # Without backoff (it was reset by every frame, serverShutdown included) this was a
    # reconnect every ~50 ms: some 60 connections in 4 s.
    assert 4 <= len(opened) <= 10
    gaps = [b - a for a, b in itertools.pairwise(opened)]
    # Half jitter under a doubling ceiling: each delay is at least the one before it (give or
    # take a handshake's worth of scheduling noise).
    assert all(b >= 0.9 * a - 0.03 for a, b in itertools.pairwise(gaps)), gaps
    assert gaps[-1] >= 4 * gaps[0], gaps
