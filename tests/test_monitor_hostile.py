"""A compromised but enrolled board signs hostile reports, command results and last wills: the
monitor flags each as a security event about that board, acknowledges it and goes on storing
every other board's reports -- also after a restart, with the poison retained or still queued.

The pure part feeds :func:`fleet.monitor.ingest` (a real SQLite store); the broker part runs a
real mosquitto with real provisioned boards."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from device_agent.commands.format import results_topic
from device_agent.crypto import ed25519_public_raw
from device_agent.errors import FormatError
from device_agent.telemetry.mqtt import Link, Session
from device_agent.telemetry.report import Report, encode_report, topic
from device_agent.wire import loads_json
from fleet.monitor import Monitor, MonitorConfig, ingest
from fleet.store import MonitorStore
from packager.cli import main as edgeward
from tests.conftest import Board
from tests.fixtures.fleet import Fleet, fleet_fixture, monitor_fixture, wait_until  # noqa: F401
from tests.fixtures.reports import body_text, sign_body, sign_result_body

KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
KEYS = {"pi-1": ed25519_public_raw(KEY), "pi-2": ed25519_public_raw(OTHER)}
NOW = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
EVENTS = "edgeward/v1/pi-1/events"
DEEP = "[" * 5000 + "]" * 5000
BIG = "9" * 5000

# (name, report body, what the refusal must say). Every body is validly signed by pi-1's key.
HOSTILE: list[tuple[str, bytes, str]] = [
    # time
    ("time in year 10000", body_text(time='"10000-01-01T00:00:00Z"'), "time is not an ISO 8601 time in range"),
    ("time in year 1", body_text(time='"0001-01-01T00:00:00Z"'), "time is not an ISO 8601 time in range"),
    ("time before 1970", body_text(time='"1969-12-31T23:59:59Z"'), "time is not an ISO 8601 time in range"),
    ("time negative", body_text(time="-1"), "time must be an ISO 8601 time string"),
    ("time NaN", body_text(time="NaN"), "not a finite number"),
    ("time Infinity", body_text(time="Infinity"), "not a finite number"),
    ("time -Infinity", body_text(time="-Infinity"), "not a finite number"),
    ("time 1e400", body_text(time="1e400"), "not a finite number"),
    ("time bool", body_text(time="true"), "time must be an ISO 8601 time string"),
    ("time object", body_text(time='{"t":1}'), "time must be an ISO 8601 time string"),
    ("time without zone", body_text(time='"2026-11-22T08:00:00"'), "has no time zone"),
    # seq
    ("seq bool", body_text(seq="true"), "seq must be an integer"),
    ("seq string", body_text(seq='"1"'), "seq must be an integer"),
    ("seq float", body_text(seq="1.0"), "seq must be an integer"),
    ("seq zero", body_text(seq="0"), "seq must be an integer"),
    ("seq 2**53", body_text(seq=str(2**53)), "seq must be an integer"),
    ("seq 5000 digits", body_text(seq=BIG), "a number of more than"),
    ("seq -5000 digits", body_text(seq="-" + BIG), "a number of more than"),
    ("seq 5000-digit float", body_text(seq="1." + BIG), "a number of more than"),
    # the other fields, wrong types and values
    ("kind int", body_text(kind="1"), "kind must be a non-empty string"),
    ("kind unknown", body_text(kind='"x"'), "report kind must be one of"),
    ("kind off its topic", body_text(kind='"status"'), "arrived on"),
    ("device list", body_text(device='["pi-1"]'), "device_id must be a non-empty string"),
    ("device of another board", body_text(device='"pi-2"'), "arrived on"),
    ("device path", body_text(device='"../x"'), "device_id has an invalid value"),
    ("schema int", body_text(schema="1"), "schema is not"),
    ("schema other", body_text(schema='"edgeward.telemetry/2"'), "schema is not"),
    ("data list", body_text(data="[]"), "data must be an object"),
    ("data string", body_text(data='"x"'), "data must be an object"),
    # data: bombs and shapes no summary has
    ("data 5000 levels deep", body_text(data='{"x":' + DEEP + "}"), "nested more than"),
    ("data 20 levels deep", body_text(data='{"x":' + "[" * 20 + "]" * 20 + "}"), "nested too deeply"),
    ("data 5000-digit int", body_text(data=f'{{"x":{BIG}}}'), "a number of more than"),
    ("data NaN", body_text(data='{"x":NaN}'), "not a finite number"),
    ("data 1e400", body_text(data='{"x":1e400}'), "not a finite number"),
    ("data -1e400", body_text(data='{"x":-1e400}'), "not a finite number"),
    ("data huge array", body_text(data='{"x":[' + ",".join(["0"] * 5000) + "]}"), "list of 5000 items"),
    ("data huge string", body_text(data='{"x":"' + "a" * 15_000 + '"}'), "over-long string"),
    ("data long key", body_text(data='{"' + "k" * 100 + '":1}'), "keys must be short strings"),
    ("data lone surrogate", body_text(data='{"x":"\\ud800"}'), "lone surrogate"),
    ("data key lone surrogate", body_text(data='{"\\udfff":1}'), "lone surrogate"),
    ("data duplicate key", body_text(data='{"x":1,"x":2}'), "twice"),
    # the body as a whole
    ("duplicate seq", body_text(extra=',"seq":2'), "twice"),
    ("duplicate data", body_text(extra=',"data":{}'), "twice"),
    ("unknown field", body_text(extra=',"extra":1'), "unknown fields"),
    ("unknown field lone surrogate", body_text(extra=',"\\ud800":1'), "lone surrogate"),
    ("field missing", b'{"device_id":"pi-1","kind":"events","schema":"edgeward.telemetry/1","seq":1,'
     b'"time":"2026-11-22T08:00:00Z"}', "missing fields"),
    ("body 5000 levels deep", DEEP.encode(), "nested more than"),
    ("body a list", b"[1]", "must be an object"),
    ("body a number", BIG.encode(), "a number of more than"),
    ("body empty", b"", "bad magic or length"),
    ("body not UTF-8", body_text(data='{"x":"\xff"}').replace(b"\xc3\xbf", b"\xff"), "not valid UTF-8"),
    ("body trailing garbage", body_text() + b"x", "not valid UTF-8 JSON"),
]


def good(device: str, seq: int, kind: str = "status", key: Ed25519PrivateKey = OTHER) -> tuple[str, bytes]:
    r = Report(device, seq, kind, NOW, {"state": "online"})
    return r.topic, encode_report(r, key)


@pytest.mark.parametrize(("name", "body", "reason"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_a_hostile_signed_report_is_a_security_event_and_the_chunk_goes_on(
    name: str, body: bytes, reason: str
) -> None:
    store = MonitorStore(":memory:")
    before = good("pi-2", 1)
    after = good("pi-2", 2)
    counts = ingest(store, KEYS, [before, (EVENTS, sign_body(body, KEY)), after], 8)
    assert counts == {"accepted": 2, "duplicate": 0, "flagged": 1}, name
    assert [r["seq"] for r in store.reports("pi-2")] == [2, 1]
    assert store.reports("pi-1") == []
    (event,) = store.events()
    assert event["source"] == "monitor" and event["device_id"] == "pi-1" and event["kind"] == "forged"
    assert reason in event["detail"], event["detail"]
    json.dumps(store.events(), allow_nan=False)  # what `fleet events --json` prints
    store.close()


def test_payloads_that_are_not_reports_are_security_events() -> None:
    store = MonitorStore(":memory:")
    payloads = [
        sign_body(body_text(data='{"x":"' + "a" * 17_000 + '"}'), KEY),  # over 16 KiB
        b"EWT2" + bytes(96),  # no body
        b"\x00" * 200,
        sign_body(body_text(), KEY)[:-1],  # cut after signing
    ]
    counts = ingest(store, KEYS, [(EVENTS, p) for p in payloads] + [good("pi-2", 1)], 8)
    assert counts == {"accepted": 1, "duplicate": 0, "flagged": 4}
    assert {e["kind"] for e in store.events()} == {"forged"}
    store.close()


def test_messages_off_the_report_topics_are_judged_too() -> None:
    """The monitor subscribes to report topics only (never ``edgeward/v1/_time`` or a board's
    commands), but whatever reaches its judging function is judged, never raised."""
    store = MonitorStore(":memory:")
    p = sign_body(body_text(), KEY)
    names = ["edgeward/v1/_time", "edgeward/v1/_time/status", "edgeward/v1/pi-1/commands",
             "edgeward/v1/pi-\udc80/events", ""]
    counts = ingest(store, KEYS, [(n, p) for n in names] + [good("pi-2", 1)], 8)
    assert counts == {"accepted": 1, "duplicate": 0, "flagged": 5}
    assert [e["kind"] for e in store.events()] == ["forged"] * 5
    store.close()


def test_fleet_views_survive_hostile_data_a_board_signed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Well-formed reports whose data has an unexpected shape (an event that is a list, models
    that are not objects) are stored as the board sent them; ``fleet events`` and ``fleet status``
    still show every board."""
    from fleet.ca import FleetHome

    home = FleetHome(tmp_path / "fleet")
    home.init_ca(unencrypted=True)
    store = MonitorStore(home.monitor_db)
    odd = [
        (Report("pi-1", 1, "events", NOW, {"event": [1, 2]})),
        (Report("pi-1", 2, "events", NOW, {"event": "x"})),
        (Report("pi-1", 3, "status", NOW, {"state": "online", "models": [1, "m", None]})),
        (Report("pi-1", 4, "status", NOW, {"state": ["x"], "models": "m"})),
    ]
    counts = ingest(store, KEYS, [(r.topic, encode_report(r, KEY)) for r in odd] + [good("pi-2", 1)], 8)
    assert counts["accepted"] == 5
    store.close()
    fleet_dir = ["--fleet-dir", str(home.path)]
    assert edgeward(["fleet", "events", *fleet_dir, "--json"]) == 0
    events = loads_json(capsys.readouterr().out.encode(), "fleet events")
    assert [e["seq"] for e in events if e["device_id"] == "pi-1"] == [1, 2]
    assert edgeward(["fleet", "status", *fleet_dir, "--json"]) == 0
    shown = loads_json(capsys.readouterr().out.encode(), "fleet status")["devices"]
    assert {d["device_id"] for d in shown} == {"pi-1", "pi-2"}


