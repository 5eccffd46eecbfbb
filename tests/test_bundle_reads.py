"""Bundles are read in bounded steps (docs/bundle-format.md, "Verification order"): the header,
then the signed head, then the length against the verified manifest, and only then the payload.
Anything that is not a regular file is refused before a byte is read.

Each command runs in its own process, so that its peak memory (``VmHWM``) and a hang can be
measured: a board has 512 MB of RAM, and a FIFO with no writer must not block ``install``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from device_agent import Agent
from device_agent.store.keys import KeySource

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3
MB = 1024**2
PEAK_GROWTH = 64 * MB  # far below the 1 GiB a whole-file read would cost

# Runs one CLI in-process after its imports, and reports the growth of the process's peak RSS.
PROBE = r"""
import json, sys

def hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM")

import device_agent.agent, device_agent.cli, packager.cli  # imports are not what is measured
main = device_agent.cli.main if sys.argv[1] == "agent" else packager.cli.main
before = hwm()
code = main(sys.argv[2:])
print(json.dumps({"code": code, "growth": hwm() - before}), file=sys.stderr)
sys.exit(code)
"""


def probe(which: str, *argv: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str, int]:
    """(exit code, stdout and stderr without the probe's line, peak RSS growth in bytes)."""
    e = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", PROBE, which, *argv], env=e, capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    *lines, last = r.stderr.rstrip("\n").split("\n")
    report = json.loads(last)
    assert report["code"] == r.returncode
    return r.returncode, r.stdout + "\n".join(lines), report["growth"]


@pytest.fixture
def kek_board(tmp_path: Path, publisher: Path) -> tuple[Path, dict[str, str]]:
    """A board unlocked by a key file (no Argon2 run, whose 64 MiB would blur the measurement);
    returns its data dir and the environment that unlocks it."""
    from device_agent.bundle.keyfiles import load_public_key_file

    kek = os.urandom(32)
    (tmp_path / "kek.bin").write_bytes(kek)
    d = tmp_path / "board"
    enrolment = tmp_path / "pi-001.json"
    enrolment.write_bytes(
        Agent.provision(d, "pi-001", [load_public_key_file(publisher / "publisher.pub")], [], KeySource(kek=kek))
    )
    return d, {"EDGEWARD_DEVICE_KEK_FILE": str(tmp_path / "kek.bin")}


def sparse(path: Path, prefix: bytes, extra: int) -> Path:
    """``prefix`` followed by ``extra`` bytes of hole: no disk cost, but a whole read costs RAM."""
    path.write_bytes(prefix)
    os.truncate(path, len(prefix) + extra)
    return path


def test_a_1gib_file_with_a_wrong_magic_is_refused_without_reading_it(tmp_path, kek_board):
    d, env = kek_board
    bad = sparse(tmp_path / "huge.ewb", b"NOTABNDL" + bytes(56), GIB)
    for which, argv in (("agent", ["install", str(bad), "--data-dir", str(d)]), ("host", ["inspect", str(bad)])):
        t0 = time.monotonic()
        code, err, growth = probe(which, *argv, env=env)
        assert code == 3 and "bad magic" in err, (which, err)
        assert growth < PEAK_GROWTH, f"{which}: peak RSS grew by {growth // MB} MB"
        assert time.monotonic() - t0 < 30


def test_a_signed_head_with_a_1gib_tail_is_refused_before_the_tail_is_read(
    tmp_path, kek_board, digits, pack_for, publisher
):
    from tests.conftest import Board

    d, env = kek_board
    board = Board(d, tmp_path / "pi-001.json", "pi-001", KeySource(kek=(tmp_path / "kek.bin").read_bytes()))
    bundle = (pack_for(digits.onnx, [board]) / "pi-001.ewb").read_bytes()
    long = sparse(tmp_path / "long.ewb", bundle, GIB)
    code, err, growth = probe("agent", "install", str(long), "--data-dir", str(d), env=env)
    assert code == 3 and "appended" in err, err
    assert growth < PEAK_GROWTH, f"install: peak RSS grew by {growth // MB} MB"
    code, err, growth = probe("host", "inspect", str(long), "--publisher-pub", str(publisher / "publisher.pub"),
                              "--json")
    assert code == 3 and json.loads(err)["verified"] is False and "appended" in json.loads(err)["error"], err
    assert growth < PEAK_GROWTH, f"inspect: peak RSS grew by {growth // MB} MB"
    # A file cut short of what the signed manifest declares is refused the same way.
    (tmp_path / "short.ewb").write_bytes(bundle[:-1])
    code, err, _ = probe("agent", "install", str(tmp_path / "short.ewb"), "--data-dir", str(d), env=env)
    assert code == 3 and "truncated" in err
    assert not list((d / "bundles").glob("*.ewb")) if (d / "bundles").exists() else True
    # And the bundle itself, exactly as long as declared, still installs from its file.
    (tmp_path / "ok.ewb").write_bytes(bundle)
    code, err, _ = probe("agent", "install", str(tmp_path / "ok.ewb"), "--data-dir", str(d), env=env)
    assert code == 0, err


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_a_path_that_is_not_a_regular_file_is_refused_at_once(tmp_path, kek_board, publisher, kind):
    d, env = kek_board
    if kind == "fifo":
        path = tmp_path / "pipe.ewb"
        os.mkfifo(path)  # no writer, ever: a blocking open or read would hang
        name = "FIFO"
    elif kind == "device":
        path = Path("/dev/zero")  # endless, and st_size says 0
        name = "device"
    else:
        path = tmp_path / "dir.ewb"
        path.mkdir()
        name = "directory"
    runs = (
        ("agent", ["install", str(path), "--data-dir", str(d)]),
        ("host", ["inspect", str(path)]),
        ("host", ["inspect", str(path), "--publisher-pub", str(publisher / "publisher.pub")]),
    )
    for which, argv in runs:
        t0 = time.monotonic()
        try:
            code, err, _ = probe(which, *argv, env=env, timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{which} {argv[0]} hung on a {kind}")
        assert time.monotonic() - t0 < 10
        assert code == 2, (which, code, err)
        assert str(path) in err and name in err and "not a regular file" in err, err
        assert err.strip().count("\n") == 0, err  # one line, no traceback


def test_install_reads_a_bundle_file_into_one_buffer_and_serves_it(make_board, pack_for, digits, digits_test,
                                                                    monkeypatch):
    """The payload is read once, into a bytearray exactly the file's size, and decrypted there."""
    from device_agent.bundle import reading

    board = make_board()
    path = pack_for(digits.onnx, [board]) / f"{board.device_id}.ewb"
    buffers: list[bytearray] = []
    real = reading.BundleFile.verify

    def spy(self, *a, **kw):
        buf, vb = real(self, *a, **kw)
        buffers.append(buf)
        return buf, vb

    monkeypatch.setattr(reading.BundleFile, "verify", spy)
    agent = board.agent()
    m = agent.install_file(path)
    assert (m.model_id, m.model_version) == ("digits", 1)
    assert len(buffers) == 1 and isinstance(buffers[0], bytearray)
    assert len(buffers[0]) == path.stat().st_size
    assert buffers[0] != path.read_bytes()  # decrypted in place, then wiped: the ciphertext is gone
    x, y = digits_test
    assert "label" in agent.predict(x[0]) or "predictions" in agent.predict(x[0])
