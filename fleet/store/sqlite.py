"""The embedded monitor store: one SQLite file (the default).

WAL with ``synchronous=FULL``; one transaction per ingested batch (the monitor acknowledges the
broker only after it commits). ``BEGIN IMMEDIATE`` makes each batch the only writer while it
reads and judges, so several monitors on one machine sharing the file judge against what is
stored; ``(device_id, seq)`` is the primary key of a genuine report, so a report is stored at most
once.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from device_agent.errors import EnvironmentFault
from device_agent.store.sqlitedb import transaction

from . import schema
from .base import Batch, StoreReads, no_pipeline


class _SqliteSql:
    """The :class:`~fleet.store.base.Sql` adapter over one sqlite3 connection."""

    seqs_in = "seq IN (SELECT value FROM json_each(?))"

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def seq_list(self, seqs: Sequence[int]) -> Any:
        return json.dumps(list(seqs))

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.db.execute(sql, params).fetchall()

    def dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = self.db.execute(sql, params)
        names = [c[0] for c in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.db.execute(sql, params).rowcount

    def many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        self.db.executemany(sql, rows)

    def lock_devices(self, devices: list[str], received: str) -> None:
        pass  # BEGIN IMMEDIATE already made this transaction the file's only writer

    def pipeline(self) -> contextlib.AbstractContextManager[Any]:
        return no_pipeline()


def _open(path: Path, mode: int = 0o600) -> sqlite3.Connection:
    """Open (or create, with ``mode``) the file durably and bring its schema to the latest
    migration, in one transaction."""
    if str(path) != ":memory:":
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, mode))  # WAL/SHM copy this mode
            os.chmod(path, mode)
        except OSError as e:
            raise sqlite3.OperationalError(f"unable to open database file: {e.strerror}") from e
    # Several monitors on one machine may share the store: wait for each other's writes.
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        with transaction(db, f"the monitor store {path}"):
            found = int(db.execute("PRAGMA user_version").fetchone()[0])
            for statement in schema.pending(found, schema.SQLITE, str(path)):
                db.execute(statement)
            if found < schema.LATEST:
                db.execute(f"PRAGMA user_version = {int(schema.LATEST)}")
    except BaseException:
        db.close()
        raise
    return db


class MonitorStore(StoreReads):
    """SQLite store shared by the monitor, ``fleet status``, ``fleet events`` and the dashboard."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.spec = str(path)
        self.name = str(path)
        self._lock = threading.Lock()
        try:
            self._db = _open(self.path)
        except sqlite3.Error as e:
            raise EnvironmentFault(f"cannot open the monitor store {self.path}: {e}") from e
        self._adapter = _SqliteSql(self._db)

    @contextlib.contextmanager
    def batch(self, received: datetime) -> Iterator[Batch]:
        """One write transaction; committed on success, rolled back on any error."""
        with self._write(f"the monitor store {self.path}") as db:
            batch = Batch(db, received)
            yield batch
            batch.flush()

    @contextlib.contextmanager
    def _write(self, what: str) -> Iterator[_SqliteSql]:
        with self._lock, transaction(self._db, what):
            yield self._adapter

    @contextlib.contextmanager
    def _sql(self) -> Iterator[_SqliteSql]:
        with self._lock:
            try:
                yield self._adapter
            except sqlite3.Error as e:
                raise EnvironmentFault(f"cannot read the monitor store {self.path}: {e}") from e

    def close(self) -> None:
        with self._lock:
            self._db.close()
