"""The monitor's store: verified reports, device state and security events in SQLite.

WAL with ``synchronous=FULL``; one transaction per ingested batch (the monitor acknowledges the
broker only after it commits). ``(device_id, seq)`` is the primary key of a genuine report, so a
report is stored at most once even with several monitors writing to the same file.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from device_agent.bundle import format_time
from device_agent.errors import EnvironmentFault
from device_agent.report import Report

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
  device_id TEXT PRIMARY KEY, first_seen TEXT NOT NULL, last_seen TEXT NOT NULL,
  highest_seq INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL DEFAULT 'online',
  state_seq INTEGER NOT NULL DEFAULT 0, status TEXT NOT NULL DEFAULT '{}',
  counters_seq INTEGER NOT NULL DEFAULT 0, counters TEXT NOT NULL DEFAULT '{}',
  received INTEGER NOT NULL DEFAULT 0, duplicates INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS reports (
  device_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, time TEXT NOT NULL,
  received TEXT NOT NULL, digest TEXT NOT NULL, data TEXT NOT NULL, PRIMARY KEY (device_id, seq));
CREATE INDEX IF NOT EXISTS reports_time ON reports (kind, time);
CREATE TABLE IF NOT EXISTS security (
  id INTEGER PRIMARY KEY AUTOINCREMENT, received TEXT NOT NULL, device_id TEXT,
  kind TEXT NOT NULL, severity TEXT NOT NULL, detail TEXT NOT NULL, topic TEXT NOT NULL,
  seq INTEGER, digest TEXT NOT NULL);
"""


