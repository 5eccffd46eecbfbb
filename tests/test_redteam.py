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
