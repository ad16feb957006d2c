"""`k2d demo`: simulator with faults -> daemon -> Iceberg; every sent trade accounted for."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.compute as pc

from tests.e2e.conftest import open_gap_ids, read_table


def test_demo_stores_every_sent_trade_or_reports_it_missing(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "k2d",
            "demo",
            "--exit-after",
            "30",
            "--data-dir",
            str(data),
            "--api-port",
            "0",
            "--rate",
            "3000",
            "--faults",
            "drop=0.01,dup=0.01,reorder=0.01,malformed=0.002",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "API: http://127.0.0.1:" in proc.stdout
    assert "gaps open" in proc.stdout  # the status line

    manifest = json.loads((data / "simulator" / "manifest.json").read_text())
    trades = read_table(data, "trades")
    quotes = read_table(data, "quotes")
    events = read_table(data, "sequence_events")
    dead = read_table(data, "dead_letters")
    assert trades.num_rows > 30_000 and quotes.num_rows > 30_000

    ids_all = trades.column("message_id").to_pylist()
    assert [m for m, n in Counter(ids_all).items() if n > 1] == [], "duplicate message_id"

    for symbol, sent in manifest["symbols"].items():
        stored = set(
            trades.filter(pc.equal(trades["symbol"], symbol)).column("source_sequence").to_pylist()
        )
        missing = open_gap_ids(events, symbol)
        expected = set(range(sent["first_trade_id"], sent["last_trade_id"] + 1))
        assert stored & missing == set()
        assert stored | missing == expected, (
            f"{symbol}: {len(expected - stored - missing)} sent ids neither stored nor in a "
            f"gap; {len((stored | missing) - expected)} ids beyond what was sent"
        )
        # Only dropped trades can be missing; the backfiller fetched the others from REST.
        assert missing <= set(sent["dropped"])
        sym = trades.filter(pc.equal(trades["symbol"], symbol))
        backfilled = set(
            sym.filter(pc.equal(sym["provenance"], "backfill"))
            .column("source_sequence")
            .to_pylist()
        )
        assert backfilled <= set(sent["dropped"])
        assert len(backfilled) > 0, "dropped trades are backfilled while the demo runs"

    assert dead.num_rows == manifest["malformed_frames"] > 0
    assert set(dead.column("reason").to_pylist()) <= {
        "bad_json",
        "missing_field",
        "invalid_number",
        "non_positive",
        "clock_skew",
        "unknown_symbol",
        "unknown_stream",
        "frame_too_large",
    }
