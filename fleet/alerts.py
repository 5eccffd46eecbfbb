"""Security events to a webhook: Alertmanager's webhook format or a generic JSON one.

The queue is the store itself: a security event is durable once its ingest batch committed, and
the ``alerts`` table records which monitor claimed each event and whether the webhook took it. A
monitor's alert thread (:class:`Alerter`) repeatedly

1. lists events received within the horizon that no monitor has settled and no *other* monitor
   holds a live claim on (:meth:`StoreReads.alert_candidates`);
2. settles those below the configured severity without sending them;
3. claims each of the rest (:meth:`StoreReads.claim_alert`: the event's primary key in
   ``alerts`` lets one monitor's claim land), POSTs it, and marks it sent on a 2xx answer.

A failed POST (refused, timed out, any non-2xx) is retried with a doubling back-off while the
claim is renewed, so a webhook outage only delays alerts. A monitor killed holding a claim
leaves it to expire after ``lease_s``; then the monitor restarted under the same id, or any
other, takes it over. Each event is therefore sent once, except when a monitor dies between
the webhook's 2xx and its own record of it: that event is sent again, with the same
``fingerprint`` (the event key) so the receiver can tell (Alertmanager groups by it).

What to send is pure (:func:`alert_payload`, :func:`qualifies`); the thread is the adapter.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from device_agent.errors import UsageError
from device_agent.store.datadir import utcnow

from .store import Store

_log = logging.getLogger(__name__)

SEVERITIES = ("info", "warning", "critical")
FORMATS = ("alertmanager", "json")


@dataclass(frozen=True)
class AlertConfig:
    url: str
    min_severity: str = "warning"
    format: str = "alertmanager"
    monitor: str = "monitor"  # this monitor's id (its MQTT client id): who holds a claim
    horizon_s: float = 24 * 3600.0  # events received longer ago than this are not alerted
    lease_s: float = 120.0  # a claim not renewed for this long may be taken over
    poll_s: float = 2.0
    timeout_s: float = 10.0
    backoff: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
    batch: int = 100


def check_config(c: AlertConfig) -> None:
    """Refuse a configuration that cannot work (exit 2), before the monitor starts."""
    if not c.url.startswith(("http://", "https://")):
        raise UsageError(f"--alert-webhook {c.url!r} must be an http:// or https:// URL")
    if c.min_severity not in SEVERITIES:
        raise UsageError(f"--alert-severity must be one of {', '.join(SEVERITIES)}")
    if c.format not in FORMATS:
        raise UsageError(f"--alert-format must be one of {', '.join(FORMATS)}")


def qualifies(event: dict[str, Any], min_severity: str) -> bool:
    """At or above the threshold. A severity a board made up counts as critical: an unknown
    level is not a reason to stay quiet."""
    sev = event.get("severity")
    rank = SEVERITIES.index(sev) if sev in SEVERITIES else len(SEVERITIES) - 1
    return rank >= SEVERITIES.index(min_severity)


def _label(value: Any) -> str:
    return str(value if value is not None else "")[:128]


def alert_payload(event: dict[str, Any], fmt: str, receiver: str = "edgeward") -> dict[str, Any]:
    """The webhook body for one security event (``event``: a row of
    :meth:`StoreReads.alert_candidates`)."""
    labels = {
        "alertname": f"EdgeWard {_label(event.get('kind'))}",
        "severity": _label(event.get("severity")),
        "kind": _label(event.get("kind")),
        "source": _label(event.get("source")),
        "device": _label(event.get("device_id")),
    }
    annotations = {
        "summary": f"{labels['severity']} {labels['kind']} from {labels['device'] or 'an unknown sender'}",
        "detail": str(event.get("detail") or "")[:500],
        "seq": _label(event.get("seq")),
        "received": _label(event.get("received")),
    }
    if fmt == "json":
        return {"key": event["key"], "time": event.get("time"), "labels": labels, "annotations": annotations}
    # Alertmanager's webhook receiver format (version 4): what Alertmanager itself POSTs.
    alert = {
        "status": "firing",
        "labels": labels,
        "annotations": annotations,
        "startsAt": _label(event.get("time")),
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "",
        "fingerprint": event["key"],
    }
    return {
        "version": "4",
        "groupKey": event["key"],
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": receiver,
        "groupLabels": {"alertname": labels["alertname"]},
        "commonLabels": labels,
        "commonAnnotations": annotations,
        "externalURL": "",
        "alerts": [alert],
    }


def post(url: str, body: dict[str, Any], timeout: float) -> None:
    """POST JSON; raise OSError (URLError, HTTPError, timeouts) unless the answer is 2xx."""
    data = json.dumps(body, sort_keys=True).encode()
    req = urllib.request.Request(  # noqa: S310 -- the scheme is checked by check_config
        url, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310  # nosec B310 # http(s) only: check_config
        resp.read(4096)


class Alerter:
    """One monitor's alert thread over the shared store."""

    def __init__(
        self,
        store: Store,
        config: AlertConfig,
        clock: Callable[[], datetime] = utcnow,
        on_sent: Callable[[str], None] | None = None,
    ) -> None:
        check_config(config)
        self.store = store
        self.config = config
        self.clock = clock
        self._on_sent = on_sent
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgeward-alerts", daemon=True)
        self._retry_at: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self.sent = 0
        self.failed = 0

    def run_once(self) -> int:
        """One pass: settle, claim and send what is due. Returns the number sent."""
        c = self.config
        now = self.clock()
        lease = now - timedelta(seconds=c.lease_s)
        sent = 0
        events = self.store.alert_candidates(now - timedelta(seconds=c.horizon_s), c.monitor, lease, c.batch)
        for ev in events:
            if self._stop.is_set():
                break
            key = ev["key"]
            if not qualifies(ev, c.min_severity):
                self.store.alert_settled(key, c.monitor, now, outcome="below threshold")
                continue
            if self._retry_at.get(key, 0.0) > time.monotonic():
                continue
            if not self.store.claim_alert(key, c.monitor, self.clock(), lease):
                continue  # another monitor has it
            try:
                post(c.url, alert_payload(ev, c.format), c.timeout_s)
            except (OSError, ValueError) as e:
                n = self._failures.get(key, 0)
                self._failures[key] = n + 1
                self._retry_at[key] = time.monotonic() + c.backoff[min(n, len(c.backoff) - 1)]
                self.failed += 1
                self.store.alert_failed(key, c.monitor, self.clock(), f"{type(e).__name__}: {e}")
                _log.warning("alert %s not delivered (%s); retrying", key, e)
                continue
            self.store.alert_settled(key, c.monitor, self.clock())
            self._retry_at.pop(key, None)
            self._failures.pop(key, None)
            sent += 1
            self.sent += 1
            if self._on_sent is not None:
                self._on_sent(key)
        return sent

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 -- the store or a bug: say so, keep the monitor going
                _log.exception("alert pass failed; trying again")
            self._stop.wait(self.config.poll_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
