"""What the HTTP layer reads from the daemon: actor registry, metrics, spans, stats, readiness."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Literal, Protocol

from k2d.config import ApiConfig, StreamConfig
from k2d.query import QueryService, RecentSource
from k2d.runtime import ActorState, Registry
from k2d.telemetry.metrics import Metrics
from k2d.telemetry.tracing import Tracing

__all__ = ["ApiState", "Published", "Readiness", "StreamSource"]

Readiness = Literal["ready", "starting", "draining", "not_ready"]
_SERVING = frozenset({ActorState.RUNNING, ActorState.DEGRADED})


class Published(Protocol):
    """One channel's share of a published batch (actors/live_hub.py Published)."""

    channel: str
    kind: str
    rows: Sequence[Any]
    span_context: Any
    encoded: dict[str, Any]


class StreamSource(Protocol):
    """The process's Fanout (actors/live_hub.py), as the stream route sees it: a
    subscriber is anything with `deliver(item: Published) -> None`."""

    def subscribe(self, channel: str, sub: Any) -> None: ...

    def unsubscribe(self, channel: str, sub: Any) -> None: ...


@dataclass(kw_only=True)
class ApiState:
    """Shared with every handler. Starts not ready; the daemon calls mark_ready() once its
    actors run and mark_draining() on SIGTERM, so load balancers stop sending traffic."""

    registry: Registry
    metrics: Metrics
    stats: Callable[[], Awaitable[dict[str, Any]]]
    tracing: Tracing | None = None
    expected_actors: set[str] = field(default_factory=set)
    config: ApiConfig = field(default_factory=ApiConfig)
    # The query side: the QueryPool (historical queries) and the LiveHub (uncommitted rows).
    query_pool: QueryService | None = None
    live_hub: RecentSource | None = None
    # The stream (/v1/stream): the Fanout every capture round's live hub publishes to, and
    # its limits. Without a Fanout the route still serves replay and history.
    fanout: StreamSource | None = None
    stream: StreamConfig = field(default_factory=StreamConfig)
    # Runs a maintenance round now: (table or None, before or None) -> report.
    run_maintenance: Callable[[str | None, date | None], Awaitable[dict[str, Any]]] | None = None
    _ready: bool = field(default=False, init=False, repr=False)
    _draining: bool = field(default=False, init=False, repr=False)

    def mark_ready(self) -> None:
        self._ready = True

    def mark_draining(self) -> None:
        """One-way: a draining process never becomes ready again."""
        self._draining = True

    @property
    def ready(self) -> bool:
        return self.readiness() == "ready"

    @property
    def draining(self) -> bool:
        return self._draining

    def readiness(self) -> Readiness:
        if self._draining:
            return "draining"
        if not self._ready:
            return "starting"
        states = self.registry.states
        if all(states.get(name) in _SERVING for name in self.expected_actors):
            return "ready"
        return "not_ready"
