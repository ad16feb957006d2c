"""Settings of one simulator run; every bound the simulator keeps is set here."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from k2d.simulator._faults import Faults

_SYMBOL = re.compile(r"[A-Z0-9]{2,20}")


@dataclass(frozen=True)
class SimulatorOptions:
    """How the simulated Binance venue listens, generates, misbehaves and limits clients."""

    host: str = "127.0.0.1"
    port: int = 0
    symbols: tuple[str, ...] = ("BTCUSDT", "ETHUSDT")
    rate: float = 100.0
    seed: int = 1
    faults: Faults = field(default_factory=Faults)
    manifest_path: Path | None = None
    ping_interval: float = 20.0
    ping_timeout: float = 60.0
    connection_lifetime: float = 86400.0
    history_size: int = 1_000_000
    weight_limit: int = 6000
    request_weight: int = 25
    quotes_per_trade: float = 1.0
    # List the update id of every quote sent in the manifest (bounded by max_manifest_ids):
    # for tests that check each lost quote against the ledger's outages.
    record_quotes: bool = False
    # Not command-line options: bounds and periods that tests shrink to stay fast.
    max_manifest_ids: int = 1_000_000
    ban_seconds: float = 120.0
    manifest_interval: float = 2.0

    def __post_init__(self) -> None:
        if not self.symbols:
            raise ValueError("at least one symbol is required")
        for symbol in self.symbols:
            if not _SYMBOL.fullmatch(symbol):
                raise ValueError(f"symbol {symbol!r}: expected 2-20 upper-case letters or digits")
        if len(set(self.symbols)) != len(self.symbols):
            raise ValueError(f"symbols {','.join(self.symbols)}: each symbol may appear once")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port}: must be in 0..65535")
        _positive("rate", self.rate, allow_zero=True)
        _positive("quotes_per_trade", self.quotes_per_trade, allow_zero=True)
        for name in ("ping_interval", "ping_timeout", "connection_lifetime", "ban_seconds"):
            _positive(name, getattr(self, name))
        _positive("manifest_interval", self.manifest_interval)
        for name in ("history_size", "weight_limit", "request_weight", "max_manifest_ids"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)}: must be at least 1")


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = "zero or more" if allow_zero else "more than zero"
        raise ValueError(f"{name} {value!r}: must be a finite number {bound}")
