"""`edgeward-agent serve --broker ...`: the guarded service reports to the fleet while it serves.

A real board process, a real mosquitto from the project's generated configuration, and the real
fleet monitor: a detection made by the service arrives at the monitor as a verified, signed event,
and the heartbeat carries the service's counters (never inputs or client ids).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable

import numpy as np

from device_agent.store.datadir import utcnow
from fleet.monitor import Monitor
from tests.conftest import PASSPHRASE, Board
from tests.fixtures.fleet import Fleet, fleet_fixture, monitor_fixture, wait_until  # noqa: F401
from tests.fixtures.http import UnixConnection, predict
from tests.fixtures.serve import calibration_policy, wait_until_serving


def test_serve_forwards_detections_and_counters_to_the_fleet(
    fleet: Fleet, monitor: Monitor, make_board: Callable[..., Board], pack_for, digits, digits_test
) -> None:
    board = make_board("pi-serve")
    out = pack_for(digits.onnx, [board], policy=calibration_policy())
    board.agent().install((out / "pi-serve.ewb").read_bytes())
    broker = fleet.enrol(board.enrolment)
    _, token = board.agent().tokens().add("user", utcnow())
    sock = board.data_dir / "agent.sock"
    env = {**os.environ, "EDGEWARD_DEVICE_PASSPHRASE": PASSPHRASE.decode()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "device_agent.cli", "serve", "--data-dir", str(board.data_dir),
         "--broker", f"{broker.host}:{broker.port}", "--ca", str(broker.ca), "--cert", str(broker.cert),
         "--key", str(broker.key), "--heartbeat", "0.5"],
        env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until_serving(sock)
        conn = UnixConnection(sock)
        x, _ = digits_test
        for row in x[:5]:
            status, _, body = predict(conn, token, row)
            assert status == 200 and set(body) == {"label"}
        # A detector raises an OoD event after a few outlying queries from one client (ood_count).
        rng = np.random.default_rng(3)
        noise = rng.random((6, 64)).astype(np.float32)
        for row in noise:
            status, _, _ = predict(conn, token, row)
            assert status in (200, 429)

        def ood_arrived() -> bool:
            return any(e["data"]["event"]["kind"] == "ood" for e in monitor.store.reports("pi-serve", "events"))

        wait_until(ood_arrived, 20, "the service's OoD detection at the fleet monitor")

        def counted() -> bool:
            beats = monitor.store.reports("pi-serve", "telemetry")
            return any(b["data"].get("counters", {}).get("answered", 0) >= 5 for b in beats)

        wait_until(counted, 20, "a heartbeat with the service's counters")
        [ev] = [e for e in monitor.store.reports("pi-serve", "events") if e["data"]["event"]["kind"] == "ood"]
        # Evidence is summary data only: no raw input values travel to the fleet.
        assert not any(f"{float(v):.4f}" in str(ev) for v in noise.ravel())
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
