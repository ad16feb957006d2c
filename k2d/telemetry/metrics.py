"""Every Prometheus metric of the daemon, defined once. Names: k2d_ prefix, base units."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from k2d.runtime import ActorState, Registry

__all__ = ["Metrics"]

_COMMIT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_QUERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


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
        faults = CounterMetricFamily(
            "k2d_outside_faults",
            "Failures from outside the process (disk full, read-only, I/O error, locked "
            "catalog) that left actors degraded and retrying",
            labels=["kind"],
        )
        for kind, n in sorted(self._registry.faults.items()):
            faults.add_metric([kind], n)
        yield from (depth, capacity, state, restarts, faults)


class JournalStats(Protocol):
    bytes_written: int
    records_written: int
    fsyncs: int
    last_fsync_seconds: float
    truncations: int
    truncated_bytes: int


class _JournalCollector(Collector):
    def __init__(self) -> None:
        self.journals: dict[str, JournalStats] = {}

    def collect(self):  # type: ignore[no-untyped-def]
        fams: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "bytes": CounterMetricFamily(
                "k2d_journal_bytes", "Bytes appended to the journal", labels=["feed"]
            ),
            "records": CounterMetricFamily(
                "k2d_journal_records", "Frames appended", labels=["feed"]
            ),
            "fsyncs": CounterMetricFamily("k2d_journal_fsyncs", "Group fsyncs", labels=["feed"]),
            "fsync": GaugeMetricFamily(
                "k2d_journal_last_fsync_seconds",
                "Duration of the last group fsync",
                labels=["feed"],
            ),
            "trunc": CounterMetricFamily(
                "k2d_journal_truncations", "Torn or corrupt tails cut back at open", labels=["feed"]
            ),
        }
        for feed, j in sorted(self.journals.items()):
            fams["bytes"].add_metric([feed], j.bytes_written)
            fams["records"].add_metric([feed], j.records_written)
            fams["fsyncs"].add_metric([feed], j.fsyncs)
            fams["fsync"].add_metric([feed], j.last_fsync_seconds)
            fams["trunc"].add_metric([feed], j.truncations)
        yield from fams.values()


class _DataDirCollector(Collector):
    """Space and inodes left on the filesystem of each watched directory, by statvfs at scrape:
    a full disk stops commits and the journal, so it is alerted on before it happens."""

    def __init__(self) -> None:
        self.paths: set[str] = set()

    def collect(self):  # type: ignore[no-untyped-def]
        labels = ["path"]
        free = GaugeMetricFamily(
            "k2d_data_dir_free_bytes",
            "Bytes available to unprivileged users on the directory's filesystem",
            labels=labels,
        )
        size = GaugeMetricFamily(
            "k2d_data_dir_size_bytes", "Size of the directory's filesystem", labels=labels
        )
        free_inodes = GaugeMetricFamily(
            "k2d_data_dir_free_inodes",
            "Inodes available on the directory's filesystem",
            labels=labels,
        )
        inodes = GaugeMetricFamily(
            "k2d_data_dir_inodes",
            "Inodes of the directory's filesystem (0: it has no inode limit)",
            labels=labels,
        )
        for path in sorted(self.paths):
            try:
                st = os.statvfs(path)
            except OSError:
                continue  # missing or unreadable: no sample; the daemon's own errors say why
            free.add_metric([path], st.f_bavail * st.f_frsize)
            size.add_metric([path], st.f_blocks * st.f_frsize)
            free_inodes.add_metric([path], st.f_favail)
            inodes.add_metric([path], st.f_files)
        yield from (free, size, free_inodes, inodes)


class _FeedCollector(Collector):
    """Whether each feed holds an open venue connection, asked of the feed at scrape."""

    def __init__(self) -> None:
        self.feeds: dict[str, Callable[[], int]] = {}

    def collect(self):  # type: ignore[no-untyped-def]
        connected = GaugeMetricFamily(
            "k2d_feed_connected",
            "1 while the feed has at least one open venue connection, else 0",
            labels=["feed"],
        )
        for feed, connections in sorted(self.feeds.items()):
            connected.add_metric([feed], 1.0 if connections() > 0 else 0.0)
        yield connected


class Metrics:
    """One instance per process (tests make their own, so registries never collide)."""

    def __init__(self, runtime: Registry | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # For deploy/ (alerts, dashboard): process RSS, CPU, open fds and start time; the
        # data dir's free space; feed connections. The last two are fed by watch_*().
        ProcessCollector(registry=r)
        self._data_dirs = _DataDirCollector()
        r.register(self._data_dirs)
        self._feeds = _FeedCollector()
        r.register(self._feeds)
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
        self.commit_failures = Counter(
            "k2d_commit_failures_total",
            "Commit attempts that failed and are retried, by cause (conflict, disk_full, ...)",
            ["table", "kind"],
            registry=r,
        )
        self.commit_conflicts = Counter(
            "k2d_commit_conflicts_total", "Commits retried after a conflict", ["table"], registry=r
        )
        self.rows_committed = Counter(
            "k2d_rows_committed_total", "Rows committed to Iceberg", ["table"], registry=r
        )
        self.live_rows = Gauge("k2d_live_rows", "Rows held in memory by the live hub", registry=r)
        self.live_uncommitted_batches = Gauge(
            "k2d_live_uncommitted_batches",
            "Batches the live hub holds rows of that no commit has covered yet",
            registry=r,
        )
        self.http_requests = Counter(
            "k2d_http_requests_total", "HTTP requests served", ["route", "status"], registry=r
        )
        self.spans_dropped = Counter(
            "k2d_spans_dropped_total",
            "Finished spans lost on the way to a destination (store, otlp): its bounded queue "
            "was full (queue_full) or the export failed (export_failed)",
            ["exporter", "reason"],
            registry=r,
        )
        self.journal_replayed = Counter(
            "k2d_journal_replayed_frames_total",
            "Journaled frames replayed at start",
            ["feed"],
            registry=r,
        )
        self._journals = _JournalCollector()
        r.register(self._journals)
        self.backfill_requests = Counter(
            "k2d_backfill_requests_total",
            "REST history requests to a venue, by HTTP status (error: no response)",
            ["status"],
            registry=r,
        )
        self.backfill_weight_used = Gauge(
            "k2d_backfill_weight_used",
            "Request weight the venue says we used this minute (X-MBX-USED-WEIGHT-1M)",
            registry=r,
        )
        self.backfill_rows = Counter(
            "k2d_backfill_rows_total", "Trades recovered from a venue's REST history", registry=r
        )
        self.backfill_gaps = Counter(
            "k2d_backfill_gaps_total",
            "Gap requests handled by the backfiller, by result",
            ["result"],
            registry=r,
        )
        self.table_data_files = Gauge(
            "k2d_table_data_files",
            "Data files in a table's current snapshot",
            ["table"],
            registry=r,
        )
        self.table_data_bytes = Gauge(
            "k2d_table_data_bytes",
            "Bytes of data files in a table's current snapshot",
            ["table"],
            registry=r,
        )
        self.table_manifests = Gauge(
            "k2d_table_manifests", "Manifests in a table's current snapshot", ["table"], registry=r
        )
        self.table_snapshots = Gauge(
            "k2d_table_snapshots", "Snapshots kept in a table's metadata", ["table"], registry=r
        )
        self.maintenance_last_run = Gauge(
            "k2d_maintenance_last_run_timestamp_seconds",
            "When a maintenance operation (compaction, expiry, ...) last finished on a table",
            ["operation", "table"],
            registry=r,
        )
        self.maintenance_last_duration = Gauge(
            "k2d_maintenance_last_duration_seconds",
            "How long a maintenance operation last took on a table",
            ["operation", "table"],
            registry=r,
        )
        self.maintenance_rows_rewritten = Counter(
            "k2d_maintenance_rows_rewritten_total",
            "Rows rewritten by compaction",
            ["table"],
            registry=r,
        )
        self.maintenance_files_compacted = Counter(
            "k2d_maintenance_files_compacted_total",
            "Small data files replaced by compaction",
            ["table"],
            registry=r,
        )
        self.maintenance_snapshots_expired = Counter(
            "k2d_maintenance_snapshots_expired_total", "Snapshots expired", ["table"], registry=r
        )
        self.maintenance_files_deleted = Counter(
            "k2d_maintenance_files_deleted_total",
            "Files deleted by maintenance (data, manifest, manifest_list, orphan)",
            ["table", "kind"],
            registry=r,
        )
        self.maintenance_errors = Counter(
            "k2d_maintenance_errors_total",
            "Maintenance operations that failed or were aborted",
            ["operation"],
            registry=r,
        )
        self.query_seconds = Histogram(
            "k2d_query_seconds",
            "Query latency, admission to last byte",
            ["endpoint"],
            buckets=_QUERY_BUCKETS,
            registry=r,
        )
        self.queries = Counter(
            "k2d_queries_total",
            "Queries by endpoint and outcome (ok, invalid, busy, too_many, timeout, error)",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.query_in_flight = Gauge(
            "k2d_query_in_flight", "Queries admitted and not yet finished", registry=r
        )
        self.query_index_files = Gauge(
            "k2d_query_index_files", "Data files in the query file index", ["table"], registry=r
        )
        self.query_ledger_events = Gauge(
            "k2d_query_ledger_events",
            "Gap and outage events the query side keeps for gap reports",
            registry=r,
        )
        self.query_ledger_spans = Gauge(
            "k2d_query_ledger_spans",
            "Resolved time spans of gaps cached by the query side",
            registry=r,
        )
        self.query_minute_bars = Gauge(
            "k2d_query_minute_bars",
            "Minute bars of data files the query side keeps for OHLCV requests",
            registry=r,
        )
        self.query_minute_bars_due = Gauge(
            "k2d_query_minute_bars_due_files",
            "Data files whose minute bars are waiting to be computed ahead of requests",
            registry=r,
        )
        self.query_hot_bytes = Gauge(
            "k2d_query_hot_bytes",
            "Bytes of data files the query side holds in memory (the hot tier)",
            registry=r,
        )
        self.query_hot_files = Gauge(
            "k2d_query_hot_files",
            "Data files the query side holds in memory (the hot tier)",
            registry=r,
        )
        self.query_hot_due = Gauge(
            "k2d_query_hot_due_files",
            "Data files waiting to be loaded into the hot tier",
            registry=r,
        )
        self.query_pages_from_memory = Counter(
            "k2d_query_pages_from_memory_total",
            "Result pages answered from memory (the hot tier's files, the minute bars kept), "
            "without DuckDB",
            registry=r,
        )
        self.query_index_replans = Counter(
            "k2d_query_index_replans_total",
            "Full re-plans of the query file index (start, replace commits, missed commits)",
            registry=r,
        )
        # The WebSocket stream (/v1/stream) and replay.
        self.ws_clients = Gauge("k2d_ws_clients", "Open WebSocket stream connections", registry=r)
        self.ws_subscriptions = Gauge(
            "k2d_ws_subscriptions", "Channels subscribed by open stream connections", registry=r
        )
        self.ws_messages = Counter(
            "k2d_ws_messages_total",
            "Messages sent to stream clients, by type (trades, quotes, gap, ack, error, ...)",
            ["type"],
            registry=r,
        )
        self.ws_bytes = Counter(
            "k2d_ws_bytes_total", "Bytes of the messages sent to stream clients", registry=r
        )
        self.ws_rows = Counter(
            "k2d_ws_rows_total",
            "Rows sent to stream clients, by source (live, history, replay)",
            ["source"],
            registry=r,
        )
        self.ws_encoded = Counter(
            "k2d_ws_encoded_batches_total",
            "Channel batches encoded for the stream (once per channel and encoding, whatever "
            "the number of subscribers)",
            ["encoding"],
            registry=r,
        )
        self.ws_publish_lag = Histogram(
            "k2d_ws_publish_lag_seconds",
            "From the feed receiving a frame to its rows being published to the stream "
            "(the pipeline's share of a stream's latency; the oldest row of each batch)",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.ws_queue_seconds = Histogram(
            "k2d_ws_queue_seconds",
            "From a batch being queued for a stream client to its message being written to "
            "the client's socket (the fan-out's share of a stream's latency)",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.ws_slow_closed = Counter(
            "k2d_ws_slow_closed_total",
            "Stream connections closed for falling behind their send queue (close code 4408)",
            registry=r,
        )
        self.ws_refused = Counter(
            "k2d_ws_refused_total",
            "Stream connections closed for a refused key or a limit, by error code",
            ["code"],
            registry=r,
        )
        self.kafka_produced = Counter(
            "k2d_kafka_produced_total",
            "Records the broker acknowledged, by topic",
            ["topic"],
            registry=r,
        )
        self.kafka_consumed = Counter(
            "k2d_kafka_consumed_total",
            "Records consumed, by topic",
            ["topic"],
            registry=r,
        )
        self.kafka_lag = Gauge(
            "k2d_kafka_lag_records",
            "Records between the consumer's position and the end of each assigned partition",
            ["topic", "partition"],
            registry=r,
        )
        self.kafka_send_seconds = Histogram(
            "k2d_kafka_send_seconds",
            "A feed batch's send until every record of it is acknowledged",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0),
            registry=r,
        )
        self.kafka_group_commits = Counter(
            "k2d_kafka_group_commits_total",
            "Offsets committed to the consumer group after an Iceberg commit",
            registry=r,
        )
        if runtime is not None:
            r.register(_RuntimeCollector(runtime))

    def watch_journal(self, feed: str, journal: JournalStats) -> None:
        """Export a journal's own counters (bytes, records, fsyncs, truncations) at scrape."""
        self._journals.journals[feed] = journal

    def watch_data_dir(self, path: str | os.PathLike[str]) -> None:
        """Export free bytes and inodes of `path`'s filesystem (k2d_data_dir_*) at scrape."""
        self._data_dirs.paths.add(os.fspath(path))

    def watch_feed(self, feed: str, connections: Callable[[], int]) -> None:
        """Export k2d_feed_connected from `connections()`, the feed's open venue connections;
        a feed rebuilt by recovery replaces its predecessor's callable under the same name."""
        self._feeds.feeds[feed] = connections
