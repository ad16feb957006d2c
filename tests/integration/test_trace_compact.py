"""`k2d compact` leaves its trace behind: run as its own process on a real table with small
files, it writes a maintenance.round trace to the data dir's trace store, which `k2d traces
list` and `show` read after the command has exited."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from k2d.config import StorageConfig
from k2d.storage import Warehouse
from tests.integration.test_maintenance import Feeder


def k2d(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "k2d", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_a_compact_run_is_a_trace_that_k2d_traces_lists_after_it_exits(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with Warehouse(StorageConfig(data_dir=str(data))) as wh:
        wh.ensure_tables()
        Feeder(wh).fill(commits=6, rows=50, days=(3,))  # six small files in a closed day
    config = tmp_path / "k2d.toml"
    config.write_text(f'[storage]\ndata_dir = "{data}"\n[maintenance]\norphan_file_age = 0.0\n')

    compacted = k2d("compact", "--config", str(config), "--table", "trades", cwd=tmp_path)
    assert compacted.returncode == 0, compacted.stderr
    assert "1 partitions compacted" in compacted.stdout

    listed = k2d("traces", "list", "--config", str(config), cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    [line] = listed.stdout.splitlines()  # the one round, nothing else ran here
    trace_id, *_ = line.split()
    assert len(trace_id) == 32
    assert "maintenance.round" in line
    assert "k2d.command=compact" in line
    assert "error" not in line

    shown = k2d("traces", "show", trace_id, "--config", str(config), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    tree = shown.stdout
    assert "maintenance.round" in tree
    compact = next(x for x in tree.splitlines() if "maintenance.compact" in x)
    assert "k2d.table=trades" in compact and "k2d.files_before=6" in compact
    assert "maintenance.expire" in tree
