"""The systemd notify protocol: READY=1, STATUS=, STOPPING=1, WATCHDOG=1 over $NOTIFY_SOCKET.

The protocol is one datagram of newline-separated KEY=VALUE lines to the AF_UNIX socket
named by NOTIFY_SOCKET (a leading "@" means the abstract namespace). A dozen lines, tested
against a socket the test opens (tests/unit/test_systemd.py), rather than a dependency.
Outside systemd (no NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["Notifier"]

log = logging.getLogger(__name__)


class Notifier:
    """Sends state changes to the service manager, if there is one listening."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())
        # systemd asks for a ping at least every WATCHDOG_USEC; ping twice as often.
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and ours else None

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def send(self, *lines: str) -> bool:
        """Send `lines` (e.g. "READY=1", "STATUS=...") as one datagram; False if not sent."""
        if not self._address:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            log.warning("systemd notify failed: %s", exc)
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
