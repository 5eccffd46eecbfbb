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

**Persistence.** The service keeps what :meth:`Throttle.snapshot` gives in ``budgets.json``
(:mod:`device_agent.service.budgets`). Each window carries a *reservation*: rows already written
to disk as spent. Admitting rows beyond it raises it by ``reserve_rows`` and marks the throttle
:attr:`~Throttle.unsaved`; the service writes the file before it answers. The disk therefore
never says less than was admitted: a power cut can over-charge a client (up to
``reserve_rows`` rows) and never refills one. A clean stop writes the exact counts. Token buckets
are not kept: a restart gives each client at most one burst.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from device_agent.config import DEFAULT_CONFIG, BudgetConfig, ThrottleConfig


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # "ok", "client_rate", "global_rate", "daily_budget", "batch" (can never pass)
    retry_after: float = 0.0


@dataclass(frozen=True)
class Snapshot:
    """What the disk must say: for each client with a running window, the rows to count as spent
    and the seconds left in its window; the seconds left of a lockout (0: none)."""

    clients: dict[str, tuple[int, float]]
    lockout: float
    generation: int  # pass to Throttle.saved() once this is on disk


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
    __slots__ = ("ends", "reserved", "used")

    def __init__(self, used: int, reserved: int, ends: float) -> None:
        self.used = used  # rows admitted in this window
        self.reserved = reserved  # rows the disk counts as spent (>= used once saved)
        self.ends = ends  # boottime at which the window ends


class Throttle:
    """The buckets and budgets of one service. Not thread-safe: the caller serialises."""

    def __init__(self, config: ThrottleConfig, budget: BudgetConfig = DEFAULT_CONFIG.serve.budget) -> None:
        self.config = config
        self.budget = budget
        self._global = _Bucket(config.global_burst, -math.inf)
        self._clients: dict[str, _Bucket] = {}
        self._windows: dict[str, _Window] = {}
        self._lockout_ends = -math.inf  # every client is refused before this (an unreadable file)
        self._generation = 0  # raised with every reservation or lockout the disk does not hold yet
        self._saved = 0  # the generation on disk

    def client_rate(self, anomaly: float) -> float:
        return self.config.client_rate / (
            1.0 + self.config.anomaly_slowdown * min(1.0, max(0.0, anomaly))
        )

    def decide(self, client: str, now: float, rows: int = 1, anomaly: float = 0.0) -> Decision:
        """Admit ``rows`` inputs from ``client`` at boottime ``now``, or say why not and when to
        retry. After an admission, :attr:`unsaved` says whether the disk must be written first."""
        c = self.config
        if now < self._lockout_ends:
            return Decision(False, "daily_budget", self._lockout_ends - now)
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
            window = self._windows[client] = _Window(0, 0, now + self.budget.window_seconds)
        window.used += rows
        if window.used > window.reserved:
            window.reserved = max(window.used, min(window.used + self.budget.reserve_rows, c.daily_budget))
            self._generation += 1
        return Decision(True, "ok")

    def used(self, client: str, now: float) -> int:
        """Rows ``client`` has spent in its current window (0 when none runs)."""
        window = self._windows.get(client)
        return window.used if window is not None and now < window.ends else 0

    # --- persistence (the service writes budgets.json) --------------------------------------------
    @property
    def unsaved(self) -> bool:
        """True when a reservation or lockout is not on disk yet."""
        return self._generation > self._saved

    def running(self, now: float) -> bool:
        """Whether any window or lockout is running (its countdown is worth saving)."""
        return now < self._lockout_ends or any(now < w.ends for w in self._windows.values())

    def snapshot(self, now: float, clean: bool = False) -> Snapshot:
        """What to write to disk now. ``clean`` (the service is stopping: nothing more will be
        admitted) writes the rows actually spent instead of the reservations. Windows that have
        ended are forgotten here."""
        clients = {}
        for client, w in list(self._windows.items()):
            left = w.ends - now
            if left <= 0:
                del self._windows[client]
                continue
            if clean:
                w.reserved = w.used
            clients[client] = (w.reserved, left)
        return Snapshot(clients, max(0.0, self._lockout_ends - now), self._generation)

    def saved(self, generation: int) -> None:
        """The snapshot of ``generation`` is on disk."""
        self._saved = max(self._saved, generation)

    def restore(self, clients: Mapping[str, tuple[int, float]], lockout: float, now: float, elapsed: float) -> None:
        """Take back what a snapshot said, ``elapsed`` seconds of boottime later (0 when unknown:
        after a reboot). A window longer than ``window_seconds`` (the setting shrank) is cut to it."""
        span = self.budget.window_seconds
        for client, (used, left) in clients.items():
            left = min(left, span) - elapsed
            if left > 0:
                self._windows[client] = _Window(used, used, now + left)
        left = min(lockout, span) - elapsed
        if left > 0:
            self._lockout_ends = max(self._lockout_ends, now + left)

    def lock_out(self, now: float) -> None:
        """Refuse every client for one whole window from ``now``: the budgets on disk could not
        be read, so how much each client spent is unknown (see budgets.py for why not refill)."""
        self._lockout_ends = max(self._lockout_ends, now + self.budget.window_seconds)
        self._generation += 1
