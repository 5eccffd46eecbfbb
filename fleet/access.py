"""Who may read the dashboard and ``/metrics``: loopback by default; beyond it, TLS and a credential.

Both servers carry the whole fleet's picture (boards, models, security events), so the rule is
one pure decision, :func:`listen_policy`, made before a socket is opened:

* a loopback address (``127.0.0.0/8``, ``::1``, ``localhost``) may be served over plain HTTP:
  whoever can connect already has a shell on this machine;
* any other address needs TLS (``--tls-cert``/``--tls-key``) *and* authentication: a client
  certificate issued by the fleet CA to an enrolled operator (``--client-certs``; a board's
  certificate from the same CA is refused) or a bearer token read from a file
  (``--token-file``); otherwise the command refuses with exit 2 and says what to add.

When TLS is configured the credential is required whatever the address. The per-request check,
:func:`authorised`, is a pure function of the request's ``Authorization`` header, the verified
peer certificate's common name and the configuration.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import ssl
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from device_agent.errors import EnvironmentFault, UsageError

from .ca import FleetHome

# A token shorter than this is guessable over a network; ``openssl rand -hex 32`` gives 64.
MIN_TOKEN_CHARS = 32
MAX_TOKEN_BYTES = 4096


@dataclass(frozen=True)
class Access:
    """How one server is reached: TLS files, and which credentials it accepts."""

    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_certs: bool = False  # fleet-CA client certificates of enrolled operators
    token: str | None = None  # bearer token

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def authenticated(self) -> bool:
        return self.client_certs or self.token is not None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def listen_policy(host: str, access: Access, what: str) -> None:
    """Refuse (UsageError, exit 2) a configuration that would serve the fleet's data to anyone."""
    if (access.tls_cert is None) != (access.tls_key is None):
        raise UsageError(f"{what}: --tls-cert and --tls-key go together; give both or neither")
    if access.authenticated and not access.tls:
        raise UsageError(
            f"{what}: a bearer token or client certificate needs TLS (add --tls-cert and --tls-key)"
        )
    if access.tls and not access.authenticated:
        raise UsageError(
            f"{what}: TLS without authentication lets anyone read the fleet; add --client-certs "
            "(fleet-CA operator certificates) or --token-file FILE"
        )
    if not is_loopback(host) and not access.tls:
        raise UsageError(
            f"{what}: {host} is not a loopback address and the fleet's data would be served to "
            "anyone who can reach it; serve on 127.0.0.1 (the default) and use an SSH tunnel, or "
            "add --tls-cert, --tls-key and --client-certs or --token-file"
        )


def read_token(path: str | Path) -> str:
    """A bearer token from a file (one line; bounded before it is read whole)."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_TOKEN_BYTES + 1)
    except OSError as e:
        raise UsageError(f"--token-file {p}: cannot read it: {e.strerror}") from e
    if len(raw) > MAX_TOKEN_BYTES:
        raise UsageError(f"--token-file {p}: more than {MAX_TOKEN_BYTES} bytes; a token is one line")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError as e:
        raise UsageError(f"--token-file {p}: a token is printable ASCII") from e
    if len(token) < MIN_TOKEN_CHARS or not token.isprintable() or " " in token:
        raise UsageError(
            f"--token-file {p}: the token must be one word of at least {MIN_TOKEN_CHARS} "
            "characters (e.g. 'openssl rand -hex 32 > FILE')"
        )
    return token


def server_context(access: Access, home: FleetHome) -> ssl.SSLContext | None:
    """The TLS context of a server under ``access`` (None: plain HTTP on loopback)."""
    if not access.tls:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(access.tls_cert), str(access.tls_key))
        if access.client_certs:
            ctx.load_verify_locations(str(home.ca_cert))
            # Optional at the handshake, so a token client still connects; authorised() decides.
            ctx.verify_mode = ssl.CERT_OPTIONAL
    except (OSError, ssl.SSLError) as e:
        raise EnvironmentFault(f"cannot load the TLS certificate, key or fleet CA: {e}") from e
    return ctx


def peer_name(cert: Any) -> str | None:
    """The common name of a verified peer certificate (``SSLSocket.getpeercert()``)."""
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def authorised(access: Access, authorization: str | None, peer_cn: str | None, operators: list[str]) -> bool:
    """May this request read? Loopback without TLS: yes. Otherwise a fleet-CA certificate whose
    common name is an enrolled operator (``peer_cn``, verified by the TLS layer), or the bearer
    token (compared in constant time)."""
    if not access.tls:
        return True
    if access.client_certs and peer_cn is not None and peer_cn in operators:
        return True
    if access.token is not None and authorization is not None:
        scheme, _, given = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), access.token.encode())
    return False


HANDSHAKE_S = 10.0
REQUEST_S = 30.0  # a client that stops sending mid-request loses its connection after this


class GuardedHandler(BaseHTTPRequestHandler):
    """A request handler whose TLS handshake runs in its own thread (a slow client never holds up
    ``accept``) and that answers 401 to a request without an accepted credential."""

    access: Access = Access()
    home: FleetHome | None = None
    timeout = REQUEST_S

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(HANDSHAKE_S)
            self.request.do_handshake()
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        """Quiet: errors a client causes are its own."""

    def allowed(self) -> bool:
        """True if the request may be served; otherwise a 401 has been sent."""
        cn = peer_name(self.request.getpeercert()) if isinstance(self.request, ssl.SSLSocket) else None
        operators = self.home.operator_ids() if self.home is not None and self.access.client_certs else []
        if authorised(self.access, self.headers.get("Authorization"), cn, operators):
            return True
        ways = []
        if self.access.client_certs:
            ways.append("a client certificate the fleet CA issued to an enrolled operator")
        if self.access.token is not None:
            ways.append("'Authorization: Bearer TOKEN'")
        body = json.dumps({"error": f"authentication required: present {' or '.join(ways)}"}).encode()
        self.send_response(401)
        if self.access.token is not None:
            self.send_header("WWW-Authenticate", 'Bearer realm="edgeward"')
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)
        return False


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A failed handshake or a dropped connection is the client's: no traceback."""


def make_guarded_server(
    bind: str, port: int, handler: type[GuardedHandler], access: Access, home: FleetHome, what: str
) -> ThreadingHTTPServer:
    """A threading HTTP(S) server for ``handler`` under ``access``, after :func:`listen_policy`."""
    listen_policy(bind, access, what)
    ctx = server_context(access, home)
    guarded = type(handler.__name__, (handler,), {"access": access, "home": home})
    try:
        server = _Server((bind, port), guarded)
    except OSError as e:
        raise EnvironmentFault(f"cannot serve the {what} on {bind}:{port}: {e.strerror}") from e
    if ctx is not None:
        server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    return server


def url_of(server: ThreadingHTTPServer, access: Access) -> str:
    host, port = str(server.server_address[0]), int(server.server_address[1])
    scheme = "https" if access.tls else "http"
    h = f"[{host}]" if ":" in host else host
    return f"{scheme}://{h}:{port}/"
