"""HTTP/1.1 framing of the local API on the real socket: one request framed on the wire gets
exactly one answer, ambiguous framing is refused and the connection closed, and fuzzed request
streams and bodies get only well-formed answers with documented statuses, or a closed
connection, while the service keeps answering good requests."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.http import RawResponse, parse_responses, raw_exchange, request
from tests.fixtures.serve import Served, serve

# Every status the API documents (docs/agent-service.md); a 500 is a bug.
DOCUMENTED = {200, 400, 401, 403, 404, 405, 408, 411, 413, 414, 417, 422, 429, 431, 501, 503}
SMUGGLED = b"GET /v1/health HTTP/1.1\r\nHost: agent\r\n\r\n"
HEALTH = b"GET /v1/health HTTP/1.1\r\nHost: agent\r\n\r\n"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, publisher: Path, digits: Any) -> Iterator[Served]:
    """One board for the module (hypothesis runs many examples in one test call), with a throttle
    loose enough that fuzzed bodies reach the decoder instead of a 429."""
    from device_agent import Agent
    from device_agent.bundle.keyfiles import load_public_key_file
    from device_agent.store.keys import KeySource
    from packager.keys import load_private_key
    from packager.modelfile import infer_task, read_model
    from packager.pack import PackOptions, load_enrolments, pack
    from packager.profiles import load_profile
    from packager.signers import FileSigner
    from tests.conftest import PASSPHRASE, Board

    d = tmp_path_factory.mktemp("fuzz-board")
    keys = KeySource(passphrase=PASSPHRASE)
    enrolment = d / "pi-fuzz.json"
    enrolment.write_bytes(Agent.provision(d / "data", "pi-fuzz", [load_public_key_file(publisher / "publisher.pub")],
                                          [], keys))
    board = Board(d / "data", enrolment, "pi-fuzz", keys)
    loose = {"client_rate": 1e6, "client_burst": 1e6, "global_rate": 1e6, "global_burst": 1e6,
             "daily_budget": 10**9}
    model = read_model(digits.onnx)
    pack(model, load_profile("rpi4b"), FileSigner(load_private_key(publisher / "publisher.key")),
         load_enrolments([enrolment]),
         PackOptions(model_id="digits", model_version=1, task=infer_task(model, {}), policy={"throttle": loose}),
         d / "out")  # fmt: skip
    board.agent().install((d / "out" / "pi-fuzz.ewb").read_bytes())
    s = serve(board)
    yield s
    s.server.stop()


def _req(method: str, path: str, body: bytes = b"", token: str | None = None, extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: agent\r\n"
    if token:
        head += f"Authorization: Bearer {token}\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def _exchange(served: Served, data: bytes) -> list[RawResponse]:
    return parse_responses(raw_exchange(served.socket, data))


# --- one framed request, one answer ------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "role", "expected"),
    [
        ("GET", "/v1/health", None, 200),  # a GET that carries a body
        ("GET", "/nope", None, 404),
        ("POST", "/v1/predict", None, 401),
        ("POST", "/v1/predict", "bad", 401),
        ("GET", "/v1/status", "user", 403),
        ("PUT", "/v1/predict", "user", 405),
        ("DELETE", "/v1/health", None, 405),
        ("POST", "/v1/health", None, 405),
    ],
)
def test_a_body_the_server_does_not_need_is_never_parsed_as_a_request(
    served: Served, method: str, path: str, role: str | None, expected: int
) -> None:
    """The desync: a request answered without reading its body used to leave the body on the
    wire, where the server read it as the next request and answered it too."""
    token = {"bad": "ewt_not-a-token", None: None}.get(role, served.tokens.get(role or "", ""))
    data = _req(method, path, SMUGGLED, token) + HEALTH
    got = _exchange(served, data)
    assert [s for s, _, _ in got] == [expected, 200], got  # the framed request, then the real next one
    assert json.loads(got[1][2]) == {"status": "serving"}


def test_an_oversized_body_is_answered_413_and_never_parsed(served: Served) -> None:
    limit = served.service.config.max_request_bytes
    body = SMUGGLED * (limit // len(SMUGGLED) + 1)
    got = _exchange(served, _req("POST", "/v1/predict", body, served.tokens["user"]) + HEALTH)
    assert [s for s, _, _ in got] == [413, 200], [g[:2] for g in got]


def test_a_body_past_the_drain_bound_gets_its_answer_and_a_closed_connection(served: Served) -> None:
    cfg = served.service.config
    declared = cfg.http.drain_factor * cfg.max_request_bytes + 1
    head = (f"POST /v1/predict HTTP/1.1\r\nAuthorization: Bearer {served.tokens['user']}\r\n"
            f"Content-Length: {declared}\r\n\r\n").encode()
    got = _exchange(served, head + SMUGGLED)
    assert [s for s, _, _ in got] == [413] and got[0][1]["connection"] == "close"


def test_pipelined_requests_are_answered_in_order_one_each(served: Served, digits_test: Any) -> None:
    x, y = digits_test
    body = json.dumps({"inputs": x[0].tolist()}).encode()
    user = served.tokens["user"]
    data = _req("POST", "/v1/predict", body, user) + HEALTH + _req("GET", "/nope", SMUGGLED) + \
        _req("POST", "/v1/predict", body, user)
    got = _exchange(served, data)
    assert [s for s, _, _ in got] == [200, 200, 404, 200]
    assert json.loads(got[0][2]) == json.loads(got[3][2]) == {"label": int(y[0])}


# --- ambiguous framing: refused, and the connection closed ----------------------------------------


AMBIGUOUS = {
    "two Content-Length": (b"POST /v1/predict HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", 400),
    "two lengths in one": (b"POST /v1/predict HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n", 400),
    "negative": (b"POST /v1/predict HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    "signed": (b"POST /v1/predict HTTP/1.1\r\nContent-Length: +5\r\n\r\n", 400),
    "underscored": (b"POST /v1/predict HTTP/1.1\r\nContent-Length: 0_5\r\n\r\n", 400),
    "hex": (b"POST /v1/predict HTTP/1.1\r\nContent-Length: 0x5\r\n\r\n", 400),
    "non-ASCII digits": ("POST /v1/predict HTTP/1.1\r\nContent-Length: \u0665\r\n\r\n".encode(), 400),
    "huge": (b"POST /v1/predict HTTP/1.1\r\nContent-Length: 99999999999999999999999999\r\n\r\n", 400),
    "empty": (b"POST /v1/predict HTTP/1.1\r\nContent-Length: \r\n\r\n", 400),
    "chunked": (b"POST /v1/predict HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
    "chunked and length": (
        b"POST /v1/predict HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
    "identity coding": (b"GET /v1/health HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n", 501),
    "obs-fold": (b"GET /v1/health HTTP/1.1\r\nX-A: 1\r\n Content-Length: 5\r\n\r\n", 400),
    "space before colon": (b"GET /v1/health HTTP/1.1\r\nContent-Length : 5\r\n\r\n", 400),
    "bare LF": (b"GET /v1/health HTTP/1.1\nContent-Length: 5\n\n", 400),
    "bare CR in a value": (b"GET /v1/health HTTP/1.1\r\nX-A: 1\rContent-Length: 5\r\n\r\n", 400),
    "NUL in a value": (b"GET /v1/health HTTP/1.1\r\nX-A: a\x00b\r\n\r\n", 400),
    "POST without length": (b"POST /v1/predict HTTP/1.1\r\nAuthorization: Bearer x\r\n\r\n", 411),
    "two spaces": (b"GET  /v1/health HTTP/1.1\r\n\r\n", 400),
    "HTTP/2": (b"GET /v1/health HTTP/2.0\r\n\r\n", 400),
    "unknown expectation": (b"GET /v1/health HTTP/1.1\r\nExpect: 200-ok\r\n\r\n", 417),
}


@pytest.mark.parametrize("case", sorted(AMBIGUOUS))
def test_ambiguous_framing_is_refused_and_the_connection_closed(served: Served, case: str) -> None:
    data, expected = AMBIGUOUS[case]
    got = _exchange(served, data + SMUGGLED + HEALTH)  # nothing after the refusal is read
    assert [s for s, _, _ in got] == [expected], got
    status, headers, body = got[0]
    assert headers["connection"] == "close" and headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["status"] == expected


def test_too_many_or_too_long_header_lines_are_refused(served: Served) -> None:
    limits = served.service.config.http
    many = b"GET /v1/health HTTP/1.1\r\n" + b"X-A: 1\r\n" * (limits.max_headers + 1) + b"\r\n"
    long = b"GET /v1/health HTTP/1.1\r\nX-A: " + b"a" * limits.max_header_line + b"\r\n\r\n"
    target = b"GET /" + b"a" * limits.max_header_line + b" HTTP/1.1\r\n\r\n"
    for data, expected in ((many, 431), (long, 431), (target, 414)):
        got = _exchange(served, data + HEALTH)
        assert [s for s, _, _ in got] == [expected] and got[0][1]["connection"] == "close"


def test_http_1_0_is_answered_then_closed_even_when_it_asks_for_keep_alive(served: Served) -> None:
    data = b"GET /v1/health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" + HEALTH
    got = _exchange(served, data)
    assert [s for s, _, _ in got] == [200] and got[0][1]["connection"] == "close"


def test_connection_close_is_honoured(served: Served) -> None:
    got = _exchange(served, b"GET /v1/health HTTP/1.1\r\nConnection: close\r\n\r\n" + HEALTH)
    assert [s for s, _, _ in got] == [200] and got[0][1]["connection"] == "close"


def test_an_answer_to_head_has_no_content(served: Served) -> None:
    """A client reads no body after an answer to HEAD: one here would be read as the next answer."""
    got = _exchange(served, b"HEAD /v1/health HTTP/1.1\r\n\r\n" + HEALTH)
    assert [(s, h["content-length"], b) for s, h, b in got][0] == (405, "0", b"") and got[1][0] == 200
    assert json.loads(got[1][2]) == {"status": "serving"} and len(got) == 2


def test_expect_100_continue_is_sent_only_when_the_body_is_wanted(served: Served, digits_test: Any) -> None:
    body = json.dumps({"inputs": digits_test[0][0].tolist()}).encode()
    got = _exchange(served, _req("POST", "/v1/predict", body, served.tokens["user"], "Expect: 100-continue\r\n"))
    assert [s for s, _, _ in got] == [100, 200]
    # Refused before the body is wanted: no 100, and the connection closes (the client may or may
    # not send the body now), so the body is never read as a request.
    got = _exchange(served, _req("POST", "/v1/predict", SMUGGLED, None, "Expect: 100-continue\r\n") + HEALTH)
    assert [s for s, _, _ in got] == [401] and got[0][1]["connection"] == "close"


# --- fuzz: the framing and every body type, on the real socket --------------------------------------

FUZZ = settings(
    max_examples=200, deadline=10_000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)  # fmt: skip


def _well_formed(got: bytes) -> list[RawResponse]:
    responses = parse_responses(got)  # raises on any byte not part of a well-formed response
    for status, headers, body in responses:
        assert status in DOCUMENTED or status == 100, (status, body)
        if status != 100:
            assert headers["content-type"] == "application/json"
            doc = json.loads(body) if body else None
            if status >= 400 and doc is not None:
                assert doc["error"]["status"] == status and doc["error"]["message"]
    assert all(h.get("connection") != "close" for _, h, _ in responses[:-1]), "answered after closing"
    return responses


def _still_serving(served: Served, digits_test: Any) -> None:
    x, y = digits_test
    body = json.dumps({"inputs": x[1].tolist()}).encode()
    got = _well_formed(raw_exchange(served.socket, _req("POST", "/v1/predict", body, served.tokens["user"])))
    assert [s for s, _, _ in got] == [200] and json.loads(got[0][2]) == {"label": int(y[1])}


TCHAR = st.sampled_from(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~"))
METHODS = st.one_of(st.sampled_from(["GET", "POST", "PUT", "HEAD", "OPTIONS", "DELETE", "get", "PRI"]),
                    st.text(TCHAR, min_size=0, max_size=8))
PATHS = st.one_of(st.sampled_from(["/v1/health", "/v1/status", "/v1/predict", "/", "*", "/v1/predict?x=1",
                                   "http://agent/v1/health", "/v1/health#"]),
                  st.binary(max_size=20).map(lambda b: "/" + b.decode("latin-1")))
VERSIONS = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/1.2", "HTTP/0.9", "http/1.1", "HTTP/11", ""])
HEADER_NAMES = st.one_of(
    st.sampled_from(["Content-Length", "content-length", "Transfer-Encoding", "Authorization", "Content-Type",
                     "Connection", "Expect", "Host", "X-Any"]),
    st.text(TCHAR, min_size=0, max_size=10),
)
HEADER_VALUES = st.one_of(
    st.sampled_from(["0", "5", "-1", "+5", "1e3", "0x10", " 7 ", "5, 5", "chunked", "identity", "close",
                     "keep-alive", "100-continue", "application/json", "application/x-npy", "Bearer x", ""]),
    st.integers(0, 2**70).map(str),
    st.binary(max_size=30).map(lambda b: b.decode("latin-1")),
)
LINE_ENDS = st.sampled_from(["\r\n", "\r\n", "\r\n", "\n", "\r", "\r\n "])


@st.composite
def raw_request(draw: st.DrawFn, token: str) -> bytes:
    """A request of random shape: request line, header lines (some framing ones), line endings
    and a body whose length may or may not match what the headers say."""
    method, path, version = draw(METHODS), draw(PATHS), draw(VERSIONS)
    sep = draw(st.sampled_from([" ", " ", " ", "  ", "\t"]))
    lines = [f"{method}{sep}{path}{sep}{version}" if version else f"{method} {path}"]
    body = draw(st.one_of(st.just(b""), st.binary(max_size=64), st.just(SMUGGLED)))
    for _ in range(draw(st.integers(0, 6))):
        name = draw(HEADER_NAMES)
        value = f"Bearer {token}" if name == "Authorization" and draw(st.booleans()) else draw(HEADER_VALUES)
        if name.lower() == "content-length" and draw(st.booleans()):
            value = str(len(body))
        lines.append(f"{name}:{draw(st.sampled_from([' ', '', '  ', chr(9)]))}{value}")
    if draw(st.booleans()):
        lines.append(f"Content-Length: {len(body)}")
    end = draw(LINE_ENDS)
    return (end.join(lines) + end + end).encode("latin-1") + body


@FUZZ
@given(data=st.data())
def test_fuzz_request_streams_get_well_formed_answers_or_a_closed_connection(
    served: Served, digits_test: Any, data: st.DataObject
) -> None:
    token = served.tokens["admin"]
    stream = b"".join(data.draw(st.lists(raw_request(token), min_size=1, max_size=3)))
    if data.draw(st.booleans()):
        stream += HEALTH  # a well-formed request pipelined behind the junk
    _well_formed(raw_exchange(served.socket, stream))
    _still_serving(served, digits_test)


@FUZZ
@given(data=st.data())
def test_fuzz_well_framed_requests_get_at_most_one_answer_each(
    served: Served, digits_test: Any, data: st.DataObject
) -> None:
    """Whatever the method, path, token and body (even a body that is itself a request), N
    correctly framed requests get N answers, or fewer ending in ``Connection: close``."""
    tokens = [None, "ewt_bad", *served.tokens.values()]
    reqs = data.draw(st.lists(st.tuples(
        st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
        st.sampled_from(["/v1/health", "/v1/status", "/v1/predict", "/v2/x"]),
        st.sampled_from(tokens),
        st.one_of(st.binary(max_size=200), st.just(SMUGGLED), st.just(SMUGGLED * 3)),
    ), min_size=1, max_size=5))  # fmt: skip
    stream = b"".join(_req(m, p, b, t) for m, p, t, b in reqs)
    got = _well_formed(raw_exchange(served.socket, stream))
    assert len(got) <= len(reqs), [g[:2] for g in got]
    assert len(got) == len(reqs) or (got and got[-1][1].get("connection") == "close")
    _still_serving(served, digits_test)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _npz(arrays: dict[str, np.ndarray], compress: bool) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buf, **arrays)
    return buf.getvalue()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=40,
)
DTYPES = st.sampled_from(["<f4", "<f8", ">f4", "<i8", "|u1", "|b1", "<f2", "<c8"])
SHAPES = st.lists(st.integers(0, 70), min_size=0, max_size=3).map(tuple)


@st.composite
def body_of_every_type(draw: st.DrawFn) -> tuple[bytes, str]:
    kind = draw(st.sampled_from(["json", "json-inputs", "npy", "npz", "mutated", "junk"]))
    if kind == "json":
        return json.dumps(draw(JSON)).encode(), "application/json"
    if kind == "json-inputs":
        inputs = draw(st.one_of(JSON, st.lists(st.floats(allow_nan=True), max_size=70),
                                st.lists(st.lists(st.floats(-1e3, 1e3), min_size=64, max_size=64), max_size=3),
                                st.dictionaries(st.text(max_size=6), st.lists(st.floats(0, 1), max_size=64),
                                                max_size=3)))
        return json.dumps({"inputs": inputs}).encode(), "application/json"
    a = np.zeros(draw(SHAPES), dtype=draw(DTYPES))
    if a.size:
        a.flat[0] = 1
    if kind == "npy":
        return _npy(a), draw(st.sampled_from(["application/x-npy", "application/octet-stream"]))
    if kind == "npz":
        names = draw(st.lists(st.sampled_from(["arr_0", "x", "input", "a.b"]), min_size=1, max_size=3, unique=True))
        return _npz(dict.fromkeys(names, a), draw(st.booleans())), "application/x-npz"
    if kind == "mutated":
        seed = bytearray(draw(st.sampled_from([_npy(np.zeros((1, 64), np.float32)),
                                               _npz({"x": np.zeros((1, 64), np.float32)}, True)])))
        for at, value in draw(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6)):
            seed[at % len(seed)] = value
        return bytes(seed[: draw(st.integers(0, len(seed)))]), draw(
            st.sampled_from(["application/x-npy", "application/x-npz"]))
    return draw(st.binary(max_size=300)), draw(st.sampled_from(
        ["application/json", "application/x-npy", "application/x-npz", "text/plain", "", "application/json; x=1"]))


@FUZZ
@given(body=body_of_every_type(),
       path=st.sampled_from(["/v1/predict", "/v1/predict", "/v1/predict", "/v1/status", "/v1/health"]),
       role=st.sampled_from(["user", "engineer", "admin"]))
def test_fuzz_every_body_type_to_every_endpoint(
    served: Served, digits_test: Any, body: tuple[bytes, str], path: str, role: str
) -> None:
    raw, ctype = body
    method = "POST" if path == "/v1/predict" else "GET"
    conn = served.connect()
    try:
        status, headers, doc = request(conn, method, path, served.tokens[role], raw, ctype)
    finally:
        conn.close()
    assert status in DOCUMENTED and status != 500, (status, doc)
    assert headers["content-type"] == "application/json"
    if status >= 400:
        assert doc["error"]["status"] == status and doc["error"]["message"]
    _still_serving(served, digits_test)


def test_a_zip_that_is_not_an_npz_is_a_422_and_the_service_keeps_serving(served: Served, digits_test: Any) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("../../etc/passwd.npy", b"\x93NUMPY")
    conn = served.connect()
    st_, _, doc = request(conn, "POST", "/v1/predict", served.tokens["user"], buf.getvalue(), "application/x-npz")
    conn.close()
    assert st_ == 422, doc
    _still_serving(served, digits_test)
