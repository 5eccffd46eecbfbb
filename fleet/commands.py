"""The fleet's command ledger: every signed command issued to a board, and the board's answers.

One SQLite file in the fleet home (``FLEET/commands.db``, WAL, ``synchronous=FULL``), shared by
the ``edgeward fleet`` commands that sign and by the monitor, which records the results boards
publish. Per device it holds:

* the last sequence number allocated (``sequences``): each command takes the next one, so a
  board's numbers only move forward and the board refuses a replay or reordering;
* every command issued (``commands``): its fields, the SHA-256 and the exact signed bytes, and
  its state -- ``pending`` until the board's signed result arrives (then ``applied``,
  ``refused`` or ``cancelled``) or its expiry passes (``expired``);
* every result received (``results``), verified against the board's enrolled identity key;
* boards that attested their own wipe (``wiped``).

Delivery (``docs/commands.md``): each board has one retained message on its command topic, the
queue (:func:`device_agent.commands.format.encode_queue`) of every unexpired command that has no
result yet, plus a fresh signed time beacon (:meth:`CommandLedger.pending_queue`). A publish
republishes the whole queue, so a later command never hides an earlier one from a board that
was offline.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from device_agent import crypto
from device_agent.bundle.enrolment import load_enrolment
from device_agent.commands.format import (
    RESULT_MAGIC,
    Beacon,
    Command,
    Result,
    decode_queue,
    encode_beacon,
    encode_command,
    encode_queue,
    verify_result,
)
from device_agent.config import DEFAULT_CONFIG, CommandLimits
from device_agent.errors import (
    BadSignature,
    EdgeWardError,
    EnvironmentFault,
    FormatError,
    SecurityRefusal,
    UsageError,
)
from device_agent.store.datadir import utcnow
from device_agent.store.fsutil import atomic_write, make_private_dir
from device_agent.store.sqlitedb import open_durable, transaction
from device_agent.wire import ID_RE, format_time, loads_json, parse_time

from .ca import FleetHome

if TYPE_CHECKING:
    from packager.signers import Signer

LEDGER_FILE = "commands.db"
STATES = ("pending", "applied", "refused", "cancelled", "expired")
DEFAULT_EXPIRES_IN = timedelta(days=30)  # boards may be offline a long time
MAX_EXPIRES_IN = timedelta(days=3650)

SCHEMA = """
CREATE TABLE IF NOT EXISTS sequences (
  device_id TEXT PRIMARY KEY, last_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS commands (
  device_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, args TEXT NOT NULL,
  issued TEXT NOT NULL, expires TEXT NOT NULL, sha256 TEXT NOT NULL UNIQUE, signer TEXT NOT NULL,
  payload BLOB NOT NULL, state TEXT NOT NULL DEFAULT 'pending', updated TEXT NOT NULL,
  detail TEXT NOT NULL DEFAULT '', PRIMARY KEY (device_id, seq));
CREATE INDEX IF NOT EXISTS commands_state ON commands (state, device_id);
-- What still goes out to a board: pending commands that no cancel (pending or carried out) names.
CREATE VIEW IF NOT EXISTS outstanding AS SELECT c.* FROM commands c WHERE c.state = 'pending' AND NOT EXISTS (
  SELECT 1 FROM commands k WHERE k.device_id = c.device_id AND k.kind = 'cancel'
  AND k.state IN ('pending', 'applied') AND json_extract(k.args, '$.seq') = c.seq);
CREATE TABLE IF NOT EXISTS results (
  sha256 TEXT PRIMARY KEY, device_id TEXT NOT NULL, seq INTEGER NOT NULL,
  command_sha256 TEXT NOT NULL, kind TEXT NOT NULL, outcome TEXT NOT NULL, detail TEXT NOT NULL,
  time TEXT NOT NULL, effects TEXT NOT NULL, received TEXT NOT NULL, source TEXT NOT NULL,
  payload BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS results_command ON results (device_id, seq);
CREATE TABLE IF NOT EXISTS wiped (
  device_id TEXT PRIMARY KEY, sign_fingerprint TEXT NOT NULL, seq INTEGER,
  command_sha256 TEXT, started TEXT NOT NULL, recorded TEXT NOT NULL, source TEXT NOT NULL,
  attestation TEXT NOT NULL);
"""

# The cancel (pending or carried out) that names a command.
_CANCELLED_BY = (
    "SELECT seq FROM commands WHERE device_id = ? AND kind = 'cancel' AND state IN ('pending', 'applied') "
    "AND json_extract(args, '$.seq') = ?"
)
# A beacon's size, for checking that a queue still fits before anything is signed for good.
_BEACON_ROOM = 256


@dataclass(frozen=True)
class Issued:
    """One signed command as the ledger recorded it."""

    device_id: str
    command: Command
    payload: bytes

    @property
    def sha256(self) -> str:
        return crypto.sha256_hex(self.payload)


def parse_age(text: str, what: str = "--expires-in") -> timedelta:
    """``30d``, ``12h``, ``90m``, ``3600s`` or plain seconds; positive."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip()
    unit = units.get(t[-1:]) if t else None
    number = t[:-1] if unit is not None else t
    if not number.isdigit() or int(number) <= 0:
        raise UsageError(f"{what} {text!r} must be a positive age such as 30d, 12h, 90m or 3600s")
    seconds = int(number) * (unit or 1)
    if seconds > MAX_EXPIRES_IN.total_seconds():
        raise UsageError(f"{what} {text!r} is more than {MAX_EXPIRES_IN.days} days")
    return timedelta(seconds=seconds)


def result_device(payload: bytes, limits: CommandLimits = DEFAULT_CONFIG.commands) -> str:
    """The device a result names, read *before* it is verified: only to find the key to verify
    it with (the verified result must name the same device)."""
    head = len(RESULT_MAGIC) + crypto.SIGNATURE_BYTES
    if len(payload) > limits.max_result_bytes or len(payload) <= head or not payload.startswith(RESULT_MAGIC):
        raise FormatError("not an EdgeWard command result (bad magic or length)")
    doc = loads_json(payload[head:], "command result")
    device = doc.get("device_id") if isinstance(doc, dict) else None
    if not isinstance(device, str) or not ID_RE.match(device):
        raise FormatError("the command result names no valid device id")
    return device


def split_results(data: bytes, limits: CommandLimits = DEFAULT_CONFIG.commands) -> list[bytes]:
    """The results in a file a technician brought back: one result, or a queue container of
    several (what ``edgeward-agent command --result`` writes)."""
    if data.startswith(RESULT_MAGIC):
        return [data]
    # A queue of results: its items are bounded by the result size, not the command size.
    items = decode_queue(data, replace(limits, max_command_bytes=limits.max_result_bytes))
    for item in items:
        if not item.startswith(RESULT_MAGIC):
            raise FormatError("the file holds something other than command results")
    return items


class CommandLedger:
    """The ledger in ``FLEET/commands.db``; one connection, safe to share between threads."""

    def __init__(self, home: FleetHome, limits: CommandLimits = DEFAULT_CONFIG.commands) -> None:
        self.home = home
        self.limits = limits
        self.path = home.path / LEDGER_FILE
        self._lock = threading.Lock()
        make_private_dir(home.path)
        try:
            self._db = open_durable(self.path, SCHEMA, timeout=30)
        except sqlite3.Error as e:
            raise EnvironmentFault(f"cannot open the command ledger {self.path}: {e}") from e

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, transaction(self._db, f"the command ledger {self.path}"):
            yield self._db

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self._lock:
            try:
                cur = self._db.execute(sql, params)
                names = [c[0] for c in cur.description]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
            except sqlite3.Error as e:
                raise EnvironmentFault(f"cannot read the command ledger {self.path}: {e}") from e

    # --- issuing ---------------------------------------------------------------------------------
    def plan(
        self, kind: str, args: dict[str, Any], devices: Iterable[str], expires_in: timedelta,
        now: datetime | None = None,
    ) -> list[Command]:
        """The commands :meth:`issue` would sign now (the next sequence numbers), unsigned and
        unrecorded: what ``--dry-run`` prints. Refuses what :meth:`issue` would refuse."""
        return self.plan_each(kind, [(d, args) for d in devices], expires_in, now)

    def plan_each(
        self, kind: str, orders: Iterable[tuple[str, dict[str, Any]]], expires_in: timedelta,
        now: datetime | None = None,
    ) -> list[Command]:
        now = (now or utcnow()).replace(microsecond=0)
        with self._lock:
            return [self._next(self._db, kind, args, d, now, expires_in) for d, args in orders]

    def issue(
        self, kind: str, args: dict[str, Any], devices: Iterable[str], signer: Signer, expires_in: timedelta,
        now: datetime | None = None,
    ) -> list[Issued]:
        """Allocate each device its next sequence number, sign one command per device with
        ``signer`` (an operator key; a recovery key for rotating operators; a file or a token) and record them as
        pending, all in one transaction: either every device gets its command or none does."""
        return self.issue_each(kind, [(d, args) for d in devices], signer, expires_in, now)

    def issue_each(
        self, kind: str, orders: Iterable[tuple[str, dict[str, Any]]], signer: Signer, expires_in: timedelta,
        now: datetime | None = None,
    ) -> list[Issued]:
        """:meth:`issue` with arguments of each device's own (an update names each board's file)."""
        now = (now or utcnow()).replace(microsecond=0)
        public = signer.public_raw
        out: list[Issued] = []
        with self._tx() as db:
            for device, args in orders:
                cmd = self._next(db, kind, args, device, now, expires_in)
                payload = encode_command(cmd, signer, public)
                db.execute(
                    "INSERT INTO commands (device_id, seq, kind, args, issued, expires, sha256, signer, payload, "
                    "updated) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (device, cmd.seq, kind, json.dumps(cmd.args, sort_keys=True), format_time(cmd.issued),
                     format_time(cmd.expires), crypto.sha256_hex(payload), crypto.fingerprint(public), payload,
                     format_time(now)),
                )
                db.execute(
                    "INSERT INTO sequences (device_id, last_seq) VALUES (?, ?) "
                    "ON CONFLICT(device_id) DO UPDATE SET last_seq = excluded.last_seq",
                    (device, cmd.seq),
                )
                self._check_fits(db, device, now)
                out.append(Issued(device, cmd, payload))
        return out

    def _next(self, db: sqlite3.Connection, kind: str, args: dict[str, Any], device: str, now: datetime,
              expires_in: timedelta) -> Command:
        if not ID_RE.match(device):
            raise UsageError(f"{device!r} is not a device id")
        expires = now + expires_in
        target_expires = self._check_target(db, kind, args, device, now)
        if target_expires is not None:
            expires = max(expires, target_expires)  # the cancelled command never outlives its cancel
        row = db.execute("SELECT last_seq FROM sequences WHERE device_id = ?", (device,)).fetchone()
        seq = (int(row[0]) if row else 0) + 1
        try:
            return Command(kind=kind, device_id=device, seq=seq, issued=now, expires=expires, args=args)
        except FormatError as e:
            raise UsageError(f"cannot make a {kind} command: {e}") from e

    def _check_target(self, db: sqlite3.Connection, kind: str, args: dict[str, Any], device: str,
                      now: datetime) -> datetime | None:
        """Refuse commands that cannot do what the operator means; for a cancel, return the
        expiry of the command it cancels."""
        path = self.home.devices / f"{device}.json"
        if not path.is_file():
            raise UsageError(f"device {device} is not enrolled in {self.home.path}; enrol it first")
        if self._wiped(db, device) is not None:
            raise UsageError(f"device {device} was wiped (see 'edgeward fleet status'); it obeys nothing any more")
        t = format_time(now)
        if kind != "cancel":
            row = db.execute(
                "SELECT seq FROM outstanding WHERE device_id = ? AND kind = 'decommission' AND expires > ?",
                (device, t),
            ).fetchone()
            if row is not None:
                raise UsageError(
                    f"decommission #{row[0]} is pending for {device}: nothing after it would be obeyed; "
                    f"cancel it first ('edgeward fleet cancel {row[0]} --device {device}')"
                )
            return None
        target = args.get("seq")
        row = db.execute(
            "SELECT kind, state, expires FROM commands WHERE device_id = ? AND seq = ?", (device, target)
        ).fetchone()
        if row is None:
            raise UsageError(f"no command #{target} was issued to {device}")
        kind_, state, expires = row
        if kind_ == "cancel":
            raise UsageError(f"#{target} is itself a cancel; a cancel cannot be undone, issue the command again")
        if state != "pending" or expires <= t:
            raise UsageError(f"command #{target} for {device} is {'expired' if state == 'pending' else state}; "
                             "only a pending command can be cancelled")
        if db.execute(_CANCELLED_BY, (device, target)).fetchone() is not None:
            raise UsageError(f"command #{target} for {device} is already being cancelled")
        return parse_time(expires, "expires")

    def _check_fits(self, db: sqlite3.Connection, device: str, now: datetime) -> None:
        items = self._pending_payloads(db, device, now) + [b"\0" * _BEACON_ROOM]
        try:
            encode_queue(items, self.limits)
        except FormatError as e:
            raise UsageError(
                f"{device} has {len(items) - 1} pending commands and {e}; wait for its results, or let "
                "commands expire, before issuing more"
            ) from e

    # --- delivery --------------------------------------------------------------------------------
    def _expire(self, db: sqlite3.Connection, now: datetime) -> None:
        t = format_time(now)
        db.execute(
            "UPDATE commands SET state = 'expired', updated = ? WHERE state = 'pending' AND expires <= ?", (t, t)
        )

    def _pending_payloads(self, db: sqlite3.Connection, device: str, now: datetime) -> list[bytes]:
        """Pending, unexpired commands in sequence order, less those a cancel names: a board that
        has not received a command yet never receives it once it is cancelled (the cancel alone
        tells it to skip that sequence number)."""
        rows = db.execute(
            "SELECT payload FROM outstanding WHERE device_id = ? AND expires > ? ORDER BY seq",
            (device, format_time(now)),
        )
        return [bytes(r[0]) for r in rows]

    def pending(self, device: str, now: datetime | None = None) -> list[bytes]:
        """The exact signed bytes of every unexpired command for ``device`` without a result."""
        now = now or utcnow()
        with self._tx() as db:
            self._expire(db, now)
            return self._pending_payloads(db, device, now)

    def pending_queue(self, device: str, signer: Signer, now: datetime | None = None) -> bytes:
        """The retained message for ``device``: its pending commands in sequence order and a
        fresh time beacon signed by ``signer``."""
        now = now or utcnow()
        items = self.pending(device, now)
        return encode_queue(items + [beacon(signer, now)], self.limits)

    # --- results ---------------------------------------------------------------------------------
    def record_result(
        self, payload: bytes, sign_public: bytes, *, device_id: str | None = None, source: str = "mqtt",
        now: datetime | None = None,
    ) -> Result:
        """Verify a board's signed result against its enrolled identity key and record it: the
        command it answers becomes applied, refused or cancelled. A decommission's attestation
        must verify too (the board is then marked wiped); a retire's new enrolment must verify and
        keep the board's identity, and becomes the enrolment the next release is packed for.

        Raises BadSignature / SecurityRefusal (a forgery, a result for a command this fleet did
        not issue, a bad attestation or enrolment) or FormatError (malformed); records nothing
        then. Recording the same result again changes nothing."""
        now = now or utcnow()
        r = verify_result(payload, sign_public, self.limits)
        if device_id is not None and r.device_id != device_id:
            raise SecurityRefusal(f"result for {r.device_id} arrived as {device_id}'s")
        rows = self._rows("SELECT kind, sha256, state FROM commands WHERE device_id = ? AND seq = ?",
                          (r.device_id, r.seq))
        if not rows or not crypto.constant_time_equal(rows[0]["sha256"], r.command_sha256):
            raise SecurityRefusal(
                f"{r.device_id} answered command #{r.seq} ({r.command_sha256[:16]}...), which this fleet did not "
                "issue to it: a command signed elsewhere, or another fleet home"
            )
        if rows[0]["kind"] != r.kind:
            raise SecurityRefusal(f"result says #{r.seq} is a {r.kind}, the ledger says {rows[0]['kind']}")
        wiped = None
        if r.kind == "decommission" and r.outcome == "applied":
            wiped = self._check_attestation(r, sign_public)
        if r.kind == "retire" and r.outcome == "applied" and "enrolment" in r.effects:
            self._store_enrolment(r, sign_public)
        digest = crypto.sha256_hex(payload)
        t = format_time(now)
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO results (sha256, device_id, seq, command_sha256, kind, outcome, detail, time, "
                "effects, received, source, payload) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (digest, r.device_id, r.seq, r.command_sha256, r.kind, r.outcome, r.detail, format_time(r.time),
                 json.dumps(r.effects, sort_keys=True), t, source[:32], payload),
            )
            db.execute(
                "UPDATE commands SET state = ?, detail = ?, updated = ? WHERE device_id = ? AND seq = ? "
                "AND state NOT IN ('applied', 'cancelled')",
                (r.outcome, r.detail[:500], t, r.device_id, r.seq),
            )
            if r.kind == "cancel" and r.outcome == "applied":
                row = db.execute("SELECT args FROM commands WHERE device_id = ? AND seq = ?",
                                 (r.device_id, r.seq)).fetchone()
                db.execute(
                    "UPDATE commands SET state = 'cancelled', detail = ?, updated = ? WHERE device_id = ? AND seq = ? "
                    "AND state IN ('pending', 'expired')",
                    (f"cancelled by #{r.seq}", t, r.device_id, json.loads(row[0])["seq"]),
                )
            if wiped is not None:
                db.execute(
                    "INSERT OR IGNORE INTO wiped (device_id, sign_fingerprint, seq, command_sha256, started, recorded, "
                    "source, attestation) VALUES (?,?,?,?,?,?,?,?)",
                    (r.device_id, crypto.fingerprint(sign_public), r.seq, r.command_sha256,
                     str(wiped["body"].get("started", "")), t, source[:32], json.dumps(wiped, sort_keys=True)),
                )
        return r

    def _check_attestation(self, r: Result, sign_public: bytes) -> dict[str, Any]:
        doc = r.effects.get("attestation")
        body = verify_wipe_attestation(doc, sign_public)
        by = body.get("by") or {}
        if body.get("device_id") != r.device_id or by.get("command_seq") != r.seq or not isinstance(
            by.get("command_sha256"), str
        ) or not crypto.constant_time_equal(by["command_sha256"], r.command_sha256):
            raise SecurityRefusal(f"the wipe attestation of {r.device_id} does not name decommission #{r.seq}")
        if not isinstance(doc, dict):  # verify_wipe_attestation accepts only an object
            raise FormatError(f"the wipe attestation of {r.device_id} is not a JSON object")
        return {"body": body, "signature": doc["signature"]}

    def _store_enrolment(self, r: Result, sign_public: bytes) -> None:
        """A retire rotated the board's encryption key: keep its new enrolment (signed by the same
        identity key) where ``edgeward pack --devices-dir FLEET/devices`` finds it; the one it
        replaces is kept in ``FLEET/devices-history/``. An older enrolment never replaces a newer
        one (results may arrive out of order)."""
        raw = r.effects["enrolment"]
        if not isinstance(raw, dict):
            raise FormatError("the retire result's enrolment is not an object")
        data = json.dumps(raw, indent=2, sort_keys=True).encode() + b"\n"  # Enrolment.signed_bytes' layout
        try:
            new = load_enrolment(data, f"the new enrolment in {r.device_id}'s result #{r.seq}")
        except BadSignature as e:
            raise SecurityRefusal(f"the new enrolment in {r.device_id}'s result does not verify: {e}") from e
        if new.device_id != r.device_id or not crypto.constant_time_equal(new.sign_public, sign_public):
            raise SecurityRefusal(
                f"the new enrolment in {r.device_id}'s result #{r.seq} names another device or identity key"
            )
        fpr = r.effects.get("box_fingerprint")
        if fpr is not None and fpr != new.box_fingerprint:
            raise SecurityRefusal(f"{r.device_id}'s result #{r.seq} names two different encryption keys")
        path = self.home.devices / f"{r.device_id}.json"
        current = load_enrolment(path.read_bytes(), str(path))
        if current.box_public == new.box_public or new.created < current.created:
            return  # already stored, or older than what is stored
        history = self.home.path / "devices-history"
        make_private_dir(history)
        stamp = format_time(current.created).replace(":", "")
        atomic_write(history / f"{r.device_id}-{stamp}.json", path.read_bytes(), 0o644)
        atomic_write(path, data, 0o644)

    def mark_wiped(self, device_id: str, attestation: dict[str, Any], sign_public: bytes, source: str,
                   now: datetime | None = None) -> None:
        """Record a board wiped at the bench (a verified attestation brought back by hand)."""
        body = verify_wipe_attestation(attestation, sign_public)
        by = body.get("by") or {}
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO wiped (device_id, sign_fingerprint, seq, command_sha256, started, recorded, "
                "source, attestation) VALUES (?,?,?,?,?,?,?,?)",
                (device_id, crypto.fingerprint(sign_public), by.get("command_seq"), by.get("command_sha256"),
                 str(body.get("started", "")), format_time(now or utcnow()), source[:32],
                 json.dumps({"body": body, "signature": attestation["signature"]}, sort_keys=True)),
            )

    # --- reading ---------------------------------------------------------------------------------
    def _wiped(self, db: sqlite3.Connection, device: str) -> dict[str, Any] | None:
        """The wipe of the board now enrolled as ``device`` (a board provisioned again under the
        same id, with a new identity key, is not wiped)."""
        row = db.execute(
            "SELECT sign_fingerprint, seq, command_sha256, started, recorded, source FROM wiped WHERE device_id = ?",
            (device,),
        ).fetchone()
        if row is None:
            return None
        path = self.home.devices / f"{device}.json"
        try:
            current = load_enrolment(path.read_bytes(), str(path)).sign_fingerprint
        except (OSError, EdgeWardError):
            current = row[0]
        if current != row[0]:
            return None
        keys = ("sign_fingerprint", "command_seq", "command_sha256", "started", "recorded", "source")
        return dict(zip(keys, row, strict=True))

    def wiped(self) -> dict[str, dict[str, Any]]:
        devices = [r["device_id"] for r in self._rows("SELECT device_id FROM wiped ORDER BY device_id")]
        with self._lock:
            found = {d: self._wiped(self._db, d) for d in devices}
        return {d: w for d, w in found.items() if w is not None}

    def wiped_device(self, device: str) -> dict[str, Any] | None:
        with self._lock:
            return self._wiped(self._db, device)

    def commands(self, device: str | None = None, now: datetime | None = None) -> list[dict[str, Any]]:
        """Every command (optionally of one device), oldest first, with its latest result."""
        with self._tx() as db:
            self._expire(db, now or utcnow())
        dev = device or ""
        rows = self._rows(
            "SELECT device_id, seq, kind, args, issued, expires, sha256, signer, state, updated, detail FROM commands "
            "WHERE (? = '' OR device_id = ?) ORDER BY device_id, seq",
            (dev, dev),
        )
        results: dict[tuple[str, int], dict[str, Any]] = {}
        for r in self._rows(
            "SELECT device_id, seq, outcome, detail, time, received, source, effects FROM results "
            "WHERE (? = '' OR device_id = ?) ORDER BY received",
            (dev, dev),
        ):
            effects = json.loads(r.pop("effects"))
            r["effects"] = _summarise_effects(effects)
            results[(r["device_id"], r["seq"])] = r
        for row in rows:
            row["args"] = json.loads(row["args"])
            res = results.get((row["device_id"], row["seq"]))
            row["result"] = {k: v for k, v in res.items() if k not in ("device_id", "seq")} if res else None
        return rows

    def pending_counts(self, now: datetime | None = None) -> dict[str, int]:
        now = now or utcnow()
        rows = self._rows(
            "SELECT device_id, COUNT(*) AS n FROM outstanding WHERE expires > ? GROUP BY device_id",
            (format_time(now),),
        )
        return {r["device_id"]: int(r["n"]) for r in rows}

    def decommission_ordered(self) -> list[str]:
        """Boards a decommission command was issued to (attested or not)."""
        rows = self._rows("SELECT DISTINCT device_id FROM commands WHERE kind = 'decommission' ORDER BY device_id")
        return [r["device_id"] for r in rows]

    def devices_with_pending(self, now: datetime | None = None) -> list[str]:
        return sorted(self.pending_counts(now))

    def command(self, device: str, seq: int) -> dict[str, Any] | None:
        rows = self._rows(
            "SELECT device_id, seq, kind, issued, expires, sha256, state, detail FROM commands "
            "WHERE device_id = ? AND seq = ?",
            (device, seq),
        )
        return rows[0] if rows else None


