"""Publisher, operator and recovery signing keys: Ed25519, private file 0600, and the host's one
rule for every private key it keeps (these and the fleet CA key, docs/operations.md): encrypted
under ``EDGEWARD_PASSPHRASE`` (PKCS#8 with the best encryption ``cryptography`` offers), or, without
a passphrase, refused unless ``--insecure-unencrypted-key`` says to write it in the clear."""

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
UNENCRYPTED_OPTION = "--insecure-unencrypted-key"
KINDS = ("publisher", "operator", "recovery", "receipt")


@dataclass(frozen=True)
class KeyPairFiles:
    private: Path
    public: Path
    fingerprint: str
    encrypted: bool


def _passphrase() -> bytes | None:
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value else None


def private_key_pem(key: PrivateKeyTypes, passphrase: bytes | None) -> bytes:
    """PKCS#8 PEM of ``key``: encrypted under ``passphrase``, or in the clear when it is None."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def kept_key_passphrase(path: Path, *, unencrypted: bool) -> bytes | None:
    """The one rule for a private key the host keeps: the passphrase to encrypt it under
    (``EDGEWARD_PASSPHRASE``), or None when there is none and ``unencrypted`` (the caller's
    explicitly named option) says to write it in the clear; otherwise a refusal, before anything
    is made or written."""
    passphrase = _passphrase()
    if passphrase is None and not unencrypted:
        raise UsageError(
            f"refusing to write the private key {path} unencrypted: set {PASSPHRASE_ENV} to encrypt it, "
            f"or pass {UNENCRYPTED_OPTION} to write it in the clear (0600)"
        )
    return passphrase


def generate(kind: str, out_dir: Path, *, force: bool = False, unencrypted: bool = False) -> KeyPairFiles:
    """A new key pair ``out_dir/KIND.key`` (0600) + ``KIND.pub``, under the one passphrase rule
    (:func:`kept_key_passphrase`)."""
    if kind not in KINDS:
        raise UsageError(f"key kind must be one of {', '.join(KINDS)}")
    priv_path, pub_path = out_dir / f"{kind}.key", out_dir / f"{kind}.pub"
    passphrase = kept_key_passphrase(priv_path, unencrypted=unencrypted)
    if not force and (priv_path.exists() or pub_path.exists()):
        raise UsageError(f"{priv_path} already exists; refusing to overwrite a key (use --force)")
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # explicit: the umask may be 000
    key = Ed25519PrivateKey.generate()
    raw_pub = crypto.ed25519_public_raw(key)
    atomic_write(priv_path, private_key_pem(key, passphrase), 0o600)
    atomic_write(pub_path, public_key_pem(raw_pub), 0o644)
    return KeyPairFiles(priv_path, pub_path, crypto.fingerprint(raw_pub), passphrase is not None)


@dataclass(frozen=True)
class TokenKey:
    """A key pair made inside a PKCS#11 token: only the public half is a file."""

    uri: str
    public: Path
    fingerprint: str


def generate_in_token(kind: str, uri: str, out_dir: Path, *, force: bool = False) -> TokenKey:
    """A new Ed25519 key pair inside the token ``uri`` names (``edgeward keys KIND --pkcs11 URI``):
    the private key is made there, sensitive and not extractable, and never leaves it, so the
    passphrase rule has nothing to encrypt; ``out_dir/KIND.pub`` is the only file written."""
    from . import signers

    if kind not in KINDS:
        raise UsageError(f"key kind must be one of {', '.join(KINDS)}")
    pub_path = out_dir / f"{kind}.pub"
    if not force and pub_path.exists():
        raise UsageError(f"{pub_path} already exists; refusing to overwrite a key (use --force)")
    made = signers.generate_in_token(uri)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(pub_path, public_key_pem(made.public_raw), 0o644)
    return TokenKey(made.uri, pub_path, made.fingerprint)


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
