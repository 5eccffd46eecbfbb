"""The monitor's store: verified reports, device state and security events in SQLite.

WAL with ``synchronous=FULL``; one transaction per ingested batch (the monitor acknowledges the
broker only after it commits). ``(device_id, seq)`` is the primary key of a genuine report, so a
report is stored at most once even with several monitors writing to the same file.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from device_agent.errors import EnvironmentFault
from device_agent.store.sqlitedb import open_durable, transaction
from device_agent.telemetry.report import Report
from device_agent.wire import format_time

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
# Stored report data: the same text json.dumps(data, sort_keys=True) gives, without building an
# encoder per report.
_data_json = json.JSONEncoder(sort_keys=True).encode
# Reports of one second share their time text (datetimes are immutable).
_time_text = functools.lru_cache(maxsize=1024)(format_time)


def _text(value: str, most: int) -> str:
    """At most ``most`` characters of text any store can write: whatever a message carried (a
    lone surrogate cannot be encoded as UTF-8) is shown escaped instead of failing the batch."""
    value = value[:most]
    return value if value.isascii() else value.encode("utf-8", "backslashreplace").decode("utf-8")


class Row(NamedTuple):
    """A verified report as it is stored (small and cheap to pass between processes)."""

    device_id: str
    seq: int
    kind: str
    time: str  # format_time of the report's time
    data: str  # the data object as stored: JSON, sorted keys
    state: str  # what a status report says the device's state is

    @classmethod
    def of(cls, r: Report) -> Row:
        state = str(r.data.get("state", "online"))[:16] if r.kind == "status" else ""
        return cls(r.device_id, r.seq, r.kind, _time_text(r.time), _data_json(r.data), state)


@dataclass
class _DeviceDelta:
    """What one batch changes for one device, written once at the end of the batch."""

    received: int = 0
    duplicates: int = 0
    highest: int = 0
    status: tuple[int, str, str] | None = None  # (seq, state, data) of the newest status
    counters: tuple[int, str] | None = None  # (seq, data) of the newest telemetry
    will: int = 0  # seq of a last will seen in this batch
    will_last: bool = False  # the will arrived after the batch's status reports


class Batch:
    """One ingest transaction: the monitor's view of what is already stored, and its writes
    (buffered, then written with one statement per table and one update per device)."""

    def __init__(self, db: sqlite3.Connection, received: datetime) -> None:
        self._db = db
        self.received = format_time(received)
        self._highest: dict[str, int] = {}
        self._new: dict[tuple[str, int], str] = {}
        self._stored: dict[tuple[str, int], str | None] = {}
        self._rows: list[tuple[Any, ...]] = []
        self._flags: list[tuple[Any, ...]] = []
        self._delta: dict[str, _DeviceDelta] = {}

    def prefetch(self, wanted: Iterable[tuple[str, int]]) -> None:
        """Look up what is stored under many (device, seq) with one query per device, so that
        :meth:`seen` needs no query per report."""
        by_device: dict[str, set[int]] = {}
        for device_id, seq in wanted:
            by_device.setdefault(device_id, set()).add(seq)
        for device_id, seqs in by_device.items():
            self._stored.update(((device_id, seq), None) for seq in seqs)
            rows = self._db.execute(
                "SELECT seq, digest FROM reports WHERE device_id = ? "
                "AND seq IN (SELECT value FROM json_each(?))",
                (device_id, json.dumps(sorted(seqs))),
            )
            self._stored.update(((device_id, seq), d) for seq, d in rows)

    def seen(self, device_id: str, seq: int) -> str | None:
        """The digest stored under (device, seq), if any (including this batch)."""
        key = (device_id, seq)
        if key in self._new:
            return self._new[key]
        if key in self._stored:
            return self._stored[key]
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

    def _d(self, device_id: str) -> _DeviceDelta:
        return self._delta.setdefault(device_id, _DeviceDelta())

    def accept(self, r: Report | Row, digest: str) -> None:
        """Store a genuine report and move the device's state forward (never backward)."""
        if isinstance(r, Report):
            r = Row.of(r)
        key = (r.device_id, r.seq)
        data = r.data
        self._new[key] = digest
        self._rows.append((*key, r.kind, r.time, self.received, digest, data))
        self._highest[r.device_id] = max(self.highest(r.device_id), r.seq)
        d = self._d(r.device_id)
        d.received += 1
        d.highest = max(d.highest, r.seq)
        if r.kind == "status" and (d.status is None or r.seq > d.status[0]):
            d.status = (r.seq, r.state, data)
            d.will_last = False
        elif r.kind == "telemetry" and (d.counters is None or r.seq > d.counters[0]):
            d.counters = (r.seq, data)
        elif r.kind == "will":
            d.will = max(d.will, r.seq)
            d.will_last = True

    def duplicate(self, device_id: str) -> None:
        self._d(device_id).duplicates += 1

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
        self._flags.append(
            (self.received, device_id, kind, severity, _text(detail, 500), _text(topic, 200), seq, digest)
        )

    def _status(self, dev: str, d: _DeviceDelta) -> None:
        if d.status is not None:
            self._db.execute(
                "UPDATE devices SET state_seq = ?, state = ?, status = ? "
                "WHERE device_id = ? AND state_seq < ?",
                (*d.status, dev, d.status[0]),
            )

    def _will(self, dev: str, d: _DeviceDelta) -> None:
        # The will's number was reserved when the session began, so it is below that session's
        # reports; the broker sends it only once the board is gone: it wins unless a status
        # arrived after it.
        if d.will:
            self._db.execute(
                "UPDATE devices SET state = 'offline', state_seq = MAX(state_seq, ?) "
                "WHERE device_id = ?",
                (d.will, dev),
            )

    def flush(self) -> None:
        db = self._db
        db.executemany(
            "INSERT INTO reports (device_id, seq, kind, time, received, digest, data) "
            "VALUES (?,?,?,?,?,?,?)",
            self._rows,
        )
        db.executemany(
            "INSERT INTO security (received, device_id, kind, severity, detail, topic, seq, "
            "digest) VALUES (?,?,?,?,?,?,?,?)",
            self._flags,
        )
        for dev, d in self._delta.items():
            db.execute(
                "INSERT INTO devices (device_id, first_seen, last_seen) VALUES (?, ?, ?) "
                "ON CONFLICT(device_id) DO UPDATE SET last_seen = excluded.last_seen",
                (dev, self.received, self.received),
            )
            db.execute(
                "UPDATE devices SET received = received + ?, duplicates = duplicates + ?, "
                "highest_seq = MAX(highest_seq, ?) WHERE device_id = ?",
                (d.received, d.duplicates, d.highest, dev),
            )
            order = (self._status, self._will) if d.will_last else (self._will, self._status)
            for step in order:
                step(dev, d)
            if d.counters is not None:
                db.execute(
                    "UPDATE devices SET counters_seq = ?, counters = ? "
                    "WHERE device_id = ? AND counters_seq < ?",
                    (*d.counters, dev, d.counters[0]),
                )


class MonitorStore:
    """SQLite store shared by the monitor, ``fleet status``, ``fleet events`` and the dashboard."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            # Several monitors on one machine may share the store: wait for each other's writes.
            self._db = open_durable(self.path, SCHEMA, timeout=30)
        except sqlite3.Error as e:
            raise EnvironmentFault(f"cannot open the monitor store {self.path}: {e}") from e

    @contextlib.contextmanager
    def batch(self, received: datetime) -> Iterator[Batch]:
        """One write transaction; committed on success, rolled back on any error."""
        with self._lock, transaction(self._db, f"the monitor store {self.path}"):
            batch = Batch(self._db, received)
            yield batch
            batch.flush()

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
            ev = json.loads(r["data"]).get("event")
            if not isinstance(ev, dict):  # a board's signed summary, not necessarily this shape
                ev = {}
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
