"""Throttling decisions: token buckets per client and global, a daily budget per client.

Pure code: every call takes ``now`` (seconds since the epoch) and returns a decision; nothing
here reads a clock, a file or a socket. Label-only output does not stop extraction with natural
data (DESIGN.md, pitfalls); budgets and rates do, by making it slow. A client whose anomaly
score rises gets a proportionally slower bucket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from device_agent.config import ThrottleConfig

DAY = 86400.0


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
        # The board's clock may step backwards (no RTC): never refill on a negative interval.
        self.level = min(burst, self.level + max(0.0, now - self.stamp) * rate)
        self.stamp = max(self.stamp, now)


class Throttle:
    """The buckets and budgets of one service. Not thread-safe: the caller serialises."""

    def __init__(self, config: ThrottleConfig) -> None:
        self.config = config
        self._global = _Bucket(config.global_burst, -math.inf)
        self._clients: dict[str, _Bucket] = {}
        self._used: dict[str, tuple[int, int]] = {}  # client -> (day number, rows used that day)

    def client_rate(self, anomaly: float) -> float:
        return self.config.client_rate / (
            1.0 + self.config.anomaly_slowdown * min(1.0, max(0.0, anomaly))
        )

    def decide(self, client: str, now: float, rows: int = 1, anomaly: float = 0.0) -> Decision:
        """Admit ``rows`` inputs from ``client`` at ``now``, or say why not and when to retry."""
        c = self.config
        day = int(now // DAY)
        used_day, used = self._used.get(client, (day, 0))
        if used_day != day:
            used = 0
        if used + rows > c.daily_budget:
            return Decision(False, "daily_budget", (day + 1) * DAY - now)
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
        self._used[client] = (day, used + rows)
        return Decision(True, "ok")
