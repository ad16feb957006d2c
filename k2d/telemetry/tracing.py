"""OpenTelemetry setup: a tracer provider whose finished spans go to a rotating trace store
under the data dir (OTLP JSON lines, see trace_store.py), to OTLP/HTTP when an endpoint is
configured, and to an in-memory ring.

Sampling is decided twice. At its start a trace is kept by its id (`sample_ratio`; a remote
parent's sampled flag wins), but every span is recorded either way; when a span ends that
was not kept, it is exported all the same if it failed or took `slow_span_seconds` or more:
errors and slow operations are the spans worth reading afterwards. Export happens on one
thread per destination behind a bounded queue, never on the event loop; a full queue drops
spans and counts them (k2d_spans_dropped_total, with the spans a failed export lost). The
provider is only installed globally on request, so tests can run several side by side.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult, TraceIdRatioBased
from opentelemetry.trace import Link, SpanKind, StatusCode
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from k2d import __version__
from k2d.config import TelemetryConfig
from k2d.telemetry.trace_store import TraceStore, TraceStoreExporter

if TYPE_CHECKING:
    from prometheus_client import Counter

    from k2d.telemetry.metrics import Metrics

__all__ = [
    "ExportQueue",
    "RatioSampler",
    "SpanRing",
    "Tracing",
    "current_span_id",
    "current_trace_id",
    "setup_tracing",
    "span_to_dict",
]

log = logging.getLogger(__name__)

_OTLP_MODULE = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
_OTLP_TRACES_PATH = "/v1/traces"
# Stack traces go to the store and OTLP; the HTTP inspection endpoint shows type and message.
HIDDEN_EVENT_ATTRIBUTES = frozenset({"exception.stacktrace"})
_REPORT_EVERY = 60.0  # seconds between warnings about dropped or failed spans
_FLUSH_BEFORE_READ_MS = 2_000

Keep = Callable[[ReadableSpan], bool]


class RatioSampler(Sampler):
    """Head decision: a root span is sampled by its trace id (as TraceIdRatioBased), a child
    follows its parent's sampled flag. Spans not sampled are still recorded (RECORD_ONLY),
    so the tail decision (`tail_keep`) can keep the failed and the slow ones."""

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio
        self._bound = TraceIdRatioBased.get_bound_for_rate(ratio)

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        if parent.is_valid:
            sampled = parent.trace_flags.sampled
            trace_state = parent.trace_state
        else:
            sampled = trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < self._bound
        decision = Decision.RECORD_AND_SAMPLE if sampled else Decision.RECORD_ONLY
        return SamplingResult(decision, attributes, trace_state)

    def get_description(self) -> str:
        return f"K2dRatioSampler{{{self.ratio}}}"


def tail_keep(slow_seconds: float) -> Keep:
    """The tail decision: sampled at the start, or ended in error, or slow."""
    slow_ns = int(slow_seconds * 1e9)

    def keep(span: ReadableSpan) -> bool:
        ctx = span.context
        if ctx is not None and ctx.trace_flags.sampled:
            return True
        if span.status.status_code is StatusCode.ERROR:
            return True
        start, end = span.start_time, span.end_time
        return start is not None and end is not None and end - start >= slow_ns

    return keep


def _keep_all(span: ReadableSpan) -> bool:
    return True


class SpanRing(SpanProcessor):
    """Keeps the last `size` finished spans that pass `keep` in memory; thread-safe, O(1)."""

    def __init__(self, size: int, keep: Keep = _keep_all) -> None:
        if size < 1:
            raise ValueError("span ring size must be >= 1")
        self.size = size
        self._keep = keep
        self._spans: deque[ReadableSpan] = deque(maxlen=size)
        self._lock = threading.Lock()

    def on_end(self, span: ReadableSpan) -> None:
        if self._keep(span):
            with self._lock:
                self._spans.append(span)

    def recent(self, limit: int) -> list[ReadableSpan]:
        """Up to `limit` finished spans, newest first."""
        with self._lock:
            n = min(max(limit, 0), len(self._spans))
            return [self._spans[-1 - i] for i in range(n)]

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()


class ExportQueue(SpanProcessor):
    """Spans that pass `keep` wait in a queue of at most `max_queue_size` for one exporter
    thread, which sends them in batches of up to `batch_size`, at least every `interval`
    seconds (BatchSpanProcessor's shape, with the tail decision in front: the SDK's
    processor exports sampled spans only). A full queue drops the span and counts it:
    the daemon never waits for its telemetry. With `drops` (k2d_spans_dropped_total), the
    spans dropped and those a failed export lost are counted there too, by reason."""

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        name: str,
        keep: Keep = _keep_all,
        max_queue_size: int = 2_048,
        batch_size: int = 512,
        interval: float = 1.0,
        drops: Counter | None = None,
    ) -> None:
        if max_queue_size < 1 or batch_size < 1 or interval <= 0:
            raise ValueError("max_queue_size and batch_size must be >= 1, interval > 0")
        self.name = name
        self.exporter = exporter
        self._keep = keep
        self._max = max_queue_size
        self._batch = min(batch_size, max_queue_size)
        self._interval = interval
        self._queue: deque[ReadableSpan] = deque()
        self._cond = threading.Condition()
        self._flush_wanted = 0
        self._flush_done = 0
        self._closed = False
        self.dropped = 0
        self.exported = 0
        self.failed = 0
        self._reported = (0, 0)  # (dropped, failed) last warned about
        self._reported_at = 0.0
        # Children made now: the series read 0 from the start, not absent until a first loss.
        self._queue_full = drops.labels(name, "queue_full") if drops is not None else None
        self._export_failed = drops.labels(name, "export_failed") if drops is not None else None
        self._thread = threading.Thread(target=self._run, name=f"k2d-spans-{name}", daemon=True)
        self._thread.start()

    def on_end(self, span: ReadableSpan) -> None:
        if not self._keep(span):
            return
        with self._cond:
            if self._closed or len(self._queue) >= self._max:
                self.dropped += 1
                if self._queue_full is not None:
                    self._queue_full.inc()
                return
            self._queue.append(span)
            if len(self._queue) >= self._batch:
                self._cond.notify_all()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Wait until every span queued before this call has been handed to the exporter."""
        with self._cond:
            if not self._thread.is_alive():
                return not self._queue
            self._flush_wanted += 1
            target = self._flush_wanted
            self._cond.notify_all()
            return self._cond.wait_for(
                lambda: self._flush_done >= target or not self._thread.is_alive(),
                timeout_millis / 1000,
            )

    def shutdown(self, timeout: float = 5.0) -> None:
        """Export what is queued (within `timeout`), then stop the thread and the exporter."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        self.exporter.shutdown()

    def _run(self) -> None:
        while True:
            with self._cond:
                deadline = time.monotonic() + self._interval
                while (
                    len(self._queue) < self._batch
                    and not self._closed
                    and self._flush_wanted <= self._flush_done
                ):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                n = min(self._batch, len(self._queue))
                batch = [self._queue.popleft() for _ in range(n)]
                drained = not self._queue
                wanted = self._flush_wanted
                closing = self._closed
            if batch:
                self._export(batch)
            with self._cond:
                if drained:
                    self._flush_done = max(self._flush_done, wanted)
                    self._cond.notify_all()
                if closing and not self._queue:
                    return
            self._report()

    def _export(self, batch: list[ReadableSpan]) -> None:
        try:
            result = self.exporter.export(batch)
        except Exception:
            log.exception("span export to %s raised", self.name)
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self.exported += len(batch)
        else:
            self.failed += len(batch)
            if self._export_failed is not None:
                self._export_failed.inc(len(batch))

    def _report(self) -> None:
        now = time.monotonic()
        if (self.dropped, self.failed) == self._reported or now - self._reported_at < _REPORT_EVERY:
            return
        dropped, failed = self.dropped - self._reported[0], self.failed - self._reported[1]
        self._reported, self._reported_at = (self.dropped, self.failed), now
        log.warning(
            "spans to %s: %d dropped (queue of %d full), %d failed to export",
            self.name,
            dropped,
            self._max,
            failed,
        )

    def stats(self) -> dict[str, int]:
        with self._cond:
            queued = len(self._queue)
        return {
            "queued": queued,
            "exported": self.exported,
            "failed": self.failed,
            "dropped": self.dropped,
        }


class Tracing:
    """A tracer provider with its destinations; `tracer` is the one k2d code uses."""

    def __init__(
        self,
        provider: TracerProvider,
        ring: SpanRing,
        *,
        store: TraceStore | None = None,
        queues: Sequence[ExportQueue] = (),
    ) -> None:
        self.provider = provider
        self.ring = ring
        self.store = store
        self.queues = {q.name: q for q in queues}
        self.tracer: trace.Tracer = provider.get_tracer("k2d", __version__)

    @property
    def ring_size(self) -> int:
        """The most spans one read of recent spans returns (telemetry.span_ring_size)."""
        return self.ring.size

    def recent_spans(self, limit: int = 100) -> list[dict[str, Any]]:
        """The last `limit` finished spans as JSON-ready dicts, newest first: from the trace
        store (this run's and earlier runs') when there is one, else from the ring. Reads
        files: call it from a worker thread."""
        limit = min(limit, self.ring.size)
        if self.store is None:
            return [span_to_dict(s) for s in self.ring.recent(limit)]
        queue = self.queues.get("store")
        if queue is not None:
            queue.force_flush(_FLUSH_BEFORE_READ_MS)
        return self.store.recent(limit, hide=HIDDEN_EVENT_ATTRIBUTES)

    def stats(self) -> dict[str, dict[str, int]]:
        """Per destination: spans queued, exported, failed and dropped."""
        return {name: q.stats() for name, q in self.queues.items()}

    def force_flush(self, timeout_millis: int = 5_000) -> bool:
        return self.provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Flush exporters and stop; spans ended afterwards are dropped."""
        self.provider.shutdown()
        if self.store is not None:
            self.store.close()


