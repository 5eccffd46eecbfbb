"""End-to-end receipts (docs/telemetry.md, "Receipts"): the EWRCP1 format, the board's refusals,
and a real board, a real mosquitto and a real monitor store showing that a report leaves the
board's outbox only once the fleet has committed it -- also when the broker is SIGKILLed mid-burst
under a shared subscription, which loses what it had acknowledged."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent import crypto
from device_agent.agent import Agent
from device_agent.bundle.keyfiles import load_public_key_file
from device_agent.commands.format import COMMAND_DOMAIN, results_topic
from device_agent.config import DEFAULT_CONFIG, TelemetryConfig
from device_agent.errors import BadSignature, EdgeWardError, FormatError, UnknownPublisher, WrongDevice
from device_agent.service.events import EventStore
from device_agent.store.keys import KeySource
from device_agent.telemetry.outbox import INFO_EVENT, SECURITY_EVENT, Item, Outbox
from device_agent.telemetry.receipt import (
    RECEIPT_DOMAIN,
    RECEIPT_MAGIC,
    Receipt,
    encode_receipt,
    receipt_topic,
    verify_receipt,
)
from device_agent.telemetry.report import MAX_SEQ
from device_agent.telemetry.service import TelemetryService
from device_agent.wire import canonical_json
from fleet.broker import acl_text
from fleet.monitor import DEFAULT_MONITOR, Monitor, MonitorConfig
from fleet.store import MonitorStore, Store
from packager.signers import FileSigner
from tests.conftest import Board
from tests.fixtures.fleet import Fleet, fleet_fixture, wait_until  # noqa: F401
from tests.fixtures.postgres import make_store_fixture, pg_cluster_fixture, pg_url_fixture  # noqa: F401

RECEIPT_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
RECEIPT_PUB = crypto.ed25519_public_raw(RECEIPT_KEY)
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(2, 34)))
NOW = datetime(2027, 1, 1, tzinfo=UTC)
IDENTITY = crypto.fingerprint(bytes(32))


def _receipt(**kw: object) -> Receipt:
    args: dict[str, object] = {
        "device_id": "pi-1", "identity": IDENTITY, "top": 40, "floor": 1,
        "ranges": ((1, 3), (5, 40)), "time": NOW,
    }
    return Receipt(**(args | kw))  # type: ignore[arg-type]


# --- the format ---------------------------------------------------------------------------------


def test_a_receipt_round_trips_and_says_what_it_covers() -> None:
    r = _receipt()
    back = verify_receipt(encode_receipt(r, RECEIPT_KEY, RECEIPT_PUB), [RECEIPT_PUB], "pi-1", IDENTITY)
    assert back == r
    assert [s for s in range(0, 43) if back.covers(s)] == [0, 1, 2, 3] + list(range(5, 41))


def test_receipt_ranges_are_made_from_stored_numbers_within_the_window_oldest_kept() -> None:
    r = Receipt.of_seqs("pi-1", IDENTITY, 20, 10, [1, 2, 11, 12, 13, 15, 18, 19, 20], NOW)
    assert (r.floor, r.ranges) == (11, ((11, 13), (15, 15), (18, 20)))
    cut = Receipt.of_seqs("pi-1", IDENTITY, 20, 10, [11, 13, 15, 17, 19], NOW, max_ranges=2)
    assert cut.ranges == ((11, 11), (13, 13))  # 17 and 19 are sent again and judged duplicates
    assert not cut.covers(17) and cut.covers(10) and cut.covers(13)
    assert Receipt.of_seqs("pi-1", IDENTITY, 0, 10, [], NOW).ranges == ()


@pytest.mark.parametrize(
    "ranges",
    [((3, 2),), ((1, 5), (6, 8)), ((5, 8), (1, 3)), ((1, 41),), ((0, 3),), ((1, 5), (4, 9))],
)
def test_ranges_out_of_order_overlapping_adjacent_or_outside_the_window_are_refused(
    ranges: tuple[tuple[int, int], ...],
) -> None:
    with pytest.raises(FormatError):
        _receipt(ranges=ranges)
    body = _receipt().body() | {"ranges": [list(r) for r in ranges]}
    data = canonical_json(body)
    payload = RECEIPT_MAGIC + crypto.key_id(RECEIPT_PUB) + crypto.sign(RECEIPT_KEY, RECEIPT_DOMAIN, data) + data
    with pytest.raises(FormatError):
        verify_receipt(payload, [RECEIPT_PUB], "pi-1", IDENTITY)


def _forgeries() -> dict[str, tuple[bytes, type[EdgeWardError]]]:
    good = encode_receipt(_receipt(), RECEIPT_KEY, RECEIPT_PUB)
    body = good[len(RECEIPT_MAGIC) + 16 + 64 :]
    altered = bytearray(good)
    altered[-3] ^= 1
    other_domain = RECEIPT_MAGIC + crypto.key_id(RECEIPT_PUB) + crypto.sign(RECEIPT_KEY, COMMAND_DOMAIN, body) + body
    n = DEFAULT_CONFIG.telemetry.max_receipt_ranges + 1  # within the byte bound: refused for its ranges
    too_many = _receipt().body() | {"ranges": [[2 * i + 1, 2 * i + 1] for i in range(n)], "top": 2 * n}
    data = canonical_json(too_many)
    return {
        "altered": (bytes(altered), BadSignature),
        "signed for another purpose": (other_domain, BadSignature),
        "another board": (encode_receipt(_receipt(device_id="pi-2"), RECEIPT_KEY, RECEIPT_PUB), WrongDevice),
        "an earlier enrolment": (
            encode_receipt(_receipt(identity=crypto.fingerprint(bytes([1]) * 32)), RECEIPT_KEY, RECEIPT_PUB),
            WrongDevice,
        ),
        "an untrusted key": (
            encode_receipt(_receipt(), OTHER_KEY, crypto.ed25519_public_raw(OTHER_KEY)), UnknownPublisher
        ),
        "a key id claiming the trusted key": (
            RECEIPT_MAGIC + crypto.key_id(RECEIPT_PUB) + crypto.sign(OTHER_KEY, RECEIPT_DOMAIN, body) + body,
            BadSignature,
        ),
        "oversized": (good + b" " * DEFAULT_CONFIG.telemetry.max_receipt_bytes, FormatError),
        "truncated": (good[:80], FormatError),
        "too many ranges": (
            RECEIPT_MAGIC + crypto.key_id(RECEIPT_PUB) + crypto.sign(RECEIPT_KEY, RECEIPT_DOMAIN, data) + data,
            FormatError,
        ),
    }


@pytest.mark.parametrize("name", sorted(_forgeries()))
def test_forged_stale_or_misdirected_receipts_are_refused_by_name(name: str) -> None:
    payload, error = _forgeries()[name]
    with pytest.raises(error):
        verify_receipt(payload, [RECEIPT_PUB], "pi-1", IDENTITY)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 400), st.booleans())
def test_receipts_from_any_bytes_are_a_value_or_a_refusal(junk: bytes, cut: int, sign: bool) -> None:
    good = encode_receipt(_receipt(), RECEIPT_KEY, RECEIPT_PUB)
    body = good[len(RECEIPT_MAGIC) + 16 + 64 :]
    mutated = body[: cut % (len(body) + 1)] + junk
    candidates = [junk, good[:cut] + junk, RECEIPT_MAGIC + junk]
    if sign:  # reach the parser behind the signature with a body signed by the trusted key
        candidates.append(
            RECEIPT_MAGIC + crypto.key_id(RECEIPT_PUB) + crypto.sign(RECEIPT_KEY, RECEIPT_DOMAIN, mutated) + mutated
        )
    for payload in candidates:
        with contextlib.suppress(EdgeWardError):
            r = verify_receipt(payload, [RECEIPT_PUB], "pi-1", IDENTITY)
            assert r.device_id == "pi-1" and r.identity == IDENTITY


def test_the_board_keeps_fewer_reports_without_a_receipt_than_the_monitor_judges_as_redelivered() -> None:
    assert DEFAULT_CONFIG.telemetry.max_unreceipted < DEFAULT_MONITOR.redelivery_window


def test_one_receipt_covers_the_monitors_whole_window_whatever_the_gaps() -> None:
    """Every other number a gap (a command result, a will's reserved number), at the largest
    sequence numbers the format allows: the receipt still lists every stored number of the
    window and fits the board's byte and range bounds."""
    window = DEFAULT_MONITOR.redelivery_window
    for top in (window, 2 * window + 1, MAX_SEQ):
        stored = range(top, max(0, top - window), -2)
        r = Receipt.of_seqs("pi-1", IDENTITY, top, window, stored, NOW)
        assert all(r.covers(s) for s in stored)
        back = verify_receipt(encode_receipt(r, RECEIPT_KEY, RECEIPT_PUB), [RECEIPT_PUB], "pi-1", IDENTITY)
        assert back == r and len(r.ranges) == len(stored)


def _board_and_monitor_rounds(tmp_path: Path, max_ranges: int) -> tuple[int, int, int]:
    """A board's real outbox whose first 600 numbers alternate report and command result (the
    results leave on the broker's acknowledgement and are never stored as reports), then 800
    reports; a monitor that stores every report it is sent and answers with a receipt of the
    service's making. Returns (reports stored, still queued, never sent) after 6 rounds."""
    dev = "pi-1"
    cfg = DEFAULT_CONFIG.telemetry
    box = Outbox(tmp_path / f"outbox-{max_ranges}.db", 100_000)
    results = results_topic(dev)

    def report(seq: int, prev: bytes) -> tuple[str, bytes]:
        return f"edgeward/v1/{dev}/events", b"report"

    def result(seq: int, prev: bytes) -> tuple[str, bytes]:
        return results, b"result"

    kinds = [k for _ in range(300) for k in ("r", "c")] + ["r"] * 800
    seqs = {box.add([Item(INFO_EVENT, report) if k == "r" else Item(SECURITY_EVENT, result, chained=False)])[0]: k
            for k in kinds}
    stored: set[int] = set()
    sent_through = 0
    try:
        for _ in range(6):
            oldest = box.oldest()
            if oldest is None:
                break
            sendable = [p.seq for p in box.pending(sent_through, 10_000, oldest + cfg.max_unreceipted)]
            sent_through = max([sent_through, *sendable])
            box.acked([s for s in sendable if seqs[s] == "c"], only_topic=results)
            stored |= {s for s in sendable if seqs[s] == "r"}
            receipt = Receipt.of_seqs(dev, IDENTITY, max(stored), DEFAULT_MONITOR.redelivery_window, stored, NOW,
                                      max_ranges=max_ranges)
            box.receipted(receipt, sent_through, results)
        return len(stored), box.stats()["queued"], len([s for s, k in seqs.items() if k == "r" and s > sent_through])
    finally:
        box.close()


@pytest.mark.parametrize("max_ranges", [DEFAULT_CONFIG.telemetry.max_receipt_ranges, 256])
def test_more_gaps_than_a_receipt_lists_ranges_never_stop_a_boards_telemetry(tmp_path: Path, max_ranges: int) -> None:
    """300 command results interleaved with the first reports: more than 256 gaps in the window.
    With every range listed (the default bound), and also with a receipt cut to 256 ranges (the
    oldest kept), the board's oldest reports are covered, its span moves on and every report is
    stored and released."""
    assert _board_and_monitor_rounds(tmp_path, max_ranges) == (1100, 0, 0)


def test_boards_read_only_their_own_receipts_and_only_operators_write_them() -> None:
    acl = acl_text(["ops"])
    assert "pattern read edgeward/v1/%u/receipt" in acl
    assert "pattern write edgeward/v1/%u/receipt" not in acl
    assert "user ops\ntopic read edgeward/v1/#\ntopic write edgeward/v1/+/commands\n" \
           "topic write edgeward/v1/+/receipt" in acl


# --- a real board --------------------------------------------------------------------------------


def receipt_board(tmp_path: Path, publisher: Path, keys: KeySource, device_id: str = "pi-001",
                  receipts: list[bytes] | None = None) -> Board:
    """A board whose trust anchors hold the receipt key (provision --receipt-pub)."""
    d = tmp_path / f"board-{device_id}"
    enrolment = tmp_path / f"{device_id}.json"
    pub = load_public_key_file(publisher / "publisher.pub")
    enrolment.write_bytes(Agent.provision(d, device_id, [pub], [], keys,
                                          receipts=[RECEIPT_PUB] if receipts is None else receipts))
    return Board(d, enrolment, device_id, keys)


FAST = TelemetryConfig(heartbeat_s=1, poll_s=0.05, backoff=(1, 2), receipt_timeout_s=1.0, receipt_backoff_max_s=2.0)


@contextlib.contextmanager
def telemetry(
    board: Board, fleet: Fleet, config: TelemetryConfig = FAST
) -> Iterator[tuple[TelemetryService, EventStore]]:
    events = EventStore(board.data_dir / "events.db")
    svc = TelemetryService(board.data_dir, board.keys, events, fleet.enrol(board.enrolment), config=config)
    svc.start()
    try:
        yield svc, events
    finally:
        svc.stop()
        events.close()


@contextlib.contextmanager
def monitor(fleet: Fleet, store: MonitorStore, client_id: str, group: str | None = "receipts",
            key: Ed25519PrivateKey | None = RECEIPT_KEY) -> Iterator[Monitor]:
    mon = Monitor(fleet.home, store, fleet.operator, client_id, MonitorConfig(group=group),
                  receipt_key=FileSigner(key) if key is not None else None)
    mon.start()
    try:
        mon.link.require_connected(10)
        yield mon
    finally:
        mon.stop()


def record(events: EventStore, numbers: range) -> None:
    for i in numbers:
        events.record("extraction", datetime.now(UTC), severity="warning", evidence={"i": i})


def event_numbers(db: Path, device_id: str) -> list[int]:
    """Every stored board event's number, one per stored report (a number twice: stored twice)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(
            "SELECT data FROM reports WHERE device_id = ? AND kind = 'events'", (device_id,)
        ).fetchall()
    return sorted(json.loads(d)["event"]["evidence"]["i"] for (d,) in rows)


def security_events(db: Path) -> list[tuple[str, str]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT kind, detail FROM security").fetchall()


def test_refused_receipts_change_nothing_and_a_genuine_one_clears_what_it_covers(
    fleet: Fleet, tmp_path: Path, publisher: Path, keys: KeySource
) -> None:
    board = receipt_board(tmp_path, publisher, keys)
    identity = crypto.fingerprint(board.agent().store.identity().sign_public)
    # Not started: the outbox is filled and judged here, nothing leaves for the broker.
    events = EventStore(board.data_dir / "events.db")
    svc = TelemetryService(board.data_dir, board.keys, events, fleet.enrol(board.enrolment), config=FAST)
    try:
        record(events, range(5))
        svc._forward_events()
        svc._sent_through = 6
        before = [p.seq for p in svc.outbox.pending(0, 100)]
        assert before == [2, 3, 4, 5, 6]  # 1 is the last will's, reserved when the link was made
        good = Receipt("pi-001", identity, 5, 1, ((2, 3), (5, 5)), NOW)
        forged = bytearray(encode_receipt(good, RECEIPT_KEY, RECEIPT_PUB))
        forged[-3] ^= 1
        refused = [
            bytes(forged),
            encode_receipt(good, OTHER_KEY, crypto.ed25519_public_raw(OTHER_KEY)),
            encode_receipt(replace(good, device_id="pi-002"), RECEIPT_KEY, RECEIPT_PUB),
            encode_receipt(replace(good, identity=IDENTITY), RECEIPT_KEY, RECEIPT_PUB),
            b"EWRCP1" + b"\xff" * 100,
        ]
        for payload in refused:
            assert svc.apply_receipt(payload) is False
        assert [p.seq for p in svc.outbox.pending(0, 100)] == before
        assert svc.receipts["refused"] == len(refused) and svc.receipts["applied"] == 0
        assert svc.apply_receipt(encode_receipt(good, RECEIPT_KEY, RECEIPT_PUB))
        assert [p.seq for p in svc.outbox.pending(0, 100)] == [4, 6]
        # Below the floor: the monitor no longer judges it new, so it leaves (counted as released).
        assert svc.apply_receipt(encode_receipt(Receipt("pi-001", identity, 9, 5, ((6, 9),), NOW),
                                                RECEIPT_KEY, RECEIPT_PUB))
        assert svc.outbox.pending(0, 100) == [] and svc.outbox.stats()["released"] == 1
    finally:
        svc.link.stop()
        svc.outbox.close()
        events.close()


def test_reports_leave_the_outbox_only_once_a_receipt_covers_them(
    fleet: Fleet, tmp_path: Path, publisher: Path, keys: KeySource
) -> None:
    """With no monitor, the broker acknowledges every report and the board keeps them all; a
    monitor then stores them (its persistent session was queued at the broker) and its receipt
    empties the outbox. Each report is stored once."""
    board = receipt_board(tmp_path, publisher, keys)
    store = MonitorStore(tmp_path / "monitor.db")
    with monitor(fleet, store, "mon-r1", group=None):
        pass  # the session exists: the broker queues reports for it while it is away
    slow = replace(FAST, receipt_timeout_s=600.0, receipt_backoff_max_s=600.0)
    with telemetry(board, fleet, slow) as (svc, events):
        record(events, range(50))
        wait_until(lambda: len(svc._resend) >= 50, 30, "the broker to acknowledge the events")
        assert svc.outbox.stats()["queued"] >= 50  # acknowledged by the broker, still kept
        with monitor(fleet, store, "mon-r1", group=None) as mon:
            wait_until(lambda: event_numbers(store.path, "pi-001") == list(range(50)), 30, "the events stored")
            wait_until(lambda: svc.outbox.stats()["queued"] < 3, 30, "receipts to clear the outbox")
            assert svc.receipts["applied"] >= 1 and svc.receipts["resent"] == 0
            assert mon.receipts_sent >= 1
    assert event_numbers(store.path, "pi-001") == list(range(50))
    assert security_events(store.path) == []
    store.close()


def test_reports_the_broker_dropped_are_sent_again_after_the_timeout_and_stored_once(
    fleet: Fleet, tmp_path: Path, publisher: Path, keys: KeySource
) -> None:
    """No monitor subscribed (a shared group has no session at the broker): the broker
    acknowledges and drops every report. The board sends them again after its timeout, once a
    monitor is there: every event stored exactly once."""
    board = receipt_board(tmp_path, publisher, keys)
    store = MonitorStore(tmp_path / "monitor.db")
    with telemetry(board, fleet) as (svc, events):
        record(events, range(40))
        wait_until(lambda: len(svc._resend) >= 40, 30, "the broker to acknowledge the events")
        with monitor(fleet, store, "mon-r2"):
            wait_until(lambda: event_numbers(store.path, "pi-001") == list(range(40)), 30, "the events resent")
            wait_until(lambda: svc.outbox.stats()["queued"] < 3, 30, "receipts to clear the outbox")
        assert svc.receipts["resent"] >= 40
    assert event_numbers(store.path, "pi-001") == list(range(40))
    assert security_events(store.path) == []
    store.close()


def test_a_board_without_a_receipt_key_drains_on_the_brokers_acknowledgement(
    fleet: Fleet, tmp_path: Path, publisher: Path, keys: KeySource
) -> None:
    board = receipt_board(tmp_path, publisher, keys, receipts=[])
    with telemetry(board, fleet) as (svc, events):
        record(events, range(10))
        assert svc.flush(30)  # no monitor at all: the broker's acknowledgement is enough
        assert svc.receipts == {"applied": 0, "refused": 0, "resent": 0}


BURST = 1000


def test_broker_sigkilled_mid_burst_under_a_shared_subscription_every_report_stored_exactly_once(
    fleet: Fleet, tmp_path: Path, publisher: Path, keys: KeySource
) -> None:
    """``edgeward fleet monitor --group --receipt-key`` stores a board's burst. The monitor is
    paused (SIGSTOP) so that the broker holds reports it has acknowledged to the board and not
    yet delivered; then mosquitto is SIGKILLed (no clean stop, no autosave: mosquitto 2.0 keeps no
    shared-subscription queue anyway) and restarted on the same port with the same config and
    persistence, and the monitor resumes. The board sends again what no receipt covers: every
    event is stored exactly once and nothing is flagged."""
    from benchmarks.fleet_scale import MonitorProc
    from packager.keys import generate

    key_dir = tmp_path / "receipt-key"
    key_dir.mkdir()
    files = generate("receipt", key_dir, unencrypted=True)
    board = receipt_board(tmp_path, publisher, keys, receipts=[load_public_key_file(files.public)])
    db = tmp_path / "monitor.db"
    mon = MonitorProc(fleet.home, fleet.port, str(db), "mon-fault", "fault", ("--receipt-key", str(files.private)))
    paused = False
    try:
        with telemetry(board, fleet) as (svc, events):
            record(events, range(0, 200))
            wait_until(lambda: len(event_numbers(db, "pi-001")) >= 100, 60, "part of the burst stored")
            mon.proc.send_signal(signal.SIGSTOP)
            paused = True
            record(events, range(200, 500))
            # The broker has acknowledged these to the board and holds them for the paused monitor.
            wait_until(lambda: svc.outbox.pending(0, 1)[0].seq in svc._resend and len(svc._resend) >= 300, 60,
                       "the broker to acknowledge the reports")
            assert fleet.proc is not None
            fleet.proc.send_signal(signal.SIGKILL)
            fleet.proc.wait(10)
            fleet.proc = None
            fleet.start()
            mon.proc.send_signal(signal.SIGCONT)
            paused = False
            record(events, range(500, BURST))
            wait_until(lambda: len(set(event_numbers(db, "pi-001"))) >= BURST, 120, f"{BURST} events")
            wait_until(lambda: svc.outbox.stats()["queued"] < 3, 60, "receipts to clear the outbox")
            assert svc.receipts["resent"] > 0  # what the killed broker had acknowledged came again
            assert mon.proc.poll() is None
    finally:
        if paused:
            mon.proc.send_signal(signal.SIGCONT)
        mon.stop()
    assert event_numbers(db, "pi-001") == list(range(BURST))  # none lost, none stored twice
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute(
            "SELECT COUNT(*) FROM (SELECT device_id, seq FROM reports GROUP BY device_id, seq HAVING COUNT(*) > 1)"
        ).fetchone() == (0,)
    assert security_events(db) == []


def test_the_monitor_publishes_receipts_retained_for_a_board_that_connects_later(
    fleet: Fleet, tmp_path: Path, publisher: Path, keys: KeySource
) -> None:
    """A receipt is retained: a board that connects later still gets it."""
    board = receipt_board(tmp_path, publisher, keys)
    store = MonitorStore(tmp_path / "monitor.db")
    with monitor(fleet, store, "mon-r3"), telemetry(board, fleet) as (svc, events):
        record(events, range(5))
        wait_until(lambda: svc.outbox.stats()["queued"] < 3 and svc.receipts["applied"] > 0, 30, "a receipt")
    got: list[bytes] = []
    from device_agent.telemetry.mqtt import Link, Session

    link = Link(fleet.broker("pi-001"), Session(client_id="pi-001-reader"),
                on_message=lambda _t, p, _m: got.append(p))
    link.subscribe(receipt_topic("pi-001"))
    link.start()
    try:
        wait_until(lambda: bool(got), 10, "the retained receipt")
    finally:
        link.stop()
    identity = crypto.fingerprint(board.agent().store.identity().sign_public)
    r = verify_receipt(got[-1], [RECEIPT_PUB], "pi-001", identity)
    assert r.top >= 5 and r.covers(2)
    store.close()


def test_a_board_with_300_command_results_among_its_reports_drains_through_a_real_monitor(
    fleet: Fleet, tmp_path: Path, publisher: Path, keys: KeySource
) -> None:
    """A real board, mosquitto and monitors: 300 signed command results interleaved with the
    board's first 300 events (each result takes an outbox number the monitor never stores as a
    report: more than 256 gaps), then 800 more events. A monitor without the receipt key stores
    what the board sends first (the board keeps it all: no receipt); then a monitor with the key
    takes over, and its first receipts speak for a window with more than 256 ranges. Every event
    is stored exactly once and receipts clear the whole outbox. With the newest 256 ranges kept,
    the board's oldest events were never covered and it stopped sending after 1,000 numbers."""
    from device_agent.commands.format import Result, encode_result

    board = receipt_board(tmp_path, publisher, keys)
    db = tmp_path / "monitor.db"
    store = MonitorStore(db)
    events = EventStore(board.data_dir / "events.db")
    svc = TelemetryService(board.data_dir, board.keys, events, fleet.enrol(board.enrolment), config=FAST)

    def result(seq: int, _prev: bytes) -> tuple[str, bytes]:
        r = Result("pi-001", seq, "rotate-key", "0" * 64, "refused", "a gap", datetime.now(UTC))
        return results_topic("pi-001"), encode_result(r, svc._signer)

    started = False
    try:
        for i in range(300):  # not started yet: the outbox is filled in this order
            record(events, range(i, i + 1))
            svc._forward_events()
            svc.outbox.add([Item(SECURITY_EVENT, result, chained=False)])
        record(events, range(300, 1100))
        with monitor(fleet, store, "mon-nokey", key=None):
            svc.start()
            started = True
            wait_until(lambda: set(range(300)) <= set(event_numbers(db, "pi-001")), 60, "the interleaved events")
        assert svc.outbox.oldest() == 2  # nothing receipted yet: the first event is still held
        with monitor(fleet, store, "mon-gaps"):
            wait_until(lambda: len(set(event_numbers(db, "pi-001"))) >= 1100, 90, "all 1,100 events stored")
            wait_until(lambda: svc.outbox.stats()["queued"] < 3, 60, "receipts to clear the outbox")
    finally:
        if started:
            svc.stop()
        else:
            svc.link.stop()
            svc.outbox.close()
        events.close()
        store.close()
    assert event_numbers(db, "pi-001") == list(range(1100))


