"""Actor runtime: Actor, Outbox, ChildSpec, Supervisor, Backoff, EscalationError.

Children run in anyio task groups. One-for-one restarts only the child that failed;
one-for-all restarts the whole group (the capture chain), because a crash mid-batch must
replay from the last committed position, not keep half a pipeline's state. A one-for-all
group may be given a `build` context manager instead of fixed children: each round then
starts from fresh instances and fresh streams, and the context manager's entry is where
recovery happens (see k2d/pipeline.py).

A fault from outside the process (disk full, read-only filesystem, I/O error, a locked
catalog) is waited out: the children are DEGRADED, restarted with backoff, and never
escalate. Anything else counts against `max_restarts` in `period`; going over raises
EscalationError, the process exits 70 and systemd restarts it.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import random
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
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
    "OutsideFault",
    "Registry",
    "Restart",
    "Strategy",
    "Supervisor",
    "bounded_stream",
    "outside_fault",
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


# errno values that mean the machine, not the code, said no; each maps to a metric label.
_OUTSIDE_ERRNOS = {
    errno.ENOSPC: "disk_full",
    errno.EDQUOT: "disk_full",
    errno.EROFS: "read_only",
    errno.EACCES: "permission",
    errno.EPERM: "permission",
    errno.EIO: "io_error",
    errno.EMFILE: "too_many_files",
    errno.ENFILE: "too_many_files",
}
_SQLITE_OUTSIDE = (
    ("locked", "catalog_locked"),
    ("busy", "catalog_locked"),
    ("disk is full", "disk_full"),
    ("readonly", "read_only"),
    ("disk i/o", "io_error"),
    ("unable to open", "permission"),
)


class OutsideFault(Exception):
    """A service outside the process (a Kafka broker, ...) that does not answer: like a full
    disk, retried with backoff while DEGRADED, never escalated. `kind` is the metric label."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


def outside_fault(exc: BaseException) -> str | None:
    """The kind of outside fault (`disk_full`, `read_only`, ...) if every failure in `exc`
    (an exception group is searched leaf by leaf, each along its causes) came from the
    operating system or a locked catalog; None if any of them is a bug."""
    if isinstance(exc, BaseExceptionGroup):
        kinds = [outside_fault(e) for e in exc.exceptions]
        return kinds[0] if kinds and all(kinds) else None
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OutsideFault):
            return e.kind
        if isinstance(e, OSError) and e.errno in _OUTSIDE_ERRNOS:
            return _OUTSIDE_ERRNOS[e.errno]
        if isinstance(e, sqlite3.OperationalError):
            text = str(e).lower()
            for needle, kind in _SQLITE_OUTSIDE:
                if needle in text:
                    return kind
        e = e.__cause__ or e.__context__
    return None


@dataclass
class Registry:
    """Actor states (with why, when degraded), restarts, outside faults and stream depths,
    read by /ready and /metrics."""

    states: dict[str, ActorState] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    streams: dict[str, tuple[MemoryObjectSendStream[Any], int]] = field(default_factory=dict)

    def set_state(self, name: str, state: ActorState, reason: str = "") -> None:
        if state is ActorState.DEGRADED and self.reasons.get(name) != reason:
            log.warning("%s is degraded: %s", name, reason)
        elif self.states.get(name) is ActorState.DEGRADED and state is ActorState.RUNNING:
            log.warning("%s has recovered", name)
        self.states[name] = state
        if state is ActorState.DEGRADED:
            self.reasons[name] = reason
        else:
            self.reasons.pop(name, None)

    def count_restart(self, name: str) -> None:
        self.restarts[name] = self.restarts.get(name, 0) + 1

    def count_fault(self, kind: str) -> None:
        self.faults[kind] = self.faults.get(kind, 0) + 1

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
            await self._send(stream, item)

    async def send_to(self, index: int, item: T) -> None:
        """Send to the index'th stream only (a consumer that routes by partition)."""
        await self._send(self._streams[index], item)

    async def _send(self, stream: MemoryObjectSendStream[T], item: T) -> None:
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
    _report: Callable[[str | None], None] | None = None

    async def on_start(self) -> None:
        """Restore state before the first message (watermarks, open connections)."""

    async def run(self, inbox: MemoryObjectReceiveStream[In] | None, outbox: Outbox[Out]) -> None:
        raise NotImplementedError

    async def on_drain(self) -> None:
        """Called after a clean end of input: flush what is held."""

    def set_degraded(self, reason: str | None) -> None:
        """Alive but impaired (`reason`), or healthy again (None); shown by /ready."""
        if self._report is not None:
            self._report(reason)


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
        """`factory` is called at every start: a restart never reuses a crashed instance."""

        async def start() -> None:
            actor = factory()

            def report(reason: str | None) -> None:
                registry.set_state(
                    name, ActorState.DEGRADED if reason else ActorState.RUNNING, reason or ""
                )

            actor._report = report
            registry.set_state(name, ActorState.STARTING)
            await actor.on_start()
            registry.set_state(name, ActorState.RUNNING)
            await actor.run(inbox, outbox)
            await actor.on_drain()

        return cls(name=name, start=start, restart=restart, on_exit=outbox.close)


