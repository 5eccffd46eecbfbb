"""Offline tampering with the SD card: whoever can write the data dir but does not hold the device
keys cannot edit the trusted state, plant a trust anchor or a token, or swap a stored bundle.

Each attack is done the way an attacker with the card in a reader would: by editing bytes in
the files, then running the ordinary commands. Refusals exit 1, change nothing but the event
log, and record a security event.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from device_agent.bundle.keyfiles import load_public_key_file
from device_agent.cli import main
from device_agent.errors import SecurityRefusal
from tests.conftest import PASSPHRASE, Board
from tests.fixtures.trusted import trusted_snapshot


@pytest.fixture(autouse=True)
def _keys_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEWARD_DEVICE_PASSPHRASE", PASSPHRASE.decode())
    monkeypatch.delenv("EDGEWARD_DEVICE_KEK_FILE", raising=False)


def agent_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def edit(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert old in data, f"{old!r} not in {path.name}"
    path.write_bytes(data.replace(old, new))


def tamper_events(capsys: pytest.CaptureFixture[str], board: Board) -> list[dict]:
    code, out, _ = agent_cli(capsys, "events", "--data-dir", str(board.data_dir), "--json")
    assert code == 0
    return [e for e in json.loads(out) if e["kind"] == "tamper"]


def three_versions(
    make_board: Callable[..., Board], pack_for: Callable[..., Path], model: Path
) -> tuple[Board, list[Path]]:
    board = make_board()
    bundles = [pack_for(model, [board], version=v) / f"{board.device_id}.ewb" for v in (1, 2, 3)]
    for b in bundles:
        board.agent().install(b.read_bytes())
    return board, bundles


def test_lowering_the_anti_rollback_floor_on_the_card_is_refused(make_board, pack_for, digits, capsys) -> None:
    board, bundles = three_versions(make_board, pack_for, digits.onnx)
    # Version 1 was dropped when 3 arrived; the attacker lowers the recorded highest version.
    edit(board.data_dir / "state.json", b'"highest_version": 3', b'"highest_version": 0')
    before = trusted_snapshot(board.data_dir)
    code, _, err = agent_cli(capsys, "install", str(bundles[0]), "--data-dir", str(board.data_dir))
    assert code == 1, err
    assert "state.json fails its authentication check" in err
    assert trusted_snapshot(board.data_dir) == before
    assert tamper_events(capsys, board)


def test_a_trust_anchor_planted_on_the_card_is_refused(
    make_board, pack_for, digits, publisher, tmp_path, capsys
) -> None:
    from packager.keys import generate

    board = make_board()
    attacker = tmp_path / "attacker"
    generate("publisher", attacker, unencrypted=True)
    theirs = base64.b64encode(load_public_key_file(attacker / "publisher.pub")).decode().encode()
    ours = base64.b64encode(load_public_key_file(publisher / "publisher.pub")).decode().encode()
    edit(board.data_dir / "trust.json", ours, theirs)
    from packager.keys import load_private_key
    from packager.modelfile import infer_task, read_model
    from packager.pack import PackOptions, load_enrolments, pack
    from packager.profiles import load_profile
    from packager.signers import FileSigner

    m = read_model(digits.onnx)
    out = tmp_path / "forged"
    pack(m, load_profile("rpi4b"), FileSigner(load_private_key(attacker / "publisher.key")),
         load_enrolments([board.enrolment]),
         PackOptions(model_id="digits", model_version=9, task=infer_task(m, {})), out)
    before = trusted_snapshot(board.data_dir)
    code, _, err = agent_cli(capsys, "install", str(out / "pi-001.ewb"), "--data-dir", str(board.data_dir))
    assert code == 1, err
    assert "trust.json fails its authentication check" in err
    assert trusted_snapshot(board.data_dir) == before


def test_a_token_planted_on_the_card_is_refused(make_board, pack_for, digits, capsys) -> None:
    from device_agent.service.service import Service

    board = make_board()
    board.agent().install((pack_for(digits.onnx, [board]) / "pi-001.ewb").read_bytes())
    code, out, err = agent_cli(capsys, "token", "add", "--role", "user", "--data-dir", str(board.data_dir), "--json")
    assert code == 0, err
    legit = json.loads(out)["token"]
    forged = "ewt_" + "A" * 43
    edit(board.data_dir / "tokens.json", hashlib.sha256(legit.encode()).hexdigest().encode(),
         hashlib.sha256(forged.encode()).hexdigest().encode())
    edit(board.data_dir / "tokens.json", b'"user"', b'"admin"')
    with pytest.raises(SecurityRefusal, match="tokens.json fails its authentication check"):
        Service(board.agent()).authenticate(f"Bearer {forged}")
    code, _, err = agent_cli(capsys, "token", "list", "--data-dir", str(board.data_dir))
    assert code == 1 and "tokens.json" in err


@pytest.mark.parametrize("swap", ["older version", "another model"])
def test_a_stored_bundle_swapped_for_another_signed_one_does_not_serve(
    make_board, pack_for, digits, digits_test, tmp_path, capsys, swap: str
) -> None:
    board = make_board()
    v1 = pack_for(digits.onnx, [board], version=1) / "pi-001.ewb"
    v2 = pack_for(digits.onnx, [board], version=2) / "pi-001.ewb"
    other = pack_for(digits.onnx, [board], version=7, model_id="other") / "pi-001.ewb"
    for b in (v1, v2):
        assert agent_cli(capsys, "install", str(b), "--data-dir", str(board.data_dir))[0] == 0
    current = board.data_dir / "bundles" / f"{board.agent().status()['models'][0]['bundle_id']}.ewb"
    current.write_bytes((v1 if swap == "older version" else other).read_bytes())
    x = tmp_path / "x.npy"
    np.save(x, digits_test[0][:1])
    code, out, err = agent_cli(capsys, "predict", "--data-dir", str(board.data_dir), "--input", str(x))
    assert code == 1, (out, err)
    assert "is not the one installed" in err
    with pytest.raises(SecurityRefusal, match="is not the one installed"):
        board.agent().model()  # what the service loads from

