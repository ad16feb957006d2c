"""Whether any bootstrap broker accepts a TCP connection.

aiokafka's clients retry their metadata requests without pause while no broker answers
(a core spinning for as long as the broker is away), so k2d stops its clients when the
broker goes away and asks this plain question, once a second, before making new ones.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import anyio

__all__ = ["close_client", "reachable"]

log = logging.getLogger(__name__)


# One connection attempt is given this long, seconds.
_CONNECT_WITHIN = 1.0


async def reachable(bootstrap_servers: str) -> bool:
    for server in bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        if not host or not port.isdigit():
            continue
        try:
            with anyio.fail_after(_CONNECT_WITHIN):
                stream = await anyio.connect_tcp(host.strip("[]"), int(port))
        except (OSError, TimeoutError):
            continue
        await stream.aclose()
        return True
    return False


# Clients being closed in the background (a reference keeps each task alive).
_closing: set[asyncio.Task[None]] = set()


async def close_client(stop: Callable[[], Awaitable[None]], within: float) -> bool:
    """Close a client, waiting at most `within` seconds; True if it closed in time.

    The close runs in a task of its own and is never cancelled: with no broker, aiokafka's
    close waits on retries, and cancelling it mid-way lets its CancelledError escape into
    the caller's task group. A close that takes longer finishes (or not) in the background.
    """
    task = asyncio.ensure_future(stop())
    _closing.add(task)
    task.add_done_callback(_closed)
    done, _ = await asyncio.wait({task}, timeout=within)
    return bool(done)


def _closed(task: asyncio.Task[None]) -> None:
    _closing.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.warning("kafka: a client failed while closing: %s", task.exception())
