"""Durable, atomic file writes: temp file in the same directory, fsync, rename, fsync the directory."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from device_agent.errors import EnvironmentFault


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | bytearray | memoryview, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a power cut leaves either the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        try:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        what = "the disk is full" if e.errno == errno.ENOSPC else e.strerror
        raise EnvironmentFault(f"cannot write {path}: {what}; free space or fix permissions") from e


def make_private_dir(path: Path) -> None:
    """Create ``path`` (0700) and any missing parents; each directory created is made durable
    (its parent fsynced), or a power cut could take it, and every file written in it, away."""
    path = Path(path)
    created = []
    p = path
    while not os.path.lexists(p) and p != p.parent:
        created.append(p)
        p = p.parent
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    for d in reversed(created):
        fsync_dir(d.parent)


def read_into_bytearray(path: Path, limit: int) -> bytearray:
    """Read a whole file into one ``bytearray`` (writable, so it can be decrypted in place)."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            from device_agent.errors import FormatError

            raise FormatError(f"{path} is {size} bytes, over the limit of {limit}")
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
        view.release()
    if got != size:
        del buf[got:]
    return buf


def read_bounded(path: Path, limit: int, follow_symlinks: bool = True) -> bytes:
    """Read a small file whole, refusing anything that is not a regular file or is over ``limit``
    bytes before a byte of it is read (a FIFO does not block: it is opened non-blocking). With
    ``follow_symlinks=False`` a symbolic link in ``path``'s place is refused too (``OSError``
    ``ELOOP``), whatever it points to."""
    from device_agent.errors import FormatError

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{path} is not a regular file")
        if st.st_size > limit:
            raise FormatError(f"{path} is {st.st_size} bytes, over the limit of {limit}")
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise FormatError(f"{path} grew past the limit of {limit} bytes while it was read")
    return data


def shred_file(path: Path) -> None:
    """Overwrite a file in place with random bytes, fsync it, then unlink it (and fsync the
    directory). On flash this is best-effort (docs/operations.md): what it destroys for certain
    is the file at the filesystem level; the keys it holds are what a wipe relies on."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):  # a link, FIFO or socket planted in a secret's place: just remove it
        if stat.S_ISDIR(st.st_mode):
            import shutil

            shutil.rmtree(path)
        else:
            path.unlink()
        fsync_dir(path.parent)
        return
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        size = os.fstat(fd).st_size
        left = max(size, 1)
        while left > 0:
            left -= os.write(fd, os.urandom(min(left, 1 << 20)))
        os.fsync(fd)
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fsync_dir(path.parent)
