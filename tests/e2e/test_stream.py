"""/v1/stream from outside: a real `k2d run` against the simulator (which drops some trade
frames, as a venue's hiccup would, and keeps them in its REST history), and clients written
with the `websockets` library, every message decoded strictly with the protocol's Structs.

One daemon serves the whole module (its capture must be some seconds old for `since`); the
tests read what it streams against what the simulator says it sent.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from k2d.api._stream_protocol import (
    Ack,
    End,
    Error,
    Gap,
    Quotes,
    ServerMessage,
    Trades,
    decode_server,
)
from tests.e2e.accounting import metric_sum, wait_capturing
from tests.e2e.conftest import SimProcess, daemon, start_simulator, write_config
from tests.e2e.test_faults import free_port

SYMBOLS = ["BTCUSDT", "ETHUSDT"]
BTC, ETH = "trades:BINANCE:BTCUSDT", "trades:BINANCE:ETHUSDT"
QUOTES = ["quotes:BINANCE:BTCUSDT", "quotes:BINANCE:ETHUSDT"]
CONFIG = """
[writer]
flush_interval = 0.3
[sequencer]
gap_grace = 0.3
rerequest_after = 2.0
[stream]
max_subscriptions = 4
queue_bytes = 524288
join_buffer_bytes = 1048576
close_timeout = 10.0
# A dead peer is found within 1 + 6 s; the stalled client below goes first, by its queue.
heartbeat_interval = 1.0
heartbeat_timeout = 6.0
"""


@dataclass
class Daemon:
    sim: SimProcess
    proc: subprocess.Popen[str]
    port: int
    started: float

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    def metric(self, name: str) -> float:
        return metric_sum(self.port, name) or 0.0

    def sent(self, symbol: str) -> tuple[set[int], int]:
        """(ids the simulator put on the wire, the highest id it has sent) per its manifest."""
        m = self.sim.manifest()["symbols"][symbol]
        dropped = set(m["dropped"])
        return set(range(m["first_trade_id"], m["last_trade_id"] + 1)) - dropped, m["last_trade_id"]


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("stream")
    sim = start_simulator(
        tmp,
        "--symbols",
        ",".join(SYMBOLS),
        "--rate",
        "400",
        "--seed",
        "5",
        "--faults",
        "drop=0.004",
    )
    port = free_port()
    cfg = write_config(tmp / "c.toml", tmp / "data", sim, SYMBOLS, CONFIG, api_port=port)
    log = (tmp / "daemon.log").open("w")
    proc = daemon(cfg, stdout=log, env={"K2D_API__RATE_LIMIT": "0"})
    try:
        wait_capturing(port)
        yield Daemon(sim, proc, port, time.monotonic())
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
            sim.proc.kill()
            sim.proc.wait()
            log.close()
    assert proc.returncode == 0, (tmp / "daemon.log").read_text()[-3000:]


class Client:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.raw: list[str | bytes] = []

    async def send(self, **op: Any) -> None:
        await self.ws.send(json.dumps(op))

    async def recv(self, wait: float = 10.0) -> ServerMessage:
        with anyio.fail_after(wait):
            data = await self.ws.recv()
        self.raw.append(data)
        return decode_server(data)

    async def read_for(self, seconds: float) -> list[ServerMessage]:
        out: list[ServerMessage] = []
        with anyio.move_on_after(seconds):
            while True:
                out.append(await self.recv(seconds + 1))
        return out


@asynccontextmanager
async def connect(
    url: str, sock: socket.socket | None = None, max_queue: int = 16
) -> AsyncIterator[Client]:
    # No permessage-deflate: compressed, the same rows fill the socket buffers many times
    # slower, and the server compresses each message once per client.
    async with websockets.connect(
        url, proxy=None, sock=sock, max_queue=max_queue, compression=None
    ) as ws:
        yield Client(ws)


def rows(messages: list[ServerMessage], channel: str) -> list[Any]:
    return [
        r
        for m in messages
        if isinstance(m, Trades | Quotes) and m.channel == channel
        for r in m.rows
    ]


async def test_a_subscriber_gets_what_the_venue_sends_in_order_and_gaps_close(
    running: Daemon,
) -> None:
    """Live rows are the ids the simulator sent, in order; an id it dropped shows up as a
    gap, then as backfilled rows, then as the gap closed."""
    async with connect(running.url) as c:
        await c.send(op="subscribe", channels=[BTC, ETH], id=1)
        assert await c.recv() == Ack(op="subscribe", id=1, channels=[BTC, ETH])
        msgs = await c.read_for(4.0)
        cut = {ch: max(r.source_sequence for r in rows(msgs, ch)) for ch in (BTC, ETH)}
        msgs += await c.read_for(2.5)  # the manifest, rewritten every 2 s, covers `cut` now
        for channel, symbol in ((BTC, "BTCUSDT"), (ETH, "ETHUSDT")):
            live = [r.source_sequence for r in rows(msgs, channel) if r.provenance == "live"]
            assert live == sorted(live) and len(live) == len(set(live)), "in order, once"
            # The manifest is rewritten every 2 s: compare up to the last id it knows.
            sent, top = running.sent(symbol)
            window = set(range(live[0], min(live[-1], top) + 1))
            assert len(window) > 200
            assert set(live) & window == sent & window, f"{symbol}: live rows are what was sent"
        # The ids the simulator dropped inside what we saw: gap, backfill, closed.
        dropped = set()
        for channel, symbol in ((BTC, "BTCUSDT"), (ETH, "ETHUSDT")):
            live = [r.source_sequence for r in rows(msgs, channel) if r.provenance == "live"]
            sent, top = running.sent(symbol)
            dropped |= {
                (channel, i) for i in range(live[0], min(cut[channel], top) + 1) if i not in sent
            }
        assert dropped, "the simulator dropped none inside the window: raise drop="
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            filled = {
                (ch, r.source_sequence)
                for ch in (BTC, ETH)
                for r in rows(msgs, ch)
                if r.provenance == "backfill"
            }
            closed = [m for m in msgs if isinstance(m, Gap) and m.status == "backfilled"]
            if dropped <= filled and closed:
                break
            msgs += await c.read_for(1.0)
        gaps = [m for m in msgs if isinstance(m, Gap)]
        opened = {g.event_id for g in gaps if g.status == "open"}
        closed_ids = {g.event_id for g in gaps if g.status == "backfilled"}
        assert dropped <= filled, "the backfilled rows arrived"
        assert opened and opened & closed_ids, "a gap was marked open, then closed"
        for g in gaps:
            if g.kind == "gap" and g.status == "backfilled":
                # A closed gap's rows were streamed before its closing marker.
                assert g.first_missing is not None and g.last_missing is not None
                ids = range(g.first_missing, g.last_missing + 1)
                assert all((g.channel, i) in filled for i in ids if (g.channel, i) in dropped)


async def test_since_joins_stored_rows_to_live_each_once(running: Daemon) -> None:
    """since=-12s while the writer commits every 0.3 s: the stored ids, then the live ones,
    each once, in sequence order (backfilled ones when they land)."""
    await anyio.sleep(max(0.0, 14.0 - (time.monotonic() - running.started)))
    async with connect(running.url) as c:
        asked = time.time()
        await c.send(op="subscribe", channels=[BTC], since="-12s", id=2)
        ack = await c.recv()
        assert isinstance(ack, Ack) and ack.since is not None
        msgs = await c.read_for(3.0)
        got = rows(msgs, BTC)
        top = max(r.source_sequence for r in got)
        first = got[0].source_sequence
        # Whatever the venue dropped inside the range comes as backfill: wait for it.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ids = {r.source_sequence for r in got}
            if set(range(first, top + 1)) <= ids:
                break
            msgs += await c.read_for(1.0)
            got = rows(msgs, BTC)
    counts = Counter(r.source_sequence for r in got)
    assert not [i for i, n in counts.items() if n > 1], "no id twice"
    assert set(range(first, top + 1)) <= set(counts), "no id missing"
    assert sum(1 for r in got if r.provenance != "backfill" and r.source_sequence <= top) > 1_000
    stored_and_live = [r.source_sequence for r in got if r.provenance != "backfill"]
    assert stored_and_live == sorted(stored_and_live)
    start = time.mktime(time.strptime(got[0].timestamp[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert asked - 13.5 < start < asked - 10.5, "history starts at since"


def _small_buffer_socket(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4_096)
    sock.connect(("127.0.0.1", port))
    return sock


async def test_a_stalled_client_is_closed_and_nothing_else_slows(running: Daemon) -> None:
    channels = [BTC, ETH, *QUOTES]
    async with (
        # What a client and the kernel buffer is out of the server's hands (several MB on
        # loopback): this client buffers little (its library one message, its socket 4 KiB).
        connect(running.url, sock=_small_buffer_socket(running.port), max_queue=1) as slow,
        connect(running.url) as fast,
    ):
        await fast.send(op="subscribe", channels=channels)
        await fast.recv()
        records0, t0 = running.metric("k2d_feed_records_total"), time.monotonic()
        await fast.read_for(2.0)
        before = (running.metric("k2d_feed_records_total") - records0) / (time.monotonic() - t0)
        # The slow client joins with half a minute of history, and reads nothing after its
        # ack: the history fills the socket buffers at once, then live rows pile up.
        slow_before = running.metric("k2d_ws_slow_closed_total")
        await slow.send(op="subscribe", channels=channels, since="-30s")
        await slow.recv()
        stalled = time.monotonic()
        records1 = running.metric("k2d_feed_records_total")
        closed_after = None
        msgs: list[ServerMessage] = []
        ended: list[BaseException] = []

        async def drain_slow() -> None:
            # Reading again, the slow client finds the rows in flight, then why it closed.
            try:
                while True:
                    await slow.recv()
            except ConnectionClosed as exc:
                ended.append(exc)

        async with anyio.create_task_group() as tg:
            while time.monotonic() - stalled < 6.0:
                msgs += await fast.read_for(0.2)
                closed = await anyio.to_thread.run_sync(running.metric, "k2d_ws_slow_closed_total")
                if closed_after is None and closed > slow_before:
                    closed_after = time.monotonic() - stalled
                    tg.start_soon(drain_slow)
        during = (running.metric("k2d_feed_records_total") - records1) / (
            time.monotonic() - stalled
        )
        assert closed_after is not None and closed_after < 5.0, closed_after
        assert during > 0.8 * before, f"ingest {before:.0f}/s before, {during:.0f}/s during"
        live = [r.source_sequence for r in rows(msgs, BTC) if r.provenance == "live"]
        sent, top = running.sent("BTCUSDT")
        window = set(range(live[0], min(live[-1], top) + 1))
        assert live == sorted(live) and set(live) & window == sent & window
        assert ended and isinstance(ended[0], ConnectionClosed)
        assert ended[0].rcvd is not None and ended[0].rcvd.code == 4408
        last = decode_server(slow.raw[-1])
        assert isinstance(last, Error) and last.code == "slow_consumer"


async def test_replay_at_speed_10_with_pause_resume_and_seek(running: Daemon) -> None:
    # The window needs 12 s of capture behind it. The module's daemon may have just started:
    # this test can run first in its worker (pytest-xdist deals a module's tests to both).
    await anyio.sleep(max(0.0, 14.0 - (time.monotonic() - running.started)))
    now = int(time.time() * 1_000)
    start, end = now - 12_000, now - 4_000  # 8 s, committed by now
    async with connect(running.url) as c:
        began = time.monotonic()
        await c.send(op="replay", channels=[BTC, *QUOTES[:1]], start=start, end=end, speed=10)
        assert isinstance(await c.recv(), Ack)
        msgs: list[ServerMessage] = []
        while not (msgs and isinstance(msgs[-1], End | Error)):
            msgs.append(await c.recv())
        took = time.monotonic() - began
        assert isinstance(msgs[-1], End)
        assert 0.4 < took < 2.5, f"8 s of data at speed 10 took {took:.2f}s"
        replayed = rows(msgs, BTC) + rows(msgs, QUOTES[0])
        assert len(replayed) > 3_000
        stamps = [r.timestamp for m in msgs if isinstance(m, Trades | Quotes) for r in m.rows]
        assert stamps == sorted(stamps)
        # Pause, resume and seek, on a slower replay of the same window.
        await c.send(op="replay", channels=[BTC], start=start, end=end, speed=1)
        await c.recv()
        await anyio.sleep(0.5)
        await c.send(op="pause", id="p")
        while not isinstance(await c.recv(), Ack):
            pass
        with pytest.raises(TimeoutError):
            await c.recv(wait=0.7)
        await c.send(op="resume", id="r")
        await c.send(op="seek", to=end - 500, id="s")
        after: list[ServerMessage] = []
        while not (after and isinstance(after[-1], End)):
            after.append(await c.recv())
        acks = [m for m in after if isinstance(m, Ack)]
        assert [a.op for a in acks] == ["resume", "seek"]
        sought = rows(after[after.index(acks[-1]) :], BTC)
        assert sought and all(r.timestamp >= acks[-1].at for r in sought)  # type: ignore[operator]


async def test_a_limit_from_the_config_closes_with_its_code(running: Daemon) -> None:
    async with connect(running.url) as c:
        await c.send(op="subscribe", channels=[BTC, ETH, *QUOTES, "trades:BINANCE:SOLUSDT"])
        with pytest.raises(ConnectionClosed) as info:  # noqa: PT012
            while True:
                await c.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 4422
    last = decode_server(c.raw[-1])
    assert isinstance(last, Error) and last.code == "too_many_subscriptions"


async def test_a_peer_that_answers_no_ping_is_closed(running: Daemon) -> None:
    """A dead peer: the handshake, then silence (no pong, no close). The heartbeat finds it."""
    clients = running.metric("k2d_ws_clients")
    with socket.create_connection(("127.0.0.1", running.port), timeout=20) as raw:
        raw.sendall(
            b"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        assert raw.recv(4096).startswith(b"HTTP/1.1 101")
        opened = time.monotonic()
        received = b""
        while chunk := await anyio.to_thread.run_sync(raw.recv, 65536):
            received += chunk
        closed_after = time.monotonic() - opened
    # What came before the end: pings (opcode 0x9), then a close (0x8) with 1011.
    assert received[:1] == b"\x89", received[:16]
    close_at = received.rfind(b"\x88")
    assert close_at >= 0 and received[close_at + 2 : close_at + 4] == (1011).to_bytes(2, "big")
    assert closed_after < 12.0, closed_after
    deadline = time.monotonic() + 5
    while running.metric("k2d_ws_clients") > clients and time.monotonic() < deadline:
        await anyio.sleep(0.1)
    assert running.metric("k2d_ws_clients") <= clients
