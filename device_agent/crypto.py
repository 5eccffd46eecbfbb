"""EdgeWard's crypto recipes: the only module that touches primitives.

Everything here comes from PyNaCl or ``cryptography``; the rest of the code calls these recipes
(sign/verify with a domain, seal/open a content key, encrypt/decrypt a chunked payload, wrap/unwrap
private keys) and never a primitive directly.

Memory hygiene is best-effort: Python cannot promise that a secret is gone from memory. Secrets
are kept in ``bytearray`` objects that callers overwrite with :func:`wipe` when done.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import hmac
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import nacl.exceptions
import nacl.public
import nacl.pwhash
import nacl.secret
import nacl.signing
import nacl.utils
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from device_agent.errors import BadSignature, FormatError, IntegrityError, UsageError

KEY_BYTES = 32
TAG_BYTES = 16
HASH_BYTES = 32  # SHA-256
SEALED_KEY_BYTES = 32 + 32 + 16  # a content key in a libsodium sealed box (ephemeral key, key, MAC)
SIGNATURE_BYTES = 64
KEY_ID_BYTES = 16

CHACHA20 = "chacha20-poly1305/stream-v1"
AES256GCM = "aes-256-gcm/stream-v1"
SUITES = (CHACHA20, AES256GCM)


def wipe(buf: bytearray | memoryview | None) -> None:
    """Overwrite a secret buffer in place with zeros (best-effort: copies made elsewhere, e.g.
    the immutable ``bytes`` a runtime needs, are not reached). No temporary copy is made."""
    if buf is None or len(buf) == 0:
        return
    view = memoryview(buf).cast("B")
    try:
        ctypes.memset((ctypes.c_char * len(view)).from_buffer(view), 0, len(view))
    finally:
        view.release()


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_DONTNEED = 4  # Linux


@functools.cache
def _madvise() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def discard(buf: bytearray, start: int, end: int) -> None:
    """Wipe ``buf[start:end]`` and give the whole memory pages inside it back to the system, so
    that a large buffer consumed piece by piece (a compressed payload being inflated) does not
    add up with what is made from it. The range reads as zeros afterwards, as after :func:`wipe`;
    where pages cannot be returned (not Linux), it is only wiped."""
    if end <= start:
        return
    view = memoryview(buf)[start:end]
    try:
        address = ctypes.addressof((ctypes.c_char * len(view)).from_buffer(view))
        first = address + (-address) % _PAGE
        last = (address + len(view)) // _PAGE * _PAGE
        madvise = _madvise()
        # MADV_DONTNEED on private anonymous memory: the pages are freed and read back as zeros.
        if madvise is None or last <= first or madvise(first, last - first, _MADV_DONTNEED) != 0:
            first = last = address
        ctypes.memset(address, 0, first - address)
        ctypes.memset(max(last, address), 0, address + len(view) - max(last, address))
    finally:
        view.release()


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(raw_public_key: bytes) -> str:
    """A public key's stable name: ``sha256:<hex of the raw key>``."""
    return "sha256:" + sha256_hex(raw_public_key)


def key_id(raw_public_key: bytes) -> bytes:
    """The 16-byte hint that names a publisher key in a bundle header."""
    return hashlib.sha256(raw_public_key).digest()[:KEY_ID_BYTES]


def keys_by_id(trusted: Mapping[bytes, bytes] | Iterable[bytes]) -> dict[bytes, bytes]:
    """Trusted public keys by key id: a mapping already so keyed, or raw keys to key by their id.
    Every signed format (bundles, releases, commands, receipts) finds its signer through this."""
    return dict(trusted) if isinstance(trusted, Mapping) else {key_id(k): k for k in trusted}


def constant_time_equal(a: bytes | str, b: bytes | str) -> bool:
    """Compare secrets or digests without leaking where they differ."""
    if isinstance(a, str):
        a = a.encode()
    if isinstance(b, str):
        b = b.encode()
    return hmac.compare_digest(a, b)


# --- signatures ---------------------------------------------------------------------------------


def _pae(domain: bytes, message: bytes) -> bytes:
    """Pre-authentication encoding: length-prefixed domain and message, so no two inputs collide."""
    return b"EWSIG1" + struct.pack(">I", len(domain)) + domain + struct.pack(">Q", len(message)) + message


