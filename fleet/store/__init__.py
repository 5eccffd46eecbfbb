"""The monitor's store: verified reports, device state and security events.

Two engines behind one interface: SQLite (:class:`MonitorStore`, one file, the embedded
default) and PostgreSQL (:class:`PostgresStore`, any number of monitors on any machines). Both
store a genuine report at most once per (device, seq), commit each ingest batch in one
transaction before the monitor acknowledges it, migrate their schema on open (``schema.py``),
and prune by age in bounded batches. :func:`open_store` picks the engine from the store's name.
"""

from __future__ import annotations

from pathlib import Path

from .base import Batch, Pruned, Row, StoreConflict, StoreReads
from .postgres import PostgresStore, describe, is_postgres
from .sqlite import MonitorStore

Store = MonitorStore | PostgresStore

__all__ = [
    "Batch",
    "MonitorStore",
    "PostgresStore",
    "Pruned",
    "Row",
    "Store",
    "StoreConflict",
    "StoreReads",
    "describe",
    "is_postgres",
    "open_store",
]


def open_store(spec: str | Path) -> Store:
    """``postgresql://...`` (or ``postgres://``): the PostgreSQL store; anything else: a SQLite
    file (``:memory:`` for a private in-memory one)."""
    if isinstance(spec, str) and is_postgres(spec):
        return PostgresStore(spec)
    return MonitorStore(spec)