# --- the same with a real broker ---------------------------------------------------------------

POISON: list[tuple[str, bytes]] = [
    ("seq 5000 digits", body_text(seq=BIG)),
    ("data 5000 levels deep", body_text(data='{"x":' + DEEP + "}")),
    ("data NaN", body_text(data='{"x":NaN}')),
    ("unknown field lone surrogate", body_text(extra=',"\\ud800":1')),
    ("duplicate seq", body_text(extra=',"seq":2')),
    ("time in year 1", body_text(time='"0001-01-01T00:00:00Z"')),
]


def signer_of(board: Board) -> Any:
    return board.agent().store.unlock(board.keys).signer()


def poison_for(device: str, body: bytes) -> bytes:
    return body.replace(b'"pi-1"', json.dumps(device).encode())


def publish(fleet: Fleet, cn: str, messages: list[tuple[str, bytes]], retain: bool = False,
            will: tuple[str, bytes] | None = None) -> Link:
    """Publish with ``cn``'s certificate and wait for every PUBACK; returns the connected link."""
    acks: list[bool] = []
    link = Link(fleet.broker(cn), Session(f"{cn}-raw"), on_ack=lambda _m, ok: acks.append(ok),
                will=(lambda: will) if will else None)
    link.start()
    link.require_connected(10)
    for name, payload in messages:
        link.publish(name, payload, retain=retain)
    wait_until(lambda: len(acks) == len(messages), 10, "every PUBACK")
    assert all(acks)  # the broker lets them through: the monitor is what must cope
    return link


