"""Staged over-the-air rollouts end to end: `edgeward fleet deploy` signs one update command per
board through the command ledger, a real mosquitto carries the retained queues, real
`edgeward-agent serve` processes fetch their bundles from a real HTTPS file server on loopback
(tests/fixtures/files.py, certificate from the fleet CA), install them and report signed results,
and the monitor records them in the rollout kept in the fleet store.

The rollout's pure decision (order, stages, timeouts, halting) is tested without a broker at the
end of this file; the board's side of a download in test_update_board.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from device_agent import Agent
from device_agent.bundle.keyfiles import load_public_key_file
from device_agent.store.keys import KeySource
from fleet import rollout
from fleet.monitor import Monitor
from packager.cli import main as edgeward
from packager.keys import generate
from tests.conftest import Board
from tests.fixtures.files import FileServer, serve_files
from tests.fixtures.fleet import Fleet, fleet_fixture, monitor_fixture, wait_until  # noqa: F401
from tests.fixtures.postgres import make_store_fixture, pg_cluster_fixture, pg_url_fixture  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


class Rollout:
    """Boards serving with the broker, a release on an HTTPS server, the operator's CLI."""

    def __init__(self, tmp_path: Path, fleet: Fleet, publisher: Path, pack_for: Callable[..., Path], model: Path,
                 devices: list[str], release_for: Callable[..., Path] | None = None) -> None:
        self.tmp, self.fleet = tmp_path, fleet
        self.op = tmp_path / "operator"
        generate("operator", self.op, unencrypted=True)
        self.boards: dict[str, Board] = {}
        self.env: dict[str, dict[str, str]] = {}
        self.procs: dict[str, subprocess.Popen[str]] = {}
        for d in devices:
            kek = tmp_path / f"{d}.kek"
            kek.write_bytes(os.urandom(32))
            keys = KeySource.from_env(str(kek))
            enrolment = tmp_path / f"{d}.json"
            enrolment.write_bytes(Agent.provision(
                tmp_path / f"board-{d}", d, [load_public_key_file(publisher / "publisher.pub")],
                [load_public_key_file(self.op / "operator.pub")], keys))
            self.boards[d] = Board(tmp_path / f"board-{d}", enrolment, d, keys)
            fleet.enrol(enrolment)
            self.env[d] = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWARD_")} | {
                "EDGEWARD_DEVICE_KEK_FILE": str(kek)}
        v1 = pack_for(model, list(self.boards.values()), 1)
        for d, b in self.boards.items():
            b.agent().install_file(v1 / f"{d}.ewb")
        # The new release: version 1 bundles, or a version 2 shared release (one payload, envelopes).
        self.release = (release_for or pack_for)(model, list(self.boards.values()), 2)

    def serve(self, device: str, deadline: float = 20) -> None:
        b, broker = self.boards[device], self.fleet.broker(device)
        self.procs[device] = subprocess.Popen(
            [sys.executable, "-m", "device_agent.cli", "serve", "--data-dir", str(b.data_dir),
             "--broker", f"{broker.host}:{broker.port}", "--ca", str(broker.ca), "--cert", str(broker.cert),
             "--key", str(broker.key), "--heartbeat", "0.5", "--update-ca", str(self.fleet.home.ca_cert),
             "--update-deadline", str(deadline)],
            env=self.env[device], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()

    def cli(self, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
        code = edgeward(["fleet", *argv, "--fleet-dir", str(self.fleet.home.path), "--json"])
        out, err = capsys.readouterr()
        return code, (json.loads(out) if out.strip() else err)

    def deploy(self, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
        return self.cli(capsys, "deploy", str(self.release), "--operator-key", str(self.op / "operator.key"),
                        "--broker", f"127.0.0.1:{self.fleet.port}", "--operator", "ops", *argv)

    def states(self, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
        code, doc = self.cli(capsys, "status")
        assert code == 0
        [r] = doc["rollouts"]
        return {b["device_id"]: b["state"] for b in r["devices"]} | {"_rollout": r["state"]}

    def version(self, device: str) -> int:
        slot = self.boards[device].agent().state().models["digits"]
        assert slot.current is not None
        return slot.current.model_version


@pytest.fixture
def kit(tmp_path: Path, fleet: Fleet, publisher: Path, pack_for: Callable[..., Path], digits: Any,
        release_for: Callable[..., Path]) -> Iterator[Callable[..., tuple[Rollout, FileServer]]]:
    made: list[tuple[Rollout, Iterator[FileServer]]] = []

    def make(devices: list[str], shared: bool = False) -> tuple[Rollout, FileServer]:
        r = Rollout(tmp_path, fleet, publisher, pack_for, digits.onnx, devices, release_for if shared else None)
        gen = serve_files(r.release, fleet.home)
        made.append((r, gen))
        return r, next(gen)

    yield make
    for r, gen in made:
        r.stop()
        gen.close()


def test_a_staged_rollout_waits_for_each_stage_and_an_offline_board_updates_when_it_returns(
    kit: Callable[..., tuple[Rollout, FileServer]], monitor: Monitor, capsys: pytest.CaptureFixture[str],
) -> None:
    devices = ["pi-a", "pi-b", "pi-c", "pi-d"]
    r, files = kit(devices)
    order = rollout.order("digits-v2", devices)
    first, offline, *rest = order  # stages 50%,100%: the first two boards, then the others
    for d in [first, *rest]:
        r.serve(d)
    # The plan, changing nothing.
    code, plan = r.deploy(capsys, "--base-url", files.base_url, "--all", "--stages", "50%,100%",
                          "--stage-timeout", "3s", "--dry-run")
    assert code == 0 and [b["device_id"] for b in plan["order"]] == order
    assert [b["stage"] for b in plan["order"]] == [1, 1, 2, 2]
    assert [c["device_id"] for c in plan["commands"]] == [first, offline]
    assert r.cli(capsys, "commands")[1] == [] and files.requests == []

    code, doc = r.deploy(capsys, "--base-url", files.base_url, "--all", "--stages", "50%,100%",
                         "--stage-timeout", "3s")
    assert code == 0, doc
    assert sorted(c["device_id"] for c in doc["commands"]) == sorted([first, offline])
    # What it says once they are signed: waiting for their answers, not updates still to sign.
    assert doc["state"] == "running" and "waiting for 2 board(s)" in doc["detail"], doc["detail"]
    assert "to sign" not in r.cli(capsys, "status")[1]["rollouts"][0]["detail"]
    wait_until(lambda: r.states(capsys)[first] == "updated", 60, f"{first} to report its update")
    assert r.version(first) == 2
    assert r.states(capsys)[offline] == "pending"
    # The next stage is signed only once the offline board's stage timed out; it stays pending.
    issued: list[str] = []

    def next_stage() -> bool:
        code, doc = r.deploy(capsys, "--resume")
        assert code == 0, doc
        issued.extend(c["device_id"] for c in doc["commands"])
        return bool(issued)

    wait_until(next_stage, 30, "the second stage")
    assert sorted(issued) == sorted(rest)
    # The monitor marks the rollout done itself once the last stage's boards answered: no --resume.
    wait_until(lambda: r.states(capsys)["_rollout"] == "done", 60, "the monitor to mark the rollout done")
    assert all(r.states(capsys)[d] == "updated" for d in rest)
    code, doc = r.deploy(capsys, "--resume")
    assert code == 0 and doc["state"] == "done" and doc["commands"] == []
    states = r.states(capsys)
    assert states[offline] == "pending" and states["_rollout"] == "done"
    assert r.version(offline) == 1
    # The board comes back: its retained queue holds its update.
    r.serve(offline)
    wait_until(lambda: r.states(capsys)[offline] == "updated", 60, f"{offline} to update once back")
    assert all(r.version(d) == 2 for d in devices)
    assert all(name.endswith(".ewb") and rng is None for name, rng in files.requests)
    code, doc = r.cli(capsys, "status")
    assert doc["rollouts"][0]["detail"] == "every stage complete: 4 updated"
    assert monitor.error is None


def test_a_stalled_server_neither_stops_the_boards_reports_nor_outlasts_its_deadline(
    kit: Callable[..., tuple[Rollout, FileServer]], monitor: Monitor, capsys: pytest.CaptureFixture[str],
) -> None:
    [device] = devices = ["pi-s"]
    r, files = kit(devices)
    files.behaviours[f"{device}.ewb"] = "stall"
    r.serve(device, deadline=6)
    code, doc = r.deploy(capsys, "--base-url", files.base_url, "--all", "--stages", "100%")
    assert code == 0, doc
    wait_until(lambda: bool(files.requests), 30, "the board to start its download")

    def reports() -> int:
        return int(next((d["received"] for d in monitor.store.devices() if d["device_id"] == device), 0))

    during = reports()
    # Heartbeats keep arriving while the download hangs (it runs in a worker, not the telemetry loop).
    wait_until(lambda: reports() >= during + 4 or r.states(capsys)[device] != "pending", 30, "heartbeats")
    assert r.states(capsys)[device] == "pending"
    wait_until(lambda: r.states(capsys)["_rollout"] == "halted", 30, "the board to give up at its deadline")
    code, doc = r.cli(capsys, "status")
    assert "did not finish within 6 s" in doc["rollouts"][0]["devices"][0]["detail"]
    assert r.version(device) == 1 and r.procs[device].poll() is None


def test_a_tampered_file_halts_the_rollout_and_the_board_keeps_its_model(
    kit: Callable[..., tuple[Rollout, FileServer]], monitor: Monitor, capsys: pytest.CaptureFixture[str],
) -> None:
    devices = ["pi-e", "pi-f"]
    r, files = kit(devices)
    first, second = rollout.order("digits-v2", devices)
    for d in devices:
        r.serve(d)
    served = files.root / f"{first}.ewb"
    data = bytearray(served.read_bytes())
    code, doc = r.deploy(capsys, "--base-url", files.base_url, "--device", first, "--device", second,
                         "--stages", "50%,100%", "--max-failures", "1")
    assert code == 0 and [c["device_id"] for c in doc["commands"]] == [first]
    data[len(data) // 2] ^= 0xFF  # altered on the server after the release was signed for
    served.write_bytes(bytes(data))
    wait_until(lambda: r.states(capsys)["_rollout"] == "halted", 60, "the monitor to halt the rollout")
    states = r.states(capsys)
    assert states[first] == "failed" and states[second] == "waiting"
    code, doc = r.cli(capsys, "status")
    [ro] = doc["rollouts"]
    assert "SHA-256" in ro["devices"][0]["detail"] and "--max-failures 1" in ro["detail"]
    assert r.version(first) == 1
    code, doc = r.deploy(capsys, "--resume")
    assert code == 0 and doc["state"] == "halted" and doc["commands"] == []
    assert [c["device_id"] for c in r.cli(capsys, "commands")[1] if c["kind"] == "update"] == [first]
    # The same release cannot be started again over the halted one.
    code, _ = r.deploy(capsys, "--base-url", files.base_url, "--all")
    assert code == 2


def test_a_shared_release_rolls_out_one_payload_and_an_envelope_per_board(
    kit: Callable[..., tuple[Rollout, FileServer]], monitor: Monitor, capsys: pytest.CaptureFixture[str],
) -> None:
    devices = ["pi-g", "pi-h"]
    r, files = kit(devices, shared=True)
    index = json.loads((r.release / "release.json").read_text())
    first, second = rollout.order(index["release_id"], devices)
    for d in devices:
        r.serve(d)
    code, doc = r.deploy(capsys, "--base-url", files.base_url, "--all", "--stages", "50%,100%")
    assert code == 0 and doc["release_id"] == index["release_id"], doc
    [cmd] = doc["commands"]
    assert cmd["device_id"] == first and cmd["args"]["bundle"]["url"].endswith(f"/envelopes/{first}.ewe")
    assert cmd["args"]["payload"] == {"url": files.base_url + "payload.ewp", **{
        k: index["payload"][k] for k in ("length", "sha256")}}
    wait_until(lambda: r.states(capsys)[first] == "updated", 60, f"{first} to report its update")
    code, doc = r.deploy(capsys, "--resume")
    assert code == 0 and [c["device_id"] for c in doc["commands"]] == [second]
    wait_until(lambda: r.states(capsys)[second] == "updated", 60, f"{second} to report its update")
    assert all(r.version(d) == 2 for d in devices)
    assert sorted(name for name, _ in files.requests) == sorted(
        ["payload.ewp", "payload.ewp", f"envelopes/{first}.ewe", f"envelopes/{second}.ewe"])


# --- the decision, without a broker ------------------------------------------------------------------

T0 = datetime(2027, 1, 1, tzinfo=UTC)


def _rollout(stages: list[int], max_failures: int = 1, stage: int = 0) -> dict[str, Any]:
    return {"release_id": "r", "stages": stages, "max_failures": max_failures, "stage_timeout_s": 600,
            "state": "running", "stage": stage, "stage_started": "2027-01-01T00:00:00Z", "detail": ""}


def _boards(states: list[str], stages: list[int]) -> list[dict[str, Any]]:
    cut = rollout.stage_of(len(states), stages)
    return [{"device_id": f"pi-{i}", "stage": cut[i], "state": s} for i, s in enumerate(states)]


def test_the_order_is_fixed_per_release_and_differs_between_releases() -> None:
    devices = [f"pi-{i:03}" for i in range(50)]
    a = rollout.order("digits-v2", devices)
    assert a == rollout.order("digits-v2", list(reversed(devices))) and sorted(a) == sorted(devices)
    assert a != rollout.order("digits-v3", devices)


def test_stages_are_cumulative_shares_with_at_least_one_board_first() -> None:
    assert rollout.stage_of(4, [25, 100]) == [0, 1, 1, 1]
    assert rollout.stage_of(3, [5, 25, 100]) == [0, 2, 2]  # ceil(25% of 3) is 1: the second stage is empty
    assert rollout.stage_of(100, [5, 25, 100]).count(0) == 5
    for bad in ("50%,25%,100%", "5%,50%", "0%,100%", "x", "5%,5%,100%"):
        with pytest.raises(Exception, match="--stages"):
            rollout.parse_stages(bad)


def test_a_silent_board_holds_its_stage_until_the_timeout_then_counts_as_pending() -> None:
    r = _rollout([50, 100])
    boards = _boards(["updated", "pending", "waiting", "waiting"], [50, 100])
    step = rollout.decide(r, boards, T0 + timedelta(seconds=599))
    assert (step.state, step.stage, step.issue) == ("running", 0, ())
    step = rollout.decide(r, boards, T0 + timedelta(seconds=600))
    assert (step.state, step.stage, step.issue) == ("running", 1, ("pi-2", "pi-3"))
    second = r | {"stage": 1, "stage_started": "2027-01-01T00:10:00Z"}
    silent = _boards(["updated", "pending", "updated", "pending"], [50, 100])
    step = rollout.decide(second, silent, T0 + timedelta(seconds=601))
    assert step.state == "running"  # the second stage has its own timeout, for its own boards
    step = rollout.decide(second, silent, T0 + timedelta(seconds=1200))
    assert step.state == "done" and "2 pending" in step.detail
    answered = _boards(["updated", "pending", "updated", "updated"], [50, 100])
    step = rollout.decide(second, answered, T0 + timedelta(seconds=601))
    assert step.state == "done" and "1 pending" in step.detail  # the first stage's silent board does not hold it


def test_the_rollout_halts_at_max_failures_and_signs_nothing_more() -> None:
    boards = _boards(["failed", "updated", "waiting", "waiting"], [50, 100])
    assert rollout.decide(_rollout([50, 100], max_failures=1), boards, T0).state == "halted"
    step = rollout.decide(_rollout([50, 100], max_failures=2), boards, T0)
    assert (step.state, step.issue) == ("running", ("pi-2", "pi-3"))
    halted = _rollout([50, 100]) | {"state": "halted", "detail": "halted"}
    assert rollout.decide(halted, _boards(["waiting"] * 4, [50, 100]), T0).issue == ()


def test_the_rollout_tables_are_kept_by_the_store(make_store: Callable[[], Any]) -> None:
    store = make_store()  # once per engine: SQLite and PostgreSQL (migration 4)
    r = _rollout([100]) | {"model_id": "digits", "model_version": 2, "base_url": "https://h/", "created": "t",
                           "updated": "t"}
    boards = [{"device_id": "pi-1", "position": 1, "stage": 0, "url": "https://h/pi-1.ewb", "length": 5,
               "sha256": "0" * 64, "state": "waiting"}]
    assert store.create_rollout(r, boards) and not store.create_rollout(r, boards)
    store.rollout_issued("r", "pi-1", 7, "1" * 64, T0)
    assert [(b["device_id"], b["seq"]) for b in store.rollout_open("pi-1")] == [("pi-1", 7)]
    assert store.rollout_open("pi-2") == []
    assert store.rollout_answered("r", "pi-1", 7, "updated", "ok", T0)
    assert store.rollout_open() == [] and store.rollout_counts("r") == ({"updated": 1}, [])
    assert not store.rollout_answered("r", "pi-1", 7, "failed", "a late refusal never undoes it", T0)
    [b] = store.rollout_devices("r")
    assert (b["state"], b["seq"]) == ("updated", 7)
    store.rollout_moved("r", "done", 0, "2027-01-01T00:00:00Z", "done: 1 updated", T0)
    [got] = store.rollouts("r")
    assert (got["state"], got["stages"], got["detail"]) == ("done", [100], "done: 1 updated")


def _text(capsys: pytest.CaptureFixture[str], r: Rollout, *argv: str) -> tuple[int, str, str]:
    code = edgeward(["fleet", "deploy", str(r.release), "--fleet-dir", str(r.fleet.home.path), "--operator-key",
                     str(r.op / "operator.key"), "--operator", "ops", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_plan_and_the_signed_updates_name_each_digest_and_the_shared_payload(
    kit: Callable[..., tuple[Rollout, FileServer]], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    devices = ["pi-p", "pi-q"]
    r, files = kit(devices, shared=True)
    index = json.loads((r.release / "release.json").read_text())
    first = rollout.order(index["release_id"], devices)[0]
    envelope, payload = index["devices"][first], index["payload"]
    code, out, err = _text(capsys, r, "--base-url", files.base_url, "--all", "--stages", "50%,100%", "--dry-run")
    assert code == 0, err
    # The plan shows the payload every board fetches, and says which file each digest is of.
    assert f"{files.base_url}payload.ewp ({payload['length']} bytes, payload sha256 {payload['sha256'][:16]})" in out
    assert (f"would sign update #1 for {first}: envelope {first}.ewe ({envelope['length']} bytes, envelope sha256 "
            f"{envelope['sha256'][:16]}) + payload") in out
    code, doc = r.deploy(capsys, "--base-url", files.base_url, "--all", "--stages", "50%,100%", "--dry-run")
    assert doc["payload"] == {"url": files.base_url + "payload.ewp", "length": payload["length"],
                              "sha256": payload["sha256"]}
    code, out, err = _text(capsys, r, "--base-url", files.base_url, "--all", "--stages", "50%,100%",
                           "--out", str(tmp_path / "queues"))
    assert code == 0, err
    [signed] = [line for line in out.splitlines() if line.startswith("signed update")]
    [cmd] = [c for c in r.cli(capsys, "commands")[1] if c["kind"] == "update"]
    assert signed.startswith(f"signed update #1 for {first}: envelope {first}.ewe ")
    assert f"envelope sha256 {envelope['sha256'][:16]}" in signed and cmd["sha256"] != envelope["sha256"]
    assert signed.endswith(f", command sha256 {cmd['sha256'][:16]}")
    assert "to sign" not in out.splitlines()[-1]  # it was just signed: the rollout waits for its answer


def test_a_release_file_changed_after_the_pack_is_a_security_refusal_and_signs_nothing(
    kit: Callable[..., tuple[Rollout, FileServer]], capsys: pytest.CaptureFixture[str],
) -> None:
    r, files = kit(["pi-t"], shared=True)
    data = bytearray((r.release / "payload.ewp").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (r.release / "payload.ewp").write_bytes(bytes(data))
    for extra in (["--dry-run"], []):
        code, doc = r.deploy(capsys, "--base-url", files.base_url, "--all", *extra)
        assert code == 1, doc  # exit 1 (refused for security), not 2 (usage)
        assert "payload.ewp is not the file the release describes" in doc and "pack the release again" in doc
    assert r.cli(capsys, "commands")[1] == []
    assert r.cli(capsys, "status")[1]["rollouts"] == []


def test_the_monitor_marks_a_rollout_done_once_its_last_stage_answered() -> None:
    r = _rollout([50, 100], stage=1) | {"stage_started": "2027-01-01T00:10:00Z"}
    # The last stage's boards answered: done, without the operator key or a --resume.
    state, detail = rollout.settle(r, {0: {"updated": 2}, 1: {"updated": 2}}, [], T0 + timedelta(seconds=601))
    assert (state, detail) == ("done", "every stage complete: 4 updated")
    # One still silent within its stage's timeout: still running, and it says what it waits for.
    state, detail = rollout.settle(r, {0: {"updated": 2}, 1: {"updated": 1, "pending": 1}}, [],
                                   T0 + timedelta(seconds=601))
    assert state == "running" and "waiting for 1 board(s) until 2027-01-01T00:20:00Z" in detail
    assert "to sign" not in detail
    # A complete stage with a next one to sign: recorded as it is, with what to run.
    first = _rollout([50, 100])
    state, detail = rollout.settle(first, {0: {"updated": 2}, 1: {"waiting": 2}}, [], T0 + timedelta(seconds=1))
    assert state == "running" and "stage 1/2 complete" in detail and "--resume' to sign stage 2/2" in detail
    # A board that refuses: halted, however many answers come after.
    state, detail = rollout.settle(first, {0: {"failed": 1, "pending": 1}}, ["pi-0"], T0)
    assert state == "halted" and "1 board(s) failed" in detail and "pi-0" in detail
    halted = first | {"state": "halted", "detail": detail}
    state, detail = rollout.settle(halted, {0: {"failed": 2}, 1: {"waiting": 2}}, ["pi-0", "pi-1"], T0)
    assert state == "halted" and "2 board(s) failed" in detail and "pi-0, pi-1" in detail


def test_a_finished_rollout_says_done_once() -> None:
    step = rollout.decide(_rollout([100]), _boards(["updated", "updated"], [100]), T0)
    line = f"{step.state}, {step.detail}"
    assert step.state == "done" and line.count("done") == 1
    step = rollout.decide(_rollout([100]), _boards(["failed", "updated"], [100]), T0)
    assert step.state == "halted" and f"{step.state}, {step.detail}".count("halted") == 1
    # 'fleet status' likewise: the state, then what it is, each said once.
    done = {"release_id": "r", "model_id": "digits", "model_version": 2, "stages": [100], "stage": 0,
            "state": "done", "detail": rollout.done_detail({"updated": 2}), "summary": "2 updated", "devices": []}
    [line] = rollout.text_view([done])
    assert line.endswith("done, stage 1/1 of 100%; every stage complete: 2 updated") and line.count("updated") == 1


HOSTILE = "ok\x1b[1A\x1b[2K\rrollout r2 (digits v2): done\nforged line\x9b2J\u202eevil\ud800"


def test_fleet_status_and_events_show_what_a_board_wrote_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A compromised board's signed strings (a result detail, an event kind, its state and model
    ids) cannot move the cursor, rewrite or add lines of `fleet status` / `fleet events`: every
    control character is shown as its escape in text; JSON keeps the string itself."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_agent.crypto import ed25519_public_raw
    from device_agent.telemetry.report import Report, encode_report
    from fleet.monitor import ingest
    from fleet.store import MonitorStore

    home = tmp_path / "fleet-home"
    home.mkdir()
    key = Ed25519PrivateKey.generate()
    store = MonitorStore(home / "monitor.db")
    reports = [Report("pi-1", 1, "status", T0, {"state": "on\x1b[2Kline", "models": [
                   {"model_id": "digits\x1b]0;pwned\x07", "version": "2\r"}]}),
               Report("pi-1", 2, "events", T0, {"event": {"kind": "ood\x1b[31m\nforged", "severity": "info\r"}})]
    assert ingest(store, {"pi-1": ed25519_public_raw(key)},
                  [(r.topic, encode_report(r, key)) for r in reports], 8)["accepted"] == 2
    r = _rollout([100]) | {"model_id": "digits", "model_version": 2, "base_url": "https://h/", "created": "t",
                           "updated": "t", "state": "halted", "detail": "stopped at stage 1: 1 board(s) failed"}
    boards = [{"device_id": "pi-1", "position": 1, "stage": 0, "url": "https://h/pi-1.ewb", "length": 5,
               "sha256": "0" * 64, "state": "waiting"}]
    assert store.create_rollout(r, boards)
    store.rollout_issued("r", "pi-1", 7, "1" * 64, T0)
    assert store.rollout_answered("r", "pi-1", 7, "failed", HOSTILE, T0)
    store.close()

    for argv in (["status"], ["events"]):
        assert edgeward(["fleet", *argv, "--fleet-dir", str(home)]) == 0
        out = capsys.readouterr().out
        for c in ("\x1b", "\r", "\x9b", "\x07", "\u202e", "\ud800"):
            assert c not in out, (argv, out)
        assert not any(line.startswith(("rollout r2", "forged")) for line in out.splitlines()), out
        if argv == ["status"]:
            assert "ok\\x1b[1A\\x1b[2K\\x0drollout r2 (digits v2): done\\x0aforged line\\x9b2J\\u202eevil" in out
            assert "on\\x1b[2Kline" in out and "digits\\x1b]0;pwned\\x07 v2\\x0d" in out
            assert out.count("\nrollout r (digits v2): halted") == 1  # the rollout's own line, once
        else:
            assert "ood\\x1b[31m\\x0aforged" in out
    assert edgeward(["fleet", "status", "--fleet-dir", str(home), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["rollouts"][0]["devices"][0]["detail"] == HOSTILE.replace("\ud800", "\\ud800")
