"""The EdgeWard bundle format, version 1 (``docs/bundle-format.md`` is the specification).

This module is the only definition of the format: the agent reads it here and the packager
writes it with :func:`write_bundle`. Reading follows one order, and nothing skips a step:

1. bound and read the fixed header (magic, format version, manifest length, publisher key id);
2. find the publisher key among the trust anchors and verify the signature over the exact
   header and manifest bytes -- before a single manifest field is parsed;
3. parse the manifest strictly (known fields only, types and ranges checked);
4. only then is the payload looked at, and it must match the signed tags digest and lengths.
"""

from __future__ import annotations

import base64
import json
import struct
import uuid
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, BinaryIO

from device_agent import crypto
from device_agent.config import DEFAULT_LIMITS, BundleLimits
from device_agent.errors import BadSignature, FormatError, IntegrityError, UnknownPublisher, UsageError
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

MAGIC = b"\x89EWB\r\n\x1a\n"
FORMAT_VERSION = 1
HEADER = struct.Struct(">8sHHI16s")  # magic, format version, flags, manifest length, key id
HEADER_BYTES = HEADER.size
MANIFEST_SCHEMA = "edgeward.bundle/1"
SIDECAR_SCHEMA = "edgeward.sidecar/1"
SIGNING_DOMAIN = b"edgeward/bundle-manifest/v1"
PAYLOAD_AAD_PREFIX = b"edgeward/payload/v1\x00"
PAYLOAD_AAD_PREFIX_V2 = b"edgeward/payload/v2\x00"  # followed by the 16-byte release id
CONTENTS_MAGIC = b"EWC1"
COMPRESSIONS = ("none", "zlib")
RUNTIMES = ("onnxruntime", "litert")
MODEL_FORMATS = ("onnx", "tflite")
# The runtime that runs each model format: a bundle's runtime follows from its model.
RUNTIME_OF_FORMAT = {"onnx": "onnxruntime", "tflite": "litert"}

