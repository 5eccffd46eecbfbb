"""The monitor's pure decisions and its store, without a broker: verify, judge, store once."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import fleet.monitor
from device_agent.crypto import ed25519_public_raw
from device_agent.errors import FormatError
from device_agent.service.events import Event
from device_agent.telemetry.report import NO_PREV, Frame, Report, encode_report, payload_digest, topic
from device_agent.telemetry.service import event_data
from fleet.monitor import (
    Accepted,
    Duplicate,
    Flagged,
    ingest,
    judge_sequence,
    verify_batch,
)
from fleet.store import MonitorStore
from tests.fixtures.reports import verify_message, verify_report

KEY = Ed25519PrivateKey.generate()
KEYS = {"pi-1": ed25519_public_raw(KEY)}
NOW = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)


def report(
    seq: int, kind: str = "events", data: dict[str, object] | None = None
) -> tuple[str, bytes]:
    r = Report("pi-1", seq, kind, NOW, data if data is not None else {"event": {"kind": "ood"}})
    return r.topic, encode_report(r, KEY)


def test_verify_message_verdicts() -> None:
    t, p = report(1)
    assert isinstance(verify_message(KEYS, t, p), Report)
    assert verify_message({}, t, p).kind == "unknown-device"
    other = Report("pi-1", 1, "events", NOW, {})
    forged = verify_message(KEYS, t, encode_report(other, Ed25519PrivateKey.generate()))
    assert isinstance(forged, Flagged) and forged.kind == "forged"
    wrong_topic = verify_message(KEYS, topic("pi-1", "telemetry"), p)  # body says events
    assert isinstance(wrong_topic, Flagged) and "arrived on" in wrong_topic.detail
    assert verify_message(KEYS, "edgeward/v1/../x", p).kind == "forged"
    assert verify_message(KEYS, t, p[:-1]).kind == "forged"


def chain(n: int, key: Ed25519PrivateKey = KEY, device: str = "pi-1") -> list[tuple[str, bytes]]:
    """n reports as a board sends them: each names the digest of the one before."""
    out, prev = [], NO_PREV
    for seq in range(1, n + 1):
        r = Report(device, seq, "events", NOW, {"event": {"kind": "ood", "seq": seq}})
        out.append((r.topic, encode_report(r, key, prev)))
        prev = payload_digest(out[-1][1])
    return out


def test_a_chained_burst_is_authenticated_through_its_newest_signature() -> None:
    msgs = chain(5)
    assert all(not isinstance(r, Flagged) for r, _ in verify_batch(KEYS, msgs))
    # A report whose own signature is not the device's is still authenticated when a later,
    # authenticated report of the same device names its exact bytes: the board's key vouched
    # for them. This is what lets a burst cost one signature check.
    t, odd = report(1)
    odd = odd[:4] + bytes(64) + odd[68:]  # its own signature: zeros
    r2 = Report("pi-1", 2, "events", NOW, {"event": {"kind": "ood"}})
    vouching = (r2.topic, encode_report(r2, KEY, payload_digest(odd)))
    rows = verify_batch(KEYS, [(t, odd), vouching])
    assert not isinstance(rows[0][0], Flagged) and not isinstance(rows[1][0], Flagged)
    # Without a vouching report it is checked on its own signature, and fails.
    assert verify_batch(KEYS, [(t, odd)])[0][0].kind == "forged"
    # A vouch counts only from an authenticated report of the same device, naming the exact bytes.
    forged_vouch = (r2.topic, encode_report(r2, Ed25519PrivateKey.generate(), payload_digest(odd)))
    assert [r.kind for r, _ in verify_batch(KEYS, [(t, odd), forged_vouch])] == ["forged", "forged"]
    other_key = Ed25519PrivateKey.generate()
    r3 = Report("pi-2", 2, "events", NOW, {"event": {"kind": "ood"}})
    other_device = (r3.topic, encode_report(r3, other_key, payload_digest(odd)))
    keys = KEYS | {"pi-2": ed25519_public_raw(other_key)}
    assert verify_batch(keys, [(t, odd), other_device])[0][0].kind == "forged"


def test_a_chunk_of_one_boards_burst_costs_one_signature_check(monkeypatch: pytest.MonkeyPatch) -> None:
    checks: list[int] = []
    real = fleet.monitor.verify_frame

    def counted(f: Frame, key: bytes) -> None:
        checks.append(1)
        real(f, key)

    monkeypatch.setattr(fleet.monitor, "verify_frame", counted)
    assert not [r for r, _ in verify_batch(KEYS, chain(250)) if isinstance(r, Flagged)]
    assert len(checks) == 1
    checks.clear()
    unchained = [report(seq) for seq in range(1, 11)]  # each names no predecessor
    assert not [r for r, _ in verify_batch(KEYS, unchained) if isinstance(r, Flagged)]
    assert len(checks) == 10


def test_only_a_well_formed_report_on_its_own_topic_vouches_and_is_vouched_for() -> None:
    t, odd = report(1)
    odd = odd[:4] + bytes(64) + odd[68:]  # its own signature: zeros
    # Signed by the device's key, but its body names another device: malformed, so no vouch.
    r2 = Report("pi-2", 2, "events", NOW, {"event": {"kind": "ood"}})
    malformed = (topic("pi-1", "events"), encode_report(r2, KEY, payload_digest(odd)))
    assert [r.kind for r, _ in verify_batch(KEYS, [(t, odd), malformed])] == ["forged", "forged"]
    # A vouched payload republished on another topic level still fails its topic check.
    msgs = chain(2)
    rows = verify_batch(KEYS, [(topic("pi-1", "status"), msgs[0][1]), msgs[1]])
    assert isinstance(rows[0][0], Flagged) and "arrived on" in rows[0][0].detail


def test_tampering_anywhere_in_a_chain_is_caught() -> None:
    msgs = chain(4)
    for i in range(4):
        for offset in (10, 70, len(msgs[i][1]) - 3):  # signature, prev, body
            tampered = bytearray(msgs[i][1])
            tampered[offset] ^= 1
            batch = msgs[:i] + [(msgs[i][0], bytes(tampered))] + msgs[i + 1 :]
            kinds = [r.kind if isinstance(r, Flagged) else "ok" for r, _ in verify_batch(KEYS, batch)]
            assert kinds[i] == "forged", (i, offset, kinds)
            # The others are still authenticated, by their own signatures where the chain broke.
            assert kinds[:i] + kinds[i + 1 :] == ["ok"] * 3, (i, offset, kinds)


def test_judge_sequence() -> None:
    t, p = report(50)
    r = verify_report(p, KEYS["pi-1"], t)
    d = "digest"
    assert isinstance(judge_sequence(r, d, None, 10, 8), Accepted)
    assert isinstance(judge_sequence(r, d, None, 55, 8), Accepted)  # late, within the window
    assert judge_sequence(r, d, None, 100, 8).kind == "out-of-sequence"  # type: ignore[union-attr]
    assert isinstance(judge_sequence(r, d, d, 52, 8), Duplicate)  # QoS 1 redelivery
    assert judge_sequence(r, d, d, 100, 8).kind == "replayed"  # type: ignore[union-attr]
    reused = judge_sequence(r, d, "other", 52, 8)
    assert isinstance(reused, Flagged) and reused.severity == "critical"
    wt, wp = report(5, "will", {"state": "offline"})
    will = verify_report(wp, KEYS["pi-1"], wt)
    assert isinstance(judge_sequence(will, d, None, 500, 8), Accepted)  # reserved at connect


def test_ingest_stores_each_report_once_and_tracks_state(tmp_path: Path) -> None:
    store = MonitorStore(tmp_path / "m.db")
    msgs = [report(1, "status", {"state": "online", "models": []}), report(2), report(3)]
    assert ingest(store, KEYS, msgs + msgs[1:], 8) == {"accepted": 3, "duplicate": 2, "flagged": 0}
    assert ingest(store, KEYS, [report(4, "will", {"state": "offline"})], 8)["accepted"] == 1
    [dev] = store.devices()
    assert (dev["received"], dev["duplicates"], dev["events"], dev["state"]) == (4, 2, 2, "offline")
    assert ingest(store, KEYS, [report(5, "status", {"state": "online"})], 8)["accepted"] == 1
    assert store.devices()[0]["state"] == "online"
    assert [e["seq"] for e in store.events()] == [2, 3]


def test_last_will_and_status_apply_in_arrival_order(tmp_path: Path) -> None:
    store = MonitorStore(tmp_path / "m.db")
    will = report(1, "will", {"state": "offline"})  # reserved when the session began
    ingest(store, KEYS, [report(2, "status", {"state": "online"}), will], 8)
    assert store.devices()[0]["state"] == "offline"  # the board went away after reporting
    ingest(store, KEYS, [report(3, "will", {"state": "offline"}), report(4, "status", {})], 8)
    assert store.devices()[0]["state"] == "online"  # and came back


def test_reports_carry_summaries_never_inputs() -> None:
    with pytest.raises(FormatError, match="summaries"):
        Report("pi-1", 1, "events", NOW, {"input": list(range(784))})
    big = Event(1, NOW, "ood", "warning", None, 0.9, {"pixels": list(range(784))})
    assert event_data(big)["event"]["evidence"] == {
        "withheld": "evidence did not look like a summary"
    }
