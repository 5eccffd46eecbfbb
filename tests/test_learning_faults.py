"""SIGKILL during a local learning cycle: whatever the instant, the board then serves either the
old local version or the new one, never neither, and its files stay within the layout.

The cycle runs in a child process that kills itself with SIGKILL just before or just after the
N-th file write, fsync or rename it makes (every durable step of the cycle: the feedback store,
the version file, the update log, the learning state, the clean-up), for every N. The children
are forked from a helper process that has imported everything but never made a runtime session,
so a trial costs one cycle, not one interpreter start. 50 trials run by default; EDGEWARD_SLOW=1
runs 200, with each point taken before and after, several times over.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent import Agent
from device_agent.learning.cycle import Learning
from device_agent.learning.store import LearningStore, verify_log
from device_agent.store.keys import KeySource
from tests.conftest import Board
from tests.fixtures.learning import drift, scenario
from tests.fixtures.serve import calibration_policy

ROOT = Path(__file__).parent.parent
KEK = bytes(range(32))
T0 = datetime(2030, 1, 1, tzinfo=UTC)

# Runs one cycle's learning (features, filters, refit, gate) once and keeps what it would commit;
# then, per line N read, puts the data dir back as it was, forks, and in the child commits with a
# SIGKILL just before (odd N) or just after (even N) the ((N + 1) // 2)-th durable file operation
# (N = 0 never kills and reports how many operations the commit made). Every durable write of a
# cycle happens in its commit: a kill before it leaves nothing changed. The child touches no
# runtime session, so forking after the learning ran is safe.
ZYGOTE = textwrap.dedent(
    """
    import json, os, shutil, signal, sys
    from datetime import datetime
    from device_agent import Agent
    from device_agent.learning.cycle import Learning
    from device_agent.store.keys import KeySource
    data_dir, template, when = sys.argv[1:4]
    agent = Agent(data_dir, KeySource(kek=bytes(range(32))))
    learning = Learning(agent)
    commit, kept = Learning._commit, []
    Learning._commit = lambda self, *a, **k: kept.append((a, k))
    learning.cycle(datetime.fromisoformat(when))
    Learning._commit = commit
    agent._key()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        n = int(line)
        shutil.rmtree(data_dir)
        shutil.copytree(template, data_dir)
        pid = os.fork()
        if pid == 0:
            count = [0]
            def wrap(fn):
                def inner(*a, **k):
                    count[0] += 1
                    if count[0] * 2 - 1 == n:
                        os.kill(os.getpid(), signal.SIGKILL)
                    out = fn(*a, **k)
                    if count[0] * 2 == n:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return out
                return inner
            for name in ("write", "fsync", "replace", "unlink", "pwrite"):
                setattr(os, name, wrap(getattr(os, name)))
            (a, k), = kept
            commit(learning, *a, **k)
            sys.stdout.write(json.dumps({"ops": count[0], "accepted": a[-2]["accepted"]}) + "\\n")
            sys.stdout.flush()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            print(json.dumps({"killed": os.WTERMSIG(status)}), flush=True)
        elif os.WEXITSTATUS(status):
            print(json.dumps({"failed": os.WEXITSTATUS(status)}), flush=True)
    """
)


class Zygote:
    def __init__(self, data_dir: Path, template: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(data_dir), str(template), T0.isoformat()],
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert self.answer() == {"ready": True}

    def run(self, n: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return self.answer()

    def answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the trial helper died"
        return dict(json.loads(line))

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


@pytest.fixture
def template(make_board: Callable[..., Board], pack_for: Callable[..., Path], digits: Any, tmp_path: Path
             ) -> tuple[Board, np.ndarray]:
    """A board serving local version 1, with more feedback waiting: the next cycle makes version 2."""
    sc = scenario(0)
    board = make_board("pi-kill", KeySource(kek=KEK))
    data = sc.learning_data(tmp_path / "learning.npz")
    out = pack_for(digits.onnx, [board], policy=calibration_policy(),
                   learnable=(data, {"bounds": {"steps": 300, "learning_rate": 0.5}}))
    agent = board.agent()
    agent.install_file(out / "pi-kill.ewb")
    learning = Learning(agent)
    for s, (x, y) in sc.feedback().items():
        learning.intake(agent.model(), x[: len(x) // 2], y[: len(y) // 2], f"token:{s}", T0)
    assert learning.cycle(T0)["local_version"] == 1
    for s, (x, y) in sc.feedback().items():
        learning.intake(agent.model(), x[len(x) // 2 :], y[len(y) // 2 :], f"token:{s}", T0)
    return board, drift(sc.test_x)


def _served(data_dir: Path, probe: np.ndarray) -> tuple[int | None, list[Any]]:
    agent = Agent(data_dir, KeySource(kek=KEK))
    loaded = agent.model()
    labels = [p["label"] for p in agent.predict(probe)["predictions"]]
    return loaded.local_version, labels


def _trials(template: tuple[Board, np.ndarray], tmp_path: Path, points: list[int]) -> None:
    board, probe = template
    old = _served(board.data_dir, probe)
    assert old[0] == 1
    work = tmp_path / "trial"
    shutil.copytree(board.data_dir, work)
    zygote = Zygote(work, board.data_dir)
    try:
        done = zygote.run(0)
        assert done.get("accepted") is True, done
        new = _served(work, probe)
        assert new[0] == 2 and new[1] != old[1]
        ops = int(done["ops"])
        assert ops >= 10  # the commit's durable steps, each a kill point before and after
        seen = {"old": 0, "new": 0}
        for i, n in enumerate(points):
            got = zygote.run(1 + (n - 1) % (2 * ops))
            assert "failed" not in got, got
            served = _served(work, probe)
            assert served in (old, new), (n, got, served[0])
            seen["old" if served == old else "new"] += 1
            agent = Agent(work, KeySource(kek=KEK))
            assert agent.store.layout.problems() == []
            files = LearningStore(agent.store, agent.config.learning)
            verify_log(files.read_log(), agent.store.identity().sign_public, agent.config.learning)
            if i % 17 == 5:  # now and then: the next cycle completes from whatever the kill left
                again = tmp_path / f"again-{i}"
                shutil.copytree(work, again)
                agent = Agent(again, KeySource(kek=KEK))
                assert Learning(agent).cycle(T0)["accepted"] is True
                assert agent.model().local_version is not None
        assert seen["old"] and seen["new"], seen
    finally:
        zygote.close()


def test_sigkill_during_a_learning_cycle_leaves_the_old_or_the_new_version(
    template: tuple[Board, np.ndarray], tmp_path: Path
) -> None:
    _trials(template, tmp_path, list(range(1, 51)))


@pytest.mark.slow
def test_sigkill_soak(template: tuple[Board, np.ndarray], tmp_path: Path) -> None:
    rng = np.random.default_rng(int(os.environ.get("EDGEWARD_SEED", "1")))
    _trials(template, tmp_path, [int(n) for n in rng.integers(1, 10**6, 200)])