# --- manifest ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """The signed description of one bundle for one device. Constructed only from verified bytes
    (:func:`verify_bundle`) or by the packager before signing."""

    bundle_id: str
    model_id: str
    model_version: int
    created: datetime
    expires: datetime | None
    end_of_life: datetime | None
    device_id: str
    device_key: str
    publisher: str
    profile: str
    runtime: str
    cipher: str
    compression: str
    chunk_size: int
    sealed_length: int
    payload_length: int
    tags_sha256: str
    sealed_key: bytes
    schema: str = MANIFEST_SCHEMA
    # Format version 2 (device_agent/bundle/release.py) makes the same manifest from a verified
    # release head and envelope: bundle_id is the release id, and the payload's SHA-256 is signed.
    format_version: int = 1
    payload_sha256: str | None = None

    FIELDS = frozenset(
        {
            "schema", "bundle_id", "model_id", "model_version", "created", "expires",
            "end_of_life", "device_id", "device_key", "publisher", "profile", "runtime", "cipher",
            "compression", "chunk_size", "sealed_length", "payload_length", "tags_sha256",
            "sealed_key",
        }
    )

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "bundle_id": self.bundle_id,
            "model_id": self.model_id,
            "model_version": self.model_version,
            "created": format_time(self.created),
            "expires": format_time(self.expires) if self.expires else None,
            "end_of_life": format_time(self.end_of_life) if self.end_of_life else None,
            "device_id": self.device_id,
            "device_key": self.device_key,
            "publisher": self.publisher,
            "profile": self.profile,
            "runtime": self.runtime,
            "cipher": self.cipher,
            "compression": self.compression,
            "chunk_size": self.chunk_size,
            "sealed_length": self.sealed_length,
            "payload_length": self.payload_length,
            "tags_sha256": self.tags_sha256,
            "sealed_key": base64.b64encode(self.sealed_key).decode(),
        }

    @classmethod
    def from_json(cls, raw: Any, limits: BundleLimits = DEFAULT_LIMITS) -> Manifest:
        m = obj_fields(raw, "manifest", set(cls.FIELDS), set(cls.FIELDS))
        if m["schema"] != MANIFEST_SCHEMA:
            raise FormatError(f"manifest schema {str(m['schema'])[:40]!r} is not {MANIFEST_SCHEMA}")
        chunk_size = int_field(m["chunk_size"], "chunk_size", limits.min_chunk_bytes, limits.max_chunk_bytes)
        sealed_length = int_field(m["sealed_length"], "sealed_length", 0, limits.max_bundle_bytes)
        payload_length = int_field(m["payload_length"], "payload_length", 0, limits.max_bundle_bytes)
        layout = crypto.ChunkLayout(sealed_length, chunk_size)
        if layout.payload_length != payload_length:
            raise FormatError("payload_length does not match sealed_length and chunk_size")
        try:
            sealed_key = base64.b64decode(str_field(m["sealed_key"], "sealed_key"), validate=True)
        except ValueError as e:
            raise FormatError("sealed_key is not base64") from e
        return cls(
            schema=MANIFEST_SCHEMA,
            bundle_id=str_field(m["bundle_id"], "bundle_id", HEX32_RE),
            model_id=str_field(m["model_id"], "model_id", ID_RE),
            model_version=int_field(m["model_version"], "model_version", 1, MAX_VERSION),
            created=parse_time(m["created"], "created"),
            expires=parse_time(m["expires"], "expires") if m["expires"] is not None else None,
            end_of_life=(
                parse_time(m["end_of_life"], "end_of_life") if m["end_of_life"] is not None else None
            ),
            device_id=str_field(m["device_id"], "device_id", ID_RE),
            device_key=str_field(m["device_key"], "device_key", FPR_RE),
            publisher=str_field(m["publisher"], "publisher", FPR_RE),
            profile=str_field(m["profile"], "profile", ID_RE),
            runtime=choice_field(m["runtime"], "runtime", RUNTIMES),
            cipher=choice_field(m["cipher"], "cipher", crypto.SUITES),
            compression=choice_field(m["compression"], "compression", COMPRESSIONS),
            chunk_size=chunk_size,
            sealed_length=sealed_length,
            payload_length=payload_length,
            tags_sha256=str_field(m["tags_sha256"], "tags_sha256", HEX64_RE),
            sealed_key=sealed_key,
        )

    @property
    def layout(self) -> crypto.ChunkLayout:
        return crypto.ChunkLayout(self.sealed_length, self.chunk_size)

    @property
    def payload_aad(self) -> bytes:
        prefix = PAYLOAD_AAD_PREFIX if self.format_version == 1 else PAYLOAD_AAD_PREFIX_V2
        return prefix + bytes.fromhex(self.bundle_id)


# --- sealed contents (inside the encrypted payload) ---------------------------------------------------


@dataclass(frozen=True)
class Sidecar:
    """What the board needs besides the model bytes; encrypted, never in the clear header.

    ``task``, ``policy``, ``preprocess`` and ``model_card`` are open objects interpreted by the
    agent's output, policy and pre-processing code; their own schemas live there.
    """

    model_format: str
    model_sha256: str
    model_length: int
    task: dict[str, Any] = field(default_factory=dict)
    policy: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] | None = None
    model_card: dict[str, Any] | None = None
    schema: str = SIDECAR_SCHEMA

    FIELDS = frozenset({"schema", "model", "task", "policy", "runtime", "preprocess", "model_card"})

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "model": {
                "format": self.model_format,
                "sha256": self.model_sha256,
                "length": self.model_length,
            },
            "task": self.task,
            "policy": self.policy,
            "runtime": self.runtime,
            "preprocess": self.preprocess,
            "model_card": self.model_card,
        }

    @classmethod
    def from_json(cls, raw: Any, limits: BundleLimits = DEFAULT_LIMITS) -> Sidecar:
        s = obj_fields(raw, "sidecar", set(cls.FIELDS), {"schema", "model"})
        if s["schema"] != SIDECAR_SCHEMA:
            raise FormatError(f"sidecar schema {str(s['schema'])[:40]!r} is not {SIDECAR_SCHEMA}")
        model = obj_fields(s["model"], "sidecar.model", {"format", "sha256", "length"}, {"format", "sha256", "length"})
        def obj(name: str, nullable: bool) -> Any:
            value = s.get(name, None if nullable else {})
            if not isinstance(value, dict) and not (nullable and value is None):
                raise FormatError(f"sidecar.{name} must be an object{' or null' if nullable else ''}")
            return value

        return cls(
            model_format=choice_field(model["format"], "sidecar.model.format", MODEL_FORMATS),
            model_sha256=str_field(model["sha256"], "sidecar.model.sha256", HEX64_RE),
            model_length=int_field(model["length"], "sidecar.model.length", 0, limits.max_bundle_bytes),
            task=obj("task", False),
            policy=obj("policy", False),
            runtime=obj("runtime", False),
            preprocess=obj("preprocess", True),
            model_card=obj("model_card", True),
        )


def pack_contents(sidecar: Sidecar, model: bytes | memoryview) -> bytearray:
    """The plaintext that gets compressed and encrypted: magic, sidecar length, sidecar, model."""
    side = canonical_json(sidecar.to_json())
    out = bytearray(CONTENTS_MAGIC + struct.pack(">I", len(side)) + side)
    out += model
    return out


@dataclass
class Contents:
    """Decrypted contents of a bundle, a view into one buffer that lives only in memory.
    Call :meth:`wipe` when done: it zeroes the whole buffer."""

    sidecar: Sidecar
    buffer: bytearray
    model_offset: int
    model_length: int

    @property
    def model(self) -> memoryview:
        return memoryview(self.buffer)[self.model_offset : self.model_offset + self.model_length]

    def wipe(self) -> None:
        crypto.wipe(self.buffer)


def unpack_contents(
    buffer: bytearray, start: int, end: int, limits: BundleLimits = DEFAULT_LIMITS, *, check_digest: bool = True
) -> Contents:
    """Parse the contents lying in ``buffer[start:end]``.

    The model's SHA-256 against the sealed sidecar is checked at install (``check_digest``);
    later loads skip it, because the chunk tags, bound by the publisher's signature, already
    authenticate every byte -- and hashing costs more than decrypting.
    """
    view = memoryview(buffer)[start:end]
    head = len(CONTENTS_MAGIC) + 4
    if len(view) < head or bytes(view[: len(CONTENTS_MAGIC)]) != CONTENTS_MAGIC:
        raise FormatError("sealed contents do not start with the EdgeWard contents magic")
    (side_len,) = struct.unpack(">I", view[len(CONTENTS_MAGIC) : head])
    if side_len > limits.max_sidecar_bytes or head + side_len > len(view):
        raise FormatError(f"sidecar length {side_len} is out of bounds")
    sidecar = Sidecar.from_json(loads_json(view[head : head + side_len], "sidecar"), limits)
    offset = head + side_len
    model = view[offset:]
    if len(model) != sidecar.model_length:
        raise IntegrityError("model length differs from the sealed sidecar")
    if check_digest and not crypto.constant_time_equal(crypto.sha256_hex(model), sidecar.model_sha256):
        raise IntegrityError("model digest differs from the sealed sidecar")
    return Contents(sidecar=sidecar, buffer=buffer, model_offset=start + offset, model_length=len(model))


# --- reading ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature has been checked; only :func:`verify_bundle` makes one."""

    manifest: Manifest
    payload: memoryview
    payload_offset: int  # where the payload starts in the buffer the bundle was read into
    publisher_key: bytes

    def decrypt(
        self,
        device_private: bytearray,
        limits: BundleLimits = DEFAULT_LIMITS,
        *,
        in_place: bool = False,
        check_digest: bool = True,
    ) -> Contents:
        """Open the content key with the device key and decrypt the payload in memory.

        ``in_place`` decrypts inside the buffer the bundle was read into (it must be a
        ``bytearray``), which then holds the plaintext: the bundle object is used up.
        """
        key = self.open_key(device_private)
        try:
            return self.decrypt_with(key, limits, in_place=in_place, check_digest=check_digest)
        finally:
            crypto.wipe(key)

    def open_key(self, device_private: bytearray) -> bytearray:
        """The content key, opened with the device's private key (the caller wipes it)."""
        return crypto.open_content_key(device_private, self.manifest.sealed_key)

    def decrypt_with(
        self,
        content_key: bytearray,
        limits: BundleLimits = DEFAULT_LIMITS,
        *,
        in_place: bool = False,
        check_digest: bool = True,
    ) -> Contents:
        """Decrypt the payload with its content key (as :meth:`decrypt` does after opening it)."""
        m = self.manifest
        if check_digest and m.payload_sha256 is not None and not crypto.constant_time_equal(
            crypto.sha256_hex(self.payload), m.payload_sha256
        ):
            raise IntegrityError(
                "payload does not match the signed release (its SHA-256 differs); fetch payload.ewp again"
            )
        sealed = crypto.decrypt_payload(
            m.cipher, content_key, m.payload_aad, self.payload, m.layout, m.tags_sha256, in_place=in_place
        )
        if isinstance(sealed, memoryview):
            buffer = sealed.obj
            if not isinstance(buffer, bytearray):
                raise ValueError("in-place decryption needs the bundle read into a bytearray")
            start = self.payload_offset
        else:
            buffer, start = sealed, 0
        end = start + m.sealed_length
        if m.compression == "zlib":
            plain = _inflate(buffer, start, end, limits.max_bundle_bytes)
            buffer, start, end = plain, 0, len(plain)
        try:
            return unpack_contents(buffer, start, end, limits, check_digest=check_digest)
        except Exception:
            crypto.wipe(buffer)
            raise


