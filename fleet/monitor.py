"""The fleet monitor: verify every report, judge its sequence number, store it once.

The decision is pure (:func:`verify_message`, :func:`judge_sequence`): bytes, the enrolled keys
and what the store already holds in; a verdict out. :class:`Monitor` is the thin adapter: an MQTT 5
shared subscription (several monitors share the load), a helper process that checks signatures and
then parses (:func:`verify_batch`, in arrival order, off this process's GIL), a store thread that
judges and stores a batch in one transaction, and acknowledgements to the broker only after that
commit -- so a monitor killed mid-batch loses nothing (the broker redelivers, the store
de-duplicates).

Verdicts (``docs/telemetry.md``):

* accepted -- signature good, sequence number new: stored as genuine;
* duplicate -- the same bytes again within the redelivery window (QoS 1 is at-least-once):
  counted, not stored twice;
* flagged -- a security event, never stored as genuine: ``unknown-device`` (no enrolment),
  ``forged`` (bad signature, malformed, or body and topic disagree), ``replayed`` (a sequence
  number seen before with other bytes, or an old report resent far behind the device's
  sequence), ``out-of-sequence`` (a new report far behind the device's highest sequence number).
"""

from __future__ import annotations

import collections
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import BrokenExecutor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from device_agent.bundle import ID_RE
from device_agent.errors import EdgeWardError, EnvironmentFault, SecurityRefusal
from device_agent.mqtt import Broker, Link, Session
from device_agent.report import (
    KINDS,
    TOPIC_OF_KIND,
    TOPIC_ROOT,
    Report,
    check_signature,
    digest,
    parse_report,
    split_topic,
)
from device_agent.store import utcnow
from device_agent.telemetry import DEFAULT_CONFIG as BOARD_DEFAULTS

from .ca import FleetHome
from .store import MonitorStore, Row


@dataclass(frozen=True)
class MonitorConfig:
    """Every monitor limit in one place."""

    # A board hands at most `window` unacknowledged reports to MQTT; only those can come twice.
    redelivery_window: int = 4 * BOARD_DEFAULTS.window
    batch: int = 1000  # reports verified and committed per transaction
    receive_maximum: int = 1000  # broker -> monitor in flight, acknowledged after commit
    session_expiry: int = 7 * 24 * 3600  # the broker queues for an absent monitor this long
    # MQTT 5 shared subscription group (several monitors share the load). None: one plain
    # persistent subscription -- mosquitto 2.0 does not keep shared subscriptions across a
    # broker restart, so reports published before the monitor re-subscribes would be dropped.
    group: str | None = "edgeward-monitors"


DEFAULT_MONITOR = MonitorConfig()
# Messages handed to the helper process at a time (and on to the store thread as one piece).
VERIFY_CHUNK = 250
# Helper processes that verify and parse (about 70 us a report, 45 of them libsodium's); the
# network loop and the store take about 50 us a report in the monitor's own process.
VERIFIERS = 1
IN_FLIGHT = 2 * VERIFIERS


@dataclass(frozen=True)
class Accepted:
    report: Report | Row
    digest: str


@dataclass(frozen=True)
class Duplicate:
    device_id: str
    seq: int


@dataclass(frozen=True)
class Flagged:
    kind: str
    severity: str
    detail: str
    device_id: str | None
    seq: int | None
    digest: str


Verdict = Accepted | Duplicate | Flagged


# What the first stage hands the second: the device and the body whose signature checked, or a
# verdict already (no key, bad framing, bad signature).
Checked = tuple[str, bytes] | Flagged


def check_message(keys: Mapping[str, bytes], topic_name: str, payload: bytes) -> Checked:
    """Signature first: the device named by the topic must be enrolled and must have signed the
    exact received bytes. Returns (device, body) with the body not yet parsed."""
    try:
        device, _ = split_topic(topic_name)
    except EdgeWardError as e:
        return Flagged("forged", "critical", str(e), None, None, digest(payload))
    key = keys.get(device)
    if key is None:
        detail = f"report from unenrolled device {device}"
        return Flagged("unknown-device", "critical", detail, device, None, digest(payload))
    try:
        return device, check_signature(payload, key)
    except SecurityRefusal as e:
        return Flagged("forged", "critical", f"signature: {e}", device, None, digest(payload))
    except EdgeWardError as e:
        return Flagged(
            "forged", "critical", f"malformed report: {e}", device, None, digest(payload)
        )


def parse_checked(checked: Checked, topic_name: str, d: str) -> Report | Flagged:
    """Parse what :func:`check_message` let through (``d``: the payload's digest)."""
    if isinstance(checked, Flagged):
        return checked
    device, body = checked
    try:
        return parse_report(body, topic_name)
    except EdgeWardError as e:
        return Flagged("forged", "critical", f"malformed report: {e}", device, None, d)


