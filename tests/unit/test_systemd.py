"""The notify protocol's wire format, against a socket the test binds (path and abstract)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from k2d.systemd import Notifier


def test_lines_go_out_as_one_datagram(tmp_path: Path) -> None:
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        n = Notifier({"NOTIFY_SOCKET": str(path)})
        assert n.send("READY=1", "STATUS=up")
        assert server.recv(100) == b"READY=1\nSTATUS=up"
        n.close()


def test_an_abstract_socket_name_starts_with_at() -> None:
    name = f"k2d-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.send("WATCHDOG=1")
        assert server.recv(100) == b"WATCHDOG=1"
        n.close()


def test_outside_systemd_nothing_is_sent_and_the_watchdog_is_off() -> None:
    n = Notifier({})
    assert not n.enabled and not n.send("READY=1")
    assert n.watchdog_interval is None


def test_the_watchdog_interval_is_half_of_what_systemd_asks() -> None:
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0
    other = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}
    assert Notifier(other).watchdog_interval is None, "the watchdog is meant for another pid"