INFLATE_STEP = 1 << 20  # compressed bytes inflated, then discarded, at a time


def _inflate(buffer: bytearray, start: int, end: int, limit: int) -> bytearray:
    """Inflate ``buffer[start:end]`` into a new buffer of at most ``limit`` bytes. Each compressed
    step is discarded (wiped, its pages returned) once inflated, so the two buffers never add up:
    the peak is the inflated contents plus one step."""
    d = zlib.decompressobj()
    plain = bytearray()
    pos = start
    try:
        for pos in range(start, end, INFLATE_STEP):
            step = min(end, pos + INFLATE_STEP)
            with memoryview(buffer)[pos:step] as view:
                plain += d.decompress(view, limit + 1 - len(plain))
            if d.unconsumed_tail or len(plain) > limit:
                raise FormatError("compressed contents exceed the size limit")
            crypto.discard(buffer, pos, step)
        if not d.eof:
            raise FormatError("compressed contents are incomplete")
    except BaseException as e:
        crypto.wipe(plain)
        crypto.discard(buffer, pos, end)
        if isinstance(e, zlib.error):
            raise FormatError(f"compressed contents are corrupt: {e}") from e
        raise
    return plain


def parse_header(data: bytes | bytearray | memoryview, limits: BundleLimits = DEFAULT_LIMITS) -> tuple[int, bytes]:
    """Check the fixed header (magic, format version, flags, bounded manifest length);
    return (manifest length, publisher key id)."""
    if len(data) < HEADER_BYTES:
        raise FormatError(f"bundle is truncated: {len(data)} bytes is shorter than its header")
    magic, version, flags, manifest_len, kid = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise FormatError("not an EdgeWard bundle (bad magic)")
    if version != FORMAT_VERSION:
        raise FormatError(
            f"bundle format version {version} is not supported (this agent reads {FORMAT_VERSION}); "
            "upgrade the agent or repack the model"
        )
    if flags != 0:
        raise FormatError(f"bundle header flags {flags:#x} are not defined in format version 1")
    if not 2 <= manifest_len <= limits.max_manifest_bytes:
        raise FormatError(f"manifest length {manifest_len} exceeds the limit of {limits.max_manifest_bytes}")
    return manifest_len, bytes(kid)


