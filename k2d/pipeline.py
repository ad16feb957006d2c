"""THE wiring: every stream between actors (bounded, sizes from config) and every ChildSpec.

    FeedHandler --(partition by symbol)--> SequenceTracker[p] --+--> IcebergWriter --Committed--+
                                                                '--> LiveHub <------------------'

The supervisor tree:

    root (one-for-one)
      capture (one-for-all, rebuilt every round): recovery, then the feeds, the journal's
              syncer and retention, the trackers, the backfiller, the writer, the live hub
      query_pool
      maintainer

One fault model (DESIGN section 6): whatever fails inside the capture chain, the whole
chain, feeds included, goes back through the recovery a process start runs (k2d/recovery.py:
undo a cut-short flush, restore the trackers from the snapshot and the ledger, reopen the
journal and replay it from the committed position), with fresh actors and fresh streams.
So nothing a commit has not acknowledged survives a failure in memory, exactly as after
`kill -9`. The query pool and the HTTP API stay up meanwhile. A fault from outside
(disk full, read-only, I/O error, locked catalog) leaves the chain DEGRADED and retried
with backoff for as long as it lasts; a bug that keeps failing escalates (exit 70).

Start order, inside a round: recovery first, then every actor at once; a feed's first
frame always has somewhere to go since every stream exists before any child starts. Stop
order is the same chain from the top: the app sets `feeds_stop`; each feed flushes and
closes its outbox (and the journal's syncer and retention end with the last feed); a
tracker sees end of input once every feed has closed and closes its own; the writer commits
its last batch (with its log position) when every tracker has closed, then closes
Committed; the hub ends last. Nothing is cancelled on the way, so no batch is lost in a
send. The query pool drains after the capture chain has ended for good.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
import pyarrow as pa
from anyio.streams.memory import MemoryObjectSendStream
from opentelemetry import trace

from actors.backfill import Backfiller
from actors.feed import FeedHandler
from actors.kafka_consumer import KafkaConsumer
from actors.kafka_producer import KafkaProducer
from actors.live_hub import Fanout, LiveHub
from actors.maintenance import Maintainer
from actors.query_pool import QueryPool
from actors.sequencer import SequenceTracker
from actors.writer import CommitLog, IcebergWriter
from k2d.columns import by_stream
from k2d.config import Config
from k2d.journal import Journal
from k2d.messages import Committed, RecordBatch
from k2d.model import Quote, Trade, now_us, partition_of
from k2d.query import Format, Plan, ResultStream
from k2d.recovery import (
    Recovered,
    committed_position,
    journal_key,
    lane,
    recover,
    shared_partitions,
    tracker_partitions,
)
from k2d.runtime import (
    Actor,
    ActorState,
    Backoff,
    ChildSpec,
    Outbox,
    Registry,
    Restart,
    Strategy,
    Supervisor,
    bounded_stream,
)
from k2d.storage import Warehouse
from k2d.telemetry.metrics import Metrics

__all__ = ["CurrentHub", "CurrentPool", "PartitionedOutbox", "Pipeline", "build_pipeline"]

log = logging.getLogger(__name__)

# Worker threads for commits, recovery and journal fsync: kept apart from anyio's default
# pool, which the HTTP side shares, so no burst of requests can hold up a commit.
_INGEST_THREADS = 4


class PartitionedOutbox(Outbox[RecordBatch]):
    """Splits a feed's batch by partition_of(exchange, symbol): one symbol, one tracker."""

    def __init__(self, name: str, streams: list[MemoryObjectSendStream[RecordBatch]]) -> None:
        super().__init__(name, *streams)
        self._parts = streams
        self._outs = [Outbox(f"{name}[{i}]", s) for i, s in enumerate(streams)]
        self._cache: dict[tuple[str, str], int] = {}

    def _partition(self, exchange: str, symbol: str) -> int:
        key = (exchange, symbol)
        p = self._cache.get(key)
        if p is None:
            p = self._cache[key] = partition_of(exchange, symbol, len(self._parts))
        return p

    async def send(self, item: RecordBatch) -> None:
        n = len(self._parts)
        if n == 1:
            await Outbox.send(self, item)
            return
        columns: list[dict[str, pa.Table]] = [{} for _ in range(n)]
        for table, given in item.columns.items():
            for index, part in self._split_columns(given):
                columns[index][table] = part
        split = [
            RecordBatch(
                source=item.source,
                columns=columns[i],
                log_position=item.log_position,
                received_at=item.received_at,
                span_context=item.span_context,
            )
            for i in range(n)
        ]
        for t in item.trades if "trades" not in item.columns else ():
            split[self._partition(t.exchange, t.symbol)].trades.append(t)
        for q in item.quotes if "quotes" not in item.columns else ():
            split[self._partition(q.exchange, q.symbol)].quotes.append(q)
        # Dead letters have no symbol to route by; partition 0 stores them.
        split[0].dead_letters = item.dead_letters
        for r in item.resolutions:
            split[self._partition(r.exchange, r.symbol)].resolutions.append(r)
        for o in item.outages:
            by_part: dict[int, list[str]] = {}
            for sym in o.symbols:
                by_part.setdefault(self._partition(o.exchange, sym), []).append(sym)
            for index, syms in by_part.items():
                split[index].outages.append(msgspec.structs.replace(o, symbols=tuple(syms)))
        for out, part in zip(self._outs, split, strict=True):
            if (
                part.count("trades")
                or part.count("quotes")
                or part.dead_letters
                or part.log_position
                or part.outages
                or part.resolutions
            ):
                await out.send(part)

    def _split_columns(self, columns: pa.Table) -> list[tuple[int, pa.Table]]:
        """The rows of each partition, each symbol's in batch order."""
        streams = by_stream(columns)
        parts: dict[int, list[pa.Table]] = {}
        for (exchange, symbol), part in streams.parts():
            parts.setdefault(self._partition(exchange, symbol), []).append(part)
        if len(parts) == 1:
            return [(next(iter(parts)), streams.columns)]
        return [(index, pa.concat_tables(tables)) for index, tables in sorted(parts.items())]


