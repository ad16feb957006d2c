"""k2d.telemetry.trace_store: OTLP JSON lines on disk, bounded and rotating, read back as
the same span dicts the in-memory ring gives, across restarts and torn lines; each line the
bytes protobuf's JSON mapping makes of the OTLP exporter's message."""

from __future__ import annotations

import base64
import errno
import json
import os
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
from google.protobuf.json_format import MessageToDict
from opentelemetry import trace as trace_api
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from k2d.telemetry import trace_store
from k2d.telemetry.trace_store import TraceStore, TraceStoreExporter, request_spans
from k2d.telemetry.tracing import span_to_dict

HEX32 = re.compile(r"^[0-9a-f]{32}$")
HEX16 = re.compile(r"^[0-9a-f]{16}$")


def provider_into(store: TraceStore) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": "k2d-test"}))
    provider.add_span_processor(SimpleSpanProcessor(TraceStoreExporter(store)))
    return provider


def test_a_line_is_an_otlp_json_export_request_with_hex_ids(tmp_path: Path) -> None:
    store = TraceStore(tmp_path, file_bytes=1 << 20, files=2)
    tracer = provider_into(store).get_tracer("k2d")
    with tracer.start_as_current_span("batch") as batch:
        pass
    with tracer.start_as_current_span(
        "commit",
        kind=SpanKind.CLIENT,
        links=[Link(batch.get_span_context(), {"k2d.rows": 3})],
        attributes={"table": "trades", "rows": 250, "ratio": 0.5, "ok": True, "tags": ["a", "b"]},
    ) as commit:
        commit.set_status(Status(StatusCode.ERROR, "boom"))
    [first, second] = (tmp_path / "traces-00000001.jsonl").read_bytes().splitlines()

    doc = json.loads(second)
    [rs] = doc["resourceSpans"]
    assert {"key": "service.name", "value": {"stringValue": "k2d-test"}} in rs["resource"][
        "attributes"
    ]
    [span] = rs["scopeSpans"][0]["spans"]
    assert span["name"] == "commit"
    assert HEX32.match(span["traceId"]) and HEX16.match(span["spanId"])
    assert span["traceId"] == format(commit.get_span_context().trace_id, "032x")
    assert span["kind"] == 3  # SPAN_KIND_CLIENT: enums are integers in OTLP/JSON
    assert span["status"] == {"message": "boom", "code": 2}
    assert int(span["endTimeUnixNano"]) >= int(span["startTimeUnixNano"]) > 0
    attrs = {a["key"]: a["value"] for a in span["attributes"]}
    assert attrs["table"] == {"stringValue": "trades"}
    assert attrs["rows"] == {"intValue": "250"}
    assert attrs["ratio"] == {"doubleValue": 0.5}
    assert attrs["ok"] == {"boolValue": True}
    assert attrs["tags"] == {"arrayValue": {"values": [{"stringValue": "a"}, {"stringValue": "b"}]}}
    [link] = span["links"]
    assert link["spanId"] == format(batch.get_span_context().span_id, "016x")
    assert HEX32.match(link["traceId"])
    assert request_spans(first)[0]["name"] == "batch"


def test_read_back_spans_equal_the_rings_dicts(tmp_path: Path) -> None:
    store = TraceStore(tmp_path, file_bytes=1 << 20, files=2)
    provider = provider_into(store)
    finished = []

    class Keep(SimpleSpanProcessor):
        def on_end(self, span):  # type: ignore[no-untyped-def]
            finished.append(span)

    provider.add_span_processor(Keep(TraceStoreExporter(store)))
    tracer = provider.get_tracer("k2d")
    with tracer.start_as_current_span("parent", attributes={"a": 1}) as parent:
        with tracer.start_as_current_span("child", links=[Link(parent.get_span_context())]):
            pass
        try:
            raise ValueError("bad value")
        except ValueError as exc:
            parent.record_exception(exc)
    trace_id = format(parent.get_span_context().trace_id, "032x")

    stored = store.trace(trace_id)
    expected = sorted((span_to_dict(s) for s in finished), key=lambda d: d["start_ns"])
    # The ring hides stack traces from HTTP; the store keeps them.
    for d in stored:
        for e in d["events"]:
            assert "exception.stacktrace" in e["attributes"]
            del e["attributes"]["exception.stacktrace"]
    assert [d["name"] for d in stored] == ["parent", "child"]
    assert stored == expected


def test_files_rotate_and_the_oldest_go_so_the_store_stays_bounded(tmp_path: Path) -> None:
    store = TraceStore(tmp_path, file_bytes=8_192, files=3)
    tracer = provider_into(store).get_tracer("k2d")
    for i in range(200):
        with tracer.start_as_current_span(f"span-{i}", attributes={"pad": "x" * 200}):
            pass
    files = store.files()
    assert len(files) == 3
    numbers = [int(p.name[7:15]) for p in files]
    assert numbers[0] > 1  # rotated more than `files` times: the first ones are gone
    assert numbers == list(range(numbers[0], numbers[0] + 3))
    assert all(p.stat().st_size <= 8_192 for p in files)
    assert sum(p.stat().st_size for p in files) <= 3 * 8_192
    names = [s["name"] for s in store.spans()]
    assert names[-1] == "span-199"
    assert "span-0" not in names  # rotated away with the oldest file
    assert [s["name"] for s in store.recent(3)] == ["span-199", "span-198", "span-197"]