def verify_message(keys: Mapping[str, bytes], topic_name: str, payload: bytes) -> Report | Flagged:
    """Verify then parse one message: :func:`check_message` then :func:`parse_checked`."""
    return parse_checked(check_message(keys, topic_name, payload), topic_name, digest(payload))


def judge_sequence(
    report: Report | Row, d: str, seen: str | None, highest: int, window: int
) -> Verdict:
    """Decide what a verified report is, given the digest already stored under its sequence
    number (``seen``) and the device's highest sequence number so far."""
    behind = report.seq <= highest - window and report.kind != "will"
    if seen is not None:
        if seen != d:
            detail = f"sequence number {report.seq} reused with different content"
            return Flagged("replayed", "critical", detail, report.device_id, report.seq, d)
        if behind:
            detail = (
                f"report {report.seq} resent long after it was received (device is at {highest})"
            )
            return Flagged("replayed", "warning", detail, report.device_id, report.seq, d)
        return Duplicate(report.device_id, report.seq)
    if behind:
        detail = f"report {report.seq} arrived far behind the device's sequence ({highest})"
        return Flagged("out-of-sequence", "warning", detail, report.device_id, report.seq, d)
    return Accepted(report, d)


def ingest(
    store: MonitorStore, keys: Mapping[str, bytes], messages: list[tuple[str, bytes]], window: int
) -> dict[str, int]:
    """Verify, judge and store a batch of (topic, payload) in one transaction; count verdicts."""
    return store_verified(store, [t for t, _ in messages], verify_batch(keys, messages), window)


def verify_batch(
    keys: Mapping[str, bytes], messages: list[tuple[str, bytes]]
) -> list[tuple[Row | Flagged, str]]:
    """The first stage of :func:`ingest`: for each (topic, payload), the verified report (as it
    will be stored) or the verdict, and the payload's digest. Pure (the monitor runs it in a
    helper process)."""
    out: list[tuple[Row | Flagged, str]] = []
    for topic_name, payload in messages:
        d = digest(payload)
        r = parse_checked(check_message(keys, topic_name, payload), topic_name, d)
        out.append((r if isinstance(r, Flagged) else Row.of(r), d))
    return out


def store_verified(
    store: MonitorStore,
    topics: list[str],
    verified: list[tuple[Row | Flagged, str]],
    window: int,
) -> dict[str, int]:
    """The second stage of :func:`ingest`: judge what :func:`verify_batch` made of the messages
    received on ``topics`` against the store and write the batch in one transaction."""
    accepted = duplicate = flagged = 0
    with store.batch(utcnow()) as tx:
        tx.prefetch((r.device_id, r.seq) for r, _ in verified if isinstance(r, Row))
        for topic_name, (r, d) in zip(topics, verified, strict=True):
            v: Verdict
            if isinstance(r, Row):
                v = judge_sequence(
                    r, d, tx.seen(r.device_id, r.seq), tx.highest(r.device_id), window
                )
            else:
                v = r
            if isinstance(v, Accepted):
                tx.accept(v.report, v.digest)
                accepted += 1
            elif isinstance(v, Duplicate):
                tx.duplicate(v.device_id)
                duplicate += 1
            else:
                tx.flag(v.kind, v.severity, v.detail, topic_name, v.device_id, v.seq, v.digest)
                flagged += 1
    return {"accepted": accepted, "duplicate": duplicate, "flagged": flagged}


def _device_of(topic_name: str) -> str:
    parts = topic_name.split("/")
    return parts[2] if len(parts) == 4 else ""


def topic_filters(group: str | None) -> list[str]:
    """The subscriptions a monitor takes: every report topic, never the command topics."""
    prefix = f"$share/{group}/" if group else ""
    return [
        f"{prefix}{TOPIC_ROOT}/+/{level}" for level in sorted({TOPIC_OF_KIND[k] for k in KINDS})
    ]


_pool_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None


