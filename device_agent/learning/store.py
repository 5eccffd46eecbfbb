"""Learning's files on the board, under the paths :mod:`device_agent.store.layout` owns.

- ``learning/feedback.enc``: every example held (inputs, labels, sources, times, review state),
  one ChaCha20-Poly1305 blob under a key derived from the board secret (HKDF, its own purpose);
- ``learning/<bundle_id>-<n>.ewv``: local version ``n`` learnt on that bundle: the head's weights,
  encrypted under the same key, with the file's name as associated data;
- ``learning/state.json``: which local version serves, the versions kept and their digests
  (sealed like the board's other trusted files);
- ``learning/updates.log``: one JSON line per accepted version or rollback, each body signed by
  the board's identity key and chained to the previous one by its digest.

Every file is replaced atomically; a version file is written before the state names it, and
dropped versions are shredded only after the state stops naming them, so a power cut at any
instant leaves a state whose current version is on disk.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from device_agent import crypto
from device_agent.config import LearningConfig
from device_agent.errors import FormatError, IntegrityError, TamperedState
from device_agent.learning.head import HeadWeights
from device_agent.store import layout
from device_agent.store.datadir import DataDir
from device_agent.store.fsutil import atomic_write, make_private_dir, read_bounded, shred_file
from device_agent.store.keys import DeviceKeys
from device_agent.wire import HEX32_RE, HEX64_RE, canonical_json, loads_json

PURPOSE = b"edgeward/learning-data/v1"  # HKDF purpose of the key that encrypts feedback and versions
FEEDBACK_AAD = b"edgeward/feedback/v1"
FEEDBACK_MAGIC = b"EWFB1"
VERSION_MAGIC = b"EWHV1"
STATE_SCHEMA = "edgeward.learning-state/1"
LOG_SCHEMA = "edgeward.learning-update/1"
LOG_DOMAIN = b"edgeward/learning-update/v1"
_U32 = struct.Struct(">I")


def data_key(keys: DeviceKeys) -> bytearray:
    """The key that encrypts feedback and local versions (the caller wipes it)."""
    if keys.board_secret is None:
        raise FormatError("these keys predate local learning; the data dir must be upgraded first")
    return crypto.derive_key(keys.board_secret, PURPOSE)


# --- feedback --------------------------------------------------------------------------------------


@dataclass
class Feedback:
    """The examples held on the board, in arrival order. ``x`` rows are model inputs (float32)."""

    shape: tuple[int, ...]
    x: np.ndarray
    meta: list[dict[str, Any]]  # id, source, label, received (epoch s), status, reason, digest

    @classmethod
    def empty(cls, shape: tuple[int, ...]) -> Feedback:
        return cls(shape, np.zeros((0, *shape), dtype=np.float32), [])

    def keep(self, mask: np.ndarray) -> Feedback:
        return Feedback(self.shape, self.x[mask], [m for m, k in zip(self.meta, mask, strict=True) if k])

    def encode(self) -> bytes:
        head = canonical_json({"schema": "edgeward.feedback/1", "shape": list(self.shape), "examples": self.meta})
        return FEEDBACK_MAGIC + _U32.pack(len(head)) + head + np.ascontiguousarray(self.x, dtype="<f4").tobytes()

    @classmethod
    def decode(cls, data: bytes | bytearray, config: LearningConfig) -> Feedback:
        if data[:5] != FEEDBACK_MAGIC or len(data) < 9:
            raise FormatError("the feedback store is not an EdgeWard feedback store")
        (n,) = _U32.unpack_from(data, 5)
        if 9 + n > len(data):
            raise FormatError("the feedback store is truncated")
        doc = loads_json(memoryview(data)[9 : 9 + n], "feedback store")
        shape = tuple(int(d) for d in doc["shape"])
        meta = list(doc["examples"])
        if len(meta) > config.max_examples:
            raise FormatError("the feedback store holds more examples than the board allows")
        per = int(np.prod(shape)) * 4
        body = memoryview(data)[9 + n :]
        if len(body) != per * len(meta):
            raise FormatError("the feedback store's arrays do not match its index")
        x = np.frombuffer(bytes(body), dtype="<f4").astype(np.float32).reshape((len(meta), *shape))
        return cls(shape, x, meta)


# --- the learning state ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Version:
    number: int
    sha256: str  # of the version's plaintext (the head's weights)
    created: float
    parent: int | None
    examples: int

    def to_json(self) -> dict[str, Any]:
        return {"number": self.number, "sha256": self.sha256, "created": self.created, "parent": self.parent,
                "examples": self.examples}

    @classmethod
    def from_json(cls, raw: Any) -> Version:
        try:
            v = cls(int(raw["number"]), str(raw["sha256"]), float(raw["created"]),
                    None if raw["parent"] is None else int(raw["parent"]), int(raw["examples"]))
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"learning/state.json lists a malformed version: {e}") from e
        if not HEX64_RE.fullmatch(v.sha256) or v.number < 1:
            raise FormatError("learning/state.json lists a malformed version")
        return v


@dataclass(frozen=True)
class LearningState:
    """Which bundle the local versions belong to, which one serves (None: the publisher's head)."""

    bundle_id: str | None = None
    current: int | None = None
    versions: tuple[Version, ...] = ()
    next_version: int = 1
    counters: dict[str, int] = field(default_factory=dict)  # held, rejected, deferred... since provisioning

    def version(self, number: int) -> Version | None:
        return next((v for v in self.versions if v.number == number), None)

    def to_json(self) -> dict[str, Any]:
        return {"schema": STATE_SCHEMA, "bundle_id": self.bundle_id, "current": self.current,
                "versions": [v.to_json() for v in self.versions], "next_version": self.next_version,
                "counters": dict(sorted(self.counters.items()))}

    @classmethod
    def from_json(cls, raw: Any) -> LearningState:
        try:
            if raw["schema"] != STATE_SCHEMA:
                raise FormatError(f"learning/state.json is not {STATE_SCHEMA}")
            bundle_id = raw["bundle_id"]
            if bundle_id is not None and not HEX32_RE.fullmatch(str(bundle_id)):
                raise FormatError("learning/state.json names a malformed bundle id")
            st = cls(bundle_id, None if raw["current"] is None else int(raw["current"]),
                     tuple(Version.from_json(v) for v in raw["versions"]), int(raw["next_version"]),
                     {str(k): int(v) for k, v in dict(raw["counters"]).items()})
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"learning/state.json is malformed: {e}") from e
        if st.current is not None and st.version(st.current) is None:
            raise FormatError("learning/state.json serves a version it does not list")
        return st

    def count(self, **more: int) -> LearningState:
        c = dict(self.counters)
        for k, v in more.items():
            c[k] = c.get(k, 0) + v
        return replace(self, counters=c)


