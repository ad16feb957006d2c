"""Actor runtime: Actor, Outbox, ChildSpec, Supervisor, Backoff, EscalationError.

Children run in anyio task groups. One-for-one restarts only the child that failed;
one-for-all restarts the whole group (the ingest chain of a partition), because a crash
mid-batch must replay from the last committed position, not keep half a pipeline's state.
Going over `max_restarts` in `period` raises EscalationError: the process exits non-zero
and systemd restarts it.
"""

from __future__ import annotations

import enum
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = [
    "Actor",
    "ActorState",
    "Backoff",
    "ChildSpec",
    "EscalationError",
    "Outbox",
    "Registry",
    "Restart",
    "Strategy",
    "Supervisor",
    "bounded_stream",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
In = TypeVar("In")
Out = TypeVar("Out")


class ActorState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    DEGRADED = "degraded"
    RESTARTING = "restarting"
    STOPPED = "stopped"


class Restart(enum.StrEnum):
    PERMANENT = "permanent"  # always restarted
    TRANSIENT = "transient"  # restarted after a crash, not after a clean end of input
    TEMPORARY = "temporary"  # never restarted


class Strategy(enum.StrEnum):
    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"


class EscalationError(RuntimeError):
    """A supervisor saw more restarts than it may absorb; the process must exit non-zero."""


@dataclass
class Registry:
    """Actor states, restart counts and stream depths, read by /ready and /metrics."""

    states: dict[str, ActorState] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    streams: dict[str, tuple[MemoryObjectSendStream[Any], int]] = field(default_factory=dict)

    def set_state(self, name: str, state: ActorState) -> None:
        self.states[name] = state

    def count_restart(self, name: str) -> None:
        self.restarts[name] = self.restarts.get(name, 0) + 1

    def stream_depths(self) -> dict[str, tuple[int, int]]:
        return {
            name: (s.statistics().current_buffer_used, size)
            for name, (s, size) in self.streams.items()
        }


def bounded_stream(
    registry: Registry, name: str, size: int
) -> tuple[MemoryObjectSendStream[Any], MemoryObjectReceiveStream[Any]]:
    """A memory stream of finite `size`, registered so its depth is a metric."""
    if size < 1:
        raise ValueError(f"stream {name}: size must be >= 1")
    send, recv = anyio.create_memory_object_stream[Any](size)
    registry.streams[name] = (send, size)
    return send, recv


class Outbox(Generic[T]):
    """Fan-out to one or more bounded streams. A full stream blocks the sender (backpressure)."""

    def __init__(self, name: str, *streams: MemoryObjectSendStream[T]) -> None:
        self.name = name
        self._streams = streams
        self._last_warning = 0.0

    async def send(self, item: T) -> None:
        for stream in self._streams:
            try:
                stream.send_nowait(item)
            except anyio.WouldBlock:
                now = time.monotonic()
                if now - self._last_warning >= 1.0:
                    self._last_warning = now
                    log.warning("backpressure: %s is full, sender waits", self.name)
                await stream.send(item)

    def close(self) -> None:
        for stream in self._streams:
            stream.close()


class Actor(Generic[In, Out]):
    """Owns its state; consumes `inbox` until end of input, emits to `outbox`."""

    name: str = "actor"

    async def on_start(self) -> None:
        """Restore state before the first message (watermarks, open connections)."""

    async def run(self, inbox: MemoryObjectReceiveStream[In] | None, outbox: Outbox[Out]) -> None:
        raise NotImplementedError

    async def on_drain(self) -> None:
        """Called after a clean end of input: flush what is held."""


@dataclass
class Backoff:
    """Exponential backoff with full jitter."""

    initial: float = 0.2
    maximum: float = 30.0
    multiplier: float = 2.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * self.multiplier**self.attempt)
        self.attempt += 1
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.attempt = 0