def read_header(data: bytes | bytearray | memoryview, limits: BundleLimits = DEFAULT_LIMITS) -> tuple[int, bytes]:
    """:func:`parse_header`, and check that ``data`` holds the whole manifest and signature."""
    manifest_len, kid = parse_header(data, limits)
    if len(data) < HEADER_BYTES + manifest_len + crypto.SIGNATURE_BYTES:
        raise FormatError("bundle is truncated inside its manifest or signature")
    return manifest_len, kid


def read_head(f: BinaryIO, limits: BundleLimits = DEFAULT_LIMITS) -> bytes:
    """Read only the signed head of a bundle file (header, manifest, signature; for a version 2
    single file its envelope and the payload's signed head): enough for :func:`verify_head`,
    without reading a payload that may be hundreds of megabytes."""
    return read_head_from(f.read, limits)


def read_head_from(read: Callable[[int], bytes], limits: BundleLimits = DEFAULT_LIMITS) -> bytes:
    """:func:`read_head` over any ``read(n)``, each read bounded by what the bytes before it declare.
    The result holds the whole head, or the call raises :class:`FormatError`."""
    from device_agent.bundle import release

    first = read(release.PREFIX_BYTES)
    if first[: len(release.ENVELOPE_MAGIC)] == release.ENVELOPE_MAGIC:
        env_len = release.envelope_length(first, limits)
        data = first + read(env_len - len(first) + release.PAYLOAD_HEADER_BYTES)
        need = release.single_head_length(data, limits)
        data += read(need - len(data))
        if len(data) < need:
            raise FormatError("release file is truncated inside its head or signature")
        return data
    if first[: len(release.PAYLOAD_MAGIC)] == release.PAYLOAD_MAGIC:
        raise UsageError(
            "this is a release payload (payload.ewp), not a bundle: install it with its device's "
            "envelope, 'edgeward-agent install ENVELOPE --payload payload.ewp'"
        )
    header = first + read(HEADER_BYTES - len(first))
    manifest_len, _ = parse_header(header, limits)
    head = header + read(manifest_len + crypto.SIGNATURE_BYTES)
    read_header(head, limits)  # the file holds the whole manifest and signature
    return head


