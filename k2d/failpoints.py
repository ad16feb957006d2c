"""Failpoints: named places where a test makes a real `k2d run` fail on purpose.

Set `K2D_FAILPOINTS` to a comma-separated list of `name=N:action`: the Nth time the code
passes `name` (counted from 1 in this process), `action` happens there:

    raise    RuntimeError, as a bug would
    enospc   OSError(ENOSPC), as a full disk would
    erofs    OSError(EROFS), as a filesystem turned read-only would
    eio      OSError(EIO), as a failing disk would
    block    sleep 10 s where it is hit: on the event loop, a wedged loop

e.g. `K2D_FAILPOINTS="writer.commit.trades=3:raise,tracker.process=40:raise"`; `name=*N:action`
fires at every Nth pass instead of once (a soak run's recurring fault). The names are the
`hit()` calls in the code: writer.commit.<table>, tracker.process, backfill.page,
journal.write. Unset (the production case), `hit` is one dictionary lookup that finds
nothing.
"""

from __future__ import annotations

import errno
import logging
import os
import time

__all__ = ["ENV", "FailpointError", "hit", "load"]

log = logging.getLogger(__name__)

ENV = "K2D_FAILPOINTS"
_ACTIONS = ("raise", "enospc", "erofs", "eio", "block")
_BLOCK_SECONDS = 10.0


class FailpointError(RuntimeError):
    """The failure a `raise` failpoint injects."""


# name -> (N, every Nth pass rather than once, action)
_points: dict[str, tuple[int, bool, str]] = {}
_counts: dict[str, int] = {}


def load(spec: str | None = None) -> dict[str, tuple[int, bool, str]]:
    """Read the failpoints from `spec` (default: the environment); ValueError names a bad one."""
    text = os.environ.get(ENV, "") if spec is None else spec
    points: dict[str, tuple[int, bool, str]] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, _, rest = item.partition("=")
        n, _, action = rest.partition(":")
        every = n.startswith("*")
        n = n.removeprefix("*")
        if not name or not n.isdigit() or int(n) < 1 or action not in _ACTIONS:
            raise ValueError(
                f"{ENV}: {item!r} is not name=N:action or name=*N:action "
                f"(N >= 1, action one of {_ACTIONS})"
            )
        points[name] = (int(n), every, action)
    _points.clear()
    _points.update(points)
    _counts.clear()
    if points:
        log.warning("failpoints armed: %s", text)
    return points


def hit(name: str) -> None:
    """Pass the failpoint `name`: fail here if it is armed for this pass."""
    if not _points:
        return
    armed = _points.get(name)
    if armed is None:
        return
    count = _counts[name] = _counts.get(name, 0) + 1
    n, every, action = armed
    if (count % n if every else count - n) != 0:
        return
    log.warning("failpoint %s fires (pass %d): %s", name, count, action)
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (failpoint {name})")
    if action == "block":
        time.sleep(_BLOCK_SECONDS)
        return
    if action == "erofs":
        raise OSError(errno.EROFS, f"Read-only file system (failpoint {name})")
    if action == "eio":
        raise OSError(errno.EIO, f"Input/output error (failpoint {name})")
    raise FailpointError(f"failpoint {name}")


try:
    load()
except ValueError as bad:
    log.error("%s", bad)