@dataclass(frozen=True)
class ChildSpec:
    """How to run one child. `start` runs it once to completion; `on_exit` runs when it ends
    for good (not before a restart), typically closing its outbox so end-of-input flows on."""

    name: str
    start: Callable[[], Awaitable[None]]
    restart: Restart = Restart.TRANSIENT
    on_exit: Callable[[], None] | None = None

    @classmethod
    def for_actor(
        cls,
        name: str,
        factory: Callable[[], Actor[Any, Any]],
        inbox: MemoryObjectReceiveStream[Any] | None,
        outbox: Outbox[Any],
        registry: Registry,
        restart: Restart = Restart.TRANSIENT,
    ) -> ChildSpec:
        async def start() -> None:
            actor = factory()
            registry.set_state(name, ActorState.STARTING)
            await actor.on_start()
            registry.set_state(name, ActorState.RUNNING)
            await actor.run(inbox, outbox)
            await actor.on_drain()

        return cls(name=name, start=start, restart=restart, on_exit=outbox.close)


class Supervisor:
    def __init__(
        self,
        name: str,
        children: list[ChildSpec],
        registry: Registry,
        strategy: Strategy = Strategy.ONE_FOR_ONE,
        max_restarts: int = 5,
        period: float = 60.0,
        backoff: Backoff | None = None,
    ) -> None:
        self.name = name
        self.children = children
        self.registry = registry
        self.strategy = strategy
        self.max_restarts = max_restarts
        self.period = period
        self.backoff = backoff or Backoff()
        self._restart_times: deque[float] = deque()

    def as_child(self, restart: Restart = Restart.TRANSIENT) -> ChildSpec:
        return ChildSpec(name=self.name, start=self.run, restart=restart)

    async def run(self) -> None:
        if self.strategy is Strategy.ONE_FOR_ALL:
            await self._run_one_for_all()
        else:
            async with anyio.create_task_group() as tg:
                for spec in self.children:
                    tg.start_soon(self._supervise_one, spec)

    def _note_restart(self, who: str, exc: BaseException) -> float:
        """Record a restart; escalate past the limit; return the delay before restarting."""
        now = time.monotonic()
        self._restart_times.append(now)
        while self._restart_times and now - self._restart_times[0] > self.period:
            self._restart_times.popleft()
        if len(self._restart_times) > self.max_restarts:
            raise EscalationError(
                f"{self.name}: {who} failed {len(self._restart_times)} times in "
                f"{self.period:g}s (limit {self.max_restarts}); last error: {exc!r}"
            ) from exc
        self.registry.count_restart(who)
        self.registry.set_state(who, ActorState.RESTARTING)
        log.error("%s: %s crashed, restarting: %r", self.name, who, exc, exc_info=exc)
        return self.backoff.next_delay()

    async def _supervise_one(self, spec: ChildSpec) -> None:
        while True:
            try:
                await spec.start()
            except EscalationError:
                raise
            except Exception as exc:
                if spec.restart is Restart.TEMPORARY:
                    self._finish(spec, ActorState.STOPPED)
                    log.error("%s: temporary child %s ended: %r", self.name, spec.name, exc)
                    return
                await anyio.sleep(self._note_restart(spec.name, exc))
                continue
            if spec.restart is Restart.PERMANENT:
                await anyio.sleep(self._note_restart(spec.name, RuntimeError("ended")))
                continue
            self._finish(spec, ActorState.STOPPED)
            return

    async def _run_one_for_all(self) -> None:
        while True:
            try:
                async with anyio.create_task_group() as tg:
                    for spec in self.children:
                        tg.start_soon(self._run_once, spec)
                return
            except Exception as exc:
                if _has_escalation(exc):
                    raise
                await anyio.sleep(self._note_restart(self.name, exc))

    async def _run_once(self, spec: ChildSpec) -> None:
        await spec.start()
        self._finish(spec, ActorState.STOPPED)

    def _finish(self, spec: ChildSpec, state: ActorState) -> None:
        self.registry.set_state(spec.name, state)
        if spec.on_exit is not None:
            spec.on_exit()


def _has_escalation(exc: BaseException) -> bool:
    if isinstance(exc, EscalationError):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return any(_has_escalation(e) for e in exc.exceptions)
    return False
