"use strict";
// The EdgeWard operator's console. No framework: the DOM API, SVG charts drawn here, and every
// string a board or the store supplied inserted with textContent (never as HTML).
const NS = "http://www.w3.org/2000/svg";
const STATES = ["online", "stale", "offline", "never seen", "decommissioned", "wiped", "other"];
const SEVERITIES = ["info", "warning", "critical", "other"];
// Okabe-Ito, in an order that keeps neighbours apart.
const SERIES = [
  ["queries", "queries", "#0072B2"], ["answered", "answered", "#009E73"],
  ["refused_429", "throttled", "#E69F00"], ["detections_ood", "out-of-distribution", "#56B4E9"],
  ["detections_extraction", "extraction", "#D55E00"], ["detections_probing", "probing", "#CC79A7"],
];

const COUNTER_NAMES = {
  queries: "queries", answered: "answered", rows: "rows answered", refused_429: "throttled (HTTP 429)",
  detections_ood: "out-of-distribution detections", detections_extraction: "extraction detections",
  detections_probing: "probing detections",
};
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function svgEl(tag, attrs, text) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = String(text);
  return e;
}
function cell(tr, text, cls) {
  const td = el("td", text === null || text === undefined || text === "" ? "-" : text, cls);
  tr.appendChild(td);
  return td;
}
function plural(n, unit) { return n + " " + unit + (n === 1 ? "" : "s"); }
function fmtNum(n) { return Number(n).toLocaleString("en-GB"); }
function ago(iso) {
  const s = Math.round((Date.now() - Date.parse(iso)) / 1000);
  if (!isFinite(s)) return "";
  if (s < 90) return s + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  if (s < 129600) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}
