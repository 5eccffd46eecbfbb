"""Fleet side of signed commands, for real: the ledger, the retained per-board queue on a real
mosquitto, technician files, results from real provisioned boards (``edgeward-agent command``),
wipe attestations, and the monitor recording results and flagging forged ones."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent import Agent
from device_agent.bundle.enrolment import load_enrolment
from device_agent.bundle.keyfiles import load_public_key_file
from device_agent.cli import main as agent_cli
from device_agent.commands.format import (
    TIME_TOPIC,
    Beacon,
    Command,
    Result,
    decode_queue,
    encode_result,
    results_topic,
    verify_signed,
)
from device_agent.store.datadir import utcnow
from device_agent.telemetry.mqtt import Link, Session
from device_agent.telemetry.report import command_topic
from fleet.ca import FleetHome
from fleet.commands import CommandLedger, parse_age
from fleet.monitor import Monitor
from packager.cli import main as edgeward
from packager.keys import generate, load_private_key
from packager.signers import FileSigner
from tests.conftest import PASSPHRASE, Board
from tests.fixtures.fleet import OPERATOR, Fleet, fleet_fixture, monitor_fixture, wait_until  # noqa: F401
from tests.test_fleet_broker import publish_as


@pytest.fixture
def operator_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("EDGEWARD_PASSPHRASE", raising=False)
    d = tmp_path / "operator"
    generate("operator", d, unencrypted=True)
    return d


@pytest.fixture
def recovery_key(tmp_path: Path) -> Path:
    d = tmp_path / "recovery"
    generate("operator", d, unencrypted=True)  # a recovery key is an Ed25519 key like an operator's, kept offline
    return d


@pytest.fixture
def board_with_operator(
    tmp_path: Path, publisher: Path, keys: Any, operator_key: Path, recovery_key: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[[str], Board]:
    """Provision a board that trusts the operator (and recovery) key; its passphrase in the env
    for the in-process 'edgeward-agent' calls."""
    monkeypatch.setenv("EDGEWARD_DEVICE_PASSPHRASE", PASSPHRASE.decode())

    def make(device_id: str = "pi-001") -> Board:
        d = tmp_path / f"board-{device_id}"
        enrolment = tmp_path / f"{device_id}.json"
        enrolment.write_bytes(Agent.provision(
            d, device_id, [load_public_key_file(publisher / "publisher.pub")],
            [load_public_key_file(operator_key / "operator.pub")], keys,
            recovery=[load_public_key_file(recovery_key / "operator.pub")],
        ))
        return Board(d, enrolment, device_id, keys)

    return make


def fleet_cli(home: FleetHome, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    """Run 'edgeward fleet ... --json' in-process; returns the exit code and the parsed output."""
    code = edgeward(["fleet", *argv, "--fleet-dir", str(home.path), "--json"])
    out = capsys.readouterr().out
    return code, (json.loads(out) if out.strip() else None)


def broker_args(fleet: Fleet) -> list[str]:
    return ["--broker", f"127.0.0.1:{fleet.port}", "--operator", OPERATOR, "--connect-timeout", "5"]


def on_board(board: Board, command_file: Path, result_file: Path) -> int:
    """The technician at the board: 'edgeward-agent command FILE --result RESULT'."""
    return agent_cli(["command", str(command_file), "--data-dir", str(board.data_dir), "--result", str(result_file)])


def retained(fleet: Fleet, cn: str, topic_filter: str, settle: float = 1.0) -> list[bytes]:
    """What a fresh subscriber with ``cn``'s certificate receives on ``topic_filter``."""
    got: list[bytes] = []
    lock = threading.Lock()

    def on_message(_t: str, p: bytes, _m: int) -> None:
        with lock:
            got.append(p)

    link = Link(fleet.broker(cn), Session(f"{cn}-probe"), on_message=on_message)
    link.subscribe(topic_filter)
    link.start()
    link.require_connected(10)
    wait_until(lambda: bool(got), 5, f"the retained message on {topic_filter}")
    time.sleep(settle)  # anything else retained would have arrived with it
    link.stop()
    return got


def ledger_rows(home: FleetHome, device: str | None = None) -> list[dict[str, Any]]:
    ledger = CommandLedger(home)
    try:
        return ledger.commands(device)
    finally:
        ledger.close()


