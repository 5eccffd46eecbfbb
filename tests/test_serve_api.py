"""The local API over a real Unix socket: every role, every error code, every limit."""

from __future__ import annotations

import http.client
import io
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.config import ServeConfig
from device_agent.errors import UsageError
from device_agent.service.http import Server
from device_agent.service.service import Service
from tests.conftest import PASSPHRASE
from tests.fixtures.http import UnixConnection, health, predict, request, status
from tests.fixtures.serve import Served, SimClock, serve, wait_until_serving

KEYS_ENV = {**os.environ, "EDGEWARD_DEVICE_PASSPHRASE": PASSPHRASE.decode()}


@pytest.fixture
def served(
    make_board: Callable[..., Any], pack_for: Callable[..., Path], digits: Any
) -> Iterator[Served]:
    board = make_board()
    out = pack_for(
        digits.onnx, [board], policy={"bands": [[0.99, "sure"], [0.5, "likely"], [0.0, "unsure"]]}
    )
    board.agent().install((out / f"{board.device_id}.ewb").read_bytes())
    s = serve(board)
    yield s
    s.server.stop()


def test_each_role_sees_only_what_the_sealed_policy_allows(
    served: Served, digits_test: Any
) -> None:
    x, y = digits_test
    st, _, user = predict(served.connect(), served.tokens["user"], x[0])
    assert st == 200 and user == {"label": int(y[0])}
    st, _, eng = predict(served.connect(), served.tokens["engineer"], x[0])
    assert st == 200 and set(eng) == {"label", "confidence"}
    assert eng["confidence"] in (
        "sure",
        "likely",
        "unsure",
    )  # bands from the bundle's sealed policy
    st, _, adm = predict(served.connect(), served.tokens["admin"], x[:3])
    assert st == 200 and len(adm["predictions"]) == 3
    assert len(adm["predictions"][0]["scores"]) == 10 and adm["predictions"][0]["label"] == int(
        y[0]
    )


def test_npy_body_is_accepted_and_pickles_refused(served: Served, digits_test: Any) -> None:
    x, y = digits_test
    buf = io.BytesIO()
    np.save(buf, x[:2])
    user = served.tokens["user"]
    st, _, doc = request(served.connect(), "POST", "/v1/predict", user, buf.getvalue(), "application/x-npy")
    assert st == 200 and [p["label"] for p in doc["predictions"]] == [int(v) for v in y[:2]]
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    st, _, doc = request(served.connect(), "POST", "/v1/predict", user, buf.getvalue(), "application/x-npy")
    assert st == 422 and "pickles are refused" in doc["error"]["message"]


def test_401_without_a_valid_token_and_after_revocation(served: Served, digits_test: Any) -> None:
    x, _ = digits_test
    assert predict(served.connect(), None, x[0])[0] == 401
    st, headers, _ = predict(served.connect(), "ewt_not-a-token", x[0])
    assert st == 401 and headers["www-authenticate"].startswith("Bearer")
    tid, token = served.add_token("user")
    assert predict(served.connect(), token, x[0])[0] == 200
    rc = subprocess.run(
        [
            sys.executable,
            "-m",
            "device_agent.cli",
            "token",
            "revoke",
            tid,
            "--data-dir",
            str(served.service.agent.store.path),
        ],
        capture_output=True,
        text=True,
        env=KEYS_ENV,  # the token list is sealed with the device keys
    )
    assert rc.returncode == 0, rc.stderr
    assert (
        predict(served.connect(), token, x[0])[0] == 401
    )  # the running service sees it at once


def test_tokens_are_stored_only_as_hashes(served: Served) -> None:
    path = served.service.agent.store.path / "tokens.json"
    text = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert all(tok not in text for tok in served.tokens.values())
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "device_agent.cli",
            "token",
            "list",
            "--json",
            "--data-dir",
            str(served.service.agent.store.path),
        ],
        capture_output=True,
        text=True,
        check=True,
        env=KEYS_ENV,
    )
    listed = json.loads(out.stdout)
    assert {r["role"] for r in listed} == {"user", "engineer", "admin"} and all(
        "sha256" not in r for r in listed
    )


