"""The board's data directory: identity, wrapped private keys, trust anchors, installed bundles.

Layout (every name here is fixed; nothing from a bundle becomes a path except a validated
32-hex bundle id)::

    D/                      0700
      device.json           public identity (device id, public keys)
      keys.wrapped          both private keys, encrypted under the device passphrase or KEK
      trust.json            publisher and operator public keys (trust anchors)
      state.json            installed models, highest accepted versions, the clock floor
      bundles/<id>.ewb      bundles exactly as received: still encrypted to this device
      events.db             detections and refusals (device_agent.events), SQLite WAL
      .lock                 serialises writers

Bundles are stored encrypted; the model is decrypted into memory each time it is loaded.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from device_agent import crypto
from device_agent.bundle.format import Manifest, read_head
from device_agent.errors import EnvironmentFault, FormatError, NotInstalled, UsageError
from device_agent.store.fsutil import atomic_write, make_private_dir, read_into_bytearray
from device_agent.trust.decisions import Identity
from device_agent.wire import HEX32_RE, ID_RE, format_time, parse_time

STATE_SCHEMA = "edgeward.state/1"
PASSPHRASE_ENV = "EDGEWARD_DEVICE_PASSPHRASE"  # noqa: S105 - the variable's name, not a secret
KEK_FILE_ENV = "EDGEWARD_DEVICE_KEK_FILE"


@dataclass(frozen=True)
class KeySource:
    """How the board unlocks its private keys: a passphrase, or a 32-byte key file kept off the
    data disk (tmpfs filled at boot from a TPM or secure element, or removable media)."""

    passphrase: bytes | None = None
    kek: bytes | None = None

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
            return cls(kek=kek)
        pw = os.environ.get(PASSPHRASE_ENV)
        return cls(passphrase=pw.encode() if pw else None)

    def require(self) -> None:
        if self.passphrase is None and self.kek is None:
            raise UsageError(
                f"the device keys must be stored encrypted: set {PASSPHRASE_ENV} "
                f"or {KEK_FILE_ENV} (or pass --kek-file)"
            )


@dataclass
class DeviceKeys:
    """The board's private keys, unwrapped in memory. Call :meth:`wipe` when done."""

    box_private: bytearray
    sign_seed: bytearray

    def wipe(self) -> None:
        crypto.wipe(self.box_private)
        crypto.wipe(self.sign_seed)

    def signer(self) -> Any:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(bytes(self.sign_seed))


@dataclass(frozen=True)
class InstalledRecord:
    bundle_id: str
    model_version: int
    installed_at: datetime
    size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "bundle_id": self.bundle_id,
            "model_version": self.model_version,
            "installed_at": format_time(self.installed_at),
            "size": self.size,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> InstalledRecord:
        bundle_id = str(raw["bundle_id"])
        if not HEX32_RE.match(bundle_id):
            raise FormatError("state.json names an invalid bundle id")
        return cls(
            bundle_id=bundle_id,
            model_version=int(raw["model_version"]),
            installed_at=parse_time(raw["installed_at"], "installed_at"),
            size=int(raw["size"]),
        )


@dataclass
class ModelSlot:
    current: InstalledRecord | None
    previous: InstalledRecord | None
    highest_version: int


