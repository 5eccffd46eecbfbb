"""The fleet monitor: authenticate every report, judge its sequence number, store it once.

The decision is pure (:func:`verify_batch`, built on :func:`check_message` and
:func:`parse_checked`, and :func:`judge_sequence`): bytes, the enrolled keys and what the store
already holds in; a verdict out. :class:`Monitor` is the thin adapter: an MQTT 5 shared
subscription (several monitors share the load), a hand-over thread that passes received messages on
and acknowledges them, and a helper process that authenticates, parses, judges and stores each
chunk of messages in one transaction (:func:`ingest`, in arrival order, off this process's GIL).
The broker gets its acknowledgements only after that commit -- so a monitor killed mid-chunk loses
nothing (the broker redelivers, the store de-duplicates).

Authentication (``docs/telemetry.md``, "Hash chain"): every report is signed by its board and names
the SHA-256 of the board's previous report (``prev``). Within a chunk, newest first, a report whose
exact bytes a later authenticated report of the same device names as ``prev`` is authenticated by
that report's signature (it is byte for byte what the board signed for); every other report has
its own signature checked. A burst from one board costs one signature check per chunk instead of
one per report; a report that arrives alone is checked on its own signature, as before.

Receipts (``docs/telemetry.md``, "Receipts"): given a receipt key, after every commit the monitor
reads from the store what it holds of each board the chunk touched (:meth:`StoreReads.committed`,
so what another monitor committed counts too) and publishes one signed receipt per board,
retained on ``edgeward/v1/<device>/receipt`` -- also when the whole chunk was duplicates, since
that is how a board learns that a report it sent again is stored. A board that trusts the receipt
key keeps each report until a receipt covers it.

Command results (``docs/commands.md``): the monitor also subscribes to every board's results
topic. The few results are routed by topic as they arrive, before the report pipeline, to a
thread of their own that verifies each against the board's enrolled key and records it in the
command ledger in the fleet home (:meth:`fleet.commands.CommandLedger.record_result`), then
acknowledges it. A forged or malformed result (``forged``), one from an unenrolled device
(``unknown-device``) or a genuine one the ledger cannot accept, e.g. for a command this fleet did
not issue (``unexpected-result``), becomes a security event in the monitor store, like a forged
report, and the monitor goes on.

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
import logging
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from device_agent.commands.format import RESULTS_LEVEL
from device_agent.config import DEFAULT_CONFIG
from device_agent.crypto import fingerprint, sha256_hex
from device_agent.errors import BadSignature, EdgeWardError, EnvironmentFault, SecurityRefusal
from device_agent.store.datadir import utcnow
from device_agent.telemetry.mqtt import Broker, Link, Session
from device_agent.telemetry.receipt import Receipt, encode_receipt, receipt_topic
from device_agent.telemetry.report import (
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
from device_agent.wire import ID_RE

from .ca import FleetHome
from .store import Row, Store, StoreConflict, open_store

_log = logging.getLogger(__name__)


RECEIVE_MAXIMUM = 1000


@dataclass(frozen=True)
class MonitorConfig:
    """Every monitor limit in one place."""

    # How far behind a device's highest sequence number the same bytes may legitimately come
    # again: a board resends at most `window` unacknowledged reports, and the broker resends to a
    # restarted monitor what it delivered but never saw acknowledged (at most RECEIVE_MAXIMUM, e.g.
    # a monitor killed between a commit and its acknowledgements).
    redelivery_window: int = RECEIVE_MAXIMUM + 4 * DEFAULT_CONFIG.telemetry.window
    batch: int = 250  # reports authenticated, judged and committed per transaction
    # broker -> monitor in flight, acknowledged after commit: room for the chunks in the helper
    # (IN_FLIGHT) and the next ones arriving meanwhile.
    receive_maximum: int = RECEIVE_MAXIMUM
    session_expiry: int = 7 * 24 * 3600  # the broker queues for an absent monitor this long
    # MQTT 5 shared subscription group (several monitors share the load). None: one plain
    # persistent subscription -- mosquitto 2.0 does not keep shared subscriptions across a
    # broker restart, so reports published before the monitor re-subscribes would be dropped.
    group: str | None = "edgeward-monitors"


DEFAULT_MONITOR = MonitorConfig()

# What a chunk asks of the helper: the enrolled keys of its devices, the messages, the redelivery
# window, and whether to read back what the store holds of those devices for receipts.
Chunk = tuple[Mapping[str, bytes], list[tuple[str, bytes]], int, bool]
# What the helper answers: the verdict counts, and per device (highest, stored numbers in window).
Answer = tuple[dict[str, int], dict[str, tuple[int, list[int]]]]


class ReceiptSigner(Protocol):
    """A receipt key (``packager.signers.Signer``: a file or a PKCS#11 token)."""

    public_raw: bytes

    def sign(self, data: bytes, /) -> bytes: ...
# Chunks handed to the helper process at a time: it works on one while the next waits, so it
# never waits for this process. Answers are a few bytes each, so with at most two outstanding the
# helper never blocks writing one while this process blocks sending a chunk: no deadlock.
IN_FLIGHT = 2
# While the helper is busy, how often the hand-over thread looks for its answer or a full chunk.
FILL_S = 0.005


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
    d: bytes | None = None,
) -> Checked:
    """Authenticate first: the device named by the topic must be enrolled, and either its key
    signed the exact received bytes or ``(device, payload_digest(payload))`` is in ``vouched``
    (a later report of that device, already authenticated, names these exact bytes as its
    predecessor). ``d``: the payload's digest, if the caller has it. Returns (device, body, prev)
    with the body not yet parsed."""
    if d is None:
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
    store: Store,
    keys: Mapping[str, bytes],
    messages: list[tuple[str, bytes]],
    window: int,
    reasons: dict[str, int] | None = None,
) -> dict[str, int]:
    """Authenticate, judge and store a batch of (topic, payload) in one transaction; count
    verdicts (and, into ``reasons`` if given, the flagged ones by :func:`rejection_reason`,
    once committed). Should storing the batch fail for any reason but the environment (the store
    itself), each message is stored in a transaction of its own, and one that still fails is
    recorded as an ``unjudgeable`` security event: one message never holds up the others."""
    topics = [t for t, _ in messages]
    verified = verify_batch(keys, messages)
    try:
        return store_verified(store, topics, verified, window, reasons)
    except EnvironmentFault:
        raise  # the store, not a message: nothing committed, nothing acknowledged, delivered again
    except Exception:  # noqa: BLE001
        _log.exception("a batch of %d messages could not be stored; storing them one by one", len(messages))
    counts = dict.fromkeys(("accepted", "duplicate", "flagged"), 0)
    for topic_name, (r, d) in zip(topics, verified, strict=True):
        try:
            one = store_verified(store, [topic_name], [(r, d)], window, reasons)
        except EnvironmentFault:
            raise
        except Exception as e:  # noqa: BLE001
            one = store_verified(
                store, [topic_name], [(unjudgeable(topic_name, d, "report", e), d)], window, reasons
            )
        for k, n in one.items():
            counts[k] += n
    return counts