def test_fleet_status_and_metrics_show_reports_waiting_for_a_receipt_and_the_receipts_sent(
    fleet: Fleet, tmp_path: Path, publisher: Path, keys: KeySource, capsys: pytest.CaptureFixture[str]
) -> None:
    """No monitor at first: the broker takes the board's reports and no receipt comes; the board's
    telemetry counts them as unreceipted (and queued). A monitor then stores that telemetry,
    `fleet status` shows it, the board counts the receipts it verified, and the monitor's
    /metrics counter of receipts sent matches what it published."""
    from fleet.metrics import MonitorMetrics
    from packager.cli import main as edgeward

    board = receipt_board(tmp_path, publisher, keys)
    config = replace(FAST, receipt_timeout_s=600.0, receipt_backoff_max_s=600.0)
    store = MonitorStore(fleet.home.monitor_db)
    metrics = MonitorMetrics("mon-status")
    with telemetry(board, fleet, config) as (svc, events):
        record(events, range(5))
        wait_until(lambda: len(svc._resend) >= 5, 30, "the broker to take the reports")
        held = svc.outbox_figures()
        assert held["unreceipted"] >= 5 and held["queued"] >= held["unreceipted"]
        assert held["receipts_verified"] == 0 and held["receipts_refused"] == 0
        mon = Monitor(fleet.home, store, fleet.operator, "mon-status", MonitorConfig(group=None),
                      on_chunk=metrics.observe, receipt_key=FileSigner(RECEIPT_KEY))
        mon.start()
        try:
            mon.link.require_connected(10)

            def stored_outbox() -> dict[str, int]:
                devs = {d["device_id"]: d for d in store.devices()}
                c = devs.get("pi-001", {}).get("counters")
                box = c.get("outbox") if isinstance(c, dict) else None
                return box if isinstance(box, dict) else {}

            wait_until(lambda: stored_outbox().get("unreceipted", 0) > 0, 30, "telemetry counting unreceipted")
            wait_until(lambda: stored_outbox().get("receipts_verified", 0) > 0, 30, "telemetry counting receipts")
        finally:
            mon.stop()
        sent = mon.receipts_sent
    assert sent > 0
    assert metrics.registry.get_sample_value("edgeward_monitor_receipts_total", {"monitor": "mon-status"}) == sent
    capsys.readouterr()
    assert edgeward(["fleet", "status", "--fleet-dir", str(fleet.home.path), "--json"]) == 0
    [view] = [v for v in json.loads(capsys.readouterr().out)["devices"] if v["device_id"] == "pi-001"]
    box = view["counters"]["outbox"]
    assert {"queued", "unreceipted", "resent", "released", "receipts_verified", "receipts_refused"} <= set(box)
    assert edgeward(["fleet", "status", "--fleet-dir", str(fleet.home.path)]) == 0
    assert f"{box['queued']} queued, {box['unreceipted']} unreceipted, {box['receipts_refused']} receipts refused" \
        in capsys.readouterr().out
    store.close()


