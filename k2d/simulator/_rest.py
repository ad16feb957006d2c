"""Binance spot REST for trade history (`/api/v3/trades`, `/api/v3/historicalTrades`), with
Binance's request-weight accounting: a per-IP budget per wall-clock minute, 429 then 418."""

from __future__ import annotations

import email.utils
import http
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl

import msgspec
from websockets.datastructures import Headers
from websockets.http11 import Response

from k2d.simulator._history import HistoricalTrade, TradeHistory

_MAX_CLIENTS = 4096  # distinct IPs tracked at once; old windows are forgotten first
_DIGITS = re.compile(r"[0-9]{1,20}")
_DEFAULT_LIMIT = 500
_MAX_LIMIT = 1000
_encoder = msgspec.json.Encoder()


class _ErrorBody(msgspec.Struct):
    code: int
    msg: str


@dataclass(frozen=True)
class Admission:
    """Outcome of charging one request's weight: HTTP status, weight used, wait if refused."""

    status: int
    used: int
    retry_after: int | None = None


class _Usage:
    __slots__ = ("banned", "blocked_until", "minute", "used")

    def __init__(self, minute: int) -> None:
        self.minute = minute
        self.used = 0
        self.blocked_until = 0.0
        self.banned = False


class RequestWeights:
    """Per-IP request weight per minute; calling again while told to wait earns a ban (418)."""

    def __init__(
        self,
        limit: int,
        ban_seconds: float,
        clock: Callable[[], float] = time.time,
        first_ban: float | None = None,
    ) -> None:
        """`first_ban` (the `rest_ban` fault): an IP's first request finds it banned (418)
        for that many seconds, as if an earlier process on it had ignored a 429."""
        self._limit = limit
        self._ban_seconds = ban_seconds
        self._clock = clock
        self._first_ban = first_ban
        self._usage: dict[str, _Usage] = {}

    @property
    def limit(self) -> int:
        return self._limit

    def charge(self, ip: str, weight: int) -> Admission:
        now = self._clock()
        minute = int(now // 60)
        usage = self._usage_of(ip, now)
        if usage.minute != minute:
            usage.minute, usage.used = minute, 0
        if now < usage.blocked_until:
            if not usage.banned:
                # A client that ignores Retry-After is banned, as Binance does (from 2 min).
                usage.banned = True
                usage.blocked_until = now + self._ban_seconds
            return Admission(418, usage.used, _seconds(usage.blocked_until - now))
        usage.banned = False
        if usage.used + weight > self._limit:
            usage.blocked_until = (minute + 1) * 60.0
            return Admission(429, usage.used, _seconds(usage.blocked_until - now))
        usage.used += weight
        return Admission(200, usage.used)

    def used(self, ip: str) -> int:
        usage = self._usage.get(ip)
        if usage is None or usage.minute != int(self._clock() // 60):
            return 0
        return usage.used

    def _usage_of(self, ip: str, now: float) -> _Usage:
        usage = self._usage.get(ip)
        if usage is None:
            if len(self._usage) >= _MAX_CLIENTS:
                for key in [k for k, u in self._usage.items() if u.blocked_until <= now]:
                    del self._usage[key]
                while len(self._usage) >= _MAX_CLIENTS:
                    del self._usage[next(iter(self._usage))]
            usage = self._usage[ip] = _Usage(int(now // 60))
            if self._first_ban is not None:
                usage.banned = True
                usage.blocked_until = now + self._first_ban
        return usage


def _seconds(delay: float) -> int:
    return max(1, math.ceil(delay))


class _BadRequest(Exception):
    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


class RestApi:
    """Answers plain HTTP GETs under /api/v3 for the symbols the simulator trades."""

    def __init__(
        self, histories: Mapping[str, TradeHistory], weights: RequestWeights, request_weight: int
    ) -> None:
        self._histories = histories
        self._weights = weights
        self._routes: dict[str, tuple[int, Callable[[dict[str, str]], bytes]]] = {
            "/api/v3/trades": (request_weight, self._trades),
            "/api/v3/historicalTrades": (request_weight, self._historical_trades),
            "/api/v3/ping": (1, self._ping),
            "/api/v3/time": (1, self._time),
        }

    def respond(self, ip: str, path: str, query: str) -> Response:
        route = self._routes.get(path)
        if route is None:
            body = _error(-1000, f"Unknown endpoint {path}.")
            return _response(404, body, self._weights.used(ip))
        weight, handler = route
        admission = self._weights.charge(ip, weight)
        if admission.status == 429:
            body = _error(
                -1003,
                f"Too much request weight used; current limit is {self._weights.limit} "
                "request weight per 1 MINUTE. Please use WebSocket Streams for live updates "
                "to avoid polling the API.",
            )
            return _response(429, body, admission.used, admission.retry_after)
        if admission.status == 418:
            until_ms = int((time.time() + (admission.retry_after or 0)) * 1000)
            body = _error(
                -1003,
                f"Way too much request weight used; IP banned until {until_ms}. "
                "Please use WebSocket Streams for live updates to avoid bans.",
            )
            return _response(418, body, admission.used, admission.retry_after)
        try:
            params = _params(query)
            body = handler(params)
            if params:
                raise _BadRequest(
                    -1104,
                    "Not all sent parameters were read; "
                    f"unexpected parameter(s) {', '.join(sorted(params))}.",
                )
        except _BadRequest as exc:
            return _response(400, _error(exc.code, exc.msg), admission.used)
        return _response(200, body, admission.used)

    def _trades(self, params: dict[str, str]) -> bytes:
        history = self._history(params)
        limit = _limit(params)
        return _encode_trades(history.recent(limit))

    def _historical_trades(self, params: dict[str, str]) -> bytes:
        history = self._history(params)
        limit = _limit(params)
        raw = params.pop("fromId", None)
        if raw is None:
            return _encode_trades(history.recent(limit))
        return _encode_trades(history.from_id(_integer("fromId", raw), limit))

    def _ping(self, params: dict[str, str]) -> bytes:
        return b"{}"

    def _time(self, params: dict[str, str]) -> bytes:
        return b'{"serverTime":%d}' % int(time.time() * 1000)

    def _history(self, params: dict[str, str]) -> TradeHistory:
        symbol = params.pop("symbol", "")
        if not symbol:
            raise _BadRequest(
                -1102, "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed."
            )
        history = self._histories.get(symbol)
        if history is None:
            raise _BadRequest(-1121, "Invalid symbol.")
        return history


def _params(query: str) -> dict[str, str]:
    try:
        return dict(parse_qsl(query, keep_blank_values=True, max_num_fields=32))
    except ValueError:
        raise _BadRequest(-1101, "Too many parameters sent for this endpoint.") from None


def _integer(name: str, raw: str) -> int:
    if not _DIGITS.fullmatch(raw):
        raise _BadRequest(
            -1100,
            f"Illegal characters found in parameter '{name}'; legal range is '^[0-9]{{1,20}}$'.",
        )
    return int(raw)


def _limit(params: dict[str, str]) -> int:
    raw = params.pop("limit", None)
    if raw is None:
        return _DEFAULT_LIMIT
    limit = _integer("limit", raw)
    if not 1 <= limit <= _MAX_LIMIT:
        raise _BadRequest(-1130, "Data sent for parameter 'limit' is not valid.")
    return limit


def _encode_trades(trades: list[HistoricalTrade]) -> bytes:
    return _encoder.encode(trades)


def _error(code: int, msg: str) -> bytes:
    return _encoder.encode(_ErrorBody(code, msg))


def _response(status: int, body: bytes, used: int, retry_after: int | None = None) -> Response:
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Content-Type", "application/json;charset=UTF-8"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
            ("X-MBX-USED-WEIGHT", str(used)),
            ("X-MBX-USED-WEIGHT-1M", str(used)),
        ]
    )
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return Response(status, http.HTTPStatus(status).phrase, headers, body)
