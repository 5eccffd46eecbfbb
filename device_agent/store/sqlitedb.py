"""SQLite as EdgeWard's stores use it: durable (WAL, synchronous=FULL), autocommit outside
explicit transactions, one connection shared by the threads of a process behind the store's lock."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from device_agent.errors import EnvironmentFault


def open_durable(path: str | Path, schema: str, *, timeout: float = 5.0) -> sqlite3.Connection:
    """Open (or create) a store at ``path`` and run its ``CREATE ... IF NOT EXISTS`` script."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=timeout)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(schema)
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
