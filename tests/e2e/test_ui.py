"""The live page (`/`) and the trace view (`/ui/trace.html`) in a real headless Chromium
(Debian's chromium and chromedriver, driven by selenium), against a real `k2d run` with API
keys on, fed by the simulator (which drops some trade frames, keeping them in its REST
history, so gaps open and are backfilled).

Every test checks what a person at the browser would notice: no console errors, no request
to anything but the daemon on 127.0.0.1, the chart moving with live trades, a dropped trade
on the gap timeline turning backfilled, a trace drawn as a waterfall. Screenshots go to
a temporary directory, or to docs/screenshots/ for the README when K2D_UPDATE_SCREENSHOTS=1
(a test run leaves the checkout as it was). Without chromium/chromedriver the tests are skipped,
except in CI (CI=true), where that is a failure.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.accounting import wait_capturing
from tests.e2e.conftest import SimProcess, daemon, start_simulator, write_config
from tests.e2e.test_faults import free_port
from tests.ops.tools import require_tool

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "docs" / "screenshots"
SYMBOLS = ["BTCUSDT", "ETHUSDT"]
KEY = "ui-test-key"
CONFIG = """
[writer]
flush_interval = 0.3
[sequencer]
gap_grace = 0.3
"""
WINDOW = (1360, 1260)


@dataclass
class Daemon:
    sim: SimProcess
    proc: subprocess.Popen[str]
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get_json(self, path: str) -> Any:
        request = urllib.request.Request(self.base + path, headers={"X-API-Key": KEY})
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("ui")
    # About one dropped trade a second per symbol: a gap to watch opens within seconds.
    sim = start_simulator(
        tmp,
        "--symbols",
        ",".join(SYMBOLS),
        "--rate",
        "200",
        "--seed",
        "11",
        "--faults",
        "drop=0.01",
    )
    port = free_port()
    cfg = write_config(tmp / "c.toml", tmp / "data", sim, SYMBOLS, CONFIG, api_port=port)
    log = (tmp / "daemon.log").open("w")
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    proc = daemon(cfg, stdout=log, env={"K2D_API__API_KEYS": json.dumps([digest])})
    try:
        wait_capturing(port)
        yield Daemon(sim, proc, port)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
            sim.proc.kill()
            sim.proc.wait()
            log.close()
    assert proc.returncode == 0, (tmp / "daemon.log").read_text()[-3000:]


@pytest.fixture(scope="module")
def browser(running: Daemon) -> Iterator[Any]:
    """One headless Chromium for the module (its tab keeps the key in sessionStorage)."""
    chromium = require_tool("chromium", "apt-get install -y chromium chromium-driver")
    chromedriver = require_tool("chromedriver", "apt-get install -y chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("selenium is not installed (pip install -e '.[dev]')")
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        # Belt and braces: a name outside loopback does not even resolve, so the page
        # cannot reach one (the performance log below would still show the attempt).
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 0.05) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def js(driver: Any, script: str) -> Any:
    return driver.execute_script(script)


def requested_urls(driver: Any) -> list[str]:
    """Every URL the page asked for (HTTP and WebSocket) since the last call."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
        elif message["method"] == "Network.webSocketCreated":
            urls.append(message["params"]["url"])
    return urls


def assert_clean(driver: Any, port: int) -> list[str]:
    """No console errors and no request beyond the daemon since the last call; returns
    the URLs requested."""
    errors = [
        e
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE" or "Content Security" in e["message"]
    ]
    assert not errors, f"console errors: {errors}"
    urls = requested_urls(driver)
    assert urls, "the performance log recorded no request: the check would prove nothing"
    outside = [
        u
        for u in urls
        if urllib.parse.urlsplit(u).scheme not in ("data", "blob")
        and urllib.parse.urlsplit(u).netloc != f"127.0.0.1:{port}"
    ]
    assert not outside, f"requests leaving the daemon: {outside}"
    return urls


def open_live_page(driver: Any, running: Daemon) -> None:
    """The live page, with the key entered if this tab has none yet."""
    driver.get(running.base + "/")
    wait_for("the page to start", lambda: js(driver, "return !!window.K2D && !!window.Plotly"), 15)
    if wait_for("the key form", lambda: js(driver, _KEY_FORM_STATE), 10) == "true":
        enter_key(driver)
    wait_for("the stream to go live", lambda: _stream_state(driver) == "live", 15)


_KEY_FORM_STATE = "return document.getElementById('key-form').dataset.needed || ''"


def _stream_state(driver: Any) -> str:
    return str(js(driver, "return document.getElementById('stream-state').dataset.state"))


