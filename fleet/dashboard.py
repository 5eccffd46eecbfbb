"""``edgeward fleet dashboard``: a local web page over the monitor's store (stdlib http.server).

Read-only JSON endpoints and one static page, whose HTML, script and style sheet are package data
files in ``fleet/dashboard_assets/``; no CDN, no third-party script. The page inserts
device-supplied strings with ``textContent`` only, and a Content-Security-Policy allows nothing but
this server's own script and inline SVG, so a hostile report cannot run code in the operator's
browser. Binds 127.0.0.1 by default.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from device_agent.errors import EdgeWardError, EnvironmentFault
from device_agent.wire import ID_RE

from .ca import FleetHome
from .store import StoreReads
from .views import device_views, parse_since

CSP = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'"

# URL path -> (file in dashboard_assets/, Content-Type). The page loads its script and style sheet
# from this server, so the CSP above needs no inline code and no hashes.
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
}


def static_files() -> dict[str, tuple[bytes, str]]:
    """The page, its script and its style sheet (package data in ``fleet/dashboard_assets``), by
    URL path: (body, Content-Type)."""
    assets = resources.files("fleet") / "dashboard_assets"
    try:
        return {url: ((assets / name).read_bytes(), ctype) for url, (name, ctype) in STATIC.items()}
    except OSError as e:
        raise EnvironmentFault(f"the dashboard's page is missing from this installation: {e}") from e


class DashboardApp:
    """The JSON views behind the page (pure functions of the store and the clock)."""

    def __init__(self, home: FleetHome, store: StoreReads, stale_after: float) -> None:
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
    static = static_files()

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
            try:
                if url.path in static:
                    body, ctype = static[url.path]
                    self._send(200, body, ctype)
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
    home: FleetHome, store: StoreReads, bind: str, port: int, stale_after: float
) -> ThreadingHTTPServer:
    try:
        return ThreadingHTTPServer(
            (bind, port), make_handler(DashboardApp(home, store, stale_after))
        )
    except OSError as e:
        raise EnvironmentFault(f"cannot serve the dashboard on {bind}:{port}: {e.strerror}") from e


def serve(home: FleetHome, store: StoreReads, bind: str, port: int, stale_after: float) -> None:
    """Serve until Ctrl-C."""
    server = make_server(home, store, bind, port, stale_after)
    print(f"dashboard on http://{bind}:{server.server_address[1]}/ (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
