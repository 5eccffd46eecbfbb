"""The board's durable telemetry outbox: signed reports wait here until the fleet has them.

paho keeps its queue in memory, so a killed agent or a broker away for hours would lose reports.
Every report is signed and written here first (SQLite, WAL, ``synchronous=FULL``: a committed
row is on disk) and deleted only after the broker acknowledged it -- or, on a board that trusts a
receipt key, only once a fleet monitor's signed receipt covers it (:meth:`Outbox.receipted`;
``docs/telemetry.md``, "Receipts"). The sequence number is
allocated in the same transaction that stores the report, and -- for events -- in the same
transaction that moves the event-store cursor, so after a SIGKILL an event is neither lost nor
queued twice.

Each report names the SHA-256 of the report stored before it (``prev``, the hash chain the fleet
monitor uses to authenticate a burst with one signature check); the chain head is kept in the
same transaction, so it survives a restart. A last will names the head but does not move it: it
is only ever published if the board vanishes.

Bounded (``max_messages``). Policy when full, documented in ``docs/telemetry.md``: the oldest
report of the lowest priority present is dropped to make room -- heartbeats first, then
informational events, and security events (warning/critical detections, refusals) last; a new
report whose priority is below everything queued is itself dropped. Drops are counted and the
count travels in the next telemetry report, so the fleet sees that something was lost.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from device_agent.errors import EnvironmentFault
from device_agent.store.sqlitedb import open_durable, transaction
from device_agent.telemetry.receipt import Receipt
from device_agent.telemetry.report import NO_PREV, payload_digest

HEARTBEAT = 0
INFO_EVENT = 1
SECURITY_EVENT = 2

Build = Callable[[int, bytes], tuple[str, bytes]]
"""Given the allocated sequence number and the digest of the previous report, return (topic,
signed payload)."""


@dataclass(frozen=True)
class Pending:
    seq: int
    topic: str
    payload: bytes


@dataclass(frozen=True)
class Item:
    priority: int
    build: Build
    chained: bool = True  # a report in the hash chain; False for other signed messages (command results)


class Outbox:
    """A bounded, durable FIFO of signed reports, shared between threads of one process."""

    def __init__(self, path: str | Path, max_messages: int) -> None:
        self.path = Path(path)
        self.max_messages = max_messages
        self._lock = threading.Lock()
        try:
            self._db = open_durable(
                self.path,
                "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, "
                "priority INTEGER NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL);"
                "CREATE INDEX IF NOT EXISTS outbox_drop ON outbox (priority, seq);"
                "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);"
                "CREATE TABLE IF NOT EXISTS chain (id INTEGER PRIMARY KEY CHECK (id = 1), "
                "head BLOB NOT NULL);",
            )
        except sqlite3.Error as e:
            raise EnvironmentFault(f"cannot open the telemetry outbox {self.path}: {e}") from e

    def _meta(self, name: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def _set_meta(self, name: str, value: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))

    def _head(self) -> bytes:
        row = self._db.execute("SELECT head FROM chain WHERE id = 1").fetchone()
        return bytes(row[0]) if row else NO_PREV

    def _make_room(self, priority: int) -> bool:
        """Apply the full policy; False when the new report is the one to drop."""
        (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        if count < self.max_messages:
            return True
        row = self._db.execute(
            "SELECT priority, seq FROM outbox ORDER BY priority, seq LIMIT 1"
        ).fetchone()
        self._set_meta("dropped", self._meta("dropped") + 1)
        if row is None or priority < row[0]:
            return False
        self._db.execute("DELETE FROM outbox WHERE seq = ?", (row[1],))
        return True

    def add(self, items: Iterable[Item], cursor: tuple[str, int] | None = None) -> list[int]:
        """Sign and store ``items`` in one transaction (with an optional cursor move); returns
        the sequence numbers given to the stored reports."""
        seqs: list[int] = []
        with self._lock, transaction(self._db, f"the telemetry outbox {self.path}"):
            seq = self._meta("next_seq") or 1
            prev, moved = self._head(), False
            for item in items:
                if not self._make_room(item.priority):
                    continue
                name, payload = item.build(seq, prev)
                self._db.execute(
                    "INSERT INTO outbox (seq, priority, topic, payload) VALUES (?,?,?,?)",
                    (seq, item.priority, name, payload),
                )
                seqs.append(seq)
                seq += 1
                if item.chained:
                    prev, moved = payload_digest(payload), True
            self._set_meta("next_seq", seq)
            if moved:
                self._db.execute("INSERT OR REPLACE INTO chain (id, head) VALUES (1, ?)", (prev,))
            if cursor is not None:
                self._set_meta(cursor[0], cursor[1])
        return seqs

    def reserve_seq(self) -> tuple[int, bytes]:
        """Allocate a sequence number without storing a report (the last will's); returns it and
        the chain head (the will names it, but does not become the head)."""
        with self._lock, transaction(self._db, f"the telemetry outbox {self.path}"):
            seq = self._meta("next_seq") or 1
            self._set_meta("next_seq", seq + 1)
            return seq, self._head()

    def cursor(self, name: str) -> int:
        with self._lock:
            return self._meta(name)

    def pending(self, after_seq: int, limit: int, below: int | None = None) -> list[Pending]:
        """Reports still waiting for a PUBACK, oldest first (``below``: only numbers under it)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, topic, payload FROM outbox WHERE seq > ? AND seq < ? ORDER BY seq LIMIT ?",
                (after_seq, below if below is not None else 2**63 - 1, limit),
            ).fetchall()
        return [Pending(r[0], r[1], bytes(r[2])) for r in rows]

    def get(self, seqs: Iterable[int]) -> list[Pending]:
        """The stored reports among ``seqs``, oldest first (those to send again)."""
        wanted = sorted(set(seqs))
        out: list[Pending] = []
        with self._lock:
            for s in wanted:
                row = self._db.execute("SELECT seq, topic, payload FROM outbox WHERE seq = ?", (s,)).fetchone()
                if row is not None:
                    out.append(Pending(row[0], row[1], bytes(row[2])))
        return out

    def oldest(self) -> int | None:
        """The lowest sequence number still queued, if any."""
        with self._lock:
            (seq,) = self._db.execute("SELECT MIN(seq) FROM outbox").fetchone()
        return int(seq) if seq is not None else None

    def acked(self, seqs: Iterable[int], only_topic: str | None = None) -> list[int]:
        """Delete reports the broker has acknowledged (one transaction for the batch); with
        ``only_topic``, only those published there (the rest wait for a receipt). Returns the
        acknowledged numbers still queued."""
        batch = [(s,) for s in seqs]
        if not batch:
            return []
        with self._lock, transaction(self._db, f"the telemetry outbox {self.path}"):
            if only_topic is None:
                self._db.executemany("DELETE FROM outbox WHERE seq = ?", batch)
                return []
            self._db.executemany("DELETE FROM outbox WHERE seq = ? AND topic = ?", [(s, only_topic) for (s,) in batch])
            kept = []
            for (s,) in batch:
                if self._db.execute("SELECT 1 FROM outbox WHERE seq = ?", (s,)).fetchone() is not None:
                    kept.append(s)
            return kept

    def receipted(self, receipt: Receipt, sent_through: int, keep_topic: str) -> tuple[int, int]:
        """Delete the reports a verified receipt covers: those in its committed ranges, and those
        below its floor that this run has sent at least once (``sent_through``: the highest
        number handed to the broker), which the monitor no longer judges as new. Rows published
        on ``keep_topic`` (command results, which no receipt speaks for) are never touched.
        Returns (committed, released below the floor); the latter are counted in ``stats``."""
        with self._lock, transaction(self._db, f"the telemetry outbox {self.path}"):
            committed = 0
            for first, last in receipt.ranges:
                committed += self._db.execute(
                    "DELETE FROM outbox WHERE seq >= ? AND seq <= ? AND topic <> ?", (first, last, keep_topic)
                ).rowcount
            released = self._db.execute(
                "DELETE FROM outbox WHERE seq < ? AND seq <= ? AND topic <> ?",
                (receipt.floor, sent_through, keep_topic),
            ).rowcount
            if released:
                self._set_meta("released", self._meta("released") + released)
            return committed, released

    def stats(self) -> dict[str, int]:
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
            return {
                "queued": int(count),
                "dropped": self._meta("dropped"),
                "capacity": self.max_messages,
                **({"released": released} if (released := self._meta("released")) else {}),
            }

    def close(self) -> None:
        with self._lock:
            self._db.close()
