// The live page: bars from /v1/ohlcv, then the same channel's trades over /v1/stream
// (subscribed `since` the last bar's start, so the join to live has no gap and no repeat);
// the gap ledger from /v1/gaps and the stream's `gap` messages; completeness from
// /v1/completeness; health from /ready, /metrics and /v1/stats.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const BAR_MS = { "1s": 1000, "1m": 60000 };
  const BARS_KEPT = { "1s": 300, "1m": 180 };
  const TAPE_ROWS = 40;
  const GAP_WINDOW_MS = 15 * 60 * 1000;
  const GAPS_LISTED = 25;
  const RENDER_EVERY_MS = 200;
  const COLORS = { open: "#d62728", backfilled: "#2ca02c", unrecoverable: "#555555" };
  const STATUSES = ["open", "backfilled", "unrecoverable"];

  const state = {
    exchange: null,
    symbol: null,
    interval: "1s",
    bars: new Map(), // bar start (ms) -> bar
    tape: [],
    tapeIds: new Set(),
    gaps: new Map(), // event_id -> {event, seen: [status, ...]}
    ws: null,
    wsGen: 0,
    retryMs: 1000,
    renderTimer: null,
    liveRows: 0,
    updates: 0,
    lastTrade: "", // the newest live trade's timestamp (ISO strings of one format sort)
    metricsPrev: null,
    rates: [],
    streamOn: true,
    generation: 0, // bumped on every (re)start: late answers of an older start are dropped
  };

  // Times: ISO-8601 with microseconds and Z; Date keeps milliseconds.
  const ms = (iso) => (iso ? Date.parse(iso.replace(/(\.\d{3})\d+/, "$1")) : null);
  const iso = (t) => new Date(t).toISOString();
  const clock = (t) => new Date(t).toISOString().slice(11, 23);
  const channelOf = () => `trades:${state.exchange}:${state.symbol}`;
  const query = (params) => new URLSearchParams(params).toString();

  function notice(text, kind) {
    const box = $("notice");
    box.hidden = !text;
    box.textContent = text || "";
    box.dataset.kind = kind || "info";
  }

  function apiFailed(what, err) {
    if (err instanceof K2D.ApiError && err.status === 401) {
      notice("The API key was refused: enter a valid key above.", "error");
      return;
    }
    notice(`${what}: ${err.message}`, "error");
  }

  // ---- price: bars ------------------------------------------------------------------------

  function barFromRest(b) {
    return {
      t: ms(b.bar_start),
      o: Number(b.open),
      h: Number(b.high),
      l: Number(b.low),
      c: Number(b.close),
      v: Number(b.volume),
      n: b.trade_count,
      first: null, // the (time, sequence) of open and close: unknown for REST bars
      last: null,
    };
  }

  function order(row) {
    return [row.timestamp, row.source_sequence ?? -1];
  }

  function before(a, b) {
    return a[0] < b[0] || (a[0] === b[0] && a[1] < b[1]);
  }

  function applyTrade(row) {
    const width = BAR_MS[state.interval];
    const t = Math.floor(ms(row.timestamp) / width) * width;
    const price = Number(row.price);
    const qty = Number(row.quantity);
    const key = order(row);
    let bar = state.bars.get(t);
    if (!bar) {
      bar = { t, o: price, h: price, l: price, c: price, v: 0, n: 0, first: key, last: key };
      state.bars.set(t, bar);
    }
    bar.h = Math.max(bar.h, price);
    bar.l = Math.min(bar.l, price);
    bar.v += qty;
    bar.n += 1;
    // A backfilled row lands inside its bar by (time, sequence), not at its end.
    if (bar.first && before(key, bar.first)) {
      bar.first = key;
      bar.o = price;
    }
    if (bar.last && !before(key, bar.last)) {
      bar.last = key;
      bar.c = price;
    }
  }

  function pruneBars() {
    const keep = BARS_KEPT[state.interval];
    const starts = [...state.bars.keys()].sort((a, b) => a - b);
    for (const t of starts.slice(0, Math.max(0, starts.length - keep))) state.bars.delete(t);
  }

  function render() {
    state.renderTimer = null;
    renderPrice();
    renderTape();
  }

  function renderPrice() {
    pruneBars();
    const bars = [...state.bars.values()].sort((a, b) => a.t - b.t);
    const x = bars.map((b) => new Date(b.t));
    const traces = [
      {
        type: "candlestick",
        name: state.symbol,
        x,
        open: bars.map((b) => b.o),
        high: bars.map((b) => b.h),
        low: bars.map((b) => b.l),
        close: bars.map((b) => b.c),
        increasing: { line: { color: "#2ca02c" } },
        decreasing: { line: { color: "#d62728" } },
        yaxis: "y",
      },
      {
        type: "bar",
        name: "volume",
        x,
        y: bars.map((b) => b.v),
        marker: { color: "rgba(31,119,180,0.35)" },
        yaxis: "y2",
        hovertemplate: "%{y} (%{customdata} trades)<extra>volume</extra>",
        customdata: bars.map((b) => b.n),
      },
    ];
    const layout = {
      margin: { l: 70, r: 20, t: 10, b: 30 },
      showlegend: false,
      uirevision: `${channelOf()}/${state.interval}`,
      // Time along the bottom, under the volume bars.
      xaxis: { type: "date", rangeslider: { visible: false }, anchor: "y2" },
      yaxis: { domain: [0.26, 1], tickformat: ".6~f", automargin: true },
      yaxis2: { domain: [0, 0.2], showgrid: false, nticks: 3 },
      paper_bgcolor: "rgba(0,0,0,0)",
      plot_bgcolor: "rgba(0,0,0,0)",
    };
    const chart = $("price-chart");
    Plotly.react(chart, traces, layout, K2D.PLOT_CONFIG);
    state.updates += 1;
    chart.dataset.updates = String(state.updates);
    chart.dataset.liveRows = String(state.liveRows);
    chart.dataset.lastTrade = state.lastTrade;
    // How old the newest live trade is as it is drawn: the page's end-to-end latency.
    if (state.lastTrade) chart.dataset.lagMs = String(Date.now() - ms(state.lastTrade));
    chart.dataset.bars = String(bars.length);
    const last = bars[bars.length - 1];
    $("price-caption").textContent = last
      ? `${state.exchange}:${state.symbol} · ${state.interval} bars · last ${K2D.fmtNumber(last.c, 8)}`
      : `${state.exchange}:${state.symbol} · no trades yet`;
  }

  function scheduleRender() {
    if (state.renderTimer === null) state.renderTimer = setTimeout(render, RENDER_EVERY_MS);
  }

  // ---- trade tape ------------------------------------------------------------------------

  function addToTape(rows) {
    for (const row of rows) {
      if (state.tapeIds.has(row.message_id)) continue;
      state.tapeIds.add(row.message_id);
      state.tape.push(row);
    }
    state.tape.sort((a, b) => (before(order(a), order(b)) ? 1 : -1));
    for (const row of state.tape.splice(TAPE_ROWS)) state.tapeIds.delete(row.message_id);
  }

  function renderTape() {
    const body = $("tape");
    body.replaceChildren(
      ...state.tape.map((r) =>
        K2D.el(
          "tr",
          { class: r.side === "BUY" ? "buy" : r.side === "SELL" ? "sell" : "", "data-seq": r.source_sequence },
          K2D.el("td", {}, r.timestamp.slice(11, 23)),
          K2D.el("td", { class: "num" }, r.price.replace(/0+$/, "").replace(/\.$/, "")),
          K2D.el("td", { class: "num" }, r.quantity.replace(/0+$/, "").replace(/\.$/, "")),
          K2D.el("td", {}, r.side || ""),
          K2D.el("td", { class: "num" }, r.source_sequence ?? ""),
          K2D.el("td", {}, r.provenance === "live" ? "" : K2D.el("span", { class: "tag" }, r.provenance)),
        ),
      ),
    );
    $("tape-caption").textContent = `${state.liveRows.toLocaleString("en-US")} rows streamed`;
  }

  // ---- the stream ------------------------------------------------------------------------

  function setStream(text, kind) {
    const pill = $("stream-state");
    pill.textContent = `stream: ${text}`;
    pill.dataset.state = kind || text;
  }

  function closeStream() {
    state.wsGen += 1;
    if (state.ws) {
      state.ws.onclose = null;
      state.ws.close(1000);
      state.ws = null;
    }
  }

  function connect() {
    closeStream();
    if (!state.streamOn) {
      setStream("off (stream.enabled = false)", "closed");
      return;
    }
    const gen = state.wsGen;
    const width = BAR_MS[state.interval];
    // Rows from the start of the newest bar come again from the stream: drop those bars.
    const starts = [...state.bars.keys()];
    const since = starts.length
      ? Math.max(...starts)
      : Math.floor((Date.now() - BARS_KEPT[state.interval] * width) / width) * width;
    for (const t of starts) if (t >= since) state.bars.delete(t);
    let ws;
    try {
      ws = new WebSocket(K2D.streamUrl(), K2D.streamProtocols());
    } catch (err) {
      notice(`stream: ${err.message}`, "error");
      return;
    }
    state.ws = ws;
    setStream("connecting");
    ws.onopen = () => {
      ws.send(JSON.stringify({ op: "subscribe", channels: [channelOf()], since: iso(since), id: gen }));
    };
    ws.onmessage = (e) => {
      if (gen !== state.wsGen) return;
      onMessage(JSON.parse(e.data));
    };
    ws.onclose = (e) => {
      if (gen !== state.wsGen) return;
      state.ws = null;
      if (e.code === 4401) {
        setStream("key refused", "error");
        notice("The stream refused the API key: enter a valid key above.", "error");
        return;
      }
      setStream(`closed (${e.code}), retrying`, "closed");
      setTimeout(() => gen === state.wsGen && connect(), state.retryMs);
      state.retryMs = Math.min(state.retryMs * 2, 15000);
    };
  }

  function onMessage(msg) {
    switch (msg.type) {
      case "ack":
        state.retryMs = 1000;
        setStream("live", "live");
        break;
      case "trades":
        for (const row of msg.rows) {
          applyTrade(row);
          // Backfilled rows are old by nature: the latency is that of live ones.
          if (row.provenance === "live" && row.timestamp > state.lastTrade) state.lastTrade = row.timestamp;
        }
        state.liveRows += msg.rows.length;
        addToTape(msg.rows);
        scheduleRender();
        break;
      case "gap":
        upsertGap(msg);
        renderGaps();
        break;
      case "error":
        notice(`stream: ${msg.code}: ${msg.detail}`, "error");
        break;
      default:
        break;
    }
  }

  // ---- gaps ------------------------------------------------------------------------------

  // The REST ledger names the missing range span_* (gaps) or window_* (outages); the stream
  // names both start/end.
  function upsertGap(e) {
    const stream = e.stream || (e.channel && e.channel.startsWith("quotes:") ? "quote" : "trade");
    const event = {
      event_id: e.event_id,
      kind: e.kind,
      status: e.status,
      stream,
      first: e.first_missing,
      last: e.last_missing,
      count: e.missing_count,
      start: ms(e.start || e.span_start || e.window_start || e.detected_at),
      end: ms(e.end || e.span_end || e.window_end || e.start || e.span_start || e.detected_at),
      detected: ms(e.detected_at),
      resolved: ms(e.resolved_at),
      detail: e.detail || "",
    };
    const known = state.gaps.get(e.event_id);
    if (!known) {
      state.gaps.set(e.event_id, { event, seen: [event.status] });
      return;
    }
    // The ledger's latest row decides; a stream message can be older than a REST answer.
    if (known.event.status !== "open" && event.status === "open") return;
    event.resolved = event.resolved || known.event.resolved;
    known.event = event;
    if (known.seen[known.seen.length - 1] !== event.status) known.seen.push(event.status);
  }

  function renderGaps() {
    const now = Date.now();
    const from = now - GAP_WINDOW_MS;
    const events = [...state.gaps.values()]
      .map((g) => g.event)
      .filter((e) => e.end >= from || e.status === "open");
    const rowOf = (e) => `${e.stream} ${e.kind}s`;
    const traces = STATUSES.map((status) => {
      const x = [];
      const y = [];
      const text = [];
      for (const e of events.filter((g) => g.status === status)) {
        const label =
          e.kind === "gap"
            ? `ids ${e.first}–${e.last} (${e.count})`
            : `${((e.end - e.start) / 1000).toFixed(1)} s without capture`;
        const took = e.resolved ? ` · ${status} after ${((e.resolved - e.detected) / 1000).toFixed(2)} s` : "";
        x.push(new Date(e.start), new Date(Math.max(e.end, e.start)), null);
        y.push(rowOf(e), rowOf(e), null);
        text.push(label + took, label + took, null);
      }
      return {
        type: "scatter",
        mode: "lines+markers",
        name: status,
        x,
        y,
        text,
        hovertemplate: "%{text}<extra>%{fullData.name}</extra>",
        line: { color: COLORS[status], width: 12 },
        marker: { color: COLORS[status], size: 9, symbol: "line-ns-open", line: { width: 3 } },
        connectgaps: false,
      };
    });
    const layout = {
      margin: { l: 100, r: 10, t: 5, b: 30 },
      xaxis: { type: "date", range: [new Date(from), new Date(now)] },
      yaxis: { type: "category", categoryorder: "category ascending", automargin: true },
      legend: { orientation: "h", y: 1.15, x: 0 },
      uirevision: channelOf(),
      paper_bgcolor: "rgba(0,0,0,0)",
      plot_bgcolor: "rgba(0,0,0,0)",
    };
    Plotly.react($("gap-chart"), traces, layout, K2D.PLOT_CONFIG);

    const counts = STATUSES.map((s) => `${events.filter((e) => e.status === s).length} ${s}`);
    $("gaps-caption").textContent = counts.join(" · ");
    const listed = [...state.gaps.values()]
      .filter((g) => events.includes(g.event))
      .sort((a, b) => b.event.detected - a.event.detected)
      .slice(0, GAPS_LISTED);
    $("gap-list").replaceChildren(
      ...listed.map(({ event: e, seen }) =>
        K2D.el(
          "li",
          {
            "data-event-id": e.event_id,
            "data-status": e.status,
            "data-seen": seen.join(" "),
            "data-first": e.first ?? "",
            "data-last": e.last ?? "",
          },
          K2D.el("span", { class: `dot ${e.status}` }),
          K2D.el("b", {}, e.status),
          ` ${e.stream} ${e.kind} `,
          e.kind === "gap" ? `${e.first}–${e.last} (${e.count})` : `${((e.end - e.start) / 1000).toFixed(1)} s`,
          K2D.el("span", { class: "muted" }, ` at ${clock(e.start)}`),
          e.resolved ? K2D.el("span", { class: "muted" }, ` · closed in ${((e.resolved - e.detected) / 1000).toFixed(2)} s`) : "",
          seen.length > 1 ? K2D.el("span", { class: "muted" }, ` · ${seen.join(" → ")}`) : "",
        ),
      ),
    );
  }

  async function loadGaps(gen) {
    const params = {
      exchange: state.exchange,
      symbol: state.symbol,
      start: iso(Date.now() - GAP_WINDOW_MS),
      limit: 1000,
    };
    const body = await K2D.getJson(`/v1/gaps?${query(params)}`);
    if (gen !== state.generation) return;
    for (const e of body.data) upsertGap(e);
    renderGaps();
  }

  // ---- completeness ----------------------------------------------------------------------

  async function loadCompleteness(gen) {
    const now = new Date();
    const day = Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate());
    const params = {
      exchange: state.exchange,
      symbol: state.symbol,
      start: iso(day),
      end: iso(now.getTime()),
      bucket: "1h",
    };
    const body = await K2D.getJson(`/v1/completeness?${query(params)}`);
    if (gen !== state.generation) return;
    $("day").textContent = iso(day).slice(0, 10);
    const rows = body.data.filter((r) => r.expected > 0);
    const x = rows.map((r) => new Date(ms(r.bucket_start) + 30 * 60 * 1000));
    const share = (f) => rows.map((r) => (100 * f(r)) / r.expected);
    const hover = rows.map(
      (r) =>
        `expected ${r.expected}<br>stored ${r.stored} (backfilled ${r.backfilled})<br>` +
        `missing ${r.missing} in ${r.open_gaps} open gaps<br>outage ${r.outage_seconds} s`,
    );
    const bar = (name, color, y) => ({
      type: "bar",
      name,
      x,
      y,
      width: 3600 * 1000 * 0.8,
      marker: { color },
      text: hover,
      hovertemplate: `%{text}<extra>${name}</extra>`,
      textposition: "none",
    });
    const traces = [
      bar("live", "#2ca02c", share((r) => r.stored - r.backfilled)),
      bar("backfilled", "#1f77b4", share((r) => r.backfilled)),
      bar("missing", "#d62728", share((r) => Math.max(0, r.expected - r.stored))),
    ];
    const layout = {
      barmode: "stack",
      margin: { l: 50, r: 10, t: 25, b: 30 },
      xaxis: { type: "date", range: [new Date(day), new Date(day + 24 * 3600 * 1000)] },
      yaxis: { range: [0, 100], ticksuffix: "%" },
      legend: { orientation: "h", y: 1.2, x: 0 },
      annotations: rows.map((r, i) => ({
        x: x[i],
        y: 100,
        yanchor: "bottom",
        showarrow: false,
        font: { size: 10 },
        text: r.coverage === null ? "–" : `${(100 * r.coverage).toFixed(r.coverage === 1 ? 0 : 2)}%`,
      })),
      paper_bgcolor: "rgba(0,0,0,0)",
      plot_bgcolor: "rgba(0,0,0,0)",
    };
    Plotly.react($("completeness-chart"), traces, layout, K2D.PLOT_CONFIG);
  }

  // ---- health ----------------------------------------------------------------------------

  async function loadReady() {
    let body;
    try {
      const r = await fetch("/ready", { cache: "no-store" });
      body = await r.json();
    } catch (err) {
      $("ready-state").textContent = "ready: unreachable";
      $("ready-state").dataset.state = "error";
      return;
    }
    $("ready-state").textContent = `ready: ${body.status}`;
    $("ready-state").dataset.state = body.status;
    $("actors").replaceChildren(
      ...Object.entries(body.actors).map(([name, st]) =>
        K2D.el(
          "tr",
          { "data-actor": name },
          K2D.el("td", {}, name),
          K2D.el("td", {}, K2D.el("span", { class: `state ${st}` }, st)),
          K2D.el("td", { class: "num" }, body.restarts[name] || 0),
          K2D.el("td", { class: "muted" }, (body.degraded || {})[name] || ""),
        ),
      ),
    );
  }

  async function loadMetrics() {
    const r = await fetch("/metrics", { cache: "no-store" });
    const m = K2D.parseMetrics(await r.text());
    const now = performance.now();
    const sample = {
      at: now,
      records: K2D.metricSum(m, "k2d_feed_records_total"),
      trades: K2D.metricSum(m, "k2d_feed_records_total", { stream: "trade" }),
      commitSum: K2D.metricSum(m, "k2d_commit_seconds_sum"),
      commitCount: K2D.metricSum(m, "k2d_commit_seconds_count"),
    };
    const prev = state.metricsPrev;
    state.metricsPrev = sample;
    const lags = (m.get("k2d_feed_lag_seconds") || []).map((s) => s.value);
    $("feed-lag").textContent = lags.length ? `${K2D.fmtNumber(1000 * Math.max(...lags), 1)} ms` : "–";
    $("open-gaps").textContent = K2D.fmtNumber(K2D.metricSum(m, "k2d_open_gaps"), 0);
    $("ws-clients").textContent = K2D.fmtNumber(K2D.metricSum(m, "k2d_ws_clients"), 0);
    if (!prev) return;
    const dt = (now - prev.at) / 1000;
    const rate = (sample.records - prev.records) / dt;
    const tradeRate = (sample.trades - prev.trades) / dt;
    $("ingest-rate").textContent = `${K2D.fmtNumber(rate, 0)} rec/s`;
    $("ingest-rate").title = `${K2D.fmtNumber(tradeRate, 0)} trades/s, the rest quotes`;
    const commits = sample.commitCount - prev.commitCount;
    if (commits > 0) {
      const mean = (1000 * (sample.commitSum - prev.commitSum)) / commits;
      $("commit-latency").textContent = `${K2D.fmtNumber(mean, 0)} ms`;
      $("commit-latency").title = `mean of ${commits} commits in the last ${dt.toFixed(1)} s`;
    }
    state.rates.push({ t: new Date(), rate });
    state.rates.splice(0, Math.max(0, state.rates.length - 150));
    Plotly.react(
      $("rate-chart"),
      [
        {
          type: "scatter",
          mode: "lines",
          x: state.rates.map((s) => s.t),
          y: state.rates.map((s) => s.rate),
          line: { color: "#1f77b4", width: 1.5 },
          fill: "tozeroy",
          hovertemplate: "%{y:.0f} rec/s<extra></extra>",
        },
      ],
      {
        margin: { l: 40, r: 5, t: 5, b: 20 },
        xaxis: { type: "date", showgrid: false },
        yaxis: { rangemode: "tozero" },
        paper_bgcolor: "rgba(0,0,0,0)",
        plot_bgcolor: "rgba(0,0,0,0)",
      },
      K2D.PLOT_CONFIG,
    );
  }

  async function loadStats() {
    if (K2D.needsKey()) return;
    const body = await K2D.getJson("/v1/stats");
    const tables = body.data.tables || {};
    const rows = (name) => (tables[name] && tables[name].rows) || 0;
    $("rows-stored").textContent = `${K2D.fmtNumber(rows("trades") + rows("quotes"), 0)}`;
    $("rows-stored").title = `trades ${rows("trades")}, quotes ${rows("quotes")}, ledger ${rows("sequence_events")}`;
  }

  // ---- symbols and (re)starts ------------------------------------------------------------

  async function loadSymbols() {
    const body = await K2D.getJson("/v1/symbols?limit=1000");
    const select = $("symbol");
    const wanted = decodeURIComponent(location.hash.slice(1)) || select.value;
    const values = body.data.map((r) => `${r.exchange}:${r.symbol}`);
    if (values.join() !== [...select.options].map((o) => o.value).join()) {
      select.replaceChildren(...values.map((v) => K2D.el("option", { value: v }, v)));
    }
    if (values.includes(wanted)) select.value = wanted;
    return values.length > 0;
  }

  async function start() {
    const gen = ++state.generation;
    closeStream();
    state.bars.clear();
    state.tape = [];
    state.tapeIds.clear();
    state.gaps.clear();
    state.liveRows = 0;
    state.lastTrade = "";
    if (K2D.needsKey()) {
      setStream("needs a key", "error");
      notice("This daemon needs an API key for its data: enter it above (it is kept for this browser session).", "info");
      return;
    }
    notice("");
    try {
      if (!(await loadSymbols())) {
        notice("Nothing captured yet: waiting for the first trades.", "info");
        setTimeout(() => gen === state.generation && start(), 2000);
        return;
      }
    } catch (err) {
      apiFailed("symbols", err);
      return;
    }
    if (gen !== state.generation) return;
    [state.exchange, state.symbol] = $("symbol").value.split(":");
    state.interval = $("interval").value;
    history.replaceState(null, "", `#${state.exchange}:${state.symbol}`);
    const width = BAR_MS[state.interval];
    const now = Date.now();
    try {
      const [bars, recent] = await Promise.all([
        K2D.getJson(
          `/v1/ohlcv/${state.interval}?${query({
            exchange: state.exchange,
            symbol: state.symbol,
            start: iso(now - BARS_KEPT[state.interval] * width),
            end: iso(now + width),
            limit: 1000,
          })}`,
        ),
        K2D.getJson(
          `/v1/trades/recent?${query({
            exchange: state.exchange,
            symbol: state.symbol,
            window: "5m",
            limit: TAPE_ROWS,
            order: "desc",
          })}`,
        ),
      ]);
      if (gen !== state.generation) return;
      for (const b of bars.data) state.bars.set(ms(b.bar_start), barFromRest(b));
      addToTape(recent.data);
    } catch (err) {
      apiFailed("bars", err);
      return;
    }
    renderPrice();
    renderTape();
    connect();
    loadGaps(gen).catch((err) => apiFailed("gaps", err));
    loadCompleteness(gen).catch((err) => apiFailed("completeness", err));
  }

  function every(msPeriod, fn) {
    const run = () => fn().catch(() => {});
    setInterval(run, msPeriod);
    run();
  }

  async function main() {
    const settings = await K2D.loadSettings();
    state.streamOn = settings.stream;
    $("version").textContent = `k2d ${settings.version}`;
    K2D.keyForm(start);
    $("symbol").addEventListener("change", () => {
      location.hash = $("symbol").value;
      start();
    });
    $("interval").addEventListener("change", start);
    every(2000, loadReady);
    every(2000, loadMetrics);
    every(5000, () => loadStats().catch((err) => apiFailed("stats", err)));
    every(5000, async () => {
      if (state.symbol && !K2D.needsKey()) {
        await loadGaps(state.generation).catch(() => {});
      }
    });
    // The timeline slides with the clock; changes are drawn as they come.
    every(5000, async () => state.gaps.size && renderGaps());
    every(60000, async () => state.symbol && !K2D.needsKey() && loadCompleteness(state.generation));
    await start();
  }

  window.addEventListener("DOMContentLoaded", () => {
    main().catch((err) => notice(`the page failed to start: ${err.message}`, "error"));
  });
})();