class Batch:
    """One ingest transaction: the monitor's view of what is already stored, and its writes."""

    def __init__(self, db: sqlite3.Connection, received: datetime) -> None:
        self._db = db
        self.received = format_time(received)
        self._highest: dict[str, int] = {}

    def seen(self, device_id: str, seq: int) -> str | None:
        row = self._db.execute(
            "SELECT digest FROM reports WHERE device_id = ? AND seq = ?", (device_id, seq)
        ).fetchone()
        return row[0] if row else None

    def highest(self, device_id: str) -> int:
        if device_id not in self._highest:
            row = self._db.execute(
                "SELECT highest_seq FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
            self._highest[device_id] = int(row[0]) if row else 0
        return self._highest[device_id]

    def _touch(self, device_id: str) -> None:
        self._db.execute(
            "INSERT INTO devices (device_id, first_seen, last_seen) VALUES (?, ?, ?) "
            "ON CONFLICT(device_id) DO UPDATE SET last_seen = excluded.last_seen",
            (device_id, self.received, self.received),
        )

    def accept(self, r: Report, digest: str) -> None:
        """Store a genuine report and move the device's state forward (never backward)."""
        data = json.dumps(r.data, sort_keys=True)
        self._db.execute(
            "INSERT INTO reports (device_id, seq, kind, time, received, digest, data) "
            "VALUES (?,?,?,?,?,?,?)",
            (r.device_id, r.seq, r.kind, format_time(r.time), self.received, digest, data),
        )
        self._touch(r.device_id)
        self._highest[r.device_id] = max(self.highest(r.device_id), r.seq)
        d = r.device_id
        self._db.execute(
            "UPDATE devices SET received = received + 1, highest_seq = MAX(highest_seq, ?) "
            "WHERE device_id = ?",
            (r.seq, d),
        )
        if r.kind == "status":
            self._db.execute(
                "UPDATE devices SET state = ?, state_seq = ?, status = ? "
                "WHERE device_id = ? AND state_seq < ?",
                (str(r.data.get("state", "online"))[:16], r.seq, data, d, r.seq),
            )
        elif r.kind == "will":
            # The will's number was reserved when the session began, so it is below that
            # session's reports; the broker sends it only once the board is gone.
            self._db.execute(
                "UPDATE devices SET state = 'offline', state_seq = MAX(state_seq, ?) "
                "WHERE device_id = ?",
                (r.seq, d),
            )
        elif r.kind == "telemetry":
            self._db.execute(
                "UPDATE devices SET counters = ?, counters_seq = ? "
                "WHERE device_id = ? AND counters_seq < ?",
                (data, r.seq, d, r.seq),
            )

    def duplicate(self, device_id: str) -> None:
        self._db.execute(
            "UPDATE devices SET duplicates = duplicates + 1 WHERE device_id = ?", (device_id,)
        )

    def flag(
        self,
        kind: str,
        severity: str,
        detail: str,
        topic: str,
        device_id: str | None,
        seq: int | None,
        digest: str,
    ) -> None:
        self._db.execute(
            "INSERT INTO security (received, device_id, kind, severity, detail, topic, seq, "
            "digest) VALUES (?,?,?,?,?,?,?,?)",
            (self.received, device_id, kind, severity, detail[:500], topic[:200], seq, digest),
        )


class MonitorStore:
    """SQLite store shared by the monitor, ``fleet status``, ``fleet events`` and the dashboard."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=30
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as e:
            raise EnvironmentFault(f"cannot open the monitor store {self.path}: {e}") from e

    @contextlib.contextmanager
    def batch(self, received: datetime) -> Iterator[Batch]:
        """One write transaction; committed on success, rolled back on any error."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield Batch(self._db, received)
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise EnvironmentFault(f"cannot write the monitor store {self.path}: {e}") from e

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._db.execute(sql, params)
            names = [c[0] for c in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def devices(self) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT d.*, (SELECT COUNT(*) FROM reports r WHERE r.device_id = d.device_id "
            "AND r.kind = 'events') AS events, (SELECT COUNT(*) FROM security s "
            "WHERE s.device_id = d.device_id) AS flagged FROM devices d ORDER BY device_id"
        )
        for r in rows:
            r["status"] = json.loads(r["status"])
            r["counters"] = json.loads(r["counters"])
        return rows

    def reports(
        self, device_id: str, kind: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        q = "SELECT seq, kind, time, received, digest, data FROM reports WHERE device_id = ?"
        params: tuple[Any, ...] = (device_id,)
        if kind is not None:
            q += " AND kind = ?"
            params += (kind,)
        rows = self._rows(q + " ORDER BY seq DESC LIMIT ?", params + (limit,))
        for r in rows:
            r["data"] = json.loads(r["data"])
        return rows

    def events(
        self, since: datetime | None = None, device_id: str | None = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """Board events and monitor security events, oldest first, in one timeline."""
        t = format_time(since) if since else ""
        dev = device_id or ""
        board = self._rows(
            "SELECT time, device_id, seq, data FROM reports WHERE kind = 'events' AND time >= ? "
            "AND (? = '' OR device_id = ?) ORDER BY time DESC, seq DESC LIMIT ?",
            (t, dev, dev, limit),
        )
        monitor = self._rows(
            "SELECT received AS time, device_id, seq, kind, severity, detail, topic FROM security "
            "WHERE received >= ? AND (? = '' OR device_id = ?) ORDER BY id DESC LIMIT ?",
            (t, dev, dev, limit),
        )
        out = []
        for r in board:
            ev = json.loads(r["data"]).get("event", {})
            out.append(
                {
                    "time": r["time"],
                    "source": "board",
                    "device_id": r["device_id"],
                    "seq": r["seq"],
                    "kind": ev.get("kind"),
                    "severity": ev.get("severity"),
                    "detail": json.dumps(ev.get("evidence", {}), sort_keys=True),
                }
            )
        for r in monitor:
            out.append({"source": "monitor"} | {k: r[k] for k in r if k != "topic"})
        out.sort(key=lambda e: (e["time"], e["source"], e["seq"] or 0))
        return out[-limit:]

    def close(self) -> None:
        with self._lock:
            self._db.close()
