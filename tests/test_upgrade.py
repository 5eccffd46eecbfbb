"""A board whose data dir was written by release 0.1 (tests/data/datadir-0.1, made by
tests/data/make_datadir.py through that release's public commands) upgrades on its first start
without losing its installed models, its token or its anti-rollback state."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from device_agent.cli import main
from device_agent.errors import SecurityRefusal
from device_agent.store import layout
from device_agent.trust import sealed

GOLDEN = Path(__file__).parent / "data" / "datadir-0.1"


@pytest.fixture
def board(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "board"
    shutil.copytree(GOLDEN / "board", d)
    os.chmod(d, 0o700)
    kek = tmp_path / "kek.bin"
    shutil.copy(GOLDEN / "kek.bin", kek)
    monkeypatch.setenv("EDGEWARD_DEVICE_KEK_FILE", str(kek))
    monkeypatch.delenv("EDGEWARD_DEVICE_PASSPHRASE", raising=False)
    return d


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_release_01_board_keeps_its_models_token_and_anti_rollback(board: Path, capsys) -> None:
    expected = json.loads((GOLDEN / "expected.json").read_text())
    for name in (layout.STATE, layout.TRUST, layout.TOKENS):
        assert not sealed.is_sealed((board / name).read_bytes())
    code, out, err = cli(capsys, "status", "--data-dir", str(board), "--json")
    assert code == 0, err
    status = json.loads(out)
    [model] = status["models"]
    assert (model["model_id"], model["version"], model["previous_version"], model["highest_version"]) == (
        expected["model_id"], expected["installed_version"], expected["previous_version"], 2
    )
    assert model["serving"] is True and status["data_dir_problems"] == []
    for name in (layout.STATE, layout.TRUST, layout.TOKENS):
        assert sealed.is_sealed((board / name).read_bytes()), name
    assert not (board / layout.KEYS_UPGRADE).exists()
    code, out, err = cli(capsys, "predict", "--data-dir", str(board), "--input", str(GOLDEN / "input.npy"))
    assert code == 0 and json.loads(out) == expected["predict"], err
    # The token made by release 0.1 still opens the API.
    from device_agent import Agent
    from device_agent.service.service import Service

    who = Service(Agent(board)).authenticate(f"Bearer {expected['token']}")
    assert who.role == "user"
    # Anti-rollback survived: neither installed version goes in again.
    for v in ("v1.ewb", "v2.ewb"):
        code, _, err = cli(capsys, "install", str(GOLDEN / v), "--data-dir", str(board))
        assert code == 1, err
    # The upgraded board now refuses an unsealed file, like any other offline edit.
    (board / layout.STATE).write_bytes(b'{"schema": "edgeward.state/1", "clock_floor": null, "models": {}}')
    code, _, err = cli(capsys, "status", "--data-dir", str(board))
    assert code == 1 and "state.json fails its authentication check" in err


def test_an_upgrade_cut_off_after_sealing_some_files_resumes(board: Path, capsys) -> None:
    from device_agent import Agent
    from device_agent.store.datadir import DataDir
    from device_agent.store.keys import KeySource
    from device_agent.store.upgrade import _seal_state

    store, source = DataDir(board), KeySource.from_env()
    old = store.unlock(source)
    staged = type(old)(bytearray(old.box_private), bytearray(old.sign_seed), bytearray(os.urandom(32)))
    store.write_keys(staged, source, layout.KEYS_UPGRADE)  # step 1 done...
    _seal_state(store, store.sealing_key(staged))  # ...and state.json sealed, then the power went
    assert sealed.is_sealed((board / layout.STATE).read_bytes())
    assert not sealed.is_sealed((board / layout.TOKENS).read_bytes())
    status = Agent(board).status()
    assert [m["version"] for m in status["models"]] == [2]
    assert not (board / layout.KEYS_UPGRADE).exists()
    assert sealed.is_sealed((board / layout.TOKENS).read_bytes())


def test_a_planted_upgrade_file_with_other_keys_is_refused(board: Path, tmp_path: Path) -> None:
    from device_agent import Agent
    from device_agent.store.datadir import DataDir
    from device_agent.store.keys import DeviceKeys, KeySource

    DataDir(board).write_keys(DeviceKeys.generate(), KeySource.from_env(), layout.KEYS_UPGRADE)
    with pytest.raises(SecurityRefusal, match="does not hold this board's keys"):
        Agent(board).status()
