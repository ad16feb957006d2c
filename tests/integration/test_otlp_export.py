"""OTLP/HTTP export against a real receiver: an http.server on 127.0.0.1 that decodes each
POST /v1/traces body as an ExportTraceServiceRequest (protobuf, opentelemetry-proto), the
way a collector does. Ratio sampling with errors and slow spans always kept; a collector
that hangs costs an export timeout and never holds up the trace store or the caller, and
the spans it loses are counted in k2d_spans_dropped_total."""

from __future__ import annotations

import gzip
import http.server
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from k2d.config import TelemetryConfig
from k2d.telemetry.metrics import Metrics
from k2d.telemetry.tracing import setup_tracing


@dataclass
class Receiver:
    url: str
    spans: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    hang: threading.Event = field(default_factory=threading.Event)
    paths: set[str] = field(default_factory=set)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            state.paths.add(self.path)
            if state.hang.is_set():
                time.sleep(3)  # longer than the exporter's timeout in the test
            request = ExportTraceServiceRequest.FromString(body)
            for rs in request.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        state.spans.append(
                            {
                                "name": s.name,
                                "trace_id": s.trace_id.hex(),
                                "span_id": s.span_id.hex(),
                                "parent": s.parent_span_id.hex() or None,
                                "status": s.status.code,
                                "attributes": {a.key: a.value for a in s.attributes},
                                "service": resource.get("service.name"),
                            }
                        )
            state.requests += 1
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def test_spans_reach_a_real_otlp_receiver_with_errors_and_slow_ones_kept(
    receiver: Receiver, tmp_path: Path
) -> None:
    cfg = TelemetryConfig(
        otlp_endpoint=receiver.url,
        sample_ratio=0.0,
        slow_span_seconds=0.05,
        export_interval=0.1,
        service_name="k2d-otlp-test",
    )
    tracing = setup_tracing(cfg, store_dir=tmp_path / "traces")
    tracer = tracing.tracer
    with tracer.start_as_current_span("sampled-out"):
        pass

    def fail_a_commit() -> None:
        with tracer.start_as_current_span("writer.commit") as failed:
            failed.set_attribute("table", "trades")
            raise ValueError("commit refused")

    with pytest.raises(ValueError, match="commit refused"):
        fail_a_commit()
    start = time.time_ns()
    slow = tracer.start_span("query.execute", start_time=start, attributes={"db.system": "duckdb"})
    slow.end(end_time=start + 80_000_000)
    # An upstream that sampled its trace: its sampled flag wins over the ratio of 0.
    parent = TraceContextTextMapPropagator().extract(
        {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    )
    with tracer.start_as_current_span("http GET /v1/trades", context=parent):
        pass
    assert tracing.force_flush(10_000)

    by_name = {s["name"]: s for s in receiver.spans}
    assert set(by_name) == {"writer.commit", "query.execute", "http GET /v1/trades"}
    assert receiver.paths == {"/v1/traces"}  # the signal path is added to a bare endpoint
    assert by_name["writer.commit"]["status"] == 2  # STATUS_CODE_ERROR
    assert by_name["writer.commit"]["attributes"]["table"].string_value == "trades"
    assert by_name["query.execute"]["attributes"]["db.system"].string_value == "duckdb"
    http_span = by_name["http GET /v1/trades"]
    assert http_span["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert http_span["parent"] == "00f067aa0ba902b7"
    assert {s["service"] for s in receiver.spans} == {"k2d-otlp-test"}
    # The trace store got exactly what the collector got.
    stored = {s["name"]: s for s in tracing.recent_spans(10)}
    assert set(stored) == set(by_name)
    assert stored["writer.commit"]["span_id"] == by_name["writer.commit"]["span_id"]
    tracing.shutdown()


def test_a_hanging_collector_costs_its_timeout_and_holds_up_nothing_else(
    receiver: Receiver, tmp_path: Path
) -> None:
    receiver.hang.set()
    cfg = TelemetryConfig(
        otlp_endpoint=receiver.url + "/v1/traces",
        otlp_timeout=0.5,
        export_interval=0.05,
        max_queue_size=8,
        export_batch_size=4,
    )
    metrics = Metrics()
    tracing = setup_tracing(cfg, store_dir=tmp_path / "traces", metrics=metrics)
    started = time.monotonic()
    for i in range(200):
        with tracing.tracer.start_as_current_span(f"span-{i}"):
            pass
    assert time.monotonic() - started < 2.0  # the caller never waits for the collector
    # The store has its own queue and thread: it drains while the collector hangs, and its
    # reads do not wait for the collector.
    time.sleep(0.3)
    with tracing.tracer.start_as_current_span("marker"):
        pass
    read_started = time.monotonic()
    newest = tracing.recent_spans(1)
    assert time.monotonic() - read_started < 2.0
    assert [s["name"] for s in newest] == ["marker"]
    time.sleep(1.5)
    otlp = tracing.stats()["otlp"]
    assert otlp["queued"] <= 8  # bounded: the rest were dropped and counted
    assert otlp["dropped"] > 0
    assert otlp["failed"] >= 1  # gave up on a request after otlp_timeout
    # Both losses are in /metrics, by destination and reason.
    lost = metrics.registry.get_sample_value
    assert (
        lost("k2d_spans_dropped_total", {"exporter": "otlp", "reason": "queue_full"})
        == (otlp["dropped"])
    )
    assert lost("k2d_spans_dropped_total", {"exporter": "otlp", "reason": "export_failed"}) >= 1
    shutdown_started = time.monotonic()
    tracing.shutdown()
    assert time.monotonic() - shutdown_started < 15
