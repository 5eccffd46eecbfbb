"""Integration: the generated mosquitto set-up, board telemetry and the fleet monitor, for real.

TLS with client certificates, per-device ACLs, signed reports verified end to end, forged /
replayed / unknown reports flagged and never stored as genuine, and the fleet CLI views.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.config import TelemetryConfig
from device_agent.errors import EnvironmentFault
from device_agent.service.events import EventStore
from device_agent.telemetry.mqtt import Broker, Link, Session
from device_agent.telemetry.report import NO_PREV, Report, command_topic, encode_report, frame, payload_digest, topic
from device_agent.telemetry.service import TelemetryService
from fleet.broker import install_crl
from fleet.ca import CRL_DAYS, FleetHome, revoke, write_crl
from fleet.monitor import Flagged, Monitor, MonitorConfig, verify_batch
from fleet.store import MonitorStore
from packager.cli import main as edgeward
from tests.conftest import Board
from tests.fixtures.fleet import MOSQUITTO, Fleet, fleet_fixture, monitor_fixture, wait_until  # noqa: F401

FAST = TelemetryConfig(heartbeat_s=0.5, poll_s=0.05, backoff=(1, 2))


def telemetry(board: Board, fleet: Fleet, **kw: object) -> tuple[TelemetryService, EventStore]:
    events = EventStore(board.data_dir / "events.db")
    svc = TelemetryService(
        board.data_dir, board.keys, events, fleet.enrol(board.enrolment), config=FAST, **kw
    )  # type: ignore[arg-type]
    return svc, events


def publish_as(fleet: Fleet, cn: str, messages: list[tuple[str, bytes]]) -> list[bool]:
    """Publish raw messages with ``cn``'s certificate; return each PUBACK verdict (True: ok)."""
    acks: list[bool] = []
    link = Link(fleet.broker(cn), Session(f"{cn}-raw"), on_ack=lambda _m, ok: acks.append(ok))
    link.start()
    link.require_connected(10)
    for name, payload in messages:
        link.publish(name, payload)
    wait_until(lambda: len(acks) == len(messages), 10, "every PUBACK")
    link.stop()
    return acks


def stored(store: MonitorStore, device_id: str, kind: str) -> list[dict[str, object]]:
    return store.reports(device_id, kind, limit=10_000)


def test_tls_refuses_clients_without_a_fleet_certificate(fleet: Fleet, tmp_path: Path) -> None:
    # No client certificate: the TLS handshake (or the first read) fails.
    ctx = ssl.create_default_context(cafile=str(fleet.home.ca_cert))
    with (
        socket.create_connection(("127.0.0.1", fleet.port), 5) as raw,
        pytest.raises((ssl.SSLError, ConnectionError, OSError)),
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"\x10\x00")
        if not tls.recv(1):
            raise ConnectionError("closed")
    # A certificate from another CA is refused too.
    rogue = FleetHome(tmp_path / "rogue")
    rogue.init_ca(unencrypted=True)
    rogue.enrol_operator("ops")
    certs = rogue.certs
    broker = Broker(
        "127.0.0.1", fleet.port, fleet.home.ca_cert, certs / "ops.crt", certs / "ops.key"
    )
    link = Link(broker, Session("rogue"))
    link.start()
    with pytest.raises(EnvironmentFault, match="unreachable"):
        link.require_connected(2)
    link.stop()


def mqtt_connect(fleet: Fleet, cn: str, client_id: str) -> ssl.SSLSocket:
    """A bare MQTT 3.1.1 CONNECT over TLS with ``cn``'s certificate; the socket once the broker
    sent CONNACK 0. A certificate the broker refuses raises ssl.SSLError (its alert, or EOF): under
    TLS 1.3 the client learns the broker's verdict on its certificate at the first read."""
    ctx = ssl.create_default_context(cafile=str(fleet.home.ca_cert))
    ctx.load_cert_chain(fleet.home.certs / f"{cn}.crt", fleet.home.certs / f"{cn}.key")
    raw = socket.create_connection(("127.0.0.1", fleet.port), 5)
    try:
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
        cid = client_id.encode()
        body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
        tls.sendall(bytes([0x10, len(body)]) + body)
        ack = tls.recv(4)
    except BaseException:
        raw.close()
        raise
    assert ack == b"\x20\x02\x00\x00", ack
    return tls


def refused(fleet: Fleet, cn: str) -> bool:
    try:
        mqtt_connect(fleet, cn, f"{cn}-probe").close()
    except (ssl.SSLError, ConnectionResetError):
        return True
    return False


