"""Binance combined-stream frames to Arrow column buffers (k2d/venues/_binance_scan.c)."""

from typing import Any

def scan(
    frames: list[bytes],
    received: list[int],
    streams: dict[bytes, tuple[int, int]],
    symbols: list[bytes],
    trade_prefixes: list[bytes],
    quote_prefixes: list[bytes],
    max_skew_us: int,
    max_frame_bytes: int,
    /,
) -> tuple[int, tuple[Any, ...] | None, tuple[Any, ...] | None] | None: ...
