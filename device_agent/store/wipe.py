"""Secure end of life for a board's models: cryptographic erase (NIST SP 800-88 "purge" by
destroying keys), resumable after a power cut, with a signed attestation.

Overwriting files on an SD card or eMMC does not reliably erase them (wear levelling keeps old
blocks), so EdgeWard relies on what *can* be made unreadable: every stored bundle is encrypted to
the board's X25519 key, and that key exists only inside ``keys.wrapped``. Destroying that file
(and the passphrase or key file that unlocks it) makes every bundle undecryptable, wherever
copies of its blocks survive. The bundles and state are then deleted too.

Order (each step idempotent, so an interrupted wipe resumes from the marker):

1. write ``WIPING`` atomically: the attestation body, signed with the identity key while it
   still exists (unsigned if the keys cannot be unlocked: a wipe never needs the passphrase);
2. overwrite ``keys.wrapped`` with random bytes, fsync, unlink;
3. delete bundles, state, events and trust anchors, then ``device.json``;
4. write ``wipe-attestation.json`` and remove the marker.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from device_agent import crypto
from device_agent.errors import BadSignature, EdgeWardError
from device_agent.store.datadir import DataDir, KeySource
from device_agent.store.fsutil import atomic_write, fsync_dir
from device_agent.wire import canonical_json, format_time

DOMAIN = b"edgeward/wipe-attestation/v1"
MARKER = "WIPING"
ATTESTATION = "wipe-attestation.json"
METHOD = (
    "crypto-shred: device keys overwritten and deleted, bundles and state deleted "
    "(NIST SP 800-88 cryptographic erase)"
)


def wipe_pending(path: Path) -> bool:
    return (path / MARKER).exists()


def _shred(path: Path) -> None:
    """Overwrite a small secret file in place with random bytes, then delete it."""
    with contextlib.suppress(FileNotFoundError):
        size = path.stat().st_size
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            os.write(fd, os.urandom(max(size, 1)))
            os.fsync(fd)
        finally:
            os.close(fd)
        path.unlink()
    fsync_dir(path.parent)


def _attestation_body(store: DataDir, now: datetime) -> dict[str, Any]:
    device = json.loads(store.device_file.read_bytes())
    bundles = sorted(p.stem for p in store.bundles.glob("*.ewb")) if store.bundles.exists() else []
    return {
        "schema": "edgeward.wipe-attestation/1",
        "device_id": device["device_id"],
        "sign_fingerprint": crypto.fingerprint(base64.b64decode(device["sign_public"])),
        "box_fingerprint": crypto.fingerprint(base64.b64decode(device["box_public"])),
        "bundles_destroyed": bundles,
        "method": METHOD,
        "started": format_time(now),
    }


def begin(store: DataDir, source: KeySource, now: datetime) -> dict[str, Any]:
    """Step 1: record the intent, signed while the identity key still exists."""
    body = _attestation_body(store, now)
    doc: dict[str, Any] = {"body": body, "signature": None}
    try:
        keys = store.unlock(source)
    except EdgeWardError:
        keys = None  # a wipe must never depend on the passphrase; the attestation is then unsigned
    if keys is not None:
        try:
            doc["signature"] = base64.b64encode(crypto.sign(keys.signer(), DOMAIN, canonical_json(body))).decode()
        finally:
            keys.wipe()
    atomic_write(store.path / MARKER, json.dumps(doc, indent=2).encode(), 0o600)
    return doc


def complete(store: DataDir, now: datetime) -> dict[str, Any]:
    """Steps 2-4; safe to run again after an interruption at any point."""
    doc = json.loads((store.path / MARKER).read_bytes())
    _shred(store.keys_file)
    if store.bundles.exists():
        for p in store.bundles.iterdir():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        fsync_dir(store.bundles)
    for name in ("state.json", "events.db", "events.db-wal", "events.db-shm", "trust.json", "device.json", ".lock"):
        with contextlib.suppress(FileNotFoundError):
            (store.path / name).unlink()
    doc["completed"] = format_time(now)
    atomic_write(store.path / ATTESTATION, json.dumps(doc, indent=2).encode() + b"\n", 0o644)
    (store.path / MARKER).unlink()
    fsync_dir(store.path)
    return doc


def wipe(store: DataDir, source: KeySource, now: datetime) -> dict[str, Any]:
    """Wipe the board's models and keys; resumes an interrupted wipe instead of starting over."""
    if not wipe_pending(store.path):
        store.require_provisioned()
        begin(store, source, now)
    return complete(store, now)


def verify_attestation(doc: dict[str, Any], sign_public: bytes) -> dict[str, Any]:
    """Check a wipe attestation against the device's enrolled identity key; returns its body."""
    if not doc.get("signature"):
        raise BadSignature("the wipe attestation is unsigned (the keys could not be unlocked)")
    crypto.verify(sign_public, DOMAIN, canonical_json(doc["body"]), base64.b64decode(doc["signature"]))
    return dict(doc["body"])
