"""The fleet monitor: authenticate every report, judge its sequence number, store it once.

The decision is pure (:func:`verify_message`, :func:`verify_batch`, :func:`judge_sequence`): bytes,
the enrolled keys and what the store already holds in; a verdict out. :class:`Monitor` is the thin
adapter: an MQTT 5 shared subscription (several monitors share the load) whose network thread only
receives and acknowledges, and a helper process that authenticates, parses, judges and stores each
chunk of messages in one transaction (:func:`ingest_at`, in arrival order, off this process's
GIL). The broker gets its acknowledgements only after that commit -- so a monitor killed mid-chunk
loses nothing (the broker redelivers, the store de-duplicates).

Authentication (``docs/telemetry.md``, "Hash chain"): every report is signed by its board and names
the SHA-256 of the board's previous report (``prev``). Within a chunk, newest first, a report whose
exact bytes a later authenticated report of the same device names as ``prev`` is authenticated by
that report's signature (it is byte for byte what the board signed for); every other report has
its own signature checked. A burst from one board costs one signature check per chunk instead of
one per report; a report that arrives alone is checked on its own signature, as before.

Verdicts (``docs/telemetry.md``):

* accepted -- authenticated, sequence number new: stored as genuine;
* duplicate -- the same bytes again within the redelivery window (QoS 1 is at-least-once):
  counted, not stored twice;
* flagged -- a security event, never stored as genuine: ``unknown-device`` (no enrolment),
  ``forged`` (bad signature, malformed, or body and topic disagree), ``replayed`` (a sequence
  number seen before with other bytes, or an old report resent far behind the device's
  sequence), ``out-of-sequence`` (a new report far behind the device's highest sequence number).
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import BrokenExecutor, Future, ProcessPoolExecutor
from dataclasses import dataclass

from device_agent.bundle import ID_RE
from device_agent.errors import EdgeWardError, EnvironmentFault, SecurityRefusal
from device_agent.mqtt import Broker, Link, Session
from device_agent.report import (
    KINDS,
    NO_PREV,
    TOPIC_OF_KIND,
    TOPIC_ROOT,
    Report,
    frame,
    parse_report,
    payload_digest,
    split_topic,
    verify_frame,
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
    batch: int = 250  # reports authenticated, judged and committed per transaction
    # broker -> monitor in flight, acknowledged after commit: room for the chunks in the helper
    # (IN_FLIGHT) and the next ones arriving meanwhile.
    receive_maximum: int = 1000
    session_expiry: int = 7 * 24 * 3600  # the broker queues for an absent monitor this long
    # MQTT 5 shared subscription group (several monitors share the load). None: one plain
    # persistent subscription -- mosquitto 2.0 does not keep shared subscriptions across a
    # broker restart, so reports published before the monitor re-subscribes would be dropped.
    group: str | None = "edgeward-monitors"


DEFAULT_MONITOR = MonitorConfig()
# Chunks handed to the helper process at a time: it works on one while the next waits, so it
# never waits for this process.
IN_FLIGHT = 2


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


# What the first stage hands the second: the device, the body (not parsed yet) and the digest it
# names as its predecessor, once the report is authenticated; or a verdict already (no key, bad
# framing, bad signature).
Checked = tuple[str, bytes, bytes] | Flagged


def check_message(
    keys: Mapping[str, bytes],
    topic_name: str,
    payload: bytes,
    vouched: Collection[tuple[str, bytes]] = (),
) -> Checked:
    """Authenticate first: the device named by the topic must be enrolled, and either its key
    signed the exact received bytes or ``(device, payload_digest(payload))`` is in ``vouched``
    (a later report of that device, already authenticated, names these exact bytes as its
    predecessor). Returns (device, body, prev) with the body not yet parsed."""
    d = payload_digest(payload)
    try:
        device, _ = split_topic(topic_name)
    except EdgeWardError as e:
        return Flagged("forged", "critical", str(e), None, None, d.hex())
    key = keys.get(device)
    if key is None:
        detail = f"report from unenrolled device {device}"
        return Flagged("unknown-device", "critical", detail, device, None, d.hex())
    try:
        f = frame(payload)
        if (device, d) not in vouched:
            verify_frame(f, key)
        return device, f.body, f.prev
    except SecurityRefusal as e:
        return Flagged("forged", "critical", f"signature: {e}", device, None, d.hex())
    except EdgeWardError as e:
        return Flagged("forged", "critical", f"malformed report: {e}", device, None, d.hex())


def parse_checked(checked: Checked, topic_name: str, d: str) -> Report | Flagged:
    """Parse what :func:`check_message` let through (``d``: the payload's hex digest)."""
    if isinstance(checked, Flagged):
        return checked
    device, body, _ = checked
    try:
        return parse_report(body, topic_name)
    except EdgeWardError as e:
        return Flagged("forged", "critical", f"malformed report: {e}", device, None, d)


def verify_message(keys: Mapping[str, bytes], topic_name: str, payload: bytes) -> Report | Flagged:
    """Authenticate one message on its own signature, then parse it."""
    return parse_checked(check_message(keys, topic_name, payload), topic_name, payload_digest(payload).hex())


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
    """Authenticate, judge and store a batch of (topic, payload) in one transaction; count
    verdicts."""
    return store_verified(store, [t for t, _ in messages], verify_batch(keys, messages), window)


def verify_batch(
    keys: Mapping[str, bytes], messages: list[tuple[str, bytes]]
) -> list[tuple[Row | Flagged, str]]:
    """The first stage of :func:`ingest`: for each (topic, payload), the authenticated report (as
    it will be stored) or the verdict, and the payload's hex digest. Newest first, so that each
    well-formed authenticated report vouches for the predecessor it names (the hash chain)."""
    out: list[tuple[Row | Flagged, str]] = [None] * len(messages)  # type: ignore[list-item]
    vouched: set[tuple[str, bytes]] = set()
    for i in range(len(messages) - 1, -1, -1):
        topic_name, payload = messages[i]
        d = payload_digest(payload).hex()
        checked = check_message(keys, topic_name, payload, vouched)
        r = parse_checked(checked, topic_name, d)
        if isinstance(r, Flagged):
            out[i] = (r, d)
            continue
        device, _, prev = checked  # type: ignore[misc]
        if prev != NO_PREV:
            vouched.add((device, prev))
        out[i] = (Row.of(r), d)
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


# The helper process's own connections to the stores it writes, by path.
_helper_stores: dict[str, MonitorStore] = {}


def ingest_at(
    db: str, keys: Mapping[str, bytes], messages: list[tuple[str, bytes]], window: int
) -> dict[str, int]:
    """:func:`ingest` into the store at ``db`` (run in the helper process, which keeps one
    connection per store until :func:`release_store`)."""
    store = _helper_stores.get(db)
    if store is None:
        store = _helper_stores[db] = MonitorStore(db)
    return ingest(store, keys, messages, window)


def release_store(db: str) -> None:
    """Close the helper process's connection to the store at ``db``, if it has one."""
    store = _helper_stores.pop(db, None)
    if store is not None:
        store.close()


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


def _helper_pool() -> ProcessPoolExecutor | None:
    """The helper process that runs :func:`ingest_at` for every monitor of this process; started
    (and waited for) once, before any monitor connects; replaced if it died. None when no helper
    can be started (e.g. a host program whose main module cannot be re-imported): the monitor
    then ingests in its own process, slower but the same."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            try:
                _pool.submit(int).result(timeout=30)
                return _pool
            except (BrokenExecutor, RuntimeError, TimeoutError):
                _pool.shutdown(wait=False, cancel_futures=True)
        # One worker: it takes the chunks strictly in the order they were submitted.
        _pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        try:
            _pool.submit(time.sleep, 0.05).result(timeout=60)
        except (BrokenExecutor, TimeoutError, OSError):
            _pool.shutdown(wait=False, cancel_futures=True)
            _pool = None
        return _pool


class Monitor:
    """Subscribe, authenticate, store. ``start`` / ``stop``; ``processed`` counts handled messages."""

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
        self._pool = _helper_pool()
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

    def _take(self, limit: int, wait: float) -> list[tuple[str, bytes, int]]:
        """Up to ``limit`` messages: waits up to ``wait`` seconds for the first, never for the rest."""
        try:
            items = [self._inbox.get(timeout=wait) if wait else self._inbox.get_nowait()]
        except queue.Empty:
            return []
        while len(items) < limit:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        return items

    def _submit(self, batch: list[tuple[str, bytes, int]]) -> Future[dict[str, int]]:
        """Hand one chunk to the helper process (or ingest it here when there is none)."""
        keys = self._key_lookup(batch)
        wanted = {_device_of(t) for t, _, _ in batch}
        args = (
            str(self.store.path),
            {d: keys[d] for d in wanted if d in keys},
            [(t, p) for t, p, _ in batch],
            self.config.redelivery_window,
        )
        if self._pool is not None:
            return self._pool.submit(ingest_at, *args)
        done: Future[dict[str, int]] = Future()
        try:
            done.set_result(ingest(self.store, *args[1:]))
        except EdgeWardError as e:
            done.set_exception(e)
        return done

    def _run(self) -> None:
        """Hand chunks to the helper in arrival order, at most IN_FLIGHT at a time; acknowledge
        each chunk to the broker once the helper has committed it, oldest first."""
        pending: collections.deque[tuple[list[int], Future[dict[str, int]]]] = collections.deque()
        try:
            while not self._stop.is_set():
                batch = []
                if len(pending) < IN_FLIGHT:
                    batch = self._take(self.config.batch, 0.0 if pending else 0.1)
                    if batch:
                        pending.append(([mid for _, _, mid in batch], self._submit(batch)))
                # Acknowledge finished chunks; wait for the oldest when there is nothing to add.
                while pending:
                    mids, job = pending[0]
                    if len(pending) < IN_FLIGHT and batch and not job.done():
                        break
                    try:
                        job.result(timeout=0.1)
                    except TimeoutError:
                        break
                    pending.popleft()
                    for mid in mids:
                        self.link.ack(mid)
                    self.processed += len(mids)
                    if self._on_batch is not None:
                        self._on_batch(self.processed)
        except EdgeWardError as e:
            # Not acknowledged: the broker delivers the chunk again to the next monitor run.
            self.error = e
            self._stop.set()
        except BrokenExecutor as e:
            self.error = EnvironmentFault(f"the monitor's helper process stopped: {e}")
            self._stop.set()

    def start(self) -> None:
        self.link.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.link.stop()
        if self._pool is not None:
            # A dead helper holds no connection to release.
            with contextlib.suppress(BrokenExecutor, RuntimeError, TimeoutError):
                self._pool.submit(release_store, str(self.store.path)).result(timeout=30)
