"""The EdgeWard bundle format, version 2: one shared payload per release, one small envelope per
device (``docs/bundle-format.md``, "Version 2", is the specification).

A release's model is encrypted once, under a fresh random content key, into ``payload.ewp``,
which starts with the release head: the fields every device shares and the root of a Merkle tree
(RFC 9162) over the devices' envelopes, signed once by the publisher. Each device's envelope
(``.ewe``) holds its target, the content key sealed to its key, and the inclusion proof of its
leaf. A single file for field technicians is the envelope followed by the payload file.

Reading follows one order, and nothing skips a step: bound and read the envelope and the
payload's fixed header; find the publisher among the trust anchors and verify the signature over
the exact head bytes before a field of it is parsed; parse the head strictly; check the envelope's
inclusion proof against the signed root; then the verified fields become the same
:class:`~device_agent.bundle.format.Manifest` a version 1 bundle gives, so the board's trust
decisions (target, time, owner, anti-rollback, retired ids) are the same functions for both.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from device_agent import crypto
from device_agent.bundle.format import COMPRESSIONS, PAYLOAD_AAD_PREFIX_V2, RUNTIMES, Manifest
from device_agent.config import DEFAULT_LIMITS, BundleLimits
from device_agent.errors import BadSignature, FormatError, UnknownPublisher
from device_agent.wire import (
    FPR_RE,
    HEX32_RE,
    HEX64_RE,
    ID_RE,
    MAX_VERSION,
    canonical_json,
    choice_field,
    format_time,
    int_field,
    loads_json,
    obj_fields,
    parse_time,
    str_field,
)

ENVELOPE_MAGIC = b"\x89EWE\r\n\x1a\n"
PAYLOAD_MAGIC = b"\x89EWP\r\n\x1a\n"
FORMAT_VERSION = 2
PREFIX = struct.Struct(">8sHHI")  # magic, format version, flags, a length: both files start so
PREFIX_BYTES = PREFIX.size
PAYLOAD_HEADER = struct.Struct(">8sHHI16s")  # magic, version, flags, head length, publisher key id
PAYLOAD_HEADER_BYTES = PAYLOAD_HEADER.size
LEAF = struct.Struct(">16sI32s80sB")  # release id, leaf index, device key digest, sealed key, id length
ENVELOPE_MIN_BYTES = PREFIX_BYTES + LEAF.size + 1 + 1  # a one-character device id, no proof
RELEASE_SCHEMA = "edgeward.release/2"
SIGNING_DOMAIN = b"edgeward/release/v2"
LEAF_DOMAIN = b"edgeward/release-leaf/v2\x00"


def _prefix(data: bytes | bytearray | memoryview, magic: bytes, what: str) -> int:
    """Check a version 2 file's magic, format version and flags; return its length field."""
    if len(data) < PREFIX_BYTES:
        raise FormatError(f"{what} is truncated: {len(data)} bytes is shorter than its header")
    got, version, flags, length = PREFIX.unpack_from(data, 0)
    if got != magic:
        raise FormatError(f"not an EdgeWard {what} (bad magic)")
    if version != FORMAT_VERSION:
        raise FormatError(
            f"{what} format version {version} is not supported (this agent reads {FORMAT_VERSION}); "
            "upgrade the agent or repack the release"
        )
    if flags != 0:
        raise FormatError(f"{what} header flags {flags:#x} are not defined in format version 2")
    return int(length)


def envelope_length(data: bytes | bytearray | memoryview, limits: BundleLimits = DEFAULT_LIMITS) -> int:
    """The whole envelope's length from its first 16 bytes, bounded before anything more is read."""
    length = _prefix(data, ENVELOPE_MAGIC, "envelope")
    if not ENVELOPE_MIN_BYTES <= length <= limits.max_envelope_bytes:
        raise FormatError(
            f"envelope length {length} is outside [{ENVELOPE_MIN_BYTES}, {limits.max_envelope_bytes}]"
        )
    return length


