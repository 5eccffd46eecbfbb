"""One owner for every file on the board (device_agent.store.layout).

A full life on one data dir — provision, two versions, serving with tokens, queries, a
detection, telemetry to a real mosquitto, rollback — leaves only files the layout lists, at
modes no wider than it gives; the wipe then leaves exactly what the layout keeps.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from device_agent.store import layout
from device_agent.store.keys import KeySource
from device_agent.store.wipe import verify_attestation
from fleet.monitor import Monitor
from tests.conftest import Board
from tests.fixtures.fleet import Fleet, fleet_fixture, monitor_fixture, wait_until  # noqa: F401
from tests.fixtures.serve import calibration_policy, wait_until_serving

ROOT = Path(__file__).resolve().parent.parent


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=30)
        self.unix_path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.unix_path)


def predict(sock: Path, token: str, row: np.ndarray) -> int:
    conn = UnixConnection(sock)
    try:
        conn.request("POST", "/v1/predict", json.dumps({"inputs": row.tolist()}),
                     {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def agent(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "device_agent.cli", *argv], env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL, cwd=ROOT)


def provision(tmp_path: Path, publisher: Path, kek_inside: bool) -> tuple[Board, dict[str, str], Path]:
    data = tmp_path / "board"
    data.mkdir(mode=0o700)
    kek = (data if kek_inside else tmp_path) / "kek.bin"
    fd = os.open(kek, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, os.urandom(32))
    os.close(fd)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWARD_")}
    env["EDGEWARD_DEVICE_KEK_FILE"] = str(kek)
    enrolment = tmp_path / "pi-life.json"
    r = agent(env, "provision", "--data-dir", str(data), "--device-id", "pi-life",
              "--publisher-pub", str(publisher / "publisher.pub"), "--export", str(enrolment))
    assert r.returncode == 0, r.stderr
    return Board(data, enrolment, "pi-life", KeySource(kek=kek.read_bytes(), kek_path=kek)), env, kek


def listed(data: Path) -> dict[str, str]:
    """Every path in the data dir with the layout pattern it belongs to (fails on any other)."""
    found = layout.Layout(data).scan()
    strays = [f.rel for f in found if f.entry is None]
    assert not strays, f"files the layout does not list: {strays}"
    return {f.rel: f.entry.pattern for f in found if f.entry is not None}


def test_a_full_life_leaves_only_listed_files_and_the_wipe_only_the_attestation(
    tmp_path: Path, publisher: Path, fleet: Fleet, monitor: Monitor, pack_for: Callable[..., Path], digits, digits_test
) -> None:
    board, env, kek = provision(tmp_path, publisher, kek_inside=True)
    releases = [pack_for(digits.onnx, [board], version=v, policy=calibration_policy()) for v in (1, 2)]
    for out in releases:
        r = agent(env, "install", str(out / "pi-life.ewb"), "--data-dir", str(board.data_dir))
        assert r.returncode == 0, r.stderr
    r = agent(env, "token", "add", "--role", "user", "--json", "--data-dir", str(board.data_dir))
    assert r.returncode == 0, r.stderr
    token = json.loads(r.stdout)["token"]
    broker = fleet.enrol(board.enrolment)
    proc = subprocess.Popen(
        [sys.executable, "-m", "device_agent.cli", "serve", "--data-dir", str(board.data_dir),
         "--broker", f"{broker.host}:{broker.port}", "--ca", str(broker.ca), "--cert", str(broker.cert),
         "--key", str(broker.key), "--heartbeat", "0.5"],
        env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    sock = board.data_dir / layout.SOCKET
    try:
        wait_until_serving(sock)
        x, _ = digits_test
        assert [predict(sock, token, row) for row in x[:5]] == [200] * 5
        for row in np.random.default_rng(3).random((6, 64)).astype(np.float32):  # out of distribution
            assert predict(sock, token, row) in (200, 429)

        def detected() -> bool:
            return any(e["data"]["event"]["kind"] == "ood" for e in monitor.store.reports("pi-life", "events"))

        wait_until(detected, 20, "the board's OoD detection at the fleet monitor")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    r = agent(env, "rollback", "--data-dir", str(board.data_dir))
    assert r.returncode == 0, r.stderr

    paths = listed(board.data_dir)
    for name in (layout.DEVICE, layout.KEYS, layout.KEK, layout.TRUST, layout.STATE, layout.TOKENS, layout.BUDGETS,
                 layout.EVENTS, layout.OUTBOX, f"{layout.AUDIT}/fingerprint.key", f"{layout.AUDIT}/head.json"):
        assert name in paths, f"a full life should have written {name}"
    assert sum(1 for p in paths.values() if p == f"{layout.BUNDLES}/*.ewb") == 1  # v1 again; v2 dropped
    assert any(p == f"{layout.AUDIT}/audit-*.jsonl" for p in paths.values())
    r = agent(env, "status", "--data-dir", str(board.data_dir), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["data_dir_problems"] == [], r.stderr
    sign_public = json.loads(board.enrolment.read_text())["sign_public"]

    r = agent(env, "wipe", "--data-dir", str(board.data_dir), "--yes", "--json")
    assert r.returncode == 0, r.stderr
    kept = sorted(f.rel for f in layout.Layout(board.data_dir).scan())
    assert kept == [layout.ATTESTATION]
    assert [e.pattern for e in layout.ENTRIES if e.fate is layout.Fate.KEEP] == [layout.ATTESTATION]
    doc = json.loads((board.data_dir / layout.ATTESTATION).read_text())
    import base64

    body = verify_attestation(doc, base64.b64decode(sign_public))
    assert body["key_encryption_key"] == "key file in the data dir"
    assert body["files_shredded"] >= 3  # keys.wrapped, the audit key, the key file
    assert not kek.exists()


def test_a_key_file_outside_the_data_dir_is_named_in_the_attestation(tmp_path: Path, publisher: Path) -> None:
    board, env, kek = provision(tmp_path, publisher, kek_inside=False)
    r = agent(env, "wipe", "--data-dir", str(board.data_dir), "--yes", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["body"]["key_encryption_key"].startswith("key file outside the data dir")
    assert kek.exists()  # out of the wipe's reach: the operator destroys it (docs/operations.md)


def test_every_entry_is_documented_in_operations_md() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    missing = [e.pattern for e in layout.ENTRIES if f"`{e.pattern}`" not in doc]
    assert not missing, f"docs/operations.md's data-directory table lacks {missing}"


def test_the_layout_check_names_strays_and_wide_modes(tmp_path: Path) -> None:
    d = tmp_path / "d"
    (d / "bundles").mkdir(parents=True, mode=0o700)
    os.chmod(d, 0o700)
    (d / "state.json").write_bytes(b"{}")
    os.chmod(d / "state.json", 0o644)
    (d / "bundles" / "../notes.txt").write_text("x")
    (d / "bundles" / "NOT-AN-ID.ewb").write_text("x")
    problems = layout.Layout(d).problems()
    assert "state.json is mode 644, wider than 600" in problems
    assert "notes.txt is not a file the agent writes" in problems
    assert "bundles/NOT-AN-ID.ewb is not a file the agent writes" in problems
    with pytest.raises(Exception, match="invalid bundle id"):
        layout.Layout(d).bundle("../state")
