"""The venue's retained trade history for one symbol: a fixed-size ring of compact columns."""

from __future__ import annotations

from array import array

import msgspec

from k2d.simulator._wire import UNITS, decimal8


class HistoricalTrade(msgspec.Struct):
    """One item of `/api/v3/trades` and `/api/v3/historicalTrades`, field order as Binance."""

    id: int
    price: str
    qty: str
    quoteQty: str
    time: int
    isBuyerMaker: bool
    isBestMatch: bool


class TradeHistory:
    """Trades with contiguous ids; only the newest `capacity` are kept, like a venue's REST."""

    __slots__ = ("_capacity", "_first_id", "_maker", "_next_id", "_price", "_qty", "_time")

    def __init__(self, first_id: int, capacity: int) -> None:
        self._first_id = first_id
        self._next_id = first_id
        self._capacity = capacity
        # Columns of machine integers: a million trades cost ~25 MB, not ~250 MB of objects.
        self._price = array("q")
        self._qty = array("q")
        self._time = array("q")
        self._maker = array("b")

    @property
    def next_id(self) -> int:
        return self._next_id

    @property
    def oldest_id(self) -> int:
        """Oldest id still retained (equals next_id when nothing was generated yet)."""
        return max(self._first_id, self._next_id - self._capacity)

    def append(self, price: int, qty: int, time_ms: int, maker: bool) -> int:
        """Record the next trade and return its id."""
        trade_id = self._next_id
        if len(self._price) < self._capacity:
            self._price.append(price)
            self._qty.append(qty)
            self._time.append(time_ms)
            self._maker.append(maker)
        else:
            slot = (trade_id - self._first_id) % self._capacity
            self._price[slot] = price
            self._qty[slot] = qty
            self._time[slot] = time_ms
            self._maker[slot] = maker
        self._next_id = trade_id + 1
        return trade_id

    def from_id(self, from_id: int, limit: int) -> list[HistoricalTrade]:
        """Up to `limit` trades with id >= from_id, ascending; starts at the oldest retained."""
        start = max(from_id, self.oldest_id)
        stop = min(start + limit, self._next_id)
        return [self._item(trade_id) for trade_id in range(start, stop)]

    def recent(self, limit: int) -> list[HistoricalTrade]:
        """The newest `limit` trades, ascending."""
        return self.from_id(self._next_id - limit, limit)

    def _item(self, trade_id: int) -> HistoricalTrade:
        slot = (trade_id - self._first_id) % self._capacity
        price, qty = self._price[slot], self._qty[slot]
        maker = bool(self._maker[slot])
        return HistoricalTrade(
            trade_id,
            decimal8(price),
            decimal8(qty),
            decimal8(price * qty // UNITS),  # exact: tick * step is a multiple of 1e8
            self._time[slot],
            maker,
            True,
        )
