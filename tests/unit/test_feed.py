"""FeedHandler's handling of one frame at a time: when the reconnect backoff starts over.

The simulator cannot keep an old connection delivering rows while a new one takes over
before stable_after (its planned stops close at once), so the handover's state is set here
directly: the case 33b4066 fixed, which no test covered."""

from __future__ import annotations

import time

import anyio

from actors.feed import FeedHandler
from k2d.config import BinanceFeedConfig, PipelineConfig
from k2d.model import now_us
from k2d.telemetry.metrics import Metrics


def trade_frame(trade_id: int, at_ms: int) -> bytes:
    return (
        b'{"stream":"btcusdt@trade","data":{"e":"trade","E":%d,"s":"BTCUSDT","t":%d,'
        b'"p":"43000.10000000","q":"0.01000000","T":%d,"m":false,"M":true}}'
        % (at_ms, trade_id, at_ms)
    )


def feed_after_failed_connects(failures: int) -> FeedHandler:
    cfg = BinanceFeedConfig(
        ws_url="ws://127.0.0.1:9",
        rest_url="http://127.0.0.1:9",
        symbols=("BTCUSDT",),
        reconnect_initial=0.1,
        reconnect_max=10.0,
        stable_after=10.0,
    )
    handler = FeedHandler("feed-test", cfg, PipelineConfig(), Metrics(), anyio.Event())
    for _ in range(failures):
        handler.backoff.next_delay()
    return handler


async def test_rows_while_two_connections_overlap_do_not_reset_the_backoff_early() -> None:
    # A replacement connection has just taken over: repeats from the old one are still
    # being dropped, and the new one has delivered data for well under stable_after.
    handler = feed_after_failed_connects(3)
    handler._stable_at_us = now_us() + 10_000_000
    handler._overlap_until = time.monotonic() + 10.0

    await handler._handle(trade_frame(1, now_us() // 1000))
    await handler._handle(trade_frame(2, now_us() // 1000))

    assert handler.backoff.attempt == 3  # the next reconnect still waits as long


async def test_the_first_row_after_stable_after_resets_the_backoff() -> None:
    handler = feed_after_failed_connects(3)
    handler._stable_at_us = now_us() - 1
    handler._overlap_until = time.monotonic() + 10.0

    await handler._handle(trade_frame(1, now_us() // 1000))

    assert handler.backoff.attempt == 0
    assert handler._stable_at_us is None
