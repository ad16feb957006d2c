"""Real processes: the venue simulator and the daemon, on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from k2d.config import StorageConfig
from k2d.storage import Warehouse

_LISTENING = re.compile(r"listening on ws://[\d.]+:(\d+)")


@dataclass
class SimProcess:
    proc: subprocess.Popen[str]
    port: int
    manifest_path: Path

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> dict[str, Any]:
        """Planned stop (final trades, serverShutdown); returns the manifest."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        return self.manifest()

    def close_market(self) -> dict[str, Any]:
        """Stop trading (final trades, serverShutdown) but keep REST history answering."""
        assert self.proc.stdout is not None
        self.proc.send_signal(signal.SIGUSR1)
        while line := self.proc.stdout.readline():
            if "market closed" in line:
                break
        return self.manifest()

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text())  # type: ignore[no-any-return]


def start_simulator(tmp: Path, *args: str) -> SimProcess:
    manifest = tmp / "manifest.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "k2d",
            "simulate",
            "--port",
            "0",
            "--manifest",
            str(manifest),
            *args,
        ],
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    assert proc.stdout is not None
    for _ in range(50):
        line = proc.stdout.readline()
        m = _LISTENING.search(line)
        if m:
            return SimProcess(proc, int(m.group(1)), manifest)
        if not line:
            break
    proc.kill()
    raise RuntimeError("simulator did not start")


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[Any]:
    started: list[SimProcess] = []

    def start(*args: str) -> SimProcess:
        sim = start_simulator(tmp_path, *args)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        if sim.proc.poll() is None:
            sim.proc.kill()
            sim.proc.wait()


def write_config(
    path: Path,
    data_dir: Path,
    sim: SimProcess,
    symbols: list[str],
    extra: str = "",
    api_port: int = 0,
) -> Path:
    path.write_text(
        f"""
[storage]
data_dir = "{data_dir}"
[api]
port = {api_port}
[feeds.binance]
ws_url = "{sim.ws_url}"
rest_url = "{sim.rest_url}"
symbols = {json.dumps(symbols)}
{extra}
"""
    )
    return path


def daemon(
    config: Path, *args: str, env: dict[str, str] | None = None, stdout: Any = subprocess.PIPE
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "k2d", "run", "--config", str(config), *args],
        stdout=stdout,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )


def read_table(data_dir: Path, name: str) -> pa.Table:
    with Warehouse(StorageConfig(data_dir=str(data_dir))) as wh:
        return wh.load_table(name).scan().to_arrow()


def open_gap_ids(events: pa.Table, symbol: str) -> set[int]:
    """Latest row per event_id decides; collect the ids of gaps still open."""
    latest: dict[str, dict[str, Any]] = {}
    rows = events.sort_by([("recorded_at", "ascending")]).to_pylist()
    for row in rows:
        if row["kind"] == "gap" and row["symbol"] == symbol and row["stream"] == "trade":
            latest[row["event_id"]] = row
    ids: set[int] = set()
    for row in latest.values():
        if row["status"] == "open":
            ids.update(range(row["first_missing"], row["last_missing"] + 1))
    return ids
