"""Read models shared by ``fleet status``, ``fleet events`` and the dashboard."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from device_agent.wire import parse_time

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
