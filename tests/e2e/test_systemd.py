"""The systemd notify protocol, through a NOTIFY_SOCKET the test opens: READY=1 only once
/ready says ready, STATUS lines, WATCHDOG=1 pings that stop while the event loop is wedged,
STOPPING=1 at the drain."""

from __future__ import annotations

import itertools
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from tests.e2e.accounting import get_json
from tests.e2e.conftest import daemon, write_config
from tests.e2e.test_faults import free_port


class NotifySocket:
    """A datagram socket like systemd's: records (monotonic time, lines) per message."""

    def __init__(self, path: Path, on_ready: Any) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, list[str]]] = []
        self.on_ready = on_ready
        self.ready_answer: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            lines = data.decode().split("\n")
            if "READY=1" in lines and self.ready_answer is None:
                self.ready_answer = self.on_ready()
            self.messages.append((time.monotonic(), lines))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def times_of(self, line: str) -> list[float]:
        return [t for t, lines in self.messages if line in lines]


def test_ready_status_watchdog_and_stopping(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--symbols", "BTCUSDT", "--rate", "500", "--seed", "3")
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", tmp_path / "data", sim, ["BTCUSDT"], api_port=port)
    notify = NotifySocket(tmp_path / "notify.sock", lambda: get_json(port, "/ready"))
    env = {
        "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
        "WATCHDOG_USEC": "2000000",  # a ping at least every 2 s: we send every 1 s
        # About 4 s after the feed starts, block the event loop for 10 s.
        "K2D_FAILPOINTS": "tracker.process=80:block",
    }
    proc = daemon(cfg, env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not notify.times_of("READY=1"):
            time.sleep(0.1)
        assert notify.times_of("READY=1"), "no READY=1"
        assert notify.ready_answer["status"] == "ready", "READY=1 before /ready said ready"
        time.sleep(20)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()
    assert proc.returncode == 0, out[-3000:]
    assert "failpoint tracker.process fires" in out
    pings = notify.times_of("WATCHDOG=1")
    assert len(pings) >= 5
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) >= 8, "pings went on while the event loop was blocked"
    assert sorted(gaps)[len(gaps) // 2] <= 1.5, "pings are not sent every second"
    assert any(b > pings[gaps.index(max(gaps))] for b in pings), "pings never resumed"
    statuses = [
        line for _, lines in notify.messages for line in lines if line.startswith("STATUS=")
    ]
    assert any("rows/s committed" in s and "gaps open" in s for s in statuses)
    assert notify.times_of("STOPPING=1"), "no STOPPING=1 at the drain"
