"""Invariant 8 under local learning: no raw example leaves the board, and none lies on its disk
in the clear.

A real board process serves with telemetry to a real mosquitto. Everything the board publishes is
captured by a subscriber on the whole topic tree, and every API response is kept, while feedback
is sent over the API, learning cycles run (one accepted, one rejected by the gate) and the held
examples are listed. Then no captured byte string holds an example, in any encoding the board
could have used (float32 or float64 bytes, base64 of them, or its numbers as JSON), and a scan of
the data directory finds none either.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.store.datadir import utcnow
from device_agent.telemetry.mqtt import Link, Session
from tests.conftest import PASSPHRASE, Board
from tests.fixtures.fleet import Fleet, fleet_fixture, wait_until  # noqa: F401
from tests.fixtures.http import UnixConnection, request
from tests.fixtures.learning import scenario
from tests.fixtures.serve import calibration_policy, wait_until_serving


def encodings(x: np.ndarray) -> list[bytes]:
    """Ways one example could appear in a captured message or a file."""
    out = []
    for arr in (x.astype("<f4"), x.astype("<f8"), x.astype(">f4")):
        raw = arr.tobytes()
        out += [raw, base64.b64encode(raw)]
    vals = x.astype(np.float64).tolist()
    out.append(json.dumps(vals[8:24]).encode()[1:-1])  # a run of its numbers as JSON
    out.append(json.dumps(vals[8:24], separators=(",", ":")).encode()[1:-1])
    return out


def test_no_example_leaves_the_board_or_lies_on_its_disk_in_the_clear(
    fleet: Fleet, make_board: Callable[..., Board], pack_for: Callable[..., Path], digits: Any, tmp_path: Path
) -> None:
    sc = scenario(0)
    board = make_board("pi-leak")
    data = sc.learning_data(tmp_path / "learning.npz")
    out = pack_for(digits.onnx, [board], policy=calibration_policy(), learnable=(data, {}))
    board.agent().install_file(out / "pi-leak.ewb")
    broker = fleet.enrol(board.enrolment)
    tokens = board.agent().tokens()
    engineers = [tokens.add("engineer", utcnow())[1] for _ in range(3)]  # three sources
    eng = engineers[0]
    captured: list[bytes] = []
    lock = threading.Lock()

    def on_message(topic: str, payload: bytes, _mid: int) -> None:
        with lock:
            captured.append(topic.encode() + b"\n" + payload)

    spy = Link(fleet.operator, Session("leak-spy"), on_message=on_message)
    spy.subscribe("#")
    spy.start()
    spy.require_connected(10)
    env = {**os.environ, "EDGEWARD_DEVICE_PASSPHRASE": PASSPHRASE.decode()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "device_agent.cli", "serve", "--data-dir", str(board.data_dir),
         "--broker", f"{broker.host}:{broker.port}", "--ca", str(broker.ca), "--cert", str(broker.cert),
         "--key", str(broker.key), "--heartbeat", "0.3"],
        env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    sent: list[np.ndarray] = []
    try:
        sock = board.data_dir / "agent.sock"
        wait_until_serving(sock)
        conn = UnixConnection(sock)
        responses: list[bytes] = []

        def call(method: str, path: str, body: bytes | None = None, ctype: str = "application/json",
                 token: str = eng) -> Any:
            status, headers, doc = request(conn, method, path, token, body, ctype)
            responses.append(json.dumps([status, headers, doc]).encode())
            return status, doc

        for i, (x, y) in enumerate(sc.feedback(("a", "b", "c")).values()):
            buf = io.BytesIO()
            bad = (y + 1) % 10 if i == 2 else y  # one source's labels all wrong: held, listed, never sent
            np.savez(buf, x=x, y=bad)
            status, doc = call("POST", "/v1/feedback", buf.getvalue(), "application/x-npz", engineers[i])
            assert status == 200, doc
            sent.extend(x)
        status, first = call("POST", "/v1/learn", b"{}")
        assert status == 200 and first["accepted"] is True and first["examples"]["held"] > 0, first
        status, doc = call("GET", "/v1/feedback")
        assert status == 200 and doc["examples"]
        status, doc = call("GET", "/v1/learning")
        assert status == 200
        call("POST", "/v1/learn", b"{}")
        # the events of both cycles reach the broker
        wait_until(lambda: sum(b'"learning"' in c for c in captured) >= 3, 20, "learning events over MQTT")
        wait_until(lambda: sum(b"/status\n" in c for c in captured) >= 3, 20, "heartbeats")
    finally:
        proc.terminate()
        proc.wait(20)
        spy.stop()
    assert len(sent) == 447 and captured and responses
    blobs = captured + responses
    data_files = [p.read_bytes() for p in board.data_dir.rglob("*") if p.is_file()]
    assert any(p.name == "feedback.enc" for p in board.data_dir.rglob("*"))
    for x in sent:
        for needle in encodings(np.asarray(x)):
            assert not any(needle in b for b in blobs), "an example left the board"
            assert not any(needle in b for b in data_files), "an example lies on the board's disk in the clear"
    # The scan can see an example when there is one: the same check finds one planted in the clear.
    planted = np.asarray(sent[0]).astype("<f4").tobytes()
    assert any(n in b"junk" + planted for n in encodings(np.asarray(sent[0])))