def test_a_restart_goes_on_in_the_newest_file_past_a_torn_line(tmp_path: Path) -> None:
    first = TraceStore(tmp_path, file_bytes=1 << 20, files=2)
    tracer = provider_into(first).get_tracer("k2d")
    with tracer.start_as_current_span("before-crash"):
        pass
    first.close()
    path = tmp_path / "traces-00000001.jsonl"
    with path.open("ab") as f:
        f.write(b'{"resourceSpans":[{"resource":')  # the process died mid-line

    second = TraceStore(tmp_path, file_bytes=1 << 20, files=2)
    tracer = provider_into(second).get_tracer("k2d")
    with tracer.start_as_current_span("after-restart"):
        pass
    assert second.files() == [path]
    assert [s["name"] for s in second.spans()] == ["before-crash", "after-restart"]
    assert [s["name"] for s in second.recent(5)] == ["after-restart", "before-crash"]


def test_find_returns_spans_by_id_and_their_children(tmp_path: Path) -> None:
    store = TraceStore(tmp_path, file_bytes=4_096, files=10)
    tracer = provider_into(store).get_tracer("k2d")
    with (
        tracer.start_as_current_span("wanted") as wanted,
        tracer.start_as_current_span("its-child"),
    ):
        pass
    for i in range(50):
        with tracer.start_as_current_span(f"noise-{i}"):
            pass
    span_id = format(wanted.get_span_context().span_id, "016x")
    found, children = store.find({span_id, "0" * 16})
    assert list(found) == [span_id]
    assert found[span_id]["name"] == "wanted"
    assert [c["name"] for c in children[span_id]] == ["its-child"]


def test_readers_of_a_missing_or_empty_store_find_nothing(tmp_path: Path) -> None:
    store = TraceStore(tmp_path / "nothing-yet", file_bytes=4_096, files=2)
    assert store.files() == []
    assert store.recent(10) == []
    assert store.trace("0" * 32) == []
    assert request_spans(b"not json") == []


def test_a_write_cut_short_by_a_full_disk_does_not_spoil_the_next_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = TraceStore(tmp_path, file_bytes=1 << 20, files=2)
    tracer = provider_into(store).get_tracer("k2d")
    real_write = os.write
    calls = {"n": 0}

    def half_then_enospc(fd: int, data: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 2:  # the second line: half of it lands, then the disk is full
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(trace_store.os, "write", half_then_enospc)
    for name in ("first", "lost-to-enospc", "after-space-returned"):
        with tracer.start_as_current_span(name):
            pass
    assert [s["name"] for s in store.spans()] == ["first", "after-space-returned"]


def _through_protobuf(spans: Any) -> bytes:
    """The line as the OTLP exporter's message and protobuf's JSON mapping give it, ids in
    hex: what encode_request wrote before it built the line straight from the spans."""
    doc = MessageToDict(encode_spans(spans), use_integers_for_enums=True)
    for resource in doc.get("resourceSpans", ()):
        for scope in resource.get("scopeSpans", ()):
            for span in scope.get("spans", ()):
                for obj in (span, *span.get("links", ())):
                    for key in ("traceId", "spanId", "parentSpanId"):
                        if obj.get(key):
                            obj[key] = base64.b64decode(obj[key]).hex()
    return msgspec.json.encode(doc) + b"\n"


def test_lines_are_the_bytes_protobufs_json_mapping_makes() -> None:
    spans: list[Any] = []
    for resource in (
        Resource.create({"service.name": "k2d-test", "n": 3}),
        Resource({"empty": ""}, schema_url="https://opentelemetry.io/schemas/1.21.0"),
    ):
        memory = InMemorySpanExporter()
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(SimpleSpanProcessor(memory))
        for tracer in (
            provider.get_tracer("k2d", "0.1.0"),
            provider.get_tracer("other", schema_url="https://example.test/s", attributes={"a": 1}),
        ):
            remote = SpanContext(
                0xABC,
                0xDEF,
                is_remote=True,
                trace_flags=TraceFlags(1),
                trace_state=TraceState([("k2d", "x"), ("v", "1")]),
            )
            parent = trace_api.set_span_in_context(NonRecordingSpan(remote))
            with tracer.start_as_current_span("root", context=parent) as root:
                with tracer.start_as_current_span(
                    "child",
                    kind=SpanKind.PRODUCER,
                    attributes={
                        "s": "x",
                        "empty": "",
                        "i": -7,
                        "zero": 0,
                        "big": 2**63 - 1,
                        "huge": 2**64,
                        "f": 0.25,
                        "whole": 2.0,
                        "nan": float("nan"),
                        "inf": float("inf"),
                        "ninf": float("-inf"),
                        "t": True,
                        "no": False,
                        "strs": ["a", ""],
                        "ints": [1, 0],
                        "floats": [1.5],
                        "bools": [False],
                        "none_yet": [],
                    },
                    links=[
                        Link(root.get_span_context(), {"rows": 3}),
                        Link(remote),
                    ],
                ) as child:
                    child.add_event("seen", {"n": 1, "ok": True})
                    child.add_event("bare")
                    child.set_status(Status(StatusCode.OK))
                root.set_status(Status(StatusCode.ERROR, "boom"))
            with tracer.start_as_current_span("", kind=SpanKind.CONSUMER):
                pass
        spans.extend(memory.get_finished_spans())

    assert len(spans) == 12
    assert trace_store.encode_request(spans) == _through_protobuf(spans)
    for one in spans:
        assert trace_store.encode_request([one]) == _through_protobuf([one])
    assert trace_store.encode_request([]) == _through_protobuf([]) == b"{}\n"