def setup_tracing(
    cfg: TelemetryConfig,
    *,
    store_dir: Path | None = None,
    set_global: bool = False,
    metrics: Metrics | None = None,
) -> Tracing:
    """Build the tracer provider from config: the ring always, the trace store in `store_dir`
    (see TelemetryConfig.trace_path), OTLP when `otlp_endpoint` is set; optionally install
    it as the global provider. With `metrics`, lost spans are counted in its
    k2d_spans_dropped_total."""
    resource = Resource.create(
        {
            "service.name": cfg.service_name,
            "service.version": __version__,
            # One per process start: tells the runs apart in the trace store.
            "service.instance.id": uuid.uuid4().hex,
        }
    )
    provider = TracerProvider(resource=resource, sampler=RatioSampler(cfg.sample_ratio))
    keep = tail_keep(cfg.slow_span_seconds)
    drops = metrics.spans_dropped if metrics is not None else None
    ring = SpanRing(cfg.span_ring_size, keep)
    provider.add_span_processor(ring)
    queues: list[ExportQueue] = []
    store = None
    if store_dir is not None:
        store = TraceStore(store_dir, file_bytes=cfg.trace_file_bytes, files=cfg.trace_files)
        queues.append(_queue(TraceStoreExporter(store), "store", keep, cfg, drops))
    if cfg.otlp_endpoint:
        exporter = _otlp_exporter(cfg)
        if exporter is not None:
            queues.append(_queue(exporter, "otlp", keep, cfg, drops))
    for q in queues:
        provider.add_span_processor(q)
    if set_global:
        trace.set_tracer_provider(provider)
    return Tracing(provider, ring, store=store, queues=queues)


