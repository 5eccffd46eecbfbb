"""The fleet's certificate authority and registry: who may talk to the broker, and with which key.

Layout of a fleet home directory (``--fleet-dir``, default ``$EDGEWARD_FLEET_DIR`` or
``./fleet-home``)::

    FLEET/                 0700
      ca.key               CA private key (P-256), 0600, encrypted when EDGEWARD_PASSPHRASE is set
      ca.crt               CA certificate: the broker and every client trust this
      devices/<id>.json    enrolments (verified, self-signed by the board's identity key)
      operators/<id>       marker: an operator identity
      certs/<cn>.crt|.key  client certificates issued (CN = device id or operator id)
      monitor.db           the monitor's store (fleet.store)

X.509 uses ECDSA P-256 for the widest TLS compatibility (mosquitto/OpenSSL, EMQX, HiveMQ);
report signatures stay Ed25519 (device_agent.crypto).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_agent.bundle.enrolment import Enrolment, load_enrolment
from device_agent.errors import UsageError
from device_agent.store.fsutil import atomic_write, make_private_dir
from device_agent.wire import ID_RE
from packager.keys import load_private_key_pem, private_key_pem

FLEET_DIR_ENV = "EDGEWARD_FLEET_DIR"
CA_DAYS = 3650
LEAF_DAYS = 825


def default_fleet_dir() -> Path:
    return Path(os.environ.get(FLEET_DIR_ENV, "fleet-home"))


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path
    common_name: str


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class FleetHome:
    """The CA and registry on disk. No network, no MQTT."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def ca_key(self) -> Path:
        return self.path / "ca.key"

    @property
    def ca_cert(self) -> Path:
        return self.path / "ca.crt"

    @property
    def devices(self) -> Path:
        return self.path / "devices"

    @property
    def operators(self) -> Path:
        return self.path / "operators"

    @property
    def certs(self) -> Path:
        return self.path / "certs"

    @property
    def monitor_db(self) -> Path:
        return self.path / "monitor.db"

    # --- CA --------------------------------------------------------------------------------------
    def init_ca(self, name: str = "EdgeWard fleet CA") -> Path:
        """Create the fleet CA; never overwrites one (every issued certificate depends on it)."""
        if self.ca_cert.exists():
            raise UsageError(f"{self.ca_cert} exists already; the fleet has a CA")
        for d in (self.path, self.devices, self.operators, self.certs):
            make_private_dir(d)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        atomic_write(self.ca_key, private_key_pem(key)[0], 0o600)
        atomic_write(self.ca_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return self.ca_cert

    def require_ca(self) -> None:
        if not self.ca_cert.exists():
            raise UsageError(f"no fleet CA in {self.path}; run 'edgeward fleet ca init' first")

    def _load_ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        self.require_ca()
        cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        key: ec.EllipticCurvePrivateKey = load_private_key_pem(self.ca_key, ec.EllipticCurvePrivateKey)
        return cert, key

    def _issue(self, cn: str, server_names: list[str] | None, out: Path) -> Issued:
        ca_cert, ca_key = self._load_ca()
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        usage = (
            ExtendedKeyUsageOID.SERVER_AUTH
            if server_names is not None
            else ExtendedKeyUsageOID.CLIENT_AUTH
        )
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if server_names is not None:
            alt: list[x509.GeneralName] = []
            for n in server_names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(n)))
                except ValueError:
                    alt.append(x509.DNSName(n))
            b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        make_private_dir(out)
        issued = Issued(out / f"{cn}.crt", out / f"{cn}.key", cn)
        # Client keys are handed to a board or an operator's tool: unencrypted PEM, 0600.
        atomic_write(issued.key, private_key_pem(key, encrypt=False)[0], 0o600)
        atomic_write(issued.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return issued

    # --- identities ----------------------------------------------------------------------------
    def enrol_device(self, enrolment_bytes: bytes, source: str) -> tuple[Enrolment, Issued]:
        """Verify a board's enrolment, record its identity key, issue its client certificate."""
        e = load_enrolment(enrolment_bytes, source)
        if (self.operators / e.device_id).exists():
            raise UsageError(
                f"{e.device_id} is an operator id; device and operator ids must differ"
            )
        self.require_ca()
        path = self.devices / f"{e.device_id}.json"
        if (
            path.exists()
            and load_enrolment(path.read_bytes(), str(path)).sign_public != e.sign_public
        ):
            raise UsageError(
                f"{e.device_id} is enrolled with another identity key; remove {path} to re-enrol it"
            )
        atomic_write(path, enrolment_bytes, 0o644)
        return e, self._issue(e.device_id, None, self.certs)

    def enrol_operator(self, operator_id: str) -> Issued:
        """Issue an operator's client certificate (the broker ACL lets operators read all)."""
        if not ID_RE.match(operator_id):
            raise UsageError("operator id must be 1-64 letters, digits, '.', '_' or '-'")
        if (self.devices / f"{operator_id}.json").exists():
            raise UsageError(f"{operator_id} is a device id; device and operator ids must differ")
        self.require_ca()
        atomic_write(self.operators / operator_id, b"", 0o644)
        return self._issue(operator_id, None, self.certs)

    def issue_server(self, names: list[str], out: Path) -> Issued:
        return self._issue("edgeward-broker", names, out)

    def device_keys(self) -> dict[str, bytes]:
        """Enrolled device id -> Ed25519 identity public key (re-verified from the enrolments)."""
        keys = {}
        for p in sorted(self.devices.glob("*.json")) if self.devices.is_dir() else []:
            e = load_enrolment(p.read_bytes(), str(p))
            keys[e.device_id] = e.sign_public
        return keys

    def operator_ids(self) -> list[str]:
        return sorted(p.name for p in self.operators.iterdir()) if self.operators.is_dir() else []
