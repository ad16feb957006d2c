"""Produces Trade/Quote records (and a feed's outage reports) to Kafka: Avro single-object
values, key `EXCHANGE:SYMBOL`.

Idempotent with acks=all, so a broker-side retry never duplicates or reorders a partition;
every send is bounded by `kafka.send_timeout`. The topics are created at start with the
configured partitions when missing, because the partition count decides which tracker
sees a symbol and must not be left to the broker's auto-create default.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from k2d.kafka.codec import AvroCodec, MarketRecord
from k2d.model import Quote, SequenceEvent, Trade, partition_of

if TYPE_CHECKING:
    from aiokafka.structs import RecordMetadata
    from opentelemetry.trace import SpanContext

    from k2d.config import KafkaConfig

__all__ = [
    "KafkaSendTimeout",
    "KafkaTopicError",
    "Producer",
    "ensure_topics",
    "record_key",
    "trace_headers",
]

_PROPAGATOR = TraceContextTextMapPropagator()
# How soon to ask again for a topic the broker does not describe whole yet (just created).
_DESCRIBE_RETRY_S = 0.1


class KafkaSendTimeout(TimeoutError):
    """The broker did not acknowledge in time. The outcome is unknown: the record may still
    land, so a caller that resends relies on message_id dedup downstream."""


class KafkaTopicError(RuntimeError):
    """A topic could not be created, or exists with another partition count."""


def record_key(record: MarketRecord) -> bytes:
    return f"{record.exchange}:{record.symbol}".encode()


def trace_headers(span_context: SpanContext | None) -> list[tuple[str, bytes]]:
    """W3C `traceparent` (and `tracestate` if any) for a span context, as record headers."""
    if span_context is None or not span_context.is_valid:
        return []
    carrier: dict[str, str] = {}
    ctx = trace.set_span_in_context(trace.NonRecordingSpan(span_context))
    _PROPAGATOR.inject(carrier, context=ctx)
    return [(k, v.encode()) for k, v in carrier.items()]


async def ensure_topics(config: KafkaConfig, topics: Iterable[str]) -> None:
    """Create missing topics with `config.partitions`; refuse one with another count."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=config.bootstrap_servers,
        request_timeout_ms=int(config.request_timeout * 1000),
    )
    await admin.start()
    try:
        wanted = sorted(set(topics))
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        if missing:
            response = await admin.create_topics(
                [NewTopic(t, config.partitions, config.replication_factor) for t in missing],
                timeout_ms=int(config.request_timeout * 1000),
            )
            for topic, code, *message in response.topic_errors:
                error = for_code(code)
                # Another process may create it between our list and create: that is fine.
                if code and error is not TopicAlreadyExistsError:
                    detail = message[0] if message and message[0] else error.__name__
                    raise KafkaTopicError(f"cannot create topic {topic}: {detail}")
        ready_by = time.monotonic() + config.request_timeout
        for described in await _described(admin, wanted, ready_by):
            count = len(described["partitions"])
            if count != config.partitions:
                raise KafkaTopicError(
                    f"topic {described['topic']} has {count} partitions, kafka.partitions "
                    f"says {config.partitions}: a symbol's records would move to another "
                    "partition; use a new topic or set kafka.partitions to match"
                )
    finally:
        await admin.close()


async def _described(
    admin: AIOKafkaAdminClient, topics: list[str], ready_by: float
) -> list[dict[str, Any]]:
    """The metadata of `topics` once the broker describes every one whole. A topic just
    created is committed by the controller before the broker answering has its metadata:
    meanwhile it is described with an error (UNKNOWN_TOPIC_OR_PARTITION,
    LEADER_NOT_AVAILABLE) or no partitions, which is not its partition count. `ready_by` is
    a time.monotonic() deadline."""
    while True:
        described: list[dict[str, Any]] = await admin.describe_topics(topics)
        pending = [d for d in described if d["error_code"] or not d["partitions"]]
        if not pending:
            return described
        if time.monotonic() >= ready_by:
            first = pending[0]
            why = for_code(first["error_code"]).__name__ if first["error_code"] else "no partitions"
            raise KafkaTopicError(
                f"topic {first['topic']} is not ready within kafka.request_timeout: the "
                f"broker describes it with {why}"
            )
        await asyncio.sleep(_DESCRIBE_RETRY_S)


