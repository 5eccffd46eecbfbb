"""Tamper-evident audit log of every query and decision (NCSC 3.2).

Layout under ``D/audit/`` (0700)::

    audit-00000001.jsonl   segments of one JSON record per line, rotated by size
    head.json              checkpoint: last sequence number and hash (written atomically)
    anchor.json            where the retained chain starts once old segments are deleted
    fingerprint.key        32 random bytes keying input fingerprints (0600)

Each record holds ``prev`` (the previous record's hash) and ``hash`` = SHA-256 over its
canonical JSON without ``hash``: editing a record breaks its hash, removing one breaks the
chain, and cutting records off the end leaves the chain short of the checkpoint in
``head.json``. Records carry a keyed fingerprint and summary statistics of the input, never the
raw input (invariant 8); the key stops anyone with the log from confirming a guessed input.

Bounded: a segment holds at most ``max_segment_bytes`` (a single larger record gets a segment of
its own) and all segments together at most ``max_total_bytes``; past that the oldest segments are
deleted before their retention, the anchor moving first, and an ``audit-pruned`` record says so.
What a token holder does is one record each; refusals of requests that carried no valid token
(anyone who can reach the socket can send millions) are counted instead, one ``anonymous``
record per status per ``summary_seconds`` window, written when the window ends, by
:meth:`AuditLog.flush` and at close.

Durability: each record is written with one ``write`` call; the file is fsynced and the head
checkpointed every ``checkpoint_every`` records, every ``checkpoint_seconds`` and on close.
Records after the last checkpoint can be lost in a power cut (and cut off undetected), which is
the price of a sub-millisecond query path on an SD card; so can an open summary window.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.config import DEFAULT_CONFIG, AuditConfig
from device_agent.errors import EnvironmentFault
from device_agent.store.fsutil import atomic_write, fsync_dir, make_private_dir
from device_agent.wire import canonical_json, format_time, parse_time

GENESIS = "0" * 64
SEGMENT_RE = re.compile(r"^audit-(\d{8})\.jsonl\Z")
DAY = 86400.0


def record_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(body)).hexdigest()


def input_summary(x: np.ndarray, key: bytes) -> dict[str, Any]:
    """A keyed fingerprint and summary statistics of an input array: never the values themselves."""
    a = np.ascontiguousarray(x)
    h = hashlib.blake2b(key=key, digest_size=16)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    summary: dict[str, Any] = {"fp": h.hexdigest(), "dtype": a.dtype.name, "shape": list(a.shape)}
    if a.size and a.dtype.kind in "biuf":
        f = a.reshape(-1).astype(np.float64, copy=False)
        total, squares = float(f.sum()), float(f @ f)  # one pass each: this runs on every query
        finite = math.isfinite(total) and math.isfinite(squares)
        summary["finite"] = finite
        if finite:
            mean = total / f.size
            summary.update(
                mean=round(mean, 4),
                std=round(math.sqrt(max(0.0, squares / f.size - mean * mean)), 4),
                min=round(float(f.min()), 4),
                max=round(float(f.max()), 4),
            )
    return summary


@dataclass
class VerifyReport:
    ok: bool
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    segments: int = 0
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "segments": self.segments,
            "problems": self.problems,
        }


class AuditLog:
    """Append-only, hash-chained, rotated audit log; safe to share between threads."""

    def __init__(self, directory: str | Path, config: AuditConfig = DEFAULT_CONFIG.serve.audit) -> None:
        self.dir = Path(directory)
        self.config = config
        self._lock = threading.Lock()
        try:
            make_private_dir(self.dir)
            self.key = self._key()
        except OSError as e:
            raise EnvironmentFault(f"cannot open the audit log in {self.dir}: {e.strerror}") from e
        self._fd: int | None = None
        self._segment: Path | None = None
        self._size = 0
        self._since_checkpoint = 0
        self._checkpoint_at = time.monotonic()
        self._seq, self._hash = 0, GENESIS
        self._tally: dict[int, list[float]] = {}  # status -> [count, first, last] in the open window
        self._tally_start = 0.0
        self._seq, self._hash = self._resume()

    # --- files ---------------------------------------------------------------------------------
    def _key(self) -> bytes:
        path = self.dir / "fingerprint.key"
        if not path.exists():
            atomic_write(path, secrets.token_bytes(32), 0o600)
        return path.read_bytes()

    def segments(self) -> list[Path]:
        return sorted(p for p in self.dir.iterdir() if SEGMENT_RE.match(p.name))

    def _resume(self) -> tuple[int, str]:
        """Continue the chain after the last complete record; a torn last line (power cut while
        writing) is cut off and the cut itself is recorded."""
        self._finish_prune()
        segs = self.segments()
        if not segs:
            anchor = self._read_json("anchor.json")
            if anchor:
                return int(anchor["seq"]) - 1, str(anchor["prev"])
            return 0, GENESIS
        last = segs[-1]
        data = last.read_bytes()
        torn = 0
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            torn = len(data) - cut
            os.truncate(last, cut)
            data = data[:cut]
        lines = data.splitlines()
        if lines:
            rec = json.loads(lines[-1])
            seq, h = int(rec["seq"]), str(rec["hash"])
        else:
            seq, h = self._resume_before(segs)
        self._open(last)
        self._seq, self._hash = seq, h
        if torn:
            self.append({"event": "recovered", "torn_bytes": torn}, time.time())
        return self._seq, self._hash

    def _finish_prune(self) -> None:
        """Complete a prune cut short between moving the anchor and deleting the segments before
        it (a kill or a power cut): the chain starts where the anchor says."""
        anchor = self._read_json("anchor.json")
        segs = self.segments()
        first = str(anchor.get("segment", "")) if anchor else ""
        stale = [s for s in segs if s.name < first]
        if stale and any(s.name == first for s in segs):
            for s in stale:
                s.unlink()
            fsync_dir(self.dir)

    def _resume_before(self, segs: list[Path]) -> tuple[int, str]:
        for seg in reversed(segs[:-1]):
            lines = seg.read_bytes().splitlines()
            if lines:
                rec = json.loads(lines[-1])
                return int(rec["seq"]), str(rec["hash"])
        anchor = self._read_json("anchor.json")
        return (int(anchor["seq"]) - 1, str(anchor["prev"])) if anchor else (0, GENESIS)

    def _read_json(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(json.loads((self.dir / name).read_text()))
        except FileNotFoundError:
            return None

    def _open(self, path: Path) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
        created = not os.path.lexists(path)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if created:  # the new segment's name must be on disk before a checkpoint can name its records
            fsync_dir(self.dir)
        self._segment = path
        self._size = os.fstat(self._fd).st_size

    def _rotate(self, now: float) -> dict[str, Any] | None:
        segs = self.segments()
        n = int(SEGMENT_RE.match(segs[-1].name).group(1)) + 1 if segs else 1  # type: ignore[union-attr]
        self._open(self.dir / f"audit-{n:08d}.jsonl")
        return self._prune(now)

    def _prune(self, now: float) -> dict[str, Any] | None:
        """Delete whole segments, oldest first, while they are older than the retention or the
        log would pass ``max_total_bytes`` with a full current segment; the anchor moves first.
        Returns what a size deletion dropped (an ``audit-pruned`` record), else None."""
        segs = self.segments()
        horizon = now - self.config.retention_days * DAY
        closed = sum(p.stat().st_size for p in segs if p != self._segment)
        budget = self.config.max_total_bytes - self.config.max_segment_bytes
        dropped, first_seq = 0, None
        for old, nxt in zip(segs, segs[1:], strict=False):
            if nxt == self._segment and self._size == 0:
                break  # the next segment is still empty: nothing to anchor on yet
            over = closed > budget
            if not over and _last_time(old) >= horizon:
                break
            first = json.loads(nxt.read_bytes().split(b"\n", 1)[0])
            anchor = {"seq": int(first["seq"]), "prev": str(first["prev"]), "segment": nxt.name}
            atomic_write(self.dir / "anchor.json", json.dumps(anchor).encode(), 0o600)
            closed -= old.stat().st_size
            old.unlink()  # a segment back after a power cut is deleted again when the log opens (_finish_prune)
            if over:
                dropped, first_seq = dropped + 1, anchor["seq"]
        if not dropped:
            return None
        return {"event": "audit-pruned", "reason": "size", "segments": dropped, "first_seq": first_seq,
                "max_total_bytes": self.config.max_total_bytes}

    # --- writing -------------------------------------------------------------------------------
    def append(self, fields: dict[str, Any], now: float) -> int:
        """Append one record and return its sequence number."""
        with self._lock:
            return self._append(fields, now)

    def _append(self, fields: dict[str, Any], now: float) -> int:
        body = {
            **fields,
            "seq": self._seq + 1,
            "time": format_time(datetime.fromtimestamp(now, UTC)),
            "prev": self._hash,
        }
        encoded = canonical_json(body)
        h = hashlib.sha256(encoded).hexdigest()
        # verify() re-canonicalises the record without "hash", so the key's position is free
        line = encoded[:-1] + b',"hash":"' + h.encode() + b'"}\n'
        pruned = None
        if self._fd is None or (self._size and self._size + len(line) > self.config.max_segment_bytes):
            pruned = self._rotate(now)
        try:
            os.write(self._fd, line)  # type: ignore[arg-type]
        except OSError as e:
            raise EnvironmentFault(f"cannot write the audit log: {e.strerror}; free space") from e
        self._size += len(line)
        self._seq, self._hash = self._seq + 1, h
        self._since_checkpoint += 1
        if (
            self._since_checkpoint >= self.config.checkpoint_every
            or time.monotonic() - self._checkpoint_at >= self.config.checkpoint_seconds
        ):
            self._checkpoint()
        seq = self._seq
        if pruned is not None:
            self._append(pruned, now)  # the first record in a fresh segment: never rotates again
        return seq

    def refused_anonymous(self, status: int, now: float) -> None:
        """Count a refusal of a request that carried no valid token (no record of its own)."""
        with self._lock:
            self._flush_tally(now, force=False)
            if not self._tally:
                self._tally_start = now
            entry = self._tally.setdefault(status, [0, now, now])
            entry[0] += 1
            entry[2] = now

    def flush(self, now: float) -> None:
        """Write the counted refusals if their window has ended (called periodically)."""
        with self._lock:
            self._flush_tally(now, force=False)

    def _flush_tally(self, now: float, force: bool) -> None:
        if not self._tally:
            return
        window = self.config.summary_seconds
        if not force and self._tally_start <= now < self._tally_start + window:
            return
        tally, self._tally = self._tally, {}
        for status, (count, first, last) in sorted(tally.items()):
            self._append(
                {
                    "event": "anonymous",
                    "client": None,
                    "status": status,
                    "count": int(count),
                    "first": format_time(datetime.fromtimestamp(first, UTC)),
                    "last": format_time(datetime.fromtimestamp(last, UTC)),
                },
                now,
            )

    def _checkpoint(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
        head = {"seq": self._seq, "hash": self._hash}
        atomic_write(self.dir / "head.json", json.dumps(head).encode(), 0o600)
        self._since_checkpoint = 0
        self._checkpoint_at = time.monotonic()

    def close(self, checkpoint: bool = True, now: float | None = None) -> None:
        """Write the open summary window, checkpoint and close (``now`` stamps the summary: by
        default the time of its last refusal); without ``checkpoint`` (the data dir was wiped)
        nothing is written."""
        with self._lock:
            if checkpoint and self._tally:
                last = max(v[2] for v in self._tally.values())
                self._flush_tally(last if now is None else max(now, last), force=True)
            self._tally = {}
            if self._fd is not None:
                if checkpoint:
                    self._checkpoint()
                os.close(self._fd)
                self._fd = None


def verify(directory: str | Path) -> VerifyReport:
    """Walk the whole retained chain: every hash, every link, every sequence number, the head."""
    d = Path(directory)
    rep = VerifyReport(ok=False)
    if not d.is_dir():
        rep.problems.append(f"no audit log in {d}")
        return rep
    anchor = _json_or_none(d / "anchor.json")
    head = _json_or_none(d / "head.json")
    seq, prev = (int(anchor["seq"]) - 1, str(anchor["prev"])) if anchor else (0, GENESIS)
    segs = sorted(p for p in d.iterdir() if SEGMENT_RE.match(p.name))
    rep.segments = len(segs)
    if anchor and segs and segs[0].name != anchor.get("segment"):
        rep.problems.append(
            f"oldest segment is {segs[0].name}, the anchor says {anchor.get('segment')}"
        )
    for seg in segs:
        data = seg.read_bytes()
        if data and not data.endswith(b"\n"):
            rep.problems.append(f"{seg.name}: last record is torn (truncated mid-record)")
        for n, line in enumerate(data.splitlines(), 1):
            where = f"{seg.name}:{n}"
            try:
                rec = json.loads(line)
                body = {k: v for k, v in rec.items() if k != "hash"}
                if rec["seq"] != seq + 1:
                    rep.problems.append(
                        f"{where}: sequence {rec['seq']} follows {seq} "
                        "(records removed or reordered)"
                    )
                if rec["prev"] != prev:
                    rep.problems.append(
                        f"{where}: chain broken (previous record removed or edited)"
                    )
                if record_hash(body) != rec["hash"]:
                    rep.problems.append(f"{where}: record hash mismatch (record edited)")
                seq, prev = int(rec["seq"]), str(rec["hash"])
            except (ValueError, KeyError, TypeError):
                rep.problems.append(f"{where}: not a valid audit record")
                continue
            rep.records += 1
            rep.first_seq = rep.first_seq or seq
            rep.last_seq = seq
            if head and seq == head.get("seq") and prev != head.get("hash"):
                rep.problems.append(f"{where}: differs from the checkpointed head")
    if head and seq < int(head["seq"]):
        rep.problems.append(
            f"log ends at {seq} but the checkpoint says {head['seq']} (records cut off the end)"
        )
    rep.ok = not rep.problems
    return rep


def _last_time(segment: Path) -> float:
    """Time of a segment's last record, by the log's own clock (not the file's mtime)."""
    with segment.open("rb") as f:
        f.seek(max(0, segment.stat().st_size - 65536))
        lines = f.read().splitlines()
    if not lines:
        return float("inf")
    return parse_time(json.loads(lines[-1])["time"], "time").timestamp()


def _json_or_none(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
