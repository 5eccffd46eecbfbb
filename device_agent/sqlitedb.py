"""SQLite as EdgeWard's on-board stores use it: durable (WAL, synchronous=FULL), autocommit,
one connection shared by the threads of one process behind the store's own lock."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_durable(path: str | Path, *schema: str) -> sqlite3.Connection:
    """Open (or create) a store at ``path`` and run its ``CREATE ... IF NOT EXISTS`` statements."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    for statement in schema:
        db.execute(statement)
    return db
