"""Backfiller: closes sequence gaps from the venue's REST trade history.

Gap requests from the trackers wait as id ranges per (exchange, symbol). A worker takes a
symbol's lowest pending range together with every other pending range the same history
pages cover, so gaps that fit in one 1,000-id page cost one request. Each page goes back as
ordinary rows (provenance "backfill", the live message_id) in its own RecordBatch, so memory
stays bounded. Ids the venue no longer keeps, and history rows that cannot be stored (their
dead letters travel in the same batch), come back as unrecoverable GapResolutions that say
why, so they are not asked for again. A venue that keeps failing leaves the gap open and is
logged: the tracker asks again later.
"""

from __future__ import annotations

import bisect
import datetime
import itertools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from k2d import failpoints
from k2d.config import BackfillConfig
from k2d.messages import GapRequest, GapResolution, RecordBatch
from k2d.model import DeadLetter, Trade, now_us
from k2d.runtime import Actor, Outbox
from k2d.telemetry.metrics import Metrics
from k2d.venues.binance import EXCHANGE, RejectedRow, history_trades
from k2d.venues.binance_rest import MAX_LIMIT, BinanceRest, BinanceRestError

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["SOURCE", "Backfiller"]

log = logging.getLogger(__name__)

SOURCE = "backfill"

_Key = tuple[str, str]  # (exchange, symbol)


@dataclass
class _Job:
    """Ids first..last of one symbol, fetched page by page for the requests they cover."""

    key: _Key
    requests: list[GapRequest]  # sorted by first id
    first: int
    last: int

    def __post_init__(self) -> None:
        # The requested ranges, merged: the ids between them are the tracker's already.
        self._starts: list[int] = []
        self._ends: list[int] = []
        for r in self.requests:
            if self._ends and r.first <= self._ends[-1] + 1:
                self._ends[-1] = max(self._ends[-1], r.last)
            else:
                self._starts.append(r.first)
                self._ends.append(r.last)

    @property
    def stream(self) -> str:
        return self.requests[0].stream

    def asked(self, trade_id: int) -> bool:
        """Whether a request of this job covers `trade_id` (not just the span between)."""
        i = bisect.bisect_right(self._starts, trade_id) - 1
        return i >= 0 and trade_id <= self._ends[i]


