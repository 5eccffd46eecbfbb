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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from device_agent import crypto
from device_agent.bundle.format import HEADER_BYTES, VerifiedBundle, parse_header, read_header, verify_head
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
        self, trusted_publishers: Mapping[bytes, bytes] | list[bytes], limits: BundleLimits = DEFAULT_LIMITS
    ) -> tuple[bytearray, VerifiedBundle]:
        """Verify the signed head and the file's length, then read the whole bundle into one
        ``bytearray`` of exactly that length (the agent decrypts it in place)."""
        manifest, publisher, payload_offset = verify_head(self.head, self.length, trusted_publishers, limits)
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
    """Open a bundle file and read its signed head, checking each part before the next is read:
    not a regular file -> :class:`UsageError`; over the size limit, a bad header or a head cut
    short -> :class:`FormatError`."""
    path = Path(path)
    fd, length = _open_regular(path)
    try:
        if length > limits.max_bundle_bytes:
            raise FormatError(f"bundle is {length} bytes, over the limit of {limits.max_bundle_bytes}")
        header = _read_up_to(fd, HEADER_BYTES)
        manifest_len, _ = parse_header(header, limits)
        head = header + _read_up_to(fd, manifest_len + crypto.SIGNATURE_BYTES)
        read_header(head, limits)  # the file holds the whole manifest and signature
        yield BundleFile(path=path, fd=fd, length=length, head=head)
    finally:
        os.close(fd)

