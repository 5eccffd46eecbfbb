"""Fleet monitor ingest benchmark: verify + store rate as a ratio of a bare paho subscriber's.

Same private mosquitto (started from the project's generated configuration), same run, N signed
reports from one board, hash-chained as the board's outbox sends them (each names its
predecessor's digest), two measurements:

* drain (capacity): the reports are queued for a persistent session while the subscriber is
  away; the clock runs from connecting until the last one is received (bare) or authenticated
  and committed (monitor);
* live: one board publishes them as fast as QoS 1 allows while the subscriber is connected; the
  clock runs from the first publish until the last one is received / authenticated and committed.

Target: ratio >= 0.8, zero loss (the monitor's store is checked: every report once, none flagged).

A third line, floor (no target), drains N reports that name no predecessor, so the monitor
checks every one on its own signature: its cost for reports that arrive without a chained
successor in the same chunk, such as single reports from many different boards.

    .venv/bin/python benchmarks/fleet.py [--reports 10000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
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

from benchmarks._results import record  # noqa: E402
from device_agent.agent import Agent  # noqa: E402
from device_agent.crypto import ed25519_public_raw  # noqa: E402
from device_agent.store.datadir import utcnow  # noqa: E402
from device_agent.store.keys import KeySource  # noqa: E402
from device_agent.telemetry.mqtt import Broker, Link, Session  # noqa: E402
from device_agent.telemetry.report import NO_PREV, Report, encode_report, payload_digest  # noqa: E402
from fleet.broker import write_broker_config  # noqa: E402
from fleet.ca import FleetHome  # noqa: E402
from fleet.monitor import DEFAULT_MONITOR, Monitor, MonitorConfig  # noqa: E402
from fleet.store import MonitorStore  # noqa: E402
from tests.fixtures.fleet import free_port, wait_until  # noqa: E402

DEVICE = "bench-001"


def publish(board: Broker, payloads: list[tuple[str, bytes]]) -> None:
    """Publish from a separate process, so the board never competes for the subscriber's GIL."""
    proc = multiprocessing.get_context("spawn").Process(target=publish_here, args=(board, payloads))
    proc.start()
    proc.join(300)
    if proc.exitcode != 0:
        raise SystemExit(f"publisher process failed ({proc.exitcode})")


def publish_here(board: Broker, payloads: list[tuple[str, bytes]]) -> None:
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


class BareSubscriber:
    """A plain paho subscriber that only counts (auto-ack; same session options as the monitor)."""

    def __init__(self, operator: Broker, client_id: str) -> None:
        self.operator = operator
        self.client_id = client_id
        self.session = Session(
            client_id,
            clean_start=False,
            session_expiry=3600,
            receive_maximum=DEFAULT_MONITOR.receive_maximum,
        )
        self.received = 0
        self._link: Link | None = None

    def _on_message(self, _t: str, _p: bytes, _mid: int) -> None:
        self.received += 1

    def open(self) -> None:
        self._link = Link(self.operator, self.session, on_message=self._on_message)
        self._link.subscribe("edgeward/v1/+/events")
        self._link.start()
        self._link.require_connected(10)

    def prepare(self) -> None:
        pass

    def close(self) -> None:
        assert self._link is not None
        self._link.stop()

    def handled(self) -> int:
        return self.received

    def check(self, expected: int) -> None:
        if self.received != expected:
            raise SystemExit(f"bare subscriber received {self.received}, expected {expected}")


class MonitorSubscriber:
    """The real monitor: shared subscription, every signature verified, batch commit, ack after."""

    def __init__(self, home: FleetHome, operator: Broker, client_id: str, db: Path) -> None:
        self.home = home
        self.operator = operator
        self.client_id = client_id
        self.store = MonitorStore(db)
        self.done = 0
        self._mon: Monitor | None = None

    def prepare(self) -> None:
        """Construct the monitor (it spawns its helper process) before a clock starts."""
        config = MonitorConfig(group=self.client_id)  # its own shared group
        self._mon = Monitor(self.home, self.store, self.operator, self.client_id, config)

    def open(self) -> None:
        if self._mon is None:
            self.prepare()
        assert self._mon is not None
        self._mon.start()
        self._mon.link.require_connected(10)

    def close(self) -> None:
        assert self._mon is not None
        self._mon.stop()
        self.done += self._mon.processed
        self._mon = None

    def handled(self) -> int:
        return self.done + (self._mon.processed if self._mon else 0)

    def check(self, expected: int) -> None:
        stored = len(self.store.reports(DEVICE, "events", limit=10 * expected))
        flagged = len([e for e in self.store.events() if e["source"] == "monitor"])
        self.store.close()
        if stored != expected or flagged:
            raise SystemExit(f"monitor stored {stored} of {expected}, flagged {flagged}")