class CurrentHub:
    """The LiveHub of the running capture round, for the API: a round that fails takes its
    hub (and the uncommitted rows in it) along, as a killed process would."""

    hub: LiveHub | None = None
    # The stream's subscribers: made once, published to by every round's hub.
    fanout: Fanout | None = None

    def recent_trades(
        self, exchange: str, symbol: str, since_us: int = 0, *, uncommitted_only: bool = False
    ) -> list[Trade]:
        if self.hub is None:
            return []
        return self.hub.recent_trades(exchange, symbol, since_us, uncommitted_only=uncommitted_only)

    def recent_quotes(
        self, exchange: str, symbol: str, since_us: int = 0, *, uncommitted_only: bool = False
    ) -> list[Quote]:
        if self.hub is None:
            return []
        return self.hub.recent_quotes(exchange, symbol, since_us, uncommitted_only=uncommitted_only)

    def symbols(self) -> list[tuple[str, str]]:
        return self.hub.symbols() if self.hub is not None else []

    def row_count(self) -> int:
        return self.hub.row_count() if self.hub is not None else 0


class CurrentPool:
    """The running QueryPool, for the API (a restarted pool is a new instance)."""

    def __init__(self, pool: QueryPool) -> None:
        self.pool = pool
        self.cfg = pool.cfg

    async def execute(self, key: str, plan: Plan, fmt: Format) -> ResultStream:
        return await self.pool.execute(key, plan, fmt)

    async def catch_up(self) -> None:
        await self.pool.catch_up()


def _made(actor: Actor[Any, Any]) -> Callable[[], Actor[Any, Any]]:
    """The factory of a capture round's child: the round made the instance, with its state
    from recovery; the next round makes another."""
    return lambda: actor


def _held_open(
    name: str,
    streams: list[MemoryObjectSendStream[RecordBatch]],
    stop: anyio.Event,
    registry: Registry,
) -> ChildSpec:
    """A child that sends nothing and ends at `stop`, keeping `streams` open until then."""

    async def wait() -> None:
        registry.set_state(name, ActorState.RUNNING)
        await stop.wait()

    def close() -> None:
        for s in streams:
            s.close()

    return ChildSpec(name, wait, Restart.TRANSIENT, on_exit=close)


