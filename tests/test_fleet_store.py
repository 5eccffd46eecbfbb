"""The monitor store on both engines: the same judgement on SQLite and on a real PostgreSQL
(a throwaway cluster made with initdb), migrations, monitors racing on one board's burst,
retention, and the signed incident export."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.crypto import ed25519_public_raw
from device_agent.errors import BadSignature, EnvironmentFault
from device_agent.telemetry.report import NO_PREV, Report, encode_report, payload_digest
from fleet.incidents import export_document, sign_export, verify_export
from fleet.monitor import Monitor, MonitorConfig, ingest
from fleet.store import MonitorStore, PostgresStore, Store
from packager.cli import main as edgeward
from packager.signers import FileSigner
from tests.conftest import Board
from tests.fixtures.fleet import Fleet, fleet_fixture, wait_until  # noqa: F401
from tests.fixtures.postgres import (  # noqa: F401
    PgCluster,
    make_store_fixture,
    pg_cluster_fixture,
    pg_url_fixture,
)

KEY = Ed25519PrivateKey.generate()
KEYS = {"pi-1": ed25519_public_raw(KEY)}
NOW = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)


def chain(n: int, start: int = 1, key: Ed25519PrivateKey = KEY, device: str = "pi-1",
          kind: str = "events") -> list[tuple[str, bytes]]:
    out, prev = [], NO_PREV
    for seq in range(start, start + n):
        r = Report(device, seq, kind, NOW, {"event": {"kind": "ood", "seq": seq}})
        out.append((r.topic, encode_report(r, key, prev)))
        prev = payload_digest(out[-1][1])
    return out


def report(seq: int, kind: str = "events", data: dict[str, Any] | None = None) -> tuple[str, bytes]:
    r = Report("pi-1", seq, kind, NOW, data if data is not None else {"event": {"kind": "ood"}})
    return r.topic, encode_report(r, KEY)


# --- one store, both engines ----------------------------------------------------------------


def test_both_engines_store_each_report_once_and_track_state(make_store: Callable[[], Store]) -> None:
    store = make_store()
    msgs = [report(1, "status", {"state": "online", "models": []}), report(2), report(3)]
    assert ingest(store, KEYS, msgs + msgs[1:], 8) == {"accepted": 3, "duplicate": 2, "flagged": 0}
    assert ingest(store, KEYS, [report(4, "will", {"state": "offline"})], 8)["accepted"] == 1
    [dev] = store.devices()
    assert (dev["received"], dev["duplicates"], dev["events"], dev["state"]) == (4, 2, 2, "offline")
    reused = Report("pi-1", 2, "events", NOW, {"event": {"kind": "other"}})
    forged = encode_report(Report("pi-1", 9, "events", NOW, {}), Ed25519PrivateKey.generate())
    counts = ingest(store, KEYS, [(reused.topic, encode_report(reused, KEY)), (reused.topic, forged),
                                  (reused.topic, forged)], 8)
    assert counts == {"accepted": 0, "duplicate": 0, "flagged": 3}
    events = [e for e in store.events() if e["source"] == "monitor"]
    # One event per message: the forged one judged twice is one event seen twice.
    assert sorted((e["kind"], e["repeats"]) for e in events) == [("forged", 2), ("replayed", 1)]
    again = make_store()  # a second connection (another monitor) reads the same
    assert [r["seq"] for r in again.reports("pi-1")] == [4, 3, 2, 1]
    assert again.devices()[0]["flagged"] == 2


# --- migrations -------------------------------------------------------------------------------


V1_SQLITE = """
CREATE TABLE devices (device_id TEXT PRIMARY KEY, first_seen TEXT NOT NULL, last_seen TEXT NOT NULL,
  highest_seq INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL DEFAULT 'online',
  state_seq INTEGER NOT NULL DEFAULT 0, status TEXT NOT NULL DEFAULT '{}',
  counters_seq INTEGER NOT NULL DEFAULT 0, counters TEXT NOT NULL DEFAULT '{}',
  received INTEGER NOT NULL DEFAULT 0, duplicates INTEGER NOT NULL DEFAULT 0);
