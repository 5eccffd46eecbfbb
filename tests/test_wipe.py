"""End of life on the board: crypto-shred, resumable after a power cut, with a signed attestation."""

from __future__ import annotations

import json

import pytest

from device_agent import Agent
from device_agent.errors import BadSignature, SecurityRefusal
from device_agent.store.datadir import utcnow
from device_agent.store.wipe import ATTESTATION, MARKER, begin, verify_attestation


def _installed(make_board, pack_for, digits):
    board = make_board()
    agent = board.agent()
    agent.install((pack_for(digits.onnx, [board]) / "pi-001.ewb").read_bytes())
    return board, agent


def test_wipe_destroys_keys_and_bundles_and_signs_an_attestation(digits, make_board, pack_for):
    board, agent = _installed(make_board, pack_for, digits)
    sign_public = agent.store.identity().sign_public
    bundle_id = agent.status()["models"][0]["bundle_id"]
    doc = agent.wipe()
    assert sorted(p.name for p in board.data_dir.rglob("*") if p.is_file()) == [ATTESTATION]
    body = verify_attestation(json.loads((board.data_dir / ATTESTATION).read_text()), sign_public)
    assert body["bundles_destroyed"] == [bundle_id] and body["device_id"] == "pi-001"
    assert doc["completed"] >= body["started"]
    with pytest.raises(SecurityRefusal, match="was wiped"):
        board.agent()
    forged = dict(doc, body=dict(body, bundles_destroyed=[]))
    with pytest.raises(BadSignature):
        verify_attestation(forged, sign_public)


def test_an_interrupted_wipe_completes_on_the_next_start(digits, make_board, pack_for):
    """Power cut right after the marker was written: the next agent start finishes the wipe."""
    board, agent = _installed(make_board, pack_for, digits)
    begin(agent.store, board.keys, utcnow())
    assert (board.data_dir / MARKER).exists()
    with pytest.raises(SecurityRefusal, match="was wiped"):
        Agent(board.data_dir, board.keys)
    assert not (board.data_dir / MARKER).exists()
    assert not (board.data_dir / "keys.wrapped").exists()
    assert sorted(p.name for p in board.data_dir.rglob("*")) == [ATTESTATION]


def test_wipe_without_the_keys_refuses_unless_told_to_wipe_unsigned(digits, make_board, pack_for, monkeypatch, capsys):
    """A mistyped passphrase must not look like a deliberate unsigned wipe: it refuses (exit 1)
    and changes nothing; --unsigned wipes all the same and says the attestation is unsigned."""
    from device_agent.cli import main
    from tests.conftest import tree_snapshot

    board, _ = _installed(make_board, pack_for, digits)
    monkeypatch.delenv("EDGEWARD_DEVICE_PASSPHRASE", raising=False)
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert main(["wipe", "--data-dir", str(board.data_dir)]) == 2
    assert "pass --yes" in capsys.readouterr().err
    before = tree_snapshot(board.data_dir)
    assert main(["wipe", "--data-dir", str(board.data_dir), "--yes"]) == 1
    assert "--unsigned" in capsys.readouterr().err
    assert tree_snapshot(board.data_dir) == before
    monkeypatch.setenv("EDGEWARD_DEVICE_PASSPHRASE", "a typo")
    assert main(["wipe", "--data-dir", str(board.data_dir), "--yes"]) == 1
    assert tree_snapshot(board.data_dir) == before
    assert main(["wipe", "--data-dir", str(board.data_dir), "--yes", "--unsigned", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["signature"] is None and not (board.data_dir / "keys.wrapped").exists()
    assert sorted(p.name for p in board.data_dir.rglob("*")) == [ATTESTATION]


def test_a_surviving_copy_of_the_bundle_is_useless_after_wipe(digits, make_board, pack_for, publisher):
    """Flash may keep the bundle's blocks; the only key that opened it is gone. Re-provisioned
    under the same device id, the board has a new key and refuses the old bundle."""
    from device_agent.bundle.keyfiles import load_public_key_file
    from device_agent.errors import WrongDevice

    board, agent = _installed(make_board, pack_for, digits)
    bundle_id = agent.status()["models"][0]["bundle_id"]
    copy = (board.data_dir / "bundles" / f"{bundle_id}.ewb").read_bytes()
    agent.wipe()
    (board.data_dir / ATTESTATION).unlink()
    Agent.provision(board.data_dir, "pi-001", [load_public_key_file(publisher / "publisher.pub")], [], board.keys)
    with pytest.raises(WrongDevice, match="sealed to another key"):
        Agent(board.data_dir, board.keys).install(copy)


@pytest.mark.parametrize("plant", ["symlink", "directory", "fifo"])
def test_a_wipe_completes_past_entries_planted_in_place_of_secrets(
    digits, make_board, pack_for, tmp_path, plant
) -> None:
    """Someone with the card plants a link, a directory or a FIFO where the wipe shreds a key: the
    wipe still destroys every key, deletes everything and says what it found."""
    import os

    board, agent = _installed(make_board, pack_for, digits)
    target = board.data_dir / "kek.bin"
    outside = tmp_path / "outside.txt"
    outside.write_text("not the board's")
    if plant == "symlink":
        target.symlink_to(outside)
    elif plant == "directory":
        (target / "inner").mkdir(parents=True)
    else:
        os.mkfifo(target)
    doc = agent.wipe()
    assert sorted(p.name for p in board.data_dir.iterdir()) == [ATTESTATION]
    assert doc["signature"] is not None
    assert outside.read_text() == "not the board's"  # nothing outside the data dir is touched


def test_a_planted_journal_cannot_point_the_wipe_outside_the_data_dir(digits, make_board, pack_for, tmp_path) -> None:
    board, agent = _installed(make_board, pack_for, digits)
    begin(agent.store, board.keys, utcnow())
    marker = json.loads((board.data_dir / MARKER).read_text())
    outside = tmp_path / "precious"
    outside.write_text("x")
    for path in (str(outside), "../precious", "bundles"):
        marker["kek_path"] = path
        (board.data_dir / MARKER).write_text(json.dumps(marker))
        from device_agent.store.datadir import DataDir
        from device_agent.store.wipe import shred_secrets

        shred_secrets(DataDir(board.data_dir))
    assert outside.read_text() == "x"
    (board.data_dir / MARKER).write_bytes(b"\x00garbage")  # a damaged journal still completes
    from device_agent.cli import main

    assert main(["status", "--data-dir", str(board.data_dir)]) == 0
    assert sorted(p.name for p in board.data_dir.iterdir()) == [ATTESTATION]
