"""What both monitor stores share: the stored row, the ingest batch, the reads, retention.

A store is a SQL database behind a small adapter (:class:`Sql`): SQLite (``sqlite.py``) or
PostgreSQL (``postgres.py``). The SQL text is written once, for SQLite, and the PostgreSQL adapter
translates its two differences (``?`` parameters, the two-argument ``MAX``); each adapter says how
it lists sequence numbers and how it takes its writer's locks.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, Protocol

from device_agent.errors import EnvironmentFault
from device_agent.telemetry.report import Report
from device_agent.wire import format_time

# Stored report data: the same text json.dumps(data, sort_keys=True) gives, without building an
# encoder per report.
_data_json = json.JSONEncoder(sort_keys=True).encode
# Reports of one second share their time text (datetimes are immutable).
_time_text = functools.lru_cache(maxsize=1024)(format_time)


ROLLOUT_COLUMNS = ("release_id", "model_id", "model_version", "base_url", "stages", "max_failures",
                   "stage_timeout_s", "created", "state", "stage", "stage_started", "updated", "detail",
                   "payload_url", "payload_length", "payload_sha256")


class StoreConflict(EnvironmentFault):
    """Another monitor's transaction got in the way (a serialisation failure, a deadlock, a row
    it stored first): nothing of this batch was committed; judge it again against what is stored."""


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


class Sql(Protocol):
    """One database connection as a store uses it, inside a transaction the store opened."""

    # A condition on ``seq`` that takes one parameter, the list made by :meth:`seq_list`.
    seqs_in: str

    def seq_list(self, seqs: Sequence[int]) -> Any: ...

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]: ...

    def run(self, sql: str, params: Sequence[Any] = ()) -> int: ...

    def many(self, sql: str, rows: list[tuple[Any, ...]]) -> None: ...

    def lock_devices(self, devices: list[str], received: str) -> None:
        """Make every device of a batch a row and hold its lock until the batch commits, so that
        what the batch reads about those devices stays what is stored while it judges."""

    def pipeline(self) -> contextlib.AbstractContextManager[Any]: ...


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


# A security event is stored once per (topic, payload digest, kind): the same message judged again
# (redelivered to another monitor, or resent by whoever forged it) counts as a repeat.
INSERT_FLAG = (
    "INSERT INTO security (received, device_id, kind, severity, detail, topic, seq, digest) "
    "VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (topic, digest, kind) "
    "DO UPDATE SET repeats = security.repeats + 1"
)


class Batch:
    """One ingest transaction: the monitor's view of what is already stored, and its writes
    (buffered, then written with one statement per table and one update per device)."""

    def __init__(self, db: Sql, received: datetime) -> None:
        self._db = db
        self.received = format_time(received)
        self._highest: dict[str, int] = {}
        self._new: dict[tuple[str, int], str] = {}
        self._stored: dict[tuple[str, int], str | None] = {}
        self._rows: list[tuple[Any, ...]] = []
        self._flags: list[tuple[Any, ...]] = []
        self._delta: dict[str, _DeviceDelta] = {}

    def prefetch(self, wanted: Iterable[tuple[str, int]]) -> None:
        """Lock the batch's devices (in the store that needs it), then look up what is stored
        under many (device, seq) with one query per device, so that :meth:`seen` needs no query
        per report. Called once, before any judgement."""
        by_device: dict[str, set[int]] = {}
        for device_id, seq in wanted:
            by_device.setdefault(device_id, set()).add(seq)
        devices = sorted(by_device)
        self._db.lock_devices(devices, self.received)
        for device_id in devices:
            seqs = by_device[device_id]
            self._stored.update(((device_id, seq), None) for seq in seqs)
            rows = self._db.rows(
                f"SELECT seq, digest FROM reports WHERE device_id = ? AND {self._db.seqs_in}",  # noqa: S608  # nosec B608 # a constant of the adapter
                (device_id, self._db.seq_list(sorted(seqs))),
            )
            self._stored.update(((device_id, seq), d) for seq, d in rows)

    def seen(self, device_id: str, seq: int) -> str | None:
        """The digest stored under (device, seq), if any (including this batch)."""
        key = (device_id, seq)
        if key in self._new:
            return self._new[key]
        if key in self._stored:
            return self._stored[key]
        rows = self._db.rows(
            "SELECT digest FROM reports WHERE device_id = ? AND seq = ?", (device_id, seq)
        )
        return str(rows[0][0]) if rows else None

    def highest(self, device_id: str) -> int:
        if device_id not in self._highest:
            rows = self._db.rows(
                "SELECT highest_seq FROM devices WHERE device_id = ?", (device_id,)
            )
            self._highest[device_id] = int(rows[0][0]) if rows else 0
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
            self._db.run(
                "UPDATE devices SET state_seq = ?, state = ?, status = ? "
                "WHERE device_id = ? AND state_seq < ?",
                (*d.status, dev, d.status[0]),
            )

    def _will(self, dev: str, d: _DeviceDelta) -> None:
        # The will's number was reserved when the session began, so it is below that session's
        # reports; the broker sends it only once the board is gone: it wins unless a status
        # arrived after it.
        if d.will:
            self._db.run(
                "UPDATE devices SET state = 'offline', state_seq = MAX(state_seq, ?) "
                "WHERE device_id = ?",
                (d.will, dev),
            )

    def flush(self) -> None:
        db = self._db
        with db.pipeline():
            if self._rows:
                db.many(
                    "INSERT INTO reports (device_id, seq, kind, time, received, digest, data) "
                    "VALUES (?,?,?,?,?,?,?)",
                    self._rows,
                )
            if self._flags:
                # In one order in every monitor, so two never wait for each other's events.
                db.many(INSERT_FLAG, sorted(self._flags, key=lambda f: (f[5], f[7], f[2])))
            for dev in sorted(self._delta):
                d = self._delta[dev]
                db.run(
                    "INSERT INTO devices (device_id, first_seen, last_seen) VALUES (?, ?, ?) "
                    "ON CONFLICT(device_id) DO UPDATE SET last_seen = excluded.last_seen",
                    (dev, self.received, self.received),
                )
                db.run(
                    "UPDATE devices SET received = received + ?, duplicates = duplicates + ?, "
                    "highest_seq = MAX(highest_seq, ?) WHERE device_id = ?",
                    (d.received, d.duplicates, d.highest, dev),
                )
                order = (self._status, self._will) if d.will_last else (self._will, self._status)
                for step in order:
                    step(dev, d)
                if d.counters is not None:
                    db.run(
                        "UPDATE devices SET counters_seq = ?, counters = ? "
                        "WHERE device_id = ? AND counters_seq < ?",
                        (*d.counters, dev, d.counters[0]),
                    )


@dataclass(frozen=True)
class Pruned:
    """What one retention pass removed."""

    reports: int
    events: int
    batches: int


class StoreReads:
    """The reads ``fleet status``, ``fleet events``, the dashboard and the incident export share,
    and retention; the same SQL over either store. Subclasses provide :meth:`_sql` (a context
    manager giving the connection, under the store's lock) and :meth:`_write` (a transaction)."""

    def _sql(self) -> contextlib.AbstractContextManager[Sql]:
        raise NotImplementedError

    def _write(self, what: str) -> contextlib.AbstractContextManager[Sql]:
        raise NotImplementedError

    def _dicts(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self._sql() as db:
            return db.dicts(sql, params)

    def devices(self) -> list[dict[str, Any]]:
        # One grouped count per table, joined (a count per device would scan a table per board).
        rows = self._dicts(
            "SELECT d.*, COALESCE(e.n, 0) AS events, COALESCE(f.n, 0) AS flagged FROM devices d "
            "LEFT JOIN (SELECT device_id, COUNT(*) AS n FROM reports WHERE kind = 'events' "
            "GROUP BY device_id) e ON e.device_id = d.device_id "
            "LEFT JOIN (SELECT device_id, COUNT(*) AS n FROM security GROUP BY device_id) f "
            "ON f.device_id = d.device_id ORDER BY d.device_id"
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
        rows = self._dicts(q + " ORDER BY seq DESC LIMIT ?", params + (limit,))
        for r in rows:
            r["data"] = json.loads(r["data"])
        return rows

    def events(
        self,
        since: datetime | None = None,
        device_id: str | None = None,
        limit: int = 1000,
        until: datetime | None = None,
    ) -> list[dict[str, Any]]:
        """Board events and monitor security events, oldest first, in one timeline (``until``:
        before that time)."""
        t = format_time(since) if since else ""
        u = format_time(until) if until else "~"  # after every time text
        dev = device_id or ""
        board = self._dicts(
            "SELECT time, device_id, seq, data FROM reports WHERE kind = 'events' AND time >= ? "
            "AND time < ? AND (? = '' OR device_id = ?) ORDER BY time DESC, seq DESC LIMIT ?",
            (t, u, dev, dev, limit),
        )
        monitor = self._dicts(
            "SELECT received AS time, device_id, seq, kind, severity, detail, repeats, digest "
            "FROM security WHERE received >= ? AND received < ? AND (? = '' OR device_id = ?) "
            "ORDER BY id DESC LIMIT ?",
            (t, u, dev, dev, limit),
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
            out.append({"source": "monitor"} | r)
        out.sort(key=lambda e: (e["time"], e["source"], e["seq"] or 0))
        return out[-limit:]

    def event_counts(self, since: datetime, limit: int = 100_000) -> list[dict[str, Any]]:
        """Security events since ``since``, counted by (source, kind, severity), on the times
        :meth:`events` uses (the monitor's: when it received them; a board's: the time it
        signed): the monitor's own in SQL, the boards' (kind and severity inside each signed
        report) from at most ``limit`` newest reports. Kind and severity are what a board said: the caller bounds
        them before using them as labels."""
        t = format_time(since)
        out: dict[tuple[str, str, str], int] = {}
        for r in self._dicts(
            "SELECT kind, severity, COUNT(*) AS n FROM security WHERE received >= ? "
            "GROUP BY kind, severity",
            (t,),
        ):
            key = ("monitor", str(r["kind"]), str(r["severity"]))
            out[key] = out.get(key, 0) + int(r["n"])
        for r in self._dicts(
            "SELECT data FROM reports WHERE kind = 'events' AND time >= ? ORDER BY time DESC LIMIT ?",
            (t, limit),
        ):
            ev = _board_event(r["data"])
            key = ("board", str(ev.get("kind")), str(ev.get("severity")))
            out[key] = out.get(key, 0) + 1
        return [
            {"source": k[0], "kind": k[1], "severity": k[2], "count": n} for k, n in sorted(out.items())
        ]

    # --- the alert queue: security events, claimed once across monitors ----------------------
    def alert_candidates(
        self, since: datetime, monitor: str, lease_before: datetime, limit: int
    ) -> list[dict[str, Any]]:
        """Security events received since ``since`` that no monitor has sent or decided on, and
        that no other monitor holds a live claim on (one taken after ``lease_before``), oldest
        first: the monitor's own (``monitor:ID``) and the boards' (``board:DEVICE:SEQ``)."""
        t, lease = format_time(since), format_time(lease_before)
        monitor_rows = self._dicts(
            "SELECT s.id, s.received, s.device_id, s.kind, s.severity, s.detail, s.topic, s.seq, "
            "s.repeats FROM security s WHERE s.received >= ? AND NOT EXISTS (SELECT 1 FROM alerts a "
            "WHERE a.event_key = 'monitor:' || s.id AND (a.sent_at IS NOT NULL OR "
            "(a.claimed_by <> ? AND a.claimed_at >= ?))) ORDER BY s.id LIMIT ?",
            (t, monitor, lease, limit),
        )
        board_rows = self._dicts(
            "SELECT r.device_id, r.seq, r.time, r.received, r.data FROM reports r "
            "WHERE r.kind = 'events' AND r.received >= ? AND NOT EXISTS (SELECT 1 FROM alerts a "
            "WHERE a.event_key = 'board:' || r.device_id || ':' || r.seq AND (a.sent_at IS NOT NULL "
            "OR (a.claimed_by <> ? AND a.claimed_at >= ?))) ORDER BY r.received, r.device_id, r.seq LIMIT ?",
            (t, monitor, lease, limit),
        )
        out = [
            {"key": f"monitor:{r['id']}", "source": "monitor", "time": r["received"]}
            | {k: r[k] for k in ("received", "device_id", "kind", "severity", "detail", "topic", "seq", "repeats")}
            for r in monitor_rows
        ]
        for r in board_rows:
            ev = _board_event(r["data"])
            out.append(
                {
                    "key": f"board:{r['device_id']}:{r['seq']}",
                    "source": "board",
                    "time": r["time"],
                    "received": r["received"],
                    "device_id": r["device_id"],
                    "seq": r["seq"],
                    "kind": ev.get("kind"),
                    "severity": ev.get("severity"),
                    "detail": json.dumps(ev.get("evidence", {}), sort_keys=True)[:500],
                }
            )
        out.sort(key=lambda e: (e["received"], e["key"]))
        return out[:limit]

    def claim_alert(self, key: str, monitor: str, now: datetime, lease_before: datetime) -> bool:
        """Take the event ``key`` for this monitor to send: True if no monitor sent it and no
        other monitor holds a claim taken after ``lease_before`` (the primary key of ``alerts``
        makes two claims one row; the one whose write lands owns it)."""
        with self._write("alert claim") as db:
            return (
                db.run(
                    "INSERT INTO alerts (event_key, claimed_by, claimed_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (event_key) DO UPDATE SET claimed_by = excluded.claimed_by, "
                    "claimed_at = excluded.claimed_at WHERE alerts.sent_at IS NULL AND "
                    "(alerts.claimed_by = excluded.claimed_by OR alerts.claimed_at < ?)",
                    (key, monitor, format_time(now), format_time(lease_before)),
                )
                == 1
            )

    def alert_settled(self, key: str, monitor: str, now: datetime, outcome: str = "sent") -> None:
        """The webhook took the event (or it is below the alert threshold: ``outcome`` says)."""
        with self._write("alert sent") as db:
            db.run(
                "INSERT INTO alerts (event_key, claimed_by, claimed_at, sent_at, attempts, last_error) "
                "VALUES (?, ?, ?, ?, 1, ?) ON CONFLICT (event_key) DO UPDATE SET "
                "sent_at = excluded.sent_at, attempts = alerts.attempts + 1, last_error = excluded.last_error "
                "WHERE alerts.claimed_by = excluded.claimed_by AND alerts.sent_at IS NULL",
                (key, monitor, format_time(now), format_time(now), "" if outcome == "sent" else outcome),
            )

    def alert_failed(self, key: str, monitor: str, now: datetime, error: str) -> None:
        """A delivery attempt failed: count it and renew this monitor's claim (it retries)."""
        with self._write("alert retry") as db:
            db.run(
                "UPDATE alerts SET attempts = attempts + 1, last_error = ?, claimed_at = ? "
                "WHERE event_key = ? AND claimed_by = ? AND sent_at IS NULL",
                (_text(error, 300), format_time(now), key, monitor),
            )

    def alert_backlog(self) -> dict[str, int]:
        """Alert rows by outcome: sent, pending (claimed, not yet delivered), below threshold."""
        rows = self._dicts(
            "SELECT CASE WHEN sent_at IS NULL THEN 'pending' WHEN last_error = '' THEN 'sent' "
            "ELSE 'skipped' END AS outcome, COUNT(*) AS n FROM alerts GROUP BY 1"
        )
        return {str(r["outcome"]): int(r["n"]) for r in rows}

    def committed(self, devices: Iterable[str], window: int) -> dict[str, tuple[int, list[int]]]:
        """What a receipt states for each device: its highest stored sequence number and the
        numbers stored among the last ``window`` up to it (read from the store, after the
        commit, so that what any monitor committed counts)."""
        out: dict[str, tuple[int, list[int]]] = {}
        with self._sql() as db:
            for dev in sorted(set(devices)):
                rows = db.rows("SELECT highest_seq FROM devices WHERE device_id = ?", (dev,))
                top = int(rows[0][0]) if rows else 0
                seqs = db.rows(
                    "SELECT seq FROM reports WHERE device_id = ? AND seq > ? AND seq <= ? ORDER BY seq",
                    (dev, top - window, top),
                )
                out[dev] = (top, [int(s) for (s,) in seqs])
        return out

    # --- over-the-air rollouts (fleet/rollout.py decides; the store is where they live) ---------
    def create_rollout(self, rollout: dict[str, Any], devices: list[dict[str, Any]]) -> bool:
        """Record a new rollout and its boards in one transaction; False (nothing written) if a
        rollout of that release exists already."""
        with self._write("rollout") as db:
            if db.rows("SELECT 1 FROM rollouts WHERE release_id = ?", (rollout["release_id"],)):
                return False
            db.run(
                "INSERT INTO rollouts (release_id, model_id, model_version, base_url, stages, max_failures, "
                "stage_timeout_s, created, state, stage, stage_started, updated, detail, payload_url, payload_length, "
                "payload_sha256) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                tuple(json.dumps(rollout[k]) if k == "stages" and not isinstance(rollout[k], str) else rollout.get(k)
                      for k in ROLLOUT_COLUMNS),
            )
            db.many(
                "INSERT INTO rollout_devices (release_id, device_id, position, stage, url, length, sha256, state, "
                "updated) VALUES (?,?,?,?,?,?,?,?,?)",
                [(rollout["release_id"], d["device_id"], d["position"], d["stage"], d["url"], d["length"],
                  d["sha256"], d["state"], rollout["updated"]) for d in devices],
            )
        return True

    def rollouts(self, release_id: str | None = None) -> list[dict[str, Any]]:
        """Every rollout (or one), newest first."""
        rel = release_id or ""
        rows = self._dicts(
            "SELECT * FROM rollouts WHERE (? = '' OR release_id = ?) ORDER BY created DESC, release_id", (rel, rel)
        )
        for r in rows:
            r["stages"] = json.loads(r["stages"])
        return rows

    def rollout_devices(self, release_id: str) -> list[dict[str, Any]]:
        return self._dicts("SELECT * FROM rollout_devices WHERE release_id = ? ORDER BY position", (release_id,))

    def rollout_open(self, device_id: str | None = None) -> list[dict[str, Any]]:
        """Boards whose update command has no final answer yet (of one device, or all)."""
        dev = device_id or ""
        return self._dicts(
            "SELECT release_id, device_id, seq, command_sha256, state FROM rollout_devices WHERE state IN "
            "('pending', 'expired') AND seq IS NOT NULL AND (? = '' OR device_id = ?) ORDER BY release_id, position",
            (dev, dev),
        )

    def rollout_counts(self, release_id: str) -> tuple[dict[str, int], list[str]]:
        """A rollout's boards counted by state, and its first ten failed boards in order."""
        counts = {str(r["state"]): int(r["n"]) for r in self._dicts(
            "SELECT state, COUNT(*) AS n FROM rollout_devices WHERE release_id = ? GROUP BY state", (release_id,))}
        failed = [str(r["device_id"]) for r in self._dicts(
            "SELECT device_id FROM rollout_devices WHERE release_id = ? AND state = 'failed' ORDER BY position "
            "LIMIT 10", (release_id,))]
        return counts, failed

    def rollout_stage_counts(self, release_id: str) -> tuple[dict[int, dict[str, int]], list[str]]:
        """A rollout's boards counted by stage and state (what fleet/rollout.py's ``advance``
        decides from, in one aggregate query), and its first ten failed boards in order."""
        by_stage: dict[int, dict[str, int]] = {}
        for r in self._dicts("SELECT stage, state, COUNT(*) AS n FROM rollout_devices WHERE release_id = ? "
                             "GROUP BY stage, state", (release_id,)):
            by_stage.setdefault(int(r["stage"]), {})[str(r["state"])] = int(r["n"])
        failed = [str(r["device_id"]) for r in self._dicts(
            "SELECT device_id FROM rollout_devices WHERE release_id = ? AND state = 'failed' ORDER BY position "
            "LIMIT 10", (release_id,))]
        return by_stage, failed

    def rollout_issued(self, release_id: str, device_id: str, seq: int, command_sha256: str, now: datetime) -> None:
        """The board's update command was signed (and recorded in the ledger): it is pending."""
        t = format_time(now)
        with self._write("rollout") as db:
            db.run(
                "UPDATE rollout_devices SET state = 'pending', seq = ?, command_sha256 = ?, issued = ?, updated = ? "
                "WHERE release_id = ? AND device_id = ? AND state = 'waiting'",
                (seq, command_sha256, t, t, release_id, device_id),
            )

    def rollout_answered(self, release_id: str, device_id: str, seq: int, state: str, detail: str,
                         now: datetime) -> bool:
        """What the board answered to its update command ``seq`` (never undoes ``updated``)."""
        with self._write("rollout") as db:
            return db.run(
                "UPDATE rollout_devices SET state = ?, detail = ?, updated = ? WHERE release_id = ? AND "
                "device_id = ? AND seq = ? AND state IN ('pending', 'expired') AND state <> ?",
                (state, _text(detail, 500), format_time(now), release_id, device_id, seq, state),
            ) == 1

    def rollout_moved(self, release_id: str, state: str, stage: int, stage_started: str, detail: str,
                      now: datetime) -> None:
        """The rollout's own state: its current stage (and when it began), running, halted or done."""
        with self._write("rollout") as db:
            db.run(
                "UPDATE rollouts SET state = ?, stage = ?, stage_started = ?, detail = ?, updated = ? "
                "WHERE release_id = ?",
                (state, stage, stage_started, _text(detail, 500), format_time(now), release_id),
            )

    def prune(self, before: datetime, keep_last: int, batch: int = 1000) -> Pruned:
        """Delete reports and security events the monitor received before ``before``, at most
        ``batch`` rows per transaction (a long prune never holds the writers up for long). A
        device's newest ``keep_last`` sequence numbers are kept whatever their age: they are
        what tells a replayed old report from a redelivered one (``judge_sequence``), so a
        quiet board's last reports stay until it reports again."""
        if batch < 1 or keep_last < 0:
            raise ValueError("prune needs batch >= 1 and keep_last >= 0")
        t = format_time(before)
        reports = events = batches = 0
        while True:
            with self._write("retention") as db:
                n = db.run(
                    "DELETE FROM reports WHERE (device_id, seq) IN (SELECT r.device_id, r.seq "
                    "FROM reports r JOIN devices d ON d.device_id = r.device_id "
                    "WHERE r.received < ? AND r.seq <= d.highest_seq - ? LIMIT ?)",
                    (t, keep_last, batch),
                )
            reports += n
            batches += 1
            if n < batch:
                break
        while True:
            with self._write("retention") as db:
                n = db.run(
                    "DELETE FROM security WHERE id IN "
                    "(SELECT id FROM security WHERE received < ? ORDER BY id LIMIT ?)",
                    (t, batch),
                )
            events += n
            batches += 1
            if n < batch:
                break
        return Pruned(reports, events, batches)


def _board_event(data: str) -> dict[str, Any]:
    """The event object of a stored board ``events`` report (empty if it has another shape)."""
    try:
        ev = json.loads(data).get("event")
    except (ValueError, AttributeError):
        return {}
    return ev if isinstance(ev, dict) else {}


@contextlib.contextmanager
def no_pipeline() -> Iterator[None]:
    yield
