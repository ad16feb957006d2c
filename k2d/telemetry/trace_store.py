"""The trace store: finished spans kept on disk as OTLP JSON lines, so the spans of earlier
runs can still be read (`k2d traces`, `/v1/traces`) after the process that made them died.

Files `traces-NNNNNNNN.jsonl` in one directory (data_dir/traces by default). Each line is
one ExportTraceServiceRequest in the OTLP/JSON encoding (camelCase names, enums as
integers, trace and span ids in lower-case hex), the format an OpenTelemetry Collector's
file exporter writes and its file receivers read. A file rotates once the next line would
take it past `file_bytes`; the oldest files go once there are more than `files`, so the
store holds at most about files x file_bytes. Writers append whole lines, each one
unbuffered O_APPEND write: the daemon from its exporter thread, and `k2d compact` for its one
round, also while the daemon runs (lines of the two interleave, never mix; a file may run a
few lines past file_bytes). Readers skip a line cut short by a crash or still being written.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext
    from opentelemetry.util.types import Attributes

__all__ = [
    "TraceStore",
    "TraceStoreExporter",
    "encode_request",
    "request_spans",
]

log = logging.getLogger(__name__)

_FILE = re.compile(r"^traces-(\d{8})\.jsonl$")
_BLOCK = 1 << 16
# A span's own id, its parent's, or a link's: which lines a look-up by span id must decode.
_SPAN_ID = re.compile(rb'"(?:spanId|parentSpanId)":"([0-9a-f]{16})"')
_KINDS = ("unspecified", "internal", "server", "client", "producer", "consumer")
_STATUS = ("unset", "ok", "error")


class TraceStore:
    """A directory of rotating OTLP JSON-lines files: `append` for the one writer, the rest
    for readers (any process)."""

    def __init__(self, directory: Path | str, *, file_bytes: int, files: int) -> None:
        if file_bytes < 1 or files < 1:
            raise ValueError("file_bytes and files must be >= 1")
        self.directory = Path(directory)
        self.file_bytes = file_bytes
        self.max_files = files
        self._lock = threading.Lock()
        self._fd = -1
        self._number = 0
        self._size = 0
        self._torn = False  # a write failed part-way: end that line before the next

    # Writing

    def append(self, line: bytes) -> None:
        """Append one line (one request); rotate and prune first if it would not fit."""
        if not line.endswith(b"\n"):
            line += b"\n"
        with self._lock:
            if self._fd < 0:
                self._open()
            if self._size and self._size + len(line) > self.file_bytes:
                self._rotate()
            if self._torn:
                line = b"\n" + line
            view = memoryview(line)
            self._torn = True
            while view:
                written = os.write(self._fd, view)
                self._size += written
                view = view[written:]
            self._torn = False

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _open(self) -> None:
        """Go on with the newest file if it has room (a restart keeps its runs' traces
        together), else start the next one."""
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = self.numbered()
        if existing and existing[-1][1].stat().st_size < self.file_bytes:
            self._number, path = existing[-1]
        else:
            self._number = existing[-1][0] + 1 if existing else 1
            path = self._path(self._number)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self._size = os.fstat(self._fd).st_size
        if self._size and not _ends_with_newline(path):
            # A line cut short by a crash: end it, or the next line would be glued to it.
            os.write(self._fd, b"\n")
            self._size += 1
        self._prune()

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = -1
        self._number += 1
        path = self._path(self._number)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self._size = os.fstat(self._fd).st_size
        self._torn = False
        self._prune()

    def _prune(self) -> None:
        existing = self.numbered()
        for _, path in existing[: max(0, len(existing) - self.max_files)]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _path(self, number: int) -> Path:
        return self.directory / f"traces-{number:08d}.jsonl"

    # Reading

    def numbered(self) -> list[tuple[int, Path]]:
        """(number, path) of the store's files, oldest first."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            m = _FILE.match(name)
            if m:
                found.append((int(m.group(1)), self.directory / name))
        return sorted(found)

    def files(self) -> list[Path]:
        return [path for _, path in self.numbered()]

    def lines(self, *, newest_first: bool = False) -> Iterator[bytes]:
        """Every line (one request each), in write order or newest first."""
        paths = self.files()
        if newest_first:
            for path in reversed(paths):
                yield from _lines_backward(path)
        else:
            for path in paths:
                with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
                    yield from (line for line in f if line.strip())

    def spans(
        self, *, newest_first: bool = False, span_ids: set[str] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Every stored span as a dict (the shape of tracing.span_to_dict, with stack traces
        kept); with `span_ids`, only lines that mention one of them are decoded."""
        for line in self.lines(newest_first=newest_first):
            if span_ids is not None and not span_ids.intersection(
                m.decode() for m in _SPAN_ID.findall(line)
            ):
                continue
            spans = request_spans(line)
            yield from reversed(spans) if newest_first else spans

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        """Every stored span of one trace, by start time."""
        needle = trace_id.lower().encode()
        found: dict[str, dict[str, Any]] = {}
        for line in self.lines():
            if needle in line:
                for span in request_spans(line):
                    if span["trace_id"] == trace_id:
                        found[span["span_id"]] = span
        return sorted(found.values(), key=lambda s: s["start_ns"])

    def find(
        self, span_ids: Iterable[str]
    ) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
        """Stored spans by span id (for the ids found), and the children of each, by the
        parent's id: one pass over the store."""
        wanted = set(span_ids)
        found: dict[str, dict[str, Any]] = {}
        children: dict[str, dict[str, dict[str, Any]]] = {}
        if not wanted:
            return found, {}
        for span in self.spans(span_ids=wanted):
            if span["span_id"] in wanted:
                found[span["span_id"]] = span
            if span["parent"] in wanted:
                children.setdefault(span["parent"], {})[span["span_id"]] = span
        ordered = {
            parent: sorted(kids.values(), key=lambda s: s["start_ns"])
            for parent, kids in children.items()
        }
        return found, ordered

    def recent(self, limit: int, *, hide: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
        """The `limit` spans that ended last, newest first; `hide` names event attributes to
        leave out (stack traces, for the HTTP endpoint)."""
        out: list[dict[str, Any]] = []
        for line in self.lines(newest_first=True):
            out.extend(request_spans(line, hide=hide))
            if len(out) >= limit:
                # Lines are in export order; spans within one are sorted below.
                break
        out.sort(key=lambda s: s["end_ns"], reverse=True)
        return out[:limit]


class TraceStoreExporter(SpanExporter):
    """Writes each batch of spans as one OTLP JSON line to a TraceStore."""

    def __init__(self, store: TraceStore) -> None:
        self.store = store

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            self.store.append(encode_request(spans))
        except OSError as exc:
            # Disk full or read-only: traces are the first thing to give up.
            log.debug("trace store %s: %s", self.store.directory, exc)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.store.close()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def encode_request(spans: Sequence[ReadableSpan]) -> bytes:
    """One ExportTraceServiceRequest in the OTLP/JSON encoding, as one line: what protobuf's
    JSON mapping makes of the OTLP exporter's message (fields in field-number order, those
    at their default left out, 64-bit integers as strings), with ids in hex. Built straight
    from the spans: through the protobuf message it cost about 60 us a span, on the thread
    that shares the GIL with the event loop (tests/unit/test_trace_store.py holds the two
    to the same bytes)."""
    groups: dict[Resource, dict[InstrumentationScope | None, list[dict[str, Any]]]] = {}
    for span in spans:
        scope = span.instrumentation_scope or None
        groups.setdefault(span.resource, {}).setdefault(scope, []).append(_span(span))
    resource_spans = []
    for resource, scopes in groups.items():
        scope_spans = []
        for scope, encoded in scopes.items():
            entry: dict[str, Any] = {"scope": _scope(scope), "spans": encoded}
            if scope is not None and scope.schema_url:
                entry["schemaUrl"] = scope.schema_url
            scope_spans.append(entry)
        encoded_resource: dict[str, Any] = {}
        _put_attributes(encoded_resource, resource.attributes, 0)
        doc: dict[str, Any] = {"resource": encoded_resource, "scopeSpans": scope_spans}
        if resource.schema_url:
            doc["schemaUrl"] = resource.schema_url
        resource_spans.append(doc)
    request = {"resourceSpans": resource_spans} if resource_spans else {}
    return msgspec.json.encode(request) + b"\n"


def _span(span: ReadableSpan) -> dict[str, Any]:
    ctx = span.get_span_context()
    assert ctx is not None, "a finished SDK span has a context"
    out: dict[str, Any] = {"traceId": f"{ctx.trace_id:032x}", "spanId": f"{ctx.span_id:016x}"}
    if ctx.trace_state:
        out["traceState"] = ",".join(f"{k}={v}" for k, v in ctx.trace_state.items())
    parent = span.parent
    if parent is not None:
        out["parentSpanId"] = f"{parent.span_id:016x}"
    if span.name:
        out["name"] = span.name
    out["kind"] = span.kind.value + 1  # SpanKind.INTERNAL is 0 in the SDK, 1 in OTLP
    if span.start_time:
        out["startTimeUnixNano"] = str(span.start_time)
    if span.end_time:
        out["endTimeUnixNano"] = str(span.end_time)
    _put_attributes(out, span.attributes, span.dropped_attributes)
    if span.events:
        events = []
        for event in span.events:
            e: dict[str, Any] = {}
            if event.timestamp:
                e["timeUnixNano"] = str(event.timestamp)
            if event.name:
                e["name"] = event.name
            _put_attributes(e, event.attributes, event.dropped_attributes)
            events.append(e)
        out["events"] = events
    if span.dropped_events:
        out["droppedEventsCount"] = span.dropped_events
    if span.links:
        links = []
        for link in span.links:
            lk: dict[str, Any] = {
                "traceId": f"{link.context.trace_id:032x}",
                "spanId": f"{link.context.span_id:016x}",
            }
            _put_attributes(lk, link.attributes, link.dropped_attributes)
            lk["flags"] = _flags(link.context)
            links.append(lk)
        out["links"] = links
    if span.dropped_links:
        out["droppedLinksCount"] = span.dropped_links
    status: dict[str, Any] = {}
    if span.status.description:
        status["message"] = span.status.description
    if span.status.status_code.value:
        status["code"] = span.status.status_code.value
    out["status"] = status
    out["flags"] = _flags(parent)
    return out


def _flags(parent: SpanContext | None) -> int:
    """SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE, and SPAN_FLAGS_CONTEXT_IS_REMOTE for a remote one."""
    return 0x300 if parent is not None and parent.is_remote else 0x100


def _scope(scope: InstrumentationScope | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if scope is None:
        return out
    if scope.name:
        out["name"] = scope.name
    if scope.version:
        out["version"] = scope.version
    _put_attributes(out, scope.attributes, 0)
    return out


def _put_attributes(out: dict[str, Any], attributes: Attributes, dropped: int) -> None:
    if attributes:
        encoded = []
        for key, value in attributes.items():
            try:
                encoded.append(_key_value(key, value))
            except ValueError:
                # As the OTLP exporter does: an attribute it cannot encode is left out.
                log.debug("span attribute %s not encodable: %r", key, value)
        if encoded:
            out["attributes"] = encoded
    if dropped:
        out["droppedAttributesCount"] = dropped


def _key_value(key: str, value: Any) -> dict[str, Any]:
    """A KeyValue; an empty key is a default, so left out."""
    kv: dict[str, Any] = {"key": key} if key else {}
    kv["value"] = _encode_value(value)
    return kv


def _encode_value(value: Any) -> dict[str, Any]:
    """An AnyValue; its oneof member is written even at its default (0, "", false)."""
    if value is None:
        return {}
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ValueError("out of int64 range")
        return {"intValue": str(value)}
    if isinstance(value, float):
        if value != value:
            return {"doubleValue": "NaN"}
        if value in (math.inf, -math.inf):
            return {"doubleValue": "Infinity" if value > 0 else "-Infinity"}
        return {"doubleValue": value}
    if isinstance(value, bytes):
        return {"bytesValue": base64.b64encode(value).decode()}
    if isinstance(value, Sequence):
        values = [_encode_value(v) for v in value]
        return {"arrayValue": {"values": values} if values else {}}
    if isinstance(value, Mapping):
        pairs = [_key_value(str(k), v) for k, v in value.items()]
        return {"kvlistValue": {"values": pairs} if pairs else {}}
    raise ValueError(f"invalid type {type(value).__name__}")


_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


class _KeyValue(msgspec.Struct):
    key: str
    value: dict[str, Any] = {}


class _Event(msgspec.Struct):
    timeUnixNano: int = 0
    name: str = ""
    attributes: list[_KeyValue] = []


class _Link(msgspec.Struct):
    traceId: str = ""
    spanId: str = ""
    attributes: list[_KeyValue] = []


class _Status(msgspec.Struct):
    code: int = 0
    message: str = ""


class _Span(msgspec.Struct):
    traceId: str = ""
    spanId: str = ""
    parentSpanId: str = ""
    name: str = ""
    kind: int = 0
    startTimeUnixNano: int = 0
    endTimeUnixNano: int = 0
    attributes: list[_KeyValue] = []
    events: list[_Event] = []
    links: list[_Link] = []
    status: _Status = msgspec.field(default_factory=_Status)


class _ScopeSpans(msgspec.Struct):
    spans: list[_Span] = []


class _Resource(msgspec.Struct):
    attributes: list[_KeyValue] = []


class _ResourceSpans(msgspec.Struct):
    resource: _Resource = msgspec.field(default_factory=_Resource)
    scopeSpans: list[_ScopeSpans] = []


class _Request(msgspec.Struct):
    resourceSpans: list[_ResourceSpans] = []


# strict=False: OTLP/JSON writes 64-bit integers as strings.
_decoder = msgspec.json.Decoder(_Request, strict=False)


def request_spans(line: bytes, *, hide: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """The spans of one stored line, in the order they were written; [] for a line that is
    not a whole request (cut short by a crash, or still being written)."""
    try:
        request = _decoder.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return []
    out = []
    for rs in request.resourceSpans:
        resource = _attributes(rs.resource.attributes)
        for ss in rs.scopeSpans:
            for s in ss.spans:
                out.append(_span_dict(s, resource, hide))
    return out


def _span_dict(s: _Span, resource: dict[str, Any], hide: frozenset[str]) -> dict[str, Any]:
    start, end = s.startTimeUnixNano, s.endTimeUnixNano
    return {
        "name": s.name,
        "kind": _KINDS[s.kind] if 0 <= s.kind < len(_KINDS) else "unspecified",
        "trace_id": s.traceId,
        "span_id": s.spanId,
        "parent": s.parentSpanId or None,
        "start_ns": start,
        "end_ns": end,
        "duration_ms": (end - start) / 1e6,
        "attributes": _attributes(s.attributes),
        "events": [
            {
                "name": e.name,
                "ts_ns": e.timeUnixNano,
                "attributes": _attributes(e.attributes, hide),
            }
            for e in s.events
        ],
        "links": [
            {
                "trace_id": link.traceId,
                "span_id": link.spanId,
                "attributes": _attributes(link.attributes),
            }
            for link in s.links
        ],
        "status": {
            "code": _STATUS[s.status.code] if 0 <= s.status.code < len(_STATUS) else "unset",
            "description": s.status.message or None,
        },
        "resource": resource,
    }


def _attributes(kvs: list[_KeyValue], hide: frozenset[str] = frozenset()) -> dict[str, Any]:
    return {kv.key: _any_value(kv.value) for kv in kvs if kv.key not in hide}


def _any_value(value: dict[str, Any]) -> Any:
    """An OTLP AnyValue as the plain value it carries."""
    if "stringValue" in value:
        return value["stringValue"]
    if "intValue" in value:
        return int(value["intValue"])
    if "doubleValue" in value:
        return float(value["doubleValue"])
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "arrayValue" in value:
        return [_any_value(v) for v in value["arrayValue"].get("values", ())]
    if "kvlistValue" in value:
        pairs = value["kvlistValue"].get("values", ())
        return {kv["key"]: _any_value(kv.get("value", {})) for kv in pairs}
    if "bytesValue" in value:
        return value["bytesValue"]
    return None


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _lines_backward(path: Path) -> Iterator[bytes]:
    """The non-empty lines of a file, last first, reading blocks from the end."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return
    with f:
        pos = f.seek(0, os.SEEK_END)
        tail = b""
        while pos > 0:
            n = min(_BLOCK, pos)
            pos -= n
            f.seek(pos)
            parts = (f.read(n) + tail).split(b"\n")
            tail = parts[0]
            for line in reversed(parts[1:]):
                if line.strip():
                    yield line
        if tail.strip():
            yield tail