def beacon(signer: Signer, now: datetime | None = None) -> bytes:
    """A signed time beacon: the fleet's time, the only way a board's clock floor moves between
    installs and commands."""
    return encode_beacon(Beacon((now or utcnow()).replace(microsecond=0)), signer, signer.public_raw)


def verify_wipe_attestation(doc: Any, sign_public: bytes) -> dict[str, Any]:
    """:func:`device_agent.store.wipe.verify_attestation` on untrusted input: SecurityRefusal
    unless it verifies against ``sign_public``, FormatError if it is not an attestation at all."""
    from device_agent.store.wipe import verify_attestation

    if not isinstance(doc, dict) or not isinstance(doc.get("body"), dict):
        raise FormatError("not a wipe attestation (an object with a 'body' and a 'signature')")
    if not isinstance(doc.get("signature"), str | None):
        raise FormatError("the wipe attestation's signature is not a string")
    try:
        body = verify_attestation(doc, sign_public)
    except SecurityRefusal as e:
        raise SecurityRefusal(f"the wipe attestation does not verify against the enrolled identity key: {e}") from e
    except (ValueError, TypeError) as e:  # base64 or canonical JSON of a tampered document
        raise SecurityRefusal(f"the wipe attestation does not verify: {e}") from e
    if body.get("sign_fingerprint") not in (None, crypto.fingerprint(sign_public)):
        raise SecurityRefusal("the wipe attestation names another identity key")
    return body