def flagged(store: MonitorStore, device: str) -> list[dict[str, Any]]:
    return [e for e in store.events(device_id=device) if e["source"] == "monitor"]


def running_until(mon: Monitor, cond: Callable[[], bool], what: str) -> None:
    """Wait for ``cond``, or for the monitor to stop on an error (then fail at once, naming it)."""
    wait_until(lambda: mon.error is not None or cond(), 15, what)
    assert mon.error is None, f"the monitor stopped: {mon.error}"


def two_boards(fleet: Fleet, make_board: Callable[..., Board]) -> tuple[Any, Any]:
    bad, other = make_board("pi-bad"), make_board("pi-good")
    fleet.enrol(bad.enrolment)
    fleet.enrol(other.enrolment)
    return signer_of(bad), signer_of(other)


def status(device: str, seq: int, signer: Any) -> tuple[str, bytes]:
    r = Report(device, seq, "status", datetime.now(UTC), {"state": "online"})
    return r.topic, encode_report(r, signer)


def test_poison_reports_from_an_enrolled_board_do_not_stop_the_monitor(
    fleet: Fleet, monitor: Monitor, make_board: Callable[..., Board], capsys: pytest.CaptureFixture[str]
) -> None:
    bad, other = two_boards(fleet, make_board)
    poison = [(topic("pi-bad", "events"), sign_body(poison_for("pi-bad", b), bad)) for _, b in POISON]
    publish(fleet, "pi-bad", poison).stop()
    publish(fleet, "pi-good", [status("pi-good", 1, other)]).stop()
    running_until(monitor, lambda: len(monitor.store.reports("pi-good")) == 1, "the good board's report")
    running_until(monitor, lambda: len(flagged(monitor.store, "pi-bad")) == len(POISON), "every poison flagged")
    assert {e["kind"] for e in flagged(monitor.store, "pi-bad")} == {"forged"}
    # The bad board is not silenced either: its next genuine report is stored.
    publish(fleet, "pi-bad", [status("pi-bad", 7, bad)]).stop()
    running_until(monitor, lambda: len(monitor.store.reports("pi-bad")) == 1, "the bad board's genuine report")
    assert edgeward(["fleet", "events", "--fleet-dir", str(fleet.home.path), "--device", "pi-bad", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert len([e for e in shown if e["source"] == "monitor"]) == len(POISON)


def test_a_retained_poison_does_not_stop_a_restarted_monitor(
    fleet: Fleet, make_board: Callable[..., Board], tmp_path: Path
) -> None:
    """A board may publish retained: an exclusive monitor is handed its retained poison again at
    every (re)subscription. Each run flags it and goes on; the store keeps one event for the one
    message and counts each time it was judged."""
    bad, other = two_boards(fleet, make_board)
    poison = sign_body(poison_for("pi-bad", POISON[1][1]), bad)
    publish(fleet, "pi-bad", [(topic("pi-bad", "status"), poison)], retain=True).stop()
    # A hostile retained message on the time topic never reaches the monitor (not subscribed).
    publish(fleet, "ops", [("edgeward/v1/_time", b"{" * 10_000)], retain=True).stop()
    store = MonitorStore(tmp_path / "monitor.db")
    config = MonitorConfig(redelivery_window=8, group=None)
    for run in (1, 2):
        mon = Monitor(fleet.home, store, fleet.operator, "mon-exclusive", config)
        try:
            mon.start()
            mon.link.require_connected(10)
            running_until(mon, lambda run=run: sum(e["repeats"] for e in flagged(store, "pi-bad")) == run,
                          f"run {run} flags the poison")
            publish(fleet, "pi-good", [status("pi-good", run, other)]).stop()
            running_until(mon, lambda run=run: len(store.reports("pi-good")) == run, f"run {run} stores a report")
        finally:
            mon.stop()
    assert [(e["kind"], e["repeats"]) for e in flagged(store, "pi-bad")] == [("forged", 2)]
    assert all(e["device_id"] in ("pi-bad", "pi-good") for e in store.events())
    store.close()


def test_a_queued_poison_is_acknowledged_once_and_not_seen_again(
    fleet: Fleet, make_board: Callable[..., Board], tmp_path: Path
) -> None:
    """Published while the monitor is away, the poison waits in its persistent session; the next
    run flags it and acknowledges it, so the run after that does not get it again."""
    bad, other = two_boards(fleet, make_board)
    store = MonitorStore(tmp_path / "monitor.db")
    config = MonitorConfig(redelivery_window=8)

    def run(seq: int, publish_first: list[tuple[str, str, bytes]]) -> None:
        for cn, name, payload in publish_first:
            publish(fleet, cn, [(name, payload)]).stop()
        mon = Monitor(fleet.home, store, fleet.operator, "mon-queued", config)
        try:
            mon.start()
            mon.link.require_connected(10)
            if seq == 0:
                return
            publish(fleet, "pi-good", [status("pi-good", seq, other)]).stop()
            running_until(mon, lambda: any(r["seq"] == seq for r in store.reports("pi-good")), f"report {seq}")
        finally:
            mon.stop()

    run(0, [])  # the session exists from now on
    poison = sign_body(poison_for("pi-bad", POISON[0][1]), bad)
    run(10, [("pi-bad", topic("pi-bad", "events"), poison), ("pi-good", *status("pi-good", 1, other))])
    assert len(flagged(store, "pi-bad")) == 1 and len(store.reports("pi-good")) == 2
    run(20, [])
    assert len(flagged(store, "pi-bad")) == 1  # acknowledged: not delivered again
    store.close()


RESULT_POISON = [
    b'{"seq":' + BIG.encode() + b"}",
    b'{"effects":' + DEEP.encode() + b"}",
    b'{"detail":"\\udc00","device_id":"pi-bad"}',
    b'{"device_id":"pi-bad","device_id":"pi-bad"}',
    b'{"time":NaN}',
]


def test_poison_command_results_are_flagged_and_the_monitor_goes_on(
    fleet: Fleet, monitor: Monitor, make_board: Callable[..., Board]
) -> None:
    bad, other = two_boards(fleet, make_board)
    results = [(results_topic("pi-bad"), sign_result_body(b, bad)) for b in RESULT_POISON]
    publish(fleet, "pi-bad", results).stop()
    publish(fleet, "pi-good", [status("pi-good", 1, other)]).stop()
    running_until(monitor, lambda: len(flagged(monitor.store, "pi-bad")) == len(RESULT_POISON), "results flagged")
    running_until(monitor, lambda: len(monitor.store.reports("pi-good")) == 1, "the good board's report")
    events = flagged(monitor.store, "pi-bad")
    assert [e["kind"] for e in events] == ["forged"] * len(RESULT_POISON), events
    assert all("malformed command result" in e["detail"] for e in events), events
    assert monitor.results_processed == len(RESULT_POISON)


def test_a_poison_last_will_is_flagged_and_the_monitor_goes_on(
    fleet: Fleet, monitor: Monitor, make_board: Callable[..., Board]
) -> None:
    """The broker publishes a board's last will for it when the board goes: a compromised board
    can leave a poison one behind."""
    bad, other = two_boards(fleet, make_board)
    will = sign_body(poison_for("pi-bad", POISON[0][1]).replace(b'"events"', b'"will"'), bad)
    link = publish(fleet, "pi-bad", [], will=(topic("pi-bad", "will"), will))
    # MQTT 5 reason 0x04: disconnect and have the broker publish the will.
    link._client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"))
    link._client.loop_stop()
    running_until(monitor, lambda: len(flagged(monitor.store, "pi-bad")) == 1, "the will flagged")
    publish(fleet, "pi-good", [status("pi-good", 1, other)]).stop()
    running_until(monitor, lambda: len(monitor.store.reports("pi-good")) == 1, "the good board's report")
    (event,) = flagged(monitor.store, "pi-bad")
    assert event["kind"] == "forged" and "a number of more than" in event["detail"]


# --- the bounded reader, the board's side, and the last-resort net ------------------------------


def test_the_json_reader_bounds_depth_and_numbers_before_parsing() -> None:
    assert loads_json(b"[" * 64 + b"]" * 64, "doc") == eval("[" * 64 + "]" * 64)  # noqa: S307
    for text, reason in [
        (b"[" * 65 + b"]" * 65, "nested more than 64"),
        (b"[" * 100_000, "brackets do not match"),
        (b'{"a":' * 70 + b"1" + b"}" * 70, "nested more than 64"),
        (b"[" * 70 + b"}" * 70, "brackets do not match"),
        (b"9" * 41, "more than 40 characters"),
        (b"0." + b"1" * 39, "more than 40 characters"),
        (b"[1e309]", "not a finite number"),
        (b'{"a":NaN}', "not a finite number"),
        (b'{"a":1,"b":{"c":1,"c":1}}', "the key 'c' twice"),
        (b'["\\ud800"]', "lone surrogate"),
        (b'["\\udc00\\ud800"]', "lone surrogate"),  # a low then a high half: no pair
        (b"\xff", "not valid UTF-8"),
    ]:
        with pytest.raises(FormatError, match=reason):
            loads_json(text, "doc")
    # Brackets inside strings are not nesting; a surrogate pair is one character; bounds are inclusive.
    assert loads_json(b'["' + b"[{" * 5000 + b'\\"]"]', "doc") == ["[{" * 5000 + '"]']
    assert loads_json(b'["\\ud83d\\ude00"]', "doc") == ["\U0001f600"]
    assert loads_json(b"9" * 40, "doc") == int("9" * 40)
    assert loads_json(b"[-1.5e308, 0.1, -0]", "doc") == [-1.5e308, 0.1, 0]


def test_a_board_never_signs_data_the_fleet_would_refuse() -> None:
    for data in [{"x": float("nan")}, {"x": [float("inf")]}, {"x": 10**39}, {"x": -(10**39)},
                 {"x": "\ud800"}, {"\udc00": 1}, {"x": {"y": ["\udfff"]}}]:
        with pytest.raises(FormatError):
            Report("pi-1", 1, "events", NOW, data)
    fine = Report("pi-1", 1, "events", NOW, {"x": 10**39 - 1, "y": -(10**39) + 1, "z": 1e308, "s": "\U0001f600"})
    store = MonitorStore(":memory:")
    assert ingest(store, KEYS, [(fine.topic, encode_report(fine, KEY))], 8)["accepted"] == 1
    store.close()


def test_a_message_no_rule_can_judge_is_an_event_about_its_board(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every known refusal is a FormatError or a SecurityRefusal; should judging still raise
    anything else (a bug), the message becomes an ``unjudgeable`` event about the topic's board."""
    import fleet.monitor

    real = fleet.monitor.parse_report

    def parse(body: bytes, topic_name: str) -> Report:
        if b'"boom"' in body:
            raise RuntimeError("a bug")
        return real(body, topic_name)

    monkeypatch.setattr(fleet.monitor, "parse_report", parse)
    store = MonitorStore(":memory:")
    bad = Report("pi-1", 1, "events", NOW, {"x": "boom"})
    counts = ingest(store, KEYS, [good("pi-2", 1), (bad.topic, encode_report(bad, KEY)), good("pi-2", 2)], 8)
    assert counts == {"accepted": 2, "duplicate": 0, "flagged": 1}
    (event,) = store.events()
    assert (event["kind"], event["device_id"], event["severity"]) == ("unjudgeable", "pi-1", "critical")
    assert "RuntimeError('a bug')" in event["detail"]
    store.close()


def test_a_batch_that_cannot_be_stored_is_stored_one_message_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import fleet.monitor

    real = fleet.monitor.judge_sequence

    def judge(report: Any, *args: Any) -> Any:
        if report.device_id == "pi-1":
            raise ValueError("a bug")
        return real(report, *args)

    monkeypatch.setattr(fleet.monitor, "judge_sequence", judge)
    store = MonitorStore(":memory:")
    bad = Report("pi-1", 1, "events", NOW, {})
    counts = ingest(store, KEYS, [good("pi-2", 1), (bad.topic, encode_report(bad, KEY)), good("pi-2", 2)], 8)
    assert counts == {"accepted": 2, "duplicate": 0, "flagged": 1}
    assert [r["seq"] for r in store.reports("pi-2")] == [2, 1] and store.reports("pi-1") == []
    assert [(e["kind"], e["device_id"]) for e in store.events()] == [("unjudgeable", "pi-1")]
    store.close()
