"""Binance REST trade history (`/api/v3/historicalTrades`) inside the venue's weight budget.

Binance counts request weight per IP per wall-clock minute, answers 429 with Retry-After
past its limit, and bans (418) a client that calls again before Retry-After has passed.
This client keeps its own count, corrected by the venue's X-MBX-USED-WEIGHT-1M header,
waits for the next minute rather than go over `weight_per_minute`, and never calls while
it has been told to wait. With a `ban_file`, a wait the venue imposed outlives a restart:
"blocked until" (wall-clock epoch seconds) is kept there and honoured on the next start.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import anyio
import httpx
import msgspec
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from k2d.runtime import Backoff
from k2d.venues.binance import HistoryPage, decode_history, historical_trades_url

if TYPE_CHECKING:
    from k2d.telemetry.metrics import Metrics

__all__ = [
    "MAX_LIMIT",
    "BinanceRest",
    "BinanceRestError",
    "RequestRejectedError",
    "VenueUnavailableError",
]

log = logging.getLogger(__name__)

MAX_LIMIT = 1000  # trades per historicalTrades page the venue allows
_USED_WEIGHT = "X-MBX-USED-WEIGHT-1M"
_WINDOW = 60.0  # the venue's weight window: one wall-clock minute
_DEFAULT_RETRY_AFTER = _WINDOW  # a 429/418 without Retry-After: sit out a whole window
_MAX_RETRY_AFTER = 3 * 86_400.0  # Binance's longest ban
_DETAIL_CHARS = 200
# A venue-imposed wait longer than this is reported (on_blocked): the backfiller is degraded.
BLOCKED_REPORT_AFTER = 5.0
_PROPAGATOR = TraceContextTextMapPropagator()


class BinanceRestError(Exception):
    """A trade-history request that did not produce trades."""


class RequestRejectedError(BinanceRestError):
    """The venue refused the request itself (a 4xx other than rate limits): retrying cannot help."""

    def __init__(self, status: int, code: int | None, detail: str) -> None:
        super().__init__(f"venue refused the request with HTTP {status} (code {code}): {detail}")
        self.status = status
        self.code = code
        self.detail = detail


class VenueUnavailableError(BinanceRestError):
    """Every attempt failed: server errors, timeouts, network errors or unreadable answers."""


class _VenueError(msgspec.Struct):
    code: int
    msg: str


class _BanState(msgspec.Struct):
    blocked_until: float  # wall-clock epoch seconds


class _WeightBudget:
    """The venue's per-minute request weight, as far as this client can know it.

    Requests overlap only while the weight they bring us to is one the venue has accepted
    before, and the first request of each window goes alone to learn the venue's count. So a
    429 always finds nothing else of ours in flight, and we never call during a Retry-After.
    """

    def __init__(self, limit: int, clock: Callable[[], float]) -> None:
        self.limit = limit
        self._clock = clock  # wall clock: where the venue's minute boundaries fall
        self._safe = 0  # highest used weight the venue has accepted
        self._used = 0
        self._in_flight = 0
        self._synced = False  # a response in this window told us the venue's count
        self._window = 0
        self._window_end: float | None = None  # on the event loop's clock
        self._blocked_until = 0.0
        self._changed = anyio.Event()

    async def acquire(self, weight: int) -> int:
        """Wait until a request of `weight` may go; return the window it is charged to."""
        while True:
            delay = self._delay(weight, anyio.current_time())
            if delay <= 0:
                self._used += weight
                self._in_flight += 1
                return self._window
            with anyio.move_on_after(delay):
                await self._changed.wait()

    def release(
        self, window: int, weight: int, status: int | None, used: int | None, retry: float | None
    ) -> None:
        """Account one request's outcome: the venue's count, a refusal, or no answer."""
        self._in_flight -= 1
        if used is not None and window == self._window:
            self._used = max(self._used, used)
            self._synced = self._synced or status == 200
        if status == 200 and used is not None:
            self._safe = max(self._safe, used)
        if status in (429, 418):
            wait = _DEFAULT_RETRY_AFTER if retry is None else retry
            self._blocked_until = max(self._blocked_until, anyio.current_time() + wait)
        if status == 429:
            # The venue's window ends when it lets us back in, and its limit is below
            # used + weight: stay under what it accepted from now on.
            self._window_end = self._blocked_until
            if used is not None and used < self.limit:
                self.limit = max(used, weight)
                log.warning("venue refused weight above %d per minute; staying under it", used)
        self._changed.set()
        self._changed = anyio.Event()

    @property
    def blocked_for(self) -> float:
        """Seconds until the venue lets us call again (0 when it does now)."""
        return max(0.0, self._blocked_until - anyio.current_time())

    def block(self, seconds: float) -> None:
        """Call nothing for `seconds` (a wait the venue imposed before a restart)."""
        self._blocked_until = max(self._blocked_until, anyio.current_time() + seconds)
        self._changed.set()
        self._changed = anyio.Event()

    def _delay(self, weight: int, now: float) -> float:
        if now < self._blocked_until:
            return self._blocked_until - now
        end = self._roll(now)
        if self._used + weight > self.limit:
            return end - now
        if self._in_flight and (not self._synced or self._used + weight > self._safe):
            return math.inf  # until a response arrives
        return 0.0

    def _roll(self, now: float) -> float:
        if self._window_end is None:
            self._window_end = now + _WINDOW - self._clock() % _WINDOW
        if now >= self._window_end:
            self._window_end += _WINDOW * (1 + (now - self._window_end) // _WINDOW)
            self._window += 1
            self._used = 0
            self._synced = False
        return self._window_end


class BinanceRest:
    """The venue's trade history over one shared HTTP client: `async with BinanceRest(...)`."""

    def __init__(
        self,
        rest_url: str,
        *,
        weight_per_minute: int,
        request_weight: int,
        timeout: float,
        max_attempts: int = 5,
        metrics: Metrics | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        clock: Callable[[], float] = time.time,
        ban_file: Path | None = None,
        on_blocked: Callable[[float | None], None] | None = None,
    ) -> None:
        """`on_blocked` hears the wall-clock time (epoch seconds) until which the venue
        refuses us, once that is more than BLOCKED_REPORT_AFTER seconds away, and None after
        the next request that succeeds."""
        if not 1 <= request_weight <= weight_per_minute:
            raise ValueError(
                f"request_weight {request_weight} must be between 1 and "
                f"weight_per_minute {weight_per_minute}"
            )
        if max_attempts < 1:
            raise ValueError(f"max_attempts {max_attempts} must be at least 1")
        self.rest_url = rest_url.rstrip("/")
        self._weight = request_weight
        self._max_attempts = max_attempts
        self._metrics = metrics
        self._backoff = (backoff_initial, backoff_max)
        self._budget = _WeightBudget(weight_per_minute, clock)
        self._clock = clock
        self._ban_file = ban_file
        self._on_blocked = on_blocked
        self._saved_until = 0.0  # the "blocked until" last read from or written to ban_file
        self._reported = False
        self._client = httpx.AsyncClient(timeout=timeout, headers={"Accept": "application/json"})
        self._error = msgspec.json.Decoder(_VenueError)

    async def __aenter__(self) -> BinanceRest:
        await self._restore_ban()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def historical_trades(self, symbol: str, from_id: int, limit: int) -> HistoryPage:
        """Up to `limit` trades with id >= from_id, ascending. If from_id is older than the
        venue's retained history, the page starts at its oldest trade. Items are decoded one
        by one, so a bad item is the caller's to dead-letter, not a failed page."""
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit {limit} must be between 1 and {MAX_LIMIT}")
        url = historical_trades_url(self.rest_url, symbol, from_id, limit)
        backoff = Backoff(*self._backoff)
        failure = "no attempt made"
        for attempt in range(1, self._max_attempts + 1):
            window = await self._budget.acquire(self._weight)
            # W3C traceparent of the current span (backfill.fetch): a venue or proxy that
            # traces can join its request to ours.
            headers: dict[str, str] = {}
            _PROPAGATOR.inject(headers)
            try:
                response = await self._client.get(url, headers=headers)
            except httpx.RequestError as exc:
                self._budget.release(window, self._weight, None, None, None)
                self._count("error")
                failure = f"{type(exc).__name__}: {exc}".rstrip(": ")
            except BaseException:
                self._budget.release(window, self._weight, None, None, None)
                raise
            else:
                page, failure = self._answer(window, response)
                if page is not None:
                    if self._reported:
                        self._report(None)
                    return page
                if response.status_code in (429, 418):
                    await self._note_block()
                    continue  # the budget holds every request back until Retry-After
            log.warning(
                "GET %s: attempt %d of %d failed: %s", url, attempt, self._max_attempts, failure
            )
            if attempt < self._max_attempts:
                await anyio.sleep(backoff.next_delay())
        raise VenueUnavailableError(
            f"GET {url}: no trades after {self._max_attempts} attempts; last: {failure}"
        )

    def _answer(self, window: int, response: httpx.Response) -> tuple[HistoryPage | None, str]:
        """Trades from a response, or None and why it failed; raises if retrying cannot help."""
        status = response.status_code
        used = _header_int(response, _USED_WEIGHT)
        retry = _retry_after(response) if status in (429, 418) else None
        self._budget.release(window, self._weight, status, used, retry)
        self._count(str(status))
        if used is not None and self._metrics is not None:
            self._metrics.backfill_weight_used.set(used)
        if status == 200:
            try:
                return decode_history(response.content), ""
            except msgspec.DecodeError as exc:
                return None, f"HTTP 200 whose body is not a trade list: {exc}"
        detail = response.text[:_DETAIL_CHARS]
        wait = _DEFAULT_RETRY_AFTER if retry is None else retry
        if status == 429:
            log.warning("venue rate limit (HTTP 429, weight %s): waiting %.0fs", used, wait)
            return None, f"HTTP 429: {detail}"
        if status == 418:
            log.error("venue banned this IP (HTTP 418): waiting %.0fs; %s", wait, detail)
            return None, f"HTTP 418: {detail}"
        if status >= 500:
            return None, f"HTTP {status}: {detail}"
        try:
            err = self._error.decode(response.content)
        except msgspec.DecodeError:
            raise RequestRejectedError(status, None, detail) from None
        raise RequestRejectedError(status, err.code, err.msg)

    def _count(self, status: str) -> None:
        if self._metrics is not None:
            self._metrics.backfill_requests.labels(status).inc()

    def _report(self, until: float | None) -> None:
        self._reported = until is not None
        if self._on_blocked is not None:
            self._on_blocked(until)

    async def _restore_ban(self) -> None:
        """Honour a wait the venue imposed before this process (re)started."""
        if self._ban_file is None:
            return
        until = await anyio.to_thread.run_sync(_read_ban, self._ban_file)
        if until is None:
            return
        self._saved_until = until
        wait = min(until - self._clock(), _MAX_RETRY_AFTER)
        if wait <= 0:
            return
        self._budget.block(wait)
        log.warning(
            "venue refused requests until %s (from %s): waiting %.0fs before the first",
            _iso(until),
            self._ban_file,
            wait,
        )
        if wait > BLOCKED_REPORT_AFTER:
            self._report(until)

    async def _note_block(self) -> None:
        """After a 429/418: persist how long the venue refuses us, and report a long wait."""
        wait = self._budget.blocked_for
        until = self._clock() + wait
        if self._ban_file is not None and until > self._saved_until + 1.0:
            self._saved_until = until
            try:
                await anyio.to_thread.run_sync(_write_ban, self._ban_file, until)
            except OSError as exc:
                log.warning("cannot keep the venue ban in %s: %s", self._ban_file, exc)
        if wait > BLOCKED_REPORT_AFTER:
            self._report(until)


def _header_int(response: httpx.Response, name: str) -> int | None:
    raw = response.headers.get(name)
    if raw is None or not raw.strip().isdigit():
        return None
    return int(raw)


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date), or None when absent or garbled."""
    raw = response.headers.get("Retry-After")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER)


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _read_ban(path: Path) -> float | None:
    """The persisted "blocked until", or None when there is none (or it is unreadable)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read the venue ban file %s: %s", path, exc)
        return None
    try:
        until = msgspec.json.decode(data, type=_BanState).blocked_until
    except msgspec.DecodeError as exc:
        log.warning("ignoring the venue ban file %s: %s", path, exc)
        return None
    return until if math.isfinite(until) else None


def _write_ban(path: Path, until: float) -> None:
    """Replace `path` atomically: a temp file in the same directory, fsync, os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(msgspec.json.encode(_BanState(until)) + b"\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
