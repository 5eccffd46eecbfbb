"""Signed commands over a real mosquitto with TLS and client certificates: a board serving with
`--broker` obeys its retained command queue whether it was online when the command was issued
or came back later, sends its signed result before its wipe completes, and takes the fleet's
time beacon."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent import Agent, crypto
from device_agent.commands.format import (
    TIME_TOPIC,
    Beacon,
    Command,
    encode_beacon,
    encode_command,
    encode_queue,
    results_topic,
    verify_result,
)
from device_agent.store import layout
from device_agent.store.keys import KeySource
from device_agent.store.wipe import verify_attestation
from device_agent.telemetry.mqtt import Link, Session
from device_agent.telemetry.report import command_topic
from tests.conftest import Board
from tests.fixtures.fleet import Fleet, fleet_fixture, wait_until  # noqa: F401
from tests.fixtures.serve import wait_until_serving

ROOT = Path(__file__).resolve().parent.parent
OPERATOR = Ed25519PrivateKey.generate()
OPERATOR_PUB = crypto.ed25519_public_raw(OPERATOR)


def board_with_model(
    tmp_path: Path, publisher: Path, pack_for: Callable[..., Path], model: Path, fleet: Fleet
) -> tuple[Board, dict]:
    """A board with a model installed, trusting OPERATOR, enrolled in ``fleet``; and its env."""
    from device_agent.bundle.keyfiles import load_public_key_file

    kek = tmp_path / "kek.bin"
    kek.write_bytes(os.urandom(32))
    keys = KeySource.from_env(str(kek))
    d = tmp_path / "board"
    enrolment = tmp_path / "pi-remote.json"
    enrolment.write_bytes(Agent.provision(d, "pi-remote", [load_public_key_file(publisher / "publisher.pub")],
                                          [OPERATOR_PUB], keys))
    board = Board(d, enrolment, "pi-remote", keys)
    board.agent().install((pack_for(model, [board]) / "pi-remote.ewb").read_bytes())
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWARD_")}
    env["EDGEWARD_DEVICE_KEK_FILE"] = str(kek)
    fleet.enrol(board.enrolment)
    return board, env


def serve(board: Board, env: dict, fleet: Fleet) -> subprocess.Popen[str]:
    broker = fleet.broker(board.device_id)
    return subprocess.Popen(
        [sys.executable, "-m", "device_agent.cli", "serve", "--data-dir", str(board.data_dir),
         "--broker", f"{broker.host}:{broker.port}", "--ca", str(broker.ca), "--cert", str(broker.cert),
         "--key", str(broker.key), "--heartbeat", "0.5"],
        env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )


class Operator:
    """The operator's MQTT client: publishes retained messages and waits for their PUBACK."""

    def __init__(self, fleet: Fleet, results: list[bytes] | None = None) -> None:
        self.acked: set[int] = set()
        self.results = results
        self.link = Link(fleet.operator, Session("op-test"), on_ack=lambda mid, ok: self.acked.add(mid) if ok else None,
                         on_message=(lambda _t, payload, _m: results.append(payload)) if results is not None else None)
        if results is not None:
            self.link.subscribe(results_topic("pi-remote"))
        self.link.start()
        self.link.require_connected(10)

    def publish_retained(self, topic_name: str, payload: bytes) -> None:
        """QoS 1 and retained: the broker keeps it for the board's next subscription."""
        mid = self.link.publish(topic_name, payload, retain=True)
        wait_until(lambda: mid in self.acked, 10, "the broker's PUBACK")

    def stop(self) -> None:
        self.link.stop()


def until_wiped(proc: subprocess.Popen[str], op: Operator, results: list[bytes]) -> str:
    """Wait for ``serve`` to exit (it does once the board is wiped) and its result to arrive;
    returns what it printed. The process is stopped whatever happens."""
    try:
        proc.wait(timeout=60)
        wait_until(lambda: bool(results), 20, "the board's signed result at the operator")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        op.stop()
    assert proc.returncode == 0, err
    return err


def decommission(seq: int = 1) -> bytes:
    now = datetime.now(UTC)
    cmd = Command("decommission", "pi-remote", seq, now, now + timedelta(days=30))
    return encode_command(cmd, OPERATOR, OPERATOR_PUB)


def assert_wiped_with_a_verified_result(board: Board, results: list[bytes]) -> None:
    key = base64.b64decode(json.loads(board.enrolment.read_text())["sign_public"])
    [result] = [verify_result(r, key) for r in results]
    assert (result.kind, result.outcome) == ("decommission", "applied")
    body = verify_attestation(result.effects["attestation"], key)
    assert body["by"]["command_seq"] == 1
    assert sorted(f.rel for f in layout.Layout(board.data_dir).scan()) == [layout.ATTESTATION]


