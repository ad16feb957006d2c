"""JSON logs: one object per line on stdout, journald-friendly, with the current trace id."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec
from opentelemetry import trace

__all__ = ["JsonFormatter", "setup_logging"]

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName"}
)
# uvicorn adds an ANSI-coloured copy of its message; it is noise in JSON.
_DROPPED_EXTRAS = frozenset({"color_message"})
_encoder = msgspec.json.Encoder(enc_hook=repr)


class JsonFormatter(logging.Formatter):
    """ts, level, logger, msg, trace_id/span_id inside a span, exc on errors, then extras."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="microseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            doc["trace_id"] = format(ctx.trace_id, "032x")
            doc["span_id"] = format(ctx.span_id, "016x")
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in _DROPPED_EXTRAS and key not in doc:
                doc[key] = value
        try:
            return _encoder.encode(doc).decode()
        except (TypeError, ValueError, msgspec.EncodeError):
            # e.g. non-string dict keys in an extra: fall back to repr, never lose the line.
            return _encoder.encode({k: _plain(v) for k, v in doc.items()}).decode()


def _plain(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool | None) else repr(value)


class _JsonHandler(logging.StreamHandler[TextIO]):
    """Marks the handler setup_logging owns, so a second call replaces it."""


def setup_logging(level: str) -> None:
    """Route the root logger to stdout as JSON lines at `level`; calling again replaces it."""
    levels = logging.getLevelNamesMapping()
    name = level.upper()
    if name not in levels:
        raise ValueError(f"unknown log level {level!r}")
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _JsonHandler)]:
        root.removeHandler(handler)
        handler.close()
    handler = _JsonHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(levels[name])