function sevClass(s) { return SEVERITIES.includes(s) ? s : "other"; }
function sevBadge(td, s) {
  td.replaceChildren(el("span", s || "-", "sev sev-" + sevClass(s)));
}
function dl(target, pairs) {
  target.replaceChildren();
  for (const [k, v] of pairs) {
    target.appendChild(el("dt", k));
    target.appendChild(el("dd", v === null || v === undefined || v === "" ? "-" : v));
  }
}
// An event's detail, readable: a JSON object as a list of keys and values, anything else as text.
function detail(td, text) {
  td.className = "detail";
  let doc = null;
  try { doc = JSON.parse(text); } catch (e) { doc = null; }
  if (doc && typeof doc === "object" && !Array.isArray(doc) && Object.keys(doc).length) {
    const d = el("dl", null, "detail");
    dl(d, Object.entries(doc).map(([k, v]) => [k, typeof v === "object" ? JSON.stringify(v) : v]));
    td.appendChild(d);
  } else {
    td.textContent = text === null || text === undefined || text === "" || text === "{}" ? "-" : String(text);
  }
}
async function getJSON(url) {
  const r = await fetch(url, {cache: "no-store"});
  if (!r.ok) {
    let msg = url + ": HTTP " + r.status;
    try { msg += " " + (await r.json()).error; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return r.json();
}

// --- charts ----------------------------------------------------------------------------------
// Charts are drawn at the width they are shown at (1 SVG unit = 1 CSS pixel), so their text
// stays readable from a 375 px phone to a wide screen.
function widthOf(svg) {
  return Math.max(300, Math.round((svg.parentElement || svg).clientWidth || 600));
}
function niceMax(v) {
  if (v <= 5) return 5;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}
// Horizontal bars, one per kind, stacked by severity; x axis: events.
function kindChart(svg, rows) {
  svg.replaceChildren();
  const kinds = {};
  for (const r of rows) {
    const k = r.kind + " (" + r.source + ")";
    kinds[k] = kinds[k] || {total: 0};
    kinds[k][sevClass(r.severity)] = (kinds[k][sevClass(r.severity)] || 0) + r.count;
    kinds[k].total += r.count;
  }
  const names = Object.keys(kinds).sort((a, b) => kinds[b].total - kinds[a].total);
  const w = widthOf(svg), left = Math.min(150, Math.round(w * 0.38)), rowH = 22, top = 8, plotW = w - left - 20;
  const h = top + Math.max(1, names.length) * rowH + 44;
  svg.setAttribute("viewBox", "0 0 " + w + " " + h);
  const max = niceMax(Math.max(1, ...names.map(n => kinds[n].total)));
  const axisY = top + Math.max(1, names.length) * rowH;
  for (let i = 0; i <= 5; i++) {
    const x = left + plotW * i / 5;
    svg.appendChild(svgEl("line", {class: "grid", x1: x, x2: x, y1: top, y2: axisY}));
    svg.appendChild(svgEl("text", {x: x, y: axisY + 14, "text-anchor": "middle"}, fmtNum(max * i / 5)));
  }
  svg.appendChild(svgEl("line", {class: "axis", x1: left, x2: left + plotW, y1: axisY, y2: axisY}));
  svg.appendChild(svgEl("text", {class: "axis-title", x: left + plotW / 2, y: axisY + 32, "text-anchor": "middle"},
    "security events (count)"));
  if (!names.length) {
    svg.appendChild(svgEl("text", {x: left + 4, y: top + 15}, "no security events"));
  }
  names.forEach((name, i) => {
    const y = top + i * rowH;
    const label = svgEl("text", {x: left - 6, y: y + 15, "text-anchor": "end"}, name.length > 24 ? name.slice(0, 23) + "…" : name);
    label.appendChild(svgEl("title", {}, name));
    svg.appendChild(label);
    let x = left;
    for (const sev of SEVERITIES) {
      const n = kinds[name][sev] || 0;
      if (!n) continue;
      const bw = plotW * n / max;
      const r = svgEl("rect", {class: "bar " + sev, x: x, y: y + 3, width: Math.max(bw, 1), height: rowH - 6,
        "data-kind": name, "data-severity": sev, "data-count": n});
      r.appendChild(svgEl("title", {}, name + ": " + plural(n, sev + " event")));
      svg.appendChild(r);
      x += bw;
    }
    svg.appendChild(svgEl("text", {x: x + 4, y: y + 15}, fmtNum(kinds[name].total)));
  });
  // Severity legend below the axis title.
  let lx = left;
  for (const sev of ["info", "warning", "critical"]) {
    svg.appendChild(svgEl("rect", {class: "bar " + sev, x: lx, y: h - 10, width: 10, height: 8}));
    svg.appendChild(svgEl("text", {x: lx + 14, y: h - 2}, sev));
    lx += 80;
  }
}
// Events per hour over the last 24 hours: x axis hours before now (UTC clock labels), y events/h.
function hourlyChart(svg, events) {
  svg.replaceChildren();
  const w = widthOf(svg), h = 190, left = 44, bottom = 40, top = 10, hours = 24, plotW = w - left - 14;
  svg.setAttribute("viewBox", "0 0 " + w + " " + h);
  const now = Date.now();
  const counts = new Array(hours).fill(0);
  for (const e of events) {
    const age = (now - Date.parse(e.time)) / 3600000;
    if (age >= 0 && age < hours) counts[hours - 1 - Math.floor(age)] += 1;
  }
  const max = niceMax(Math.max(1, ...counts)), plotH = h - top - bottom, bw = plotW / hours;
  for (let i = 0; i <= 5; i++) {
    const y = top + plotH - plotH * i / 5;
    svg.appendChild(svgEl("line", {class: "grid", x1: left, x2: left + plotW, y1: y, y2: y}));
    svg.appendChild(svgEl("text", {x: left - 4, y: y + 4, "text-anchor": "end"}, fmtNum(max * i / 5)));
  }
  counts.forEach((n, i) => {
    const bh = plotH * n / max;
    const r = svgEl("rect", {class: "bar hour", x: left + i * bw + 1, y: top + plotH - bh, width: bw - 2, height: bh,
      "data-count": n});
    r.appendChild(svgEl("title", {}, plural(n, "event") + ", " + (hours - 1 - i) + "–" + (hours - i) + " h ago"));
    svg.appendChild(r);
  });
  svg.appendChild(svgEl("line", {class: "axis", x1: left, x2: left + plotW, y1: top + plotH, y2: top + plotH}));
  svg.appendChild(svgEl("line", {class: "axis", x1: left, x2: left, y1: top, y2: top + plotH}));
  const step = w < 500 ? 12 : 6;
  for (let i = 0; i <= hours; i += step) {
    const x = left + i * bw;
    const t = new Date(now - (hours - i) * 3600000);
    svg.appendChild(svgEl("line", {class: "tick", x1: x, x2: x, y1: top + plotH, y2: top + plotH + 4}));
    svg.appendChild(svgEl("text", {x: x, y: top + plotH + 15, "text-anchor": i === 0 ? "start" : i === hours ? "end" : "middle"},
      String(t.getUTCHours()).padStart(2, "0") + ":" + String(t.getUTCMinutes()).padStart(2, "0")));
  }
  svg.appendChild(svgEl("text", {class: "axis-title", x: left + plotW / 2, y: h - 4, "text-anchor": "middle"},
    "time (UTC), 1-hour bins"));
  svg.appendChild(svgEl("text", {class: "axis-title", x: 12, y: top + plotH / 2, "text-anchor": "middle",
    transform: "rotate(-90 12 " + (top + plotH / 2) + ")"}, "events per hour"));
}
// A board's counters over time: one line per counter, x: report time (UTC), y: count.
function counterChart(svg, legend, points) {
  svg.replaceChildren();
  legend.replaceChildren();
  const w = widthOf(svg), h = 220, left = 54, bottom = 40, top = 10, plotW = w - left - 12, plotH = h - top - bottom;
  svg.setAttribute("viewBox", "0 0 " + w + " " + h);
  const times = points.map(p => Date.parse(p.time));
  if (!points.length) {
    svg.appendChild(svgEl("text", {x: left, y: top + 20}, "no telemetry reports yet"));
    return;
  }
  const t0 = Math.min(...times), t1 = Math.max(t0 + 1000, ...times);
  const shown = SERIES.filter(([key]) => points.some(p => typeof p.counters[key] === "number"));
  const max = niceMax(Math.max(1, ...points.flatMap(p => shown.map(([k]) => Number(p.counters[k]) || 0))));
  const X = t => left + plotW * (t - t0) / (t1 - t0), Y = v => top + plotH - plotH * v / max;
  for (let i = 0; i <= 5; i++) {
    const y = Y(max * i / 5);
    svg.appendChild(svgEl("line", {class: "grid", x1: left, x2: left + plotW, y1: y, y2: y}));
    svg.appendChild(svgEl("text", {x: left - 4, y: y + 4, "text-anchor": "end"}, fmtNum(max * i / 5)));
  }
  svg.appendChild(svgEl("line", {class: "axis", x1: left, x2: left + plotW, y1: top + plotH, y2: top + plotH}));
  svg.appendChild(svgEl("line", {class: "axis", x1: left, x2: left, y1: top, y2: top + plotH}));
  const ticks = w < 500 ? 2 : 4;
  for (let i = 0; i <= ticks; i++) {
    const t = new Date(t0 + (t1 - t0) * i / ticks), x = X(t.getTime());
    svg.appendChild(svgEl("line", {class: "tick", x1: x, x2: x, y1: top + plotH, y2: top + plotH + 4}));
    svg.appendChild(svgEl("text", {x: x, y: top + plotH + 15, "text-anchor": i === 0 ? "start" : i === ticks ? "end" : "middle"},
      t.toISOString().slice(5, 16).replace("T", " ")));
  }
  svg.appendChild(svgEl("text", {class: "axis-title", x: left + plotW / 2, y: h - 4, "text-anchor": "middle"},
    "report time (UTC, MM-DD hh:mm)"));
  svg.appendChild(svgEl("text", {class: "axis-title", x: 12, y: top + plotH / 2, "text-anchor": "middle",
    transform: "rotate(-90 12 " + (top + plotH / 2) + ")"}, "count since service start"));
  for (const [key, label, colour] of shown) {
    const pts = points.filter(p => typeof p.counters[key] === "number");
    const d = pts.map((p, i) => (i ? "L" : "M") + X(Date.parse(p.time)).toFixed(1) + " " + Y(p.counters[key]).toFixed(1)).join(" ");
    const path = svgEl("path", {class: "series", d: d, stroke: colour, "data-counter": key,
      "data-last": pts[pts.length - 1].counters[key]});
    path.appendChild(svgEl("title", {}, label + ": " + fmtNum(pts[pts.length - 1].counters[key])));
    svg.appendChild(path);
    const item = el("span", label + " " + fmtNum(pts[pts.length - 1].counters[key]));
    item.style.setProperty("--c", colour);
    item.dataset.counter = key;
    legend.appendChild(item);
  }
}

// --- views -----------------------------------------------------------------------------------
let devicesCache = [];
function renderDevices() {
  const q = document.getElementById("board-filter").value.trim().toLowerCase();
  const body = document.querySelector("#devices tbody");
  const rows = [];
  let shown = 0;
  for (const d of devicesCache) {
    const text = (d.device_id + " " + d.state + " " + (d.models || "")).toLowerCase();
    if (q && !text.includes(q)) continue;
    shown += 1;
    const tr = el("tr", null, "device");
    tr.dataset.device = d.device_id;
    tr.dataset.state = d.state;
    tr.tabIndex = 0;
    const a = el("a", d.device_id);
    a.href = "#/board/" + encodeURIComponent(d.device_id);
    cell(tr, "").replaceChildren(a);
    cell(tr, d.state, "state");
    cell(tr, d.last_seen ? d.last_seen + " (" + ago(d.last_seen) + ")" : null);
    cell(tr, d.models);
    cell(tr, d.received === undefined ? null : fmtNum(d.received), "num");
    cell(tr, d.flagged === undefined ? null : fmtNum(d.flagged), "num");
    tr.addEventListener("click", (ev) => {
      if (ev.target.tagName !== "A") location.hash = "#/board/" + encodeURIComponent(d.device_id);
    });
    rows.push(tr);
  }
  body.replaceChildren(...rows);
  document.getElementById("board-count").textContent =
    "(" + (q ? shown + " of " : "") + plural(devicesCache.length, "board") + ")";
}
async function loadFleet() {
  const [summary, devices, events] = await Promise.all([
    getJSON("/api/summary"), getJSON("/api/devices"), getJSON("/api/events?since=24h")]);
  const tiles = document.getElementById("states");
  tiles.replaceChildren(...STATES.map(s => {
    const t = el("div", null, "tile");
    t.dataset.state = s;
    t.dataset.count = String(summary.boards[s] || 0);
    t.appendChild(el("span", fmtNum(summary.boards[s] || 0), "n"));
    t.appendChild(el("span", s + " (boards)", "label"));
    return t;
  }));
  tiles.dataset.total = String(summary.total);
  kindChart(document.getElementById("events-day"), summary.events_day);
  kindChart(document.getElementById("events-week"), summary.events_week);
  hourlyChart(document.getElementById("hourly"), events);
  const mb = document.querySelector("#models tbody");
  mb.replaceChildren(...summary.models.map(m => {
    const tr = el("tr", null, "model");
    cell(tr, m.model_id); cell(tr, "v" + m.version); cell(tr, plural(m.boards, "board"), "num");
    tr.dataset.boards = String(m.boards);
    return tr;
  }));
  if (!summary.models.length) emptyRow(mb, "no models reported by online boards", 3);
  const cb = document.querySelector("#fleet-counters tbody");
  cb.replaceChildren(...Object.entries(summary.counters).map(([k, v]) => {
    const tr = el("tr", null, "counter");
    tr.dataset.counter = k;
    cell(tr, COUNTER_NAMES[k] ? COUNTER_NAMES[k] + " (" + k + ")" : k); cell(tr, fmtNum(v), "num");
    return tr;
  }));
  devicesCache = devices;
  const ids = document.getElementById("board-ids");
  ids.replaceChildren(...devices.map(d => { const o = el("option"); o.value = d.device_id; return o; }));
  renderDevices();
}
// Each cell carries its column's name, which a phone shows in place of the header row.
function labelCells(table) {
  const heads = Array.from(table.querySelectorAll("thead th")).map(th => th.textContent);
  for (const tr of table.querySelectorAll("tbody tr")) {
    Array.from(tr.children).forEach((td, i) => { if (heads[i]) td.dataset.label = heads[i]; });
  }
}
function emptyRow(body, text, cols) {
  const tr = el("tr"); const td = cell(tr, text); td.colSpan = cols; body.appendChild(tr);
}
function eventRow(e, withBoard) {
  const tr = el("tr", null, "event");
  tr.dataset.kind = e.kind || "";
  tr.dataset.severity = e.severity || "";
  tr.dataset.source = e.source;
  cell(tr, e.time);
  if (withBoard) {
    if (e.device_id) {
      const a = el("a", e.device_id);
      a.href = "#/board/" + encodeURIComponent(e.device_id);
      cell(tr, "").replaceChildren(a);
    } else cell(tr, null);
  }
  cell(tr, e.source); cell(tr, e.kind);
  sevBadge(cell(tr, ""), e.severity);
  const td = el("td"); tr.appendChild(td); detail(td, e.detail);
  if (e.repeats > 1) td.appendChild(el("div", "seen " + e.repeats + " times", "muted"));
  return tr;
}
async function loadBoard(id) {
  const d = await getJSON("/api/device/" + encodeURIComponent(id));
  const dev = d.device;
  document.getElementById("board-id").textContent = dev.device_id;
  const st = document.getElementById("board-state");
  st.textContent = dev.state;
  st.dataset.state = dev.state;
  dl(document.getElementById("board-identity"), [
    ["board id", dev.device_id], ["state", dev.state], ["enrolled", dev.enrolled ? "yes" : "no"],
    ["first seen (UTC)", dev.first_seen], ["last seen (UTC)", dev.last_seen ? dev.last_seen + " (" + ago(dev.last_seen) + ")" : null],
    ["reports received", dev.received === undefined ? null : plural(dev.received, "report")],
    ["duplicates", dev.duplicates === undefined ? null : plural(dev.duplicates, "report")],
    ["security events", dev.flagged === undefined ? null : plural(dev.flagged, "event")],
    ["pending commands", plural(dev.pending_commands || 0, "command")],
    ["uptime", dev.status && typeof dev.status.uptime_s === "number" ? fmtNum(dev.status.uptime_s) + " s" : null],
    ["key fingerprint", dev.status ? dev.status.box_fingerprint : null],
    ["trust fingerprint", dev.status ? dev.status.trust_fingerprint : null],
  ]);
  const c = d.certificate;
  dl(document.getElementById("board-cert"), c ? [
    ["subject", c.subject], ["issuer", c.issuer], ["serial", c.serial],
    ["valid from (UTC)", c.not_before], ["valid until (UTC)", c.not_after], ["SHA-256", c.sha256],
    ["revoked", c.revoked ? "yes, " + c.revoked : "no"],
  ] : [["certificate", "no certificate file in the fleet home"]]);
  const models = dev.status && Array.isArray(dev.status.models) ? dev.status.models.filter(m => m && typeof m === "object") : [];
  const mb = document.querySelector("#board-models tbody");
  mb.replaceChildren(...models.map(m => { const tr = el("tr", null, "model"); cell(tr, m.model_id); cell(tr, "v" + m.version); return tr; }));
  counterChart(document.getElementById("board-counters"), document.getElementById("board-counters-legend"), d.counters);
  const eb = document.querySelector("#board-events tbody");
  eb.replaceChildren(...d.events.slice().reverse().map(e => eventRow(e, false)));
  if (!d.events.length) emptyRow(eb, "no events", 5);
  labelCells(document.getElementById("board-events"));
  const cb = document.querySelector("#board-commands tbody");
  cb.replaceChildren(...d.commands.map(cmd => {
    const tr = el("tr", null, "command");
    cell(tr, cmd.seq, "num"); cell(tr, cmd.kind); cell(tr, cmd.issued); cell(tr, cmd.state);
    const r = cmd.result;
    cell(tr, r ? r.outcome + " at " + r.time + " (signed by the board; " + (r.detail || "no detail") + ")" : "no result yet");
    return tr;
  }));
  if (!d.commands.length) emptyRow(cb, "no commands issued", 5);
  const w = dev.wiped;
  dl(document.getElementById("board-attestation"), w ? [
    ["wiped", "attestation verified against the board's enrolled key"],
    ["started (UTC)", w.started], ["command", w.command_seq === null || w.command_seq === undefined ? "at the board" : "#" + w.command_seq],
    ["recorded (UTC)", w.recorded], ["source", w.source],
  ] : [["wiped", "no wipe attested"]]);
}
function filterQuery() {
  const f = document.getElementById("event-filter");
  const p = new URLSearchParams();
  for (const name of ["device", "kind", "severity", "source", "since"]) {
    const v = f.elements[name].value.trim();
    if (v || name === "since") p.set(name, v);
  }
  return p;
}
async function loadEvents(params) {
  const f = document.getElementById("event-filter");
  for (const name of ["device", "kind", "severity", "source"]) f.elements[name].value = params.get(name) || "";
  f.elements.since.value = params.has("since") ? params.get("since") : "7d";
  if (!params.has("since")) params.set("since", "7d");
  if (!params.get("since")) params.delete("since");
  const events = await getJSON("/api/events?" + params.toString());
  const body = document.querySelector("#events tbody");
  body.replaceChildren(...events.slice().reverse().map(e => eventRow(e, true)));
  labelCells(document.getElementById("events"));
  document.getElementById("event-count").textContent = plural(events.length, "event") +
    (events.length >= 500 ? " (the newest 500: narrow the filter for older ones)" : "");
  if (!devicesCache.length) {
    devicesCache = await getJSON("/api/devices");
    const ids = document.getElementById("board-ids");
    ids.replaceChildren(...devicesCache.map(d => { const o = el("option"); o.value = d.device_id; return o; }));
  }
}

// --- routing: #/ (fleet), #/board/ID, #/events?filters --------------------------------------
function route() {
  const h = location.hash || "#/";
  let m;
  if ((m = /^#\/board\/(.+)$/.exec(h))) return {view: "board", id: decodeURIComponent(m[1])};
  if ((m = /^#\/events\??(.*)$/.exec(h))) return {view: "events", params: new URLSearchParams(m[1])};
  return {view: "fleet"};
}
async function refresh(auto) {
  const r = route();
  for (const v of ["fleet", "board", "events"]) document.getElementById("view-" + v).hidden = v !== r.view;
  document.body.dataset.view = r.view;
  if (auto !== true) document.body.dataset.ready = "0";
  try {
    if (r.view === "board") await loadBoard(r.id);
    else if (r.view === "events") await loadEvents(r.params);
    else await loadFleet();
    document.getElementById("updated").textContent = "updated " + new Date().toISOString().slice(0, 19).replace("T", " ") + " UTC";
    document.body.dataset.ready = "1";
  } catch (err) {
    document.getElementById("updated").textContent = "error: " + err.message;
    document.body.dataset.ready = "error";
  }
}
document.getElementById("board-filter").addEventListener("input", renderDevices);
document.getElementById("event-filter").addEventListener("submit", (ev) => {
  ev.preventDefault();
  location.hash = "#/events?" + filterQuery().toString();
});
document.getElementById("devices").addEventListener("keydown", (ev) => {
  const tr = ev.target.closest && ev.target.closest("tr.device");
  if (tr && ev.key === "Enter") location.hash = "#/board/" + encodeURIComponent(tr.dataset.device);
});
window.addEventListener("hashchange", () => refresh(false));
refresh(false);
setInterval(() => { if (document.body.dataset.ready === "1" && route().view === "fleet") refresh(true); }, 15000);
