"""Read models shared by ``fleet status``, ``fleet events`` and the dashboard."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from device_agent.wire import format_time, parse_time

from .ca import FleetHome
from .store import StoreReads

STALE_AFTER_S = 90.0  # three default heartbeats
_RELATIVE = re.compile(r"^(\d+)([smhd])\Z")


def parse_since(text: str | None, now: datetime) -> datetime | None:
    """``--since``: an ISO 8601 time or a relative age like 30m, 6h, 2d."""
    if not text:
        return None
    m = _RELATIVE.match(text)
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        return now - timedelta(**{unit: int(m.group(1))})
    return parse_time(text, "--since")


def command_summary(
    home: FleetHome, now: datetime
) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """From the command ledger, if there is one: the boards that attested their wipe, and each
    board's number of pending commands."""
    from .commands import LEDGER_FILE, CommandLedger

    if not (home.path / LEDGER_FILE).exists():
        return {}, {}
    ledger = CommandLedger(home)
    try:
        return ledger.wiped(), ledger.pending_counts(now)
    finally:
        ledger.close()


def device_views(
    home: FleetHome, store: StoreReads, now: datetime, stale_after: float
) -> list[dict[str, Any]]:
    """Every enrolled or seen device with its liveness: online, stale, offline, never seen, or
    wiped (the board's signed attestation was received), and its pending commands."""
    seen = {d["device_id"]: d for d in store.devices()}
    enrolled = home.device_keys()
    wiped, pending = command_summary(home, now)
    out = []
    for device_id in sorted(set(seen) | set(enrolled)):
        d = seen.get(device_id)
        extra: dict[str, Any] = {"pending_commands": pending.get(device_id, 0)}
        if device_id in wiped:
            extra["wiped"] = wiped[device_id]
        if d is None:
            live = "wiped" if device_id in wiped else "never seen"
            out.append({"device_id": device_id, "liveness": live, "enrolled": True} | extra)
            continue
        age = (now - parse_time(d["last_seen"], "last_seen")).total_seconds()
        live = (
            d["state"] if d["state"] != "online" else ("online" if age <= stale_after else "stale")
        )
        models = d["status"].get("models")  # a board's signed summary, not necessarily this shape
        models = [m for m in models if isinstance(m, dict)] if isinstance(models, list) else []
        out.append(
            d
            | {
                "liveness": "wiped" if device_id in wiped else live,
                "enrolled": device_id in enrolled,
                "models": ", ".join(f"{m.get('model_id')} v{m.get('version')}" for m in models),
            }
            | extra
        )
    return out


# The states a board is counted in by the health summary and ``/metrics``: the liveness of
# :func:`device_views`, and ``decommissioned`` (a decommission command was issued and the board
# has not attested its wipe yet). Whatever else a board's signed status says is ``other``.
BOARD_STATES = ("online", "stale", "offline", "never seen", "decommissioned", "wiped", "other")
LABEL_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}\Z")
MAX_SERIES = 64  # distinct models, counters or event kinds shown by name; the rest are "other"


def bounded(name: object, seen: set[str]) -> str:
    """A board-supplied name as a label: itself if well formed and among the first
    :data:`MAX_SERIES` names, otherwise ``other`` (cardinality stays bounded)."""
    text = str(name)
    if not LABEL_RE.match(text):
        return "other"
    if text not in seen and len(seen) >= MAX_SERIES:
        return "other"
    seen.add(text)
    return text


def decommission_ordered(home: FleetHome) -> set[str]:
    from .commands import LEDGER_FILE, CommandLedger

    if not (home.path / LEDGER_FILE).exists():
        return set()
    ledger = CommandLedger(home)
    try:
        return set(ledger.decommission_ordered())
    finally:
        ledger.close()


def board_state(view: dict[str, Any], ordered: set[str]) -> str:
    live = str(view["liveness"])
    if live != "wiped" and view["device_id"] in ordered:
        return "decommissioned"
    return live if live in BOARD_STATES else "other"


def board_models(view: dict[str, Any]) -> list[tuple[str, str]]:
    """(model id, version) of each model a board's signed status lists."""
    status = view.get("status")
    models = status.get("models") if isinstance(status, dict) else None
    out = []
    for m in models if isinstance(models, list) else []:
        if isinstance(m, dict):
            out.append((str(m.get("model_id")), str(m.get("version"))))
    return out


def board_counters(view: dict[str, Any]) -> dict[str, float]:
    """The serve loop's counters in a board's latest telemetry report (numbers only)."""
    c = view.get("counters")
    counters = c.get("counters") if isinstance(c, dict) else None
    if not isinstance(counters, dict):
        return {}
    return {
        str(k): float(v) for k, v in counters.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }


def fleet_summary(
    home: FleetHome, store: StoreReads, now: datetime, stale_after: float
) -> dict[str, Any]:
    """Fleet health at a glance: boards by state, models and versions in service (boards
    online or stale), the boards' counters summed, security events by source, kind and severity
    over the last day and the last week. One read of the store; the dashboard and ``/metrics``
    show the same figures."""
    views = device_views(home, store, now, stale_after)
    ordered = decommission_ordered(home)
    boards = dict.fromkeys(BOARD_STATES, 0)
    models: dict[tuple[str, str], int] = {}
    counters: dict[str, float] = {}
    model_names: set[str] = set()
    counter_names: set[str] = set()
    for v in views:
        state = board_state(v, ordered)
        boards[state] += 1
        if state in ("online", "stale"):
            for model_id, version in board_models(v):
                key = (bounded(model_id, model_names), version if LABEL_RE.match(version) else "other")
                models[key] = models.get(key, 0) + 1
        for name, value in board_counters(v).items():
            label = bounded(name, counter_names)
            counters[label] = counters.get(label, 0.0) + value

    def events(since: datetime) -> list[dict[str, Any]]:
        names: set[str] = set()
        out: dict[tuple[str, str, str], int] = {}
        for e in store.event_counts(since):
            sev = e["severity"] if e["severity"] in ("info", "warning", "critical") else "other"
            key = (e["source"], bounded(e["kind"], names), sev)
            out[key] = out.get(key, 0) + int(e["count"])
        return [{"source": s, "kind": k, "severity": v, "count": n} for (s, k, v), n in sorted(out.items())]

    return {
        "now": format_time(now),
        "total": len(views),
        "boards": boards,
        "models": [
            {"model_id": m, "version": ver, "boards": n} for (m, ver), n in sorted(models.items())
        ],
        "counters": dict(sorted(counters.items())),
        "events_day": events(now - timedelta(days=1)),
        "events_week": events(now - timedelta(days=7)),
    }
