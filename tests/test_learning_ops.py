"""Local learning's operations: the API and its roles, review, deleting a source, local and
automatic rollback, a fleet rollback command naming a local version, a new bundle superseding
local versions, what ``pack --learnable`` refuses, the sealed arrays' bounds, and the files it
leaves (their modes, and their fate at a wipe)."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent import Agent
from device_agent.cli import main
from device_agent.errors import FormatError, SecurityRefusal, UsageError
from device_agent.learning.cycle import Learning
from device_agent.learning.policy import decode_array, encode_array
from device_agent.learning.store import LearningStore, verify_log
from device_agent.store import layout
from device_agent.store.keys import KeySource
from tests.conftest import Board
from tests.fixtures.http import request
from tests.fixtures.learning import Scenario, accuracy, drift, learnable_installer, scenario
from tests.fixtures.serve import serve

T0 = datetime(2030, 1, 1, tzinfo=UTC)
KEK = KeySource(kek=bytes(range(32)))  # a key file: Argon2 would slow every step


@pytest.fixture(scope="module")
def sc() -> Scenario:
    return scenario(0)


@pytest.fixture
def learnable(make_board: Callable[..., Board], pack_for: Callable[..., Path], digits: Any, sc: Scenario,
              tmp_path: Path) -> Callable[..., Board]:
    return learnable_installer(make_board, pack_for, digits, sc, tmp_path, "pi-ops", KEK)


def learn(agent: Agent, sc: Scenario, when: datetime = T0) -> dict[str, Any]:
    learning = Learning(agent)
    for s, (x, y) in sc.feedback().items():
        learning.intake(agent.model(), x, y, f"token:{s}", when)
    return learning.cycle(when)


def test_feedback_over_the_api_is_for_engineers_and_admins(learnable: Callable[..., Board], sc: Scenario) -> None:
    board = learnable()
    served = serve(board)
    try:
        conn = served.connect()
        x, y = drift(sc.pool_x[:40]), sc.pool_y[:40]
        buf = io.BytesIO()
        np.savez(buf, x=x, y=y)
        body = buf.getvalue()
        status, _, doc = request(conn, "POST", "/v1/feedback", served.tokens["user"], body, "application/x-npz")
        assert status == 403 and "engineer" in doc["error"]["message"]
        status, _, doc = request(conn, "POST", "/v1/feedback", None, body, "application/x-npz")
        assert status == 401
        conn = served.connect()
        status, _, doc = request(conn, "POST", "/v1/feedback", served.tokens["engineer"], body, "application/x-npz")
        assert status == 200 and doc["kept"] == 40, doc
        js = json.dumps({"inputs": x[:2].tolist(), "labels": y[:2].tolist()}).encode()
        status, _, doc = request(conn, "POST", "/v1/feedback", served.tokens["admin"], js)
        assert status == 200 and doc["kept"] == 2
        status, _, doc = request(conn, "POST", "/v1/feedback", served.tokens["admin"],
                                 json.dumps({"inputs": x[:2].tolist(), "labels": [99, 0]}).encode())
        assert status == 422 and "class indices" in doc["error"]["message"]
        status, _, doc = request(conn, "GET", "/v1/feedback", served.tokens["user"])
        assert status == 403
        status, _, doc = request(conn, "GET", "/v1/feedback", served.tokens["engineer"])
        assert status == 200 and doc["examples"] == []  # nothing held for review yet
        status, _, doc = request(conn, "POST", "/v1/learn", served.tokens["user"], b"{}")
        assert status == 403
        status, _, doc = request(conn, "POST", "/v1/learn", served.tokens["engineer"], b"{}")
        assert status == 200 and doc["accepted"] is False and "too few" in json.dumps(doc["examples"]["reasons"])
        total = doc["examples"]["held_on_board"] - doc["examples"]["rejected"]
        eng = f"token:{served.ids['engineer']}"
        status, _, doc = request(conn, "POST", "/v1/feedback/delete-source", served.tokens["engineer"],
                                 json.dumps({"source": eng}).encode())
        assert status == 200 and doc["deleted"] >= 38 and doc["deleted"] + doc["held_total"] == total
        status, _, doc = request(conn, "GET", "/v1/learning", served.tokens["admin"])
        assert status == 200 and doc["local_version"] is None and doc["log_verified"] is True
        # The role and the declared size are judged before a byte of the body is read, and the
        # refusal is audited like the request.
        big = b"0" * (served.service.config.max_request_bytes + 1)
        status, _, doc = request(conn, "POST", "/v1/feedback", served.tokens["engineer"], big, "application/x-npz")
        assert status == 413
        served.service.audit.close()
        records = [json.loads(line) for seg in sorted(board.data_dir.glob("audit/audit-*.jsonl"))
                   for line in seg.read_text().splitlines()]
        assert any(r.get("event") == "feedback" and r.get("status") == 413 for r in records), records[-3:]
    finally:
        served.server.stop()


def test_held_examples_wait_for_review(learnable: Callable[..., Board], sc: Scenario) -> None:
    board = learnable()
    agent = board.agent()
    learning = Learning(agent)
    for s, (x, y) in sc.feedback().items():
        learning.intake(agent.model(), x, y, f"token:{s}", T0)
    wrong = (sc.replay_y[:5] + 1) % 10
    learning.intake(agent.model(), drift(sc.replay_x[:5]), wrong, "local:tech", T0)
    learning.cycle(T0)
    held = [e for e in learning.held(agent.model()) if e["source"] == "local:tech"]
    assert len(held) >= 4 and all(set(e) == {"id", "source", "label", "status", "reason", "received"} for e in held)
    with pytest.raises(UsageError, match="no example held"):
        learning.review(agent.model(), ["nope"], [])
    doc = learning.review(agent.model(), [held[0]["id"]], [e["id"] for e in held[1:]])
    assert doc == {"accepted": 1, "dropped": len(held) - 1, "held_total": doc["held_total"]}
    left = [e for e in learning.held(agent.model(), None) if e["source"] == "local:tech"]
    assert [e["status"] for e in left if e["id"] == held[0]["id"]] == ["reviewed"]


def test_local_rollback_from_the_cli_and_the_signed_log(learnable: Callable[..., Board], sc: Scenario,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    board = learnable()
    agent = board.agent()
    assert learn(agent, sc)["local_version"] == 1
    assert Learning(agent).cycle(T0 + timedelta(hours=1))["local_version"] == 2
    argv = ["--data-dir", str(board.data_dir), "--kek-file"]
    kek = board.data_dir.parent / "kek.bin"
    kek.write_bytes(bytes(range(32)))
    assert main(["rollback", *argv, str(kek), "--local", "previous", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["local_version"] == 1
    assert board.agent().model().local_version == 1
    assert main(["rollback", *argv, str(kek), "--local", "7"]) == 1
    assert "not kept" in capsys.readouterr().err
    assert main(["rollback", *argv, str(kek), "--local", "0"]) == 0
    capsys.readouterr()
    fresh = board.agent()
    assert fresh.model().local_version is None  # the publisher's head again
    assert accuracy(fresh, sc.test_x, sc.test_y) == accuracy(fresh, sc.test_x, sc.test_y)
    assert main(["learn", *argv, str(kek), "--status"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["log_entries"] == 4 and [v["number"] for v in status["versions"]] == [1, 2]
    # The log is signed by the board and chained: an edited entry is refused.
    files = LearningStore(fresh.store, fresh.config.learning)
    raw = files.read_log()
    entries = verify_log(raw, fresh.store.identity().sign_public, fresh.config.learning)
    assert [e["event"] for e in entries] == ["accepted", "accepted", "rollback", "rollback"]
    tampered = raw.replace(b'"local_version":2', b'"local_version":3', 1)
    with pytest.raises(SecurityRefusal):
        verify_log(tampered, fresh.store.identity().sign_public, fresh.config.learning)
    dropped = b"\n".join(raw.split(b"\n")[1:])
    with pytest.raises(SecurityRefusal):
        verify_log(dropped, fresh.store.identity().sign_public, fresh.config.learning)


def test_a_damaged_local_version_rolls_back_automatically(learnable: Callable[..., Board], sc: Scenario) -> None:
    board = learnable()
    agent = board.agent()
    learn(agent, sc)
    Learning(agent).cycle(T0 + timedelta(hours=1))
    bundle = agent.model().manifest.bundle_id
    path = board.data_dir / layout.LEARNING / f"{bundle}-2.ewv"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    path.write_bytes(bytes(blob))
    fresh = board.agent()
    assert fresh.model().local_version == 1  # its parent serves; the damaged one is gone
    assert not path.exists()
    from device_agent.service.events import EventStore

    kinds = [(e.kind, e.severity, e.evidence.get("automatic_rollback")) for e in EventStore(
        board.data_dir / "events.db").list()]
    assert ("learning", "critical", True) in kinds


def test_a_version_that_fails_the_gate_recheck_is_not_served(learnable: Callable[..., Board], sc: Scenario) -> None:
    """A version whose file is intact but whose behaviour breaks the canaries (written by a faulty
    refit, or swapped in with the board's keys) is rolled back as it is loaded."""
    board = learnable()
    agent = board.agent()
    learn(agent, sc)
    from device_agent.learning.head import HeadWeights
    from device_agent.learning.store import data_key

    learning = Learning(agent)
    st = learning.files.state(agent._key())
    bundle = agent.model().manifest.bundle_id
    bad = HeadWeights(np.zeros((64, 10), np.float32), np.arange(10, dtype=np.float32))  # always class 9
    keys = agent._unlock()
    key = data_key(keys)
    keys.wipe()
    digest = learning.files.write_version(bundle, 1, bad, key)
    from dataclasses import replace

    from device_agent.learning.store import Version

    v = st.version(1)
    assert v is not None
    learning.files.save_state(replace(st, versions=(Version(1, digest, v.created, None, v.examples),)), agent._key())
    fresh = board.agent()
    assert fresh.model().local_version is None
    assert accuracy(fresh, sc.test_x, sc.test_y) > 0.9


def test_a_fleet_rollback_command_can_name_a_local_version(learnable: Callable[..., Board], sc: Scenario,
                                                           tmp_path: Path, publisher: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_agent import crypto
    from device_agent.bundle.keyfiles import load_public_key_file
    from device_agent.commands.format import Command, encode_command, verify_result

    op = Ed25519PrivateKey.generate()
    d = tmp_path / "board-cmd"
    enrolment = tmp_path / "pi-cmd.json"
    enrolment.write_bytes(Agent.provision(d, "pi-cmd", [load_public_key_file(publisher / "publisher.pub")],
                                          [crypto.ed25519_public_raw(op)], KEK))
    board = learnable(board=Board(d, enrolment, "pi-cmd", KEK))
    agent = board.agent()
    learn(agent, sc)
    Learning(agent).cycle(T0)
    now = datetime.now(UTC)

    def cmd(seq: int, **args: Any) -> bytes:
        return encode_command(Command("rollback", "pi-cmd", seq, now, now + timedelta(days=1), args), op,
                              crypto.ed25519_public_raw(op))

    sign_public = agent.store.identity().sign_public
    with pytest.raises(SecurityRefusal, match="not kept"):
        agent.apply_commands(cmd(1, model_id="digits", to_version=1, local_version=9))
    (res,) = agent.apply_commands(cmd(1, model_id="digits", to_version=1, local_version=1))
    body = verify_result(res, sign_public).body()
    assert body["outcome"] == "applied" and body["effects"]["local_version"] == 1
    assert board.agent().model().local_version == 1
    with pytest.raises(Exception, match="serves version 1"):
        agent.apply_commands(cmd(2, model_id="digits", to_version=2, local_version=0))


def test_a_new_bundle_supersedes_local_versions(learnable: Callable[..., Board], sc: Scenario) -> None:
    board = learnable()
    agent = board.agent()
    learn(agent, sc)
    old_files = sorted(p.name for p in (board.data_dir / layout.LEARNING).iterdir())
    assert any(n.endswith(".ewv") for n in old_files) and "feedback.enc" in old_files
    learnable(version=2, board=board)  # the publisher's next release; its policy does not carry feedback
    left = sorted(p.name for p in (board.data_dir / layout.LEARNING).iterdir())
    assert left == ["state.json", "updates.log"]  # versions and feedback shredded at the install
    fresh = board.agent()
    assert fresh.model().local_version is None  # the new bundle's head serves
    assert Learning(fresh).cycle(T0)["examples"]["held_on_board"] == 0


def test_a_new_bundle_may_carry_feedback_over(learnable: Callable[..., Board], sc: Scenario) -> None:
    board = learnable()
    agent = board.agent()
    learn(agent, sc)
    learnable(version=2, board=board, carry_feedback=True)
    fresh = board.agent()
    assert fresh.model().local_version is None  # versions never carry over: they belong to their bundle
    report = Learning(fresh).cycle(T0)
    assert report["examples"]["held_on_board"] > 400 and report["accepted"] is True
    # Local version numbers never repeat on a board: the log names each once, whatever the bundle.
    assert report["local_version"] == 2 and board.agent().model().local_version == 2


def test_a_bundle_whose_policy_forbids_learning_refuses_feedback(learnable: Callable[..., Board],
                                                                  sc: Scenario) -> None:
    board = learnable(enabled=False)
    agent = board.agent()
    with pytest.raises(SecurityRefusal, match="does not allow local learning"):
        Learning(agent).intake(agent.model(), drift(sc.pool_x[:3]), sc.pool_y[:3], "local:x", T0)
    assert not (board.data_dir / layout.FEEDBACK).exists()


def test_learning_files_follow_the_layout_and_are_shredded_at_wipe(learnable: Callable[..., Board],
                                                                    sc: Scenario) -> None:
    board = learnable()
    agent = board.agent()
    learn(agent, sc)
    found = {f.rel: f.entry.pattern for f in layout.Layout(board.data_dir).scan() if f.entry is not None}
    assert not agent.store.layout.problems()
    for pattern in (layout.LEARNING, layout.FEEDBACK, layout.LEARNING_STATE, layout.UPDATE_LOG,
                    f"{layout.LEARNING}/*.ewv"):
        assert pattern in found.values()
    shredded = [e.pattern for e in layout.ENTRIES if e.fate is layout.Fate.SHRED]
    assert layout.FEEDBACK in shredded and f"{layout.LEARNING}/*.ewv" in shredded
    doc = board.agent().wipe()
    assert doc["body"]["files_shredded"] >= 3
    assert [f.rel for f in layout.Layout(board.data_dir).scan()] == [layout.ATTESTATION]


def test_pack_learnable_refuses_what_it_cannot_learn(digits: Any, tmp_path: Path, sc: Scenario) -> None:
    from packager.learnable import mark
    from packager.modelfile import ModelFile, infer_task, read_model

    data = {"gate_x": sc.gate_x, "gate_y": sc.gate_y, "replay_x": sc.replay_x}
    m = read_model(digits.onnx)
    with pytest.raises(UsageError, match="ONNX models only"):
        mark(ModelFile(tmp_path / "m.tflite", b"TFL3", "tflite"), {"kind": "classifier"}, data)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    q = tmp_path / "q.onnx"
    quantize_dynamic(str(digits.onnx), str(q), weight_type=QuantType.QInt8)
    qm = read_model(q)
    with pytest.raises(UsageError, match="quantised"):
        mark(qm, infer_task(qm, {}), data)
    with pytest.raises(UsageError, match="classifiers only"):
        mark(m, {"kind": "raw", "output": 1}, data)
    marked, policy = mark(m, infer_task(m, {}), data)
    assert policy["head"]["weight"] == "coefficient1" and policy["bounds"]["near_duplicate_distance"] > 0


@pytest.mark.parametrize(
    "raw",
    [
        {"dtype": "float32", "shape": [10**9, 10**9], "data": ""},  # declared far beyond the budget
        {"dtype": "float32", "shape": [2], "data": "AAAA"},  # too few bytes for the shape
        {"dtype": "object", "shape": [1], "data": "AAAAAA=="},
        {"dtype": "float32", "shape": [-1], "data": ""},
        {"dtype": "float32", "shape": [1], "data": "AADAfw=="},  # NaN
        {"dtype": "float32", "shape": [1], "data": "AAAAAA==", "extra": 1},
    ],
)
def test_sealed_learning_arrays_are_bounded_before_they_are_decoded(raw: dict[str, Any]) -> None:
    with pytest.raises(FormatError):
        decode_array(raw, [1024])


def test_sealed_learning_arrays_round_trip() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    budget = [100]
    assert np.array_equal(decode_array(encode_array(a), budget), a) and budget == [88]


def test_feedback_kept_while_a_cycle_learns_is_not_lost(learnable: Callable[..., Board], sc: Scenario,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The service keeps feedback while a cycle (from the CLI, another process) is learning: the
    cycle's commit applies its decisions by id to the store as it is then."""
    board = learnable()
    agent = board.agent()
    learning = Learning(agent)
    for s, (x, y) in sc.feedback().items():
        learning.intake(agent.model(), x, y, f"token:{s}", T0)
    commit = Learning._commit

    def meanwhile(self: Learning, *a: Any, **k: Any) -> None:
        other = board.agent()  # another process's agent
        Learning(other).intake(other.model(), drift(sc.replay_x[:7]), sc.replay_y[:7], "local:late", T0)
        commit(self, *a, **k)

    monkeypatch.setattr(Learning, "_commit", meanwhile)
    report = learning.cycle(T0)
    assert report["accepted"] is True
    late = [e for e in Learning(board.agent()).held(agent.model(), None) if e["source"] == "local:late"]
    assert len(late) == 7


@pytest.fixture(scope="module")
def sealed_policy(digits: Any, sc: Scenario) -> dict[str, Any]:
    from packager.learnable import mark
    from packager.modelfile import infer_task, read_model

    m = read_model(digits.onnx)
    small = {"gate_x": sc.gate_x[:40], "gate_y": sc.gate_y[:40], "replay_x": sc.replay_x[:20]}
    return mark(m, infer_task(m, {}), small)[1]


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    return out


def test_fuzz_mutated_learning_policies_parse_or_are_refused(sealed_policy: dict[str, Any]) -> None:
    """Any value anywhere in a sealed learning policy either parses or is a FormatError (exit 3),
    never another exception (the policy is the publisher's, but the board bounds it all the same)."""
    import copy

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from device_agent.learning.policy import LearningPolicy

    leaves = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
    values = st.recursive(leaves, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                       max_size=4), max_leaves=12)
    paths = [p for p in _paths(sealed_policy) if p]

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(paths), values, st.booleans())
    def check(path: tuple[Any, ...], value: Any, delete: bool) -> None:
        doc = copy.deepcopy(sealed_policy)
        node = doc
        for k in path[:-1]:
            node = node[k]
        if delete:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        with contextlib.suppress(FormatError):
            LearningPolicy.from_policy({"learning": doc})

    check()


@pytest.mark.parametrize(
    ("path", "value"),
    [(("gate", "x", "shape"), [0, 10**19]), (("gate", "x", "shape"), [0, 2**62, 2**62]),
     (("head", "bias_shape"), [-1, -10])],
)
def test_a_zero_beside_a_huge_dimension_or_a_negative_bias_shape_is_refused(
    sealed_policy: dict[str, Any], path: tuple[str, ...], value: Any
) -> None:
    """A zero-element array may not hide a dimension numpy cannot reshape to, and a bias shape of
    negative dimensions may not multiply out to the class count (both were a plain ValueError)."""
    import copy

    from device_agent.learning.policy import LearningPolicy

    doc = copy.deepcopy(sealed_policy)
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    if path[0] == "gate":
        node["data"] = ""
    with pytest.raises(FormatError):
        LearningPolicy.from_policy({"learning": doc})


def test_feedback_and_learn_from_the_command_line(learnable: Callable[..., Board], make_board: Callable[..., Board],
                                                  pack_for: Callable[..., Path], digits: Any, sc: Scenario,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    board = learnable()
    kek = tmp_path / "kek.bin"
    kek.write_bytes(bytes(range(32)))
    argv = ["--data-dir", str(board.data_dir), "--kek-file", str(kek)]
    for s, (x, y) in sc.feedback().items():
        np.savez(tmp_path / f"{s}.npz", x=x, y=y)
        assert main(["feedback", *argv, "--input", str(tmp_path / f"{s}.npz"), "--source", s, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["kept"] == len(x)
    np.savez(tmp_path / "bad.npz", x=sc.pool_x[:2])  # no labels
    assert main(["feedback", *argv, "--input", str(tmp_path / "bad.npz")]) == 3
    assert "exactly two arrays, x and y" in capsys.readouterr().err
    assert main(["feedback", *argv, "--input", str(tmp_path / "line-a.npz"), "--source", "../etc"]) == 2
    capsys.readouterr()
    assert main(["learn", *argv]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accepted"] is True and report["local_version"] == 1
    assert main(["feedback", *argv]) == 0  # the list of held examples
    assert "local:line-" in capsys.readouterr().out
    # A model packed without --learnable: nothing is kept, exit 1.
    plain = make_board("pi-plain", KEK)
    out = pack_for(digits.onnx, [plain])
    plain.agent().install_file(out / "pi-plain.ewb")
    plain_argv = ["--data-dir", str(plain.data_dir), "--kek-file", str(kek)]
    assert main(["feedback", *plain_argv, "--input", str(tmp_path / "line-a.npz")]) == 1
    assert "not packed for local learning" in capsys.readouterr().err
    assert main(["learn", *plain_argv]) == 1
    assert not (plain.data_dir / layout.FEEDBACK).exists()


def test_the_service_serves_a_version_learnt_while_it_runs(learnable: Callable[..., Board], sc: Scenario) -> None:
    board = learnable()
    served = serve(board)
    try:
        conn = served.connect()
        from tests.fixtures.http import predict

        # 16 drifted inputs the publisher's head gets wrong; two requests stay within the burst of 40 rows
        d = drift(sc.test_x)
        base = np.array([p["label"] for p in board.agent().predict(d)["predictions"]])
        x = d[np.flatnonzero(base != sc.test_y)[:16]]
        status, _, before = predict(conn, served.tokens["admin"], x)
        assert status == 200
        learning = Learning(served.service.agent)
        loaded = served.service.agent.model()
        for s, (fx, fy) in sc.feedback().items():
            learning.intake(loaded, fx, fy, f"token:{s}", T0)
        status, _, doc = request(conn, "POST", "/v1/learn", served.tokens["engineer"], b"{}")
        assert status == 200 and doc["accepted"] is True
        status, _, after = predict(conn, served.tokens["admin"], x)
        status, _, st = request(conn, "GET", "/v1/status", served.tokens["admin"])
        assert st["model"]["local_version"] == 1
        fresh = board.agent().predict(x, role="admin")
        assert after == fresh and after != before  # the learnt head answers, not the publisher's
    finally:
        served.server.stop()
