"""The fleet's certificate authority and registry: who may talk to the broker, and with which key.

Layout of a fleet home directory (``--fleet-dir``, default ``$EDGEWARD_FLEET_DIR`` or
``./fleet-home``)::

    FLEET/                 0700
      ca.key               CA private key (P-256), 0600, encrypted under EDGEWARD_PASSPHRASE (or
                           in the clear only with --insecure-unencrypted-key)
      ca.crt               CA certificate: the broker and every client trust this
      devices/<id>.json    enrolments (verified, self-signed by the board's identity key)
      operators/<id>       marker: an operator identity
      certs/<cn>.crt|.key  client certificates issued (CN = device id or operator id)
      revoked.json         every revoked client certificate: device id, serial, time, reason
      crl.pem              the CRL signed by ca.key, listing every serial in revoked.json
      .revoke.lock         serialises writers of revoked.json and crl.pem
      monitor.db           the monitor's store (fleet.store)

X.509 uses ECDSA P-256 for the widest TLS compatibility (mosquitto/OpenSSL, EMQX, HiveMQ);
report signatures stay Ed25519 (device_agent.crypto).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_agent.bundle.enrolment import Enrolment, load_enrolment
from device_agent.errors import FormatError, UsageError
from device_agent.store.fsutil import atomic_write, make_private_dir, read_bounded
from device_agent.wire import ID_RE, format_time, loads_json, obj_fields, parse_time, str_field
from packager.keys import kept_key_passphrase, load_private_key_pem, private_key_pem

FLEET_DIR_ENV = "EDGEWARD_FLEET_DIR"
CA_DAYS = 3650
LEAF_DAYS = 825
# A CRL past its next update makes OpenSSL (mosquitto) refuse *every* client certificate, so it
# is signed a year ahead; each 'fleet revoke' and 'fleet broker-config' signs a fresh one.
CRL_DAYS = 365
# Issued certificates and CRLs start this far in the past, so a broker whose clock is a little
# behind the CA's does not find them "not yet valid".
BACKDATE = dt.timedelta(minutes=5)
REVOKED_FORMAT = 1
MAX_REVOKED_FILE = 16 * 1024 * 1024
MAX_REASON = 200


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

    @property
    def revocations(self) -> Path:
        return self.path / "revoked.json"

    @property
    def crl(self) -> Path:
        return self.path / "crl.pem"

    # --- CA --------------------------------------------------------------------------------------
    def init_ca(self, name: str = "EdgeWard fleet CA", *, unencrypted: bool = False) -> Path:
        """Create the fleet CA; never overwrites one (every issued certificate depends on it). Its
        key follows the host's one passphrase rule (:func:`packager.keys.kept_key_passphrase`)."""
        if self.ca_cert.exists():
            raise UsageError(f"{self.ca_cert} exists already; the fleet has a CA")
        passphrase = kept_key_passphrase(self.ca_key, unencrypted=unencrypted)
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
            .not_valid_before(now - BACKDATE)
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
        atomic_write(self.ca_key, private_key_pem(key, passphrase), 0o600)
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

    def _issue(
        self,
        cn: str,
        server_names: list[str] | None,
        out: Path,
        ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    ) -> Issued:
        ca_cert, ca_key = ca or self._load_ca()
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
            .not_valid_before(now - BACKDATE)
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
        # TLS keys are handed to a daemon that opens them unattended (the board's agent, an
        # operator's tool, mosquitto): unencrypted PEM, 0600 (docs/operations.md, "Private keys").
        atomic_write(issued.key, private_key_pem(key, None), 0o600)
        atomic_write(issued.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return issued

    # --- identities ----------------------------------------------------------------------------
    def enrol_device(self, enrolment_bytes: bytes, source: str) -> tuple[Enrolment, Issued]:
        """Verify a board's enrolment, record its identity key, issue its client certificate."""
        return self._enrol(enrolment_bytes, source)

    def enrol_devices(self, enrolments: list[tuple[bytes, str]]) -> list[tuple[Enrolment, Issued]]:
        """:meth:`enrol_device` for many boards (a flashing station's batch, a fleet simulator),
        with the CA key loaded and decrypted once; each board is checked and issued in turn, so a
        refusal names its file and leaves the boards before it enrolled."""
        ca = self._load_ca()
        return [self._enrol(data, source, ca) for data, source in enrolments]

    def _enrol(
        self,
        enrolment_bytes: bytes,
        source: str,
        ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    ) -> tuple[Enrolment, Issued]:
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
        return e, self._issue(e.device_id, None, self.certs, ca)

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


# --- revocation ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Revocation:
    """One revoked client certificate, as kept in ``FLEET/revoked.json``."""

    device_id: str
    serial: int
    revoked_at: dt.datetime
    reason: str


@contextlib.contextmanager
def _revocation_lock(home: FleetHome) -> Iterator[None]:
    """Serialise writers of revoked.json and crl.pem (a CLI and a command service may both revoke)."""
    fd = os.open(home.path / ".revoke.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def revocations(home: FleetHome) -> list[Revocation]:
    """Every revoked certificate, oldest first (empty when nothing was ever revoked)."""
    path = home.revocations
    if not path.exists():
        return []
    what = str(path)
    top = {"format", "revoked"}
    doc = obj_fields(loads_json(read_bounded(path, MAX_REVOKED_FILE), what), what, top, top)
    if doc["format"] != REVOKED_FORMAT or not isinstance(doc["revoked"], list):
        raise FormatError(f"{what}: unknown format (this release reads format {REVOKED_FORMAT})")
    fields = {"device_id", "serial", "revoked_at", "reason"}
    out = []
    for i, item in enumerate(doc["revoked"]):
        w = f"{what} entry {i}"
        f = obj_fields(item, w, fields, fields)
        serial = str_field(f["serial"], f"{w} serial", limit=64)
        try:
            number = int(serial, 16)
        except ValueError as e:
            raise FormatError(f"{w} serial is not hexadecimal: {serial!r}") from e
        reason = f["reason"]
        if not isinstance(reason, str) or len(reason) > MAX_REASON:
            raise FormatError(f"{w} reason must be a string of at most {MAX_REASON} characters")
        device_id = str_field(f["device_id"], f"{w} device_id", ID_RE)
        out.append(Revocation(device_id, number, parse_time(f["revoked_at"], w), reason))
    return out


def _write_revocations(home: FleetHome, entries: list[Revocation]) -> None:
    doc = {
        "format": REVOKED_FORMAT,
        "revoked": [
            {
                "device_id": r.device_id,
                "serial": format(r.serial, "x"),
                "revoked_at": format_time(r.revoked_at),
                "reason": r.reason,
            }
            for r in entries
        ],
    }
    atomic_write(home.revocations, (json.dumps(doc, indent=2) + "\n").encode(), 0o644)


def _crl_number(home: FleetHome) -> int:
    """One more than the current CRL's number (1 for the first CRL or an unreadable one)."""
    try:
        crl = x509.load_pem_x509_crl(home.crl.read_bytes())
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number) + 1
    except (OSError, ValueError, x509.ExtensionNotFound):
        return 1


def _sign_crl(
    home: FleetHome,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    entries: list[Revocation],
    now: dt.datetime,
) -> Path:
    if now.tzinfo is None:
        raise ValueError("naive datetime")
    ca_cert, ca_key = ca
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - BACKDATE)
        .next_update(now + dt.timedelta(days=CRL_DAYS))
        .add_extension(x509.CRLNumber(_crl_number(home)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    for r in sorted({r.serial: r for r in entries}.values(), key=lambda r: r.serial):
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(r.serial)
            .revocation_date(r.revoked_at)
            .build()
        )
    crl = b.sign(ca_key, hashes.SHA256())
    atomic_write(home.crl, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return home.crl


def write_crl(home: FleetHome, now: dt.datetime) -> Path:
    """Sign a fresh ``FLEET/crl.pem`` listing every revoked serial (an empty, valid CRL when
    nothing is revoked), valid for CRL_DAYS from ``now``. Needs the CA key."""
    ca = home._load_ca()
    with _revocation_lock(home):
        return _sign_crl(home, ca, revocations(home), now)


def _device_cert(home: FleetHome, ca_cert: x509.Certificate, device_id: str) -> x509.Certificate:
    """The device's current client certificate, checked to be this CA's and to name it."""
    if not ID_RE.match(device_id):
        raise UsageError(f"unknown device {device_id[:80]!r}: not a valid device id")
    cert_path = home.certs / f"{device_id}.crt"
    enrolled = (home.devices / f"{device_id}.json").exists()
    if (home.operators / device_id).exists():
        raise UsageError(f"{device_id} is an operator, not a device: 'fleet revoke' revokes boards")
    if not cert_path.exists():
        if enrolled:
            raise UsageError(f"device {device_id} is enrolled but has no certificate at {cert_path}")
        raise UsageError(
            f"unknown device {device_id}: not enrolled in {home.path} and no certificate issued"
        )
    try:
        cert = x509.load_pem_x509_certificate(read_bounded(cert_path, 64 * 1024))
    except ValueError as e:
        raise FormatError(f"{cert_path} is not a PEM certificate: {e}") from e
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise UsageError(f"{cert_path} was not issued by this fleet's CA; nothing to revoke") from e
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [device_id]:
        raise UsageError(f"{cert_path} names {names!r}, not {device_id}; nothing revoked")
    return cert


def revoke(home: FleetHome, device_id: str, reason: str, now: dt.datetime) -> Path:
    """Revoke ``device_id``'s current client certificate (by serial) and sign a fresh CRL.

    Returns ``FLEET/crl.pem``. The broker refuses the board at the TLS handshake once it has
    loaded (its copy of) this CRL: mosquitto 2.0.11 re-reads it on SIGHUP for new connections, and
    only a restart also drops a connection the board has open (docs/operations.md, section 6).
    A revoked board cannot receive remote commands over MQTT any more. Revoking an already revoked
    certificate changes nothing but re-signs the CRL (a fresh next update). An unknown device is
    a UsageError. Needs the CA key (``EDGEWARD_PASSPHRASE`` when it is encrypted).
    """
    if now.tzinfo is None:
        raise ValueError("naive datetime")
    if len(reason) > MAX_REASON:
        raise UsageError(f"the reason must be at most {MAX_REASON} characters")
    ca = home._load_ca()  # first: a missing CA or a wrong passphrase changes nothing
    cert = _device_cert(home, ca[0], device_id)
    with _revocation_lock(home):
        entries = revocations(home)
        if cert.serial_number not in {r.serial for r in entries}:
            entries.append(
                Revocation(device_id, cert.serial_number, now.astimezone(dt.UTC), reason)
            )
            # The list is the record; the CRL is derived from it. Written first, a revocation
            # whose CRL write fails is still in the next CRL signed (revoke again, broker-config).
            _write_revocations(home, entries)
        return _sign_crl(home, ca, entries, now)


def revoked(home: FleetHome) -> dict[str, dt.datetime]:
    """Devices whose current client certificate is revoked -> when it was revoked.

    A device re-enrolled after its revocation has a new, valid certificate and is not listed;
    one whose certificate file is gone stays listed.
    """
    out: dict[str, dt.datetime] = {}
    for r in revocations(home):
        path = home.certs / f"{r.device_id}.crt"
        current = (
            x509.load_pem_x509_certificate(path.read_bytes()).serial_number
            if path.exists()
            else None
        )
        if current is None or current == r.serial:
            out[r.device_id] = r.revoked_at
    return out
