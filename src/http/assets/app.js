// dlms-bridge status page: one EventSource on /api/events (the status document, sent when
// something changed), the sparkline history every 30 s, and the registry meter form.
// Plain DOM, no framework, no build step; every text goes in through textContent.
"use strict";

const $ = (id) => document.getElementById(id);
let lastDoc = null;
let history = {};
let prevAcked = null;

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return e;
}

function ago(ms, now) {
  if (ms == null) return "–";
  const s = Math.max(0, Math.round((now - ms) / 1000));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.floor(s / 60) + " min ago";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min ago";
}

function duration(ms) {
  if (ms == null) return "–";
  const s = Math.round(ms / 1000);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function fmt(v) {
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(3).replace(/\.?0+$/, "");
  return typeof v === "string" ? v : JSON.stringify(v);
}

function badge(node, cls, text) {
  node.className = "badge " + cls;
  node.textContent = text;
}

function spark(points) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 160 32");
  svg.setAttribute("preserveAspectRatio", "none");
  if (!points || points.length < 2) return svg;
  const t0 = points[0][0], t1 = points[points.length - 1][0];
  let lo = Infinity, hi = -Infinity;
  for (const [, v] of points) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  const span = hi - lo || 1, tspan = t1 - t0 || 1;
  const pl = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  pl.setAttribute("points", points.map(([t, v]) =>
    ((t - t0) / tspan * 158 + 1).toFixed(1) + "," + (31 - (v - lo) / span * 30).toFixed(1)).join(" "));
  svg.append(pl);
  const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
  title.textContent = "min " + fmt(lo) + ", max " + fmt(hi);
  svg.append(title);
  return svg;
}

function renderUplink(doc) {
  const u = doc.uplink, q = doc.queue, now = doc.now_ms;
  badge($("uplink-state"), u.connected ? "ok" : "bad", u.connected ? "connected" : "disconnected");
  $("uplink-since").textContent = u.connected
    ? ago(u.connected_since_ms, now) : (u.disconnected_since_ms ? "down " + ago(u.disconnected_since_ms, now) : "never connected");
  $("queue-depth").textContent = q ? q.depth + (q.depth === 1 ? " record" : " records") : "store not answering";
  $("queue-age").textContent = q && q.oldest_age_ms != null ? duration(q.oldest_age_ms) : "–";
  if (prevAcked) {
    const dt = (now - prevAcked.t) / 60000;
    if (dt > 0) $("uplink-rate").textContent = ((u.acked_records - prevAcked.n) / dt).toFixed(0) + " records/min";
  }
  prevAcked = { t: now, n: u.acked_records };
  $("uplink-takeovers").textContent = String(u.session_takeovers_last_hour);
  $("uplink-error").textContent = u.last_error || "–";
}

function renderBroker(doc) {
  const b = doc.broker, now = doc.now_ms;
  badge($("broker-state"), b.enabled ? (b.listening ? "ok" : "bad") : "waiting",
    b.enabled ? (b.listening ? "listening" : "not listening") : "disabled");
  $("broker-listen").textContent = b.listen || "–";
  $("broker-count").textContent = String(b.clients.filter((c) => c.connected).length);
  const rows = b.clients.slice(0, 50).map((c) =>
    el("tr", {}, el("td", {}, c.client_id + (c.username ? " (" + c.username + ")" : "")),
      el("td", {}, c.connected ? (c.address || "–") : "gone"),
      el("td", {}, c.messages), el("td", {}, c.bytes == null ? "–" : c.bytes),
      el("td", {}, c.last_seen_ms == null ? "–" : ago(c.last_seen_ms, now))));
  $("clients").replaceChildren(...rows);
}

