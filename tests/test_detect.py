"""Detection: OoD, extraction (PRADA), probing, rate anomalies and model integrity, on the real
digits model; and no false alarm on 10,000 benign queries."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.config import DetectConfig
from device_agent.service.detect import Calibration, Detector, calibrate, shapiro_w
from device_agent.service.events import EventStore
from device_agent.service.service import Service
from device_agent.service.tokens import TokenRecord
from tests.fixtures.serve import T0, SimClock, calibration_policy, digits_validation


@pytest.fixture(scope="module")
def cal() -> Calibration:
    c = Calibration.from_policy({"ood": calibrate(digits_validation())})
    assert c is not None
    return c


@pytest.mark.parametrize("n", [5, 11, 50, 200])
def test_shapiro_w_matches_scipy(n: int) -> None:
    from scipy.stats import shapiro

    x = np.random.default_rng(n).gamma(2.0, size=n)
    assert shapiro_w(x) == pytest.approx(shapiro(x).statistic, abs=1e-6)


def test_ood_flags_noise_not_held_out_digits(cal: Calibration, digits_test: Any) -> None:
    x, _ = digits_test
    assert max(cal.score(r.astype(np.float64)) for r in x) < cal.threshold
    noise = np.random.default_rng(0).random((50, 64))
    assert min(cal.score(r) for r in noise) > cal.threshold


def test_noise_queries_raise_an_ood_event_within_a_few_queries(cal: Calibration) -> None:
    d = Detector(cal)
    rng = np.random.default_rng(1)
    first = next(
        i for i in range(100) if d.observe("a", rng.random(64), int(rng.integers(10)), T0 + i)
    )
    assert first + 1 == DetectConfig().ood_count
    assert d.anomaly("a") == 1.0


def test_near_duplicates_are_probing_but_exact_repeats_are_not(
    cal: Calibration, digits_test: Any
) -> None:
    x, y = digits_test
    d = Detector(cal)
    for i in range(200):  # an application resending the same few inputs
        assert d.observe("app", x[i % 3], int(y[i % 3]), T0 + i) == []
    rng = np.random.default_rng(2)
    sigs = []
    for i in range(20):
        sigs += d.observe("probe", x[0] + rng.normal(0, 0.01, 64), int(y[0]), T0 + i)
    assert [s.kind for s in sigs] == ["probing"] and sigs[0].evidence[
        "queries"
    ] <= DetectConfig().probe_count + 1


def test_synthetic_extraction_fails_the_prada_normality_test(
    cal: Calibration, digits_test: Any
) -> None:
    """JbDA-style synthetic queries (a few seeds pushed step by step along sign directions)
    give distances that are far from normal."""
    x, y = digits_test
    d = Detector(None, DetectConfig(prada_min=20))  # no calibration: PRADA alone
    rng = np.random.default_rng(3)
    kinds = []
    for i in range(200):
        seed = i % 10
        v = np.clip(x[seed] + 0.05 * (i // 10 + 1) * rng.choice([-1, 1], 64), 0, 1)
        kinds += [s.kind for s in d.observe("jbda", v, int(y[seed]), T0 + i)]
    assert "extraction" in kinds


def test_rate_anomaly_after_repeated_refusals() -> None:
    d = Detector(None)
    sigs = [s for i in range(12) for s in d.refused("greedy", T0 + i)]
    assert [s.kind for s in sigs] == ["rate"] and d.anomaly("greedy") == 1.0
    assert d.refused("patient", T0) == [] and d.anomaly("patient") == 0.0


def test_events_are_rate_limited_per_client_and_kind(cal: Calibration) -> None:
    d = Detector(cal, DetectConfig(cooldown=60))
    rng = np.random.default_rng(4)
    sigs = [s for i in range(100) for s in d.observe("a", rng.random(64), 0, T0 + i * 0.1)]
    assert [s.kind for s in sigs].count("ood") == 1  # 10 s of noise: one event, not a flood


def _installed(
    make_board: Callable[..., Any],
    pack_for: Callable[..., Path],
    digits: Any,
    policy: dict[str, Any],
) -> Any:
    board = make_board()
    out = pack_for(digits.onnx, [board], policy=policy)
    board.agent().install((out / f"{board.device_id}.ewb").read_bytes())
    return board


def _who(i: int, role: str = "user") -> TokenRecord:
    from datetime import UTC, datetime

    return TokenRecord(f"client{i:02d}", role, "0" * 64, datetime.now(UTC))


def test_zero_detections_over_10000_benign_queries(
    make_board: Callable[..., Any], pack_for: Callable[..., Path], digits: Any, digits_test: Any
) -> None:
    """The digits test split replayed in random order by 10 clients, each about one query a second
    (Poisson arrivals), through the whole service path with a simulated clock."""
    board = _installed(make_board, pack_for, digits, calibration_policy())
    clock = SimClock()
    service = Service(board.agent(), clock=clock, monotonic=clock)  # the throttle runs on it too
    x, _ = digits_test
    rng = np.random.default_rng(7)
    arrivals = [(t, c) for c in range(10) for t in T0 + np.cumsum(rng.exponential(1.0, 1000))]
    arrivals.sort()
    answered = 0
    for t, c in arrivals:
        clock.t = t
        body = json.dumps({"inputs": x[rng.integers(len(x))].tolist()}).encode()
        service.predict(_who(c), body, "application/json")
        answered += 1
    service.stop()
    events = EventStore(board.data_dir / "events.db").list()
    assert answered == 10_000 and events == []
    assert service.counters["answered"] == 10_000


def test_integrity_failure_stops_serving_and_is_recorded(
    make_board: Callable[..., Any], pack_for: Callable[..., Path], digits: Any, digits_test: Any
) -> None:
    from device_agent.errors import NotInstalled

    board = _installed(make_board, pack_for, digits, {})
    service = Service(board.agent())
    body = json.dumps({"inputs": digits_test[0][0].tolist()}).encode()
    service.predict(_who(0), body, "application/json")
    assert service.check_integrity()
    bundle = next((board.data_dir / "bundles").glob("*.ewb"))
    data = bytearray(bundle.read_bytes())
    data[-100] ^= 0x01  # a flipped bit in the stored, encrypted model
    bundle.write_bytes(bytes(data))
    assert not service.check_integrity()
    with pytest.raises(NotInstalled, match="serving stopped"):
        service.predict(_who(0), body, "application/json")
    (event,) = EventStore(board.data_dir / "events.db").list()
    assert event.kind == "integrity" and event.severity == "critical"
    assert service.status_provider()["integrity"] == "failed"
    service.stop()


def test_events_command_lists_detections_as_json(
    make_board: Callable[..., Any], pack_for: Callable[..., Path], digits: Any
) -> None:
    import subprocess
    import sys

    board = _installed(make_board, pack_for, digits, calibration_policy())
    service = Service(board.agent(), clock=SimClock())
    rng = np.random.default_rng(5)
    for _ in range(5):
        body = json.dumps({"inputs": rng.random(64).tolist()}).encode()
        service.predict(_who(1), body, "application/json")
    service.stop()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "device_agent.cli",
            "events",
            "--json",
            "--data-dir",
            str(board.data_dir),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    (ev,) = json.loads(out.stdout)
    assert (
        ev["kind"] == "ood" and ev["client"] == "client01" and ev["evidence"]["ood_in_window"] == 3
    )
