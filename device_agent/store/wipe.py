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
import json
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from device_agent import crypto
from device_agent.config import DEFAULT_CONFIG
from device_agent.errors import BadSignature, EdgeWardError, SecurityRefusal
from device_agent.store import layout
from device_agent.store.datadir import DataDir
from device_agent.store.fsutil import atomic_write, fsync_dir, read_bounded, shred_file
from device_agent.store.keys import KeySource
from device_agent.wire import canonical_json, format_time

DOMAIN = b"edgeward/wipe-attestation/v1"
MARKER = layout.WIPE_MARKER
ATTESTATION = layout.ATTESTATION
METHOD = (
    "crypto-shred: device keys overwritten and deleted, bundles and state deleted "
    "(NIST SP 800-88r2 cryptographic erase)"
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


def _small_json(path: Path, limit: int = DEFAULT_CONFIG.documents.max_board_file_bytes) -> Any:
    """A small board file as JSON, or None when it is missing, oversized, not a file or not JSON:
    a wipe never depends on the files it destroys."""
    try:
        return json.loads(read_bounded(path, limit))
    except (OSError, ValueError, EdgeWardError):
        return None


def _fingerprint(device: Any, field: str) -> str | None:
    try:
        return crypto.fingerprint(base64.b64decode(device[field], validate=True))
    except (KeyError, TypeError, ValueError):
        return None


def _attestation_body(store: DataDir, kek: dict[str, Any], now: datetime) -> dict[str, Any]:
    device = _small_json(store.device_file)
    device = device if isinstance(device, dict) else {}
    bundles = sorted(p.stem for p in store.bundles.glob("*.ewb")) if store.bundles.is_dir() else []
    found = store.layout.scan()
    return {
        "schema": "edgeward.wipe-attestation/1",
        "device_id": str(device.get("device_id", ""))[:64],
        "sign_fingerprint": _fingerprint(device, "sign_public"),
        "box_fingerprint": _fingerprint(device, "box_public"),
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
    head = _small_json(store.audit_dir / "head.json")
    try:
        return {"seq": int(head["seq"]), "hash": str(head["hash"])[:128]}
    except (ValueError, KeyError, TypeError):
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
                f"{e}: the wipe would not be attested, so nothing was wiped; "
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
    doc = _small_json(path / ATTESTATION)
    return doc if isinstance(doc, dict) and isinstance(doc.get("body"), dict) else None


def _inside(root: Path, rel: Any) -> Path | None:
    """``rel`` from the marker as a path inside ``root``, or None (the marker is a file on the
    card too: only a plain relative path that stays inside the data dir is taken)."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or ".." in Path(rel).parts:
        return None
    path = root / rel
    return path if path.resolve().is_relative_to(root.resolve()) and path.resolve() != root.resolve() else None


def _marker(store: DataDir) -> dict[str, Any]:
    """The wipe's journal. Unreadable (cut, planted, damaged) it still completes the wipe, with
    an attestation that says so."""
    doc = _small_json(store.path / MARKER)
    if not isinstance(doc, dict) or not isinstance(doc.get("body"), dict):
        return {"body": {"problem": "the wipe journal was unreadable"}, "signature": None}
    return doc


def _remove(path: Path, problems: list[str], root: Path) -> None:
    """Delete one entry whatever it is (a planted directory, link or FIFO included), recording
    what could not be removed instead of stopping the wipe."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        problems.append(f"{path.relative_to(root).as_posix()}: {e.strerror}")


def shred_secrets(store: DataDir) -> list[str]:
    """Step 2: destroy every secret the layout marks for shredding (and the key file, when it is
    in the data dir). After it, nothing on the board opens a bundle. Returns what it could not do."""
    marker = _marker(store)
    problems: list[str] = []
    targets = [
        store.path / f.rel for f in store.layout.scan() if f.entry is not None and f.entry.fate is layout.Fate.SHRED
    ]
    kek = _inside(store.path, marker.get("kek_path"))
    if kek is not None:
        targets.append(kek)
    for path in targets:
        try:
            shred_file(path)
        except OSError as e:
            problems.append(f"{path.relative_to(store.path).as_posix()}: {e.strerror}")
            _remove(path, problems, store.path)
    return problems


def complete(store: DataDir, now: datetime) -> dict[str, Any]:
    """Steps 2-4; safe to run again after an interruption at any point, and it carries on past
    any single entry it cannot remove (the attestation lists those)."""
    marker = _marker(store)
    doc: dict[str, Any] = {"body": marker["body"], "signature": marker.get("signature")}
    problems = shred_secrets(store)
    keep = {layout.WIPE_MARKER, layout.DEVICE}
    # Deepest first, so directories are empty when their turn comes.
    for f in sorted(store.layout.scan(), key=lambda f: f.rel.count("/"), reverse=True):
        if f.rel in keep or (f.entry is not None and f.entry.fate is layout.Fate.KEEP):
            continue
        _remove(store.path / f.rel, problems, store.path)
    _remove(store.device_file, problems, store.path)
    fsync_dir(store.path)
    doc["completed"] = format_time(now)
    if problems:
        doc["problems"] = problems[:64]
    atomic_write(store.path / ATTESTATION, json.dumps(doc, indent=2).encode() + b"\n", 0o644)
    _remove(store.path / MARKER, problems, store.path)
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