def _until(name: str, work: Callable[[], Any], done: anyio.Event, registry: Registry) -> ChildSpec:
    """A child that runs `work` (a loop) until `done` is set, then ends cleanly."""

    async def run() -> None:
        registry.set_state(name, ActorState.RUNNING)
        async with anyio.create_task_group() as tg:
            tg.start_soon(work)
            await done.wait()
            tg.cancel_scope.cancel()

    return ChildSpec(name, run, Restart.TRANSIENT)


@dataclass
class Pipeline:
    supervisor: Supervisor
    feeds_stop: anyio.Event
    live_hub: CurrentHub
    query_pool: CurrentPool
    feed_names: list[str]
    commits: CommitLog
    actor_names: set[str] = field(default_factory=set)
    maintainer: Callable[[], Maintainer | None] = lambda: None


def build_pipeline(
    cfg: Config,
    warehouse: Warehouse,
    metrics: Metrics,
    registry: Registry,
    tracer: trace.Tracer,
    sources: Sequence[tuple[str, Callable[[], Actor[None, RecordBatch]]]] = (),
) -> Pipeline:
    """Wire the actors. `sources` are extra producers of RecordBatches (a benchmark's
    recorded frames), routed to the trackers exactly like a live feed."""
    pc = cfg.pipeline
    size = pc.stream_size
    batch_ids = itertools.count(1)
    feeds_stop = anyio.Event()
    limiter = anyio.CapacityLimiter(_INGEST_THREADS)
    hub_view = CurrentHub()
    hub_view.fanout = Fanout(tracer)
    commits = CommitLog()
    # Serialises table maintenance with the capture chain's recovery: a round never
    # rewrites the files of a cut-short flush before recovery has undone it.
    table_lock = anyio.Lock()
    # Committed messages reach the pool through clones of this stream: one per capture
    # round (closed when the round ends) and one for the Maintainer.
    to_pool, pool_inbox = bounded_stream(registry, "query_pool.inbox", size * 4)
    backfill = cfg.backfill.enabled and cfg.feeds.binance.enabled
    with_feed = cfg.feeds.binance.enabled
    feed_names = (["feed-binance"] if with_feed else []) + [name for name, _ in sources]
    kafka = cfg.kafka.enabled
    tracked = tracker_partitions(cfg)

    def backoff() -> Backoff:
        return Backoff(cfg.supervisor.backoff_initial, cfg.supervisor.backoff_max)

    def capture_children(rec: Recovered, pool_out: MemoryObjectSendStream[Any]) -> list[ChildSpec]:
        """Fresh streams and actors for one round, resuming from `rec`."""
        to_writer, writer_inbox = bounded_stream(registry, "writer.inbox", size)
        to_hub, hub_inbox = bounded_stream(registry, "live_hub.inbox", size * 4)
        # One tracker per partition that owns symbols; in Kafka mode one more, the local
        # tracker, for what the feed does not put in Kafka: its dead letters and the
        # journal position up to which Kafka holds its data.
        tracker_inboxes = [
            bounded_stream(registry, f"sequencer-{p}.inbox", size)
            for p in range(tracked + (1 if kafka else 0))
        ]
        children: list[ChildSpec] = []
        # The backfiller answers on streams of its own, so a tracker can finish its live
        # input (and stop asking) while backfill results still come in: see
        # SequenceTracker.run.
        if backfill:
            to_backfiller, backfill_inbox = bounded_stream(
                registry, "backfiller.inbox", cfg.backfill.max_pending
            )
            backfill_results = [
                bounded_stream(registry, f"sequencer-{p}.backfill", size) for p in range(tracked)
            ]

        async def restored() -> Any:
            return rec.trackers

        for p, (_, inbox) in enumerate(tracker_inboxes):
            # The hub first: a live subscriber's row does not wait while the writer's inbox
            # is full, and the hub holds a batch before the writer can commit it.
            out = Outbox[Any](f"sequencer-{p}.outbox", to_hub.clone(), to_writer.clone())
            tracker = SequenceTracker(
                p,
                cfg.sequencer,
                metrics,
                batch_ids,
                restored,
                tracer,
                gap_requests=to_backfiller.clone() if backfill else None,
                backfill_inbox=backfill_results[p][1] if backfill and p < tracked else None,
            )
            children.append(
                ChildSpec.for_actor(f"sequencer-{p}", _made(tracker), inbox, out, registry)
            )
        # The pool hears of a commit before the hub does: once the hub counts a batch as
        # committed, a query already finds its rows in the pool's file index.
        writer_out = Outbox[Any]("writer.outbox", pool_out, to_hub.clone())
        writer = IcebergWriter(
            warehouse,
            cfg.writer,
            metrics,
            tracer,
            limiter=limiter,
            log=commits,
            member=lane(cfg),
            shared_partitions=shared_partitions(cfg),
        )
        children.append(
            ChildSpec.for_actor("writer", _made(writer), writer_inbox, writer_out, registry)
        )
        if backfill:
            bout = PartitionedOutbox("backfiller.outbox", [s.clone() for s, _ in backfill_results])
            backfiller = Backfiller(
                cfg.backfill,
                cfg.feeds.binance.rest_url,
                metrics,
                tracer,
                ban_file=cfg.storage.data_path() / "state" / "binance-rest.json",
            )
            children.append(
                ChildSpec.for_actor("backfiller", _made(backfiller), backfill_inbox, bout, registry)
            )
            for s, _ in backfill_results:
                s.close()
            to_backfiller.close()
        hub = LiveHub(cfg.live, metrics, hub_view.fanout)
        hub_view.hub = hub
        children.append(
            ChildSpec.for_actor("live_hub", _made(hub), hub_inbox, Outbox("none"), registry)
        )

        feeds_done = anyio.Event()
        producers = len(feed_names)

        def feed_ended(outbox: Outbox[Any]) -> Callable[[], None]:
            def close() -> None:
                nonlocal producers
                outbox.close()
                producers -= 1
                if producers == 0:
                    feeds_done.set()

            return close

        async def take_over(partitions: set[int]) -> bool:
            """At the first assignment: whether the trackers' state for `partitions` is stale,
            so that the round must recover again. Other members committed them until the
            group gave them here (after this round's recovery read the tables), or died
            mid-flush, whose commits are undone first."""
            async with table_lock:
                rolled = await anyio.to_thread.run_sync(
                    warehouse.roll_back_taken_over, lane(cfg), partitions, limiter=limiter
                )
                _, now = await anyio.to_thread.run_sync(
                    warehouse.latest_k2_state, lane(cfg), shared_partitions(cfg), limiter=limiter
                )
            return bool(rolled) or offsets_moved(rec.trackers.log_position, now, partitions)

        if kafka:
            # Feeds produce to Kafka through the producer; the consumer feeds the trackers.
            to_producer, producer_inbox = bounded_stream(registry, "kafka-producer.inbox", size)
            produced = anyio.Event()
            if feed_names:
                children.append(
                    _kafka_producer(
                        cfg,
                        metrics,
                        producer_inbox,
                        tracker_inboxes[tracked][0],
                        produced,
                        backoff(),
                        registry,
                    )
                )
            else:
                producer_inbox.close()
            consumer = KafkaConsumer(
                cfg.kafka,
                rec.trackers.log_position,
                commits,
                metrics,
                backoff(),
                drain=produced if feed_names else feeds_stop,
                instance_id=lane(cfg),
                take_over=take_over,
            )
            consumer_out = Outbox[Any](
                "kafka-consumer.outbox", *[s.clone() for s, _ in tracker_inboxes[:tracked]]
            )
            children.append(
                ChildSpec.for_actor("kafka-consumer", _made(consumer), None, consumer_out, registry)
            )

        def feed_spec(name: str, actor: Actor[None, RecordBatch]) -> ChildSpec:
            out: Outbox[RecordBatch]
            if kafka:
                out = Outbox(f"{name}.outbox", to_producer.clone())
            else:
                out = PartitionedOutbox(f"{name}.outbox", [s.clone() for s, _ in tracker_inboxes])
            spec = ChildSpec.for_actor(name, _made(actor), None, out, registry)
            return ChildSpec(name, spec.start, Restart.TRANSIENT, on_exit=feed_ended(out))

        if with_feed:
            feed = FeedHandler(
                "feed-binance",
                cfg.feeds.binance,
                cfg.pipeline,
                metrics,
                feeds_stop,
                tracer,
                journal=rec.journal,
                replay_after=rec.replay_after,
                last_capture_us=rec.last_capture_us,
                down_reason=rec.down_reason,
            )
            metrics.watch_feed(feed.name, feed.connections)
            children.append(feed_spec("feed-binance", feed))
        for name, factory in sources:
            children.append(feed_spec(name, factory()))
        if not feed_names:
            # No feed (a box that only serves queries over loaded data, or only consumes from
            # Kafka): the trackers no feed writes to are held open until stop, so the writer,
            # hub and query pool stay up meanwhile.
            held = tracker_inboxes[tracked:] if kafka else tracker_inboxes
            children.append(
                _held_open("no-feed", [s.clone() for s, _ in held], feeds_stop, registry)
            )
        journal = rec.journal
        if journal is not None:
            metrics.watch_journal(journal.feed, journal)
            children.append(
                _until("journal", lambda: journal.run_syncer(limiter), feeds_done, registry)
            )
            children.append(
                _until(
                    "journal-retention",
                    lambda: _journal_retention(cfg, warehouse, journal, limiter),
                    feeds_done,
                    registry,
                )
            )
        # Producers hold clones; closing the originals lets end-of-input flow once they finish.
        for s, _ in tracker_inboxes:
            s.close()
        if kafka:
            to_producer.close()
        to_writer.close()
        to_hub.close()
        return children

    failures: list[str] = []  # what ended the last round, for the next one's outage row

    @contextlib.asynccontextmanager
    async def capture_round() -> AsyncIterator[list[ChildSpec]]:
        """Recover, then yield this round's children; on the way out, release what the
        round held (its clone of the pool's stream, the journal) whatever happened."""
        after = failures[-1] if failures else None
        async with table_lock:
            rec = await anyio.to_thread.run_sync(recover, cfg, warehouse, after, limiter=limiter)
        pool_out = to_pool.clone()
        try:
            if rec.rolled_back:
                log.warning("recovery undid the cut-short flush on %s", ", ".join(rec.rolled_back))
                for table, snapshot_id in rec.rolled_back.items():
                    # Not an append: the pool re-plans the table without the undone files.
                    await pool_out.send(
                        Committed(
                            table=table,
                            snapshot_id=snapshot_id,
                            files=(),
                            batch_ids=(),
                            rows=0,
                            committed_at=now_us(),
                        )
                    )
            yield capture_children(rec, pool_out)
        except Exception as exc:
            failures[:] = [_first_failure(exc)]
            raise
        finally:
            pool_out.close()
            hub_view.hub = None
            if rec.journal is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(_close_journal, rec.journal, limiter=limiter)

    pool = CurrentPool(QueryPool(warehouse, cfg.query, metrics, tracer))
    pool_starts = itertools.count()

    def make_pool() -> QueryPool:
        # The first start takes the instance made above; a restart, a fresh one.
        if next(pool_starts):
            pool.pool = QueryPool(warehouse, cfg.query, metrics, tracer)
        return pool.pool

    query_spec = ChildSpec.for_actor("query_pool", make_pool, pool_inbox, Outbox("none"), registry)
    maintainer: list[Maintainer] = []
    children = [query_spec]
    if cfg.maintenance.enabled:
        # The Maintainer's replace commits re-plan the index. The clone is made only for a
        # Maintainer that runs: an unclosed one would keep the pool's inbox (and the drain)
        # open.
        def make_maintainer() -> Maintainer:
            m = Maintainer(
                warehouse, cfg.maintenance, metrics, stop=feeds_stop, lock=table_lock, tracer=tracer
            )
            maintainer[:] = [m]
            return m

        children.append(
            ChildSpec.for_actor(
                "maintainer",
                make_maintainer,
                None,
                Outbox("maintainer.outbox", to_pool.clone()),
                registry,
            )
        )

    def current_maintainer() -> Maintainer | None:
        return maintainer[0] if maintainer else None

    sup = cfg.supervisor
    capture = Supervisor(
        "capture",
        capture_round,
        registry,
        Strategy.ONE_FOR_ALL,
        sup.max_restarts,
        sup.period,
        backoff(),
    )
    root = Supervisor(
        "root",
        # The query pool is outside the capture chain: a query worker's crash never restarts
        # capture, and the pool drains last (its inbox ends when the chain has ended for good).
        [ChildSpec("capture", capture.run, Restart.TRANSIENT, on_exit=to_pool.close), *children],
        registry,
        Strategy.ONE_FOR_ONE,
        sup.max_restarts,
        sup.period,
        backoff(),
    )
    names = {f"sequencer-{p}" for p in range(tracked + (1 if kafka else 0))}
    names |= {"writer", "live_hub"}
    if kafka:
        names |= {"kafka-consumer"} | ({"kafka-producer"} if feed_names else set())
    names |= set(feed_names) if feed_names else {"no-feed"}
    names |= {s.name for s in children}
    if backfill:
        names.add("backfiller")
    return Pipeline(
        root,
        feeds_stop,
        hub_view,
        pool,
        feed_names,
        commits,
        names,
        current_maintainer,
    )


