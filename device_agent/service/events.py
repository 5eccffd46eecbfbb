"""The board's local event store: detections and security refusals as structured events.

SQLite in WAL mode with ``synchronous=FULL``: an event recorded is on disk. Telemetry forwards
events from here (tracking what it has sent by ``seq``); ``edgeward-agent events`` lists them.
Evidence is summary data only: never a raw input (invariant 8).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from device_agent.config import DEFAULT_CONFIG
from device_agent.errors import EnvironmentFault, UsageError
from device_agent.store.sqlitedb import open_durable
from device_agent.wire import format_time, parse_time

SEVERITIES = ("info", "warning", "critical")
# Kinds in use: ood, extraction, probing, rate, integrity, tamper, refusal, throttle, install, wipe.


@dataclass(frozen=True)
class Event:
    seq: int
    time: datetime
    kind: str
    severity: str
    client: str | None
    score: float | None
    evidence: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": format_time(self.time),
            "kind": self.kind,
            "severity": self.severity,
            "client": self.client,
            "score": self.score,
            "evidence": self.evidence,
        }


class EventStore:
    """Append-only store of events, safe to share between threads of one process. Evidence
    over ``max_evidence_bytes`` of JSON is replaced by its size."""

    def __init__(
        self, path: str | Path, max_evidence_bytes: int = DEFAULT_CONFIG.serve.max_evidence_bytes
    ) -> None:
        self.path = Path(path)
        self.max_evidence_bytes = max_evidence_bytes
        self._lock = threading.Lock()
        try:
            self._db = open_durable(
                self.path,
                "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                "time TEXT NOT NULL, kind TEXT NOT NULL, severity TEXT NOT NULL, client TEXT, "
                "score REAL, evidence TEXT NOT NULL);",
            )
        except sqlite3.Error as e:
            raise EnvironmentFault(f"cannot open the event store {self.path}: {e}") from e

    def record(
        self,
        kind: str,
        time: datetime,
        *,
        severity: str = "warning",
        client: str | None = None,
        score: float | None = None,
        evidence: dict[str, Any] | None = None,
    ) -> Event:
        if severity not in SEVERITIES:
            raise UsageError(f"severity must be one of {', '.join(SEVERITIES)}")
        body = json.dumps(evidence or {}, sort_keys=True)
        if len(body) > self.max_evidence_bytes:
            body = json.dumps({"truncated": True, "bytes": len(body)})
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO events (time, kind, severity, client, score, evidence) VALUES (?,?,?,?,?,?)",
                (format_time(time), kind, severity, client, score, body),
            )
            seq = int(cur.lastrowid or 0)
        return Event(seq, time, kind, severity, client, score, json.loads(body))

    def list(self, after_seq: int = 0, since: datetime | None = None, limit: int = 1000) -> list[Event]:
        q = "SELECT seq, time, kind, severity, client, score, evidence FROM events WHERE seq > ?"
        params: list[Any] = [after_seq]
        if since is not None:
            q += " AND time >= ?"
            params.append(format_time(since))
        q += " ORDER BY seq LIMIT ?"
        params.append(limit)
        with self._lock:
            rows = self._db.execute(q, params).fetchall()
        return [
            Event(r[0], parse_time(r[1], "time"), r[2], r[3], r[4], r[5], json.loads(r[6])) for r in rows
        ]

    def close(self) -> None:
        with self._lock:
            self._db.close()
