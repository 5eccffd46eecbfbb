"""The fleet simulator at test size: a dozen enrolled boards, each with its own certificate and
TLS connection to a real mosquitto, some going offline and coming back, against 1 and 2 monitors
on a real PostgreSQL and 1 on SQLite (``benchmarks/fleet_scale.py`` runs the same code with
1,000 boards)."""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from benchmarks.fleet_scale import MonitorProc, Plan, make_boards, simulate
from fleet.ca import FleetHome
from tests.fixtures.fleet import MOSQUITTO, Fleet, fleet_fixture, wait_until  # noqa: F401
from tests.fixtures.postgres import PgCluster, pg_cluster_fixture, pg_url_fixture  # noqa: F401
from tests.test_fleet_store import chain


def test_a_dozen_boards_lose_nothing_and_store_nothing_twice_on_every_configuration(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (scripts/test.sh installs it with apt-get)")
    plan = Plan(boards=12, procs=2, interval=0.5, duration=3.0, burst=5, offline=0.25, offline_for=1.0)
    results, _ = simulate(plan, tmp_path, pg_cluster)

    assert [r.config for r in results] == [
        "1 monitor on PostgreSQL", "2 monitors on PostgreSQL", "1 monitor on SQLite"
    ]
    for r in results:
        assert r.boards == 12
        assert r.sent >= 12 * 5 + 12 * 5, r  # every board reported in the steady phase and the burst
        assert (r.lost, r.duplicated, r.flagged, r.unacked) == (0, 0, 0, 0), r
        assert r.stored == r.sent, r
        assert r.queued_offline > 0, r  # boards went offline, kept their reports and sent them later
        # Every stored report has a commit time: latency and rates are figures, not judged here.
        assert r.latency_reports > 0 and not math.isnan(r.latency_p50_ms), r
        assert r.monitor_cpu_s_per_report > 0, r
    assert results[0].db_cpu_s_per_report is not None and results[2].db_cpu_s_per_report is None


def test_enrolling_a_batch_loads_the_ca_once_and_refuses_a_bad_enrolment_by_name(tmp_path: Path) -> None:
    from device_agent.errors import FormatError

    home = FleetHome(tmp_path / "fleet")
    home.init_ca(unencrypted=True)
    boards = make_boards(home, 3)
    assert sorted(home.device_keys()) == [d for d, _ in boards]
    assert all((home.certs / f"{d}.crt").is_file() and (home.certs / f"{d}.key").stat().st_mode & 0o777 == 0o600
               for d, _ in boards)
    good = (home.devices / f"{boards[0][0]}.json").read_bytes()
    with pytest.raises(FormatError, match="broken.json"):
        home.enrol_devices([(good, "good.json"), (b"{not json", "broken.json")])


# --- faults: every report stored exactly once in the end ------------------------------------------


def _burst(fleet: Fleet, boards: list[tuple[str, bytes]], start: int, n: int) -> None:
    """``n`` chained reports from each board, sequence numbers from ``start``; every PUBACK in."""
    from tests.test_monitor_hostile import publish

    for device, seed in boards:
        key = Ed25519PrivateKey.from_private_bytes(seed)
        publish(fleet, device, chain(n, start=start, key=key, device=device)).stop()


def _stored(url: str) -> list[tuple[str, int]]:
    import psycopg

    with psycopg.connect(url) as conn:
        return [(d, int(s)) for d, s in conn.execute("SELECT device_id, seq FROM reports").fetchall()]


def _flagged(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM security").fetchone()
    return int(row[0]) if row else 0


def _exactly_once(url: str, boards: list[tuple[str, bytes]], n: int) -> None:
    rows = _stored(url)
    assert len(rows) == len(set(rows))
    assert sorted(rows) == sorted((d, s) for d, _ in boards for s in range(1, n + 1))
    assert _flagged(url) == 0


def test_a_monitor_killed_mid_burst_loses_nothing_while_another_runs_and_stores_nothing_twice(
    fleet: Fleet, pg_url: str
) -> None:
    """Two monitor processes share a group on PostgreSQL; one is SIGKILLed while a burst is
    being stored, the other keeps running; restarted (same client id, as a supervisor does), the
    killed one gets what the broker kept for its session: every report once, nothing flagged."""
    boards = make_boards(fleet.home, 8)
    mons = [MonitorProc(fleet.home, fleet.port, pg_url, f"mon-{i}", "faults") for i in range(2)]
    try:
        _burst(fleet, boards, 1, 60)
        wait_until(lambda: len(_stored(pg_url)) >= 40, 60, "the burst to be stored in part")
        mons[0].proc.send_signal(signal.SIGKILL)
        mons[0].proc.wait(10)
        _burst(fleet, boards, 61, 60)  # more while it is dead: the broker keeps its share
        wait_until(lambda: len(_stored(pg_url)) >= 8 * 60, 60, "the survivor to go on")
        assert mons[1].proc.poll() is None
        # mosquitto keeps the dead monitor's share of the group for its session, not the survivor
        assert len(_stored(pg_url)) < 8 * 120
        mons[0] = MonitorProc(fleet.home, fleet.port, pg_url, "mon-0", "faults")
        wait_until(lambda: len(_stored(pg_url)) >= 8 * 120, 60, "every report")
        time.sleep(1)  # a report stored twice would show up now
        _exactly_once(pg_url, boards, 120)
    finally:
        for m in mons:
            if m.proc.poll() is None:
                m.stop()


def test_postgresql_restarted_mid_burst_loses_nothing_and_stores_nothing_twice(
    fleet: Fleet, pg_cluster: PgCluster
) -> None:
    """PostgreSQL stops while two monitors store a burst: a monitor that cannot commit stops
    with exit 4 and acknowledges nothing; restarted once the database is back (as a supervisor
    does), every report is stored once."""
    url = pg_cluster.new_database()
    boards = make_boards(fleet.home, 8)
    mons = [MonitorProc(fleet.home, fleet.port, url, f"mon-{i}", "pg-restart") for i in range(2)]
    try:
        _burst(fleet, boards, 1, 60)
        wait_until(lambda: len(_stored(url)) >= 40, 60, "the burst to be stored in part")
        pg_cluster.stop("fast")
        try:
            _burst(fleet, boards, 61, 60)
            wait_until(lambda: all(m.proc.poll() is not None for m in mons), 60,
                       "both monitors to stop on the lost database")
            assert [m.proc.returncode for m in mons] == [4, 4]
        finally:
            pg_cluster.start()
        mons = [MonitorProc(fleet.home, fleet.port, url, f"mon-{i}", "pg-restart") for i in range(2)]
        wait_until(lambda: len(_stored(url)) >= 8 * 120, 60, "every report")
        time.sleep(1)
        _exactly_once(url, boards, 120)
    finally:
        for m in mons:
            if m.proc.poll() is None:
                m.stop()
