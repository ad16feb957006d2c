"""Configuration: frozen msgspec Structs loaded from config.toml, then K2D_* env overrides.

Unknown keys are errors that name the key (`api.prot: unknown key`), never silent defaults.
Environment overrides use a double underscore between levels: K2D_API__PORT=9000,
K2D_FEEDS__BINANCE__SYMBOLS='["BTCUSDT"]'. Values are parsed as TOML literals when they can be,
else taken as strings.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

__all__ = [
    "ApiConfig",
    "BackfillConfig",
    "BinanceFeedConfig",
    "Config",
    "ConfigError",
    "FeedsConfig",
    "JournalConfig",
    "KafkaConfig",
    "LiveConfig",
    "MaintenanceConfig",
    "PipelineConfig",
    "QueryConfig",
    "SequencerConfig",
    "ShutdownConfig",
    "StorageConfig",
    "StreamConfig",
    "SupervisorConfig",
    "TelemetryConfig",
    "WriterConfig",
    "load_config",
]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class StorageConfig(_Section, frozen=True):
    data_dir: str = "./data"
    # SQLAlchemy URL of the Iceberg SQL catalog; empty = SQLite file under data_dir.
    catalog_uri: str = ""
    # Warehouse location (file path or s3:// URL); empty = data_dir/warehouse.
    warehouse: str = ""
    namespace: str = "market"
    sqlite_busy_timeout_ms: int = 30_000
    # A start with less free space than this under data_dir (or the journal directory) is
    # refused (exit 73): a capture that would fill the disk within minutes should not begin.
    min_free_bytes: Annotated[int, msgspec.Meta(ge=0)] = 256 * 1024 * 1024

    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser().resolve()

    def catalog_url(self) -> str:
        if self.catalog_uri:
            return self.catalog_uri
        return f"sqlite:///{self.data_path() / 'catalog.db'}"

    def warehouse_url(self) -> str:
        if self.warehouse:
            return self.warehouse
        return f"file://{self.data_path() / 'warehouse'}"


class WriterConfig(_Section, frozen=True):
    # 100,000, not 250,000: a journal replay's pipeline peaked at 411-424 MB RSS against
    # 470-513 and took 501-528K trades/s against 379-453K, with batch_max_records 16,000
    # (benchmarks/ingest.py, alternating runs on 2026-12-01). The flush is smaller and, under
    # twice file_split_rows, written by one thread, leaving the other core to the pipeline.
    flush_rows: int = 100_000
    flush_bytes: int = 128 * 1024 * 1024
    flush_interval: float = 2.0
    # A flush of at least twice this many rows of one day and exchange is written
    # as several Parquet files at once, at most one per core, each of at least this many
    # rows: Parquet writing runs outside the GIL. 0 writes one file per partition.
    file_split_rows: Annotated[int, msgspec.Meta(ge=0)] = 100_000
    # Conflict retries of a one-off committer (`k2d load`); the daemon's writer retries a
    # commit until it lands, and reports DEGRADED once one has failed for commit_deadline s.
    commit_retries: int = 8
    commit_backoff_initial: float = 0.1
    commit_backoff_max: float = 5.0
    commit_deadline: float = 30.0
    # Processes on this machine that share the catalog take turns at a table's commits (a
    # lock file under data_dir); one waits at most this long, then commits without its turn.
    commit_lock_wait: float = 5.0


class PipelineConfig(_Section, frozen=True):
    partitions: int = 2
    # Capacity, in batches, of every stream between actors. A full stream blocks its sender.
    # 8, not 16: peak RSS 454-490 MB against 479-505 in a journal replay's batches of 8,000
    # (benchmarks/ingest.py, six runs each), throughput the same within the box's noise; in
    # benchmarks/kafka.py too, in both modes.
    stream_size: int = 8
    # Batches of records from a feed: at most this many records, at most this old (seconds).
    # A live feed's batches close by age; the count bounds a journal replay's, where each
    # batch's fixed costs (a few Arrow calls a symbol in every stage) tell: 8,000 took
    # the pipeline from 182-184K to 227-232K trades/s (benchmarks/ingest.py, 20 symbols),
    # 16,000 (with writer.flush_rows 100,000) to 501-528K from 379-453K at 8,000 and 250,000.
    batch_max_records: int = 16_000
    batch_max_age: float = 0.01


class SequencerConfig(_Section, frozen=True):
    # A gap is written to the ledger once it has been open this long (seconds); reordered
    # records that fill it sooner never show up as gaps.
    gap_grace: float = 1.0
    # An id this far below the high-water mark after this much silence is a session reset.
    reset_quiet_period: float = 300.0
    reset_min_drop: int = 1_000
    # An id more than this above the last is a new session (an info row that names the ids
    # passed over), not a gap to backfill: one stray id must not open a gap of 10^12 ids.
    max_jump: int = 10_000_000
    # At the start of capture, ids at most this far below the first one are late, not lost.
    max_reorder: int = 1_000
    # Limit on tracked open gaps per stream; beyond it the oldest are written and forgotten.
    max_open_gaps: int = 10_000
    # An open gap whose backfill has not closed it is asked for again after this many seconds.
    rerequest_after: float = 120.0


class LiveConfig(_Section, frozen=True):
    window_seconds: float = 900.0
    max_rows_per_symbol: int = 100_000


class ApiConfig(_Section, frozen=True):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8765
    # Request bodies above this are refused with 413 body_too_large.
    max_body_bytes: int = 65_536
    # On stop, in-flight requests get this many seconds before they are cancelled.
    shutdown_timeout: int = 5
    # sha256 hex digests of the accepted API keys (sent in X-API-Key). With any key here or
    # in admin_api_keys, every /v1 route needs one; with none, no key is needed.
    api_keys: tuple[str, ...] = ()
    # sha256 hex digests of the keys that may also call the admin routes (/v1/admin/*); an
    # admin key is a valid key everywhere. Empty: the admin routes are off (403).
    admin_api_keys: tuple[str, ...] = ()
    # Requests per second (and burst) per client on the /v1 routes; the client is the API
    # key, else the address (refused keys count against the address). 0 turns it off.
    rate_limit: float = 50.0
    rate_burst: int = 100
    # Peers (reverse proxies) whose X-Forwarded-For names the client; others' is ignored.
    trusted_proxies: tuple[str, ...] = ()
    # Origins allowed to call the query routes from a browser; empty: CORS off; "*": any.
    cors_origins: tuple[str, ...] = ()
    # Kernel send buffer of each connection, bytes (0: the kernel's autotuning, up to
    # several MB). Bounded, a stream client that stops reading fills it and its send queue
    # within seconds and is closed as a slow consumer; 256 KiB still fills a LAN.
    socket_send_buffer: Annotated[int, msgspec.Meta(ge=0)] = 262_144

    def __post_init__(self) -> None:
        for name in ("api_keys", "admin_api_keys"):
            for i, digest in enumerate(getattr(self, name)):
                if not re.fullmatch("[0-9a-f]{64}", digest):
                    raise ValueError(f"{name}.{i}: not a lower-case sha256 hex digest")


class SupervisorConfig(_Section, frozen=True):
    max_restarts: int = 5
    period: float = 60.0
    backoff_initial: float = 0.2
    backoff_max: float = 30.0


class ShutdownConfig(_Section, frozen=True):
    drain_timeout: float = 30.0


class TelemetryConfig(_Section, frozen=True):
    service_name: str = "k2d"
    # OTLP/HTTP endpoint (http://host:4318, or the full .../v1/traces URL); empty: no export.
    otlp_endpoint: str = ""
    # Seconds one OTLP export request may take before it is abandoned (the spans dropped).
    otlp_timeout: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    # Finished spans waiting for each exporter (the trace store, OTLP); beyond it new spans
    # are dropped and counted, never waited for.
    max_queue_size: Annotated[int, msgspec.Meta(ge=1)] = 2_048
    # Spans per export (one OTLP request, one line of the trace store) ...
    export_batch_size: Annotated[int, msgspec.Meta(ge=1)] = 512
    # ... sent at least this often, seconds.
    export_interval: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    # Share of traces kept, decided by trace id (a remote parent's sampled flag wins) ...
    sample_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0
    # ... while a span that ended in error or ran at least this long is always kept.
    slow_span_seconds: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    # Finished spans kept in memory when there is no trace store; also the most spans one
    # /v1/traces answer holds.
    span_ring_size: int = 2_048
    # Keep finished spans in a rotating store of OTLP JSON lines, read by /v1/traces and
    # `k2d traces`, so spans of earlier runs stay inspectable.
    trace_store: bool = True
    # Directory of the trace store; empty = data_dir/traces.
    trace_dir: str = ""
    # A store file rotates at this size; the oldest go beyond trace_files files.
    trace_file_bytes: Annotated[int, msgspec.Meta(ge=4_096)] = 16 * 1024 * 1024
    trace_files: Annotated[int, msgspec.Meta(ge=1)] = 8
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def __post_init__(self) -> None:
        if self.export_batch_size > self.max_queue_size:
            raise ValueError(
                f"export_batch_size ({self.export_batch_size}) must not exceed max_queue_size "
                f"({self.max_queue_size})"
            )

    def trace_path(self, storage: StorageConfig) -> Path | None:
        """Directory of the trace store, or None when it is off."""
        if not self.trace_store:
            return None
        if self.trace_dir:
            return Path(self.trace_dir).expanduser().resolve()
        return storage.data_path() / "traces"


class BinanceFeedConfig(_Section, frozen=True):
    enabled: bool = True
    ws_url: str = "wss://stream.binance.com:9443"
    rest_url: str = "https://api.binance.com"
    symbols: tuple[str, ...] = ("BTCUSDT", "ETHUSDT")
    reconnect_initial: float = 0.5
    reconnect_max: float = 30.0
    # A connection that delivers market data this long after it opened has proved itself:
    # the reconnect backoff starts over. A serverShutdown sooner than that is backed off
    # before the replacement opens (a venue shutting every new connection is not hammered).
    stable_after: float = 10.0
    # The venue cuts a connection after 24 h; a replacement opens this long before the cut.
    connection_lifetime: float = 86_400.0
    replace_before: float = 300.0
    # A frame whose event time is further than this from its receive time is dead-lettered.
    max_clock_skew: float = 300.0
    max_frame_bytes: int = 65_536


class FeedsConfig(_Section, frozen=True):
    binance: BinanceFeedConfig = msgspec.field(default_factory=BinanceFeedConfig)


class JournalConfig(_Section, frozen=True):
    enabled: bool = True
    # Directory of the capture journal; empty = data_dir/journal. One subdirectory per feed.
    directory: str = ""
    # Group fsync: buffered frames are written and fsynced this often (seconds).
    fsync_interval: float = 0.2
    segment_bytes: int = 256 * 1024 * 1024
    buffer_bytes: int = 4 * 1024 * 1024
    # Largest frame accepted (at most 16 MiB - 1); keep it >= feeds.*.max_frame_bytes.
    max_frame_bytes: int = 1024 * 1024
    # Whole segments older than this or beyond this total are deleted, never one holding
    # frames after the last committed position, never the active one.
    retention_days: float = 30.0
    max_total_bytes: int = 50 * 1024**3
    retention_interval: float = 300.0

    def path(self, storage: StorageConfig) -> Path:
        return (
            Path(self.directory).expanduser().resolve()
            if self.directory
            else (storage.data_path() / "journal")
        )


class BackfillConfig(_Section, frozen=True):
    enabled: bool = True
    # Concurrent REST requests to the venue.
    concurrency: int = 2
    # Trades per historicalTrades page (the venue allows at most 1000).
    page_limit: int = 1000
    # The venue's request-weight limit per minute per IP (Binance: 6000) ...
    venue_weight_per_minute: int = 6000
    # ... and the share of it backfill may use (0 < share <= 1); the rest is headroom for
    # anything else calling the venue from this IP.
    weight_share: float = 0.8
    request_weight: int = 25
    # Gaps waiting for backfill; beyond it new gaps wait for the tracker's next re-request.
    max_pending: int = 10_000
    request_timeout: float = 10.0
    max_attempts: int = 5
    # At end of input, the gaps the backfiller holds get this long to finish (seconds); what
    # is left stays open and the tracker asks for it again after a restart.
    drain_timeout: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.weight_share <= 1:  # also refuses NaN
            raise ValueError(f"weight_share must be > 0 and <= 1, got {self.weight_share}")
        if self.venue_weight_per_minute < 1:
            raise ValueError(
                f"venue_weight_per_minute must be at least 1, got {self.venue_weight_per_minute}"
            )
        if not 1 <= self.request_weight <= self.weight_budget:
            raise ValueError(
                f"request_weight must be between 1 and weight_share * venue_weight_per_minute "
                f"({self.weight_budget}), got {self.request_weight}"
            )

    @property
    def weight_budget(self) -> int:
        """Request weight backfill may use per minute."""
        return int(self.weight_share * self.venue_weight_per_minute)


class QueryConfig(_Section, frozen=True):
    workers: int = 4
    threads_per_worker: int = 1
    memory_limit: str = "1GB"
    queue_size: int = 64
    default_limit: int = 1_000
    max_rows: int = 100_000
    max_window_seconds: float = 31 * 86_400.0
    timeout: float = 10.0
    # Queries (running or queued) one client may have at once; clamped to workers - 1 (at
    # least 1), so that one client cannot hold the whole pool.
    per_key_concurrency: int = 2
    snapshot_cache_size: int = 32
    # Seconds between checks for commits made by other processes (`k2d load`, `k2d
    # compact`), which the query index then picks up; 0 = never.
    refresh_interval: float = 5.0
    # Symbols (and exchanges) one request may name.
    max_symbols: int = 100
    # Gap and outage events kept in memory for gap reports (closed ones are forgotten first,
    # oldest first, beyond this): the bound on what the ledger costs the query side.
    max_ledger_events: int = 200_000
    # Minute bars of data files kept for OHLCV requests (about 220 bytes each; least
    # recently used forgotten first; 0 keeps none): 1,440 a symbol-day, so 200,000 hold
    # about 140.
    minute_bars: Annotated[int, msgspec.Meta(ge=0)] = 200_000
    # Of those, how many are computed ahead of requests: the newest data files' bars of
    # every symbol, as files are committed and at start, so that the first OHLCV request
    # over them merges bars instead of aggregating trades (0 computes bars only when asked;
    # clamped to minute_bars).
    minute_bars_ahead: Annotated[int, msgspec.Meta(ge=0)] = 100_000
    # Bytes of the newest trade and quote data files held in memory as Arrow (the hot
    # tier), loaded as files are committed and at start: a first page of JSON rows over
    # files all held is sliced from memory instead of read by DuckDB. 0 (the default) holds
    # none: the tier costs its bytes and the CPU of reading each new file once more.
    hot_bytes: Annotated[int, msgspec.Meta(ge=0)] = 0
    # Shapes of SQL kept parsed for the workers to run again (least recently used forgotten
    # first; 0 parses every query anew).
    parsed_statements: Annotated[int, msgspec.Meta(ge=0)] = 256

    def __post_init__(self) -> None:
        if self.workers < 1 or self.per_key_concurrency < 1:
            raise ValueError("workers and per_key_concurrency must be at least 1")
        # Clamped below workers, so that one client cannot hold the whole pool (with a single
        # worker, 1). Clamped rather than refused: lowering workers alone stays valid.
        limit = max(1, self.workers - 1)
        if self.per_key_concurrency > limit:
            msgspec.structs.force_setattr(self, "per_key_concurrency", limit)
        if self.minute_bars_ahead > self.minute_bars:
            msgspec.structs.force_setattr(self, "minute_bars_ahead", self.minute_bars)


class MaintenanceConfig(_Section, frozen=True):
    enabled: bool = True
    # Seconds between maintenance rounds.
    interval: float = 3_600.0
    # Partitions whose day ended at least this long ago are compacted.
    closed_partition_age: float = 3_600.0
    target_file_bytes: int = 128 * 1024 * 1024
    min_files_to_compact: int = 4
    # The partitions still being written (today's) are compacted in size tiers at every
    # expiry_interval: files committed at least open_file_age seconds ago are grouped by
    # size (tiers open_tier_fanout times apart, from open_tier_base_bytes) and a tier with
    # open_tier_fanout files is merged into one, so today's queries read tens of files,
    # not one per flush.
    compact_open_partitions: bool = True
    open_file_age: float = 60.0
    open_tier_fanout: int = 4
    open_tier_base_bytes: int = 1024 * 1024
    snapshot_retention_days: float = 7.0
    min_snapshots_to_keep: int = 10
    # Per-table data retention in days (0 = keep forever), e.g. {quotes = 365}.
    data_retention_days: dict[str, float] = msgspec.field(default_factory=dict)
    # The first round starts this many seconds after the daemon (not at every restart).
    first_round_after: float = 300.0
    # Between rounds, snapshots are expired every this many seconds (cheap when few).
    expiry_interval: float = 60.0
    # Snapshots younger than this (seconds) are all kept; older ones, within the retention,
    # are thinned to the newest per snapshot_thin_interval (0 = keep all): every commit adds
    # a snapshot, and pyiceberg's commit latency grows with their number.
    snapshot_full_history: float = 300.0
    snapshot_thin_interval: float = 3_600.0
    # Files under a table that no snapshot references are deleted once this old (seconds;
    # 0 = never): younger ones may belong to a commit in flight.
    orphan_file_age: float = 86_400.0
    # Expiry remembers what this many manifest lists and manifests name (files written once,
    # never changed), so a round reads only those new since the last; the least recently used
    # are forgotten beyond it, deleted ones at once. Enough for the lists and manifests (up to
    # ~100 a list) of every table's kept snapshots, or each round reads again what fell out;
    # ~0.8 KB each. 0 = remember none.
    remembered_manifests: Annotated[int, msgspec.Meta(ge=0)] = 50_000
    # The current snapshot's data manifests are merged when there are more than this.
    max_manifests: int = 16
    # DuckDB sorts a partition being compacted within this memory, spilling beyond it (at
    # least 128: the part of a sort that cannot spill took ~61 MB for trades).
    sort_memory_mb: int = 128
    # ... a key range of about this many rows at a time (a symbol, cut into time ranges),
    # so the sort's memory follows this, not the size of the partition.
    sort_chunk_rows: Annotated[int, msgspec.Meta(ge=1)] = 32_768
    sort_threads: int = 1
    # Maintenance commits retry conflicts with the writer this often, with this backoff.
    commit_retries: int = 20
    commit_backoff_initial: float = 0.05
    commit_backoff_max: float = 2.0


class KafkaConfig(_Section, frozen=True):
    # Kafka mode: the feed produces to Kafka (after its journal) and the trackers consume
    # from it, one per partition (README "Kafka mode").
    enabled: bool = False
    bootstrap_servers: str = "127.0.0.1:9092"
    trades_topic: str = "k2.trades.v2"
    quotes_topic: str = "k2.quotes.v2"
    # Partitions of each topic created at start (an existing topic is used as it is).
    partitions: int = 4
    replication_factor: int = 1
    linger_ms: int = 5
    # Producer batch per partition, bytes.
    batch_bytes: int = 1024 * 1024
    # Bound on one send (or one batch of sends) until the broker acknowledges, seconds.
    send_timeout: float = 30.0
    # Bound on any one request to the broker (metadata, produce, fetch, admin), seconds.
    request_timeout: float = 30.0
    # Records one consumer poll returns at most.
    max_poll_records: int = 10_000
    # The consumer group k2d consumes in.
    group_id: str = "k2d"
    # This daemon's static member id in the group ("": k2d-HOST-<hash of the data dir>), so
    # that a restart takes its partitions back at once.
    instance_id: str = ""
    # A consumer with records to read (lag above zero) that delivers none for this long is
    # restarted, seconds.
    stall_timeout: float = 30.0

    def __post_init__(self) -> None:
        # Raised as ConfigError (not ValueError, which msgspec would report against the
        # whole `kafka` section) so each problem names its key.
        problems = [
            f"kafka.{key}: must be greater than 0, got {getattr(self, key)}"
            for key in (
                "partitions",
                "replication_factor",
                "batch_bytes",
                "send_timeout",
                "request_timeout",
                "max_poll_records",
                "stall_timeout",
            )
            if getattr(self, key) <= 0
        ]
        if self.linger_ms < 0:
            problems.append(f"kafka.linger_ms: must be 0 or more, got {self.linger_ms}")
        if not self.group_id:
            problems.append("kafka.group_id: must not be empty")
        if problems:
            raise ConfigError(problems)


class StreamConfig(_Section, frozen=True):
    """The WebSocket stream (/v1/stream) and replay: limits per connection and in total."""

    enabled: bool = True
    # Open stream connections in total, and per client (API key, else address).
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 1_000
    max_connections_per_key: Annotated[int, msgspec.Meta(ge=1)] = 50
    # Channels one connection may subscribe to at once.
    max_subscriptions: Annotated[int, msgspec.Meta(ge=1)] = 100
    # Largest client message, bytes.
    max_message_bytes: Annotated[int, msgspec.Meta(ge=64)] = 4_096
    # A connection's send queue: past either bound it is closed as a slow consumer.
    # 2 MiB is under a second of two busy symbols' trades: with what the kernel buffers
    # first, a client that stops reading is closed within 5 s.
    queue_messages: Annotated[int, msgspec.Meta(ge=8)] = 1_000
    queue_bytes: Annotated[int, msgspec.Meta(ge=65_536)] = 2 * 1024 * 1024
    # Heartbeat: a ping every heartbeat_interval; a peer that has not answered one within
    # heartbeat_timeout is dead and its connection closed (1011), seconds.
    heartbeat_interval: Annotated[float, msgspec.Meta(gt=0)] = 20.0
    heartbeat_timeout: Annotated[float, msgspec.Meta(gt=0)] = 20.0
    # Live rows held for a subscription while its history (`since`) is read and sent.
    join_buffer_bytes: Annotated[int, msgspec.Meta(ge=1)] = 64 * 1024 * 1024
    # How far back `since` may reach, seconds.
    max_since_seconds: Annotated[float, msgspec.Meta(gt=0)] = 86_400.0
    # Rows per history page read through the query pool (catch-up and replay).
    page_rows: Annotated[int, msgspec.Meta(ge=1)] = 5_000
    # A close frame that cannot be written in this long (the peer reads nothing) is given
    # up on, and the TCP connection closed, seconds.
    close_timeout: Annotated[float, msgspec.Meta(gt=0)] = 3.0


class Config(_Section, frozen=True):
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    writer: WriterConfig = msgspec.field(default_factory=WriterConfig)
    pipeline: PipelineConfig = msgspec.field(default_factory=PipelineConfig)
    sequencer: SequencerConfig = msgspec.field(default_factory=SequencerConfig)
    live: LiveConfig = msgspec.field(default_factory=LiveConfig)
    api: ApiConfig = msgspec.field(default_factory=ApiConfig)
    supervisor: SupervisorConfig = msgspec.field(default_factory=SupervisorConfig)
    shutdown: ShutdownConfig = msgspec.field(default_factory=ShutdownConfig)
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)
    feeds: FeedsConfig = msgspec.field(default_factory=FeedsConfig)
    journal: JournalConfig = msgspec.field(default_factory=JournalConfig)
    backfill: BackfillConfig = msgspec.field(default_factory=BackfillConfig)
    query: QueryConfig = msgspec.field(default_factory=QueryConfig)
    maintenance: MaintenanceConfig = msgspec.field(default_factory=MaintenanceConfig)
    kafka: KafkaConfig = msgspec.field(default_factory=KafkaConfig)
    stream: StreamConfig = msgspec.field(default_factory=StreamConfig)


class ConfigError(Exception):
    """One or more configuration problems, each as `key.path: problem`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_POSITIVE = {
    "writer.flush_rows",
    "writer.flush_bytes",
    "writer.flush_interval",
    "writer.commit_retries",
    "writer.commit_lock_wait",
    "pipeline.partitions",
    "pipeline.stream_size",
    "pipeline.batch_max_records",
    "pipeline.batch_max_age",
    "live.window_seconds",
    "live.max_rows_per_symbol",
    "supervisor.max_restarts",
    "supervisor.period",
    "shutdown.drain_timeout",
    "telemetry.span_ring_size",
    "sequencer.max_open_gaps",
    "api.max_body_bytes",
    "api.shutdown_timeout",
    "journal.fsync_interval",
    "journal.segment_bytes",
    "journal.buffer_bytes",
    "journal.max_frame_bytes",
    "journal.retention_interval",
    "feeds.binance.connection_lifetime",
    "feeds.binance.max_frame_bytes",
    "maintenance.open_tier_base_bytes",
}
_SYMBOL = re.compile(r"^[A-Z0-9]{2,20}$")


