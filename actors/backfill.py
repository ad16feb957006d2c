"""Backfiller: closes sequence gaps from the venue's REST trade history.

Takes GapRequests from the trackers, pages through the venue's history for the missing ids
and sends them back as ordinary rows (provenance "backfill", the live message_id), one
RecordBatch per page so memory stays bounded. Ids the venue no longer keeps come back as an
unrecoverable GapResolution that says why. A venue that keeps failing leaves the gap open
and is logged: the tracker asks again later.
"""

from __future__ import annotations

import logging
import time

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from k2d.config import BackfillConfig
from k2d.messages import GapRequest, GapResolution, RecordBatch
from k2d.model import Trade, now_us
from k2d.runtime import Actor, Outbox
from k2d.telemetry.metrics import Metrics
from k2d.venues.binance import EXCHANGE, HistoricalTrade, trade_from_rest
from k2d.venues.binance_rest import MAX_LIMIT, BinanceRest, BinanceRestError

__all__ = ["SOURCE", "Backfiller"]

log = logging.getLogger(__name__)

SOURCE = "backfill"


class Backfiller(Actor[GapRequest, RecordBatch]):
    """Fetches the trades of gap requests from the venue, at most `cfg.concurrency` at once."""

    name = "backfiller"

    def __init__(
        self,
        cfg: BackfillConfig,
        rest_url: str,
        metrics: Metrics,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.cfg = cfg
        self.rest_url = rest_url
        self.metrics = metrics
        self._tracer = tracer or trace.get_tracer("k2d")
        self._page_limit = max(1, min(cfg.page_limit, MAX_LIMIT))
        self._held: set[str] = set()  # event ids queued or being fetched
        self._last_warning = 0.0

    async def run(
        self, inbox: MemoryObjectReceiveStream[GapRequest] | None, outbox: Outbox[RecordBatch]
    ) -> None:
        assert inbox is not None
        cfg = self.cfg
        self._held.clear()
        send, queue = anyio.create_memory_object_stream[GapRequest](cfg.max_pending)
        rest = BinanceRest(
            self.rest_url,
            weight_per_minute=cfg.weight_per_minute,
            request_weight=cfg.request_weight,
            timeout=cfg.request_timeout,
            max_attempts=cfg.max_attempts,
            metrics=self.metrics,
        )
        async with rest, anyio.create_task_group() as workers:
            for _ in range(max(1, cfg.concurrency)):
                workers.start_soon(self._work, rest, queue.clone(), outbox)
            queue.close()
            with send:
                async for req in inbox:
                    await self._take(req, send, outbox)
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

    async def _take(
        self,
        req: GapRequest,
        queue: MemoryObjectSendStream[GapRequest],
        outbox: Outbox[RecordBatch],
    ) -> None:
        if req.event_id in self._held:
            log.debug("%s: gap %s is already being fetched", self.name, req.event_id)
            return
        reason = _no_history(req)
        if reason is not None:
            resolution = _resolution(req, req.first, req.last, reason)
            await outbox.send(
                RecordBatch(source=SOURCE, resolutions=[resolution], received_at=now_us())
            )
            self.metrics.backfill_gaps.labels("unrecoverable").inc()
            return
        if req.first > req.last:
            log.warning("%s: ignoring gap %s with first > last", self.name, req.event_id)
            return
        try:
            queue.send_nowait(req)
        except anyio.WouldBlock:
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
        self._held.add(req.event_id)

    async def _work(
        self,
        rest: BinanceRest,
        queue: MemoryObjectReceiveStream[GapRequest],
        outbox: Outbox[RecordBatch],
    ) -> None:
        async with queue:
            async for req in queue:
                await self._fetch(rest, req, outbox)
                self._held.discard(req.event_id)

    async def _fetch(self, rest: BinanceRest, req: GapRequest, outbox: Outbox[RecordBatch]) -> None:
        """Page through ids req.first..req.last and send each page as it arrives."""
        attributes: dict[str, str | int] = {
            "k2d.exchange": req.exchange,
            "k2d.symbol": req.symbol,
            "k2d.gap.first": req.first,
            "k2d.gap.last": req.last,
        }
        with self._tracer.start_as_current_span("backfill.fetch", attributes=attributes) as span:
            context = span.get_span_context()
            rows = pages = 0
            result = "filled"
            from_id: int | None = req.first
            try:
                while from_id is not None and from_id <= req.last:
                    limit = min(self._page_limit, req.last - from_id + 1)
                    items = await rest.historical_trades(req.symbol, from_id, limit)
                    received = now_us()
                    pages += 1
                    trades, lost, next_id = _page(req, from_id, items, received)
                    if trades or lost:
                        batch = RecordBatch(
                            source=SOURCE,
                            trades=trades,
                            resolutions=lost,
                            received_at=received,
                            span_context=context,
                        )
                        await outbox.send(batch)
                    rows += len(trades)
                    self.metrics.backfill_rows.inc(len(trades))
                    if lost:
                        result = "unrecoverable"
                    elif next_id is None:
                        raise BinanceRestError(
                            f"venue answered fromId={from_id} with ids up to {items[-1].id}"
                        )
                    from_id = next_id
            except BinanceRestError as exc:
                result = "failed"
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                log.warning(
                    "%s: gap %s (%s ids %d..%d) stays open after %d rows: %s",
                    self.name,
                    req.event_id,
                    req.symbol,
                    req.first,
                    req.last,
                    rows,
                    exc,
                )
            span.set_attribute("k2d.rows", rows)
            span.set_attribute("k2d.pages", pages)
            span.set_attribute("k2d.result", result)
        self.metrics.backfill_gaps.labels(result).inc()


def _page(
    req: GapRequest, from_id: int, items: list[HistoricalTrade], received_us: int
) -> tuple[list[Trade], list[GapResolution], int | None]:
    """One page's trades inside the gap, the ids the venue cannot supply, the next fromId."""
    if not items:
        reason = f"venue returned no trades from id {from_id}"
        return [], [_resolution(req, from_id, req.last, reason)], None
    lost = []
    head = items[0].id
    if head > from_id:
        # The venue answers an id older than its history from its oldest retained trade.
        reason = f"venue history starts at id {head}"
        lost.append(_resolution(req, from_id, min(head - 1, req.last), reason))
    trades = [
        trade_from_rest(item, req.symbol, received_us)
        for item in items
        if from_id <= item.id <= req.last
    ]
    next_id = items[-1].id + 1
    return trades, lost, next_id if next_id > from_id else None


def _no_history(req: GapRequest) -> str | None:
    """Why no venue history can fill this request, or None if the REST history might."""
    if req.stream != "trade":
        return f"venue has no history for stream {req.stream}"
    if req.exchange != EXCHANGE:
        return f"no REST history source for exchange {req.exchange}"
    return None


def _resolution(req: GapRequest, first: int, last: int, reason: str) -> GapResolution:
    return GapResolution(
        exchange=req.exchange,
        symbol=req.symbol,
        stream=req.stream,
        first=first,
        last=last,
        status="unrecoverable",
        reason=reason,
    )
