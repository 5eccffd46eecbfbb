"""The agent as a service on a board: the systemd unit shipped in deploy/systemd/ passes
``systemd-analyze verify`` and keeps its hardening, and the socket it serves in its runtime
directory reaches the client applications' group and no other user (docs/raspberry-pi.md)."""

from __future__ import annotations

import grp
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from device_agent.cli import main as agent_main
from device_agent.service.cli import default_socket

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "edgeward-agent.service"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def _analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    return exe


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.fullmatch(r"([A-Za-z]+)=(.*)", line.strip())
        if m:
            out.setdefault(m[1], []).append(m[2])
    return out


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = _analyze()
    # A root of its own: the unit as installed, the ExecStart it names, and the system's units
    # (sysinit.target and friends), so that nothing on this machine is touched.
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    exe = root / "opt/edgeward/bin/edgeward-agent"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    r = subprocess.run([analyze, "verify", f"--root={root}", f"/etc/systemd/system/{UNIT.name}"],
                       capture_output=True, text=True, timeout=60, check=False)
    # verify exits 0 even for a value it ignores: any output at all is a defect.
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr


def test_the_unit_keeps_its_hardening() -> None:
    d = _directives(UNIT.read_text())
    want = {
        "User": "edgeward", "Group": "edgeward-api", "StateDirectory": "edgeward", "StateDirectoryMode": "0700",
        "RuntimeDirectory": "edgeward", "RuntimeDirectoryMode": "0750", "ProtectSystem": "strict",
        "NoNewPrivileges": "yes", "Restart": "on-failure", "UMask": "0077", "LimitCORE": "0",
        "PrivateTmp": "yes", "ProtectHome": "yes", "CapabilityBoundingSet": "",
    }
    for k, v in want.items():
        assert d.get(k) == [v], f"{k}={d.get(k)}, expected {v}"
    assert d["LoadCredential"] == ["kek:/etc/edgeward/kek.bin"]
    assert d["Environment"] == ["EDGEWARD_DEVICE_KEK_FILE=%d/kek"]
    assert d["ExecStart"] == ["/opt/edgeward/bin/edgeward-agent serve --data-dir /var/lib/edgeward"]
    r = subprocess.run([_analyze(), "security", "--offline=yes", str(UNIT)], capture_output=True, text=True,
                       timeout=60, check=False)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m[1]) <= 2.0, f"systemd-analyze security rates the unit {m[1]} (was 1.5)"


def test_the_default_socket_is_in_the_runtime_directory_and_never_in_a_shared_one(tmp_path: Path) -> None:
    data_sock = tmp_path / "data" / "agent.sock"
    assert default_socket(data_sock, {}) == data_sock
    run = tmp_path / "run"
    run.mkdir(mode=0o750)
    run.chmod(0o750)
    assert default_socket(data_sock, {"RUNTIME_DIRECTORY": f"{run}:/elsewhere"}) == run / "agent.sock"
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    from device_agent.errors import UsageError

    with pytest.raises(UsageError, match="writable by every user"):
        default_socket(data_sock, {"RUNTIME_DIRECTORY": str(shared)})
    with pytest.raises(UsageError, match="cannot be used"):
        default_socket(data_sock, {"RUNTIME_DIRECTORY": str(tmp_path / "missing")})


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


@pytest.fixture
def accounts() -> object:
    """A system group for the client applications, one user in it and one outside it."""
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("groupadd", "useradd", "userdel", "runuser", "curl")):
        pytest.skip("needs root with groupadd/useradd/runuser and curl (the CI runs the tests as root)")
    tag = secrets.token_hex(3)
    group, member, outsider = f"ewapi{tag}", f"ewapp{tag}", f"ewout{tag}"
    nologin = "/usr/sbin/nologin"
    _sh("groupadd", "--system", group)
    try:
        _sh("useradd", "--system", "-M", "-s", nologin, "-G", group, member)
        _sh("useradd", "--system", "-M", "-s", nologin, outsider)
        yield group, member, outsider
    finally:
        for u in (member, outsider):
            subprocess.run(["userdel", u], capture_output=True, check=False)
        subprocess.run(["groupdel", group], capture_output=True, check=False)


def test_only_the_api_group_can_query_the_socket_in_the_runtime_directory(
    accounts, digits, digits_test, make_board, pack_for, monkeypatch, capsys
) -> None:
    from tests.fixtures.serve import wait_until_serving

    group, member, outsider = accounts  # type: ignore[misc]
    gid = grp.getgrnam(group).gr_gid
    board = make_board()
    out = pack_for(digits.onnx, [board], version=1)
    pw = board.keys.passphrase.decode()
    monkeypatch.setenv("EDGEWARD_DEVICE_PASSPHRASE", pw)
    d = str(board.data_dir)
    assert agent_main(["install", str(out / "pi-001.ewb"), "--data-dir", d]) == 0
    capsys.readouterr()
    assert agent_main(["token", "add", "--data-dir", d, "--role", "user", "--json"]) == 0
    token = json.loads(capsys.readouterr().out)["token"]
    # What systemd makes for the unit: /run/edgeward, 0750, owned by the service and its group.
    run = Path(tempfile.mkdtemp(prefix="edgeward-run-"))
    try:
        os.chown(run, 0, gid)
        run.chmod(0o750)
        env = {**os.environ, "RUNTIME_DIRECTORY": str(run), "PYTHONPATH": str(ROOT), "EDGEWARD_DEVICE_PASSPHRASE": pw}
        proc = subprocess.Popen([sys.executable, "-m", "device_agent.cli", "serve", "--data-dir", d], env=env,
                                group=gid, extra_groups=[], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            sock = run / "agent.sock"
            wait_until_serving(sock)
            st = sock.stat()
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid
            assert not (board.data_dir / "agent.sock").exists()
            body = json.dumps({"inputs": [np.asarray(digits_test[0][0], dtype=float).tolist()]})

            def query(user: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    ["runuser", "-u", user, "--", "curl", "-sS", "--unix-socket", str(sock),
                     "-H", f"Authorization: Bearer {token}", "-H", "Content-Type: application/json",
                     "-d", body, "http://agent/v1/predict"],
                    capture_output=True, text=True, timeout=60, check=False)

            def enters(user: str) -> bool:
                return subprocess.run(["runuser", "-u", user, "--", "test", "-x", str(run)],
                                      capture_output=True, timeout=60, check=False).returncode == 0

            ok = query(member)
            answer = json.loads(ok.stdout)["predictions"][0]
            assert ok.returncode == 0 and set(answer) == {"label"}, ok.stdout + ok.stderr
            refused = query(outsider)
            # curl's 7: it could not connect; the directory is closed to the outsider, not to the member.
            assert refused.returncode == 7 and refused.stdout == "", refused.stderr
            assert enters(member) and not enters(outsider)
            assert query(member).returncode == 0  # and the service kept serving
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert f"serving on {run / 'agent.sock'}" in err
    finally:
        shutil.rmtree(run, ignore_errors=True)
