"""OpenTelemetry setup: a tracer provider, an in-memory ring of finished spans, optional OTLP.

Without a collector the last `span_ring_size` spans stay inspectable at /v1/traces. The
provider is only installed globally on request, so tests can run several side by side.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.util.types import Attributes

from k2d import __version__
from k2d.config import TelemetryConfig

__all__ = ["SpanRing", "Tracing", "current_span_id", "current_trace_id", "setup_tracing"]

log = logging.getLogger(__name__)

_OTLP_MODULE = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
_OTLP_TRACES_PATH = "/v1/traces"
# Stack traces go to logs and OTLP; the HTTP inspection endpoint shows type and message only.
_HIDDEN_EVENT_ATTRIBUTES = frozenset({"exception.stacktrace"})


class SpanRing(SpanProcessor):
    """Keeps the last `size` finished spans in memory; thread-safe, O(1) per span."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("span ring size must be >= 1")
        self.size = size
        self._spans: deque[ReadableSpan] = deque(maxlen=size)
        self._lock = threading.Lock()

    def on_end(self, span: ReadableSpan) -> None:
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


class Tracing:
    """A tracer provider with its span ring; `tracer` is the one k2d code uses."""

    def __init__(self, provider: TracerProvider, ring: SpanRing) -> None:
        self.provider = provider
        self.ring = ring
        self.tracer: trace.Tracer = provider.get_tracer("k2d", __version__)

    @property
    def ring_size(self) -> int:
        return self.ring.size

    def recent_spans(self, limit: int = 100) -> list[dict[str, Any]]:
        """The last `limit` finished spans as JSON-ready dicts, newest first."""
        return [span_to_dict(s) for s in self.ring.recent(limit)]

    def force_flush(self, timeout_millis: int = 5_000) -> bool:
        return self.provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Flush exporters and stop; spans ended afterwards are dropped."""
        self.provider.shutdown()


def setup_tracing(cfg: TelemetryConfig, *, set_global: bool = False) -> Tracing:
    """Build the tracer provider from config; optionally install it as the global one."""
    resource = Resource.create({"service.name": cfg.service_name, "service.version": __version__})
    provider = TracerProvider(resource=resource)
    ring = SpanRing(cfg.span_ring_size)
    provider.add_span_processor(ring)
    if cfg.otlp_endpoint:
        _add_otlp(provider, cfg.otlp_endpoint)
    if set_global:
        trace.set_tracer_provider(provider)
    return Tracing(provider, ring)


def _add_otlp(provider: TracerProvider, endpoint: str) -> None:
    """Export over OTLP/HTTP if the exporter package is installed (it is optional)."""
    try:
        module = importlib.import_module(_OTLP_MODULE)
    except ImportError:
        log.warning(
            "telemetry.otlp_endpoint is set but opentelemetry-exporter-otlp-proto-http is not "
            "installed; spans stay in the in-memory ring only",
            extra={"otlp_endpoint": endpoint},
        )
        return
    # The constructor argument is used verbatim (unlike the env var): add the signal path.
    url = endpoint.rstrip("/")
    if not url.endswith(_OTLP_TRACES_PATH):
        url += _OTLP_TRACES_PATH
    provider.add_span_processor(
        BatchSpanProcessor(module.OTLPSpanExporter(endpoint=url), max_queue_size=2_048)
    )
    log.info("exporting spans over OTLP/HTTP", extra={"otlp_endpoint": url})


def current_trace_id() -> str | None:
    """Hex trace id of the span current in this context, or None."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def current_span_id() -> str | None:
    """Hex span id of the span current in this context, or None."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.span_id, "016x") if ctx.is_valid else None


def span_to_dict(span: ReadableSpan) -> dict[str, Any]:
    """One finished span as a JSON-ready dict (ids in lower-case hex, times in ns)."""
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
                "attributes": _attrs(e.attributes, hide=_HIDDEN_EVENT_ATTRIBUTES),
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
    }


def _attrs(attrs: Attributes, hide: frozenset[str] = frozenset()) -> dict[str, Any]:
    if not attrs:
        return {}
    return {k: _attr_value(v) for k, v in attrs.items() if k not in hide}


def _attr_value(value: Any) -> Any:
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return list(value)
    return value
