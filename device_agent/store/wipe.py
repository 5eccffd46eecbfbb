"""Secure end of life for a board's models: cryptographic erase (NIST SP 800-88 "purge" by
destroying keys), resumable after a power cut, with a signed attestation.

Overwriting files on an SD card or eMMC does not reliably erase them (wear levelling keeps old
blocks), so EdgeWard relies on what *can* be made unreadable: every stored bundle is encrypted to
the board's X25519 key, and that key exists only inside ``keys.wrapped``. Destroying that file
(and the key file that unlocks it, when it lives in the data dir) makes every bundle
undecryptable, wherever copies of its blocks survive. Everything else goes too.

What is shredded, deleted or kept comes from the data-directory layout
(:mod:`device_agent.store.layout`), the one list of what the agent writes. Order (each step
idempotent, so an interrupted wipe resumes from the marker):

1. write ``WIPING`` atomically: the attestation body, signed with the identity key while it
   still exists (unsigned if the keys cannot be unlocked: a wipe never needs the passphrase);
2. shred every entry marked SHRED (random overwrite, fsync, unlink), and the key file when it
   lives in the data dir;
3. delete everything else but the entries marked KEEP, ``device.json`` last;
4. write ``wipe-attestation.json`` and remove the marker.
"""

from __future__ import annotations

import base64
import contextlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from device_agent import crypto
from device_agent.errors import BadSignature, EdgeWardError, SecurityRefusal
from device_agent.store import layout
from device_agent.store.datadir import DataDir
from device_agent.store.fsutil import atomic_write, fsync_dir, shred_file
from device_agent.store.keys import KeySource
from device_agent.wire import canonical_json, format_time

DOMAIN = b"edgeward/wipe-attestation/v1"
MARKER = layout.WIPE_MARKER
ATTESTATION = layout.ATTESTATION
METHOD = (
    "crypto-shred: device keys overwritten and deleted, bundles and state deleted "
    "(NIST SP 800-88 cryptographic erase)"
)


def wipe_pending(path: Path) -> bool:
    return (path / MARKER).exists()


def _kek_location(store: DataDir, source: KeySource) -> dict[str, Any]:
    """Where the key-encryption key lives: a file in the data dir can be shredded; one outside
    it (a systemd credential, a TPM-backed tmpfs) cannot be reached by the wipe."""
    if source.kek_path is None:
        return {"kind": "passphrase" if source.passphrase is not None else "unknown"}
    root = store.path.resolve()
    path = source.kek_path.resolve()
    if path.is_relative_to(root):
        return {"kind": "key file in the data dir", "path": path.relative_to(root).as_posix()}
    return {"kind": "key file outside the data dir (not shredded by this wipe)"}


def _attestation_body(store: DataDir, kek: dict[str, Any], now: datetime) -> dict[str, Any]:
    device = json.loads(store.device_file.read_bytes())
    bundles = sorted(p.stem for p in store.bundles.glob("*.ewb")) if store.bundles.exists() else []
    found = store.layout.scan()
    return {
        "schema": "edgeward.wipe-attestation/1",
        "device_id": device["device_id"],
        "sign_fingerprint": crypto.fingerprint(base64.b64decode(device["sign_public"])),
        "box_fingerprint": crypto.fingerprint(base64.b64decode(device["box_public"])),
        "bundles_destroyed": bundles,
        "files_shredded": sum(1 for f in found if f.entry and f.entry.fate is layout.Fate.SHRED)
        + (1 if "path" in kek else 0),
        "files_deleted": sum(
            1 for f in found if f.kind != "dir" and (f.entry is None or f.entry.fate is layout.Fate.DELETE)
        ),
        "key_encryption_key": kek["kind"],
        "method": METHOD,
        "started": format_time(now),
    }


