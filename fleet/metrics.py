"""Prometheus metrics of a monitor (``fleet monitor --metrics-listen``), with prometheus-client.

Two kinds of figures, so that with several monitors nothing is counted twice:

* each monitor's own ingest, labelled ``monitor`` (its MQTT client id): reports by verdict,
  the signed receipts it published,
  rejections by reason, and the time from handing a chunk to the ingest stage to its commit
  (:class:`MonitorMetrics`, fed by the monitor's per-chunk hook);
* the fleet's figures, read from the shared store at each scrape (:class:`FleetCollector`):
  boards by state, boards per model and version, the boards' serve-loop counters summed by
  name (queries, answered, refused_*, detections_*), security events of the last day by source,
  kind and severity, and the alert queue. Every monitor exports the same values; query them
  with ``max without (instance)`` (the Grafana dashboard in ``docs/grafana-dashboard.json``
  does).

No label carries a board id: per-board detail is the dashboard's. Names a board supplies
(model ids, counter names, event kinds) are bounded by :func:`fleet.views.bounded`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .access import Access, GuardedHandler, make_guarded_server
from .ca import FleetHome
from .monitor import REASONS
from .store import StoreReads
from .views import fleet_summary


class MonitorMetrics:
    """One monitor's ingest counters, in a registry of their own."""

    def __init__(self, monitor: str, registry: CollectorRegistry | None = None) -> None:
        self.monitor = monitor
        self.registry = registry or CollectorRegistry()
        self.reports = Counter(
            "edgeward_monitor_reports", "Reports ingested by this monitor, by verdict",
            ["monitor", "verdict"], registry=self.registry,
        )
        self.rejected = Counter(
            "edgeward_monitor_rejected", "Reports this monitor rejected, by reason",
            ["monitor", "reason"], registry=self.registry,
        )
        self.latency = Histogram(
            "edgeward_monitor_ingest_seconds",
            "Seconds from handing a chunk of reports to the ingest stage to its commit",
            ["monitor"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
        self.receipts = Counter(
            "edgeward_monitor_receipts", "Signed receipts this monitor published (one per board per committed chunk)",
            ["monitor"], registry=self.registry,
        )
        self.receipts.labels(monitor)
        for v in ("accepted", "duplicate", "flagged"):
            self.reports.labels(monitor, v)
        for r in REASONS:
            self.rejected.labels(monitor, r)

    def observe(self, counts: Mapping[str, int], seconds: float) -> None:
        """The monitor's hook (``Monitor(on_chunk=...)``), once per committed chunk."""
        for key, n in counts.items():
            if key.startswith("rejected:"):
                self.rejected.labels(self.monitor, key[9:]).inc(n)
            elif key in ("accepted", "duplicate", "flagged") and n:
                self.reports.labels(self.monitor, key).inc(n)
            elif key == "receipts" and n:
                self.receipts.labels(self.monitor).inc(n)
        self.latency.labels(self.monitor).observe(seconds)


class FleetCollector:
    """Fleet-level gauges computed from the store at each scrape."""

    def __init__(self, home: FleetHome, store: StoreReads, stale_after: float) -> None:
        self.home = home
        self.store = store
        self.stale_after = stale_after

    def describe(self) -> list[Metric]:
        return []  # computed at scrape time; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        s = fleet_summary(self.home, self.store, datetime.now(UTC), self.stale_after)
        boards = GaugeMetricFamily("edgeward_fleet_boards", "Boards by state", labels=["state"])
        for state, n in s["boards"].items():
            boards.add_metric([state.replace(" ", "_")], n)
        yield boards
        models = GaugeMetricFamily(
            "edgeward_fleet_model_boards", "Online or stale boards serving each model version",
            labels=["model", "version"],
        )
        for m in s["models"]:
            models.add_metric([m["model_id"], m["version"]], m["boards"])
        yield models
        counters = GaugeMetricFamily(
            "edgeward_fleet_board_counter",
            "The boards' serve-loop counters (queries, answered, refused_*, detections_*) summed over "
            "each board's latest telemetry report",
            labels=["counter"],
        )
        for name, value in s["counters"].items():
            counters.add_metric([name], value)
        yield counters
        events = GaugeMetricFamily(
            "edgeward_fleet_security_events_day", "Security events received in the last 24 hours",
            labels=["source", "kind", "severity"],
        )
        for e in s["events_day"]:
            events.add_metric([e["source"], e["kind"], e["severity"]], e["count"])
        yield events
        alerts = GaugeMetricFamily("edgeward_alerts", "Alert queue rows by outcome", labels=["outcome"])
        backlog = self.store.alert_backlog()
        for outcome in ("sent", "pending", "skipped"):
            alerts.add_metric([outcome], backlog.get(outcome, 0))
        yield alerts


class MetricsHandler(GuardedHandler):
    registries: tuple[CollectorRegistry, ...] = ()
    server_version = "edgeward-metrics"

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if not self.allowed():
            return
        if self.path.split("?")[0] != "/metrics":
            body, status, ctype = b"not found\n", 404, "text/plain; charset=utf-8"
        else:
            body = b"".join(generate_latest(r) for r in self.registries)
            status, ctype = 200, CONTENT_TYPE_LATEST
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


def metrics_server(
    home: FleetHome,
    store: StoreReads,
    mine: MonitorMetrics,
    bind: str,
    port: int,
    access: Access,
    stale_after: float,
) -> Any:
    """The ``/metrics`` server (not started) of one monitor: its own counters and the fleet's."""
    fleet = CollectorRegistry()
    fleet.register(FleetCollector(home, store, stale_after))
    handler = type("Metrics", (MetricsHandler,), {"registries": (mine.registry, fleet)})
    return make_guarded_server(bind, port, handler, access, home, "metrics endpoint")