def test_a_revoked_board_is_refused_at_the_tls_handshake(
    fleet: Fleet, make_board: Callable[..., Board]
) -> None:
    for board in (make_board("pi-a"), make_board("pi-b")):
        fleet.enrol(board.enrolment)
    mqtt_connect(fleet, "pi-a", "a-1").close()
    mqtt_connect(fleet, "pi-b", "b-1").close()
    acks: list[bool] = []
    held = Link(fleet.broker("pi-a"), Session("pi-a-held"), on_ack=lambda _m, ok: acks.append(ok))
    held.start()
    held.require_connected(10)

    revoke(fleet.home, "pi-a", "stolen", datetime.now(UTC))
    assert install_crl(fleet.home, fleet.files.conf.parent) == fleet.files.crl
    assert not refused(fleet, "pi-a")  # the broker has not read the new CRL yet

    # SIGHUP: mosquitto 2.0.11 re-reads the CRL; new handshakes with the revoked certificate fail,
    # the other board is unaffected...
    assert fleet.proc is not None
    fleet.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: refused(fleet, "pi-a"), 5, "the reloaded CRL to refuse pi-a")
    mqtt_connect(fleet, "pi-b", "b-2").close()
    # ...but the connection the revoked board already had stays open, and it still publishes.
    assert held.wait_connected(0)
    held.publish(topic("pi-a", "status"), b"still here")
    wait_until(lambda: acks == [True], 5, "the PUBACK on the connection opened before the HUP")

    # A restart drops that connection, and the board cannot come back; the other board can.
    fleet.stop(signal.SIGTERM)
    fleet.start()
    assert refused(fleet, "pi-a")
    assert not held.wait_connected(2.5)  # paho retried (back-off 1 s) and was refused
    held.stop()
    mqtt_connect(fleet, "pi-b", "b-3").close()


def test_an_expired_crl_locks_every_board_out_until_a_fresh_one_is_loaded(
    fleet: Fleet, make_board: Callable[..., Board]
) -> None:
    fleet.enrol(make_board("pi-b").enrolment)
    broker_dir = fleet.files.conf.parent
    assert fleet.proc is not None
    write_crl(fleet.home, datetime.now(UTC) - timedelta(days=CRL_DAYS + 1))  # next update passed
    install_crl(fleet.home, broker_dir)
    fleet.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: refused(fleet, "pi-b"), 5, "the expired CRL to refuse an unrevoked board")
    write_crl(fleet.home, datetime.now(UTC))
    install_crl(fleet.home, broker_dir)
    fleet.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: not refused(fleet, "pi-b"), 5, "a fresh CRL to let the board in again")


def test_a_crl_unreadable_at_a_hup_readmits_revoked_boards_but_stops_a_restart(
    fleet: Fleet, make_board: Callable[..., Board]
) -> None:
    """mosquitto 2.0.11, measured: a CRL it cannot read at SIGHUP (a half-copied file) is only
    logged, and the listener then checks no CRL at all; at start the same file stops it."""
    fleet.enrol(make_board("pi-a").enrolment)
    revoke(fleet.home, "pi-a", "stolen", datetime.now(UTC))
    install_crl(fleet.home, fleet.files.conf.parent)
    fleet.stop(signal.SIGTERM)
    fleet.start()
    assert refused(fleet, "pi-a")
    assert fleet.proc is not None
    fleet.files.crl.write_bytes(fleet.home.crl.read_bytes()[:200])  # a copy cut short
    fleet.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: not refused(fleet, "pi-a"), 5, "the broker to drop its CRL")
    assert "Unable to load certificate revocation file" in fleet.log.read_text()
    fleet.stop(signal.SIGTERM)
    assert MOSQUITTO is not None
    started = subprocess.run(
        [MOSQUITTO, "-c", str(fleet.files.conf)], capture_output=True, timeout=10, check=False
    )
    assert started.returncode != 0 and b"Check crlfile" in started.stderr
    install_crl(fleet.home, fleet.files.conf.parent)  # written whole (atomically): fine again
    fleet.start()
    assert refused(fleet, "pi-a")


