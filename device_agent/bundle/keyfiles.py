"""Public key files: PEM SubjectPublicKeyInfo holding an Ed25519 key (what ``edgeward keys`` writes)."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_agent.config import DEFAULT_CONFIG, DocumentLimits
from device_agent.errors import FormatError, UsageError


def public_key_pem(raw: bytes) -> bytes:
    return Ed25519PublicKey.from_public_bytes(raw).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def parse_public_key(
    data: bytes, source: str = "public key", limits: DocumentLimits = DEFAULT_CONFIG.documents
) -> bytes:
    """Return the raw 32-byte Ed25519 key from a PEM file (at most
    ``limits.max_key_file_bytes``); refuse any other key type."""
    if len(data) > limits.max_key_file_bytes:
        raise FormatError(f"{source} is too large to be a public key file")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as e:
        raise FormatError(f"{source} is not a PEM public key: {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise FormatError(f"{source} is a {type(key).__name__}, EdgeWard needs an Ed25519 key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_public_key_file(path: Path, limits: DocumentLimits = DEFAULT_CONFIG.documents) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(limits.max_key_file_bytes + 1)  # one byte over: parse_public_key refuses it
    except FileNotFoundError as e:
        raise UsageError(f"public key file {path} does not exist") from e
    if b"PRIVATE KEY" in data:
        raise UsageError(f"{path} is a private key; pass the .pub file")
    return parse_public_key(data, str(path), limits)
