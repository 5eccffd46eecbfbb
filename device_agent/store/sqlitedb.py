"""SQLite as EdgeWard's stores use it: durable (WAL, synchronous=FULL), autocommit outside
explicit transactions, one connection shared by the threads of a process behind the store's lock."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from device_agent.errors import EnvironmentFault


def open_durable(
    path: str | Path, schema: str, *, version: int = 1, mode: int = 0o600, timeout: float = 5.0
) -> sqlite3.Connection:
    """Open (or create, with ``mode``) a store at ``path``, run its ``CREATE ... IF NOT EXISTS``
    script and stamp its schema ``version`` (``PRAGMA user_version``; release 0.1's stores carry
    0 and the same schema as version 1). A store written by a newer release is refused."""
    if str(path) != ":memory:":
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, mode))  # SQLite's WAL/SHM copy this mode
            os.chmod(path, mode)
        except OSError as e:  # reported like SQLite's own failure, with each store's context
            raise sqlite3.OperationalError(f"unable to open database file: {e.strerror}") from e
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=timeout)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    found = int(db.execute("PRAGMA user_version").fetchone()[0])
    if found > version:
        db.close()
        raise EnvironmentFault(
            f"{path} was written by a newer EdgeWard (store version {found}, this agent reads {version}); "
            "upgrade the agent"
        )
    db.executescript(schema)
    if found < version:
        db.execute(f"PRAGMA user_version = {int(version)}")
    return db


@contextlib.contextmanager
def transaction(db: sqlite3.Connection, what: str) -> Iterator[None]:
    """One write transaction: committed when the block succeeds, rolled back on any error.
    SQLite's own errors become an EnvironmentFault naming ``what`` (exit 4)."""
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    except sqlite3.Error as e:
        raise EnvironmentFault(f"cannot write {what}: {e}") from e
