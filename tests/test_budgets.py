"""Daily budgets run on boottime: stepping the wall clock refills nothing; only boottime passing does."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from device_agent.config import ServeConfig
from device_agent.service.http import Client
from tests.fixtures.serve import BOOT0, T0, Served, SimClock, serve

DAY = 86400.0
POLICY = {"throttle": {"daily_budget": 3, "client_rate": 100, "client_burst": 100}}


class Board:
    """A board with the digits model installed (budget: 3 rows a day), served with simulated clocks."""

    def __init__(self, board: Any, x: Any) -> None:
        self.board = board
        self.x = x
        self.wall = SimClock(T0)
        self.mono = SimClock(BOOT0)
        self.running: list[Served] = []

    def start(self, config: ServeConfig | None = None) -> Served:
        s = serve(self.board, config, self.wall, self.mono)
        self.running.append(s)
        return s

    def stop(self, s: Served) -> None:
        s.server.stop()
        self.running.remove(s)

    def ask(self, s: Served, token: str, rows: int = 1) -> int:
        c = Client(token, s.socket)
        try:
            return c.predict(self.x[:rows] if rows > 1 else self.x[0])[0]
        finally:
            c.close()


@pytest.fixture
def board(
    make_board: Callable[..., Any], pack_for: Callable[..., Path], digits: Any, digits_test: Any
) -> Iterator[Board]:
    b = make_board()
    out = pack_for(digits.onnx, [b], policy=POLICY)
    b.agent().install((out / f"{b.device_id}.ewb").read_bytes())
    sim = Board(b, digits_test[0])
    yield sim
    for s in list(sim.running):
        sim.stop(s)


def test_stepping_the_wall_clock_either_way_refills_no_budget(board: Board) -> None:
    s = board.start()
    user = s.tokens["user"]
    assert board.ask(s, user, rows=3) == 200
    assert board.ask(s, user) == 429
    board.wall.t += DAY  # (a) a day forward
    assert board.ask(s, user) == 429
    board.wall.t -= 2 * DAY  # (b) back a day, then forward again, and far forward
    assert board.ask(s, user) == 429
    board.wall.t += 2 * DAY
    assert board.ask(s, user) == 429
    board.wall.t += 365 * DAY
    assert board.ask(s, user) == 429
    board.mono.t += DAY - 1  # boottime is what counts, and to the second
    assert board.ask(s, user) == 429
    board.mono.t += 1  # (d) a day of boottime: refilled
    assert board.ask(s, user, rows=3) == 200
    assert board.ask(s, user) == 429
