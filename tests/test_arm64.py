"""The real board agent on aarch64: scripts/arm64-check.sh under QEMU user-mode emulation.

scripts/test.sh runs the check as its own step (the end-to-end check, then the agent's own tests
inside the emulated Python) and deselects this wrapper, which is for pytest-only runs: it is
slow (the end-to-end check takes about 100 s the first time, while it builds .arm64-root/, then
about 80 s, of which the offline install from a wheelhouse takes about 40 s; the quick set of
agent tests a few minutes more) and needs a Debian host where it can run apt-get as root the
first time, so it runs with EDGEWARD_SLOW=1. docs/arm64.md says what it checks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "arm64-check.sh"


@pytest.mark.slow
def test_agent_runs_on_arm64_under_emulation() -> None:
    if not sys.platform.startswith("linux") or shutil.which("apt-get") is None:
        pytest.skip("the arm64 check needs a Debian/Ubuntu host (apt-get, dpkg, qemu-user-static)")
    env = {**os.environ, "CI": "true"}
    # The script uses the project's .venv; the interpreter running pytest must not leak into it.
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        ["bash", str(SCRIPT)],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=1800,
        check=False,
    )
    tail = "\n".join(proc.stdout.splitlines()[-60:])
    assert proc.returncode == 0, f"scripts/arm64-check.sh exited {proc.returncode}:\n{tail}"
    lines = proc.stdout.rstrip().splitlines()
    assert lines and lines[-1] == "arm64 check: PASS", tail
    assert "batch labels identical to host onnxruntime" in proc.stdout, tail
    assert "exit code 1:" in proc.stdout, tail
    # The README's install path: a wheelhouse, an offline pip install on the board, --version, a prediction.
    assert "ok   edgeward-agent " in proc.stdout and "installed edgeward-agent predict -> {" in proc.stdout, tail
    assert "the agent's own tests (quick) pass on aarch64" in proc.stdout, tail