class SigningKey(Protocol):
    """Anything that makes a raw Ed25519 signature of exact bytes: an ``Ed25519PrivateKey``, or a
    host signer whose key lives in a token (``packager.signers``)."""

    def sign(self, data: bytes, /) -> bytes: ...


def sign(private_key: SigningKey, domain: bytes, message: bytes) -> bytes:
    """Sign ``message`` for one purpose; a signature made for one domain never verifies in another."""
    return private_key.sign(_pae(domain, message))


def verify(public_key_raw: bytes, domain: bytes, message: bytes, signature: bytes) -> None:
    """Raise :class:`BadSignature` unless ``signature`` is the key's signature over ``message``."""
    if len(signature) != SIGNATURE_BYTES or len(public_key_raw) != KEY_BYTES:
        raise BadSignature("signature or key has the wrong length")
    # libsodium (PyNaCl) verifies in about half the time of cryptography's Ed25519 here, and the
    # fleet monitor verifies every report; both check the same RFC 8032 signatures.
    try:
        _verify_key(bytes(public_key_raw)).verify(_pae(domain, message), signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError) as e:
        raise BadSignature("signature does not verify") from e


@functools.lru_cache(maxsize=4096)
def _verify_key(public_key_raw: bytes) -> nacl.signing.VerifyKey:
    """One immutable VerifyKey per public key (the fleet monitor verifies with the same few keys
    thousands of times a second; building the object each time is measurable)."""
    return nacl.signing.VerifyKey(public_key_raw)


