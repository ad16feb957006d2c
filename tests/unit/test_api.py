"""k2d.api against a real uvicorn server on 127.0.0.1 (port 0), driven by httpx."""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest
from litestar import Request, get, post
from litestar.types import ControllerRouterHandler

import k2d
from k2d.api import ApiError, ApiServer, ApiState, create_app, serve
from k2d.config import ApiConfig, TelemetryConfig
from k2d.runtime import ActorState, Registry
from k2d.telemetry.metrics import Metrics
from k2d.telemetry.tracing import Tracing, setup_tracing

STATS = {"tables": {"trades": {"rows": 42, "snapshots": 3}}, "open_gaps": 1}


async def _stats() -> dict[str, Any]:
    return STATS


@post("/test/echo")
async def _echo(request: Request[Any, Any, Any]) -> dict[str, int]:
    return {"received": len(await request.body())}


@get("/test/boom", sync_to_thread=False)
def _boom() -> None:
    raise RuntimeError("SELECT secret FROM vault -- must never reach the client")


@get("/test/teapot", sync_to_thread=False)
def _teapot() -> None:
    raise ApiError(418, "teapot", "short and stout")


TEST_ROUTES: Sequence[ControllerRouterHandler] = (_echo, _boom, _teapot)


@dataclass
class Harness:
    client: httpx.AsyncClient
    state: ApiState
    tracing: Tracing
    server: ApiServer


def _state(expected: set[str] | None = None, ring: int = 64) -> ApiState:
    registry = Registry()
    return ApiState(
        registry=registry,
        metrics=Metrics(registry),
        tracing=setup_tracing(TelemetryConfig(span_ring_size=ring)),
        stats=_stats,
        expected_actors=expected or set(),
    )


@asynccontextmanager
async def running(state: ApiState) -> AsyncIterator[Harness]:
    server = serve(create_app(state, route_handlers=TEST_ROUTES), ApiConfig(port=0))
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        async with httpx.AsyncClient(base_url=server.url, timeout=5.0) as client:
            assert state.tracing is not None
            yield Harness(client, state, state.tracing, server)
        await server.stop()


async def test_health_is_ok_while_starting() -> None:
    async with running(_state()) as h:
        r = await h.client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


async def test_ready_follows_marks_and_actor_states() -> None:
    state = _state(expected={"feed.binance", "writer"})
    registry = state.registry
    async with running(state) as h:
        r = await h.client.get("/ready")
        assert (r.status_code, r.json()["status"]) == (503, "starting")

        registry.set_state("feed.binance", ActorState.RUNNING)
        registry.set_state("writer", ActorState.DEGRADED, "trades commit failing (disk_full)")
        state.mark_ready()
        r = await h.client.get("/ready")
        assert r.status_code == 200
        assert r.json() == {
            "status": "ready",
            "actors": {"feed.binance": "running", "writer": "degraded"},
            "restarts": {},
            "degraded": {"writer": "trades commit failing (disk_full)"},
        }

        registry.count_restart("writer")
        registry.set_state("writer", ActorState.RESTARTING)
        r = await h.client.get("/ready")
        assert r.status_code == 503
        assert r.json()["status"] == "not_ready"
        assert r.json()["actors"]["writer"] == "restarting"
        assert r.json()["restarts"] == {"writer": 1}

        registry.set_state("writer", ActorState.RUNNING)
        state.mark_draining()
        r = await h.client.get("/ready")
        assert (r.status_code, r.json()["status"]) == (503, "draining")


async def test_ready_needs_every_expected_actor_present() -> None:
    state = _state(expected={"feed.binance", "writer"})
    state.registry.set_state("feed.binance", ActorState.RUNNING)
    state.mark_ready()
    async with running(state) as h:
        r = await h.client.get("/ready")
    assert (r.status_code, r.json()["status"]) == (503, "not_ready")


async def test_metrics_exposes_values_and_counts_requests() -> None:
    state = _state()
    state.metrics.commits.labels(table="trades").inc(7)
    async with running(state) as h:
        await h.client.get("/health")
        await h.client.get("/no/such/thing")
        r = await h.client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    lines = r.text.splitlines()
    assert 'k2d_commits_total{table="trades"} 7.0' in lines
    assert 'k2d_http_requests_total{route="/health",status="200"} 1.0' in lines
    # Unmatched paths share one label value, so the label set stays bounded.
    assert 'k2d_http_requests_total{route="<unmatched>",status="404"} 1.0' in lines


async def test_stats_wraps_the_payload() -> None:
    async with running(_state()) as h:
        r = await h.client.get("/v1/stats")
    assert r.status_code == 200
    body = r.json()
    assert body["data"] == STATS
    assert body["meta"]["generated_at"].endswith("Z")


async def test_unknown_path_is_json_404() -> None:
    async with running(_state()) as h:
        r = await h.client.get("/v1/nothing-here")
        schema_r = await h.client.get("/schema/nothing-here")
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["code"] == "not_found"
    assert "/v1/nothing-here" in r.json()["detail"]
    assert (schema_r.status_code, schema_r.json()["code"]) == (404, "not_found")


async def test_wrong_method_is_json_405() -> None:
    async with running(_state()) as h:
        r = await h.client.delete("/health")
    assert r.status_code == 405
    assert r.json()["code"] == "method_not_allowed"
    assert "GET" in r.headers["allow"]


