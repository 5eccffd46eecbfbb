"""Publisher and operator signing keys: Ed25519, private file 0600, passphrase-wrapped when
``EDGEWARD_PASSPHRASE`` is set (PKCS#8 with the best encryption ``cryptography`` offers)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from device_agent import crypto
from device_agent.bundle.keyfiles import public_key_pem
from device_agent.errors import FormatError, UsageError
from device_agent.store.fsutil import atomic_write

PASSPHRASE_ENV = "EDGEWARD_PASSPHRASE"  # noqa: S105  # nosec B105 # the variable's name, not a secret
KINDS = ("publisher", "operator", "recovery")


@dataclass(frozen=True)
class KeyPairFiles:
    private: Path
    public: Path
    fingerprint: str
    encrypted: bool


def _passphrase() -> bytes | None:
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value else None


def private_key_pem(key: PrivateKeyTypes, *, encrypt: bool = True) -> tuple[bytes, bool]:
    """PKCS#8 PEM of ``key``, encrypted under ``EDGEWARD_PASSPHRASE`` when it is set and
    ``encrypt`` is true. Returns the PEM and whether it is encrypted."""
    passphrase = _passphrase() if encrypt else None
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    return pem, passphrase is not None


def generate(kind: str, out_dir: Path, *, force: bool = False) -> KeyPairFiles:
    if kind not in KINDS:
        raise UsageError(f"key kind must be one of {', '.join(KINDS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out_dir / f"{kind}.key", out_dir / f"{kind}.pub"
    if not force and (priv_path.exists() or pub_path.exists()):
        raise UsageError(f"{priv_path} already exists; refusing to overwrite a key (use --force)")
    key = Ed25519PrivateKey.generate()
    pem, encrypted = private_key_pem(key)
    raw_pub = crypto.ed25519_public_raw(key)
    atomic_write(priv_path, pem, 0o600)
    atomic_write(pub_path, public_key_pem(raw_pub), 0o644)
    return KeyPairFiles(priv_path, pub_path, crypto.fingerprint(raw_pub), encrypted)


def load_private_key_pem(path: Path, key_type: type) -> Any:
    """Load a PEM private key of ``key_type`` (publisher, operator, fleet CA). An encrypted one
    needs ``EDGEWARD_PASSPHRASE``; a file other users can read is refused."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise UsageError(f"private key {path} does not exist") from e
    encrypted = b"ENCRYPTED" in data
    passphrase = _passphrase()
    if encrypted and passphrase is None:
        raise UsageError(f"{path} is passphrase-protected: set {PASSPHRASE_ENV}")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
    except (ValueError, TypeError) as e:
        if encrypted:
            raise UsageError(f"cannot unlock {path}: wrong {PASSPHRASE_ENV}?") from e
        raise FormatError(f"{path} is not a PEM private key: {e}") from e
    if not isinstance(key, key_type):
        raise FormatError(f"{path} is not a {key_type.__name__.removesuffix('PrivateKey')} key")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise UsageError(f"{path} is readable by other users (mode {oct(mode)}); chmod 600 it")
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load a publisher or operator signing key."""
    return load_private_key_pem(path, Ed25519PrivateKey)
