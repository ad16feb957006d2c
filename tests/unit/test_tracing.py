"""k2d.telemetry.tracing: the in-memory span ring, span dicts, OTLP fallback."""

from __future__ import annotations

import importlib.util
import logging
import threading

import pytest
from opentelemetry import trace
from opentelemetry.trace import Link, StatusCode

from k2d.config import TelemetryConfig
from k2d.telemetry.tracing import current_span_id, current_trace_id, setup_tracing


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


def _otlp_installed() -> bool:
    try:
        return importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(_otlp_installed(), reason="the OTLP exporter is installed here")
def test_otlp_endpoint_without_exporter_warns_and_keeps_the_ring(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="k2d.telemetry.tracing")
    tracing = setup_tracing(TelemetryConfig(otlp_endpoint="http://127.0.0.1:4318"))
    with tracing.tracer.start_as_current_span("kept"):
        pass
    assert [s["name"] for s in tracing.recent_spans(1)] == ["kept"]
    assert any("opentelemetry-exporter-otlp-proto-http" in r.getMessage() for r in caplog.records)
    tracing.shutdown()
