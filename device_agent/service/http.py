"""HTTP/1.1 adapter for :class:`device_agent.serve.Service`, on a Unix socket or loopback TCP.

Standard library only (``http.server``): light enough for a Pi Zero 2 W. One thread per
connection, keep-alive, a read timeout against slow clients, and the body length bounded
before a byte of it is read.

    GET  /v1/health    200 {"status": "serving"} or 503; no token needed, nothing revealed
    GET  /v1/status    admin only: the service counters
    POST /v1/predict   JSON {"inputs": ...} or an .npy body; the answer the token's role may see
    POST /v1/feedback  engineer/admin: labelled examples (.npz x, y) kept on the board for learning
    GET  /v1/feedback  engineer/admin: what is held for review (ids, sources, labels; never inputs)
    POST /v1/feedback/review, /v1/feedback/delete-source, /v1/learn; GET /v1/learning
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import socket
import socketserver
import stat
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

from device_agent.errors import EdgeWardError, EnvironmentFault, UsageError
from device_agent.service.service import Service, Throttled, TooLarge, http_status

# Headers that must not appear twice: two lengths or two tokens make a request ambiguous.
SINGLE_HEADERS = frozenset({"content-length", "authorization", "content-type", "transfer-encoding"})


class Headers:
    """The few request headers the API reads, by case-insensitive name."""

    def __init__(self, fields: dict[str, str]) -> None:
        self._fields = fields

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._fields.get(name.lower(), default)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "edgeward-agent"
    sys_version = ""
    service: Service  # set on the subclass made for each server, with its read timeout:
    timeout: ClassVar[float]  # service.config.http.read_timeout, seconds a connection may stay silent
    raw_requestline: bytes  # read by BaseHTTPRequestHandler.handle_one_request before parse_request

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Silent: every query is in the audit log instead."""

    def parse_request(self) -> bool:
        """Parse the request line and headers strictly and cheaply.

        Replaces BaseHTTPRequestHandler's parser, which goes through the ``email`` package and
        costs more per request than the inference itself on a small model. Bounded
        (``service.config.http``): at most ``max_headers`` lines of ``max_header_line`` bytes; no
        chunked bodies; no duplicate framing or credential headers.
        """
        self.command = None  # type: ignore[assignment]
        self.request_version = "HTTP/0.9"
        self.close_connection = True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) != 3 or words[2] not in ("HTTP/1.1", "HTTP/1.0"):
            self.send_error(400, "Bad request line: expected METHOD PATH HTTP/1.1")
            return False
        self.command, self.path, self.request_version = words
        fields: dict[str, str] = {}
        limits = self.service.config.http
        for _ in range(limits.max_headers + 1):
            line = self.rfile.readline(limits.max_header_line + 1)
            if len(line) > limits.max_header_line:
                self.send_error(431, "Request header line too long")
                return False
            if line in (b"\r\n", b"\n", b""):
                break
            name, sep, value = line.decode("iso-8859-1").partition(":")
            name = name.strip().lower()
            if not sep or not name or " " in name:
                self.send_error(400, "Bad request header")
                return False
            if name in fields and name in SINGLE_HEADERS:
                self.send_error(400, f"Duplicate {name} header")
                return False
            fields[name] = value.strip()
        else:
            self.send_error(431, "Too many request headers")
            return False
        if "transfer-encoding" in fields:
            self.send_error(501, "Chunked request bodies are not supported; send Content-Length")
            return False
        self.headers = Headers(fields)  # type: ignore[assignment]
        connection = fields.get("connection", "").lower()
        if self.request_version == "HTTP/1.1":
            self.close_connection = connection == "close"
        else:
            self.close_connection = connection != "keep-alive"
        if fields.get("expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def _send(
        self, status: int, doc: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        body = json.dumps(doc, separators=(",", ":")).encode()
        lines = [
            f"{self.protocol_version} {status} {self.responses.get(status, ('',))[0]}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            *(f"{k}: {v}" for k, v in (headers or {}).items()),
        ]
        if (headers or {}).get("Connection") == "close":
            self.close_connection = True
        # One write for headers and body: one segment on the wire, no delayed-ACK stall.
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def _error(self, e: EdgeWardError) -> None:
        status = http_status(e)
        headers = {}
        if isinstance(e, Throttled):
            headers["Retry-After"] = str(max(1, math.ceil(min(e.retry_after, 86400.0))))
        if status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="edgeward-agent"'
        if isinstance(e, TooLarge) or self.close_connection:
            headers["Connection"] = "close"  # an unread body may still be on the wire
        self._send(status, {"error": {"status": status, "message": str(e)}}, headers)

    def _discard(self, length: int) -> None:
        """Read and drop an oversized body (up to ``http.drain_factor`` times the limit) so the
        client gets its 413; anything larger gets the 413 and a closed connection."""
        config = self.service.config
        if 0 <= length <= config.http.drain_factor * config.max_request_bytes:
            while length > 0:
                chunk = self.rfile.read(min(length, 65536))
                if not chunk:
                    break
                length -= len(chunk)
        else:
            self.close_connection = True

    def _run(self, fn: Any) -> None:
        try:
            self._send(200, fn())
        except EdgeWardError as e:
            self._error(e)
        except Exception as e:  # never a traceback to the client; the audit log has the query
            self._send(
                500, {"error": {"status": 500, "message": f"internal error: {type(e).__name__}"}}
            )

    def do_GET(self) -> None:  # noqa: N802
        s = self.service
        if self.path == "/v1/health":
            self._run(s.health)
        elif self.path == "/v1/status":
            self._run(lambda: s.status(s.authenticate(self.headers.get("Authorization"))))
        elif self.path == "/v1/feedback":
            self._run(lambda: s.feedback_list(s.authenticate(self.headers.get("Authorization"))))
        elif self.path == "/v1/learning":
            self._run(lambda: s.learning_status(s.authenticate(self.headers.get("Authorization"))))
        else:
            self._send(404, {"error": {"status": 404, "message": "no such endpoint"}})

    def do_POST(self) -> None:  # noqa: N802
        s = self.service
        routes = {
            "/v1/feedback": lambda who, body: s.feedback(who, body, self.headers.get("Content-Type",
                                                                                     "application/json")),
            "/v1/feedback/review": s.feedback_review,
            "/v1/feedback/delete-source": s.feedback_delete_source,
            "/v1/learn": lambda who, body: s.learn(who),
        }
        if self.path in routes:
            self._run(lambda: routes[self.path](*self._authenticated_body()))
            return
        if self.path != "/v1/predict":
            self._send(404, {"error": {"status": 404, "message": "no such endpoint"}})
            return

        def predict() -> dict[str, Any]:
            who = None
            try:
                who = s.authenticate(self.headers.get("Authorization"))
                try:
                    length = int(self.headers.get("Content-Length", ""))
                except ValueError:
                    self.close_connection = True
                    raise TooLarge("a Content-Length header is required") from None
                if length < 0 or length > s.config.max_request_bytes:
                    self._discard(length)
                    raise TooLarge(
                        f"request body is {length} bytes, the limit is {s.config.max_request_bytes}"
                    )
            except EdgeWardError as e:
                s.refused(who, e)  # refused before the body was read: audited all the same
                raise
            body = self.rfile.read(length)
            return s.predict(who, body, self.headers.get("Content-Type", "application/json"))

        self._run(predict)


    def _authenticated_body(self) -> tuple[Any, bytes]:
        """The token and the whole body of a request, its length bounded before a byte is read."""
        s = self.service
        raw = self.headers.get("Content-Length", "0") or ""
        if not raw.isascii() or not raw.isdigit():
            self.close_connection = True
            raise TooLarge("Content-Length must be plain digits")
        length = int(raw)
        try:
            who = s.authenticate(self.headers.get("Authorization"))
        except EdgeWardError:
            self._discard(length)  # the unread body must not be parsed as the next request
            raise
        if length < 0 or length > s.config.max_request_bytes:
            self._discard(length)
            raise TooLarge(f"request body is {length} bytes, the limit is {s.config.max_request_bytes}")
        return who, self.rfile.read(length)


BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _Bounded(socketserver.ThreadingMixIn):
    """At most ``slots`` connections at once (each holds a thread); the next ones get a 503."""

    daemon_threads = True
    slots: threading.BoundedSemaphore

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(BUSY)
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-request is routine; anything else gets one line, no trace."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            return
        print(f"edgeward-agent: request handler failed: {type(exc).__name__}: {exc}", file=sys.stderr)


class _UnixServer(_Bounded, socketserver.UnixStreamServer):
    def get_request(self) -> tuple[socket.socket, Any]:
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)  # http.server expects a (host, port) pair


