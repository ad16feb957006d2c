"""LiveHub: the last N minutes of trades and quotes per symbol in memory, committed or not.

Recent queries merge these rows with committed ones (deduplicated by message_id) so that
"the last 15 minutes" includes the last second; the streaming API fans out from here.
Memory is bounded per symbol by row count and by age.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from anyio.streams.memory import MemoryObjectReceiveStream

from k2d.config import LiveConfig
from k2d.messages import Committed, SequencedBatch
from k2d.model import Quote, Trade
from k2d.runtime import Actor, Outbox
from k2d.telemetry.metrics import Metrics

__all__ = ["LiveHub"]

_Key = tuple[str, str]
# Uncommitted batch ids checked against the rows still held once there are this many.
_PRUNE_AT = 1_024


class _Recent:
    """Rows of one (exchange, symbol) with the batch each came in, oldest first."""

    def __init__(self, max_rows: int) -> None:
        self.rows: deque[tuple[int, Any]] = deque(maxlen=max_rows)

    def trim(self, oldest_us: int) -> None:
        rows = self.rows
        while rows and rows[0][1].timestamp < oldest_us:
            rows.popleft()


class LiveHub(Actor[SequencedBatch | Committed, None]):
    name = "live_hub"

    def __init__(self, cfg: LiveConfig, metrics: Metrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self._trades: dict[_Key, _Recent] = {}
        self._quotes: dict[_Key, _Recent] = {}
        # batch ids whose rows of a table are not yet committed, per table
        self._uncommitted: dict[str, set[int]] = {"trades": set(), "quotes": set()}
        self._window_us = int(cfg.window_seconds * 1_000_000)
        self.latest_us = 0

    async def run(
        self,
        inbox: MemoryObjectReceiveStream[SequencedBatch | Committed] | None,
        outbox: Outbox[None],
    ) -> None:
        assert inbox is not None
        async for msg in inbox:
            if isinstance(msg, SequencedBatch):
                self.add(msg)
            else:
                self.committed(msg)

    def add(self, batch: SequencedBatch) -> None:
        for table, rows, store in (
            ("trades", batch.trades, self._trades),
            ("quotes", batch.quotes, self._quotes),
        ):
            if not rows:
                continue
            self._uncommitted[table].add(batch.batch_id)
            for r in rows:
                key = (r.exchange, r.symbol)
                recent = store.get(key)
                if recent is None:
                    recent = store[key] = _Recent(self.cfg.max_rows_per_symbol)
                recent.rows.append((batch.batch_id, r))
                if r.timestamp > self.latest_us:
                    self.latest_us = r.timestamp
        oldest = self.latest_us - self._window_us
        for store in (self._trades, self._quotes):
            for recent in store.values():
                recent.trim(oldest)
        self._forget_trimmed()
        self.metrics.live_rows.set(self.row_count())
        self.metrics.live_uncommitted_batches.set(sum(map(len, self._uncommitted.values())))

    def _forget_trimmed(self) -> None:
        """Batch ids older than every row still held have nothing left to mark: drop them,
        so a batch whose commit never comes cannot hold an entry for good."""
        for table, store in (("trades", self._trades), ("quotes", self._quotes)):
            pending = self._uncommitted[table]
            if len(pending) < _PRUNE_AT:
                continue
            held = [r.rows[0][0] for r in store.values() if r.rows]
            floor = min(held, default=None)
            if floor is None:
                pending.clear()
            else:
                pending.difference_update([b for b in pending if b < floor])

    def committed(self, msg: Committed) -> None:
        pending = self._uncommitted.get(msg.table)
        if pending is not None:
            pending.difference_update(msg.batch_ids)

    def row_count(self) -> int:
        return sum(len(r.rows) for s in (self._trades, self._quotes) for r in s.values())

    def recent_trades(
        self, exchange: str, symbol: str, since_us: int = 0, *, uncommitted_only: bool = False
    ) -> list[Trade]:
        return self._read(self._trades, "trades", exchange, symbol, since_us, uncommitted_only)

    def recent_quotes(
        self, exchange: str, symbol: str, since_us: int = 0, *, uncommitted_only: bool = False
    ) -> list[Quote]:
        return self._read(self._quotes, "quotes", exchange, symbol, since_us, uncommitted_only)

    def _read(
        self,
        store: dict[_Key, _Recent],
        table: str,
        exchange: str,
        symbol: str,
        since_us: int,
        uncommitted_only: bool,
    ) -> list[Any]:
        recent = store.get((exchange, symbol))
        if recent is None:
            return []
        pending = self._uncommitted[table]
        return [
            r
            for batch_id, r in recent.rows
            if r.timestamp >= since_us and (not uncommitted_only or batch_id in pending)
        ]

    def symbols(self) -> list[_Key]:
        return sorted(set(self._trades) | set(self._quotes))
