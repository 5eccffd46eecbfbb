"""Connection slots of the local API on the real socket: clients that trickle bytes are cut off
at the whole-request deadline and can hold only the unauthenticated share of the slots, so a
client with a valid token is served while they keep trying."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from device_agent.config import HttpLimits, ServeConfig
from tests.fixtures.http import parse_responses, predict
from tests.fixtures.serve import Served, serve


def _served(make_board: Callable[..., Any], pack_for: Callable[..., Path], digits: Any,
            config: ServeConfig | None = None) -> Served:
    board = make_board()
    out = pack_for(digits.onnx, [board])
    board.agent().install((out / f"{board.device_id}.ewb").read_bytes())
    return serve(board, config)


class Tricklers:
    """``n`` connections that each send one byte of a never-ending request every ``every`` s."""

    def __init__(self, path: Path, n: int, every: float = 0.1) -> None:
        self.path, self.every = path, every
        self.socks: list[socket.socket] = []
        self.stop = threading.Event()
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(path))
            self.socks.append(s)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        line = b"POST /v1/predict HTTP/1.1\r\n" + b"X-Slow: " + b"a" * 10_000
        at = 0
        while not self.stop.wait(self.every):
            for s in self.socks:
                with contextlib.suppress(OSError):  # dropped by the server: what the test wants
                    s.send(line[at % len(line) : at % len(line) + 1])
            at += 1

    def __enter__(self) -> Tricklers:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        for s in self.socks:
            s.close()


@pytest.fixture
def served(make_board: Callable[..., Any], pack_for: Callable[..., Path], digits: Any) -> Iterator[Served]:
    s = _served(make_board, pack_for, digits)
    yield s
    s.server.stop()


def test_64_trickling_clients_do_not_keep_a_valid_token_out(served: Served, digits_test: Any) -> None:
    """Every slot held by an unauthenticated client that trickles bytes (well inside the per-read
    timeout) used to turn every valid token away with a 503 for as long as the trickle lasted."""
    x, y = digits_test
    assert served.service.config.max_connections == 64  # the default, which the flood fills
    with Tricklers(served.socket, 64):
        for i in range(3):
            conn = served.connect()
            st, _, doc = predict(conn, served.tokens["user"], x[i])
            conn.close()
            assert (st, doc) == (200, {"label": int(y[i])})


def test_an_authenticated_keep_alive_connection_is_not_evicted_by_a_flood(served: Served, digits_test: Any) -> None:
    x, y = digits_test
    conn = served.connect()
    assert predict(conn, served.tokens["user"], x[0])[0] == 200
    with Tricklers(served.socket, 80):
        assert predict(conn, served.tokens["user"], x[1])[:3:2] == (200, {"label": int(y[1])})
    conn.close()


def test_a_trickling_request_is_cut_off_at_the_whole_request_deadline(
    make_board: Callable[..., Any], pack_for: Callable[..., Path], digits: Any
) -> None:
    """Each byte arrives well inside the per-read timeout; the request as a whole does not arrive
    within ``serve.http.request_timeout``: the client gets a 408 and a closed connection."""
    config = ServeConfig(http=HttpLimits(read_timeout=30.0, request_timeout=1.0))
    s = _served(make_board, pack_for, digits, config)
    try:
        with Tricklers(s.socket, 1, every=0.05) as t:
            sock = t.socks[0]
            sock.settimeout(20)  # a guard against a hang only: the server closes long before
            got = bytearray()
            while chunk := sock.recv(4096):
                got += chunk
        resp = parse_responses(bytes(got))
        assert [r[0] for r in resp] == [408] and resp[0][1]["connection"] == "close"
    finally:
        s.server.stop()


def test_unauthenticated_connections_hold_at_most_their_share_of_the_slots(
    make_board: Callable[..., Any], pack_for: Callable[..., Path], digits: Any, digits_test: Any
) -> None:
    """With every slot held by authenticated keep-alive connections, a new one is refused (503)
    as before; idle unauthenticated connections are evicted, oldest first, to make room."""
    http = HttpLimits(max_unauthenticated=2)
    s = _served(make_board, pack_for, digits, ServeConfig(max_connections=3, http=http))
    x, _ = digits_test
    held = []
    try:
        idle = [socket.socket(socket.AF_UNIX) for _ in range(2)]
        for i in idle:
            i.connect(str(s.socket))
        c = s.connect()
        assert predict(c, s.tokens["user"], x[0])[0] == 200  # evicts the oldest idle connection
        held.append(c)
        idle[0].settimeout(10)
        assert idle[0].recv(100) == b""  # closed by the server
        c = s.connect()
        assert predict(c, s.tokens["admin"], x[0])[0] == 200  # a free slot: nothing evicted
        held.append(c)
        c = s.connect()
        assert predict(c, s.tokens["engineer"], x[0])[0] == 200  # every slot taken: evicts the other idle one
        held.append(c)
        idle[1].settimeout(10)
        assert idle[1].recv(100) == b""
        with socket.socket(socket.AF_UNIX) as raw:  # all three are authenticated: nothing to evict
            raw.settimeout(10)
            raw.connect(str(s.socket))
            assert raw.recv(100).startswith(b"HTTP/1.1 503")
        for i in idle:
            i.close()
    finally:
        for c in held:
            c.close()
        s.server.stop()


def test_the_connection_limits_are_config_fields_with_sane_defaults() -> None:
    http = HttpLimits()
    assert 0 < http.request_timeout <= http.read_timeout
    assert 0 < http.max_unauthenticated < ServeConfig().max_connections
    assert replace(http, max_unauthenticated=1).max_unauthenticated == 1
