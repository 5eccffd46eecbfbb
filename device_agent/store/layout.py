"""The one owner of every path the agent writes in a board's data directory.

Each entry names a file or directory, what it holds, the mode it must have, and its fate at a
wipe. Wipe, status and the permission check derive from this list; every other module asks the
:class:`Layout` for its paths and never builds one. Nothing that came from a bundle, a command
or a message becomes a path, except a bundle id that matched ``[0-9a-f]{32}`` exactly.

``docs/operations.md`` ("The data directory") shows this table to operators; a test checks the
two agree.
"""

from __future__ import annotations

import enum
import fnmatch
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from device_agent.errors import FormatError
from device_agent.wire import HEX32_RE


class Fate(enum.Enum):
    """What a wipe does to an entry."""

    SHRED = "shred"  # key material: overwritten with random bytes, fsynced, unlinked first
    DELETE = "delete"  # unlinked: ciphertext the shredded keys opened, or nothing secret
    KEEP = "keep"  # survives the wipe


@dataclass(frozen=True)
class Entry:
    pattern: str  # a POSIX path relative to the data dir; '*' matches within one name
    what: str
    mode: int
    fate: Fate
    kind: str = "file"  # file, dir or socket
    name_re: str | None = None  # when set, the exact form of the last name (stricter than the pattern)

    def matches(self, rel: str) -> bool:
        if rel.count("/") != self.pattern.count("/") or not fnmatch.fnmatchcase(rel, self.pattern):
            return False
        return self.name_re is None or re.fullmatch(self.name_re, rel.rsplit("/", 1)[-1]) is not None


DEVICE = "device.json"
KEYS = "keys.wrapped"
KEYS_UPGRADE = "keys.wrapped.upgrade"
KEK = "kek.bin"
TRUST = "trust.json"
STATE = "state.json"
TOKENS = "tokens.json"
BUDGETS = "budgets.json"
BUNDLES = "bundles"
EVENTS = "events.db"
OUTBOX = "outbox.db"
AUDIT = "audit"
SOCKET = "agent.sock"
LOCK = ".lock"
WIPE_MARKER = "WIPING"
ATTESTATION = "wipe-attestation.json"
LEARNING = "learning"
FEEDBACK = f"{LEARNING}/feedback.enc"
LEARNING_STATE = f"{LEARNING}/state.json"
UPDATE_LOG = f"{LEARNING}/updates.log"
VERSION_RE = r"[0-9a-f]{32}-[0-9]{1,12}\.ewv"
UPDATE_STAGING = "update.part"
UPDATE_PAYLOAD = "update-payload.part"