@dataclass
class State:
    clock_floor: datetime | None
    models: dict[str, ModelSlot]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": STATE_SCHEMA,
            "clock_floor": format_time(self.clock_floor) if self.clock_floor else None,
            "models": {
                mid: {
                    "current": s.current.to_json() if s.current else None,
                    "previous": s.previous.to_json() if s.previous else None,
                    "highest_version": s.highest_version,
                }
                for mid, s in sorted(self.models.items())
            },
        }

    @classmethod
    def from_json(cls, raw: Any) -> State:
        if not isinstance(raw, dict) or raw.get("schema") != STATE_SCHEMA:
            raise FormatError(f"state.json is not {STATE_SCHEMA}")
        models = {}
        for mid, s in raw.get("models", {}).items():
            if not ID_RE.match(mid):
                raise FormatError("state.json names an invalid model id")
            models[mid] = ModelSlot(
                current=InstalledRecord.from_json(s["current"]) if s.get("current") else None,
                previous=InstalledRecord.from_json(s["previous"]) if s.get("previous") else None,
                highest_version=int(s["highest_version"]),
            )
        floor = raw.get("clock_floor")
        return cls(clock_floor=parse_time(floor, "clock_floor") if floor else None, models=models)

    def referenced_bundles(self) -> set[str]:
        ids = set()
        for s in self.models.values():
            for r in (s.current, s.previous):
                if r is not None:
                    ids.add(r.bundle_id)
        return ids


