"""The fleet CA and registry: key protection, what the certificates say, enrolment rules."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_agent import Agent
from device_agent.crypto import ed25519_public_raw
from device_agent.errors import BadSignature, UsageError
from fleet.broker import write_broker_config
from fleet.ca import CRL_DAYS, FleetHome, revocations, revoke, revoked, write_crl
from packager.cli import main as edgeward
from tests.conftest import Board


def cn(path: Path) -> str:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_ca_key_is_private_and_passphrase_encrypted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEWARD_PASSPHRASE", "fleet secret")
    home = FleetHome(tmp_path / "f")
    home.init_ca()
    assert stat.S_IMODE(home.ca_key.stat().st_mode) == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in home.ca_key.read_bytes()
    with pytest.raises(UsageError, match="exists already"):
        home.init_ca()
    monkeypatch.setenv("EDGEWARD_PASSPHRASE", "wrong")
    with pytest.raises(UsageError, match="cannot unlock"):
        home.enrol_operator("alice")


def test_device_certificate_names_the_device_and_is_signed_by_the_ca(
    tmp_path: Path, make_board: Callable[..., Board]
) -> None:
    home = FleetHome(tmp_path / "f")
    home.init_ca(unencrypted=True)
    board = make_board("pi-007")
    e, issued = home.enrol_device(board.enrolment.read_bytes(), "pi-007.json")
    assert cn(issued.cert) == "pi-007" and stat.S_IMODE(issued.key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(issued.cert.read_bytes())
    ca = x509.load_pem_x509_certificate(home.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert home.device_keys() == {"pi-007": e.sign_public}


def test_enrolment_rules(tmp_path: Path, make_board: Callable[..., Board]) -> None:
    home = FleetHome(tmp_path / "f")
    home.init_ca(unencrypted=True)
    board = make_board("pi-001")
    data = board.enrolment.read_bytes()
    tampered = data.replace(b'"device_id": "pi-001"', b'"device_id": "pi-002"')
    with pytest.raises(BadSignature):
        home.enrol_device(tampered, "tampered")
    home.enrol_device(data, "pi-001.json")
    home.enrol_device(data, "pi-001.json")  # the same key again: idempotent
    publisher = ed25519_public_raw(Ed25519PrivateKey.generate())
    reprovisioned = Agent.provision(tmp_path / "again", "pi-001", [publisher], [], board.keys)
    with pytest.raises(UsageError, match="another identity key"):
        home.enrol_device(reprovisioned, "pi-001 re-provisioned")
    with pytest.raises(UsageError, match="device id"):
        home.enrol_operator("pi-001")


def test_broker_config_is_complete(tmp_path: Path) -> None:
    home = FleetHome(tmp_path / "f")  # no CA yet: broker-config creates it
    files = write_broker_config(home, tmp_path / "b", bind="127.0.0.1", port=8883, unencrypted_ca_key=True)
    conf = files.conf.read_text()
    for line in (
        "listener 8883 127.0.0.1",
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
        "persistence true",
        "max_queued_messages 1000000",
        "set_tcp_nodelay true",
        f"crlfile {files.crl}",
    ):
        assert line in conf.splitlines()
    # Nothing revoked yet: an empty but valid CRL, so mosquitto's crlfile always loads.
    crl = x509.load_pem_x509_crl(files.crl.read_bytes())
    ca = x509.load_pem_x509_certificate(home.ca_cert.read_bytes())
    assert len(crl) == 0 and crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert files.crl.read_bytes() == home.crl.read_bytes()
    assert "pattern write edgeward/v1/%u/events" in files.acl.read_text()
    assert cn(files.cert) == "edgeward-broker" and home.ca_cert.exists()


def crl_of(home: FleetHome) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(home.crl.read_bytes())


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def test_revoke_signs_a_crl_that_keeps_every_revocation_and_is_idempotent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_board: Callable[..., Board]
) -> None:
    monkeypatch.setenv("EDGEWARD_PASSPHRASE", "fleet secret")  # an encrypted CA key
    home = FleetHome(tmp_path / "f")
    home.init_ca()
    ca = x509.load_pem_x509_certificate(home.ca_cert.read_bytes())
    _, a = home.enrol_device(make_board("pi-a").enrolment.read_bytes(), "pi-a.json")
    board_b = make_board("pi-b")
    _, b = home.enrol_device(board_b.enrolment.read_bytes(), "pi-b.json")
    t1 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)

    assert revoke(home, "pi-a", "stolen", t1) == home.crl
    crl = crl_of(home)
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert crl.issuer == ca.subject
    assert crl.next_update_utc == t1 + timedelta(days=CRL_DAYS)
    assert crl.last_update_utc is not None and crl.last_update_utc < t1  # back-dated for skew
    entry = crl.get_revoked_certificate_by_serial_number(serial_of(a.cert))
    assert entry is not None and entry.revocation_date_utc == t1
    assert crl.get_revoked_certificate_by_serial_number(serial_of(b.cert)) is None
    assert revoked(home) == {"pi-a": t1}

    # Twice: nothing changes but a freshly signed CRL; the first revocation time stays.
    t2 = t1 + timedelta(days=1)
    revoke(home, "pi-a", "stolen again", t2)
    assert [(r.device_id, r.revoked_at, r.reason) for r in revocations(home)] == [
        ("pi-a", t1, "stolen")
    ]
    assert len(crl_of(home)) == 1 and revoked(home) == {"pi-a": t1}

    # Another board later: the CRL is re-issued with both, and numbered upwards.
    number = crl_of(home).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    revoke(home, "pi-b", "", t2)
    crl = crl_of(home)
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert {r.serial_number for r in crl} == {serial_of(a.cert), serial_of(b.cert)}
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > number
    assert revoked(home) == {"pi-a": t1, "pi-b": t2}

    # Re-enrolling a revoked board issues a new, valid certificate: it is back, but its old
    # serial stays in every CRL signed from now on.
    home.enrol_device(board_b.enrolment.read_bytes(), "pi-b.json")
    assert revoked(home) == {"pi-a": t1}
    write_crl(home, t2)
    assert len(crl_of(home)) == 2

    # A wrong passphrase changes nothing.
    before = (home.crl.read_bytes(), home.revocations.read_bytes())
    monkeypatch.setenv("EDGEWARD_PASSPHRASE", "wrong")
    with pytest.raises(UsageError, match="cannot unlock"):
        revoke(home, "pi-b", "", t2)
    assert (home.crl.read_bytes(), home.revocations.read_bytes()) == before


def test_revoke_refuses_unknown_devices_and_operators(
    tmp_path: Path, make_board: Callable[..., Board]
) -> None:
    home = FleetHome(tmp_path / "f")
    home.init_ca(unencrypted=True)
    home.enrol_operator("alice")
    now = datetime.now(UTC)
    for device, message in (
        ("pi-nope", "unknown device pi-nope"),
        ("../ca", "unknown device '../ca'"),
        ("alice", "alice is an operator"),
    ):
        with pytest.raises(UsageError, match=message) as e:
            revoke(home, device, "", now)
        assert e.value.exit_code == 2
    assert revocations(home) == [] and revoked(home) == {} and not home.crl.exists()


def test_fleet_revoke_command(
    tmp_path: Path, make_board: Callable[..., Board], capsys: pytest.CaptureFixture[str]
) -> None:
    home = FleetHome(tmp_path / "f")
    home.init_ca(unencrypted=True)
    home.enrol_device(make_board("pi-a").enrolment.read_bytes(), "pi-a.json")
    broker = write_broker_config(home, tmp_path / "broker", bind="127.0.0.1", port=8883)
    empty_crl = broker.crl.read_bytes()
    fleet_dir = ["--fleet-dir", str(home.path)]
    assert edgeward(["fleet", "revoke", "pi-nope", *fleet_dir]) == 2
    assert "unknown device pi-nope" in capsys.readouterr().err
    # A --broker-dir that broker-config did not write is refused before anything is revoked.
    assert edgeward(["fleet", "revoke", "pi-a", *fleet_dir, "--broker-dir", str(tmp_path)]) == 2
    assert "not a broker directory" in capsys.readouterr().err
    assert revocations(home) == []

    argv = ["fleet", "revoke", "pi-a", *fleet_dir, "--reason", "stolen", "--json"]
    assert edgeward([*argv, "--broker-dir", str(broker.conf.parent)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["device_id"] == "pi-a" and doc["reason"] == "stolen"
    assert doc["already_revoked"] is False and doc["crl_entries"] == 1
    assert doc["serial"] == format(serial_of(home.certs / "pi-a.crt"), "x")
    assert doc["broker_crl"] == str(broker.crl)
    assert broker.crl.read_bytes() == home.crl.read_bytes() != empty_crl

    assert edgeward(["fleet", "revoke", "pi-a", *fleet_dir]) == 0  # again: harmless, exit 0
    out = capsys.readouterr().out
    assert out.startswith("already revoked pi-a: certificate serial")
    assert "copy " in out and "restart mosquitto" in out  # no --broker-dir: what to do next
    assert len(crl_of(home)) == 1