def enter_key(driver: Any) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "key-input").send_keys(KEY)
    driver.find_element(By.ID, "key-save").click()


def screenshot(driver: Any, name: str) -> Path:
    if os.environ.get("K2D_UPDATE_SCREENSHOTS") == "1":
        folder = SCREENSHOTS
    else:
        folder = Path(tempfile.gettempdir()) / "k2d-screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    assert driver.save_screenshot(str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 20_000 < len(data) < 600_000, len(data)
    return path


_CHART = """
const c = document.getElementById('price-chart');
return {rows: Number(c.dataset.liveRows), updates: Number(c.dataset.updates),
        bars: c.data ? c.data[0].x.length : 0, lag: Number(c.dataset.lagMs)};
"""


def test_the_page_asks_for_the_key_once_then_charts_live_trades(
    running: Daemon, browser: Any
) -> None:
    """With keys on, the page asks for the key before any /v1 call; once it is entered the
    stream goes live and the chart draws trades at most 2 s old, within 2 s."""
    driver = browser
    driver.get(running.base + "/")
    wait_for("the key prompt", lambda: js(driver, _KEY_FORM_STATE) == "true", 15)
    assert _stream_state(driver) == "error"
    before_key = assert_clean(driver, running.port)
    assert not [u for u in before_key if "/v1/" in u], "the page called /v1 without a key"
    assert any(u.endswith("/ui/vendor/plotly.min.js") for u in before_key)

    enter_key(driver)
    wait_for("the stream to go live", lambda: _stream_state(driver) == "live", 15)
    live_at = time.monotonic()
    assert js(driver, "return sessionStorage.getItem('k2d.apiKey')") == KEY
    # Watch the chart for 4 s: each redraw with new rows, when it came and how old the
    # newest live trade it drew was (the page notes that age as it draws).
    redraws: list[tuple[float, dict[str, Any]]] = []
    seen = js(driver, _CHART)
    while time.monotonic() - live_at < 4.0:
        chart = js(driver, _CHART)
        if chart["updates"] > seen["updates"] and chart["rows"] > seen["rows"]:
            redraws.append((time.monotonic(), chart))
            seen = chart
        time.sleep(0.05)
    assert redraws, "the chart drew no live trade"
    assert redraws[0][0] - live_at < 2.0, "the first live trades took over 2 s to be drawn"
    times = [live_at, *(t for t, _ in redraws), time.monotonic()]
    assert max(b - a for a, b in itertools.pairwise(times)) < 2.0, "the chart stalled"
    ages = [c["lag"] for _, c in redraws]
    assert max(ages) < 2000, f"live trades drawn over 2 s after they happened: {ages} ms"
    assert redraws[-1][1]["bars"] > 0

    tape = js(driver, "return document.querySelectorAll('#tape tr').length")
    assert tape > 0
    # Health: every actor listed and running, and an ingest rate from two /metrics samples.
    actors = wait_for(
        "the actors' states",
        lambda: js(
            driver, "return [...document.querySelectorAll('#actors tr')].map(r => r.textContent)"
        ),
        5,
    )
    assert any(a.startswith("writer") and "running" in a for a in actors), actors
    rate = wait_for("an ingest rate", lambda: "rec/s" in js(driver, _TEXT % "ingest-rate"), 6)
    assert rate
    urls = assert_clean(driver, running.port)
    assert any(u.startswith(f"ws://127.0.0.1:{running.port}/v1/stream") for u in urls)


_TEXT = "return document.getElementById('%s').textContent"
_GAPS = """
return [...document.querySelectorAll('#gap-list li')].map(li => ({
  id: li.dataset.eventId, status: li.dataset.status, seen: li.dataset.seen,
  first: Number(li.dataset.first), last: Number(li.dataset.last)}));
"""
_RATE_SAMPLES = """
const c = document.getElementById('rate-chart');
return c.data ? c.data[0].x.length : 0;
"""
_BACKFILLED_POINTS = """
const t = (document.getElementById('gap-chart').data || []).find(t => t.name === 'backfilled');
return t ? t.x.filter(v => v !== null).length : 0;
"""


