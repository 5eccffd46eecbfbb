"""Bundle format version 2 (docs/bundle-format.md, "Version 2"): one payload per release, one
envelope per device under a signed Merkle root, installed with real crypto and onnxruntime."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent import crypto
from device_agent.errors import (
    BadSignature,
    Expired,
    FormatError,
    IntegrityError,
    RollbackRefused,
    SecurityRefusal,
    UsageError,
    WrongDevice,
)
from tests.conftest import tree_snapshot


def _rfc9162_root(leaves: list[bytes]) -> bytes:
    """RFC 9162 2.1.1, written from the RFC's recursive definition (the tree splits at the largest
    power of two below n)."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while 2 * k < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + _rfc9162_root(leaves[:k]) + _rfc9162_root(leaves[k:])).digest()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 64, 100])
def test_merkle_tree_is_rfc9162s_and_every_proof_leads_only_to_its_own_leaf(n: int) -> None:
    leaves = [crypto.merkle_leaf(b"t", i.to_bytes(4, "big")) for i in range(n)]
    tree = crypto.MerkleTree(b"".join(leaves))
    assert tree.root == _rfc9162_root(leaves)
    for i in range(n):
        proof = tree.proof(i)
        assert len(proof) == crypto.merkle_proof_length(i, n)
        assert crypto.merkle_root_from_proof(leaves[i], i, n, proof) == tree.root
        other = (i + 1) % n
        if other != i:  # the proof of leaf i does not prove leaf i+1, nor leaf i at another index
            assert crypto.merkle_root_from_proof(leaves[other], i, n, proof) != tree.root
            try:
                moved = crypto.merkle_root_from_proof(leaves[i], other, n, proof)
            except IntegrityError:
                continue  # a proof of another length than that index's path
            assert moved != tree.root
    with pytest.raises(IntegrityError):
        crypto.merkle_root_from_proof(leaves[0], 0, n, [*tree.proof(0), leaves[0]])
    with pytest.raises(IntegrityError):
        crypto.merkle_root_from_proof(leaves[0], n, n, tree.proof(0))


def test_a_leaf_never_passes_for_a_node() -> None:
    """Leaves and nodes are hashed under different prefixes (RFC 9162 2.1.1): two leaves' node
    hash given as a leaf of a one-leaf tree is not that tree's root."""
    a, b = crypto.merkle_leaf(b"t", b"a"), crypto.merkle_leaf(b"t", b"b")
    node = crypto.MerkleTree(a + b).root
    assert crypto.merkle_leaf(b"t", a + b) != node


# --- installing a release on real boards ------------------------------------------------------------


