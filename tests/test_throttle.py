"""Throttling decisions: pure code, driven by ``now``."""

from __future__ import annotations

import math

import pytest

from device_agent.config import BudgetConfig, ThrottleConfig
from device_agent.errors import FormatError
from device_agent.service.throttle import Throttle

T0 = 1_800_000_000.0
B0 = 1_000.0  # boottime: the budget's clock
DAY = 86400.0


def test_client_bucket_bursts_then_refills_at_its_rate() -> None:
    t = Throttle(ThrottleConfig(client_rate=2, client_burst=3))
    assert [t.decide("a", T0).allowed for _ in range(3)] == [True, True, True]
    d = t.decide("a", T0)
    assert not d.allowed and d.reason == "client_rate" and d.retry_after == pytest.approx(0.5)
    assert t.decide("a", T0 + 0.5).allowed
    assert t.decide("b", T0).allowed  # another client has its own bucket


def test_global_bucket_is_shared() -> None:
    t = Throttle(ThrottleConfig(global_rate=1, global_burst=2))
    assert t.decide("a", T0).allowed and t.decide("b", T0).allowed
    d = t.decide("c", T0)
    assert not d.allowed and d.reason == "global_rate" and d.retry_after == pytest.approx(1.0)


def test_daily_budget_counts_rows_for_a_window_from_the_first_query() -> None:
    t = Throttle(ThrottleConfig(daily_budget=10, client_burst=100, client_rate=100))
    assert t.decide("a", B0, rows=10).allowed
    d = t.decide("a", B0 + 1)
    assert not d.allowed and d.reason == "daily_budget" and d.retry_after == pytest.approx(DAY - 1)
    assert t.used("a", B0 + 1) == 10
    assert not t.decide("a", B0 + DAY - 0.001).allowed
    assert t.decide("a", B0 + DAY).allowed  # the next window opens
    assert t.used("a", B0 + DAY) == 1


def test_the_window_length_is_the_boards_setting() -> None:
    t = Throttle(ThrottleConfig(daily_budget=1), BudgetConfig(window_seconds=60))
    assert t.decide("a", B0).allowed and not t.decide("a", B0 + 59).allowed
    assert t.decide("a", B0 + 60).allowed


def test_refused_requests_do_not_spend_budget() -> None:
    t = Throttle(ThrottleConfig(client_rate=1, client_burst=1, daily_budget=5))
    assert t.decide("a", T0).allowed
    for _ in range(10):
        assert not t.decide("a", T0).allowed
    assert t.used("a", T0) == 1


def test_a_batch_larger_than_the_burst_can_never_pass() -> None:
    d = Throttle(ThrottleConfig(client_burst=4)).decide("a", T0, rows=5)
    assert not d.allowed and d.reason == "batch" and math.isinf(d.retry_after)


def test_anomaly_slows_a_client_down() -> None:
    t = Throttle(ThrottleConfig(client_rate=10, client_burst=1, anomaly_slowdown=9))
    assert t.client_rate(0.0) == 10 and t.client_rate(1.0) == pytest.approx(1.0)
    assert t.decide("a", T0, anomaly=1.0).allowed
    d = t.decide("a", T0, anomaly=1.0)
    assert d.retry_after == pytest.approx(1.0)  # ten times slower than a clean client


def test_a_clock_stepping_back_never_refills() -> None:
    # Boottime never steps back; an injected clock might: still no refill on a negative interval.
    t = Throttle(ThrottleConfig(client_rate=1, client_burst=1))
    assert t.decide("a", T0).allowed
    assert not t.decide("a", T0 - 3600).allowed
    assert not t.decide("a", T0 + 0.5).allowed
    assert t.decide("a", T0 + 1).allowed


def test_the_stricter_of_policy_and_local_config_wins() -> None:
    base = ThrottleConfig().tightest(
        {"client_rate": 5, "daily_budget": 1000, "anomaly_slowdown": 2}
    )
    merged = base.tightest({"client_rate": 50, "daily_budget": 10, "anomaly_slowdown": 40})
    assert (merged.client_rate, merged.daily_budget, merged.anomaly_slowdown) == (5, 10, 40)


@pytest.mark.parametrize(
    "raw", [{"client_rate": 0}, {"daily_budget": -1}, {"nope": 1}, {"client_rate": "fast"}]
)
def test_bad_limits_are_refused(raw: dict[str, object]) -> None:
    with pytest.raises(FormatError):
        ThrottleConfig.from_json(raw)


# --- reservations: what budgets.json must say before an answer ------------------------------------


def test_rows_are_reserved_on_disk_ahead_of_use_a_chunk_at_a_time() -> None:
    t = Throttle(ThrottleConfig(daily_budget=100, client_burst=100, client_rate=100), BudgetConfig(reserve_rows=10))
    assert not t.unsaved
    assert t.decide("a", B0, rows=3).allowed and t.unsaved  # first rows of a window: write first
    snap = t.snapshot(B0)
    assert snap.clients == {"a": (13, DAY)}  # 3 used + 10 reserved ahead
    t.saved(snap.generation)
    for _ in range(10):
        assert t.decide("a", B0).allowed and not t.unsaved  # within the reservation: no write
    assert t.decide("a", B0).allowed and t.unsaved  # the 14th row goes beyond it
    assert t.snapshot(B0 + 5).clients == {"a": (24, DAY - 5)}
    assert t.snapshot(B0 + 5, clean=True).clients == {"a": (14, DAY - 5)}  # at stop: exact counts


def test_a_reservation_never_goes_past_the_budget() -> None:
    t = Throttle(ThrottleConfig(daily_budget=5, client_burst=100, client_rate=100), BudgetConfig(reserve_rows=256))
    assert t.decide("a", B0).allowed
    assert t.snapshot(B0).clients == {"a": (5, DAY)}


def test_restored_windows_continue_and_count_as_fully_reserved() -> None:
    t = Throttle(ThrottleConfig(daily_budget=10, client_burst=100, client_rate=100))
    t.restore({"a": (10, 3600.0), "b": (4, 7200.0), "c": (9, 100.0)}, 0.0, now=5.0, elapsed=200.0)
    assert not t.decide("a", 5.0).allowed and t.decide("a", 5.0).retry_after == pytest.approx(3400)
    assert t.used("b", 5.0) == 4 and t.decide("b", 5.0, rows=6).allowed
    assert t.used("c", 5.0) == 0  # its window ended while the agent was down (same boot)
    longer = Throttle(ThrottleConfig(daily_budget=1), BudgetConfig(window_seconds=60))
    longer.restore({"a": (1, 3600.0)}, 0.0, now=0.0, elapsed=0.0)
    assert longer.decide("a", 0.0).retry_after == pytest.approx(60)  # cut to a shorter setting


def test_a_lockout_refuses_everyone_for_one_window_and_is_kept() -> None:
    t = Throttle(ThrottleConfig())
    t.lock_out(B0)
    assert t.unsaved and t.running(B0)
    d = t.decide("anyone", B0 + 10)
    assert not d.allowed and d.reason == "daily_budget" and d.retry_after == pytest.approx(DAY - 10)
    snap = t.snapshot(B0 + 10)
    assert snap.lockout == pytest.approx(DAY - 10)
    again = Throttle(ThrottleConfig())
    again.restore({}, snap.lockout, now=0.0, elapsed=0.0)
    assert not again.decide("anyone", DAY - 11).allowed and again.decide("anyone", DAY - 10).allowed
