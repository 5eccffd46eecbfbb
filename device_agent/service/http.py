"""HTTP/1.1 adapter for :class:`device_agent.service.service.Service`, on a Unix socket or loopback TCP.

Standard library sockets only: light enough for a Pi Zero 2 W. One thread per connection,
keep-alive, and the bounds of ``serve.http`` (``docs/agent-service.md``, "HTTP framing and
connection limits"):

- **One framing rule for every request** (:mod:`device_agent.service.framing`). A body is either
  read by its endpoint, or read and dropped before the answer (up to ``drain_factor`` times
  ``max_request_bytes``), or the answer says ``Connection: close`` and the connection closes: a
  body is never parsed as the next request.
- **Deadlines.** The first byte of a request within ``read_timeout`` (an idle keep-alive
  connection is closed), the whole request, head and body, within ``request_timeout`` of its first
  byte (a 408 and a closed connection), every read and write within ``read_timeout``.
- **Slots.** At most ``max_connections`` connections, each holding a thread; at most
  ``max_unauthenticated`` of them that have not yet presented a valid token. A new connection that
  finds either full closes the oldest unauthenticated one to make room, so clients that trickle
  bytes or sit idle cannot keep a token holder out; when every slot is held by a token holder the
  new connection gets a 503.

    GET  /v1/health    200 {"status": "serving"} or 503; no token needed, nothing revealed
    GET  /v1/status    admin only: the service counters
    POST /v1/predict   JSON {"inputs": ...} or an .npy/.npz body; the answer the token's role may see
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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

from device_agent.config import HttpLimits
from device_agent.errors import EdgeWardError, EnvironmentFault, UsageError
from device_agent.service.framing import Head, Refusal, add_field, body_length, parse_header_line, parse_request_line
from device_agent.service.service import Service, Throttled, TooLarge, Unauthorized, http_status
from device_agent.service.tokens import TokenRecord

# The endpoints and the methods each answers; anything else is a 404 or a 405.
ROUTES: dict[str, tuple[str, ...]] = {
    "/v1/health": ("GET",), "/v1/status": ("GET",), "/v1/predict": ("POST",),
    "/v1/feedback": ("GET", "POST"), "/v1/feedback/review": ("POST",), "/v1/feedback/delete-source": ("POST",),
    "/v1/learn": ("POST",), "/v1/learning": ("GET",),
}
# The audit event of each local-learning POST (device_agent.service.Service, local learning).
LEARNING_EVENTS = {"/v1/feedback": "feedback", "/v1/feedback/review": "feedback-review",
                   "/v1/feedback/delete-source": "feedback-delete-source", "/v1/learn": "learn"}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
PHRASES = {s.value: s.phrase for s in HTTPStatus}


def _busy() -> bytes:
    body = json.dumps({"error": {"status": 503, "message": "no free connection; retry shortly"}},
                      separators=(",", ":")).encode()
    return (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
            "\r\nConnection: close\r\n\r\n").encode() + body


BUSY = _busy()


class _Gone(Exception):
    """The client closed the connection, or stayed silent past ``read_timeout``: no answer."""


class _Late(Exception):
    """The request did not arrive whole within ``request_timeout`` of its first byte."""


class _TooLong(Exception):
    """A line longer than its bound."""


class Reader:
    """Buffered reads from one connection, each within ``read_timeout`` and all of them within the
    current request's ``deadline`` (monotonic seconds)."""

    def __init__(self, sock: socket.socket, read_timeout: float) -> None:
        self._sock = sock
        self._read_timeout = read_timeout
        self._buf = bytearray()
        self._chunk = memoryview(bytearray(65536))
        self.deadline = math.inf

    def _recv(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _Late
        self._sock.settimeout(min(self._read_timeout, left))
        try:
            n = self._sock.recv_into(self._chunk)
        except TimeoutError:
            if time.monotonic() >= self.deadline:
                raise _Late from None
            raise _Gone from None
        except OSError as e:
            raise _Gone from e
        if not n:
            raise _Gone
        self._buf += self._chunk[:n]

    def wait(self) -> None:
        """Wait (idle) for the first byte of the next request."""
        self.deadline = math.inf
        if not self._buf:
            self._recv()

    def readline(self, limit: int) -> bytes:
        """One line, its LF included, of at most ``limit`` bytes."""
        start = 0
        while True:
            i = self._buf.find(b"\n", start, limit)
            if i >= 0:
                line = bytes(self._buf[: i + 1])
                del self._buf[: i + 1]
                return line
            if len(self._buf) >= limit:
                raise _TooLong
            start = len(self._buf)
            self._recv()

    def read(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._recv()
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def discard(self, n: int) -> None:
        while n > 0:
            if not self._buf:
                self._recv()
            k = min(n, len(self._buf))
            del self._buf[:k]
            n -= k


def read_head(reader: Reader, limits: HttpLimits) -> Head:
    """The request line and headers, within the line and count bounds (414, 431) and the rule."""
    try:
        line = reader.readline(limits.max_header_line)
    except _TooLong:
        raise Refusal(414, f"request line over {limits.max_header_line} bytes") from None
    method, target, version = parse_request_line(line)
    fields: dict[str, str] = {}
    for _ in range(limits.max_headers + 1):
        try:
            line = reader.readline(limits.max_header_line)
        except _TooLong:
            raise Refusal(431, f"a request header line is over {limits.max_header_line} bytes") from None
        if line == b"\r\n":
            return Head(method, target, version, fields)
        add_field(fields, *parse_header_line(line))
    raise Refusal(431, f"more than {limits.max_headers} request header lines")


# --- one connection -------------------------------------------------------------------------------


class Handler(socketserver.BaseRequestHandler):
    """Serves the requests of one connection, one at a time, until either side closes it."""

    service: Service  # set on the subclass made for each server
    server: _Serving
    request: socket.socket
    reader: Reader
    head: Head | None  # the request being served, once its head is read
    length: int  # its body's length
    body_read: bool  # the body has been read (by its endpoint, or dropped)
    continued: bool  # a 100 Continue was sent
    close: bool  # the connection closes after the answer

    def handle(self) -> None:
        limits = self.service.config.http
        self.reader = Reader(self.request, limits.read_timeout)
        closing = False
        try:
            while not closing:
                closing = self._one(limits)
        except _Gone:
            return
        except OSError:
            return
        if self.request.family != socket.AF_UNIX:
            self._linger(limits)

    def _one(self, limits: HttpLimits) -> bool:
        """Read, answer and finish one request; True when the connection must close after it."""
        self.reader.wait()
        self.reader.deadline = time.monotonic() + limits.request_timeout
        self.head = None
        self.length = 0
        self.body_read = False
        self.continued = False
        self.close = True
        try:
            self.head = read_head(self.reader, limits)
            self.length = body_length(self.head)
        except Refusal as r:
            self._refuse(r)
            return True
        except _Late:
            self._refuse(Refusal(408, f"the request did not arrive within {limits.request_timeout:g} s"))
            return True
        self.close = self.head.close
        try:
            self._route(self.head)
        except Refusal as r:  # the body was too slow to arrive
            self._refuse(r)
            return True
        return self.close

    def _refuse(self, r: Refusal) -> None:
        """Answer a refused request and close: the rest of what was sent is never read."""
        self.service.refused_request(r.status)
        self.close = True
        self._answer(r.status, {"error": {"status": r.status, "message": str(r)}})

    # --- endpoints -------------------------------------------------------------------------------
    def _route(self, head: Head) -> None:
        s = self.service
        methods = ROUTES.get(head.target)
        if methods is None:
            s.refused_request(404)
            self._answer(404, {"error": {"status": 404, "message": "no such endpoint"}})
        elif head.method not in methods:
            s.refused_request(405)
            msg = f"{head.target} answers {' and '.join(methods)} only"
            self._answer(405, {"error": {"status": 405, "message": msg}}, {"Allow": ", ".join(methods)})
        elif head.target == "/v1/health":
            self._run(s.health)
        elif head.target == "/v1/status":
            self._run(lambda: s.status(self._authenticate(head)))
        elif head.target == "/v1/predict":
            self._run(lambda: self._predict(head))
        elif head.method == "GET":
            read = s.feedback_list if head.target == "/v1/feedback" else s.learning_status
            self._run(lambda: read(self._authenticate(head)))
        else:
            self._run(lambda: self._learning_post(head))

    def _authenticate(self, head: Head) -> TokenRecord:
        try:
            who = self.service.authenticate(head.get("authorization"))
        except Unauthorized:
            if head.target != "/v1/predict":
                self.service.refused_request(401)  # predict audits its own refusals
            raise
        self.server.slots.authenticated(self.request)
        return who

    def _predict(self, head: Head) -> dict[str, Any]:
        s = self.service
        who = None
        try:
            who = self._authenticate(head)
            if self.length > s.config.max_request_bytes:
                raise TooLarge(f"request body is {self.length} bytes, the limit is {s.config.max_request_bytes}")
        except EdgeWardError as e:
            s.refused(who, e)  # refused before the body was read: audited all the same
            raise
        return s.predict(who, self._body(), head.get("content-type", "application/json") or "")

    def _learning_post(self, head: Head) -> dict[str, Any]:
        """The local-learning endpoints (device_agent.learning): authenticated before a byte of
        the body is read, the body bounded like a prediction's."""
        s = self.service
        who = self._authenticate(head)
        s.learning_admit(who, LEARNING_EVENTS[head.target], self.length)  # role and size before the body
        if head.target == "/v1/learn":
            return s.learn(who)
        body = self._body()
        if head.target == "/v1/feedback":
            return s.feedback(who, body, head.get("content-type", "application/json") or "application/json")
        if head.target == "/v1/feedback/review":
            return s.feedback_review(who, body)
        return s.feedback_delete_source(who, body)

    def _body(self) -> bytes:
        """The whole body, within the request's deadline (a 408 when it is late)."""
        if self.length and self.head is not None and self.head.expects_continue and not self.continued:
            self._write(CONTINUE)
            self.continued = True
        try:
            data = self.reader.read(self.length)
        except _Late:
            raise Refusal(408, "the request body did not arrive in time") from None
        self.body_read = True
        return data

    def _run(self, fn: Callable[[], dict[str, Any]]) -> None:
        try:
            doc = fn()
        except EdgeWardError as e:
            self._error(e)
            return
        except (Refusal, _Gone):
            raise
        except Exception as e:  # never a traceback to the client; the audit log has the query
            self._answer(500, {"error": {"status": 500, "message": f"internal error: {type(e).__name__}"}})
            return
        self._answer(200, doc)

    def _error(self, e: EdgeWardError) -> None:
        status = http_status(e)
        headers = {}
        if isinstance(e, Throttled):
            headers["Retry-After"] = str(max(1, math.ceil(min(e.retry_after, 86400.0))))
        if status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="edgeward-agent"'
        self._answer(status, {"error": {"status": status, "message": str(e)}}, headers)

    # --- writing --------------------------------------------------------------------------------
    def _answer(self, status: int, doc: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        """Finish the request's body (read and drop it, or close), then send one answer."""
        self._finish_body()
        body = json.dumps(doc, separators=(",", ":")).encode()
        if self.head is not None and self.head.method == "HEAD":
            body = b""  # an answer to HEAD never has content (RFC 9110 9.3.2)
        lines = [
            f"HTTP/1.1 {status} {PHRASES[status]}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            *(f"{k}: {v}" for k, v in (headers or {}).items()),
        ]
        if self.close:
            lines.append("Connection: close")
        # One write for head and body: one segment on the wire, no delayed-ACK stall.
        self._write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def _finish_body(self) -> None:
        """The framing rule's last step: a body nobody read is read and dropped when it is within
        the drain bound and the client was not told to wait (``Expect: 100-continue``); otherwise
        the connection closes after the answer."""
        if self.body_read or not self.length:
            return  # closing or not, a client still sending gets to finish and read its answer
        limits, cap = self.service.config.http, self.service.config.max_request_bytes
        if self.continued or (self.head is not None and self.head.expects_continue):
            self.close = True  # the client may or may not send the body now: never read it as a request
        elif self.length <= limits.drain_factor * cap:
            try:
                self.reader.discard(self.length)
                self.body_read = True
            except _Late:
                self.close = True
        else:
            self.close = True

    def _write(self, data: bytes) -> None:
        self.request.settimeout(self.service.config.http.read_timeout)
        self.request.sendall(data)

    def _linger(self, limits: HttpLimits) -> None:
        """Before closing a TCP connection, stop sending and drop what the client still sends for
        a moment, so that unread bytes do not make the kernel reset the connection before the
        client has read the answer."""
        with contextlib.suppress(OSError):
            self.request.shutdown(socket.SHUT_WR)
            self.reader.deadline = time.monotonic() + limits.linger_seconds
            with contextlib.suppress(_Gone, _Late):
                self.reader.discard(self.service.config.max_request_bytes)


# --- connection slots -------------------------------------------------------------------------


@dataclass(eq=False)
class Conn:
    """One open connection as the slots see it."""

    sock: socket.socket
    since: float  # monotonic time it was accepted
    authenticated: bool = False  # it has presented a valid token
    evicted: bool = False  # closed to make room; its thread is ending


def admission(conns: Sequence[Conn], max_connections: int, max_unauthenticated: int) -> tuple[bool, Conn | None]:
    """Whether a new connection gets a slot, and which connection to close to make room for it.

    A new connection has not authenticated yet. While both the slots and the unauthenticated
    share have room it is simply admitted; otherwise the oldest unauthenticated connection is
    evicted for it (a client that trickles bytes or sits idle is oldest; one with a token finishes
    its request head in microseconds). When every slot is held by a token holder, or too many
    evicted connections are still ending, it is refused.
    """
    live = [c for c in conns if not c.evicted]
    waiting = [c for c in live if not c.authenticated]
    share = min(max_unauthenticated, max_connections)
    if len(live) < max_connections and len(waiting) < share:
        return True, None
    if not waiting or len(conns) - len(live) >= share:
        return False, None
    return True, min(waiting, key=lambda c: c.since)


class Slots:
    """Who holds the connection slots of one listener: admits, evicts, marks and releases under
    one lock, so a socket is never shut down after its handler released it."""

    def __init__(self, max_connections: int, max_unauthenticated: int) -> None:
        self.max_connections = max_connections
        self.max_unauthenticated = max_unauthenticated
        self._conns: dict[socket.socket, Conn] = {}
        self._cond = threading.Condition()

    def admit(self, sock: socket.socket) -> tuple[Conn | None, bool]:
        """A slot for ``sock`` (None: refused), and whether another connection was evicted for it."""
        with self._cond:
            ok, victim = admission(list(self._conns.values()), self.max_connections, self.max_unauthenticated)
            if not ok:
                return None, False
            if victim is not None:
                victim.evicted = True
                with contextlib.suppress(OSError):
                    victim.sock.shutdown(socket.SHUT_RDWR)  # its handler's read returns at once
            conn = Conn(sock, time.monotonic())
            self._conns[sock] = conn
            return conn, victim is not None

    def authenticated(self, sock: socket.socket) -> None:
        with self._cond:
            conn = self._conns.get(sock)
            if conn is not None:
                conn.authenticated = True

    def release(self, conn: Conn) -> None:
        with self._cond:
            self._conns.pop(conn.sock, None)
            self._cond.notify_all()

    def close_all(self, timeout: float) -> None:
        """Shut every connection down and wait up to ``timeout`` s for their handlers to end."""
        with self._cond:
            for conn in self._conns.values():
                conn.evicted = True
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)
            self._cond.wait_for(lambda: not self._conns, timeout)


class _Serving(socketserver.TCPServer):
    """A thread per admitted connection, within the slots (``serve.max_connections``,
    ``serve.http.max_unauthenticated``)."""

    slots: Slots
    service: Service

    def process_request(self, request: Any, client_address: Any) -> None:
        conn, evicted = self.slots.admit(request)
        if evicted:
            self.service.refused_request(503, "connections_evicted")
        if conn is None:
            self.service.refused_request(503, "connections_refused")
            with contextlib.suppress(OSError):
                request.settimeout(0)
                request.send(BUSY)
            self.shutdown_request(request)
            return
        try:
            threading.Thread(target=self._serve, args=(request, client_address, conn), daemon=True).start()
        except RuntimeError:  # no thread to be had: as good as no slot
            self.slots.release(conn)
            self.shutdown_request(request)

    def _serve(self, request: Any, client_address: Any, conn: Conn) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.slots.release(conn)
            self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-request is routine; anything else gets one line, no trace."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            return
        print(f"edgeward-agent: request handler failed: {type(exc).__name__}: {exc}", file=sys.stderr)


class _UnixServer(_Serving, socketserver.UnixStreamServer):
    def get_request(self) -> tuple[socket.socket, Any]:
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)


class _TcpServer(_Serving):
    allow_reuse_address = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted sockets
        super().server_bind()


def _start(server: _Serving, service: Service) -> None:
    """Bind and listen, with the slots and a listen backlog as deep as the slots: a burst of
    connections waits in the kernel for the admission rule, rather than being turned away (a
    Unix-socket connect with a timeout fails at once on a full backlog)."""
    server.service = service
    server.slots = Slots(service.config.max_connections, service.config.http.max_unauthenticated)
    server.request_queue_size = service.config.max_connections
    try:
        server.server_bind()
        server.server_activate()
    except OSError:
        server.server_close()
        raise


def _handler(service: Service) -> type[Handler]:
    return type("BoundHandler", (Handler,), {"service": service})


def bind_unix(service: Service, path: Path, mode: int = 0o660) -> _Serving:
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
        server = _UnixServer(str(path), _handler(service), bind_and_activate=False)
        _start(server, service)
    except OSError as e:
        raise EnvironmentFault(f"cannot listen on {path}: {e.strerror}") from e
    finally:
        os.umask(old)
    os.chmod(path, mode)
    return server


def bind_tcp(service: Service, listen: str) -> _Serving:
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
        server = cls((host, port_n), _handler(service), bind_and_activate=False)
        _start(server, service)
    except OSError as e:
        raise EnvironmentFault(f"cannot listen on {listen}: {e.strerror}") from e
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
        self._servers: list[_Serving] = []
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
        for s in self._servers:
            s.slots.close_all(timeout=5)  # open connections end before the audit log closes
        self.service.stop()
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
