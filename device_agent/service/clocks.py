"""The service's two clocks: the wall clock for timestamps, boottime for quotas.

A Raspberry Pi has no real-time clock: its wall clock is whatever NTP, fake-hwclock or someone
with root last set, and it steps either way. Timestamps an operator reads (audit records, events)
stay on the wall clock. Everything that measures an interval in order to grant something (token
buckets, budget windows, the detectors' windows and cool-downs) runs on ``CLOCK_BOOTTIME``:
monotonic, counting time spent suspended, and not settable. It restarts from zero at every boot:
:mod:`device_agent.service.budgets` tells a reboot apart with the kernel's boot id.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from device_agent.errors import FormatError
from device_agent.store.fsutil import read_bounded

# Linux: a random UUID the kernel draws at each boot (not in the data dir: read, never written).
BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
BOOT_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def boottime() -> float:
    """Seconds since boot, suspend included (``CLOCK_BOOTTIME``); ``time.monotonic`` where the
    platform has no boottime clock (not Linux: suspend may then not count, which only makes a
    budget window last longer)."""
    if hasattr(time, "CLOCK_BOOTTIME"):
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    return time.monotonic()


def boot_id() -> str | None:
    """This boot's id, or None where the kernel gives none (then every start counts as a reboot)."""
    try:
        text = read_bounded(BOOT_ID_FILE, 64).decode("ascii").strip()
    except (OSError, FormatError, UnicodeDecodeError):
        return None
    return text if BOOT_ID_RE.fullmatch(text) else None