def verify_batch(
    keys: Mapping[str, bytes], messages: list[tuple[str, bytes]]
) -> list[tuple[Row | Flagged, str]]:
    """The first stage of :func:`ingest`: for each (topic, payload), the authenticated report (as
    it will be stored) or the verdict, and the payload's hex digest. Newest first, so that each
    well-formed authenticated report vouches for the predecessor it names (the hash chain)."""
    out: list[tuple[Row | Flagged, str]] = []
    vouched: set[tuple[str, bytes]] = set()
    for topic_name, payload in reversed(messages):
        raw = payload_digest(payload)
        d = raw.hex()
        try:
            checked = check_message(keys, topic_name, payload, vouched, raw)
            r = parse_checked(checked, topic_name, d)
            if isinstance(r, Flagged):
                out.append((r, d))
                continue
            device, _, prev = checked  # type: ignore[misc]
            row = Row.of(r)
        except Exception as e:  # noqa: BLE001 -- a report no rule can judge is an event, not a stop
            out.append((unjudgeable(topic_name, d, "report", e), d))
            continue
        if prev != NO_PREV:
            vouched.add((device, prev))
        out.append((row, d))
    out.reverse()  # back to arrival order
    return out


def unjudgeable(topic_name: str, d: str, what: str, e: BaseException) -> Flagged:
    """The verdict on a message that raised where every refusal is a FormatError or a
    SecurityRefusal: a security event about the device its topic names, never a stopped monitor
    (``docs/telemetry.md``, "Poison messages")."""
    device = _device_of(topic_name)
    detail = f"the monitor could not judge this {what}: {ascii(e)[:300]}"
    return Flagged("unjudgeable", "critical", detail, device if ID_RE.match(device) else None, None, d)


