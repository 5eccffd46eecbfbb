"""The monitor store on PostgreSQL (psycopg 3): several monitors, on any machines, one database.

The same tables and the same judgement as the SQLite store. What keeps a board's hash chain and
replay judgement right when its consecutive reports reach different monitors at the same moment
is the database, never a monitor's memory:

* each ingest batch is one READ COMMITTED transaction that first makes a row for each device it
  carries and locks those rows (``SELECT ... FOR UPDATE``, in device order, so two monitors never
  wait for each other in a circle). A second monitor holding reports of the same board waits
  until the first commits, and every statement it runs after that sees what the first stored;
* ``(device_id, seq)`` is the primary key of a genuine report and ``(topic, digest, kind)`` is
  unique for security events, so even a batch that slipped past the locks could not store a
  report twice: the insert fails, nothing of the batch is committed, and the monitor judges the
  batch again (:class:`~fleet.store.base.StoreConflict`), as it does on a deadlock or a
  serialisation failure;
* the monitor acknowledges the broker only after the commit.

Connection strings are libpq's (``postgresql://user@host:5432/db?sslmode=verify-full``); the
password belongs in ``~/.pgpass`` or ``PGPASSFILE``, not on a command line. Messages name the
database without its password.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from device_agent.errors import EnvironmentFault, UsageError

from . import schema
from .base import Batch, StoreConflict, StoreReads

SCHEMES = ("postgresql://", "postgres://")
# pg_advisory_xact_lock key under which one monitor at a time migrates the schema ("EWSTORE").
_MIGRATION_LOCK = 0x45575354_4F5245
CONNECT_TIMEOUT_S = 10


def is_postgres(spec: str) -> bool:
    return spec.startswith(SCHEMES)


@functools.lru_cache(maxsize=256)
def _pg(sql: str) -> str:
    """The store's SQL (written for SQLite) as PostgreSQL reads it."""
    return sql.replace("?", "%s").replace("MAX(", "GREATEST(")


def describe(spec: str) -> str:
    """The database a connection string names, without its password."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        d = conninfo_to_dict(spec)
    except Exception as e:  # noqa: BLE001 -- psycopg raises ProgrammingError for a bad string
        raise UsageError(f"not a PostgreSQL connection string: {e}; e.g. postgresql://user@host/db") from e
    host = str(d.get("host") or "localhost")
    port = f":{d['port']}" if d.get("port") else ""
    user = f"{d['user']}@" if d.get("user") else ""
    return f"postgresql://{user}{host}{port}/{d.get('dbname') or ''}"


class _PgSql:
    """The :class:`~fleet.store.base.Sql` adapter over one psycopg connection."""

    seqs_in = "seq = ANY(?)"

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def seq_list(self, seqs: Sequence[int]) -> Any:
        return list(seqs)

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self.conn.execute(_pg(sql), params).fetchall())

    def dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = self.conn.execute(_pg(sql), params)
        names = [c.name for c in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        return int(self.conn.execute(_pg(sql), params).rowcount)

    def many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(_pg(sql), rows)

    def lock_devices(self, devices: list[str], received: str) -> None:
        if not devices:
            return
        self.conn.execute(
            "INSERT INTO devices (device_id, first_seen, last_seen) "
            "SELECT d, %s, %s FROM unnest(%s::text[]) AS d ORDER BY d "
            "ON CONFLICT (device_id) DO NOTHING",
            (received, received, devices),
        )
        self.conn.execute(
            "SELECT device_id FROM devices WHERE device_id = ANY(%s) ORDER BY device_id FOR UPDATE",
            (devices,),
        ).fetchall()

    def pipeline(self) -> contextlib.AbstractContextManager[Any]:
        return self.conn.pipeline()


class PostgresStore(StoreReads):
    """PostgreSQL store shared by any number of monitors, ``fleet status``, ``fleet events``,
    the dashboard and whatever else reads the database."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.name = describe(spec)
        self._lock = threading.Lock()
        self._conn: Any = None
        with self._lock:
            self._connect()

    def _connect(self) -> Any:
        """The open connection, (re)connecting and migrating the schema when there is none."""
        import psycopg

        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        try:
            conn = psycopg.connect(
                self.spec, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                application_name="edgeward-monitor",
            )
        except psycopg.Error as e:
            raise EnvironmentFault(
                f"cannot connect to the monitor store {self.name}: {str(e).strip()}; "
                "check that PostgreSQL runs there and accepts this user"
            ) from e
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                conn.execute("CREATE TABLE IF NOT EXISTS edgeward_schema (version INTEGER NOT NULL)")
                row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM edgeward_schema").fetchone()
                found = int(row[0]) if row else 0
                for statement in schema.pending(found, schema.POSTGRESQL, self.name):
                    conn.execute(statement)
                if found < schema.LATEST:
                    conn.execute("INSERT INTO edgeward_schema (version) VALUES (%s)", (schema.LATEST,))
        except psycopg.Error as e:
            conn.close()
            raise EnvironmentFault(f"cannot prepare the monitor store {self.name}: {str(e).strip()}") from e
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        import psycopg
        from psycopg import errors

        try:
            yield
        except (errors.SerializationFailure, errors.DeadlockDetected, errors.UniqueViolation) as e:
            raise StoreConflict(f"{what} {self.name}: another monitor's write came first ({e.sqlstate})") from e
        except psycopg.Error as e:
            raise EnvironmentFault(f"cannot use the monitor store {self.name} ({what}): {str(e).strip()}") from e

    @contextlib.contextmanager
    def _write(self, what: str) -> Iterator[_PgSql]:
        with self._lock, self._guard(what):
            conn = self._connect()
            with conn.transaction():
                yield _PgSql(conn)

    @contextlib.contextmanager
    def _sql(self) -> Iterator[_PgSql]:
        with self._lock, self._guard("reading"):
            yield _PgSql(self._connect())

    @contextlib.contextmanager
    def batch(self, received: datetime) -> Iterator[Batch]:
        """One write transaction; committed on success, rolled back on any error."""
        with self._write("writing") as db:
            batch = Batch(db, received)
            yield batch
            batch.flush()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