# --- what a receipt is made from, and how its key is rotated --------------------------------------


@pytest.mark.parametrize("make_store", ["sqlite", "postgresql"], indirect=True)
def test_receipts_are_read_from_the_store_also_for_a_batch_of_duplicates(make_store: Callable[[], Store]) -> None:
    """Both engines: the committed numbers come from a store query after the commit; a chunk
    that was all duplicates (a board sending again) still yields what the store holds."""
    from fleet.monitor import _with_reasons
    from tests.test_fleet_store import KEY, KEYS, chain

    store = make_store()
    msgs = [m for i, m in enumerate(chain(6)) if i != 2]  # number 3 never arrived: a gap
    counts, marks = _with_reasons(store, (KEYS, msgs, 1080, True))
    assert counts["accepted"] == 5 and marks == {"pi-1": (6, [1, 2, 4, 5, 6])}
    counts, again = _with_reasons(make_store(), (KEYS, msgs, 1080, True))  # another monitor, all duplicates
    assert counts["duplicate"] == 5 and again == marks
    identity = crypto.fingerprint(crypto.ed25519_public_raw(KEY))
    assert Receipt.of_seqs("pi-1", identity, 6, 1080, marks["pi-1"][1], NOW).ranges == ((1, 2), (4, 6))
    assert _with_reasons(store, (KEYS, msgs, 1080, False))[1] == {}  # no receipt key: no query


