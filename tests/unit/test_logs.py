"""k2d.telemetry.logs: one JSON object per stdout line, with trace ids inside a span."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from k2d.config import TelemetryConfig
from k2d.telemetry.logs import setup_logging
from k2d.telemetry.tracing import setup_tracing


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in root.handlers:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def _lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_a_record_is_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO")
    logging.getLogger("k2d.test").info("hello %s", "world", extra={"rows": 3, "table": "trades"})
    logging.getLogger("k2d.test").debug("below the level")
    [doc] = _lines(capsys)
    assert doc["msg"] == "hello world"
    assert doc["level"] == "INFO"
    assert doc["logger"] == "k2d.test"
    assert isinstance(doc["ts"], str)
    assert doc["ts"].endswith("Z")
    assert (doc["rows"], doc["table"]) == (3, "trades")
    assert "trace_id" not in doc


def test_inside_a_span_the_line_carries_its_ids(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO")
    tracing = setup_tracing(TelemetryConfig())
    with tracing.tracer.start_as_current_span("work") as span:
        logging.getLogger("k2d.test").warning("inside")
    ctx = span.get_span_context()
    [doc] = _lines(capsys)
    assert doc["trace_id"] == format(ctx.trace_id, "032x")
    assert doc["span_id"] == format(ctx.span_id, "016x")


def test_exception_is_one_string_field(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO")
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        logging.getLogger("k2d.test").exception("failed")
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # the multi-line traceback stays inside one line
    doc = json.loads(out)
    assert doc["level"] == "ERROR"
    assert isinstance(doc["exc"], str)
    assert doc["exc"].startswith("Traceback")
    assert "ValueError: bad" in doc["exc"]


def test_unencodable_extra_does_not_lose_the_line(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO")
    logging.getLogger("k2d.test").info("odd", extra={"obj": object(), "keys": {1: "a"}})
    [doc] = _lines(capsys)
    assert doc["msg"] == "odd"
    assert isinstance(doc["obj"], str)


def test_setup_twice_does_not_duplicate_lines(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO")
    setup_logging("warning")
    logging.getLogger("k2d.test").info("dropped at WARNING")
    logging.getLogger("k2d.test").error("once")
    assert [d["msg"] for d in _lines(capsys)] == ["once"]


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging("LOUD")