def verify_head(
    head: bytes | bytearray | memoryview,
    file_length: int,
    trusted_publishers: Mapping[bytes, bytes] | list[bytes],
    limits: BundleLimits = DEFAULT_LIMITS,
) -> tuple[Manifest, bytes, int]:
    """Steps 1-5 of the verification order on a bundle's signed head and its total length.

    Returns (manifest, publisher key, payload offset). The payload itself is not looked at: a
    caller that decrypts must use :func:`verify_bundle`, which checks the tags digest too.
    """
    view = memoryview(head).cast("B")
    if file_length > limits.max_bundle_bytes:
        raise FormatError(f"bundle is {file_length} bytes, over the limit of {limits.max_bundle_bytes}")
    if bytes(view[:8]) != MAGIC:
        from device_agent.bundle import release

        if bytes(view[:8]) == release.ENVELOPE_MAGIC:  # a version 2 single file: envelope + payload
            env, payload_head = release.split_single(view, limits)
            m, key = release.verify_release(env, payload_head, file_length - len(env), trusted_publishers, limits)
            return m, key, len(env) + len(payload_head)
    manifest_len, kid = read_header(view, limits)
    keys = crypto.keys_by_id(trusted_publishers)
    if len(keys) > limits.max_trusted_publishers:
        raise FormatError("too many trusted publisher keys")
    publisher = keys.get(kid)
    if publisher is None:
        raise UnknownPublisher(
            f"bundle is signed by publisher key id {kid.hex()}, which this board does not trust; "
            "provision the board with that publisher's public key"
        )
    signed_end = HEADER_BYTES + manifest_len
    signature = bytes(view[signed_end : signed_end + crypto.SIGNATURE_BYTES])
    try:
        crypto.verify(publisher, SIGNING_DOMAIN, bytes(view[:signed_end]), signature)
    except BadSignature as e:
        raise BadSignature(
            f"bundle signature does not verify against publisher {crypto.fingerprint(publisher)}: "
            "the bundle was altered or corrupted; fetch it again from the publisher"
        ) from e
    # Verified: from here the manifest bytes are the publisher's.
    manifest = Manifest.from_json(loads_json(view[HEADER_BYTES:signed_end], "manifest"), limits)
    if not crypto.constant_time_equal(manifest.publisher, crypto.fingerprint(publisher)):
        raise FormatError("manifest names a different publisher than the key that signed it")
    payload_offset = signed_end + crypto.SIGNATURE_BYTES
    payload_length = file_length - payload_offset
    if payload_length < manifest.payload_length:
        raise FormatError(
            f"bundle is truncated: payload is {payload_length} of {manifest.payload_length} bytes; "
            "copy the bundle again"
        )
    if payload_length > manifest.payload_length:
        raise FormatError("bundle has bytes appended after its payload")
    return manifest, publisher, payload_offset


