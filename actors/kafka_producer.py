"""KafkaProducer: in Kafka mode, the feed's batches go to Kafka instead of the trackers.

Trades, quotes and the feed's outage reports are produced (idempotent, acks=all), each to
its symbol's partition. Only once the broker has acknowledged a whole batch does its
journal position go on, with the batch's dead letters, to the local tracker: that position
is committed to Iceberg, and a restart replays the journal after it, so what a crash cut
short is produced again (the trackers drop the repeats by sequence) and nothing is skipped.
Batches are handed to the client as they come and confirmed in order, a bounded number in
flight. While the broker does not answer the actor is DEGRADED and the client retries; the
full inbox meanwhile stops the feed reading (backpressure), and the backfiller closes the
gaps that leaves once the broker is back. A record the client gives up on ends the round,
and recovery replays the journal from the last acknowledged position.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
from aiokafka.errors import KafkaError
from anyio.streams.memory import MemoryObjectReceiveStream

from k2d.config import KafkaConfig
from k2d.kafka import KafkaTopicError, MarketRecord, Producer, close_client, reachable
from k2d.messages import Outage, RecordBatch
from k2d.model import SequenceEvent, now_us
from k2d.runtime import Actor, Backoff, Outbox, OutsideFault
from k2d.telemetry.metrics import Metrics

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["OUTAGE_KIND", "KafkaProducer", "outage_from_event", "produced_key"]

log = logging.getLogger(__name__)

# A feed's outage report on the trades topic (a ledger row kind never uses it).
OUTAGE_KIND = "feed_outage"
# An unacknowledged batch marks the actor DEGRADED after this long, seconds.
_DEGRADED_AFTER = 2.0
# While no broker answers, whether one does is asked this often, seconds.
_PROBE_INTERVAL = 1.0


def produced_key(feed: str) -> str:
    """The log_position key of the journal position up to which Kafka holds a feed's data."""
    return f"produced:{feed}"


def outage_events(o: Outage) -> list[SequenceEvent]:
    """One record per (symbol, stream) of an outage, so each travels with its symbol."""
    at = now_us()
    return [
        SequenceEvent(
            event_id=f"{o.source}:{o.exchange}:{symbol}:{stream}:outage:{o.start_us}",
            exchange=o.exchange,
            symbol=symbol,
            stream=stream,
            partition=-1,
            kind=OUTAGE_KIND,
            status="reported",
            detected_at=at,
            window_start=o.start_us,
            window_end=o.end_us,
            detail=o.reason,
            recorded_at=at,
        )
        for symbol in o.symbols
        for stream in o.streams
    ]


def outage_from_event(e: SequenceEvent) -> Outage:
    return Outage(
        source=e.event_id.split(":", 1)[0],
        exchange=e.exchange,
        symbols=(e.symbol,),
        streams=(e.stream,),
        start_us=e.window_start or 0,
        end_us=e.window_end or 0,
        reason=e.detail,
    )


@dataclass
class _InFlight:
    """A feed batch handed to the client: its acknowledgements, and what goes to the local
    tracker once they are all in."""

    acks: list[asyncio.Future[Any]]
    local: RecordBatch
    trades: int  # records on the trades topic (outage reports included)
    quotes: int
    sent_at: float