def test_decommission_reaches_an_online_board_which_reports_before_it_wipes(
    tmp_path: Path, publisher: Path, fleet: Fleet, pack_for, digits
) -> None:
    board, env = board_with_model(tmp_path, publisher, pack_for, digits.onnx, fleet)
    results: list[bytes] = []
    op = Operator(fleet, results)
    proc = serve(board, env, fleet)
    try:
        wait_until_serving(board.data_dir / layout.SOCKET)
        op.publish_retained(command_topic("pi-remote"), encode_queue([decommission()]))
    finally:
        err = until_wiped(proc, op, results)
    assert "the board was wiped" in err, err
    assert_wiped_with_a_verified_result(board, results)


def test_decommission_issued_while_a_board_is_offline_reaches_it_when_it_reconnects(
    tmp_path: Path, publisher: Path, fleet: Fleet, pack_for, digits
) -> None:
    board, env = board_with_model(tmp_path, publisher, pack_for, digits.onnx, fleet)
    results: list[bytes] = []
    op = Operator(fleet, results)
    now = datetime.now(UTC)
    beacon = encode_beacon(Beacon(now), OPERATOR, OPERATOR_PUB)
    # Issued while the board is off: a retained queue the broker keeps, and a time beacon.
    op.publish_retained(TIME_TOPIC, beacon)
    op.publish_retained(command_topic("pi-remote"), encode_queue([decommission(), beacon]))
    fleet.stop(signal.SIGTERM)  # even a broker restart in between loses nothing (persistence)
    fleet.start()
    op.link.require_connected(10)
    until_wiped(serve(board, env, fleet), op, results)
    assert_wiped_with_a_verified_result(board, results)


def test_the_fleets_time_beacon_moves_the_board_clock_floor(
    tmp_path: Path, publisher: Path, fleet: Fleet, pack_for, digits
) -> None:
    board, env = board_with_model(tmp_path, publisher, pack_for, digits.onnx, fleet)
    floor_before = board.agent().state().clock_floor
    assert floor_before is not None
    t = floor_before + timedelta(hours=12)
    op = Operator(fleet)
    op.publish_retained(TIME_TOPIC, encode_beacon(Beacon(t), OPERATOR, OPERATOR_PUB))
    proc = serve(board, env, fleet)
    try:
        wait_until_serving(board.data_dir / layout.SOCKET)
        wait_until(lambda: board.agent().state().clock_floor == t, 20, "the beacon's time as the clock floor")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        op.stop()
    assert proc.returncode == 0, err


def test_forged_and_replayed_commands_over_the_broker_change_nothing(
    tmp_path: Path, publisher: Path, fleet: Fleet, pack_for, digits
) -> None:
    """A queue on the board's topic holding a forged decommission (another key), one for another
    board and an expired one is refused item by item: the board keeps serving, records each
    refusal, and still obeys the genuine command that comes next."""
    from device_agent.service.events import EventStore

    board, env = board_with_model(tmp_path, publisher, pack_for, digits.onnx, fleet)
    results: list[bytes] = []
    op = Operator(fleet, results)
    now = datetime.now(UTC)
    thief = Ed25519PrivateKey.generate()
    forged = encode_command(Command("decommission", "pi-remote", 1, now, now + timedelta(days=1)), thief,
                            crypto.ed25519_public_raw(thief))
    elsewhere = encode_command(Command("decommission", "pi-other", 1, now, now + timedelta(days=1)),
                               OPERATOR, OPERATOR_PUB)
    expired = encode_command(Command("decommission", "pi-remote", 1, now - timedelta(days=9), now - timedelta(days=8)),
                             OPERATOR, OPERATOR_PUB)
    proc = serve(board, env, fleet)
    try:
        wait_until_serving(board.data_dir / layout.SOCKET)
        op.publish_retained(command_topic("pi-remote"), encode_queue([forged, elsewhere, expired]))

        def refused() -> int:
            return sum(1 for e in EventStore(board.data_dir / layout.EVENTS).list() if e.kind == "command")

        wait_until(lambda: refused() >= 3, 20, "three refusals recorded")
        assert proc.poll() is None and (board.data_dir / layout.KEYS).exists()
        assert board.agent().state().command_seq == 0
        op.publish_retained(command_topic("pi-remote"), encode_queue([decommission()]))
    finally:
        until_wiped(proc, op, results)
    outcomes = sorted(verify_result(r, base64.b64decode(json.loads(board.enrolment.read_text())["sign_public"])).outcome
                      for r in results)
    assert "applied" in outcomes