ENTRIES: tuple[Entry, ...] = (
    Entry(DEVICE, "public identity: device id and public keys", 0o644, Fate.DELETE),
    Entry(KEYS, "the device's private keys and board secret, wrapped under the passphrase or KEK", 0o600, Fate.SHRED),
    Entry(KEYS_UPGRADE, "transient: the keys rewrapped while an upgrade from release 0.1 runs", 0o600, Fate.SHRED),
    Entry(KEK, "a key-encryption key file, if kept in the data dir (better off it: tmpfs, TPM)", 0o600, Fate.SHRED),
    Entry(TRUST, "trust anchors: publisher, operator, recovery and receipt public keys (sealed)", 0o600, Fate.DELETE),
    Entry(STATE, "installed records, highest accepted versions, the clock floor (sealed)", 0o600, Fate.DELETE),
    Entry(TOKENS, "local API tokens, as SHA-256 digests, with roles (sealed)", 0o600, Fate.DELETE),
    Entry(BUDGETS, "daily query budgets: rows counted as spent and time left, per token (not sealed)",
          0o600, Fate.DELETE),
    Entry(BUNDLES, "installed bundles", 0o700, Fate.DELETE, "dir"),
    Entry(f"{BUNDLES}/*.ewb", "a bundle exactly as received: still encrypted to this device", 0o600, Fate.DELETE,
          name_re=r"[0-9a-f]{32}\.ewb"),
    Entry(f"{BUNDLES}/*.key", "the bundle's content key, sealed with a key from the board secret (per model: "
          "retiring a model shreds it)", 0o600, Fate.SHRED, name_re=r"[0-9a-f]{32}\.key"),
    Entry(EVENTS, "detections and refusals (SQLite, WAL)", 0o600, Fate.DELETE),
    Entry(f"{EVENTS}-wal", "the event store's write-ahead log", 0o600, Fate.DELETE),
    Entry(f"{EVENTS}-shm", "the event store's shared-memory index", 0o600, Fate.DELETE),
    Entry(OUTBOX, "signed telemetry reports not yet acknowledged by the broker (SQLite, WAL)", 0o600, Fate.DELETE),
    Entry(f"{OUTBOX}-wal", "the outbox's write-ahead log", 0o600, Fate.DELETE),
    Entry(f"{OUTBOX}-shm", "the outbox's shared-memory index", 0o600, Fate.DELETE),
    Entry(AUDIT, "the hash-chained audit log", 0o700, Fate.DELETE, "dir"),
    Entry(f"{AUDIT}/audit-*.jsonl", "audit segments: one record per authenticated query, counted summaries of "
          "anonymous refusals, no raw inputs; at most serve.audit.max_total_bytes together", 0o600, Fate.DELETE),
    Entry(f"{AUDIT}/fingerprint.key", "the key that fingerprints inputs in the audit log", 0o600, Fate.SHRED),
    Entry(f"{AUDIT}/head.json", "the audit chain's last checkpoint", 0o600, Fate.DELETE),
    Entry(f"{AUDIT}/anchor.json", "where the retained audit chain starts", 0o600, Fate.DELETE),
    Entry(LEARNING, "local continual learning (docs/learning.md)", 0o700, Fate.DELETE, "dir"),
    Entry(FEEDBACK, "labelled feedback examples and their sources, encrypted under a key from the board secret",
          0o600, Fate.SHRED),
    Entry(LEARNING_STATE, "which local version serves, the versions kept and their digests (sealed)", 0o600,
          Fate.DELETE),
    Entry(UPDATE_LOG, "the update log: accepted local versions, each entry signed by the board (no examples)",
          0o600, Fate.DELETE),
    Entry(f"{LEARNING}/*.ewv", "a local version: the learnt head's weights, encrypted under a key from the board "
          "secret", 0o600, Fate.SHRED, name_re=VERSION_RE),
    Entry(f"{LEARNING}/.*.tmp-*", "transient: feedback, a local version or the learning state being replaced",
          0o600, Fate.SHRED),
    Entry(SOCKET, "the local API's Unix socket, without a runtime directory", 0o660, Fate.DELETE, "socket"),
    Entry(LOCK, "serialises writers (install, rollback, wipe)", 0o600, Fate.DELETE),
    Entry(UPDATE_STAGING, "transient: an over-the-air update being downloaded (a bundle or an envelope, still "
          "encrypted to this device); removed once installed or refused, or at the next start after a killed "
          "download", 0o600, Fate.DELETE),
    Entry(UPDATE_PAYLOAD, "transient: the encrypted shared payload of an over-the-air update of a version 2 "
          "release; removed once installed or refused, or at the next start after a killed download", 0o600,
          Fate.DELETE),
    Entry(WIPE_MARKER, "transient: a wipe in progress (resumed at the next start)", 0o600, Fate.DELETE),
    Entry(ATTESTATION, "the signed wipe attestation", 0o644, Fate.KEEP),
    # atomic_write's temporary files, left only by a power cut in the middle of a write; those
    # of key files hold key material and are shredded like the keys
    Entry(f".{KEYS}*.tmp-*", "transient: the wrapped keys being replaced", 0o600, Fate.SHRED),
    Entry(".*.tmp-*", "transient: a file being replaced atomically", 0o600, Fate.DELETE),
    Entry(f"{BUNDLES}/.*.key.tmp-*", "transient: a bundle's local key being stored", 0o600, Fate.SHRED),
    Entry(f"{BUNDLES}/.*.tmp-*", "transient: a bundle being stored", 0o600, Fate.DELETE),
    Entry(f"{AUDIT}/.*.tmp-*", "transient: an audit checkpoint being replaced", 0o600, Fate.DELETE),
)