def payload_head_length(data: bytes | bytearray | memoryview, limits: BundleLimits = DEFAULT_LIMITS) -> int:
    """The signed head's length from the payload file's 32-byte header, bounded: the bytes of
    header, release head and signature that precede the ciphertext."""
    head_len = _prefix(data, PAYLOAD_MAGIC, "release payload")
    if len(data) < PAYLOAD_HEADER_BYTES:
        raise FormatError("release payload is truncated inside its header")
    if not 2 <= head_len <= limits.max_release_head_bytes:
        raise FormatError(f"release head length {head_len} exceeds the limit of {limits.max_release_head_bytes}")
    return PAYLOAD_HEADER_BYTES + head_len + crypto.SIGNATURE_BYTES


# --- the envelope -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Envelope:
    """One device's envelope, parsed for its structure only: nothing in it is trusted until its
    leaf is proven to be under the publisher's signed root (:func:`verify_release`)."""

    release_id: str
    index: int
    device_key_digest: bytes
    sealed_key: bytes
    device_id: str
    proof: tuple[bytes, ...]
    leaf: bytes  # the leaf hash of the exact bytes received

    @property
    def device_key(self) -> str:
        return "sha256:" + self.device_key_digest.hex()


def leaf_bytes(release_id: str, index: int, device_box_public: bytes, sealed_key: bytes, device_id: str) -> bytes:
    """What one device's leaf hashes: everything its envelope says except the proof."""
    if len(sealed_key) != crypto.SEALED_KEY_BYTES or not ID_RE.fullmatch(device_id):
        raise ValueError("a sealed key of 80 bytes and a device id are needed")
    key_digest = bytes.fromhex(crypto.fingerprint(device_box_public).removeprefix("sha256:"))
    return LEAF.pack(bytes.fromhex(release_id), index, key_digest, sealed_key, len(device_id)) + device_id.encode()


def leaf_hash(leaf: bytes | bytearray | memoryview) -> bytes:
    return crypto.merkle_leaf(LEAF_DOMAIN, leaf)


def build_envelope(leaf: bytes | bytearray | memoryview, proof: list[bytes]) -> bytes:
    """An envelope from its leaf bytes and inclusion proof (the packager's side)."""
    length = PREFIX_BYTES + len(leaf) + 1 + crypto.HASH_BYTES * len(proof)
    return PREFIX.pack(ENVELOPE_MAGIC, FORMAT_VERSION, 0, length) + bytes(leaf) + bytes([len(proof)]) + b"".join(proof)


def parse_envelope(data: bytes | bytearray | memoryview, limits: BundleLimits = DEFAULT_LIMITS) -> Envelope:
    """Parse exactly one envelope (``data`` is its whole length, as its header declares)."""
    view = memoryview(data).cast("B")
    length = envelope_length(view, limits)
    if len(view) < length:
        raise FormatError(f"envelope is truncated: {len(view)} of {length} bytes")
    if len(view) > length:
        raise FormatError("envelope has bytes appended after it")
    rid, index, key_digest, sealed_key, id_len = LEAF.unpack_from(view, PREFIX_BYTES)
    at = PREFIX_BYTES + LEAF.size
    if not 1 <= id_len <= 64 or at + id_len + 1 > length:
        raise FormatError(f"envelope device id length {id_len} is out of bounds")
    try:
        device_id = bytes(view[at : at + id_len]).decode("ascii")
    except UnicodeDecodeError as e:
        raise FormatError("envelope device id is not ASCII") from e
    if not ID_RE.fullmatch(device_id):
        raise FormatError("envelope device id is not a valid device id")
    leaf_end = at + id_len
    count = view[leaf_end]
    # A tree of at most max_release_devices leaves is at most that many bits deep.
    if count > limits.max_release_devices.bit_length() or leaf_end + 1 + crypto.HASH_BYTES * count != length:
        raise FormatError("envelope's inclusion proof does not fill the envelope exactly")
    start = leaf_end + 1
    proof = tuple(
        bytes(view[start + i * crypto.HASH_BYTES : start + (i + 1) * crypto.HASH_BYTES]) for i in range(count)
    )
    return Envelope(
        release_id=bytes(rid).hex(),
        index=index,
        device_key_digest=bytes(key_digest),
        sealed_key=bytes(sealed_key),
        device_id=device_id,
        proof=proof,
        leaf=leaf_hash(view[PREFIX_BYTES:leaf_end]),
    )


