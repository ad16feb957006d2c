"""Every Prometheus metric of the daemon, defined once. Names: k2d_ prefix, base units."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from k2d.runtime import ActorState, Registry

__all__ = ["Metrics"]

_COMMIT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _RuntimeCollector(Collector):
    """Reads actor states, restarts and stream depths from the runtime registry at scrape."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def collect(self):  # type: ignore[no-untyped-def]
        depth = GaugeMetricFamily(
            "k2d_stream_depth", "Items waiting in a bounded stream", labels=["stream"]
        )
        capacity = GaugeMetricFamily(
            "k2d_stream_capacity", "Capacity of a bounded stream", labels=["stream"]
        )
        for name, (used, size) in sorted(self._registry.stream_depths().items()):
            depth.add_metric([name], used)
            capacity.add_metric([name], size)
        state = GaugeMetricFamily(
            "k2d_actor_state", "1 for the actor's current state", labels=["actor", "state"]
        )
        for actor, current in sorted(self._registry.states.items()):
            for s in ActorState:
                state.add_metric([actor, s.value], 1.0 if s is current else 0.0)
        restarts = GaugeMetricFamily(
            "k2d_actor_restarts", "Restarts of an actor since process start", labels=["actor"]
        )
        for actor, n in sorted(self._registry.restarts.items()):
            restarts.add_metric([actor], n)
        yield from (depth, capacity, state, restarts)


class Metrics:
    """One instance per process (tests make their own, so registries never collide)."""

    def __init__(self, runtime: Registry | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.frames = Counter(
            "k2d_feed_frames_total", "Frames received from a venue", ["feed"], registry=r
        )
        self.records = Counter(
            "k2d_feed_records_total", "Records parsed from frames", ["feed", "stream"], registry=r
        )
        self.feed_connects = Counter(
            "k2d_feed_connects_total", "WebSocket connections opened", ["feed"], registry=r
        )
        self.feed_lag = Gauge(
            "k2d_feed_lag_seconds", "Receive time minus venue event time", ["feed"], registry=r
        )
        self.dead_letters = Counter(
            "k2d_dead_letters_total",
            "Inputs routed to market.dead_letters",
            ["source", "reason"],
            registry=r,
        )
        self.sequence_records = Counter(
            "k2d_sequence_records_total",
            "Records classified by the sequence tracker",
            ["stream", "verdict"],
            registry=r,
        )
        self.gaps = Counter(
            "k2d_gaps_total",
            "Ledger rows written, by kind and status",
            ["kind", "status"],
            registry=r,
        )
        self.open_gaps = Gauge(
            "k2d_open_gaps", "Gaps currently open per stream", ["stream"], registry=r
        )
        self.commit_seconds = Histogram(
            "k2d_commit_seconds",
            "Iceberg commit latency",
            ["table"],
            buckets=_COMMIT_BUCKETS,
            registry=r,
        )
        self.commits = Counter("k2d_commits_total", "Iceberg commits", ["table"], registry=r)
        self.commit_conflicts = Counter(
            "k2d_commit_conflicts_total", "Commits retried after a conflict", ["table"], registry=r
        )
        self.rows_committed = Counter(
            "k2d_rows_committed_total", "Rows committed to Iceberg", ["table"], registry=r
        )
        self.live_rows = Gauge("k2d_live_rows", "Rows held in memory by the live hub", registry=r)
        self.http_requests = Counter(
            "k2d_http_requests_total", "HTTP requests served", ["route", "status"], registry=r
        )
        if runtime is not None:
            r.register(_RuntimeCollector(runtime))