class KafkaProducer(Actor[RecordBatch, RecordBatch]):
    def __init__(
        self,
        name: str,
        cfg: KafkaConfig,
        metrics: Metrics,
        backoff: Backoff,
        in_flight: int,
        producer: Callable[[], Producer] | None = None,
    ) -> None:
        """`in_flight`: batches handed to the client and not yet acknowledged, at most."""
        self.name = name
        self.cfg = cfg
        self.metrics = metrics
        self.backoff = backoff
        self.in_flight = in_flight
        self._make = producer or (lambda: Producer(cfg, partition_by_symbol=True))

    async def run(
        self, inbox: MemoryObjectReceiveStream[RecordBatch] | None, outbox: Outbox[RecordBatch]
    ) -> None:
        if inbox is None:
            raise ValueError("KafkaProducer needs an inbox")
        producer = await self._connected()
        try:
            # Batches are handed to the client as they come and confirmed in order: waiting
            # for each batch's acknowledgement before the next would cap the rate at one
            # batch per round trip.
            to_confirm, pending = anyio.create_memory_object_stream[_InFlight](self.in_flight)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._confirm, pending, outbox)
                async with to_confirm:
                    async for batch in inbox:
                        await to_confirm.send(await self._hand_over(producer, batch))
        finally:
            with anyio.CancelScope(shield=True):
                await close_client(producer.stop, 5.0)

    async def _connected(self) -> Producer:
        """The producer, made (topics ensured) once a broker accepts connections."""
        while True:
            if not await reachable(self.cfg.bootstrap_servers):
                self.set_degraded(f"kafka: no broker answers at {self.cfg.bootstrap_servers}")
                await anyio.sleep(_PROBE_INTERVAL)
                continue
            producer = self._make()
            try:
                with anyio.fail_after(self.cfg.request_timeout):
                    await producer.start()
            except KafkaTopicError:
                raise  # a topic with another partition count: a configuration problem
            except (KafkaError, OSError, TimeoutError) as e:
                self.set_degraded(f"kafka: cannot start producing: {e}")
                log.warning("%s: cannot start the Kafka producer (%s); retrying", self.name, e)
                with anyio.CancelScope(shield=True):
                    await close_client(producer.stop, 2.0)
                await anyio.sleep(self.backoff.next_delay())
                continue
            self.backoff.reset()
            self.set_degraded(None)
            return producer

    async def _hand_over(self, producer: Producer, batch: RecordBatch) -> _InFlight:
        records: list[MarketRecord] = [*batch.trades, *batch.quotes]
        for o in batch.outages:
            records.extend(outage_events(o))
        try:
            acks = await producer.enqueue(records, span_context=batch.span_context)
        except KafkaError as e:
            raise OutsideFault("kafka_unavailable", f"kafka refused a record: {e}") from e
        local = RecordBatch(
            source=batch.source,
            dead_letters=batch.dead_letters,
            log_position=(
                {produced_key(batch.source): v for v in batch.log_position.values()}
                if batch.log_position
                else None
            ),
            received_at=batch.received_at,
            span_context=batch.span_context,
        )
        # Outage reports travel on the trades topic.
        on_trades = len(records) - len(batch.quotes)
        return _InFlight(acks, local, on_trades, len(batch.quotes), time.monotonic())

    async def _confirm(
        self, pending: MemoryObjectReceiveStream[_InFlight], outbox: Outbox[RecordBatch]
    ) -> None:
        """In order: once every record of a batch is acknowledged, its dead letters and
        journal position go to the local tracker. A record the client gave up on ends the
        round: recovery replays the journal from the last position Kafka acknowledged."""
        async with pending:
            async for entry in pending:
                await self._acknowledged(entry.acks)
                failed = next((f.exception() for f in entry.acks if f.exception()), None)
                if failed is not None:
                    raise OutsideFault(
                        "kafka_unacknowledged", f"kafka did not take a record: {failed}"
                    )
                self.metrics.kafka_send_seconds.observe(time.monotonic() - entry.sent_at)
                if entry.trades:
                    self.metrics.kafka_produced.labels(self.cfg.trades_topic).inc(entry.trades)
                if entry.quotes:
                    self.metrics.kafka_produced.labels(self.cfg.quotes_topic).inc(entry.quotes)
                if entry.local.dead_letters or entry.local.log_position:
                    await outbox.send(entry.local)

    async def _acknowledged(self, acks: list[asyncio.Future[Any]]) -> None:
        """Wait for `acks`; DEGRADED (saying whether a broker answers) while they are late."""
        waiting = set(acks)
        degraded = False
        while waiting:
            _, waiting = await asyncio.wait(waiting, timeout=_DEGRADED_AFTER)
            if waiting:
                degraded = True
                away = not await reachable(self.cfg.bootstrap_servers)
                self.set_degraded(
                    f"kafka: no broker answers at {self.cfg.bootstrap_servers}"
                    if away
                    else f"kafka: records unacknowledged for over {_DEGRADED_AFTER:.0f}s"
                )
        if degraded:
            self.set_degraded(None)
