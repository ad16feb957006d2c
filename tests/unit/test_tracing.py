"""k2d.telemetry.tracing: the in-memory span ring, span dicts, head and tail sampling, the
bounded export queue and the spans it loses (k2d_spans_dropped_total), the trace store
behind setup_tracing, traceparent on history requests, maintenance spans, and the OTLP
exporter missing."""

from __future__ import annotations

import http.server
import importlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import Link, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from k2d.config import TelemetryConfig
from k2d.telemetry import tracing as tracing_module
from k2d.telemetry.metrics import Metrics
from k2d.telemetry.tracing import (
    ExportQueue,
    current_span_id,
    current_trace_id,
    setup_tracing,
)


def test_ring_keeps_only_the_newest_spans_newest_first() -> None:
    tracing = setup_tracing(TelemetryConfig(span_ring_size=3))
    for i in range(5):
        with tracing.tracer.start_as_current_span(f"span-{i}"):
            pass
    spans = tracing.recent_spans(10)
    assert [s["name"] for s in spans] == ["span-4", "span-3", "span-2"]
    assert [s["name"] for s in tracing.recent_spans(1)] == ["span-4"]
    tracing.shutdown()


def test_span_dict_has_ids_parent_links_attributes_and_status() -> None:
    tracing = setup_tracing(TelemetryConfig())
    tracer = tracing.tracer
    with tracer.start_as_current_span("batch") as batch:
        batch_ctx = batch.get_span_context()
    with tracer.start_as_current_span("commit", links=[Link(batch_ctx)]) as commit:
        commit.set_attribute("rows", 250)
        commit.set_attribute("tables", ["trades", "quotes"])
        with tracer.start_as_current_span("child") as child:
            child.set_status(trace.Status(StatusCode.ERROR, "boom"))
    commit_d, child_d, batch_d = tracing.recent_spans(3)  # newest (last ended) first
    assert batch_d["name"] == "batch"

    assert commit_d["name"] == "commit"
    assert len(commit_d["trace_id"]) == 32
    assert len(commit_d["span_id"]) == 16
    assert commit_d["parent"] is None
    assert commit_d["attributes"] == {"rows": 250, "tables": ["trades", "quotes"]}
    assert commit_d["links"] == [
        {
            "trace_id": format(batch_ctx.trace_id, "032x"),
            "span_id": format(batch_ctx.span_id, "016x"),
            "attributes": {},
        }
    ]
    assert commit_d["end_ns"] >= commit_d["start_ns"]
    assert commit_d["duration_ms"] == (commit_d["end_ns"] - commit_d["start_ns"]) / 1e6
    assert child_d["parent"] == commit_d["span_id"]
    assert child_d["trace_id"] == commit_d["trace_id"]
    assert child_d["status"] == {"code": "error", "description": "boom"}


def test_ring_is_safe_across_threads() -> None:
    tracing = setup_tracing(TelemetryConfig(span_ring_size=100))

    def work(n: int) -> None:
        for i in range(200):
            with tracing.tracer.start_as_current_span(f"t{n}-{i}"):
                pass

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans = tracing.recent_spans(1000)
    assert len(spans) == 100
    assert len({s["span_id"] for s in spans}) == 100


def test_current_ids_follow_the_current_span() -> None:
    tracing = setup_tracing(TelemetryConfig())
    assert current_trace_id() is None
    assert current_span_id() is None
    with tracing.tracer.start_as_current_span("x") as span:
        ctx = span.get_span_context()
        assert current_trace_id() == format(ctx.trace_id, "032x")
        assert current_span_id() == format(ctx.span_id, "016x")
    assert current_trace_id() is None


def test_providers_are_independent_and_not_global() -> None:
    a = setup_tracing(TelemetryConfig())
    b = setup_tracing(TelemetryConfig())
    with a.tracer.start_as_current_span("only-in-a"):
        pass
    assert [s["name"] for s in a.recent_spans(5)] == ["only-in-a"]
    assert b.recent_spans(5) == []
    assert trace.get_tracer_provider() is not a.provider


def _names(spans: list[dict[str, Any]]) -> set[str]:
    return {s["name"] for s in spans}


def test_sampled_out_spans_are_kept_when_they_fail_or_run_slow() -> None:
    tracing = setup_tracing(TelemetryConfig(sample_ratio=0.0, slow_span_seconds=0.05))
    tracer = tracing.tracer
    with tracer.start_as_current_span("quick"):
        pass
    with pytest.raises(RuntimeError), tracer.start_as_current_span("failed"):
        raise RuntimeError("boom")
    start = time.time_ns()
    tracer.start_span("slow", start_time=start).end(end_time=start + 60_000_000)
    tracer.start_span("almost-slow", start_time=start).end(end_time=start + 40_000_000)
    assert _names(tracing.recent_spans(10)) == {"failed", "slow"}


