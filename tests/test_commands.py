"""Signed remote commands and trusted time on the board (device_agent.commands): what a board
obeys, what it refuses (changing nothing), and the clock attacks a board without an RTC faces.

Commands are signed here with real operator keys through the one format module; the fleet's
own commands are tested in test_fleet_commands.py, and delivery over a real broker in
test_commands_broker.py.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent import Agent, crypto
from device_agent.bundle.enrolment import load_enrolment
from device_agent.bundle.format import verify_bundle
from device_agent.cli import main
from device_agent.commands.format import (
    encode_queue,
    verify_result,
)
from device_agent.errors import EdgeWardError, Expired, IntegrityError, NotInstalled, SecurityRefusal
from device_agent.store.keys import KeySource
from device_agent.store.wipe import ATTESTATION, verify_attestation
from tests.conftest import Board
from tests.fixtures.trusted import DAY0, Clock, Operator, day, trusted_snapshot


@dataclass
class Fleet:
    board: Board
    operator: Operator
    recovery: Operator
    clock: Clock

    def agent(self) -> Agent:
        return Agent(self.board.data_dir, self.board.keys, clock=self.clock)


@pytest.fixture
def fleet(tmp_path: Path, publisher: Path) -> Fleet:
    from device_agent.bundle.keyfiles import load_public_key_file

    op, rec = Operator(), Operator()
    keys = KeySource(kek=bytes(range(32)))  # a key file: Argon2 would slow every command
    d = tmp_path / "board"
    enrolment = tmp_path / "pi-cmd.json"
    enrolment.write_bytes(Agent.provision(d, "pi-cmd", [load_public_key_file(publisher / "publisher.pub")],
                                          [op.public], keys, now=DAY0, recovery=[rec.public]))
    return Fleet(Board(d, enrolment, "pi-cmd", keys), op, rec, Clock())


def install(fleet: Fleet, pack_for: Callable[..., Path], model: Path, version: int, **opts: Any) -> Path:
    bundle = pack_for(model, [fleet.board], version=version, created=fleet.clock.now, **opts) / "pi-cmd.ewb"
    fleet.agent().install(bundle.read_bytes())
    return bundle


def events(fleet: Fleet, kind: str) -> list[dict]:
    from device_agent.service.events import EventStore

    return [e.to_json() for e in EventStore(fleet.board.data_dir / "events.db").list() if e.kind == kind]


# --- refusals ----------------------------------------------------------------------------------------


def test_forged_replayed_expired_future_and_misdirected_commands_change_nothing(
    fleet: Fleet, pack_for, digits, tmp_path: Path, capsys
) -> None:
    install(fleet, pack_for, digits.onnx, 1)
    op = fleet.operator
    ok = op.sign("retire", "pi-cmd", 1, model_id="nothing-installed-by-that-name")
    assert fleet.agent().apply_commands(ok)  # #1 applied: a retire of an absent model still counts
    cases = {
        "forged": Operator().sign("decommission", "pi-cmd", 2),
        "replayed": ok,
        "expired": op.sign("decommission", "pi-cmd", 2, issued=day(-40), days=30),
        "future-dated": op.sign("decommission", "pi-cmd", 2, issued=day(2)),
        "wrong target": op.sign("decommission", "pi-other", 2),
        "operator rotating operators": op.sign("rotate-key", "pi-cmd", 2, role="operator",
                                               keys=[base64.b64encode(Operator().public).decode()]),
        "tampered": bytearray(op.sign("decommission", "pi-cmd", 2)),
    }
    cases["tampered"][-3] ^= 1  # type: ignore[index]
    for name, payload in cases.items():
        before = trusted_snapshot(fleet.board.data_dir)
        f = tmp_path / f"{name}.cmd"
        f.write_bytes(bytes(payload))
        code = main(["command", str(f), "--data-dir", str(fleet.board.data_dir), "--result", str(tmp_path / "r"),
                     "--kek-file", str(_kek(fleet, tmp_path))])
        err = capsys.readouterr().err
        assert code in (1, 3), (name, code, err)
        assert trusted_snapshot(fleet.board.data_dir) == before, name
        assert not (tmp_path / "r").exists()
    assert len(events(fleet, "command")) >= len(cases)
    assert fleet.agent().predict(np.zeros((1, 64), np.float32))["predictions"]  # still serving


def _kek(fleet: Fleet, tmp_path: Path) -> Path:
    p = tmp_path / "kek.bin"
    assert fleet.board.keys.kek is not None
    p.write_bytes(fleet.board.keys.kek)
    return p


# --- what commands do ---------------------------------------------------------------------------


def test_retire_shreds_the_model_and_a_copy_of_its_bundle_no_longer_opens(
    fleet: Fleet, pack_for, digits, digits_test, tmp_path: Path
) -> None:
    old = install(fleet, pack_for, digits.onnx, 1, model_id="kws").read_bytes()
    install(fleet, pack_for, digits.onnx, 2, model_id="kws")
    install(fleet, pack_for, digits.onnx, 1, model_id="vad")
    agent = fleet.agent()
    box_before = agent.store.identity().box_fingerprint
    [data] = agent.apply_commands(fleet.operator.sign("retire", "pi-cmd", 1, model_id="kws"))
    result = verify_result(data, agent.store.identity().sign_public)
    assert (result.outcome, result.effects["model_id"]) == ("applied", "kws")
    assert len(result.effects["bundles_destroyed"]) == 2
    agent = fleet.agent()
    with pytest.raises(NotInstalled):
        agent.predict(digits_test[0][:1], model_id="kws")
    assert agent.predict(digits_test[0][:1], model_id="vad")["predictions"]  # the other model keeps serving
    assert len(list((fleet.board.data_dir / "bundles").glob("*.key"))) == 1
    # The board's encryption key was rotated: a copy of the retired bundle opens with nothing left.
    enrolment = load_enrolment(json.dumps(result.effects["enrolment"]).encode())
    assert enrolment.box_fingerprint == agent.store.identity().box_fingerprint != box_before
    vb = verify_bundle(old, list(agent.trust_anchors().publishers))
    keys = agent.store.unlock(fleet.board.keys)
    with pytest.raises(IntegrityError):
        vb.decrypt(keys.box_private)
    # A retired model id is never installed again, whatever its version.
    with pytest.raises(SecurityRefusal, match="retired"):
        install(fleet, pack_for, digits.onnx, 9, model_id="kws")
    # The next release is packed for the new key the result carried.
    (tmp_path / "new.json").write_text(json.dumps(result.effects["enrolment"]))
    fleet.board.enrolment = tmp_path / "new.json"
    install(fleet, pack_for, digits.onnx, 2, model_id="vad")


def test_signed_rollback_to_the_kept_version_or_a_one_time_permit(fleet: Fleet, pack_for, digits) -> None:
    v1 = install(fleet, pack_for, digits.onnx, 1).read_bytes()
    install(fleet, pack_for, digits.onnx, 2)
    agent = fleet.agent()
    agent.apply_commands(fleet.operator.sign("rollback", "pi-cmd", 1, model_id="digits", to_version=1))
    [m] = fleet.agent().status()["models"]
    assert (m["version"], m["highest_version"]) == (1, 2)
    install(fleet, pack_for, digits.onnx, 3)
    install(fleet, pack_for, digits.onnx, 4)  # version 1 is no longer kept on the board
    with pytest.raises(SecurityRefusal):
        fleet.agent().install(v1)
    fleet.agent().apply_commands(fleet.operator.sign("rollback", "pi-cmd", 2, model_id="digits", to_version=1))
    fleet.agent().install(v1)  # the signed permit admits exactly that version, once
    [m] = fleet.agent().status()["models"]
    assert (m["version"], m["highest_version"]) == (1, 4)


def test_publisher_keys_rotate_by_operator_and_operator_keys_only_by_recovery(
    fleet: Fleet, pack_for, digits, tmp_path: Path
) -> None:
    import base64

    from packager.keys import generate

    install(fleet, pack_for, digits.onnx, 1)
    new = tmp_path / "new-publisher"
    generate("publisher", new, unencrypted=True)
    from device_agent.bundle.keyfiles import load_public_key_file

    new_pub = base64.b64encode(load_public_key_file(new / "publisher.pub")).decode()
    fleet.agent().apply_commands(fleet.operator.sign("rotate-key", "pi-cmd", 1, role="publisher", keys=[new_pub]))
    with pytest.raises(SecurityRefusal, match="does not trust"):
        install(fleet, pack_for, digits.onnx, 2)  # the old publisher key is no longer trusted
    from packager.keys import load_private_key
    from packager.modelfile import infer_task, read_model
    from packager.pack import PackOptions, load_enrolments, pack
    from packager.profiles import load_profile
    from packager.signers import FileSigner

    m = read_model(digits.onnx)
    pack(m, load_profile("rpi4b"), FileSigner(load_private_key(new / "publisher.key")),
         load_enrolments([fleet.board.enrolment]),
         PackOptions(model_id="digits", model_version=2, task=infer_task(m, {}), created=DAY0), tmp_path / "rel")
    fleet.agent().install((tmp_path / "rel" / "pi-cmd.ewb").read_bytes())
    # Operators are rotated only with the recovery key; an operator cannot rotate itself in.
    thief = Operator()
    payload = fleet.operator.sign("rotate-key", "pi-cmd", 2, role="operator",
                                  keys=[base64.b64encode(thief.public).decode()])
    with pytest.raises(SecurityRefusal, match="recovery key"):
        fleet.agent().apply_commands(payload)
    fresh = Operator()
    fleet.agent().apply_commands(fleet.recovery.sign("rotate-key", "pi-cmd", 2, role="operator",
                                                     keys=[base64.b64encode(fresh.public).decode()]))
    with pytest.raises(SecurityRefusal):
        fleet.agent().apply_commands(fleet.operator.sign("decommission", "pi-cmd", 3))  # the old operator
    assert fleet.agent().status()["models"][0]["version"] == 2


def test_a_later_signed_cancel_stops_a_pending_decommission(fleet: Fleet, pack_for, digits) -> None:
    install(fleet, pack_for, digits.onnx, 1)
    queue = encode_queue([fleet.operator.sign("decommission", "pi-cmd", 1),
                          fleet.operator.sign("cancel", "pi-cmd", 2, seq=1)])
    agent = fleet.agent()
    results = [verify_result(r, agent.store.identity().sign_public) for r in agent.apply_commands(queue)]
    assert [(r.seq, r.outcome) for r in results] == [(1, "cancelled"), (2, "applied")]
    assert fleet.agent().status()["models"][0]["version"] == 1
    assert fleet.agent().apply_commands(queue) == []  # delivered again: nothing new


def test_decommission_from_a_file_wipes_and_attests_which_command(
    fleet: Fleet, pack_for, digits, tmp_path: Path, capsys
) -> None:
    install(fleet, pack_for, digits.onnx, 1)
    sign_public = fleet.agent().store.identity().sign_public
    f = tmp_path / "decommission.cmd"
    f.write_bytes(fleet.operator.sign("decommission", "pi-cmd", 1))
    kek = _kek(fleet, tmp_path)
    code = main(["command", str(f), "--data-dir", str(fleet.board.data_dir), "--result", str(tmp_path / "r.ewr"),
                 "--kek-file", str(kek)])
    assert code == 0, capsys.readouterr().err
    result = verify_result((tmp_path / "r.ewr").read_bytes(), sign_public)
    body = verify_attestation(result.effects["attestation"], sign_public)
    assert body["by"]["command_seq"] == 1 and body["by"]["operator"] == crypto.fingerprint(fleet.operator.public)
    assert sorted(p.name for p in fleet.board.data_dir.rglob("*")) == [ATTESTATION]
    capsys.readouterr()
    assert main(["status", "--data-dir", str(fleet.board.data_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["wiped"] and status["by"]["command_seq"] == 1
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 64), np.float32))
    assert main(["predict", "--data-dir", str(fleet.board.data_dir), "--input", str(x), "--kek-file", str(kek)]) == 1
    assert "wiped by command #1" in capsys.readouterr().err


# --- trusted time ----------------------------------------------------------------------------------


def test_setting_the_clock_back_does_not_admit_an_expired_bundle(fleet: Fleet, pack_for, digits) -> None:
    install(fleet, pack_for, digits.onnx, 1)
    fleet.clock.now = day(30)
    fleet.agent().apply_commands(fleet.operator.beacon(day(30)))  # the fleet's signed time
    fleet.clock.now = day(10)  # someone sets the board's clock back
    bundle = pack_for(digits.onnx, [fleet.board], version=2, created=day(1), expires=day(20)) / "pi-cmd.ewb"
    with pytest.raises(Expired):
        fleet.agent().install(bundle.read_bytes())


def test_setting_the_clock_back_does_not_revive_a_model_past_its_end_of_life(fleet: Fleet, pack_for, digits) -> None:
    install(fleet, pack_for, digits.onnx, 1, end_of_life=day(20))
    x = np.zeros((1, 64), np.float32)
    fleet.agent().predict(x)
    fleet.clock.now = day(30)
    fleet.agent().apply_commands(fleet.operator.beacon(day(30)))
    assert fleet.agent().sweep_end_of_life() == ["digits"]  # signed time passed it: shredded
    fleet.clock.now = day(10)
    with pytest.raises(EdgeWardError):
        fleet.agent().predict(x)
    assert not list((fleet.board.data_dir / "bundles").iterdir())
    assert events(fleet, "end-of-life")


def test_a_forward_jump_of_the_system_clock_ends_no_models_life(fleet: Fleet, pack_for, digits) -> None:
    install(fleet, pack_for, digits.onnx, 1, end_of_life=day(50))
    x = np.zeros((1, 64), np.float32)
    fleet.clock.now = day(400)  # a bad NTP answer, a typo
    with pytest.raises(Expired):
        fleet.agent().predict(x)  # paused while the clock is wrong...
    assert fleet.agent().sweep_end_of_life() == []  # ...but not shredded: no signed time says so
    fleet.clock.now = day(5)
    assert fleet.agent().predict(x)["predictions"]  # serves again once the clock is right


def test_a_beacon_far_ahead_is_held_until_another_source_confirms_it(fleet: Fleet, pack_for, digits) -> None:
    install(fleet, pack_for, digits.onnx, 1, end_of_life=day(50))
    x = np.zeros((1, 64), np.float32)
    fleet.clock.now = day(1)
    fleet.agent().apply_commands(fleet.operator.beacon(day(400)))  # a mistyped fleet clock
    state = fleet.agent().state()
    assert state.held_beacon == day(400) and state.clock_floor < day(2)
    assert events(fleet, "time") and fleet.agent().predict(x)["predictions"]
    fleet.agent().apply_commands(fleet.operator.beacon(day(401)))  # beacons never confirm each other
    assert fleet.agent().state().clock_floor < day(2)
    fleet.clock.now = day(399)  # nor does the unsigned system clock: a forward jump shreds nothing
    assert fleet.agent().sweep_end_of_life() == [] and fleet.agent().state().clock_floor < day(2)
    fleet.clock.now = day(1)
    # A signed command issued near the held time confirms it: the floor moves and the model's life ends.
    fleet.clock.now = day(400)
    fleet.agent().apply_commands(fleet.operator.sign("retire", "pi-cmd", 1, issued=day(400), model_id="none"))
    assert fleet.agent().state().clock_floor == day(401)
    assert fleet.agent().sweep_end_of_life() == ["digits"]


def test_a_held_beacon_contradicted_by_the_fleet_is_dropped(fleet: Fleet, pack_for, digits) -> None:
    install(fleet, pack_for, digits.onnx, 1, end_of_life=day(50))
    fleet.clock.now = day(1)
    fleet.agent().apply_commands(fleet.operator.beacon(day(3650)))  # ten years ahead: held
    fleet.agent().apply_commands(fleet.operator.beacon(day(2)))  # the fleet's corrected clock
    state = fleet.agent().state()
    assert state.held_beacon is None and state.clock_floor == day(2)
    fleet.clock.now = day(3649)  # a later forward excursion of the system clock...
    assert fleet.agent().sweep_end_of_life() == []  # ...confirms nothing and ends nothing
    fleet.clock.now = day(3)
    assert fleet.agent().predict(np.zeros((1, 64), np.float32))["predictions"]


def test_a_recovery_key_cannot_sign_time_beacons(fleet: Fleet, pack_for, digits) -> None:
    install(fleet, pack_for, digits.onnx, 1)
    floor = fleet.agent().state().clock_floor
    fleet.agent().apply_commands(encode_queue([fleet.recovery.beacon(day(2))]))
    assert fleet.agent().state().clock_floor == floor
    assert any("operator key" in e["evidence"]["refused"] for e in events(fleet, "command"))


def test_a_cancel_the_board_refuses_cancels_nothing(fleet: Fleet, pack_for, digits) -> None:
    install(fleet, pack_for, digits.onnx, 1, model_id="kws")
    queue = encode_queue([fleet.operator.sign("retire", "pi-cmd", 1, model_id="kws"),
                          fleet.operator.sign("cancel", "pi-cmd", 2, issued=day(3), seq=1)])  # from the future
    agent = fleet.agent()
    results = [verify_result(r, agent.store.identity().sign_public) for r in agent.apply_commands(queue)]
    assert [(r.seq, r.outcome) for r in results] == [(1, "applied"), (2, "refused")]
    assert fleet.agent().state().retired.keys() == {"kws"}


def test_end_of_life_keeps_the_board_reachable_for_the_next_release(fleet: Fleet, pack_for, digits) -> None:
    install(fleet, pack_for, digits.onnx, 1, end_of_life=day(20))
    fleet.clock.now = day(30)
    fleet.agent().apply_commands(fleet.operator.beacon(day(30)))
    assert fleet.agent().sweep_end_of_life() == ["digits"]
    install(fleet, pack_for, digits.onnx, 1, model_id="digits-2")  # packed for the enrolment the fleet has


def test_the_integrity_check_follows_an_install_made_while_serving(fleet: Fleet, pack_for, digits) -> None:
    from device_agent.service.service import Service

    install(fleet, pack_for, digits.onnx, 1)
    service = Service(fleet.agent())
    body = json.dumps({"inputs": np.zeros(64).tolist()}).encode()
    who = service.tokens.add("user", DAY0)[0]
    service.predict(who, body, "application/json")
    install(fleet, pack_for, digits.onnx, 2)  # another process installs a new version
    assert service.check_integrity()  # the state moved on: not tampering
    service.predict(who, body, "application/json")
    assert service.status_provider()["model"]["version"] == 2
    assert not events(fleet, "integrity")


def test_a_model_id_belongs_to_the_publisher_that_first_installed_it(
    fleet: Fleet, pack_for, digits, publisher: Path, tmp_path: Path
) -> None:
    """Two trusted publishers: the second cannot replace the first one's model, nor push its
    version out of reach (fast-forward); once the owner's key is rotated out, the model moves on."""
    from device_agent.bundle.keyfiles import load_public_key_file
    from packager.keys import generate, load_private_key
    from packager.modelfile import infer_task, read_model
    from packager.pack import PackOptions, load_enrolments, pack
    from packager.profiles import load_profile
    from packager.signers import FileSigner

    other = tmp_path / "other-publisher"
    generate("publisher", other, unencrypted=True)
    other_pub = load_public_key_file(other / "publisher.pub")
    ours = load_public_key_file(publisher / "publisher.pub")
    fleet.agent().apply_commands(fleet.operator.sign("rotate-key", "pi-cmd", 1, role="publisher",
                                                     keys=[base64.b64encode(k).decode() for k in (ours, other_pub)]))
    install(fleet, pack_for, digits.onnx, 1, model_id="kws")
    m = read_model(digits.onnx)

    def by_other(version: int) -> bytes:
        out = tmp_path / f"other-{version}"
        pack(m, load_profile("rpi4b"), FileSigner(load_private_key(other / "publisher.key")),
             load_enrolments([fleet.board.enrolment]),
             PackOptions(model_id="kws", model_version=version, task=infer_task(m, {}), created=DAY0), out)
        return (out / "pi-cmd.ewb").read_bytes()

    with pytest.raises(SecurityRefusal, match="belongs to publisher"):
        fleet.agent().install(by_other(2**40))
    install(fleet, pack_for, digits.onnx, 2, model_id="kws")  # the owner's next release still goes in
    assert fleet.agent().status()["models"][0]["version"] == 2
    # The owner's key is rotated out: the model moves on to the publisher the operators now trust.
    fleet.agent().apply_commands(fleet.operator.sign("rotate-key", "pi-cmd", 2, role="publisher",
                                                     keys=[base64.b64encode(other_pub).decode()]))
    fleet.agent().install(by_other(3))
    assert fleet.agent().status()["models"][0]["version"] == 3
