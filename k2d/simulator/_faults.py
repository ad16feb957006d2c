"""Fault injection settings for the simulated venue, parsed from `--faults` text."""

from __future__ import annotations

import math
from dataclasses import dataclass

_PROBABILITIES = (
    "drop",
    "dup",
    "reorder",
    "malformed",
    "reset",
    "huge_id",
    "id_jump",
    "bad_history",
)
_NAMES = (*_PROBABILITIES, "disconnect_every", "shutdown_after", "rest_ban")

# What each fault does, for `--faults` help and error messages.
FAULTS_HELP = (
    "comma-separated NAME=VALUE; per trade (probability P): drop=P leaves it off the wire "
    "(it stays in REST history), dup=P sends it twice, reorder=P sends it after the next one, "
    "malformed=P adds a junk frame, reset=P aborts every connection, huge_id=P adds a trade "
    "frame with id 2^64-1, id_jump=P adds a trade frame whose id is 1,000,000 ahead, "
    "bad_history=P serves its REST history row bad (non-numeric, zero or 11-digit price, "
    "negative or year-10000 time, id 2^64-1); disconnect_every=S closes every connection "
    "with serverShutdown every S seconds, shutdown_after=S does so S seconds after each new "
    "connection opens (0: before any market data), rest_ban=S answers each IP's first REST "
    "request 418 with Retry-After S. E.g. drop=0.001,dup=0.001,malformed=0.001"
)


@dataclass(frozen=True)
class Faults:
    """Per trade frame fault probabilities, plus periods for planned disconnects and bans."""

    drop: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    malformed: float = 0.0
    reset: float = 0.0
    disconnect_every: float | None = None
    huge_id: float = 0.0
    id_jump: float = 0.0
    bad_history: float = 0.0
    shutdown_after: float | None = None
    rest_ban: float | None = None

    def __post_init__(self) -> None:
        for name in _PROBABILITIES:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:  # also rejects NaN
                raise ValueError(f"fault {name}={value!r}: a probability must be in [0, 1]")
        for name in ("disconnect_every", "rest_ban"):
            period = getattr(self, name)
            if period is not None and not (period > 0 and math.isfinite(period)):
                raise ValueError(f"fault {name}={period!r}: must be a positive number of seconds")
        after = self.shutdown_after
        if after is not None and not (after >= 0 and math.isfinite(after)):
            raise ValueError(f"fault shutdown_after={after!r}: must be zero or more seconds")


def parse_faults(text: str) -> Faults:
    """Parse `NAME=VALUE,...` (names in FAULTS_HELP); '' means none."""
    values: dict[str, float] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, raw = item.partition("=")
        name, raw = name.strip(), raw.strip()
        if not sep or not raw:
            raise ValueError(f"fault {item!r}: expected NAME=VALUE")
        if name not in _NAMES:
            raise ValueError(f"unknown fault {name!r}; known faults: {', '.join(_NAMES)}")
        if name in values:
            raise ValueError(f"fault {name!r} given twice")
        try:
            values[name] = float(raw)
        except ValueError:
            raise ValueError(f"fault {name}={raw!r}: not a number") from None
    return Faults(**values)
