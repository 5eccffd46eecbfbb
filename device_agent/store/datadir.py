"""File-level access to one board's data directory. No trust decisions are made here.

Paths come from :mod:`device_agent.store.layout`. The trusted files (state, trust anchors, tokens)
are sealed with a key derived from the board secret (:mod:`device_agent.trust.sealed`): reading
one needs that key, and a file that fails its check is refused, never repaired. Bundles are
stored as received, still encrypted to this device; the model is decrypted into memory each time
it is loaded.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from device_agent import crypto
from device_agent.bundle.format import read_head
from device_agent.config import DEFAULT_CONFIG, DocumentLimits
from device_agent.errors import FormatError, NotInstalled, UsageError
from device_agent.store import layout
from device_agent.store.fsutil import atomic_write, make_private_dir, read_bounded, read_into_bytearray, shred_file
from device_agent.store.keys import DeviceKeys, KeySource
from device_agent.trust import sealed
from device_agent.trust.state import Identity, State, TrustAnchors
from device_agent.wire import format_time

DEVICE_SCHEMA = "edgeward.device/1"
BUNDLE_KEYS_PURPOSE = b"edgeward/bundle-keys/v1"  # HKDF purpose of the key sealing local bundle keys


class DataDir:
    """One board's data directory: its files, read and written under the layout's names."""

    def __init__(self, path: str | os.PathLike[str], limits: DocumentLimits = DEFAULT_CONFIG.documents) -> None:
        self.path = Path(path)
        self.layout = layout.Layout(self.path)
        self.limits = limits

    # paths ------------------------------------------------------------------------------------
    @property
    def device_file(self) -> Path:
        return self.layout.path(layout.DEVICE)

    @property
    def keys_file(self) -> Path:
        return self.layout.path(layout.KEYS)

    @property
    def state_file(self) -> Path:
        return self.layout.path(layout.STATE)

    @property
    def bundles(self) -> Path:
        return self.layout.path(layout.BUNDLES)

    @property
    def events_file(self) -> Path:
        return self.layout.path(layout.EVENTS)

    @property
    def outbox_file(self) -> Path:
        return self.layout.path(layout.OUTBOX)

    @property
    def audit_dir(self) -> Path:
        return self.layout.path(layout.AUDIT)

    @property
    def tokens_file(self) -> Path:
        return self.layout.path(layout.TOKENS)

    @property
    def budgets_file(self) -> Path:
        return self.layout.path(layout.BUDGETS)

    @property
    def socket_file(self) -> Path:
        return self.layout.path(layout.SOCKET)

    def bundle_path(self, bundle_id: str) -> Path:
        return self.layout.bundle(bundle_id)

    # provisioning ------------------------------------------------------------------------------
    def is_provisioned(self) -> bool:
        return self.device_file.exists() and self.keys_file.exists()

    def require_provisioned(self) -> None:
        if not self.is_provisioned():
            if self.layout.path(layout.ATTESTATION).exists():
                from device_agent.errors import SecurityRefusal

                raise SecurityRefusal(
                    f"{self.path} was wiped (see wipe-attestation.json and 'edgeward-agent status'); it serves "
                    "nothing. Provision it again to reuse the board"
                )
            raise UsageError(
                f"{self.path} is not a provisioned data dir; run 'edgeward-agent provision' first"
            )

    def create(
        self, device_id: str, keys: DeviceKeys, source: KeySource, anchors: TrustAnchors, now: datetime
    ) -> Identity:
        if self.is_provisioned():
            raise UsageError(f"{self.path} is already provisioned; wipe it first or pick another dir")
        make_private_dir(self.path)
        make_private_dir(self.bundles)
        box_public = crypto.box_public_from_private(keys.box_private)
        sign_public = crypto.ed25519_public_raw(keys.signer())
        self.write_keys(keys, source)
        key = self.sealing_key(keys)
        try:
            self.save_trust(anchors, key)
            self.save_state(State(now, {}), key)
        finally:
            crypto.wipe(key)
        identity = Identity(device_id, box_public, sign_public)
        device = {
            "schema": DEVICE_SCHEMA,
            "device_id": device_id,
            "box_public": base64.b64encode(box_public).decode(),
            "sign_public": base64.b64encode(sign_public).decode(),
            "provisioned_at": format_time(now),
        }
        # Written last: its presence marks a complete provisioning.
        atomic_write(self.device_file, json.dumps(device, indent=2).encode(), 0o644)
        return identity

    # keys ----------------------------------------------------------------------------------------
    def write_keys(self, keys: DeviceKeys, source: KeySource, name: str = layout.KEYS) -> None:
        secret = keys.secret()
        try:
            blob = source.wrap(secret)
        finally:
            crypto.wipe(secret)
        atomic_write(self.layout.path(name), blob, 0o600)

    def unlock(self, source: KeySource, kek_cache: dict[bytes, bytearray] | None = None,
               name: str = layout.KEYS) -> DeviceKeys:
        self.require_provisioned()
        return source.unwrap(read_bounded(self.layout.path(name), self.limits.max_board_file_bytes), kek_cache)

    @staticmethod
    def sealing_key(keys: DeviceKeys) -> bytearray:
        if keys.board_secret is None:
            raise FormatError("these keys predate sealed state; the data dir must be upgraded first")
        return sealed.sealing_key(keys.board_secret)

    # public identity -------------------------------------------------------------------------------
    def _public_json(self, path: Path) -> Any:
        try:
            return json.loads(read_bounded(path, self.limits.max_board_file_bytes))
        except FileNotFoundError as e:
            raise UsageError(f"{path} is missing; is {self.path} a provisioned data dir?") from e
        except ValueError as e:
            raise FormatError(f"{path} is not JSON: {e}") from e

    def identity(self) -> Identity:
        self.require_provisioned()
        d = self._public_json(self.device_file)
        try:
            return Identity(
                device_id=str(d["device_id"]),
                box_public=base64.b64decode(d["box_public"], validate=True),
                sign_public=base64.b64decode(d["sign_public"], validate=True),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{self.device_file} is not a device identity: {e}") from e

    # sealed files -------------------------------------------------------------------------------
    def read_sealed(self, name: str, key: bytes | bytearray) -> Any:
        """The document in sealed file ``name`` (a layout name), authenticated; None if absent."""
        try:
            data = read_bounded(self.layout.path(name), self.limits.max_board_file_bytes)
        except FileNotFoundError:
            return None
        return sealed.unseal(key, name, data)

    def write_sealed(self, name: str, doc: Any, key: bytes | bytearray) -> None:
        atomic_write(self.layout.path(name), sealed.seal(key, name, doc), 0o600)

    def state(self, key: bytes | bytearray) -> State:
        doc = self.read_sealed(layout.STATE, key)
        if doc is None:
            raise UsageError(f"{self.state_file} is missing; is {self.path} a provisioned data dir?")
        return State.from_json(doc)

    def save_state(self, state: State, key: bytes | bytearray) -> None:
        self.write_sealed(layout.STATE, state.to_json(), key)

    def trust(self, key: bytes | bytearray) -> TrustAnchors:
        doc = self.read_sealed(layout.TRUST, key)
        if doc is None:
            raise UsageError(f"{self.layout.path(layout.TRUST)} is missing; re-provision the board")
        return TrustAnchors.from_json(doc)

    def save_trust(self, anchors: TrustAnchors, key: bytes | bytearray) -> None:
        self.write_sealed(layout.TRUST, anchors.to_json(), key)

    # bundles -------------------------------------------------------------------------------------
    def read_bundle(self, bundle_id: str, limit: int) -> bytearray:
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

    def bundle_digest(self, bundle_id: str) -> str:
        """SHA-256 of a stored bundle file, read in blocks."""
        import hashlib

        h = hashlib.sha256()
        with open(self.bundle_path(bundle_id), "rb", buffering=0) as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()

    def store_bundle(self, bundle_id: str, data: bytes | bytearray | memoryview) -> None:
        make_private_dir(self.bundles)
        atomic_write(self.bundle_path(bundle_id), data, 0o600)

    def shred_bundle(self, bundle_id: str) -> None:
        """Destroy a bundle's local key (shredded first: that is what makes every copy of the
        bundle useless here), then delete the bundle."""
        shred_file(self.bundle_key_path(bundle_id))
        with contextlib.suppress(FileNotFoundError):
            self.bundle_path(bundle_id).unlink()

    def collect_garbage(self, state: State) -> list[str]:
        """Shred stored bundles and keys no longer referenced (left by a crash between two steps,
        or dropped by an install, a rollback or a retirement)."""
        keep = state.referenced_bundles()
        removed = []
        for p in sorted(self.bundles.glob("*.ewb")) + sorted(self.bundles.glob("*.key")):
            if p.stem not in keep and layout.entry_for(f"{layout.BUNDLES}/{p.name}") is not None:
                self.shred_bundle(p.stem)
                removed.append(p.stem)
        for p in self.bundles.glob(".*.tmp-*"):
            shred_file(p)
        return sorted(set(removed))

    # local bundle keys ----------------------------------------------------------------------------
    def bundle_key_path(self, bundle_id: str) -> Path:
        return self.layout.bundle(bundle_id, ".key")

    @staticmethod
    def bundle_keys_key(keys: DeviceKeys) -> bytearray:
        if keys.board_secret is None:
            raise FormatError("these keys predate local bundle keys; the data dir must be upgraded first")
        return crypto.derive_key(keys.board_secret, BUNDLE_KEYS_PURPOSE)

    def write_bundle_key(self, bundle_id: str, content_key: bytearray, keys: DeviceKeys) -> None:
        """Keep a bundle's content key sealed under the board secret, so that it opens without the
        board's encryption key (which a retirement rotates)."""
        k = self.bundle_keys_key(keys)
        try:
            blob = crypto.seal_local(k, bundle_id.encode(), content_key)
        finally:
            crypto.wipe(k)
        make_private_dir(self.bundles)
        atomic_write(self.bundle_key_path(bundle_id), blob, 0o600)

    def read_bundle_key(self, bundle_id: str, keys: DeviceKeys) -> bytearray:
        try:
            blob = read_bounded(self.bundle_key_path(bundle_id), self.limits.max_board_file_bytes)
        except FileNotFoundError as e:
            raise NotInstalled(f"the key of bundle {bundle_id} is missing; reinstall the model") from e
        k = self.bundle_keys_key(keys)
        try:
            return crypto.open_local(k, bundle_id.encode(), blob)
        finally:
            crypto.wipe(k)

    def rotate_box_key(self, keys: DeviceKeys, source: KeySource) -> bytes:
        """Replace the board's encryption key: bundles sealed to the old one (every copy kept
        anywhere) no longer open here; installed ones open with their local keys. Returns the new
        public key. ``keys`` is updated in place."""
        new_private, new_public = crypto.new_box_keypair()
        old = keys.box_private
        keys.box_private = new_private
        # The old file is replaced by a rename, which frees its blocks without overwriting them:
        # keep a handle on it and overwrite it once the new one is in place.
        old_fd = os.open(self.keys_file, os.O_RDWR | os.O_NOFOLLOW)
        try:
            try:
                self.write_keys(keys, source)
            except BaseException:
                keys.box_private = old
                crypto.wipe(new_private)
                raise
            size = os.fstat(old_fd).st_size
            os.pwrite(old_fd, os.urandom(max(size, 1)), 0)
            os.fsync(old_fd)
        finally:
            os.close(old_fd)
        crypto.wipe(old)
        device = self._public_json(self.device_file)
        device["box_public"] = base64.b64encode(new_public).decode()
        atomic_write(self.device_file, json.dumps(device, indent=2).encode(), 0o644)
        return new_public

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise writers (install, rollback, commands, wipe) on this data dir. A writer that
        waited while a wipe ran finds the board gone and stops without writing anything."""
        path = self.layout.path(layout.LOCK)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not self.is_provisioned():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()  # the lock file this writer just made
                raise UsageError(f"{self.path} was wiped while this command waited; nothing was changed")
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # over-the-air update staging ------------------------------------------------------------------
    @contextlib.contextmanager
    def staging_held(self) -> Iterator[None]:
        """Hold the update staging files (``update.part``, ``update-payload.part``) for one update:
        a lock on each, so that :meth:`remove_stale_staging` in another process leaves them
        alone. They are taken under the data-dir lock, which the remover holds for its whole pass:
        the remover's brief lock on a stale file never makes a live update fail. Raises
        :class:`StagingBusy` when another update holds them."""
        fds: list[int] = []
        try:
            with self.locked():
                for name in (layout.UPDATE_STAGING, layout.UPDATE_PAYLOAD):
                    fds.append(self._hold_staging(self.layout.path(name)))
            yield
        finally:
            for fd in fds:
                os.close(fd)

    @staticmethod
    def _hold_staging(path: Path) -> int:
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
            except OSError as e:
                raise StagingBusy(f"{path} is not a regular file this agent made ({e.strerror}); remove it, "
                                  "then deliver the update again") from e
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise StagingBusy(f"{path} is not a regular file; remove it, then deliver the update again")
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                os.close(fd)
                raise StagingBusy(f"another over-the-air update is downloading into {path}; this update is "
                                  "tried again once that one has ended (serve: at the next delivery; a command "
                                  "file: run it again)") from e
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # removed between the open and the lock: take the new one

    def remove_stale_staging(self) -> list[str]:
        """Remove the update staging files a killed or power-cut download left (up to the bundle
        limit each), unless an update in progress holds them; returns the names removed. An entry
        that is not a regular file (a link, a FIFO, an empty directory) is removed without being
        read; a directory with something in it is refused with what to do."""
        names = [n for n in (layout.UPDATE_STAGING, layout.UPDATE_PAYLOAD) if os.path.lexists(self.layout.path(n))]
        if not names:
            return []
        removed = []
        with self.locked():
            for name in names:
                path = self.layout.path(name)
                try:
                    # Non-blocking: opening a FIFO for reading must not wait for a writer.
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                except FileNotFoundError:
                    continue
                except OSError:
                    path.unlink(missing_ok=True)  # not a regular file this agent made (a link, a socket): never ours
                    removed.append(name)
                    continue
                try:
                    mode = os.fstat(fd).st_mode
                    if stat.S_ISDIR(mode):
                        try:
                            path.rmdir()
                        except OSError as e:
                            raise UsageError(f"{path} is a directory, not an update staging file, and it is not "
                                             "empty; move it out of the data dir, then start the agent again") from e
                    elif not stat.S_ISREG(mode):
                        path.unlink(missing_ok=True)  # a FIFO or a device node: never ours
                    else:
                        try:
                            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        except BlockingIOError:
                            continue  # an update in progress (serve) is downloading into it
                        path.unlink(missing_ok=True)
                    removed.append(name)
                finally:
                    os.close(fd)
        return removed


class StagingBusy(UsageError):
    """The update staging files are held by another update (or are not files this agent made):
    the update waits for a later delivery; its sequence number is not consumed."""


def utcnow() -> datetime:
    return datetime.now(UTC)
