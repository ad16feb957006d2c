"""deploy/grafana/k2d.json is a Grafana dashboard on a Prometheus data source chosen by
variable, with the panels operations needs; and every metric that a panel or an alert rule
names is exported by a real daemon (`k2d run` against the simulator)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import daemon, start_simulator, write_config
from tests.ops.promql import exposed_names, metric_names

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = json.loads((ROOT / "deploy" / "grafana" / "k2d.json").read_text())
RULES = yaml.safe_load((ROOT / "deploy" / "prometheus" / "k2d-rules.yml").read_text())
DS_UID = "${datasource}"

# Metrics that open issues promise and panels already show. Remove a name once it ships.
PROMISED = {
    "k2d_ws_clients": "WebSocket streaming (/v1/stream): clients connected",
}
# Series Prometheus makes itself, not the daemon.
PROMETHEUS_MADE = {"up"}

_LISTENING = re.compile(r"API listening on http://[\d.]+:(\d+)")


def panels() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in DASHBOARD["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows keep theirs inside
    return out


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in panels() for t in p.get("targets", [])]


def rule_exprs() -> list[str]:
    return [r["expr"] for g in RULES["groups"] for r in g["rules"]]


RECORDED = {r["record"] for g in RULES["groups"] for r in g["rules"] if "record" in r}


# The extractor the live check relies on.


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up == 0", {"up"}),
        (
            'sum by (job, feed) (increase(k2d_feed_frames_total{feed=~"$x"}[3m])) == 0'
            " or max by (feed) (k2d_feed_connected) == 0",
            {"k2d_feed_frames_total", "k2d_feed_connected"},
        ),
        (
            "histogram_quantile(0.99, sum by (table, le) (rate(k2d_commit_seconds_bucket"
            "[$__rate_interval]))) > 2",
            {"k2d_commit_seconds_bucket"},
        ),
        ("(a - a offset 15m) >= 3 or (a >= 3 unless a offset 15m)", {"a"}),
        ("x and on (feed) k2d:venue_trading == 1", {"x", "k2d:venue_trading"}),
        ('label_replace(vector(1), "feed", "feed-binance", "", "")', set()),
        ("predict_linear(free[6h], 24 * 3600) < 0 and free / size < 0.4", {"free", "size"}),
        ('time() - max by (op) (last_run{i=~"$instance"})', {"last_run"}),
    ],
)
def test_metric_names_of_an_expression(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_exposed_names_count_declared_families_and_suffixes() -> None:
    text = (
        "# TYPE k2d_commit_seconds histogram\n"
        "# TYPE k2d_commit_failures_total counter\n"
        "# TYPE k2d_stream_depth gauge\n"
        'k2d_stream_depth{stream="writer.inbox"} 0.0\n'
    )
    names = exposed_names(text)
    assert {"k2d_commit_seconds_bucket", "k2d_commit_seconds_count"} <= names
    assert {"k2d_commit_failures_total", "k2d_stream_depth"} <= names
    assert "k2d_feed_frames_total" not in names


# The dashboard's shape.


def test_dashboard_identity_and_datasource_variable() -> None:
    assert DASHBOARD["uid"] == "k2d-overview" and DASHBOARD["title"]
    assert DASHBOARD["schemaVersion"] >= 36
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"


def test_every_panel_and_query_uses_the_datasource_variable() -> None:
    for panel in panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": DS_UID}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DS_UID, panel["title"]
            assert target["expr"].strip() and target["refId"]
    for variable in DASHBOARD["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == DS_UID
            # "All" must mean the k2d instances listed, not ".*": Prometheus exports
            # process_* of its own, which would mix into the resource panels.
            assert "allValue" not in variable


def test_panels_have_unique_ids_and_fit_the_grid() -> None:
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for p in panels():
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        cells = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & taken, f"{p['title']} overlaps another panel"
        taken |= cells


@pytest.mark.parametrize(
    ("what", "metric"),
    [
        ("ingest rate", "k2d_feed_records_total"),
        ("committed rows", "k2d_rows_committed_total"),
        ("lag from trade time", "k2d_feed_lag_seconds"),
        ("gaps by state", "k2d_gaps_total"),
        ("open gaps", "k2d_open_gaps"),
        ("commit latency", "k2d_commit_seconds_bucket"),
        ("query latency", "k2d_query_seconds_bucket"),
        ("WebSocket clients", "k2d_ws_clients"),
        ("memory", "process_resident_memory_bytes"),
        ("CPU", "process_cpu_seconds_total"),
        ("disk", "k2d_data_dir_free_bytes"),
    ],
)
def test_the_dashboard_shows(what: str, metric: str) -> None:
    assert any(metric in metric_names(e) for e in dashboard_exprs()), what


# Against a running daemon.


@pytest.fixture(scope="module")
def metrics_page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """/metrics of `k2d run` capturing from the simulator, once a commit has landed."""
    tmp = tmp_path_factory.mktemp("dashboard")
    sim = start_simulator(tmp, "--symbols", "BTCUSDT,ETHUSDT", "--rate", "500", "--seed", "7")
    log = tmp / "daemon.log"
    cfg = write_config(
        tmp / "c.toml",
        tmp / "data",
        sim,
        ["BTCUSDT", "ETHUSDT"],
        "[writer]\nflush_interval = 0.5\n",
    )
    with log.open("w") as out:
        proc = daemon(cfg, stdout=out)
    try:
        base = f"http://127.0.0.1:{_api_port(proc, log)}"
        deadline = time.monotonic() + 30
        text = ""
        while time.monotonic() < deadline:
            text = _get(f"{base}/metrics")
            if re.search(r"^k2d_commits_total\{.*\} [1-9]", text, re.MULTILINE):
                break
            time.sleep(0.5)
        _get(f"{base}/v1/trades?symbol=BTCUSDT&limit=1")  # a query, so query series exist
        yield _get(f"{base}/metrics")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        sim.proc.kill()
        sim.proc.wait()


def _api_port(proc: subprocess.Popen[str], log: Path) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = _LISTENING.search(log.read_text())
        if m:
            return int(m.group(1))
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.1)
    raise AssertionError(f"the daemon did not report its API port: {log.read_text()[-3000:]}")


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()  # type: ignore[no-any-return]
    except urllib.error.HTTPError as e:
        return e.read().decode()  # type: ignore[no-any-return]


def test_every_metric_of_the_dashboard_and_the_alerts_is_exported(metrics_page: str) -> None:
    exposed = exposed_names(metrics_page)
    wanted: dict[str, str] = {}
    for where, exprs in (("dashboard", dashboard_exprs()), ("rules", rule_exprs())):
        for expr in exprs:
            for name in metric_names(expr):
                wanted.setdefault(name, where)
    allowed = RECORDED | PROMETHEUS_MADE | set(PROMISED)
    missing = {n: w for n, w in sorted(wanted.items()) if n not in exposed and n not in allowed}
    assert missing == {}, "named but not exported by the daemon"


def test_the_process_and_capture_series_have_samples(metrics_page: str) -> None:
    """Collectors that need no wiring report real values, not just a declaration."""
    samples = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^(\w+)(?:\{[^}]*\})? (\S+)$", metrics_page, re.MULTILINE)
    }
    assert samples["process_resident_memory_bytes"] > 10e6
    assert samples["process_start_time_seconds"] > 1e9
    assert samples["k2d_feed_frames_total"] > 0