def test_the_ratio_keeps_about_that_share_of_traces_and_whole_traces() -> None:
    tracing = setup_tracing(TelemetryConfig(sample_ratio=0.25, span_ring_size=20_000))
    tracer = tracing.tracer
    for i in range(4_000):
        with tracer.start_as_current_span(f"root-{i}"), tracer.start_as_current_span(f"child-{i}"):
            pass
    kept = _names(tracing.recent_spans(20_000))
    roots = {n for n in kept if n.startswith("root-")}
    assert 0.2 < len(roots) / 4_000 < 0.3
    # A trace is kept or dropped whole: every kept root has its child and no child is alone.
    assert {n.replace("child-", "root-") for n in kept if n.startswith("child-")} == roots


def test_an_incoming_sampled_flag_wins_over_the_ratio() -> None:
    propagator = TraceContextTextMapPropagator()
    tid = "4bf92f3577b34da6a3ce929d0e0e4736"
    for ratio, flags, kept in ((0.0, "01", True), (1.0, "00", False)):
        tracing = setup_tracing(TelemetryConfig(sample_ratio=ratio))
        parent = propagator.extract({"traceparent": f"00-{tid}-00f067aa0ba902b7-{flags}"})
        with tracing.tracer.start_as_current_span("request", context=parent):
            pass
        assert bool(tracing.recent_spans(5)) is kept, (ratio, flags)