# --- the signed release head ------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseHead:
    """What every device of a release shares, and the Merkle root over its envelopes; signed once
    by the publisher. Constructed only from verified bytes or by the packager before signing."""

    release_id: str
    model_id: str
    model_version: int
    created: datetime
    expires: datetime | None
    end_of_life: datetime | None
    publisher: str
    profile: str
    runtime: str
    cipher: str
    compression: str
    chunk_size: int
    sealed_length: int
    payload_length: int
    payload_sha256: str
    tags_sha256: str
    devices: int
    merkle_root: str
    schema: str = RELEASE_SCHEMA

    FIELDS = frozenset(
        {
            "schema", "release_id", "model_id", "model_version", "created", "expires", "end_of_life",
            "publisher", "profile", "runtime", "cipher", "compression", "chunk_size", "sealed_length",
            "payload_length", "payload_sha256", "tags_sha256", "devices", "merkle_root",
        }
    )

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "release_id": self.release_id,
            "model_id": self.model_id,
            "model_version": self.model_version,
            "created": format_time(self.created),
            "expires": format_time(self.expires) if self.expires else None,
            "end_of_life": format_time(self.end_of_life) if self.end_of_life else None,
            "publisher": self.publisher,
            "profile": self.profile,
            "runtime": self.runtime,
            "cipher": self.cipher,
            "compression": self.compression,
            "chunk_size": self.chunk_size,
            "sealed_length": self.sealed_length,
            "payload_length": self.payload_length,
            "payload_sha256": self.payload_sha256,
            "tags_sha256": self.tags_sha256,
            "devices": self.devices,
            "merkle_root": self.merkle_root,
        }

    @classmethod
    def from_json(cls, raw: Any, limits: BundleLimits = DEFAULT_LIMITS) -> ReleaseHead:
        h = obj_fields(raw, "release head", set(cls.FIELDS), set(cls.FIELDS))
        if h["schema"] != RELEASE_SCHEMA:
            raise FormatError(f"release head schema {str(h['schema'])[:40]!r} is not {RELEASE_SCHEMA}")
        chunk_size = int_field(h["chunk_size"], "chunk_size", limits.min_chunk_bytes, limits.max_chunk_bytes)
        sealed_length = int_field(h["sealed_length"], "sealed_length", 0, limits.max_bundle_bytes)
        payload_length = int_field(h["payload_length"], "payload_length", 0, limits.max_bundle_bytes)
        if crypto.ChunkLayout(sealed_length, chunk_size).payload_length != payload_length:
            raise FormatError("payload_length does not match sealed_length and chunk_size")
        return cls(
            release_id=str_field(h["release_id"], "release_id", HEX32_RE),
            model_id=str_field(h["model_id"], "model_id", ID_RE),
            model_version=int_field(h["model_version"], "model_version", 1, MAX_VERSION),
            created=parse_time(h["created"], "created"),
            expires=parse_time(h["expires"], "expires") if h["expires"] is not None else None,
            end_of_life=parse_time(h["end_of_life"], "end_of_life") if h["end_of_life"] is not None else None,
            publisher=str_field(h["publisher"], "publisher", FPR_RE),
            profile=str_field(h["profile"], "profile", ID_RE),
            runtime=choice_field(h["runtime"], "runtime", RUNTIMES),
            cipher=choice_field(h["cipher"], "cipher", crypto.SUITES),
            compression=choice_field(h["compression"], "compression", COMPRESSIONS),
            chunk_size=chunk_size,
            sealed_length=sealed_length,
            payload_length=payload_length,
            payload_sha256=str_field(h["payload_sha256"], "payload_sha256", HEX64_RE),
            tags_sha256=str_field(h["tags_sha256"], "tags_sha256", HEX64_RE),
            devices=int_field(h["devices"], "devices", 1, limits.max_release_devices),
            merkle_root=str_field(h["merkle_root"], "merkle_root", HEX64_RE),
        )

    @property
    def payload_aad(self) -> bytes:
        return PAYLOAD_AAD_PREFIX_V2 + bytes.fromhex(self.release_id)

    def manifest_for(self, env: Envelope) -> Manifest:
        """The manifest one device's proven envelope and this head make together: the same
        fields a version 1 bundle signs, so one set of trust decisions judges both."""
        return Manifest(
            bundle_id=self.release_id,
            model_id=self.model_id,
            model_version=self.model_version,
            created=self.created,
            expires=self.expires,
            end_of_life=self.end_of_life,
            device_id=env.device_id,
            device_key=env.device_key,
            publisher=self.publisher,
            profile=self.profile,
            runtime=self.runtime,
            cipher=self.cipher,
            compression=self.compression,
            chunk_size=self.chunk_size,
            sealed_length=self.sealed_length,
            payload_length=self.payload_length,
            tags_sha256=self.tags_sha256,
            sealed_key=env.sealed_key,
            schema=RELEASE_SCHEMA,
            format_version=FORMAT_VERSION,
            payload_sha256=self.payload_sha256,
        )


