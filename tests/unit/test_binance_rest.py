"""BinanceRest against real loopback servers that speak the venue's REST protocol.

The simulator's weight window is the wall-clock minute, so a 429 there can mean a wait of up
to 60 s. `RestVenue` serves the simulator's own REST code with its clock set a few seconds
before a minute ends, so the 429 and 418 paths run in seconds.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import httpx
import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from k2d.simulator import Simulator, SimulatorOptions
from k2d.simulator._history import TradeHistory
from k2d.simulator._rest import RequestWeights, RestApi
from k2d.telemetry.metrics import Metrics
from k2d.venues.binance import HistoricalTrade
from k2d.venues.binance_rest import (
    BinanceRest,
    RequestRejectedError,
    VenueUnavailableError,
)

FIRST_ID = 5_000
SYMBOL = "BTCUSDT"


@dataclass(frozen=True)
class Answer:
    at: float  # time.monotonic() when the venue answered
    status: int
    used: int
    retry_after: int | None


class RestVenue:
    """The simulator's REST code on 127.0.0.1, its minute ending `ends_in` s after start.

    Records every answer; the first `fail_first` requests get a 503."""

    def __init__(
        self,
        *,
        weight_limit: int = 6000,
        request_weight: int = 25,
        ends_in: float = 3.0,
        ban_seconds: float = 120.0,
        fail_first: int = 0,
        trades: int = 3_000,
    ) -> None:
        now = time.time()
        self._shift = (now // 60 + 1) * 60 - ends_in - now
        history = TradeHistory(FIRST_ID, trades)
        for i in range(trades):
            history.append(
                6_500_000_000_000 + i * 1_000_000, 10_000_000 + i, 1_700_000_000_000, i % 3 == 0
            )
        weights = RequestWeights(weight_limit, ban_seconds, clock=self.clock)
        self._rest = RestApi({SYMBOL: history}, weights, request_weight)
        self.fail_first = fail_first
        self.answers: list[Answer] = []
        self._server: Server | None = None

    def clock(self) -> float:
        """The venue's wall clock."""
        return time.time() + self._shift

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> RestVenue:
        self._server = await serve(self._ws, "127.0.0.1", 0, process_request=self._answer)
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _ws(self, conn: ServerConnection) -> None:
        await conn.close()

    def _answer(self, conn: ServerConnection, request: Request) -> Response:
        path, _, query = request.path.partition("?")
        if self.fail_first > 0:
            self.fail_first -= 1
            body = b'{"code":-1001,"msg":"Internal error; unable to process your request."}'
            headers = Headers([("Content-Length", str(len(body))), ("Connection", "close")])
            response = Response(503, "Service Unavailable", headers, body)
        else:
            response = self._rest.respond("127.0.0.1", path, query)
        retry = response.headers.get("Retry-After")
        used = int(response.headers.get("X-MBX-USED-WEIGHT-1M", "0"))
        self.answers.append(
            Answer(time.monotonic(), response.status_code, used, int(retry) if retry else None)
        )
        return response


@asynccontextmanager
async def client(url: str, **options: Any) -> AsyncIterator[tuple[BinanceRest, Metrics]]:
    metrics = Metrics()
    settings: dict[str, Any] = {
        "weight_per_minute": 6000,
        "request_weight": 25,
        "timeout": 2.0,
        "backoff_initial": 0.05,
        "backoff_max": 0.1,
        **options,
    }
    async with BinanceRest(url, metrics=metrics, **settings) as rest:
        yield rest, metrics


def requests_by_status(metrics: Metrics) -> dict[str, float]:
    samples = metrics.registry.get_sample_value
    statuses = ("200", "400", "418", "429", "503", "error")
    counts = {s: samples("k2d_backfill_requests_total", {"status": s}) for s in statuses}
    return {s: n for s, n in counts.items() if n}


def expected_ids(from_id: int, limit: int) -> list[int]:
    return list(range(from_id, from_id + limit))


def assert_waited_as_told(answers: list[Answer]) -> None:
    """No request reached the venue before the Retry-After of the answer before it."""
    for before, after in itertools.pairwise(answers):
        if before.retry_after is not None:
            assert after.at - before.at >= before.retry_after, (before, after)


