"""The checks scripts/drill.sh runs between its steps: waits on a running daemon's /ready
and /metrics, the fault tests' accounting of the tables against the simulator's manifest
(tests/e2e/accounting.py), a garbled journal tail, and a restore compared with its source.

Each command prints one line and exits 0 when the check holds, 1 when it does not.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The waits poll HTTP only; the table checks import pyarrow and pyiceberg (seconds of CPU
# on a small machine), so they import them, and tests/e2e/accounting.py, when they run.


def get_json(port: int, path: str) -> Any:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def metric_sum(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
            text = r.read().decode()
    except OSError:
        return None
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def _ready(port: int) -> dict[str, Any] | None:
    try:
        body: dict[str, Any] = get_json(port, "/ready")
    except (OSError, ValueError):
        return None
    return body


def wait_ready_cmd(port: str, timeout: str = "60") -> str:
    started = time.monotonic()
    while time.monotonic() - started < float(timeout):
        body = _ready(int(port))
        if body and body.get("status") == "ready":
            return f"ready after {time.monotonic() - started:.1f}s"
        time.sleep(0.2)
    raise AssertionError(f"not ready within {timeout}s")


def wait_degraded(port: str, timeout: str = "30") -> str:
    """Until an actor reports DEGRADED; prints which and why."""
    started = time.monotonic()
    while time.monotonic() - started < float(timeout):
        body = _ready(int(port))
        if body:
            bad = {a: s for a, s in body["actors"].items() if s == "degraded"}
            if bad:
                why = "; ".join(f"{a}: {r}" for a, r in body.get("degraded", {}).items())
                return f"degraded after {time.monotonic() - started:.1f}s ({why[:160]})"
        time.sleep(0.2)
    raise AssertionError(f"no actor degraded within {timeout}s")


def wait_running(port: str, timeout: str = "60") -> str:
    """Until every actor has run (none degraded or restarting) for 3 s in a row and trade
    rows are being committed again."""
    started = time.monotonic()
    healthy_since = None
    rows = metric_sum(int(port), "k2d_rows_committed_total") or 0.0
    while time.monotonic() - started < float(timeout):
        body = _ready(int(port))
        healthy = bool(
            body
            and body.get("status") == "ready"
            and all(s in ("running", "stopped") for s in body["actors"].values())
        )
        if not healthy:
            healthy_since = None
        else:
            healthy_since = healthy_since or time.monotonic()
            now_rows = metric_sum(int(port), "k2d_rows_committed_total") or 0.0
            if time.monotonic() - healthy_since >= 3 and now_rows > rows:
                return (
                    f"every actor running again {healthy_since - started:.1f}s later, "
                    f"{now_rows - rows:,.0f} rows committed since"
                )
        time.sleep(0.2)
    raise AssertionError(f"actors not all running {timeout}s later: {_ready(int(port))}")


def wait_committed(port: str, timeout: str = "30") -> str:
    """Until this process has committed trade rows (its metric counts from its start)."""
    started = time.monotonic()
    while time.monotonic() - started < float(timeout):
        rows = metric_sum(int(port), "k2d_rows_committed_total")
        if rows:
            return f"{rows:,.0f} rows committed after {time.monotonic() - started:.1f}s"
        time.sleep(0.25)
    raise AssertionError(f"nothing committed within {timeout}s")


def wait_gaps(port: str, timeout: str = "120") -> str:
    """Until no gap is open, held for 2 s (as the fault tests wait)."""
    started = time.monotonic()
    quiet_since = None
    while time.monotonic() - started < float(timeout):
        if metric_sum(int(port), "k2d_open_gaps") == 0:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= 2:
                return f"gaps closed {quiet_since - started:.1f}s after the market closed"
        else:
            quiet_since = None
        time.sleep(0.25)
    raise AssertionError(f"gaps still open {timeout}s after the market closed")


def account_cmd(data: str, manifest: str) -> str:
    """The fault tests' accounting (tests/e2e/accounting.py) of the tables against what
    the simulator says it sent."""
    from tests.e2e.accounting import account

    sent = json.loads(Path(manifest).read_text())
    acc = account(Path(data), sent)
    assert acc.open_gap_ids == 0, f"{acc.open_gap_ids} sent trades still in open gaps"
    return (
        f"{acc.sent:,} trades sent, {acc.stored:,} stored, lost {acc.lost}, duplicated "
        f"{acc.duplicated}, {acc.backfilled} backfilled; {acc.quotes_lost} quotes lost, all "
        f"inside {acc.outages} outage rows"
    )


def garble(segment: str) -> str:
    """Flip a byte inside the last record of a journal segment (its CRC no longer holds)."""
    path = Path(segment)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    return f"flipped a byte {len(raw) - 3} bytes into {path.name} ({len(raw)} bytes)"


def compare_restore(backup: str, source: str, restored: str) -> str:
    """Every table of the restored data dir holds exactly the source's rows at the
    backup's snapshot, from files under the restored dir only."""
    from k2d.config import StorageConfig
    from k2d.storage import Warehouse

    manifest = json.loads((Path(backup) / "k2d-backup.json").read_text())
    checked = []
    for name, info in sorted(manifest["tables"].items()):
        if info["snapshot_id"] is None:
            continue
        namespace, _, table = name.rpartition(".")
        got = []
        for data, snapshot in ((source, info["snapshot_id"]), (restored, None)):
            with Warehouse(StorageConfig(data_dir=data, namespace=namespace)) as wh:
                scan = wh.load_table(table).scan(snapshot_id=snapshot)
                if data == restored:
                    root = f"file://{Path(restored).resolve()}/"
                    outside = [t.file.file_path for t in scan.plan_files()]
                    outside = [p for p in outside if not p.startswith(root)]
                    assert not outside, f"{name}: restored table reads {outside[0]}"
                got.append(sorted(repr(sorted(r.items())) for r in scan.to_arrow().to_pylist()))
        assert got[0] == got[1], f"{name}: {len(got[1])} rows restored, {len(got[0])} at backup"
        checked.append(f"{table} {len(got[1]):,}")
    return "restored rows equal the backup's snapshots: " + ", ".join(checked)


COMMANDS = {
    "wait-ready": wait_ready_cmd,
    "wait-degraded": wait_degraded,
    "wait-running": wait_running,
    "wait-committed": wait_committed,
    "wait-gaps-closed": wait_gaps,
    "account": account_cmd,
    "garble": garble,
    "compare-restore": compare_restore,
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: drill_check.py {{{','.join(COMMANDS)}}} ARGS...", file=sys.stderr)
        return 2
    try:
        print(COMMANDS[argv[0]](*argv[1:]))
    except AssertionError as exc:
        print(f"check failed: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
