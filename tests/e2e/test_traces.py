"""Traces outlive the daemon: the spans of a `k2d run` are read back by `/v1/traces` in the
next run and by `k2d traces list/show/slow` once both stopped, and one `show` goes from the
feed's receive of a batch to the commit that stored it, through the links."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.e2e.accounting import get_json, wait_ready
from tests.e2e.conftest import daemon, write_config
from tests.e2e.test_faults import free_port

SYMBOLS = ["BTCUSDT", "ETHUSDT"]
CONFIG = """
[writer]
flush_interval = 0.5
"""
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
LINE = re.compile(r"^([0-9a-f]{32})  ")


def k2d(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "k2d", *args], capture_output=True, text=True, timeout=60
    )


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    return out


def test_spans_of_a_run_are_read_back_after_a_restart(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--symbols", ",".join(SYMBOLS), "--rate", "500", "--seed", "21")
    data = tmp_path / "data"
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", data, sim, SYMBOLS, CONFIG, api_port=port)

    # Run 1 captures, and serves one request that carries a W3C traceparent.
    first = daemon(cfg)
    try:
        wait_ready(port)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/stats",
            headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
        )
        with urllib.request.urlopen(request, timeout=5) as r:
            assert r.status == 200
        time.sleep(4)
    finally:
        stop(first)

    # Run 2 captures nothing (feeds off); its /v1/traces still has run 1's spans.
    second = daemon(cfg, env={"K2D_FEEDS__BINANCE__ENABLED": "false"})
    try:
        wait_ready(port)
        body = get_json(port, "/v1/traces?limit=2048")
    finally:
        stop(second)
    assert body["meta"]["source"] == "store"
    spans = body["data"]
    assert len({s["resource"]["service.instance.id"] for s in spans}) == 2  # both runs
    assert [s["end_ns"] for s in spans] == sorted((s["end_ns"] for s in spans), reverse=True)
    [http_span] = [s for s in spans if s["trace_id"] == TRACE_ID]
    assert http_span["name"] == "http GET /v1/stats"
    assert http_span["parent"] == PARENT_ID
    assert http_span["kind"] == "server"
    attrs = http_span["attributes"]
    assert attrs["http.request.method"] == "GET"
    assert attrs["http.route"] == "/v1/stats"
    assert attrs["http.response.status_code"] == 200
    assert attrs["url.path"] == "/v1/stats"
    assert attrs["server.port"] == port
    assert {"writer.commit", "sequence.check", "feed.receive", "journal.append"} <= {
        s["name"] for s in spans
    }

    # Both runs stopped: the CLI reads the store.
    listed = k2d("traces", "list", "--config", str(cfg), "--limit", "5000")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines and all(LINE.match(line) for line in lines), lines[:5]
    runs = {re.search(r" run (\w+) ", line).group(1) for line in lines}  # type: ignore[union-attr]
    assert len(runs) == 2
    assert any(line.startswith(TRACE_ID) for line in lines)
    commits = [line for line in lines if "writer.commit  table=trades" in line]
    assert commits, lines[:20]
    commit_trace = LINE.match(commits[-1]).group(1)  # type: ignore[union-attr]

    shown = k2d("traces", "show", commit_trace, "--config", str(cfg), "--links", "2")
    assert shown.returncode == 0, shown.stderr
    view = shown.stdout
    assert view.startswith(f"trace {commit_trace}")
    commit_line = next(line for line in view.splitlines() if "writer.commit" in line)
    links = int(re.search(r"\[(\d+) links?\]", commit_line).group(1))  # type: ignore[union-attr]
    assert links >= 1
    assert "table=trades" in commit_line and " ms" in commit_line
    # socket -> journal -> tracker -> commit, in one view
    assert view.count("link sequence.check") == min(links, 2)
    assert "link feed.receive" in view
    assert "journal.append" in view and "k2d.journal.frames=" in view
    if links > 2:
        assert f"... {links - 2} more links" in view

    http_view = k2d("traces", "show", TRACE_ID, "--config", str(cfg))
    assert http_view.returncode == 0, http_view.stderr
    assert "http GET /v1/stats" in http_view.stdout
    assert "http.route=/v1/stats" in http_view.stdout

    slow = k2d("traces", "slow", "--config", str(cfg), "--limit", "5")
    assert slow.returncode == 0, slow.stderr
    durations = [_ms(line) for line in slow.stdout.splitlines()]
    assert len(durations) == 5 and durations == sorted(durations, reverse=True)
    assert all(LINE.match(line) for line in slow.stdout.splitlines())

    missing = k2d("traces", "show", "f" * 32, "--config", str(cfg))
    assert missing.returncode == 1 and "not in" in missing.stderr
    files = sorted((data / "traces").glob("traces-*.jsonl"))
    assert files
    first_line = files[0].read_bytes().splitlines()[0]
    assert "resourceSpans" in json.loads(first_line)


def _ms(line: str) -> float:
    m = re.search(r"  ([\d.]+) (ms|s)  ", line)
    assert m, line
    return float(m.group(1)) * (1_000 if m.group(2) == "s" else 1)
