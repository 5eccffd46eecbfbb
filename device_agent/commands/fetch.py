"""Downloading an over-the-air update: one file over HTTPS, bounded by what the operator signed.

The server (any static web server or object store) is trusted for nothing. The operator's signed
``update`` command gives the file's address, exact length and SHA-256; the board

* verifies the server's TLS certificate (the board's CA file, or the system store) and its name;
* never reads past the signed length: a server announcing or sending more is refused;
* resumes with ``Range`` after a dropped connection, up to ``commands.update_attempts``
  connections, each step bounded by the connect and read timeouts and the whole download by one
  wall-clock deadline: a watchdog shuts the connection down when it passes, whatever phase the
  download is in (TCP connect, TLS handshake, headers, body), so a stalled, slow-dripping or
  endless server costs the board at most that time;
* stops at once when the caller aborts it (a cancel or an end-of-life command arrived meanwhile);
* writes to a staging file it owns (mode 0600, fsynced) and checks the SHA-256 over exactly the
  bytes written before anything reads them (the caller then installs them as a local file).

Only the standard library (``http.client``, ``ssl``) is used: the board has no other HTTP stack.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from device_agent import crypto
from device_agent.errors import EnvironmentFault, IntegrityError

CHUNK = 256 * 1024  # read (and write) in steps of this many bytes
USER_AGENT = "edgeward-agent"
_CONTENT_RANGE_RE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)\Z")


class FetchFailed(EnvironmentFault):
    """The file could not be downloaded in time (unreachable, stalled, refused by the server)."""


class FetchAborted(FetchFailed):
    """The caller aborted the download (the update it serves is no longer to be carried out)."""


WATCH_S = 0.05  # how often the watchdog looks at the deadline and the abort flag


@dataclass(frozen=True)
class Target:
    """What to fetch: the signed address, exact length and SHA-256 (hex)."""

    url: str
    length: int
    sha256: str


@dataclass(frozen=True)
class FetchSettings:
    """Bounds of one download (``AgentConfig.commands``) and how to trust the server."""

    connect_s: float
    read_s: float
    deadline_s: float
    attempts: int
    ca_file: str | None = None  # None: the system's trust store


@dataclass(frozen=True)
class Fetched:
    """A download that completed and matched its digest."""

    path: Path
    length: int
    connections: int  # 1 unless the download resumed
    resumed_at: tuple[int, ...]  # the offsets later connections resumed from


def _context(ca_file: str | None) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
    except (OSError, ssl.SSLError) as e:
        raise EnvironmentFault(f"cannot load the update CA file {ca_file}: {e}; give a PEM file of CA "
                               "certificates (or none, for the system store)") from e
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _content_length(resp: http.client.HTTPResponse) -> int | None:
    values = resp.msg.get_all("Content-Length") or []
    if not values:
        return None
    if len(values) != 1 or not values[0].strip().isdigit() or len(values[0].strip()) > 19:
        raise IntegrityError("the file server sent a malformed or repeated Content-Length")
    return int(values[0].strip())


class _Download:
    """One file being downloaded into ``dest``, resumable across connections."""

    def __init__(self, target: Target, dest: Path, settings: FetchSettings,
                 clock: Callable[[], float], abort: threading.Event | None = None) -> None:
        self.t = target
        self.abort = abort if abort is not None else threading.Event()
        # The watchdog: it shuts down the connection in hand once the deadline passes or the
        # download is aborted. A timeout on the socket bounds one receive only, and http.client
        # reads a status line, each header and a body buffer with as many receives as the server
        # cares to drip; shutting the socket down ends every one of them at once.
        self._watch_lock = threading.Lock()
        self._socks: list[socket.socket] = []  # duplicates of the connection's socket
        self._stopped = False  # the deadline passed or the download was aborted
        self._done = threading.Event()
        self.dest = dest
        self.s = settings
        self.clock = clock
        self.end = clock() + settings.deadline_s
        parts = urlsplit(target.url)
        if parts.scheme != "https" or not parts.hostname:
            raise IntegrityError(f"refusing to fetch {target.url[:200]}: only https:// addresses")
        self.host, self.port = parts.hostname, parts.port or 443
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.ctx = _context(settings.ca_file)
        self.have = 0
        self.digest = hashlib.sha256()
        self.resumed: list[int] = []

    def left(self, what: str) -> float:
        if self.abort.is_set():
            raise FetchAborted(f"the download of {self.t.url[:200]} was aborted ({self.have} of {self.t.length} "
                               "bytes): the update is no longer to be carried out")
        remaining = self.end - self.clock()
        if remaining <= 0:
            raise FetchFailed(
                f"the download of {self.t.url[:200]} did not finish within {int(self.s.deadline_s)} s "
                f"({self.have} of {self.t.length} bytes, {what}); the server is stalled or too slow"
            )
        return remaining

    def restart(self, fd: int) -> None:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        self.have = 0
        self.digest = hashlib.sha256()

    def _watch(self) -> None:
        while not self._done.wait(WATCH_S):
            if self.abort.is_set() or self.clock() >= self.end:
                with self._watch_lock:
                    self._stopped = True
                    for s in self._socks:
                        _shut(s)
                return

    def _connect(self, address: tuple[str, int], timeout: float | None = None,
                 source_address: tuple[str, int] | None = None) -> socket.socket:
        """``socket.create_connection``, with a duplicate of the socket handed to the watchdog
        before the TLS handshake starts (shutting a duplicate down shuts the connection)."""
        sock = socket.create_connection(address, timeout, source_address)
        with self._watch_lock:
            dup = sock.dup()
            self._socks.append(dup)
            if self._stopped:
                _shut(dup)
        return sock

    def run(self) -> Fetched:
        watchdog = threading.Thread(target=self._watch, name="edgeward-fetch-watchdog", daemon=True)
        watchdog.start()
        try:
            return self._run()
        finally:
            self._done.set()
            watchdog.join()
            with self._watch_lock:
                for s in self._socks:
                    s.close()
                self._socks.clear()

    def _run(self) -> Fetched:
        fd = os.open(self.dest, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
            errors: list[str] = []
            connections = 0
            while self.have < self.t.length:
                if connections >= self.s.attempts:
                    raise FetchFailed(
                        f"the download of {self.t.url[:200]} failed after {connections} connections "
                        f"({self.have} of {self.t.length} bytes): {'; '.join(errors[-3:])}"
                    )
                self.left("before connecting")
                if connections:
                    self.resumed.append(self.have)
                connections += 1
                try:
                    self.once(fd)
                except (OSError, http.client.HTTPException, ssl.SSLError) as e:
                    self.left("the connection ended")  # the watchdog ended it: say why
                    errors.append(f"{type(e).__name__}: {str(e)[:120]}")
                    time.sleep(min(0.2 * connections, max(0.0, self.end - self.clock())))
            os.fsync(fd)
        finally:
            os.close(fd)
        if not crypto.constant_time_equal(self.digest.hexdigest(), self.t.sha256):
            raise IntegrityError(
                f"the file at {self.t.url[:200]} does not match the SHA-256 the operator signed: it was altered "
                "on the server or in transit; nothing was installed"
            )
        return Fetched(self.dest, self.have, connections, tuple(self.resumed))

    def once(self, fd: int) -> None:
        """One connection: ask for what is missing and append what arrives, never past the length."""
        conn = http.client.HTTPSConnection(self.host, self.port, timeout=min(self.s.connect_s, self.left("connecting")),
                                           context=self.ctx)
        conn._create_connection = self._connect  # type: ignore[attr-defined]
        try:
            headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
            if self.have:
                headers["Range"] = f"bytes={self.have}-{self.t.length - 1}"
            conn.request("GET", self.path, headers=headers)
            if conn.sock is not None:
                conn.sock.settimeout(min(self.s.read_s, self.left("waiting for the response")))
            resp = conn.getresponse()
            self.check_response(resp, fd)
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            while self.have < self.t.length:
                if conn.sock is not None:
                    conn.sock.settimeout(min(self.s.read_s, self.left("reading")))
                want = min(CHUNK, self.t.length - self.have)
                n = resp.readinto(view[:want])
                if not n:
                    raise http.client.IncompleteRead(b"", self.t.length - self.have)
                os.write(fd, view[:n])
                self.digest.update(view[:n])
                self.have += n
            if resp.length is None:
                # No Content-Length (chunked or until close): the body must end exactly here.
                if conn.sock is not None:
                    conn.sock.settimeout(min(self.s.read_s, self.left("checking the end of the file")))
                if resp.read(1):
                    raise IntegrityError(f"the file server sent more than the signed {self.t.length} bytes for "
                                         f"{self.t.url[:200]}; refused")
        finally:
            conn.close()

    def check_response(self, resp: http.client.HTTPResponse, fd: int) -> None:
        """The status and headers of one response: a full body of exactly the signed length, or
        the missing range of it."""
        if resp.status == 200:
            if self.have:
                self.restart(fd)  # the server ignored the Range: take the whole file again
            declared = _content_length(resp)
            if declared is not None and declared != self.t.length:
                raise IntegrityError(
                    f"the file server offers {declared} bytes at {self.t.url[:200]}, the operator signed "
                    f"{self.t.length}: refused before reading it"
                )
            return
        if resp.status == 206 and self.have:
            m = _CONTENT_RANGE_RE.fullmatch((resp.getheader("Content-Range") or "").strip())
            if m is None or int(m.group(1)) != self.have or int(m.group(2)) != self.t.length - 1 or (
                m.group(3) != "*" and int(m.group(3)) != self.t.length
            ):
                raise IntegrityError(
                    f"the file server answered a resumed download of {self.t.url[:200]} with the wrong range "
                    f"({(resp.getheader('Content-Range') or '')[:80]!r}); refused"
                )
            declared = _content_length(resp)
            if declared is not None and declared != self.t.length - self.have:
                raise IntegrityError("the file server's partial answer has the wrong length; refused")
            return
        if 500 <= resp.status < 600 or resp.status in (408, 429):
            raise http.client.HTTPException(f"the file server answered {resp.status} {resp.reason[:60]}")
        raise FetchFailed(
            f"the file server answered {resp.status} {resp.reason[:60]} for {self.t.url[:200]}"
            + ("; give the final address (redirects are not followed)" if 300 <= resp.status < 400 else
               "; check the release was uploaded where --base-url says")
        )


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed or never connected
        sock.shutdown(socket.SHUT_RDWR)


def fetch(target: Target, dest: Path, settings: FetchSettings,
          clock: Callable[[], float] = time.monotonic, abort: threading.Event | None = None) -> Fetched:
    """Download ``target`` into ``dest`` (created 0600, replaced) and check its digest, within
    ``settings.deadline_s`` of wall-clock time all told. Raises :class:`FetchFailed` (exit 4:
    the server could not deliver in time; :class:`FetchAborted` once ``abort`` is set) or
    :class:`~device_agent.errors.IntegrityError` (exit 1: it delivered something else); the
    caller removes ``dest`` either way."""
    return _Download(target, dest, settings, clock, abort).run()
