"""Daily budgets run on boottime and are kept in budgets.json: stepping the wall clock, restarting
the agent, a power cut, a reboot or a damaged file refills nothing; only boottime passing does."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from device_agent.config import BudgetConfig, ServeConfig
from device_agent.errors import FormatError
from device_agent.service.budgets import SCHEMA, Saved, decode, encode
from device_agent.service.events import EventStore
from device_agent.store import layout
from tests.fixtures.http import UnixConnection, predict
from tests.fixtures.serve import BOOT0, T0, Served, SimClock, serve

DAY = 86400.0
BOOT_A = "0f2e4a6c-1b3d-4e5f-8a9b-0c1d2e3f4a5b"
BOOT_B = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
POLICY = {"throttle": {"daily_budget": 3, "client_rate": 100, "client_burst": 100}}


class Board:
    """A board with the digits model installed (budget: 3 rows a day), served with simulated clocks."""

    def __init__(self, board: Any, x: Any) -> None:
        self.board = board
        self.x = x
        self.wall = SimClock(T0)
        self.mono = SimClock(BOOT0)
        self.boot = BOOT_A
        self.running: list[Served] = []

    def start(self, config: ServeConfig | None = None) -> Served:
        s = serve(self.board, config, self.wall, self.mono, lambda: self.boot)
        self.running.append(s)
        return s

    def stop(self, s: Served) -> None:
        s.server.stop()
        self.running.remove(s)

    def ask(self, s: Served, token: str, rows: int = 1) -> int:
        c = UnixConnection(s.socket)
        try:
            return predict(c, token, self.x[:rows] if rows > 1 else self.x[0])[0]
        finally:
            c.close()

    @property
    def file(self) -> Path:
        return self.board.data_dir / layout.BUDGETS


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


def test_a_restart_refills_no_budget(board: Board) -> None:
    s = board.start()
    user = s.tokens["user"]
    assert board.ask(s, user, rows=3) == 200
    board.mono.t += 600
    board.stop(s)
    s = board.start()  # (c) a new Service and Agent on the same data dir, same boot
    assert board.ask(s, user) == 429
    assert stat_mode(board.file) == 0o600
    board.mono.t += DAY - 600 - 1
    assert board.ask(s, user) == 429
    board.mono.t += 1  # the window counted boottime while the agent was down
    assert board.ask(s, user) == 200


def test_a_power_cut_overcharges_by_at_most_the_reservation_and_refills_nothing(board: Board) -> None:
    config = ServeConfig(budget=BudgetConfig(reserve_rows=1))
    s = board.start(config)
    user = s.tokens["user"]
    assert board.ask(s, user) == 200  # disk: 2 spent (1 used, 1 reserved ahead)
    assert json.loads(board.file.read_bytes())["clients"] == {s.ids["user"]: [2, DAY]}
    cut = board.file.read_bytes()
    assert board.ask(s, user) == 200  # within the reservation: no write
    assert board.file.read_bytes() == cut
    # The power goes: what is on disk is `cut` (the clean save at stop never happens). The agent
    # comes back in the same boot (a crash), then after a reboot; neither gives back the row the
    # client never used: 2 counted + 1 = the budget of 3.
    board.stop(s)
    board.file.write_bytes(cut)
    s = board.start(config)
    assert board.ask(s, user) == 200 and board.ask(s, user) == 429
    board.stop(s)
    board.file.write_bytes(cut)
    board.boot, board.mono.t = BOOT_B, 30.0  # rebooted: boottime restarted from zero
    s = board.start(config)
    assert board.ask(s, user) == 200 and board.ask(s, user) == 429


def test_a_reboot_continues_the_window_instead_of_restarting_it(board: Board) -> None:
    s = board.start()
    user = s.tokens["user"]
    assert board.ask(s, user, rows=3) == 200
    board.mono.t += 3600
    board.stop(s)  # saved with 23 h left in the window
    # Rebooted, and the agent starts late: boottime is already past where it was. Only the boot
    # id tells that this is another boot; the time between the save and now is unknown, so none.
    board.boot, board.mono.t = BOOT_B, BOOT0 + 10 * DAY
    s = board.start()
    c = UnixConnection(s.socket)
    st, headers, _ = predict(c, user, board.x[0])
    c.close()
    assert st == 429 and int(headers["retry-after"]) == DAY - 3600
    board.mono.t += DAY - 3600 - 1
    assert board.ask(s, user) == 429
    board.mono.t += 1
    assert board.ask(s, user) == 200


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda p: p.write_bytes(b'{"schema": "edgeward.budgets/1", "clients": {'), id="truncated"),
        pytest.param(lambda p: p.write_bytes(b" " * (4 * 1024**2 + 1)), id="oversized"),
        pytest.param(lambda p: p.mkdir(mode=0o700), id="a-directory"),
    ],
)
def test_a_damaged_budget_file_grants_no_fresh_budget(board: Board, damage: Callable[[Path], Any]) -> None:
    damage(board.file)
    s = board.start()  # no crash
    user = s.tokens["user"]
    c = UnixConnection(s.socket)
    st, headers, doc = predict(c, user, board.x[0])  # a token that never asked before is refused too
    c.close()
    assert st == 429 and "daily budget" in doc["error"]["message"] and int(headers["retry-after"]) == DAY
    events = EventStore(board.board.data_dir / layout.EVENTS).list(after_seq=0)
    assert [(e.kind, e.severity) for e in events if "budgets" in e.evidence.get("problem", "")] == [
        ("tamper", "critical")
    ]
    board.stop(s)
    if board.file.is_dir():
        board.file.rmdir()  # the operator looked into it and removed it
        return
    s = board.start()  # the lockout was written down: a restart does not lift it
    assert board.ask(s, s.tokens["user"]) == 429
    board.mono.t += DAY
    assert board.ask(s, user, rows=3) == 200


# --- the file's format, parsed strictly -------------------------------------------------------------


def stat_mode(p: Path) -> int:
    return os.stat(p).st_mode & 0o777


def test_the_file_round_trips() -> None:
    saved = Saved(BOOT_A, 12.5, 0.0, {"ab12cd34": (7, 3600.0), "x": (0, 0.5)})
    assert decode(encode(saved)) == saved
    assert decode(encode(Saved(None, 0.0, 60.0, {}))).boot_id is None


def good() -> dict[str, Any]:
    return {"schema": SCHEMA, "boot_id": BOOT_A, "boottime": 1.0, "lockout": 0, "clients": {"ab12cd34": [3, 60.0]}}


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xff\xfe",
        b"[]",
        b"[" * 100_000,
        b'{"schema": "edgeward.budgets/1", "schema": "edgeward.budgets/1"}',
        json.dumps({**good(), "extra": 1}).encode(),
        json.dumps({k: v for k, v in good().items() if k != "lockout"}).encode(),
        json.dumps({**good(), "schema": "edgeward.budgets/2"}).encode(),
        json.dumps({**good(), "boot_id": "not-a-boot-id"}).encode(),
        json.dumps({**good(), "boottime": -1}).encode(),
        json.dumps({**good(), "boottime": True}).encode(),
        json.dumps({**good(), "lockout": "1"}).encode(),
        json.dumps({**good(), "clients": []}).encode(),
        json.dumps({**good(), "clients": {"../x": [1, 1.0]}}).encode(),
        json.dumps({**good(), "clients": {"ab12cd34\n": [1, 1.0]}}).encode(),
        json.dumps({**good(), "clients": {"a": [-1, 1.0]}}).encode(),
        json.dumps({**good(), "clients": {"a": [1.5, 1.0]}}).encode(),
        json.dumps({**good(), "clients": {"a": [2**53 + 1, 1.0]}}).encode(),
        json.dumps({**good(), "clients": {"a": [1, 1.0, 2]}}).encode(),
        json.dumps({**good(), "clients": {"a": [1, -0.5]}}).encode(),
        b'{"schema": "edgeward.budgets/1", "boot_id": null, "boottime": NaN, "lockout": 0, "clients": {}}',
        b'{"schema": "edgeward.budgets/1", "boot_id": null, "boottime": 0, "lockout": Infinity, "clients": {}}',
    ],
)
def test_anything_else_is_refused(raw: bytes) -> None:
    decode(json.dumps(good()).encode())  # the baseline parses
    with pytest.raises(FormatError):
        decode(raw)


def test_time_since_the_save_counts_only_within_one_boot() -> None:
    saved = Saved(BOOT_A, 100.0, 0.0, {})
    assert saved.elapsed(BOOT_A, 160.0) == 60.0
    assert saved.elapsed(BOOT_B, 160.0) == 0.0  # rebooted: unknown, so none
    assert saved.elapsed(BOOT_A, 50.0) == 0.0  # cannot happen with boottime: unknown
    assert saved.elapsed(None, 160.0) == 0.0  # no boot id on this platform
    assert Saved(None, 100.0, 0.0, {}).elapsed(None, 160.0) == 0.0