def test_a_dropped_trade_shows_as_a_gap_that_turns_backfilled(
    running: Daemon, browser: Any
) -> None:
    """A trade the simulator left off the wire appears on the gap timeline as open, then as
    backfilled, with the ids the simulator says it dropped."""
    driver = browser
    open_live_page(driver, running)

    def closed_after_open() -> list[dict[str, Any]]:
        return [g for g in js(driver, _GAPS) if g["seen"] == "open backfilled"]

    gaps = wait_for("a gap seen open, then backfilled", closed_after_open, 30, every=0.25)
    gap = gaps[0]
    assert gap["status"] == "backfilled" and gap["id"].startswith("BINANCE:")
    symbol = gap["id"].split(":")[1]
    # The manifest is rewritten every 2 s: it names the dropped ids once it covers them.
    wanted = set(range(gap["first"], gap["last"] + 1))
    dropped = wait_for(
        "the manifest to list the dropped ids",
        lambda: wanted <= (d := set(running.sim.manifest()["symbols"][symbol]["dropped"])) and d,
        5,
        every=0.5,
    )
    assert wanted <= dropped
    assert js(driver, _BACKFILLED_POINTS) > 0, "the timeline draws no backfilled range"
    # Completeness of the day: at least this hour, nearly all of it stored.
    hours = wait_for(
        "completeness bars",
        lambda: js(
            driver,
            "const c = document.getElementById('completeness-chart');"
            "return c.data ? c.data[0].y : null",
        ),
        10,
    )
    assert hours and max(hours) > 90
    wait_for("commit latency", lambda: "ms" in js(driver, _TEXT % "commit-latency"), 6)
    wait_for("a few ingest rate samples", lambda: js(driver, _RATE_SAMPLES) >= 3, 10, every=0.5)
    screenshot(driver, "live-page.png")
    assert_clean(driver, running.port)


_HANDSHAKES = """
const [key, done] = arguments;
const hex = (k) => [...k].map((c) => c.charCodeAt(0).toString(16).padStart(2, "0")).join("");
const attempt = (k) => new Promise((resolve) => {
  const ws = new WebSocket(K2D.streamUrl(), ["k2d", "k2d.key." + hex(k)]);
  const got = [];
  ws.onopen = () => ws.send(JSON.stringify({op: "ping", id: 7}));
  ws.onmessage = (e) => {
    got.push(JSON.parse(e.data));
    if (got[got.length - 1].type === "pong") ws.close(1000);
  };
  ws.onclose = (e) => resolve({close: e.code, protocol: ws.protocol, messages: got});
});
attempt("not-" + key).then((wrong) => attempt(key).then((right) => done({wrong, right})));
"""


def test_the_stream_admits_a_browser_only_with_a_valid_key(running: Daemon, browser: Any) -> None:
    """The key a browser offers as a subprotocol is checked like X-API-Key: a wrong one is
    told `unauthorized` and closed with 4401, the right one is served."""
    driver = browser
    open_live_page(driver, running)
    driver.set_script_timeout(15)
    result = driver.execute_async_script(_HANDSHAKES, KEY)
    wrong, right = result["wrong"], result["right"]
    assert wrong["close"] == 4401
    assert [(m["type"], m["code"]) for m in wrong["messages"]] == [("error", "unauthorized")]
    assert right["protocol"] == "k2d"
    assert [m["type"] for m in right["messages"]] == ["pong"]
    assert right["close"] == 1000
    assert_clean(driver, running.port)


_WATERFALL = """
const c = document.getElementById('waterfall');
return {trace: c.dataset.trace || '', spans: Number(c.dataset.spans),
        bars: c.querySelectorAll('.barlayer .point').length,
        rows: [...document.querySelectorAll('#spans tr')].map(r => r.dataset.spanId)};
"""


def test_the_trace_view_draws_a_commit_and_the_batches_it_links_to(
    running: Daemon, browser: Any
) -> None:
    """The waterfall of a writer.commit trace: its span and the spans it links to, one bar
    each; the key entered on the live page still holds in this tab."""
    driver = browser
    open_live_page(driver, running)  # the key is entered once, in this tab
    spans = running.get_json("/v1/traces?limit=2048")["data"]
    commit = next(s for s in spans if s["name"] == "writer.commit" and s["links"])
    linked = {link["span_id"] for link in commit["links"]} & {s["span_id"] for s in spans}
    assert linked, "the commit's linked spans are no longer in /v1/traces"

    driver.get(f"{running.base}/ui/trace.html?trace={commit['trace_id']}")
    assert wait_for("the key form", lambda: js(driver, _KEY_FORM_STATE), 10) == "false"
    drawn = wait_for(
        "the waterfall",
        lambda: (w := js(driver, _WATERFALL))["trace"] == commit["trace_id"] and w["bars"] and w,
        15,
    )
    assert drawn["bars"] == drawn["spans"] >= 2
    assert drawn["rows"][0] == commit["span_id"]
    assert linked & set(drawn["rows"]), "no linked span drawn"
    screenshot(driver, "trace-view.png")
    assert_clean(driver, running.port)