def test_403_status_is_admin_only(served: Served) -> None:
    assert status(served.connect(), served.tokens["user"])[0] == 403
    assert status(served.connect(), served.tokens["engineer"])[0] == 403
    st, _, doc = status(served.connect(), served.tokens["admin"])
    assert st == 200 and doc["counters"]["queries"] >= 0 and doc["integrity"] == "ok"


def test_403_raw_outputs_only_for_admin(
    make_board: Callable[..., Any], pack_for: Callable[..., Path], digits: Any, digits_test: Any
) -> None:
    board = make_board()
    out = pack_for(digits.onnx, [board], task={"kind": "raw"})
    board.agent().install((out / f"{board.device_id}.ewb").read_bytes())
    s = serve(board)
    try:
        assert predict(s.connect(), s.tokens["user"], digits_test[0][0])[0] == 403
        assert predict(s.connect(), s.tokens["admin"], digits_test[0][0])[0] == 200
    finally:
        s.server.stop()


def test_413_body_and_batch_bounds(served: Served, digits_test: Any) -> None:
    x, _ = digits_test
    big = b'{"inputs": [' + b"0," * 600_000 + b"0]}"
    st, _, doc = request(served.connect(), "POST", "/v1/predict", served.tokens["user"], big)
    assert st == 413 and "limit" in doc["error"]["message"]
    st, _, doc = predict(served.connect(), served.tokens["user"], x[:33])
    assert st == 413 and "33 inputs" in doc["error"]["message"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"inputs": [float("nan")] * 64}, "NaN or Inf"),
        ({"inputs": [1e309] * 64}, "NaN or Inf"),
        ({"inputs": [0.0] * 63}, "dimension 1 is 63"),
        ({"inputs": ["a"] * 64}, "must be numbers"),
        ({"inputs": [[0.0] * 64, [0.0] * 3]}, "not a rectangular array"),
        ({"wrong": 1}, "must be JSON"),
    ],
)
def test_422_with_a_clear_message(served: Served, body: dict[str, Any], needle: str) -> None:
    raw = json.dumps(body).encode()  # Python's json writes NaN and Infinity, as careless clients do
    st, _, doc = request(served.connect(), "POST", "/v1/predict", served.tokens["user"], raw)
    assert st == 422 and needle in doc["error"]["message"], doc


def test_503_when_no_model_is_installed(make_board: Callable[..., Any], digits_test: Any) -> None:
    s = serve(make_board())
    try:
        assert health(s.connect())[0] == 503
        st, _, doc = predict(s.connect(), s.tokens["user"], digits_test[0][0])
        assert st == 503 and "no model is installed" in doc["error"]["message"]
    finally:
        s.server.stop()


def _served_with_clock(
    board: Any,
    pack_for: Callable[..., Path],
    digits: Any,
    policy: dict[str, Any],
    config: ServeConfig | None = None,
) -> tuple[Served, SimClock]:
    out = pack_for(digits.onnx, [board], policy=policy)
    board.agent().install((out / f"{board.device_id}.ewb").read_bytes())
    clock = SimClock()
    # One simulated clock drives both the wall time and the throttle's boottime here; the tests in
    # test_budgets.py move them apart.
    return serve(board, config, clock, monotonic=clock), clock


def test_429_client_rate_with_retry_after(
    make_board: Callable[..., Any], pack_for: Callable[..., Path], digits: Any, digits_test: Any
) -> None:
    s, clock = _served_with_clock(
        make_board(), pack_for, digits, {"throttle": {"client_rate": 2, "client_burst": 3}}
    )
    x, _ = digits_test
    try:
        c, tok = s.connect(), s.tokens["user"]
        assert [predict(c, tok, x[i])[0] for i in range(3)] == [200, 200, 200]
        st, headers, doc = predict(c, tok, x[3])
        assert (
            st == 429 and headers["retry-after"] == "1" and "client rate" in doc["error"]["message"]
        )
        assert predict(s.connect(), s.tokens["engineer"], x[3])[0] == 200  # buckets are per client
        # more rows than the burst: can never pass
        st, _, doc = predict(s.connect(), s.tokens["admin"], x[:4])
        assert st == 413 and "burst" in doc["error"]["message"]
        clock.t += 0.5
        assert predict(c, tok, x[3])[0] == 200
    finally:
        s.server.stop()


