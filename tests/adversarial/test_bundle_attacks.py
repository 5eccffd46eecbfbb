"""Attacks with bundles: each test makes one attack the way an attacker would (bytes on the wire,
a file handed to ``install``) and asserts the refusal -- exception or exit code, and a message
naming what was wrong -- and that the board's trusted state did not change.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent import crypto
from device_agent.bundle import reading
from device_agent.bundle.enrolment import load_enrolment
from device_agent.bundle.format import HEADER, HEADER_BYTES, MAGIC
from device_agent.errors import (
    FormatError,
    IntegrityError,
    RollbackRefused,
    SecurityRefusal,
    UnknownPublisher,
    WrongDevice,
)
from device_agent.wire import MAX_VERSION
from tests.adversarial.conftest import Target, provision
from tests.adversarial.forge import Publisher, parts, resign, sidecar_json, sign_head, splice, with_sidecar
from tests.conftest import Board
from tests.fixtures.trusted import day, refused, refused_cli, trusted_snapshot

X = np.linspace(0, 1, 64, dtype=np.float32)


def _file(tmp_path: Path, name: str, data: bytes) -> str:
    (tmp_path / name).write_bytes(data)
    return str(tmp_path / name)


def _forged(target: Target, publisher: Publisher, version: int, labels: str = "d", **kw: object) -> bytes:
    """A small bundle for the target board signed by ``publisher`` (any key the test holds)."""
    model = target.model.read_bytes()
    task = {"kind": "classifier", "output": 1, "scores": "probabilities", "labels": [f"{labels}{i}" for i in range(10)]}
    return with_sidecar(model, target.board.enrolment, publisher, sidecar_json(model, task=task), version=version,
                        created=kw.pop("created", target.clock.now), **kw)  # type: ignore[arg-type]


# --- signatures ------------------------------------------------------------------------------------


def test_an_unsigned_bundle_is_refused(target: Target, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target.install(1)
    good = target.bundle(2)
    header, manifest, signature, payload = parts(good)
    zeroed = good.replace(signature, bytes(64), 1)
    refused_cli(capsys, target.data_dir, target.cli("install", _file(tmp_path, "zero.ewb", zeroed)), 1,
                "signature does not verify")
    # A head with no signature at all: the manifest's own bytes cannot stand in for one.
    nosig = _file(tmp_path, "nosig.ewb", good[: -len(payload) - 64])
    refused_cli(capsys, target.data_dir, target.cli("install", nosig), 3, "truncated")


def test_a_bundle_signed_with_a_key_the_board_does_not_trust_is_refused(
    target: Target, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target.install(1)
    rogue = Publisher(Ed25519PrivateKey.generate())
    own_id = _forged(target, rogue, 2)
    refused_cli(capsys, target.data_dir, target.cli("install", _file(tmp_path, "rogue.ewb", own_id)), 1,
                "which this board does not trust")
    # The rogue key signs under the trusted publisher's key id: the signature still fails.
    _, manifest, _, payload = parts(own_id)
    manifest["publisher"] = crypto.fingerprint(target.publisher.public)
    borrowed = sign_head(manifest, rogue, key_id_of=target.publisher.public) + payload
    refused_cli(capsys, target.data_dir, target.cli("install", _file(tmp_path, "borrowed.ewb", borrowed)), 1,
                "signature does not verify against publisher")


# --- target device and profile -----------------------------------------------------------------------


def test_a_valid_bundle_for_another_device_is_refused(
    target: Target, other_board: Board, tmp_path: Path, publisher: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target.install(1)
    theirs = target.bundle(2, boards=[other_board])
    refused_cli(capsys, target.data_dir, target.cli("install", _file(tmp_path, "theirs.ewb", theirs)), 1,
                "bundle is for device 'pi-002', this board is 'pi-001'")
    # The same device id provisioned again elsewhere (a cloned or re-flashed board): another key.
    (tmp_path / "twin").mkdir()
    twin, _ = provision(tmp_path / "twin", publisher, "pi-001", target.operator, target.recovery, target.clock)
    for_twin = target.bundle(2, boards=[twin])
    refused(target.data_dir, lambda: target.agent().install(for_twin), WrongDevice, "another key of this device id")


def test_a_bundle_for_another_profile_runs_only_if_this_board_can_run_it(
    target: Target, other_board: Board, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The profile is the publisher's choice of runtime, cipher and threads for a board; the
    trust binding is the device id and key. A bundle for another profile is refused when this
    board cannot run what it seals (here: a LiteRT profile's manifest over an ONNX model), and
    the device binding holds whatever the profile."""
    rpi5 = target.bundle(1, profile="rpi5", packager=True)  # AES-GCM, another board class: this board runs it
    theirs = target.bundle(1, boards=[other_board], profile="rpi5", cipher=crypto.AES256GCM)
    refused(target.data_dir, lambda: target.agent().install(theirs), WrongDevice, "for device 'pi-002'")
    zero2w = resign(rpi5, target.publisher, profile="rpi-zero2w", runtime="litert")
    refused_cli(capsys, target.data_dir, target.cli("install", _file(tmp_path, "zero2w.ewb", zero2w)), 3,
                "LiteRT cannot load the model")
    target.agent().install(rpi5)
    assert target.agent().status()["models"][0]["profile"] == "rpi5"