def _verifier_pool() -> ProcessPoolExecutor | None:
    """The helper process that runs :func:`verify_batch` for every monitor of this process;
    started (and waited for) once, before any monitor connects; replaced if it died. None when
    no helper can be started (e.g. a host program whose main module cannot be re-imported): the
    monitor then verifies in its own process, slower but the same."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            try:
                _pool.submit(int).result(timeout=30)
                return _pool
            except (BrokenExecutor, RuntimeError, TimeoutError):
                _pool.shutdown(wait=False, cancel_futures=True)
        _pool = ProcessPoolExecutor(VERIFIERS, mp_context=multiprocessing.get_context("spawn"))
        try:
            for job in [_pool.submit(time.sleep, 0.05) for _ in range(VERIFIERS)]:
                job.result(timeout=60)
        except (BrokenExecutor, TimeoutError, OSError):
            _pool.shutdown(wait=False, cancel_futures=True)
            _pool = None
        return _pool


class Monitor:
    """Subscribe, verify, store. ``start`` / ``stop``; ``processed`` counts handled messages."""

    def __init__(
        self,
        home: FleetHome,
        store: MonitorStore,
        broker: Broker,
        client_id: str,
        config: MonitorConfig = DEFAULT_MONITOR,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.home = home
        self.store = store
        self.config = config
        self._on_batch = on_batch
        self._inbox: queue.SimpleQueue[tuple[str, bytes, int]] = queue.SimpleQueue()
        self.link = Link(
            broker,
            Session(
                client_id=client_id,
                clean_start=False,
                session_expiry=config.session_expiry,
                receive_maximum=config.receive_maximum,
            ),
            on_message=lambda t, p, mid: self._inbox.put((t, p, mid)),
            manual_ack=True,
        )
        for f in topic_filters(config.group):
            self.link.subscribe(f)
        self._keys = home.device_keys()
        self._stop = threading.Event()
        self._checked: queue.SimpleQueue[
            tuple[list[tuple[str, int]], list[tuple[Row | Flagged, str]]]
        ] = queue.SimpleQueue()
        self._pool = _verifier_pool()
        self._verifier = threading.Thread(
            target=self._verify_run, name="edgeward-verify", daemon=True
        )
        self._thread = threading.Thread(target=self._run, name="edgeward-monitor", daemon=True)
        self.processed = 0
        self.error: EdgeWardError | None = None

    def _key_lookup(self, batch: list[tuple[str, bytes, int]]) -> Mapping[str, bytes]:
        """Enrolled keys, re-read when a batch names a device enrolled since they were loaded
        (removing an enrolment takes effect when the monitor restarts)."""
        new = {_device_of(t) for t, _, _ in batch} - self._keys.keys()
        if any(ID_RE.match(d) and (self.home.devices / f"{d}.json").exists() for d in new):
            self._keys = self.home.device_keys()
        return self._keys

    def _take(self, q: queue.SimpleQueue[Any], limit: int, wait: float = 0.1) -> list[Any]:
        """Up to ``limit`` items: waits up to ``wait`` seconds for the first, never for the rest."""
        try:
            items = [q.get(timeout=wait) if wait else q.get_nowait()]
        except queue.Empty:
            return []
        while len(items) < limit:
            try:
                items.append(q.get_nowait())
            except queue.Empty:
                break
        return items

    def _verify_run(self) -> None:
        """Stage 1: signatures (then parsing) in a helper process, so that neither libsodium nor
        the parser competes for this process's GIL with paho's network loop and the store thread.
        Two chunks per helper are in flight, so a helper never waits for this thread; results
        are handed on in the order the messages arrived."""
        pending: collections.deque[tuple[list[tuple[str, int]], Future[Any]]] = collections.deque()
        try:
            while not self._stop.is_set():
                batch = []
                if len(pending) < IN_FLIGHT:
                    batch = self._take(self._inbox, VERIFY_CHUNK, 0.0 if pending else 0.1)
                if batch:
                    keys = self._key_lookup(batch)
                    wanted = {_device_of(t) for t, _, _ in batch}
                    if self._pool is None:
                        verified = verify_batch(keys, [(t, p) for t, p, _ in batch])
                        self._checked.put(([(t, mid) for t, _, mid in batch], verified))
                        continue
                    job = self._pool.submit(
                        verify_batch,
                        {d: keys[d] for d in wanted if d in keys},
                        [(t, p) for t, p, _ in batch],
                    )
                    pending.append(([(t, mid) for t, _, mid in batch], job))
                # Hand on finished work in order; wait for the oldest when there is nothing else.
                while pending:
                    meta, job = pending[0]
                    if len(pending) < IN_FLIGHT and batch and not job.done():
                        break
                    try:
                        verified = job.result(timeout=0.1)
                    except TimeoutError:
                        break
                    pending.popleft()
                    self._checked.put((meta, verified))
        except (EdgeWardError, BrokenExecutor) as e:
            self.error = e if isinstance(e, EdgeWardError) else EnvironmentFault(str(e))
            self._stop.set()

    def _run(self) -> None:
        """Stage 2: parse, judge and store a batch in one transaction; acknowledge after commit."""
        while not self._stop.is_set():
            chunks = self._take(self._checked, max(1, self.config.batch // VERIFY_CHUNK))
            if not chunks:
                continue
            meta = [m for chunk, _ in chunks for m in chunk]
            verified = [v for _, chunk in chunks for v in chunk]
            try:
                store_verified(
                    self.store, [t for t, _ in meta], verified, self.config.redelivery_window
                )
            except EdgeWardError as e:
                # Not acknowledged: the broker delivers the batch again to the next monitor run.
                self.error = e
                self._stop.set()
                return
            for _, mid in meta:
                self.link.ack(mid)
            self.processed += len(meta)
            if self._on_batch is not None:
                self._on_batch(self.processed)

    def start(self) -> None:
        self.link.start()
        self._verifier.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._verifier.join()
        self._thread.join()
        self.link.stop()