def sign_head(head: ReleaseHead, publisher_public: bytes, sign: Callable[[bytes], bytes]) -> bytes:
    """The signed head that starts ``payload.ewp``: header, canonical head, signature. Round-trips
    through the strict reader, so the packager can never write a head the board refuses."""
    body = canonical_json(head.to_json())
    ReleaseHead.from_json(loads_json(body, "release head"))
    header = PAYLOAD_HEADER.pack(PAYLOAD_MAGIC, FORMAT_VERSION, 0, len(body), crypto.key_id(publisher_public))
    return header + body + sign(header + body)


# --- verification -----------------------------------------------------------------------------------


def _publisher(
    kid: bytes, trusted_publishers: Mapping[bytes, bytes] | list[bytes], limits: BundleLimits
) -> bytes:
    keys = crypto.keys_by_id(trusted_publishers)
    if len(keys) > limits.max_trusted_publishers:
        raise FormatError("too many trusted publisher keys")
    publisher = keys.get(kid)
    if publisher is None:
        raise UnknownPublisher(
            f"release is signed by publisher key id {kid.hex()}, which this board does not trust; "
            "provision the board with that publisher's public key"
        )
    return publisher


def verify_payload_head(
    head: bytes | bytearray | memoryview,
    trusted_publishers: Mapping[bytes, bytes] | list[bytes],
    limits: BundleLimits = DEFAULT_LIMITS,
) -> tuple[ReleaseHead, bytes]:
    """Bounds, publisher, signature and strict parse of a payload file's signed head (exactly
    the bytes before its ciphertext). Returns (release head, publisher key)."""
    view = memoryview(head).cast("B")
    end = payload_head_length(view, limits)
    if len(view) != end:
        raise FormatError("release payload is truncated inside its head or signature")
    _, _, _, head_len, kid = PAYLOAD_HEADER.unpack_from(view, 0)
    publisher = _publisher(bytes(kid), trusted_publishers, limits)
    signed_end = PAYLOAD_HEADER_BYTES + head_len
    try:
        crypto.verify(publisher, SIGNING_DOMAIN, bytes(view[:signed_end]), bytes(view[signed_end:end]))
    except BadSignature as e:
        raise BadSignature(
            f"release head signature does not verify against publisher {crypto.fingerprint(publisher)}: "
            "payload.ewp was altered or corrupted; fetch it again from the publisher"
        ) from e
    # Verified: from here the head bytes are the publisher's.
    release = ReleaseHead.from_json(loads_json(view[PAYLOAD_HEADER_BYTES:signed_end], "release head"), limits)
    if not crypto.constant_time_equal(release.publisher, crypto.fingerprint(publisher)):
        raise FormatError("release head names a different publisher than the key that signed it")
    return release, publisher


