"""Attacks on the command channel (``device_agent/commands``): forged, tampered, replayed, stale,
future-dated, misdirected and out-of-order commands, and endless command files. Each is handed
to ``edgeward-agent command FILE`` as a technician would; each exits with its code, names what
was wrong, and changes nothing but the event log. Delivery over a real broker is covered by
``tests/test_commands_broker.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from device_agent.commands.format import encode_queue, verify_result
from tests.adversarial.conftest import Target
from tests.fixtures.trusted import Operator, day, refused_cli


def _file(tmp_path: Path, name: str, data: bytes) -> str:
    (tmp_path / name).write_bytes(data)
    return str(tmp_path / name)


def test_forged_tampered_replayed_stale_and_out_of_order_commands_change_nothing(
    target: Target, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target.install(1)
    op, me = target.operator, target.device_id
    result = str(tmp_path / "result.ewr")

    def command(name: str, payload: bytes, code: int, why: str) -> None:
        refused_cli(capsys, target.data_dir, target.cli("command", _file(tmp_path, name, payload), "--result", result),
                    code, why)
        assert not Path(result).exists()  # no signed result for a refused command

    assert target.agent().apply_commands(op.sign("retire", me, 3, model_id="not-installed"))  # #3 applied
    tampered = bytearray(op.sign("decommission", me, 4))
    tampered[-5] ^= 1
    command("forged", Operator().sign("decommission", me, 4), 1, "signed by")
    command("tampered", bytes(tampered), 1, "signature")
    command("replayed", op.sign("retire", me, 3, model_id="not-installed"), 1, "not above #3")
    command("out of order", op.sign("decommission", me, 2), 1, "#2 is not above #3.*out of order")
    command("stale", op.sign("decommission", me, 4, issued=day(-40), days=30), 1, "expired at")
    command("future-dated", op.sign("decommission", me, 4, issued=day(3)), 1, "ahead of the board's time")
    command("misdirected", op.sign("decommission", "pi-002", 4), 1, "for device 'pi-002'")
    command("by the recovery key", target.recovery.sign("decommission", me, 4), 1, "operator key")
    assert target.agent().status()["models"][0]["version"] == 1  # still serving


def test_a_queue_delivered_out_of_order_is_applied_in_sequence_once(target: Target) -> None:
    """A broker may deliver a board's queue reordered and more than once: the board applies it
    in sequence order, once; a redelivery applies nothing."""
    target.install(1, model_id="kws")
    target.install(1, model_id="vad")
    op, me = target.operator, target.device_id
    queue = encode_queue([op.sign("retire", me, 2, model_id="vad"), op.sign("retire", me, 1, model_id="kws")])
    agent = target.agent()
    results = [verify_result(r, agent.store.identity().sign_public) for r in agent.apply_commands(queue)]
    assert [(r.seq, r.outcome) for r in results] == [(1, "applied"), (2, "applied")]
    assert target.agent().apply_commands(queue) == []
    assert target.agent().state().command_seq == 2


@pytest.mark.parametrize("source", ["endless device", "huge sparse file", "fifo"])
def test_an_endless_or_stalled_command_file_is_refused_at_once(
    target: Target, tmp_path: Path, capsys: pytest.CaptureFixture[str], source: str
) -> None:
    target.install(1)
    fd = None
    if source == "endless device":
        path = "/dev/zero"
    elif source == "huge sparse file":
        path = str(tmp_path / "huge.cmd")
        Path(path).write_bytes(target.operator.sign("decommission", target.device_id, 1))
        os.truncate(path, 2**30)
    else:
        path = str(tmp_path / "stalled.cmd")
        os.mkfifo(path)
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)  # a writer that sends the start and stalls
        os.write(fd, target.operator.sign("decommission", target.device_id, 1)[:40])
    try:
        refused_cli(capsys, target.data_dir, target.cli("command", path, "--result", str(tmp_path / "r")), 3,
                    "not a regular file|larger than|exceeds|over")
    finally:
        if fd is not None:
            os.close(fd)
