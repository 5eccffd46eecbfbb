"""``edgeward redteam`` against the digits model: the measured targets of issue 4, in one run."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from tests.fixtures.serve import digits_validation

pytest.importorskip("art")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, digits: Any) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("redteam")
    np.savez(d / "val.npz", x=digits_validation())
    out = d / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "packager.cli",
            "redteam",
            str(digits.onnx),
            "--test",
            str(digits.test),
            "--validation",
            str(d / "val.npz"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "agent  hopskipjump" in proc.stdout  # the table is printed
    return dict(json.loads(out.read_text()))


def test_hopskipjump_is_detected_within_50_queries(report: dict[str, Any]) -> None:
    r = report["targets"]["agent"]["hopskipjump"]
    assert (
        r["queries_before_first_detection"] is not None
        and r["queries_before_first_detection"] <= 50
    )
    assert r["queries_refused_by_throttling"] > 0  # and the flagged client is slowed down
    assert report["targets"]["bare"]["hopskipjump"]["queries_refused_by_throttling"] == 0


def test_noise_pool_extraction_is_detected_within_100_queries(report: dict[str, Any]) -> None:
    r = report["targets"]["agent"]["copycat-noise"]
    assert (
        r["queries_before_first_detection"] is not None
        and r["queries_before_first_detection"] <= 100
    )


def test_zero_detections_over_10000_benign_queries_through_the_api(report: dict[str, Any]) -> None:
    r = report["targets"]["agent"]["benign"]
    assert (
        r["queries_answered"] == 10_000
        and r["detections"] == 0
        and r["queries_refused_by_throttling"] == 0
    )


def test_natural_data_extraction_is_reported_honestly(report: dict[str, Any]) -> None:
    """Label-only answers do not stop CopycatCNN with natural data (DESIGN.md): the report must
    show the surrogate's real agreement, on both targets."""
    for target in ("bare", "agent"):
        r = report["targets"][target]["copycat-natural"]
        assert r["completed"] and 0.0 <= r["agreement_with_victim"] <= 1.0
    assert report["victim_accuracy"] > 0.9


def test_adaptive_attacks_are_reported_beside_the_non_adaptive_one(report: dict[str, Any]) -> None:
    """Each adaptive attack has its row: queries to the first detection and what the attacker
    had by then, beside plain HopSkipJump."""
    agent = report["targets"]["agent"]
    for name in ("hopskipjump", "hopskipjump-paced", "hopskipjump-sybil", "hopskipjump-mixed"):
        r = agent[name]
        assert r["completed"] and 0.0 <= r["evasion_by_first_detection"] <= 1.0
        assert r["queries_before_first_detection"] is not None and r["queries_before_first_detection"] <= 50, name
    assert agent["hopskipjump-sybil"]["tokens"] == 5
    # The board-wide detector links the five tokens within the bound whichever detector fires
    # first (the attack starts from noise, so the out-of-distribution one sometimes does).
    assert agent["hopskipjump-sybil"]["first_detection_by_kind"].get("linked", 10**9) <= 50
    assert agent["hopskipjump-mixed"]["cover_queries_answered"] > agent["hopskipjump-mixed"]["queries_answered"]


def test_a_patient_natural_data_thief_inside_the_budget_is_limited_by_the_budget(report: dict[str, Any]) -> None:
    """What the detectors cannot catch, said plainly: natural data spread over several budget
    windows is never refused; it costs the attacker days, which is all the budget can do."""
    r = report["targets"]["agent"]["copycat-budget"]
    days = report["config"]["budget_days"]
    assert r["completed"] and r["queries_refused_by_throttling"] == 0
    assert r["simulated_seconds"] >= (days - 1) * 86400
    assert r["agreement_by_first_detection"] is not None


def test_a_drifting_sensor_raises_no_alarm(report: dict[str, Any]) -> None:
    """A sensor whose gain or brightness drifts resends near-duplicates: sensor changes, not
    probing; no event of any kind, and so no slowdown and no refusal."""
    for name in ("benign-sensor-drift", "benign-sensor-offset"):
        r = report["targets"]["agent"][name]
        assert r["queries_answered"] == report["config"]["sensor_drift_queries"], name
        assert r["detections"] == 0 and r["queries_refused_by_throttling"] == 0, (name, r["detections_by_kind"])


def test_an_attacker_who_makes_every_probe_a_gain_change_is_measured(report: dict[str, Any]) -> None:
    """What the sensor-change exemption costs, in the report: the gain walk's near-duplicates do
    not count as probing, so it is caught only where its labels flip; what it found by then is
    reported beside what a gain change can find at all."""
    r = report["targets"]["agent"]["gain-walk"]
    assert r["completed"] and r["samples"] == report["config"]["walk_samples"]
    assert r["queries_before_first_detection"] is not None
    assert 0.0 <= r["evasion_by_first_detection"] <= r["evasion_success_rate"] <= 1.0
