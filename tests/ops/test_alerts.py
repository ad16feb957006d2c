"""deploy/prometheus: the rules pass promtool's checks and unit tests, and the unit tests
would notice an alert that no longer fires."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ops.tools import require_tool

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "k2d-rules.yml"
RULE_TESTS = PROM / "k2d-rules.test.yml"


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


ALERTS = [r["alert"] for r in alert_rules()]


@pytest.fixture(scope="module")
def promtool() -> str:
    return require_tool("promtool", "Debian: apt-get install -y prometheus")


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_rules_pass_promtool_check(promtool: str) -> None:
    proc = run(promtool, "check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(ALERTS) + 1} rules found" in proc.stdout  # + k2d:venue_trading


def test_compose_prometheus_config_passes_promtool_check(promtool: str) -> None:
    proc = run(promtool, "check", "config", str(PROM / "prometheus.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rule_unit_tests_pass(promtool: str) -> None:
    proc = run(promtool, "test", "rules", RULE_TESTS.name, cwd=PROM)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases = [
        case
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    fires = {c["alertname"] for c in cases if c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert sorted(set(ALERTS) - fires) == [], "alerts without a test series that fires them"
    assert sorted(set(ALERTS) - quiet) == [], "alerts without a test series that stays quiet"


@pytest.mark.parametrize("alert", ALERTS)
def test_the_rule_tests_notice_an_alert_that_never_fires(
    promtool: str, tmp_path: Path, alert: str
) -> None:
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = "vector(1) == 0"
    (tmp_path / RULES.name).write_text(yaml.safe_dump(doc))
    # Only the test groups about this alert: the whole file takes seconds per run.
    tests = yaml.safe_load(RULE_TESTS.read_text())
    tests["tests"] = [
        t for t in tests["tests"] if any(c["alertname"] == alert for c in t["alert_rule_test"])
    ]
    (tmp_path / RULE_TESTS.name).write_text(yaml.safe_dump(tests))
    proc = run(promtool, "test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert proc.returncode != 0
    assert f"alertname: {alert}," in proc.stdout + proc.stderr


@pytest.mark.parametrize("rule", alert_rules(), ids=ALERTS)
def test_every_alert_says_how_bad_what_and_where_to_look(rule: dict[str, Any]) -> None:
    assert rule["labels"]["severity"] in ("critical", "warning")
    annotations = rule["annotations"]
    assert annotations["summary"] and annotations["description"]
    assert annotations["runbook_url"] == f"docs/runbooks/{rule['alert']}.md"
