"""The durable outbox: sequence numbers, delete-after-PUBACK, the full policy, crash safety."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from device_agent.telemetry.outbox import HEARTBEAT, INFO_EVENT, SECURITY_EVENT, Item, Outbox
from device_agent.telemetry.report import NO_PREV, payload_digest


def item(priority: int, name: str = "t") -> Item:
    return Item(priority, lambda seq, prev: (name, f"{name}:{seq}".encode()))


def chained(name: str, prevs: list[bytes]) -> Item:
    """An item whose payload records the predecessor digest the outbox handed it."""

    def build(seq: int, prev: bytes) -> tuple[str, bytes]:
        prevs.append(prev)
        return name, f"{name}:{seq}".encode()

    return Item(INFO_EVENT, build)


def test_sequence_numbers_only_move_forward_across_restarts(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", 100)
    assert box.add([item(HEARTBEAT), item(HEARTBEAT)]) == [1, 2]
    assert box.reserve_seq()[0] == 3
    box.acked([1, 2])
    box.close()
    box = Outbox(tmp_path / "o.db", 100)
    assert box.add([item(HEARTBEAT)]) == [4]  # never reused, even after deletes and a reopen
    assert [p.payload for p in box.pending(0, 10)] == [b"t:4"]


def test_each_report_names_its_predecessor_across_restarts_and_wills_do_not_move_the_chain(
    tmp_path: Path,
) -> None:
    prevs: list[bytes] = []
    box = Outbox(tmp_path / "o.db", 100)
    box.add([chained("a", prevs), chained("b", prevs)])
    assert prevs == [NO_PREV, payload_digest(b"a:1")]
    assert box.reserve_seq() == (3, payload_digest(b"b:2"))  # the will names the head...

    def failing(seq: int, prev: bytes) -> tuple[str, bytes]:
        raise RuntimeError("signing failed")

    with pytest.raises(RuntimeError):
        box.add([chained("lost", prevs), Item(INFO_EVENT, failing)])
    box.close()
    box = Outbox(tmp_path / "o.db", 100)
    box.add([chained("c", prevs)])
    # ...but does not become it, and a rolled-back add leaves it where it was.
    assert prevs[-1] == payload_digest(b"b:2")


def test_reports_stay_until_acknowledged(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", 100)
    box.add([item(INFO_EVENT, "a"), item(INFO_EVENT, "b"), item(INFO_EVENT, "c")])
    assert [p.seq for p in box.pending(0, 2)] == [1, 2]
    assert [p.seq for p in box.pending(2, 10)] == [3]
    box.acked([2])
    assert [p.seq for p in box.pending(0, 10)] == [1, 3]
    assert box.stats() == {"queued": 2, "dropped": 0, "capacity": 100}


def test_full_outbox_drops_heartbeats_first_and_security_events_last(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", 3)
    box.add([item(SECURITY_EVENT, "s1"), item(HEARTBEAT, "h"), item(INFO_EVENT, "i")])
    box.add([item(SECURITY_EVENT, "s2")])  # drops the heartbeat
    assert [p.topic for p in box.pending(0, 10)] == ["s1", "i", "s2"]
    box.add([item(SECURITY_EVENT, "s3")])  # then the informational event
    assert [p.topic for p in box.pending(0, 10)] == ["s1", "s2", "s3"]
    box.add([item(HEARTBEAT, "h2")])  # below everything queued: the new report is dropped
    box.add([item(SECURITY_EVENT, "s4")])  # only security events left: the oldest goes
    assert [p.topic for p in box.pending(0, 10)] == ["s2", "s3", "s4"]
    assert box.stats()["dropped"] == 4


def test_cursor_moves_in_the_same_transaction_as_the_reports(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", 100)

    def failing(seq: int, prev: bytes) -> tuple[str, bytes]:
        raise RuntimeError("signing failed")

    with pytest.raises(RuntimeError):
        box.add([item(INFO_EVENT), Item(INFO_EVENT, failing)], cursor=("events_cursor", 7))
    assert box.cursor("events_cursor") == 0 and box.pending(0, 10) == []  # all or nothing
    box.add([item(INFO_EVENT)], cursor=("events_cursor", 7))
    assert box.cursor("events_cursor") == 7


def test_a_committed_report_survives_sigkill(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import os, signal
        from device_agent.telemetry.outbox import Item, Outbox
        box = Outbox({str(tmp_path / "o.db")!r}, 100)
        box.add([Item(2, lambda s, p: ("t", b"kept"))], cursor=("events_cursor", 1))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    root = Path(__file__).parent.parent
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=os.environ, check=False)
    assert proc.returncode == -9
    box = Outbox(tmp_path / "o.db", 100)
    assert [p.payload for p in box.pending(0, 10)] == [b"kept"]
    assert box.cursor("events_cursor") == 1
