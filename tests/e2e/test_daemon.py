"""`k2d run` as a real process against the simulator: drain, kill, escalation."""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.e2e.accounting import wait_ready
from tests.e2e.conftest import daemon, read_table, write_config
from tests.e2e.test_faults import free_port

SYMBOLS = ["BTCUSDT", "ETHUSDT"]


def test_sigterm_drains_and_commits_the_last_batch_within_the_deadline(
    tmp_path: Path, simulator: Any
) -> None:
    sim = simulator("--symbols", ",".join(SYMBOLS), "--rate", "2000", "--seed", "11")
    data = tmp_path / "data"
    port = free_port()
    # Nothing commits before the drain: the only trades commit is the last batch.
    cfg = write_config(
        tmp_path / "c.toml",
        data,
        sim,
        SYMBOLS,
        """
[writer]
flush_interval = 600.0
flush_rows = 10000000
[shutdown]
drain_timeout = 20.0
""",
        api_port=port,
    )
    proc = daemon(cfg)
    wait_ready(port, timeout=60)
    time.sleep(3)
    assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, out[-3000:]
    assert elapsed < 20.0
    trades = read_table(data, "trades")
    assert trades.num_rows > 1000
    from k2d.config import StorageConfig
    from k2d.storage import Warehouse

    table = Warehouse(StorageConfig(data_dir=str(data))).load_table("trades")
    assert len(table.snapshots()) == 1
    props = table.current_snapshot().summary.additional_properties  # type: ignore[union-attr]
    assert "k2.watermarks" in props and "k2.log_position" in props


def test_sigkill_at_random_moments_never_corrupts_a_table(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--symbols", ",".join(SYMBOLS), "--rate", "3000", "--seed", "12")
    data = tmp_path / "data"
    port = free_port()
    cfg = write_config(
        tmp_path / "c.toml",
        data,
        sim,
        SYMBOLS,
        """
[writer]
flush_interval = 0.3
""",
        api_port=port,
    )
    rng = random.Random(5)
    rows_before = 0
    for _ in range(3):
        proc = daemon(cfg)
        # Killed while capturing, not while still importing on a loaded machine.
        wait_ready(port, timeout=60)
        time.sleep(rng.uniform(0.5, 2.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        rows = read_table(data, "trades").num_rows  # the table opens and scans after a kill
        assert rows >= rows_before
        rows_before = rows
    proc = daemon(cfg, "--exit-after", "4")
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out[-3000:]
    trades = read_table(data, "trades")
    assert trades.num_rows > rows_before, "a restart after kills continues capturing"
    dupes = [m for m, n in Counter(trades.column("message_id").to_pylist()).items() if n > 1]
    assert dupes == []


def test_repeated_crashes_escalate_and_exit_non_zero(tmp_path: Path, simulator: Any) -> None:
    sim = simulator("--symbols", "BTCUSDT", "--rate", "500", "--seed", "13")
    data = tmp_path / "data"
    port = free_port()
    cfg = write_config(
        tmp_path / "c.toml",
        data,
        sim,
        ["BTCUSDT"],
        """
[writer]
flush_interval = 0.2
[supervisor]
max_restarts = 2
period = 60.0
backoff_initial = 0.05
backoff_max = 0.1
""",
        api_port=port,
    )
    proc = daemon(cfg)
    wait_ready(port, timeout=60)
    time.sleep(1)
    assert proc.poll() is None
    # The warehouse disappears under the running daemon: every commit now fails.
    # (Renamed, not deleted: the daemon keeps writing files while rmtree would walk.)
    (data / "warehouse").rename(tmp_path / "gone")
    (data / "warehouse").write_text("not a directory")
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 70, out[-3000:]
    assert "escalation" in out
