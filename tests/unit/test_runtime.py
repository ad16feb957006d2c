"""Supervision: restarts, escalation, backpressure."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import anyio
import pytest

from k2d.runtime import (
    Backoff,
    ChildSpec,
    EscalationError,
    Outbox,
    Registry,
    Restart,
    Strategy,
    Supervisor,
    bounded_stream,
)


def fast() -> Backoff:
    return Backoff(initial=0.001, maximum=0.005)


class Child:
    """A child that crashes on its first `crashes` starts, then runs until released."""

    def __init__(self, crashes: int = 0) -> None:
        self.starts = 0
        self.crashes = crashes
        self.release = anyio.Event()

    async def __call__(self) -> None:
        self.starts += 1
        if self.starts <= self.crashes:
            raise RuntimeError(f"crash {self.starts}")
        await self.release.wait()


async def test_one_for_one_restarts_only_the_failed_child() -> None:
    reg = Registry()
    flaky, steady = Child(crashes=2), Child()
    sup = Supervisor(
        "s",
        [ChildSpec("flaky", flaky), ChildSpec("steady", steady)],
        reg,
        Strategy.ONE_FOR_ONE,
        max_restarts=5,
        backoff=fast(),
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run)
        with anyio.fail_after(5):
            while flaky.starts < 3:
                await anyio.sleep(0.01)
        flaky.release.set()
        steady.release.set()
    assert flaky.starts == 3
    assert steady.starts == 1
    assert reg.restarts == {"flaky": 2}


async def test_one_for_all_restarts_the_whole_chain() -> None:
    reg = Registry()
    first, second = Child(crashes=1), Child()
    sup = Supervisor(
        "chain",
        [ChildSpec("a", first), ChildSpec("b", second)],
        reg,
        Strategy.ONE_FOR_ALL,
        max_restarts=5,
        backoff=fast(),
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run)
        with anyio.fail_after(5):
            while second.starts < 2:
                await anyio.sleep(0.01)
        first.release.set()
        second.release.set()
    assert first.starts == 2
    assert second.starts == 2, "the sibling of the crashed child was restarted too"


async def test_too_many_restarts_escalate() -> None:
    reg = Registry()
    sup = Supervisor(
        "s", [ChildSpec("bad", Child(crashes=100))], reg, max_restarts=3, period=60, backoff=fast()
    )
    with pytest.raises(ExceptionGroup) as info, anyio.fail_after(5):
        await sup.run()
    assert info.group_contains(EscalationError)


def test_escalation_exits_the_process_non_zero() -> None:
    script = textwrap.dedent("""
        import anyio
        from k2d.runtime import Backoff, ChildSpec, Registry, Supervisor
        from k2d.app import exit_code_of

        async def bad():
            raise RuntimeError("boom")

        async def main():
            sup = Supervisor("root", [ChildSpec("bad", bad)], Registry(), max_restarts=2,
                             backoff=Backoff(0.001, 0.002))
            return await exit_code_of(sup.run())

        raise SystemExit(anyio.run(main))
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 70, proc.stderr


async def test_transient_child_is_not_restarted_after_clean_end_and_closes_outbox() -> None:
    reg = Registry()
    send, recv = bounded_stream(reg, "s", 1)
    ends = 0

    async def once() -> None:
        nonlocal ends
        ends += 1

    sup = Supervisor("s", [ChildSpec("t", once, Restart.TRANSIENT, on_exit=send.close)], reg)
    await sup.run()
    assert ends == 1
    with pytest.raises(anyio.EndOfStream):
        await recv.receive()


async def test_full_stream_blocks_the_sender() -> None:
    reg = Registry()
    send, recv = bounded_stream(reg, "tiny", 1)
    out = Outbox("tiny", send)
    await out.send(1)
    assert reg.stream_depths()["tiny"] == (1, 1)
    with anyio.move_on_after(0.2) as scope:
        await out.send(2)
    assert scope.cancelled_caught, "a second send into a full stream of size 1 must block"
    assert await recv.receive() == 1
    await out.send(3)
    assert await recv.receive() == 3


def test_stream_size_must_be_finite_and_positive() -> None:
    with pytest.raises(ValueError, match="size"):
        bounded_stream(Registry(), "zero", 0)


def test_backoff_grows_with_jitter_and_caps() -> None:
    b = Backoff(initial=1.0, maximum=8.0)
    delays = [b.next_delay() for _ in range(6)]
    assert 0.5 <= delays[0] <= 1.0
    assert all(d <= 8.0 for d in delays)
    assert delays[-1] >= 4.0
    b.reset()
    assert b.next_delay() <= 1.0


async def test_escalation_inside_a_nested_supervisor_ends_the_parent_too() -> None:
    reg = Registry()
    inner = Supervisor(
        "inner", [ChildSpec("bad", Child(crashes=100))], reg, max_restarts=2, backoff=fast()
    )
    outer_restarts = []

    async def nested() -> None:
        outer_restarts.append(1)
        await inner.run()

    outer = Supervisor("outer", [ChildSpec("inner", nested)], reg, max_restarts=5, backoff=fast())
    with pytest.raises(ExceptionGroup) as info, anyio.fail_after(5):
        await outer.run()
    assert info.group_contains(EscalationError)
    assert len(outer_restarts) == 1, "the parent restarted a child that had escalated"


