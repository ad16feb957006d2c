"""`k2d run` with no feed: a box that serves queries over loaded history, and sees what
`k2d load` (another process) commits while it runs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import daemon
from tests.e2e.test_kill_loop import free_port
from tests.integration.test_batchload import FIXTURES

# Good rows in the fixtures (see tests/integration/test_batchload.py).
BHP_TRADES, BHP_QUOTES = 11, 6


def get(port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")
    except OSError:
        return 0, None


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("maintenance", [True, False], ids=["maintainer-on", "maintainer-off"])
def test_a_daemon_without_feeds_serves_loads_made_while_it_runs(
    tmp_path: Path, maintenance: bool
) -> None:
    port = free_port()
    config = tmp_path / "k2d.toml"
    config.write_text(
        f"""
[storage]
data_dir = "{tmp_path / "data"}"
[api]
port = {port}
[feeds.binance]
enabled = false
[query]
refresh_interval = 0.5
[maintenance]
enabled = {"true" if maintenance else "false"}
[shutdown]
drain_timeout = 20.0
"""
    )
    proc = daemon(config)
    try:
        wait_for(lambda: get(port, "/ready")[0] == 200, 60, "/ready")
        time.sleep(1.0)  # it stays up with nothing to ingest
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        status, body = get(port, "/v1/symbols")
        assert status == 200 and body["data"] == []

        load = subprocess.run(
            [
                sys.executable,
                "-m",
                "k2d",
                "load",
                "asx",
                "--config",
                str(config),
                "--quiet",
                "--trades",
                str(FIXTURES / "trades" / "7078.csv"),
                "--quotes",
                str(FIXTURES / "quotes" / "7078.csv"),
                "--company-info",
                str(FIXTURES / "company_info.csv"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert load.returncode == 0, load.stdout + load.stderr

        def loaded() -> bool:
            status, body = get(port, "/v1/symbols")
            return status == 200 and any(
                r["symbol"] == "BHP"
                and r["trade_count"] == BHP_TRADES
                and r["quote_count"] == BHP_QUOTES
                for r in body["data"]
            )

        wait_for(loaded, 30, "the loaded rows in /v1/symbols")
        assert proc.poll() is None

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out[-3000:]
        assert time.monotonic() - started < 15, "the drain waited for something that never ends"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
