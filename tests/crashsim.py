"""Power-cut simulation for the board's durable operations (ALICE / CrashMonkey style).

A killed process keeps the page cache; a power cut does not. :class:`Recorder` wraps the ``os``
calls that change files (``open``, ``write``, ``pwrite``, ``truncate``, ``fsync``,
``fdatasync``, ``rename``, ``replace``, ``unlink``, ``mkdir``, ``rmdir``) while an operation
runs, so a write path that bypasses ``device_agent.store.fsutil`` is seen too, and keeps a model
of what the disk holds:

* file data is durable once the file is fsynced: until then, a power cut leaves the file with
  the content it had at its last fsync (a file created and never fsynced is empty);
* a name (create, mkdir, rename, unlink, rmdir) is durable once its directory is fsynced: until
  then each such change may or may not have reached the disk, independently of the others;
* an ``open()`` for writing, a link or a symlink under the data dir is not modelled and is
  reported (:attr:`Recorder.unmodelled`), so a test fails rather than miss a write.

SQLite stores (``*.db`` and their ``-wal``/``-shm``) are opaque here: the model relies on
SQLite's own guarantee (WAL, ``synchronous=FULL``: a transaction whose COMMIT returned is on
disk; SQLite fsyncs the directory when it creates the WAL) and copies the database and its WAL
as they are at each crash point; tests that write SQLite add a crash point after every commit
(:meth:`Recorder.point`).

:func:`crash_states` turns the recorded points into every state a power cut could leave (each
subset of the pending name changes, data reverted to its last fsync) plus the state a SIGKILL
leaves (everything written, nothing lost). Also a small child runner for real SIGKILLs at the
k-th durable step: ``python -m tests.crashsim [fsync:]K COUNT_FILE -- AGENT-CLI-ARGS...``.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import itertools
import os
import random
import re
import signal
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SQLITE_RE = re.compile(r".*\.db(-wal|-shm|-journal)?\Z")
REAL = {name: getattr(os, name) for name in (
    "open", "write", "pwrite", "truncate", "ftruncate", "fsync", "fdatasync", "rename", "replace", "unlink",
    "remove", "mkdir", "rmdir", "close", "link", "symlink", "lseek")}
REAL_OPEN = builtins.open


@dataclass(frozen=True)
class NsOp:
    """A change of names in one or two directories, durable once one of them is fsynced."""

    kind: str  # create, rename, unlink, rmdir
    path: str
    dest: str = ""
    ino: int = 0

    @property
    def dirs(self) -> frozenset[str]:
        return frozenset(_parent(p) for p in (self.path, self.dest) if p)

    def apply(self, tree: dict[str, int]) -> bool:
        """Apply to a name -> inode map; False when it cannot apply (it needs a change left out)."""
        if self.kind == "create":
            tree[self.path] = self.ino
        elif self.kind == "rename":
            if self.path not in tree:
                return False
            moved = {k: v for k, v in tree.items() if k == self.path or k.startswith(self.path + "/")}
            for k in moved:
                del tree[k]
            for k in [k for k in tree if k == self.dest or k.startswith(self.dest + "/")]:
                del tree[k]
            for k, v in moved.items():
                tree[self.dest + k[len(self.path):]] = v
        elif self.kind in ("unlink", "rmdir"):
            # rmdir of a directory whose entries' removal is not yet durable: on a journalling
            # filesystem they commit with it (a directory can only be removed empty)
            for k in [k for k in tree if k == self.path or k.startswith(self.path + "/")]:
                del tree[k]
        return True


def _parent(rel: str) -> str:
    return rel.rsplit("/", 1)[0] if "/" in rel else ""


@dataclass
class Point:
    """The disk as the model knows it right after one recorded step."""

    label: str
    durable: dict[str, int]
    pending: tuple[NsOp, ...]
    synced: dict[int, bytes]
    volatile: dict[str, int]
    data: dict[int, bytes]
    kinds: dict[int, tuple[str, int]]  # inode -> (file|dir, mode)
    sqlite: dict[str, bytes]
    milestone: Any = None  # set on the points an operation marks as "this step returned"
    is_milestone: bool = False


@dataclass
class CrashState:
    label: str
    files: dict[str, tuple[str, int, bytes]]  # rel -> (file|dir, mode, bytes)
    sqlite: dict[str, bytes]
    point: int
    power_cut: bool

    def digest(self) -> str:
        h = hashlib.sha256()
        for rel, (kind, mode, data) in sorted(self.files.items()):
            h.update(f"{rel}\0{kind}\0{mode}\0{len(data)}\0".encode() + data)
        for rel, data in sorted(self.sqlite.items()):
            h.update(f"sqlite:{rel}\0{len(data)}\0".encode() + data)
        return h.hexdigest()

    def materialize(self, dst: Path) -> Path:
        """Write this state into ``dst`` (a fresh directory), modes included."""
        REAL["mkdir"](dst, 0o700)
        for rel, (kind, mode, data) in sorted(self.files.items()):
            p = dst / rel
            if kind == "dir":
                p.mkdir(mode=0o700, exist_ok=True)
            else:
                with REAL_OPEN(p, "wb") as f:
                    f.write(data)
            os.chmod(p, mode)
        for rel, data in self.sqlite.items():
            if (dst / _parent(rel)).is_dir():
                with REAL_OPEN(dst / rel, "wb") as f:
                    f.write(data)
                os.chmod(dst / rel, 0o600)
        return dst


class Recorder:
    """Records the durable filesystem operations under ``root`` while installed."""

    def __init__(self, root: Path) -> None:
        self.root = os.path.realpath(root)
        self.inodes = itertools.count(1)
        self.volatile: dict[str, int] = {}
        self.durable: dict[str, int] = {}
        self.pending: list[NsOp] = []
        self.data: dict[int, bytearray] = {}
        self.synced: dict[int, bytes] = {}
        self.kinds: dict[int, tuple[str, int]] = {}
        self.fds: dict[int, tuple[str, Any]] = {}  # fd -> ("file", inode) | ("dir", rel)
        self.points: list[Point] = []
        self.unmodelled: list[str] = []
        self.sites: Counter[str] = Counter()  # every fsync call site seen, by name
        self.disabled: set[str] = set()  # fsync call sites "removed" for this run
        self.skipped: Counter[str] = Counter()
        self.active = False
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in dirnames + filenames:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, self.root)
                if SQLITE_RE.fullmatch(name):
                    continue
                ino = next(self.inodes)
                st = os.lstat(full)
                if os.path.isdir(full):
                    self.kinds[ino] = ("dir", st.st_mode & 0o7777)
                    self.data[ino], self.synced[ino] = bytearray(), b""
                else:
                    with REAL_OPEN(full, "rb") as f:
                        content = f.read()
                    self.kinds[ino] = ("file", st.st_mode & 0o7777)
                    self.data[ino], self.synced[ino] = bytearray(content), content
                self.volatile[rel] = self.durable[rel] = ino
        self.point("baseline")
        self.points[-1].is_milestone = True

    # --- the model --------------------------------------------------------------------------------
    def _rel(self, path: Any, dir_fd: int | None = None) -> str | None:
        if isinstance(path, int):
            return None
        path = os.fsdecode(path)
        base = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else os.getcwd()
        full = os.path.normpath(os.path.join(base, path))
        full = os.path.join(os.path.realpath(os.path.dirname(full)), os.path.basename(full))
        if full == self.root:
            return ""
        if not full.startswith(self.root + "/"):
            return None
        rel = full[len(self.root) + 1:]
        return None if SQLITE_RE.fullmatch(os.path.basename(rel)) else rel

    def _new(self, kind: str, mode: int) -> int:
        ino = next(self.inodes)
        self.kinds[ino] = (kind, mode)
        self.data[ino], self.synced[ino] = bytearray(), b""
        return ino

    def _ns(self, op: NsOp) -> None:
        op.apply(self.volatile)
        self.pending.append(op)

    def _sync_dir(self, rel: str) -> None:
        keep = []
        for op in self.pending:
            if rel in op.dirs:
                op.apply(self.durable)
            else:
                keep.append(op)
        self.pending = keep

    def point(self, label: str, milestone: Any = None) -> None:
        """Record a crash point: the disk as it is now (call it after each SQLite commit too)."""
        sqlite = {}
        for dirpath, _, filenames in os.walk(self.root):
            for name in filenames:
                if SQLITE_RE.fullmatch(name) and not name.endswith("-shm"):
                    with REAL_OPEN(os.path.join(dirpath, name), "rb") as f:
                        sqlite[os.path.relpath(os.path.join(dirpath, name), self.root)] = f.read()
        self.points.append(Point(
            label, dict(self.durable), tuple(self.pending), dict(self.synced), dict(self.volatile),
            {i: bytes(d) for i, d in self.data.items()}, dict(self.kinds), sqlite, milestone))

    def milestone(self, value: Any = None, label: str = "step returned") -> None:
        """Mark that a step of the operation has returned: from here on it must survive a power cut."""
        self.point(label, value)
        self.points[-1].is_milestone = True

    # --- the wrappers -----------------------------------------------------------------------------
    def _site(self) -> str:
        frame = sys._getframe(2)
        name = f"{frame.f_globals.get('__name__', '?').rsplit('.', 1)[-1]}.{frame.f_code.co_qualname}"
        if frame.f_code.co_name == "fsync_dir" and frame.f_back is not None:
            up = frame.f_back
            name = f"fsync_dir<{up.f_globals.get('__name__', '?').rsplit('.', 1)[-1]}.{up.f_code.co_qualname}"
        return name

    def install(self, mp: pytest.MonkeyPatch) -> None:
        rec = self

        def w_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
            rel = rec._rel(path, dir_fd)
            existed = rel is not None and rel in rec.volatile
            fd = REAL["open"](path, flags, mode, dir_fd=dir_fd)
            if rel is None or not rec.active:
                return fd
            if rel == "":
                rec.fds[fd] = ("dir", "")
                return fd
            if rel not in rec.volatile:
                if flags & os.O_CREAT:
                    ino = rec._new("file", mode & ~_umask())
                    rec._ns(NsOp("create", rel, ino=ino))
                else:  # a file the model never saw (written outside the recording)
                    rec.unmodelled.append(f"opened {rel}, which appeared outside the recorded operations")
                    return fd
            ino = rec.volatile[rel]
            if rec.kinds[ino][0] == "dir":
                rec.fds[fd] = ("dir", rel)
            else:
                rec.fds[fd] = ("file", ino)
                if existed and flags & os.O_TRUNC and flags & (os.O_WRONLY | os.O_RDWR):
                    rec.data[ino] = bytearray()
            if flags & (os.O_CREAT | os.O_TRUNC) and flags & (os.O_WRONLY | os.O_RDWR):
                rec.point(f"open {rel}")
            return fd

        def w_close(fd: int) -> None:
            rec.fds.pop(fd, None)
            REAL["close"](fd)

        def _put(ino: int, offset: int, chunk: bytes) -> None:
            d = rec.data[ino]
            if len(d) < offset:
                d.extend(bytes(offset - len(d)))
            d[offset:offset + len(chunk)] = chunk

        def w_write(fd: int, data: Any) -> int:
            n = REAL["write"](fd, data)
            t = rec.fds.get(fd)
            if rec.active and t and t[0] == "file":
                end = REAL["lseek"](fd, 0, os.SEEK_CUR)
                _put(t[1], end - n, bytes(memoryview(data).cast("B")[:n]))
                rec.point(f"write {n} bytes to {_name(rec, t[1])}")
            return n

        def w_pwrite(fd: int, data: Any, offset: int) -> int:
            n = REAL["pwrite"](fd, data, offset)
            t = rec.fds.get(fd)
            if rec.active and t and t[0] == "file":
                _put(t[1], offset, bytes(memoryview(data).cast("B")[:n]))
                rec.point(f"pwrite {n} bytes to {_name(rec, t[1])}")
            return n

        def w_ftruncate(fd: int, length: int) -> None:
            REAL["ftruncate"](fd, length)
            t = rec.fds.get(fd)
            if rec.active and t and t[0] == "file":
                del rec.data[t[1]][length:]
                rec.point(f"truncate {_name(rec, t[1])}")

        def w_truncate(path: Any, length: int) -> None:
            if isinstance(path, int):
                return w_ftruncate(path, length)
            REAL["truncate"](path, length)
            rel = rec._rel(path)
            if rec.active and rel is not None and rel in rec.volatile:
                del rec.data[rec.volatile[rel]][length:]
                rec.point(f"truncate {rel}")
            return None

        def make_sync(real: Callable[[int], None], what: str) -> Callable[[int], None]:
            def w_sync(fd: int) -> None:
                t = rec.fds.get(fd)
                if not rec.active or t is None:
                    return real(fd)
                site = rec._site()
                rec.sites[site] += 1
                if site in rec.disabled:
                    rec.skipped[site] += 1
                    return None
                real(fd)
                if t[0] == "dir":
                    rec._sync_dir(t[1])
                    rec.point(f"{what} directory {t[1] or '.'} ({site})")
                else:
                    rec.synced[t[1]] = bytes(rec.data[t[1]])
                    rec.point(f"{what} {_name(rec, t[1])} ({site})")
                return None
            return w_sync

        def make_rename(real: Callable[..., None], what: str) -> Callable[..., None]:
            def w_rename(src: Any, dst: Any, *, src_dir_fd: int | None = None, dst_dir_fd: int | None = None) -> None:
                a, b = rec._rel(src, src_dir_fd), rec._rel(dst, dst_dir_fd)
                real(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
                if not rec.active or (a is None and b is None):
                    return
                if a is None or b is None:
                    rec.unmodelled.append(f"{what} across the data dir's edge: {src} -> {dst}")
                    return
                rec._ns(NsOp("rename", a, b))
                rec.point(f"{what} {a} -> {b}")
            return w_rename

        def make_unlink(real: Callable[..., None], kind: str) -> Callable[..., None]:
            def w_unlink(path: Any, *, dir_fd: int | None = None) -> None:
                rel = rec._rel(path, dir_fd)
                real(path, dir_fd=dir_fd)
                if rec.active and rel is not None:
                    rec._ns(NsOp(kind, rel))
                    rec.point(f"{kind} {rel}")
            return w_unlink

        def w_mkdir(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
            rel = rec._rel(path, dir_fd)
            REAL["mkdir"](path, mode, dir_fd=dir_fd)
            if rec.active and rel is not None:
                rec._ns(NsOp("create", rel, ino=rec._new("dir", mode & ~_umask())))
                rec.point(f"mkdir {rel}")

        def make_refuse(real: Callable[..., Any], what: str) -> Callable[..., Any]:
            def w(src: Any, dst: Any, *a: Any, **kw: Any) -> Any:
                if rec.active and rec._rel(dst) is not None:
                    rec.unmodelled.append(f"{what} {dst}: not modelled")
                return real(src, dst, *a, **kw)
            return w

        def w_builtin_open(file: Any, mode: str = "r", *a: Any, **kw: Any) -> Any:
            if rec.active and not isinstance(file, int) and set(mode) & set("wax+") and rec._rel(file) is not None:
                rec.unmodelled.append(f"open({file!r}, {mode!r}) writes through a Python file object")
            return REAL_OPEN(file, mode, *a, **kw)

        mp.setattr(os, "open", w_open)
        mp.setattr(os, "close", w_close)
        mp.setattr(os, "write", w_write)
        mp.setattr(os, "pwrite", w_pwrite)
        mp.setattr(os, "ftruncate", w_ftruncate)
        mp.setattr(os, "truncate", w_truncate)
        mp.setattr(os, "fsync", make_sync(REAL["fsync"], "fsync"))
        mp.setattr(os, "fdatasync", make_sync(REAL["fdatasync"], "fdatasync"))
        mp.setattr(os, "rename", make_rename(REAL["rename"], "rename"))
        mp.setattr(os, "replace", make_rename(REAL["replace"], "replace"))
        mp.setattr(os, "unlink", make_unlink(REAL["unlink"], "unlink"))
        mp.setattr(os, "remove", make_unlink(REAL["remove"], "unlink"))
        mp.setattr(os, "rmdir", make_unlink(REAL["rmdir"], "rmdir"))
        mp.setattr(os, "mkdir", w_mkdir)
        mp.setattr(os, "link", make_refuse(REAL["link"], "link"))
        mp.setattr(os, "symlink", make_refuse(REAL["symlink"], "symlink"))
        mp.setattr(builtins, "open", w_builtin_open)
        mp.setattr(io, "open", w_builtin_open)
        self.active = True

    def stop(self) -> None:
        self.active = False

    # --- what a power cut leaves -----------------------------------------------------------------------
    def durable_blobs(self, index: int = -1) -> set[bytes]:
        """Every file content that is on the disk at a point, linked or not (an unlinked file's
        blocks keep their last durable bytes): what shredding must have overwritten."""
        return set(self.points[index].synced.values())


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def _name(rec: Recorder, ino: int) -> str:
    names = [k for k, v in rec.volatile.items() if v == ino]
    return names[0] if names else f"(unlinked inode {ino})"


def _files(tree: dict[str, int], contents: dict[int, bytes], kinds: dict[int, tuple[str, int]]
           ) -> dict[str, tuple[str, int, bytes]]:
    out: dict[str, tuple[str, int, bytes]] = {}
    for rel in sorted(tree, key=lambda r: r.count("/")):
        parent = _parent(rel)
        if parent and (parent not in out or out[parent][0] != "dir"):
            continue  # its directory did not reach the disk: the entry is unreachable
        kind, mode = kinds[tree[rel]]
        out[rel] = (kind, mode, contents[tree[rel]] if kind == "file" else b"")
    return out


def _subsets(pending: tuple[NsOp, ...], rng: random.Random, limit: int) -> Iterator[tuple[NsOp, ...]]:
    n = len(pending)
    if 2 ** n <= limit:
        for mask in range(2 ** n):
            yield tuple(op for i, op in enumerate(pending) if mask >> i & 1)
        return
    for k in range(n + 1):  # every prefix, every single change, everything but one change
        yield pending[:k]
    for i in range(n):
        yield (pending[i],)
        yield pending[:i] + pending[i + 1:]
    for _ in range(limit):
        yield tuple(op for op in pending if rng.random() < 0.5)


def crash_states(rec: Recorder, *, subsets: int = 64, seed: int = 0) -> Iterator[CrashState]:
    """Every distinct state a power cut (or a SIGKILL) at any recorded point could leave."""
    rng = random.Random(seed)
    seen: set[tuple[str, int]] = set()
    step = 0
    for i, p in enumerate(rec.points):
        step = i if p.is_milestone else step  # a state is judged against the steps around it
        candidates = []
        for kept in _subsets(p.pending, rng, subsets):
            tree = dict(p.durable)
            if all(op.apply(tree) for op in kept):
                applied = f", {len(kept)} of {len(p.pending)} pending name changes on disk" if p.pending else ""
                candidates.append(CrashState(f"power cut after #{i} {p.label}{applied}",
                                             _files(tree, p.synced, p.kinds), p.sqlite, i, True))
        candidates.append(CrashState(f"SIGKILL after #{i} {p.label}", _files(p.volatile, p.data, p.kinds),
                                     p.sqlite, i, False))
        for s in candidates:
            key = (s.digest(), step)
            if key not in seen:
                seen.add(key)
                yield s


def volatile_state(rec: Recorder, index: int) -> CrashState:
    """What the disk holds at a point when nothing is lost (the operation's own view)."""
    p = rec.points[index]
    return CrashState(f"#{index} {p.label}", _files(p.volatile, p.data, p.kinds), p.sqlite, index, False)


# --- real SIGKILLs: the child runner -----------------------------------------------------------------------

STEP_CALLS = ("fsync", "fdatasync", "replace", "rename", "unlink", "rmdir", "mkdir")


def child_main(argv: list[str]) -> int:
    """``[fsync:|all:]K COUNT_FILE -- CLI ARGS...``: run the board agent's CLI and SIGKILL this
    process just before its K-th durable step (``fsync:``: each fsync and SQLite COMMIT; ``all:``,
    the default: also each rename, unlink, mkdir and SQLite statement; K=0: never). The number
    of steps taken is written to COUNT_FILE as the process goes, so a run with K=0 counts them."""
    kinds, _, at = argv[0].rpartition(":")
    calls = STEP_CALLS if kinds in ("", "all") else ("fsync", "fdatasync")
    kill_at, count_file = int(at), Path(argv[1])
    args = argv[3:] if argv[2] == "--" else argv[2:]
    steps = 0

    def step() -> None:
        nonlocal steps
        steps += 1
        if steps == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        with REAL_OPEN(count_file, "w") as f:
            f.write(str(steps))

    def wrap(name: str) -> None:
        real = getattr(os, name)

        def stepped(*a: Any, **kw: Any) -> Any:
            step()
            return real(*a, **kw)
        setattr(os, name, stepped)

    for name in calls:
        wrap(name)
    if args[0] == "outbox":
        return _outbox_child(args[1:], step, every_statement=calls == STEP_CALLS)
    from device_agent.cli import main

    return main(args)


class _SteppedConnection:
    """A SQLite connection whose statements are steps (a kill lands between statements): every
    statement, or only each COMMIT (SQLite's fsyncs happen there)."""

    def __init__(self, db: Any, step: Callable[[], None], every_statement: bool) -> None:
        self._db, self._step, self._every = db, step, every_statement

    def execute(self, sql: str, *a: Any) -> Any:
        if self._every or sql.split()[0].upper() == "COMMIT":
            self._step()
        return self._db.execute(sql, *a)

    def executemany(self, sql: str, *a: Any) -> Any:
        if self._every:
            self._step()
        return self._db.executemany(sql, *a)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def _outbox_child(args: list[str], step: Callable[[], None], every_statement: bool) -> int:
    """``outbox DB N``: add N reports in one transaction, then acknowledge the oldest two."""
    from device_agent.telemetry import outbox
    from device_agent.telemetry.outbox import INFO_EVENT, Item, Outbox

    real = outbox.open_durable
    outbox.open_durable = lambda *a, **kw: _SteppedConnection(real(*a, **kw), step, every_statement)  # type: ignore[assignment]
    box = Outbox(args[0], 100)
    box.add([Item(INFO_EVENT, outbox_build) for _ in range(int(args[1]))])
    box.acked([p.seq for p in box.pending(0, 2)])
    box.close()
    return 0


def outbox_build(seq: int, prev: bytes) -> tuple[str, bytes]:
    """A report payload that names its sequence number and predecessor digest."""
    return "t", f"{seq}:{prev.hex()}".encode()


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
