"""The board side end to end: install checks, predictions, rollback, the clock, and data at rest."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from device_agent import Agent
from device_agent.errors import Expired, NotInstalled, RollbackRefused, UnknownPublisher, UsageError, WrongDevice
from tests.conftest import tree_snapshot


def _bundle(out: Path, device: str = "pi-001") -> bytes:
    return (out / f"{device}.ewb").read_bytes()


def test_agent_predictions_equal_onnxruntime_on_the_whole_digits_test_split(digits, digits_test, make_board, pack_for):
    x, y = digits_test
    board = make_board()
    agent = board.agent()
    agent.install(_bundle(pack_for(digits.onnx, [board])))
    got = [p["label"] for p in agent.predict(x)["predictions"]]
    session = ort.InferenceSession(str(digits.onnx), providers=["CPUExecutionProvider"])
    labels, probs = session.run(None, {session.get_inputs()[0].name: x})
    assert got == probs.argmax(axis=1).tolist() == labels.tolist()
    assert np.mean(np.array(got) == y) > 0.95
    # One sample in, one label out, and nothing else for the default role.
    assert agent.predict(x[0]) == {"label": int(labels[0])}


def test_litert_bundle_predictions_equal_the_litert_interpreter_on_the_digits_cnn(make_board, pack_for):
    """A .tflite bundle (the rpi-zero2w profile serves with LiteRT): the board decrypts it in
    memory, applies the sealed pre-processing and answers exactly as LiteRT does on the model."""
    pytest.importorskip("ai_edge_litert", reason="the tflite extra: pip install 'edgeward[tflite]'")
    from ai_edge_litert.interpreter import Interpreter

    from tests.fixtures.cnn import PREPROCESS_NHWC
    from tests.fixtures.hardening import digits_cnn

    cnn = digits_cnn()
    board = make_board()
    agent = board.agent()
    agent.install(_bundle(pack_for(cnn.tflite, [board], profile="rpi-zero2w", preprocess=PREPROCESS_NHWC)))
    assert agent.status()["models"][0]["runtime"] == "litert"
    val = np.load(cnn.validation)
    raw, y = val["x"][:64], val["y"][:64]
    got = [agent.predict(img)["label"] for img in raw]
    interp = Interpreter(model_content=cnn.tflite.read_bytes())
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    want = []
    for img in raw:
        interp.set_tensor(inp["index"], (img / 16).astype(np.float32)[None, ..., None])
        interp.invoke()
        want.append(int(interp.get_tensor(out["index"]).argmax()))
    assert got == want
    assert np.mean(np.array(got) == y) > 0.8


def test_outputs_by_role(digits, digits_test, make_board, pack_for):
    x, _ = digits_test
    board = make_board()
    agent = board.agent()
    agent.install(_bundle(pack_for(digits.onnx, [board], task={"labels": [f"d{i}" for i in range(10)]})))
    user = agent.predict(x[0])
    engineer = agent.predict(x[0], role="engineer")
    admin = agent.predict(x[0], role="admin")
    assert set(user) == {"label"} and user["label"].startswith("d")
    assert set(engineer) == {"label", "confidence"} and engineer["confidence"] in {"high", "medium", "low"}
    assert set(admin) == {"label", "confidence", "scores"} and len(admin["scores"]) == 10
    assert all(round(s, 4) == s for s in admin["scores"])


def test_silero_vad_from_its_wheel_serves_the_same_speech_probability(silero_path, make_board, pack_for):
    """A real third-party stateful model (control flow, three inputs) through the whole path."""
    board = make_board()
    agent = board.agent()
    task = {"kind": "binary", "threshold": 0.5, "labels": ["silence", "speech"]}
    out = pack_for(silero_path, [board], model_id="vad", task=task)
    agent.install(_bundle(out))
    rng = np.random.default_rng(0)
    inputs = {
        "input": (rng.standard_normal((1, 512)) * 0.3).astype(np.float32),
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.array(16000, np.int64),
    }
    session = ort.InferenceSession(str(silero_path), providers=["CPUExecutionProvider"])
    prob = float(session.run(None, inputs)[0][0, 0])
    got = agent.predict(inputs, role="admin")
    assert got["predictions"][0]["scores"] == round(prob, 4)
    assert got["predictions"][0]["label"] == ("speech" if prob >= 0.5 else "silence")
    assert set(agent.predict(inputs)["predictions"][0]) == {"label"}


def test_refusals_change_nothing_and_the_previous_model_keeps_serving(
    digits, digits_test, make_board, pack_for, tmp_path
):
    x, _ = digits_test
    board, other = make_board("pi-001"), make_board("pi-002")
    agent = board.agent()
    agent.install(_bundle(pack_for(digits.onnx, [board], version=5)))
    expected = agent.predict(x[:10])
    before = tree_snapshot(board.data_dir)

    from packager.keys import generate

    rogue_dir = tmp_path / "rogue"
    generate("publisher", rogue_dir, unencrypted=True)
    cases = [
        (_bundle(pack_for(digits.onnx, [other], version=6), "pi-002"), WrongDevice, "for device 'pi-002'"),
        (_bundle(pack_for(digits.onnx, [board], version=5)), RollbackRefused, "not newer than version 5"),
        (_bundle(pack_for(digits.onnx, [board], version=4)), RollbackRefused, "not newer"),
        (
            _bundle(pack_for(digits.onnx, [board], version=9, expires=datetime(2001, 1, 1, tzinfo=UTC))),
            Expired,
            "bundle expired at 2001-01-01",
        ),
        (
            _bundle(pack_for(digits.onnx, [board], version=9, end_of_life=datetime(2002, 1, 1, tzinfo=UTC))),
            Expired,
            "end of life",
        ),
    ]
    for data, error, message in cases:
        with pytest.raises(error, match=message):
            agent.install(data)
        assert tree_snapshot(board.data_dir) == before
        assert agent.predict(x[:10]) == expected


def test_bundle_from_an_untrusted_publisher_is_refused(digits, make_board, pack_for, tmp_path, monkeypatch):
    from device_agent.bundle.keyfiles import load_public_key_file

    board = make_board()
    out = pack_for(digits.onnx, [board])
    # A second board that trusts only some other publisher.
    from packager.keys import generate

    generate("publisher", tmp_path / "other", unencrypted=True)
    stranger = tmp_path / "stranger"
    Agent.provision(stranger, "pi-001", [load_public_key_file(tmp_path / "other/publisher.pub")], [], board.keys)
    with pytest.raises(UnknownPublisher):
        Agent(stranger, board.keys).install(_bundle(out))


def test_previous_version_is_kept_and_rollback_serves_it(digits, make_board, pack_for):
    board = make_board()
    agent = board.agent()
    for v in (1, 2, 3):
        agent.install(_bundle(pack_for(digits.onnx, [board], version=v)))
    status = agent.status()["models"][0]
    assert (status["version"], status["previous_version"], status["highest_version"]) == (3, 2, 3)
    assert len(list((board.data_dir / "bundles").glob("*.ewb"))) == 2  # v1 was removed
    assert agent.rollback().model_version == 2
    with pytest.raises(UsageError, match="no previous version"):  # nothing to roll back: usage, exit 2
        agent.rollback()
    # The highest accepted version does not move back: v3 cannot be installed again.
    with pytest.raises(RollbackRefused):
        agent.install(_bundle(pack_for(digits.onnx, [board], version=3)))


def test_board_time_never_moves_backwards_across_restarts(digits, make_board, pack_for):
    """A Pi has no RTC: after a verified bundle made 'now', a reboot into 1970 still knows better."""
    board = make_board()
    made = datetime.now(UTC).replace(microsecond=0)
    agent = board.agent()
    agent.install(_bundle(pack_for(digits.onnx, [board], version=1, created=made)))
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    rebooted = board.agent(clock=lambda: epoch)
    assert rebooted.now() >= made
    # A bundle that expired before the floor is refused even though the system clock says 1970.
    stale = _bundle(pack_for(digits.onnx, [board], version=2, created=made - timedelta(days=2),
                             expires=made - timedelta(days=1)))
    with pytest.raises(Expired):
        rebooted.install(stale)


def test_end_of_life_stops_serving(digits, digits_test, make_board, pack_for):
    board = make_board()
    now = datetime.now(UTC)
    agent = board.agent()
    agent.install(_bundle(pack_for(digits.onnx, [board], end_of_life=now + timedelta(days=1))))
    later = board.agent(clock=lambda: now + timedelta(days=2))
    with pytest.raises(Expired, match="end of life"):
        later.predict(digits_test[0][0])


def test_no_plaintext_model_or_readable_private_key_on_disk(digits, make_board, pack_for):
    """Invariant 2: after install, no 64-byte run of the model exists anywhere under the data dir.
    Checking every 32-byte aligned block is stricter: any 64-byte run contains one."""
    board = make_board()
    agent = board.agent()
    agent.install(_bundle(pack_for(digits.onnx, [board], compression="none")))
    agent.predict(np.zeros(64, np.float32))
    model = digits.onnx.read_bytes()
    blocks = [model[i : i + 32] for i in range(0, len(model) - 32, 32)]
    files = [p for p in board.data_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ewb" for p in files)
    for p in files:
        data = p.read_bytes()
        assert not any(b in data for b in blocks), p
    assert stat.S_IMODE(board.data_dir.stat().st_mode) == 0o700
    for name in ("keys.wrapped", "state.json"):
        assert stat.S_IMODE((board.data_dir / name).stat().st_mode) == 0o600
    for p in (board.data_dir / "bundles").glob("*.ewb"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    # The wrapped key file holds no private key bytes in the clear.
    keys = agent.store.unlock(board.keys)
    wrapped = (board.data_dir / "keys.wrapped").read_bytes()
    assert bytes(keys.box_private) not in wrapped and bytes(keys.sign_seed) not in wrapped


def test_predict_without_a_model_says_what_to_do(make_board):
    with pytest.raises(NotInstalled, match="edgeward-agent install"):
        make_board().agent().predict(np.zeros(64, np.float32))


def test_interrupted_install_leaves_no_trace_after_restart(digits, make_board, pack_for):
    """A crash after the bundle file is stored but before the state commit: the old state rules,
    and the orphan is collected on the next install."""
    board = make_board()
    agent = board.agent()
    agent.install(_bundle(pack_for(digits.onnx, [board], version=1)))
    orphan = board.data_dir / "bundles" / ("ab" * 16 + ".ewb")
    orphan.write_bytes(b"partial")
    assert agent.status()["models"][0]["version"] == 1
    agent.install(_bundle(pack_for(digits.onnx, [board], version=2)))
    agent.install(_bundle(pack_for(digits.onnx, [board], version=3)))
    assert not orphan.exists()


def test_every_caller_gets_ctc_decoding_through_shape_output():
    """The CLI, the Python API and the local API all shape answers with output.shape_output: a
    text recogniser's sealed ctc task is decoded there, not by each caller."""
    from device_agent.runtime.output import shape_output

    labels = ["_", "E", "d", "g", "W"]
    steps = [1, 1, 0, 2, 3, 3, 0, 1]  # E E _ d g g _ E -> "EdgE"
    y = np.zeros((1, len(steps), len(labels)), np.float32)
    y[0, np.arange(len(steps)), steps] = 5.0
    task = {"kind": "ctc", "labels": labels, "blank": 0}
    assert shape_output([y], task, {}, "user", False) == {"label": "EdgE"}


def test_status_checks_the_signed_head_of_each_stored_bundle(digits, make_board, pack_for):
    """Status runs on every telemetry heartbeat, so it verifies the signed head and the file's
    length without reading the payload; a tampered or cut stored bundle still shows up."""
    from device_agent.bundle.format import HEADER_BYTES

    board = make_board()
    agent = board.agent()
    agent.install(_bundle(pack_for(digits.onnx, [board])))
    [entry] = agent.status()["models"]
    assert entry["serving"] is True and "problem" not in entry
    stored = board.data_dir / "bundles" / f"{entry['bundle_id']}.ewb"
    good = stored.read_bytes()
    stored.write_bytes(good[:-1])
    [entry] = agent.status()["models"]
    assert entry["serving"] is False and "truncated" in entry["problem"]
    bad = bytearray(good)
    bad[HEADER_BYTES + 5] ^= 1
    stored.write_bytes(bytes(bad))
    [entry] = agent.status()["models"]
    assert entry["serving"] is False and "signature does not verify" in entry["problem"]
