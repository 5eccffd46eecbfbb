"""Fixtures of the attack suite: one real board (unlocked by a key file, so no Argon2 run per
command), its operator and recovery keys, its settable clock, and the publisher's signing key.

Every attack test asserts the refusal *and* an unchanged trusted state, through the one helper
in ``tests/fixtures/trusted.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from device_agent import Agent
from device_agent.store.keys import KeySource
from tests.adversarial.forge import Publisher, sidecar_json, with_sidecar
from tests.conftest import Board
from tests.fixtures.trusted import Clock, Operator


@dataclass
class Target:
    """A provisioned board under attack, and the keys the test holds against it."""

    board: Board
    operator: Operator
    recovery: Operator
    clock: Clock
    publisher: Publisher
    kek_file: Path
    pack: Callable[..., Path]
    model: Path

    @property
    def data_dir(self) -> Path:
        return self.board.data_dir

    @property
    def device_id(self) -> str:
        return self.board.device_id

    def agent(self, **kw: Any) -> Agent:
        return Agent(self.board.data_dir, self.board.keys, clock=self.clock, **kw)

    def cli(self, *argv: str) -> list[str]:
        """An ``edgeward-agent`` command line for this board."""
        return [*argv, "--data-dir", str(self.data_dir), "--kek-file", str(self.kek_file)]

    def bundle(self, version: int = 1, *, boards: list[Board] | None = None, packager: bool = False,
               **opts: Any) -> bytes:
        """A bundle for this board (or the first of ``boards``), created at the board's clock:
        sealed directly (``tests/adversarial/forge.py``, fast), or by the real packager."""
        opts.setdefault("created", self.clock.now)
        board = (boards or [self.board])[0]
        if packager:
            return (self.pack(self.model, [board], version=version, **opts) / f"{board.device_id}.ewb").read_bytes()
        model = self.model.read_bytes()
        labels = opts.pop("labels", None)
        task = {"kind": "classifier", "output": 1, "scores": "probabilities"}
        sidecar = sidecar_json(model, task={**task, "labels": labels} if labels else task)
        return with_sidecar(model, board.enrolment, self.publisher, sidecar, version=version, **opts)

    def install(self, version: int = 1, **opts: Any) -> bytes:
        data = self.bundle(version, **opts)
        self.agent().install(data)
        return data


def provision(tmp_path: Path, publisher_dir: Path, device_id: str, operator: Operator, recovery: Operator,
              clock: Clock) -> tuple[Board, Path]:
    from device_agent.bundle.keyfiles import load_public_key_file

    kek = os.urandom(32)
    kek_file = tmp_path / f"{device_id}.kek"
    kek_file.write_bytes(kek)
    keys = KeySource(kek=kek)
    d = tmp_path / f"board-{device_id}"
    enrolment = tmp_path / f"{device_id}.json"
    enrolment.write_bytes(Agent.provision(d, device_id, [load_public_key_file(publisher_dir / "publisher.pub")],
                                          [operator.public], keys, now=clock.now, recovery=[recovery.public]))
    return Board(d, enrolment, device_id, keys), kek_file


@pytest.fixture
def target(tmp_path: Path, publisher: Path, pack_for: Callable[..., Path], digits: Any) -> Target:
    op, rec, clock = Operator(), Operator(), Clock()
    board, kek_file = provision(tmp_path, publisher, "pi-001", op, rec, clock)
    return Target(board, op, rec, clock, Publisher.load(publisher), kek_file, pack_for, digits.onnx)


@pytest.fixture
def other_board(tmp_path: Path, publisher: Path, target: Target) -> Board:
    """A second board of the same fleet (same publisher and operator)."""
    board, _ = provision(tmp_path, publisher, "pi-002", target.operator, target.recovery, target.clock)
    return board