# --- the ledger -------------------------------------------------------------------------------------


def test_issuing_assigns_increasing_sequence_numbers_per_device(
    tmp_path: Path, board_with_operator: Callable[[str], Board], operator_key: Path
) -> None:
    home = FleetHome(tmp_path / "fleet-home")
    home.init_ca(unencrypted=True)
    for d in ("pi-a", "pi-b"):
        home.enrol_device(board_with_operator(d).enrolment.read_bytes(), d)
    signer = FileSigner(load_private_key(operator_key / "operator.key"))
    ledger = CommandLedger(home)
    week = parse_age("7d")
    assert [c.seq for c in ledger.plan("retire", {"model_id": "m"}, ["pi-a", "pi-b"], week)] == [1, 1]
    first = ledger.issue("retire", {"model_id": "m"}, ["pi-a", "pi-b"], signer, week)
    second = ledger.issue("rollback", {"model_id": "m", "to_version": 2}, ["pi-a"], signer, week)
    third = ledger.issue("retire", {"model_id": "n"}, ["pi-a", "pi-b"], signer, week)
    assert [(i.device_id, i.command.seq) for i in first + second + third] == [
        ("pi-a", 1), ("pi-b", 1), ("pi-a", 2), ("pi-a", 3), ("pi-b", 2)
    ]
    assert [len(ledger.pending(d)) for d in ("pi-a", "pi-b")] == [3, 2]
    # An unknown device refuses the whole issue: nothing is signed for the others either.
    with pytest.raises(Exception, match="not enrolled"):
        ledger.issue("retire", {"model_id": "m"}, ["pi-a", "pi-zz"], signer, week)
    assert [c.seq for c in ledger.plan("retire", {"model_id": "m"}, ["pi-a"], week)] == [4]
    ledger.close()


# --- delivery over the broker ---------------------------------------------------------------------