def _audit_head(store: DataDir) -> dict[str, Any] | None:
    """The audit chain's last checkpoint (sequence number and hash over every record before it):
    the digest kept of the log that the wipe deletes."""
    try:
        head = json.loads((store.audit_dir / "head.json").read_bytes())
        return {"seq": int(head["seq"]), "hash": str(head["hash"])[:128]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def begin(
    store: DataDir,
    source: KeySource,
    now: datetime,
    *,
    by: dict[str, Any] | None = None,
    allow_unsigned: bool = False,
) -> dict[str, Any]:
    """Step 1: record the intent, signed while the identity key still exists. ``by`` names the
    signed command that ordered the wipe (None: a technician at the board). Without the keys the
    wipe is refused unless ``allow_unsigned``: a mistyped passphrase must not look like a wipe."""
    try:
        keys = store.unlock(source)
    except EdgeWardError as e:
        if not allow_unsigned:
            raise SecurityRefusal(
                f"cannot unlock the device keys ({e}), so the wipe could not be attested; "
                "fix the passphrase or key file, or pass --unsigned to wipe without an attestation"
            ) from e
        keys = None
    kek = _kek_location(store, source)
    body = _attestation_body(store, kek, now)
    body["by"] = by or {"local": True}
    body["audit_head"] = _audit_head(store)
    doc: dict[str, Any] = {"body": body, "signature": None}
    if keys is not None:
        try:
            doc["signature"] = base64.b64encode(crypto.sign(keys.signer(), DOMAIN, canonical_json(body))).decode()
        finally:
            keys.wipe()
    marker = {**doc, "kek_path": kek.get("path")}
    atomic_write(store.path / MARKER, json.dumps(marker, indent=2).encode(), 0o600)
    return doc


def attestation(path: Path) -> dict[str, Any] | None:
    """The attestation a completed wipe left in data dir ``path``, if any (public, unverified)."""
    try:
        doc = json.loads((path / ATTESTATION).read_bytes()[:65536])
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("body"), dict) else None


def _inside(root: Path, rel: Any) -> Path | None:
    """``rel`` from the marker as a path inside ``root``, or None (the marker is a file too)."""
    if not isinstance(rel, str) or not rel:
        return None
    path = (root / rel).resolve()
    return path if path.is_relative_to(root.resolve()) and path != root.resolve() else None


def complete(store: DataDir, now: datetime) -> dict[str, Any]:
    """Steps 2-4; safe to run again after an interruption at any point."""
    marker = json.loads((store.path / MARKER).read_bytes())
    doc = {"body": marker["body"], "signature": marker["signature"]}
    found = store.layout.scan()
    for f in found:
        if f.entry is not None and f.entry.fate is layout.Fate.SHRED:
            shred_file(store.path / f.rel)
    kek = _inside(store.path, marker.get("kek_path"))
    if kek is not None:
        shred_file(kek)
    keep = {layout.WIPE_MARKER, layout.DEVICE}
    # Deepest first, so directories are empty when their turn comes.
    for f in sorted(found, key=lambda f: f.rel.count("/"), reverse=True):
        if f.rel in keep or (f.entry is not None and f.entry.fate is layout.Fate.KEEP):
            continue
        path = store.path / f.rel
        with contextlib.suppress(FileNotFoundError):
            if f.kind == "dir":
                with contextlib.suppress(OSError):  # not empty: something appeared meanwhile
                    path.rmdir()
            else:
                path.unlink()
    with contextlib.suppress(FileNotFoundError):
        store.device_file.unlink()
    fsync_dir(store.path)
    doc["completed"] = format_time(now)
    atomic_write(store.path / ATTESTATION, json.dumps(doc, indent=2).encode() + b"\n", 0o644)
    (store.path / MARKER).unlink()
    fsync_dir(store.path)
    return doc


def wipe(store: DataDir, source: KeySource, now: datetime, *, allow_unsigned: bool = False) -> dict[str, Any]:
    """Wipe the board's models and keys; resumes an interrupted wipe instead of starting over."""
    if not wipe_pending(store.path):
        store.require_provisioned()
        begin(store, source, now, allow_unsigned=allow_unsigned)
    return complete(store, now)


def verify_attestation(doc: dict[str, Any], sign_public: bytes) -> dict[str, Any]:
    """Check a wipe attestation against the device's enrolled identity key; returns its body."""
    if not doc.get("signature"):
        raise BadSignature("the wipe attestation is unsigned (the keys could not be unlocked)")
    crypto.verify(sign_public, DOMAIN, canonical_json(doc["body"]), base64.b64decode(doc["signature"]))
    return dict(doc["body"])