async def test_body_over_limit_is_413_with_or_without_content_length() -> None:
    big = b"x" * (64 * 1024 + 1)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    async with running(_state()) as h:
        ok = await h.client.post("/test/echo", content=b"x" * 1000)
        declared = await h.client.post("/test/echo", content=big)
        chunked = await h.client.post("/test/echo", content=chunks())
        after = await h.client.get("/health")
    assert (ok.status_code, ok.json()) == (201, {"received": 1000})
    for r in (declared, chunked):
        assert r.status_code == 413
        assert r.json()["code"] == "body_too_large"
    assert after.status_code == 200


async def test_unexpected_exception_is_generic_500_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="k2d.api")
    async with running(_state()) as h:
        r = await h.client.get("/test/boom", headers={"X-Request-ID": "req-500"})
    assert r.status_code == 500
    body = r.json()
    assert body["code"] == "internal_error"
    assert set(body) == {"code", "detail"}
    for leak in ("Traceback", "RuntimeError", "SELECT", "vault"):
        assert leak not in r.text
    assert "req-500" in body["detail"]
    [record] = [rec for rec in caplog.records if rec.name == "k2d.api"]
    assert record.exc_info is not None
    assert getattr(record, "request_id", None) == "req-500"


async def test_api_error_keeps_its_status_and_code() -> None:
    async with running(_state()) as h:
        r = await h.client.get("/test/teapot")
    assert r.status_code == 418
    assert r.json() == {"code": "teapot", "detail": "short and stout"}


async def test_traceparent_becomes_the_parent_of_the_request_span() -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent_id = "00f067aa0ba902b7"
    async with running(_state()) as h:
        r = await h.client.get(
            "/health",
            headers={"traceparent": f"00-{trace_id}-{parent_id}-01", "X-Request-ID": "abc-123"},
        )
        traces = await h.client.get("/v1/traces", params={"limit": 10})
    assert r.headers["x-request-id"] == "abc-123"
    spans = [s for s in traces.json()["data"] if s["name"] == "http GET /health"]
    assert len(spans) == 1
    span = spans[0]
    assert span["trace_id"] == trace_id
    assert span["parent"] == parent_id
    assert span["kind"] == "server"
    assert span["attributes"]["k2d.request_id"] == "abc-123"
    assert span["attributes"]["http.response.status_code"] == 200


async def test_request_id_is_generated_when_missing_or_unsafe() -> None:
    async with running(_state()) as h:
        generated = await h.client.get("/health")
        unsafe = await h.client.get("/health", headers={"X-Request-ID": "a b\tc" + "x" * 200})
    for r in (generated, unsafe):
        rid = r.headers["x-request-id"]
        assert len(rid) == 32
        assert all(c in "0123456789abcdef" for c in rid)
    assert generated.headers["x-request-id"] != unsafe.headers["x-request-id"]


async def test_failed_request_span_has_error_status() -> None:
    async with running(_state()) as h:
        await h.client.get("/test/boom")
    [span] = [s for s in h.tracing.recent_spans(10) if s["name"] == "http GET /test/boom"]
    assert span["status"]["code"] == "error"
    [event] = span["events"]
    assert event["name"] == "exception"
    assert "exception.stacktrace" not in event["attributes"]


async def test_traces_limit_is_bounded_by_the_ring() -> None:
    async with running(_state(ring=8)) as h:
        for _ in range(10):
            await h.client.get("/health")
        default = await h.client.get("/v1/traces")
        three = await h.client.get("/v1/traces", params={"limit": 3})
        over = await h.client.get("/v1/traces", params={"limit": 9})
        zero = await h.client.get("/v1/traces", params={"limit": 0})
        junk = await h.client.get("/v1/traces", params={"limit": "lots"})
    assert len(default.json()["data"]) == 8  # default 100, capped at the ring size
    assert len(three.json()["data"]) == 3
    for r in (over, zero, junk):
        assert r.status_code == 400
        assert r.json()["code"] == "invalid_parameter"
        assert "'limit'" in r.json()["detail"]


async def test_openapi_json_lists_the_routes() -> None:
    async with running(_state()) as h:
        r = await h.client.get("/schema/openapi.json")
        root = await h.client.get("/schema")
    assert r.status_code == 200
    doc = r.json()
    assert (doc["info"]["title"], doc["info"]["version"]) == ("k2d", k2d.__version__)
    assert {"/health", "/ready", "/metrics", "/v1/stats", "/v1/traces"} <= set(doc["paths"])
    assert root.status_code == 200
    assert root.json()["paths"] == doc["paths"]


async def test_server_leaves_signal_handlers_alone_and_stops() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    async with running(_state()) as h:
        during = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
        port = h.server.port
        assert port != 0
    assert during == before
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 1):
        pass


async def test_port_in_use_fails_run_instead_of_exiting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        state = _state()
        server = serve(create_app(state), ApiConfig(port=port))
        with pytest.raises(ExceptionGroup) as info:
            async with anyio.create_task_group() as tg:
                await tg.start(server.run)
    assert info.group_contains(RuntimeError, match="failed to start")


def test_keys_in_the_config_must_be_sha256_digests() -> None:
    from k2d.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(environ={}, overrides={"api": {"admin_api_keys": ["s3cret"]}})
    assert info.value.problems == ["api: admin_api_keys.0: not a lower-case sha256 hex digest"]
    digest = "ab" * 32
    cfg = load_config(environ={}, overrides={"api": {"admin_api_keys": [digest]}})
    assert cfg.api.admin_api_keys == (digest,) and cfg.api.api_keys == ()