function meterRow(m, now) {
  const values = el("div", { class: "values" });
  for (const [k, v] of Object.entries(m.values)) {
    values.append(el("span", { "data-key": k }, k + " ", el("b", {}, fmt(v.value)), v.unit ? " " + v.unit : ""));
  }
  const actions = el("td", {});
  if (m.origin.kind === "registry") {
    const edit = el("button", { class: "link", type: "button" }, "edit");
    edit.addEventListener("click", () => startEdit(m));
    const del = el("button", { class: "link", type: "button" }, "delete");
    del.addEventListener("click", () => removeMeter(m.name));
    actions.append(edit, del);
  } else {
    actions.append(el("span", { class: "muted" }, m.origin.kind === "simulator" ? "simulated" : "config file"));
  }
  const state = el("span", {});
  badge(state, m.state, m.state);
  return el("tr", { "data-meter": m.name },
    el("td", {}, el("b", {}, m.name), el("div", { class: "muted" }, m.host + ":" + m.port)),
    el("td", {}, state, el("div", { class: "muted" }, ago(m.last_reading_ms, now))),
    el("td", {}, values),
    el("td", {}, spark(history[m.name])),
    el("td", { class: "polls" }, m.polls + (m.failures ? " (" + m.failures + " failed)" : "")),
    el("td", { class: "err" }, m.last_error ? m.last_error + " (" + ago(m.last_error_ms, m.last_error_ms && now) + ")" : ""),
    actions);
}

function renderMeters(doc) {
  const now = doc.now_ms;
  $("spark-head").textContent = "Last hour: " + doc.sparkline_key;
  const up = doc.meters.filter((m) => m.state === "up").length;
  $("meter-summary").textContent = up + "/" + doc.meters.length + " answering";
  $("meter-rows").replaceChildren(...doc.meters.map((m) => meterRow(m, now)));
}

function render(doc) {
  lastDoc = doc;
  $("version").textContent = "v" + doc.version;
  badge($("ready"), doc.ready ? "ok" : "bad", doc.ready ? "ready" : "not ready: " + doc.not_ready.join("; "));
  renderUplink(doc);
  renderBroker(doc);
  renderMeters(doc);
}

async function loadHistory() {
  try {
    const r = await fetch("api/history");
    if (r.ok) { history = (await r.json()).meters; if (lastDoc) renderMeters(lastDoc); }
  } catch (e) { /* offline for a moment: the next round retries */ }
}

function connect() {
  const es = new EventSource("api/events");
  es.addEventListener("status", (e) => {
    $("live").textContent = "live";
    render(JSON.parse(e.data));
  });
  es.addEventListener("error", () => { $("live").textContent = "reconnecting…"; });
}

function say(cls, text) {
  const m = $("form-msg");
  m.className = cls;
  m.textContent = text;
}

function startEdit(m) {
  $("f-editing").value = m.name;
  $("f-name").value = m.name;
  $("f-host").value = m.host;
  $("f-port").value = m.port;
  $("form-title").textContent = "Edit registry meter " + m.name;
  $("f-submit").textContent = "Save";
  $("f-cancel").hidden = false;
}

function stopEdit() {
  $("meter-form").reset();
  $("f-editing").value = "";
  $("form-title").textContent = "Add a registry meter";
  $("f-submit").textContent = "Add meter";
  $("f-cancel").hidden = true;
}

async function answer(r) {
  let body = {};
  try { body = await r.json(); } catch (e) { body = {}; }
  if (r.ok) return null;
  if (body.errors) return body.errors.map((e) => e.key + ": " + e.message).join("; ");
  return body.error || ("HTTP " + r.status);
}

async function submitMeter(ev) {
  ev.preventDefault();
  const editing = $("f-editing").value;
  const body = { name: $("f-name").value.trim(), host: $("f-host").value.trim(), port: Number($("f-port").value) };
  const url = editing ? "api/meters/" + encodeURIComponent(editing) : "api/meters";
  const r = await fetch(url, { method: editing ? "PUT" : "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const err = await answer(r);
  if (err) { say("bad", err); return; }
  say("ok", (editing ? "Saved " : "Added ") + body.name + "; polling it now.");
  stopEdit();
}

async function removeMeter(name) {
  if (!window.confirm("Remove meter " + name + " from the registry?")) return;
  const r = await fetch("api/meters/" + encodeURIComponent(name), { method: "DELETE" });
  const err = await answer(r);
  say(err ? "bad" : "ok", err || ("Removed " + name + "."));
}

$("meter-form").addEventListener("submit", submitMeter);
$("f-cancel").addEventListener("click", stopEdit);
loadHistory();
setInterval(loadHistory, 30000);
connect();
