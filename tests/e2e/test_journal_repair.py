"""A damaged journal tail is cut back at start and the daemon carries on capturing."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.e2e.conftest import daemon, read_table, write_config


def newest_segment(data: Path) -> Path:
    return sorted((data / "journal" / "feed-binance").glob("*.k2j"))[-1]


def test_torn_and_corrupt_tails_are_cut_back_and_capture_goes_on(
    tmp_path: Path, simulator: Any
) -> None:
    sim = simulator("--symbols", "BTCUSDT", "--rate", "800", "--seed", "31")
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "c.toml", data, sim, ["BTCUSDT"])

    first = daemon(cfg, "--exit-after", "3")
    assert first.wait(timeout=60) == 0
    rows_before = read_table(data, "trades").num_rows
    seg = newest_segment(data)
    raw = seg.read_bytes()
    # A torn tail: the file ends in the middle of a record.
    seg.write_bytes(raw[: len(raw) - 7])

    second = daemon(cfg, "--exit-after", "3")
    out, _ = second.communicate(timeout=60)
    assert second.returncode == 0, out[-2000:]
    assert "truncat" in out.lower()

    seg = newest_segment(data)
    raw = bytearray(seg.read_bytes())
    raw[-3] ^= 0xFF  # a flipped byte inside the last record
    seg.write_bytes(bytes(raw))
    report = subprocess.run(
        [sys.executable, "-m", "k2d", "journal", "inspect", str(seg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert report.returncode == 1, report.stdout
    assert "crc" in report.stdout.lower() or "corrupt" in report.stdout.lower()

    third = daemon(cfg, "--exit-after", "3")
    out, _ = third.communicate(timeout=60)
    assert third.returncode == 0, out[-2000:]
    time.sleep(0.1)
    assert read_table(data, "trades").num_rows > rows_before
    clean = subprocess.run(
        [sys.executable, "-m", "k2d", "journal", "inspect", str(newest_segment(data))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert clean.returncode == 0, clean.stdout
    assert "records" in clean.stdout.lower()