# --- the store ---------------------------------------------------------------------------------------


class LearningStore:
    """File-level access to learning's part of one data directory. No decisions here."""

    def __init__(self, store: DataDir, config: LearningConfig) -> None:
        self.store = store
        self.layout = store.layout
        self.config = config
        self.dir = self.layout.path(layout.LEARNING)
        self.state_file = self.layout.path(layout.LEARNING_STATE)
        self.feedback_file = self.layout.path(layout.FEEDBACK)
        self.log_file = self.layout.path(layout.UPDATE_LOG)

    # state (sealed)
    def state(self, seal_key: bytes | bytearray) -> LearningState:
        doc = self.store.read_sealed(layout.LEARNING_STATE, seal_key)
        return LearningState() if doc is None else LearningState.from_json(doc)

    def save_state(self, st: LearningState, seal_key: bytes | bytearray) -> None:
        make_private_dir(self.dir)
        self.store.write_sealed(layout.LEARNING_STATE, st.to_json(), seal_key)

    def stamp(self) -> tuple[int, int, int] | None:
        try:
            s = os.stat(self.state_file)
        except FileNotFoundError:
            return None
        return (s.st_ino, s.st_mtime_ns, s.st_size)

    # feedback (encrypted)
    def feedback(self, key: bytes | bytearray, shape: tuple[int, ...]) -> Feedback:
        try:
            blob = read_bounded(self.feedback_file, self.config.max_store_bytes + (1 << 20) * 8)
        except FileNotFoundError:
            return Feedback.empty(shape)
        try:
            plain = crypto.open_local(key, FEEDBACK_AAD, blob)
        except IntegrityError as e:
            raise TamperedState("learning/feedback.enc fails its authentication check: altered, or written by "
                                "another board; nothing was learnt from it. Remove the file to start afresh (the "
                                "examples in it are lost)") from e
        try:
            fb = Feedback.decode(plain, self.config)
        finally:
            crypto.wipe(plain)
        return fb if fb.shape == shape else Feedback.empty(shape)

    def save_feedback(self, fb: Feedback, key: bytes | bytearray) -> None:
        make_private_dir(self.dir)
        plain = bytearray(fb.encode())
        try:
            if len(plain) > self.config.max_store_bytes + (1 << 20) * 4:
                raise FormatError("the feedback store would exceed learning.max_store_bytes")
            atomic_write(self.feedback_file, crypto.seal_local(key, FEEDBACK_AAD, plain), 0o600)
        finally:
            crypto.wipe(plain)

    def shred_feedback(self) -> None:
        shred_file(self.feedback_file)

    # versions (encrypted)
    def write_version(self, bundle_id: str, number: int, head: HeadWeights, key: bytes | bytearray) -> str:
        """Store a version; returns the digest of its plaintext (what the state and the log name)."""
        plain = encode_head(head)
        path = self.layout.local_version(bundle_id, number)
        make_private_dir(self.dir)
        atomic_write(path, crypto.seal_local(key, path.name.encode(), plain), 0o600)
        return crypto.sha256_hex(plain)

    def read_version(self, bundle_id: str, v: Version, key: bytes | bytearray) -> HeadWeights:
        """A version's weights, checked against the digest the sealed state recorded."""
        path = self.layout.local_version(bundle_id, v.number)
        try:
            blob = read_bounded(path, self.config.max_store_bytes)
            plain = crypto.open_local(key, path.name.encode(), blob)
        except FileNotFoundError as e:
            raise IntegrityError(f"local version {v.number} is missing from the board") from e
        except IntegrityError as e:
            raise IntegrityError(f"local version {v.number} fails its authentication check") from e
        if not crypto.constant_time_equal(crypto.sha256_hex(plain), v.sha256):
            raise IntegrityError(f"local version {v.number} differs from the digest the board recorded")
        return decode_head(bytes(plain))

    def version_files(self) -> Iterator[tuple[str, int, Path]]:
        if not self.dir.is_dir():
            return
        for p in sorted(self.dir.glob("*.ewv")):
            if layout.entry_for(f"{layout.LEARNING}/{p.name}") is not None:
                bid, n = p.stem.split("-")
                yield bid, int(n), p

    def collect_garbage(self, st: LearningState) -> list[str]:
        """Shred version files the state no longer names, and temporaries left by a power cut."""
        keep = {(st.bundle_id, v.number) for v in st.versions}
        gone = []
        for bid, n, p in list(self.version_files()):
            if (bid, n) not in keep:
                shred_file(p)
                gone.append(p.name)
        if self.dir.is_dir():
            for p in self.dir.glob(".*.tmp-*"):
                shred_file(p)
        return gone

    # the update log (signed)
    def append_log(self, body: dict[str, Any], keys: DeviceKeys) -> str:
        """Sign and append one entry; returns its digest (the next entry's ``prev``)."""
        data = canonical_json(body)
        sig = crypto.sign(keys.signer(), LOG_DOMAIN, data)
        line = json.dumps({"entry": body, "signature": base64.b64encode(sig).decode()}, sort_keys=True,
                          separators=(",", ":")).encode() + b"\n"
        make_private_dir(self.dir)
        fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size:
                # A power cut can leave a torn last line: end it so this entry starts on its own.
                with open(self.log_file, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        os.write(fd, b"\n")
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        return crypto.sha256_hex(data)

    def read_log(self) -> bytes:
        try:
            return read_bounded(self.log_file, self.config.max_log_bytes)
        except FileNotFoundError:
            return b""


def encode_head(head: HeadWeights) -> bytes:
    meta = canonical_json({"weight": list(head.weight.shape), "bias": list(head.bias.shape)})
    return (VERSION_MAGIC + _U32.pack(len(meta)) + meta + np.ascontiguousarray(head.weight, "<f4").tobytes()
            + np.ascontiguousarray(head.bias, "<f4").tobytes())


def decode_head(data: bytes) -> HeadWeights:
    if data[:5] != VERSION_MAGIC or len(data) < 9:
        raise FormatError("a local version is not an EdgeWard head")
    (n,) = _U32.unpack_from(data, 5)
    meta = loads_json(memoryview(data)[9 : 9 + n], "local version")
    ws, bs = tuple(int(d) for d in meta["weight"]), tuple(int(d) for d in meta["bias"])
    nw, nb = int(np.prod(ws)) * 4, int(np.prod(bs)) * 4
    body = data[9 + n :]
    if len(body) != nw + nb:
        raise FormatError("a local version's weights do not match their shapes")
    w = np.frombuffer(body[:nw], "<f4").astype(np.float32).reshape(ws)
    b = np.frombuffer(body[nw:], "<f4").astype(np.float32).reshape(bs)
    return HeadWeights(w, b)


def verify_log(data: bytes, sign_public: bytes, config: LearningConfig) -> list[dict[str, Any]]:
    """Every entry of the update log, each signature and link checked. A line that is not JSON
    is the torn end of an append cut by a power cut, and is not an entry; removing, editing or
    reordering an entry breaks a signature or the chain."""
    out: list[dict[str, Any]] = []
    prev = "0" * 64
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            body, sig = doc["entry"], base64.b64decode(doc["signature"], validate=True)
            if not isinstance(body, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            continue
        if len(out) >= config.max_log_entries:
            raise FormatError("the update log has more entries than learning.max_log_entries")
        raw = canonical_json(body)
        crypto.verify(sign_public, LOG_DOMAIN, raw, sig)
        if body.get("schema") != LOG_SCHEMA or body.get("prev") != prev or body.get("seq") != len(out) + 1:
            raise IntegrityError(f"update log entry {len(out) + 1} does not follow the one before it")
        prev = crypto.sha256_hex(raw)
        out.append(body)
    return out


def log_head(entries: list[dict[str, Any]]) -> tuple[int, str]:
    """(the last entry's seq, its digest): what the next entry continues from."""
    if not entries:
        return 0, "0" * 64
    return int(entries[-1]["seq"]), crypto.sha256_hex(canonical_json(entries[-1]))
