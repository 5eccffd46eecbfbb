"""Throttling decisions: token buckets per client and global, a daily budget per client.

Pure code: every call takes ``now`` and returns a decision; nothing here reads a clock, a file or
a socket. ``now`` is seconds on a monotonic clock that counts suspend (``CLOCK_BOOTTIME``,
:func:`device_agent.service.clocks.boottime`), never the wall clock: a Pi has no real-time clock
and its wall clock steps either way, so stepping it must refill nothing. Label-only output does
not stop extraction with natural data (DESIGN.md, pitfalls); budgets and rates do, by making it
slow. A client whose anomaly score rises gets a proportionally slower bucket.

**Daily budget.** A client's window opens at its first admitted query and runs for
``window_seconds`` (a day by default) of boottime; the rows admitted in it count against
``daily_budget``; the first query after it ends opens the next one. Windows are not aligned to
UTC midnight: the board cannot trust its wall clock to say when midnight is.

Daily budgets are kept in memory only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from device_agent.config import DEFAULT_CONFIG, BudgetConfig, ThrottleConfig


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # "ok", "client_rate", "global_rate", "daily_budget", "batch" (can never pass)
    retry_after: float = 0.0


class _Bucket:
    __slots__ = ("level", "stamp")

    def __init__(self, level: float, stamp: float) -> None:
        self.level = level
        self.stamp = stamp

    def refill(self, now: float, rate: float, burst: float) -> None:
        # Never refill on a negative interval (an injected clock may move back; boottime does not).
        self.level = min(burst, self.level + max(0.0, now - self.stamp) * rate)
        self.stamp = max(self.stamp, now)


class _Window:
    __slots__ = ("ends", "used")

    def __init__(self, used: int, ends: float) -> None:
        self.used = used  # rows admitted in this window
        self.ends = ends  # boottime at which the window ends


class Throttle:
    """The buckets and budgets of one service. Not thread-safe: the caller serialises."""

    def __init__(self, config: ThrottleConfig, budget: BudgetConfig = DEFAULT_CONFIG.serve.budget) -> None:
        self.config = config
        self.budget = budget
        self._global = _Bucket(config.global_burst, -math.inf)
        self._clients: dict[str, _Bucket] = {}
        self._windows: dict[str, _Window] = {}

    def client_rate(self, anomaly: float) -> float:
        return self.config.client_rate / (
            1.0 + self.config.anomaly_slowdown * min(1.0, max(0.0, anomaly))
        )

    def decide(self, client: str, now: float, rows: int = 1, anomaly: float = 0.0) -> Decision:
        """Admit ``rows`` inputs from ``client`` at boottime ``now``, or say why not and when to
        retry."""
        c = self.config
        window = self._windows.get(client)
        if window is not None and now >= window.ends:
            window = None
        used = window.used if window is not None else 0
        if used + rows > c.daily_budget:
            ends = window.ends if window is not None else now + self.budget.window_seconds
            return Decision(False, "daily_budget", ends - now)
        rate = self.client_rate(anomaly)
        bucket = self._clients.setdefault(client, _Bucket(c.client_burst, now))
        bucket.refill(now, rate, c.client_burst)
        self._global.refill(now, c.global_rate, c.global_burst)
        if rows > c.client_burst or rows > c.global_burst:
            return Decision(False, "batch", math.inf)
        if bucket.level < rows:
            return Decision(False, "client_rate", (rows - bucket.level) / rate)
        if self._global.level < rows:
            return Decision(False, "global_rate", (rows - self._global.level) / c.global_rate)
        bucket.level -= rows
        self._global.level -= rows
        if window is None:
            window = self._windows[client] = _Window(0, now + self.budget.window_seconds)
        window.used += rows
        return Decision(True, "ok")

    def used(self, client: str, now: float) -> int:
        """Rows ``client`` has spent in its current window (0 when none runs)."""
        window = self._windows.get(client)
        return window.used if window is not None and now < window.ends else 0