def _queue(
    exporter: SpanExporter, name: str, keep: Keep, cfg: TelemetryConfig, drops: Counter | None
) -> ExportQueue:
    return ExportQueue(
        exporter,
        name=name,
        keep=keep,
        max_queue_size=cfg.max_queue_size,
        batch_size=cfg.export_batch_size,
        interval=cfg.export_interval,
        drops=drops,
    )


def otlp_traces_url(endpoint: str) -> str:
    """The exporter's constructor argument is used verbatim (unlike the environment
    variable): add the signal path unless it is there."""
    url = endpoint.rstrip("/")
    return url if url.endswith(_OTLP_TRACES_PATH) else url + _OTLP_TRACES_PATH


def _otlp_exporter(cfg: TelemetryConfig) -> SpanExporter | None:
    """OTLP/HTTP (protobuf) if the exporter package is installed (the `otlp` extra)."""
    try:
        module = importlib.import_module(_OTLP_MODULE)
    except ImportError:
        log.warning(
            "telemetry.otlp_endpoint is set but opentelemetry-exporter-otlp-proto-http is not "
            "installed; spans are not exported",
            extra={"otlp_endpoint": cfg.otlp_endpoint},
        )
        return None
    url = otlp_traces_url(cfg.otlp_endpoint)
    exporter: SpanExporter = module.OTLPSpanExporter(endpoint=url, timeout=cfg.otlp_timeout)
    log.info("exporting spans over OTLP/HTTP", extra={"otlp_endpoint": url})
    return exporter


def current_trace_id() -> str | None:
    """Hex trace id of the span current in this context, or None."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def current_span_id() -> str | None:
    """Hex span id of the span current in this context, or None."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.span_id, "016x") if ctx.is_valid else None


def span_to_dict(span: ReadableSpan) -> dict[str, Any]:
    """One finished span as a JSON-ready dict (ids in lower-case hex, times in ns); the
    trace store's reader returns the same shape."""
    ctx = span.get_span_context()
    start, end = span.start_time, span.end_time
    return {
        "name": span.name,
        "kind": span.kind.name.lower(),
        "trace_id": format(ctx.trace_id, "032x") if ctx else None,
        "span_id": format(ctx.span_id, "016x") if ctx else None,
        "parent": format(span.parent.span_id, "016x") if span.parent else None,
        "start_ns": start,
        "end_ns": end,
        "duration_ms": (end - start) / 1e6 if start is not None and end is not None else None,
        "attributes": _attrs(span.attributes),
        "events": [
            {
                "name": e.name,
                "ts_ns": e.timestamp,
                "attributes": _attrs(e.attributes, hide=HIDDEN_EVENT_ATTRIBUTES),
            }
            for e in span.events
        ],
        "links": [
            {
                "trace_id": format(link.context.trace_id, "032x"),
                "span_id": format(link.context.span_id, "016x"),
                "attributes": _attrs(link.attributes),
            }
            for link in span.links
        ],
        "status": {
            "code": span.status.status_code.name.lower(),
            "description": span.status.description,
        },
        "resource": _attrs(span.resource.attributes),
    }


def _attrs(attrs: Attributes, hide: frozenset[str] = frozenset()) -> dict[str, Any]:
    if not attrs:
        return {}
    return {k: _attr_value(v) for k, v in attrs.items() if k not in hide}


def _attr_value(value: Any) -> Any:
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return list(value)
    return value
