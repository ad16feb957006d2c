"""One fault model, checked from outside: a real `k2d run` against the simulator, one fault
inside the running process at a time. Whatever fails, the tables must end up as if the
process had been killed at that moment and restarted: every trade the simulator sent is
stored exactly once or inside a gap the ledger still shows open (none once the backfiller
has caught up), quotes lost in the fault are covered by an outage row, no ledger row says
backfilled for an id that is not stored, and the daemon is still running.

Run with `-s` to see one line per fault: what the daemon did, rows lost and duplicated,
and the time from the fault until every actor was running again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.e2e.accounting import (
    account,
    get_json,
    wait_capturing,
    wait_gaps_closed,
    wait_ready,
)
from tests.e2e.conftest import SimProcess, daemon, write_config

SYMBOLS = ["BTCUSDT", "ETHUSDT"]
CONFIG = """
[writer]
flush_interval = 0.3
[journal]
fsync_interval = 0.05
[sequencer]
gap_grace = 0.3
rerequest_after = 3.0
[supervisor]
backoff_initial = 0.2
backoff_max = 2.0
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Health:
    """Samples /ready in the background: when actors first left `running`, when they were
    last seen otherwise, and which states they passed through."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.first_bad: float | None = None
        self.last_bad: float | None = None
        self.states: set[str] = set()
        self.restarts: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                body = get_json(self.port, "/ready")
                bad = {s for s in body["actors"].values() if s not in ("running", "stopped")}
                self.states |= set(body["actors"].values())
                self.restarts = body.get("restarts", {})
                if bad:
                    now = time.monotonic()
                    self.first_bad = self.first_bad or now
                    self.last_bad = now
            time.sleep(0.1)

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join()
        if self.first_bad is None or self.last_bad is None:
            return None
        return self.last_bad - self.first_bad


def run_fault(
    tmp_path: Path,
    simulator: Any,
    name: str,
    *,
    env: dict[str, str] | None = None,
    during: Callable[[SimProcess, subprocess.Popen[str]], str] | None = None,
    data: Path | None = None,
    extra: str = "",
    seconds: float = 10.0,
) -> dict[str, Any]:
    """Capture for `seconds` with the fault armed (or `during` doing it); then close the
    market, wait for the backfill, drain, and check the tables."""
    sim = simulator(
        "--symbols",
        ",".join(SYMBOLS),
        "--rate",
        "1000",
        "--seed",
        "31",
        "--faults",
        "drop=0.005,dup=0.005,reorder=0.005",
        "--record-quotes",
    )
    data = data or tmp_path / "data"
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", data, sim, SYMBOLS, CONFIG + extra, api_port=port)
    proc = daemon(cfg, env=env)
    try:
        wait_ready(port)
        health = Health(port)
        t0 = time.monotonic()
        what = during(sim, proc) if during is not None else ""
        time.sleep(max(0.0, seconds - (time.monotonic() - t0)))
        wait_capturing(port)
        manifest = sim.close_market()
        closed_after = wait_gaps_closed(port, timeout=120)
        assert proc.poll() is None, "the daemon died instead of recovering"
        to_healthy = health.stop()
        restarts = health.restarts
        states = health.states
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out[-4000:]
    acc = account(data, manifest)
    result = {
        "fault": name,
        "did": what or ", ".join(sorted(f"{k} x{v}" for k, v in restarts.items())),
        "states": sorted(states),
        "lost": acc.lost,
        "duplicated": acc.duplicated,
        "to_healthy_s": to_healthy,
        "gaps_closed_s": closed_after,
        "backfilled": acc.backfilled,
        "quotes_lost": acc.quotes_lost,
        "outages": acc.outages,
        "log": out,
    }
    print(
        f"\nFAULT {name}: {result['did']}; states {result['states']}; lost {acc.lost}, "
        f"duplicated {acc.duplicated}; healthy after "
        f"{'-' if to_healthy is None else f'{to_healthy:.1f}s'}; gaps closed "
        f"{closed_after:.1f}s after the market closed; {acc.backfilled} trades backfilled; "
        f"{acc.quotes_lost} quotes lost, all inside {acc.outages} outage rows"
    )
    return result


def test_a_trades_commit_failing_after_the_other_tables_of_its_flush_is_undone(
    tmp_path: Path, simulator: Any
) -> None:
    r = run_fault(
        tmp_path,
        simulator,
        "trades commit fails after quotes committed",
        env={"K2D_FAILPOINTS": "writer.commit.trades=8:raise"},
    )
    assert "failpoint writer.commit.trades fires" in r["log"]
    assert "recovery undid the cut-short flush on" in r["log"]
    assert "restarting" in r["states"]


def test_a_tracker_that_raises_brings_the_chain_back_through_recovery(
    tmp_path: Path, simulator: Any
) -> None:
    r = run_fault(
        tmp_path,
        simulator,
        "tracker raises",
        env={"K2D_FAILPOINTS": "tracker.process=150:raise"},
    )
    assert "failpoint tracker.process fires" in r["log"]
    assert "restarting" in r["states"]


def test_the_backfiller_raising_mid_page_loses_no_gap(tmp_path: Path, simulator: Any) -> None:
    r = run_fault(
        tmp_path,
        simulator,
        "backfiller raises mid-page",
        env={"K2D_FAILPOINTS": "backfill.page=3:raise"},
    )
    assert "failpoint backfill.page fires" in r["log"]
    assert r["backfilled"] > 0


def _can_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = Path(f"/tmp/k2d-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)])
        if ok.returncode != 0:
            return False
        subprocess.run(["umount", str(probe)], check=True)
        return True
    finally:
        probe.rmdir()


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            # Something of this test process still holds a file there: detach it now, the
            # kernel frees it once the last file is closed.
            subprocess.run(["umount", "-l", str(path)], check=True)


MOUNTS = _can_mount()


def test_a_full_disk_degrades_the_daemon_which_resumes_when_space_returns(
    tmp_path: Path, simulator: Any
) -> None:
    if not MOUNTS:
        # Not root (or no mount): the same fault injected where the journal writes.
        r = run_fault(
            tmp_path,
            simulator,
            "disk full (injected ENOSPC at the journal's write; no tmpfs here)",
            env={"K2D_FAILPOINTS": "journal.write=40:enospc"},
        )
        assert "degraded" in r["states"]
        return

    def fill(sim: SimProcess, proc: subprocess.Popen[str]) -> str:
        time.sleep(2)
        filler = data / "filler"
        # The filler takes what is left; on a slow machine the daemon's own files may
        # already leave too little to create it, which is the same fault.
        with contextlib.suppress(OSError), filler.open("wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        time.sleep(8)
        filler.unlink(missing_ok=True)
        return "data_dir on a 96 MB tmpfs filled to ENOSPC for 8 s, then freed"

    with tmpfs(tmp_path / "small", "96m") as data:
        r = run_fault(
            tmp_path,
            simulator,
            "disk full",
            during=fill,
            data=data,
            seconds=16,
            # The start-up free-space check would refuse a filesystem this small.
            env={"K2D_STORAGE__MIN_FREE_BYTES": "0"},
        )
    assert "degraded" in r["states"]
    assert "is degraded: disk_full" in r["log"] or "commit failing (disk_full)" in r["log"]


def test_the_journal_directory_turned_read_only_for_ten_seconds(
    tmp_path: Path, simulator: Any
) -> None:
    if not MOUNTS:
        r = run_fault(
            tmp_path,
            simulator,
            "journal read-only (injected EROFS at the journal's write; no tmpfs here)",
            env={"K2D_FAILPOINTS": "journal.write=40:erofs"},
        )
        assert "degraded" in r["states"]
        return
    journal = tmp_path / "journal"

    def read_only(sim: SimProcess, proc: subprocess.Popen[str]) -> str:
        # Linux refuses to remount a filesystem read-only while a file on it is open for
        # writing, so the first failing write is injected (EROFS); the daemon then closes
        # the journal and every reopen meets the real read-only filesystem for 10 s.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ro = subprocess.run(["mount", "-o", "remount,ro", str(journal)], capture_output=True)
            if ro.returncode == 0:
                break
            time.sleep(0.01)
        else:
            raise AssertionError("the journal's filesystem never became free to remount")
        time.sleep(10)
        subprocess.run(["mount", "-o", "remount,rw", str(journal)], check=True)
        return "journal directory remounted read-only for 10 s (first write EROFS injected)"

    with tmpfs(journal, "256m"):
        r = run_fault(
            tmp_path,
            simulator,
            "journal read-only",
            env={
                "K2D_FAILPOINTS": "journal.write=20:erofs",
                "K2D_JOURNAL__DIRECTORY": str(journal),
                "K2D_STORAGE__MIN_FREE_BYTES": "0",
            },
            during=read_only,
            seconds=18,
        )
    assert "degraded" in r["states"]
    assert "read_only" in r["log"]
