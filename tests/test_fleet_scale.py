"""The fleet simulator at test size: a dozen enrolled boards, each with its own certificate and
TLS connection to a real mosquitto, some going offline and coming back, against 1 and 2 monitors
on a real PostgreSQL and 1 on SQLite (``benchmarks/fleet_scale.py`` runs the same code with
1,000 boards)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks.fleet_scale import Plan, simulate
from fleet.ca import FleetHome
from tests.fixtures.fleet import MOSQUITTO
from tests.fixtures.postgres import PgCluster, pg_cluster_fixture  # noqa: F401


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
    from benchmarks.fleet_scale import make_boards
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
