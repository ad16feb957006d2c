"""FeedHandler against the simulator over a real loopback WebSocket."""

from __future__ import annotations

from collections import Counter
from typing import Any

import anyio

from actors.feed import FeedHandler
from k2d.config import BinanceFeedConfig, PipelineConfig
from k2d.messages import RecordBatch
from k2d.runtime import Outbox
from k2d.simulator import Faults, Simulator, SimulatorOptions
from k2d.telemetry.metrics import Metrics


async def capture(sim: Simulator, seconds: float, **feed: Any) -> tuple[list[RecordBatch], Metrics]:
    cfg = BinanceFeedConfig(
        ws_url=sim.ws_url,
        rest_url=sim.url,
        symbols=("BTCUSDT",),
        reconnect_initial=0.05,
        reconnect_max=0.2,
        **feed,
    )
    metrics = Metrics()
    stop = anyio.Event()
    handler = FeedHandler("feed-test", cfg, PipelineConfig(batch_max_age=0.02), metrics, stop)
    send, recv = anyio.create_memory_object_stream[RecordBatch](1000)
    batches: list[RecordBatch] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(handler.run, None, Outbox("test", send))
        await anyio.sleep(seconds)
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
        batches, metrics = await capture(sim, 4.0)
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