async def test_pages_match_what_the_simulator_serves() -> None:
    opts = SimulatorOptions(symbols=(SYMBOL,), rate=2_000.0)
    async with Simulator(opts) as sim, httpx.AsyncClient(base_url=sim.url) as http:
        await asyncio.sleep(0.3)
        oldest = (
            await http.get(
                "/api/v3/historicalTrades", params={"symbol": SYMBOL, "fromId": 0, "limit": 1}
            )
        ).json()[0]["id"]
        raw = await http.get(
            "/api/v3/historicalTrades", params={"symbol": SYMBOL, "fromId": oldest, "limit": 200}
        )
        async with client(sim.url) as (rest, metrics):
            got = (await rest.historical_trades(SYMBOL, oldest, 200)).items

    assert [t.id for t in got] == expected_ids(oldest, 200)
    assert [(t.id, t.price, t.qty, t.time, t.isBuyerMaker) for t in got] == [
        (i["id"], i["price"], i["qty"], i["time"], i["isBuyerMaker"]) for i in raw.json()
    ]
    assert requests_by_status(metrics) == {"200": 1}


async def test_a_429_is_waited_out_and_concurrent_callers_never_earn_a_418() -> None:
    async with (
        RestVenue(weight_limit=100, ends_in=3.0, ban_seconds=1.0) as venue,
        client(venue.url, weight_per_minute=10_000) as (rest, metrics),
    ):
        results: dict[int, list[HistoricalTrade]] = {}

        async def fetch(from_id: int) -> None:
            results[from_id] = (await rest.historical_trades(SYMBOL, from_id, 10)).items

        started = time.monotonic()
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for n in range(7):
                    tg.start_soon(fetch, FIRST_ID + 10 * n)
        elapsed = time.monotonic() - started

    statuses = [a.status for a in venue.answers]
    assert statuses.count(429) == 1
    assert 418 not in statuses
    assert requests_by_status(metrics) == {"200": 7, "429": 1}
    assert {k: [t.id for t in v] for k, v in results.items()} == {
        FIRST_ID + 10 * n: expected_ids(FIRST_ID + 10 * n, 10) for n in range(7)
    }
    refused = venue.answers[statuses.index(429)]
    assert refused.retry_after is not None
    assert elapsed >= refused.retry_after
    assert_waited_as_told(venue.answers)


async def test_a_418_is_waited_out_and_logged_as_an_error(caplog: pytest.LogCaptureFixture) -> None:
    async with RestVenue(weight_limit=50, ends_in=3.0, ban_seconds=1.0) as venue:
        # Another client on this IP ignores a 429 and gets the IP banned.
        async with httpx.AsyncClient(base_url=venue.url) as other:
            params: dict[str, str | int] = {"symbol": SYMBOL, "fromId": FIRST_ID, "limit": 1}
            for _ in range(4):
                await other.get("/api/v3/historicalTrades", params=params)
        assert [a.status for a in venue.answers] == [200, 200, 429, 418]
        with caplog.at_level(logging.WARNING, logger="k2d.venues.binance_rest"):
            async with client(venue.url) as (rest, metrics):
                got = (await rest.historical_trades(SYMBOL, FIRST_ID, 5)).items

    assert [t.id for t in got] == expected_ids(FIRST_ID, 5)
    ours = venue.answers[4:]
    assert [a.status for a in ours] == [418, 429, 200]
    assert_waited_as_told(ours)
    assert requests_by_status(metrics) == {"418": 1, "429": 1, "200": 1}
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "418" in errors[0].getMessage()


async def test_own_budget_waits_for_the_next_minute() -> None:
    async with (
        RestVenue(weight_limit=6000, ends_in=1.5) as venue,
        client(venue.url, weight_per_minute=50, clock=venue.clock) as (rest, _),
    ):
        started = time.monotonic()
        for n in range(3):
            await rest.historical_trades(SYMBOL, FIRST_ID + n, 1)
        waited = venue.answers[2].at - venue.answers[1].at

    assert [a.status for a in venue.answers] == [200, 200, 200]
    assert [a.used for a in venue.answers] == [25, 50, 25]  # the third in the next minute
    assert 1.0 <= waited <= 3.0
    assert time.monotonic() - started < 3.5


async def test_weight_others_used_from_this_ip_counts_against_the_budget() -> None:
    async with RestVenue(weight_limit=6000, ends_in=1.5) as venue:
        async with httpx.AsyncClient(base_url=venue.url) as other:
            params: dict[str, str | int] = {"symbol": SYMBOL, "fromId": FIRST_ID, "limit": 1}
            for _ in range(3):
                await other.get("/api/v3/historicalTrades", params=params)
        async with client(venue.url, weight_per_minute=100, clock=venue.clock) as (rest, metrics):
            for n in range(3):
                await rest.historical_trades(SYMBOL, FIRST_ID + n, 1)

    ours = venue.answers[3:]
    # The venue's header said 100 after our first call: the second waited for the new minute.
    assert [a.used for a in ours] == [100, 25, 50]
    assert ours[1].at - ours[0].at >= 1.0
    assert metrics.registry.get_sample_value("k2d_backfill_weight_used") == 50