class DataDir:
    """File-level access to one board's data directory. No trust decisions are made here."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    # paths ------------------------------------------------------------------------------------
    @property
    def device_file(self) -> Path:
        return self.path / "device.json"

    @property
    def keys_file(self) -> Path:
        return self.path / "keys.wrapped"

    @property
    def trust_file(self) -> Path:
        return self.path / "trust.json"

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def bundles(self) -> Path:
        return self.path / "bundles"

    @property
    def events_file(self) -> Path:
        return self.path / "events.db"

    def bundle_path(self, bundle_id: str) -> Path:
        if not HEX32_RE.match(bundle_id):
            raise FormatError("invalid bundle id")
        return self.bundles / f"{bundle_id}.ewb"

    # provisioning ------------------------------------------------------------------------------
    def is_provisioned(self) -> bool:
        return self.device_file.exists() and self.keys_file.exists()

    def require_provisioned(self) -> None:
        if not self.is_provisioned():
            raise UsageError(
                f"{self.path} is not a provisioned data dir; run 'edgeward-agent provision' first"
            )

    def create(
        self,
        device_id: str,
        keys: DeviceKeys,
        source: KeySource,
        publishers: list[bytes],
        operators: list[bytes],
        now: datetime,
    ) -> Identity:
        if self.is_provisioned():
            raise UsageError(f"{self.path} is already provisioned; wipe it first or pick another dir")
        make_private_dir(self.path)
        make_private_dir(self.bundles)
        box_public = crypto.box_public_from_private(keys.box_private)
        sign_public = crypto.ed25519_public_raw(keys.signer())
        secret = bytearray(keys.box_private + keys.sign_seed)
        try:
            blob = crypto.wrap_secret(secret, passphrase=source.passphrase, kek=source.kek)
        finally:
            crypto.wipe(secret)
        atomic_write(self.keys_file, blob, 0o600)
        self.write_trust(publishers, operators)
        atomic_write(self.state_file, json.dumps(State(now, {}).to_json(), indent=2).encode(), 0o600)
        identity = Identity(device_id, box_public, sign_public)
        device = {
            "schema": "edgeward.device/1",
            "device_id": device_id,
            "box_public": base64.b64encode(box_public).decode(),
            "sign_public": base64.b64encode(sign_public).decode(),
            "provisioned_at": format_time(now),
        }
        # Written last: its presence marks a complete provisioning.
        atomic_write(self.device_file, json.dumps(device, indent=2).encode(), 0o644)
        return identity

    def write_trust(self, publishers: list[bytes], operators: list[bytes]) -> None:
        doc = {
            "schema": "edgeward.trust/1",
            "publishers": [base64.b64encode(k).decode() for k in publishers],
            "operators": [base64.b64encode(k).decode() for k in operators],
        }
        atomic_write(self.trust_file, json.dumps(doc, indent=2).encode(), 0o644)

    # reading -------------------------------------------------------------------------------------
    def _json(self, path: Path) -> Any:
        try:
            return json.loads(path.read_bytes())
        except FileNotFoundError as e:
            raise UsageError(f"{path} is missing; is {self.path} a provisioned data dir?") from e
        except (OSError, ValueError) as e:
            raise EnvironmentFault(f"cannot read {path}: {e}") from e

    def identity(self) -> Identity:
        self.require_provisioned()
        d = self._json(self.device_file)
        return Identity(
            device_id=d["device_id"],
            box_public=base64.b64decode(d["box_public"]),
            sign_public=base64.b64decode(d["sign_public"]),
        )

    def trust(self) -> tuple[list[bytes], list[bytes]]:
        d = self._json(self.trust_file)
        return (
            [base64.b64decode(k) for k in d.get("publishers", [])],
            [base64.b64decode(k) for k in d.get("operators", [])],
        )

    def unlock(self, source: KeySource) -> DeviceKeys:
        self.require_provisioned()
        blob = self.keys_file.read_bytes()
        secret = crypto.unwrap_secret(blob, passphrase=source.passphrase, kek=source.kek)
        try:
            if len(secret) != 2 * crypto.KEY_BYTES:
                raise FormatError("keys.wrapped holds keys of the wrong length")
            return DeviceKeys(bytearray(secret[:32]), bytearray(secret[32:]))
        finally:
            crypto.wipe(secret)

    def state(self) -> State:
        return State.from_json(self._json(self.state_file))

    def save_state(self, state: State) -> None:
        atomic_write(self.state_file, json.dumps(state.to_json(), indent=2).encode(), 0o600)

    def read_bundle(self, bundle_id: str, limit: int = 2**31) -> bytearray:
        try:
            return read_into_bytearray(self.bundle_path(bundle_id), limit)
        except FileNotFoundError as e:
            raise NotInstalled(
                f"bundle {bundle_id} is recorded as installed but missing; reinstall the model"
            ) from e

    def read_bundle_head(self, bundle_id: str) -> tuple[bytes, int]:
        """The signed head of a stored bundle and the file's length (no payload read)."""
        try:
            with open(self.bundle_path(bundle_id), "rb") as f:
                return read_head(f), os.fstat(f.fileno()).st_size
        except FileNotFoundError as e:
            raise NotInstalled(
                f"bundle {bundle_id} is recorded as installed but missing; reinstall the model"
            ) from e

    def store_bundle(self, bundle_id: str, data: bytes | bytearray | memoryview) -> None:
        make_private_dir(self.bundles)
        atomic_write(self.bundle_path(bundle_id), data, 0o600)

    def discard_bundle(self, bundle_id: str) -> None:
        """Remove a stored bundle that never became part of the state (a failed install)."""
        with contextlib.suppress(FileNotFoundError):
            self.bundle_path(bundle_id).unlink()

    def collect_garbage(self, state: State) -> list[str]:
        """Delete stored bundles no longer referenced (left by a crash between two steps)."""
        keep = state.referenced_bundles()
        removed = []
        for p in self.bundles.glob("*.ewb"):
            if p.stem not in keep:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                removed.append(p.stem)
        for p in self.bundles.glob(".*.tmp-*"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        return removed

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise writers (install, rollback, wipe) on this data dir."""
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def record_install(state: State, m: Manifest, size: int, now: datetime) -> tuple[State, str | None]:
    """The state after installing ``m``: previous := current, current := new. Returns the new
    state and the bundle id that is no longer referenced (to delete after the state is saved)."""
    slot = state.models.get(m.model_id)
    new = InstalledRecord(m.bundle_id, m.model_version, now, size)
    models = dict(state.models)
    if slot is None:
        models[m.model_id] = ModelSlot(current=new, previous=None, highest_version=m.model_version)
        dropped = None
    else:
        dropped = slot.previous.bundle_id if slot.previous else None
        models[m.model_id] = ModelSlot(
            current=new, previous=slot.current, highest_version=max(slot.highest_version, m.model_version)
        )
    floor = max(t for t in (state.clock_floor, now, m.created) if t is not None)
    return State(clock_floor=floor, models=models), dropped


def utcnow() -> datetime:
    return datetime.now(UTC)
