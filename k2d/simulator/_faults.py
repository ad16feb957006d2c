"""Fault injection settings for the simulated venue, parsed from `--faults` text."""

from __future__ import annotations

import math
from dataclasses import dataclass

_PROBABILITIES = ("drop", "dup", "reorder", "malformed", "reset")
_NAMES = (*_PROBABILITIES, "disconnect_every")


@dataclass(frozen=True)
class Faults:
    """Per trade frame fault probabilities, plus a period for planned disconnects."""

    drop: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    malformed: float = 0.0
    reset: float = 0.0
    disconnect_every: float | None = None

    def __post_init__(self) -> None:
        for name in _PROBABILITIES:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:  # also rejects NaN
                raise ValueError(f"fault {name}={value!r}: a probability must be in [0, 1]")
        period = self.disconnect_every
        if period is not None and not (period > 0 and math.isfinite(period)):
            raise ValueError(
                f"fault disconnect_every={period!r}: must be a positive number of seconds"
            )


def parse_faults(text: str) -> Faults:
    """Parse `drop=P,dup=P,reorder=P,malformed=P,reset=P,disconnect_every=S`; '' means none."""
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