def test_429_global_rate(
    make_board: Callable[..., Any], pack_for: Callable[..., Path], digits: Any, digits_test: Any
) -> None:
    s, clock = _served_with_clock(
        make_board(), pack_for, digits, {"throttle": {"global_rate": 1, "global_burst": 2}}
    )
    x, _ = digits_test
    try:
        assert predict(s.connect(), s.tokens["user"], x[0])[0] == 200
        assert predict(s.connect(), s.tokens["engineer"], x[1])[0] == 200
        st, _, doc = predict(s.connect(), s.tokens["admin"], x[2])
        assert st == 429 and "global rate" in doc["error"]["message"]
    finally:
        s.server.stop()


def test_429_daily_budget_until_the_window_ends(
    make_board: Callable[..., Any], pack_for: Callable[..., Path], digits: Any, digits_test: Any
) -> None:
    # The bundle allows 100 a day; the board's local config tightens it to 5: the stricter wins.
    # The window opens at the client's first query and lasts a day of boottime.
    s, clock = _served_with_clock(
        make_board(),
        pack_for,
        digits,
        {"throttle": {"daily_budget": 100}},
        ServeConfig(throttle={"daily_budget": 5}),
    )
    x, _ = digits_test
    try:
        c, tok = s.connect(), s.tokens["user"]
        assert predict(c, tok, x[:5])[0] == 200
        clock.t += 60
        st, headers, doc = predict(c, tok, x[5])
        assert st == 429 and "daily budget" in doc["error"]["message"]
        assert int(headers["retry-after"]) == 86400 - 60
        clock.t += 86400 - 60 - 1
        assert predict(c, tok, x[5])[0] == 429
        clock.t += 1
        assert predict(c, tok, x[5])[0] == 200
    finally:
        s.server.stop()


def test_anomalous_client_is_slowed_further(
    make_board: Callable[..., Any], pack_for: Callable[..., Path], digits: Any, digits_test: Any
) -> None:
    from tests.fixtures.serve import calibration_policy

    policy = {**calibration_policy(), "throttle": {"client_rate": 5, "client_burst": 10}}
    s, clock = _served_with_clock(make_board(), pack_for, digits, policy)
    rng = np.random.default_rng(0)
    try:
        c, tok = s.connect(), s.tokens["user"]
        for _ in range(10):
            assert predict(c, tok, rng.random(64, dtype=np.float32))[0] == 200
        st, headers, _ = predict(c, tok, rng.random(64, dtype=np.float32))
        # A clean client waits 1/5 s for its next query; this one is flagged: 21 times longer.
        assert st == 429 and int(headers["retry-after"]) >= 4
    finally:
        s.server.stop()


def test_socket_is_0660_and_tcp_is_loopback_only(served: Served, digits_test: Any) -> None:
    assert stat.S_IMODE(os.stat(served.socket).st_mode) == 0o660
    with pytest.raises(UsageError, match="only loopback"):
        Server(served.service, None, "0.0.0.0:0")
    tcp = Server(served.service, None, "127.0.0.1:0")
    host, port = tcp.tcp_address  # type: ignore[misc]
    for s in tcp._servers:
        import threading

        threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        conn = http.client.HTTPConnection(host, port)
        st, _, doc = predict(conn, served.tokens["user"], digits_test[0][0])
        assert st == 200 and doc["label"] == int(digits_test[1][0])
    finally:
        for s in tcp._servers:
            s.shutdown()
            s.server_close()


def test_every_query_and_decision_is_audited_without_raw_input(
    served: Served, digits_test: Any
) -> None:
    from device_agent.service.audit import verify

    x, _ = digits_test
    predict(served.connect(), served.tokens["user"], x[0])
    predict(served.connect(), "ewt_bad", x[0])
    served.service.audit.close()
    d = served.service.agent.store.path / "audit"
    lines = [
        json.loads(line)
        for seg in sorted(d.glob("audit-*.jsonl"))
        for line in seg.read_text().splitlines()
    ]
    assert [(r["status"], r["client"]) for r in lines] == [(200, served.ids["user"]), (401, None)]
    rec = lines[0]
    assert rec["input"]["shape"] == [1, 64] and "fp" in rec["input"]
    assert set(rec["input"]) == {
        "fp",
        "dtype",
        "shape",
        "finite",
        "mean",
        "std",
        "min",
        "max",
    }  # no values
    assert verify(d).ok