# --- versions and time -------------------------------------------------------------------------------


def test_rollback_is_refused_even_after_the_clock_is_set_back(
    target: Target, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    v1 = target.install(1)
    target.clock.now = day(5)
    v2 = target.install(2)
    v3 = target.install(3)  # v1 is no longer kept on the board
    target.clock.now = day(-20000)  # a reboot into 1970: a Pi has no real-time clock
    for name, data, why in (("v1", v1, "not newer than version 3"), ("v2", v2, "not newer than version 3"),
                            ("v3", v3, "not newer than version 3")):
        refused_cli(capsys, target.data_dir, target.cli("install", _file(tmp_path, f"{name}.ewb", data)), 1, why)


def test_an_expired_bundle_replayed_to_an_offline_board_is_refused(
    target: Target, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The board is offline (no time beacon) and its clock was set back; its newest signed time is
    the creation time of the bundle it installed, and that alone outdates the replayed one."""
    stale = target.bundle(2, created=day(1), expires=day(5))  # made earlier, never installed
    target.clock.now = day(10)
    target.install(1, model_id="digits-new")  # created at day 10: the floor is now day 10
    target.clock.now = day(2)  # set back to a time the stale bundle was still valid
    refused_cli(capsys, target.data_dir, target.cli("install", _file(tmp_path, "stale.ewb", stale)), 1,
                "bundle expired at 2027-01-06T00:00:00Z \\(board time 2027-01-11")


def test_a_fast_forward_is_recovered_from_by_rotating_the_publisher_key(target: Target) -> None:
    """A stolen publisher key signs the highest version there is. The board cannot tell (the
    signature is valid) and every later release is blocked -- until the operators rotate the
    publisher key: the inflated version leaves with the key that signed it (TUF 5.3.11)."""
    stolen = target.publisher
    target.agent().install(_forged(target, stolen, 1))
    target.agent().install(_forged(target, stolen, MAX_VERSION, labels="evil"))
    assert target.agent().predict(X)["label"].startswith("evil")
    new = Publisher(Ed25519PrivateKey.generate())
    refused(target.data_dir, lambda: target.agent().install(_forged(target, stolen, 2)), RollbackRefused,
            f"not newer than version {MAX_VERSION}")
    # Recovery: the operators replace the publisher key with a fresh one.
    rotate = target.operator.sign("rotate-key", target.device_id, 1, role="publisher",
                                  keys=[base64.b64encode(new.public).decode()])
    target.agent().apply_commands(rotate)
    refused(target.data_dir, lambda: target.agent().predict(X), UnknownPublisher, "does not trust")  # evil stops
    target.agent().install(_forged(target, new, 2, labels="good"))
    assert target.agent().predict(X)["label"].startswith("good")
    [entry] = target.agent().status()["models"]
    assert (entry["version"], entry["highest_version"], entry["previous_version"]) == (2, 2, None)
    assert len(list((target.data_dir / "bundles").glob("*.ewb"))) == 1  # the inflated bundle is gone
    # The stolen key signs nothing the board takes any more, and the new floor holds.
    refused(target.data_dir, lambda: target.agent().install(_forged(target, stolen, MAX_VERSION)), UnknownPublisher,
            "does not trust")
    refused(target.data_dir, lambda: target.agent().install(_forged(target, new, 2)), RollbackRefused, "not newer")


# --- splicing ----------------------------------------------------------------------------------------


def test_mix_and_match_of_two_validly_signed_bundles_is_refused(
    target: Target, other_board: Board, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target.install(1)
    a, b = _forged(target, target.publisher, 2), _forged(target, target.publisher, 3, labels="b")
    assert len(a) == len(b)  # same lengths: only the signed tags digest tells the payloads apart
    head_a = a[:HEADER_BYTES] + _manifest_bytes(a)
    half = len(parts(a)[3]) // 2
    cases = {
        "head of one, payload of the other": (splice(a, b), 1, "tags digest differs"),
        "header and manifest of one, signature of the other": (head_a + parts(b)[2] + parts(a)[3], 1,
                                                                "signature does not verify"),
        "half of each payload": (a[: len(a) - half] + b[len(b) - half :], 1, "tags digest differs"),
    }
    for data, code, why in cases.values():
        refused_cli(capsys, target.data_dir, target.cli("install", _file(tmp_path, "mix.ewb", data)), code, why)


def _manifest_bytes(bundle: bytes) -> bytes:
    _, _, _, manifest_len, _ = HEADER.unpack_from(bundle, 0)
    return bundle[HEADER_BYTES : HEADER_BYTES + manifest_len]


def test_ciphertext_for_board_a_given_to_board_b_is_refused(target: Target, other_board: Board) -> None:
    for_a = target.bundle(1)
    b = other_board
    refused(b.data_dir, lambda: b.agent().install(for_a), WrongDevice, "bundle is for device 'pi-001'")
    # Even a publisher-signed manifest that names board B cannot make A's sealed key open on B.
    enrol_b = load_enrolment(b.enrolment.read_bytes())
    readdressed = resign(for_a, target.publisher, device_id=b.device_id, device_key=enrol_b.box_fingerprint)
    refused(b.data_dir, lambda: b.agent().install(readdressed), IntegrityError, "not sealed to this device's key")


# --- the stored bundle, between check and use -----------------------------------------------------------


def test_the_stored_bundle_swapped_between_check_and_use_never_serves(target: Target) -> None:
    """The stored file is read once into memory, verified, checked against the sealed state and
    decrypted from those same bytes: a swap right after the read changes nothing served now, and
    is caught at the next load."""
    target.agent().install(_forged(target, target.publisher, 1, labels="mine"))
    other = _forged(target, target.publisher, 2, labels="theirs")
    agent = target.agent()
    [entry] = agent.status()["models"]
    stored = target.data_dir / "bundles" / f"{entry['bundle_id']}.ewb"
    real = agent.store.read_bundle

    def read_then_swap(bundle_id: str, limit: int) -> bytearray:
        data = real(bundle_id, limit)
        stored.write_bytes(other)  # the attacker wins the race: right after the agent's read
        return data

    agent.store.read_bundle = read_then_swap  # type: ignore[method-assign]
    assert agent.predict(X)["label"].startswith("mine")
    refused(target.data_dir, lambda: target.agent().predict(X), SecurityRefusal, "is not the one installed")


def test_a_bundle_file_rewritten_between_its_head_check_and_its_payload_read_is_refused(
    target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target.install(1)
    a, b = _forged(target, target.publisher, 2), _forged(target, target.publisher, 3, labels="b")
    path = tmp_path / "a.ewb"
    path.write_bytes(a)
    real = reading.BundleFile.verify

    def rewrite_then_verify(self: reading.BundleFile, *args: object, **kw: object) -> object:
        with open(path, "r+b") as f:  # the same inode, rewritten in place after the head was read
            f.seek(len(a) - len(parts(a)[3]))
            f.write(parts(b)[3])
        return real(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(reading.BundleFile, "verify", rewrite_then_verify)
    refused(target.data_dir, lambda: target.agent().install_file(path), IntegrityError, "tags digest differs")


def test_a_bundle_file_that_grows_while_it_is_read_is_refused(
    target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target.install(1)
    path = tmp_path / "growing.ewb"
    path.write_bytes(target.bundle(2))
    real = reading.BundleFile.verify

    def grow_then_verify(self: reading.BundleFile, *args: object, **kw: object) -> object:
        with open(path, "ab") as f:  # a writer that never stops appending
            f.write(os.urandom(4096))
        return real(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(reading.BundleFile, "verify", grow_then_verify)
    refused(target.data_dir, lambda: target.agent().install_file(path), FormatError, "grew while it was read")


# --- endless data and stalled sources -----------------------------------------------------------------


def test_huge_declared_lengths_are_refused_before_anything_is_read(
    target: Target, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target.install(1)
    good = target.bundle(2)
    _, _, _, manifest_len, kid = HEADER.unpack_from(good, 0)
    huge_manifest = HEADER.pack(MAGIC, 1, 0, 2**32 - 1, kid) + good[HEADER_BYTES:]
    refused_cli(capsys, target.data_dir, target.cli("install", _file(tmp_path, "m.ewb", huge_manifest)), 3,
                "manifest length 4294967295 exceeds the limit")
    # A signed manifest declaring a 2 GiB payload that never comes.
    chunk = 16 * 1024**2
    sealed = 2 * 1024**3 - 64 * chunk
    layout = crypto.ChunkLayout(sealed, chunk)
    endless = resign(good, target.publisher, chunk_size=chunk, sealed_length=sealed,
                     payload_length=layout.payload_length)
    refused_cli(capsys, target.data_dir, target.cli("install", _file(tmp_path, "e.ewb", endless)), 3,
                f"payload is \\d+ of {layout.payload_length} bytes")
    # A file past the bundle limit (sparse: no disk, no read) is refused from its size alone.
    big = tmp_path / "big.ewb"
    big.write_bytes(good[:HEADER_BYTES])
    os.truncate(big, 3 * 1024**3)
    refused_cli(capsys, target.data_dir, target.cli("install", str(big)), 3, "over the limit of")


def test_a_stalled_fifo_with_a_bundle_head_in_it_is_refused_at_once(
    target: Target, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A writer that sends the head of a real bundle and then stalls: install never waits on it
    (the source is refused as a FIFO before a byte is read; test_bundle_reads.py times the
    same refusal in a child process)."""
    target.install(1)
    fifo = tmp_path / "stalled.ewb"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # holds the FIFO open as a writer that stalls
    try:
        os.write(fd, target.bundle(2)[:HEADER_BYTES + 100])
        refused_cli(capsys, target.data_dir, target.cli("install", str(fifo)), 2, "is a FIFO, not a regular file")
        refused_cli(capsys, target.data_dir, target.cli("install", "/dev/zero"), 2, "character device")
    finally:
        os.close(fd)
    assert trusted_snapshot(target.data_dir)  # the board is still there, untouched
    assert target.agent().predict(X)
