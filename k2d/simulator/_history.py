"""The venue's retained trade history for one symbol: a fixed-size ring of compact columns."""

from __future__ import annotations

from array import array

import msgspec

from k2d.simulator._wire import HUGE_ID, UNITS, decimal8

# How a history row is served bad (the `bad_history` fault), in rotation. Each is a row a
# careful client must not store: not a decimal(18,8) > 0, no timestamp, no int64 id.
BAD_ROW_KINDS = (
    "non_numeric_price",
    "zero_price",
    "too_many_digits",
    "negative_time",
    "far_time",
    "huge_id",
)
_YEAR_10000_MS = 253_402_300_800_000  # 10000-01-01T00:00:00Z


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

    __slots__ = (
        "_bad",
        "_capacity",
        "_first_id",
        "_maker",
        "_next_id",
        "_price",
        "_qty",
        "_time",
    )

    def __init__(self, first_id: int, capacity: int) -> None:
        self._first_id = first_id
        self._next_id = first_id
        self._capacity = capacity
        # Columns of machine integers: a million trades cost ~25 MB, not ~250 MB of objects.
        self._price = array("q")
        self._qty = array("q")
        self._time = array("q")
        self._maker = array("b")
        self._bad = array("b")  # 0, or 1 + the index of the row's kind in BAD_ROW_KINDS

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
        spoilt = 0
        if len(self._price) < self._capacity:
            self._price.append(price)
            self._qty.append(qty)
            self._time.append(time_ms)
            self._maker.append(maker)
            self._bad.append(spoilt)
        else:
            slot = (trade_id - self._first_id) % self._capacity
            self._price[slot] = price
            self._qty[slot] = qty
            self._time[slot] = time_ms
            self._maker[slot] = maker
            self._bad[slot] = spoilt
        self._next_id = trade_id + 1
        return trade_id

    def spoil(self, trade_id: int, kind: str) -> None:
        """Serve the retained row of `trade_id` bad, the way `kind` (BAD_ROW_KINDS) says."""
        if self.oldest_id <= trade_id < self._next_id:
            slot = (trade_id - self._first_id) % self._capacity
            self._bad[slot] = BAD_ROW_KINDS.index(kind) + 1

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
        item = HistoricalTrade(
            trade_id,
            decimal8(price),
            decimal8(qty),
            decimal8(price * qty // UNITS),  # exact: tick * step is a multiple of 1e8
            self._time[slot],
            maker,
            True,
        )
        spoilt = self._bad[slot]
        if spoilt:
            _spoil(item, BAD_ROW_KINDS[spoilt - 1])
        return item


def _spoil(item: HistoricalTrade, kind: str) -> None:
    if kind == "non_numeric_price":
        item.price = "not-a-price"
    elif kind == "zero_price":
        item.price = decimal8(0)
    elif kind == "too_many_digits":
        item.price = "12345678901.00000000"
    elif kind == "negative_time":
        item.time = -1
    elif kind == "far_time":
        item.time = _YEAR_10000_MS
    elif kind == "huge_id":
        item.id = HUGE_ID