def test_serve_command_runs_and_stops_cleanly(
    make_board: Callable[..., Any],
    pack_for: Callable[..., Path],
    digits: Any,
    digits_test: Any,
    tmp_path: Path,
) -> None:
    board = make_board()
    out = pack_for(digits.onnx, [board])
    board.agent().install((out / f"{board.device_id}.ewb").read_bytes())
    cli = [sys.executable, "-m", "device_agent.cli"]
    env = {**os.environ, "EDGEWARD_DEVICE_PASSPHRASE": board.keys.passphrase.decode()}  # type: ignore[union-attr]
    tok = json.loads(
        subprocess.run(
            [*cli, "token", "add", "--role", "user", "--json", "--data-dir", str(board.data_dir)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        ).stdout
    )
    sock = tmp_path / "api.sock"
    proc = subprocess.Popen(
        [*cli, "serve", "--data-dir", str(board.data_dir), "--socket", str(sock)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until_serving(sock)
        st, _, doc = predict(UnixConnection(sock), tok["token"], digits_test[0][0])
        assert st == 200 and doc == {"label": int(digits_test[1][0])}
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0, proc.stderr.read() if proc.stderr else ""
    assert not sock.exists()
    ev = subprocess.run(
        [*cli, "audit", "verify", "--json", "--data-dir", str(board.data_dir)],
        capture_output=True,
        text=True,
    )
    assert ev.returncode == 0 and json.loads(ev.stdout)["records"] == 1


def test_background_services_start_and_stop_with_the_service(served: Served) -> None:
    calls: list[str] = []

    class Probe:
        def start(self) -> None:
            calls.append("start")

        def stop(self) -> None:
            calls.append("stop")

    svc = Service(served.service.agent)
    svc.attach(Probe())
    svc.start()
    assert "counters" in svc.status_provider()
    svc.stop()
    assert calls == ["start", "stop"]


def test_pack_cli_seals_policy_and_ood_calibration(
    make_board: Callable[..., Any], publisher: Path, digits: Any, tmp_path: Path
) -> None:
    from tests.fixtures.serve import digits_validation

    board = make_board()
    (tmp_path / "policy.json").write_text(json.dumps({"throttle": {"daily_budget": 7}}))
    np.savez(tmp_path / "val.npz", x=digits_validation())
    out = tmp_path / "out"
    rc = subprocess.run(
        [sys.executable, "-m", "packager.cli", "pack", str(digits.onnx), "--profile", "rpi4b",
         "--publisher-key", str(publisher / "publisher.key"), "--device", str(board.enrolment),
         "--model-version", "1", "--policy", str(tmp_path / "policy.json"),
         "--calibrate-ood", str(tmp_path / "val.npz"), "--out", str(out), "--quiet"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert rc.returncode == 0, rc.stderr
    agent = board.agent()
    agent.install((out / f"{board.device_id}.ewb").read_bytes())
    policy = agent.model().sidecar.policy
    assert policy["throttle"] == {"daily_budget": 7} and policy["ood"]["schema"] == "edgeward.ood/1"
    assert b"daily_budget" not in (out / f"{board.device_id}.ewb").read_bytes()  # sealed, not clear


def test_serve_without_device_keys_fails_at_start(make_board: Callable[..., Any]) -> None:
    board = make_board()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWARD_DEVICE_")}
    rc = subprocess.run(
        [sys.executable, "-m", "device_agent.cli", "serve", "--data-dir", str(board.data_dir)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert rc.returncode == 2 and "EDGEWARD_DEVICE_PASSPHRASE" in rc.stderr


def test_connections_beyond_the_limit_get_503(
    make_board: Callable[..., Any], pack_for: Callable[..., Path], digits: Any, digits_test: Any
) -> None:
    import socket

    s, _ = _served_with_clock(make_board(), pack_for, digits, {}, ServeConfig(max_connections=2))
    held = []
    try:
        for _ in range(2):
            c = s.connect()
            assert predict(c, s.tokens["user"], digits_test[0][0])[0] == 200  # keep-alive: stays open
            held.append(c)
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(str(s.socket))
            assert raw.recv(100).startswith(b"HTTP/1.1 503")
        held.pop().close()
        time.sleep(0.2)  # the server notices the closed connection and frees its slot
        assert predict(s.connect(), s.tokens["user"], digits_test[0][0])[0] == 200
    finally:
        for c in held:
            c.close()
        s.server.stop()