def _problem_from_validation(err: msgspec.ValidationError) -> str:
    """Turn msgspec's `... - at `$.api.port`` into `api.port: ...`."""
    text = str(err)
    m = re.match(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", text, re.S)
    assert m is not None
    msg, path = m.group("msg"), (m.group("path") or "").lstrip(".")
    unknown = re.match(r"Object contains unknown field `(?P<f>[^`]+)`", msg)
    if unknown:
        key = f"{path}.{unknown.group('f')}" if path else unknown.group("f")
        return f"{key}: unknown key"
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return f"{path or '(root)'}: {msg[0].lower() + msg[1:] if msg else 'invalid'}"


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith("K2D_") or "__" not in name[4:]:
            continue
        parts = [p.lower() for p in name[4:].split("__")]
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _semantic_problems(cfg: Config) -> list[str]:
    problems = []
    for key in sorted(_POSITIVE):
        node: Any = cfg
        for part in key.split("."):
            node = getattr(node, part)
        if node <= 0:
            problems.append(f"{key}: must be greater than 0, got {node}")
    fanout = cfg.maintenance.open_tier_fanout
    if fanout < 2:
        problems.append(f"maintenance.open_tier_fanout: must be at least 2, got {fanout}")
    if not 0 <= cfg.api.port < 65536:
        problems.append(
            f"api.port: must be between 0 (any free port) and 65535, got {cfg.api.port}"
        )
    binance = cfg.feeds.binance
    for i, sym in enumerate(binance.symbols):
        if not _SYMBOL.match(sym):
            problems.append(
                f"feeds.binance.symbols.{i}: {sym!r} is not an upper-case venue symbol like BTCUSDT"
            )
    if binance.enabled and not binance.symbols:
        problems.append("feeds.binance.symbols: an enabled feed needs at least one symbol")
    for key, url, schemes in (
        ("feeds.binance.ws_url", binance.ws_url, ("ws://", "wss://")),
        ("feeds.binance.rest_url", binance.rest_url, ("http://", "https://")),
    ):
        if not url.startswith(schemes):
            problems.append(f"{key}: must start with {' or '.join(schemes)}, got {url!r}")
    if binance.replace_before >= binance.connection_lifetime:
        problems.append("feeds.binance.replace_before: must be less than connection_lifetime")
    return problems


def load_config(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read config.toml (if given), apply env and explicit overrides, validate everything."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError([f"(file): {p} does not exist"]) from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError([f"(file): {p} is not valid TOML: {e}"]) from None
    raw = _merge(raw, _env_overrides(os.environ if environ is None else environ))
    if overrides:
        raw = _merge(raw, overrides)
    problems: list[str] = []
    # msgspec stops at the first error; peel unknown keys off one at a time to report them all.
    for _ in range(50):
        try:
            cfg = msgspec.convert(raw, Config, strict=False)
        except msgspec.ValidationError as e:
            problem = _problem_from_validation(e)
            problems.append(problem)
            if not _drop_key(raw, problem.split(":", 1)[0]):
                break
            continue
        if problems:
            break
        problems.extend(_semantic_problems(cfg))
        if problems:
            raise ConfigError(problems)
        return cfg
    raise ConfigError(problems)


def _drop_key(raw: dict[str, Any], dotted: str) -> bool:
    node: Any = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    if isinstance(node, dict) and parts[-1] in node:
        del node[parts[-1]]
        return True
    return False


def config_to_toml(cfg: Config) -> str:
    """Render the effective config as TOML (for `k2d check-config`)."""
    lines: list[str] = []

    def emit(prefix: str, obj: Any) -> None:
        scalars: list[tuple[str, Any]] = []
        tables: list[tuple[str, Any]] = []
        for name in obj.__struct_fields__:
            value = getattr(obj, name)
            (tables if isinstance(value, msgspec.Struct) else scalars).append((name, value))
        if scalars:
            lines.append(f"[{prefix}]")
            for name, value in scalars:
                lines.append(f"{name} = {_toml_value(value)}")
            lines.append("")
        for name, value in tables:
            emit(f"{prefix}.{name}" if prefix else name, value)

    emit("", cfg)
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return msgspec.json.encode(value).decode()
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot render {value!r}")