CREATE TABLE reports (device_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, time TEXT NOT NULL,
  received TEXT NOT NULL, digest TEXT NOT NULL, data TEXT NOT NULL, PRIMARY KEY (device_id, seq));
CREATE INDEX reports_time ON reports (kind, time);
CREATE TABLE security (id INTEGER PRIMARY KEY AUTOINCREMENT, received TEXT NOT NULL, device_id TEXT,
  kind TEXT NOT NULL, severity TEXT NOT NULL, detail TEXT NOT NULL, topic TEXT NOT NULL, seq INTEGER,
  digest TEXT NOT NULL);
INSERT INTO security (received, device_id, kind, severity, detail, topic, seq, digest) VALUES
  ('2026-11-01T00:00:00Z', 'pi-1', 'forged', 'critical', 'x', 't/pi-1', NULL, 'aa'),
  ('2026-11-02T00:00:00Z', 'pi-1', 'forged', 'critical', 'x', 't/pi-1', NULL, 'aa'),
  ('2026-11-03T00:00:00Z', 'pi-1', 'forged', 'critical', 'x', 't/pi-1', NULL, 'bb');
PRAGMA user_version = 1;
"""


def test_a_release_0_2_sqlite_store_is_migrated_on_open_and_a_newer_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "monitor.db"
    db = sqlite3.connect(path)
    db.executescript(V1_SQLITE)
    db.close()
    store = MonitorStore(path)
    events = store.events()
    assert [(e["digest"], e["repeats"], e["time"]) for e in events] == [
        ("aa", 2, "2026-11-01T00:00:00Z"), ("bb", 1, "2026-11-03T00:00:00Z")]
    assert ingest(store, KEYS, [report(1)], 8)["accepted"] == 1
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 4
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    with pytest.raises(EnvironmentFault, match="newer EdgeWard"):
        MonitorStore(path)


def test_postgresql_schema_is_made_once_by_monitors_starting_together(pg_url: str) -> None:
    import psycopg

    stores: list[Store] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            stores.append(PostgresStore(pg_url))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(stores) == 4
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT version FROM edgeward_schema").fetchall() == [(4,)]
        conn.execute("INSERT INTO edgeward_schema VALUES (99)")
    for s in stores:
        s.close()
    with pytest.raises(EnvironmentFault, match="newer EdgeWard"):
        PostgresStore(pg_url)


# --- several monitors, one PostgreSQL ---------------------------------------------------------


def test_two_monitors_racing_on_one_boards_burst_store_each_report_once(pg_url: str) -> None:
    """Two monitors (two connections, two threads) judge one board's burst at the same moment:
    each gets every other report and a redelivery of the other's, both get the same forged
    message and one sequence number signed twice with different content. The database decides:
    every report stored once, each redelivery counted, the reused number flagged once, the
    forged message one event seen twice."""
    n = 240
    burst = chain(n)
    reused = Report("pi-1", n, "events", NOW, {"event": {"kind": "other"}})
    reused_msg = (reused.topic, encode_report(reused, KEY))
    forged = (burst[0][0], encode_report(Report("pi-1", 5, "events", NOW, {}), Ed25519PrivateKey.generate()))
    a_part = [m for i, m in enumerate(burst) if i % 2 == 0]
    b_part = [m for i, m in enumerate(burst) if i % 2 == 1]
    rounds = 24
    step = len(a_part) // rounds
    # Round r: A has its own reports and B's of the same round again; B likewise.
    chunks: dict[str, list[list[tuple[str, bytes]]]] = {"a": [], "b": []}
    for r in range(rounds):
        mine_a, mine_b = a_part[r * step:(r + 1) * step], b_part[r * step:(r + 1) * step]
        chunks["a"].append(mine_a + mine_b[:2])
        chunks["b"].append(mine_b + mine_a[:2])
    chunks["a"][-1].append(forged)
    chunks["b"][-1] += [forged, reused_msg]
    barrier = threading.Barrier(2)
    counts: dict[str, dict[str, int]] = {}
    failures: list[BaseException] = []

    def monitor(name: str) -> None:
        store = PostgresStore(pg_url)
        total = dict.fromkeys(("accepted", "duplicate", "flagged"), 0)
        try:
            for chunk in chunks[name]:
                barrier.wait(30)
                for k, v in ingest(store, KEYS, chunk, 1000).items():
                    total[k] += v
        except BaseException as e:  # noqa: BLE001
            failures.append(e)
            barrier.abort()
        finally:
            store.close()
        counts[name] = total

    threads = [threading.Thread(target=monitor, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    accepted = counts["a"]["accepted"] + counts["b"]["accepted"]
    duplicates = counts["a"]["duplicate"] + counts["b"]["duplicate"]
    assert accepted == n and duplicates == 4 * rounds
    store = PostgresStore(pg_url)
    try:
        stored = store.reports("pi-1", limit=10 * n)
        assert sorted(r["seq"] for r in stored) == list(range(1, n + 1))
        by_seq = {r["seq"]: r["digest"] for r in stored}
        assert all(by_seq[i + 1] == payload_digest(p).hex() for i, (_, p) in enumerate(burst))
        [dev] = store.devices()
        assert (dev["received"], dev["duplicates"], dev["highest_seq"]) == (n, 4 * rounds, n)
        flags = sorted((e["kind"], e["repeats"]) for e in store.events() if e["source"] == "monitor")
        assert flags == [("forged", 2), ("replayed", 1)]
    finally:
        store.close()


def test_two_monitors_share_a_boards_burst_through_mosquitto_into_postgresql(
    fleet: Fleet, make_board: Callable[..., Board], pg_url: str
) -> None:
    """Two real monitors in one shared-subscription group on one PostgreSQL: mosquitto hands
    them one board's chained burst in turns, so consecutive reports land on different monitors;
    every report is stored once and none is flagged."""
    board = make_board("pi-race")
    fleet.enrol(board.enrolment)
    signer = board.agent().store.unlock(board.keys).signer()
    config = MonitorConfig(group="race")
    stores = [PostgresStore(pg_url), PostgresStore(pg_url)]
    monitors = [Monitor(fleet.home, s, fleet.operator, f"mon-{i}", config) for i, s in enumerate(stores)]
    n = 400
    try:
        for m in monitors:
            m.start()
            m.link.require_connected(10)
        from tests.test_monitor_hostile import publish

        publish(fleet, "pi-race", chain(n, key=signer, device="pi-race")).stop()
        wait_until(lambda: any(m.error for m in monitors) or sum(m.processed for m in monitors) >= n,
                   60, "both monitors to handle the burst")
        assert all(m.error is None for m in monitors), [m.error for m in monitors]
        assert all(m.processed > 0 for m in monitors), [m.processed for m in monitors]
        stored = stores[0].reports("pi-race", limit=10 * n)
        assert sorted(r["seq"] for r in stored) == list(range(1, n + 1))
        assert [e for e in stores[0].events() if e["source"] == "monitor"] == []
        [dev] = stores[1].devices()
        assert (dev["received"], dev["highest_seq"]) == (n, n)
    finally:
        for m in monitors:
            m.stop()
        for s in stores:
            s.close()


def test_fleet_commands_read_a_postgresql_store(pg_url: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import json

    store = PostgresStore(pg_url)
    ingest(store, KEYS, [report(1, "status", {"state": "online"}), report(2)], 8)
    store.close()
    fleet_dir = ["--fleet-dir", str(tmp_path / "home")]
    assert edgeward(["fleet", "events", *fleet_dir, "--store", pg_url, "--json"]) == 0
    assert [e["seq"] for e in json.loads(capsys.readouterr().out)] == [2]
    assert edgeward(["fleet", "status", *fleet_dir, "--store", pg_url, "--json"]) == 0
    assert [d["device_id"] for d in json.loads(capsys.readouterr().out)["devices"]] == ["pi-1"]
    bad = pg_url.replace("host=", "host=/nonexistent")
    assert edgeward(["fleet", "events", *fleet_dir, "--store", bad]) == 4
    err = capsys.readouterr().err
    assert "cannot connect to the monitor store" in err and "password" not in err


# --- retention ----------------------------------------------------------------------------------


def test_retention_prunes_in_bounded_batches_and_keeps_what_judges_replays(
    make_store: Callable[[], Store],
) -> None:
    store = make_store()
    window = 10
    burst = chain(60)
    assert ingest(store, KEYS, burst, window)["accepted"] == 60
    forged = encode_report(Report("pi-1", 99, "events", NOW, {}), Ed25519PrivateKey.generate())
    ingest(store, KEYS, [(burst[0][0], forged)], window)
    future = datetime.now(UTC) + timedelta(days=1)  # everything is older than this
    done = store.prune(future, keep_last=window, batch=7)
    assert (done.reports, done.events) == (50, 1)
    assert done.batches == 8 + 1  # 50 reports in 7s: 8 transactions; 1 event: 1
    assert sorted(r["seq"] for r in store.reports("pi-1", limit=100)) == list(range(51, 61))
    # An old report replayed after its row was pruned is still no new report.
    counts = ingest(store, KEYS, [burst[3], burst[55]], window)
    assert counts == {"accepted": 0, "duplicate": 1, "flagged": 1}
    assert store.prune(datetime.now(UTC) - timedelta(days=1), keep_last=window) .reports == 0


# --- signed incident export -------------------------------------------------------------------


def tamper(blob: bytes, old: bytes, new: bytes) -> bytes:
    """The envelope with ``old`` replaced by ``new`` inside its payload, signatures kept."""
    import base64
    import json

    env = json.loads(blob)
    payload = base64.b64decode(env["payload"])
    assert old in payload
    env["payload"] = base64.b64encode(payload.replace(old, new)).decode()
    return json.dumps(env).encode()


def test_incident_export_is_signed_and_any_change_is_refused(tmp_path: Path) -> None:
    store = MonitorStore(tmp_path / "m.db")
    ingest(store, KEYS, chain(3), 8)
    forged = encode_report(Report("pi-1", 9, "events", NOW, {}), Ed25519PrivateKey.generate())
    ingest(store, KEYS, [("edgeward/v1/pi-1/events", forged)], 8)
    operator = Ed25519PrivateKey.generate()
    events = store.events(device_id="pi-1")
    blob = sign_export(export_document(events, "pi-1", None, None, NOW, store.name), FileSigner(operator))
    doc = verify_export(blob, ed25519_public_raw(operator))
    assert doc["count"] == 4 and {e["source"] for e in doc["events"]} == {"board", "monitor"}
    with pytest.raises(BadSignature):
        verify_export(blob, ed25519_public_raw(Ed25519PrivateKey.generate()))
    with pytest.raises(BadSignature):
        verify_export(tamper(blob, b'"source":"monitor"', b'"source":"board"'), ed25519_public_raw(operator))
    store.close()


def test_export_and_verify_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    store = MonitorStore(tmp_path / "m.db")
    ingest(store, KEYS, chain(2), 8)
    store.close()
    assert edgeward(["keys", "operator", "--out", str(tmp_path / "k"), "--insecure-unencrypted-key"]) == 0
    out = tmp_path / "incident.json"
    base = ["--fleet-dir", str(home), "--store", str(tmp_path / "m.db")]
    assert edgeward(["fleet", "export-events", *base, "--device", "pi-1", "--since", "2026-11-01T00:00:00Z",
                     "--operator-key", str(tmp_path / "k" / "operator.key"), "--out", str(out)]) == 0
    capsys.readouterr()
    pub = str(tmp_path / "k" / "operator.pub")
    assert edgeward(["fleet", "verify-export", str(out), "--operator-pub", pub, "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["count"] == 2
    out.write_bytes(tamper(out.read_bytes(), b'"device_id":"pi-1"', b'"device_id":"pi-2"'))
    assert edgeward(["fleet", "verify-export", str(out), "--operator-pub", pub]) == 1
    assert "no signature verifies" in capsys.readouterr().err
    assert edgeward(["fleet", "prune", *base, "--older-than", "0s", "--json"]) == 0
