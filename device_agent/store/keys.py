"""The board's private keys at rest: how they are unlocked (:class:`KeySource`) and what they are
once unlocked (:class:`DeviceKeys`).

``keys.wrapped`` holds, encrypted under the passphrase (Argon2id) or a 32-byte key file:

- the X25519 key that opens bundles' content keys (32 bytes),
- the Ed25519 seed of the board's identity (32 bytes),
- the board secret (32 bytes), from which the keys that seal the board's own trusted files are
  derived. Release 0.1 wrapped only the first two; such a board is upgraded on its first start
  (:mod:`device_agent.store.upgrade`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent import crypto
from device_agent.errors import FormatError, UsageError

PASSPHRASE_ENV = "EDGEWARD_DEVICE_PASSPHRASE"  # noqa: S105  # nosec B105 # the variable's name, not a secret
KEK_FILE_ENV = "EDGEWARD_DEVICE_KEK_FILE"
PASSPHRASE_FILE_ENV = "EDGEWARD_DEVICE_PASSPHRASE_FILE"  # noqa: S105  # nosec B105 # a variable's name (e.g. a systemd credential)
SECRET_V1_BYTES = 2 * crypto.KEY_BYTES
SECRET_BYTES = 3 * crypto.KEY_BYTES


@dataclass(frozen=True)
class KeySource:
    """How the board unlocks its private keys: a passphrase, or a 32-byte key file kept off the
    data disk (tmpfs filled at boot from a TPM or secure element, or removable media)."""

    passphrase: bytes | None = None
    kek: bytes | None = None
    kek_path: Path | None = None  # where the key file was read from (the wipe shreds it if in the data dir)

    @classmethod
    def from_env(cls, kek_file: str | None = None) -> KeySource:
        path = kek_file or os.environ.get(KEK_FILE_ENV)
        if path:
            try:
                kek = Path(path).read_bytes()
            except OSError as e:
                raise UsageError(f"cannot read key file {path}: {e.strerror}") from e
            if len(kek) != crypto.KEY_BYTES:
                raise UsageError(f"key file {path} must hold exactly 32 bytes (e.g. head -c32 /dev/urandom)")
            return cls(kek=kek, kek_path=Path(path).resolve())
        pw_file = os.environ.get(PASSPHRASE_FILE_ENV)
        if pw_file:
            from device_agent.config import DEFAULT_CONFIG

            limit = DEFAULT_CONFIG.documents.max_passphrase_file_bytes
            return cls(passphrase=_read_passphrase_file(Path(pw_file), limit))
        pw = os.environ.get(PASSPHRASE_ENV)
        return cls(passphrase=pw.encode() if pw else None)

    def require(self) -> None:
        if self.passphrase is None and self.kek is None:
            raise UsageError(
                f"the device keys must be stored encrypted: set {PASSPHRASE_ENV} "
                f"or {KEK_FILE_ENV} (or pass --kek-file)"
            )

    def wrap(self, secret: bytes | bytearray) -> bytes:
        return crypto.wrap_secret(secret, passphrase=self.passphrase, kek=self.kek)

    def unwrap(self, blob: bytes, kek_cache: dict[bytes, bytearray] | None = None) -> DeviceKeys:
        secret = crypto.unwrap_secret(blob, passphrase=self.passphrase, kek=self.kek, kek_cache=kek_cache)
        try:
            if len(secret) == SECRET_BYTES:
                return DeviceKeys(bytearray(secret[:32]), bytearray(secret[32:64]), bytearray(secret[64:]))
            if len(secret) == SECRET_V1_BYTES:
                return DeviceKeys(bytearray(secret[:32]), bytearray(secret[32:]), None)
            raise FormatError("keys.wrapped holds keys of the wrong length")
        finally:
            crypto.wipe(secret)


@dataclass
class DeviceKeys:
    """The board's private keys, unwrapped in memory. Call :meth:`wipe` when done.

    ``board_secret`` is None only for a board written by release 0.1, before its upgrade."""

    box_private: bytearray
    sign_seed: bytearray
    board_secret: bytearray | None

    @classmethod
    def generate(cls) -> DeviceKeys:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        box_private, _ = crypto.new_box_keypair()
        return cls(box_private, crypto.ed25519_private_raw(Ed25519PrivateKey.generate()), crypto.new_secret_key())

    def secret(self) -> bytearray:
        """The bytes ``keys.wrapped`` encrypts (the caller wipes them)."""
        if self.board_secret is None:
            raise FormatError("keys from release 0.1 must be upgraded before they are written")
        return bytearray(self.box_private + self.sign_seed + self.board_secret)

    def wipe(self) -> None:
        crypto.wipe(self.box_private)
        crypto.wipe(self.sign_seed)
        crypto.wipe(self.board_secret)

    def signer(self) -> Any:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(bytes(self.sign_seed))


def _read_passphrase_file(path: Path, limit: int) -> bytes:
    """The passphrase kept in a file (a systemd credential): its bytes without one trailing newline."""
    from device_agent.store.fsutil import read_bounded

    try:
        data = read_bounded(path, limit)
    except OSError as e:
        raise UsageError(f"cannot read {PASSPHRASE_FILE_ENV} {path}: {e.strerror}") from e
    except FormatError as e:
        raise UsageError(f"{PASSPHRASE_FILE_ENV}: {e}") from e
    data = data[:-1] if data.endswith(b"\n") else data
    if not data:
        raise UsageError(f"{PASSPHRASE_FILE_ENV} {path} is empty")
    return data