def store_verified(
    store: Store,
    topics: list[str],
    verified: list[tuple[Row | Flagged, str]],
    window: int,
    reasons: dict[str, int] | None = None,
) -> dict[str, int]:
    """The second stage of :func:`ingest`: judge what :func:`verify_batch` made of the messages
    received on ``topics`` against the store and write the batch in one transaction. When
    another monitor's transaction got in the way (nothing of this one was committed), judge the
    batch again against what is now stored, a bounded number of times."""
    for attempt in range(CONFLICT_RETRIES):
        try:
            return _judge_and_store(store, topics, verified, window, reasons)
        except StoreConflict:
            if attempt == CONFLICT_RETRIES - 1:
                raise
            _log.info("store conflict with another monitor; judging the batch again")
    raise AssertionError("unreachable")


# How often a batch is judged again after another monitor's write came first.
CONFLICT_RETRIES = 5


def _judge_and_store(
    store: Store,
    topics: list[str],
    verified: list[tuple[Row | Flagged, str]],
    window: int,
    reasons: dict[str, int] | None = None,
) -> dict[str, int]:
    accepted = duplicate = flagged = 0
    why: dict[str, int] = {}
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
                reason = rejection_reason(v.kind, v.detail)
                why[reason] = why.get(reason, 0) + 1
    if reasons is not None:  # committed: count them (a batch judged again is counted once)
        for reason, n in why.items():
            reasons[reason] = reasons.get(reason, 0) + n
    return {"accepted": accepted, "duplicate": duplicate, "flagged": flagged}


# Why a report was rejected (the ``/metrics`` label): the security event's kind, with a
# malformed report told apart from a forged one.
REASONS = ("forged", "malformed", "replayed", "out-of-sequence", "unknown-device", "unjudgeable")


def rejection_reason(kind: str, detail: str) -> str:
    if kind == "forged" and detail.startswith("malformed"):
        return "malformed"
    return kind if kind in REASONS else "other"


def _with_reasons(store: Store, chunk: Chunk) -> Answer:
    """:func:`ingest` of one chunk, its rejections by reason added as ``rejected:REASON``; then,
    if asked, what the store now holds of the chunk's enrolled devices (for their receipts)."""
    keys, messages, window, receipts = chunk
    reasons: dict[str, int] = {}
    counts = ingest(store, keys, messages, window, reasons=reasons)
    marks = store.committed(keys, window) if receipts and keys else {}
    return counts | {f"rejected:{k}": n for k, n in reasons.items()}, marks


def _device_of(topic_name: str) -> str:
    parts = topic_name.split("/")
    return parts[2] if len(parts) == 4 else ""


def topic_filters(group: str | None) -> list[str]:
    """The subscriptions a monitor takes: every report topic, never the command topics."""
    prefix = f"$share/{group}/" if group else ""
    return [
        f"{prefix}{TOPIC_ROOT}/+/{level}" for level in sorted({TOPIC_OF_KIND[k] for k in KINDS})
    ]


def results_filter(group: str | None) -> str:
    """The subscription for every board's signed command results."""
    prefix = f"$share/{group}/" if group else ""
    return f"{prefix}{TOPIC_ROOT}/+/{RESULTS_LEVEL}"


_RESULTS_SUFFIX = "/" + RESULTS_LEVEL