async def test_server_errors_are_retried_with_backoff() -> None:
    async with (
        RestVenue(fail_first=2) as venue,
        client(venue.url, max_attempts=3) as (rest, metrics),
    ):
        got = (await rest.historical_trades(SYMBOL, FIRST_ID, 3)).items

    assert [t.id for t in got] == expected_ids(FIRST_ID, 3)
    assert [a.status for a in venue.answers] == [503, 503, 200]
    assert requests_by_status(metrics) == {"503": 2, "200": 1}


async def test_persistent_server_errors_raise_after_max_attempts() -> None:
    async with (
        RestVenue(fail_first=10) as venue,
        client(venue.url, max_attempts=2) as (rest, _),
    ):
        with pytest.raises(VenueUnavailableError, match=r"2 attempts; last: HTTP 503"):
            await rest.historical_trades(SYMBOL, FIRST_ID, 3)

    assert len(venue.answers) == 2


async def test_unreachable_venue_raises_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the client connects
    async with client(f"http://127.0.0.1:{port}", max_attempts=2) as (rest, metrics):
        with pytest.raises(VenueUnavailableError, match="ConnectError"):
            await rest.historical_trades(SYMBOL, 1, 10)

    assert requests_by_status(metrics) == {"error": 2}


async def test_a_silent_venue_times_out_within_the_request_timeout() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # read the request, never answer

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with client(f"http://127.0.0.1:{port}", timeout=0.2, max_attempts=2) as (rest, _):
            started = time.monotonic()
            with pytest.raises(VenueUnavailableError, match="ReadTimeout"):
                await rest.historical_trades(SYMBOL, 1, 10)
            elapsed = time.monotonic() - started
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()

    assert len(accepted) == 2
    assert elapsed < 1.5


async def test_a_refused_request_is_not_retried() -> None:
    async with RestVenue() as venue, client(venue.url) as (rest, _):
        with pytest.raises(RequestRejectedError) as refused:
            await rest.historical_trades("DOGEBTC", 1, 10)

    assert (refused.value.status, refused.value.code) == (400, -1121)
    assert "Invalid symbol" in str(refused.value)
    assert len(venue.answers) == 1


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"request_weight": 0}, "request_weight"),
        ({"request_weight": 200, "weight_per_minute": 100}, "request_weight"),
        ({"max_attempts": 0}, "max_attempts"),
    ],
)
def test_impossible_settings_are_refused(options: dict[str, Any], problem: str) -> None:
    settings: dict[str, Any] = {"weight_per_minute": 100, "request_weight": 25, "timeout": 1.0}
    with pytest.raises(ValueError, match=problem):
        BinanceRest("http://127.0.0.1:1", **{**settings, **options})


async def test_limit_outside_the_venues_range_is_refused() -> None:
    async with client("http://127.0.0.1:1") as (rest, metrics):
        with pytest.raises(ValueError, match="limit"):
            await rest.historical_trades(SYMBOL, 1, 1001)
    assert requests_by_status(metrics) == {}


@pytest.mark.parametrize(
    "content",
    [b"not json", b'{"blocked_until": "soon"}', b'{"blocked_until": 1.0}', None],
    ids=["garbled", "wrong_type", "past", "absent"],
)
async def test_a_ban_file_without_a_ban_in_force_delays_nothing(
    tmp_path: Path, content: bytes | None
) -> None:
    ban_file = tmp_path / "binance-rest.json"
    if content is not None:
        ban_file.write_bytes(content)
    blocked: list[float | None] = []
    async with (
        RestVenue() as venue,
        client(venue.url, ban_file=ban_file, on_blocked=blocked.append) as (rest, _),
    ):
        started = time.monotonic()
        page = await rest.historical_trades(SYMBOL, FIRST_ID, 2)

    assert [t.id for t in page.items] == expected_ids(FIRST_ID, 2)
    assert time.monotonic() - started < 1.0
    assert blocked == []
    assert ban_file.exists() is (content is not None)  # nothing written without a refusal


async def test_a_ban_in_force_holds_the_first_request_back(tmp_path: Path) -> None:
    ban_file = tmp_path / "binance-rest.json"
    ban_file.write_text(json.dumps({"blocked_until": time.time() + 1.5}))
    blocked: list[float | None] = []
    async with (
        RestVenue() as venue,
        client(venue.url, ban_file=ban_file, on_blocked=blocked.append) as (rest, _),
    ):
        started = time.monotonic()
        await rest.historical_trades(SYMBOL, FIRST_ID, 2)

    assert venue.answers[0].at - started >= 1.3
    assert blocked == []  # a wait of a second or two is not worth a degraded state
