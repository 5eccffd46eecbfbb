"""Alerts to a webhook: a real local HTTP server as the receiver, real signed reports in a real
store (SQLite and PostgreSQL), two monitors' alert threads on one store, a webhook outage and a
monitor that dies holding claims."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.crypto import ed25519_public_raw
from device_agent.errors import UsageError
from device_agent.telemetry.report import NO_PREV, Report, encode_report, payload_digest
from fleet.alerts import AlertConfig, Alerter, alert_payload, qualifies
from fleet.monitor import ingest
from fleet.store import Store, open_store
from tests.fixtures.postgres import (  # noqa: F401
    PgCluster,
    make_store_fixture,
    pg_cluster_fixture,
    pg_url_fixture,
)

KEY = Ed25519PrivateKey.generate()
KEYS = {"pi-1": ed25519_public_raw(KEY)}


class Webhook:
    """A local HTTP receiver: records each POSTed body; answers 503 while ``down``."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.refused = 0
        self.down = False
        hook = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *_a: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if hook.down:
                    hook.refused += 1
                    self.send_response(503)
                else:
                    hook.bodies.append(json.loads(body))
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def keys(self) -> list[str]:
        return [a["fingerprint"] for b in self.bodies for a in b["alerts"]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    w = Webhook()
    yield w
    w.close()


def board_events(severities: list[str], start: int = 1) -> list[tuple[str, bytes]]:
    out, prev = [], NO_PREV
    now = datetime.now(UTC)
    for i, sev in enumerate(severities):
        r = Report("pi-1", start + i, "events", now, {"event": {"kind": "extraction", "severity": sev,
                                                                  "evidence": {"n": i}}})
        out.append((r.topic, encode_report(r, KEY, prev)))
        prev = payload_digest(out[-1][1])
    return out


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def test_each_qualifying_event_is_sent_once_by_two_monitors_across_an_outage_and_a_dead_monitor(
    make_store: Callable[[], Store], webhook: Webhook
) -> None:
    store_a, store_b, store_c = make_store(), make_store(), make_store()
    sevs = ["warning", "info", "critical", "info", "warning", "critical"]
    ingest(store_a, KEYS, board_events(sevs), 80)
    forged = encode_report(Report("pi-1", 50, "events", datetime.now(UTC), {}), Ed25519PrivateKey.generate())
    ingest(store_a, KEYS, [("edgeward/v1/pi-1/events", forged)], 80)  # a monitor event: critical
    expected = {f"board:pi-1:{i + 1}" for i, s in enumerate(sevs) if s != "info"}
    monitor_keys = [e["key"] for e in store_a.alert_candidates(
        datetime.now(UTC) - timedelta(hours=1), "x", datetime.now(UTC), 100) if e["source"] == "monitor"]
    assert len(monitor_keys) == 1
    expected |= set(monitor_keys)

    clock = Clock()
    cfg = {"url": webhook.url, "min_severity": "warning", "lease_s": 60.0, "backoff": (0.0,)}
    a = Alerter(store_a, AlertConfig(monitor="mon-a", **cfg), clock=clock)  # type: ignore[arg-type]
    b = Alerter(store_b, AlertConfig(monitor="mon-b", **cfg), clock=clock)  # type: ignore[arg-type]

    # The webhook is down: monitor a claims everything qualifying and fails; b finds nothing free.
    webhook.down = True
    assert a.run_once() == 0
    assert webhook.refused == len(expected)
    assert b.run_once() == 0 and webhook.refused == len(expected)  # a's claims are live
    assert a.run_once() == 0 and webhook.refused == 2 * len(expected)  # a retries its own
    assert store_a.alert_backlog() == {"pending": len(expected), "skipped": 2}

    # The webhook is back, but monitor a was killed holding its claims: until they expire, b
    # leaves them; after, b sends each one, once.
    webhook.down = False
    assert b.run_once() == 0 and webhook.bodies == []
    clock.now += timedelta(seconds=61)
    assert b.run_once() == len(expected)
    assert sorted(webhook.keys()) == sorted(expected)
    # Nothing is sent twice: by b again, by a third monitor, or by a restarted a.
    c = Alerter(store_c, AlertConfig(monitor="mon-a", **cfg), clock=clock)  # type: ignore[arg-type]
    assert b.run_once() == 0 and c.run_once() == 0
    assert len(webhook.keys()) == len(expected)
    assert store_b.alert_backlog() == {"sent": len(expected), "skipped": 2}

    # Alertmanager's webhook format: what it carries.
    body = next(b for b in webhook.bodies if b["alerts"][0]["fingerprint"] == "board:pi-1:3")
    assert body["version"] == "4" and body["status"] == "firing"
    [alert] = body["alerts"]
    assert alert["labels"] == {"alertname": "EdgeWard extraction", "severity": "critical", "kind": "extraction",
                               "source": "board", "device": "pi-1"}
    assert json.loads(alert["annotations"]["detail"]) == {"n": 2}

    # New events after all that are alerted on the next pass.
    ingest(store_a, KEYS, board_events(["critical"], start=7), 80)
    assert a.run_once() == 1 and webhook.keys()[-1] == "board:pi-1:7"


def test_alerts_run_in_a_thread_and_survive_an_outage(tmp_path: Path, webhook: Webhook) -> None:
    store = open_store(str(tmp_path / "m.db"))
    sent: list[str] = []
    alerter = Alerter(store, AlertConfig(webhook.url, monitor="m", poll_s=0.05, backoff=(0.05,)),
                      on_sent=sent.append)
    webhook.down = True
    ingest(store, KEYS, board_events(["critical"] * 5), 80)
    alerter.start()
    try:
        deadline = threading.Event()
        while webhook.refused < 10 and not deadline.wait(0.05):
            pass
        assert sent == []
        webhook.down = False
        while len(sent) < 5 and not deadline.wait(0.05):
            pass
    finally:
        alerter.stop()
        store.close()
    assert sorted(webhook.keys()) == [f"board:pi-1:{i}" for i in range(1, 6)]


def test_alert_rules() -> None:
    assert qualifies({"severity": "critical"}, "warning") and not qualifies({"severity": "info"}, "warning")
    assert qualifies({"severity": "made-up"}, "critical")  # unknown: treated as critical
    assert qualifies({"severity": None}, "critical")
    generic = alert_payload({"key": "board:x:1", "severity": "warning", "kind": "ood", "source": "board",
                             "device_id": "x", "detail": "{}"}, "json")
    assert generic["key"] == "board:x:1" and generic["labels"]["kind"] == "ood"
    with pytest.raises(UsageError, match="http"):
        Alerter(None, AlertConfig("file:///etc/passwd"))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="severity"):
        Alerter(None, AlertConfig("http://127.0.0.1/", min_severity="loud"))  # type: ignore[arg-type]
