"""The Binance venue simulator, driven by real WebSocket and HTTP clients on 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus

from k2d.simulator import Simulator, SimulatorOptions, parse_faults

DECIMAL8 = re.compile(r"[0-9]+\.[0-9]{8}")
TRADE_FIELDS = ["e", "E", "s", "t", "p", "q", "T", "m", "M"]
QUOTE_FIELDS = ["u", "s", "b", "B", "a", "A"]
DAY_MS = 86_400_000


@asynccontextmanager
async def venue(**overrides: Any) -> AsyncIterator[Simulator]:
    options = SimulatorOptions(**{"rate": 2000.0, **overrides})
    async with Simulator(options) as simulator:
        yield simulator


@asynccontextmanager
async def stream(url: str, **kwargs: Any) -> AsyncIterator[ClientConnection]:
    """A client connection that keeps reading while it closes, as a real consumer does."""
    ws = await connect(url, **kwargs)
    try:
        yield ws
    finally:
        drain = asyncio.create_task(read_all(ws))
        await ws.close()
        await drain


async def receive_json(ws: ClientConnection, within: float = 3.0) -> Any:
    async with asyncio.timeout(within):
        return json.loads(await ws.recv())


async def receive_until(
    ws: ClientConnection, done: Any, within: float = 5.0, limit: int = 100_000
) -> list[Any]:
    """Decoded messages up to and including the first for which done(message) is true."""
    seen: list[Any] = []
    async with asyncio.timeout(within):
        while len(seen) < limit:
            seen.append(json.loads(await ws.recv()))
            if done(seen[-1]):
                return seen
    raise AssertionError("condition not met")


async def read_all(ws: ClientConnection) -> list[str]:
    """Every text frame until the connection closes."""
    frames: list[str] = []
    try:
        async for message in ws:
            assert isinstance(message, str)
            frames.append(message)
    except ConnectionClosed:
        pass
    return frames


def valid_trade(frame: str, symbols: set[str]) -> dict[str, Any] | None:
    """The trade a careful client would accept from a raw frame, or None if it is junk."""
    try:
        data = json.loads(frame)
    except ValueError:
        return None
    data = data.get("data", data)
    if list(data) != TRADE_FIELDS or data["s"] not in symbols:
        return None
    if not DECIMAL8.fullmatch(data["p"]) or float(data["p"]) <= 0:
        return None
    if abs(data["T"] - time.time() * 1000) > DAY_MS / 2:
        return None
    return data  # type: ignore[no-any-return]


async def test_combined_stream_wraps_trade_and_book_ticker_payloads() -> None:
    async with (
        venue() as sim,
        stream(f"{sim.ws_url}/stream?streams=btcusdt@trade/btcusdt@bookTicker") as ws,
    ):
        messages = await receive_until(ws, lambda m: m["stream"] == "btcusdt@bookTicker", within=3)
        messages += await receive_until(ws, lambda m: m["stream"] == "btcusdt@trade")

    trades = [m["data"] for m in messages if m["stream"] == "btcusdt@trade"]
    quotes = [m["data"] for m in messages if m["stream"] == "btcusdt@bookTicker"]
    assert all(list(m) == ["stream", "data"] for m in messages)
    assert trades
    assert quotes
    for trade in trades:
        assert list(trade) == TRADE_FIELDS
        assert trade["e"] == "trade"
        assert trade["s"] == "BTCUSDT"
        assert DECIMAL8.fullmatch(trade["p"])
        assert float(trade["p"]) > 0
        assert DECIMAL8.fullmatch(trade["q"])
        assert float(trade["q"]) > 0
        assert isinstance(trade["t"], int)
        assert isinstance(trade["m"], bool)
        assert trade["M"] is True
        assert abs(trade["T"] - time.time() * 1000) < 10_000  # milliseconds, now
        assert trade["E"] >= trade["T"]
    for quote in quotes:
        assert list(quote) == QUOTE_FIELDS
        assert quote["s"] == "BTCUSDT"
        assert all(DECIMAL8.fullmatch(quote[k]) for k in "bBaA")
        assert 0 < float(quote["b"]) < float(quote["a"])
        assert isinstance(quote["u"], int)


async def test_raw_stream_sends_unwrapped_payloads() -> None:
    async with venue() as sim, stream(f"{sim.ws_url}/ws/ethusdt@trade") as ws:
        first = await receive_json(ws)
        second = await receive_json(ws)

    assert list(first) == TRADE_FIELDS
    assert first["s"] == "ETHUSDT"
    assert second["t"] == first["t"] + 1


async def test_book_ticker_update_ids_grow_but_skip() -> None:
    async with (
        venue(quotes_per_trade=2.0) as sim,
        stream(f"{sim.ws_url}/ws/btcusdt@bookTicker/ethusdt@bookTicker") as ws,
    ):
        quotes = [await receive_json(ws) for _ in range(60)]

    ids = [q["u"] for q in quotes]
    assert ids == sorted(set(ids))
    assert any(b - a > 1 for a, b in itertools.pairwise(ids))
    assert {q["s"] for q in quotes} == {"BTCUSDT", "ETHUSDT"}


async def test_live_subscribe_list_and_unsubscribe() -> None:
    async with venue() as sim, stream(f"{sim.ws_url}/ws") as ws:
        await ws.send('{"method":"SUBSCRIBE","params":["btcusdt@trade"],"id":1}')
        subscribed = await receive_json(ws)
        trade = await receive_json(ws)
        await ws.send('{"method":"LIST_SUBSCRIPTIONS","id":3}')
        listed = await receive_until(ws, lambda m: "id" in m and "result" in m)
        await ws.send('{"method":"UNSUBSCRIBE","params":["btcusdt@trade"],"id":4}')
        unsubscribed = await receive_until(ws, lambda m: m.get("id") == 4)
        with pytest.raises(TimeoutError):
            await receive_json(ws, within=0.3)

    assert subscribed == {"result": None, "id": 1}
    assert trade["e"] == "trade"
    assert trade["s"] == "BTCUSDT"
    assert listed[-1] == {"result": ["btcusdt@trade"], "id": 3}
    assert unsubscribed[-1] == {"result": None, "id": 4}


async def test_subscribe_on_combined_endpoint_wraps_new_streams() -> None:
    async with venue() as sim, stream(f"{sim.ws_url}/stream") as ws:
        await ws.send('{"method":"SUBSCRIBE","params":["ethusdt@trade"],"id":7}')
        reply = await receive_json(ws)
        message = await receive_json(ws)
        await ws.send('{"method":"LIST_SUBSCRIPTIONS","id":8}')
        listed = await receive_until(ws, lambda m: m.get("id") == 8)

    assert reply == {"result": None, "id": 7}
    assert message["stream"] == "ethusdt@trade"
    assert message["data"]["s"] == "ETHUSDT"
    assert listed[-1] == {"result": ["ethusdt@trade"], "id": 8}


@pytest.mark.parametrize(
    ("request_text", "code", "request_id"),
    [
        ("{not json", 3, None),
        ('{"method":"SUBSCRIBE","params":["BTCUSDT@trade"],"id":5}', 2, 5),
        ('{"method":"SUBSCRIBE","params":"btcusdt@trade","id":6}', 2, 6),
        ('{"method":"FLY","id":7}', 2, 7),
        ('{"method":"SUBSCRIBE","params":[],"id":-1}', 2, None),
    ],
)
async def test_bad_requests_get_binance_style_errors(
    request_text: str, code: int, request_id: int | None
) -> None:
    async with venue(rate=0.0) as sim, stream(f"{sim.ws_url}/ws") as ws:
        await ws.send(request_text)
        reply = await receive_json(ws)

    assert list(reply) == ["error", "id"]
    assert reply["error"]["code"] == code
    assert reply["error"]["msg"]
    assert reply["id"] == request_id


async def test_bad_stream_url_is_refused_at_handshake() -> None:
    async with venue(rate=0.0) as sim:
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"{sim.ws_url}/ws/BTCUSDT@trade")
        async with httpx.AsyncClient() as http:
            unknown = await http.get(f"{sim.url}/nothing/here")

    assert refused.value.response.status_code == 400
    assert unknown.status_code == 404


async def test_trade_ids_are_contiguous_per_symbol() -> None:
    async with (
        venue(rate=3000.0) as sim,
        stream(f"{sim.ws_url}/ws/btcusdt@trade/ethusdt@trade") as ws,
    ):
        trades = [await receive_json(ws) for _ in range(400)]

    for symbol in ("BTCUSDT", "ETHUSDT"):
        ids = [t["t"] for t in trades if t["s"] == symbol]
        assert len(ids) > 50
        assert ids == list(range(ids[0], ids[0] + len(ids)))


async def test_dropped_trade_is_missing_on_the_wire_but_in_rest_history() -> None:
    async with (
        venue(symbols=("BTCUSDT",), faults=parse_faults("drop=0.05")) as sim,
        stream(f"{sim.ws_url}/ws/btcusdt@trade") as ws,
    ):
        received = [(await receive_json(ws))["t"] for _ in range(300)]
        dropped = sim.manifest()["symbols"]["BTCUSDT"]["dropped"]
        missing = sorted(set(range(received[0], received[-1])) - set(received))
        async with httpx.AsyncClient() as http:
            response = await http.get(
                f"{sim.url}/api/v3/historicalTrades",
                params={"symbol": "BTCUSDT", "fromId": missing[0], "limit": 1},
            )

    assert missing
    assert set(missing) <= set(dropped)
    assert response.status_code == 200
    [item] = response.json()
    assert item["id"] == missing[0]
    assert list(item) == [
        "id",
        "price",
        "qty",
        "quoteQty",
        "time",
        "isBuyerMaker",
        "isBestMatch",
    ]


async def test_manifest_matches_what_a_client_received(tmp_path: Path) -> None:
    manifest_path = tmp_path / "manifest.json"
    faults = parse_faults("drop=0.03,dup=0.03,reorder=0.03,malformed=0.03")
    symbols = {"BTCUSDT", "ETHUSDT"}
    async with venue(faults=faults, manifest_path=manifest_path) as sim:
        ws = await connect(f"{sim.ws_url}/stream?streams=btcusdt@trade/ethusdt@trade")
        reader = asyncio.create_task(read_all(ws))
        await asyncio.sleep(1.0)
        await sim.stop()
        frames = await reader
        manifest = sim.manifest()

    assert json.loads(manifest_path.read_text()) == manifest
    assert json.loads(frames[-1]) == {"e": "serverShutdown", "E": json.loads(frames[-1])["E"]}
    assert ws.close_code == 1001
    trades = [t for f in frames[:-1] if (t := valid_trade(f, symbols)) is not None]
    assert manifest["malformed_frames"] == len(frames) - 1 - len(trades) > 0
    for symbol in symbols:
        entry = manifest["symbols"][symbol]
        arrived = [t["t"] for t in trades if t["s"] == symbol]
        first, last = entry["first_trade_id"], entry["last_trade_id"]
        assert arrived[0] == first
        assert arrived[-1] == last
        expected = Counter(range(first, last + 1))
        for trade_id in entry["dropped"]:
            expected[trade_id] = 0
        for trade_id in entry["duplicated"]:
            expected[trade_id] = 2
        assert Counter(arrived) == +expected
        assert entry["dropped"]
        assert entry["duplicated"]
        assert entry["reordered"]
        for trade_id in entry["reordered"]:
            position = arrived.index(trade_id)
            assert max(arrived[:position]) > trade_id  # a later trade overtook it
        in_order = [i for i in dict.fromkeys(arrived) if i not in entry["reordered"]]
        assert in_order == sorted(in_order)


async def test_malformed_frames_rotate_kinds_and_take_no_trade_id() -> None:
    async with (
        venue(symbols=("BTCUSDT",), faults=parse_faults("malformed=1")) as sim,
        stream(f"{sim.ws_url}/ws/btcusdt@trade") as ws,
    ):
        frames = [await ws.recv() for _ in range(40)]

    assert isinstance(frames[0], str)
    good = [t for f in frames if isinstance(f, str) and (t := valid_trade(f, {"BTCUSDT"}))]
    junk = [f for f in frames if isinstance(f, str) and valid_trade(f, {"BTCUSDT"}) is None]
    ids = [t["t"] for t in good]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    parsed = []
    for frame in junk:
        try:
            parsed.append(json.loads(frame))
        except ValueError:
            parsed.append(None)
    assert None in parsed  # not JSON at all
    junk_objects = [p for p in parsed if p is not None]
    assert any("p" not in p for p in junk_objects)
    prices = {p["p"] for p in junk_objects if "p" in p}
    assert any(not DECIMAL8.fullmatch(price.lstrip("-")) for price in prices)
    assert "0.00000000" in prices
    assert any(price.startswith("-") for price in prices)
    assert any(p["s"] != "BTCUSDT" for p in junk_objects)
    assert any(abs(p["T"] - time.time() * 1000) > DAY_MS / 2 for p in junk_objects)
    assert {p["t"] for p in junk_objects} <= set(ids)


async def test_same_seed_generates_the_same_trades() -> None:
    async def first_trades(seed: int) -> list[tuple[Any, ...]]:
        async with venue(seed=seed, rate=5000.0) as sim, httpx.AsyncClient() as http:
            async with asyncio.timeout(5):
                while True:
                    response = await http.get(
                        f"{sim.url}/api/v3/historicalTrades",
                        params={"symbol": "ETHUSDT", "fromId": 0, "limit": 200},
                    )
                    items = response.json()
                    if len(items) == 200:
                        break
                    await asyncio.sleep(0.05)
        return [(i["id"], i["price"], i["qty"], i["isBuyerMaker"]) for i in items]

    first = await first_trades(7)
    again = await first_trades(7)
    other = await first_trades(8)

    assert first == again
    assert other != first


async def test_same_seed_makes_the_same_fault_decisions() -> None:
    async def faulted_ids(seed: int) -> tuple[range, dict[str, list[int]]]:
        faults = parse_faults("drop=0.05,dup=0.05,malformed=0.05")
        async with (
            venue(seed=seed, symbols=("BTCUSDT",), faults=faults) as sim,
            stream(f"{sim.ws_url}/ws/btcusdt@trade"),
        ):
            await asyncio.sleep(0.5)
            entry = sim.manifest()["symbols"]["BTCUSDT"]
        observed = range(entry["first_trade_id"] + 1, entry["last_trade_id"] + 1)
        return observed, {kind: entry[kind] for kind in ("dropped", "duplicated")}

    runs = [await faulted_ids(3) for _ in range(2)]

    # Each run observes from its own first subscription on: compare where both overlap.
    common = range(max(r.start for r, _ in runs), min(r.stop for r, _ in runs))
    assert len(common) > 200
    first, again = (
        {kind: [i for i in ids if i in common] for kind, ids in faulted.items()}
        for _, faulted in runs
    )
    assert first == again
    assert first["dropped"]
    assert first["duplicated"]


async def test_planned_stop_sends_server_shutdown_then_going_away() -> None:
    async with venue() as sim:
        ws = await connect(f"{sim.ws_url}/ws/btcusdt@trade")
        reader = asyncio.create_task(read_all(ws))
        await asyncio.sleep(0.2)
        await sim.stop()
        frames = await reader

    last = json.loads(frames[-1])
    assert list(last) == ["e", "E"]
    assert last["e"] == "serverShutdown"
    assert abs(last["E"] - time.time() * 1000) < 10_000
    assert ws.close_code == 1001
    assert sim.manifest()["disconnects"] == 0  # a planned stop is not a forced disconnect


@pytest.mark.parametrize(
    "overrides",
    [
        {"connection_lifetime": 0.3},
        {"faults": parse_faults("disconnect_every=0.3")},
    ],
    ids=["lifetime", "disconnect_every"],
)
async def test_forced_planned_close_sends_server_shutdown(overrides: dict[str, Any]) -> None:
    async with venue(**overrides) as sim:
        ws = await connect(f"{sim.ws_url}/ws/btcusdt@trade")
        async with asyncio.timeout(3):
            frames = await read_all(ws)
        disconnects = sim.manifest()["disconnects"]

    assert json.loads(frames[-1])["e"] == "serverShutdown"
    assert ws.close_code == 1001
    assert disconnects == 1


async def test_reset_aborts_connections_without_close_frame() -> None:
    async with venue(rate=1000.0, faults=parse_faults("reset=0.02")) as sim:
        ws = await connect(f"{sim.ws_url}/ws/btcusdt@trade")

        async def read_trades_until_closed() -> None:
            async with asyncio.timeout(5):
                while True:
                    message = json.loads(await ws.recv())
                    assert message.get("e") == "trade"

        with pytest.raises(ConnectionClosedError) as closed:
            await read_trades_until_closed()
        disconnects = sim.manifest()["disconnects"]

    assert closed.value.rcvd is None  # no close frame: the TCP connection just ended
    assert disconnects >= 1


async def test_rest_trades_and_errors_carry_weight_header() -> None:
    async with venue(rate=20000.0) as sim, httpx.AsyncClient(base_url=sim.url) as http:
        await asyncio.sleep(0.2)
        default = await http.get("/api/v3/trades", params={"symbol": "BTCUSDT"})
        five = await http.get("/api/v3/trades", params={"symbol": "BTCUSDT", "limit": 5})
        unknown = await http.get("/api/v3/trades", params={"symbol": "DOGEBTC"})
        too_many = await http.get("/api/v3/trades", params={"symbol": "BTCUSDT", "limit": 1001})
        missing = await http.get("/api/v3/historicalTrades")

    assert default.status_code == 200
    assert len(default.json()) == 500
    ids = [item["id"] for item in five.json()]
    assert ids == list(range(ids[0], ids[0] + 5))
    assert ids[0] > default.json()[-1]["id"] - 5
    assert (unknown.status_code, unknown.json()) == (400, {"code": -1121, "msg": "Invalid symbol."})
    assert too_many.status_code == 400
    assert too_many.json()["code"] <= -1100
    assert missing.status_code == 400
    assert missing.json()["code"] == -1102
    used = [int(r.headers["X-MBX-USED-WEIGHT-1M"]) for r in (default, five, unknown, too_many)]
    assert used == [25, 50, 75, 100]


async def test_over_the_weight_limit_is_429_then_418_when_ignored() -> None:
    if 60 - time.time() % 60 < 3:  # stay inside one wall-clock minute window
        await asyncio.sleep(60 - time.time() % 60 + 0.1)
    params: dict[str, str | int] = {"symbol": "BTCUSDT", "limit": 1}
    async with venue(weight_limit=50) as sim, httpx.AsyncClient(base_url=sim.url) as http:
        responses = [await http.get("/api/v3/trades", params=params) for _ in range(4)]

    assert [r.status_code for r in responses] == [200, 200, 429, 418]
    assert [r.headers["X-MBX-USED-WEIGHT-1M"] for r in responses[:2]] == ["25", "50"]
    assert 1 <= int(responses[2].headers["Retry-After"]) <= 60
    assert int(responses[3].headers["Retry-After"]) >= 1
    assert responses[2].json()["code"] == -1003


async def test_history_not_reaching_back_starts_at_oldest_retained() -> None:
    async with (
        venue(history_size=100, symbols=("BTCUSDT",)) as sim,
        httpx.AsyncClient(base_url=sim.url) as http,
    ):
        await asyncio.sleep(0.2)
        response = await http.get(
            "/api/v3/historicalTrades",
            params={"symbol": "BTCUSDT", "fromId": 1, "limit": 1000},
        )
    items = response.json()
    ids = [item["id"] for item in items]
    assert response.status_code == 200
    assert len(ids) == 100
    assert ids[0] > 1
    assert ids == list(range(ids[0], ids[0] + 100))


async def test_silent_client_is_dropped_after_ping_timeout() -> None:
    async with venue(rate=0.0, ping_interval=0.2, ping_timeout=0.3) as sim:
        # A raw socket speaks the handshake and then never answers a ping.
        reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        started = time.monotonic()
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            rest = await reader.read()  # until the server ends the connection
        elapsed = time.monotonic() - started
        writer.close()

        # A client that answers pings stays connected over the same period.
        async with stream(f"{sim.ws_url}/ws", ping_interval=None) as polite:
            await asyncio.sleep(1.0)
            await polite.send('{"method":"LIST_SUBSCRIPTIONS","id":1}')
            still_open = await receive_json(polite)

    assert head.startswith(b"HTTP/1.1 101")
    opcodes = []
    while rest:
        opcode, size = rest[0] & 0x0F, rest[1] & 0x7F
        opcodes.append((opcode, rest[2 : 2 + size]))
        rest = rest[2 + size :]
    assert opcodes[0][0] == 0x9  # ping
    assert opcodes[-1][0] == 0x8  # close
    assert struct.unpack("!H", opcodes[-1][1][:2])[0] == 1011  # keepalive ping timeout
    assert 0.4 < elapsed < 2.5
    assert still_open == {"result": [], "id": 1}


def _simulate_command(*args: str) -> list[str]:
    code = (
        "import argparse, sys\n"
        "from k2d.simulator import add_arguments, run_from_args\n"
        "parser = argparse.ArgumentParser()\n"
        "add_arguments(parser)\n"
        "sys.exit(run_from_args(parser.parse_args(sys.argv[1:])))\n"
    )
    return [sys.executable, "-c", code, *args]


async def test_cli_runs_until_sigterm_and_writes_the_manifest(tmp_path: Path) -> None:
    manifest_path = tmp_path / "manifest.json"
    command = _simulate_command("--port", "0", "--rate", "500", "--manifest", str(manifest_path))
    proc = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(10):
            line = (await proc.stdout.readline()).decode()
        match = re.fullmatch(r"simulator listening on (ws://127\.0\.0\.1:\d+)\n", line)
        assert match, line
        async with stream(f"{match.group(1)}/ws/btcusdt@trade") as ws:
            await receive_json(ws)
            proc.send_signal(signal.SIGTERM)
            frames = await read_all(ws)
        async with asyncio.timeout(10):
            code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    assert code == 0
    assert json.loads(frames[-1])["e"] == "serverShutdown"
    manifest = json.loads(manifest_path.read_text())
    assert set(manifest) == {"symbols", "malformed_frames", "disconnects"}
    assert manifest["symbols"]["BTCUSDT"]["last_trade_id"] == json.loads(frames[-2])["t"]


def test_cli_rejects_unknown_fault_with_exit_code_2() -> None:
    result = subprocess.run(
        _simulate_command("--faults", "drop=0.1,explode=1", "--exit-after", "1"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 2
    assert "explode" in result.stderr


async def test_huge_id_and_id_jump_frames_take_no_trade_id() -> None:
    faults = parse_faults("huge_id=0.2,id_jump=0.2")
    async with (
        venue(symbols=("BTCUSDT",), seed=11, faults=faults) as sim,
        stream(f"{sim.ws_url}/ws/btcusdt@trade") as ws,
    ):
        frames = [json.loads(await ws.recv()) for _ in range(200)]
        malformed = sim.manifest()["malformed_frames"]

    ids = [f["t"] for f in frames]
    huge = [i for i in ids if i == 2**64 - 1]
    real = [i for i in ids if i < ids[0] + 1_000]
    jumps = [i for i in ids if i not in huge and i not in real]
    assert real == list(range(ids[0], ids[0] + len(real)))
    assert huge and jumps
    assert {i - 1_000_000 for i in jumps} <= set(real)
    assert all(valid_trade(json.dumps(f), {"BTCUSDT"}) for f in frames)  # well-formed frames
    assert malformed >= len(huge)  # the huge ids are what a client must dead-letter


@pytest.mark.parametrize("after", [0.0, 0.3])
async def test_shutdown_after_closes_every_new_connection(after: float) -> None:
    async with venue(symbols=("BTCUSDT",), faults=parse_faults(f"shutdown_after={after}")) as sim:
        closes = []
        for _ in range(2):
            ws = await connect(f"{sim.ws_url}/ws/btcusdt@trade")
            async with asyncio.timeout(3):
                frames = [json.loads(f) for f in await read_all(ws)]
            closes.append((frames, ws.close_code))
        connections = len(sim.connection_times)
        disconnects = sim.manifest()["disconnects"]

    for frames, code in closes:
        assert frames[-1]["e"] == "serverShutdown"
        assert code == 1001
        trades = [f for f in frames if f.get("e") == "trade"]
        assert (len(trades) > 0) is (after > 0)
    assert connections == disconnects == 2


async def test_rest_ban_answers_the_first_request_418_with_retry_after() -> None:
    params: dict[str, str | int] = {"symbol": "BTCUSDT", "limit": 1}
    async with (
        venue(faults=parse_faults("rest_ban=1")) as sim,
        httpx.AsyncClient(base_url=sim.url) as http,
    ):
        banned = await http.get("/api/v3/historicalTrades", params=params)
        still = await http.get("/api/v3/historicalTrades", params=params)
        await asyncio.sleep(float(banned.headers["Retry-After"]) + 0.1)
        after = await http.get("/api/v3/historicalTrades", params=params)
        log = sim.rest_requests

    assert (banned.status_code, banned.json()["code"]) == (418, -1003)
    assert banned.headers["Retry-After"] == "1"
    assert still.status_code == 418
    assert after.status_code == 200
    assert [(path, status) for _, path, _, status in log] == [
        ("/api/v3/historicalTrades", 418),
        ("/api/v3/historicalTrades", 418),
        ("/api/v3/historicalTrades", 200),
    ]


async def test_bad_history_rows_are_served_bad_on_rest_only() -> None:
    async def run(seed: int) -> tuple[dict[int, str], list[dict[str, Any]], set[int]]:
        faults = parse_faults("bad_history=0.1")
        async with (
            venue(symbols=("BTCUSDT",), seed=seed, faults=faults) as sim,
            httpx.AsyncClient(base_url=sim.url) as http,
            stream(f"{sim.ws_url}/ws/btcusdt@trade") as ws,
        ):
            live = {json.loads(await ws.recv())["t"] for _ in range(300)}
            await sim.close_market()
            items = (
                await http.get(
                    "/api/v3/historicalTrades",
                    params={"symbol": "BTCUSDT", "fromId": 0, "limit": 1000},
                )
            ).json()
            return sim.bad_history_rows("BTCUSDT"), items, live

    bad, items, live = await run(5)
    again, _, _ = await run(5)

    assert bad and set(bad.values()) == {
        "non_numeric_price",
        "zero_price",
        "too_many_digits",
        "negative_time",
        "far_time",
        "huge_id",
    }
    upto = min(max(bad), max(again))
    assert {i: k for i, k in bad.items() if i <= upto} == {
        i: k for i, k in again.items() if i <= upto
    }  # the same seed spoils the same rows
    first = items[0]["id"]
    served = {first + n: item for n, item in enumerate(items)}
    spoilt: dict[str, Callable[[dict[str, Any]], bool]] = {
        "non_numeric_price": lambda item: item["price"] == "not-a-price",
        "zero_price": lambda item: item["price"] == "0.00000000",
        "too_many_digits": lambda item: len(item["price"].split(".")[0]) > 10,
        "negative_time": lambda item: item["time"] < 0,
        "far_time": lambda item: item["time"] >= 253_402_300_800_000,  # year 10000
        "huge_id": lambda item: item["id"] == 2**64 - 1,
    }
    for trade_id, kind in bad.items():
        item = served[trade_id]
        assert spoilt[kind](item), (kind, item)
        assert item["id"] == trade_id or kind == "huge_id"
    clean = [item for i, item in served.items() if i not in bad]
    assert all(DECIMAL8.fullmatch(item["price"]) for item in clean)
    assert set(bad) & live  # the same trades went out on the wire unharmed
