"""Consumes market records from Kafka as a group member, with explicit positions and commits.

Where to read from is the caller's answer, not the group's: on every assignment the
`on_assigned` hook returns the offsets to seek to (in Kafka mode, those stored in the
Iceberg snapshot), and offsets are committed to the group only when the caller says so
(after its Iceberg commit). `on_revoked` runs before partitions go to another member, so
the caller can flush and commit first.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor

from k2d.kafka.codec import AvroCodec, MarketRecord

if TYPE_CHECKING:
    from k2d.config import KafkaConfig

__all__ = ["Consumer", "Delivery", "OnAssigned", "OnRevoked", "TopicPartition"]

log = logging.getLogger(__name__)

OnAssigned = Callable[[frozenset[TopicPartition]], Awaitable[Mapping[TopicPartition, int]]]
"""Newly assigned partitions -> the offset to start each at (absent: the group's offset)."""
OnRevoked = Callable[[frozenset[TopicPartition]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Delivery:
    """One consumed record; `record` is None (and `error` says why) if it did not decode."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    record: MarketRecord | None
    error: str | None
    traceparent: str | None


class Consumer:
    def __init__(
        self,
        config: KafkaConfig,
        group_id: str,
        topics: Iterable[str] | None = None,
        *,
        codec: AvroCodec | None = None,
        on_assigned: OnAssigned | None = None,
        on_revoked: OnRevoked | None = None,
        client_id: str = "k2d",
        instance_id: str | None = None,
    ) -> None:
        """`instance_id`: static group membership (KIP-345). A member restarted with the same
        id takes its partitions back at once instead of waiting out its former self's
        session, which after a `kill -9` would hold them meanwhile."""
        self._config = config
        self._codec = codec or AvroCodec()
        self._topics = tuple(topics or (config.trades_topic, config.quotes_topic))
        self._listener = _Listener(self, on_assigned, on_revoked)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=config.bootstrap_servers,
            group_id=group_id,
            group_instance_id=instance_id,
            client_id=client_id,
            enable_auto_commit=False,
            # Kafka is the log: a partition with no stored or committed position starts at
            # its beginning, never at "now".
            auto_offset_reset="earliest",
            max_poll_records=config.max_poll_records,
            request_timeout_ms=int(config.request_timeout * 1000),
            # Partition P of the trades topic and of the quotes topic feed the same tracker:
            # the range assignor gives both to the same member (round robin would split them).
            partition_assignment_strategy=(RangePartitionAssignor,),
        )

    async def start(self) -> None:
        self._consumer.subscribe(self._topics, listener=self._listener)
        await self._consumer.start()

    async def stop(self) -> None:
        """Runs `on_revoked` for the partitions held (aiokafka does not on close), then leaves
        the group so they go to other members."""
        try:
            await self._listener.on_partitions_revoked(set(self._consumer.assignment()))
        finally:
            await self._consumer.stop()

    def assignment(self) -> frozenset[TopicPartition]:
        return frozenset(self._consumer.assignment())

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._consumer.seek(partition, offset)

    async def poll(self, wait: float) -> list[Delivery]:
        """Up to max_poll_records records, waiting at most `wait` seconds for the first."""
        self._listener.raise_failure()
        batches = await self._consumer.getmany(
            timeout_ms=int(wait * 1000), max_records=self._config.max_poll_records
        )
        out: list[Delivery] = []
        for tp, messages in batches.items():
            for m in messages:
                record: MarketRecord | None = None
                error: str | None = None
                try:
                    record = self._codec.decode(m.value)
                except ValueError as e:  # UnknownSchemaError, CorruptRecordError
                    error = f"{type(e).__name__}: {e}"
                traceparent = next(
                    (v.decode("ascii", "replace") for k, v in m.headers if k == "traceparent"),
                    None,
                )
                out.append(
                    Delivery(
                        tp.topic, tp.partition, m.offset, m.key, m.value, record, error, traceparent
                    )
                )
        return out

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit to the group: each offset is the NEXT one to read (last consumed + 1)."""
        if offsets:
            await self._consumer.commit(dict(offsets))

    async def committed(self, partition: TopicPartition) -> int | None:
        offset: int | None = await self._consumer.committed(partition)
        return offset

    async def lag(self) -> dict[TopicPartition, int]:
        """Records behind the partition's end, per assigned partition, as of the last fetch
        (a partition not fetched yet is left out)."""
        out: dict[TopicPartition, int] = {}
        for tp in self._consumer.assignment():
            end = self._consumer.highwater(tp)
            if end is None:
                continue
            try:
                position = await self._consumer.position(tp)
            except Exception:  # reassigned meanwhile: no figure this time
                continue
            out[tp] = max(0, end - position)
        return out

    async def probe(self) -> None:
        """Ask the cluster for its topics; raises when no broker answers."""
        await self._consumer.topics()


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(
        self, owner: Consumer, on_assigned: OnAssigned | None, on_revoked: OnRevoked | None
    ) -> None:
        self._owner = owner
        self._on_assigned = on_assigned
        self._on_revoked = on_revoked
        self._failure: Exception | None = None

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if self._on_revoked is not None and revoked:
            try:
                await self._on_revoked(frozenset(revoked))
            except Exception as e:
                self._failure = e
                raise

    def raise_failure(self) -> None:
        """aiokafka only logs a listener's exception; reading on from the group's offsets
        after a failed `on_assigned` would be wrong, so the next poll raises it."""
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if self._on_assigned is None or not assigned:
            return
        try:
            positions = await self._on_assigned(frozenset(assigned))
        except Exception as e:
            self._failure = e
            raise
        for tp, offset in positions.items():
            if tp not in assigned:
                log.warning("kafka: ignoring a position for %s, not assigned here", tp)
                continue
            self._owner.seek(tp, offset)
