"""Every file the agent and the packager write, checked for its mode under a permissive umask
(000: what a careless service unit or a shell profile can leave a process with). The board's
modes come from the one owner of its paths (``device_agent/store/layout.py``): keys, bundles and
their keys, the sealed state and tokens, the SQLite stores, the audit log, the outbox and the
budgets are never group- or world-readable, and nothing is wider than the layout says. The
packager's private keys are 0600, and nothing it writes is group- or world-writable.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from device_agent.cli import main as agent_main
from device_agent.store import layout
from device_agent.telemetry.outbox import SECURITY_EVENT, Item, Outbox
from packager.cli import main as host_main
from tests.adversarial.conftest import Target


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): stat.S_IMODE(p.lstat().st_mode) for p in root.rglob("*")}


def test_every_file_the_agent_writes_has_its_layout_mode_under_umask_000(
    target: Target, tmp_path: Path, publisher: Path, umask_000: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from device_agent.service.service import Service

    d = tmp_path / "umask-board"
    kek = str(target.kek_file)
    assert agent_main(["provision", "--data-dir", str(d), "--device-id", "pi-umask", "--publisher-pub",
                       str(publisher / "publisher.pub"), "--export", str(tmp_path / "pi-umask.json"),
                       "--kek-file", kek]) == 0
    from tests.conftest import Board

    board = Board(d, tmp_path / "pi-umask.json", "pi-umask", target.board.keys)
    for v in (1, 2):
        f = tmp_path / f"v{v}.ewb"
        f.write_bytes(target.bundle(v, boards=[board]))
        assert agent_main(["install", str(f), "--data-dir", str(d), "--kek-file", kek]) == 0
    assert agent_main(["install", str(tmp_path / "v1.ewb"), "--data-dir", str(d), "--kek-file", kek]) == 1  # an event
    assert agent_main(["token", "add", "--role", "user", "--data-dir", str(d), "--kek-file", kek]) == 0
    from device_agent import Agent

    agent = Agent(d, board.keys)
    service = Service(agent)  # audit log and budgets
    who = service.tokens.add("admin", target.clock.now)[0]
    service.predict(who, json.dumps({"inputs": np.zeros(64).tolist()}).encode(), "application/json")
    service.save_budgets()
    service.audit.close()
    outbox = Outbox(agent.store.outbox_file, 16)  # the telemetry outbox, as the service opens it
    outbox.add([Item(SECURITY_EVENT, lambda seq, prev: ("edgeward/v1/pi-umask/events", b"signed"))])
    capsys.readouterr()

    problems = layout.Layout(d).problems()
    assert problems == [], problems
    found = {f.rel: f for f in layout.Layout(d).scan()}
    for name in (layout.KEYS, layout.STATE, layout.TRUST, layout.TOKENS, layout.BUDGETS, layout.EVENTS,
                 layout.OUTBOX, f"{layout.AUDIT}/fingerprint.key", f"{layout.AUDIT}/head.json"):
        assert name in found, f"the agent should have written {name}"
    secret = [f for f in found.values() if f.entry is not None and not f.entry.mode & 0o077]
    assert any(f.rel.endswith(".key") and f.rel.startswith("bundles/") for f in secret)
    assert any(f.rel.startswith("audit/audit-") for f in secret)
    for f in secret:
        assert f.mode & 0o077 == 0, f"{f.rel} is mode {f.mode:o} under umask 000"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    # What leaves the board is public, and still not writable by others.
    assert stat.S_IMODE((tmp_path / "pi-umask.json").stat().st_mode) & 0o022 == 0


def test_every_file_the_packager_writes_is_no_wider_than_it_should_be_under_umask_000(
    target: Target, tmp_path: Path, umask_000: None, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EDGEWARD_PASSPHRASE", "correct horse battery staple")  # the kept keys' rule
    keys = tmp_path / "keys"
    for kind in ("publisher", "operator", "recovery"):
        assert host_main(["keys", kind, "--out", str(keys)]) == 0
    out = tmp_path / "release"
    assert host_main(["pack", str(target.model), "--profile", "rpi4b", "--publisher-key",
                      str(keys / "publisher.key"), "--device", str(target.board.enrolment), "--model-version", "1",
                      "--out", str(out)]) == 0
    capsys.readouterr()
    modes = {**{f"keys/{k}": v for k, v in _modes(keys).items()}, **{f"release/{k}": v for k, v in _modes(out).items()}}
    assert {k for k in modes if k.endswith(".key")} == {"keys/publisher.key", "keys/operator.key", "keys/recovery.key"}
    for name, mode in modes.items():
        if name.endswith(".key"):
            assert mode == 0o600, f"{name} is mode {mode:o}"
        assert mode & 0o022 == 0, f"{name} is mode {mode:o}: writable by others under umask 000"
    assert {"release/pi-001.ewb", "release/report.json", "release/model-card.cdx.json"} <= set(modes)
    for d in (keys, out):
        assert stat.S_IMODE(d.stat().st_mode) & 0o022 == 0, f"{d} is mode {stat.S_IMODE(d.stat().st_mode):o}"