def test_the_retained_queue_holds_every_pending_command_for_an_offline_board(
    fleet: Fleet, board_with_operator: Callable[[str], Board], operator_key: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    board = board_with_operator("pi-001")
    fleet.enrol(board.enrolment)
    key = ["--operator-key", str(operator_key / "operator.key")]
    # Two commands while the board is offline: the second publish must not hide the first.
    code, doc = fleet_cli(fleet.home, capsys, "retire", "digits", "--device", "pi-001", *key, *broker_args(fleet))
    assert code == 0 and doc["topics"]["pi-001"]["pending"] == 1
    code, doc = fleet_cli(fleet.home, capsys, "rollback", "vad", "--to", "2", "--device", "pi-001", *key,
                          *broker_args(fleet))
    assert code == 0 and [c["seq"] for c in doc["commands"]] == [2]

    [message] = retained(fleet, "pi-001", command_topic("pi-001"))  # the board's own certificate
    operator = load_public_key_file(operator_key / "operator.pub")
    items = [verify_signed(raw, [operator]).item for raw in decode_queue(message)]
    commands = [i for i in items if isinstance(i, Command)]
    assert [(c.seq, c.kind, c.args.get("model_id")) for c in commands] == [
        (1, "retire", "digits"), (2, "rollback", "vad")
    ]
    assert sum(isinstance(i, Beacon) for i in items) == 1

    # A clean broker restart keeps the retained queue (persistence).
    fleet.stop(signal.SIGTERM)
    fleet.start()
    assert retained(fleet, "pi-001", command_topic("pi-001"), settle=0.2) == [message]

    # The time beacon: retained on the fleet's time topic, readable by every board.
    code, doc = fleet_cli(fleet.home, capsys, "time", *key, *broker_args(fleet))
    assert code == 0
    [beacon] = retained(fleet, "pi-001", TIME_TOPIC, settle=0.2)
    assert isinstance(verify_signed(beacon, [operator]).item, Beacon)
    # Boards may publish their results, never the time nor another board's results.
    other = board_with_operator("pi-002")
    fleet.enrol(other.enrolment)
    acks = publish_as(fleet, "pi-001", [(results_topic("pi-001"), b"x"), (TIME_TOPIC, b"x"),
                                        (results_topic("pi-002"), b"x")])
    assert acks == [True, False, False]


def test_an_unreachable_broker_exits_4_and_signs_nothing(
    fleet: Fleet, board_with_operator: Callable[[str], Board], operator_key: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fleet.enrol(board_with_operator("pi-001").enrolment)
    fleet.stop()
    code = edgeward(["fleet", "decommission", "pi-001", "--fleet-dir", str(fleet.home.path), "--operator-key",
                     str(operator_key / "operator.key"), *broker_args(fleet)[:-1], "1.5"])
    assert code == 4 and "unreachable" in capsys.readouterr().err
    assert ledger_rows(fleet.home) == []


def test_dry_run_signs_records_and_publishes_nothing(
    tmp_path: Path, board_with_operator: Callable[[str], Board], operator_key: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    home = FleetHome(tmp_path / "fleet-home")
    home.init_ca(unencrypted=True)
    for d in ("pi-a", "pi-b", "pi-c"):
        home.enrol_device(board_with_operator(d).enrolment.read_bytes(), d)
    (home.path / "groups").mkdir()
    (home.path / "groups" / "lab.txt").write_text("# the bench\npi-a\n\npi-c  # the spare\n")
    # No key, no broker: a dry run needs neither.
    code, doc = fleet_cli(home, capsys, "retire", "digits", "--group", "lab", "--dry-run")
    assert code == 0 and doc["dry_run"] is True
    assert [(c["device_id"], c["seq"], c["sha256"]) for c in doc["commands"]] == [("pi-a", 1, None), ("pi-c", 1, None)]
    assert ledger_rows(home) == []
    assert edgeward(["fleet", "decommission", "pi-a", "--fleet-dir", str(home.path), "--dry-run"]) == 0
    assert "nothing was signed" in capsys.readouterr().out
    assert ledger_rows(home) == []
    # Usage: neither --out nor --broker; an unknown group; the wrong key for rotating operators.
    key = ["--operator-key", str(operator_key / "operator.key")]
    assert edgeward(["fleet", "retire", "m", "--all", "--fleet-dir", str(home.path), *key]) == 2
    assert edgeward(["fleet", "retire", "m", "--group", "nope", "--fleet-dir", str(home.path), *key]) == 2
    pub = str(operator_key / "operator.pub")
    assert edgeward(["fleet", "rotate-key", "--role", "operator", "--new-pub", pub, "--all", "--fleet-dir",
                     str(home.path), *key, "--out", str(tmp_path / "q")]) == 2
    assert "--recovery-key" in capsys.readouterr().err
    assert ledger_rows(home) == []


# --- technician files, results, attestations --------------------------------------------------------


def test_a_queue_file_is_obeyed_by_the_board_and_its_result_imported(
    tmp_path: Path, board_with_operator: Callable[[str], Board], operator_key: Path, digits: Any,
    pack_for: Callable[..., Path], capsys: pytest.CaptureFixture[str],
) -> None:
    board = board_with_operator("pi-001")
    board.agent().install((pack_for(digits.onnx, [board]) / "pi-001.ewb").read_bytes())
    home = FleetHome(tmp_path / "fleet-home")
    home.init_ca(unencrypted=True)
    home.enrol_device(board.enrolment.read_bytes(), "pi-001")
    before = load_enrolment((home.devices / "pi-001.json").read_bytes())
    key = ["--operator-key", str(operator_key / "operator.key")]

    queue = tmp_path / "pi-001.commands"
    code, doc = fleet_cli(home, capsys, "retire", "digits", "--device", "pi-001", *key, "--out", str(queue))
    assert code == 0 and doc["files"]["pi-001"]["file"] == str(queue)
    operator = load_public_key_file(operator_key / "operator.pub")
    items = [verify_signed(raw, [operator]).item for raw in decode_queue(queue.read_bytes())]
    assert [(i.seq, i.kind) for i in items if isinstance(i, Command)] == [(1, "retire")]

    result = tmp_path / "result.bin"
    assert on_board(board, queue, result) == 0
    capsys.readouterr()
    code, doc = fleet_cli(home, capsys, "import-result", str(result))
    assert code == 0
    [rec] = doc["recorded"]
    assert (rec["seq"], rec["outcome"], rec["command_state"]) == (1, "applied", "applied")
    assert len(rec["effects"]["bundles_destroyed"]) == 1
    # The board rotated its encryption key: the fleet now packs for the new one.
    after = load_enrolment((home.devices / "pi-001.json").read_bytes())
    assert after.sign_public == before.sign_public and after.box_public != before.box_public
    assert after.box_public == board.agent().store.identity().box_public
    assert list((home.path / "devices-history").glob("pi-001-*.json"))
    [row] = ledger_rows(home, "pi-001")
    assert row["state"] == "applied" and row["result"]["outcome"] == "applied"
    # Importing it again changes nothing; the next queue no longer carries the command.
    assert fleet_cli(home, capsys, "import-result", str(result))[0] == 0
    code, doc = fleet_cli(home, capsys, "publish", "--device", "pi-001", *key, "--out", str(queue))
    assert code == 0 and doc["files"]["pi-001"]["pending"] == 0

    # Forgeries are refused with exit 1 and not recorded: a flipped byte, another key.
    data = result.read_bytes()
    tampered = tmp_path / "tampered.bin"
    tampered.write_bytes(data.replace(b'"applied"', b'"refused"'))
    assert edgeward(["fleet", "import-result", str(tampered), "--fleet-dir", str(home.path)]) == 1
    assert "REFUSED" in capsys.readouterr().out
    r = Result("pi-001", 1, "retire", row["sha256"], "refused", "forged", utcnow(), {})
    (tmp_path / "forged.bin").write_bytes(encode_result(r, Ed25519PrivateKey.generate()))
    assert edgeward(["fleet", "import-result", str(tmp_path / "forged.bin"), "--fleet-dir", str(home.path)]) == 1
    (tmp_path / "junk.bin").write_bytes(b"not a result")
    assert edgeward(["fleet", "import-result", str(tmp_path / "junk.bin"), "--fleet-dir", str(home.path)]) == 3
    assert ledger_rows(home, "pi-001")[0]["state"] == "applied"
    # A result's detail is whatever the board signed: shown escaped, it cannot rewrite the terminal.
    capsys.readouterr()
    detail = "ok\x1b[1A\x1b[2K\rpi-001 #1 retire: applied\nforged"
    r = Result("pi-001", 1, "retire", row["sha256"], "applied", detail, utcnow(), {})
    (tmp_path / "hostile.bin").write_bytes(encode_result(r, board.agent().store.unlock(board.keys).signer()))
    edgeward(["fleet", "import-result", str(tmp_path / "hostile.bin"), "--fleet-dir", str(home.path)])
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out
    assert "ok\\x1b[1A\\x1b[2K\\x0dpi-001 #1 retire: applied\\x0aforged" in out, out


def test_cancel_and_decommission_from_files_then_status_shows_the_wiped_board(
    tmp_path: Path, board_with_operator: Callable[[str], Board], operator_key: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fleet.store import MonitorStore

    board = board_with_operator("pi-001")
    home = FleetHome(tmp_path / "fleet-home")
    home.init_ca(unencrypted=True)
    home.enrol_device(board.enrolment.read_bytes(), "pi-001")
    key = ["--operator-key", str(operator_key / "operator.key")]
    queue = tmp_path / "q.commands"
    assert fleet_cli(home, capsys, "rollback", "digits", "--to", "1", "--device", "pi-001", *key, "--out",
                     str(queue))[0] == 0
    code, doc = fleet_cli(home, capsys, "cancel", "1", "--device", "pi-001", *key, "--out", str(queue))
    assert code == 0 and doc["files"]["pi-001"]["pending"] == 1  # the cancel; #1 no longer goes out
    assert edgeward(["fleet", "cancel", "1", "--device", "pi-001", "--fleet-dir", str(home.path), *key,
                     "--out", str(queue)]) == 2  # already being cancelled
    assert edgeward(["fleet", "cancel", "7", "--device", "pi-001", "--fleet-dir", str(home.path), *key,
                     "--out", str(queue)]) == 2
    assert fleet_cli(home, capsys, "decommission", "pi-001", *key, "--out", str(queue))[0] == 0
    from fleet.ca import revoked

    assert "pi-001" in revoked(home)  # the fleet CRL revokes the board's certificate with the order
    # Nothing may follow a pending decommission (it would never be obeyed).
    assert edgeward(["fleet", "retire", "m", "--device", "pi-001", "--fleet-dir", str(home.path), *key,
                     "--out", str(queue)]) == 2
    assert "decommission #3 is pending" in capsys.readouterr().err

    result = tmp_path / "results.bin"
    assert on_board(board, queue, result) == 0
    capsys.readouterr()
    code, doc = fleet_cli(home, capsys, "import-result", str(result))
    assert code == 0
    # The cancelled command left the queue with the cancel: the board never saw it, skipped its number.
    assert [(r["seq"], r["outcome"]) for r in doc["recorded"]] == [(2, "applied"), (3, "applied")]
    code, rows = fleet_cli(home, capsys, "commands", "pi-001")
    assert [(r["seq"], r["kind"], r["state"]) for r in rows] == [
        (1, "rollback", "cancelled"), (2, "cancel", "applied"), (3, "decommission", "applied")
    ]
    assert rows[0]["detail"] == "cancelled by #2"
    assert rows[2]["result"]["effects"]["wiped"]["method"].startswith("crypto-shred")

    MonitorStore(home.monitor_db).close()  # status reads the monitor store too
    code, doc = fleet_cli(home, capsys, "status")
    [dev] = doc["devices"]
    assert dev["liveness"] == "wiped" and dev["wiped"]["command_seq"] == 3 and dev["pending_commands"] == 0
    assert edgeward(["fleet", "status", "--fleet-dir", str(home.path)]) == 0
    assert "pi-001: wiped by command #3" in capsys.readouterr().out
    # A wiped board obeys nothing: the fleet refuses to sign for it, --all leaves it out.
    assert edgeward(["fleet", "retire", "m", "--device", "pi-001", "--fleet-dir", str(home.path), *key,
                     "--out", str(queue)]) == 2
    assert edgeward(["fleet", "retire", "m", "--all", "--fleet-dir", str(home.path), *key, "--out", str(queue)]) == 2
    capsys.readouterr()
    # The attestation the board kept verifies and matches the ledger's command.
    code, doc = fleet_cli(home, capsys, "verify-attestation", str(board.data_dir / "wipe-attestation.json"))
    assert code == 0 and doc["ledger"] == "matches" and doc["by"]["command_seq"] == 3


def test_verify_attestation_of_a_board_wiped_at_the_bench(
    tmp_path: Path, board_with_operator: Callable[[str], Board], capsys: pytest.CaptureFixture[str],
) -> None:
    board, other = board_with_operator("pi-001"), board_with_operator("pi-002")
    home = FleetHome(tmp_path / "fleet-home")
    home.init_ca(unencrypted=True)
    home.enrol_device(board.enrolment.read_bytes(), "pi-001")
    assert agent_cli(["wipe", "--data-dir", str(board.data_dir), "--yes"]) == 0
    capsys.readouterr()
    attestation = board.data_dir / "wipe-attestation.json"

    code, doc = fleet_cli(home, capsys, "verify-attestation", str(attestation))
    assert code == 0 and doc["verified"] and doc["by"] == {"local": True} and doc["completed"]
    assert edgeward(["fleet", "verify-attestation", str(attestation), "--fleet-dir", str(home.path)]) == 0
    assert "VERIFIED" in capsys.readouterr().out
    code, doc = fleet_cli(home, capsys, "verify-attestation", str(attestation), "--device-enrolment",
                          str(board.enrolment), "--record")
    assert code == 0 and doc["recorded"]
    ledger = CommandLedger(home)
    assert ledger.wiped_device("pi-001") is not None
    ledger.close()

    doc = json.loads(attestation.read_text())
    doc["body"]["bundles_destroyed"] = ["not-what-was-destroyed"]
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(doc))
    assert edgeward(["fleet", "verify-attestation", str(tampered), "--fleet-dir", str(home.path)]) == 1
    assert "does not verify" in capsys.readouterr().err
    # The genuine attestation checked against another board's enrolment: refused.
    assert edgeward(["fleet", "verify-attestation", str(attestation), "--fleet-dir", str(home.path),
                     "--device-enrolment", str(other.enrolment)]) == 1
    (tmp_path / "junk.json").write_text("{")
    assert edgeward(["fleet", "verify-attestation", str(tmp_path / "junk.json"), "--fleet-dir", str(home.path)]) == 3
    # Its unsigned completion time is whatever the file says: shown escaped, it cannot rewrite the
    # lines above it (nor can a signed field: each line is escaped).
    capsys.readouterr()
    doc = json.loads(attestation.read_text())
    doc["completed"] = "2026-01-01T00:00:00Z\x1b[8A\x1b[2K\rVERIFIED: pi-009\n"
    rewritten = tmp_path / "rewritten.json"
    rewritten.write_text(json.dumps(doc))
    assert edgeward(["fleet", "verify-attestation", str(rewritten), "--fleet-dir", str(home.path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\\x1b[8A\\x1b[2K\\x0dVERIFIED: pi-009\\x0a" in out, out


def test_rotating_operator_keys_is_signed_by_the_recovery_key(
    tmp_path: Path, board_with_operator: Callable[[str], Board], operator_key: Path, recovery_key: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    board = board_with_operator("pi-001")
    home = FleetHome(tmp_path / "fleet-home")
    home.init_ca(unencrypted=True)
    home.enrol_device(board.enrolment.read_bytes(), "pi-001")
    new = tmp_path / "new-operator"
    generate("operator", new, unencrypted=True)
    queue = tmp_path / "q.commands"
    code, doc = fleet_cli(home, capsys, "rotate-key", "--role", "operator", "--new-pub", str(new / "operator.pub"),
                          "--device", "pi-001", "--recovery-key", str(recovery_key / "operator.key"), "--out",
                          str(queue))
    assert code == 0
    recovery = load_public_key_file(recovery_key / "operator.pub")
    [cmd] = [verify_signed(raw, [recovery]) for raw in decode_queue(queue.read_bytes())
             if isinstance(verify_signed(raw, [recovery]).item, Command)]
    assert cmd.signer == recovery
    assert on_board(board, queue, tmp_path / "r.bin") == 0
    capsys.readouterr()
    assert fleet_cli(home, capsys, "import-result", str(tmp_path / "r.bin"))[0] == 0
    assert ledger_rows(home)[0]["state"] == "applied"


# --- the monitor ---------------------------------------------------------------------------------


def test_the_monitor_records_published_results_and_flags_forged_ones(
    fleet: Fleet, monitor: Monitor, board_with_operator: Callable[[str], Board], operator_key: Path,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    board = board_with_operator("pi-001")
    fleet.enrol(board.enrolment)
    key = ["--operator-key", str(operator_key / "operator.key")]
    queue = tmp_path / "q.commands"
    assert fleet_cli(fleet.home, capsys, "retire", "digits", "--device", "pi-001", *key, "--out", str(queue))[0] == 0
    results: list[bytes] = []
    board.agent().apply_commands(queue.read_bytes(), on_result=lambda data, _r: results.append(data))
    [genuine] = results
    forged = genuine.replace(b'"applied"', b'"refused"')
    # Signed by the board itself, but for a command this fleet never issued.
    stray = encode_result(Result("pi-001", 99, "retire", "0" * 64, "applied", "", utcnow(), {}),
                          board.agent().store.unlock(board.keys).signer())
    acks = publish_as(fleet, "pi-001", [(results_topic("pi-001"), forged), (results_topic("pi-001"), b"junk"),
                                        (results_topic("pi-001"), stray), (results_topic("pi-001"), genuine)])
    assert all(acks)
    wait_until(lambda: ledger_rows(fleet.home)[0]["state"] == "applied", 10, "the result in the ledger")
    wait_until(lambda: len(monitor.store.events(device_id="pi-001")) == 3, 10, "three flagged results")
    flagged = monitor.store.events(device_id="pi-001")
    assert sorted(e["kind"] for e in flagged) == ["forged", "forged", "unexpected-result"]
    assert any("does not verify" in e["detail"] for e in flagged)
    assert monitor.error is None and monitor.results_processed == 4
    code, doc = fleet_cli(fleet.home, capsys, "status")
    assert code == 0 and doc["devices"][0]["pending_commands"] == 0