def verify_bundle(
    data: bytes | bytearray | memoryview,
    trusted_publishers: Mapping[bytes, bytes] | list[bytes],
    limits: BundleLimits = DEFAULT_LIMITS,
) -> VerifiedBundle:
    """Verify a bundle's signature against the trust anchors, then parse its manifest.

    ``trusted_publishers`` is a list of raw Ed25519 public keys (or a map key id -> key).
    Raises :class:`FormatError`, :class:`UnknownPublisher`, :class:`BadSignature` or
    :class:`IntegrityError`; returns only a bundle whose manifest the publisher signed.
    """
    view = memoryview(data).cast("B")
    manifest, publisher, payload_offset = verify_head(view, len(view), trusted_publishers, limits)
    payload = view[payload_offset:]
    return VerifiedBundle(manifest=manifest, payload=payload, payload_offset=payload_offset, publisher_key=publisher)


# --- writing (used by the packager) -------------------------------------------------------------


def new_bundle_id() -> str:
    return uuid.uuid4().hex


def write_bundle(
    write: Callable[[bytes | memoryview], object],
    *,
    sign_manifest: Callable[[bytes], bytes],
    publisher_public: bytes,
    sealed: bytes | bytearray | memoryview,
    device_id: str,
    device_box_public: bytes,
    model_id: str,
    model_version: int,
    created: datetime,
    expires: datetime | None,
    end_of_life: datetime | None,
    profile: str,
    runtime: str,
    cipher: str,
    compression: str,
    chunk_size: int = 1024 * 1024,
) -> Manifest:
    """Encrypt ``sealed`` (already compressed if ``compression`` says so) for one device and
    write the whole bundle through ``write``. Holds one device's ciphertext at a time, because
    the manifest (written first) signs the tags digest of the whole payload."""
    key = crypto.new_content_key()
    try:
        bundle_id = new_bundle_id()
        aad = PAYLOAD_AAD_PREFIX + bytes.fromhex(bundle_id)
        ciphertext = bytearray()
        tags = crypto.encrypt_payload(cipher, key, aad, sealed, chunk_size, ciphertext.extend)
        sealed_key = crypto.seal_content_key(device_box_public, key)
    finally:
        crypto.wipe(key)
    manifest = Manifest(
        bundle_id=bundle_id,
        model_id=model_id,
        model_version=model_version,
        created=created,
        expires=expires,
        end_of_life=end_of_life,
        device_id=device_id,
        device_key=crypto.fingerprint(device_box_public),
        publisher=crypto.fingerprint(publisher_public),
        profile=profile,
        runtime=runtime,
        cipher=cipher,
        compression=compression,
        chunk_size=chunk_size,
        sealed_length=len(sealed),
        payload_length=len(ciphertext),
        tags_sha256=tags,
        sealed_key=sealed_key,
    )
    # Round-trip through the strict reader so the packager can never emit what the agent refuses.
    body = canonical_json(manifest.to_json())
    Manifest.from_json(json.loads(body))
    header = HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(body), crypto.key_id(publisher_public))
    signature = sign_manifest(header + body)
    write(header)
    write(body)
    write(signature)
    write(memoryview(ciphertext))
    return manifest