Build = Callable[[], AbstractAsyncContextManager[Sequence[ChildSpec]]]


class Supervisor:
    def __init__(
        self,
        name: str,
        children: Sequence[ChildSpec] | Build,
        registry: Registry,
        strategy: Strategy = Strategy.ONE_FOR_ONE,
        max_restarts: int = 5,
        period: float = 60.0,
        backoff: Backoff | None = None,
    ) -> None:
        """`children` may be a context manager factory (one-for-all only), entered at every
        round: it prepares and yields fresh children, and is exited when the round ends."""
        if callable(children) and strategy is not Strategy.ONE_FOR_ALL:
            raise ValueError(f"{name}: only a one-for-all supervisor builds its children")
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
            assert not callable(self.children)
            async with anyio.create_task_group() as tg:
                for spec in self.children:
                    tg.start_soon(self._supervise_one, spec)

    def _note_restart(
        self, who: Sequence[str], exc: BaseException, ran_for: float
    ) -> tuple[float, str | None]:
        """Record a restart of `who`; escalate a bug past the limit; return the delay before
        restarting and the outside fault's kind, if it was one."""
        now = time.monotonic()
        if ran_for >= self.period:
            self.backoff.reset()  # it ran well for a while: this is a new failure
        kind = outside_fault(exc)
        label = ", ".join(who) or self.name
        if kind is not None:
            self.registry.count_fault(kind)
            reason = f"{kind}: {_leaf_text(exc)}"
            for name in who:
                self.registry.count_restart(name)
                self.registry.set_state(name, ActorState.DEGRADED, reason)
            delay = self.backoff.next_delay()
            log.debug("%s: %s; retrying in %.1fs", self.name, reason, delay)
            return delay, kind
        self._restart_times.append(now)
        while self._restart_times and now - self._restart_times[0] > self.period:
            self._restart_times.popleft()
        if len(self._restart_times) > self.max_restarts:
            raise EscalationError(
                f"{self.name}: {label} failed {len(self._restart_times)} times in "
                f"{self.period:g}s (limit {self.max_restarts}); last error: {exc!r}"
            ) from exc
        for name in who:
            self.registry.count_restart(name)
            self.registry.set_state(name, ActorState.RESTARTING)
        log.error("%s: %s crashed, restarting: %r", self.name, label, exc, exc_info=exc)
        return self.backoff.next_delay(), None

    async def _supervise_one(self, spec: ChildSpec) -> None:
        while True:
            started = time.monotonic()
            try:
                await spec.start()
            except Exception as exc:
                if _has_escalation(exc):
                    raise
                if spec.restart is Restart.TEMPORARY:
                    self._finish(spec, ActorState.STOPPED)
                    log.error("%s: temporary child %s ended: %r", self.name, spec.name, exc)
                    return
                delay, _ = self._note_restart([spec.name], exc, time.monotonic() - started)
                await anyio.sleep(delay)
                continue
            if spec.restart is Restart.PERMANENT:
                ended = RuntimeError("ended")
                delay, _ = self._note_restart([spec.name], ended, time.monotonic() - started)
                await anyio.sleep(delay)
                continue
            self._finish(spec, ActorState.STOPPED)
            return

    async def _run_one_for_all(self) -> None:
        names: list[str] = []
        while True:
            started = time.monotonic()
            try:
                async with self._round() as children:
                    names = [c.name for c in children]
                    async with anyio.create_task_group() as tg:
                        for spec in children:
                            tg.start_soon(self._run_once, spec)
                return
            except Exception as exc:
                if _has_escalation(exc):
                    raise
                delay, _ = self._note_restart(names, exc, time.monotonic() - started)
                await anyio.sleep(delay)

    def _round(self) -> AbstractAsyncContextManager[Sequence[ChildSpec]]:
        children = self.children
        if callable(children):
            return children()
        return _fixed(children)

    async def _run_once(self, spec: ChildSpec) -> None:
        await spec.start()
        self._finish(spec, ActorState.STOPPED)

    def _finish(self, spec: ChildSpec, state: ActorState) -> None:
        self.registry.set_state(spec.name, state)
        if spec.on_exit is not None:
            spec.on_exit()


@contextlib.asynccontextmanager
async def _fixed(children: Sequence[ChildSpec]) -> AsyncIterator[Sequence[ChildSpec]]:
    yield children


def _has_escalation(exc: BaseException) -> bool:
    if isinstance(exc, EscalationError):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return any(_has_escalation(e) for e in exc.exceptions)
    return False


def _leaf_text(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return str(exc) or type(exc).__name__
