"""Reading a bundle file in bounded steps: the one place a bundle is read from a path
(``edgeward-agent install`` and ``edgeward inspect``).

The order follows docs/bundle-format.md, "Verification order", and never reads ahead of it:

1. refuse anything that is not a regular file (FIFO, device, directory, socket) before a byte is
   read; the file is opened non-blocking, so a FIFO with no writer cannot hang the caller;
2. read the fixed header and check it (:func:`~device_agent.bundle.format.parse_header`), then
   read exactly the manifest and signature it declares;
3. verify the signature over that head and compare the file's length with the payload length
   the verified manifest declares (:func:`~device_agent.bundle.format.verify_head`);
4. only then read the payload, into one ``bytearray`` of exactly the file's size, which the
   agent decrypts in place.

A 1 GiB file with a wrong magic costs 32 bytes of reading; one with a valid head and a long tail
costs the head. Every bound comes from :class:`~device_agent.config.BundleLimits`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from device_agent.bundle import release
from device_agent.bundle.format import Manifest, VerifiedBundle, read_head_from, verify_head
from device_agent.config import DEFAULT_LIMITS, BundleLimits
from device_agent.errors import EnvironmentFault, FormatError, UsageError

_KINDS = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


def _refuse_unless_regular(path: Path, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _KINDS if test(mode)), "special file")
    raise UsageError(f"bundle {path} is a {kind}, not a regular file; give the path of a .ewb file")


def _open_regular(path: Path) -> tuple[int, int]:
    """Open ``path`` for reading if it is a regular file; return (fd, length)."""
    try:
        # Checked before opening too, so that a device's open has no side effect.
        _refuse_unless_regular(path, os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise UsageError(f"bundle {path} does not exist") from e
    except OSError as e:
        raise EnvironmentFault(f"cannot open bundle {path}: {e.strerror}") from e
    try:
        st = os.fstat(fd)  # what was opened, not what the path named a moment before
        _refuse_unless_regular(path, st.st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def _read_into(fd: int, view: memoryview) -> int:
    """Fill ``view`` from ``fd``; return how many bytes the file had (fewer at its end)."""
    got = 0
    while got < len(view):
        n = os.readv(fd, [view[got:]])
        if n == 0:
            break
        got += n
    return got


def _read_up_to(fd: int, n: int) -> bytes:
    """``n`` bytes from ``fd``, or fewer at the end of the file (the head: a few kilobytes)."""
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


@dataclass
class BundleFile:
    """An open bundle file whose fixed header is checked and whose signed head (header,
    manifest, signature) is read: nothing of the payload has been read yet."""

    path: Path
    fd: int
    length: int  # of the file, when it was opened
    head: bytes

    def verify(
        self,
        trusted_publishers: Mapping[bytes, bytes] | list[bytes],
        limits: BundleLimits = DEFAULT_LIMITS,
        precheck: Callable[[Manifest], object] | None = None,
    ) -> tuple[bytearray, VerifiedBundle]:
        """Verify the signed head and the file's length, run ``precheck`` on the verified manifest
        (the board's trust decisions, so that a bundle for another board or an old version is
        refused before its payload is read), then read the whole bundle into one ``bytearray``
        of exactly that length (the agent decrypts it in place)."""
        manifest, publisher, payload_offset = verify_head(self.head, self.length, trusted_publishers, limits)
        if precheck is not None:
            precheck(manifest)
        # verify_head refused a file longer or shorter than head + the signed payload_length.
        buffer = bytearray(self.length)
        buffer[:payload_offset] = self.head
        view = memoryview(buffer)
        payload = view[payload_offset:]
        if _read_into(self.fd, payload) != len(payload):
            raise FormatError(f"bundle {self.path} became shorter while it was read; copy the bundle again")
        if os.read(self.fd, 1):
            raise FormatError(f"bundle {self.path} grew while it was read; copy the bundle again")
        return buffer, VerifiedBundle(
            manifest=manifest, payload=payload, payload_offset=payload_offset, publisher_key=publisher
        )


@contextmanager
def open_bundle(path: str | Path, limits: BundleLimits = DEFAULT_LIMITS) -> Iterator[BundleFile]:
    """Open a bundle file (version 1, or a version 2 single file: envelope then payload) and read
    its signed head, checking each part before the next is read: not a regular file ->
    :class:`UsageError`; over the size limit, a bad header or a head cut short -> :class:`FormatError`."""
    path = Path(path)
    fd, length = _open_regular(path)
    try:
        if length > limits.max_bundle_bytes:
            raise FormatError(f"bundle is {length} bytes, over the limit of {limits.max_bundle_bytes}")
        head = _head_of(fd, length, path, limits)
        yield BundleFile(path=path, fd=fd, length=length, head=head)
    finally:
        os.close(fd)


def _head_of(fd: int, length: int, path: Path, limits: BundleLimits) -> bytes:
    prefix = os.pread(fd, release.PREFIX_BYTES, 0)
    if prefix[: len(release.ENVELOPE_MAGIC)] == release.ENVELOPE_MAGIC and length == release.envelope_length(
        prefix, limits
    ):
        raise UsageError(
            f"{path} is a device's envelope without its payload: "
            "run 'edgeward-agent install ENVELOPE --payload payload.ewp'"
        )
    return read_head_from(lambda n: _read_up_to(fd, n), limits)


def read_envelope(source: bytes | bytearray | str | Path, limits: BundleLimits = DEFAULT_LIMITS) -> bytes:
    """An envelope's bytes, from memory or from a regular file no longer than
    ``limits.max_envelope_bytes`` (checked before it is read)."""
    if isinstance(source, (bytes, bytearray)):
        if len(source) > limits.max_envelope_bytes:
            raise FormatError(f"envelope is {len(source)} bytes, over the limit of {limits.max_envelope_bytes}")
        return bytes(source)
    path = Path(source)
    fd, length = _open_regular(path)
    try:
        if length > limits.max_envelope_bytes:
            raise FormatError(
                f"envelope {path} is {length} bytes, over the limit of {limits.max_envelope_bytes}; "
                "give a device's .ewe file"
            )
        return _read_up_to(fd, length)
    finally:
        os.close(fd)


@contextmanager
def open_release(
    envelope: bytes | bytearray | str | Path, payload: str | Path, limits: BundleLimits = DEFAULT_LIMITS
) -> Iterator[BundleFile]:
    """A device's envelope and a release's shared payload file, read as the single file they make
    together (envelope, then payload): the envelope and the payload's signed head are read, and
    nothing of the ciphertext yet."""
    env = read_envelope(envelope, limits)
    env_len = release.envelope_length(env, limits)
    if len(env) != env_len:
        raise FormatError(f"envelope is {len(env)} bytes but declares {env_len}; fetch it again")
    with open_payload(payload, limits, before=len(env)) as p:
        yield BundleFile(path=p.path, fd=p.fd, length=len(env) + p.length, head=env + p.head)


@contextmanager
def open_payload(
    payload: str | Path, limits: BundleLimits = DEFAULT_LIMITS, before: int = 0
) -> Iterator[BundleFile]:
    """A release's shared payload file (alone: the publisher's check before shipping it; or behind
    an envelope of ``before`` bytes, which counts towards the size limit): its signed head is read
    and bounded, and nothing of the ciphertext yet."""
    path = Path(payload)
    fd, length = _open_regular(path)
    try:
        if length + before > limits.max_bundle_bytes:
            raise FormatError(f"payload {path} is {length} bytes, over the limit of {limits.max_bundle_bytes}")
        header = _read_up_to(fd, release.PAYLOAD_HEADER_BYTES)
        need = release.payload_head_length(header, limits)
        head = header + _read_up_to(fd, need - len(header))
        if len(head) < need:
            raise FormatError(f"payload {path} is truncated inside its signed head; fetch payload.ewp again")
        yield BundleFile(path=path, fd=fd, length=length, head=head)
    finally:
        os.close(fd)
