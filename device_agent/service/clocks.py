"""The service's two clocks: the wall clock for timestamps, boottime for quotas.

A Raspberry Pi has no real-time clock: its wall clock is whatever NTP, fake-hwclock or someone
with root last set, and it steps either way. Timestamps an operator reads (audit records, events)
stay on the wall clock. Everything that measures an interval in order to grant something (token
buckets, budget windows, the detectors' windows and cool-downs) runs on ``CLOCK_BOOTTIME``:
monotonic, counting time spent suspended, and not settable. It restarts from zero at every boot.
"""

from __future__ import annotations

import time


def boottime() -> float:
    """Seconds since boot, suspend included (``CLOCK_BOOTTIME``); ``time.monotonic`` where the
    platform has no boottime clock (not Linux: suspend may then not count, which only makes a
    budget window last longer)."""
    if hasattr(time, "CLOCK_BOOTTIME"):
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    return time.monotonic()

