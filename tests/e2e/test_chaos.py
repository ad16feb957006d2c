"""Chaos: SIGKILLs and injected faults, mixed, while the simulator drops, duplicates and
reorders trades. Each daemon lifetime arms one fault inside the process (a raise in a
tracker, the writer or the backfiller; ENOSPC or EIO under the journal or a commit), lets
it fire, and is then killed at a random moment. At the end, after the market closes, the
ledger must have no open gap within a bounded time, with 0 trades lost and 0 duplicated.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path
from typing import Any

from tests.e2e.accounting import account, wait_capturing, wait_gaps_closed, wait_ready
from tests.e2e.conftest import daemon, write_config
from tests.e2e.test_faults import CONFIG, free_port

SYMBOLS = ["BTCUSDT", "ETHUSDT"]
LIFETIMES = 11
FAULTS = (
    "tracker.process=25:raise",
    "writer.commit.trades=3:raise",
    "writer.commit.sequence_events=2:raise",
    "writer.commit.quotes=2:eio",
    "journal.write=8:enospc",
    "backfill.page=1:raise",
)


def test_chaos_of_kills_and_faults_loses_and_duplicates_nothing(
    tmp_path: Path, simulator: Any
) -> None:
    sim = simulator(
        "--symbols",
        ",".join(SYMBOLS),
        "--rate",
        "1500",
        "--seed",
        "44",
        "--faults",
        "drop=0.01,dup=0.01,reorder=0.01",
        "--record-quotes",
    )
    data = tmp_path / "data"
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", data, sim, SYMBOLS, CONFIG, api_port=port)
    rng = random.Random(4242)
    kills = fired = 0
    for life in range(LIFETIMES):
        fault = FAULTS[life % len(FAULTS)]
        log = tmp_path / f"life-{life}.log"
        with log.open("w") as out:
            proc = daemon(cfg, env={"K2D_FAILPOINTS": fault}, stdout=out)
            wait_ready(port)
            # The fault fires after some passes (sooner or later on a loaded machine); the
            # kill comes at a random moment after it, or after 20 s if it never came.
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and "fires (pass" not in log.read_text():
                time.sleep(0.1)
            time.sleep(rng.uniform(0.2, 2.0))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        kills += 1
        fired += log.read_text().count("fires (pass")
    events = kills + fired
    assert events >= 20, f"only {kills} kills and {fired} injected faults fired"

    proc = daemon(cfg)
    try:
        wait_capturing(port)
        time.sleep(2)
        manifest = sim.close_market()
        closed_after = wait_gaps_closed(port, timeout=240)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out[-3000:]
    acc = account(data, manifest)
    assert acc.open_gap_ids == 0
    print(
        f"\nchaos: {kills} SIGKILLs and {fired} injected faults; {acc.stored} trades stored, "
        f"{acc.lost} lost, {acc.duplicated} duplicated, {acc.backfilled} backfilled; no gap "
        f"open {closed_after:.1f}s after the market closed; {acc.quotes_lost} quotes lost, "
        f"each inside one of {acc.outages} outage rows"
    )