class _Helper:
    """The spawned process that runs :func:`ingest` for one monitor: it owns its own connection
    to the store and answers each chunk, in the order sent, over one pipe. No executor threads:
    the monitor's own process keeps only receiving, handing over and acknowledging."""

    def __init__(self, db: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_helper_main, args=(child, db), name="edgeward-monitor-helper", daemon=True
        )
        try:
            self._proc.start()
        except BaseException:
            self._conn.close()
            raise
        finally:
            child.close()

    def started(self, timeout: float) -> bool:
        """True once the helper has opened the store and is ready; False if it never will be."""
        try:
            if not self._conn.poll(timeout):
                return False
            ok, value = self._conn.recv()
        except (EOFError, OSError):
            return False
        if not ok:
            raise value  # the store cannot be opened: the same error the monitor would give
        return True

    def send(self, chunk: Chunk) -> None:
        try:
            self._conn.send(chunk)
        except OSError as e:
            raise EnvironmentFault(f"the monitor's helper process stopped: {e}") from e

    def answered(self, timeout: float) -> bool:
        return self._conn.poll(timeout)

    def result(self) -> Answer:
        try:
            ok, value = self._conn.recv()
        except (EOFError, OSError) as e:
            self._proc.join(1)
            raise EnvironmentFault(
                f"the monitor's helper process stopped (exit code {self._proc.exitcode})"
            ) from e
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """Let the helper finish the chunk in hand, close its store connection and exit (once)."""
        if self._conn.closed:
            return
        with contextlib.suppress(OSError):
            self._conn.send(None)
        self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()
        with contextlib.suppress(ValueError):  # closed already
            self._proc.close()


def _helper_main(conn: Any, db: str) -> None:
    # Ctrl-C reaches the whole process group: the monitor decides when to stop (it sends None),
    # so a chunk in hand is committed or rolled back whole, never cut off.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        store = open_store(db)
    except EdgeWardError as e:
        conn.send((False, e))
        return
    try:
        conn.send((True, None))
        while (chunk := conn.recv()) is not None:
            try:
                conn.send((True, _with_reasons(store, chunk)))
            except EdgeWardError as e:
                conn.send((False, e))
            except Exception as e:  # a bug, not the environment: still name it to the monitor
                conn.send((False, EnvironmentFault(f"the monitor's helper failed: {e!r}")))
    except (EOFError, OSError):
        pass  # the monitor is gone; an uncommitted chunk was never acknowledged
    finally:
        store.close()