class BlockingExporter(SpanExporter):
    """Holds every export until released; records the thread each export ran on."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.batches: list[int] = []
        self.threads: set[str] = set()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.threads.add(threading.current_thread().name)
        self.release.wait(10)
        self.batches.append(len(spans))
        return SpanExportResult.SUCCESS


def test_the_export_queue_is_bounded_and_never_makes_the_caller_wait() -> None:
    exporter = BlockingExporter()
    tracing = setup_tracing(TelemetryConfig())
    queue = ExportQueue(exporter, name="test", max_queue_size=10, batch_size=5, interval=0.05)
    tracing.provider.add_span_processor(queue)
    started = time.monotonic()
    for i in range(100):
        with tracing.tracer.start_as_current_span(f"s{i}"):
            pass
    elapsed = time.monotonic() - started
    stats = queue.stats()
    assert elapsed < 1.0  # the exporter is stuck, the spans' owner is not
    assert stats["queued"] <= 10
    assert stats["dropped"] >= 100 - 10 - 5  # at most one batch in the exporter's hands
    exporter.release.set()
    assert queue.force_flush(5_000)
    assert queue.stats()["queued"] == 0
    assert sum(exporter.batches) + queue.stats()["dropped"] == 100
    assert max(exporter.batches) <= 5
    assert exporter.threads == {"k2d-spans-test"}
    assert threading.current_thread().name not in exporter.threads
    queue.shutdown()


class FailingExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.FAILURE


def test_spans_lost_by_a_full_queue_or_a_failed_export_are_counted_in_the_metric() -> None:
    metrics = Metrics()

    def lost(exporter: str, reason: str) -> float | None:
        labels = {"exporter": exporter, "reason": reason}
        return metrics.registry.get_sample_value("k2d_spans_dropped_total", labels)

    tracing = setup_tracing(TelemetryConfig())
    stuck = BlockingExporter()
    full = ExportQueue(
        stuck,
        name="stuck",
        max_queue_size=10,
        batch_size=5,
        interval=0.05,
        drops=metrics.spans_dropped,
    )
    failing = ExportQueue(
        FailingExporter(),
        name="failing",
        max_queue_size=1_000,
        batch_size=50,
        drops=metrics.spans_dropped,
    )
    tracing.provider.add_span_processor(full)
    tracing.provider.add_span_processor(failing)
    assert lost("stuck", "queue_full") == 0  # the series exist before the first loss

    for i in range(100):
        with tracing.tracer.start_as_current_span(f"s{i}"):
            pass
    stuck.release.set()
    assert full.force_flush(5_000) and failing.force_flush(5_000)

    assert lost("stuck", "queue_full") == full.stats()["dropped"] >= 100 - 10 - 5
    assert lost("stuck", "export_failed") == 0
    assert lost("failing", "queue_full") == 0
    assert lost("failing", "export_failed") == 100
    tracing.shutdown()  # shuts its processors down, the two queues with them


def test_setup_tracing_with_a_store_serves_recent_spans_from_disk(tmp_path: Path) -> None:
    tracing = setup_tracing(TelemetryConfig(export_interval=30.0), store_dir=tmp_path)
    with tracing.tracer.start_as_current_span("stored"):
        pass
    # The export interval is long: reading flushes the queue first.
    [span] = tracing.recent_spans(5)
    assert span["name"] == "stored"
    assert span["resource"]["service.name"] == "k2d"
    assert len(span["resource"]["service.instance.id"]) == 32
    assert tracing.stats()["store"]["exported"] == 1
    tracing.shutdown()
    again = setup_tracing(TelemetryConfig(), store_dir=tmp_path)
    with again.tracer.start_as_current_span("next-run"):
        pass
    spans = again.recent_spans(5)
    assert [s["name"] for s in spans] == ["next-run", "stored"]
    runs = {s["resource"]["service.instance.id"] for s in spans}
    assert len(runs) == 2
    again.shutdown()


class _History(http.server.BaseHTTPRequestHandler):
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:
        type(self).seen.append({k.lower(): v for k, v in self.headers.items()})
        body = b'[{"id":5,"price":"1.0","qty":"1.0","quoteQty":"1.0","time":1700000000000,'
        body += b'"isBuyerMaker":true,"isBestMatch":true}]'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def history_server() -> Iterator[str]:
    _History.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _History)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_history_requests_carry_the_current_span_as_w3c_traceparent(history_server: str) -> None:
    from k2d.venues.binance_rest import BinanceRest

    tracing = setup_tracing(TelemetryConfig())

    async def fetch() -> tuple[str, str]:
        async with BinanceRest(
            history_server, weight_per_minute=6_000, request_weight=25, timeout=5.0
        ) as rest:
            with tracing.tracer.start_as_current_span("backfill.fetch") as span:
                page = await rest.historical_trades("BTCUSDT", 5, 1)
                assert len(page) == 1
                ctx = span.get_span_context()
                return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")

    trace_id, span_id = anyio.run(fetch)
    [headers] = _History.seen
    version, got_trace, got_parent, flags = headers["traceparent"].split("-")
    assert (version, got_trace, got_parent) == ("00", trace_id, span_id)
    assert int(flags, 16) & 0x01  # sampled


def test_maintenance_rewrites_and_expiries_are_spans(tmp_path: Path) -> None:
    from k2d.config import StorageConfig
    from k2d.storage import TableMaintenance, Warehouse
    from tests.integration.test_maintenance import Feeder, maintenance_cfg

    tracing = setup_tracing(TelemetryConfig())
    with Warehouse(StorageConfig(data_dir=str(tmp_path))) as wh:
        wh.ensure_tables()
        Feeder(wh).fill(commits=6, rows=50, days=(3,))
        report = TableMaintenance(wh, maintenance_cfg(), tracer=tracing.tracer).run(["trades"])
    assert not report.errors
    spans = {s["name"]: s for s in tracing.recent_spans(50)}
    compact = spans["maintenance.compact"]
    assert compact["attributes"]["k2d.table"] == "trades"
    assert compact["attributes"]["db.system"] == "iceberg"
    assert compact["attributes"]["k2d.files_before"] == 6
    assert compact["attributes"]["k2d.rows"] == 300
    assert spans["maintenance.expire"]["attributes"]["k2d.table"] == "trades"


def test_otlp_endpoint_without_the_exporter_warns_and_keeps_the_ring(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.import_module

    def without_otlp(name: str, package: str | None = None) -> Any:
        if name.startswith("opentelemetry.exporter.otlp.proto.http"):
            raise ImportError(name)
        return real(name, package)

    monkeypatch.setattr(tracing_module.importlib, "import_module", without_otlp)
    caplog.set_level(logging.WARNING, logger="k2d.telemetry.tracing")
    tracing = setup_tracing(TelemetryConfig(otlp_endpoint="http://127.0.0.1:4318"))
    with tracing.tracer.start_as_current_span("kept"):
        pass
    assert [s["name"] for s in tracing.recent_spans(1)] == ["kept"]
    assert "otlp" not in tracing.stats()
    assert any("opentelemetry-exporter-otlp-proto-http" in r.getMessage() for r in caplog.records)
    tracing.shutdown()


def test_context_helpers_ignore_a_detached_context() -> None:
    tracing = setup_tracing(TelemetryConfig())
    token = otel_context.attach(otel_context.Context())
    try:
        assert current_trace_id() is None
        with tracing.tracer.start_as_current_span("inner"):
            assert current_trace_id() is not None
    finally:
        otel_context.detach(token)
