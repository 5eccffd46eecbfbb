"""The fleet CA and registry: key protection, what the certificates say, enrolment rules."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_agent import Agent
from device_agent.crypto import ed25519_public_raw
from device_agent.errors import BadSignature, UsageError
from fleet.broker import write_broker_config
from fleet.ca import FleetHome
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
    home.init_ca()
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
    home.init_ca()
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
    files = write_broker_config(home, tmp_path / "b", bind="127.0.0.1", port=8883)
    conf = files.conf.read_text()
    for line in (
        "listener 8883 127.0.0.1",
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
        "persistence true",
        "max_queued_messages 1000000",
        "set_tcp_nodelay true",
    ):
        assert line in conf.splitlines()
    assert "pattern write edgeward/v1/%u/events" in files.acl.read_text()
    assert cn(files.cert) == "edgeward-broker" and home.ca_cert.exists()