def _summarise_effects(effects: dict[str, Any]) -> dict[str, Any]:
    """What ``fleet commands`` shows of a result's effects (not the whole attestation)."""
    out = {k: v for k, v in effects.items() if k not in ("attestation", "enrolment")}
    att = effects.get("attestation")
    if isinstance(att, dict) and isinstance(att.get("body"), dict):
        body = att["body"]
        out["wiped"] = {k: body.get(k) for k in ("started", "bundles_destroyed", "files_shredded", "method")}
    if isinstance(effects.get("enrolment"), dict):
        out["new_enrolment"] = effects["enrolment"].get("box_fingerprint")
    return out


def read_group(home: FleetHome, name: str) -> list[str]:
    """``FLEET/groups/<name>.txt``: one device id per line; blank lines and ``#`` comments are
    ignored."""
    if not ID_RE.match(name):
        raise UsageError(f"group name {name!r} must be letters, digits, '.', '_' or '-'")
    path = home.path / "groups" / f"{name}.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise UsageError(f"no group {name}: write {path} with one device id per line") from e
    devices: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        d = line.split("#", 1)[0].strip()
        if not d:
            continue
        if not ID_RE.match(d):
            raise UsageError(f"{path}:{n}: {d!r} is not a device id")
        if d not in devices:
            devices.append(d)
    if not devices:
        raise UsageError(f"group {name} ({path}) lists no devices")
    return devices