class Backfiller(Actor[GapRequest, RecordBatch]):
    """Fetches the trades of gap requests from the venue, at most `cfg.concurrency` at once,
    within `cfg.weight_share` of the venue's request-weight limit."""

    name = "backfiller"

    def __init__(
        self,
        cfg: BackfillConfig,
        rest_url: str,
        metrics: Metrics,
        tracer: trace.Tracer | None = None,
        *,
        ban_file: Path | None = None,
    ) -> None:
        """`ban_file` keeps a wait the venue imposed (429/418 Retry-After) across restarts."""
        self.cfg = cfg
        self.rest_url = rest_url
        self.metrics = metrics
        self.ban_file = ban_file
        self._tracer = tracer or trace.get_tracer("k2d")
        self._page_limit = max(1, min(cfg.page_limit, MAX_LIMIT))
        # Pending ranges per symbol, sorted by first id. Dict order is the order in which
        # symbols take turns: a symbol goes to the back once a worker took a job from it.
        self._pending: dict[_Key, list[GapRequest]] = {}
        self._pending_count = 0
        self._fetching: dict[_Key, list[tuple[int, int]]] = {}
        self._held: set[str] = set()  # event ids pending or being fetched
        self._input_done = False
        self._changed = anyio.Event()
        self._last_warning = 0.0

    async def run(
        self, inbox: MemoryObjectReceiveStream[GapRequest] | None, outbox: Outbox[RecordBatch]
    ) -> None:
        assert inbox is not None
        cfg = self.cfg
        self._pending.clear()
        self._pending_count = 0
        self._fetching.clear()
        self._held.clear()
        self._input_done = False
        rest = BinanceRest(
            self.rest_url,
            weight_per_minute=cfg.weight_budget,
            request_weight=cfg.request_weight,
            timeout=cfg.request_timeout,
            max_attempts=cfg.max_attempts,
            metrics=self.metrics,
            ban_file=self.ban_file,
            on_blocked=self._blocked,
        )
        async with rest, anyio.create_task_group() as workers:
            for _ in range(max(1, cfg.concurrency)):
                workers.start_soon(self._work, rest, outbox)
            async for req in inbox:
                await self._take(req, outbox)
                # Take in everything already waiting before a worker picks (receive_nowait
                # never yields to them), so a burst of requests coalesces as a whole.
                while True:
                    try:
                        req = inbox.receive_nowait()
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                    await self._take(req, outbox)
            self._input_done = True
            self._notify()
            # End of input: what is held gets drain_timeout to finish, so the tracker and the
            # writer behind it still drain inside the daemon's shutdown deadline.
            workers.cancel_scope.deadline = anyio.current_time() + cfg.drain_timeout
        if self._held:
            log.warning(
                "%s: drain deadline of %.1fs passed; %d gaps stay open for a later request",
                self.name,
                cfg.drain_timeout,
                len(self._held),
            )

    def _blocked(self, until: float | None) -> None:
        if until is None:
            self.set_degraded(None)
            return
        when = datetime.datetime.fromtimestamp(until, datetime.UTC)
        self.set_degraded(f"venue ban until {when.isoformat(timespec='seconds')}")

    # Requests in.

    async def _take(self, req: GapRequest, outbox: Outbox[RecordBatch]) -> None:
        if req.event_id in self._held:
            log.debug("%s: gap %s is already pending or being fetched", self.name, req.event_id)
            return
        reason = _no_history(req)
        if reason is not None:
            resolution = _resolution(
                req.exchange, req.symbol, req.stream, req.first, req.last, reason
            )
            await outbox.send(
                RecordBatch(source=SOURCE, resolutions=[resolution], received_at=now_us())
            )
            self.metrics.backfill_gaps.labels("unrecoverable").inc()
            return
        if req.first > req.last:
            log.warning("%s: ignoring gap %s with first > last", self.name, req.event_id)
            return
        key = (req.exchange, req.symbol)
        if self._covered(key, req.first, req.last):
            log.debug("%s: ids of gap %s are already pending or being fetched", self.name, req)
            return
        if self._pending_count >= self.cfg.max_pending:
            # The tracker asks again for gaps that stay open, so shedding here loses nothing.
            self.metrics.backfill_gaps.labels("deferred").inc()
            now = time.monotonic()
            if now - self._last_warning >= 1.0:
                self._last_warning = now
                log.warning(
                    "%s: %d gaps already waiting; %s left for the tracker's next request",
                    self.name,
                    self.cfg.max_pending,
                    req.event_id,
                )
            return
        bisect.insort(self._pending.setdefault(key, []), req, key=lambda r: (r.first, r.last))
        self._pending_count += 1
        self._held.add(req.event_id)
        self._notify()

    def _covered(self, key: _Key, first: int, last: int) -> bool:
        """Whether first..last lies inside one range already pending or being fetched."""
        spans = itertools.chain(
            ((r.first, r.last) for r in self._pending.get(key, ())),
            self._fetching.get(key, ()),
        )
        return any(lo <= first and last <= hi for lo, hi in spans)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    # Jobs out.

    def _next_job(self) -> _Job | None:
        """The lowest pending range of the next symbol in turn, with every pending range of
        that symbol the same pages cover.

        Lowest ids first: they are the closest to falling out of the venue's retained
        history, so serving them first minimises what becomes unrecoverable while a backlog
        waits for the weight budget."""
        key = next((k for k, ranges in self._pending.items() if ranges), None)
        if key is None:
            return None
        ranges = self._pending.pop(key)
        first, last = ranges[0].first, ranges[0].last
        taken = 1
        size = self._page_limit
        while taken < len(ranges):
            r = ranges[taken]
            pages = (last - first) // size + 1
            # It rides along if it touches the span, or ends inside the span's last page.
            if r.first > last + 1 and (r.last - first) // size + 1 > pages:
                break
            last = max(last, r.last)
            taken += 1
        if taken < len(ranges):
            self._pending[key] = ranges[taken:]
        self._pending_count -= taken
        self._fetching.setdefault(key, []).append((first, last))
        return _Job(key, ranges[:taken], first, last)

    def _release(self, job: _Job) -> None:
        spans = self._fetching.get(job.key)
        if spans is not None:
            spans.remove((job.first, job.last))
            if not spans:
                del self._fetching[job.key]
        for req in job.requests:
            self._held.discard(req.event_id)

    async def _work(self, rest: BinanceRest, outbox: Outbox[RecordBatch]) -> None:
        while True:
            job = self._next_job()
            if job is None:
                if self._input_done:
                    return
                await self._changed.wait()
                continue
            await self._fetch(rest, job, outbox)
            self._release(job)  # not when cancelled: held ids are counted at the drain

    async def _fetch(self, rest: BinanceRest, job: _Job, outbox: Outbox[RecordBatch]) -> None:
        """Page through ids job.first..job.last and send each page as it arrives."""
        exchange, symbol = job.key
        attributes: dict[str, str | int] = {
            "k2d.exchange": exchange,
            "k2d.symbol": symbol,
            "k2d.gap.first": job.first,
            "k2d.gap.last": job.last,
            "k2d.gaps": len(job.requests),
        }
        with self._tracer.start_as_current_span("backfill.fetch", attributes=attributes) as span:
            context = span.get_span_context()
            rows = pages = 0
            result = "filled"
            from_id: int | None = job.first
            try:
                while from_id is not None and from_id <= job.last:
                    limit = min(self._page_limit, job.last - from_id + 1)
                    page = await rest.historical_trades(symbol, from_id, limit)
                    received = now_us()
                    pages += 1
                    trades, rejected = history_trades(page, symbol, received, source=SOURCE)
                    kept, dead, lost, next_id = _page(job, from_id, trades, rejected)
                    if kept or dead or lost:
                        batch = RecordBatch(
                            source=SOURCE,
                            trades=kept,
                            dead_letters=dead,
                            resolutions=lost,
                            received_at=received,
                            span_context=context,
                        )
                        await outbox.send(batch)
                    # A test's fault lands between two pages of one request.
                    failpoints.hit("backfill.page")
                    rows += len(kept)
                    self.metrics.backfill_rows.inc(len(kept))
                    for d in dead:
                        self.metrics.dead_letters.labels(SOURCE, d.reason).inc()
                    if lost:
                        result = "unrecoverable"
                    elif next_id is None:
                        raise BinanceRestError(
                            f"venue answered fromId={from_id} with no id above it"
                        )
                    from_id = next_id
            except BinanceRestError as exc:
                result = "failed"
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                log.warning(
                    "%s: backfill of %s ids %d..%d (%d gaps) failed; what is missing stays "
                    "open after %d rows: %s",
                    self.name,
                    symbol,
                    job.first,
                    job.last,
                    len(job.requests),
                    rows,
                    exc,
                )
            span.set_attribute("k2d.rows", rows)
            span.set_attribute("k2d.pages", pages)
            span.set_attribute("k2d.result", result)
        self.metrics.backfill_gaps.labels(result).inc(len(job.requests))


