"""Prometheus /metrics of a monitor: a burst of real signed reports (and forged, malformed,
replayed and unknown ones) through a real mosquitto, scraped over HTTP and read with the
Prometheus text parser, every figure checked against the store."""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families

from device_agent.telemetry.mqtt import Link, Session
from device_agent.telemetry.report import NO_PREV, Report, encode_report, payload_digest, topic
from fleet.access import Access
from fleet.metrics import MonitorMetrics, metrics_server
from fleet.monitor import Monitor, MonitorConfig
from fleet.store import MonitorStore
from fleet.views import device_views
from tests.fixtures.fleet import Fleet, fleet_fixture, wait_until  # noqa: F401

MONITOR = "mon-metrics"


def publish_as(fleet: Fleet, cn: str, messages: list[tuple[str, bytes]]) -> None:
    acks: list[bool] = []
    link = Link(fleet.broker(cn), Session(f"{cn}-raw"), on_ack=lambda _m, ok: acks.append(ok))
    link.start()
    link.require_connected(10)
    for name, payload in messages:
        link.publish(name, payload)
    wait_until(lambda: len(acks) == len(messages), 20, "every PUBACK")
    link.stop()
    assert all(acks)


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name -> {sorted labels: value}, through prometheus-client's text parser."""
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 -- a local test server
        assert r.headers["Content-Type"].startswith("text/plain; version=")
        text = r.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_metrics_after_a_burst_through_mosquitto_match_the_store(
    fleet: Fleet, make_board: Any, tmp_path: Path
) -> None:
    board = make_board("pi-001")
    fleet.enrol(board.enrolment)
    ghost = make_board("pi-ghost")
    fleet.enrol(ghost.enrolment)
    (fleet.home.devices / "pi-ghost.json").unlink()  # it has a certificate but is not enrolled
    signer = board.agent().store.unlock(board.keys).signer()
    now = datetime.now(UTC)

    items: list[tuple[str, dict[str, Any]]] = [("status", {"state": "online",
                                                           "models": [{"model_id": "digits", "version": 4}]})]
    for i in range(60):
        kind = ("ood", "extraction", "probing")[i % 3]
        items.append(("events", {"event": {"kind": kind, "severity": "warning" if i % 2 else "critical",
                                           "evidence": {"i": i}}}))
    items.append(("telemetry", {"counters": {"queries": 900, "answered": 850, "refused_429": 50,
                                             "detections_ood": 20, "detections_extraction": 20}, "outbox": {}}))
    burst, prev = [], NO_PREV
    for seq, (kind, data) in enumerate(items, start=1):
        r = Report("pi-001", seq, kind, now, data)
        burst.append((r.topic, encode_report(r, signer, prev)))
        prev = payload_digest(burst[-1][1])
    wrong_key = encode_report(Report("pi-001", 500, "events", now, {}), Ed25519PrivateKey.generate())
    reused = encode_report(Report("pi-001", 3, "events", now, {"event": {"kind": "other"}}), signer)
    hostile = [
        (topic("pi-001", "events"), wrong_key),  # forged
        (topic("pi-001", "events"), wrong_key[:-3] + b"xyz"),  # forged (signature does not verify)
        (topic("pi-001", "status"), b"not a report"),  # malformed
        (topic("pi-001", "events"), reused),  # replayed: seq 3 again with other content
    ]

    store = MonitorStore(tmp_path / "monitor.db")
    reads = MonitorStore(tmp_path / "monitor.db")
    mine = MonitorMetrics(MONITOR)
    server = metrics_server(fleet.home, reads, mine, "127.0.0.1", 0, Access(), 90.0)
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    mon = Monitor(fleet.home, store, fleet.operator, MONITOR, MonitorConfig(redelivery_window=1000),
                  on_chunk=mine.observe)
    try:
        mon.start()
        mon.link.require_connected(10)
        publish_as(fleet, "pi-001", burst + hostile)
        ghost_sig = ghost.agent().store.unlock(ghost.keys).signer()
        publish_as(fleet, "pi-ghost", [(topic("pi-ghost", "status"),
                                        encode_report(Report("pi-ghost", 1, "status", now, {}), ghost_sig))])
        total = len(burst) + len(hostile) + 1
        wait_until(lambda: mon.processed >= total, 30, "the monitor to commit every message")
        m = scrape(url)
    finally:
        mon.stop()
        server.shutdown()
        server.server_close()

    def one(name: str, **labels: str) -> float:
        return m[name][tuple(sorted(labels.items()))]

    # This monitor's ingest counters, against what the store holds.
    [dev] = [d for d in store.devices() if d["device_id"] == "pi-001"]
    assert dev["received"] == len(burst)
    assert one("edgeward_monitor_reports_total", monitor=MONITOR, verdict="accepted") == len(burst)
    assert one("edgeward_monitor_reports_total", monitor=MONITOR, verdict="duplicate") == dev["duplicates"]
    flagged = [e for e in store.events() if e["source"] == "monitor"]
    assert one("edgeward_monitor_reports_total", monitor=MONITOR, verdict="flagged") == len(flagged) == 5
    by_reason = {
        r: sum(1 for e in flagged if (("malformed" if e["detail"].startswith("malformed") else e["kind"]) == r))
        for r in ("forged", "malformed", "replayed", "unknown-device", "out-of-sequence", "unjudgeable")
    }
    assert by_reason == {"forged": 2, "malformed": 1, "replayed": 1, "unknown-device": 1,
                         "out-of-sequence": 0, "unjudgeable": 0}
    for reason, n in by_reason.items():
        assert one("edgeward_monitor_rejected_total", monitor=MONITOR, reason=reason) == n
    chunks = one("edgeward_monitor_ingest_seconds_count", monitor=MONITOR)
    assert chunks >= 1 and one("edgeward_monitor_ingest_seconds_sum", monitor=MONITOR) > 0
    assert one("edgeward_monitor_ingest_seconds_bucket", monitor=MONITOR, le="+Inf") == chunks

    # Fleet figures from the store: no board id in any label.
    views = device_views(fleet.home, store, datetime.now(UTC), 90.0)
    assert one("edgeward_fleet_boards", state="online") == sum(v["liveness"] == "online" for v in views) == 1
    assert one("edgeward_fleet_boards", state="never_seen") == 0
    assert one("edgeward_fleet_model_boards", model="digits", version="4") == 1
    assert one("edgeward_fleet_board_counter", counter="queries") == 900
    assert one("edgeward_fleet_board_counter", counter="detections_extraction") == 20
    day = {(e["source"], e["kind"], e["severity"]): e["count"]
           for e in store.event_counts(datetime.now(UTC).replace(year=2000))}
    shown = {(dict(k)["source"], dict(k)["kind"], dict(k)["severity"]): v
             for k, v in m["edgeward_fleet_security_events_day"].items()}
    assert shown == day and sum(v for (s, _, _), v in shown.items() if s == "board") == 60
    labels = {v for samples in m.values() for key in samples for _, v in key}
    assert "pi-001" not in labels and "pi-ghost" not in labels

    # The Grafana dashboard in docs/ reads only metrics the monitor exports.
    grafana = (Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json").read_text()
    exprs = [t["expr"] for p in json.loads(grafana)["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"edgeward_[a-z_]+", e)}
    assert used and used <= set(m), used - set(m)
    store.close()
    reads.close()


def test_fleet_monitor_command_serves_metrics_and_sends_alerts(
    fleet: Fleet, make_board: Any, capsys: Any
) -> None:
    """``edgeward fleet monitor --metrics-listen ... --alert-webhook ...`` end to end: reports
    queued at the broker for the monitor's session are ingested, counted on /metrics and each
    qualifying event is POSTed to a real local webhook once."""
    import threading

    from packager.cli import main as edgeward
    from tests.fixtures.fleet import free_port
    from tests.test_fleet_alerts import Webhook

    board = make_board("pi-001")
    fleet.enrol(board.enrolment)
    signer = board.agent().store.unlock(board.keys).signer()
    # The monitor's persistent session exists at the broker, so what the board publishes now waits
    # for the command below.
    store = MonitorStore(fleet.home.monitor_db)
    first = Monitor(fleet.home, store, fleet.operator, "mon-cli", MonitorConfig(group=None))
    first.start()
    first.link.require_connected(10)
    first.stop()
    store.close()
    now = datetime.now(UTC)
    burst, prev = [], NO_PREV
    for seq in range(1, 9):
        sev = "critical" if seq % 2 else "info"
        r = Report("pi-001", seq, "events", now, {"event": {"kind": "extraction", "severity": sev, "evidence": {}}})
        burst.append((r.topic, encode_report(r, signer, prev)))
        prev = payload_digest(burst[-1][1])
    publish_as(fleet, "pi-001", burst)

    hook = Webhook()
    port = free_port()
    seen: dict[str, Any] = {}
    returned = threading.Event()

    def watch() -> None:
        url = f"http://127.0.0.1:{port}/metrics"

        def done() -> bool:
            if returned.is_set():
                return True
            try:
                m = scrape(url)
            except OSError:
                return False
            seen["metrics"] = m
            accepted = m.get("edgeward_monitor_reports_total", {}).get(
                (("monitor", "mon-cli"), ("verdict", "accepted")), 0)
            return accepted == len(burst) and len(hook.keys()) == 4

        try:
            wait_until(done, 60, "the monitor's metrics and alerts")
            seen["ok"] = not returned.is_set()
        finally:
            if not returned.is_set():
                os.kill(os.getpid(), signal.SIGTERM)  # the command stops as on a service stop

    watcher = threading.Thread(target=watch)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    watcher.start()
    try:
        code = edgeward(["fleet", "monitor", "--fleet-dir", str(fleet.home.path), "--operator", "ops",
                         "--broker", f"127.0.0.1:{fleet.port}", "--client-id", "mon-cli", "--exclusive",
                         "--duration", "300", "--metrics-listen", f"127.0.0.1:{port}",
                         "--alert-webhook", hook.url, "--alert-severity", "critical"])
    finally:
        returned.set()
        watcher.join()
        hook.close()
        for sig, h in handlers.items():
            signal.signal(sig, h)
    assert seen.get("ok"), "the metrics or alerts never matched the burst"
    out = capsys.readouterr().out
    assert code == 0 and f"metrics on http://127.0.0.1:{port}/metrics" in out
    m = seen["metrics"]
    assert "pi-001" not in str(m)  # no board id in any label
    assert sorted(hook.keys()) == [f"board:pi-001:{s}" for s in (1, 3, 5, 7)]
    assert m["edgeward_fleet_security_events_day"][
        (("kind", "extraction"), ("severity", "critical"), ("source", "board"))] == 4
