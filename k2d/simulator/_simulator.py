"""The simulated Binance spot venue: market streams (WebSocket) and trade history (REST) on
one loopback port, with the seeded fault injection and the manifest that describes it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, unquote

import msgspec
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response
from websockets.protocol import State

from k2d.simulator._history import BAD_ROW_KINDS
from k2d.simulator._ledger import SymbolLedger, encode_manifest, write_atomically
from k2d.simulator._market import Market, SymbolMarket
from k2d.simulator._options import SimulatorOptions
from k2d.simulator._rest import RequestWeights, RestApi
from k2d.simulator._wire import (
    HUGE_ID,
    ID_JUMP,
    JUNK_KINDS,
    combined_prefix,
    encode_error,
    encode_junk,
    encode_quote,
    encode_result,
    encode_shutdown,
    encode_trade,
    text_frame,
)

logger = logging.getLogger(__name__)

_TICK = 0.01  # seconds between generation bursts
_MAX_LAG = 0.1  # a host too slow for --rate forgets backlog beyond this, rather than burst
_MAX_STREAMS = 1024  # per connection, as Binance
_MAX_CONNECTIONS = 256
_MAX_SEND_BUFFER = 32 * 2**20  # a client this far behind is cut off, as a venue does
_MAX_REQUEST_BYTES = 2**16
_CLOSE_TIMEOUT = 2.0
_STREAM = re.compile(r"[a-z0-9]+@(?:trade|bookTicker)")
_METHODS = "`SUBSCRIBE`, `UNSUBSCRIBE`, `LIST_SUBSCRIPTIONS`"
_MAX_LOG = 10_000  # connections and REST requests remembered for tests


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class _Route:
    combined: bool
    streams: tuple[str, ...]


def _parse_route(path: str, query: str) -> _Route | str | None:
    """Streams named in a WebSocket URL; an error text if malformed; None if not a stream URL."""
    if path == "/ws" or path.startswith("/ws/"):
        combined, names = False, [unquote(name) for name in path[4:].split("/") if name]
    elif path in ("/stream", "/stream/"):
        combined, names = True, []
        for key, value in parse_qsl(query, max_num_fields=8):
            if key == "streams":
                names.extend(name for name in value.split("/") if name)
    else:
        return None
    for name in names:
        if not _STREAM.fullmatch(name):
            return f"Invalid stream name {name!r}: expected <lowercase symbol>@trade|bookTicker"
    if len(names) > _MAX_STREAMS:
        return f"Too many streams: at most {_MAX_STREAMS} per connection"
    return _Route(combined, tuple(dict.fromkeys(names)))


class _Client:
    """One WebSocket connection: its streams and the frames queued for it during a tick."""

    __slots__ = ("active", "combined", "conn", "pending", "streams")

    def __init__(self, conn: ServerConnection, combined: bool) -> None:
        self.conn = conn
        self.combined = combined  # /stream wraps payloads as {"stream":..,"data":..}
        self.streams: dict[str, None] = {}  # ordered set, in subscription order
        self.pending: list[bytes] = []
        self.active = True  # false once closing: no more frames are queued for it


class _SymbolWire:
    """Per-symbol wire state: stream names, the held (reordered) trade, the ledger."""

    __slots__ = (
        "bad_rows",
        "held",
        "ledger",
        "market",
        "quote_prefix",
        "quote_stream",
        "trade_prefix",
        "trade_stream",
    )

    def __init__(self, market: SymbolMarket, ledger: SymbolLedger) -> None:
        self.market = market
        self.ledger = ledger
        lower = market.symbol.lower()
        self.trade_stream = f"{lower}@trade"
        self.quote_stream = f"{lower}@bookTicker"
        self.trade_prefix = combined_prefix(self.trade_stream)
        self.quote_prefix = combined_prefix(self.quote_stream)
        self.held: tuple[int, bytes] | None = None
        self.bad_rows: dict[int, str] = {}  # history rows served bad (bounded like the ledger)


class Simulator:
    """A Binance spot venue on loopback: `async with Simulator(options) as venue: ...`."""

    def __init__(self, options: SimulatorOptions) -> None:
        self._options = options
        self._market = Market(options.symbols, options.seed, options.history_size)
        self._wires = tuple(
            _SymbolWire(market, SymbolLedger(options.max_manifest_ids, options.record_quotes))
            for market in self._market.symbols
        )
        self._fault_rng = random.Random(f"k2d-simulator-faults:{options.seed}")
        faults = options.faults
        self._p_drop = faults.drop
        self._p_dup = faults.dup
        self._p_reorder = faults.reorder
        self._p_malformed = faults.malformed
        self._p_reset = faults.reset
        self._p_huge_id = faults.huge_id
        self._p_id_jump = faults.id_jump
        self._p_bad_history = faults.bad_history
        self._any_fault = any(
            (
                faults.drop,
                faults.dup,
                faults.reorder,
                faults.malformed,
                faults.reset,
                faults.huge_id,
                faults.id_jump,
                faults.bad_history,
            )
        )
        self._bad_row_counter = 0
        weights = RequestWeights(
            options.weight_limit, options.ban_seconds, first_ban=faults.rest_ban
        )
        histories = {market.symbol: market.history for market in self._market.symbols}
        self._rest = RestApi(histories, weights, options.request_weight)
        self._connection_log: deque[float] = deque(maxlen=_MAX_LOG)
        self._rest_log: deque[tuple[float, str, str, int]] = deque(maxlen=_MAX_LOG)
        self._manifest_lock = asyncio.Lock()
        self._subscribers: dict[str, dict[_Client, None]] = {}
        self._clients: dict[_Client, None] = {}
        self._dirty: list[_Client] = []
        self._quote_credit = 0.0
        self._junk_counter = 0
        self._malformed_frames = 0
        self._disconnects = 0
        self._server: Server | None = None
        self._port: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._manifest_task: asyncio.Task[None] | None = None
        self._accepting = False
        self._stop_started = False
        self._market_closed = False
        self._closing = asyncio.Event()
        self._stopped = asyncio.Event()

    async def __aenter__(self) -> Simulator:
        options = self._options
        self._server = await serve(
            self._handle_connection,
            options.host,
            options.port,
            process_request=self._process_request,
            compression=None,
            ping_interval=options.ping_interval,
            ping_timeout=options.ping_timeout,
            close_timeout=_CLOSE_TIMEOUT,
            max_size=_MAX_REQUEST_BYTES,
            # Zero high-water mark: drain() waits for the whole buffer, so an HTTP response
            # is in the kernel before websockets aborts the transport behind it.
            write_limit=0,
            server_header=None,
        )
        self._port = int(self._server.sockets[0].getsockname()[1])
        self._accepting = True
        self._tasks.append(asyncio.create_task(self._generate()))
        if options.faults.disconnect_every is not None:
            period = options.faults.disconnect_every
            self._tasks.append(asyncio.create_task(self._disconnect_periodically(period)))
        if options.manifest_path is not None:
            self._manifest_task = asyncio.create_task(self._write_manifest_periodically())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the simulator is not started")
        return self._port

    @property
    def url(self) -> str:
        """Base URL of the REST API, e.g. http://127.0.0.1:PORT."""
        return f"http://{self._host()}:{self.port}"

    @property
    def ws_url(self) -> str:
        """Base URL of the market streams, e.g. ws://127.0.0.1:PORT (append /ws or /stream)."""
        return f"ws://{self._host()}:{self.port}"

    @property
    def connection_times(self) -> tuple[float, ...]:
        """time.monotonic() at which each stream connection was accepted (the last 10,000)."""
        return tuple(self._connection_log)

    @property
    def rest_requests(self) -> tuple[tuple[float, str, str, int], ...]:
        """(time.monotonic(), path, query, HTTP status) of each REST request (the last 10,000)."""
        return tuple(self._rest_log)

    def bad_history_rows(self, symbol: str) -> dict[int, str]:
        """Trade id -> how its REST history row is served bad (the `bad_history` fault)."""
        for wire in self._wires:
            if wire.market.symbol == symbol:
                return dict(wire.bad_rows)
        raise KeyError(symbol)

    def manifest(self) -> dict[str, Any]:
        """What was sent and what was faulted so far, in the manifest file's shape."""
        return {
            "symbols": {
                wire.market.symbol: wire.ledger.to_dict(wire.market.history.next_id - 1)
                for wire in self._wires
            },
            "malformed_frames": self._malformed_frames,
            "disconnects": self._disconnects,
        }

    def calm(self) -> None:
        """Stop injecting per-frame faults (drops, resets, junk, ...); the market goes on clean.
        Lets a test end on a settled connection instead of racing the last fault."""
        self._any_fault = False

    async def close_market(self) -> None:
        """Stop trading but keep answering REST, as a venue's history outlives a session:
        final clean trade per symbol, serverShutdown and close 1001 on every connection,
        new stream connections refused, manifest written. Safe to call twice."""
        if self._market_closed:
            return
        self._market_closed = True
        self._accepting = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._finish_streams()
            await asyncio.gather(
                *(self._close_planned(c, "simulator stopping") for c in list(self._clients))
            )
        await self._write_manifest()

    async def stop(self) -> None:
        """Planned stop: close the market (see close_market), then the server and the last
        manifest. Safe to call twice."""
        if self._stop_started:
            await self._stopped.wait()
            return
        self._stop_started = True
        self._closing.set()
        try:
            await self.close_market()
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
            if self._manifest_task is not None:
                await self._manifest_task
                await self._write_manifest()
        finally:
            self._stopped.set()

    def _host(self) -> str:
        host = self._options.host
        return f"[{host}]" if ":" in host else host

    # Generation. Everything below up to the connection handling runs synchronously inside
    # one tick, so frames queued for a client are written in the order they were generated.

    async def _generate(self) -> None:
        rate = self._options.rate
        if rate <= 0:
            return
        loop = asyncio.get_running_loop()
        start = loop.time()
        produced = 0
        burst = max(1, int(rate * _MAX_LAG))
        while True:
            await asyncio.sleep(_TICK)
            due = int((loop.time() - start) * rate) - produced
            if due > burst:
                start += (due - burst) / rate
                due = burst
            if due > 0:
                self._produce(due, _now_ms())
                produced += due

    def _produce(self, count: int, time_ms: int) -> None:
        """Generate `count` trades (and their quotes) and send what subscribers should see."""
        wires = self._wires
        pick = self._market.pick
        per_trade = self._options.quotes_per_trade
        for _ in range(count):
            wire = wires[pick()]
            self._trade(wire, time_ms, clean=False)
            self._quote_credit += per_trade
            while self._quote_credit >= 1.0:
                self._quote_credit -= 1.0
                self._quote(wire)
        self._flush()

    def _trade(self, wire: _SymbolWire, time_ms: int, *, clean: bool) -> None:
        market = self._market
        trade_id, price, qty, maker = wire.market.next_trade(market.rng, time_ms)
        drop = dup = reorder = junk = reset = huge = jump = False
        junk_kind = ""
        if self._any_fault and not clean:
            # Drawn for every trade, subscribed or not: the decisions depend on the seed only.
            # A fault's draw is skipped when it is off, so adding one keeps the others' draws.
            chance = self._fault_rng.random
            drop = self._p_drop > 0 and chance() < self._p_drop
            dup = self._p_dup > 0 and chance() < self._p_dup
            reorder = self._p_reorder > 0 and chance() < self._p_reorder
            junk = self._p_malformed > 0 and chance() < self._p_malformed
            reset = self._p_reset > 0 and chance() < self._p_reset
            huge = self._p_huge_id > 0 and chance() < self._p_huge_id
            jump = self._p_id_jump > 0 and chance() < self._p_id_jump
            if self._p_bad_history > 0 and chance() < self._p_bad_history:
                self._spoil_history(wire, trade_id)
            if junk:
                junk_kind = JUNK_KINDS[self._junk_counter % len(JUNK_KINDS)]
                self._junk_counter += 1
        subscribers = self._subscribers.get(wire.trade_stream)
        if subscribers:
            ledger = wire.ledger
            if ledger.first_trade_id is None:
                # The first observable trade is clean, so a client's range starts exactly here.
                ledger.first_trade_id = trade_id
                drop = dup = reorder = junk = reset = huge = jump = False
            payload = encode_trade(wire.market.symbol, trade_id, price, qty, maker, time_ms)
            held = wire.held
            if drop:
                ledger.record(ledger.dropped, trade_id)
            elif reorder and held is None:
                wire.held = (trade_id, payload)
                ledger.record(ledger.reordered, trade_id)
            else:
                self._deliver(subscribers, wire.trade_prefix, payload, twice=dup)
                if dup:
                    ledger.record(ledger.duplicated, trade_id)
                if held is not None:
                    # A held trade goes out right after the next trade that is actually sent.
                    self._deliver(subscribers, wire.trade_prefix, held[1], twice=False)
                    wire.held = None
            if junk:
                junk_payload = encode_junk(
                    junk_kind, wire.market.symbol, trade_id, price, qty, maker, time_ms
                )
                self._send_junk(wire, subscribers, junk_kind, junk_payload)
            symbol = wire.market.symbol
            if huge:
                # A whole, well-formed trade frame, but its id fits no int64 column.
                extra = encode_trade(symbol, HUGE_ID, price, qty, maker, time_ms)
                self._deliver(subscribers, wire.trade_prefix, extra, twice=False)
                self._malformed_frames += 1
            if jump:
                # A plausible trade far ahead of the sequence, which the venue never had.
                extra = encode_trade(symbol, trade_id + ID_JUMP, price, qty, maker, time_ms)
                self._deliver(subscribers, wire.trade_prefix, extra, twice=False)
        elif wire.held is not None:
            # Nobody is left to see it arrive late: it was never reordered on any wire.
            wire.ledger.unrecord_reordered(wire.held[0])
            wire.held = None
        if reset:
            self._reset_all()

    def _quote(self, wire: _SymbolWire) -> None:
        market = self._market
        bid, bid_qty, ask, ask_qty = wire.market.next_quote(market.rng)
        update_id = market.next_update_id()
        subscribers = self._subscribers.get(wire.quote_stream)
        if subscribers:
            payload = encode_quote(update_id, wire.market.symbol, bid, bid_qty, ask, ask_qty)
            self._deliver(subscribers, wire.quote_prefix, payload, twice=False)
            if wire.ledger.quotes is not None:
                wire.ledger.record(wire.ledger.quotes, update_id)

    def _spoil_history(self, wire: _SymbolWire, trade_id: int) -> None:
        kind = BAD_ROW_KINDS[self._bad_row_counter % len(BAD_ROW_KINDS)]
        self._bad_row_counter += 1
        wire.market.history.spoil(trade_id, kind)
        if len(wire.bad_rows) < self._options.max_manifest_ids:
            wire.bad_rows[trade_id] = kind

    def _send_junk(
        self, wire: _SymbolWire, subscribers: dict[_Client, None], kind: str, payload: bytes
    ) -> None:
        if kind == "bad_json":
            frame = text_frame(payload)  # not even a wrapper parses: same bytes for everyone
            for client in subscribers:
                self._queue(client, frame)
        else:
            self._deliver(subscribers, wire.trade_prefix, payload, twice=False)
        self._malformed_frames += 1

    def _deliver(
        self, subscribers: dict[_Client, None], prefix: bytes, payload: bytes, *, twice: bool
    ) -> None:
        """Queue one payload for every subscriber; each wire form is framed once."""
        raw = wrapped = b""
        for client in subscribers:
            if client.combined:
                if not wrapped:
                    wrapped = text_frame(prefix + payload + b"}")
                frame = wrapped
            else:
                if not raw:
                    raw = text_frame(payload)
                frame = raw
            if not client.pending:
                self._dirty.append(client)
            client.pending.append(frame)
            if twice:
                client.pending.append(frame)

    def _queue(self, client: _Client, frame: bytes) -> None:
        if not client.pending:
            self._dirty.append(client)
        client.pending.append(frame)

    def _flush(self) -> None:
        """Write each client's queued frames in one write: one syscall per client per tick."""
        for client in self._dirty:
            conn = client.conn
            if client.active and conn.protocol.state is State.OPEN:
                transport = conn.transport
                transport.write(b"".join(client.pending))
                if transport.get_write_buffer_size() > _MAX_SEND_BUFFER:
                    logger.warning("dropping a client more than %d bytes behind", _MAX_SEND_BUFFER)
                    self._detach(client)
                    transport.abort()
            client.pending.clear()
        self._dirty.clear()

    def _finish_streams(self) -> None:
        """On a planned stop: release held trades, then one clean final trade per symbol."""
        time_ms = _now_ms()
        for wire in self._wires:
            if wire.held is not None:
                trade_id, payload = wire.held
                wire.held = None
                subscribers = self._subscribers.get(wire.trade_stream)
                if subscribers:
                    self._deliver(subscribers, wire.trade_prefix, payload, twice=False)
                # Sent before any later trade, so it is in order on the wire after all.
                wire.ledger.unrecord_reordered(trade_id)
            self._trade(wire, time_ms, clean=True)
        self._flush()

    # Disconnects.

    def _reset_all(self) -> None:
        """Abort every connection: no close frame, no serverShutdown, like a dropped link."""
        self._flush()
        clients = [client for client in self._clients if client.active]
        for client in clients:
            self._detach(client)
            client.conn.transport.abort()
        self._disconnects += len(clients)

    async def _disconnect_periodically(self, period: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            deadline += period
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            clients = [client for client in self._clients if client.active]
            self._disconnects += len(clients)
            await asyncio.gather(*(self._close_planned(c, "scheduled disconnect") for c in clients))

    async def _close_planned(self, client: _Client, reason: str) -> None:
        """serverShutdown, then close code 1001, as Binance does before maintenance."""
        was_active = client.active
        self._detach(client)
        conn = client.conn
        if was_active and conn.protocol.state is State.OPEN:
            conn.transport.write(text_frame(encode_shutdown(_now_ms())))
        try:
            # close() first drains the send buffer, with no deadline of its own: a client
            # that stopped reading would hold a planned stop forever.
            async with asyncio.timeout(2 * _CLOSE_TIMEOUT):
                await conn.close(CloseCode.GOING_AWAY, reason)
        except TimeoutError:
            conn.transport.abort()

    # Connections and subscriptions.

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        """Answer REST requests and bad stream URLs; let good WebSocket upgrades through."""
        path, _, query = request.path.partition("?")
        if path.startswith("/api/"):
            response = self._rest.respond(str(conn.remote_address[0]), path, query)
            self._rest_log.append((time.monotonic(), path, query, response.status_code))
            return response
        route = _parse_route(path, query)
        if route is None:
            return conn.respond(404, f"Not found: {path}\n")
        if isinstance(route, str):
            return conn.respond(400, route + "\n")
        if not self._accepting:
            return conn.respond(503, "Server is shutting down.\n")
        if len(self._clients) >= _MAX_CONNECTIONS:
            return conn.respond(429, "Too many connections.\n")
        return None

    async def _handle_connection(self, conn: ServerConnection) -> None:
        request = conn.request
        assert request is not None  # the handshake is done before the handler runs
        path, _, query = request.path.partition("?")
        route = _parse_route(path, query)
        assert isinstance(route, _Route)  # checked in _process_request
        client = _Client(conn, route.combined)
        self._clients[client] = None
        self._connection_log.append(time.monotonic())
        lifetime = self._options.connection_lifetime
        shutdown_after = self._options.faults.shutdown_after
        reason = "connection lifetime reached"
        if shutdown_after is not None and shutdown_after < lifetime:
            lifetime, reason = shutdown_after, "shutdown_after fault"
        try:
            for stream in route.streams:
                self._subscribe(client, stream)
            if lifetime <= 0:
                raise TimeoutError  # shut before a single market frame is queued
            async with asyncio.timeout(lifetime):
                async for message in conn:
                    reply = self._answer(client, message)
                    if client.active and conn.protocol.state is State.OPEN:
                        conn.transport.write(text_frame(reply))
        except TimeoutError:
            if client.active:
                self._disconnects += 1
                with contextlib.suppress(ConnectionClosed):
                    await self._close_planned(client, reason)
        except ConnectionClosed:
            pass
        finally:
            self._detach(client)
            self._clients.pop(client, None)

    def _answer(self, client: _Client, message: str | bytes) -> bytes:
        """Reply to a live SUBSCRIBE / UNSUBSCRIBE / LIST_SUBSCRIPTIONS request, Binance style."""
        try:
            request = msgspec.json.decode(message)
        except msgspec.DecodeError as exc:
            return encode_error(None, 3, f"Invalid JSON: {exc}")
        if not isinstance(request, dict):
            return encode_error(None, 2, "Invalid request: expected a JSON object")
        request_id = request.get("id")
        valid_id = request_id is None or (
            isinstance(request_id, str)
            or (
                isinstance(request_id, int) and not isinstance(request_id, bool) and request_id >= 0
            )
        )
        if not valid_id:
            return encode_error(
                None, 2, "Invalid request: request ID must be an unsigned integer or a string"
            )
        unknown = sorted(set(request) - {"method", "params", "id"})
        if unknown:
            return encode_error(request_id, 2, f"Invalid request: unknown field `{unknown[0]}`")
        method = request.get("method")
        params = request.get("params")
        if method == "LIST_SUBSCRIPTIONS":
            return encode_result(request_id, list(client.streams))
        if method not in ("SUBSCRIBE", "UNSUBSCRIBE"):
            if method is None:
                return encode_error(request_id, 2, "Invalid request: missing field `method`")
            return encode_error(
                request_id,
                2,
                f"Invalid request: unknown variant `{method}`, expected one of {_METHODS}",
            )
        if not isinstance(params, list) or not all(isinstance(name, str) for name in params):
            return encode_error(
                request_id, 2, "Invalid request: `params` must be a list of stream names"
            )
        for name in params:
            if not _STREAM.fullmatch(name):
                return encode_error(request_id, 2, f"Invalid request: invalid stream `{name}`")
        if method == "SUBSCRIBE":
            if len(client.streams.keys() | set(params)) > _MAX_STREAMS:
                return encode_error(
                    request_id, 2, f"Invalid request: at most {_MAX_STREAMS} streams"
                )
            for name in params:
                self._subscribe(client, name)
        else:
            for name in params:
                self._unsubscribe(client, name)
        return encode_result(request_id, None)

    def _subscribe(self, client: _Client, stream: str) -> None:
        client.streams[stream] = None
        if client.active:
            self._subscribers.setdefault(stream, {})[client] = None

    def _unsubscribe(self, client: _Client, stream: str) -> None:
        client.streams.pop(stream, None)
        subscribers = self._subscribers.get(stream)
        if subscribers is not None:
            subscribers.pop(client, None)
            if not subscribers:
                del self._subscribers[stream]

    def _detach(self, client: _Client) -> None:
        """Stop sending to a client (closing or gone); its subscription list is kept."""
        if not client.active:
            return
        client.active = False
        for stream in client.streams:
            subscribers = self._subscribers.get(stream)
            if subscribers is not None:
                subscribers.pop(client, None)
                if not subscribers:
                    del self._subscribers[stream]

    # Manifest.

    async def _write_manifest_periodically(self) -> None:
        """Rewrite the manifest every interval (first at start) until the stop writes it last."""
        while not self._closing.is_set():
            try:
                await self._write_manifest()
            except OSError:
                logger.exception("cannot write the simulator manifest")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self._options.manifest_interval)

    async def _write_manifest(self) -> None:
        """One write at a time (the periodic writer and the stop path both call this), each
        of the state as it is when its turn comes, so the last write is the newest."""
        path = self._options.manifest_path
        if path is None:
            return
        async with self._manifest_lock:
            await asyncio.to_thread(write_atomically, path, encode_manifest(self.manifest()))
