"""THE wiring: every stream between actors (bounded, sizes from config) and every ChildSpec.

    FeedHandler --(partition by symbol)--> SequenceTracker[p] --+--> IcebergWriter --Committed--+
                                                                '--> LiveHub <------------------'

Start order: the ingest group (trackers, writer, hub) starts before the feeds, so the
first frame always has somewhere to go. Stop order is the same chain from the top: the
app sets `feeds_stop`; each feed flushes and closes its outbox; a tracker sees end of
input once every feed has closed and closes its own; the writer commits its last batch
(with its log position) when every tracker has closed, then closes Committed; the hub
ends last. Nothing is cancelled on the way, so no batch is lost in a send.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectSendStream
from opentelemetry import trace

from actors.backfill import Backfiller
from actors.feed import FeedHandler
from actors.live_hub import LiveHub
from actors.maintenance import Maintainer
from actors.query_pool import QueryPool
from actors.sequencer import SequenceTracker, TrackerState
from actors.writer import IcebergWriter
from k2d.config import Config
from k2d.journal import Journal, JournalPosition
from k2d.messages import RecordBatch
from k2d.model import partition_of
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

__all__ = ["PartitionedOutbox", "Pipeline", "build_pipeline"]


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
        split = [
            RecordBatch(
                source=item.source,
                log_position=item.log_position,
                received_at=item.received_at,
                span_context=item.span_context,
            )
            for _ in range(n)
        ]
        for t in item.trades:
            split[self._partition(t.exchange, t.symbol)].trades.append(t)
        for q in item.quotes:
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
                part.trades
                or part.quotes
                or part.dead_letters
                or part.log_position
                or part.outages
                or part.resolutions
            ):
                await out.send(part)


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


@dataclass
class FeedJournal:
    """A feed's capture journal, where to replay it from, and when it last captured."""

    journal: Journal
    replay_after: JournalPosition | None
    last_capture_us: int | None


def feed_factory(
    name: str,
    cfg: Config,
    metrics: Metrics,
    stop: anyio.Event,
    tracer: trace.Tracer,
    journal: FeedJournal | None,
) -> Callable[[], FeedHandler]:
    """The first instance replays the journal; one restarted after a crash does not."""
    first = [True]

    def make() -> FeedHandler:
        replay, first[0] = first[0], False
        return FeedHandler(
            name,
            cfg.feeds.binance,
            cfg.pipeline,
            metrics,
            stop,
            tracer,
            journal=journal.journal if journal else None,
            replay_after=journal.replay_after if journal else None,
            replay=replay,
            last_capture_us=journal.last_capture_us if journal and replay else None,
        )

    return make


@dataclass
class Pipeline:
    supervisor: Supervisor
    feeds_stop: anyio.Event
    live_hub: LiveHub
    query_pool: QueryPool
    feed_names: list[str]
    actor_names: set[str] = field(default_factory=set)
    maintainer: Maintainer | None = None


