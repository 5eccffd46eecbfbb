"""``edgeward fleet dashboard``: the operator's console over the monitor's store (stdlib http.server).

Read-only JSON endpoints and one static page, whose HTML, script and style sheet are package data
files in ``fleet/dashboard_assets/`` (no build step, no framework, no CDN: the charts are SVG
drawn by ``app.js``). Three views: the fleet's health at a glance (``/api/summary``), a page per
board (``/api/device/ID``: identity and certificate, models, counters over time, events,
commands with their signed results, wipe attestation), and the events, filterable by board,
kind, severity and time (``/api/events``).

The page inserts device-supplied strings with ``textContent`` only, and a
Content-Security-Policy allows nothing but this server's own script and inline SVG, so a hostile
report cannot run code in the operator's browser. Access (``fleet/access.py``): loopback by
default; beyond it TLS and a fleet-CA operator certificate or a bearer token.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from http.server import ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from device_agent.errors import EdgeWardError, EnvironmentFault, UsageError
from device_agent.wire import ID_RE

from .access import Access, GuardedHandler, make_guarded_server, url_of
from .ca import FleetHome, revoked
from .store import StoreReads
from .views import board_state, decommission_ordered, device_views, fleet_summary, parse_since

CSP = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'"

# URL path -> (file in dashboard_assets/, Content-Type). The page loads its script and style sheet
# from this server, so the CSP above needs no inline code and no hashes.
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
}
SEVERITIES = ("info", "warning", "critical")
MAX_EVENTS = 500  # events one filter returns (newest); narrow the filter for older ones
MAX_QUERY = 2048  # bytes of a request's query string


def static_files() -> dict[str, tuple[bytes, str]]:
    """The page, its script and its style sheet (package data in ``fleet/dashboard_assets``), by
    URL path: (body, Content-Type)."""
    assets = resources.files("fleet") / "dashboard_assets"
    try:
        return {url: ((assets / name).read_bytes(), ctype) for url, (name, ctype) in STATIC.items()}
    except OSError as e:
        raise EnvironmentFault(f"the dashboard's page is missing from this installation: {e}") from e


def certificate_view(home: FleetHome, device_id: str) -> dict[str, Any] | None:
    """The board's client certificate as the fleet CA issued it (None if there is no file)."""
    path = home.certs / f"{device_id}.crt"
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    der = cert.public_bytes(serialization.Encoding.DER)
    rev = revoked(home).get(device_id)
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sha256": hashlib.sha256(der).hexdigest(),
        "revoked": rev.isoformat() if rev else None,
    }


class DashboardApp:
    """The JSON views behind the page (functions of the fleet home, the store and the clock)."""

    def __init__(self, home: FleetHome, store: StoreReads, stale_after: float) -> None:
        self.home = home
        self.store = store
        self.stale_after = stale_after

    def summary(self) -> dict[str, Any]:
        return fleet_summary(self.home, self.store, datetime.now(UTC), self.stale_after)

    def devices(self) -> list[dict[str, Any]]:
        views = device_views(self.home, self.store, datetime.now(UTC), self.stale_after)
        ordered = decommission_ordered(self.home)
        for v in views:
            v["state"] = board_state(v, ordered)
        return views

    def events(self, q: dict[str, str]) -> list[dict[str, Any]]:
        """Events filtered by board, kind, severity, source and time (``since``/``until``: ISO 8601
        or an age such as 6h), newest :data:`MAX_EVENTS`, oldest first."""
        now = datetime.now(UTC)
        device = q.get("device") or None
        if device is not None and not ID_RE.match(device):
            raise UsageError("device must be a board id")
        severity = q.get("severity") or None
        if severity is not None and severity not in SEVERITIES:
            raise UsageError(f"severity must be one of {', '.join(SEVERITIES)}")
        kind = q.get("kind") or None
        source = q.get("source") or None
        wanted = 20 * MAX_EVENTS if (kind or severity or source) else MAX_EVENTS
        rows = self.store.events(
            since=parse_since(q.get("since"), now), device_id=device, limit=wanted,
            until=parse_since(q.get("until"), now),
        )
        out = [
            e for e in rows
            if (kind is None or e["kind"] == kind)
            and (severity is None or e["severity"] == severity)
            and (source is None or e["source"] == source)
        ]
        return out[-MAX_EVENTS:]

    def device(self, device_id: str) -> dict[str, Any] | None:
        match = [d for d in self.devices() if d["device_id"] == device_id]
        if not match:
            return None
        from .commands import LEDGER_FILE, CommandLedger

        commands: list[dict[str, Any]] = []
        if (self.home.path / LEDGER_FILE).exists():
            ledger = CommandLedger(self.home)
            try:
                commands = ledger.commands(device_id)
            finally:
                ledger.close()
        telemetry = self.store.reports(device_id, "telemetry", limit=500)
        return {
            "device": match[0],
            "certificate": certificate_view(self.home, device_id),
            "counters": [
                {"seq": r["seq"], "time": r["time"], "counters": (r["data"] or {}).get("counters", {})}
                for r in reversed(telemetry)
                if isinstance(r["data"], dict)
            ],
            "events": self.store.events(device_id=device_id, limit=200),
            "commands": commands,
            "reports": self.store.reports(device_id, limit=50),
        }


class DashboardHandler(GuardedHandler):
    server_version = "edgeward-dashboard"
    app: DashboardApp
    static: dict[str, tuple[bytes, str]] = {}

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, doc: Any, status: int = 200) -> None:
        self._send(status, json.dumps(doc, sort_keys=True, default=str).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if not self.allowed():
            return
        url = urlsplit(self.path)
        if len(url.query) > MAX_QUERY:
            self._json({"error": f"query longer than {MAX_QUERY} bytes"}, 414)
            return
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        app = self.app
        try:
            if url.path in self.static:
                body, ctype = self.static[url.path]
                self._send(200, body, ctype)
            elif url.path == "/api/summary":
                self._json(app.summary())
            elif url.path == "/api/devices":
                self._json(app.devices())
            elif url.path == "/api/events":
                self._json(app.events(q))
            elif url.path.startswith("/api/device/") and ID_RE.match(url.path[12:]):
                doc = app.device(url.path[12:])
                self._json(doc if doc else {"error": "unknown device"}, 200 if doc else 404)
            else:
                self._json({"error": "not found"}, 404)
        except EdgeWardError as e:
            self._json({"error": str(e)}, 400)


def make_server(
    home: FleetHome,
    store: StoreReads,
    bind: str,
    port: int,
    stale_after: float,
    access: Access | None = None,
) -> ThreadingHTTPServer:
    handler = type(
        "Dashboard",
        (DashboardHandler,),
        {"app": DashboardApp(home, store, stale_after), "static": static_files()},
    )
    return make_guarded_server(bind, port, handler, access or Access(), home, "dashboard")


def serve(
    home: FleetHome, store: StoreReads, bind: str, port: int, stale_after: float, access: Access | None = None
) -> None:
    """Serve until Ctrl-C."""
    a = access or Access()
    server = make_server(home, store, bind, port, stale_after, a)
    print(f"dashboard on {url_of(server, a)} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