def test_board_cannot_publish_to_another_boards_topic(
    fleet: Fleet,
    monitor: Monitor,
    make_board: Callable[..., Board],
) -> None:
    a, b = make_board("pi-a"), make_board("pi-b")
    fleet.enrol(a.enrolment)
    fleet.enrol(b.enrolment)
    signer = b.agent().store.unlock(b.keys).signer()
    genuine_b = encode_report(
        Report("pi-b", 1, "status", datetime.now(UTC), {"state": "online"}), signer
    )
    acks = publish_as(
        fleet,
        "pi-a",
        [
            (topic("pi-b", "status"), genuine_b),  # even a genuine report: wrong sender
            (command_topic("pi-a"), b"x"),  # a board never writes commands
            (topic("pi-a", "status"), b"x"),  # its own topic: allowed (flagged as malformed)
        ],
    )
    assert acks == [False, False, True]  # MQTT 5 reason code: not authorised
    wait_until(lambda: monitor.processed >= 1, 5, "the monitor to see the allowed message")
    assert stored(monitor.store, "pi-b", "status") == []


def test_reports_are_verified_and_stored_and_cli_shows_them(
    fleet: Fleet,
    monitor: Monitor,
    make_board: Callable[..., Board],
    capsys: pytest.CaptureFixture[str],
) -> None:
    board = make_board("pi-001")
    svc, events = telemetry(
        board,
        fleet,
        status_provider=lambda: {
            "models": [{"model_id": "digits", "version": 3}],
            "counters": {"queries": 7, "throttled": 1},
        },
    )
    svc.start()
    events.record(
        "ood", datetime.now(UTC), severity="warning", score=0.93, evidence={"distance": 4.2}
    )
    wait_until(
        lambda: len(stored(monitor.store, "pi-001", "events")) == 1, 10, "the event at the monitor"
    )
    wait_until(lambda: stored(monitor.store, "pi-001", "telemetry"), 10, "telemetry")
    svc.stop()
    events.close()
    [ev] = stored(monitor.store, "pi-001", "events")
    assert ev["data"]["event"]["kind"] == "ood" and ev["data"]["event"]["evidence"] == {
        "distance": 4.2
    }

    assert edgeward(["fleet", "status", "--fleet-dir", str(fleet.home.path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    [dev] = doc["devices"]
    assert dev["device_id"] == "pi-001" and dev["models"] == "digits v3"
    assert dev["counters"]["counters"] == {"queries": 7, "throttled": 1}
    assert dev["liveness"] == "stopping"  # the board said goodbye
    assert (
        edgeward(
            ["fleet", "events", "--fleet-dir", str(fleet.home.path), "--since", "1h", "--json"]
        )
        == 0
    )
    [row] = json.loads(capsys.readouterr().out)
    assert (row["source"], row["kind"], row["device_id"]) == ("board", "ood", "pi-001")
    assert edgeward(["fleet", "events", "--fleet-dir", str(fleet.home.path)]) == 0
    assert "ood" in capsys.readouterr().out


def test_board_reports_form_a_hash_chain_across_restarts(
    fleet: Fleet, make_board: Callable[..., Board]
) -> None:
    board = make_board("pi-chain")
    svc, events = telemetry(board, fleet)
    svc.heartbeat()
    events.record("ood", datetime.now(UTC), severity="warning", score=0.9, evidence={})
    svc._forward_events()
    first = svc.outbox.pending(0, 100)
    svc.outbox.close()
    events.close()
    svc, events = telemetry(board, fleet)  # a restarted agent continues the chain
    svc.heartbeat()
    pending = first + svc.outbox.pending(first[-1].seq, 100)
    svc.outbox.close()
    events.close()
    payloads = [p.payload for p in pending]
    assert len(payloads) == 5  # status, telemetry, event; status, telemetry
    assert [frame(p).prev for p in payloads] == [NO_PREV] + [payload_digest(p) for p in payloads[:-1]]
    rows = verify_batch(fleet.home.device_keys(), [(p.topic, p.payload) for p in pending])
    assert not [r for r, _ in rows if isinstance(r, Flagged)]


def test_forged_replayed_and_unknown_reports_are_flagged_not_stored(
    fleet: Fleet,
    make_board: Callable[..., Board],
    tmp_path: Path,
) -> None:
    board = make_board("pi-001")
    ghost = make_board("pi-ghost")
    fleet.enrol(ghost.enrolment)
    (fleet.home.devices / "pi-ghost.json").unlink()  # it has a cert but is no longer enrolled
    captured: list[bytes] = []
    spy = Link(
        fleet.operator,
        Session("spy"),
        on_message=lambda t, p, _m: captured.append(p) if t.endswith("/events") else None,
    )
    spy.subscribe("edgeward/v1/+/events")
    spy.start()
    spy.require_connected(10)

    store = MonitorStore(tmp_path / "monitor.db")
    mon = Monitor(fleet.home, store, fleet.operator, "mon-flag", MonitorConfig(redelivery_window=8))
    svc, events = telemetry(board, fleet)
    mon.start()
    mon.link.require_connected(10)
    svc.start()
    for i in range(30):
        events.record("probing", datetime.now(UTC), evidence={"i": i})
    wait_until(lambda: len(stored(store, "pi-001", "events")) == 30, 15, "30 events")
    svc.stop()
    events.close()

    keys = board.agent().store.unlock(board.keys)
    wrong = encode_report(
        Report("pi-001", 10_000, "events", datetime.now(UTC), {"event": {"kind": "x"}}),
        Ed25519PrivateKey.generate(),
    )
    genuine = encode_report(
        Report("pi-001", 10_001, "events", datetime.now(UTC), {"event": {"kind": "y"}}),
        keys.signer(),
    )
    acks = publish_as(
        fleet,
        "pi-001",
        [
            (topic("pi-001", "events"), captured[0]),  # replay of an old genuine report
            (topic("pi-001", "events"), wrong),  # forged: not the board's key
            (topic("pi-001", "events"), genuine.replace(b'"y"', b'"z"')),  # tampered after signing
            (topic("pi-001", "status"), b"not a report"),  # malformed
        ],
    )
    ghost_sig = ghost.agent().store.unlock(ghost.keys).signer()
    ghost_report = Report("pi-ghost", 1, "status", datetime.now(UTC), {})
    acks += publish_as(
        fleet, "pi-ghost", [(topic("pi-ghost", "status"), encode_report(ghost_report, ghost_sig))]
    )
    assert all(acks)  # the broker lets them through: the monitor is what catches them
    wait_until(lambda: len(store.events()) == 30 + 5, 10, "five flagged reports")
    mon.stop()
    spy.stop()

    flagged = [e for e in store.events() if e["source"] == "monitor"]
    kinds = sorted(e["kind"] for e in flagged)
    assert kinds == ["forged", "forged", "forged", "replayed", "unknown-device"], flagged
    assert len(stored(store, "pi-001", "events")) == 30  # nothing flagged was stored as genuine
    assert max(r["seq"] for r in store.reports("pi-001")) < 10_000
    assert store.reports("pi-ghost") == []
    store.close()


def test_monitor_whose_helper_cannot_open_the_store_refuses_to_start(
    fleet: Fleet, tmp_path: Path
) -> None:
    (tmp_path / "gone").mkdir()
    store = MonitorStore(tmp_path / "gone" / "monitor.db")
    shutil.rmtree(tmp_path / "gone")  # the helper process opens its own connection: it fails
    with pytest.raises(EnvironmentFault, match="cannot open the monitor store"):
        Monitor(fleet.home, store, fleet.operator, "mon-nostore")
    store.close()


def test_broker_unreachable_is_an_environment_fault(
    fleet: Fleet, make_board: Callable[..., Board], capsys: pytest.CaptureFixture[str]
) -> None:
    from device_agent.cli import main as agent

    board = make_board("pi-001")
    fleet.enrol(board.enrolment)
    fleet.stop()
    c = fleet.home.certs
    argv = [
        "telemetry",
        "--data-dir",
        str(board.data_dir),
        "--broker",
        f"127.0.0.1:{fleet.port}",
        "--ca",
        str(fleet.home.ca_cert),
        "--cert",
        str(c / "pi-001.crt"),
        "--key",
        str(c / "pi-001.key"),
        "--connect-timeout",
        "1.5",
    ]
    import os

    os.environ["EDGEWARD_DEVICE_PASSPHRASE"] = board.keys.passphrase.decode()  # type: ignore[union-attr]
    try:
        assert agent(argv) == 4
    finally:
        del os.environ["EDGEWARD_DEVICE_PASSPHRASE"]
    assert "unreachable" in capsys.readouterr().err


def test_monitor_exits_4_when_the_broker_is_unreachable(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet.stop()
    argv = ["fleet", "monitor", "--fleet-dir", str(fleet.home.path), "--operator", "ops"]
    argv += ["--broker", f"127.0.0.1:{fleet.port}", "--connect-timeout", "1.5"]
    assert edgeward(argv) == 4
    assert "unreachable" in capsys.readouterr().err