def test_an_operator_rotates_the_receipt_keys_and_the_running_service_reads_them(
    fleet: Fleet, tmp_path: Path, publisher: Path, keys: KeySource
) -> None:
    import base64

    from tests.fixtures.trusted import Clock, Operator

    op = Operator()
    d = tmp_path / "board-pi-rot"
    enrolment = tmp_path / "pi-rot.json"
    enrolment.write_bytes(Agent.provision(d, "pi-rot", [load_public_key_file(publisher / "publisher.pub")],
                                          [op.public], keys, receipts=[RECEIPT_PUB]))
    events = EventStore(d / "events.db")
    svc = TelemetryService(d, keys, events, fleet.enrol(enrolment), config=FAST)
    try:
        assert svc._receipt_keys() == (RECEIPT_PUB,)
        new = crypto.ed25519_public_raw(OTHER_KEY)
        Agent(d, keys, clock=Clock()).apply_commands(
            op.sign("rotate-key", "pi-rot", 1, role="receipt", keys=[base64.b64encode(new).decode()])
        )
        assert Agent(d, keys).trust_anchors().receipts == (new,)
        assert svc._receipt_keys() == (new,)
        identity = crypto.fingerprint(Agent(d, keys).store.identity().sign_public)
        old = encode_receipt(Receipt("pi-rot", identity, 0, 1, (), NOW), RECEIPT_KEY, RECEIPT_PUB)
        assert svc.apply_receipt(old) is False  # the rotated-out key clears nothing
        assert svc.apply_receipt(encode_receipt(Receipt("pi-rot", identity, 0, 1, (), NOW), OTHER_KEY, new))
    finally:
        svc.link.stop()
        svc.outbox.close()
        events.close()


