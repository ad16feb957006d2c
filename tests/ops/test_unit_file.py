"""deploy/k2d.service: `systemd-analyze verify` is clean and the unit says what the daemon
needs (notify + watchdog, restart on failure, a sandbox with the state dir writable)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from k2d.config import ShutdownConfig, load_config
from tests.ops.tools import require_tool

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "k2d.service"
SYSUSERS = ROOT / "deploy" / "k2d.sysusers.conf"


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of (key, value) in order: a key may repeat (Environment=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


SECTIONS = parse_unit(UNIT.read_text())
SERVICE = dict(SECTIONS["Service"])  # last value wins, as systemd reads single-valued keys
ENVIRONMENT = dict(
    v.split("=", 1) for k, v in SECTIONS["Service"] if k == "Environment" and "=" in v
)


def verifiable_copy(tmp_path: Path, text: str) -> Path:
    """`systemd-analyze verify` insists that ExecStart's binary exists: the copy runs the
    venv's k2d instead of /opt/k2d's. Everything else is the shipped unit, byte for byte."""
    k2d = Path(sys.executable).parent / "k2d"
    assert k2d.is_file(), f"{k2d} missing: pip install -e . first"
    copy = tmp_path / UNIT.name
    copy.write_text(
        re.sub(r"^ExecStart=\S+", f"ExecStart={k2d}", text, count=1, flags=re.MULTILINE)
    )
    return copy


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    tool = require_tool("systemd-analyze", "Debian: apt-get install -y systemd")
    return subprocess.run(
        [tool, "verify", str(unit)], capture_output=True, text=True, timeout=120, cwd=unit.parent
    )


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    proc = verify(verifiable_copy(tmp_path, UNIT.read_text()))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout + proc.stderr == ""


def test_verify_reports_a_broken_unit(tmp_path: Path) -> None:
    broken = UNIT.read_text().replace("MemoryMax=4G", "MemoryMax=lots\nRestartSecs=5")
    proc = verify(verifiable_copy(tmp_path, broken))
    out = proc.stdout + proc.stderr
    assert "Invalid memory limit 'lots'" in out
    assert "Unknown key" in out and "RestartSecs" in out


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("Restart", "on-failure"),
        ("User", "k2d"),
        ("DynamicUser", "no"),
        ("StateDirectory", "k2d"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("ReadWritePaths", "/var/lib/k2d"),
        ("KillSignal", "SIGTERM"),
    ],
)
def test_service_directive(key: str, value: str) -> None:
    assert SERVICE.get(key) == value


def test_limits_and_timers_are_set() -> None:
    for key in ("WatchdogSec", "RestartSec", "MemoryMax", "LimitNOFILE"):
        assert SERVICE.get(key), f"{key}= missing"
    assert int(SERVICE["LimitNOFILE"]) >= 65536


def test_stop_timeout_outlasts_the_drain_deadline() -> None:
    """systemd SIGKILLs after TimeoutStopSec: the drain must have committed the last batch."""
    assert float(SERVICE["TimeoutStopSec"]) > ShutdownConfig().drain_timeout


def test_config_errors_are_not_restarted_but_escalations_are() -> None:
    prevented = SERVICE["RestartPreventExitStatus"].split()
    assert "2" in prevented and "78" in prevented
    assert "70" not in prevented and "73" not in prevented


def test_exec_start_runs_the_venv_k2d_with_the_configured_config() -> None:
    exec_start = SERVICE["ExecStart"].split()
    assert exec_start[0].endswith("/bin/k2d") and exec_start[1] == "run"
    assert exec_start[exec_start.index("--config") + 1] == "${K2D_CONFIG}"
    assert ENVIRONMENT["K2D_CONFIG"] == "/etc/k2d/config.toml"


def test_the_environment_is_valid_k2d_config(tmp_path: Path) -> None:
    k2d_env = {k: v for k, v in ENVIRONMENT.items() if k.startswith("K2D_") and k != "K2D_CONFIG"}
    cfg = load_config(ROOT / "config.toml", environ=k2d_env)
    assert str(cfg.storage.data_path()) == "/var/lib/k2d" == SERVICE["ReadWritePaths"]


def test_sysusers_creates_the_unit_user() -> None:
    entries = [line.split() for line in SYSUSERS.read_text().splitlines() if line[:2] == "u "]
    assert [e[1] for e in entries] == [SERVICE["User"]]