class _InProcess:
    """The same interface as :class:`_Helper`, ingesting in the monitor's own process: used for an
    in-memory store (a helper would open a database of its own) and when no helper process can
    be started (e.g. a host program whose main module cannot be re-imported); slower, the same
    results."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._done: collections.deque[Answer | EdgeWardError] = collections.deque()

    def send(self, chunk: Chunk) -> None:
        try:
            self._done.append(_with_reasons(self._store, chunk))
        except EdgeWardError as e:
            self._done.append(e)
        except Exception as e:
            self._done.append(EnvironmentFault(f"the monitor's ingest failed: {e!r}"))

    def answered(self, timeout: float) -> bool:
        return bool(self._done)

    def result(self) -> Answer:
        r = self._done.popleft()
        if isinstance(r, EdgeWardError):
            raise r
        return r

    def close(self) -> None:
        pass


# How long a monitor waits for its helper process to import and open the store.
HELPER_START_S = 60


class Monitor:
    """Subscribe, authenticate, store. Constructing it starts its helper process; ``start`` connects;
    ``stop`` ends both. ``processed`` counts handled messages."""

    def __init__(
        self,
        home: FleetHome,
        store: Store,
        broker: Broker,
        client_id: str,
        config: MonitorConfig = DEFAULT_MONITOR,
        on_batch: Callable[[int], None] | None = None,
        on_chunk: Callable[[dict[str, int], float], None] | None = None,
        receipt_key: ReceiptSigner | None = None,
    ) -> None:
        self.home = home
        self.store = store
        self.config = config
        self._receipt_key = receipt_key
        self.receipts_sent = 0
        self._on_batch = on_batch
        # The metrics hook: each committed chunk's verdict counts (rejections as
        # ``rejected:REASON``), the receipts published for it (``receipts``) and the seconds
        # from hand-over to commit.
        self._on_chunk = on_chunk
        self._inbox: queue.SimpleQueue[tuple[str, bytes, int]] = queue.SimpleQueue()
        self.link = Link(
            broker,
            Session(
                client_id=client_id,
                clean_start=False,
                session_expiry=config.session_expiry,
                receive_maximum=config.receive_maximum,
            ),
            on_message=self._receive,
            manual_ack=True,
        )
        for f in topic_filters(config.group):
            self.link.subscribe(f)
        self.link.subscribe(results_filter(config.group))
        self._results: queue.SimpleQueue[tuple[str, bytes, int]] = queue.SimpleQueue()
        self._keys = home.device_keys()
        self._stop = threading.Event()
        self._helper = self._start_helper()
        self._thread = threading.Thread(target=self._run, name="edgeward-monitor", daemon=True)
        self._results_thread = threading.Thread(
            target=self._run_results, name="edgeward-monitor-results", daemon=True
        )
        self.processed = 0
        self.results_processed = 0
        self.error: EdgeWardError | None = None

    def _receive(self, topic_name: str, payload: bytes, mid: int) -> None:
        """paho's thread: route by topic, nothing more (results are rare, reports are not)."""
        if topic_name.endswith(_RESULTS_SUFFIX):
            self._results.put((topic_name, payload, mid))
        else:
            self._inbox.put((topic_name, payload, mid))

    def _start_helper(self) -> _Helper | _InProcess:
        """Spawn the helper process and wait until it has opened the store (about half a second;
        :meth:`stop` ends it); ingest in this process if it cannot start."""
        if self.store.spec == ":memory:":
            return _InProcess(self.store)
        try:
            helper = _Helper(self.store.spec)
        except OSError as e:
            _log.warning("monitor helper process not started (%s): ingesting in-process, slower", e)
            return _InProcess(self.store)
        try:
            started = helper.started(HELPER_START_S)
        except BaseException:
            helper.close()
            raise
        if started:
            return helper
        helper.close()
        _log.warning("monitor helper process did not start: ingesting in-process, slower")
        return _InProcess(self.store)

    def _key_lookup(self, devices: set[str]) -> Mapping[str, bytes]:
        """Enrolled keys, re-read when a chunk names a device enrolled since they were loaded
        (removing an enrolment takes effect when the monitor restarts)."""
        new = devices - self._keys.keys()
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

    def _chunk(self, batch: list[tuple[str, bytes, int]]) -> Chunk:
        """What the helper needs for one chunk: the keys of its devices, the messages, the window,
        and whether receipts are wanted."""
        wanted = {_device_of(t) for t, _, _ in batch}
        keys = self._key_lookup(wanted)
        return (
            {d: keys[d] for d in wanted if d in keys},
            [(t, p) for t, p, _ in batch],
            self.config.redelivery_window,
            self._receipt_key is not None,
        )

    def _send_receipts(self, marks: dict[str, tuple[int, list[int]]]) -> int:
        """Sign and publish (retained) one receipt per board of a committed chunk; how many."""
        key = self._receipt_key
        if key is None or not marks:
            return 0
        sent = self.receipts_sent
        now = utcnow()
        for device, (top, seqs) in sorted(marks.items()):
            public = self._keys.get(device)
            if public is None:
                continue
            r = Receipt.of_seqs(device, fingerprint(public), top, self.config.redelivery_window, seqs, now)
            self.link.publish(receipt_topic(device), encode_receipt(r, key, key.public_raw), retain=True)
            self.receipts_sent += 1
        return self.receipts_sent - sent

    def _run(self) -> None:
        """Hand chunks to the helper in arrival order and acknowledge each chunk to the broker
        once the helper has committed it, oldest first. While the helper is busy, the next chunk
        goes to it only when full; otherwise it grows until the helper answers (bigger chunks:
        fewer commits, fewer signature checks). On stop, take nothing more but acknowledge every
        chunk already handed over: committed and not acknowledged, it would come back."""
        helper = self._helper
        sent: collections.deque[list[int]] = collections.deque()  # message ids, oldest first
        handed: collections.deque[float] = collections.deque()  # when each was handed over
        try:
            while sent or not self._stop.is_set():
                batch = []
                if not self._stop.is_set() and len(sent) < IN_FLIGHT:
                    if not sent:
                        batch = self._take(self.config.batch, 0.1)
                    elif self._inbox.qsize() >= self.config.batch:
                        batch = self._take(self.config.batch, 0.0)
                    if batch:
                        helper.send(self._chunk(batch))
                        sent.append([mid for _, _, mid in batch])
                        handed.append(time.monotonic())
                if sent and helper.answered(0.0 if batch else FILL_S):
                    counts, marks = helper.result()
                    mids = sent.popleft()
                    receipts = self._send_receipts(marks)
                    if self._on_chunk is not None:
                        self._on_chunk(counts | {"receipts": receipts}, time.monotonic() - handed.popleft())
                    else:
                        handed.popleft()
                    for mid in mids:
                        self.link.ack(mid)
                    self.processed += len(mids)
                    if self._on_batch is not None:
                        self._on_batch(self.processed)
        except EdgeWardError as e:
            # Not acknowledged: the broker delivers the chunk again to the next monitor run.
            self.error = e
            self._stop.set()
        except Exception as e:
            self.error = EnvironmentFault(f"the monitor stopped on an unexpected error: {e!r}")
            self._stop.set()

    def _run_results(self) -> None:
        """Verify and record each command result, flag what does not verify, acknowledge. A
        result the ledger cannot take now (its file is locked or unwritable) is left
        unacknowledged: the broker delivers it again on the next connection."""
        from .commands import CommandLedger

        ledger: CommandLedger | None = None
        try:
            while not self._stop.is_set():
                try:
                    topic_name, payload, mid = self._results.get(timeout=0.1)
                except queue.Empty:
                    continue
                try:
                    if ledger is None:
                        ledger = CommandLedger(self.home)
                    self._record_result(ledger, topic_name, payload)
                except EnvironmentFault as e:
                    _log.warning("command result on %s not recorded now (%s); the broker keeps it", topic_name, e)
                    continue
                except Exception as e:  # a bug must not stop the monitor: say so, keep going
                    _log.exception("command result on %s could not be handled", topic_name)
                    v = unjudgeable(topic_name, sha256_hex(payload), "command result", e)
                    try:
                        self._flag_result(topic_name, v.device_id, v.digest, v.kind, v.severity, v.detail)
                    except EdgeWardError:
                        continue
                self.link.ack(mid)
                self.results_processed += 1
        finally:
            if ledger is not None:
                ledger.close()

    def _record_result(self, ledger: Any, topic_name: str, payload: bytes) -> None:
        d = sha256_hex(payload)
        try:
            device, _ = split_topic(topic_name)
        except EdgeWardError as e:
            self._flag_result(topic_name, None, d, "forged", "critical", f"command result: {e}")
            return
        key = self._key_lookup({device}).get(device)
        if key is None:
            self._flag_result(topic_name, device, d, "unknown-device", "critical",
                              f"command result from unenrolled device {device}")
            return
        try:
            r = ledger.record_result(payload, key, device_id=device, source="mqtt")
        except BadSignature as e:
            self._flag_result(topic_name, device, d, "forged", "critical", f"command result: {e}")
        except SecurityRefusal as e:  # signed by the board, but not an answer the fleet can accept
            self._flag_result(topic_name, device, d, "unexpected-result", "critical", f"command result: {e}")
        except EdgeWardError as e:
            if isinstance(e, EnvironmentFault):
                raise
            self._flag_result(topic_name, device, d, "forged", "critical", f"malformed command result: {e}")
        else:
            if r.kind == "update":
                self._advance_rollouts(ledger, device)

    def _advance_rollouts(self, ledger: Any, device: str) -> None:
        """Record the board's answer in the rollouts it is part of, and halt one that reached its
        failure limit (fleet/rollout.py); signing the next stage is 'fleet deploy --resume''s."""
        from . import rollout

        try:
            rollout.sync(self.store, ledger, utcnow(), device_id=device)
        except EdgeWardError as e:  # the result is recorded in the ledger; --resume syncs again
            _log.warning("rollouts not updated for %s's result: %s", device, e)

    def _flag_result(self, topic_name: str, device: str | None, digest: str, kind: str, severity: str,
                     detail: str) -> None:
        with self.store.batch(utcnow()) as tx:
            tx.flag(kind, severity, detail, topic_name, device, None, digest)

    def start(self) -> None:
        self.link.start()
        self._thread.start()
        self._results_thread.start()

    def stop(self) -> None:
        """Stop receiving, let the helper finish the chunk in hand, disconnect; call it even when
        :meth:`start` failed or was never called (it ends the helper process)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._results_thread.is_alive():
            self._results_thread.join()
        self.link.stop()
        self._helper.close()
