"""Fleet monitor ingest benchmark: verify + store rate as a ratio of a bare paho subscriber's.

Both subscribers drain the same kind of backlog from the same private mosquitto (started from the
project's generated configuration) in the same run: N signed reports are queued for a persistent
session while the subscriber is away, then it connects and the clock runs until the last
report is received (bare) or verified and committed (monitor). Target: ratio >= 0.8, zero loss.

    .venv/bin/python benchmarks/fleet.py [--reports 10000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from device_agent.agent import Agent  # noqa: E402
from device_agent.crypto import ed25519_public_raw  # noqa: E402
from device_agent.mqtt import Broker, Link, Session  # noqa: E402
from device_agent.report import Report, encode_report  # noqa: E402
from device_agent.store import KeySource, utcnow  # noqa: E402
from fleet.broker import write_broker_config  # noqa: E402
from fleet.ca import FleetHome  # noqa: E402
from fleet.monitor import DEFAULT_MONITOR, Monitor  # noqa: E402
from fleet.store import MonitorStore  # noqa: E402
from tests.fixtures.fleet import free_port, wait_until  # noqa: E402

DEVICE = "bench-001"


def publish_backlog(board: Broker, payloads: list[tuple[str, bytes]]) -> None:
    acks = 0
    done = threading.Event()

    def on_ack(_mid: int, ok: bool) -> None:
        nonlocal acks
        acks += 1
        if acks == len(payloads):
            done.set()

    link = Link(board, Session("bench-pub", max_inflight=1000), on_ack=on_ack)
    link.start()
    link.require_connected(10)
    for name, payload in payloads:
        link.publish(name, payload)
    if not done.wait(300):
        raise SystemExit(f"publisher: only {acks} of {len(payloads)} acknowledged")
    link.stop()


def bare_rate(operator: Broker, board: Broker, payloads: list[tuple[str, bytes]]) -> float:
    """A plain paho subscriber that only counts (auto-ack, same session options)."""
    count = 0
    first = last = 0.0

    def on_message(_t: str, _p: bytes, _mid: int) -> None:
        nonlocal count, first, last
        count += 1
        last = time.perf_counter()
        first = first or last

    session = Session(
        "bench-bare",
        clean_start=False,
        session_expiry=3600,
        receive_maximum=DEFAULT_MONITOR.receive_maximum,
    )
    link = Link(operator, session, on_message=on_message)
    link.subscribe("edgeward/v1/+/events")
    link.start()
    link.require_connected(10)
    link.stop()
    publish_backlog(board, payloads)
    start = time.perf_counter()
    link = Link(operator, session, on_message=on_message)
    link.start()
    wait_until(lambda: count >= len(payloads), 300, "the bare subscriber")
    link.stop()
    if count != len(payloads):
        raise SystemExit(f"bare subscriber received {count}, expected {len(payloads)}")
    return len(payloads) / (last - start)


def monitor_rate(
    home: FleetHome, operator: Broker, board: Broker, payloads: list[tuple[str, bytes]], db: Path
) -> float:
    """The real monitor: shared subscription, verify every signature, batch commit, ack after."""
    store = MonitorStore(db)
    mon = Monitor(home, store, operator, "bench-monitor")
    mon.start()
    mon.link.require_connected(10)
    mon.stop()
    publish_backlog(board, payloads)
    mon = Monitor(home, store, operator, "bench-monitor")
    start = time.perf_counter()
    mon.start()
    wait_until(lambda: mon.processed >= len(payloads), 300, "the monitor")
    elapsed = time.perf_counter() - start
    mon.stop()
    stored = len(store.reports(DEVICE, "events", limit=10 * len(payloads)))
    flagged = len([e for e in store.events() if e["source"] == "monitor"])
    store.close()
    if stored != len(payloads) or flagged:
        raise SystemExit(f"monitor stored {stored} of {len(payloads)}, flagged {flagged}")
    return len(payloads) / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reports", type=int, default=10_000)
    args = ap.parse_args()
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with tempfile.TemporaryDirectory(prefix="edgeward-bench-") as tmp_s:
        tmp = Path(tmp_s)
        home = FleetHome(tmp / "fleet")
        home.init_ca()
        home.enrol_operator("ops")
        port = free_port()
        files = write_broker_config(home, tmp / "broker", bind="127.0.0.1", port=port)
        proc = subprocess.Popen([mosquitto, "-c", str(files.conf)], stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            keys = KeySource(passphrase=b"benchmark")
            publisher = ed25519_public_raw(Ed25519PrivateKey.generate())
            enrolment = Agent.provision(tmp / "board", DEVICE, [publisher], [], keys)
            home.enrol_device(enrolment, "bench")
            signer = Agent(tmp / "board", keys).store.unlock(keys).signer()
            now = utcnow()
            payloads = []
            for seq in range(1, args.reports + 1):
                event = {
                    "kind": "ood",
                    "severity": "warning",
                    "seq": seq,
                    "evidence": {"score": 0.9},
                }
                r = Report(DEVICE, seq, "events", now, {"event": event})
                payloads.append((r.topic, encode_report(r, signer)))
            c = home.certs
            operator = Broker("127.0.0.1", port, home.ca_cert, c / "ops.crt", c / "ops.key")
            board = Broker(
                "127.0.0.1", port, home.ca_cert, c / f"{DEVICE}.crt", c / f"{DEVICE}.key"
            )
            bare = bare_rate(operator, board, payloads)
            monitor = monitor_rate(home, operator, board, payloads, tmp / "monitor.db")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
    result = {
        "reports": args.reports,
        "bare_paho_msgs_per_s": round(bare),
        "monitor_verify_store_msgs_per_s": round(monitor),
        "ratio": round(monitor / bare, 3),
        "target_ratio": 0.8,
        "lost": 0,
    }
    print(json.dumps(result, indent=2))
    print(
        f"monitor ingest {monitor:,.0f}/s vs bare paho {bare:,.0f}/s: ratio {monitor / bare:.2f} "
        f"(target >= 0.80), {args.reports} reports, zero loss",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