def _kafka_producer(
    cfg: Config,
    metrics: Metrics,
    inbox: Any,
    local: MemoryObjectSendStream[RecordBatch],
    produced: anyio.Event,
    backoff: Backoff,
    registry: Registry,
) -> ChildSpec:
    """The producer between the feeds and Kafka; `produced` is set once it has ended."""
    out = Outbox[RecordBatch]("kafka-producer.outbox", local.clone())
    actor = KafkaProducer(
        "kafka-producer", cfg.kafka, metrics, backoff, in_flight=cfg.pipeline.stream_size
    )
    spec = ChildSpec.for_actor("kafka-producer", _made(actor), inbox, out, registry)

    def ended() -> None:
        out.close()
        produced.set()

    return ChildSpec("kafka-producer", spec.start, Restart.TRANSIENT, on_exit=ended)


async def _journal_retention(
    cfg: Config, warehouse: Warehouse, journal: Journal, limiter: anyio.CapacityLimiter
) -> None:
    """Delete old journal segments, never one holding frames after the committed position."""
    jc = cfg.journal
    while True:
        await anyio.sleep(jc.retention_interval)
        _, log_position = await anyio.to_thread.run_sync(
            warehouse.latest_k2_state, lane(cfg), limiter=limiter
        )
        keep_after = committed_position(log_position, *journal_key(cfg))
        deleted = await anyio.to_thread.run_sync(
            journal.enforce_retention,
            jc.retention_days * 86_400,
            jc.max_total_bytes,
            keep_after,
            limiter=limiter,
        )
        if deleted:
            log.info("journal retention deleted %d segments", len(deleted))


def _first_failure(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


def _close_journal(journal: Journal) -> None:
    """Close (flush, fsync, unlock) a round's journal; a failure here (the disk that failed
    the round) loses nothing the next round's recovery does not see."""
    try:
        journal.close()
    except Exception as exc:  # an OSError, or the JournalError that wraps one
        log.warning("journal %s: closed without a final sync: %s", journal.path, exc)


def offsets_moved(before: dict[str, Any], after: dict[str, Any], partitions: set[int]) -> bool:
    """Whether any Kafka offset of `partitions` differs between two log positions."""
    for key in before.keys() | after.keys():
        name, _, part = key.rpartition("@")
        ours = name.startswith("kafka:") and part.isdigit() and int(part) in partitions
        if ours and before.get(key) != after.get(key):
            return True
    return False