def ed25519_public_raw(private_key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def ed25519_private_raw(private_key: Ed25519PrivateKey) -> bytearray:
    from cryptography.hazmat.primitives import serialization

    return bytearray(
        private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
    )


# --- content keys sealed to a device -----------------------------------------------------------


def new_content_key() -> bytearray:
    """A fresh random 256-bit content key: one per bundle per device, never reused."""
    return bytearray(os.urandom(KEY_BYTES))


def new_box_keypair() -> tuple[bytearray, bytes]:
    """A device's X25519 encryption key pair as (private raw, public raw)."""
    sk = nacl.public.PrivateKey.generate()
    return bytearray(bytes(sk)), bytes(sk.public_key)


def seal_content_key(device_public_raw: bytes, content_key: bytearray) -> bytes:
    """Seal a content key so that only the holder of the device's private key can open it."""
    return nacl.public.SealedBox(nacl.public.PublicKey(device_public_raw)).encrypt(bytes(content_key))


def open_content_key(device_private_raw: bytearray, sealed: bytes) -> bytearray:
    """Open a sealed content key with the device's private key."""
    try:
        box = nacl.public.SealedBox(nacl.public.PrivateKey(bytes(device_private_raw)))
        key = bytearray(box.decrypt(sealed))
    except nacl.exceptions.CryptoError as e:
        raise IntegrityError("the content key was not sealed to this device's key") from e
    if len(key) != KEY_BYTES:
        wipe(key)
        raise IntegrityError("sealed content key has the wrong length")
    return key


def box_public_from_private(device_private_raw: bytearray) -> bytes:
    return bytes(nacl.public.PrivateKey(bytes(device_private_raw)).public_key)


# --- chunked payload encryption ----------------------------------------------------------------


@dataclass(frozen=True)
class ChunkLayout:
    """Where each chunk of a payload lies; derived from signed numbers only."""

    plaintext_length: int
    chunk_size: int

    @property
    def chunks(self) -> int:
        return max(1, -(-self.plaintext_length // self.chunk_size))

    @property
    def payload_length(self) -> int:
        return self.plaintext_length + self.chunks * TAG_BYTES

    def spans(self) -> Iterator[tuple[int, int, int, bool]]:
        """Yield (index, plaintext offset, plaintext length, is final) for every chunk."""
        n = self.chunks
        for i in range(n):
            start = i * self.chunk_size
            length = min(self.chunk_size, self.plaintext_length - start)
            yield i, start, length, i == n - 1


def _aead(suite: str, key: bytearray) -> ChaCha20Poly1305 | AESGCM:
    if suite == CHACHA20:
        return ChaCha20Poly1305(bytes(key))
    if suite == AES256GCM:
        return AESGCM(bytes(key))
    raise FormatError(f"unknown cipher suite {suite!r}; known: {', '.join(SUITES)}")


def _nonce(index: int, final: bool) -> bytes:
    # STREAM construction: an 88-bit chunk counter and a final-chunk flag. The key is fresh for
    # every bundle, so a nonce never repeats under one key; the flag stops truncation.
    return index.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


def tags_digest(tags: bytes | bytearray) -> str:
    """The digest of every chunk's AEAD tag, in order; the publisher signs it."""
    return sha256_hex(b"edgeward/payload-tags/v1\x00" + bytes(tags))


def encrypt_payload(
    suite: str,
    key: bytearray,
    aad: bytes,
    plaintext: bytes | bytearray | memoryview,
    chunk_size: int,
    write: Callable[[memoryview], object],
) -> str:
    """Encrypt ``plaintext`` chunk by chunk, passing each ``ciphertext || tag`` to ``write``.

    Returns the tags digest that the manifest must carry.
    """
    aead = _aead(suite, key)
    src = memoryview(plaintext).cast("B")
    layout = ChunkLayout(len(src), chunk_size)
    out = bytearray(min(chunk_size, max(len(src), 0)) + TAG_BYTES)
    tags = bytearray()
    for i, start, length, final in layout.spans():
        dst = memoryview(out)[: length + TAG_BYTES]
        aead.encrypt_into(_nonce(i, final), src[start : start + length], aad, dst)
        tags += dst[length:]
        write(dst)
    return tags_digest(tags)


def decrypt_payload(
    suite: str,
    key: bytearray,
    aad: bytes,
    payload: bytes | bytearray | memoryview,
    layout: ChunkLayout,
    expected_tags_digest: str,
    *,
    in_place: bool = False,
) -> bytearray | memoryview:
    """Check the signed tags digest, then decrypt every chunk.

    The tags digest is compared before any decryption, so a payload the publisher did not
    produce is refused without being touched; each chunk's tag then authenticates its bytes.
    With ``in_place`` the (writable) payload buffer is decrypted where it lies and the
    plaintext compacted to its start: no second model-sized buffer is ever allocated. The
    returned view covers the plaintext; on failure the buffer is wiped.
    """
    src = memoryview(payload).cast("B")
    if len(src) != layout.payload_length:
        raise IntegrityError(
            f"payload is {len(src)} bytes but the manifest says {layout.payload_length}"
        )
    if in_place and src.readonly:
        raise ValueError("in-place decryption needs a writable buffer (a bytearray)")
    stride = layout.chunk_size + TAG_BYTES
    tags = bytearray()
    for i, _start, length, _final in layout.spans():
        at = i * stride + length
        tags += src[at : at + TAG_BYTES]
    if not constant_time_equal(tags_digest(tags), expected_tags_digest):
        raise IntegrityError("payload does not match the signed manifest (tags digest differs)")
    aead = _aead(suite, key)
    out = src if in_place else memoryview(bytearray(layout.plaintext_length))
    try:
        for i, start, length, final in layout.spans():
            at = i * stride
            if in_place:
                # Decrypt over the ciphertext (exact overlap is supported), then move the plaintext
                # down over the tags already consumed; chunk i moves by i * TAG_BYTES.
                aead.decrypt_into(_nonce(i, final), src[at : at + length + TAG_BYTES], aad, src[at : at + length])
                if at != start:
                    src[start : start + length] = src[at : at + length]
            else:
                aead.decrypt_into(_nonce(i, final), src[at : at + length + TAG_BYTES], aad, out[start : start + length])
    except InvalidTag as e:
        wipe(out)
        raise IntegrityError(f"payload chunk failed authentication: {e}") from e
    if in_place:
        return src[: layout.plaintext_length]
    return out.obj  # type: ignore[return-value]


# --- Merkle trees over a release's envelopes (RFC 9162, section 2.1) ------------------------------

MERKLE_LEAF = b"\x00"  # leaf and node hashes are domain-separated (RFC 9162 2.1.1), so a node
MERKLE_NODE = b"\x01"  # can never pass for a leaf, nor a leaf for a node


def merkle_leaf(domain: bytes, data: bytes | bytearray | memoryview) -> bytes:
    """The hash of one leaf: ``SHA-256(0x00 || domain || data)``."""
    return hashlib.sha256(MERKLE_LEAF + domain + bytes(data)).digest()


def _merkle_node(left: bytes | memoryview, right: bytes | memoryview) -> bytes:
    return hashlib.sha256(MERKLE_NODE + bytes(left) + bytes(right)).digest()


class MerkleTree:
    """The RFC 9162 Merkle tree over ``n`` leaf hashes, kept as its levels (2n hashes at most, in
    flat ``bytearray``s): the root, and the inclusion proof of any leaf. A node without a sibling
    at the end of a level moves up unchanged, which builds exactly RFC 9162's tree."""

    def __init__(self, leaves: bytes | bytearray) -> None:
        """``leaves``: the leaf hashes, concatenated; a ``bytearray`` is taken over, not copied.
        Each level above is allocated once at its exact size (no growth, no copies)."""
        if not leaves or len(leaves) % HASH_BYTES:
            raise ValueError("a Merkle tree needs at least one 32-byte leaf hash")
        self.levels = [leaves if isinstance(leaves, bytearray) else bytearray(leaves)]
        while len(self.levels[-1]) > HASH_BYTES:
            below = memoryview(self.levels[-1])
            count = len(below) // HASH_BYTES
            up = bytearray(-(-count // 2) * HASH_BYTES)
            for i in range(0, count - 1, 2):
                at = i * HASH_BYTES
                up[at // 2 : at // 2 + HASH_BYTES] = _merkle_node(below[at : at + HASH_BYTES],
                                                                  below[at + HASH_BYTES : at + 2 * HASH_BYTES])
            if count % 2:
                up[-HASH_BYTES:] = below[(count - 1) * HASH_BYTES :]
            below.release()
            self.levels.append(up)

    @property
    def size(self) -> int:
        return len(self.levels[0]) // HASH_BYTES

    @property
    def root(self) -> bytes:
        return bytes(self.levels[-1])

    def proof(self, index: int) -> list[bytes]:
        """The audit path of leaf ``index``, bottom up (RFC 9162 2.1.3.1)."""
        if not 0 <= index < self.size:
            raise ValueError(f"leaf {index} is not in a tree of {self.size}")
        path = []
        for level in self.levels[:-1]:
            sibling = index ^ 1
            if sibling * HASH_BYTES < len(level):
                path.append(bytes(level[sibling * HASH_BYTES : (sibling + 1) * HASH_BYTES]))
            index >>= 1
        return path


def merkle_proof_length(index: int, size: int) -> int:
    """How many hashes the inclusion proof of leaf ``index`` in a tree of ``size`` leaves has."""
    length = 0
    last = size - 1
    while last > 0:
        if index ^ 1 <= last:
            length += 1
        index >>= 1
        last >>= 1
    return length


def merkle_root_from_proof(leaf: bytes, index: int, size: int, proof: list[bytes]) -> bytes:
    """The root that ``proof`` leads to from ``leaf`` (RFC 9162 2.1.3.2, verifying an inclusion
    proof); raises :class:`IntegrityError` when the proof cannot belong to that index and size.
    The caller compares the result with the signed root in constant time."""
    if not 0 <= index < size:
        raise IntegrityError(f"leaf index {index} is outside a tree of {size} leaves")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise IntegrityError("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = _merkle_node(p, r)
            if not fn & 1:
                while not (fn & 1 or fn == 0):
                    fn >>= 1
                    sn >>= 1
        else:
            r = _merkle_node(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise IntegrityError("inclusion proof is shorter than the tree is deep")
    return r


# --- private keys at rest ------------------------------------------------------------------------

WRAP_MAGIC = b"EWKEY1"
_KDF = "argon2id"


def kek_from_passphrase(passphrase: bytes, salt: bytes) -> bytearray:
    """Derive a key-encryption key from a passphrase (Argon2id, libsodium's interactive cost)."""
    return bytearray(
        nacl.pwhash.argon2id.kdf(
            KEY_BYTES,
            passphrase,
            salt,
            opslimit=nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE,
            memlimit=nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE,
        )
    )


def wrap_secret(secret: bytes | bytearray, *, passphrase: bytes | None = None, kek: bytes | None = None) -> bytes:
    """Encrypt a secret for storage under a passphrase or a 32-byte key-encryption key."""
    salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
    if passphrase is not None:
        mode, key = b"P", kek_from_passphrase(passphrase, salt)
    elif kek is not None and len(kek) == KEY_BYTES:
        mode, key = b"K", bytearray(kek)
    else:
        raise UsageError("wrapping a secret needs a passphrase or a 32-byte key-encryption key")
    try:
        box = nacl.secret.SecretBox(bytes(key))
        # SecretBox draws a random 24-byte nonce; in passphrase mode the salt is bound through the KDF.
        return WRAP_MAGIC + mode + salt + box.encrypt(bytes(secret))
    finally:
        wipe(key)


def unwrap_secret(
    blob: bytes,
    *,
    passphrase: bytes | None = None,
    kek: bytes | None = None,
    kek_cache: dict[bytes, bytearray] | None = None,
) -> bytearray:
    """Decrypt a secret written by :func:`wrap_secret`; one opaque error for every failure.

    ``kek_cache`` (salt -> derived key) spares a second Argon2id run for the same wrapped file
    within one process, which already holds the passphrase itself."""
    head = len(WRAP_MAGIC) + 1 + nacl.pwhash.argon2id.SALTBYTES
    if len(blob) < head or not blob.startswith(WRAP_MAGIC):
        raise FormatError("key file is not an EdgeWard wrapped key")
    mode = blob[len(WRAP_MAGIC) : len(WRAP_MAGIC) + 1]
    salt = blob[len(WRAP_MAGIC) + 1 : head]
    if mode == b"P":
        if passphrase is None:
            raise UsageError("the device keys are passphrase-protected: set EDGEWARD_DEVICE_PASSPHRASE")
        cached = kek_cache.get(salt) if kek_cache is not None else None
        key = bytearray(cached) if cached is not None else kek_from_passphrase(passphrase, salt)
        if kek_cache is not None and cached is None:
            kek_cache[salt] = bytearray(key)
    elif mode == b"K":
        if kek is None or len(kek) != KEY_BYTES:
            raise UsageError(
                "the device keys are wrapped under a key file: set EDGEWARD_DEVICE_KEK_FILE"
            )
        key = bytearray(kek)
    else:
        raise FormatError("key file uses an unknown wrapping mode")
    try:
        return bytearray(nacl.secret.SecretBox(bytes(key)).decrypt(blob[head:]))
    except nacl.exceptions.CryptoError as e:
        raise UsageError("cannot unlock the device keys: wrong passphrase or key file") from e
    finally:
        wipe(key)


# --- the board's own files -------------------------------------------------------------------------


def new_secret_key() -> bytearray:
    """A fresh random 32-byte secret key."""
    return bytearray(nacl.utils.random(KEY_BYTES))


def derive_key(secret: bytes | bytearray, purpose: bytes) -> bytearray:
    """A key for one purpose from a board secret (HKDF-SHA256); purposes never share a key."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return bytearray(HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=purpose).derive(bytes(secret)))


def mac(key: bytes | bytearray, domain: bytes, message: bytes | bytearray | memoryview) -> bytes:
    """HMAC-SHA256 over the same pre-authentication encoding as signatures."""
    return hmac.new(bytes(key), _pae(domain, bytes(message)), hashlib.sha256).digest()


def mac_ok(key: bytes | bytearray, domain: bytes, message: bytes | bytearray | memoryview, tag: bytes) -> bool:
    """Whether ``tag`` is :func:`mac` of ``message``, compared in constant time."""
    return hmac.compare_digest(mac(key, domain, message), tag)


def seal_local(key: bytes | bytearray, aad: bytes, plaintext: bytes | bytearray) -> bytes:
    """Encrypt a small secret for this board's own storage (ChaCha20-Poly1305, random nonce)."""
    nonce = os.urandom(12)
    return nonce + ChaCha20Poly1305(bytes(key)).encrypt(nonce, bytes(plaintext), aad)


def open_local(key: bytes | bytearray, aad: bytes, blob: bytes) -> bytearray:
    """Decrypt what :func:`seal_local` wrote under the same key and ``aad``."""
    if len(blob) < 12 + TAG_BYTES:
        raise IntegrityError("a local key file is truncated")
    try:
        return bytearray(ChaCha20Poly1305(bytes(key)).decrypt(blob[:12], blob[12:], aad))
    except InvalidTag as e:
        raise IntegrityError("a local key file failed authentication: altered, or sealed by another board") from e