async def test_one_for_all_counts_and_marks_every_child() -> None:
    reg = Registry()
    first, second = Child(crashes=1), Child()
    sup = Supervisor(
        "chain",
        [ChildSpec("a", first), ChildSpec("b", second)],
        reg,
        Strategy.ONE_FOR_ALL,
        max_restarts=5,
        backoff=Backoff(initial=0.3, maximum=0.3),
    )
    seen: set[str] = set()
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run)
        with anyio.fail_after(5):
            while first.starts < 1 or not reg.restarts:
                await anyio.sleep(0.005)
            seen = {str(reg.states.get("a")), str(reg.states.get("b"))}
            while second.starts < 2:
                await anyio.sleep(0.01)
        first.release.set()
        second.release.set()
    assert reg.restarts == {"a": 1, "b": 1}
    assert seen == {"restarting"}


async def test_a_restart_builds_a_fresh_instance() -> None:
    from k2d.runtime import Actor

    made: list[Any] = []

    class Once(Actor[None, None]):
        def __init__(self) -> None:
            self.runs = 0
            made.append(self)

        async def run(self, inbox: Any, outbox: Any) -> None:
            self.runs += 1
            if len(made) == 1:
                raise RuntimeError("first instance crashes")

    reg = Registry()
    spec = ChildSpec.for_actor("once", Once, None, Outbox("none"), reg)
    sup = Supervisor("s", [spec], reg, max_restarts=5, backoff=fast())
    with anyio.fail_after(5):
        await sup.run()
    assert len(made) == 2 and [a.runs for a in made] == [1, 1]


async def test_an_actor_reports_degraded_with_its_reason_and_recovers() -> None:
    from k2d.runtime import Actor, ActorState

    reg = Registry()
    go = anyio.Event()
    states: list[tuple[str, str]] = []

    class Impaired(Actor[None, None]):
        async def run(self, inbox: Any, outbox: Any) -> None:
            self.set_degraded("venue ban until 12:00")
            states.append((reg.states["imp"], reg.reasons.get("imp", "")))
            await go.wait()
            self.set_degraded(None)
            states.append((reg.states["imp"], reg.reasons.get("imp", "")))

    spec = ChildSpec.for_actor("imp", Impaired, None, Outbox("none"), reg)
    async with anyio.create_task_group() as tg:
        tg.start_soon(Supervisor("s", [spec], reg).run)
        await anyio.sleep(0.05)
        go.set()
    assert states == [
        (ActorState.DEGRADED, "venue ban until 12:00"),
        (ActorState.RUNNING, ""),
    ]


async def test_an_outside_fault_is_waited_out_degraded_and_never_escalates() -> None:
    import errno

    reg = Registry()
    attempts = 0
    degraded_seen = []

    async def disk_full() -> None:
        nonlocal attempts
        attempts += 1
        degraded_seen.append(reg.states.get("w"))
        if attempts <= 8:
            raise OSError(errno.ENOSPC, "No space left on device")

    sup = Supervisor(
        "s", [ChildSpec("w", disk_full)], reg, max_restarts=2, period=60, backoff=fast()
    )
    with anyio.fail_after(5):
        await sup.run()
    assert attempts == 9, "8 failures past a budget of 2 must not escalate"
    assert "degraded" in degraded_seen
    assert reg.faults == {"disk_full": 8}


def test_outside_faults_are_told_apart_from_bugs() -> None:
    import errno
    import sqlite3

    from k2d.runtime import outside_fault

    class Wrapped(Exception):
        pass

    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system")
        except OSError as e:
            raise Wrapped("journal write failed") from e
    except Wrapped as w:
        wrapped = w
    assert outside_fault(wrapped) == "read_only"
    assert outside_fault(sqlite3.OperationalError("database is locked")) == "catalog_locked"
    assert outside_fault(OverflowError("int too large")) is None
    group = ExceptionGroup("g", [OSError(errno.ENOSPC, "full"), ValueError("bug")])
    assert outside_fault(group) is None, "one bug among outside faults is a bug"
    assert outside_fault(ExceptionGroup("g", [OSError(errno.EIO, "io")])) == "io_error"


async def test_a_built_one_for_all_prepares_every_round_and_releases_it() -> None:
    import contextlib
    from collections.abc import AsyncIterator

    reg = Registry()
    log: list[str] = []
    rounds = 0

    @contextlib.asynccontextmanager
    async def build() -> AsyncIterator[list[ChildSpec]]:
        nonlocal rounds
        rounds += 1
        n = rounds
        log.append(f"prepare {n}")

        async def child() -> None:
            if n == 1:
                raise RuntimeError("round 1 fails")

        try:
            yield [ChildSpec("c", child)]
        finally:
            log.append(f"release {n}")

    sup = Supervisor("chain", build, reg, Strategy.ONE_FOR_ALL, max_restarts=5, backoff=fast())
    with anyio.fail_after(5):
        await sup.run()
    assert log == ["prepare 1", "release 1", "prepare 2", "release 2"]
    assert reg.restarts == {"c": 1}


def test_failpoints_fire_once_or_every_nth_pass() -> None:
    import errno

    from k2d import failpoints

    try:
        failpoints.load("a=2:raise,b=*3:enospc")
        failpoints.hit("a")
        with pytest.raises(failpoints.FailpointError):
            failpoints.hit("a")
        for _ in range(5):
            failpoints.hit("a")  # once only
        fired: list[tuple[int, int | None]] = []
        for i in range(1, 10):
            try:
                failpoints.hit("b")
            except OSError as e:
                fired.append((i, e.errno))
        assert fired == [(3, errno.ENOSPC), (6, errno.ENOSPC), (9, errno.ENOSPC)]
        failpoints.hit("unarmed")
        with pytest.raises(ValueError, match="name=N:action"):
            failpoints.load("c=0:raise")
    finally:
        failpoints.load("")