class _TcpServer(_Bounded, ThreadingHTTPServer):
    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().server_bind()


def _limit(server: _Bounded, service: Service) -> None:
    server.slots = threading.BoundedSemaphore(service.config.max_connections)


def _handler(service: Service) -> type[Handler]:
    return type(
        "BoundHandler", (Handler,), {"service": service, "timeout": service.config.http.read_timeout}
    )


def bind_unix(service: Service, path: Path, mode: int = 0o660) -> socketserver.BaseServer:
    """Listen on a Unix socket at ``path`` (mode 0660: the owner and the application's group)."""
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise UsageError(f"{path} exists and is not a socket; pick another --socket")
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(path))
                raise UsageError(f"another agent is already listening on {path}")
            except (ConnectionRefusedError, FileNotFoundError):
                path.unlink()  # stale socket left by a crash
    old = os.umask(0o177)
    try:
        server = _UnixServer(str(path), _handler(service))
    except OSError as e:
        raise EnvironmentFault(f"cannot listen on {path}: {e.strerror}") from e
    finally:
        os.umask(old)
    os.chmod(path, mode)
    _limit(server, service)
    return server


def bind_tcp(service: Service, listen: str) -> socketserver.BaseServer:
    """Listen on loopback TCP only (``127.0.0.1:PORT`` or ``[::1]:PORT``)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    try:
        if not ipaddress.ip_address(host).is_loopback:
            raise UsageError(
                f"--listen {listen}: only loopback addresses are served; use a Unix socket"
            )
        port_n = int(port)
    except ValueError as e:
        raise UsageError(f"--listen {listen}: expected 127.0.0.1:PORT") from e
    cls: type[_TcpServer] = _TcpServer
    if ":" in host:
        cls = type("_Tcp6Server", (_TcpServer,), {"address_family": socket.AF_INET6})
    try:
        server = cls((host, port_n), _handler(service))
    except OSError as e:
        raise EnvironmentFault(f"cannot listen on {listen}: {e.strerror}") from e
    _limit(server, service)
    return server


class Server:
    """Runs a service on its listeners until :meth:`stop`; usable as a context manager."""

    def __init__(
        self, service: Service, socket_path: Path | None, listen: str | None = None
    ) -> None:
        if socket_path is None and listen is None:
            raise UsageError("nothing to listen on: give --socket or --listen")
        self.service = service
        self.socket_path = socket_path
        self._servers = []
        if socket_path is not None:
            self._servers.append(bind_unix(service, socket_path))
        if listen is not None:
            self._servers.append(bind_tcp(service, listen))
        self._threads: list[threading.Thread] = []

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        for s in self._servers:
            if isinstance(s, _TcpServer):
                return s.server_address[:2]  # type: ignore[return-value]
        return None

    def start(self) -> Server:
        self.service.start()
        for s in self._servers:
            t = threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        for s in self._servers:
            s.shutdown()
            s.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self.service.stop()
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