def entry_for(rel: str) -> Entry | None:
    """The layout entry a relative path belongs to, or None for a file the agent never writes."""
    for e in ENTRIES:
        if e.matches(rel):
            return e
    return None


@dataclass(frozen=True)
class Found:
    rel: str
    entry: Entry | None
    mode: int
    kind: str


class Layout:
    """Paths in one data directory, by name."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        if not any(e.pattern == name for e in ENTRIES):
            raise KeyError(f"{name} is not in the data-directory layout")
        return self.root / name

    def bundle(self, bundle_id: str, suffix: str = ".ewb") -> Path:
        if not HEX32_RE.fullmatch(bundle_id) or suffix not in (".ewb", ".key"):
            raise FormatError("invalid bundle id")
        return self.root / BUNDLES / f"{bundle_id}{suffix}"

    def local_version(self, bundle_id: str, number: int) -> Path:
        """A local version's file: named by the bundle it was learnt on and its number only."""
        name = f"{bundle_id}-{number}.ewv"
        if not isinstance(number, int) or number < 1 or not re.fullmatch(VERSION_RE, name):
            raise FormatError("invalid local version name")
        return self.root / LEARNING / name

    def scan(self) -> list[Found]:
        """Everything under the data dir (links are reported, never followed)."""
        found: list[Found] = []
        if not self.root.is_dir():
            return found
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in sorted(dirnames) + sorted(filenames):
                p = Path(dirpath) / name
                try:
                    st = p.lstat()
                except FileNotFoundError:
                    continue  # replaced or removed since it was listed (an atomic write, a wipe)
                kind = (
                    "dir" if stat.S_ISDIR(st.st_mode)
                    else "socket" if stat.S_ISSOCK(st.st_mode)
                    else "file" if stat.S_ISREG(st.st_mode)
                    else "other"
                )
                rel = p.relative_to(self.root).as_posix()
                found.append(Found(rel, entry_for(rel), stat.S_IMODE(st.st_mode), kind))
        return found

    def problems(self) -> list[str]:
        """Files the agent never writes, entries of the wrong kind, and modes wider than listed."""
        out = []
        root_mode = stat.S_IMODE(self.root.stat().st_mode) if self.root.is_dir() else 0
        if root_mode & 0o077:
            out.append(f"{self.root} is mode {root_mode:o}, wider than 700")
        for f in self.scan():
            if f.entry is None:
                out.append(f"{f.rel} is not a file the agent writes")
            elif f.kind != f.entry.kind:
                out.append(f"{f.rel} is a {f.kind}, expected a {f.entry.kind}")
            elif f.mode & ~f.entry.mode:
                out.append(f"{f.rel} is mode {f.mode:o}, wider than {f.entry.mode:o}")
        return out

    def tighten_modes(self) -> list[str]:
        """Narrow every listed entry to its mode (files written by an older release, or copied
        with wider modes); returns what changed. Nothing is ever widened."""
        changed = []
        for f in self.scan():
            if f.entry is not None and f.kind == f.entry.kind and f.mode & ~f.entry.mode:
                os.chmod(self.root / f.rel, f.mode & f.entry.mode, follow_symlinks=False)
                changed.append(f.rel)
        if self.root.is_dir() and stat.S_IMODE(self.root.stat().st_mode) & 0o077:
            os.chmod(self.root, 0o700)
            changed.append(".")
        return changed