class Producer:
    """aiokafka producer for market records; `start()` ensures the topics first."""

    def __init__(
        self,
        config: KafkaConfig,
        codec: AvroCodec | None = None,
        client_id: str = "k2d",
        *,
        partition_by_symbol: bool = False,
    ) -> None:
        """`partition_by_symbol`: each record goes to partition_of(exchange, symbol,
        kafka.partitions), the function embedded mode routes by, instead of the key's hash,
        so a symbol's tracker is the same in both modes."""
        self._config = config
        self._codec = codec or AvroCodec()
        self._by_symbol = partition_by_symbol
        self._topics: dict[type[MarketRecord], str] = {
            Trade: config.trades_topic,
            Quote: config.quotes_topic,
            # A feed's outage report travels with its symbol's trades, in order with them.
            SequenceEvent: config.trades_topic,
        }
        self._producer = AIOKafkaProducer(
            bootstrap_servers=config.bootstrap_servers,
            client_id=client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=config.linger_ms,
            max_batch_size=config.batch_bytes,
            max_request_size=max(config.batch_bytes, 1024 * 1024),
            request_timeout_ms=int(config.request_timeout * 1000),
        )

    async def start(self) -> None:
        await ensure_topics(self._config, self._topics.values())
        await self._producer.start()

    async def stop(self) -> None:
        """Flushes what is buffered, then closes the connections."""
        await self._producer.stop()

    def topic_for(self, record: MarketRecord) -> str:
        try:
            return self._topics[type(record)]
        except KeyError:
            raise TypeError(f"no topic configured for {type(record).__name__}") from None

    async def send(
        self, record: MarketRecord, *, span_context: SpanContext | None = None
    ) -> RecordMetadata:
        """Send one record and wait for the broker's acknowledgement."""
        return (await self.send_batch((record,), span_context=span_context))[0]

    async def enqueue(
        self, records: Iterable[MarketRecord], *, span_context: SpanContext | None = None
    ) -> list[asyncio.Future[Any]]:
        """Hand records to the client in order; each future resolves at its acknowledgement.
        Waits only while the client's buffer is full (backpressure)."""
        headers = trace_headers(span_context)
        return [
            await self._producer.send(
                self.topic_for(record),
                value=self._codec.encode(record),
                key=record_key(record),
                headers=headers,
                partition=self._partition(record),
            )
            for record in records
        ]

    def _partition(self, record: MarketRecord) -> int | None:
        if not self._by_symbol:
            return None
        return partition_of(record.exchange, record.symbol, self._config.partitions)

    async def send_batch(
        self, records: Iterable[MarketRecord], *, span_context: SpanContext | None = None
    ) -> list[RecordMetadata]:
        """Send records in order and wait until all are acknowledged, within send_timeout."""
        headers = trace_headers(span_context)
        futures: list[asyncio.Future[Any]] = []
        topics: set[str] = set()
        try:
            async with asyncio.timeout(self._config.send_timeout):
                for record in records:
                    topic = self.topic_for(record)
                    topics.add(topic)
                    partition = self._partition(record)
                    futures.append(
                        await self._producer.send(
                            topic,
                            value=self._codec.encode(record),
                            key=record_key(record),
                            headers=headers,
                            partition=partition,
                        )
                    )
                return list(await asyncio.gather(*futures))
        except TimeoutError:
            # The timeout cancelled the gather and with it the delivery futures; aiokafka
            # skips done futures, and the records may still be delivered.
            raise KafkaSendTimeout(
                f"{len(futures)} record(s) to {', '.join(sorted(topics)) or 'kafka'} not "
                f"acknowledged within kafka.send_timeout={self._config.send_timeout}s"
            ) from None
