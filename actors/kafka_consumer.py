"""KafkaConsumer: in Kafka mode, the trackers' input; one tracker per Kafka partition.

On assignment each partition is sought to the offset the Iceberg snapshot stores
(`k2.log_position`, key `kafka:TOPIC:P@P`), never the group's: the table is the truth, so
a restart after `kill -9` resumes exactly after the last commit, and what came after it is
read again (the trackers drop repeats by sequence). Offsets go to the group only after an
Iceberg commit, for lag monitoring. A partition with records to read that delivers none
for `kafka.stall_timeout` restarts the chain; so does a rebalance after the first
assignment, since the recovery a restart runs is what re-reads the snapshot.

Several daemons in one group may share the tables (each its own lane of state, see
k2d.storage._state). Before partitions go to another member, the writer commits what the
trackers took from them, so the next owner starts where this one stopped. A member that
takes over partitions from one that died mid-flush undoes that flush's commits first.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import anyio
from aiokafka.errors import KafkaError
from anyio.streams.memory import MemoryObjectReceiveStream
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from actors.kafka_producer import OUTAGE_KIND, outage_from_event
from k2d.config import KafkaConfig
from k2d.kafka import Consumer, Delivery, TopicPartition, close_client, ensure_topics, reachable
from k2d.messages import RecordBatch
from k2d.model import DeadLetter, Quote, SequenceEvent, Trade, now_us
from k2d.runtime import Actor, Backoff, Outbox, OutsideFault
from k2d.telemetry.metrics import Metrics

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from actors.writer import CommitLog

__all__ = ["KafkaConsumer", "offset_key"]

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
# Group commits, lag figures and the broker probe, this often, seconds.
_TICK = 1.0
# Broker probes that must fail in a row before the consumer is closed as broker-less.
_AWAY_AFTER_MISSES = 3
# A poll waits this long for records, seconds.
_POLL_WAIT = 0.2


def offset_key(topic: str, partition: int) -> str:
    """The log_position key a partition's next offset is committed under (before the
    tracker's `@P`)."""
    return f"kafka:{topic}:{partition}"


