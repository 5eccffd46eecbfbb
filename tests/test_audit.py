"""The audit log: hash-chained, rotated, and any edit, removal or truncation detected."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from device_agent.config import AuditConfig
from device_agent.errors import IntegrityError
from device_agent.service.audit import AuditLog, input_summary, verify

T0 = 1_800_000_000.0


def _log(d: Path, n: int, config: AuditConfig | None = None) -> AuditLog:
    log = AuditLog(d, config or AuditConfig(checkpoint_every=1))
    for i in range(n):
        log.append({"event": "predict", "client": f"c{i % 3}", "status": 200}, T0 + i)
    return log


def _lines(d: Path) -> tuple[Path, list[bytes]]:
    seg = sorted(d.glob("audit-*.jsonl"))[-1]
    return seg, seg.read_bytes().splitlines(keepends=True)


def test_an_untouched_log_verifies(tmp_path: Path) -> None:
    _log(tmp_path, 20).close()
    rep = verify(tmp_path)
    assert rep.ok and rep.records == 20 and (rep.first_seq, rep.last_seq) == (1, 20)


def test_an_edited_record_is_detected(tmp_path: Path) -> None:
    _log(tmp_path, 10).close()
    seg, lines = _lines(tmp_path)
    lines[4] = lines[4].replace(b'"client":"c1"', b'"client":"cX"')
    seg.write_bytes(b"".join(lines))
    rep = verify(tmp_path)
    assert not rep.ok and any("record edited" in p for p in rep.problems)


def test_an_edit_with_a_recomputed_hash_breaks_the_chain(tmp_path: Path) -> None:
    from device_agent.service.audit import record_hash
    from device_agent.wire import canonical_json

    _log(tmp_path, 10).close()
    seg, lines = _lines(tmp_path)
    rec = json.loads(lines[4])
    rec["status"] = 500
    rec["hash"] = record_hash({k: v for k, v in rec.items() if k != "hash"})
    lines[4] = canonical_json(rec) + b"\n"
    seg.write_bytes(b"".join(lines))
    rep = verify(tmp_path)
    assert not rep.ok and any("chain broken" in p for p in rep.problems)


def test_a_removed_record_is_detected(tmp_path: Path) -> None:
    _log(tmp_path, 10).close()
    seg, lines = _lines(tmp_path)
    del lines[3]
    seg.write_bytes(b"".join(lines))
    rep = verify(tmp_path)
    assert not rep.ok and any("sequence 5 follows 3" in p for p in rep.problems)


def test_records_cut_off_the_end_are_detected(tmp_path: Path) -> None:
    _log(tmp_path, 10).close()
    seg, lines = _lines(tmp_path)
    seg.write_bytes(b"".join(lines[:7]))
    rep = verify(tmp_path)
    assert not rep.ok and any("cut off the end" in p for p in rep.problems)


def test_a_torn_last_record_is_reported_then_recovered(tmp_path: Path) -> None:
    _log(tmp_path, 5).close()
    seg, lines = _lines(tmp_path)
    with seg.open("ab") as f:
        f.write(b'{"event":"pre')
    assert any("torn" in p for p in verify(tmp_path).problems)
    log = AuditLog(
        tmp_path
    )  # restart after a power cut: the torn bytes are cut and the cut recorded
    log.append({"event": "predict"}, T0 + 10)
    log.close()
    rep = verify(tmp_path)
    assert rep.ok and rep.records == 7
    assert json.loads(_lines(tmp_path)[1][5])["torn_bytes"] == len(b'{"event":"pre')


def test_rotation_and_retention_keep_the_chain_verifiable(tmp_path: Path) -> None:
    cfg = AuditConfig(max_segment_bytes=600, retention_days=1, checkpoint_every=1)
    log = _log(tmp_path, 30, cfg)
    segs = sorted(tmp_path.glob("audit-*.jsonl"))
    assert len(segs) > 3
    later = T0 + 30 + 86400  # a day after every record so far: all full segments have expired
    current = segs[-1]
    while (tmp_path / current.name).exists() and sorted(tmp_path.glob("audit-*.jsonl"))[
        -1
    ] == current:
        log.append({"event": "predict"}, later)  # until the next rotation, which prunes
    log.close()
    remaining = sorted(tmp_path.glob("audit-*.jsonl"))
    # Every segment whose last record is over a day old is gone; the one written "later" stays.
    assert [p.name for p in remaining][-2:] == [current.name, remaining[-1].name] and len(
        remaining
    ) == 2
    rep = verify(tmp_path)
    assert rep.ok and rep.first_seq > 1, rep.problems


def test_removing_a_retained_segment_is_detected(tmp_path: Path) -> None:
    log = _log(tmp_path, 30, AuditConfig(max_segment_bytes=600, checkpoint_every=1))
    log.close()
    sorted(tmp_path.glob("audit-*.jsonl"))[1].unlink()
    assert not verify(tmp_path).ok


def test_input_summary_is_keyed_and_holds_no_values() -> None:
    x = np.linspace(0, 1, 64, dtype=np.float32)[None, :]
    a, b = input_summary(x, b"k" * 32), input_summary(x, b"j" * 32)
    assert a["fp"] != b["fp"] and a["shape"] == [1, 64] and a["max"] == 1.0
    assert len(json.dumps(a)) < 300


def test_audit_verify_command_exit_codes(tmp_path: Path, make_board: object) -> None:
    board = make_board()  # type: ignore[operator]
    _log(board.data_dir / "audit", 5).close()
    cmd = [
        sys.executable,
        "-m",
        "device_agent.cli",
        "audit",
        "verify",
        "--data-dir",
        str(board.data_dir),
    ]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0 and "intact: 5 records" in ok.stdout
    seg, lines = _lines(board.data_dir / "audit")
    seg.write_bytes(b"".join(lines[:2] + lines[3:]))
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == IntegrityError.exit_code and "NOT intact" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    js = subprocess.run([*cmd, "--json"], capture_output=True, text=True)
    assert js.returncode == 1 and json.loads(js.stdout)["ok"] is False


# --- bounded under a flood --------------------------------------------------------------------------


def _segment_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("audit-*.jsonl"))


def test_the_log_never_exceeds_its_size_cap_and_still_verifies(tmp_path: Path) -> None:
    """An authenticated client can still send a record per query: the segments together stay
    under ``max_total_bytes`` (oldest deleted first, before the retention), the deletion is itself
    recorded, and the retained chain verifies from its anchor."""
    cfg = AuditConfig(max_segment_bytes=2048, max_total_bytes=8192)
    log = AuditLog(tmp_path, cfg)
    for i in range(1000):
        log.append({"event": "predict", "client": "c1", "status": 429, "i": i}, T0 + i)
        assert _segment_bytes(tmp_path) <= cfg.max_total_bytes
    log.close()
    rep = verify(tmp_path)
    assert rep.ok and rep.first_seq is not None and rep.first_seq > 1 and rep.last_seq is not None, rep.problems
    records = [json.loads(line) for p in sorted(tmp_path.glob("audit-*.jsonl")) for line in p.read_bytes().splitlines()]
    pruned = [r for r in records if r["event"] == "audit-pruned"]
    assert pruned and pruned[-1]["reason"] == "size" and pruned[-1]["first_seq"] >= rep.first_seq
    assert records[-1]["event"] == "predict" or records[-1]["event"] == "audit-pruned"


def test_the_verify_command_accepts_a_log_pruned_by_size(tmp_path: Path, make_board: object) -> None:
    board = make_board()  # type: ignore[operator]
    cfg = AuditConfig(max_segment_bytes=1024, max_total_bytes=4096)
    _log(board.data_dir / "audit", 300, cfg).close()
    assert len(list((board.data_dir / "audit").glob("audit-*.jsonl"))) < 300 * 100 // 1024
    cmd = [sys.executable, "-m", "device_agent.cli", "audit", "verify", "--json", "--data-dir", str(board.data_dir)]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0 and json.loads(ok.stdout)["first_seq"] > 1, ok.stdout


def test_anonymous_refusals_are_counted_per_window_not_written_one_by_one(tmp_path: Path) -> None:
    cfg = AuditConfig(summary_seconds=60.0, checkpoint_every=1)
    log = AuditLog(tmp_path, cfg)
    for i in range(500):
        log.refused_anonymous(401 if i % 5 else 404, T0 + i * 0.1)  # all inside the first minute
    assert _segment_bytes(tmp_path) == 0  # nothing written yet: the window is open
    log.append({"event": "predict", "client": "c1", "status": 200}, T0 + 50)  # authenticated: at once
    log.refused_anonymous(401, T0 + 61)  # the next window: the first one is written
    log.close()  # the last window is written at close
    records = [json.loads(line) for p in sorted(tmp_path.glob("audit-*.jsonl")) for line in p.read_bytes().splitlines()]
    assert [(r["event"], r["status"], r.get("count")) for r in records] == [
        ("predict", 200, None), ("anonymous", 401, 400), ("anonymous", 404, 100), ("anonymous", 401, 1),
    ]
    assert records[1]["client"] is None and records[1]["first"] < records[1]["last"]
    assert verify(tmp_path).ok


def test_a_flood_of_unauthenticated_requests_grows_the_log_by_a_bounded_amount(
    make_board: object, pack_for: object, digits: object, digits_test: object
) -> None:
    """Each anonymous refusal used to be one record: one client on the socket grew the log by
    gigabytes a day. Now anonymous refusals are counted per window; what a token holder did is
    still recorded one by one, and the whole chain verifies."""
    from tests.fixtures.http import parse_responses, predict, raw_exchange
    from tests.fixtures.serve import SimClock, serve

    board = make_board()  # type: ignore[operator]
    out = pack_for(digits.onnx, [board])  # type: ignore[operator, attr-defined]
    board.agent().install((out / f"{board.device_id}.ewb").read_bytes())
    clock = SimClock()
    s = serve(board, clock=clock)
    x, _ = digits_test  # type: ignore[misc]
    audit_dir = board.data_dir / "audit"
    junk = [
        b"POST /v1/predict HTTP/1.1\r\nContent-Length: 0\r\n\r\n",  # no token
        b"POST /v1/predict HTTP/1.1\r\nAuthorization: Bearer ewt_guess\r\nContent-Length: 0\r\n\r\n",
        b"GET /v1/status HTTP/1.1\r\nAuthorization: Bearer ewt_guess\r\n\r\n",
        b"GET /admin HTTP/1.1\r\n\r\n",
    ]
    n = 0
    try:
        conn = s.connect()
        assert predict(conn, s.tokens["user"], x[0])[0] == 200
        before = _segment_bytes(audit_dir)
        for _window in range(3):
            for _ in range(2):
                stream = b"".join(junk) * 250
                answers = parse_responses(raw_exchange(s.socket, stream))
                assert sorted({a[0] for a in answers}) == [401, 404] and len(answers) == 1000
                n += len(answers)
            clock.t += 61  # the next summary window
        assert predict(conn, s.tokens["user"], x[1])[0] == 200
        conn.close()
    finally:
        s.server.stop()
    grown = _segment_bytes(audit_dir) - before
    records = [json.loads(line) for p in sorted(audit_dir.glob("audit-*.jsonl"))
               for line in p.read_bytes().splitlines()]  # fmt: skip
    assert grown < 3 * 2 * 400 + 1000, grown  # a few summaries per window, whatever n is (6,000 here)
    assert sum(r["count"] for r in records if r["event"] == "anonymous") == n
    assert [r["status"] for r in records if r["event"] == "predict"] == [200, 200]
    assert verify(audit_dir).ok
