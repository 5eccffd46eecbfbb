"""Fuzzing the parsers an attacker reaches on the board (tests/fuzz/targets.py): bundle head,
manifest and sealed contents; enrolment files; EWCMD1 commands, beacons, queues and results;
telemetry reports; the .npy/.npz decoder. Any input must give a value or an EdgeWardError.

Every test here is long and runs with ``scripts/test.sh --slow`` (EDGEWARD_SLOW=1):

- ``test_fuzz_atheris``: coverage-guided, with atheris (libFuzzer), which ``--slow`` installs
  (scripts/lib/env.sh ``ensure_fuzz``). EDGEWARD_FUZZ_RUNS sets the runs per target (300,000).
- ``test_fuzz_long_hypothesis_run``: the same targets from hypothesis's random bytes and
  mutations of the valid seeds. It runs whether or not atheris could be installed.

The seeds are checked in the default suite, so that the targets keep reaching their parsers.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent.errors import EdgeWardError
from tests.fuzz import targets

REPO = Path(__file__).resolve().parent.parent
RUNS = int(os.environ.get("EDGEWARD_FUZZ_RUNS", "300000"))


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_fuzz_seeds_reach_the_parser_behind_each_check(name: str) -> None:
    """The valid seeds parse (or stop only where the target's data ends): a fuzz run mutates
    inputs that get past the magic, the lengths and the signature."""
    seeds = targets.seeds(name)
    refused = []
    for seed in seeds:
        try:
            targets.TARGETS[name](seed)
        except EdgeWardError as e:
            refused.append(str(e))
    # Only the golden bundles as received (mode 0) stop early: the fuzz key is not its publisher.
    expected = ["does not trust"] if name in ("bundle", "release") else []
    assert len(refused) == len(expected) and all(w in r for w, r in zip(expected, refused, strict=True)), refused
    assert len(seeds) > len(refused)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_fuzz_atheris(name: str, tmp_path: Path) -> None:
    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris is not installed: scripts/test.sh --slow installs it (ensure_fuzz); "
                    "test_fuzz_long_hypothesis_run covers these targets without it")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.run_atheris", name, str(tmp_path / "corpus"),
         f"-runs={RUNS}", "-max_len=8192", "-rss_limit_mb=2048", "-print_final_stats=1"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    out = proc.stderr + proc.stdout
    tail = "\n".join(out.splitlines()[-60:])
    crashes = sorted(p.name for p in tmp_path.glob("crash-*")) + sorted(p.name for p in tmp_path.glob("oom-*"))
    assert proc.returncode == 0 and not crashes, f"atheris found {crashes or 'a failure'} in {name}:\n{tail}"
    assert f"Done {RUNS} runs" in out, tail


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_fuzz_long_hypothesis_run(name: str) -> None:
    seeds = targets.seeds(name)

    @settings(max_examples=5_000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.sampled_from(seeds), st.integers(0, 1 << 16), st.binary(max_size=64), st.binary(max_size=2048))
    def run(seed: bytes, at: int, patch: bytes, junk: bytes) -> None:
        cut = at % (len(seed) + 1)
        targets.check(name, seed[:cut] + patch + seed[cut + len(patch):])  # overwrite bytes inside a valid input
        targets.check(name, seed[:cut] + patch)  # truncate, then append
        targets.check(name, seed[:1] + junk)  # the same mode, random bytes

    run()