def build_pipeline(
    cfg: Config,
    warehouse: Warehouse,
    metrics: Metrics,
    registry: Registry,
    tracer: trace.Tracer,
    restore: Callable[[], Awaitable[TrackerState]] | None = None,
    journal: FeedJournal | None = None,
    sources: Sequence[tuple[str, Callable[[], Actor[None, RecordBatch]]]] = (),
) -> Pipeline:
    """Wire the actors. `sources` are extra producers of RecordBatches (a benchmark's
    recorded frames), routed to the trackers exactly like a live feed."""
    pc = cfg.pipeline
    size = pc.stream_size
    batch_ids = itertools.count(1)

    def backoff() -> Backoff:
        return Backoff(cfg.supervisor.backoff_initial, cfg.supervisor.backoff_max)

    to_writer, writer_inbox = bounded_stream(registry, "writer.inbox", size)
    to_hub, hub_inbox = bounded_stream(registry, "live_hub.inbox", size * 4)
    to_pool, pool_inbox = bounded_stream(registry, "query_pool.inbox", size * 4)
    tracker_inboxes = [
        bounded_stream(registry, f"sequencer-{p}.inbox", size) for p in range(pc.partitions)
    ]

    ingest: list[ChildSpec] = []
    # The backfiller answers on streams of its own, so a tracker can finish its live input
    # (and stop asking) while backfill results still come in: see SequenceTracker.run.
    backfill = cfg.backfill.enabled and cfg.feeds.binance.enabled
    if backfill:
        to_backfiller, backfill_inbox = bounded_stream(
            registry, "backfiller.inbox", cfg.backfill.max_pending
        )
        backfill_results = [
            bounded_stream(registry, f"sequencer-{p}.backfill", size) for p in range(pc.partitions)
        ]

    def tracker(p: int) -> Callable[[], SequenceTracker]:
        # Streams are made once, here: a restarted tracker keeps using the same ones.
        requests = to_backfiller.clone() if backfill else None
        results = backfill_results[p][1] if backfill else None
        return lambda: SequenceTracker(
            p,
            cfg.sequencer,
            metrics,
            batch_ids,
            restore,
            tracer,
            gap_requests=requests,
            backfill_inbox=results,
        )

    for p, (_, inbox) in enumerate(tracker_inboxes):
        out = Outbox[Any](f"sequencer-{p}.outbox", to_writer.clone(), to_hub.clone())
        ingest.append(ChildSpec.for_actor(f"sequencer-{p}", tracker(p), inbox, out, registry))
    # The pool hears of a commit before the hub does: once the hub counts a batch as
    # committed, a query already finds its rows in the pool's file index.
    writer_out = Outbox[Any]("writer.outbox", to_pool.clone(), to_hub.clone())
    ingest.append(
        ChildSpec.for_actor(
            "writer",
            lambda: IcebergWriter(warehouse, cfg.writer, metrics, tracer),
            writer_inbox,
            writer_out,
            registry,
        )
    )
    if backfill:
        bout = PartitionedOutbox("backfiller.outbox", [s.clone() for s, _ in backfill_results])
        ingest.append(
            ChildSpec.for_actor(
                "backfiller",
                lambda: Backfiller(cfg.backfill, cfg.feeds.binance.rest_url, metrics, tracer),
                backfill_inbox,
                bout,
                registry,
            )
        )
        for s, _ in backfill_results:
            s.close()
        to_backfiller.close()
    hub = LiveHub(cfg.live, metrics)
    ingest.append(ChildSpec.for_actor("live_hub", lambda: hub, hub_inbox, Outbox("none"), registry))

    feeds_stop = anyio.Event()
    feed_specs: list[ChildSpec] = []
    feed_names: list[str] = []
    if cfg.feeds.binance.enabled:
        name = "feed-binance"
        feed_names.append(name)
        fout = PartitionedOutbox(f"{name}.outbox", [s.clone() for s, _ in tracker_inboxes])
        feed_specs.append(
            ChildSpec.for_actor(
                name,
                feed_factory(name, cfg, metrics, feeds_stop, tracer, journal),
                None,
                fout,
                registry,
                restart=Restart.TRANSIENT,
            )
        )
    for name, factory in sources:
        feed_names.append(name)
        sout = PartitionedOutbox(f"{name}.outbox", [s.clone() for s, _ in tracker_inboxes])
        feed_specs.append(ChildSpec.for_actor(name, factory, None, sout, registry))
    if not feed_specs:
        # No feed (a box that only serves queries over loaded data): the ingest chain is
        # held open until stop, so the writer, hub and query pool stay up meanwhile.
        feed_specs.append(
            _held_open("no-feed", [s.clone() for s, _ in tracker_inboxes], feeds_stop, registry)
        )
    # Producers hold clones; closing the originals lets end-of-input flow once they finish.
    for s, _ in tracker_inboxes:
        s.close()
    to_writer.close()
    to_hub.close()
    pool = QueryPool(warehouse, cfg.query, metrics, tracer)
    query_spec = ChildSpec.for_actor(
        "query_pool", lambda: pool, pool_inbox, Outbox("none"), registry
    )
    maintainer = None
    if cfg.maintenance.enabled:
        maintainer = Maintainer(warehouse, cfg.maintenance, metrics, stop=feeds_stop)
        maintenance_spec = ChildSpec.for_actor(
            "maintainer",
            lambda: maintainer,
            None,
            # Replace commits re-plan the index. The clone is made only for a Maintainer
            # that runs: an unclosed one would keep the pool's inbox (and the drain) open.
            Outbox("maintainer.outbox", to_pool.clone()),
            registry,
            restart=Restart.TRANSIENT,
        )
    to_pool.close()

    sup = cfg.supervisor
    ingest_sup = Supervisor(
        "ingest", ingest, registry, Strategy.ONE_FOR_ALL, sup.max_restarts, sup.period, backoff()
    )
    feeds_sup = Supervisor(
        "feeds", feed_specs, registry, Strategy.ONE_FOR_ONE, sup.max_restarts, sup.period, backoff()
    )
    root = Supervisor(
        "root",
        # The query pool is outside the ingest chain: a query worker's crash never restarts
        # ingest, and the pool drains last (its inbox ends when the writer's does).
        [ingest_sup.as_child(), feeds_sup.as_child(), query_spec]
        + ([maintenance_spec] if maintainer is not None else []),
        registry,
        Strategy.ONE_FOR_ONE,
        sup.max_restarts,
        sup.period,
        backoff(),
    )
    names = {s.name for s in ingest} | {s.name for s in feed_specs} | {"query_pool"}
    if maintainer is not None:
        names.add("maintainer")
    return Pipeline(root, feeds_stop, hub, pool, feed_names, names, maintainer)