Subscriber = BareSubscriber | MonitorSubscriber


def forget(operator: Broker, client_id: str) -> None:
    """End a persistent session so it stops collecting messages during later measurements."""
    link = Link(operator, Session(client_id, clean_start=True))
    link.start()
    link.require_connected(10)
    link.stop()


def rate(sub: Subscriber, board: Broker, payloads: list[tuple[str, bytes]], backlog: bool) -> float:
    """Reports handled per second. backlog (drain, capacity): the reports are queued while the
    subscriber is away and the clock runs from connecting; otherwise (live) one board publishes
    them as fast as QoS 1 allows while the subscriber is connected and the clock runs from the
    first publish."""
    if backlog:
        sub.open()  # create the persistent session, then leave
        sub.close()
        publish(board, payloads)
    sub.prepare()
    start = time.perf_counter()
    sub.open()
    if not backlog:
        start = time.perf_counter()
        publish(board, payloads)
    wait_until(lambda: sub.handled() >= len(payloads), 300, "every report")
    elapsed = time.perf_counter() - start
    sub.close()
    sub.check(len(payloads))
    forget(sub.operator, sub.client_id)
    return len(payloads) / elapsed


TARGET = 0.8


def reports(signer: Ed25519PrivateKey, n: int, chained: bool) -> list[tuple[str, bytes]]:
    """n signed event reports from the benchmark board; chained as its outbox sends them, or each
    naming no predecessor."""
    now = utcnow()
    out: list[tuple[str, bytes]] = []
    prev = NO_PREV
    for seq in range(1, n + 1):
        event = {"kind": "ood", "severity": "warning", "seq": seq, "evidence": {"score": 0.9}}
        r = Report(DEVICE, seq, "events", now, {"event": event})
        out.append((r.topic, encode_report(r, signer, prev)))
        if chained:
            prev = payload_digest(out[-1][1])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reports", type=int, default=10_000)
    args = ap.parse_args()
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with tempfile.TemporaryDirectory(prefix="edgeward-bench-") as tmp_s:
        tmp = Path(tmp_s)
        home = FleetHome(tmp / "fleet")
        home.init_ca(unencrypted=True)
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
            payloads = reports(signer, args.reports, chained=True)
            unchained = reports(signer, args.reports, chained=False)
            c = home.certs
            operator = Broker("127.0.0.1", port, home.ca_cert, c / "ops.crt", c / "ops.key")
            board = Broker(
                "127.0.0.1", port, home.ca_cert, c / f"{DEVICE}.crt", c / f"{DEVICE}.key"
            )
            # (mode, from a backlog?, workload): bare paho first, then the monitor.
            plan = [("drain", True, payloads), ("live", False, payloads), ("floor", True, unchained)]
            rates = {
                mode: (
                    rate(BareSubscriber(operator, f"bare-{mode}"), board, work, backlog),
                    rate(
                        MonitorSubscriber(home, operator, f"monitor-{mode}", tmp / f"{mode}.db"),
                        board,
                        work,
                        backlog,
                    ),
                )
                for mode, backlog, work in plan
            }
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
    result: dict[str, object] = {"reports": args.reports, "target_ratio": TARGET, "lost": 0}
    missed = 0
    for mode, (bare, monitor) in rates.items():
        result[mode] = {
            "bare_paho_msgs_per_s": round(bare),
            "monitor_verify_store_msgs_per_s": round(monitor),
            "ratio": round(monitor / bare, 3),
        }
        note = f"monitor {monitor:,.0f}/s vs bare paho {bare:,.0f}/s, {args.reports} reports, zero loss"
        if mode == "floor":
            verdict = "no target: every report checked on its own signature"
            record("fleet", "monitor ingest / bare paho, floor (unchained reports)", round(monitor / bare, 2),
                   "ratio", note=note)
        else:
            met = monitor / bare >= TARGET
            missed += not met
            verdict = f"target >= {TARGET:.2f}: {'PASS' if met else 'MISS'}"
            record("fleet", f"monitor ingest (verify + store) / bare paho, {mode}", round(monitor / bare, 2),
                   "ratio", f">= {TARGET:.2f}", met, note)
        print(
            f"{mode:>5}: monitor ingest {monitor:,.0f}/s vs bare paho {bare:,.0f}/s: "
            f"ratio {monitor / bare:.2f} ({verdict}), {args.reports} reports, zero loss",
            file=sys.stderr,
        )
    print(json.dumps(result, indent=2))
    return 1 if missed else 0  # benchmarks/run.sh reports scripts that miss a target


if __name__ == "__main__":
    sys.exit(main())
