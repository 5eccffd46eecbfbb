"use strict";
function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined || text === "" ? "-" : String(text);
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}
async function getJSON(url) {
  const r = await fetch(url, {cache: "no-store"});
  if (!r.ok) throw new Error(url + ": " + r.status);
  return r.json();
}
function counters(c) {
  return Object.entries(c || {}).map(([k, v]) => k + "=" + v).join(" ");
}
async function loadDevices() {
  const devices = await getJSON("/api/devices");
  const body = document.querySelector("#devices tbody");
  body.replaceChildren();
  for (const d of devices) {
    const tr = document.createElement("tr");
    tr.className = "device";
    tr.dataset.device = d.device_id;
    cell(tr, d.device_id);
    cell(tr, d.liveness, d.liveness.split(" ")[0]);
    cell(tr, d.last_seen);
    cell(tr, d.models);
    cell(tr, d.received);
    cell(tr, d.events);
    cell(tr, d.flagged, d.flagged ? "critical" : "");
    cell(tr, counters((d.counters || {}).counters));
    tr.addEventListener("click", () => {
      location.hash = "device=" + encodeURIComponent(d.device_id);
    });
    body.appendChild(tr);
  }
}
function drawChart(events) {
  const svg = document.getElementById("chart");
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const now = Date.now(), hours = 24, w = 720, h = 140, pad = 20;
  const counts = new Array(hours).fill(0);
  for (const e of events) {
    const age = (now - Date.parse(e.time)) / 3600000;
    if (age >= 0 && age < hours) counts[hours - 1 - Math.floor(age)] += 1;
  }
  const max = Math.max(1, ...counts), bw = (w - pad) / hours;
  counts.forEach((n, i) => {
    const bh = (h - 2 * pad) * n / max;
    const r = document.createElementNS(ns, "rect");
    r.setAttribute("class", "bar");
    r.setAttribute("x", String(pad + i * bw + 1));
    r.setAttribute("y", String(h - pad - bh));
    r.setAttribute("width", String(bw - 2));
    r.setAttribute("height", String(bh));
    r.dataset.count = String(n);
    const t = document.createElementNS(ns, "title");
    t.textContent = n + " events, " + (hours - 1 - i) + "h ago";
    r.appendChild(t);
    svg.appendChild(r);
  });
  const label = document.createElementNS(ns, "text");
  label.setAttribute("x", "0"); label.setAttribute("y", "12");
  label.textContent = "max " + max + "/h";
  svg.appendChild(label);
}
async function loadEvents() {
  const events = await getJSON("/api/events?since=24h");
  drawChart(events);
  const body = document.querySelector("#timeline tbody");
  body.replaceChildren();
  for (const e of events.slice().reverse().slice(0, 200)) {
    const tr = document.createElement("tr");
    tr.className = "event";
    cell(tr, e.time); cell(tr, e.source); cell(tr, e.device_id); cell(tr, e.kind);
    cell(tr, e.severity, e.severity); cell(tr, e.detail);
    body.appendChild(tr);
  }
}
async function loadDetail() {
  const m = /^#device=(.+)$/.exec(location.hash);
  const section = document.getElementById("detail");
  if (!m) { section.hidden = true; return; }
  const d = await getJSON("/api/device/" + m[1]);
  section.hidden = false;
  document.getElementById("detail-id").textContent = d.device.device_id;
  document.getElementById("detail-status").textContent = JSON.stringify(d.device, null, 2);
  const body = document.querySelector("#detail-reports tbody");
  body.replaceChildren();
  for (const r of d.reports) {
    const tr = document.createElement("tr");
    tr.className = "report";
    cell(tr, r.seq); cell(tr, r.kind); cell(tr, r.time); cell(tr, JSON.stringify(r.data));
    body.appendChild(tr);
  }
}
async function refresh() {
  try {
    await Promise.all([loadDevices(), loadEvents(), loadDetail()]);
    document.getElementById("updated").textContent = "updated " + new Date().toISOString();
    document.body.dataset.ready = "1";
  } catch (err) {
    document.getElementById("updated").textContent = "error: " + err.message;
  }
}
window.addEventListener("hashchange", loadDetail);
refresh();
setInterval(refresh, 5000);
