"""Read models shared by ``fleet status``, ``fleet events`` and the dashboard."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from device_agent.wire import parse_time

from .ca import FleetHome
from .store import MonitorStore

STALE_AFTER_S = 90.0  # three default heartbeats
_RELATIVE = re.compile(r"^(\d+)([smhd])$")


def parse_since(text: str | None, now: datetime) -> datetime | None:
    """``--since``: an ISO 8601 time or a relative age like 30m, 6h, 2d."""
    if not text:
        return None
    m = _RELATIVE.match(text)
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        return now - timedelta(**{unit: int(m.group(1))})
    return parse_time(text, "--since")


def device_views(
    home: FleetHome, store: MonitorStore, now: datetime, stale_after: float
) -> list[dict[str, Any]]:
    """Every enrolled or seen device with its liveness: online, stale, offline or never seen."""
    seen = {d["device_id"]: d for d in store.devices()}
    enrolled = home.device_keys()
    out = []
    for device_id in sorted(set(seen) | set(enrolled)):
        d = seen.get(device_id)
        if d is None:
            out.append({"device_id": device_id, "liveness": "never seen", "enrolled": True})
            continue
        age = (now - parse_time(d["last_seen"], "last_seen")).total_seconds()
        live = (
            d["state"] if d["state"] != "online" else ("online" if age <= stale_after else "stale")
        )
        models = d["status"].get("models", [])
        out.append(
            d
            | {
                "liveness": live,
                "enrolled": device_id in enrolled,
                "models": ", ".join(f"{m.get('model_id')} v{m.get('version')}" for m in models),
            }
        )
    return out
