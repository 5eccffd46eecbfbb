"""``edgeward fleet dashboard``: a local web page over the monitor's store (stdlib http.server).

Read-only JSON endpoints and one static page; no CDN, no third-party script. The page inserts
device-supplied strings with ``textContent`` only, and a Content-Security-Policy allows nothing but
this server's own script and inline SVG, so a hostile report cannot run code in the operator's
browser. Binds 127.0.0.1 by default.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from device_agent.errors import EdgeWardError, EnvironmentFault
from device_agent.wire import ID_RE

from .ca import FleetHome
from .store import MonitorStore
from .views import device_views, parse_since

CSP = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'"

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>EdgeWard fleet</title>
<link rel="stylesheet" href="/app.css"></head>
<body>
<header><h1>EdgeWard fleet</h1><span id="updated"></span></header>
<main>
<section><h2>Devices</h2>
<table id="devices"><thead><tr><th>Device</th><th>State</th><th>Last seen</th><th>Models</th>
<th>Reports</th><th>Events</th><th>Flagged</th><th>Counters</th></tr></thead><tbody></tbody></table>
</section>
<section><h2>Events, last 24 hours</h2>
<svg id="chart" width="720" height="140" role="img" aria-label="events per hour"></svg>
<table id="timeline"><thead><tr><th>Time</th><th>Source</th><th>Device</th><th>Kind</th>
<th>Severity</th><th>Detail</th></tr></thead><tbody></tbody></table>
</section>
<section id="detail" hidden><h2>Device <span id="detail-id"></span></h2>
<pre id="detail-status"></pre>
<table id="detail-reports"><thead><tr><th>Seq</th><th>Kind</th><th>Time</th><th>Data</th></tr>
</thead><tbody></tbody></table>
</section>
</main>
<script src="/app.js"></script>
</body></html>
"""

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
header{display:flex;gap:1em;align-items:baseline}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}
th,td{border-bottom:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
tbody tr.device{cursor:pointer} tbody tr.device:hover{background:#f3f6fa}
.online{color:#17803d}.stale{color:#b26b00}.offline,.stopping,.never{color:#b3261e}
.critical{color:#b3261e;font-weight:600}.warning{color:#b26b00}
rect.bar{fill:#3b6ea8} text{font-size:10px;fill:#555}
pre{background:#f6f6f6;padding:.6em;max-width:60em;overflow:auto}
"""

SCRIPT = r"""
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
"""


class DashboardApp:
    """The JSON views behind the page (pure functions of the store and the clock)."""

    def __init__(self, home: FleetHome, store: MonitorStore, stale_after: float) -> None:
        self.home = home
        self.store = store
        self.stale_after = stale_after

    def devices(self) -> list[dict[str, Any]]:
        return device_views(self.home, self.store, datetime.now(UTC), self.stale_after)

    def events(self, since: str | None, device: str | None) -> list[dict[str, Any]]:
        return self.store.events(since=parse_since(since, datetime.now(UTC)), device_id=device)

    def device(self, device_id: str) -> dict[str, Any] | None:
        match = [d for d in self.devices() if d["device_id"] == device_id]
        if not match:
            return None
        return {"device": match[0], "reports": self.store.reports(device_id, limit=50)}


def make_handler(app: DashboardApp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "edgeward-dashboard"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
            """Quiet: the dashboard is a local tool."""

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Security-Policy", CSP)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, doc: Any, status: int = 200) -> None:
            self._send(status, json.dumps(doc, sort_keys=True).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            url = urlsplit(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            static = {
                "/": (PAGE, "text/html; charset=utf-8"),
                "/app.js": (SCRIPT, "text/javascript; charset=utf-8"),
                "/app.css": (CSS, "text/css; charset=utf-8"),
            }
            try:
                if url.path in static:
                    text, ctype = static[url.path]
                    self._send(200, text.encode(), ctype)
                elif url.path == "/api/devices":
                    self._json(app.devices())
                elif url.path == "/api/events":
                    self._json(app.events(q.get("since"), q.get("device")))
                elif url.path.startswith("/api/device/") and ID_RE.match(url.path[12:]):
                    doc = app.device(url.path[12:])
                    self._json(doc if doc else {"error": "unknown device"}, 200 if doc else 404)
                else:
                    self._json({"error": "not found"}, 404)
            except EdgeWardError as e:
                self._json({"error": str(e)}, 400)

    return Handler


def make_server(
    home: FleetHome, store: MonitorStore, bind: str, port: int, stale_after: float
) -> ThreadingHTTPServer:
    try:
        return ThreadingHTTPServer(
            (bind, port), make_handler(DashboardApp(home, store, stale_after))
        )
    except OSError as e:
        raise EnvironmentFault(f"cannot serve the dashboard on {bind}:{port}: {e.strerror}") from e


def serve(home: FleetHome, store: MonitorStore, bind: str, port: int, stale_after: float) -> None:
    """Serve until Ctrl-C."""
    server = make_server(home, store, bind, port, stale_after)
    print(f"dashboard on http://{bind}:{server.server_address[1]}/ (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
