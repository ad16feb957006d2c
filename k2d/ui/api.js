// The daemon's HTTP and WebSocket API as the pages use it: the API key (entered once, kept
// in sessionStorage for the browser session), JSON calls that carry it, the stream's
// handshake, and Prometheus text. Shared by app.js and trace.js.
"use strict";

window.K2D = (() => {
  const KEY_ITEM = "k2d.apiKey";
  let settings = null;

  class ApiError extends Error {
    constructor(status, code, detail) {
      super(`${status} ${code}: ${detail}`);
      this.status = status;
      this.code = code;
    }
  }

  function apiKey() {
    return sessionStorage.getItem(KEY_ITEM) || "";
  }

  function setApiKey(key) {
    if (key) sessionStorage.setItem(KEY_ITEM, key);
    else sessionStorage.removeItem(KEY_ITEM);
  }

  // GET /ui/settings.json: whether /v1 needs a key, so a page asks for it before calling.
  async function loadSettings() {
    if (settings === null) {
      const r = await fetch("/ui/settings.json", { cache: "no-store" });
      settings = await r.json();
    }
    return settings;
  }

  function needsKey() {
    return Boolean(settings && settings.api_keys && !apiKey());
  }

  async function request(path, accept) {
    const headers = { Accept: accept };
    const key = apiKey();
    if (key) headers["X-API-Key"] = key;
    const r = await fetch(path, { headers, cache: "no-store" });
    if (!r.ok) {
      let body = {};
      try {
        body = await r.json();
      } catch (_) {
        // not JSON: keep the status
      }
      throw new ApiError(r.status, body.code || String(r.status), body.detail || r.statusText);
    }
    return r;
  }

  async function getJson(path) {
    return (await request(path, "application/json")).json();
  }

  async function getText(path) {
    return (await request(path, "text/plain")).text();
  }

  // Browsers cannot set headers on a WebSocket: the key goes as a subprotocol, hex of its
  // bytes as fetch() would send them in X-API-Key (k2d/api/_ui.py turns it back).
  function streamProtocols() {
    const key = apiKey();
    if (!key || !settings) return [];
    let hex = "";
    for (const ch of key) {
      const code = ch.codePointAt(0);
      if (code > 255) throw new Error("an API key must be latin-1 text");
      hex += code.toString(16).padStart(2, "0");
    }
    return [settings.stream_subprotocol, settings.key_subprotocol_prefix + hex];
  }

  function streamUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${location.host}/v1/stream`;
  }

  // Prometheus text format: name -> [{labels, value}].
  function parseMetrics(text) {
    const out = new Map();
    const line = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
    const label = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
    for (const raw of text.split("\n")) {
      if (!raw || raw.startsWith("#")) continue;
      const m = line.exec(raw);
      if (!m) continue;
      const labels = {};
      for (const l of (m[2] || "").matchAll(label)) labels[l[1]] = l[2];
      if (!out.has(m[1])) out.set(m[1], []);
      out.get(m[1]).push({ labels, value: Number(m[3]) });
    }
    return out;
  }

  function metricSum(metrics, name, where) {
    let total = 0;
    for (const s of metrics.get(name) || []) {
      if (!where || Object.entries(where).every(([k, v]) => s.labels[k] === v)) total += s.value;
    }
    return total;
  }

  // Wires the header's key form: `onChange` runs after a key is saved or forgotten.
  function keyForm(onChange) {
    const form = document.getElementById("key-form");
    const input = document.getElementById("key-input");
    const forget = document.getElementById("key-forget");
    const show = () => {
      const has = Boolean(apiKey());
      forget.hidden = !has;
      input.placeholder = has ? "key in use" : "API key";
      input.title = "Kept in this tab's sessionStorage until the tab closes";
      form.dataset.needed = String(needsKey());
    };
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      setApiKey(key);
      input.value = "";
      show();
      onChange();
    });
    forget.addEventListener("click", () => {
      setApiKey("");
      show();
      onChange();
    });
    show();
    return show;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }

  function fmtNumber(x, digits) {
    if (x === null || x === undefined || Number.isNaN(x)) return "–";
    return Number(x).toLocaleString("en-US", { maximumFractionDigits: digits ?? 2 });
  }

  // No mode bar (drag zooms, a double click resets), no link to a hosted editor.
  const PLOT_CONFIG = { displayModeBar: false, responsive: true, showLink: false, showSendToCloud: false };

  return {
    ApiError,
    apiKey,
    setApiKey,
    loadSettings,
    needsKey,
    getJson,
    getText,
    streamProtocols,
    streamUrl,
    parseMetrics,
    metricSum,
    keyForm,
    el,
    fmtNumber,
    PLOT_CONFIG,
  };
})();
