"""Deterministic market activity: which symbol trades, at what price and size, and the quotes.

Everything here is a pure function of the seed and the order of calls, never of time or of
who is listening, so two runs with one seed produce the same trades and quotes.
"""

from __future__ import annotations

import random

from k2d.simulator._history import TradeHistory
from k2d.simulator._wire import UNITS


class SymbolMarket:
    """One symbol's price walk, trade ids (contiguous, from a seed-derived start) and history."""

    __slots__ = ("history", "min_price", "price", "qty_step", "symbol", "tick")

    def __init__(self, symbol: str, first_id: int, start_price: float, history_size: int) -> None:
        self.symbol = symbol
        units = max(int(start_price * UNITS), UNITS // 100)
        # About seven significant digits of price, like Binance's tick sizes; the quantity
        # step is chosen so that price * qty is always a whole number of 1e-8 (exact quoteQty).
        tick_exp = max(0, len(str(units)) - 7)
        self.tick = 10**tick_exp
        self.qty_step = 10 ** max(0, 8 - tick_exp)
        self.price = units - units % self.tick
        self.min_price = 100 * self.tick
        self.history = TradeHistory(first_id, history_size)

    def next_trade(self, rng: random.Random, time_ms: int) -> tuple[int, int, int, bool]:
        """Advance the walk one trade; returns (id, price, qty, buyer_is_maker)."""
        price = self.price + self.tick * (int(rng.random() * 7) - 3)
        if price < self.min_price:
            price = self.min_price
        self.price = price
        qty = self.qty_step * (1 + int(rng.random() ** 3 * 5000))
        maker = rng.random() < 0.5
        return self.history.append(price, qty, time_ms, maker), price, qty, maker

    def next_quote(self, rng: random.Random) -> tuple[int, int, int, int]:
        """Best bid/ask around the last price; returns (bid, bid_qty, ask, ask_qty)."""
        spread = 1 + int(rng.random() * 3)
        bid = self.price - self.tick * spread
        ask = self.price + self.tick * (1 + int(rng.random() * 3))
        bid_qty = self.qty_step * (1 + int(rng.random() * 20000))
        ask_qty = self.qty_step * (1 + int(rng.random() * 20000))
        return bid, bid_qty, ask, ask_qty


class Market:
    """All symbols of one run, with the random source that orders their trades."""

    __slots__ = ("_update_id", "rng", "symbols")

    def __init__(self, symbols: tuple[str, ...], seed: int, history_size: int) -> None:
        # String seeds go through SHA-512: stable across processes and PYTHONHASHSEED.
        setup = random.Random(f"k2d-simulator-setup:{seed}")
        self.rng = random.Random(f"k2d-simulator-market:{seed}")
        self.symbols = tuple(
            SymbolMarket(
                symbol,
                first_id=(k + 1) * 1_000_000_000 + setup.randrange(100_000) * 1000,
                start_price=10 ** setup.uniform(-1.0, 4.7),
                history_size=history_size,
            )
            for k, symbol in enumerate(symbols)
        )
        self._update_id = 400_000_000 + setup.randrange(100_000_000)

    def pick(self) -> int:
        """Index of the symbol that trades next."""
        return int(self.rng.random() * len(self.symbols))

    def next_update_id(self) -> int:
        """bookTicker `u`: grows across all symbols, by random steps, never contiguous."""
        self._update_id += 1 + int(self.rng.random() * 5)
        return self._update_id
