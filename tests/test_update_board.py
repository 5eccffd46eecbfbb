"""Over-the-air updates on the board (device_agent.commands.update, .fetch): a signed ``update``
command, a real HTTPS file server on loopback (tests/fixtures/files.py), real bundles and real
onnxruntime. The file server is trusted for nothing: whatever it withholds, stalls, lengthens or
alters is refused, the board keeps serving the model it had, and its signed result says why.

The staged rollout over a real broker is in test_rollout.py.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent import Agent, crypto
from device_agent.commands.fetch import FetchFailed, FetchSettings, Target, fetch
from device_agent.commands.format import Command, Result, encode_queue, update_args, verify_result
from device_agent.commands.update import Updater
from device_agent.config import DEFAULT_CONFIG, AgentConfig
from device_agent.errors import FormatError
from device_agent.store import layout
from device_agent.store.keys import KeySource
from tests.conftest import Board
from tests.fixtures.files import FileServer, files_fixture, files_home_fixture  # noqa: F401
from tests.fixtures.trusted import Operator

DEVICE = "pi-ota"
LIMITS = DEFAULT_CONFIG.commands
MAX = LIMITS.max_update_bytes


@dataclass
class OtaBoard:
    board: Board
    operator: Operator
    config: AgentConfig
    seq: int = 0

    def agent(self) -> Agent:
        return Agent(self.board.data_dir, self.board.keys, config=self.config)

    def update(self, url: str, length: int, sha256: str, version: int = 2, **extra: Any) -> Result:
        """Deliver one signed update (as a technician's command file is) and return the verified result."""
        self.seq += 1
        args = {"release_id": f"digits-v{version}", "model_id": "digits", "model_version": version,
                "bundle": {"url": url, "length": length, "sha256": sha256}} | extra
        args["model_version"] = version
        payload = self.operator.sign("update", DEVICE, self.seq, datetime.now(UTC).replace(microsecond=0), **args)
        [data] = self.agent().apply_commands(payload)
        key = base64.b64decode(json.loads(self.board.enrolment.read_text())["sign_public"])
        return verify_result(data, key)

    def serving(self) -> int:
        return self.agent().model("digits").manifest.model_version


@pytest.fixture
def ota(tmp_path: Path, publisher: Path, pack_for: Callable[..., Path], digits: Any, files: FileServer) -> OtaBoard:
    """A board trusting an operator, serving digits v1, whose updates trust the file server's CA
    and give up after 3 s."""
    from device_agent.bundle.keyfiles import load_public_key_file

    op = Operator()
    keys = KeySource(kek=bytes(range(32)))
    d = tmp_path / "board"
    enrolment = tmp_path / f"{DEVICE}.json"
    enrolment.write_bytes(Agent.provision(d, DEVICE, [load_public_key_file(publisher / "publisher.pub")],
                                          [op.public], keys))
    commands = replace(DEFAULT_CONFIG.commands, update_ca_file=str(files.ca), update_deadline_s=3.0,
                       update_read_s=3.0, update_attempts=3)
    b = OtaBoard(Board(d, enrolment, DEVICE, keys), op, replace(DEFAULT_CONFIG, commands=commands))
    b.agent().install_file(pack_for(digits.onnx, [b.board], 1) / f"{DEVICE}.ewb")
    return b


def publish(files: FileServer, bundle: Path, name: str = f"{DEVICE}.ewb") -> tuple[str, int, str]:
    """Put ``bundle`` on the server; its URL, length and SHA-256 (what the operator signs)."""
    shutil.copyfile(bundle, files.root / name)
    data = bundle.read_bytes()
    return files.base_url + name, len(data), crypto.sha256_hex(data)


def stored_bundles(b: OtaBoard) -> list[str]:
    return sorted(p.name for p in (b.board.data_dir / "bundles").iterdir())


def test_an_update_is_fetched_over_https_verified_and_installed(
    ota: OtaBoard, files: FileServer, pack_for: Callable[..., Path], digits: Any,
) -> None:
    url, length, sha = publish(files, pack_for(digits.onnx, [ota.board], 2) / f"{DEVICE}.ewb")
    r = ota.update(url, length, sha)
    assert (r.kind, r.outcome) == ("update", "applied"), r.detail
    assert r.effects["model_version"] == 2 and r.effects["downloaded_bytes"] == length
    assert ota.serving() == 2
    assert not (ota.board.data_dir / layout.UPDATE_STAGING).exists()
    # Delivered again (a retained queue, a power cut before the number was saved): nothing is fetched twice.
    before = len(files.requests)
    again = ota.update(url, length, sha)
    assert again.outcome == "applied" and "already serves" in again.detail and len(files.requests) == before


def test_a_tampered_file_on_the_server_is_refused_and_the_old_model_keeps_serving(
    ota: OtaBoard, files: FileServer, pack_for: Callable[..., Path], digits: Any,
) -> None:
    url, length, sha = publish(files, pack_for(digits.onnx, [ota.board], 2) / f"{DEVICE}.ewb")
    served = files.root / f"{DEVICE}.ewb"
    data = bytearray(served.read_bytes())
    data[-100] ^= 1
    served.write_bytes(bytes(data))
    before = stored_bundles(ota)
    r = ota.update(url, length, sha)
    assert r.outcome == "refused" and "does not match the SHA-256" in r.detail
    assert ota.serving() == 1 and stored_bundles(ota) == before
    assert not (ota.board.data_dir / layout.UPDATE_STAGING).exists()


def test_a_stalled_server_costs_the_board_its_deadline_and_nothing_else(
    ota: OtaBoard, files: FileServer, pack_for: Callable[..., Path], digits: Any,
) -> None:
    url, length, sha = publish(files, pack_for(digits.onnx, [ota.board], 2) / f"{DEVICE}.ewb")
    files.behaviours[f"{DEVICE}.ewb"] = "stall"
    r = ota.update(url, length, sha)
    assert r.outcome == "refused" and "did not finish within 3 s" in r.detail
    assert ota.serving() == 1
    assert not (ota.board.data_dir / layout.UPDATE_STAGING).exists()


def test_a_dropped_connection_resumes_with_a_range_request(
    ota: OtaBoard, files: FileServer, pack_for: Callable[..., Path], digits: Any,
) -> None:
    url, length, sha = publish(files, pack_for(digits.onnx, [ota.board], 2) / f"{DEVICE}.ewb")
    files.behaviours[f"{DEVICE}.ewb"] = "drop-once"
    r = ota.update(url, length, sha)
    assert r.outcome == "applied", r.detail
    assert r.effects["connections"] == 2
    assert files.requests == [(f"{DEVICE}.ewb", None), (f"{DEVICE}.ewb", f"bytes={length // 2}-{length - 1}")]
    assert ota.serving() == 2


@pytest.mark.parametrize("how", ["longer", "endless"])
def test_a_server_sending_more_than_the_signed_length_is_refused(
    how: str, ota: OtaBoard, files: FileServer, pack_for: Callable[..., Path], digits: Any,
) -> None:
    url, length, sha = publish(files, pack_for(digits.onnx, [ota.board], 2) / f"{DEVICE}.ewb")
    files.behaviours[f"{DEVICE}.ewb"] = how
    r = ota.update(url, length, sha)
    assert r.outcome == "refused" and ("offers" in r.detail or "more than the signed" in r.detail), r.detail
    assert ota.serving() == 1


def test_a_missing_file_is_refused_with_what_to_do(ota: OtaBoard, files: FileServer) -> None:
    r = ota.update(files.base_url + "nowhere.ewb", 1000, "0" * 64)
    assert r.outcome == "refused" and "404" in r.detail and "--base-url" in r.detail
    assert ota.serving() == 1


def test_a_bundle_for_another_board_is_refused_even_with_its_digest_signed(
    ota: OtaBoard, files: FileServer, pack_for: Callable[..., Path], digits: Any,
    make_board: Callable[..., Board],
) -> None:
    other = make_board("pi-other")
    url, length, sha = publish(files, pack_for(digits.onnx, [other], 2) / "pi-other.ewb", f"{DEVICE}.ewb")
    r = ota.update(url, length, sha)
    assert r.outcome == "refused" and "pi-other" in r.detail
    assert ota.serving() == 1


def test_a_bundle_of_another_version_than_the_command_names_is_refused(
    ota: OtaBoard, files: FileServer, pack_for: Callable[..., Path], digits: Any,
) -> None:
    url, length, sha = publish(files, pack_for(digits.onnx, [ota.board], 3) / f"{DEVICE}.ewb")
    r = ota.update(url, length, sha, version=2)
    assert r.outcome == "refused" and "version 3" in r.detail
    assert ota.serving() == 1


def test_a_new_version_that_fails_its_trial_load_leaves_the_old_one_serving(
    ota: OtaBoard, files: FileServer, tmp_path: Path, publisher: Path, digits: Any,
) -> None:
    from packager.keys import load_private_key
    from packager.modelfile import ModelFile, infer_task, read_model
    from packager.pack import PackOptions, load_enrolments, pack
    from packager.profiles import load_profile
    from packager.signers import FileSigner

    # A publisher's release the runtime cannot load: signed and sealed like any other.
    real = read_model(digits.onnx)
    broken = ModelFile(real.path, b"\x08\x07" + bytes(2000), "onnx")
    out = tmp_path / "broken-release"
    pack(broken, load_profile("rpi4b"), FileSigner(load_private_key(publisher / "publisher.key")),
         load_enrolments([ota.board.enrolment]),
         PackOptions(model_id="digits", model_version=2, task=infer_task(real, {})), out)
    url, length, sha = publish(files, out / f"{DEVICE}.ewb")
    before = stored_bundles(ota)
    r = ota.update(url, length, sha)
    assert r.outcome == "refused" and "previous model keeps serving" in r.detail
    assert ota.serving() == 1 and stored_bundles(ota) == before


def shared_release(files: FileServer, out: Path) -> dict[str, Any]:
    """Put a version 2 shared release on the server (payload.ewp, envelopes/); the update
    arguments of this board from its release index."""
    shutil.copytree(out, files.root, dirs_exist_ok=True)
    index = json.loads((out / "release.json").read_text())
    env, pay = index["devices"][DEVICE], index["payload"]
    return {"release_id": index["release_id"], "model_version": index["model_version"],
            "bundle": {"url": files.base_url + env["file"], "length": env["length"], "sha256": env["sha256"]},
            "payload": {"url": files.base_url + pay["file"], "length": pay["length"], "sha256": pay["sha256"]}}


def test_a_shared_release_is_fetched_as_envelope_and_payload_and_installed(
    ota: OtaBoard, files: FileServer, release_for: Callable[..., Path], digits: Any,
) -> None:
    args = shared_release(files, release_for(digits.onnx, [ota.board], 2))
    b = args["bundle"]
    r = ota.update(b["url"], b["length"], b["sha256"], release_id=args["release_id"], payload=args["payload"])
    assert r.outcome == "applied", r.detail
    assert r.effects["bundle_id"] == args["release_id"] and ota.serving() == 2
    assert r.effects["downloaded_bytes"] == b["length"] + args["payload"]["length"]
    assert [name for name, _ in files.requests] == [f"envelopes/{DEVICE}.ewe", "payload.ewp"]
    for name in (layout.UPDATE_STAGING, layout.UPDATE_PAYLOAD):
        assert not (ota.board.data_dir / name).exists()
    again = ota.update(b["url"], b["length"], b["sha256"], release_id=args["release_id"], payload=args["payload"])
    assert "already serves" in again.detail and len(files.requests) == 2


def test_a_tampered_shared_payload_is_refused_and_the_old_model_keeps_serving(
    ota: OtaBoard, files: FileServer, release_for: Callable[..., Path], digits: Any,
) -> None:
    args = shared_release(files, release_for(digits.onnx, [ota.board], 2))
    data = bytearray((files.root / "payload.ewp").read_bytes())
    data[-50] ^= 1
    (files.root / "payload.ewp").write_bytes(bytes(data))
    before = stored_bundles(ota)
    b = args["bundle"]
    r = ota.update(b["url"], b["length"], b["sha256"], release_id=args["release_id"], payload=args["payload"])
    assert r.outcome == "refused" and "does not match the SHA-256" in r.detail
    assert ota.serving() == 1 and stored_bundles(ota) == before
    assert not (ota.board.data_dir / layout.UPDATE_PAYLOAD).exists()


# --- a file server that drips, and the commands that end an update --------------------------------


@pytest.mark.parametrize("how", ["drip", "drip-headers"])
def test_a_dripping_server_is_cut_off_at_the_deadline_whatever_the_phase(
    how: str, tmp_path: Path, files: FileServer,
) -> None:
    # One byte (or one header line) every 0.5 s: each receive is well inside the read timeout, so
    # only a deadline over the whole download, headers included, ends it.
    data = bytes(range(30))
    (files.root / "f.bin").write_bytes(data)
    files.behaviours["f.bin"] = how
    how_long = FetchSettings(connect_s=2.0, read_s=2.0, deadline_s=1.0, attempts=3, ca_file=str(files.ca))
    with pytest.raises(FetchFailed, match="did not finish within 1 s"):
        fetch(Target(files.base_url + "f.bin", len(data), crypto.sha256_hex(data)), tmp_path / "out", how_long)
    # The board hung up while the server still had most of its drip to send (30 bytes or 90
    # header lines, 0.5 s apart).
    assert files.dripped.get("f.bin", 0) < 15
    assert files.requests == [("f.bin", None)]


class _DripProxy:
    """A TCP relay in front of the file server that passes the server's bytes to the board one
    every 0.2 s (the board's own go through at once): the TLS handshake itself drips."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.forwarded = 0
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            board, _ = self.listener.accept()
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pipe, args=(board, server, 65536), daemon=True).start()
            self._pipe(server, board, 1)

    def _pipe(self, src: socket.socket, dst: socket.socket, step: int) -> None:
        with contextlib.suppress(OSError):
            while not self.stop.is_set() and (data := src.recv(step)):
                dst.sendall(data)
                if step == 1:
                    self.forwarded += 1
                    self.stop.wait(0.2)

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


def test_a_dripping_tls_handshake_is_cut_off_at_the_deadline(tmp_path: Path, files: FileServer) -> None:
    data = bytes(range(30))
    (files.root / "f.bin").write_bytes(data)
    proxy = _DripProxy(files.port)
    try:
        how_long = FetchSettings(connect_s=2.0, read_s=2.0, deadline_s=1.0, attempts=3, ca_file=str(files.ca))
        with pytest.raises(FetchFailed, match="did not finish within 1 s"):
            fetch(Target(f"https://127.0.0.1:{proxy.port}/f.bin", len(data), crypto.sha256_hex(data)),
                  tmp_path / "out", how_long)
        # Cut off inside the server's first flight (its certificate alone is several hundred bytes).
        assert proxy.forwarded < 100 and files.requests == []
    finally:
        proxy.close()


def _worker_board(ota: OtaBoard, **limits: float) -> tuple[Agent, list[Result]]:
    """The board as ``serve`` runs it: updates carried out by the worker; its verified results."""
    ota.config = replace(ota.config, commands=replace(ota.config.commands, **limits))
    agent = ota.agent()
    agent.updater = Updater(agent)
    return agent, []


def _digits_v2_update(ota: OtaBoard, files: FileServer, pack_for: Callable[..., Path], digits: Any,
                      behaviour: str | None = None) -> tuple[bytes, datetime]:
    """Version 2 of the digits model on the file server (served as ``behaviour`` says), the signed
    update #1 that names it, and the time it was signed at."""
    url, length, sha = publish(files, pack_for(digits.onnx, [ota.board], 2) / f"{DEVICE}.ewb")
    if behaviour is not None:
        files.behaviours[f"{DEVICE}.ewb"] = behaviour
    now = datetime.now(UTC).replace(microsecond=0)
    upd = ota.operator.sign("update", DEVICE, 1, now, release_id="digits-v2", model_id="digits", model_version=2,
                            bundle={"url": url, "length": length, "sha256": sha})
    return upd, now


def _collect(ota: OtaBoard, into: list[Result]) -> Callable[[bytes, Result], None]:
    key = base64.b64decode(json.loads(ota.board.enrolment.read_text())["sign_public"])
    return lambda data, _: into.append(verify_result(data, key))


@pytest.mark.parametrize("kind", ["decommission", "retire"])
def test_an_end_of_life_command_is_not_held_back_by_a_dripping_download(
    kind: str, ota: OtaBoard, files: FileServer, pack_for: Callable[..., Path], digits: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    upd, now = _digits_v2_update(ota, files, pack_for, digits, "drip")
    agent, results = _worker_board(ota, update_deadline_s=600.0, update_read_s=5.0)
    agent.apply_commands(encode_queue([upd]), _collect(ota, results))
    assert agent.updater.busy
    # The fleet's retained queue, once the operator adds the end-of-life command behind the update.
    ender = ota.operator.sign(kind, DEVICE, 2, now, **({"model_id": "digits"} if kind == "retire" else {}))
    agent.apply_commands(encode_queue([upd, ender]), _collect(ota, results))
    # Decided at once, with the download still dripping (600 s of deadline left, bytes 0.5 s apart).
    # Cancelled, not refused: the operator ended it, the board did not fail it (a rollout does not
    # count it among its failures).
    assert [(r.seq, r.kind, r.outcome) for r in results] == [(1, "update", "cancelled"), (2, kind, "applied")]
    assert "cancelled, nothing installed" in results[0].detail and f"#2 ({kind})" in results[0].detail
    assert files.dripped.get(f"{DEVICE}.ewb", 0) < (files.root / f"{DEVICE}.ewb").stat().st_size // 2
    assert agent.updater.idle.wait(60), "the aborted download did not stop"
    assert len(results) == 2  # the abandoned update answers nothing more
    assert not [r for r in caplog.records if r.levelname == "ERROR"], "the worker failed after the update ended"
    assert not (ota.board.data_dir / layout.UPDATE_STAGING).exists()
    if kind == "decommission":
        assert not (ota.board.data_dir / layout.KEYS).exists()
    else:
        assert agent.state().command_seq == 2 and "digits" in agent.state().retired
        assert stored_bundles(ota) == []


@pytest.mark.parametrize("form", ["single", "queue"])
def test_a_cancelled_update_is_never_installed(
    form: str, ota: OtaBoard, files: FileServer, pack_for: Callable[..., Path], digits: Any,
) -> None:
    # served after 3 s of silence, then the whole (good) file
    upd, now = _digits_v2_update(ota, files, pack_for, digits, "slow-start")
    agent, results = _worker_board(ota, update_deadline_s=60.0, update_read_s=20.0)
    agent.apply_commands(encode_queue([upd]), _collect(ota, results))
    assert agent.updater.busy
    cancel = ota.operator.sign("cancel", DEVICE, 2, now, seq=1)
    # A technician's command file, or the fleet's retained queue with the cancel behind the update.
    agent.apply_commands(cancel if form == "single" else encode_queue([upd, cancel]), _collect(ota, results))
    assert agent.updater.idle.wait(60)
    expected = [(1, "update", "cancelled")] if form == "queue" else []
    assert [(r.seq, r.kind, r.outcome) for r in results] == [*expected, (2, "cancel", "applied")]
    assert ota.serving() == 1 and agent.state().command_seq == 2
    assert not (ota.board.data_dir / layout.UPDATE_STAGING).exists()


def test_an_update_whose_number_another_process_consumed_is_not_installed(
    ota: OtaBoard, files: FileServer, pack_for: Callable[..., Path], digits: Any,
) -> None:
    upd, now = _digits_v2_update(ota, files, pack_for, digits, "slow-start")
    agent, results = _worker_board(ota, update_deadline_s=60.0, update_read_s=20.0)
    agent.apply_commands(encode_queue([upd]), _collect(ota, results))
    # A technician cancels it from another process (``edgeward-agent command``): the worker
    # is not told, and must find the number consumed before it commits anything.
    [data] = ota.agent().apply_commands(ota.operator.sign("cancel", DEVICE, 2, now, seq=1))
    assert agent.updater.idle.wait(60)
    assert results == [] and ota.serving() == 1 and agent.state().command_seq == 2
    assert files.requests == [(f"{DEVICE}.ewb", None)]  # downloaded in full, then not installed


def test_a_killed_download_leaves_no_staging_file_after_a_restart(
    ota: OtaBoard, files: FileServer, pack_for: Callable[..., Path], digits: Any, tmp_path: Path,
) -> None:
    url, length, sha = publish(files, pack_for(digits.onnx, [ota.board], 2) / f"{DEVICE}.ewb")
    files.behaviours[f"{DEVICE}.ewb"] = "stall"
    cmd = ota.operator.sign("update", DEVICE, 1, datetime.now(UTC).replace(microsecond=0), release_id="digits-v2",
                            model_id="digits", model_version=2, bundle={"url": url, "length": length, "sha256": sha})
    (tmp_path / "cmd.bin").write_bytes(cmd)
    script = textwrap.dedent(f"""
        from dataclasses import replace
        from device_agent import Agent
        from device_agent.config import DEFAULT_CONFIG
        from device_agent.store.keys import KeySource
        c = replace(DEFAULT_CONFIG, commands=replace(DEFAULT_CONFIG.commands, update_ca_file={str(files.ca)!r}))
        a = Agent({str(ota.board.data_dir)!r}, KeySource(kek=bytes(range(32))), config=c)
        a.apply_commands(open({str(tmp_path / 'cmd.bin')!r}, 'rb').read())
    """)
    root = str(Path(__file__).resolve().parents[1])
    p = subprocess.Popen([sys.executable, "-c", script], env=os.environ | {"PYTHONPATH": root})
    staging = ota.board.data_dir / layout.UPDATE_STAGING
    try:
        while not (files.requests and staging.exists()) and p.poll() is None:
            time.sleep(0.05)
    finally:
        p.kill()
        p.wait()
    assert staging.exists(), "the download was not under way when the agent was killed"
    ota.agent()  # the board starts again
    assert not staging.exists() and not (ota.board.data_dir / layout.UPDATE_PAYLOAD).exists()


def test_a_download_in_progress_keeps_its_staging_file_when_another_agent_starts(
    ota: OtaBoard, files: FileServer, pack_for: Callable[..., Path], digits: Any,
) -> None:
    upd, now = _digits_v2_update(ota, files, pack_for, digits, "stall")
    agent, results = _worker_board(ota, update_deadline_s=4.0, update_read_s=4.0)
    agent.apply_commands(encode_queue([upd]), _collect(ota, results))
    staging = ota.board.data_dir / layout.UPDATE_STAGING
    while not (files.requests and staging.exists()) and agent.updater.busy:
        time.sleep(0.05)
    ota.agent().status()  # ``edgeward-agent status`` while serve downloads
    assert staging.exists()
    assert agent.updater.idle.wait(60)  # the stalled download ends at its deadline
    assert [(r.seq, r.outcome) for r in results] == [(1, "refused")] and "did not finish" in results[0].detail
    assert not staging.exists() and ota.serving() == 1


def test_a_cancel_arriving_just_after_the_install_committed_finds_the_update_carried_out(
    ota: OtaBoard, files: FileServer, pack_for: Callable[..., Path], digits: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from device_agent import agent as agent_mod

    upd, now = _digits_v2_update(ota, files, pack_for, digits)
    agent, results = _worker_board(ota, update_deadline_s=60.0, update_read_s=20.0)
    cancel = ota.operator.sign("cancel", DEVICE, 2, now, seq=1)
    real = agent_mod.Agent._install

    def then_cancel(self: Agent, *a: Any, **k: Any) -> Any:
        out = real(self, *a, **k)
        # The fleet's queue, with the cancel behind the update, arrives the moment the install's
        # commit releases the data-dir lock.
        self.apply_commands(encode_queue([upd, cancel]), _collect(ota, results))
        return out

    monkeypatch.setattr(agent_mod.Agent, "_install", then_cancel)
    agent.apply_commands(encode_queue([upd]), _collect(ota, results))
    assert agent.updater.idle.wait(60)
    # The signed results tell the truth: the update was installed, the cancel came too late.
    assert [(r.seq, r.kind, r.outcome) for r in results] == [(1, "update", "applied"), (2, "cancel", "refused")]
    assert "already carried out" in results[1].detail
    assert ota.serving() == 2 and agent.state().command_seq == 1


@pytest.mark.parametrize("how", ["wipe-during-download", "decommission-during-verify"])
def test_a_board_wiped_while_an_update_is_in_hand_keeps_nothing_but_the_attestation(
    how: str, ota: OtaBoard, files: FileServer, pack_for: Callable[..., Path], digits: Any,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    from device_agent import agent as agent_mod

    upd, now = _digits_v2_update(ota, files, pack_for, digits)
    agent, results = _worker_board(ota, update_deadline_s=60.0, update_read_s=20.0)
    if how == "wipe-during-download":
        files.behaviours[f"{DEVICE}.ewb"] = "slow-start"
    else:
        real = agent_mod.Agent._install
        dec = ota.operator.sign("decommission", DEVICE, 2, now)

        def decommission_first(self: Agent, *a: Any, **k: Any) -> Any:
            # The payload verified; a decommission arrives before the install takes the lock.
            self.apply_commands(encode_queue([upd, dec]), _collect(ota, results))
            return real(self, *a, **k)

        monkeypatch.setattr(agent_mod.Agent, "_install", decommission_first)
    agent.apply_commands(encode_queue([upd]), _collect(ota, results))
    if how == "wipe-during-download":
        while not files.requests:
            time.sleep(0.05)
        ota.agent().wipe()  # ``edgeward-agent wipe`` from another process
    assert agent.updater.idle.wait(60)
    assert sorted(p.name for p in ota.board.data_dir.iterdir()) == ["wipe-attestation.json"]
    assert all(r.outcome != "refused" for r in results)
    assert not [r for r in caplog.records if r.levelno >= 30], "the worker reported the wipe as a failure"


def test_a_retire_of_another_model_waits_for_the_update_and_does_not_end_it(
    ota: OtaBoard, files: FileServer, pack_for: Callable[..., Path], digits: Any,
) -> None:
    upd, now = _digits_v2_update(ota, files, pack_for, digits, "slow-start")
    agent, results = _worker_board(ota, update_deadline_s=60.0, update_read_s=20.0)
    ret = ota.operator.sign("retire", DEVICE, 2, now, model_id="some-other-model")
    agent.apply_commands(encode_queue([upd, ret]), _collect(ota, results))
    assert agent.updater.idle.wait(60)
    assert [(r.seq, r.kind, r.outcome) for r in results] == [(1, "update", "applied"), (2, "retire", "applied")]
    assert ota.serving() == 2 and agent.state().command_seq == 2


def test_staging_files_held_elsewhere_leave_the_update_to_a_later_delivery(
    ota: OtaBoard, files: FileServer, pack_for: Callable[..., Path], digits: Any,
) -> None:
    import fcntl

    from device_agent.errors import UsageError

    url, length, sha = publish(files, pack_for(digits.onnx, [ota.board], 2) / f"{DEVICE}.ewb")
    staging = ota.board.data_dir / layout.UPDATE_STAGING
    fd = os.open(staging, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another update holds the staging file
        with pytest.raises(UsageError, match="tried again"):
            ota.update(url, length, sha)
        assert ota.agent().state().command_seq == 0  # the number is not consumed: nothing was decided
    finally:
        os.close(fd)
    ota.seq = 0
    assert ota.update(url, length, sha).outcome == "applied" and ota.serving() == 2


def test_removing_stale_staging_files_never_makes_a_live_update_fail(ota: OtaBoard, tmp_path: Path) -> None:
    # Every agent that starts (``edgeward-agent status`` while ``serve`` downloads) removes stale
    # staging files; its brief lock on one must never look like another update in progress.
    stop = tmp_path / "stop"
    script = textwrap.dedent(f"""
        import os
        from device_agent.store.datadir import DataDir
        d = DataDir({str(ota.board.data_dir)!r})
        passes = 0
        while not os.path.exists({str(stop)!r}):
            open(d.layout.path("update.part"), "ab").close()
            d.remove_stale_staging()
            passes += 1
            if passes == 1:
                print("ready", flush=True)
        print(passes)
    """)
    root = str(Path(__file__).resolve().parents[1])
    p = subprocess.Popen([sys.executable, "-c", script], env=os.environ | {"PYTHONPATH": root},
                         stdout=subprocess.PIPE, text=True)
    agent = ota.agent()
    failures = []
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for _ in range(1000):
            try:
                with agent.store.staging_held():
                    pass
            except Exception as e:
                failures.append(e)
    finally:
        stop.touch()
        out, _ = p.communicate()
    assert int(out) > 1 and failures == []


@pytest.mark.parametrize("entry", ["fifo", "empty-dir", "full-dir"])
def test_an_odd_entry_at_the_staging_path_never_hangs_or_crashes_the_agent(ota: OtaBoard, entry: str) -> None:
    from device_agent.errors import UsageError

    staging = ota.board.data_dir / layout.UPDATE_STAGING
    if entry == "fifo":
        os.mkfifo(staging)
    else:
        staging.mkdir()
        if entry == "full-dir":
            (staging / "x").write_bytes(b"x")
    if entry == "full-dir":
        with pytest.raises(UsageError, match="is a directory.*move it out"):
            ota.agent()
        assert staging.is_dir()
    else:
        assert ota.agent().status() and not os.path.lexists(staging)


# --- the arguments, strictly ---------------------------------------------------------------------

GOOD = {"release_id": "r1", "model_id": "digits", "model_version": 2,
        "bundle": {"url": "https://files.example.net/rel/pi-1.ewb", "length": 1000, "sha256": "a" * 64}}


@pytest.mark.parametrize("url", [
    "http://files.example.net/pi-1.ewb",  # not TLS
    "https://user:pw@files.example.net/pi-1.ewb",  # credentials in a signed command
    "https://files.example.net/pi-1.ewb#frag",
    "https://files.example.net",  # no file
    "https:///pi-1.ewb",  # no host
    "https://files.example.net:99999/pi-1.ewb",
    "https://files.example.net/pi 1.ewb",
    "https://files.example.net/pi-1.ewb\n",
    "file:///etc/passwd",
    "https://files.example.net/" + "a" * 2100,
])
def test_update_addresses_other_than_plain_https_are_refused(url: str) -> None:
    with pytest.raises(FormatError):
        update_args(GOOD | {"bundle": GOOD["bundle"] | {"url": url}}, LIMITS)


@pytest.mark.parametrize("change", [
    {"length": 0}, {"length": MAX + 1}, {"length": "10"}, {"length": True}, {"sha256": "A" * 64},
    {"sha256": "a" * 63}, {"extra": 1},
])
def test_update_lengths_and_digests_are_bounded_and_strict(change: dict[str, Any]) -> None:
    with pytest.raises(FormatError):
        update_args(GOOD | {"bundle": GOOD["bundle"] | change}, LIMITS)


def test_a_signed_update_round_trips_and_unknown_fields_are_refused() -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    cmd = Command("update", "pi-1", 1, now, now.replace(year=now.year + 1), GOOD)
    assert cmd.args == GOOD
    with pytest.raises(FormatError):
        update_args(GOOD | {"note": "x"}, LIMITS)
    with pytest.raises(FormatError):
        update_args({k: v for k, v in GOOD.items() if k != "bundle"}, LIMITS)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=40),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=5),
    max_leaves=20,
)
_url = st.one_of(st.text(max_size=80), st.builds(lambda s: "https://" + s, st.text(max_size=60)))
_artifact = st.fixed_dictionaries({"url": _url, "length": st.integers(-5, MAX + 5) | _json,
                                   "sha256": st.text("0123456789abcdefABCDEF", min_size=60, max_size=66) | _json})


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    _json,
    st.fixed_dictionaries({"release_id": st.text(max_size=70) | _json, "model_id": st.text(max_size=10),
                           "model_version": st.integers(-3, 2**54) | _json, "bundle": _artifact | _json},
                          optional={"payload": _artifact | _json, "x": _json}),
))
def test_fuzzed_update_arguments_are_refused_cleanly_or_parsed_to_a_fixed_point(raw: Any) -> None:
    try:
        parsed = update_args(raw, LIMITS)
    except FormatError:
        return
    assert update_args(json.loads(json.dumps(parsed)), LIMITS) == parsed
    assert parsed["bundle"]["url"].startswith("https://") and 1 <= parsed["bundle"]["length"] <= MAX
