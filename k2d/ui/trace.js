// The trace view: the spans /v1/traces holds, grouped by trace; one trace drawn as a
// waterfall (offset from its first span, indented under parents), following span links
// (writer.commit -> sequence.check -> feed.receive) as `k2d traces show` does.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const LINK_DEPTH = 3;
  const LINKS_PER_SPAN = 8;
  const TRACES_LISTED = 300;
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"];

  let spans = [];
  const bySpan = new Map();
  const byTrace = new Map();
  const colors = new Map();

  function notice(text) {
    const box = $("notice");
    box.hidden = !text;
    box.textContent = text || "";
    box.dataset.kind = "error";
  }

  function colorOf(name) {
    if (!colors.has(name)) colors.set(name, PALETTE[colors.size % PALETTE.length]);
    return colors.get(name);
  }

  function index(data) {
    spans = data;
    bySpan.clear();
    byTrace.clear();
    for (const s of spans) {
      bySpan.set(s.span_id, s);
      if (!byTrace.has(s.trace_id)) byTrace.set(s.trace_id, []);
      byTrace.get(s.trace_id).push(s);
    }
    for (const list of byTrace.values()) list.sort((a, b) => a.start_ns - b.start_ns);
  }

  function rootOf(list) {
    const ids = new Set(list.map((s) => s.span_id));
    return list.find((s) => !s.parent || !ids.has(s.parent)) || list[0];
  }

  function summaries() {
    return [...byTrace.entries()]
      .map(([id, list]) => {
        const root = rootOf(list);
        const end = Math.max(...list.map((s) => s.end_ns));
        const links = list.reduce((n, s) => n + s.links.length, 0);
        return { id, root, spans: list.length, links, start: list[0].start_ns, end };
      })
      .sort((a, b) => b.end - a.end)
      .slice(0, TRACES_LISTED);
  }

  // Rows of the waterfall: the trace's spans depth first, each followed by its children,
  // then (following links) the spans it links to, with their own children and links.
  function rows(traceId, follow) {
    const out = [];
    const seen = new Set();
    const visit = (span, depth, linked, linkDepth) => {
      if (seen.has(span.span_id)) return;
      seen.add(span.span_id);
      out.push({ span, depth, linked });
      const kids = (byTrace.get(span.trace_id) || []).filter((s) => s.parent === span.span_id);
      for (const kid of kids) visit(kid, depth + 1, linked, linkDepth);
      if (!follow || linkDepth >= LINK_DEPTH) return;
      for (const link of span.links.slice(0, LINKS_PER_SPAN)) {
        const target = bySpan.get(link.span_id);
        if (target) visit(target, depth + 1, true, linkDepth + 1);
      }
    };
    const list = byTrace.get(traceId) || [];
    const ids = new Set(list.map((s) => s.span_id));
    for (const s of list.filter((x) => !x.parent || !ids.has(x.parent))) visit(s, 0, false, 0);
    return out;
  }

  function attrs(span) {
    return Object.entries(span.attributes || {})
      .slice(0, 8)
      .map(([k, v]) => `${k}=${v}`)
      .join("  ");
  }

  function draw(traceId) {
    const follow = $("follow-links").checked;
    const drawn = rows(traceId, follow);
    const chart = $("waterfall");
    if (!drawn.length) {
      notice(`trace ${traceId} is not among the spans /v1/traces holds`);
      return;
    }
    notice("");
    const t0 = Math.min(...drawn.map((r) => r.span.start_ns));
    const offset = (s) => (s.start_ns - t0) / 1e6;
    // Plotly right-aligns tick labels, so depth shows as leading dots rather than indentation.
    const label = (r) => `${"· ".repeat(r.depth)}${r.linked ? "↪ " : ""}${r.span.name}`;
    const total = Math.max(...drawn.map((r) => r.span.end_ns)) - t0;
    // Spans of microseconds would be invisible next to a commit: at least a sliver wide.
    const sliver = total / 1e6 / 400;
    const y = drawn.map((_, i) => i);
    const trace = {
      type: "bar",
      orientation: "h",
      y,
      base: drawn.map((r) => offset(r.span)),
      x: drawn.map((r) => Math.max(r.span.duration_ms || 0, sliver)),
      text: drawn.map((r) => `${(r.span.duration_ms || 0).toFixed(2)} ms`),
      textposition: "outside",
      cliponaxis: false,
      marker: {
        color: drawn.map((r) => colorOf(r.span.name)),
        opacity: drawn.map((r) => (r.linked ? 0.5 : 1)),
        line: {
          color: drawn.map((r) => (r.span.status.code === "error" ? "#d62728" : "rgba(0,0,0,0)")),
          width: 2,
        },
      },
      customdata: drawn.map((r) => [r.span.span_id, r.span.trace_id.slice(0, 8), attrs(r.span)]),
      hovertemplate:
        "at %{base:.2f} ms: %{text}<br>span %{customdata[0]} (trace %{customdata[1]}…)" +
        "<br>%{customdata[2]}<extra></extra>",
    };
    const layout = {
      height: Math.max(240, 60 + 24 * drawn.length),
      margin: { l: 20, r: 90, t: 10, b: 40 },
      bargap: 0.25,
      xaxis: { title: { text: "ms from the first span" }, zeroline: true, rangemode: "tozero" },
      yaxis: {
        autorange: "reversed",
        tickmode: "array",
        tickvals: y,
        ticktext: drawn.map(label),
        automargin: true,
      },
      paper_bgcolor: "rgba(0,0,0,0)",
      plot_bgcolor: "rgba(0,0,0,0)",
    };
    Plotly.react(chart, [trace], layout, K2D.PLOT_CONFIG);
    chart.dataset.spans = String(drawn.length);
    chart.dataset.trace = traceId;
    const own = drawn.filter((r) => !r.linked).length;
    $("trace-caption").textContent =
      `${traceId} · ${own} span${own === 1 ? "" : "s"}` +
      `${drawn.length > own ? ` + ${drawn.length - own} linked` : ""} · ${(total / 1e6).toFixed(2)} ms`;
    $("spans").replaceChildren(
      ...drawn.map((r) =>
        K2D.el(
          "tr",
          { "data-span-id": r.span.span_id, "data-linked": String(r.linked), class: r.linked ? "linked" : "" },
          K2D.el("td", { class: "name" }, `${"  ".repeat(r.depth)}${r.linked ? "↪ " : ""}${r.span.name}`),
          K2D.el("td", { class: "num" }, offset(r.span).toFixed(3)),
          K2D.el("td", { class: "num" }, (r.span.duration_ms || 0).toFixed(3)),
          K2D.el("td", {}, r.span.status.code),
          K2D.el("td", { class: "muted small" }, attrs(r.span)),
        ),
      ),
    );
  }

  function fillPicker(wanted) {
    const list = summaries();
    const select = $("trace");
    select.replaceChildren(
      ...list.map((t) =>
        K2D.el(
          "option",
          { value: t.id },
          `${new Date(t.start / 1e6).toISOString().slice(11, 23)}  ${t.root.name}  ` +
            `${t.spans} span${t.spans === 1 ? "" : "s"}${t.links ? `, ${t.links} links` : ""}  ` +
            `${((t.end - t.start) / 1e6).toFixed(1)} ms`,
        ),
      ),
    );
    // Asked for by ?trace=, else the newest commit (it links down to the socket), else the newest.
    const commit = list.find((t) => t.root.name === "writer.commit" && t.links);
    const pick = (wanted && byTrace.has(wanted) && wanted) || (commit && commit.id) || (list[0] && list[0].id);
    if (pick) select.value = pick;
    return pick;
  }

  async function load() {
    if (K2D.needsKey()) {
      notice("This daemon needs an API key for /v1/traces: enter it above.");
      return;
    }
    let body;
    try {
      const probe = await K2D.getJson("/v1/traces?limit=1");
      body = await K2D.getJson(`/v1/traces?limit=${probe.meta.ring_size}`);
    } catch (err) {
      notice(`/v1/traces: ${err.message}`);
      return;
    }
    index(body.data);
    const wanted = new URLSearchParams(location.search).get("trace");
    const pick = fillPicker(wanted);
    if (pick) draw(pick);
    else notice("No spans yet.");
  }

  async function main() {
    await K2D.loadSettings();
    K2D.keyForm(load);
    $("trace").addEventListener("change", () => {
      const id = $("trace").value;
      history.replaceState(null, "", `?trace=${id}`);
      draw(id);
    });
    $("follow-links").addEventListener("change", () => $("trace").value && draw($("trace").value));
    $("refresh").addEventListener("click", load);
    await load();
  }

  window.addEventListener("DOMContentLoaded", () => {
    main().catch((err) => notice(`the page failed to start: ${err.message}`));
  });
})();