class KafkaConsumer(Actor[None, RecordBatch]):
    name = "kafka-consumer"

    def __init__(
        self,
        cfg: KafkaConfig,
        committed: Mapping[str, Any],
        commits: CommitLog,
        metrics: Metrics,
        backoff: Backoff,
        drain: anyio.Event,
        instance_id: str,
        take_over: Callable[[set[int]], Awaitable[bool]] | None = None,
    ) -> None:
        """`committed`: the log position recovery read from the snapshot. `drain`: set once
        nothing more will be produced here; the consumer then reads to the end of its
        partitions and ends. `take_over(partitions)`, at the first assignment: undoes
        other members' flushes cut short that hold any of the partitions; True if the state
        the trackers were restored from is stale for them (the chain then recovers again)."""
        self.cfg = cfg
        self.metrics = metrics
        self.backoff = backoff
        self._committed = committed
        self._commits = commits
        self._drain = drain
        self._instance_id = instance_id
        self._take_over = take_over
        # Why the chain must go back through recovery (None: it need not).
        self._restart: str | None = None
        # The partitions of the first assignment, and the next offset of each that a
        # tracker has taken.
        self._assignment: frozenset[TopicPartition] | None = None
        self._next: dict[TopicPartition, int] = {}
        self._away = False
        self._stopping = False
        self._revoking = False
        self._group_offsets: dict[TopicPartition, int] = {}
        self._last_progress = time.monotonic()

    def start_offsets(self, partitions: frozenset[TopicPartition]) -> dict[TopicPartition, int]:
        """Where each partition resumes: after the snapshot's offset, else its beginning."""
        out = {}
        for tp in partitions:
            stored = self._committed.get(f"{offset_key(tp.topic, tp.partition)}@{tp.partition}")
            out[tp] = int(stored["offset"]) if isinstance(stored, dict) else 0
        return out

    async def _assigned(self, partitions: frozenset[TopicPartition]) -> dict[TopicPartition, int]:
        if self._assignment is None:
            self._assignment = partitions
            # Lag is reported for the partitions held: none of another assignment's stay.
            self.metrics.kafka_lag.clear()
            if self._take_over is not None and await self._take_over(
                {tp.partition for tp in partitions}
            ):
                # The trackers were restored from a state older than the tables' now.
                self._restart = "partitions came with newer state from other members"
                return {}
            offsets = self.start_offsets(partitions)
            log.info(
                "kafka: assigned %s", {f"{t.topic}:{t.partition}": o for t, o in offsets.items()}
            )
            return offsets
        if partitions == self._assignment:
            # A client made anew after the broker came back: on from what was delivered.
            return {tp: self._next.get(tp, o) for tp, o in self.start_offsets(partitions).items()}
        # The trackers hold the state of the partitions they had: only a recovery from the
        # snapshot is right for another assignment.
        self._restart = "the group moved partitions"
        return {}

    async def _revoked(self, partitions: frozenset[TopicPartition]) -> None:
        if self._stopping:
            return
        # Another member may get these next and starts from what the snapshot holds: let
        # the writer commit what the trackers took from them first (bounded), delivering
        # nothing more meanwhile; the chain goes back through recovery after.
        self._revoking = True
        try:
            with anyio.move_on_after(self.cfg.request_timeout):
                # The CommitLog has no event to wait on; the check is a few dict reads.
                while not self._all_committed(partitions):  # noqa: ASYNC110
                    await anyio.sleep(0.05)
        finally:
            self._revoking = False
            self._restart = "the group moved partitions"

    def _all_committed(self, partitions: frozenset[TopicPartition]) -> bool:
        position = self._commits.log_position
        for tp in partitions:
            taken = self._next.get(tp)
            if taken is None:
                continue
            stored = position.get(f"{offset_key(tp.topic, tp.partition)}@{tp.partition}")
            if not isinstance(stored, dict) or int(stored["offset"]) < taken:
                return False
        return True

    async def run(self, inbox: MemoryObjectReceiveStream[None] | None, outbox: Outbox[Any]) -> None:
        while True:
            consumer = await self._connected()
            self._away = False
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._tick, consumer, tg.cancel_scope)
                    await self._consume(consumer, outbox)
                    tg.cancel_scope.cancel()
            finally:
                self._stopping = True
                await _stop(consumer)
                self._stopping = False
            if not self._away:
                return
            # The broker went away: the client is closed (it would spin meanwhile) and a
            # new one made once a broker answers again.
            log.warning(
                "kafka: no broker answers at %s; consumer closed until one does",
                self.cfg.bootstrap_servers,
            )

    async def _connected(self) -> Consumer:
        while True:
            if not await reachable(self.cfg.bootstrap_servers):
                self.set_degraded(f"kafka: no broker answers at {self.cfg.bootstrap_servers}")
                await anyio.sleep(_TICK)
                continue
            consumer = Consumer(
                self.cfg,
                self.cfg.group_id,
                on_assigned=self._assigned,
                on_revoked=self._revoked,
                client_id=f"k2d-{socket.gethostname()}",
                instance_id=self._instance_id,
            )
            try:
                with anyio.fail_after(self.cfg.request_timeout):
                    await ensure_topics(self.cfg, (self.cfg.trades_topic, self.cfg.quotes_topic))
                    await consumer.start()
            except (KafkaError, OSError, TimeoutError) as e:
                self.set_degraded(f"kafka: cannot start consuming: {e}")
                log.warning("kafka consumer: cannot start (%s); retrying", e)
                self._stopping = True
                await _stop(consumer)
                self._stopping = False
                await anyio.sleep(self.backoff.next_delay())
                continue
            self.backoff.reset()
            self.set_degraded(None)
            log.info("kafka: consuming from %s", self.cfg.bootstrap_servers)
            return consumer

    async def _consume(self, consumer: Consumer, outbox: Outbox[Any]) -> None:
        self._last_progress = time.monotonic()
        while True:
            if self._restart is not None:
                raise OutsideFault("kafka_rebalance", f"{self._restart}: recovering")
            if self._revoking:
                await anyio.sleep(0.05)
                continue
            asked = time.monotonic()
            deliveries = await consumer.poll(_POLL_WAIT)
            if self._restart is not None or self._revoking:
                # The group changed during the poll: what it returned may come from offsets
                # other than the snapshot's, and goes nowhere (it is read again after).
                continue
            if not deliveries:
                # With no broker, the client answers at once and without yielding to the
                # event loop: pause here, or this loop would hold it.
                await anyio.sleep(max(0.0, asked + _POLL_WAIT - time.monotonic()))
            if deliveries:
                self._last_progress = time.monotonic()
                for (p, topic), batch in self._batches(deliveries).items():
                    await outbox.send_to(p, batch)
                    # Only what a tracker took counts as delivered.
                    assert batch.log_position is not None
                    self._next[TopicPartition(topic, p)] = batch.log_position[offset_key(topic, p)][
                        "offset"
                    ]
                continue
            assigned = consumer.assignment()
            lag = await consumer.lag() if assigned else {}
            behind = sum(lag.values())
            # Drained: every partition fetched at least once, and none with records left.
            if self._drain.is_set() and (
                not assigned or (len(lag) == len(assigned) and not behind)
            ):
                return
            if behind and time.monotonic() - self._last_progress > self.cfg.stall_timeout:
                raise OutsideFault(
                    "kafka_stalled",
                    f"{behind} records to read and none delivered for {self.cfg.stall_timeout}s",
                )

    def _batches(self, deliveries: list[Delivery]) -> dict[tuple[int, str], RecordBatch]:
        """A batch per partition and topic: one log position per batch, so that a tracker
        can tell a batch it has committed (read again after a restart) from a new one."""
        out: dict[tuple[int, str], RecordBatch] = {}
        counts: dict[str, int] = defaultdict(int)
        for d in deliveries:
            batch = out.get((d.partition, d.topic))
            if batch is None:
                batch = out[d.partition, d.topic] = RecordBatch(
                    source="kafka",
                    log_position={},
                    received_at=now_us(),
                    span_context=_span_context(d.traceparent),
                )
            assert batch.log_position is not None
            batch.log_position[offset_key(d.topic, d.partition)] = {"offset": d.offset + 1}
            counts[d.topic] += 1
            r = d.record
            if isinstance(r, Trade):
                batch.trades.append(r)
            elif isinstance(r, Quote):
                batch.quotes.append(r)
            elif isinstance(r, SequenceEvent) and r.kind == OUTAGE_KIND:
                batch.outages.append(outage_from_event(r))
            else:
                batch.dead_letters.append(
                    DeadLetter(
                        received_at=batch.received_at,
                        source=f"kafka:{d.topic}",
                        exchange=(d.key or b"").decode("utf-8", "replace").split(":", 1)[0],
                        reason="undecodable_record" if r is None else "unexpected_record",
                        raw=d.value,
                        detail=(d.error or f"{type(r).__name__} kind={getattr(r, 'kind', '')}")
                        + f" (partition {d.partition}, offset {d.offset})",
                    )
                )
        for topic, n in counts.items():
            self.metrics.kafka_consumed.labels(topic).inc(n)
        return out

    async def _tick(self, consumer: Consumer, scope: anyio.CancelScope) -> None:
        """Offsets committed to Iceberg go to the group, lag figures; when no broker answers,
        the consumer is stopped (`scope` cancelled) to be made anew."""
        misses = 0
        while True:
            await anyio.sleep(_TICK)
            if not await reachable(self.cfg.bootstrap_servers):
                # A probe can miss on a busy box (its 1 s covers this event loop's delay
                # too): only a few misses in a row mean the broker is away.
                misses += 1
                if misses < _AWAY_AFTER_MISSES:
                    continue
                self.set_degraded(f"kafka: no broker answers at {self.cfg.bootstrap_servers}")
                self._away = True
                scope.cancel()
                return
            misses = 0
            try:
                with anyio.fail_after(min(5.0, self.cfg.request_timeout)):
                    await self._commit_group(consumer)
                    for tp, n in (await consumer.lag()).items():
                        self.metrics.kafka_lag.labels(tp.topic, str(tp.partition)).set(n)
            except (KafkaError, OSError, TimeoutError) as e:
                self.set_degraded(f"kafka: {e}")
                continue
            self.set_degraded(None)

    async def _commit_group(self, consumer: Consumer) -> None:
        position = self._commits.log_position
        offsets: dict[TopicPartition, int] = {}
        for tp in consumer.assignment():
            stored = position.get(f"{offset_key(tp.topic, tp.partition)}@{tp.partition}")
            if isinstance(stored, dict):
                offset = int(stored["offset"])
                if self._group_offsets.get(tp) != offset:
                    offsets[tp] = offset
        if offsets:
            await consumer.commit(offsets)
            self._group_offsets.update(offsets)
            self.metrics.kafka_group_commits.inc()


def _span_context(traceparent: str | None) -> Any:
    if not traceparent:
        return None
    ctx = _PROPAGATOR.extract({"traceparent": traceparent})
    sc = trace.get_current_span(ctx).get_span_context()
    return sc if sc.is_valid else None


async def _stop(consumer: Consumer) -> None:
    """Close a client, bounded: with no broker, leaving the group waits on retries."""
    with anyio.CancelScope(shield=True):
        await close_client(consumer.stop, 2.0)