def prove_envelope(env: Envelope, release: ReleaseHead) -> None:
    """The envelope belongs to this signed release: same release id, and its leaf's inclusion
    proof leads to the signed Merkle root."""
    if not crypto.constant_time_equal(env.release_id, release.release_id):
        raise BadSignature(
            f"envelope is for release {env.release_id}, the payload is release {release.release_id}; "
            "give the envelope and payload.ewp of the same release"
        )
    if env.index >= release.devices:
        raise BadSignature(
            f"envelope's leaf {env.index} is outside the release's {release.devices} devices; "
            "the envelope was altered: fetch it again"
        )
    root = crypto.merkle_root_from_proof(env.leaf, env.index, release.devices, list(env.proof))
    if not crypto.constant_time_equal(root, bytes.fromhex(release.merkle_root)):
        raise BadSignature(
            "envelope is not part of the signed release (its inclusion proof does not lead to the "
            "signed root); the envelope was altered or belongs to another release: fetch it again"
        )


def verify_release(
    envelope: bytes | bytearray | memoryview,
    payload_head: bytes | bytearray | memoryview,
    payload_file_length: int,
    trusted_publishers: Mapping[bytes, bytes] | list[bytes],
    limits: BundleLimits = DEFAULT_LIMITS,
) -> tuple[Manifest, bytes]:
    """Steps 1-6 of the version 2 verification order on an envelope, the payload file's signed
    head and the payload file's length. Returns (manifest, publisher key); the ciphertext itself
    is not looked at (the tags and payload digests are checked when it is decrypted)."""
    env = parse_envelope(envelope, limits)  # bounds: its structure only, nothing trusted yet
    if payload_file_length + len(envelope) > limits.max_bundle_bytes:
        raise FormatError(
            f"release is {payload_file_length + len(envelope)} bytes, over the limit of {limits.max_bundle_bytes}"
        )
    release, publisher = verify_payload_head(payload_head, trusted_publishers, limits)
    prove_envelope(env, release)
    ciphertext = payload_file_length - len(payload_head)
    if ciphertext < release.payload_length:
        raise FormatError(
            f"release payload is truncated: {ciphertext} of {release.payload_length} bytes; fetch payload.ewp again"
        )
    if ciphertext > release.payload_length:
        raise FormatError("release payload has bytes appended after its ciphertext; fetch payload.ewp again")
    return release.manifest_for(env), publisher


def split_single(
    head: bytes | bytearray | memoryview, limits: BundleLimits = DEFAULT_LIMITS
) -> tuple[memoryview, memoryview]:
    """A single file's (envelope, payload head) from the bytes before its ciphertext."""
    view = memoryview(head).cast("B")
    env_len = envelope_length(view, limits)
    if len(view) < env_len + PAYLOAD_HEADER_BYTES:
        raise FormatError("release file is truncated inside its envelope or payload header")
    end = env_len + payload_head_length(view[env_len:], limits)
    if len(view) < end:
        raise FormatError("release file is truncated inside its head or signature")
    return view[:env_len], view[env_len:end]


def single_head_length(data: bytes | bytearray | memoryview, limits: BundleLimits = DEFAULT_LIMITS) -> int:
    """How many bytes of a single file precede its ciphertext, from the bytes read so far:
    ``data`` holds at least the envelope and the payload's 32-byte header."""
    view = memoryview(data).cast("B")
    env_len = envelope_length(view, limits)
    if len(view) < env_len + PAYLOAD_HEADER_BYTES:
        raise FormatError("release file is truncated inside its envelope or payload header")
    return env_len + payload_head_length(view[env_len : env_len + PAYLOAD_HEADER_BYTES], limits)
