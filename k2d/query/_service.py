"""What the HTTP layer needs from the query side, as protocols (k2d never imports actors/),
and the stream of response bytes a query hands back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

from anyio.streams.memory import MemoryObjectReceiveStream

from k2d.query._errors import QueryError

if TYPE_CHECKING:
    from k2d.config import QueryConfig
    from k2d.model import Quote, Trade
    from k2d.query._execute import Head, Plan
    from k2d.query._params import Format

__all__ = ["QueryService", "RecentSource", "ResultStream"]

# What a worker sends after the head: chunks, then None (done) or the error that ended it.
Message = bytes | QueryError | None


class ResultStream:
    """A query's response: `head` before the first byte, then the bytes as they come.

    Closing it (or abandoning it: the generator's cleanup closes the stream) tells the worker
    to stop, so a client that goes away frees its worker at the next chunk."""

    def __init__(self, head: Head, chunks: MemoryObjectReceiveStream[Message]) -> None:
        self.head = head
        self._chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.head.body is not None:
            self._chunks.close()
            yield self.head.body
            return
        async with self._chunks:
            async for msg in self._chunks:
                if msg is None:
                    return
                if isinstance(msg, QueryError):
                    raise msg
                yield msg
        # The worker stopped without finishing (its deadline passed while we were slow).
        raise QueryError(504, "query_timeout", "the answer was cut off at the time limit")

    async def read_all(self) -> bytes:
        """The whole body (tests and small responses)."""
        return b"".join([chunk async for chunk in self])

    def close(self) -> None:
        self._chunks.close()


class QueryService(Protocol):
    """The QueryPool, as the routes see it."""

    cfg: QueryConfig

    async def execute(self, key: str, plan: Plan, fmt: Format) -> ResultStream:
        """Admit (per-key limit, bounded queue), run in a worker, return once the head is
        known; QueryError for refusals (429, 503), bad requests (400) and timeouts (504)."""
        ...

    async def catch_up(self) -> None:
        """Return once every Committed sent so far is in the file index."""
        ...


class RecentSource(Protocol):
    """The LiveHub, as the recent-rows routes (and a stream's catch-up) see it."""

    def recent_trades(
        self, exchange: str, symbol: str, since_us: int = 0, *, uncommitted_only: bool = False
    ) -> list[Trade]: ...

    def recent_quotes(
        self, exchange: str, symbol: str, since_us: int = 0, *, uncommitted_only: bool = False
    ) -> list[Quote]: ...

    def symbols(self) -> list[tuple[str, str]]: ...