def _cli(board: Any, monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    from device_agent.cli import main as agent_main

    monkeypatch.setenv("EDGEWARD_DEVICE_PASSPHRASE", board.keys.passphrase.decode())
    return agent_main([*argv, "--data-dir", str(board.data_dir)])


def _env(out: Path, device: str) -> Path:
    return out / "envelopes" / f"{device}.ewe"


def test_v2_release_installs_end_to_end_and_predicts_as_onnxruntime(
    digits, digits_test, make_board, release_for, monkeypatch
) -> None:
    """One payload for three boards, one envelope each, signed once: each board installs its own
    envelope with the shared payload (the API and the CLI), answers exactly as onnxruntime, and
    stores the release as one v2 single file that the next agent re-verifies and serves."""
    import onnxruntime as ort

    x, _ = digits_test
    boards = [make_board(f"pi-00{i}") for i in range(3)]
    out = release_for(digits.onnx, boards)
    index = json.loads((out / "release.json").read_text())
    payload = (out / "payload.ewp").read_bytes()
    assert index["payload"] == {"file": "payload.ewp", "length": len(payload),
                                "sha256": hashlib.sha256(payload).hexdigest()}
    assert sorted(index["devices"]) == [b.device_id for b in boards]
    session = ort.InferenceSession(str(digits.onnx), providers=["CPUExecutionProvider"])
    _, probs = session.run(None, {session.get_inputs()[0].name: x})
    for i, board in enumerate(boards):
        env = _env(out, board.device_id)
        entry = index["devices"][board.device_id]
        assert entry["length"] == env.stat().st_size < 1024
        assert entry["sha256"] == hashlib.sha256(env.read_bytes()).hexdigest()
        if i == 0:
            assert _cli(board, monkeypatch, "install", str(env), "--payload", str(out / "payload.ewp")) == 0
        else:
            m = board.agent().install_release(env, out / "payload.ewp")
            assert (m.bundle_id, m.device_id, m.format_version) == (index["release_id"], board.device_id, 2)
        stored = board.data_dir / "bundles" / f"{index['release_id']}.ewb"
        assert stored.read_bytes() == env.read_bytes() + payload  # the v2 single file
        agent = board.agent()  # a fresh agent: the stored release is verified again before it serves
        assert [p["label"] for p in agent.predict(x)["predictions"]] == probs.argmax(axis=1).tolist()
        assert agent.status()["models"][0]["bundle_id"] == index["release_id"]


def test_a_v2_single_file_installs_with_install_file_and_the_cli(digits, make_board, release_for, monkeypatch,
                                                                   capsys) -> None:
    a, b = make_board("pi-001"), make_board("pi-002")
    out = release_for(digits.onnx, [a, b], layout="single-v2")
    assert sorted(p.name for p in out.glob("*.ewb")) == ["pi-001.ewb", "pi-002.ewb"]
    assert a.agent().install_file(out / "pi-001.ewb").format_version == 2
    assert _cli(b, monkeypatch, "install", str(out / "pi-002.ewb")) == 0
    assert "predictions" in b.agent().predict(np.zeros((1, 64), np.float32))
    # A payload alone, or an envelope without its payload: the command to use, exit 2.
    shared = release_for(digits.onnx, [a], version=2)
    capsys.readouterr()
    assert _cli(a, monkeypatch, "install", str(shared / "payload.ewp")) == 2
    assert "--payload" in capsys.readouterr().err
    assert _cli(a, monkeypatch, "install", str(_env(shared, "pi-001"))) == 2
    assert "--payload" in capsys.readouterr().err


def test_an_envelope_for_another_board_is_refused_before_the_payload_is_read(
    digits, make_board, release_for, monkeypatch
) -> None:
    """Board B given A's envelope (with the right payload): wrong device, exit 1, nothing changed,
    and not a byte of the ciphertext read."""
    from device_agent.bundle import reading

    a, b = make_board("pi-001"), make_board("pi-002")
    out = release_for(digits.onnx, [a, b])
    before = tree_snapshot(b.data_dir)
    reads: list[int] = []
    real = reading._read_into
    monkeypatch.setattr(reading, "_read_into", lambda fd, view: reads.append(len(view)) or real(fd, view))
    with pytest.raises(WrongDevice, match="pi-001"):
        b.agent().install_release(_env(out, "pi-001"), out / "payload.ewp")
    assert reads == []  # the ciphertext is read by _read_into only
    assert _cli(b, monkeypatch, "install", str(_env(out, "pi-001")), "--payload", str(out / "payload.ewp")) == 1
    assert tree_snapshot(b.data_dir) == before
    b.agent().install_release(_env(out, "pi-002"), out / "payload.ewp")
    assert reads  # the same path reads the payload once the envelope is this board's


def test_a_payload_with_one_byte_changed_is_refused_and_nothing_is_installed(
    digits, make_board, release_for, tmp_path
) -> None:
    board = make_board()
    out = release_for(digits.onnx, [board])
    payload = (out / "payload.ewp").read_bytes()
    before = tree_snapshot(board.data_dir)
    cipher_start = len(payload) - _head(out).payload_length
    for at, error in ((cipher_start + 100, IntegrityError), (len(payload) - 1, IntegrityError),
                      (40, BadSignature), (cipher_start - 1, BadSignature)):
        bad = bytearray(payload)
        bad[at] ^= 0x01
        (tmp_path / "bad.ewp").write_bytes(bad)
        with pytest.raises(error) as e:
            board.agent().install_release(_env(out, board.device_id), tmp_path / "bad.ewp")
        assert e.value.exit_code == 1
        assert tree_snapshot(board.data_dir) == before, at
    board.agent().install_release(_env(out, board.device_id), out / "payload.ewp")


def _head(out: Path) -> Any:
    from device_agent.bundle import release

    data = (out / "payload.ewp").read_bytes()
    head = data[: release.payload_head_length(data)]
    return release.ReleaseHead.from_json(json.loads(head[release.PAYLOAD_HEADER_BYTES : -64]))


def test_an_envelope_whose_proof_does_not_lead_to_the_signed_root_is_refused(
    digits, make_board, release_for, tmp_path
) -> None:
    """An altered proof hash, an envelope moved to another index, an envelope of another release
    of the same model, and one forged by someone holding only the board's public key (a content
    key of their own sealed to it, under the real proof): each refused, exit 1, nothing changed."""
    from device_agent.bundle import release

    a, b = make_board("pi-001"), make_board("pi-002")
    out = release_for(digits.onnx, [a, b])
    other = release_for(digits.onnx, [a, b], version=2)
    good = _env(out, "pi-001").read_bytes()
    env = release.parse_envelope(good)
    before = tree_snapshot(a.data_dir)
    proof_flipped = bytearray(good)
    proof_flipped[-1] ^= 0x80
    moved = bytearray(good)
    moved[35] ^= 0x01  # leaf index 0 -> 1 (the leaf index sits at bytes 32..35)
    enrolment = json.loads(a.enrolment.read_text())
    box_public = base64.b64decode(enrolment["box_public"])
    forged_leaf = release.leaf_bytes(env.release_id, env.index, box_public,
                                     crypto.seal_content_key(box_public, crypto.new_content_key()), "pi-001")
    forged = release.build_envelope(forged_leaf, list(env.proof))
    cases = {"proof": bytes(proof_flipped), "index": bytes(moved), "release": _env(other, "pi-001").read_bytes(),
             "forged": forged}
    for name, data in cases.items():
        (tmp_path / f"{name}.ewe").write_bytes(data)
        with pytest.raises(SecurityRefusal, match="release|inclusion|leaf") as e:
            a.agent().install_release(tmp_path / f"{name}.ewe", out / "payload.ewp")
        assert e.value.exit_code == 1, name
        assert tree_snapshot(a.data_dir) == before, name


def test_a_truncated_or_extended_payload_is_refused(digits, make_board, release_for, tmp_path, monkeypatch) -> None:
    board = make_board()
    out = release_for(digits.onnx, [board])
    payload = (out / "payload.ewp").read_bytes()
    before = tree_snapshot(board.data_dir)
    for name, data, needle in (("short", payload[:-1], "truncated"), ("long", payload + b"\0", "appended"),
                               ("head", payload[:50], "truncated")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(FormatError, match=needle):
            board.agent().install_release(_env(out, board.device_id), tmp_path / name)
        assert _cli(board, monkeypatch, "install", str(_env(out, board.device_id)), "--payload",
                    str(tmp_path / name)) == 3
    # The envelope itself, cut short or with a byte appended.
    env = _env(out, board.device_id).read_bytes()
    for name, data in (("env-short", env[:-1]), ("env-long", env + b"\0")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(FormatError):
            board.agent().install_release(tmp_path / name, out / "payload.ewp")
    assert tree_snapshot(board.data_dir) == before


def test_rollback_and_expiry_are_refused_as_in_v1(digits, make_board, release_for, pack_for) -> None:
    """The same decisions as version 1: a release not newer than what the board accepted (from a v1
    bundle or a v2 release) is refused, and so is an expired one, judged at the signed floor."""
    board = make_board()
    agent = board.agent()
    agent.install_file(pack_for(digits.onnx, [board], version=1) / "pi-001.ewb")  # v1 bundle, version 1
    v2 = release_for(digits.onnx, [board], version=2)
    old = release_for(digits.onnx, [board], version=1)
    agent.install_release(_env(v2, "pi-001"), v2 / "payload.ewp")
    before = tree_snapshot(board.data_dir)
    for out in (old, v2):
        with pytest.raises(RollbackRefused):
            board.agent().install_release(_env(out, "pi-001"), out / "payload.ewp")
    past = datetime(2020, 1, 1, tzinfo=UTC)
    expired = release_for(digits.onnx, [board], version=3, created=past, expires=past + timedelta(days=1))
    with pytest.raises(Expired):
        board.agent().install_release(_env(expired, "pi-001"), expired / "payload.ewp")
    assert tree_snapshot(board.data_dir) == before
    assert board.agent().status()["models"][0]["version"] == 2


def test_a_stored_v2_release_is_reverified_on_load(digits, make_board, release_for) -> None:
    """The stored single file is as untrusted as the one received: one byte changed refuses at the
    next load, and a swap for another validly signed release for this board does not serve."""
    board = make_board()
    first = release_for(digits.onnx, [board], version=1)
    second = release_for(digits.onnx, [board], version=2)
    m = board.agent().install_release(_env(first, "pi-001"), first / "payload.ewp")
    stored = board.data_dir / "bundles" / f"{m.bundle_id}.ewb"
    original = stored.read_bytes()
    x = np.zeros((1, 64), np.float32)
    for bad in (original[:200] + bytes([original[200] ^ 1]) + original[201:],
                original[:-1] + bytes([original[-1] ^ 1]),
                _env(second, "pi-001").read_bytes() + (second / "payload.ewp").read_bytes()):
        stored.write_bytes(bad)
        with pytest.raises(SecurityRefusal):
            board.agent().predict(x)
    stored.write_bytes(original)
    assert "predictions" in board.agent().predict(x)


def test_pack_release_refuses_a_device_enrolled_twice_and_writes_nothing(digits, make_board, release_for,
                                                                         tmp_path) -> None:
    board = make_board()
    with pytest.raises(UsageError, match="enrolled twice"):
        release_for(digits.onnx, [board, board])
    assert not any(p.name.startswith("release-") and any(p.iterdir()) for p in tmp_path.iterdir())


def test_pack_layout_shared_from_the_cli_writes_one_payload_and_small_envelopes(
    digits, make_board, publisher, tmp_path, monkeypatch, capsys
) -> None:
    """`edgeward pack --layout shared --devices-dir`: one payload, an envelope per device, the
    release index, `--json` like the v1 pack; a second release into the same OUT replaces the
    first one's envelopes; v1 stays the default."""
    from packager.cli import main as host_main

    boards = [make_board(f"pi-{i:03d}") for i in range(4)]
    devices = tmp_path / "devices"
    devices.mkdir()
    for b in boards:
        (devices / b.enrolment.name).write_bytes(b.enrolment.read_bytes())
    common = [str(digits.onnx), "--profile", "rpi4b", "--publisher-key", str(publisher / "publisher.key"),
              "--devices-dir", str(devices), "--model-id", "digits", "--out", str(tmp_path / "out"), "--json"]
    capsys.readouterr()
    assert host_main(["pack", *common, "--model-version", "1", "--layout", "shared"]) == 0
    report = json.loads(capsys.readouterr().out)
    out = tmp_path / "out"
    assert report["layout"] == "shared" and report["release"]["devices"] == 4
    assert sorted(p.name for p in (out / "envelopes").iterdir()) == [f"pi-{i:03d}.ewe" for i in range(4)]
    assert not list(out.glob("*.ewb")) and not list(out.glob(".edgeward-staging-*"))
    assert report["release"]["bytes_per_device"] < 1024
    index = json.loads((out / "release.json").read_text())
    assert index["release_id"] == report["release"]["release_id"]
    boards[2].agent().install_release(_env(out, "pi-002"), out / "payload.ewp")
    (devices / "pi-003.json").unlink()  # left out of the next release: revoked from it
    assert host_main(["pack", *common, "--model-version", "2", "--layout", "shared"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (out / "envelopes").iterdir()) == [f"pi-{i:03d}.ewe" for i in range(3)]
    boards[2].agent().install_release(_env(out, "pi-002"), out / "payload.ewp")
    assert host_main(["pack", *common[:-3], "--out", str(tmp_path / "v1"), "--model-version", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "v1").glob("*.ewb")) == [f"pi-{i:03d}.ewb" for i in range(3)]


def test_inspect_shows_and_verifies_a_v2_single_file(digits, make_board, release_for, publisher, capsys) -> None:
    from packager.cli import main as host_main

    board = make_board()
    out = release_for(digits.onnx, [board], layout="single-v2")
    capsys.readouterr()
    assert host_main(["inspect", str(out / "pi-001.ewb"), "--publisher-pub", str(publisher / "publisher.pub"),
                      "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verified"] is True and doc["format_version"] == 2
    assert doc["manifest"]["device_id"] == "pi-001" and doc["manifest"]["schema"] == "edgeward.release/2"


GOLDEN = Path(__file__).parent / "data" / "v2"


@pytest.mark.parametrize("form", ["envelope", "single"])
def test_golden_v2_release_still_installs_and_predicts(tmp_path: Path, form: str) -> None:
    """A release written by the first version 2 packager keeps installing (tests/data/make_golden.py):
    from the envelope and payload, and from the single file; another board's envelope is refused."""
    import shutil

    from device_agent import Agent
    from device_agent.store.keys import KeySource

    board = tmp_path / "board"
    shutil.copytree(GOLDEN / "board", board)
    expected = json.loads((GOLDEN / "expected.json").read_text())
    agent = Agent(board, KeySource(kek=(GOLDEN / "kek.bin").read_bytes()))
    with pytest.raises(WrongDevice):
        agent.install_release(GOLDEN / "envelopes" / "golden-other.ewe", GOLDEN / "payload.ewp")
    if form == "envelope":
        m = agent.install_release(GOLDEN / "envelopes" / "golden-board.ewe", GOLDEN / "payload.ewp")
    else:
        m = agent.install_file(GOLDEN / "golden.ewb")
    assert (m.model_id, m.model_version, m.format_version) == ("golden", 1, 2)
    got = agent.predict(np.load(GOLDEN / "input.npy"))
    assert [p["label"] for p in got["predictions"]] == expected["labels"]
