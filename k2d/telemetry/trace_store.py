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
import os
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

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
    """One ExportTraceServiceRequest in the OTLP/JSON encoding, as one line."""
    doc = MessageToDict(encode_spans(spans), use_integers_for_enums=True)
    # Protobuf's JSON mapping writes bytes as base64; OTLP/JSON wants ids in hex.
    for resource in doc.get("resourceSpans", ()):
        for scope in resource.get("scopeSpans", ()):
            for span in scope.get("spans", ()):
                _hex_ids(span)
                for link in span.get("links", ()):
                    _hex_ids(link)
    return msgspec.json.encode(doc) + b"\n"


def _hex_ids(obj: dict[str, Any]) -> None:
    for key in ("traceId", "spanId", "parentSpanId"):
        value = obj.get(key)
        if value:
            obj[key] = base64.b64decode(value).hex()


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