def test_no_more_numbers_than_the_bound_are_out_without_a_receipt(
    fleet: Fleet, tmp_path: Path, publisher: Path, keys: KeySource
) -> None:
    """No monitor: the broker acknowledges, no receipt comes. The board hands over numbers only
    up to max_unreceipted past the oldest it keeps; the rest wait in the outbox."""
    board = receipt_board(tmp_path, publisher, keys)
    config = replace(FAST, max_unreceipted=10, receipt_timeout_s=600.0, receipt_backoff_max_s=600.0)
    with telemetry(board, fleet, config) as (svc, events):
        record(events, range(30))
        wait_until(lambda: len(svc._resend) >= 9, 30, "the first reports acknowledged")
        oldest = svc.outbox.oldest()
        assert oldest is not None
        wait_until(lambda: svc._sent_through == oldest + 9, 30, "the span to fill")
        wait_until(lambda: svc.outbox.stats()["queued"] >= 30, 30, "every event in the outbox")
        assert svc.outbox.oldest() == oldest  # nothing left the outbox without a receipt
        assert max(svc._resend) < oldest + 10 and svc._sent_through < oldest + 10


def test_edgeward_keys_receipt_and_provision_receipt_pub_put_the_key_in_the_boards_anchors(
    tmp_path: Path, publisher: Path, keys: KeySource, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from device_agent.cli import main as agent_main
    from packager.cli import main as host_main

    assert host_main(["keys", "receipt", "--out", str(tmp_path / "k"), "--insecure-unencrypted-key"]) == 0
    pub = tmp_path / "k" / "receipt.pub"
    assert (tmp_path / "k" / "receipt.key").stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("EDGEWARD_DEVICE_PASSPHRASE", keys.passphrase.decode() if keys.passphrase else "")
    code = agent_main(["provision", "--data-dir", str(tmp_path / "b"), "--device-id", "pi-cli",
                       "--publisher-pub", str(publisher / "publisher.pub"), "--receipt-pub", str(pub),
                       "--export", str(tmp_path / "pi-cli.json")])
    capsys.readouterr()
    assert code == 0
    assert Agent(tmp_path / "b", keys).trust_anchors().receipts == (load_public_key_file(pub),)
    # edgeward-agent status names the receipt key (text and --json); a board without one says so.
    fpr = crypto.fingerprint(load_public_key_file(pub))
    assert agent_main(["status", "--data-dir", str(tmp_path / "b"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["receipt_keys"] == [fpr]
    assert agent_main(["status", "--data-dir", str(tmp_path / "b")]) == 0
    assert f"receipt key {fpr}" in capsys.readouterr().out
    assert agent_main(["provision", "--data-dir", str(tmp_path / "c"), "--device-id", "pi-none",
                       "--publisher-pub", str(publisher / "publisher.pub"),
                       "--export", str(tmp_path / "pi-none.json")]) == 0
    capsys.readouterr()
    assert agent_main(["status", "--data-dir", str(tmp_path / "c")]) == 0
    assert "receipt key none" in capsys.readouterr().out


def test_a_report_the_broker_refuses_leaves_the_outbox_also_when_receipts_are_awaited(
    fleet: Fleet, tmp_path: Path, publisher: Path, keys: KeySource
) -> None:
    """Resending what the broker refuses (not authorised) cannot help: it is deleted and counted,
    as without receipts, and does not hold the span of unreceipted numbers."""
    board = receipt_board(tmp_path, publisher, keys)
    other = receipt_board(tmp_path, publisher, keys, device_id="pi-002")
    fleet.enrol(board.enrolment)
    wrong = fleet.enrol(other.enrolment)  # pi-001's reports over pi-002's certificate: the ACL refuses
    events = EventStore(board.data_dir / "events.db")
    svc = TelemetryService(board.data_dir, board.keys, events, wrong, config=FAST)
    svc.start()
    try:
        record(events, range(5))
        wait_until(lambda: svc.rejected >= 5, 30, "the broker to refuse the reports")
        assert svc.flush(30)
        assert svc._resend == {}
    finally:
        svc.stop()
        events.close()