def _page(
    job: _Job, from_id: int, trades: list[Trade], rejected: list[RejectedRow]
) -> tuple[list[Trade], list[DeadLetter], list[GapResolution], int | None]:
    """One page's trades inside the job, its dead letters, the ids the venue cannot supply,
    and the next fromId (None when the venue answered nothing above from_id)."""
    exchange, symbol = job.key
    stream, last = job.stream, job.last
    ids = sorted(
        {t.source_sequence for t in trades if t.source_sequence is not None}
        | {r.trade_id for r in rejected if r.trade_id is not None}
    )
    dead = [r.dead_letter for r in rejected if r.trade_id is None]
    if not ids:
        reason = f"venue returned no trades from id {from_id}"
        return [], dead, [_resolution(exchange, symbol, stream, from_id, last, reason)], None
    lost: list[GapResolution] = []
    if ids[0] > from_id:
        # The venue answers an id older than its history from its oldest retained trade.
        reason = f"venue history starts at id {ids[0]}"
        lost.append(_resolution(exchange, symbol, stream, from_id, min(ids[0] - 1, last), reason))
    for below, above in itertools.pairwise(ids):
        lo, hi = max(below + 1, from_id), min(above - 1, last)
        if lo <= hi:
            # Venue ids are contiguous: one missing inside a page will not come later either.
            reason = f"venue history skips ids {below + 1}..{above - 1}"
            lost.append(_resolution(exchange, symbol, stream, lo, hi, reason))
    # Ids between the job's requests came along in the same pages; the tracker has them.
    for r in rejected:
        if r.trade_id is not None and from_id <= r.trade_id <= last and job.asked(r.trade_id):
            dead.append(r.dead_letter)
            reason = f"venue history row is not a valid trade ({r.dead_letter.reason})"
            lost.append(_resolution(exchange, symbol, stream, r.trade_id, r.trade_id, reason))
    kept = [
        t
        for t in trades
        if from_id <= (t.source_sequence or -1) <= last and job.asked(t.source_sequence or -1)
    ]
    next_id = ids[-1] + 1
    return kept, dead, lost, next_id if next_id > from_id else None


def _no_history(req: GapRequest) -> str | None:
    """Why no venue history can fill this request, or None if the REST history might."""
    if req.stream != "trade":
        return f"venue has no history for stream {req.stream}"
    if req.exchange != EXCHANGE:
        return f"no REST history source for exchange {req.exchange}"
    return None


def _resolution(
    exchange: str, symbol: str, stream: str, first: int, last: int, reason: str
) -> GapResolution:
    return GapResolution(
        exchange=exchange,
        symbol=symbol,
        stream=stream,
        first=first,
        last=last,
        status="unrecoverable",
        reason=reason,
    )
